//! Reply routes learned from traffic. With routes from the tree a machine knows only what it asked for: a machine
//! hosting a server does not know the machines of the clients that call it. When an authentic packet from peer S
//! comes from an overlay address (a client's InstanceIP) the route table does not know, the reply route
//! `InstanceIP -> S` is remembered here, so the server's replies to that InstanceIP go back through S.
//!
//! Bounded (LRU) and idle entries expire; time is passed in.

use super::routes::NodeId;
use lru::LruCache;
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
struct ReplyRoute {
    peer: NodeId,
    last_seen: Duration,
}

/// What `learn` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A new address; `evicted`: the least recently used route went to make room.
    New { evicted: bool },
    /// Known already (refreshed; the peer is updated if the address moved).
    Known,
}

pub struct ReplyRoutes {
    routes: LruCache<Ipv4Addr, ReplyRoute>,
    idle_timeout: Duration,
}

impl ReplyRoutes {
    pub fn new(capacity: NonZeroUsize, idle_timeout: Duration) -> Self {
        Self { routes: LruCache::new(capacity), idle_timeout }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// `address` was seen as the source of a packet from `peer`.
    pub fn learn(&mut self, address: Ipv4Addr, peer: NodeId, now: Duration) -> Learned {
        if let Some(route) = self.routes.get_mut(&address) {
            *route = ReplyRoute { peer, last_seen: now };
            return Learned::Known;
        }
        let evicted = self.routes.push(address, ReplyRoute { peer, last_seen: now }).is_some();
        Learned::New { evicted }
    }

    /// The peer replies to `address` go to, unless the route has idled out.
    pub fn peer(&self, address: Ipv4Addr, now: Duration) -> Option<NodeId> {
        let route = self.routes.peek(&address)?;
        (now.saturating_sub(route.last_seen) <= self.idle_timeout).then_some(route.peer)
    }

    /// `peer` does not host `address` (it answered route-not-found): forget the route. Returns whether it existed.
    pub fn forget(&mut self, address: Ipv4Addr, peer: NodeId) -> bool {
        if self.routes.peek(&address).is_some_and(|route| route.peer == peer) {
            self.routes.pop(&address);
            return true;
        }
        false
    }

    /// Removes routes idle for longer than the timeout; returns how many.
    pub fn expire(&mut self, now: Duration) -> usize {
        let before = self.routes.len();
        let idle = self.idle_timeout;
        self.routes.retain(|_, route| now.saturating_sub(route.last_seen) <= idle);
        before - self.routes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_routes_are_bounded_refreshed_and_expire() {
        let t = Duration::from_secs;
        let (s, other) = (NodeId(1), NodeId(2));
        let (x, y, z) = (Ipv4Addr::new(10, 30, 1, 1), Ipv4Addr::new(10, 30, 1, 2), Ipv4Addr::new(10, 30, 1, 3));
        let mut routes = ReplyRoutes::new(NonZeroUsize::new(2).unwrap(), t(60));
        assert_eq!(routes.learn(x, s, t(0)), Learned::New { evicted: false });
        assert_eq!(routes.learn(y, s, t(1)), Learned::New { evicted: false });
        assert_eq!(routes.learn(x, other, t(2)), Learned::Known, "moved to another machine");
        assert_eq!(routes.peer(x, t(2)), Some(other));
        assert_eq!(routes.learn(z, s, t(3)), Learned::New { evicted: true });
        assert_eq!(routes.peer(y, t(3)), None, "least recently used went");
        assert!(!routes.forget(x, s), "only the peer it points to can withdraw it");
        assert!(routes.forget(x, other));
        assert_eq!(routes.peer(z, t(63)), Some(s));
        assert_eq!(routes.peer(z, t(64)), None, "idle too long");
        assert_eq!(routes.expire(t(64)), 1);
        assert_eq!(routes.len(), 0);
    }
}
