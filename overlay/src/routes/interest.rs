//! Who wants updates for which service, and the routes this node received from its parent.
//!
//! [`InterestTable`]: a child that queried a service has an interest in it until the interest expires; the child
//! renews it while the route is in use. A service hosted on this node is pinned: the node must hear about the
//! other instances of its own services (seed 002, section 3.6.6, "deployment interest"). A node keeps its own
//! interest with its parent while any child is interested, the route is used locally, or the service is pinned.
//!
//! [`RouteCache`]: the answers and updates received from the parent, per service, with expiry; "not found"
//! answers are cached briefly too so a missing service does not send a query up the tree on every packet.

use super::name::ServiceName;
use super::registry::{InstanceRecord, RouteChange};
use super::service_ips::ServiceAddresses;
use crate::{NodeId, Time};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
struct ServiceInterest {
    /// Child -> when its interest lapses.
    children: BTreeMap<NodeId, Time>,
    /// When this node's own use of the route lapses.
    local_until: Option<Time>,
    /// Local instances of the service; while non-zero the interest never lapses.
    pins: u32,
}

impl ServiceInterest {
    fn wanted(&self, now: Time) -> bool {
        self.pins > 0 || self.local_until.is_some_and(|t| t > now) || self.children.values().any(|&t| t > now)
    }
}

/// The result of [`InterestTable::expire`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExpiredInterests {
    /// Child interests that lapsed, sorted.
    pub children: Vec<(ServiceName, NodeId)>,
    /// Services nobody here wants any more, sorted: stop renewing them upwards and drop their cached routes.
    pub unwanted: Vec<ServiceName>,
}

/// Interests per service: children, this node's own use, and pins for hosted services.
#[derive(Debug, Clone)]
pub struct InterestTable {
    ttl: Duration,
    services: BTreeMap<ServiceName, ServiceInterest>,
}

impl InterestTable {
    /// Interests last `ttl` unless renewed.
    pub fn new(ttl: Duration) -> Self {
        InterestTable { ttl, services: BTreeMap::new() }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Registers or renews `child`'s interest in `service`; true when it is new (or had lapsed).
    pub fn register(&mut self, service: &ServiceName, child: NodeId, now: Time) -> bool {
        let entry = self.services.entry(service.clone()).or_default();
        let previous = entry.children.insert(child, now + self.ttl);
        previous.is_none_or(|until| until <= now)
    }

    /// Whether `child` currently has an interest in `service`.
    pub fn is_registered(&self, service: &ServiceName, child: NodeId, now: Time) -> bool {
        self.services.get(service).and_then(|s| s.children.get(&child)).is_some_and(|&t| t > now)
    }

    pub fn unregister(&mut self, service: &ServiceName, child: NodeId) {
        if let Some(entry) = self.services.get_mut(service) {
            entry.children.remove(&child);
        }
    }

    /// This node used the route (a lookup or a new connection); keeps the interest alive for another TTL.
    pub fn use_locally(&mut self, service: &ServiceName, now: Time) {
        self.services.entry(service.clone()).or_default().local_until = Some(now + self.ttl);
    }

    /// An instance of `service` now runs here.
    pub fn pin(&mut self, service: &ServiceName) {
        self.services.entry(service.clone()).or_default().pins += 1;
    }

    /// An instance of `service` stopped running here.
    pub fn unpin(&mut self, service: &ServiceName) {
        if let Some(entry) = self.services.get_mut(service) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }

    /// Children that must receive updates for `service`, sorted.
    pub fn recipients(&self, service: &ServiceName, now: Time) -> Vec<NodeId> {
        self.services
            .get(service)
            .map(|s| s.children.iter().filter(|&(_, &t)| t > now).map(|(&c, _)| c).collect())
            .unwrap_or_default()
    }

    /// Whether this node needs updates for `service` from its parent.
    pub fn is_wanted(&self, service: &ServiceName, now: Time) -> bool {
        self.services.get(service).is_some_and(|s| s.wanted(now))
    }

    /// Services whose interest this node must renew with its parent, sorted.
    pub fn wanted(&self, now: Time) -> Vec<&ServiceName> {
        self.services.iter().filter(|(_, s)| s.wanted(now)).map(|(n, _)| n).collect()
    }

    /// Drops lapsed interests.
    pub fn expire(&mut self, now: Time) -> ExpiredInterests {
        let mut out = ExpiredInterests::default();
        for (name, entry) in &mut self.services {
            entry.children.retain(|&child, &mut until| {
                let live = until > now;
                if !live {
                    out.children.push((name.clone(), child));
                }
                live
            });
            if entry.local_until.is_some_and(|t| t <= now) {
                entry.local_until = None;
            }
            if !entry.wanted(now) {
                out.unwanted.push(name.clone());
            }
        }
        for name in &out.unwanted {
            self.services.remove(name);
        }
        out
    }

    /// A child left or died: drops all its interests; returns the services it was interested in, sorted.
    pub fn remove_child(&mut self, child: NodeId) -> Vec<ServiceName> {
        self.services.iter_mut().filter_map(|(name, s)| s.children.remove(&child).map(|_| name.clone())).collect()
    }

    /// When the next interest lapses, for the caller's timer.
    pub fn next_expiry(&self) -> Option<Time> {
        self.services.values().flat_map(|s| s.children.values().copied().chain(s.local_until)).min()
    }
}

#[derive(Debug, Clone)]
enum Cached {
    Found { addresses: Option<ServiceAddresses>, instances: BTreeMap<u32, InstanceRecord> },
    NotFound,
}

#[derive(Debug, Clone)]
struct CacheEntry {
    route: Cached,
    expires_at: Time,
}

/// What [`RouteCache::lookup`] knows about a service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheLookup<'a> {
    /// Instances by number, and the ServiceIPs when known.
    Found { addresses: Option<&'a ServiceAddresses>, instances: &'a BTreeMap<u32, InstanceRecord> },
    /// The parent recently said the service does not exist.
    NotFound,
    /// Nothing usable: ask the parent.
    Miss,
}

/// Routes received from the parent.
#[derive(Debug, Clone)]
pub struct RouteCache {
    ttl: Duration,
    not_found_ttl: Duration,
    entries: HashMap<ServiceName, CacheEntry>,
}

impl RouteCache {
    /// Answers stay `ttl` (renewed while updates or renewals keep coming); "not found" stays `not_found_ttl`.
    pub fn new(ttl: Duration, not_found_ttl: Duration) -> Self {
        RouteCache { ttl, not_found_ttl, entries: HashMap::new() }
    }

    /// Stores the parent's answer, replacing what was cached; an empty answer counts as "not found" only when
    /// it says so ([`RouteCache::store_not_found`]).
    pub fn store(
        &mut self,
        service: &ServiceName,
        addresses: Option<ServiceAddresses>,
        instances: impl IntoIterator<Item = InstanceRecord>,
        now: Time,
    ) {
        let instances = instances.into_iter().filter(|r| r.service == *service).map(|r| (r.number, r)).collect();
        let route = Cached::Found { addresses, instances };
        self.entries.insert(service.clone(), CacheEntry { route, expires_at: now + self.ttl });
    }

    pub fn store_not_found(&mut self, service: &ServiceName, now: Time) {
        self.entries
            .insert(service.clone(), CacheEntry { route: Cached::NotFound, expires_at: now + self.not_found_ttl });
    }

    /// Applies an update pushed by the parent to a cached service (others are not tracked here and are
    /// ignored). Returns whether the cache changed.
    pub fn apply(&mut self, change: &RouteChange, now: Time) -> bool {
        let Some(entry) = self.entries.get_mut(change.service()) else {
            return false;
        };
        if matches!(entry.route, Cached::NotFound) {
            if matches!(change, RouteChange::Removed { .. }) {
                return false;
            }
            entry.route = Cached::Found { addresses: None, instances: BTreeMap::new() };
        }
        let Cached::Found { addresses, instances } = &mut entry.route else { unreachable!("set just above") };
        entry.expires_at = entry.expires_at.max(now + self.ttl);
        match change {
            RouteChange::Upsert(record) => {
                let newer = instances
                    .get(&record.number)
                    .is_none_or(|known| (known.version, known.host) < (record.version, record.host));
                if newer {
                    instances.insert(record.number, record.clone());
                }
                newer
            }
            RouteChange::Removed { number, version, .. } => {
                let known = instances.get(number).is_some_and(|r| r.version <= *version);
                if known {
                    instances.remove(number);
                }
                known
            }
            RouteChange::Addresses(new) => {
                let changed = addresses.as_ref() != Some(new);
                *addresses = Some(new.clone());
                changed
            }
        }
    }

    /// The cached route for `service`, unless it expired.
    pub fn lookup(&self, service: &ServiceName, now: Time) -> CacheLookup<'_> {
        match self.entries.get(service) {
            Some(entry) if entry.expires_at > now => match &entry.route {
                Cached::Found { addresses, instances } => {
                    CacheLookup::Found { addresses: addresses.as_ref(), instances }
                }
                Cached::NotFound => CacheLookup::NotFound,
            },
            _ => CacheLookup::Miss,
        }
    }

    /// Keeps a found route alive while the interest it rides on is renewed.
    pub fn refresh(&mut self, service: &ServiceName, now: Time) {
        if let Some(entry) = self.entries.get_mut(service)
            && matches!(entry.route, Cached::Found { .. })
        {
            entry.expires_at = entry.expires_at.max(now + self.ttl);
        }
    }

    /// Forgets one instance (a tunnel reported "route not found" for it); the next pick avoids it.
    pub fn forget_instance(&mut self, service: &ServiceName, number: u32) -> Option<InstanceRecord> {
        match &mut self.entries.get_mut(service)?.route {
            Cached::Found { instances, .. } => instances.remove(&number),
            Cached::NotFound => None,
        }
    }

    /// The cached service a ServiceIP or InstanceIP belongs to (a scan: the cache holds few services).
    pub fn service_of(&self, ip: std::net::Ipv4Addr, now: Time) -> Option<&ServiceName> {
        let matches = self.entries.iter().filter(|(_, e)| e.expires_at > now).filter(|(_, e)| match &e.route {
            Cached::Found { addresses, instances } => {
                addresses.as_ref().is_some_and(|a| a.service_ips.values().any(|&x| x == ip))
                    || instances.values().any(|r| r.instance_ip == ip)
            }
            Cached::NotFound => false,
        });
        // The smallest name, should two cached services claim one address (they should not).
        matches.map(|(name, _)| name).min()
    }

    pub fn remove(&mut self, service: &ServiceName) {
        self.entries.remove(service);
    }

    /// Drops expired entries; returns their services, sorted.
    pub fn expire(&mut self, now: Time) -> Vec<ServiceName> {
        let mut gone: Vec<ServiceName> =
            self.entries.iter().filter(|(_, e)| e.expires_at <= now).map(|(n, _)| n.clone()).collect();
        gone.sort();
        for name in &gone {
            self.entries.remove(name);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::registry::tests::record;

    const TTL: Duration = Duration::from_secs(30);

    fn secs(s: u64) -> Time {
        Duration::from_secs(s)
    }

    fn name(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    fn node(n: u64) -> NodeId {
        NodeId::from_u64(n)
    }

    #[test]
    fn child_interests_expire_unless_renewed() {
        let mut table = InterestTable::new(TTL);
        let svc = name("a.b.c.d");
        assert!(table.register(&svc, node(2), secs(0)));
        assert!(table.register(&svc, node(1), secs(10)));
        assert!(!table.register(&svc, node(2), secs(20)), "a renewal is not a new interest");
        assert_eq!(table.recipients(&svc, secs(25)), vec![node(1), node(2)]);
        assert_eq!(table.next_expiry(), Some(secs(40)));
        let expired = table.expire(secs(40));
        assert_eq!(expired.children, vec![(svc.clone(), node(1))]);
        assert!(expired.unwanted.is_empty());
        assert_eq!(table.recipients(&svc, secs(41)), vec![node(2)]);
        assert!(table.is_wanted(&svc, secs(41)));
        let expired = table.expire(secs(50));
        assert_eq!(expired.unwanted, vec![svc.clone()]);
        assert!(!table.is_wanted(&svc, secs(50)));
        assert!(table.register(&svc, node(2), secs(60)), "a lapsed interest registers anew");
    }

    #[test]
    fn local_use_and_pins_keep_the_interest_with_the_parent() {
        let mut table = InterestTable::new(TTL);
        let (used, hosted) = (name("u.u.u.u"), name("h.h.h.h"));
        table.use_locally(&used, secs(0));
        table.pin(&hosted);
        assert_eq!(table.wanted(secs(1)), vec![&hosted, &used]);
        assert!(table.recipients(&hosted, secs(1)).is_empty());
        let expired = table.expire(secs(1000));
        assert_eq!(expired.unwanted, vec![used.clone()]);
        assert!(table.is_wanted(&hosted, secs(1000)), "a hosted service never lapses");
        table.unpin(&hosted);
        assert_eq!(table.expire(secs(1000)).unwanted, vec![hosted]);
        assert!(table.wanted(secs(1000)).is_empty());
    }

    #[test]
    fn a_lost_child_loses_its_interests() {
        let mut table = InterestTable::new(TTL);
        table.register(&name("a.a.a.a"), node(1), secs(0));
        table.register(&name("b.b.b.b"), node(1), secs(0));
        table.register(&name("b.b.b.b"), node(2), secs(0));
        assert_eq!(table.remove_child(node(1)), vec![name("a.a.a.a"), name("b.b.b.b")]);
        assert!(!table.is_registered(&name("b.b.b.b"), node(1), secs(1)));
        assert!(table.is_registered(&name("b.b.b.b"), node(2), secs(1)));
    }

    #[test]
    fn the_cache_serves_answers_until_they_expire_and_applies_updates_in_version_order() {
        let mut cache = RouteCache::new(TTL, secs(5));
        let svc = name("a.b.c.d");
        assert_eq!(cache.lookup(&svc, secs(0)), CacheLookup::Miss);
        cache.store(&svc, None, [record("a.b.c.d", 0, 1, 1), record("x.x.x.x", 0, 1, 1)], secs(0));
        let CacheLookup::Found { instances, .. } = cache.lookup(&svc, secs(1)) else { panic!("stored") };
        assert_eq!(instances.keys().copied().collect::<Vec<_>>(), vec![0], "records of other services are dropped");

        assert!(cache.apply(&RouteChange::Upsert(record("a.b.c.d", 1, 2, 1)), secs(20)));
        assert!(!cache.apply(&RouteChange::Upsert(record("a.b.c.d", 1, 2, 0)), secs(20)), "older version");
        assert!(!cache.apply(&RouteChange::Upsert(record("x.x.x.x", 1, 2, 1)), secs(20)), "untracked service");
        let removal = RouteChange::Removed { service: svc.clone(), number: 0, version: 1 };
        assert!(cache.apply(&removal, secs(20)));
        let CacheLookup::Found { instances, .. } = cache.lookup(&svc, secs(49)) else { panic!("updates renew") };
        assert_eq!(instances.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(cache.lookup(&svc, secs(50)), CacheLookup::Miss);
        cache.refresh(&svc, secs(45));
        assert!(matches!(cache.lookup(&svc, secs(70)), CacheLookup::Found { .. }));
        assert!(cache.forget_instance(&svc, 1).is_some());
        assert_eq!(cache.expire(secs(75)), vec![svc]);
        assert!(cache.is_empty());
    }

    #[test]
    fn not_found_is_cached_briefly_and_replaced_by_a_pushed_instance() {
        let mut cache = RouteCache::new(TTL, secs(5));
        let svc = name("a.b.c.d");
        cache.store_not_found(&svc, secs(0));
        assert_eq!(cache.lookup(&svc, secs(4)), CacheLookup::NotFound);
        assert_eq!(cache.lookup(&svc, secs(5)), CacheLookup::Miss);
        cache.store_not_found(&svc, secs(10));
        cache.refresh(&svc, secs(12));
        assert_eq!(cache.lookup(&svc, secs(15)), CacheLookup::Miss, "refresh does not extend a negative answer");
        cache.store_not_found(&svc, secs(20));
        assert!(cache.apply(&RouteChange::Upsert(record("a.b.c.d", 0, 1, 1)), secs(21)));
        assert!(matches!(cache.lookup(&svc, secs(22)), CacheLookup::Found { .. }));
    }
}
