//! What every service's OpenAPI document shares: the bearer scheme, the problem
//! schema, and the route that serves the document at `/openapi.json`.

use utoipa::{
    Modify,
    openapi::{
        OpenApi,
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    },
};

/// Adds the `bearer` scheme (the gateway's JWTs) and requires it on every operation.
#[derive(Debug)]
pub struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A token from the gateway's POST /auth/token (or a configured issuer).",
                    ))
                    .build(),
            ),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// `GET /openapi.json`, open like the actuator.
pub fn route(doc: OpenApi) -> axum::Router {
    let json = std::sync::Arc::new(doc.to_pretty_json().unwrap_or_else(|_| "{}".to_owned()));
    axum::Router::new().route(
        "/openapi.json",
        axum::routing::get(move || {
            let json = json.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    json.as_str().to_owned(),
                )
            }
        }),
    )
}

/// The checked-in copy of a service's document stays what the code generates: with
/// `STOREFRONT_UPDATE_DOCS=1` this writes `path`; otherwise it panics when `path`
/// differs, saying how to regenerate it. For each service's tests.
pub fn check_document(doc: &OpenApi, path: &std::path::Path) {
    let generated = doc.to_pretty_json().expect("the document serializes") + "\n";
    if std::env::var_os("STOREFRONT_UPDATE_DOCS").is_some() {
        std::fs::write(path, &generated).expect("write the document");
        return;
    }
    let current = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        current == generated,
        "{} is not what the code generates; regenerate it with \
         `STOREFRONT_UPDATE_DOCS=1 cargo xtask test`",
        path.display()
    );
}
