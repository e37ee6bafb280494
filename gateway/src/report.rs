//! `GET /actuator/gateway/routes` and `/actuator/gateway/routes/{id}` (admins): each
//! route in Spring Cloud Gateway's JSON shape (`route_id`, `predicate`, `filters`,
//! `uri`, `order`), so tools written for SCG's actuator read it, plus what SCG cannot
//! show: the roles a route needs, the instances it resolves to right now with their
//! health, and the instances refused because of where they are.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use shared::Problem;

use crate::{
    Gateway,
    routes::{Route, Upstream},
};

/// One route as the report shows it.
#[derive(Debug, Serialize)]
pub struct RouteView {
    pub route_id: String,
    /// The predicates as written, joined with `&&`.
    pub predicate: String,
    /// The filters as written, the default filters first.
    pub filters: Vec<String>,
    pub uri: String,
    pub order: i32,
    pub roles: Vec<String>,
    pub instances: Vec<InstanceView>,
    #[serde(rename = "refusedInstances")]
    pub refused_instances: Vec<RefusedView>,
}

/// An instance a route may send to, and whether it does now.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub ejected: bool,
    /// Milliseconds since the epoch; only while ejected.
    pub ejected_until: Option<u64>,
    pub in_flight: usize,
    pub receives_traffic: bool,
}

/// A registered instance the gateway will not send to, with the reason.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedView {
    pub instance_id: String,
    pub address: String,
    pub reason: String,
}

impl RouteView {
    pub fn of(route: &Route, gateway: &Gateway, now_ms: u64) -> Self {
        let discovery = gateway.discovery.as_ref();
        let instance = |address: &str, id: Option<&str>, status: Option<&str>| {
            let health = gateway.balancer.health(address);
            let ejected = health.is_ejected(now_ms);
            InstanceView {
                instance_id: id.map(str::to_owned),
                address: address.to_owned(),
                status: status.map(str::to_owned),
                ejected,
                ejected_until: ejected.then(|| health.ejected_until()),
                in_flight: health.outstanding.load(Ordering::Relaxed),
                receives_traffic: status.is_none_or(|s| s == "UP") && !ejected,
            }
        };
        let (instances, refused_instances) = match (&route.upstream, discovery) {
            (Upstream::Service(service), Some(discovery)) => (
                discovery
                    .instances(service)
                    .iter()
                    .map(|i| instance(&i.address, Some(&i.instance_id), Some(&i.status)))
                    .collect(),
                discovery
                    .refused(service)
                    .iter()
                    .map(|r| RefusedView {
                        instance_id: r.instance.instance_id.clone(),
                        address: r.instance.address.clone(),
                        reason: r.reason.clone(),
                    })
                    .collect(),
            ),
            (Upstream::Fixed(base), _) => (vec![instance(base, None, None)], Vec::new()),
            (Upstream::Service(_), None) => (Vec::new(), Vec::new()),
        };
        RouteView {
            route_id: route.id.clone(),
            predicate: route.described.predicate(),
            filters: route.described.filters.clone(),
            uri: route.uri.clone(),
            order: route.order,
            roles: route.roles.clone(),
            instances,
            refused_instances,
        }
    }
}

/// `GET /actuator/gateway/routes`: every route, in matching order.
pub async fn routes(State(gateway): State<Arc<Gateway>>) -> Json<Vec<RouteView>> {
    let table = gateway.routes.load();
    let now = shared::now_ms();
    Json(
        table
            .routes
            .iter()
            .map(|route| RouteView::of(route, &gateway, now))
            .collect(),
    )
}

/// `GET /actuator/gateway/routes/{id}`: one route, or 404 naming it.
pub async fn route(State(gateway): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let table = gateway.routes.load();
    match table.routes.iter().find(|r| r.id == id) {
        Some(route) => Json(RouteView::of(route, &gateway, shared::now_ms())).into_response(),
        None => Problem::new(
            StatusCode::NOT_FOUND,
            format!(
                "No route has the id `{}`.",
                id.chars().take(100).collect::<String>()
            ),
        )
        .into_response(),
    }
}
