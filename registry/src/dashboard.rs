//! The dashboard at `GET /`: services, instances (address, status, metadata, last
//! heartbeat, time left on the lease), self-preservation, renewals in the last
//! minute, and this node's peers with how replication to each goes.
//!
//! The page is rendered here with the live table, so it shows the truth without
//! JavaScript. A small inline script then follows `/api/v1/watch` and re-renders on
//! every change; lease timings move with every heartbeat without a change event, so it
//! also refreshes `/api/v1/state` and the instance list once a second. Nothing is
//! loaded from outside the registry.

use std::{fmt::Write, sync::Arc};

use axum::{
    Router,
    extract::State,
    response::{Html, IntoResponse},
    routing::get,
};

use crate::leases::{LeaseTable, now_ms};

pub fn router(table: Arc<LeaseTable>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/v1/instances", get(all_instances))
        .with_state(table)
}

/// Every visible instance, for the dashboard's refresh.
async fn all_instances(State(table): State<Arc<LeaseTable>>) -> impl IntoResponse {
    let snapshot = table.snapshot();
    let now = now_ms();
    let instances: Vec<serde_json::Value> = snapshot
        .all(now)
        .map(|i| crate::api::instance_json(i, now))
        .collect();
    axum::Json(serde_json::json!({ "index": snapshot.index, "now": now, "instances": instances }))
}

async fn page(State(table): State<Arc<LeaseTable>>) -> Html<String> {
    let snapshot = table.snapshot();
    let now = now_ms();
    let state = crate::api::state_json(&table, &snapshot, now);
    let mut rows = String::new();
    let mut services = 0;
    for service in snapshot.services.keys() {
        let instances: Vec<_> = snapshot.instances(service, now).collect();
        if instances.is_empty() {
            continue;
        }
        services += 1;
        for i in instances {
            let r = &i.registration;
            let metadata: Vec<String> = r
                .metadata
                .iter()
                .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
                .collect();
            let _ = write!(
                rows,
                "<tr data-id=\"{id}\"><td>{svc}</td><td>{id}</td><td>{addr}</td>\
                 <td class=\"s-{status}\">{status}</td><td>{meta}</td>\
                 <td>{ago} ago</td><td>{left}</td></tr>",
                svc = esc(r.service.as_str()),
                id = esc(&r.instance_id),
                addr = esc(&r.address()),
                status = i.status(),
                meta = metadata.join(" "),
                ago = seconds(now.saturating_sub(i.clock.last_renewal())),
                left = seconds(i.expires_at().saturating_sub(now)),
            );
        }
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"7\">No instance is registered.</td></tr>");
    }
    let preservation = match snapshot.preservation.as_ref() {
        Some(p) => format!(
            "<p class=\"warn\" id=\"preservation\">Self-preservation is ON: {}. It ends \
             by itself within {}.</p>",
            esc(&p.reason()),
            seconds(p.until.saturating_sub(now))
        ),
        None => "<p id=\"preservation\">Self-preservation is off: expired leases are removed at once.</p>"
            .to_owned(),
    };
    let peers = peers_line(&state["node"], &state["peers"]);
    Html(
        PAGE.replace("{{services}}", &services.to_string())
            .replace("{{peers}}", &peers)
            .replace("{{instances}}", &state["instances"].to_string())
            .replace("{{renewals}}", &state["renewalsLastMinute"].to_string())
            .replace("{{index}}", &snapshot.index.to_string())
            .replace("{{preservation}}", &preservation)
            .replace("{{rows}}", &rows),
    )
}

/// "node a1b2…; peers: http://…:8762 up, http://…:8763 down (12 queued: connection
/// refused)", or nothing without peers.
fn peers_line(node: &serde_json::Value, peers: &serde_json::Value) -> String {
    let Some(peers) = peers.as_array().filter(|p| !p.is_empty()) else {
        return "<p id=\"peers\"></p>".to_owned();
    };
    let described: Vec<String> = peers
        .iter()
        .map(|p| {
            let state = p["state"].as_str().unwrap_or("?");
            let mut text = format!(
                "{} <span class=\"p-{state}\">{state}</span>",
                esc(p["url"].as_str().unwrap_or_default())
            );
            if state == "down" {
                let _ = write!(
                    text,
                    " ({} queued{})",
                    p["queued"],
                    p["lastError"]
                        .as_str()
                        .map(|e| format!(": {}", esc(e)))
                        .unwrap_or_default()
                );
            }
            text
        })
        .collect();
    format!(
        "<p id=\"peers\">Node {} with peers: {}</p>",
        esc(node.as_str().unwrap_or_default()),
        described.join(", ")
    )
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Registry</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #1d2330; }
  h1 { font-size: 1.4rem; margin: 0 0 .5rem; }
  .figures span { display: inline-block; margin-right: 1.5rem; }
  .figures b { font-size: 1.2rem; }
  table { border-collapse: collapse; width: 100%; margin-top: 1rem; }
  th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #dde1e8; }
  th { background: #f3f5f8; }
  .s-UP { color: #137333; font-weight: 600; }
  .s-DOWN, .s-OUT_OF_SERVICE { color: #b3261e; font-weight: 600; }
  .s-DRAINING, .s-STARTING { color: #9a6700; font-weight: 600; }
  .warn { background: #fff4e5; border-left: 4px solid #9a6700; padding: .5rem .8rem; }
  #live { color: #5f6b7a; }
  .p-up { color: #137333; font-weight: 600; }
  .p-down { color: #b3261e; font-weight: 600; }
  .p-self { color: #5f6b7a; }
</style>
</head>
<body>
<h1>Service registry</h1>
<p class="figures">
  <span>services <b id="services">{{services}}</b></span>
  <span>instances <b id="instances">{{instances}}</b></span>
  <span>renewals in the last minute <b id="renewals">{{renewals}}</b></span>
  <span>index <b id="index">{{index}}</b></span>
  <span id="live">static</span>
</p>
{{preservation}}
{{peers}}
<table>
  <thead><tr><th>service</th><th>instance</th><th>address</th><th>status</th>
  <th>metadata</th><th>last heartbeat</th><th>lease left</th></tr></thead>
  <tbody id="rows">{{rows}}</tbody>
</table>
<script>
(function () {
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c]));
  const secs = (ms) => (Math.max(ms, 0) / 1000).toFixed(1) + "s";
  async function refresh() {
    try {
      const [list, state] = await Promise.all([
        fetch("/api/v1/instances").then((r) => r.json()),
        fetch("/api/v1/state").then((r) => r.json()),
      ]);
      const now = list.now;
      const rows = list.instances.map((i) =>
        `<tr data-id="${esc(i.instanceId)}"><td>${esc(i.service)}</td><td>${esc(i.instanceId)}</td>` +
        `<td>${esc(i.address)}</td><td class="s-${esc(i.status)}">${esc(i.status)}</td>` +
        `<td>${Object.entries(i.metadata).map(([k, v]) => esc(k) + "=" + esc(v)).join(" ")}</td>` +
        `<td>${secs(now - i.lastRenewalAt)} ago</td><td>${secs(i.leaseExpiresAt - now)}</td></tr>`);
      $("rows").innerHTML = rows.length ? rows.join("") : '<tr><td colspan="7">No instance is registered.</td></tr>';
      $("services").textContent = new Set(list.instances.map((i) => i.service)).size;
      $("instances").textContent = state.instances;
      $("renewals").textContent = state.renewalsLastMinute;
      $("index").textContent = state.index;
      const p = state.selfPreservation;
      $("preservation").className = p ? "warn" : "";
      $("preservation").textContent = p
        ? `Self-preservation is ON: ${p.reason}. It ends by itself within ${secs(p.until - now)}.`
        : "Self-preservation is off: expired leases are removed at once.";
      if (state.peers && state.peers.length) {
        $("peers").innerHTML = `Node ${esc(state.node)} with peers: ` + state.peers.map((p) =>
          `${esc(p.url)} <span class="p-${esc(p.state)}">${esc(p.state)}</span>` +
          (p.state === "down" ? ` (${p.queued} queued${p.lastError ? ": " + esc(p.lastError) : ""})` : "")).join(", ");
      }
    } catch (e) { $("live").textContent = "registry unreachable, retrying"; }
  }
  const events = new EventSource("/api/v1/watch");
  events.addEventListener("snapshot", () => { $("live").textContent = "live"; refresh(); });
  events.addEventListener("change", refresh);
  events.onerror = () => { $("live").textContent = "reconnecting"; };
  setInterval(refresh, 1000);
})();
</script>
</body>
</html>
"##;
