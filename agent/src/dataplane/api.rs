//! The data plane's local API routes (merged into the daemon's router).
//!
//! - `GET /v1/dataplane`: status and counters (`DataPlaneStatus`) (alone: [`DataPlane::status_router`])
//! - `GET|PUT /v1/dataplane/routes`: the route table (`RouteTable`)
//! - `GET|POST /v1/instances`: attached instances / attach one (`AttachRequest` -> `Attachment`)
//! - `DELETE /v1/instances/{service}/{instance}`: detach

use super::routes::RouteTable;
use super::{AttachRequest, Attachment, DataPlane, DataPlaneStatus};
use crate::api::{ApiError, ApiResult};
use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::{Json, Router};

impl DataPlane {
    /// Every route: the standalone data plane, with a static route table.
    pub fn router(&self) -> Router {
        self.status_router().merge(
            Router::new()
                .route("/v1/dataplane/routes", get(routes).put(set_routes))
                .route("/v1/instances", get(instances).post(attach))
                .route("/v1/instances/{service}/{instance}", delete(detach))
                .with_state(self.clone()),
        )
    }

    /// Status only: when the tree feeds the routes, the agent serves the route table and instances itself.
    pub fn status_router(&self) -> Router {
        Router::new().route("/v1/dataplane", get(status)).with_state(self.clone())
    }
}

async fn status(State(dataplane): State<DataPlane>) -> ApiResult<DataPlaneStatus> {
    Ok(Json(dataplane.status().await.map_err(|e| ApiError::unavailable(format!("{e:#}")))?))
}

async fn routes(State(dataplane): State<DataPlane>) -> ApiResult<RouteTable> {
    let status = dataplane.status().await.map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    Ok(Json(status.routes))
}

async fn set_routes(State(dataplane): State<DataPlane>, Json(table): Json<RouteTable>) -> ApiResult<RouteTable> {
    dataplane.set_routes(table.clone()).await.map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    Ok(Json(table))
}

async fn instances(State(dataplane): State<DataPlane>) -> ApiResult<Vec<Attachment>> {
    Ok(Json(dataplane.attachments().await))
}

async fn attach(State(dataplane): State<DataPlane>, Json(request): Json<AttachRequest>) -> ApiResult<Attachment> {
    let attachment = dataplane.attach(request).await.map_err(|e| {
        let message = format!("{e:#}");
        if message.contains("already attached") { ApiError::conflict(message) } else { ApiError::bad_request(message) }
    })?;
    Ok(Json(attachment))
}

async fn detach(
    State(dataplane): State<DataPlane>,
    Path((service, instance)): Path<(String, u32)>,
) -> ApiResult<Attachment> {
    let attachment = dataplane.detach(&service, instance).await.map_err(|e| {
        let message = format!("{e:#}");
        if message.contains("is not attached") { ApiError::not_found(message) } else { ApiError::internal(message) }
    })?;
    Ok(Json(attachment))
}
