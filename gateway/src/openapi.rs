//! The gateway's own OpenAPI document: the token endpoint and the key set. The
//! services' documents describe everything else reached through the gateway; this one
//! is kept in `docs/api/gateway.json`. It is not served: the contract keeps every
//! gateway path but the token endpoint, the key set and health behind a token.

use utoipa::OpenApi;

use crate::auth;

/// The key set at `/.well-known/jwks.json` (RFC 7517).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // Describes `TokenSigner::jwks`' JSON; never built.
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// One public key (RFC 8037: an Ed25519 key is `kty` OKP, `crv` Ed25519).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Jwk {
    #[schema(example = "OKP")]
    pub kty: String,
    #[schema(example = "Ed25519")]
    pub crv: String,
    /// The public key, base64url.
    pub x: String,
    /// Names the key in a token's header.
    pub kid: String,
    #[schema(rename = "use", example = "sig")]
    pub use_: String,
    #[schema(example = "EdDSA")]
    pub alg: String,
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "gateway", description = "The store's front door: tokens for users, the keys that verify them. Every other path is routed to a service (see their documents)."),
    paths(auth::token, auth::jwks),
    components(schemas(auth::TokenRequest, auth::TokenResponse, Jwks, Jwk, shared::Problem, shared::FieldError)),
    tags((name = "auth", description = "Log in and verify tokens"))
)]
pub struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    #[test]
    fn docs_api_holds_the_document_the_code_generates() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api/gateway.json");
        shared::openapi::check_document(&super::document(), &path);
    }
}
