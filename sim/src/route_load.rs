//! Routes workload and metrics: services deployed through the root, instances placed on random nodes, route
//! queries from random nodes, instance churn; cold-query and update-propagation latencies; subnet and ServiceIP
//! conflicts among the nodes of one tree.
//!
//! Scenario table (all keys optional):
//!
//! ```toml
//! [routes]
//! start_s = 20.0               # deploy the services then (after the tree is built)
//! services = 10
//! instances_per_service = 3
//! queries_per_s = 20.0         # route queries from random live nodes, for random services
//! churn_per_s = 1.0            # one instance removed and one added elsewhere
//! ```

use crate::report::Stats;
use canopy_overlay::routes::{CacheLookup, InstanceRecord, QueryKey, RouteChange, ServiceName};
use canopy_overlay::routing::{RouteCommand, RouteEvent};
use canopy_overlay::{Capacity, Node, Time};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

/// The `[routes]` table of a scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesScenario {
    pub start_s: f64,
    pub services: usize,
    pub instances_per_service: usize,
    pub queries_per_s: f64,
    pub churn_per_s: f64,
}

impl Default for RoutesScenario {
    fn default() -> Self {
        RoutesScenario { start_s: 20.0, services: 10, instances_per_service: 3, queries_per_s: 20.0, churn_per_s: 1.0 }
    }
}

impl RoutesScenario {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, why: &str| Err((format!("routes.{k}"), why.to_string()));
        if !(self.start_s.is_finite() && self.start_s >= 0.0) {
            return bad("start_s", "must be a non-negative number");
        }
        if self.services == 0 || self.services > 10_000 {
            return bad("services", "must be between 1 and 10000");
        }
        if self.instances_per_service == 0 || self.instances_per_service > 64 {
            return bad("instances_per_service", "must be between 1 and 64");
        }
        if !(self.queries_per_s.is_finite() && (0.0..=100_000.0).contains(&self.queries_per_s)) {
            return bad("queries_per_s", "must be between 0 and 100000");
        }
        if !(self.churn_per_s.is_finite() && (0.0..=10_000.0).contains(&self.churn_per_s)) {
            return bad("churn_per_s", "must be between 0 and 10000");
        }
        Ok(())
    }
}

/// What the report says about routes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutesReport {
    pub services_deployed: usize,
    pub deploy_failures: usize,
    pub queries: u64,
    pub not_found: u64,
    /// First query of a node for a service until its answer event.
    pub route_cold_ms: Stats,
    /// Instance change until every node that held an interest at the time reported it.
    pub route_update_ms: Stats,
    /// Changes not measured: every node still waiting for them died or dropped its interest first (its interest
    /// lapsed, so the tree rightly stopped sending it updates).
    pub route_updates_unmeasured: u64,
}

/// InstanceIPs reserved per service, so churn can add instances with fresh numbers.
const NUMBERS_PER_SERVICE: u32 = 256;

struct Service {
    name: ServiceName,
    instance_ips: Vec<Ipv4Addr>,
    /// Running instances: number -> host.
    running: BTreeMap<u32, u32>,
    next_number: u32,
}

struct PendingUpdate {
    service: ServiceName,
    number: u32,
    removed: bool,
    since: u64,
    waiting: HashSet<u32>,
}

pub struct RouteLoad {
    cfg: RoutesScenario,
    rng: ChaCha8Rng,
    services: Vec<Service>,
    deployed: bool,
    next_query: u64,
    next_churn: u64,
    cold: HashMap<(u32, ServiceName), u64>,
    asked: HashSet<(u32, ServiceName)>,
    cold_samples: Vec<f64>,
    updates: Vec<PendingUpdate>,
    update_samples: Vec<f64>,
    report: RoutesReport,
}

fn ns(t: u64) -> Time {
    Duration::from_nanos(t)
}

impl RouteLoad {
    pub fn new(cfg: RoutesScenario, seed: u64) -> Self {
        let services = (0..cfg.services)
            .map(|s| Service {
                name: format!("app{s}.sim.svc.prod").parse().expect("a valid service name"),
                instance_ips: Vec::new(),
                running: BTreeMap::new(),
                next_number: 0,
            })
            .collect();
        RouteLoad {
            rng: ChaCha8Rng::seed_from_u64(seed),
            services,
            deployed: false,
            next_query: 0,
            next_churn: 0,
            cold: HashMap::new(),
            asked: HashSet::new(),
            cold_samples: Vec::new(),
            updates: Vec::new(),
            update_samples: Vec::new(),
            report: RoutesReport::default(),
            cfg,
        }
    }

    /// When the engine must call [`RouteLoad::step`] first.
    pub fn start_ns(&self) -> u64 {
        (self.cfg.start_s * 1e9) as u64
    }

    fn gap_ns(&mut self, rate: f64) -> u64 {
        // Exponential inter-arrival times (a Poisson process).
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        (-u.ln() / rate * 1e9) as u64
    }

    /// Commands to feed now, and when to call again (`None`: never).
    pub fn step<'a>(
        &mut self,
        now: u64,
        live: &[u32],
        node: &dyn Fn(u32) -> Option<&'a Node>,
    ) -> (Vec<(u32, RouteCommand)>, Option<u64>) {
        let mut out = Vec::new();
        self.drop_lapsed_waiters(now, node);
        if live.is_empty() {
            return (out, Some(now + 1_000_000_000));
        }
        if !self.deployed {
            self.deployed = true;
            for s in &self.services {
                let from = live[self.rng.random_range(0..live.len())];
                let cmd = RouteCommand::DeployService {
                    name: s.name.clone(),
                    request: Default::default(),
                    instances: NUMBERS_PER_SERVICE,
                };
                out.push((from, cmd));
            }
            // Queries and churn start once the instances had a second to register.
            self.next_query = now + 2_000_000_000;
            self.next_churn = now + 2_000_000_000;
            return (out, Some(now + 1_000_000_000));
        }
        if self.cfg.queries_per_s > 0.0 && now >= self.next_query {
            let gap = self.gap_ns(self.cfg.queries_per_s);
            self.next_query = now + gap;
            let ready: Vec<usize> =
                (0..self.services.len()).filter(|&s| !self.services[s].running.is_empty()).collect();
            if !ready.is_empty() {
                let s = ready[self.rng.random_range(0..ready.len())];
                let from = live[self.rng.random_range(0..live.len())];
                let name = self.services[s].name.clone();
                if self.asked.insert((from, name.clone())) {
                    self.cold.insert((from, name.clone()), now);
                }
                self.report.queries += 1;
                out.push((from, RouteCommand::QueryRoute(QueryKey::Name(name))));
            }
        }
        if self.cfg.churn_per_s > 0.0 && now >= self.next_churn {
            let gap = self.gap_ns(self.cfg.churn_per_s);
            self.next_churn = now + gap;
            self.churn(now, live, node, &mut out);
        }
        let next = [
            (self.cfg.queries_per_s > 0.0).then_some(self.next_query),
            (self.cfg.churn_per_s > 0.0).then_some(self.next_churn),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.min(now + 1_000_000_000));
        (out, next.or(Some(now + 1_000_000_000)))
    }

    fn record(&self, s: usize, number: u32, host: u32, node: &Node) -> Option<InstanceRecord> {
        let service = &self.services[s];
        let subnet = node.routing().machine_subnets().first()?;
        Some(InstanceRecord {
            service: service.name.clone(),
            number,
            instance_ip: *service.instance_ips.get(number as usize)?,
            namespace_ip: subnet.hosts().nth(1)?,
            host: node.id(),
            tunnel: vec![std::net::SocketAddr::from(([192, 0, 2, (host % 250) as u8], 50103))],
            position: node.info().position,
            free: Capacity::new(1.0, 512.0, 50.0),
            version: 1,
        })
    }

    /// Which live nodes want updates of `service` now: they must all report the change.
    fn interested<'a>(&self, now: u64, service: &ServiceName, node: &dyn Fn(u32) -> Option<&'a Node>) -> HashSet<u32> {
        let mut set = HashSet::new();
        for &(i, ref s) in self.asked.iter() {
            if s == service
                && let Some(n) = node(i)
                && n.routing().interests().is_wanted(service, ns(now))
            {
                set.insert(i);
            }
        }
        set
    }

    fn churn<'a>(
        &mut self,
        now: u64,
        live: &[u32],
        node: &dyn Fn(u32) -> Option<&'a Node>,
        out: &mut Vec<(u32, RouteCommand)>,
    ) {
        let ready: Vec<usize> =
            (0..self.services.len()).filter(|&s| !self.services[s].instance_ips.is_empty()).collect();
        if ready.is_empty() {
            return;
        }
        let s = ready[self.rng.random_range(0..ready.len())];
        // Remove one running instance (when more than one runs), add one on a random node.
        if self.services[s].running.len() > 1 {
            let numbers: Vec<u32> = self.services[s].running.keys().copied().collect();
            let number = numbers[self.rng.random_range(0..numbers.len())];
            let host = self.services[s].running.remove(&number).expect("listed");
            if node(host).is_some() {
                let name = self.services[s].name.clone();
                let mut waiting = self.interested(now, &name, node);
                waiting.remove(&host);
                if !waiting.is_empty() {
                    self.updates.push(PendingUpdate {
                        service: name.clone(),
                        number,
                        removed: true,
                        since: now,
                        waiting,
                    });
                }
                out.push((host, RouteCommand::UnregisterInstance { service: name, number, version: 1 }));
            }
        }
        let host = live[self.rng.random_range(0..live.len())];
        self.add_instance(now, s, host, node, out);
    }

    fn add_instance<'a>(
        &mut self,
        now: u64,
        s: usize,
        host: u32,
        node: &dyn Fn(u32) -> Option<&'a Node>,
        out: &mut Vec<(u32, RouteCommand)>,
    ) {
        let number = self.services[s].next_number;
        let Some(record) = node(host).and_then(|n| self.record(s, number, host, n)) else { return };
        self.services[s].next_number += 1;
        self.services[s].running.insert(number, host);
        let name = self.services[s].name.clone();
        // Only changes someone else is interested in measure propagation.
        let mut waiting = self.interested(now, &name, node);
        waiting.remove(&host);
        if !waiting.is_empty() {
            self.updates.push(PendingUpdate { service: name, number, removed: false, since: now, waiting });
        }
        out.push((host, RouteCommand::RegisterInstance(record)));
    }

    /// Waiters that died or no longer want the service will not report the change; a change left waiting only for
    /// such nodes is not measured (its time would be when we noticed, not when it arrived).
    fn drop_lapsed_waiters<'a>(&mut self, now: u64, node: &dyn Fn(u32) -> Option<&'a Node>) {
        let mut unmeasured = 0;
        self.updates.retain_mut(|u| {
            let before = u.waiting.len();
            u.waiting.retain(|&i| node(i).is_some_and(|n| n.routing().interests().is_wanted(&u.service, ns(now))));
            let lapsed_only = u.waiting.is_empty() && before > 0;
            unmeasured += u64::from(lapsed_only);
            !lapsed_only
        });
        self.report.route_updates_unmeasured += unmeasured;
    }

    fn complete_updates(&mut self, now: u64) {
        let samples = &mut self.update_samples;
        self.updates.retain(|u| {
            if u.waiting.is_empty() {
                samples.push((now - u.since) as f64 / 1e6);
                false
            } else {
                true
            }
        });
    }

    /// An event from node `i`. Deployments answered here place the service's first instances.
    pub fn on_event<'a>(
        &mut self,
        now: u64,
        i: u32,
        event: &RouteEvent,
        live: &[u32],
        node: &dyn Fn(u32) -> Option<&'a Node>,
    ) -> Vec<(u32, RouteCommand)> {
        let mut out = Vec::new();
        match event {
            RouteEvent::ServiceDeployed { addresses, instance_ips } => {
                let Some(s) = self.services.iter().position(|s| s.name == addresses.name) else { return out };
                if !self.services[s].instance_ips.is_empty() {
                    return out;
                }
                self.report.services_deployed += 1;
                self.services[s].instance_ips = instance_ips.iter().map(|(_, ip)| *ip).collect();
                for _ in 0..self.cfg.instances_per_service {
                    if live.is_empty() {
                        break;
                    }
                    let host = live[self.rng.random_range(0..live.len())];
                    self.add_instance(now, s, host, node, &mut out);
                }
            }
            RouteEvent::DeployFailed { .. } => self.report.deploy_failures += 1,
            RouteEvent::RouteAnswer { answer, .. } => {
                if let Some(asked) = self.cold.remove(&(i, answer.service.clone())) {
                    self.cold_samples.push((now - asked) as f64 / 1e6);
                }
            }
            RouteEvent::RouteNotFound { key } => {
                self.report.not_found += 1;
                if let QueryKey::Name(s) = key {
                    self.cold.remove(&(i, s.clone()));
                }
            }
            RouteEvent::RouteChanged { change } => {
                let (service, number, removed) = match change {
                    RouteChange::Upsert(r) => (&r.service, r.number, false),
                    RouteChange::Removed { service, number, .. } => (service, *number, true),
                    RouteChange::Addresses(_) => return out,
                };
                for u in &mut self.updates {
                    if u.service == *service && u.number == number && u.removed == removed {
                        u.waiting.remove(&i);
                    }
                }
                self.complete_updates(now);
            }
            _ => {}
        }
        out
    }

    /// The report; `node` gives the live nodes at the end (waiters whose interest lapsed do not count as incomplete).
    pub fn report<'a>(mut self, now: u64, node: &dyn Fn(u32) -> Option<&'a Node>) -> RoutesReport {
        self.drop_lapsed_waiters(now, node);
        let cold_incomplete = self.cold.len();
        let update_incomplete = self.updates.len();
        self.report.route_cold_ms = Stats::from_samples(&self.cold_samples, cold_incomplete);
        self.report.route_update_ms = Stats::from_samples(&self.update_samples, update_incomplete);
        self.report
    }
}

/// Subnet conflicts (pairs of live nodes of one tree whose machine subnets overlap) and ServiceIP conflicts
/// (addresses that two services hold in the view of nodes of one tree: the root's table, the nodes' indexes and
/// caches). `parent[i]` is node `i`'s parent; a node without one is a root.
pub fn conflicts(nodes: &[Option<&Node>], parent: &[Option<usize>], now: u64) -> (usize, usize) {
    let n = nodes.len();
    let root_of = |mut i: usize| -> Option<usize> {
        for _ in 0..=n {
            match parent.get(i).copied().flatten() {
                Some(p) if p < n && nodes[p].is_some() => i = p,
                Some(_) => return None,
                None => return Some(i),
            }
        }
        None
    };
    let mut trees: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, _) in nodes.iter().enumerate().filter(|(_, n)| n.is_some()) {
        if let Some(r) = root_of(i) {
            trees.entry(r).or_default().push(i);
        }
    }
    let (mut subnet, mut service_ip) = (0, 0);
    for (root, members) in &trees {
        // Subnets: sort by first address; overlapping aligned blocks nest, so neighbours reveal every overlap.
        let mut blocks: Vec<(u32, u32)> = members
            .iter()
            .flat_map(|&i| nodes[i].expect("live").routing().machine_subnets().iter())
            .map(|b| (u32::from(b.network()), u32::from(b.broadcast())))
            .collect();
        blocks.sort_unstable();
        let mut reach: Option<u32> = None;
        for (start, end) in blocks {
            if reach.is_some_and(|r| start <= r) {
                subnet += 1;
            }
            reach = Some(reach.map_or(end, |r| r.max(end)));
        }
        // ServiceIPs: every holder of an address must name the same service.
        let Some(table) = nodes[*root].and_then(|r| r.routing().allocator()) else { continue };
        let mut services: Vec<ServiceName> = table.assignments().map(|a| a.key.service().clone()).collect();
        services.sort();
        services.dedup();
        let owner: HashMap<Ipv4Addr, ServiceName> =
            table.assignments().map(|a| (a.addr, a.key.service().clone())).collect();
        let mut clashes: HashSet<Ipv4Addr> = HashSet::new();
        for &i in members {
            let routing = nodes[i].expect("live").routing();
            for s in &services {
                let known = routing.registry().addresses(s).or_else(|| match routing.cache().lookup(s, ns(now)) {
                    CacheLookup::Found { addresses, .. } => addresses,
                    _ => None,
                });
                for ip in known.iter().flat_map(|a| a.service_ips.values()) {
                    if owner.get(ip).is_some_and(|o| o != s) {
                        clashes.insert(*ip);
                    }
                }
            }
        }
        service_ip += clashes.len();
    }
    (subnet, service_ip)
}
