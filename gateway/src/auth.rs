//! The gateway's own identity provider: users with argon2 password hashes from the
//! configuration, `POST /auth/token` issuing Ed25519-signed JWTs, and
//! `GET /.well-known/jwks.json` publishing the public key. The local stack's dev users
//! come from the config `cargo xtask up` writes; the gateway itself knows no user.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use axum::{
    Json,
    extract::{ConnectInfo, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::{
    Problem,
    auth::{TokenSigner, VerifierSettings},
};

use crate::login::{LoginGuard, LoginSettings, Refusal};

/// One user of the gateway's own store.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSettings {
    pub username: String,
    /// An argon2 PHC string (`$argon2id$v=19$...`); never the password itself.
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// The token's `sub`; the user name when absent.
    #[serde(default)]
    pub id: Option<String>,
}

impl std::fmt::Debug for UserSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSettings")
            .field("username", &self.username)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// The `auth` section of the gateway's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayAuthSettings {
    /// `iss` of the tokens the gateway issues.
    pub issuer: String,
    /// `aud` of the tokens the gateway issues (and accepts from itself).
    pub audience: String,
    pub token_ttl_seconds: u64,
    /// A 32-byte Ed25519 seed in base64url. Without it the gateway issues no tokens
    /// and accepts only external issuers'.
    pub signing_key: Option<String>,
    pub users: Vec<UserSettings>,
    /// External issuers trusted by JWKS URL.
    pub external: VerifierSettings,
    /// Bounds and throttles on `POST /auth/token`.
    pub login: LoginSettings,
    /// A static bearer credential accepted on `/actuator/prometheus` only, so
    /// Prometheus can scrape without a token that expires. Never logged.
    pub metrics_token: Option<String>,
}

impl std::fmt::Debug for GatewayAuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayAuthSettings")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field(
                "signing_key",
                &self.signing_key.as_ref().map(|_| "<redacted>"),
            )
            .field("users", &self.users)
            .field("external", &self.external)
            .field("login", &self.login)
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl Default for GatewayAuthSettings {
    fn default() -> Self {
        Self {
            issuer: "storefront-gateway".into(),
            audience: "storefront".into(),
            token_ttl_seconds: 3600,
            signing_key: None,
            users: Vec::new(),
            external: VerifierSettings::default(),
            login: LoginSettings::default(),
            metrics_token: None,
        }
    }
}

/// Users by name, and the signer for their tokens.
pub struct IdentityProvider {
    pub signer: Option<TokenSigner>,
    users: HashMap<String, UserSettings>,
    /// Verified against for unknown users, so a wrong name costs as long as a wrong
    /// password and timing does not reveal which names exist.
    decoy: String,
    guard: LoginGuard,
    /// Proxies whose `X-Forwarded-For` names the client a login is throttled as.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl std::fmt::Debug for IdentityProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityProvider")
            .field("signer", &self.signer)
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl IdentityProvider {
    pub fn new(settings: &GatewayAuthSettings) -> Result<Self, String> {
        let signer = settings
            .signing_key
            .as_deref()
            .map(|seed| {
                TokenSigner::from_seed_base64(
                    seed,
                    &settings.issuer,
                    &settings.audience,
                    Duration::from_secs(settings.token_ttl_seconds),
                )
                .map_err(|e| format!("auth.signing_key: {e}"))
            })
            .transpose()?;
        if signer.is_none() && !settings.users.is_empty() {
            return Err(
                "auth.users are configured but auth.signing_key is not: tokens could not be signed"
                    .into(),
            );
        }
        let mut users = HashMap::new();
        for user in &settings.users {
            PasswordHash::new(&user.password_hash).map_err(|_| {
                format!(
                    "auth.users[{}].password_hash is not an argon2 PHC string",
                    user.username
                )
            })?;
            users.insert(user.username.clone(), user.clone());
        }
        Ok(Self {
            signer,
            users,
            decoy: hash_password(&TokenSigner::generate_seed())?,
            guard: LoginGuard::new(&settings.login),
            trusted_proxies: Vec::new(),
        })
    }

    /// The user, when `password` is theirs.
    fn authenticate(&self, username: &str, password: &str) -> Option<&UserSettings> {
        let user = self.users.get(username);
        let hash = user.map_or(self.decoy.as_str(), |u| u.password_hash.as_str());
        let parsed = PasswordHash::new(hash).ok()?;
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        user.filter(|_| ok)
    }
}

/// The body of `POST /auth/token`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    #[schema(example = "alice", max_length = 255)]
    username: String,
    #[schema(example = "alice", max_length = 1024)]
    password: String,
}

/// The longest user name and password a login may send, in characters (as the
/// OpenAPI document's `maxLength` counts). A failed login's name is kept for
/// throttling; unbounded, a few thousand failures with megabyte names would hold
/// gigabytes. A name is at most what a token's subject may be.
const MAX_USERNAME_CHARS: usize = 255;
const MAX_PASSWORD_CHARS: usize = 1024;
/// The most `POST /auth/token` reads: room for both fields at their longest.
pub const MAX_TOKEN_REQUEST_BYTES: usize = 16 * 1024;

impl TokenRequest {
    /// 422 naming each field that is too long.
    fn check(&self) -> Result<(), Problem> {
        let mut errors = Vec::new();
        if self.username.chars().count() > MAX_USERNAME_CHARS {
            errors.push(shared::FieldError::new(
                "username",
                format!("at most {MAX_USERNAME_CHARS} characters"),
            ));
        }
        if self.password.chars().count() > MAX_PASSWORD_CHARS {
            errors.push(shared::FieldError::new(
                "password",
                format!("at most {MAX_PASSWORD_CHARS} characters"),
            ));
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(Problem::validation(errors)),
        }
    }
}

/// A token issued by `POST /auth/token`, as OAuth 2.0's token endpoint answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// The JWT (EdDSA), sent as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// `POST /auth/token`. A login is admitted by the [`LoginGuard`] before its password
/// is checked: throttled addresses and names get 429, a full house 503, both with
/// `Retry-After` and without hashing anything.
#[utoipa::path(post, path = "/auth/token", tag = "auth", security(()),
    summary = "Log in: a bearer token for a user name and password",
    description = "Failed logins are throttled per client address and per user name (429); \
        when too many logins are being checked at once the answer is 503. Both carry `Retry-After`.",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "A token for the user", body = TokenResponse),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Wrong user name or password", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "This gateway issues no tokens (only external issuers are configured)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not sent as `application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing, of the wrong type, or unknown; named", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed logins from this address or for this name", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Too many logins are being checked at once", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
pub async fn token(
    State(idp): State<Arc<IdentityProvider>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    shared::http::Json(request): shared::http::Json<TokenRequest>,
) -> Response {
    if idp.signer.is_none() {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "This gateway issues no tokens; use your identity provider's.",
        )
        .into_response();
    }
    if let Err(problem) = request.check() {
        return problem.into_response();
    }
    let address = crate::proxy::client_address(client.ip(), &headers, &idp.trusted_proxies);
    let admission = match idp.guard.admit(address, &request.username) {
        Ok(admission) => admission,
        Err(Refusal::Throttled { retry_after }) => {
            metrics::counter!("gateway_logins_total", "outcome" => "throttled").increment(1);
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            return retry_later(
                Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "Too many failed logins from this address or for this user name; \
                         retry in {seconds} s."
                    ),
                ),
                seconds,
            );
        }
        Err(Refusal::Busy) => {
            metrics::counter!("gateway_logins_total", "outcome" => "busy").increment(1);
            return retry_later(
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Too many logins are being checked at once; retry in 1 s.",
                ),
                1,
            );
        }
    };
    // argon2 is deliberately slow: it runs on the guard's own threads, holding the
    // admission's slot until the hash is done, even if the client has gone.
    let checking = idp.clone();
    let username = request.username.clone();
    let Some(user) = idp
        .guard
        .check(admission, move || {
            checking.authenticate(&username, &request.password).cloned()
        })
        .await
    else {
        return Problem::unavailable("the password check").into_response();
    };
    let Some(user) = user else {
        idp.guard.failed(address, &request.username);
        metrics::counter!("gateway_logins_total", "outcome" => "refused").increment(1);
        return Problem::unauthorized("Wrong user name or password.").into_response();
    };
    idp.guard.succeeded(&request.username);
    let Some(signer) = idp.signer.as_ref() else {
        return Problem::unauthorized("no signer").into_response();
    };
    let sub = user.id.clone().unwrap_or_else(|| user.username.clone());
    let token = match signer.sign(&sub, &user.roles) {
        Ok(token) => token,
        Err(e) => return Problem::internal(&e).into_response(),
    };
    metrics::counter!("gateway_logins_total", "outcome" => "issued").increment(1);
    Json(TokenResponse {
        access_token: token,
        token_type: "Bearer",
        expires_in: signer.ttl.as_secs(),
    })
    .into_response()
}

/// `problem` with `Retry-After: seconds`, never less than one.
fn retry_later(problem: Problem, seconds: u64) -> Response {
    problem.retry_after(seconds.max(1))
}

/// `GET /.well-known/jwks.json`.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth", security(()),
    summary = "The public keys that verify this gateway's tokens",
    responses((status = 200, description = "The public keys of the tokens this gateway issues (none when it issues none)",
        body = crate::openapi::Jwks)))]
pub async fn jwks(State(idp): State<Arc<IdentityProvider>>) -> impl IntoResponse {
    let body = idp
        .signer
        .as_ref()
        .map(TokenSigner::jwks)
        .unwrap_or_else(|| json!({ "keys": [] }));
    (
        [(axum::http::header::CACHE_CONTROL, "public, max-age=300")],
        Json(body),
    )
}

/// An argon2id PHC hash of `password`, for writing a user into configuration.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decoy_hash_parses_so_unknown_users_cost_as_much() {
        let idp = IdentityProvider::new(&GatewayAuthSettings::default()).unwrap();
        assert!(PasswordHash::new(&idp.decoy).is_ok());
        assert!(idp.authenticate("nobody", "x").is_none());
    }

    #[test]
    fn users_need_a_signing_key_and_real_hashes() {
        let mut settings = GatewayAuthSettings {
            users: vec![UserSettings {
                username: "alice".into(),
                password_hash: hash_password("alice").unwrap(),
                roles: vec!["customer".into()],
                id: None,
            }],
            ..GatewayAuthSettings::default()
        };
        assert!(
            IdentityProvider::new(&settings)
                .unwrap_err()
                .contains("signing_key")
        );
        settings.signing_key = Some(TokenSigner::generate_seed());
        let idp = IdentityProvider::new(&settings).unwrap();
        assert!(idp.authenticate("alice", "alice").is_some());
        assert!(idp.authenticate("alice", "bob").is_none());
        settings.users[0].password_hash = "alice".into();
        assert!(
            IdentityProvider::new(&settings)
                .unwrap_err()
                .contains("argon2")
        );
    }
}
