//! The Eureka REST API under `/eureka`, as Spring Cloud Netflix, py-eureka-client and
//! eureka-js-client use it: register, renew, cancel, status overrides, and discovery
//! (all applications, one application, one instance, the delta, VIPs).
//!
//! JSON and XML are two spellings of one tree. Eureka's JSON already encodes XML's
//! shape (`"port": {"$": 8080, "@enabled": "true"}` is `<port enabled="true">8080</port>`),
//! so XML bodies are parsed into that JSON form and responses are built as JSON and,
//! when XML is wanted, written out by the reverse rule. Responses are XML unless the
//! request's `Accept` asks for JSON, as the Eureka server negotiates.
//!
//! App names are case-insensitive and shown upper-case, as Eureka shows them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, put},
};
use serde_json::{Map, Value, json};
use shared::{FieldError, Problem};

use crate::{
    api::{lease_field, service_name},
    leases::{Action, Instance, LeaseTable, Snapshot, now_ms},
    model::{EurekaDetails, Registration, Status},
};

/// Eureka's lease when a client names none.
const EUREKA_DEFAULT_LEASE: u32 = 90;
const DEFAULT_DATA_CENTER: &str = "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo";

pub fn router(table: Arc<LeaseTable>) -> Router {
    Router::new()
        .route("/eureka/apps", get(all_apps))
        .route("/eureka/apps/", get(all_apps))
        .route("/eureka/apps/delta", get(delta))
        .route("/eureka/apps/{app}", get(one_app).post(register))
        .route(
            "/eureka/apps/{app}/{id}",
            get(one_instance).put(renew).delete(cancel),
        )
        .route(
            "/eureka/apps/{app}/{id}/status",
            put(set_override).delete(clear_override),
        )
        .route("/eureka/instances/{id}", get(instance_by_id))
        .route("/eureka/vips/{vip}", get(by_vip))
        .route("/eureka/svips/{svip}", get(by_secure_vip))
        .with_state(table)
}

// ---- requests ------------------------------------------------------------------

async fn register(
    State(table): State<Arc<LeaseTable>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Problem> {
    let service = service_name(&app)?;
    let tree = parse_body(&headers, &body)?;
    let instance = tree
        .get("instance")
        .filter(|v| v.is_object())
        .ok_or_else(|| {
            Problem::validation(vec![FieldError::new(
                "instance",
                "the body must be an Eureka instance: {\"instance\": {...}} or <instance>...</instance>",
            )])
        })?;
    let registration = registration_from(&table, service, instance)?;
    let now = now_ms();
    table
        .check_capacity(&registration.service, &registration.instance_id, now)
        .map_err(|cap| crate::api::full(&registration.service, cap))?;
    table.register(registration, now);
    Ok(StatusCode::NO_CONTENT)
}

/// Reads an Eureka `InstanceInfo` tree into a registration; every error names its field.
fn registration_from(
    table: &LeaseTable,
    service: crate::model::ServiceName,
    instance: &Value,
) -> Result<Registration, Problem> {
    let mut errors = Vec::new();
    let text = |key: &str| instance.get(key).and_then(scalar);
    let host = text("hostName").unwrap_or_default();
    if host.is_empty() {
        errors.push(FieldError::new("instance.hostName", "is required"));
    }
    if let Some(app) = text("app")
        && !app.eq_ignore_ascii_case(service.as_str())
    {
        errors.push(FieldError::new(
            "instance.app",
            format!("is {app}, but the URL names {}", service.eureka()),
        ));
    }
    let (port, port_enabled) = port_of(instance.get("port"), "instance.port", &mut errors);
    let (secure_port, secure_enabled) = port_of(
        instance.get("securePort"),
        "instance.securePort",
        &mut errors,
    );
    let status = match text("status") {
        None => Status::Up,
        Some(raw) => raw.parse().unwrap_or_else(|message| {
            errors.push(FieldError::new("instance.status", message));
            Status::Up
        }),
    };
    let lease = instance.get("leaseInfo");
    let lease_number = |key: &str, errors: &mut Vec<FieldError>| -> Option<u32> {
        let raw = lease.and_then(|l| l.get(key)).and_then(scalar)?;
        match raw.parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                errors.push(FieldError::new(
                    format!("instance.leaseInfo.{key}"),
                    "must be a whole number of seconds",
                ));
                None
            }
        }
    };
    let duration = lease_number("durationInSecs", &mut errors);
    let renewal_interval = lease_number("renewalIntervalInSecs", &mut errors);
    let lease_seconds = lease_field(
        table,
        Some(duration.unwrap_or(EUREKA_DEFAULT_LEASE)),
        "instance.leaseInfo.durationInSecs",
        &mut errors,
    );
    let metadata: BTreeMap<String, String> = instance
        .get("metadata")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.starts_with('@'))
                .filter_map(|(k, v)| scalar(v).map(|v| (k.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    let registration = Registration {
        service,
        instance_id: text("instanceId")
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| host.clone()),
        host,
        port: if port_enabled { port } else { port.max(1) },
        status,
        lease_seconds,
        health_url: text("healthCheckUrl").filter(|u| !u.is_empty()),
        metadata,
        eureka: EurekaDetails {
            ip_addr: text("ipAddr"),
            secure_port: Some(secure_port).filter(|p| *p != 0),
            secure_port_enabled: secure_enabled,
            vip_address: text("vipAddress"),
            secure_vip_address: text("secureVipAddress"),
            home_page_url: text("homePageUrl"),
            status_page_url: text("statusPageUrl"),
            data_center_name: instance
                .get("dataCenterInfo")
                .and_then(|d| d.get("name"))
                .and_then(scalar),
            renewal_interval_secs: renewal_interval,
        },
    };
    if let Err(more) = registration.validate() {
        errors.extend(more.into_iter().map(|mut e| {
            e.field = match e.field.as_str() {
                "host" => "instance.hostName".into(),
                "healthUrl" => "instance.healthCheckUrl".into(),
                other => format!("instance.{other}"),
            };
            e
        }));
    }
    if errors.is_empty() {
        Ok(registration)
    } else {
        Err(Problem::validation(errors))
    }
}

/// A port as Eureka spells it: `{"$": 8080, "@enabled": "true"}`, or a bare number.
fn port_of(value: Option<&Value>, field: &str, errors: &mut Vec<FieldError>) -> (u16, bool) {
    let Some(value) = value else {
        return (0, false);
    };
    let (number, enabled) = match value {
        Value::Object(o) => (
            o.get("$").and_then(scalar),
            o.get("@enabled")
                .and_then(scalar)
                .is_none_or(|e| e == "true"),
        ),
        other => (scalar(other), true),
    };
    match number.as_deref().map(str::parse::<u16>) {
        Some(Ok(port)) => (port, enabled),
        None => (0, false),
        Some(Err(_)) => {
            errors.push(FieldError::new(field, "must be a port number, 0 to 65535"));
            (0, false)
        }
    }
}

/// A string, number or boolean as text.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

async fn renew(
    State(table): State<Arc<LeaseTable>>,
    Path((app, id)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<StatusCode, Problem> {
    let service = service_name(&app)?;
    let now = now_ms();
    let instance = table.renew(&service, &id, now)?;
    // Eureka clients report their own status with each renewal.
    if let Some(status) = params.get("status").and_then(|s| s.parse::<Status>().ok())
        && status != Status::Unknown
        && status != instance.registration.status
    {
        table.set_status(&service, &id, status, now)?;
    }
    Ok(StatusCode::OK)
}

async fn cancel(
    State(table): State<Arc<LeaseTable>>,
    Path((app, id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    let service = service_name(&app)?;
    table.deregister(&service, &id, now_ms())?;
    Ok(StatusCode::OK)
}

async fn set_override(
    State(table): State<Arc<LeaseTable>>,
    Path((app, id)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<StatusCode, Problem> {
    let service = service_name(&app)?;
    let status = params
        .get("value")
        .map(|v| v.parse::<Status>())
        .transpose()
        .ok()
        .flatten()
        .filter(|s| *s != Status::Unknown)
        .ok_or_else(|| {
            Problem::validation(vec![FieldError::new(
                "value",
                format!("must be {}", Status::SETTABLE),
            )])
        })?;
    table.set_override(&service, &id, Some(status), now_ms())?;
    Ok(StatusCode::OK)
}

async fn clear_override(
    State(table): State<Arc<LeaseTable>>,
    Path((app, id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    let service = service_name(&app)?;
    table.set_override(&service, &id, None, now_ms())?;
    Ok(StatusCode::OK)
}

// ---- discovery -----------------------------------------------------------------

async fn all_apps(State(table): State<Arc<LeaseTable>>, headers: HeaderMap) -> Response {
    let snapshot = table.snapshot();
    let now = now_ms();
    let instances: Vec<&Arc<Instance>> = snapshot.all(now).collect();
    respond(&headers, applications(&snapshot, &instances, None))
}

async fn delta(State(table): State<Arc<LeaseTable>>, headers: HeaderMap) -> Response {
    let snapshot = table.snapshot();
    let now = now_ms();
    // The latest change of each instance within the retention, in Eureka's shape; the
    // hash code is the whole registry's, which clients compare after applying it.
    let mut latest: BTreeMap<(String, String), (&Arc<Instance>, Action)> = BTreeMap::new();
    for change in snapshot.changes.iter() {
        let key = (
            change.instance.registration.service.to_string(),
            change.instance.registration.instance_id.clone(),
        );
        latest.insert(key, (&change.instance, change.action));
    }
    let changed: Vec<(&Arc<Instance>, Action)> = latest.into_values().collect();
    let instances: Vec<&Arc<Instance>> = changed.iter().map(|(i, _)| *i).collect();
    let actions: HashMap<*const Instance, Action> =
        changed.iter().map(|(i, a)| (Arc::as_ptr(i), *a)).collect();
    let full_hash = hash_code(snapshot.all(now));
    let mut body = applications(&snapshot, &instances, Some(&actions));
    body["applications"]["apps__hashcode"] = json!(full_hash);
    respond(&headers, body)
}

async fn one_app(
    State(table): State<Arc<LeaseTable>>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let service = service_name(&app)?;
    let snapshot = table.snapshot();
    let now = now_ms();
    let instances: Vec<&Arc<Instance>> = snapshot.instances(&service, now).collect();
    if instances.is_empty() {
        return Err(Problem::not_found(format!(
            "no application {} is registered",
            service.eureka()
        )));
    }
    Ok(respond(
        &headers,
        json!({ "application": application(&service.eureka(), &instances, None) }),
    ))
}

async fn one_instance(
    State(table): State<Arc<LeaseTable>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let service = service_name(&app)?;
    let snapshot = table.snapshot();
    let now = now_ms();
    let instance = snapshot.instance(&service, &id, now).ok_or_else(|| {
        Problem::not_found(format!(
            "no instance {id} of {} is registered",
            service.eureka()
        ))
    })?;
    Ok(respond(
        &headers,
        json!({ "instance": instance_tree(instance, None) }),
    ))
}

async fn instance_by_id(
    State(table): State<Arc<LeaseTable>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let snapshot = table.snapshot();
    let now = now_ms();
    let instance = snapshot
        .find(&id, now)
        .ok_or_else(|| Problem::not_found(format!("no instance {id} is registered")))?;
    Ok(respond(
        &headers,
        json!({ "instance": instance_tree(instance, None) }),
    ))
}

async fn by_vip(
    State(table): State<Arc<LeaseTable>>,
    Path(vip): Path<String>,
    headers: HeaderMap,
) -> Response {
    by_address(&table, &headers, &vip, false)
}

async fn by_secure_vip(
    State(table): State<Arc<LeaseTable>>,
    Path(vip): Path<String>,
    headers: HeaderMap,
) -> Response {
    by_address(&table, &headers, &vip, true)
}

fn by_address(table: &LeaseTable, headers: &HeaderMap, vip: &str, secure: bool) -> Response {
    let snapshot = table.snapshot();
    let now = now_ms();
    let instances: Vec<&Arc<Instance>> = snapshot
        .all(now)
        .filter(|i| {
            let address = if secure { secure_vip(i) } else { vip_of(i) };
            address
                .split(',')
                .any(|a| a.trim().eq_ignore_ascii_case(vip))
        })
        .collect();
    respond(headers, applications(&snapshot, &instances, None))
}

// ---- trees ---------------------------------------------------------------------

fn vip_of(instance: &Instance) -> String {
    instance
        .registration
        .eureka
        .vip_address
        .clone()
        .unwrap_or_else(|| instance.registration.service.to_string())
}

fn secure_vip(instance: &Instance) -> String {
    instance
        .registration
        .eureka
        .secure_vip_address
        .clone()
        .unwrap_or_else(|| instance.registration.service.to_string())
}

/// A status as Eureka clients know them. Netflix's client parses statuses strictly
/// (an unknown one fails the whole fetch), and knows no `DRAINING`: an instance
/// that is finishing its work before it stops is `DOWN` to them, which is what a
/// Spring client itself reports while it shuts down.
fn eureka_status(status: Status) -> &'static str {
    match status {
        Status::Draining => Status::Down.as_str(),
        other => other.as_str(),
    }
}

/// Eureka's `apps__hashcode`: `STATUS_count_` for each status, in name order. A
/// client recomputes it over its cache after applying a delta and fetches everything
/// again when it differs, so it counts statuses exactly as they are written.
fn hash_code<'a>(instances: impl Iterator<Item = &'a Arc<Instance>>) -> String {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for instance in instances {
        *counts.entry(eureka_status(instance.status())).or_default() += 1;
    }
    counts
        .iter()
        .map(|(status, count)| format!("{status}_{count}_"))
        .collect()
}

fn applications(
    snapshot: &Snapshot,
    instances: &[&Arc<Instance>],
    actions: Option<&HashMap<*const Instance, Action>>,
) -> Value {
    let mut by_app: BTreeMap<String, Vec<&Arc<Instance>>> = BTreeMap::new();
    for instance in instances {
        by_app
            .entry(instance.registration.service.eureka())
            .or_default()
            .push(instance);
    }
    let apps: Vec<Value> = by_app
        .iter()
        .map(|(name, instances)| application(name, instances, actions))
        .collect();
    json!({
        "applications": {
            "versions__delta": snapshot.index.to_string(),
            "apps__hashcode": hash_code(instances.iter().copied()),
            "application": apps,
        }
    })
}

fn application(
    name: &str,
    instances: &[&Arc<Instance>],
    actions: Option<&HashMap<*const Instance, Action>>,
) -> Value {
    let instances: Vec<Value> = instances
        .iter()
        .map(|i| {
            let action = actions.and_then(|a| a.get(&Arc::as_ptr(i)).copied());
            instance_tree(i, action)
        })
        .collect();
    json!({ "name": name, "instance": instances })
}

/// One `InstanceInfo` in Eureka's JSON shape.
fn instance_tree(instance: &Instance, action: Option<Action>) -> Value {
    let r = &instance.registration;
    let e = &r.eureka;
    let base = format!("http://{}", r.address());
    let action = match action.unwrap_or(Action::Added) {
        Action::Added => "ADDED",
        Action::Modified => "MODIFIED",
        Action::Deleted => "DELETED",
    };
    let metadata: Map<String, Value> = r
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "instanceId": r.instance_id,
        "hostName": r.host,
        "app": r.service.eureka(),
        "ipAddr": e.ip_addr.clone().unwrap_or_else(|| r.host.clone()),
        "status": eureka_status(instance.status()),
        "overriddenStatus": eureka_status(instance.override_status.unwrap_or(Status::Unknown)),
        "port": { "$": r.port, "@enabled": "true" },
        "securePort": {
            "$": e.secure_port.unwrap_or(443),
            "@enabled": e.secure_port_enabled.to_string(),
        },
        "countryId": 1,
        // Netflix's client accepts only Netflix, Amazon or MyOwn here, and reads
        // Amazon under this class as a cast error: the default data centre is MyOwn.
        "dataCenterInfo": {
            "@class": DEFAULT_DATA_CENTER,
            "name": "MyOwn",
        },
        "leaseInfo": {
            "renewalIntervalInSecs": e
                .renewal_interval_secs
                .unwrap_or((r.lease_seconds / 3).max(1)),
            "durationInSecs": r.lease_seconds,
            "registrationTimestamp": instance.registered_at,
            "lastRenewalTimestamp": instance.clock.last_renewal(),
            "evictionTimestamp": 0,
            "serviceUpTimestamp": instance.registered_at,
        },
        "metadata": metadata,
        "homePageUrl": e.home_page_url.clone().unwrap_or_else(|| format!("{base}/")),
        "statusPageUrl": e
            .status_page_url
            .clone()
            .unwrap_or_else(|| format!("{base}/actuator/info")),
        "healthCheckUrl": r
            .health_url
            .clone()
            .unwrap_or_else(|| format!("{base}/actuator/health")),
        "vipAddress": vip_of(instance),
        "secureVipAddress": secure_vip(instance),
        "isCoordinatingDiscoveryServer": "false",
        "lastUpdatedTimestamp": instance.updated_at.to_string(),
        "lastDirtyTimestamp": instance.updated_at.to_string(),
        "actionType": action,
    })
}

// ---- the two spellings -----------------------------------------------------------

/// JSON when `Accept` names JSON, else XML (the Eureka server's default).
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("json"))
}

fn respond(headers: &HeaderMap, tree: Value) -> Response {
    if wants_json(headers) {
        return axum::Json(tree).into_response();
    }
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    if let Value::Object(root) = &tree {
        for (name, value) in root {
            write_xml(&mut xml, name, value);
        }
    }
    ([(header::CONTENT_TYPE, "application/xml")], xml).into_response()
}

/// XML's own spelling of a few names Eureka's JSON spells differently.
fn xml_name(name: &str) -> &str {
    match name {
        "overriddenStatus" => "overriddenstatus",
        other => other,
    }
}

fn write_xml(out: &mut String, name: &str, value: &Value) {
    if let Value::Array(items) = value {
        for item in items {
            write_xml(out, name, item);
        }
        return;
    }
    // A metadata key that is no XML name cannot be written; Eureka refuses them too.
    if !valid_xml_name(name) {
        return;
    }
    let name = xml_name(name);
    out.push('<');
    out.push_str(name);
    if let Value::Object(fields) = value {
        for (key, attribute) in fields {
            if let Some(attr) = key.strip_prefix('@') {
                out.push_str(&format!(
                    " {attr}=\"{}\"",
                    escape(&scalar(attribute).unwrap_or_default())
                ));
            }
        }
        out.push('>');
        for (key, child) in fields {
            if key == "$" {
                out.push_str(&escape(&scalar(child).unwrap_or_default()));
            } else if !key.starts_with('@') {
                write_xml(out, key, child);
            }
        }
    } else {
        out.push('>');
        out.push_str(&escape(&scalar(value).unwrap_or_default()));
    }
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

fn valid_xml_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn escape(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

/// A request body as Eureka's JSON tree, whichever spelling it came in.
fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.contains("json") {
        return serde_json::from_slice(body)
            .map_err(|e| Problem::bad_request(format!("The body is not valid JSON: {e}.")));
    }
    if content_type.contains("xml") {
        return xml_to_tree(body)
            .map_err(|e| Problem::bad_request(format!("The body is not valid XML: {e}.")));
    }
    Err(Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Send the instance as `application/json` or `application/xml`.",
    ))
}

/// How deeply elements may nest in an XML body. An Eureka instance nests four deep at
/// most; a crafted body nested thousands deep would build a tree whose recursive
/// drop and conversion overflow the stack and kill the process.
pub const MAX_XML_DEPTH: usize = 32;

/// How many attributes one element may have. Eureka's carry two at most
/// (`@class`, `@enabled`).
pub const MAX_XML_ATTRIBUTES: usize = 16;

/// Parses XML into Eureka's JSON form: attributes become `@name`, an element's text
/// beside attributes becomes `$`, repeated elements become arrays. Elements nest at
/// most [`MAX_XML_DEPTH`] deep; character references (`&#65;`, `&#x41;`) and the five
/// predefined entities are resolved, nothing else (no DTD, no external entities).
pub fn xml_to_tree(body: &[u8]) -> Result<Value, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(body);
    reader.config_mut().trim_text(true);
    // Each open element: its name, its fields so far, its text so far.
    let mut stack: Vec<(String, Map<String, Value>, String)> =
        vec![(String::new(), Map::new(), String::new())];
    let mut buf = Vec::new();
    loop {
        match reader
            .read_event_into(&mut buf)
            .map_err(|e| e.to_string())?
        {
            Event::Start(start) => {
                // The stack holds the document root too.
                if stack.len() > MAX_XML_DEPTH {
                    return Err(format!("elements nest deeper than {MAX_XML_DEPTH} levels"));
                }
                let (name, fields) = element(&start)?;
                stack.push((name, fields, String::new()));
            }
            Event::Empty(start) => {
                let (name, fields) = element(&start)?;
                let value = if fields.is_empty() {
                    Value::String(String::new())
                } else {
                    Value::Object(fields)
                };
                if let Some(parent) = stack.last_mut() {
                    insert_child(&mut parent.1, name, value);
                }
            }
            Event::Text(text) => {
                if let Some(top) = stack.last_mut() {
                    top.2.push_str(&text.decode().map_err(|e| e.to_string())?);
                }
            }
            Event::GeneralRef(reference) => {
                if let Some(top) = stack.last_mut() {
                    if let Some(c) = reference.resolve_char_ref().map_err(|e| e.to_string())? {
                        top.2.push(c);
                    } else {
                        let name = reference.decode().map_err(|e| e.to_string())?;
                        let resolved = quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("unknown entity &{name};"))?;
                        top.2.push_str(resolved);
                    }
                }
            }
            Event::CData(data) => {
                if let Some(top) = stack.last_mut() {
                    top.2.push_str(&String::from_utf8_lossy(&data));
                }
            }
            Event::End(_) => {
                let (name, mut fields, text) = stack.pop().ok_or("unbalanced end tag")?;
                let value = if fields.is_empty() {
                    Value::String(text)
                } else {
                    if !text.is_empty() {
                        fields.insert("$".into(), Value::String(text));
                    }
                    Value::Object(fields)
                };
                let parent = stack.last_mut().ok_or("unbalanced end tag")?;
                insert_child(&mut parent.1, name, value);
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    match stack.pop() {
        Some((_, root, _)) if stack.is_empty() => Ok(Value::Object(root)),
        _ => Err("the document ends inside an element".into()),
    }
}

/// An element's name, and its attributes as `@name` fields.
fn element(
    start: &quick_xml::events::BytesStart<'_>,
) -> Result<(String, Map<String, Value>), String> {
    let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    let mut fields = Map::new();
    // quick-xml's own duplicate check compares each attribute with every one before
    // it: a 2 MB tag of 200,000 attributes would cost seconds of a worker. The count
    // is bounded instead, and duplicates are found by the map.
    for attribute in start.attributes().with_checks(false) {
        if fields.len() == MAX_XML_ATTRIBUTES {
            return Err(format!(
                "<{name}> has more than {MAX_XML_ATTRIBUTES} attributes"
            ));
        }
        let attribute = attribute.map_err(|e| e.to_string())?;
        let key = format!("@{}", String::from_utf8_lossy(attribute.key.as_ref()));
        if fields.contains_key(&key) {
            return Err(format!("<{name}> repeats the attribute {}", &key[1..]));
        }
        let value = attribute
            .unescape_value()
            .map_err(|e| e.to_string())?
            .into_owned();
        fields.insert(key, Value::String(value));
    }
    Ok((name, fields))
}

fn insert_child(fields: &mut Map<String, Value>, name: String, value: Value) {
    match fields.get_mut(&name) {
        None => {
            fields.insert(name, value);
        }
        Some(Value::Array(items)) => items.push(value),
        Some(existing) => {
            let first = existing.take();
            *existing = Value::Array(vec![first, value]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eureka_clients_see_only_the_statuses_they_know() {
        assert_eq!(eureka_status(Status::Draining), "DOWN");
        for status in [
            Status::Starting,
            Status::Up,
            Status::Down,
            Status::OutOfService,
            Status::Unknown,
        ] {
            assert_eq!(eureka_status(status), status.as_str());
        }
    }

    #[test]
    fn deeply_nested_xml_is_refused_not_a_crash() {
        // Properly closed, so the old parser built the whole 100,000-deep tree.
        let depth = 100_000;
        let body = format!("{}{}", "<a>".repeat(depth), "</a>".repeat(depth));
        let error = xml_to_tree(body.as_bytes()).expect_err("refused");
        assert!(error.contains("deeper than 32"), "{error}");
        // The deepest a document may go still parses.
        let body = format!(
            "{}x{}",
            "<a>".repeat(MAX_XML_DEPTH),
            "</a>".repeat(MAX_XML_DEPTH)
        );
        assert!(xml_to_tree(body.as_bytes()).is_ok());
        let body = format!(
            "{}x{}",
            "<a>".repeat(MAX_XML_DEPTH + 1),
            "</a>".repeat(MAX_XML_DEPTH + 1)
        );
        assert!(xml_to_tree(body.as_bytes()).is_err());
    }

    #[test]
    fn numeric_character_references_are_resolved() {
        let tree = xml_to_tree(
            br#"<instance><app>ORDER&#45;SERVICE</app><hostName>h&#x31;</hostName>
               <metadata><zone a="&#97;&#x62;">&#233;</zone></metadata></instance>"#,
        )
        .unwrap();
        assert_eq!(tree["instance"]["app"], "ORDER-SERVICE");
        assert_eq!(tree["instance"]["hostName"], "h1");
        assert_eq!(tree["instance"]["metadata"]["zone"]["$"], "é");
        assert_eq!(tree["instance"]["metadata"]["zone"]["@a"], "ab");
        assert!(xml_to_tree(b"<a>&#0;</a>").is_err());
        assert!(xml_to_tree(b"<a>&#xFFFFFFFF;</a>").is_err());
    }

    #[test]
    fn xml_parses_into_eurekas_json_shape() {
        let tree = xml_to_tree(
            br#"<instance><hostName>h1</hostName><port enabled="true">8080</port>
               <dataCenterInfo class="x.Y"><name>MyOwn</name></dataCenterInfo>
               <metadata><zone>a&amp;b</zone></metadata></instance>"#,
        )
        .unwrap();
        assert_eq!(tree["instance"]["hostName"], "h1");
        assert_eq!(tree["instance"]["port"]["$"], "8080");
        assert_eq!(tree["instance"]["port"]["@enabled"], "true");
        assert_eq!(tree["instance"]["dataCenterInfo"]["@class"], "x.Y");
        assert_eq!(tree["instance"]["metadata"]["zone"], "a&b");
    }

    #[test]
    fn an_element_with_a_flood_of_attributes_is_refused_at_once() {
        // 200,000 distinct attributes: quadratic to check for duplicates one by one.
        let mut tag = String::from("<instance");
        for i in 0..200_000 {
            tag.push_str(&format!(" a{i}=\"\""));
        }
        tag.push_str("/>");
        let error = xml_to_tree(tag.as_bytes()).expect_err("refused");
        assert!(error.contains("more than 16 attributes"), "{error}");
        let error = xml_to_tree(b"<port enabled=\"true\" enabled=\"false\">80</port>")
            .expect_err("a repeated attribute");
        assert!(error.contains("repeats the attribute enabled"), "{error}");
        let ok = xml_to_tree(b"<port enabled=\"true\">80</port>").expect("parses");
        assert_eq!(ok["port"]["@enabled"], "true");
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(xml_to_tree(b"<instance><hostName>h</instance>").is_err());
        assert!(xml_to_tree(b"<instance>").is_err());
    }

    #[test]
    fn json_trees_write_out_as_eureka_xml() {
        let mut out = String::new();
        write_xml(
            &mut out,
            "application",
            &json!({"name": "A", "instance": [
                {"port": {"$": 80, "@enabled": "true"}, "overriddenStatus": "UNKNOWN"},
                {"port": {"$": 81, "@enabled": "true"}, "metadata": {"k": "<v>"}},
            ]}),
        );
        assert_eq!(
            out,
            "<application><name>A</name><instance><port enabled=\"true\">80</port>\
             <overriddenstatus>UNKNOWN</overriddenstatus></instance><instance>\
             <port enabled=\"true\">81</port><metadata><k>&lt;v&gt;</k></metadata>\
             </instance></application>"
        );
    }

    #[test]
    fn the_hash_code_counts_statuses_in_name_order() {
        assert_eq!(hash_code(std::iter::empty()), "");
    }
}
