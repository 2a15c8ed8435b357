//! The resolver's local API route (merged into the daemon's router).
//!
//! - `GET /v1/dns`: where it listens, its domain, its upstreams and its counters ([`DnsStatus`])
//! - `GET /v1/dns/resolve/{name}`: the address the resolver gives a Canopy name ([`Resolved`]); 400 for a
//!   malformed or foreign name, 404 for an unknown service or instance

use super::counters::{DnsCounters, DnsStats};
use super::lookup::ServiceLookup;
use super::names::{NameClass, classify};
use crate::api::{ApiError, ApiResult};
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use canopy_overlay::routes::ServiceDomain;
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

/// A name resolved through the local API (`agent resolve`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct Resolved {
    pub name: String,
    pub address: std::net::Ipv4Addr,
}

#[derive(Clone)]
struct ResolveSource {
    domain: ServiceDomain,
    lookup: Arc<dyn ServiceLookup>,
}

/// `GET /v1/dns/resolve/{name}`: what the resolver answers for one of our names, without DNS in between.
pub fn resolve_router(domain: ServiceDomain, lookup: Arc<dyn ServiceLookup>) -> Router {
    Router::new().route("/v1/dns/resolve/{name}", get(resolve)).with_state(ResolveSource { domain, lookup })
}

async fn resolve(State(source): State<ResolveSource>, Path(name): Path<String>) -> ApiResult<Resolved> {
    let target = match classify(&name, &source.domain) {
        NameClass::Ours(Ok(target)) => target,
        NameClass::Ours(Err(err)) => return Err(ApiError::bad_request(format!("malformed name {name:?}: {err}"))),
        NameClass::Apex | NameClass::Foreign => {
            return Err(ApiError::bad_request(format!(
                "{name:?} is not a Canopy name: expected APP.APPNS.SVC.SVCNS.{{N|any}}.{{POLICY|none}}[.{}]",
                source.domain
            )));
        }
    };
    match source.lookup.resolve(&target).await {
        Ok(Some(address)) => Ok(Json(Resolved { name: target.to_fqdn(&source.domain), address })),
        Ok(None) => Err(ApiError::not_found(format!("no such service or instance: {name}"))),
        Err(err) => Err(ApiError::unavailable(format!("{name}: {err}"))),
    }
}
