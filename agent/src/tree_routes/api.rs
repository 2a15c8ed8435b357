//! The local API when routes come from the tree (merged into the daemon's router instead of the data plane's
//! static-table routes):
//!
//! - `GET /v1/services`: what this machine knows of services ([`ServiceReport`]), `agent services`
//! - `GET|POST /v1/instances`: attached instances / attach one (`AttachRequest` -> `Attachment`): deploys the
//!   service with the tree and registers the instance
//! - `DELETE /v1/instances/{service}/{instance}`: detach and unregister
//! - `GET /v1/dataplane`, `GET /v1/dataplane/routes`: data-plane status and the route table built from the tree
//! - `GET /v1/dns`: the resolver's address, upstreams and counters
//! - `GET /v1/dns/resolve/{name}`: what the resolver answers for a Canopy name (`agent resolve`)

use super::lookup::TreeLookup;
use super::{ServiceReport, TreeRoutes};
use crate::api::{ApiError, ApiResult};
use crate::dataplane::routes::RouteTable;
use crate::dataplane::{AttachRequest, Attachment, DataPlaneStatus};
use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::{Json, Router};
use canopy_overlay::routes::ServiceDomain;
use std::sync::Arc;

impl TreeRoutes {
    pub fn router(&self, domain: ServiceDomain) -> Router {
        Router::new()
            .route("/v1/services", get(services))
            .route("/v1/instances", get(instances).post(attach))
            .route("/v1/instances/{service}/{instance}", delete(detach))
            .route("/v1/dataplane", get(dataplane_status))
            .route("/v1/dataplane/routes", get(routes))
            .route("/v1/dns", get(dns_status))
            .with_state(self.clone())
            .merge(crate::dns::resolve_router(domain, Arc::new(TreeLookup::new(self.clone()))))
    }
}

fn unavailable(err: anyhow::Error) -> ApiError {
    ApiError::unavailable(format!("{err:#}"))
}

async fn services(State(routes): State<TreeRoutes>) -> ApiResult<Vec<ServiceReport>> {
    routes.services().await.map(Json).map_err(unavailable)
}

async fn instances(State(routes): State<TreeRoutes>) -> ApiResult<Vec<Attachment>> {
    routes.instances().await.map(Json).map_err(unavailable)
}

async fn attach(State(routes): State<TreeRoutes>, Json(request): Json<AttachRequest>) -> ApiResult<Attachment> {
    routes.attach(request).await.map(Json).map_err(|e| {
        let message = format!("{e:#}");
        if message.contains("already attached") {
            ApiError::conflict(message)
        } else if message.contains("no data plane") || message.contains("timed out") {
            ApiError::unavailable(message)
        } else {
            ApiError::bad_request(message)
        }
    })
}

async fn detach(
    State(routes): State<TreeRoutes>,
    Path((service, instance)): Path<(String, u32)>,
) -> ApiResult<Attachment> {
    routes.detach(&service, instance).await.map(Json).map_err(|e| {
        let message = format!("{e:#}");
        if message.contains("is not attached") { ApiError::not_found(message) } else { ApiError::bad_request(message) }
    })
}

async fn dataplane_status(State(routes): State<TreeRoutes>) -> ApiResult<DataPlaneStatus> {
    let dataplane = routes.dataplane().await.map_err(unavailable)?.ok_or_else(|| {
        ApiError::unavailable("no data plane yet: it starts when the tree grants this machine a subnet")
    })?;
    dataplane.status().await.map(Json).map_err(unavailable)
}

async fn routes(State(routes): State<TreeRoutes>) -> ApiResult<RouteTable> {
    routes
        .table()
        .await
        .map_err(unavailable)?
        .map(|report| Json(report.table))
        .ok_or_else(|| ApiError::unavailable("no route table yet: the data plane is not running"))
}

async fn dns_status(State(routes): State<TreeRoutes>) -> ApiResult<crate::dns::DnsStatus> {
    routes
        .dns_status()
        .await
        .map_err(unavailable)?
        .map(Json)
        .ok_or_else(|| ApiError::unavailable("no resolver yet: it starts with the data plane"))
}
