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

/// Adds the answers that every operation can get whatever its handler does, so that
/// the document lists every status a client can really see through the gateway:
///
/// - 401 from the gateway (no or a bad token) and 429 from its rate limiter, on all;
/// - 400 where parameters or a body can be malformed (an unknown query parameter, a
///   body that is not JSON);
/// - 413 (a body over the limit) and 415 (a body that is not `application/json`)
///   where an operation takes a body.
///
/// An operation's own description of a status wins.
#[derive(Debug)]
pub struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                let has_parameters = operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
                let has_body = operation.request_body.is_some();
                let mut add = |status: &str, description: &str| {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| problem_response(description).into());
                };
                add(
                    "401",
                    "No bearer token, or one that is expired, not yet valid or not ours",
                );
                add(
                    "429",
                    "Over the route's request rate at the gateway; retry after `Retry-After` seconds",
                );
                if has_parameters || has_body {
                    add(
                        "400",
                        "A malformed request: an unknown query parameter, or a body that is not JSON",
                    );
                }
                if has_body {
                    add("413", "The body is over the size limit");
                    add("415", "The body is not sent as `application/json`");
                }
            }
        }
    }
}

/// A response carrying a problem+json body.
fn problem_response(description: &str) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// The document as served and kept in `docs/api/`. Every optional query parameter of
/// ours reads an empty value as absent (`?limit=` is the default limit, as Spring's
/// `@RequestParam(defaultValue = ...)` does), so each is marked `allowEmptyValue`,
/// which utoipa cannot write.
pub fn render(doc: &OpenApi) -> String {
    let mut json = serde_json::to_value(doc).unwrap_or_default();
    if let Some(paths) = json.get_mut("paths").and_then(|p| p.as_object_mut()) {
        let operations = paths
            .values_mut()
            .filter_map(|item| item.as_object_mut())
            .flat_map(|item| item.values_mut());
        for operation in operations {
            let parameters = operation
                .get_mut("parameters")
                .and_then(|p| p.as_array_mut())
                .into_iter()
                .flatten();
            for parameter in parameters.filter_map(|p| p.as_object_mut()) {
                let optional_query = parameter.get("in").and_then(|v| v.as_str()) == Some("query")
                    && parameter.get("required").and_then(|v| v.as_bool()) != Some(true);
                if optional_query {
                    parameter.insert("allowEmptyValue".into(), true.into());
                }
            }
        }
    }
    serde_json::to_string_pretty(&json).unwrap_or_else(|_| "{}".to_owned())
}

/// `GET /openapi.json`, open like the actuator.
pub fn route(doc: OpenApi) -> axum::Router {
    let json = std::sync::Arc::new(render(&doc));
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
    let generated = render(doc) + "\n";
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
