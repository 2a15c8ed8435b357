//! What the resolver has done since it started, for the status API and metrics.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by the UDP and TCP paths.
#[derive(Debug, Default)]
pub struct DnsCounters {
    pub(super) queries: AtomicU64,
    pub(super) answered: AtomicU64,
    pub(super) nxdomain: AtomicU64,
    pub(super) malformed_names: AtomicU64,
    pub(super) lookup_failures: AtomicU64,
    pub(super) forwarded: AtomicU64,
    pub(super) upstream_failures: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) malformed_packets: AtomicU64,
    pub(super) overload_drops: AtomicU64,
}

/// A snapshot of [`DnsCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DnsStats {
    /// Decoded requests (UDP and TCP).
    pub queries: u64,
    /// Our names answered NOERROR (an address, or no data for other record types).
    pub answered: u64,
    /// Our names answered NXDOMAIN: unknown services and malformed names.
    pub nxdomain: u64,
    /// The part of `nxdomain` due to names that do not follow the naming schema.
    pub malformed_names: u64,
    /// Our names answered SERVFAIL because the lookup timed out or failed.
    pub lookup_failures: u64,
    /// Queries for other names sent to the upstream resolvers.
    pub forwarded: u64,
    /// Forwarded queries answered SERVFAIL (upstream unreachable, timed out, or none configured).
    pub upstream_failures: u64,
    /// Requests refused with FORMERR/NOTIMP/REFUSED (not exactly one query, not a query, wrong class).
    pub rejected: u64,
    /// UDP datagrams that are not DNS requests, dropped without an answer.
    pub malformed_packets: u64,
    /// UDP requests dropped because too many were already in flight.
    pub overload_drops: u64,
}

impl DnsCounters {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DnsStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DnsStats {
            queries: read(&self.queries),
            answered: read(&self.answered),
            nxdomain: read(&self.nxdomain),
            malformed_names: read(&self.malformed_names),
            lookup_failures: read(&self.lookup_failures),
            forwarded: read(&self.forwarded),
            upstream_failures: read(&self.upstream_failures),
            rejected: read(&self.rejected),
            malformed_packets: read(&self.malformed_packets),
            overload_drops: read(&self.overload_drops),
        }
    }
}
