//! The runtime's part of the local API: `/status`, `/peers`, `/tree`, `POST /leave`, `/grids`, `POST /placement`.

use super::{Handle, PeerReport, StatusReport, TreeReport};
use crate::api::{ApiError, ApiResult};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};

pub fn router(handle: Handle) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route("/tree", get(tree))
        .route("/leave", post(leave))
        .route("/grids", get(crate::grid_view::grids_endpoint))
        .route("/placement", post(crate::grid_view::placement_endpoint))
        .with_state(handle)
}

fn unavailable(err: anyhow::Error) -> ApiError {
    ApiError::unavailable(err.to_string())
}

async fn status(State(handle): State<Handle>) -> ApiResult<StatusReport> {
    handle.status().await.map(Json).map_err(unavailable)
}

async fn peers(State(handle): State<Handle>) -> ApiResult<Vec<PeerReport>> {
    handle.peers().await.map(Json).map_err(unavailable)
}

async fn tree(State(handle): State<Handle>) -> ApiResult<TreeReport> {
    handle.tree().await.map(Json).map_err(unavailable)
}

async fn leave(State(handle): State<Handle>) -> ApiResult<String> {
    handle.leave().await.map_err(unavailable)?;
    Ok(Json("leaving the overlay; the agent stops when the hand-over is sent".to_string()))
}
