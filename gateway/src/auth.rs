//! The gateway's own identity provider: users with argon2 password hashes from the
//! configuration, `POST /auth/token` issuing Ed25519-signed JWTs, and
//! `GET /.well-known/jwks.json` publishing the public key. The local stack's dev users
//! come from the config `cargo xtask up` writes; the gateway itself knows no user.

use std::{collections::HashMap, sync::Arc, time::Duration};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use axum::{Json, extract::State, response::IntoResponse};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::{
    Problem,
    auth::{TokenSigner, VerifierSettings},
};

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    username: String,
    password: String,
}

/// `POST /auth/token`.
pub async fn token(
    State(idp): State<Arc<IdentityProvider>>,
    shared::http::Json(request): shared::http::Json<TokenRequest>,
) -> Result<Json<Value>, Problem> {
    if idp.signer.is_none() {
        return Err(Problem::new(
            axum::http::StatusCode::NOT_FOUND,
            "This gateway issues no tokens; use your identity provider's.",
        ));
    }
    // argon2 is deliberately slow: keep it off the async workers.
    let checking = idp.clone();
    let user = tokio::task::spawn_blocking(move || {
        checking
            .authenticate(&request.username, &request.password)
            .cloned()
    })
    .await
    .map_err(|e| Problem::internal(&e))?;
    let Some(user) = user else {
        metrics::counter!("gateway_logins_total", "outcome" => "refused").increment(1);
        return Err(Problem::unauthorized("Wrong user name or password."));
    };
    let signer = idp
        .signer
        .as_ref()
        .ok_or_else(|| Problem::unauthorized("no signer"))?;
    let sub = user.id.clone().unwrap_or_else(|| user.username.clone());
    let token = signer
        .sign(&sub, &user.roles)
        .map_err(|e| Problem::internal(&e))?;
    metrics::counter!("gateway_logins_total", "outcome" => "issued").increment(1);
    Ok(Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": signer.ttl.as_secs(),
    })))
}

/// `GET /.well-known/jwks.json`.
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
