//! Write authentication, scoped. Two kinds of credential, each sent as
//! `Authorization: Bearer <credential>` or, for Eureka clients that put credentials in
//! their service URL, as HTTP Basic with any user name and the credential as password:
//!
//! - the **operator's token** (`auth.token`): every write, including status overrides
//!   and deregistering any instance;
//! - a **service credential**, derived from it ([`shared::registry::service_credential`]):
//!   writes to that one service's instances (register, renew, report status,
//!   deregister), never overrides, never another service. A process holding one can
//!   no longer steer another service's traffic to an address of its choosing.
//!
//! Reads (every `GET`, the dashboard included) are open unless `auth.protect_reads`
//! is set; then either kind of credential reads. Credentials are compared in constant
//! time and never logged. Without a token the registry refuses to start, unless
//! `auth.open_writes` says writes may be open (local experiments only).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderValue, Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine;
use serde::{Deserialize, Serialize};
use shared::Problem;
use subtle::ConstantTimeEq;

/// The `auth` section of the registry's settings.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// The operator's token: every write. Services get credentials derived from it.
    pub token: Option<String>,
    /// Require a credential for reads too, the dashboard included.
    pub protect_reads: bool,
    /// Start without a token, with writes open to anyone: local experiments only.
    pub open_writes: bool,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("protect_reads", &self.protect_reads)
            .field("open_writes", &self.open_writes)
            .finish()
    }
}

/// Who a request's credential says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    Operator,
    /// The holder of this service's credential.
    Service(String),
}

/// Rejects requests whose credential does not allow them: 401 without a valid one,
/// 403 for a service credential writing outside its service or setting an override.
pub async fn require_token(
    State(settings): State<Arc<AuthSettings>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = settings.token.as_deref().filter(|t| !t.is_empty()) else {
        return next.run(request).await;
    };
    let is_read = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if is_read && !settings.protect_reads {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(credential);
    let caller = presented.as_deref().and_then(|p| caller(token, p));
    match caller {
        Some(Caller::Operator) => next.run(request).await,
        Some(Caller::Service(_)) if is_read => next.run(request).await,
        Some(Caller::Service(service)) => match own_write(request.uri().path()) {
            Some(target) if target.eq_ignore_ascii_case(&service) => next.run(request).await,
            Some(target) => Problem::forbidden(format!(
                "The credential of `{service}` may write only `{service}`'s instances, not \
                 `{target}`'s."
            ))
            .into_response(),
            None => Problem::forbidden(format!(
                "The credential of `{service}` may not do this: status overrides and other \
                 operator writes need the registry's token."
            ))
            .into_response(),
        },
        None => {
            let detail = if presented.is_some() {
                "The registry credential is wrong."
            } else {
                "This needs a registry credential: `Authorization: Bearer <credential>`, or \
                 HTTP Basic with it as password (e.g. in a Eureka service URL)."
            };
            let mut response = Problem::unauthorized(detail).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"registry\", Basic realm=\"registry\""),
            );
            response
        }
    }
}

/// The actuator's operator gate: only the operator's token may change log levels.
pub fn operator_gate(settings: &AuthSettings) -> shared::actuator::OperatorGate {
    let token = settings.token.clone().filter(|t| !t.is_empty());
    Arc::new(move |headers: axum::http::HeaderMap| {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(credential);
        let verdict = match (&token, presented) {
            (None, _) => Err(Problem::forbidden(
                "No operator token is configured for this registry.",
            )),
            (Some(_), None) => Err(Problem::unauthorized(
                "This needs the registry's operator token: `Authorization: Bearer <token>`.",
            )),
            (Some(token), Some(presented)) => match caller(token, &presented) {
                Some(Caller::Operator) => Ok(()),
                Some(Caller::Service(_)) => Err(Problem::forbidden(
                    "A service credential may not change log levels; use the operator token.",
                )),
                None => Err(Problem::unauthorized("The registry credential is wrong.")),
            },
        };
        Box::pin(async move { verdict })
    })
}

/// The caller a presented credential stands for, if it is valid.
fn caller(token: &str, presented: &str) -> Option<Caller> {
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        return Some(Caller::Operator);
    }
    let (service, _) = presented.rsplit_once('.')?;
    let expected = shared::registry::service_credential(token, service);
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
        .then(|| Caller::Service(service.to_ascii_lowercase()))
}

/// The service whose own instances a write path touches, when a service credential
/// may make that write: registering, renewing, reporting status and deregistering
/// (native and Eureka). `None` for overrides and anything else.
fn own_write(path: &str) -> Option<&str> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v1", "services", service, "instances"]
        | ["api", "v1", "services", service, "instances", _]
        | [
            "api",
            "v1",
            "services",
            service,
            "instances",
            _,
            "heartbeat" | "status",
        ]
        | ["eureka", "apps", service]
        | ["eureka", "apps", service, _] => Some(service),
        _ => None,
    }
}

/// The secret carried by an `Authorization` header: a bearer token, or a Basic
/// password.
fn credential(header: &str) -> Option<String> {
    let (scheme, value) = header.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text
            .split_once(':')
            .map(|(_, password)| password.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_carry_the_token() {
        assert_eq!(credential("Bearer abc").as_deref(), Some("abc"));
        // "eureka:abc" in base64.
        assert_eq!(credential("Basic ZXVyZWthOmFiYw==").as_deref(), Some("abc"));
        assert_eq!(credential("Digest x"), None);
    }

    #[test]
    fn service_credentials_write_only_their_own_service() {
        let token = "operator-secret";
        let orders = shared::registry::service_credential(token, "Order-Service");
        assert!(orders.starts_with("order-service."));
        assert_eq!(caller(token, token), Some(Caller::Operator));
        assert_eq!(
            caller(token, &orders),
            Some(Caller::Service("order-service".into()))
        );
        assert_eq!(
            caller("another-secret", &orders),
            None,
            "bound to the token"
        );
        let forged = format!("payment-service.{}", orders.rsplit_once('.').unwrap().1);
        assert_eq!(caller(token, &forged), None, "bound to the service");
        for path in [
            "/api/v1/services/order-service/instances",
            "/api/v1/services/order-service/instances/i-1",
            "/api/v1/services/order-service/instances/i-1/heartbeat",
            "/api/v1/services/order-service/instances/i-1/status",
            "/eureka/apps/ORDER-SERVICE",
            "/eureka/apps/ORDER-SERVICE/i-1",
        ] {
            assert!(
                own_write(path).is_some_and(|s| s.eq_ignore_ascii_case("order-service")),
                "{path}"
            );
        }
        for path in [
            "/api/v1/services/order-service/instances/i-1/override",
            "/eureka/apps/ORDER-SERVICE/i-1/status",
            "/api/v1/state",
        ] {
            assert_eq!(own_write(path), None, "{path}");
        }
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let s = AuthSettings {
            token: Some("t0ken".into()),
            ..AuthSettings::default()
        };
        assert!(!format!("{s:?}").contains("t0ken"));
    }
}
