//! order-service's OpenAPI document, generated from the handlers' annotations and
//! the types they answer with; served at `/openapi.json`, kept in `docs/api/`.

use utoipa::OpenApi;

use shared::openapi::{BearerAuth, CommonResponses};

use crate::{orders, timeline, validation};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "order-service", description = "The orders of the store. Reached through the gateway at /orders; every call needs a bearer token."),
    paths(orders::create, orders::list, orders::read, orders::stats, timeline::timeline),
    components(schemas(validation::CreateOrder, validation::ItemRequest, orders::Order, orders::OrderPage,
        orders::Stats, timeline::Timeline, timeline::Hop, shared::Problem, shared::FieldError, shared::events::OrderItem)),
    modifiers(&BearerAuth, &CommonResponses),
    tags((name = "orders", description = "Place and follow orders"))
)]
pub struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
