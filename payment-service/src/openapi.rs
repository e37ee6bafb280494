//! payment-service's OpenAPI document, generated from the handlers' annotations and
//! the types they answer with; served at `/openapi.json`, kept in `docs/api/`.

use shared::openapi::{BearerAuth, CommonResponses};
use utoipa::OpenApi;

use crate::api;

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "payment-service", description = "Accounts and payments. Reached through the gateway at /payments; every call needs a bearer token."),
    paths(api::my_account, api::deposit_mine, api::account_of, api::deposit_for, api::list_payments),
    components(schemas(api::Account, api::DepositRequest, api::Payment, api::PaymentList,
        shared::Problem, shared::FieldError)),
    modifiers(&BearerAuth, &CommonResponses),
    tags((name = "payments", description = "Fund accounts and see payments"))
)]
pub struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
