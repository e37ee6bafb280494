//! The gateway binary, configured the way an operator would, writes one JSON access
//! log line per request.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::{Value, json};

#[tokio::test]
async fn every_request_gets_one_json_access_line_with_route_instance_status_and_reason() {
    // An upstream at a fixed address: no registry needed for this route.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("dir");
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!("routes:\n  - id: fixed\n    uri: http://{upstream}\n    predicates: [\"Path=/fixed/**\"]\n"),
    )
    .expect("routes");
    let config = dir.path().join("gateway.yaml");
    let hash = gateway::auth::hash_password("pw").expect("hash");
    std::fs::write(
        &config,
        format!(
            "routes_file: {}\nregistry:\n  enabled: false\nauth:\n  signing_key: \"{}\"\n  users:\n    - username: ops\n      password_hash: \"{hash}\"\n      roles: [admin]\n",
            routes.display(),
            shared::auth::TokenSigner::generate_seed()
        ),
    )
    .expect("config");

    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .env("GATEWAY_CONFIG", &config)
            .env("GATEWAY_HTTP__PORT", "0")
            .env("GATEWAY_LOG__FORMAT", "json")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("gateway starts"),
    );
    let (tx, lines) = mpsc::channel::<Value>();
    let stdout = child.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(value);
            }
        }
    });
    let next = |what: &str| -> Value {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no log line for {what}"));
            if what == "listening" && line["message"] == "listening" {
                return line;
            }
            if what == "access" && line["target"] == "access" {
                return line;
            }
        }
    };
    let listening = next("listening");
    let base = format!("http://{}", listening["addr"].as_str().expect("addr"));

    let client = reqwest::Client::new();
    let token: Value = client
        .post(format!("{base}/auth/token"))
        .json(&json!({"username": "ops", "password": "pw"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = token["access_token"].as_str().expect("token").to_owned();
    let ok = client
        .get(format!("{base}/fixed/a"))
        .bearer_auth(&token)
        .header("x-request-id", "trace-me")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
    let line = next("access");
    // The line names the trace the request belongs to, as every line of it does: one
    // the gateway started, since a client that is not a trusted proxy does not choose
    // the trace (client_traces is off by default).
    let trace = line["span"]["trace_id"].as_str().unwrap_or_default();
    assert_eq!(trace.len(), 32, "{line}");
    assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736", "{line}");
    assert_eq!(line["route"], "fixed");
    assert_eq!(line["status"], 200);
    assert_eq!(line["instance"], upstream.to_string());
    assert_eq!(line["request_id"], "trace-me");
    assert_eq!(line["retries"], 0);
    assert!(line["latency_ms"].as_f64().is_some(), "{line}");

    let refused = client
        .get(format!("{base}/fixed/a"))
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 401);
    let line = next("access");
    // Without a traceparent the gateway starts a trace of its own.
    assert_eq!(
        line["span"]["trace_id"].as_str().map(str::len),
        Some(32),
        "{line}"
    );
    assert_eq!(
        (line["status"].as_u64(), line["reason"].as_str()),
        (Some(401), Some("unauthenticated"))
    );
}

/// Stops the gateway however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
