//! JWT issuing and verification, shared by the gateway (which issues and checks) and
//! every service (which checks the token the gateway relays, again).
//!
//! Tokens are signed with Ed25519 (`EdDSA`): asymmetric, so a service that can verify
//! cannot mint, and small and fast. [`TokenSigner`] signs and publishes its public key
//! as a JWKS. [`JwtVerifier`] trusts a configured list of issuers, each pinned to its
//! audiences and algorithms, with keys either given (the gateway's own) or fetched
//! from the issuer's JWKS URL:
//! - the algorithm comes from the issuer's pin, never from the token: `none`, and an
//!   HMAC token "signed" with a public key, are refused before any key is touched;
//! - an unknown `kid` refetches the JWKS (key rotation), at most once per
//!   `refetch_interval` per issuer, so garbage tokens cannot hammer the issuer;
//! - a failed fetch keeps the last good keys;
//! - `exp` is required and `nbf` honoured, with a small clock skew.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use axum::{
    extract::{FromRef, FromRequestParts},
    http::{HeaderValue, header, request::Parts},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind, jwk::JwkSet,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::problem::Problem;

/// What a token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub iss: String,
    pub aud: Audience,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

impl Claims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn is_admin(&self) -> bool {
        self.has_role("admin")
    }
}

/// `aud` is a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Signs tokens with one Ed25519 key.
pub struct TokenSigner {
    kid: String,
    key: EncodingKey,
    public_x: String,
    pub issuer: String,
    pub audience: String,
    pub ttl: Duration,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// Fixed DER prefix of a PKCS#8 v1 Ed25519 private key; the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl TokenSigner {
    /// A signer for the 32-byte Ed25519 `seed`.
    pub fn from_seed(seed: [u8; 32], issuer: &str, audience: &str, ttl: Duration) -> Self {
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = signing.verifying_key().to_bytes();
        let mut der = PKCS8_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let public_x = URL_SAFE_NO_PAD.encode(public);
        // The key id is derived from the public key, so it changes exactly when the key does.
        let kid = public_x.chars().take(16).collect();
        Self {
            kid,
            key: EncodingKey::from_ed_der(&der),
            public_x,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl,
        }
    }

    /// A signer for a base64url seed, as kept in configuration.
    pub fn from_seed_base64(
        seed: &str,
        issuer: &str,
        audience: &str,
        ttl: Duration,
    ) -> Result<Self, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(seed.trim().trim_end_matches('='))
            .map_err(|_| "the signing key must be 32 bytes in base64url".to_owned())?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "the signing key must be 32 bytes in base64url".to_owned())?;
        Ok(Self::from_seed(seed, issuer, audience, ttl))
    }

    /// A fresh random seed in base64url, for a local stack or a key rotation.
    pub fn generate_seed() -> String {
        let seed: [u8; 32] = rand::random();
        URL_SAFE_NO_PAD.encode(seed)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A token for `sub` with `roles`, valid from now for the signer's ttl.
    pub fn sign(&self, sub: &str, roles: &[String]) -> Result<String, jsonwebtoken::errors::Error> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: sub.to_owned(),
            roles: roles.to_vec(),
            iss: self.issuer.clone(),
            aud: Audience::One(self.audience.clone()),
            iat: now,
            exp: now + self.ttl.as_secs(),
            nbf: None,
        };
        self.sign_claims(&claims)
    }

    /// Signs any claims (tests use this to make expired or future tokens).
    pub fn sign_claims(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
    }

    /// This signer's public key as one JWK.
    pub fn jwk(&self) -> Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.public_x,
            "kid": self.kid,
            "use": "sig",
            "alg": "EdDSA",
        })
    }

    /// `{"keys": [...]}` for `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk()] })
    }
}

/// One trusted issuer, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    /// The exact `iss` its tokens carry.
    pub issuer: String,
    /// Where its keys are published; absent for issuers whose keys are given in code.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// Accepted algorithms, e.g. `["EdDSA"]` or `["RS256"]`; HMAC is never accepted.
    pub algorithms: Vec<String>,
    /// How this issuer's roles become ours, `{their role: our role}`, e.g.
    /// `{"store-admins": "admin", "user": "customer"}`. Roles not listed are dropped,
    /// so an external issuer grants `admin` only where this says so.
    #[serde(default)]
    pub role_map: std::collections::BTreeMap<String, String>,
    /// Take the token's roles as they are, unmapped: only for an issuer that speaks
    /// our roles (the gateway's own tokens, which every service trusts this way).
    #[serde(default)]
    pub keep_roles: bool,
}

impl IssuerSettings {
    /// The gateway's own tokens, as issued with `issuer` and `audience`: EdDSA, roles
    /// kept as they are, keys at `jwks_url` (or given in code when `None`).
    pub fn gateway(issuer: &str, audience: &str, jwks_url: Option<String>) -> Self {
        Self {
            issuer: issuer.to_owned(),
            jwks_url,
            audiences: vec![audience.to_owned()],
            algorithms: vec!["EdDSA".into()],
            role_map: Default::default(),
            keep_roles: true,
        }
    }
}

/// The `auth` section shared by the gateway and the services.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifierSettings {
    pub issuers: Vec<IssuerSettings>,
    /// Allowed clock difference for `exp` and `nbf`.
    pub leeway_seconds: u64,
    /// The least time between two JWKS fetches of one issuer.
    pub refetch_interval_ms: u64,
    /// How often an issuer's key set is fetched again even when no unknown key asks
    /// for it, so a key the issuer withdrew stops being trusted.
    pub refresh_interval_ms: u64,
    /// CA certificates (PEM files) trusted for `https://` JWKS URLs besides the
    /// system's roots: the CA of an internal Keycloak, say.
    pub ca_files: Vec<std::path::PathBuf>,
}

impl Default for VerifierSettings {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            leeway_seconds: 30,
            refetch_interval_ms: 10_000,
            refresh_interval_ms: 300_000,
            ca_files: Vec::new(),
        }
    }
}

/// The largest JWKS document fetched; a bigger one is refused, keeping the last keys.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// The `auth` section of a service behind the gateway: it trusts the gateway's
/// tokens (fetched from the gateway's JWKS) and any further issuers listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceAuthSettings {
    /// The gateway's base URL (`GATEWAY_URL`); its JWKS is at
    /// `/.well-known/jwks.json`. Without it (and without `extra` issuers) the service
    /// accepts no token at all: secure by default.
    pub gateway_url: Option<String>,
    /// `iss` of the gateway's tokens.
    pub gateway_issuer: String,
    /// `aud` of the gateway's tokens.
    pub audience: String,
    /// Further trusted issuers, and the verifier's timing settings.
    pub extra: VerifierSettings,
}

impl Default for ServiceAuthSettings {
    fn default() -> Self {
        Self {
            gateway_url: None,
            gateway_issuer: "storefront-gateway".into(),
            audience: "storefront".into(),
            extra: VerifierSettings::default(),
        }
    }
}

impl ServiceAuthSettings {
    /// The verifier these settings describe.
    pub fn verifier(&self) -> Result<JwtVerifier, String> {
        let mut settings = self.extra.clone();
        if let Some(url) = self.gateway_url.as_deref().filter(|u| !u.is_empty()) {
            settings.issuers.push(IssuerSettings::gateway(
                &self.gateway_issuer,
                &self.audience,
                Some(format!(
                    "{}/.well-known/jwks.json",
                    url.trim_end_matches('/')
                )),
            ));
        }
        if settings.issuers.is_empty() {
            tracing::warn!(
                "auth: no trusted issuer configured (set GATEWAY_URL); every request will be refused"
            );
        }
        JwtVerifier::new(&settings)
    }
}

/// Why a token was refused. The message is safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("tokens from this issuer are not accepted")]
    UntrustedIssuer,
    #[error("the token's algorithm is not accepted for its issuer")]
    Algorithm,
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is not meant for this audience")]
    Audience,
    #[error("the token lacks a required claim")]
    MissingClaim,
    #[error("the token's subject (`sub`) must be 1 to 255 characters without control characters")]
    Subject,
}

/// A subject the services can own things by: 1 to 255 characters, none of them a
/// control character. Events' `userId` follows the same rule (it is a token's
/// subject).
pub fn valid_subject(sub: &str) -> bool {
    !sub.is_empty() && sub.chars().count() <= 255 && !sub.chars().any(char::is_control)
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let mut response = Problem::unauthorized(self.to_string()).into_response();
        let challenge = match self {
            AuthError::Missing => "Bearer".to_owned(),
            _ => format!("Bearer error=\"invalid_token\", error_description=\"{self}\""),
        };
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

struct Issuer {
    settings: IssuerSettings,
    algorithms: Vec<Algorithm>,
    keys: ArcSwap<HashMap<String, DecodingKey>>,
    /// When the key set was last fetched successfully (for the scheduled refresh).
    refreshed: std::sync::Mutex<Option<Instant>>,
    /// When the JWKS was last fetched. Held across the fetch, so concurrent requests
    /// with a new key wait for the one fetch and then find the key, instead of being
    /// refused by the rate limit while it runs.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl Issuer {
    /// An issuer with no keys yet.
    fn new(settings: IssuerSettings, algorithms: Vec<Algorithm>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            algorithms,
            keys: ArcSwap::from_pointee(HashMap::new()),
            refreshed: std::sync::Mutex::new(None),
            last_fetch: tokio::sync::Mutex::new(None),
        })
    }
}

/// Verifies bearer tokens against the configured issuers.
pub struct JwtVerifier {
    issuers: HashMap<String, Arc<Issuer>>,
    leeway: u64,
    refetch_interval: Duration,
    refresh_interval: Duration,
    http: reqwest::Client,
    verified: VerifiedCache,
}

/// Tokens whose signature and claims were verified, by the SHA-256 of their text, so
/// a client's every request does not pay for a signature check. An entry lives until
/// the token expires or for [`VerifiedCache::TTL`], whichever is first, so a key
/// withdrawn from an issuer's JWKS stops being honoured within that time. Expiry is
/// checked again on every hit.
///
/// The entries are spread over [`VerifiedCache::SHARDS`] locks by the hash's first
/// byte, so workers verifying different tokens do not queue on one mutex; a full shard
/// drops its expired entries, then the one expiring soonest, never everything at once.
struct VerifiedCache {
    shards: Vec<std::sync::Mutex<VerifiedShard>>,
}

/// Claims and until when they may be served, by the token's hash.
type VerifiedShard = HashMap<[u8; 32], (Arc<Claims>, Instant)>;

impl Default for VerifiedCache {
    fn default() -> Self {
        Self {
            shards: (0..Self::SHARDS)
                .map(|_| std::sync::Mutex::new(HashMap::new()))
                .collect(),
        }
    }
}

impl VerifiedCache {
    const TTL: Duration = Duration::from_secs(60);
    const SHARDS: usize = 32;
    /// Entries per shard: 16,384 tokens in all.
    const SHARD_CAPACITY: usize = 512;

    fn key(token: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).into()
    }

    fn shard(&self, key: &[u8; 32]) -> std::sync::MutexGuard<'_, VerifiedShard> {
        self.shards[usize::from(key[0]) % Self::SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &[u8; 32]) -> Option<Arc<Claims>> {
        let entries = self.shard(key);
        let (claims, until) = entries.get(key)?;
        (Instant::now() < *until).then(|| claims.clone())
    }

    fn put(&self, key: [u8; 32], claims: &Arc<Claims>, leeway: u64) {
        let left = claims
            .exp
            .saturating_add(leeway)
            .saturating_sub(crate::now_ms() / 1000);
        let until = Instant::now() + Duration::from_secs(left).min(Self::TTL);
        let mut entries = self.shard(&key);
        if entries.len() >= Self::SHARD_CAPACITY && !entries.contains_key(&key) {
            let now = Instant::now();
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= Self::SHARD_CAPACITY
                && let Some(soonest) = entries
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| *k)
            {
                entries.remove(&soonest);
            }
        }
        entries.insert(key, (claims.clone(), until));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .sum()
    }
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `settings`; issuers with a JWKS URL fetch their keys on first use.
    pub fn new(settings: &VerifierSettings) -> Result<Self, String> {
        let mut issuers = HashMap::new();
        for issuer in &settings.issuers {
            let mut algorithms = Vec::new();
            for name in &issuer.algorithms {
                let algorithm: Algorithm = name
                    .parse()
                    .map_err(|_| format!("issuer {}: unknown algorithm {name}", issuer.issuer))?;
                if matches!(
                    algorithm,
                    Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
                ) {
                    return Err(format!(
                        "issuer {}: HMAC algorithms are not accepted, only asymmetric ones",
                        issuer.issuer
                    ));
                }
                algorithms.push(algorithm);
            }
            if algorithms.is_empty() || issuer.audiences.is_empty() {
                return Err(format!(
                    "issuer {}: name at least one algorithm and one audience",
                    issuer.issuer
                ));
            }
            issuers.insert(
                issuer.issuer.clone(),
                Issuer::new(issuer.clone(), algorithms),
            );
        }
        // Bounded: 3 s, no redirects (a JWKS URL that redirects elsewhere is refused,
        // not followed), and at most MAX_JWKS_BYTES read. HTTPS trusts the system's
        // roots and `ca_files`.
        let http = crate::tls::client_builder(&settings.ca_files)
            .map_err(|e| format!("auth.ca_files: {e}"))?
            .timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("the JWKS client cannot be made: {e}"))?;
        Ok(Self {
            issuers,
            leeway: settings.leeway_seconds,
            refetch_interval: Duration::from_millis(settings.refetch_interval_ms),
            refresh_interval: Duration::from_millis(settings.refresh_interval_ms),
            http,
            verified: VerifiedCache::default(),
        })
    }

    /// Trusts `signer`'s own key directly (the gateway verifying what it issued).
    pub fn trust_signer(&mut self, signer: &TokenSigner) {
        let key = DecodingKey::from_ed_components(&signer.public_x);
        let issuer = self
            .issuers
            .entry(signer.issuer.clone())
            .or_insert_with(|| {
                Issuer::new(
                    IssuerSettings::gateway(&signer.issuer, &signer.audience, None),
                    vec![Algorithm::EdDSA],
                )
            });
        if let Ok(key) = key {
            let mut keys = (**issuer.keys.load()).clone();
            keys.insert(signer.kid.clone(), key);
            issuer.keys.store(Arc::new(keys));
        }
    }

    /// Verifies `token` and returns its claims; a token verified before (and not yet
    /// expired) is answered from the cache.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_shared(token).await.map(Arc::unwrap_or_clone)
    }

    /// [`Self::verify`], sharing the cached claims rather than copying them (the
    /// gateway verifies on every request).
    pub async fn verify_shared(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        let key = VerifiedCache::key(token);
        if let Some(claims) = self.verified.get(&key) {
            return Ok(claims);
        }
        // Boxed: the first sight of a token may fetch a JWK set, and that future is
        // large; unboxed, every request's future would carry (and move) its size.
        let claims = Arc::new(Box::pin(self.verify_uncached(token)).await?);
        self.verified.put(key, &claims, self.leeway);
        Ok(claims)
    }

    async fn verify_uncached(&self, token: &str) -> Result<Claims, AuthError> {
        // The header and the unverified `iss` only choose which pinned issuer and key
        // to check against; nothing from them is trusted before the signature is.
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
            _ => AuthError::Malformed,
        })?;
        let unverified: UnverifiedIssuer = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Malformed)?;
        let issuer = self
            .issuers
            .get(&unverified.iss)
            .ok_or(AuthError::UntrustedIssuer)?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        self.refresh_if_due(issuer);
        let kid = header.kid.unwrap_or_default();
        let key = match issuer.keys.load().get(&kid).cloned() {
            Some(key) => key,
            None => {
                self.refetch(issuer, &kid).await;
                issuer
                    .keys
                    .load()
                    .get(&kid)
                    .cloned()
                    .ok_or(AuthError::UnknownKey)?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.algorithms = issuer.algorithms.clone();
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_issuer(&[&issuer.settings.issuer]);
        validation.set_audience(&issuer.settings.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map(|data| {
                let mut claims = data.claims;
                if !issuer.settings.keep_roles {
                    let mut ours: Vec<String> = claims
                        .roles
                        .iter()
                        .filter_map(|theirs| issuer.settings.role_map.get(theirs).cloned())
                        .collect();
                    ours.sort();
                    ours.dedup();
                    claims.roles = ours;
                }
                claims
            })
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience => AuthError::Audience,
                ErrorKind::InvalidIssuer => AuthError::UntrustedIssuer,
                ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim,
                ErrorKind::InvalidSignature => AuthError::Signature,
                _ => AuthError::Malformed,
            })?;
        // The subject becomes the owner of what the caller creates (an order's
        // `userId`, a deposit's author), stored as text and sent on in events: an empty
        // one, one the database refuses (a NUL) or one that would fill a row is refused
        // here, once, rather than failing later in a service or a consumer.
        if !valid_subject(&claims.sub) {
            return Err(AuthError::Subject);
        }
        Ok(claims)
    }

    /// Verifies the bearer token a request carries; `Missing` when it carries none.
    pub async fn verify_request(&self, parts: &Parts) -> Result<Claims, AuthError> {
        let token = bearer(parts).ok_or(AuthError::Missing)?;
        self.verify(token).await
    }

    /// [`Self::verify_request`], sharing the cached claims.
    pub async fn verify_request_shared(&self, parts: &Parts) -> Result<Arc<Claims>, AuthError> {
        let token = bearer(parts).ok_or(AuthError::Missing)?;
        self.verify_shared(token).await
    }

    /// Fetches the issuer's JWKS unless it was fetched within the refetch interval;
    /// on failure the keys it had stay in force.
    async fn refetch(&self, issuer: &Issuer, kid: &str) {
        if issuer.settings.jwks_url.is_none() {
            return;
        }
        let mut last = issuer.last_fetch.lock().await;
        if issuer.keys.load().contains_key(kid) {
            // Fetched while this request waited for the lock.
            return;
        }
        if last.is_some_and(|at| at.elapsed() < self.refetch_interval) {
            return;
        }
        *last = Some(Instant::now());
        fetch_keys(&self.http, issuer).await;
    }

    /// Starts a background fetch of the issuer's key set when the last successful one
    /// is older than the refresh interval; the request that noticed carries on with
    /// the keys there are. Keys missing from the new set are gone from then on.
    fn refresh_if_due(&self, issuer: &Arc<Issuer>) {
        if issuer.settings.jwks_url.is_none() {
            return;
        }
        let due = issuer
            .refreshed
            .lock()
            .map(|at| at.is_none_or(|at| at.elapsed() >= self.refresh_interval))
            .unwrap_or(false);
        if !due || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (issuer, http) = (issuer.clone(), self.http.clone());
        tokio::spawn(async move {
            // One refresh at a time; a fetch for an unknown key in progress counts.
            let Ok(mut last) = issuer.last_fetch.try_lock() else {
                return;
            };
            *last = Some(Instant::now());
            fetch_keys(&http, &issuer).await;
        });
    }
}

/// Fetches `issuer`'s key set (bounded in time, size and redirects) and replaces its
/// keys with it; on failure the keys it had stay in force.
async fn fetch_keys(http: &reqwest::Client, issuer: &Issuer) {
    let Some(url) = issuer.settings.jwks_url.as_deref() else {
        return;
    };
    metrics::counter!("jwks_fetches_total", "issuer" => issuer.settings.issuer.clone())
        .increment(1);
    let fetched = async {
        // With every cause: "invalid peer certificate: UnknownIssuer" says to
        // configure `auth.ca_files`, where reqwest's own message says nothing.
        let mut response = http
            .get(url)
            .send()
            .await
            .map_err(|e| crate::tls::error_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("the JWKS URL answered {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice::<JwkSet>(&body).map_err(|e| format!("not a JWKS: {e}"))
    }
    .await;
    match fetched {
        Ok(set) => {
            let keys: HashMap<String, DecodingKey> = set
                .keys
                .iter()
                .filter_map(|jwk| {
                    let kid = jwk.common.key_id.clone()?;
                    DecodingKey::from_jwk(jwk).ok().map(|key| (kid, key))
                })
                .collect();
            issuer.keys.store(Arc::new(keys));
            if let Ok(mut refreshed) = issuer.refreshed.lock() {
                *refreshed = Some(Instant::now());
            }
        }
        Err(e) => {
            tracing::warn!(issuer = %issuer.settings.issuer, error = %e, "JWKS fetch failed; keeping the last good keys");
        }
    }
}

#[derive(Deserialize)]
struct UnverifiedIssuer {
    #[serde(default)]
    iss: String,
}

/// The caller, from a verified bearer token. Rejects with 401 problem+json and a
/// `WWW-Authenticate: Bearer` challenge.
#[derive(Debug, Clone)]
pub struct AuthUser(pub Claims);

impl<S> FromRequestParts<S> for AuthUser
where
    S: Send + Sync,
    Arc<JwtVerifier>: FromRef<S>,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Already verified by the `authenticate` layer: no second verification.
        if let Some(claims) = parts.extensions.get::<Claims>() {
            return Ok(AuthUser(claims.clone()));
        }
        let verifier = Arc::<JwtVerifier>::from_ref(state);
        verifier.verify_request(parts).await.map(AuthUser)
    }
}

/// A layer for every route of a service's API: requests without a valid bearer token
/// get 401 problem+json; the claims of the others travel in the request's extensions.
pub async fn authenticate(
    axum::extract::State(verifier): axum::extract::State<Arc<JwtVerifier>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    match verifier.verify_request(&parts).await {
        Ok(claims) => {
            parts.extensions.insert(claims);
            next.run(axum::extract::Request::from_parts(parts, body))
                .await
        }
        Err(e) => e.into_response(),
    }
}

/// The actuator's operator gate for a process that verifies our tokens: a valid token
/// with the `admin` role.
pub fn admin_gate(verifier: Arc<JwtVerifier>) -> crate::actuator::OperatorGate {
    Arc::new(move |headers: axum::http::HeaderMap| {
        let verifier = verifier.clone();
        Box::pin(async move {
            let value = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let token = value
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| crate::Problem::unauthorized(AuthError::Missing.to_string()))?;
            let claims = verifier
                .verify(token)
                .await
                .map_err(|e| crate::Problem::unauthorized(e.to_string()))?;
            if claims.is_admin() {
                Ok(())
            } else {
                Err(crate::Problem::forbidden(
                    "Changing log levels needs the admin role.",
                ))
            }
        })
    })
}

/// The bearer token of a request, if it carries one.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str, exp_in: u64) -> Arc<Claims> {
        let now = crate::now_ms() / 1000;
        serde_json::from_value(serde_json::json!({
            "sub": sub, "iss": "i", "aud": "a", "iat": now, "exp": now + exp_in,
        }))
        .map(Arc::new)
        .expect("claims")
    }

    /// A key in shard 0, distinct by `i`.
    fn key(i: u32) -> [u8; 32] {
        let mut key = [0u8; 32];
        key[1..5].copy_from_slice(&i.to_be_bytes());
        key
    }

    #[test]
    fn a_full_shard_drops_the_entry_expiring_soonest_not_everything() {
        let cache = VerifiedCache::default();
        let capacity = VerifiedCache::SHARD_CAPACITY as u32;
        // The first entry expires soonest (10 s); the others live the full minute.
        cache.put(key(0), &claims("first", 10), 0);
        for i in 1..capacity {
            cache.put(key(i), &claims("other", 3600), 0);
        }
        cache.put(key(capacity), &claims("newest", 3600), 0);
        assert_eq!(cache.len(), VerifiedCache::SHARD_CAPACITY);
        assert!(
            cache.get(&key(0)).is_none(),
            "the soonest to expire made room"
        );
        assert!(cache.get(&key(1)).is_some(), "the rest stay");
        assert_eq!(
            cache.get(&key(capacity)).map(|c| c.sub.clone()),
            Some("newest".into())
        );
        // Another shard is untouched by this one's pressure.
        let mut elsewhere = key(0);
        elsewhere[0] = 1;
        cache.put(elsewhere, &claims("elsewhere", 3600), 0);
        assert!(cache.get(&elsewhere).is_some());
    }
}
