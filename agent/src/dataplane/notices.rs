//! Notices from the packet loop to the agent: what the data plane saw that the control plane should act on
//! (a table query for an unknown address, a re-query for an instance gone from its machine, keeping the interest
//! in a used service alive). Rate-limited here, so the packet loop can note every event and the agent hears of
//! each at most once per interval. Pure: time is passed in.

use super::routes::NodeId;
use lru::LruCache;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// An outgoing packet to an overlay address (ServiceIP range) with no route and no learned reply route:
    /// the agent runs a table query. At most once per address per second.
    UnknownAddress(Ipv4Addr),
    /// A machine answered route-not-found for this instance (it is gone there), or its machine stopped answering
    /// (`liveness`; at most once per machine per 10 s): the agent re-queries.
    InstanceUnreachable { service: String, instance: u32 },
    /// New connections went to this service recently (at most once per service per 10 s): the agent keeps its
    /// interest in the route alive.
    ServiceUsed(String),
}

pub const UNKNOWN_ADDRESS_INTERVAL: Duration = Duration::from_secs(1);
pub const SERVICE_USED_INTERVAL: Duration = Duration::from_secs(10);
/// A peer flapping between unreachable and back announces its instances at most this often.
pub const PEER_UNREACHABLE_INTERVAL: Duration = Duration::from_secs(10);

/// Remembers when each key was last announced; bounded, so a flood of distinct keys only forgets old ones.
struct Limiter<K: Hash + Eq> {
    last: LruCache<K, Duration>,
    interval: Duration,
}

impl<K: Hash + Eq> Limiter<K> {
    fn new(capacity: NonZeroUsize, interval: Duration) -> Self {
        Self { last: LruCache::new(capacity), interval }
    }

    /// Whether `key` may be announced now (and if so, notes that it was).
    fn allow(&mut self, key: K, now: Duration) -> bool {
        match self.last.get_mut(&key) {
            Some(last) if now.saturating_sub(*last) < self.interval => false,
            Some(last) => {
                *last = now;
                true
            }
            None => {
                self.last.put(key, now);
                true
            }
        }
    }
}

/// Decides which events become notices.
pub struct NoticeLimiter {
    unknown: Limiter<Ipv4Addr>,
    /// Keyed by the service's route-index position, so the hot path allocates nothing; reset with the table.
    used: Limiter<usize>,
    unreachable: Limiter<NodeId>,
}

impl NoticeLimiter {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            unknown: Limiter::new(capacity, UNKNOWN_ADDRESS_INTERVAL),
            used: Limiter::new(capacity, SERVICE_USED_INTERVAL),
            unreachable: Limiter::new(capacity, PEER_UNREACHABLE_INTERVAL),
        }
    }

    pub fn unknown_address(&mut self, address: Ipv4Addr, now: Duration) -> bool {
        self.unknown.allow(address, now)
    }

    /// `service` is a route-index position: positions change with the table, so call `routes_changed` then.
    pub fn service_used(&mut self, service: usize, now: Duration) -> bool {
        self.used.allow(service, now)
    }

    /// Whether the instances of a peer just declared unreachable are announced.
    pub fn peer_unreachable(&mut self, peer: NodeId, now: Duration) -> bool {
        self.unreachable.allow(peer, now)
    }

    pub fn routes_changed(&mut self) {
        self.used.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_and_service_is_announced_at_most_once_per_interval() {
        let mut limiter = NoticeLimiter::new(NonZeroUsize::new(2).unwrap());
        let ms = Duration::from_millis;
        let (x, y, z) = (Ipv4Addr::new(10, 30, 0, 9), Ipv4Addr::new(10, 30, 0, 10), Ipv4Addr::new(10, 30, 0, 11));
        assert!(limiter.unknown_address(x, ms(0)));
        assert!(!limiter.unknown_address(x, ms(999)));
        assert!(limiter.unknown_address(y, ms(999)), "addresses are limited separately");
        assert!(limiter.unknown_address(x, ms(1000)));
        assert!(limiter.unknown_address(z, ms(1001)), "bounded: y is forgotten");
        assert!(limiter.unknown_address(y, ms(1002)));
        assert!(limiter.service_used(0, ms(0)));
        assert!(!limiter.service_used(0, ms(9_999)));
        assert!(limiter.service_used(0, ms(10_000)));
        limiter.routes_changed();
        assert!(limiter.service_used(0, ms(10_001)), "positions were renumbered");
        assert!(limiter.peer_unreachable(NodeId(1), ms(0)));
        assert!(!limiter.peer_unreachable(NodeId(1), ms(9_999)), "flapping is announced once per interval");
        assert!(limiter.peer_unreachable(NodeId(2), ms(9_999)));
        assert!(limiter.peer_unreachable(NodeId(1), ms(10_000)));
    }
}
