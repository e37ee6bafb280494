//! HTTP pieces every service's router uses: a JSON body extractor whose rejections are
//! our problem+json (naming the field at fault), problem+json answers for unknown
//! routes and methods. Serving a router is [`crate::server::serve`].

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequest, Request},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use crate::problem::{FieldError, Problem};

/// A JSON request body. Unlike `axum::Json`, every rejection is a [`Problem`]:
/// 415 without a JSON content type, 400 for malformed JSON, 422 naming the field
/// whose value has the wrong type or is missing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Send the body as JSON with `Content-Type: application/json`.",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| Problem::new(rejection.status(), rejection.body_text()))?;
        parse_json(&bytes).map(Json)
    }
}

/// Deserializes a JSON document, turning serde's error into a problem that names the
/// field (`items[0].quantity`) where one is at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let inner = err.inner();
        let message = strip_position(&inner.to_string());
        if inner.is_syntax() || inner.is_eof() {
            return Problem::bad_request(format!("The body is not valid JSON: {message}."));
        }
        let mut field = err.path().to_string();
        // serde reports a missing field at its parent; name the field itself.
        if let Some(name) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
        {
            field = if field == "." {
                name.to_owned()
            } else {
                format!("{field}.{name}")
            };
        }
        if field == "." {
            field = "$".into();
        }
        Problem::validation(vec![FieldError::new(field, message)])
    })?;
    // Trailing bytes after the document make it malformed too.
    de.end().map_err(|e| {
        Problem::bad_request(format!(
            "The body is not valid JSON: {}.",
            strip_position(&e.to_string())
        ))
    })?;
    Ok(value)
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The fallback of every router: an unknown path is a problem+json 404.
pub async fn not_found(uri: axum::http::Uri) -> Problem {
    Problem::not_found(format!("No resource at {}.", uri.path()))
}

/// Rewrites every error answer that is not already problem+json (axum's own
/// rejections, such as 405 or a malformed query string, are plain text) into one
/// with the same status and message, keeping every header but those of the body.
pub async fn problem_for_bare_errors(req: Request, next: axum::middleware::Next) -> Response {
    bare_error_as_problem(next.run(req).await).await
}

/// `response` itself, or as problem+json when it is a 4xx or 5xx that is not one
/// (see [`problem_for_bare_errors`]), for servers that answer without the middleware.
pub async fn bare_error_as_problem(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes()
                .starts_with(crate::problem::CONTENT_TYPE.as_bytes())
        });
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let detail = match (status, text.is_empty()) {
        (StatusCode::METHOD_NOT_ALLOWED, _) => {
            "This method is not allowed on this resource.".to_owned()
        }
        (_, true) => status.canonical_reason().unwrap_or("Error").to_owned(),
        (_, false) => text,
    };
    let mut problem = Problem::new(status, detail).into_response();
    // Only the body changes: every other header (Allow, WWW-Authenticate, request id,
    // CORS, rate limits...) stays as it was.
    for (name, value) in &parts.headers {
        let describes_body = name == header::CONTENT_TYPE
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONTENT_ENCODING;
        if !describes_body {
            problem.headers_mut().append(name.clone(), value.clone());
        }
    }
    problem
}

/// Adds the contract's error behaviour to a finished router.
pub fn with_problem_fallbacks(router: Router) -> Router {
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn(problem_for_bare_errors))
        .layer(axum::middleware::from_fn(crate::metrics::record_http))
        .layer(axum::middleware::from_fn(crate::telemetry::http_span))
}

/// A service's whole router: its `api` routes behind token authentication (unknown
/// paths there are 404 problems, after authentication), beside the open actuator.
/// The layers every service shares, outermost first:
///
/// - the request id: the caller's `X-Request-Id` when it is one, else a new one,
///   answered in the response, so a client can quote it;
/// - the request span (trace and request id on every log line), outside everything
///   it should time;
/// - the HTTP metrics, which then see the timeout's 503 too;
/// - the timeout: a request still running after `timeout` is answered 503 and its
///   handler dropped (a transaction it held rolls back);
/// - problem+json for the bare errors axum itself answers.
pub fn service_router(
    actuator: Router,
    api: Router,
    verifier: std::sync::Arc<crate::auth::JwtVerifier>,
    timeout: std::time::Duration,
) -> Router {
    let api = api
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            verifier,
            crate::auth::authenticate,
        ));
    actuator
        .merge(api)
        .layer(axum::middleware::from_fn(problem_for_bare_errors))
        .layer(axum::middleware::from_fn_with_state(timeout, time_limit))
        .layer(axum::middleware::from_fn(crate::metrics::record_http))
        .layer(axum::middleware::from_fn(crate::telemetry::http_span))
        .layer(axum::middleware::from_fn(request_id))
}

/// Answers 503 when the rest of the stack takes longer than `limit`. The handler may
/// have been waiting for its COMMIT: a write without an `Idempotency-Key` is told its
/// outcome is unknown rather than to retry, so a client following the advice never
/// places an order twice.
async fn time_limit(
    axum::extract::State(limit): axum::extract::State<std::time::Duration>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let retry_is_safe =
        request.method().is_idempotent() || request.headers().contains_key("idempotency-key");
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                limit_ms = limit.as_millis() as u64,
                "a request ran out of time"
            );
            let millis = limit.as_millis();
            let detail = if retry_is_safe {
                format!("The request took longer than {millis} ms and was abandoned; retry later.")
            } else {
                format!(
                    "The request took longer than {millis} ms and was abandoned; whether it took effect is unknown. Check before sending it again, or send writes with an Idempotency-Key so a retry is safe."
                )
            };
            let problem = Problem::new(StatusCode::SERVICE_UNAVAILABLE, detail);
            match retry_is_safe {
                true => problem.retry_after(1),
                false => problem.into_response(),
            }
        }
    }
}

/// Keeps the caller's `X-Request-Id` when it is one (1 to 128 visible ASCII
/// characters), else makes one, and answers with it.
async fn request_id(mut request: Request, next: axum::middleware::Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .filter(|v| {
            v.to_str()
                .ok()
                .and_then(crate::telemetry::request_id)
                .is_some()
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("-"))
        });
    request.headers_mut().insert("x-request-id", id.clone());
    let mut response = next.run(request).await;
    response.headers_mut().insert("x-request-id", id);
    response
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.chars().all(|c| c.is_ascii_graphic()))
        .map(|k| Some(k.to_owned()))
        .ok_or_else(|| {
            Problem::validation(vec![crate::FieldError::new(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters, e.g. a UUID",
            )])
        })
}

/// The `limit` query parameter: 1 to `max`, `default` when absent or empty; a bad
/// value is recorded in `errors` (and `default` returned) so every bad parameter is
/// reported at once.
pub fn limit_param(
    raw: Option<&str>,
    default: i64,
    max: i64,
    errors: &mut Vec<crate::FieldError>,
) -> i64 {
    match raw {
        None | Some("") => default,
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                errors.push(crate::FieldError::new(
                    "limit",
                    format!("must be 1 to {max}"),
                ));
                default
            }
        },
    }
}

/// A text path parameter `field` that is stored or looked up: 1 to `max` characters
/// with no control characters. PostgreSQL refuses a NUL byte in text with an error,
/// which must not surface as a 500; absurd lengths are refused before any lookup.
pub fn text_path_param(field: &str, value: &str, max: usize) -> Result<(), crate::Problem> {
    let problem =
        |message: String| crate::Problem::validation(vec![crate::FieldError::new(field, message)]);
    if value.is_empty() || value.chars().count() > max {
        return Err(problem(format!("must be 1 to {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(problem("must not contain control characters".into()));
    }
    Ok(())
}

/// `value` for echoing in a message: at most 64 characters, control characters
/// escaped.
pub fn echo(value: &str) -> String {
    let mut shown: String = value
        .chars()
        .take(64)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > 64 {
        shown.push('…');
    }
    shown
}

/// An optional UUID query parameter `field` naming `what` (e.g. "an order id"); a bad
/// value is recorded in `errors`.
pub fn uuid_param(
    raw: Option<&str>,
    field: &str,
    what: &str,
    errors: &mut Vec<crate::FieldError>,
) -> Option<uuid::Uuid> {
    let raw = raw.filter(|s| !s.is_empty())?;
    match uuid::Uuid::parse_str(raw) {
        Ok(id) => Some(id),
        Err(_) => {
            errors.push(crate::FieldError::new(
                field,
                format!("must be {what} (a UUID)"),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Order {
        items: Vec<Item>,
        currency: String,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Item {
        sku: String,
        quantity: u32,
    }

    #[test]
    fn wrong_type_names_the_nested_field() {
        let p =
            parse_json::<Order>(br#"{"items":[{"sku":"A","quantity":"two"}],"currency":"EUR"}"#)
                .unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(p.errors[0].field, "items[0].quantity");
        assert!(!p.errors[0].message.contains("line"), "{:?}", p.errors);
    }

    #[test]
    fn missing_field_names_the_field_itself() {
        let p = parse_json::<Order>(br#"{"items":[]}"#).unwrap_err();
        assert_eq!(p.errors[0].field, "currency");
        let p = parse_json::<Order>(br#"{"items":[{"quantity":1}],"currency":"EUR"}"#).unwrap_err();
        assert_eq!(p.errors[0].field, "items[0].sku");
    }

    #[test]
    fn malformed_json_is_400() {
        let p = parse_json::<Order>(br#"{"items": ["#).unwrap_err();
        assert_eq!(p.status, 400);
        let p = parse_json::<Order>(br#"{"items":[],"currency":"EUR"} x"#).unwrap_err();
        assert_eq!(p.status, 400);
    }
}
