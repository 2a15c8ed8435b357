//! What this machine knows of the services it uses or hosts, and the data plane's `RouteTable` built from it.
//!
//! Pure: the task in `super` feeds it the tree's answers and pushed changes, and hands the built table to the data
//! plane. Whatever the tree sends, the table it builds is valid for `RouteIndex::build` (conflicting entries, e.g.
//! stale records of a renumbered machine or duplicates after a partition, are left out and counted), so one bad
//! record never keeps every other route from being installed.

use crate::dataplane::routes::{InstanceRoute, NodeRoute, RouteTable, ServiceRoute};
use crate::runtime::node_name;
use canopy_overlay::routes::{
    InstanceRecord, PolicyKind, QueryAnswer, QueryKey, RouteChange, ServiceAddresses, ServiceName,
};
use canopy_overlay::{NodeId, Position};
use ipnet::Ipv4Net;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

/// This machine, as its own route table lists it.
#[derive(Debug, Clone)]
pub struct Machine {
    pub id: NodeId,
    pub subnet: Ipv4Net,
    /// Subnets granted when the first one filled up.
    pub extra_subnets: Vec<Ipv4Net>,
    pub endpoint: SocketAddr,
    pub position: Position,
    /// The data plane's tunnel key (hex): every member derives the same one from the network key.
    pub tunnel_key: Option<String>,
}

/// One service: its ServiceIPs (once known) and the instances this machine knows of, its own included.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceRoutes {
    pub addresses: Option<ServiceAddresses>,
    pub instances: BTreeMap<u32, InstanceRecord>,
}

/// The services this machine knows, by name.
#[derive(Debug, Clone, Default)]
pub struct Known {
    services: BTreeMap<ServiceName, ServiceRoutes>,
    /// Instances hosted here: only this machine says what they are (the tree's echo of them is ignored).
    hosted: HashSet<(ServiceName, u32)>,
    /// Instances asked for by their InstanceIP: kept when a later answer (pruned to the k most relevant
    /// instances) leaves them out, until they are removed or the service is forgotten.
    addressed: HashSet<(ServiceName, u32)>,
}

/// Entries left out of the last table, and why (for logs and the status API).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub conflicting_machines: usize,
    pub conflicting_addresses: usize,
    pub without_service_ips: usize,
}

impl Known {
    pub fn service(&self, name: &ServiceName) -> Option<&ServiceRoutes> {
        self.services.get(name)
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &ServiceRoutes)> {
        self.services.iter()
    }

    pub fn is_hosted(&self, service: &ServiceName, number: u32) -> bool {
        self.hosted.contains(&(service.clone(), number))
    }

    pub fn hosted(&self) -> impl Iterator<Item = &(ServiceName, u32)> {
        self.hosted.iter()
    }

    /// An instance starts here: its record (host = this machine) is the truth for it from now on.
    pub fn host(&mut self, addresses: ServiceAddresses, record: InstanceRecord) {
        self.hosted.insert((record.service.clone(), record.number));
        let entry = self.services.entry(record.service.clone()).or_default();
        entry.addresses = Some(addresses);
        entry.instances.insert(record.number, record);
    }

    /// An instance here stopped; returns its record.
    pub fn unhost(&mut self, service: &ServiceName, number: u32) -> Option<InstanceRecord> {
        if !self.hosted.remove(&(service.clone(), number)) {
            return None;
        }
        self.services.get_mut(service)?.instances.remove(&number)
    }

    /// The service's ServiceIPs as deployed by the root.
    pub fn set_addresses(&mut self, addresses: ServiceAddresses) -> bool {
        let entry = self.services.entry(addresses.name.clone()).or_default();
        let changed = entry.addresses.as_ref() != Some(&addresses);
        entry.addresses = Some(addresses);
        changed
    }

    /// A route answer from the tree replaces what we knew of the service (except our own instances).
    /// The tree's answer to a query by `key`: its instances replace those known (pruned answers leave some out),
    /// except the ones hosted here and the ones asked for by InstanceIP.
    pub fn apply_answer(&mut self, key: &QueryKey, answer: QueryAnswer) -> bool {
        if let QueryKey::Address(ip) = key
            && let Some(record) = answer.instances.iter().find(|r| r.instance_ip == *ip)
        {
            self.addressed.insert((answer.service.clone(), record.number));
        }
        let before = self.services.get(&answer.service).cloned();
        let entry = self.services.entry(answer.service.clone()).or_default();
        if answer.addresses.is_some() {
            entry.addresses = answer.addresses;
        }
        let (hosted, addressed) = (&self.hosted, &self.addressed);
        entry.instances.retain(|number, _| {
            let key = (answer.service.clone(), *number);
            hosted.contains(&key) || addressed.contains(&key)
        });
        let mut fresh = Vec::new();
        for record in answer.instances {
            if !hosted.contains(&(record.service.clone(), record.number)) {
                entry.instances.insert(record.number, record.clone());
                fresh.push(record);
            }
        }
        for record in &fresh {
            self.evict_stale(record);
        }
        before.as_ref() != self.services.get(&answer.service)
    }

    /// A machine hosts one instance per namespace IP: older records of another instance at the same place are
    /// stale (the machine restarted and handed the address to someone else) and go.
    fn evict_stale(&mut self, newer: &InstanceRecord) {
        for (name, routes) in self.services.iter_mut() {
            routes.instances.retain(|number, old| {
                let same_instance = *name == newer.service && *number == newer.number;
                same_instance
                    || old.host != newer.host
                    || old.namespace_ip != newer.namespace_ip
                    || old.version >= newer.version
                    || self.hosted.contains(&(name.clone(), *number))
            });
        }
    }

    /// A change pushed down the tree; returns whether anything changed.
    pub fn apply_change(&mut self, change: RouteChange) -> bool {
        match change {
            RouteChange::Addresses(addresses) => self.set_addresses(addresses),
            RouteChange::Upsert(record) => {
                if self.is_hosted(&record.service, record.number) {
                    return false;
                }
                let entry = self.services.entry(record.service.clone()).or_default();
                match entry.instances.get(&record.number) {
                    Some(known) if known.version > record.version || *known == record => false,
                    _ => {
                        entry.instances.insert(record.number, record.clone());
                        self.evict_stale(&record);
                        true
                    }
                }
            }
            RouteChange::Removed { service, number, version } => {
                if self.is_hosted(&service, number) {
                    return false;
                }
                let Some(entry) = self.services.get_mut(&service) else { return false };
                match entry.instances.get(&number) {
                    Some(known) if known.version <= version => {
                        self.addressed.remove(&(service, number));
                        entry.instances.remove(&number).is_some()
                    }
                    _ => false,
                }
            }
        }
    }

    /// A machine said it does not host this instance any more: forget it until the tree tells us otherwise.
    pub fn forget_instance(&mut self, service: &ServiceName, number: u32) -> bool {
        if self.is_hosted(service, number) {
            return false;
        }
        self.addressed.remove(&(service.clone(), number));
        self.services.get_mut(service).is_some_and(|entry| entry.instances.remove(&number).is_some())
    }

    /// Drops a service nobody here uses any more (hosted services stay).
    pub fn forget_service(&mut self, service: &ServiceName) -> bool {
        if self.hosted.iter().any(|(name, _)| name == service) {
            return false;
        }
        self.addressed.retain(|(name, _)| name != service);
        self.services.remove(service).is_some()
    }

    /// The service an overlay address (ServiceIP or InstanceIP) belongs to, if known.
    pub fn service_of(&self, address: Ipv4Addr) -> Option<&ServiceName> {
        self.services.iter().find_map(|(name, routes)| {
            let by_service_ip =
                routes.addresses.as_ref().is_some_and(|a| a.service_ips.values().any(|&ip| ip == address));
            let by_instance_ip = routes.instances.values().any(|r| r.instance_ip == address);
            (by_service_ip || by_instance_ip).then_some(name)
        })
    }

    /// The data plane's route table: this machine, the machines hosting known instances, and every service whose
    /// ServiceIPs are known. `machine_prefix` is the size of a machine subnet (a remote machine's subnet is the one
    /// around its instances' namespace IPs).
    pub fn route_table(&self, me: &Machine, machine_prefix: u8) -> (RouteTable, Skipped) {
        let mut skipped = Skipped::default();
        let my_name = node_name(&me.id);
        let mut nodes = vec![NodeRoute {
            name: my_name.clone(),
            subnet: me.subnet,
            extra_subnets: me.extra_subnets.clone(),
            endpoint: me.endpoint,
            position: Some(me.position),
        }];
        let mut node_of: HashMap<NodeId, usize> = HashMap::from([(me.id, 0)]);
        let winners = self.unambiguous_instances();
        let mut overlay_ips: HashSet<Ipv4Addr> = HashSet::new();
        let mut services = Vec::new();
        for (name, routes) in &self.services {
            let Some(addresses) = &routes.addresses else {
                skipped.without_service_ips += 1;
                continue;
            };
            let Some((service_ip, policy, policy_ips)) = split_addresses(addresses) else {
                skipped.without_service_ips += 1;
                continue;
            };
            let all_ips: Vec<Ipv4Addr> = std::iter::once(service_ip).chain(policy_ips.values().copied()).collect();
            if all_ips.iter().any(|ip| overlay_ips.contains(ip)) {
                skipped.conflicting_addresses += 1;
                continue;
            }
            overlay_ips.extend(all_ips);
            let mut instances = Vec::new();
            for record in routes.instances.values() {
                let Some(node) = self.node_for(record, me, machine_prefix, &mut nodes, &mut node_of) else {
                    skipped.conflicting_machines += 1;
                    continue;
                };
                let winner = winners.contains(&(name, record.number));
                if !winner || !overlay_ips.insert(record.instance_ip) {
                    skipped.conflicting_addresses += 1;
                    continue;
                }
                instances.push(InstanceRoute {
                    number: record.number,
                    instance_ip: record.instance_ip,
                    namespace_ip: record.namespace_ip,
                    node: nodes[node].name.clone(),
                });
            }
            services.push(ServiceRoute {
                name: name.to_string(),
                service_ip,
                policy: policy.as_str().to_string(),
                policy_ips: policy_ips.into_iter().map(|(p, ip)| (p.as_str().to_string(), ip)).collect(),
                instances,
            });
        }
        (RouteTable { tunnel_key: me.tunnel_key.clone(), nodes, services }, skipped)
    }

    /// The instances that keep their addresses where records disagree: a namespace IP or InstanceIP claimed twice
    /// goes to this machine's own instance, else to the newest record.
    fn unambiguous_instances(&self) -> HashSet<(&ServiceName, u32)> {
        let mut records: Vec<(&ServiceName, &InstanceRecord)> =
            self.services.iter().flat_map(|(name, r)| r.instances.values().map(move |i| (name, i))).collect();
        records.sort_by_key(|(name, r)| {
            (std::cmp::Reverse(self.hosted.contains(&((*name).clone(), r.number))), std::cmp::Reverse(r.version))
        });
        let (mut namespace_ips, mut instance_ips) = (HashSet::new(), HashSet::new());
        records
            .into_iter()
            .filter(|(_, r)| {
                let free = !namespace_ips.contains(&r.namespace_ip) && !instance_ips.contains(&r.instance_ip);
                if free {
                    namespace_ips.insert(r.namespace_ip);
                    instance_ips.insert(r.instance_ip);
                }
                free
            })
            .map(|(name, r)| (name, r.number))
            .collect()
    }

    /// The table index of the machine hosting `record`, adding it (or another subnet of it: a machine gets more
    /// when its first fills up) when new; `None` when the record contradicts what the table already says about
    /// machines (a subnet overlapping another machine's, an instance of ours we do not host).
    fn node_for(
        &self,
        record: &InstanceRecord,
        me: &Machine,
        machine_prefix: u8,
        nodes: &mut Vec<NodeRoute>,
        node_of: &mut HashMap<NodeId, usize>,
    ) -> Option<usize> {
        let known = node_of.get(&record.host).copied();
        if let Some(index) = known
            && nodes[index].subnets().any(|s| s.contains(&record.namespace_ip))
        {
            return Some(index);
        }
        if record.host == me.id {
            return None;
        }
        let subnet = Ipv4Net::new(record.namespace_ip, machine_prefix).ok()?.trunc();
        let overlaps = nodes
            .iter()
            .flat_map(|n| n.subnets())
            .any(|n| n.contains(&subnet.network()) || subnet.contains(&n.network()));
        if overlaps {
            return None;
        }
        if let Some(index) = known {
            nodes[index].extra_subnets.push(subnet);
            return Some(index);
        }
        let endpoint = pick_endpoint(&record.tunnel)?;
        nodes.push(NodeRoute {
            name: node_name(&record.host),
            subnet,
            extra_subnets: Vec::new(),
            endpoint,
            position: Some(record.position),
        });
        node_of.insert(record.host, nodes.len() - 1);
        Some(nodes.len() - 1)
    }
}

/// The data plane lists one main ServiceIP (round-robin when there is one) and the other policies beside it.
fn split_addresses(addresses: &ServiceAddresses) -> Option<(Ipv4Addr, PolicyKind, BTreeMap<PolicyKind, Ipv4Addr>)> {
    let main = if addresses.service_ips.contains_key(&PolicyKind::Rr) {
        PolicyKind::Rr
    } else {
        *addresses.service_ips.keys().next()?
    };
    let mut others = addresses.service_ips.clone();
    let ip = others.remove(&main)?;
    Some((ip, main, others))
}

/// Where to send tunnel traffic for a machine: its first IPv4 tunnel address (it lists its best one first).
fn pick_endpoint(tunnel: &[SocketAddr]) -> Option<SocketAddr> {
    tunnel.iter().find(|a| a.is_ipv4()).or_else(|| tunnel.first()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::routes::RouteIndex;
    use canopy_overlay::Capacity;

    fn peer(n: u8) -> NodeId {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([n; 32]).unwrap();
        crate::runtime::node_id(&key.public().to_peer_id())
    }

    fn web() -> ServiceName {
        "shop.acme.web.prod".parse().unwrap()
    }

    fn addresses(name: &ServiceName, base: u8) -> ServiceAddresses {
        ServiceAddresses {
            name: name.clone(),
            service_ips: BTreeMap::from([
                (PolicyKind::Rr, Ipv4Addr::new(10, 30, base, 1)),
                (PolicyKind::Closest, Ipv4Addr::new(10, 30, base, 2)),
            ]),
        }
    }

    fn record(service: &ServiceName, number: u32, host: NodeId, namespace_ip: [u8; 4], version: u64) -> InstanceRecord {
        InstanceRecord {
            service: service.clone(),
            number,
            instance_ip: Ipv4Addr::new(10, 30, 100, number as u8 + 1),
            namespace_ip: namespace_ip.into(),
            host,
            tunnel: vec![SocketAddr::from(([192, 0, 2, namespace_ip[2]], 50103))],
            position: Position::new(48.0, 11.0),
            free: Capacity::new(1.0, 512.0, 0.0),
            version,
        }
    }

    fn me() -> Machine {
        Machine {
            id: peer(1),
            subnet: "10.16.0.0/26".parse().unwrap(),
            extra_subnets: Vec::new(),
            endpoint: "192.0.2.1:50103".parse().unwrap(),
            position: Position::new(48.1, 11.6),
            tunnel_key: Some("ab".repeat(32)),
        }
    }

    #[test]
    fn answers_and_changes_build_a_valid_table_with_remote_machines() {
        let mut known = Known::default();
        let web = web();
        known.host(addresses(&web, 0), record(&web, 0, peer(1), [10, 16, 0, 2], 1));
        let answer = QueryAnswer {
            service: web.clone(),
            addresses: Some(addresses(&web, 0)),
            instances: vec![record(&web, 1, peer(2), [10, 16, 1, 2], 1), record(&web, 0, peer(9), [10, 16, 9, 2], 7)],
        };
        assert!(known.apply_answer(&QueryKey::Name(web.clone()), answer));
        // Our own instance 0 stays ours even though the answer carried another record for it.
        assert_eq!(known.service(&web).unwrap().instances[&0].host, peer(1));
        let (table, skipped) = known.route_table(&me(), 26);
        assert_eq!(skipped, Skipped::default());
        RouteIndex::build(&table).expect("valid table");
        assert_eq!(table.nodes.len(), 2);
        assert_eq!(table.nodes[1].subnet, "10.16.1.0/26".parse::<Ipv4Net>().unwrap());
        assert_eq!(table.nodes[1].endpoint, "192.0.2.1:50103".parse().unwrap());
        assert_eq!(table.services[0].policy, "rr");
        assert_eq!(table.services[0].policy_ips["closest"], Ipv4Addr::new(10, 30, 0, 2));
        assert_eq!(table.services[0].instances.len(), 2);

        // A newer record moves instance 1; an older one is ignored; a removal with an older version too.
        assert!(known.apply_change(RouteChange::Upsert(record(&web, 1, peer(3), [10, 16, 3, 2], 2))));
        assert!(!known.apply_change(RouteChange::Upsert(record(&web, 1, peer(2), [10, 16, 1, 2], 1))));
        assert!(!known.apply_change(RouteChange::Removed { service: web.clone(), number: 1, version: 1 }));
        assert_eq!(known.service(&web).unwrap().instances[&1].host, peer(3));
        assert!(known.apply_change(RouteChange::Removed { service: web.clone(), number: 1, version: 2 }));
        // The tree cannot remove what we host.
        assert!(!known.apply_change(RouteChange::Removed { service: web.clone(), number: 0, version: 99 }));
        assert_eq!(known.service_of(Ipv4Addr::new(10, 30, 0, 2)), Some(&web));
        assert_eq!(known.service_of(Ipv4Addr::new(10, 30, 100, 1)), Some(&web));
        assert!(!known.forget_service(&web), "hosted services stay");
    }

    #[test]
    fn a_restarted_machine_reusing_a_namespace_ip_replaces_the_stale_record() {
        let mut known = Known::default();
        let (web, echo): (ServiceName, ServiceName) = (web(), "shop.acme.echo.prod".parse().unwrap());
        known.set_addresses(addresses(&web, 0));
        known.set_addresses(addresses(&echo, 1));
        // Before the restart: echo#0 at .3 on machine 2 (web's record at .3 comes later, newer).
        let mut old_echo = record(&echo, 0, peer(2), [10, 16, 1, 3], 5);
        old_echo.instance_ip = Ipv4Addr::new(10, 30, 101, 1);
        known.apply_change(RouteChange::Upsert(old_echo.clone()));
        known.apply_change(RouteChange::Upsert(record(&web, 1, peer(2), [10, 16, 1, 3], 9)));
        assert!(known.service(&echo).unwrap().instances.is_empty(), "the stale echo record went");
        let (table, skipped) = known.route_table(&me(), 26);
        RouteIndex::build(&table).unwrap();
        assert_eq!(skipped, Skipped::default());
        // Whatever the order records arrive in, the table keeps the newest claim on an address.
        let mut known = Known::default();
        known.set_addresses(addresses(&web, 0));
        known.set_addresses(addresses(&echo, 1));
        known.apply_change(RouteChange::Upsert(record(&web, 1, peer(2), [10, 16, 1, 3], 9)));
        known.services.get_mut(&echo).unwrap().instances.insert(0, old_echo);
        let (table, skipped) = known.route_table(&me(), 26);
        RouteIndex::build(&table).unwrap();
        assert_eq!(skipped.conflicting_addresses, 1);
        let web_route = table.services.iter().find(|s| s.name == web.to_string()).unwrap();
        assert_eq!(web_route.instances.len(), 1, "the newer web record won");
    }

    /// Answers are pruned to the k most relevant instances: one a client asked for by its InstanceIP stays known
    /// when a later answer leaves it out, until the tree says it is gone.
    #[test]
    fn an_instance_asked_for_by_instance_ip_outlives_pruned_answers() {
        let mut known = Known::default();
        let web = web();
        let (near, far) = (record(&web, 0, peer(2), [10, 16, 1, 2], 1), record(&web, 7, peer(3), [10, 16, 2, 2], 1));
        let answer = |instances: Vec<InstanceRecord>| QueryAnswer {
            service: web.clone(),
            addresses: Some(addresses(&web, 0)),
            instances,
        };
        known.apply_answer(&QueryKey::Address(far.instance_ip), answer(vec![near.clone(), far.clone()]));
        known.apply_answer(&QueryKey::Name(web.clone()), answer(vec![near.clone()]));
        let numbers = |known: &Known| known.service(&web).unwrap().instances.keys().copied().collect::<Vec<_>>();
        assert_eq!(numbers(&known), vec![0, 7], "kept though the name answer pruned it");
        known.apply_change(RouteChange::Removed { service: web.clone(), number: 7, version: 1 });
        known.apply_answer(&QueryKey::Name(web.clone()), answer(vec![near.clone()]));
        assert_eq!(numbers(&known), vec![0]);
        // Not asked for by address: a pruned answer replaces it.
        known.apply_answer(&QueryKey::Name(web.clone()), answer(vec![near.clone(), far.clone()]));
        known.apply_answer(&QueryKey::Name(web.clone()), answer(vec![near]));
        assert_eq!(numbers(&known), vec![0]);
    }

    /// A machine whose first subnet filled up got another: its instances in both are routed to it.
    #[test]
    fn a_machine_with_two_subnets() {
        let mut known = Known::default();
        let web = web();
        known.set_addresses(addresses(&web, 0));
        for change in [record(&web, 0, peer(2), [10, 16, 1, 2], 1), record(&web, 1, peer(2), [10, 16, 5, 2], 1)] {
            known.apply_change(RouteChange::Upsert(change));
        }
        let mut me = me();
        me.extra_subnets = vec!["10.16.7.0/26".parse().unwrap()];
        let (table, skipped) = known.route_table(&me, 26);
        let index = RouteIndex::build(&table).expect("valid");
        assert_eq!(skipped, Skipped::default());
        assert_eq!(table.nodes[0].extra_subnets, me.extra_subnets, "our own second subnet");
        let machine = &table.nodes[1];
        assert_eq!((machine.subnet.to_string(), machine.extra_subnets.len()), ("10.16.1.0/26".to_string(), 1));
        assert_eq!(machine.extra_subnets[0].to_string(), "10.16.5.0/26");
        assert_eq!(table.services[0].instances.len(), 2);
        assert_eq!(index.node_for_subnet_address("10.16.5.9".parse().unwrap()), Some(1));
    }

    #[test]
    fn conflicting_records_are_left_out_not_fatal() {
        let mut known = Known::default();
        let (web, copy): (ServiceName, ServiceName) = (web(), "shop.acme.zzz.prod".parse().unwrap());
        known.set_addresses(addresses(&web, 0));
        known.set_addresses(addresses(&copy, 0)); // same ServiceIPs as web: a partition duplicate
        for change in [
            record(&web, 0, peer(2), [10, 16, 1, 2], 1),
            // Another machine inside machine 2's subnet: a stale record of a renumbered machine.
            record(&web, 1, peer(3), [10, 16, 1, 9], 1),
            // Another machine inside this machine's subnet.
            record(&web, 2, peer(4), [10, 16, 0, 9], 1),
        ] {
            known.apply_change(RouteChange::Upsert(change));
        }
        let (table, skipped) = known.route_table(&me(), 26);
        RouteIndex::build(&table).expect("still valid");
        assert_eq!(skipped.conflicting_machines, 2);
        assert_eq!(skipped.conflicting_addresses, 1, "the duplicate service");
        assert_eq!(table.services.len(), 1);
        assert_eq!(table.services[0].instances.len(), 1);

        // A service whose ServiceIPs are unknown gets no table entry yet.
        let mut known = Known::default();
        known.apply_change(RouteChange::Upsert(record(&web, 0, peer(2), [10, 16, 1, 2], 1)));
        let (table, skipped) = known.route_table(&me(), 26);
        assert!(table.services.is_empty());
        assert_eq!(skipped.without_service_ips, 1);
    }
}
