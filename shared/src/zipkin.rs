//! Spans to a Zipkin server, in its v2 JSON (`POST /api/v2/spans`): what Spring's
//! Micrometer Tracing sends, so a Spring shop's existing Zipkin (or anything that
//! speaks its API: Jaeger, Grafana Tempo, the OpenTelemetry Collector) shows our
//! spans beside theirs.
//!
//! Written here rather than taken from `opentelemetry-zipkin`: that crate is
//! deprecated, and its last release sends no `localEndpoint.serviceName`, so every
//! span would land under "unknown".

use std::{collections::BTreeMap, time::Duration};

use opentelemetry::{
    Value as OtelValue,
    trace::{SpanKind, Status},
};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{SpanData, SpanExporter},
};
use serde::Serialize;

/// Posts batches of finished spans to one Zipkin server.
#[derive(Debug)]
pub struct ZipkinExporter {
    endpoint: String,
    service: String,
    agent: ureq::Agent,
}

impl ZipkinExporter {
    /// Spans of `service` to the Zipkin at `url` (its base, `http://host:9411`). An
    /// `https://` Zipkin is trusted by the system's roots and the certificates in
    /// `ca_files`, as every other client of ours trusts its server; a CA file that
    /// cannot be used is an error naming it.
    pub fn new(url: &str, service: &str, ca_files: &[std::path::PathBuf]) -> Result<Self, String> {
        let roots: Vec<ureq::tls::Certificate<'static>> = crate::tls::trusted_roots(ca_files)
            .map_err(|e| format!("tracing.ca_files: {e}"))?
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c).to_owned())
            .collect();
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
            .build();
        Ok(Self {
            endpoint: format!("{}/api/v2/spans", url.trim_end_matches('/')),
            service: service.to_owned(),
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .http_status_as_error(false)
                .tls_config(tls)
                .build()
                .into(),
        })
    }
}

impl SpanExporter for ZipkinExporter {
    // Called on the batch processor's own thread, one batch at a time: a blocking
    // post with a deadline is what that thread is for.
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans: Vec<ZipkinSpan> = batch
            .iter()
            .map(|s| zipkin_span(s, &self.service))
            .collect();
        let body =
            serde_json::to_vec(&spans).map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
        let response = self
            .agent
            .post(&self.endpoint)
            .header("content-type", "application/json")
            .send(&body[..])
            .map_err(|e| OTelSdkError::InternalFailure(format!("{}: {e}", self.endpoint)))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(OTelSdkError::InternalFailure(format!(
                "{} answered {}",
                self.endpoint,
                response.status()
            )))
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(name) = resource.get(&opentelemetry::Key::new("service.name")) {
            self.service = name.to_string();
        }
    }
}

/// One span in Zipkin's v2 model.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan {
    trace_id: String,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    /// Microseconds since the epoch.
    timestamp: u128,
    /// Microseconds, at least 1 (Zipkin reads 0 as "unknown").
    duration: u128,
    local_endpoint: Endpoint,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint>,
    tags: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint {
    service_name: String,
}

fn zipkin_span(span: &SpanData, service: &str) -> ZipkinSpan {
    let micros = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros()
    };
    let mut tags: BTreeMap<String, String> = span
        .attributes
        .iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect();
    // Zipkin marks a failed span with an `error` tag, as Brave does.
    if let Status::Error { description } = &span.status {
        let text = if description.is_empty() {
            "true"
        } else {
            description.as_ref()
        };
        tags.insert("error".into(), text.to_owned());
    }
    let remote = span
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "peer.service")
        .map(|kv| match &kv.value {
            OtelValue::String(s) => s.to_string(),
            other => other.to_string(),
        });
    let parent = span.parent_span_id;
    let start = micros(span.start_time);
    ZipkinSpan {
        trace_id: span.span_context.trace_id().to_string(),
        id: span.span_context.span_id().to_string(),
        parent_id: (parent != opentelemetry::trace::SpanId::INVALID).then(|| parent.to_string()),
        name: span.name.to_string(),
        kind: match span.span_kind {
            SpanKind::Client => Some("CLIENT"),
            SpanKind::Server => Some("SERVER"),
            SpanKind::Producer => Some("PRODUCER"),
            SpanKind::Consumer => Some("CONSUMER"),
            SpanKind::Internal => None,
        },
        timestamp: start,
        duration: micros(span.end_time).saturating_sub(start).max(1),
        local_endpoint: Endpoint {
            service_name: service.to_owned(),
        },
        remote_endpoint: remote.map(|service_name| Endpoint { service_name }),
        tags,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use opentelemetry::{
        InstrumentationScope, KeyValue,
        trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState},
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};

    use super::*;

    #[test]
    fn a_span_becomes_zipkins_v2_json_with_the_service_kind_and_error() {
        let start = UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000);
        let span = SpanData {
            span_context: SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex"),
                SpanId::from_hex("00f067aa0ba902b7").expect("hex"),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from_hex("b7ad6b7169203331").expect("hex"),
            parent_span_is_remote: true,
            span_kind: SpanKind::Client,
            name: "POST order-service".into(),
            start_time: start,
            end_time: start + Duration::from_micros(1500),
            attributes: vec![
                KeyValue::new("peer.service", "order-service"),
                KeyValue::new("http.response.status_code", 503),
            ],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::error("upstream timeout"),
            instrumentation_scope: InstrumentationScope::builder("gateway").build(),
        };
        let json = serde_json::to_value(zipkin_span(&span, "gateway")).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "id": "00f067aa0ba902b7",
                "parentId": "b7ad6b7169203331",
                "name": "POST order-service",
                "kind": "CLIENT",
                "timestamp": 1_700_000_000_000_000u64,
                "duration": 1500,
                "localEndpoint": {"serviceName": "gateway"},
                "remoteEndpoint": {"serviceName": "order-service"},
                "tags": {
                    "peer.service": "order-service",
                    "http.response.status_code": "503",
                    "error": "upstream timeout"
                }
            })
        );
        let root = SpanData {
            parent_span_id: SpanId::INVALID,
            span_kind: SpanKind::Internal,
            status: Status::Unset,
            end_time: start,
            ..span
        };
        let json = serde_json::to_value(zipkin_span(&root, "gateway")).expect("json");
        assert!(json.get("parentId").is_none() && json.get("kind").is_none());
        assert_eq!(json["duration"], 1, "never 0");
    }
}
