//! Instance records and the index a coordinator keeps of its subtree.
//!
//! A machine publishes a record for every instance it hosts; records travel up the tree and every coordinator
//! indexes those of its subtree (the root knows all). Each record carries a version: the hosting machine bumps it
//! on every change, and a migration's new host starts above the old host's version, so a late or duplicated
//! update never overwrites a newer one. Explicit removals leave a tombstone for a while so that a reordered older
//! update cannot bring a removed instance back.

use super::name::ServiceName;
use super::service_ips::ServiceAddresses;
use crate::{NodeId, Time};
use canopy_policies::{Capacity, Position};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// One running instance of a service and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub service: ServiceName,
    /// Ordinal within the service (seed 002, section 3.6.2).
    pub number: u32,
    /// Stable address of this instance (from the ServiceIP range).
    pub instance_ip: Ipv4Addr,
    /// Real address inside the hosting machine's subnet; changes when the instance moves.
    pub namespace_ip: Ipv4Addr,
    pub host: NodeId,
    /// Where the host's tunnel listens (public and local addresses).
    pub tunnel: Vec<SocketAddr>,
    pub position: Position,
    /// Free capacity of the host, for the capacity-aware policies.
    pub free: Capacity,
    /// Orders updates of the same instance; higher wins, then the larger host id.
    pub version: u64,
}

impl InstanceRecord {
    fn precedence(&self) -> (u64, NodeId) {
        (self.version, self.host)
    }
}

/// An update to a route, as it travels up to the root and down to interested children.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RouteChange {
    /// An instance appeared or changed (moved, new capacity, new tunnel address).
    Upsert(InstanceRecord),
    /// An instance is gone. `version` is the last version it had (or the removal's own version).
    Removed { service: ServiceName, number: u32, version: u64 },
    /// The service's ServiceIPs (set at deployment, changed by a partition merge).
    Addresses(ServiceAddresses),
}

impl RouteChange {
    pub fn service(&self) -> &ServiceName {
        match self {
            RouteChange::Upsert(r) => &r.service,
            RouteChange::Removed { service, .. } => service,
            RouteChange::Addresses(a) => &a.name,
        }
    }
}

/// How this node learned a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// Hosted here.
    Local,
    /// Reported by this child (from somewhere in its subtree).
    Child(NodeId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertOutcome {
    Added,
    Updated,
    /// Same version already known.
    Unchanged,
    /// Older than what is known or than a removal; ignored.
    Stale,
}

#[derive(Debug, Clone)]
struct Entry {
    record: InstanceRecord,
    via: Via,
}

#[derive(Debug, Clone, Default)]
struct ServiceEntry {
    addresses: Option<ServiceAddresses>,
    instances: BTreeMap<u32, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Tombstone {
    version: u64,
    until: Time,
}

/// The instances of a subtree, indexed by service.
#[derive(Debug, Clone)]
pub struct Registry {
    services: HashMap<ServiceName, ServiceEntry>,
    /// InstanceIPs and ServiceIPs to what they name, for queries by address.
    by_ip: HashMap<Ipv4Addr, ServiceName>,
    tombstones: HashMap<(ServiceName, u32), Tombstone>,
    tombstone_ttl: Duration,
}

impl Registry {
    /// Removals are remembered for `tombstone_ttl` (longer than updates can be delayed in transit).
    pub fn new(tombstone_ttl: Duration) -> Self {
        Registry { services: HashMap::new(), by_ip: HashMap::new(), tombstones: HashMap::new(), tombstone_ttl }
    }

    /// Adds or updates a record learned `via` a child or hosted locally.
    pub fn upsert(&mut self, record: InstanceRecord, via: Via, now: Time) -> UpsertOutcome {
        // Most upserts meet no tombstone; skip building the key then.
        if !self.tombstones.is_empty() {
            let tomb_key = (record.service.clone(), record.number);
            if let Some(t) = self.tombstones.get(&tomb_key) {
                if t.until > now && record.version <= t.version {
                    return UpsertOutcome::Stale;
                }
                self.tombstones.remove(&tomb_key);
            }
        }
        let service = self.services.entry(record.service.clone()).or_default();
        let outcome = match service.instances.get(&record.number) {
            None => UpsertOutcome::Added,
            Some(known) if known.record.precedence() > record.precedence() => return UpsertOutcome::Stale,
            Some(known) if known.record.precedence() == record.precedence() && known.via == via => {
                return UpsertOutcome::Unchanged;
            }
            Some(_) => UpsertOutcome::Updated,
        };
        if let Some(old) = service.instances.get(&record.number)
            && old.record.instance_ip != record.instance_ip
        {
            self.by_ip.remove(&old.record.instance_ip);
        }
        self.by_ip.insert(record.instance_ip, record.service.clone());
        service.instances.insert(record.number, Entry { record, via });
        outcome
    }

    /// Removes an instance unless a newer version is known; remembers the removal for the tombstone TTL.
    pub fn remove(&mut self, service: &ServiceName, number: u32, version: u64, now: Time) -> Option<InstanceRecord> {
        let key = (service.clone(), number);
        let tomb = self.tombstones.entry(key).or_insert(Tombstone { version, until: now + self.tombstone_ttl });
        tomb.version = tomb.version.max(version);
        tomb.until = now + self.tombstone_ttl;
        let entry = self.services.get_mut(service)?;
        if entry.instances.get(&number)?.record.version > version {
            return None;
        }
        let removed = entry.instances.remove(&number).map(|e| e.record);
        if let Some(r) = &removed {
            self.by_ip.remove(&r.instance_ip);
        }
        self.drop_if_empty(service);
        removed
    }

    /// Removes an instance only if it was learned `via` that path, without a tombstone: a lost subtree's records
    /// may be on their way up again through another path (the subtree re-attached elsewhere).
    pub fn remove_if_via(&mut self, service: &ServiceName, number: u32, via: Via) -> Option<InstanceRecord> {
        let entry = self.services.get_mut(service)?;
        if entry.instances.get(&number)?.via != via {
            return None;
        }
        let removed = entry.instances.remove(&number).map(|e| e.record);
        if let Some(r) = &removed {
            self.by_ip.remove(&r.instance_ip);
        }
        self.drop_if_empty(service);
        removed
    }

    /// Applies a change from a child (or from this node) and returns what to pass on, if anything changed.
    pub fn apply(&mut self, change: RouteChange, via: Via, now: Time) -> Option<RouteChange> {
        match change {
            RouteChange::Upsert(record) => match self.upsert(record.clone(), via, now) {
                UpsertOutcome::Added | UpsertOutcome::Updated => Some(RouteChange::Upsert(record)),
                UpsertOutcome::Unchanged | UpsertOutcome::Stale => None,
            },
            RouteChange::Removed { service, number, version } => {
                let record = self.remove(&service, number, version, now)?;
                Some(RouteChange::Removed { service, number, version: record.version.max(version) })
            }
            RouteChange::Addresses(addresses) => {
                self.set_addresses(addresses.clone()).then_some(RouteChange::Addresses(addresses))
            }
        }
    }

    /// Records a service's ServiceIPs; false when they were already known.
    pub fn set_addresses(&mut self, addresses: ServiceAddresses) -> bool {
        let entry = self.services.entry(addresses.name.clone()).or_default();
        if entry.addresses.as_ref() == Some(&addresses) {
            return false;
        }
        if let Some(old) = entry.addresses.take() {
            for ip in old.service_ips.values() {
                self.by_ip.remove(ip);
            }
        }
        for &ip in addresses.service_ips.values() {
            self.by_ip.insert(ip, addresses.name.clone());
        }
        entry.addresses = Some(addresses);
        true
    }

    pub fn addresses(&self, service: &ServiceName) -> Option<&ServiceAddresses> {
        self.services.get(service)?.addresses.as_ref()
    }

    /// The service a ServiceIP or InstanceIP belongs to, as far as this index knows.
    pub fn service_of(&self, ip: Ipv4Addr) -> Option<&ServiceName> {
        self.by_ip.get(&ip)
    }

    /// Instances of `service`, by instance number.
    pub fn instances(&self, service: &ServiceName) -> impl Iterator<Item = &InstanceRecord> {
        self.services.get(service).into_iter().flat_map(|s| s.instances.values().map(|e| &e.record))
    }

    pub fn instance(&self, service: &ServiceName, number: u32) -> Option<&InstanceRecord> {
        Some(&self.services.get(service)?.instances.get(&number)?.record)
    }

    pub fn has_instances(&self, service: &ServiceName) -> bool {
        self.services.get(service).is_some_and(|s| !s.instances.is_empty())
    }

    /// Whether an instance of `service` runs on this node (its interest must stay).
    pub fn hosted_locally(&self, service: &ServiceName) -> bool {
        self.services.get(service).is_some_and(|s| s.instances.values().any(|e| e.via == Via::Local))
    }

    /// Services with at least one instance, sorted.
    pub fn services(&self) -> Vec<&ServiceName> {
        let mut names: Vec<&ServiceName> =
            self.services.iter().filter(|(_, s)| !s.instances.is_empty()).map(|(n, _)| n).collect();
        names.sort();
        names
    }

    /// Number of instance records.
    pub fn len(&self) -> usize {
        self.services.values().map(|s| s.instances.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A machine was lost: drops every instance it hosted. Returns the removals to pass on, sorted.
    pub fn remove_host(&mut self, host: NodeId) -> Vec<RouteChange> {
        self.remove_where(|e| e.record.host == host)
    }

    /// A child's subtree was lost: drops every instance learned through it. Returns the removals, sorted.
    pub fn remove_via(&mut self, child: NodeId) -> Vec<RouteChange> {
        self.remove_where(|e| e.via == Via::Child(child))
    }

    fn remove_where(&mut self, doomed: impl Fn(&Entry) -> bool) -> Vec<RouteChange> {
        let mut removed = Vec::new();
        for entry in self.services.values_mut() {
            entry.instances.retain(|_, e| {
                if doomed(e) {
                    removed.push(e.record.clone());
                    false
                } else {
                    true
                }
            });
        }
        removed.sort_by(|a, b| (&a.service, a.number).cmp(&(&b.service, b.number)));
        let changes = removed
            .into_iter()
            .map(|r| {
                self.by_ip.remove(&r.instance_ip);
                RouteChange::Removed { service: r.service, number: r.number, version: r.version }
            })
            .collect();
        let empty: Vec<ServiceName> = self
            .services
            .iter()
            .filter(|(_, s)| s.instances.is_empty() && s.addresses.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in empty {
            self.services.remove(&name);
        }
        changes
    }

    fn drop_if_empty(&mut self, service: &ServiceName) {
        if self.services.get(service).is_some_and(|s| s.instances.is_empty() && s.addresses.is_none()) {
            self.services.remove(service);
        }
    }

    /// Forgets removals older than the tombstone TTL.
    /// Whether any tombstone waits to expire.
    pub fn has_tombstones(&self) -> bool {
        !self.tombstones.is_empty()
    }

    pub fn expire(&mut self, now: Time) {
        self.tombstones.retain(|_, t| t.until > now);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::routes::PolicyKind;

    pub(crate) fn record(service: &str, number: u32, host: u64, version: u64) -> InstanceRecord {
        InstanceRecord {
            service: service.parse().unwrap(),
            number,
            instance_ip: Ipv4Addr::new(10, 30, 1, number as u8),
            namespace_ip: Ipv4Addr::new(10, 16, host as u8, 2),
            host: NodeId::from_u64(host),
            tunnel: vec!["192.0.2.1:50103".parse().unwrap()],
            position: Position::new(48.1, 11.6),
            free: Capacity::new(2.0, 1024.0, 100.0),
            version,
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    fn secs(s: u64) -> Time {
        Duration::from_secs(s)
    }

    fn name(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    #[test]
    fn records_are_indexed_by_service_and_ordered_by_version() {
        let mut reg = Registry::new(TTL);
        let child = Via::Child(NodeId::from_u64(9));
        assert_eq!(reg.upsert(record("a.b.c.d", 1, 1, 1), child, secs(0)), UpsertOutcome::Added);
        assert_eq!(reg.upsert(record("a.b.c.d", 0, 2, 1), Via::Local, secs(0)), UpsertOutcome::Added);
        assert_eq!(reg.upsert(record("a.b.c.d", 1, 1, 1), child, secs(0)), UpsertOutcome::Unchanged);
        assert_eq!(reg.upsert(record("a.b.c.d", 1, 1, 0), child, secs(0)), UpsertOutcome::Stale);
        // The instance moved to host 3 with a newer version.
        assert_eq!(reg.upsert(record("a.b.c.d", 1, 3, 2), child, secs(0)), UpsertOutcome::Updated);
        let numbers: Vec<(u32, NodeId)> = reg.instances(&name("a.b.c.d")).map(|r| (r.number, r.host)).collect();
        assert_eq!(numbers, vec![(0, NodeId::from_u64(2)), (1, NodeId::from_u64(3))]);
        assert!(reg.hosted_locally(&name("a.b.c.d")));
        assert_eq!(reg.service_of(Ipv4Addr::new(10, 30, 1, 1)), Some(&name("a.b.c.d")));
        assert_eq!(reg.instances(&name("x.x.x.x")).count(), 0);
    }

    #[test]
    fn removals_win_over_late_older_updates_until_the_tombstone_expires() {
        let mut reg = Registry::new(TTL);
        let svc = name("a.b.c.d");
        reg.upsert(record("a.b.c.d", 0, 1, 3), Via::Local, secs(0));
        assert!(reg.remove(&svc, 0, 2, secs(1)).is_none(), "an older removal does not remove a newer record");
        assert!(reg.remove(&svc, 0, 3, secs(1)).is_some());
        assert_eq!(reg.upsert(record("a.b.c.d", 0, 1, 3), Via::Local, secs(2)), UpsertOutcome::Stale);
        assert_eq!(reg.upsert(record("a.b.c.d", 0, 1, 4), Via::Local, secs(2)), UpsertOutcome::Added);
        reg.remove(&svc, 0, 4, secs(3));
        reg.expire(secs(3) + TTL);
        assert_eq!(reg.upsert(record("a.b.c.d", 0, 1, 1), Via::Local, secs(70)), UpsertOutcome::Added);
        assert_eq!(reg.service_of(Ipv4Addr::new(10, 30, 1, 0)), Some(&svc));
    }

    #[test]
    fn losing_a_machine_or_a_subtree_removes_its_instances() {
        let mut reg = Registry::new(TTL);
        let (c1, c2) = (NodeId::from_u64(100), NodeId::from_u64(200));
        reg.upsert(record("a.b.c.d", 0, 1, 1), Via::Child(c1), secs(0));
        reg.upsert(record("a.b.c.d", 1, 2, 1), Via::Child(c1), secs(0));
        reg.upsert(record("x.y.z.w", 0, 1, 1), Via::Child(c1), secs(0));
        reg.upsert(record("x.y.z.w", 1, 3, 1), Via::Child(c2), secs(0));
        let gone = reg.remove_host(NodeId::from_u64(1));
        assert_eq!(
            gone,
            vec![
                RouteChange::Removed { service: name("a.b.c.d"), number: 0, version: 1 },
                RouteChange::Removed { service: name("x.y.z.w"), number: 0, version: 1 },
            ]
        );
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.remove_via(c1).len(), 1);
        assert_eq!(reg.services(), vec![&name("x.y.z.w")]);
        assert_eq!(reg.remove_via(c2).len(), 1);
        assert!(reg.is_empty());
        assert_eq!(reg.service_of(Ipv4Addr::new(10, 30, 1, 1)), None);
    }

    #[test]
    fn apply_passes_on_only_real_changes_and_indexes_service_ips() {
        let mut reg = Registry::new(TTL);
        let via = Via::Child(NodeId::from_u64(5));
        let up = RouteChange::Upsert(record("a.b.c.d", 0, 1, 1));
        assert_eq!(reg.apply(up.clone(), via, secs(0)), Some(up.clone()));
        assert_eq!(reg.apply(up, via, secs(0)), None);
        let addrs = ServiceAddresses {
            name: name("a.b.c.d"),
            service_ips: BTreeMap::from([(PolicyKind::Rr, Ipv4Addr::new(10, 30, 9, 9))]),
        };
        assert!(reg.apply(RouteChange::Addresses(addrs.clone()), via, secs(0)).is_some());
        assert!(reg.apply(RouteChange::Addresses(addrs.clone()), via, secs(0)).is_none());
        assert_eq!(reg.service_of(Ipv4Addr::new(10, 30, 9, 9)), Some(&name("a.b.c.d")));
        assert_eq!(reg.addresses(&name("a.b.c.d")), Some(&addrs));
        let rm = RouteChange::Removed { service: name("a.b.c.d"), number: 0, version: 1 };
        assert_eq!(reg.apply(rm.clone(), via, secs(1)), Some(rm.clone()));
        assert_eq!(reg.apply(rm, via, secs(1)), None);
        // The ServiceIPs outlive the instances: a query by ServiceIP still finds the service.
        assert_eq!(reg.service_of(Ipv4Addr::new(10, 30, 9, 9)), Some(&name("a.b.c.d")));
    }

    proptest::proptest! {
        /// Updates may arrive in any order (within the tombstone TTL): the index ends up the same, holding for
        /// each instance the upsert with the highest (version, host) unless a removal at that version or later
        /// came.
        #[test]
        fn updates_converge_whatever_their_order(
            updates in proptest::collection::vec((0..3u32, 0..4u64, 1..3u64, proptest::bool::weighted(0.3)), 0..24),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let changes: Vec<RouteChange> = updates.iter().map(|&(number, version, host, removal)| if removal {
                RouteChange::Removed { service: name("a.b.c.d"), number, version }
            } else {
                RouteChange::Upsert(record("a.b.c.d", number, host, version))
            }).collect();
            let mut shuffled = changes.clone();
            // A deterministic shuffle from the seed (Fisher-Yates with a xorshift).
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let run = |changes: &[RouteChange]| {
                let mut reg = Registry::new(TTL);
                for c in changes {
                    reg.apply(c.clone(), Via::Local, secs(0));
                }
                reg.instances(&name("a.b.c.d")).cloned().collect::<Vec<_>>()
            };
            let result = run(&changes);
            proptest::prop_assert_eq!(&result, &run(&shuffled));
            for number in 0..3u32 {
                let best = changes.iter().filter_map(|c| match c {
                    RouteChange::Upsert(r) if r.number == number => Some(r),
                    _ => None,
                }).max_by_key(|r| (r.version, r.host));
                let removed_at = changes.iter().filter_map(|c| match c {
                    RouteChange::Removed { number: n, version, .. } if *n == number => Some(*version),
                    _ => None,
                }).max();
                let expected = best.filter(|r| removed_at.is_none_or(|v| r.version > v));
                proptest::prop_assert_eq!(result.iter().find(|r| r.number == number), expected);
            }
        }
    }

    #[test]
    fn records_round_trip_through_cbor() {
        let change = RouteChange::Upsert(record("a.b.c.d", 3, 1, 7));
        let mut buf = Vec::new();
        ciborium::into_writer(&change, &mut buf).unwrap();
        assert_eq!(ciborium::from_reader::<RouteChange, _>(&buf[..]).unwrap(), change);
    }
}
