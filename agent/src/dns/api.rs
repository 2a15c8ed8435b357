//! The resolver's local API route (merged into the daemon's router).
//!
//! - `GET /v1/dns`: where it listens, its domain, its upstreams and its counters ([`DnsStatus`])

use super::counters::{DnsCounters, DnsStats};
use crate::api::ApiResult;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsStatus {
    pub listen: SocketAddr,
    pub domain: String,
    /// The upstreams in use (the resolver itself already removed).
    pub upstreams: Vec<SocketAddr>,
    pub stats: DnsStats,
}

/// What the route needs from a running resolver.
#[derive(Clone)]
pub(super) struct StatusSource {
    pub(super) listen: SocketAddr,
    pub(super) domain: String,
    pub(super) upstreams: Vec<SocketAddr>,
    pub(super) counters: Arc<DnsCounters>,
}

impl StatusSource {
    pub(super) fn status(&self) -> DnsStatus {
        DnsStatus {
            listen: self.listen,
            domain: self.domain.clone(),
            upstreams: self.upstreams.clone(),
            stats: self.counters.snapshot(),
        }
    }

    pub(super) fn router(&self) -> Router {
        Router::new().route("/v1/dns", get(status)).with_state(self.clone())
    }
}

async fn status(State(source): State<StatusSource>) -> ApiResult<DnsStatus> {
    Ok(Json(source.status()))
}
