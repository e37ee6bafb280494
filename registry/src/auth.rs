//! Write authentication. With a registry token configured, every request that changes
//! the registry must carry it, as `Authorization: Bearer <token>` or, for Eureka
//! clients that put credentials in their service URL, as HTTP Basic with any user name
//! and the token as password. Reads are open unless `auth.protect_reads` is set.
//! Tokens are compared in constant time.

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
    /// The shared secret for writes; none means writes are open (local use only).
    pub token: Option<String>,
    /// Require the token for reads too.
    pub protect_reads: bool,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("protect_reads", &self.protect_reads)
            .finish()
    }
}

/// Rejects requests that need the token and do not carry it.
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
    let valid = presented
        .as_deref()
        .is_some_and(|p| bool::from(p.as_bytes().ct_eq(token.as_bytes())));
    if valid {
        return next.run(request).await;
    }
    let detail = if presented.is_some() {
        "The registry token is wrong."
    } else {
        "Writes to this registry need its token: `Authorization: Bearer <token>`, or HTTP \
         Basic with the token as password (e.g. in a Eureka service URL)."
    };
    let mut response = Problem::unauthorized(detail).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"registry\", Basic realm=\"registry\""),
    );
    response
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
    fn the_token_never_shows_in_debug() {
        let s = AuthSettings {
            token: Some("t0ken".into()),
            protect_reads: false,
        };
        assert!(!format!("{s:?}").contains("t0ken"));
    }
}
