//! The agent's name resolver, listening on the bridge gateway (port 53) for the instances on this machine.
//!
//! It answers the Canopy service names (seed 002, section 3.6.2)
//!
//! ```text
//! app.appns.service.servicens.{INSTANCE|any}.{POLICY|none}.<domain>
//! ```
//!
//! with the policy's ServiceIP (`any.<policy>`) or the instance's InstanceIP (`<n>.none`), asking a
//! [`ServiceLookup`] (the route cache, which queries the tree on a miss). The same names without the domain also
//! resolve (`a1.a.s1.s.any.rr`): they are recognised by their last label being a policy or `none`, which no
//! top-level domain is, so instances need no `search` line in their resolv.conf.
//!
//! | query                                        | answer                                        |
//! |----------------------------------------------|-----------------------------------------------|
//! | A, known service or instance                 | the address, TTL [`DnsConfig::ttl`]           |
//! | AAAA (or other type), known                  | NOERROR, no records                           |
//! | unknown service or instance                  | NXDOMAIN                                      |
//! | malformed name (`...0.rr`, `...any.none`)    | NXDOMAIN, counted in `malformed_names`        |
//! | lookup timed out or failed                   | SERVFAIL                                      |
//! | the domain itself                            | NOERROR, no records                           |
//! | any other name                               | forwarded upstream; SERVFAIL if that fails    |
//!
//! Upstreams come from `/etc/resolv.conf` unless configured, and the resolver never forwards to itself.
//! Counters and configuration are at `GET /v1/dns` ([`RunningResolver::router`]).
//!
//! Starting it (daemon or standalone data plane): `dns::spawn(DnsConfig::with_system_upstreams((gateway, 53).into(),
//! domain)?, lookup).await?`, where `lookup` is the route cache or a [`StaticLookup`] filled from the static route
//! table; keep the returned [`RunningResolver`] alive for as long as it should serve.
//! Nothing here writes DNS wire format: hickory decodes requests, encodes responses and does the forwarding.

// The daemon and the standalone data plane wire this in; until then parts of the API have no caller.
#![allow(dead_code, unused_imports)]

mod api;
pub mod command;
mod counters;
mod handler;
mod lookup;
mod names;
mod route_table;
mod server;
mod upstream;

#[cfg(test)]
mod tests;

pub use api::{DnsStatus, Resolved, resolve_router};
pub use counters::{DnsCounters, DnsStats};
pub use lookup::{LookupError, ServiceLookup, StaticLookup};
pub use route_table::serve_for;
pub use server::RunningResolver;
pub use upstream::{DEFAULT_RESOLV_CONF, upstreams_from_resolv_conf};

use anyhow::Context;
use canopy_overlay::routes::ServiceDomain;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// The port resolvers listen on.
pub const DNS_PORT: u16 = 53;
/// The domain used when none is configured.
pub const DEFAULT_DOMAIN: &str = "canopy";

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where to listen: the bridge gateway on port 53 in production.
    pub listen: SocketAddr,
    /// The domain our names live under.
    pub domain: ServiceDomain,
    /// Resolvers for every other name, tried in order (see [`upstreams_from_resolv_conf`]). Entries that are this
    /// resolver itself are dropped. Empty: other names get SERVFAIL.
    pub upstreams: Vec<SocketAddr>,
    /// TTL of our answers: short, so clients see ServiceIP changes soon.
    pub ttl: Duration,
    /// How long a lookup of our names may take before the client gets SERVFAIL.
    pub lookup_timeout: Duration,
    /// How long one upstream may take to answer a forwarded query.
    pub upstream_timeout: Duration,
}

impl DnsConfig {
    /// The defaults with the machine's upstreams from `/etc/resolv.conf`.
    pub fn with_system_upstreams(listen: SocketAddr, domain: ServiceDomain) -> anyhow::Result<Self> {
        let upstreams = upstreams_from_resolv_conf(Path::new(DEFAULT_RESOLV_CONF))?;
        Ok(Self::new(listen, domain, upstreams))
    }

    pub fn new(listen: SocketAddr, domain: ServiceDomain, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            listen,
            domain,
            upstreams,
            ttl: Duration::from_secs(5),
            lookup_timeout: Duration::from_secs(3),
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

/// Binds `config.listen` (UDP and TCP) and serves until the returned handle is shut down or dropped.
pub async fn spawn(config: DnsConfig, lookup: Arc<dyn ServiceLookup>) -> anyhow::Result<RunningResolver> {
    let (udp, tcp) =
        server::bind(config.listen).await.with_context(|| format!("binding the DNS resolver to {}", config.listen))?;
    let local_addr = udp.local_addr()?;
    let (upstreams, dropped) = upstream::without_self(&config.upstreams, local_addr);
    for upstream in dropped {
        warn!(%upstream, "not forwarding DNS queries to this resolver itself");
    }
    if upstreams.is_empty() {
        warn!("no upstream DNS resolvers: only Canopy names will resolve");
    }
    let forwarder = match upstreams.is_empty() {
        true => None,
        false => Some(upstream::forwarding_catalog(&upstreams, config.upstream_timeout)?),
    };
    let counters = Arc::new(DnsCounters::default());
    let domain = config.domain.to_string();
    let handler =
        handler::DnsHandler::new(config.domain, config.ttl, config.lookup_timeout, lookup, forwarder, counters.clone());
    Ok(server::start(udp, tcp, server::Serving { handler, counters, domain, upstreams })?)
}
