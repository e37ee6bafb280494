//! notification-service's OpenAPI document, generated from the handler's annotations
//! and the types it answers with; served at `/openapi.json`, kept in `docs/api/`.

use shared::openapi::{BearerAuth, CommonResponses};
use utoipa::OpenApi;

use crate::api;

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "notification-service", description = "The notifications sent for each order outcome. Reached through the gateway at /notifications; every call needs a bearer token."),
    paths(api::list),
    components(schemas(api::Notification, api::NotificationList, shared::Problem, shared::FieldError)),
    modifiers(&BearerAuth, &CommonResponses),
    tags((name = "notifications", description = "What the store told its customers"))
)]
pub struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
