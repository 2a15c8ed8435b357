//! What a node does with a route query (seed 002, section 3.6.6, "table query"), from a child or from itself:
//!
//! 1. known here (own subtree's index or the parent's cached answer): answer at once with the `k` most relevant
//!    instances per policy for the asker ("fast resolution") and register the asker's interest; also ask the
//!    parent when this node does not ride on a parent interest for the service yet, since instances outside the
//!    subtree exist only up there;
//! 2. unknown and this node is the root, or the parent said "not found" moments ago: not found, and no interest
//!    is registered;
//! 3. otherwise: register the asker's interest and ask the parent; its answer goes to every interested child.

use super::interest::{CacheLookup, InterestTable, RouteCache};
use super::name::ServiceName;
use super::registry::{InstanceRecord, Registry, Via};
use super::service_ips::ServiceAddresses;
use crate::Time;
use canopy_policies::{Candidate, Position};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// What a query asks for: a service by name (from the resolver) or by a ServiceIP/InstanceIP (from the proxy).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QueryKey {
    Name(ServiceName),
    Address(Ipv4Addr),
}

/// The route for one service, pruned for the node it is sent to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryAnswer {
    pub service: ServiceName,
    /// The service's ServiceIPs, when known.
    pub addresses: Option<ServiceAddresses>,
    /// At most `k` per policy, sorted by instance number; empty when the service exists but has no instance.
    pub instances: Vec<InstanceRecord>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum QueryDecision {
    /// Answer the asker now; also query the parent when `ask_parent`.
    Answer { answer: QueryAnswer, ask_parent: bool },
    /// Nothing known here: query the parent (the asker's interest is registered when the name is known; for a
    /// query by address it is registered when the parent's answer names the service).
    AskParent,
    /// The service does not exist (as far as the root, or a recent answer from the parent, knows).
    NotFound,
}

/// Decides what to do with `key` asked by `asker` (this node itself or a child at position `viewer`), keeping at
/// most `k` instances per policy in the answer.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    registry: &Registry,
    cache: &RouteCache,
    interests: &mut InterestTable,
    asker: Via,
    key: &QueryKey,
    viewer: Position,
    k: usize,
    is_root: bool,
    now: Time,
) -> QueryDecision {
    let service = match key {
        QueryKey::Name(name) => Some(name.clone()),
        QueryKey::Address(ip) => registry.service_of(*ip).or_else(|| cache.service_of(*ip, now)).cloned(),
    };
    let Some(service) = service else {
        return if is_root { QueryDecision::NotFound } else { QueryDecision::AskParent };
    };
    let rides_on_parent = interests.is_wanted(&service, now);
    let cached = cache.lookup(&service, now);

    let mut instances: BTreeMap<u32, &InstanceRecord> = BTreeMap::new();
    let mut addresses = registry.addresses(&service);
    if let CacheLookup::Found { addresses: cached_addresses, instances: cached_instances } = cached {
        addresses = addresses.or(cached_addresses);
        instances.extend(cached_instances.iter().map(|(&n, r)| (n, r)));
    }
    for record in registry.instances(&service) {
        let newer = instances
            .get(&record.number)
            .is_none_or(|known| (known.version, known.host) < (record.version, record.host));
        if newer {
            instances.insert(record.number, record);
        }
    }

    let known = addresses.is_some() || !instances.is_empty();
    if !known && (is_root || cached == CacheLookup::NotFound) {
        return QueryDecision::NotFound;
    }
    match asker {
        Via::Child(child) => {
            interests.register(&service, child, now);
        }
        Via::Local => interests.use_locally(&service, now),
    }
    if !known {
        return QueryDecision::AskParent;
    }
    let records: Vec<InstanceRecord> = instances.into_values().cloned().collect();
    let mut kept = prune_for_child(&records, k, viewer);
    // Asked for one instance by its InstanceIP: that one is in the answer even when it is not among the k.
    if let QueryKey::Address(ip) = key
        && let Some(addressed) = records.iter().find(|r| r.instance_ip == *ip)
        && !kept.iter().any(|r| r.number == addressed.number)
    {
        kept.push(addressed.clone());
        kept.sort_by_key(|r| r.number);
    }
    let answer = QueryAnswer { service, addresses: addresses.cloned(), instances: kept };
    // Without the ServiceIPs (a coordinator that indexes its subtree's instances but was never told the addresses)
    // the answer is incomplete: the parent completes it.
    let incomplete = answer.addresses.is_none();
    let ask_parent = !is_root && (incomplete || !rides_on_parent && !matches!(cached, CacheLookup::Found { .. }));
    QueryDecision::Answer { answer, ask_parent }
}

/// The instances worth sending to a node at `viewer`: the `k` most relevant per policy (see
/// [`canopy_policies::prune`]), sorted by instance number.
pub fn prune_for_child(records: &[InstanceRecord], k: usize, viewer: Position) -> Vec<InstanceRecord> {
    let candidates: Vec<Candidate> = records
        .iter()
        .map(|r| Candidate { instance: r.number, position: r.position, free: r.free, coord: None })
        .collect();
    let mut kept: Vec<InstanceRecord> =
        canopy_policies::prune(&candidates, k, viewer).into_iter().map(|i| records[i].clone()).collect();
    kept.sort_by_key(|r| r.number);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;
    use crate::routes::PolicyKind;
    use crate::routes::registry::tests::record;
    use std::time::Duration;

    const TTL: Duration = Duration::from_secs(30);

    fn secs(s: u64) -> Time {
        Duration::from_secs(s)
    }

    fn name(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    struct Coordinator {
        registry: Registry,
        cache: RouteCache,
        interests: InterestTable,
        is_root: bool,
    }

    impl Coordinator {
        fn new(is_root: bool) -> Self {
            Coordinator {
                registry: Registry::new(TTL),
                cache: RouteCache::new(TTL, secs(5)),
                interests: InterestTable::new(TTL),
                is_root,
            }
        }

        fn query(&mut self, asker: Via, key: QueryKey, now: Time) -> QueryDecision {
            let viewer = Position::new(48.0, 11.0);
            decide(&self.registry, &self.cache, &mut self.interests, asker, &key, viewer, 3, self.is_root, now)
        }
    }

    fn child(n: u64) -> Via {
        Via::Child(NodeId::from_u64(n))
    }

    #[test]
    fn the_root_answers_or_says_not_found_without_registering() {
        let mut root = Coordinator::new(true);
        let svc = name("a.b.c.d");
        assert_eq!(root.query(child(1), QueryKey::Name(svc.clone()), secs(0)), QueryDecision::NotFound);
        assert!(!root.interests.is_wanted(&svc, secs(0)));
        root.registry.upsert(record("a.b.c.d", 0, 7, 1), child(2), secs(0));
        let QueryDecision::Answer { answer, ask_parent } = root.query(child(1), QueryKey::Name(svc.clone()), secs(1))
        else {
            panic!("the root knows the service")
        };
        assert!(!ask_parent);
        assert_eq!(answer.instances.len(), 1);
        assert_eq!(root.interests.recipients(&svc, secs(1)), vec![NodeId::from_u64(1)]);
        // By InstanceIP too.
        let by_ip = root.query(child(3), QueryKey::Address("10.30.1.0".parse().unwrap()), secs(1));
        assert!(matches!(by_ip, QueryDecision::Answer { .. }));
        assert_eq!(
            root.query(child(3), QueryKey::Address("10.30.7.7".parse().unwrap()), secs(1)),
            QueryDecision::NotFound
        );
    }

    #[test]
    fn a_coordinator_answers_from_its_subtree_and_still_asks_up_once() {
        let mut coord = Coordinator::new(false);
        let svc = name("a.b.c.d");
        coord.registry.upsert(record("a.b.c.d", 0, 7, 1), child(2), secs(0));
        // Instances of its subtree but not the ServiceIPs: the answer is incomplete, so the parent is asked too.
        let incomplete = coord.query(child(1), QueryKey::Name(svc.clone()), secs(0));
        assert!(
            matches!(&incomplete, QueryDecision::Answer { ask_parent: true, answer } if answer.addresses.is_none()),
            "{incomplete:?}"
        );
        let again = coord.query(child(1), QueryKey::Name(svc.clone()), secs(0));
        assert!(matches!(again, QueryDecision::Answer { ask_parent: true, .. }), "{again:?}");
        let addresses = ServiceAddresses { name: svc.clone(), service_ips: BTreeMap::new() };
        let mut coord = Coordinator::new(false);
        coord.registry.upsert(record("a.b.c.d", 0, 7, 1), child(2), secs(0));
        coord.registry.set_addresses(addresses);
        let first = coord.query(child(1), QueryKey::Name(svc.clone()), secs(0));
        assert!(matches!(first, QueryDecision::Answer { ask_parent: true, .. }), "{first:?}");
        // Its interest now rides on the parent: later queries are answered locally only.
        let second = coord.query(child(3), QueryKey::Name(svc.clone()), secs(1));
        assert!(matches!(second, QueryDecision::Answer { ask_parent: false, .. }), "{second:?}");
        assert_eq!(coord.interests.recipients(&svc, secs(1)), vec![NodeId::from_u64(1), NodeId::from_u64(3)]);
    }

    #[test]
    fn unknown_services_go_up_and_cached_answers_come_back_down() {
        let mut coord = Coordinator::new(false);
        let svc = name("a.b.c.d");
        assert_eq!(coord.query(child(1), QueryKey::Name(svc.clone()), secs(0)), QueryDecision::AskParent);
        assert!(coord.interests.is_registered(&svc, NodeId::from_u64(1), secs(0)));
        // A query by an address nobody here knows goes up too, without an interest yet.
        assert_eq!(
            coord.query(child(1), QueryKey::Address("10.30.3.3".parse().unwrap()), secs(0)),
            QueryDecision::AskParent
        );
        let addrs = ServiceAddresses {
            name: svc.clone(),
            service_ips: BTreeMap::from([(PolicyKind::Rr, "10.30.3.3".parse().unwrap())]),
        };
        coord.cache.store(&svc, Some(addrs.clone()), [record("a.b.c.d", 4, 9, 1)], secs(1));
        let QueryDecision::Answer { answer, ask_parent: false } =
            coord.query(child(2), QueryKey::Address("10.30.3.3".parse().unwrap()), secs(2))
        else {
            panic!("cached")
        };
        assert_eq!(answer.addresses, Some(addrs));
        assert_eq!(answer.instances[0].number, 4);
        // The parent said "not found": that answer holds briefly, then the node asks again.
        let other = name("x.x.x.x");
        coord.cache.store_not_found(&other, secs(10));
        assert_eq!(coord.query(child(1), QueryKey::Name(other.clone()), secs(11)), QueryDecision::NotFound);
        assert_eq!(coord.query(child(1), QueryKey::Name(other), secs(16)), QueryDecision::AskParent);
    }

    #[test]
    fn newer_subtree_records_beat_older_cached_ones() {
        let mut coord = Coordinator::new(false);
        let svc = name("a.b.c.d");
        coord.cache.store(&svc, None, [record("a.b.c.d", 0, 1, 1)], secs(0));
        coord.registry.upsert(record("a.b.c.d", 0, 2, 5), child(2), secs(0));
        let QueryDecision::Answer { answer, .. } = coord.query(Via::Local, QueryKey::Name(svc.clone()), secs(1)) else {
            panic!("known")
        };
        assert_eq!(answer.instances[0].host, NodeId::from_u64(2));
        assert!(coord.interests.is_wanted(&svc, secs(1)), "local use keeps the interest");
    }

    #[test]
    fn answers_are_pruned_to_k_per_policy_nearest_first() {
        // 20 instances spread east of the viewer; k = 3 keeps the nearest for the geographic policies plus at
        // most 3 more each for rr and hc.
        let records: Vec<InstanceRecord> = (0..20)
            .map(|i| {
                let mut r = record("a.b.c.d", i, u64::from(i), 1);
                r.position = Position::new(48.0, 11.0 + f64::from(i));
                r
            })
            .collect();
        let kept = prune_for_child(&records, 3, Position::new(48.0, 11.0));
        assert!(kept.len() >= 3 && kept.len() <= 9, "{}", kept.len());
        for nearest in 0..3 {
            assert!(kept.iter().any(|r| r.number == nearest), "instance {nearest} is among the closest");
        }
        assert!(kept.windows(2).all(|w| w[0].number < w[1].number));
        assert_eq!(prune_for_child(&records[..2], 3, Position::new(0.0, 0.0)).len(), 2);
    }

    /// A query by InstanceIP is for that instance: it is in the answer even when pruning would leave it out.
    #[test]
    fn a_query_by_instance_ip_answers_with_that_instance() {
        let mut root = Coordinator::new(true);
        let far = |i: u32| {
            let mut r = record("a.b.c.d", i, u64::from(i), 1);
            r.position = Position::new(48.0, 11.0 + f64::from(i));
            r
        };
        for i in 0..20 {
            root.registry.upsert(far(i), child(100 + u64::from(i)), secs(0));
        }
        let by_name = root.query(Via::Local, QueryKey::Name(name("a.b.c.d")), secs(1));
        let QueryDecision::Answer { answer, .. } = by_name else { panic!("known") };
        assert!(!answer.instances.iter().any(|r| r.number == 19), "the farthest is pruned from a name answer");
        let by_address = root.query(Via::Local, QueryKey::Address(far(19).instance_ip), secs(1));
        let QueryDecision::Answer { answer, .. } = by_address else { panic!("known") };
        assert!(answer.instances.iter().any(|r| r.number == 19), "asked for by its InstanceIP");
        assert!(answer.instances.windows(2).all(|w| w[0].number < w[1].number));
    }
}
