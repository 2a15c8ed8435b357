//! The pure building blocks of routes and addresses: service names, subnet grants, ServiceIP/InstanceIP
//! allocation, the instance registry, interests and the route cache, and a coordinator's answer to a route query.
//!
//! Everything here is plain data with methods; time comes in as `now` ([`crate::Time`]) where expiry matters, and
//! nothing does I/O. Types that travel between nodes are serde types. Outputs whose order matters are sorted, so
//! two nodes fed the same inputs produce the same results.
//!
//! - [`name`]: [`ServiceName`] (`app.appns.svc.svcns`) and [`DnsTarget`] (full DNS names under a domain);
//! - [`pool`]: [`AddressPool`], aligned subnet grants with leases, inheritance and overlap resolution;
//! - [`service_ips`]: [`ServiceIpAllocator`], the root's ServiceIP/InstanceIP allocator and its partition merge;
//! - [`registry`]: [`InstanceRecord`] and [`Registry`], the index of a subtree's instances;
//! - [`interest`]: [`InterestTable`] (who gets which updates) and [`RouteCache`] (answers from the parent);
//! - [`query`]: what a coordinator does with a route query, and the pruning of answers to `k` per policy.

pub mod interest;
pub mod name;
pub mod pool;
pub mod query;
pub mod registry;
pub mod service_ips;

pub use canopy_policies::PolicyKind;
pub use interest::{CacheLookup, ExpiredInterests, InterestTable, RouteCache};
pub use name::{DnsTarget, NameError, ServiceDomain, ServiceName};
pub use pool::{AddressPool, Grant, GrantInfo, OverlapResolution, PoolError, PoolState, Renumbered, resolve_overlaps};
pub use query::{QueryAnswer, QueryDecision, QueryKey, decide, prune_for_child};
pub use registry::{InstanceRecord, Registry, RouteChange, UpsertOutcome, Via};
pub use service_ips::{
    AddressKey, AddressRequest, AllocError, AllocatorState, Assignment, InstanceRange, MergeReport, Moved, Origin,
    ServiceAddresses, ServiceIpAllocator,
};

/// The blocks composed along a small tree, the way the node will drive them: root `R` with a coordinator `C`
/// (workers `W1`, `W2`) and a worker `W3` directly below `R`.
#[cfg(test)]
mod flow_tests {
    use super::*;
    use crate::{NodeId, Time};
    use canopy_policies::{Capacity, Position};
    use std::time::Duration;

    const LEASE: Duration = Duration::from_secs(30);

    struct Machine {
        id: NodeId,
        registry: Registry,
        cache: RouteCache,
        interests: InterestTable,
    }

    impl Machine {
        fn new(n: u64) -> Self {
            Machine {
                id: NodeId::from_u64(n),
                registry: Registry::new(LEASE),
                cache: RouteCache::new(LEASE, Duration::from_secs(5)),
                interests: InterestTable::new(LEASE),
            }
        }
    }

    fn secs(s: u64) -> Time {
        Duration::from_secs(s)
    }

    #[test]
    fn subnets_go_down_records_go_up_and_updates_reach_interested_machines() {
        let (mut r, mut c, mut w1, mut w2, mut w3) =
            (Machine::new(1), Machine::new(2), Machine::new(3), Machine::new(4), Machine::new(5));
        let now = secs(0);

        // Subnets: R grants C a block for its subtree, C grants machine subnets out of it.
        let mut root_pool = AddressPool::platform_root(pool::PLATFORM_RANGE, LEASE);
        let c_block = root_pool.alloc(c.id, 20, now).unwrap();
        let mut c_pool = AddressPool::new([c_block], [], LEASE);
        let w1_subnet = c_pool.alloc(w1.id, pool::DEFAULT_MACHINE_PREFIX, now).unwrap();
        let w2_subnet = c_pool.alloc(w2.id, pool::DEFAULT_MACHINE_PREFIX, now).unwrap();
        let w3_subnet = root_pool.alloc(w3.id, pool::DEFAULT_MACHINE_PREFIX, now).unwrap();
        assert!(c_block.contains(&w1_subnet) && c_block.contains(&w2_subnet) && !c_block.contains(&w3_subnet));

        // Deployment: R allocates the addresses, W1 hosts instance 0; its record travels up.
        let svc: ServiceName = "shop.acme.cart.prod".parse().unwrap();
        let mut ips = ServiceIpAllocator::default();
        let addresses = ips.deploy(&svc, &AddressRequest::default()).unwrap();
        let record =
            |number: u32, host: &Machine, subnet: ipnet::Ipv4Net, ips: &mut ServiceIpAllocator| InstanceRecord {
                service: svc.clone(),
                number,
                instance_ip: ips.instance_ip(&svc, number).unwrap(),
                namespace_ip: subnet.hosts().nth(1).unwrap(),
                host: host.id,
                tunnel: vec!["192.0.2.1:50103".parse().unwrap()],
                position: Position::new(48.1, 11.6),
                free: Capacity::new(1.0, 512.0, 50.0),
                version: 1,
            };
        let i0 = RouteChange::Upsert(record(0, &w1, w1_subnet, &mut ips));
        w1.interests.pin(&svc);
        let up = w1.registry.apply(i0, Via::Local, now).unwrap();
        let up = c.registry.apply(up, Via::Child(w1.id), now).unwrap();
        r.registry.apply(RouteChange::Addresses(addresses.clone()), Via::Local, now);
        r.registry.apply(up, Via::Child(c.id), now).unwrap();

        // W3 resolves the name: nothing local, so it asks R, which answers and registers W3's interest.
        let dns: DnsTarget =
            DnsTarget::parse("shop.acme.cart.prod.any.closest.canopy", &"canopy".parse().unwrap()).unwrap();
        let key = QueryKey::Name(dns.service().clone());
        let here = Position::new(52.5, 13.4);
        let local = decide(&w3.registry, &w3.cache, &mut w3.interests, Via::Local, &key, here, 4, false, now);
        assert_eq!(local, QueryDecision::AskParent);
        let QueryDecision::Answer { answer, ask_parent: false } =
            decide(&r.registry, &r.cache, &mut r.interests, Via::Child(w3.id), &key, here, 4, true, now)
        else {
            panic!("the root knows the service")
        };
        w3.cache.store(&answer.service, answer.addresses.clone(), answer.instances, now);
        let CacheLookup::Found { addresses: Some(found), instances } = w3.cache.lookup(&svc, now) else {
            panic!("cached")
        };
        assert_eq!(found.service_ips[&PolicyKind::Closest], addresses.service_ips[&PolicyKind::Closest]);
        assert_eq!(instances.len(), 1);

        // A second instance on W2 goes up, and R pushes it to every interested machine (W3).
        let later = secs(10);
        let i1 = RouteChange::Upsert(record(1, &w2, w2_subnet, &mut ips));
        let up = w2.registry.apply(i1, Via::Local, later).unwrap();
        let up = c.registry.apply(up, Via::Child(w2.id), later).unwrap();
        let down = r.registry.apply(up, Via::Child(c.id), later).unwrap();
        assert_eq!(r.interests.recipients(&svc, later), vec![w3.id]);
        assert!(w3.cache.apply(&down, later));

        // W2 dies: C drops its instance and its subnet, R learns of the removal and tells W3.
        for removal in c.registry.remove_host(w2.id) {
            c_pool.release_holder(w2.id);
            let down = r.registry.apply(removal, Via::Child(c.id), later).unwrap();
            for _ in r.interests.recipients(&svc, later) {
                w3.cache.apply(&down, later);
            }
        }
        let CacheLookup::Found { instances, .. } = w3.cache.lookup(&svc, later) else { panic!("still cached") };
        assert_eq!(instances.keys().copied().collect::<Vec<_>>(), vec![0]);
        assert!(c_pool.grant(w2_subnet).is_none());

        // W3 stops using the route: its interest at R lapses; W1 keeps its own (it hosts the service).
        let much_later = secs(100);
        assert_eq!(r.interests.expire(much_later).unwanted, vec![svc.clone()]);
        assert!(w1.interests.is_wanted(&svc, much_later));
    }
}
