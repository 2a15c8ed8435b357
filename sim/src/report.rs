//! The JSON report of one run, and its short human summary.
//!
//! Everything except `wall_seconds` is a pure function of scenario and seed, so two runs can be compared byte for
//! byte once `wall_seconds` is blanked.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub nodes: usize,
    pub seed: u64,
    pub sim_seconds: f64,
    pub wall_seconds: f64,
    pub heartbeat_ms: u64,
    pub max_children: usize,
    /// Start of a join command to the first `ParentChanged { parent: Some(..) }`, for the initial joins.
    pub join_ms: Stats,
    /// The same for nodes joining again after a restart.
    pub rejoin_ms: Stats,
    /// Start of an initial join to the machine's first subnet (`SubnetGranted`): when its data plane can start.
    /// Incomplete: live machines still without one at the end.
    #[serde(default)]
    pub subnet_ms: Stats,
    /// From a coordinator's (or the root's) crash until every one of its live children has a live parent again
    /// (or became root): one sample per crash.
    pub reattach_ms: Stats,
    /// From a node's crash until one of its children declares it dead (`Event::ParentFailed`): one sample per child
    /// that does. A child that is taken in by a sibling first (the successor's attach) gives no sample.
    #[serde(default)]
    pub detection_ms: Stats,
    /// From the root's crash until its side of the network has exactly one root and its former children are attached.
    pub root_failover_ms: Stats,
    pub r#final: FinalState,
    /// Deepest tree seen at any periodic check (and at the end).
    pub tree_depth_max: usize,
    /// Most children under one node seen at any periodic check (and at the end).
    pub fanout_max: usize,
    /// Messages sent plus received per live node per second, by the role the node had at the time.
    pub msgs_per_node_per_s: ByRole,
    pub bytes_per_node_per_s: ByRole,
    /// Bytes of capacity grids (in reports and heartbeats) sent per node per second, by role.
    pub grid_bytes_per_node_per_s: ByRole,
    /// The closest-instance experiment, when the scenario runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closest_experiment: Option<crate::experiment::ExperimentReport>,
    pub messages: MessageCounts,
    /// The scenario events as applied, with the nodes they hit (for replay and diagnosis).
    pub applied_events: Vec<AppliedEvent>,
    pub violations_total: usize,
    /// The first violations (capped), each with time and node.
    pub violations: Vec<Violation>,
    /// The routes workload (see `route_load`), when the scenario runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<crate::route_load::RoutesReport>,
    /// How much per-node protocol state the live nodes hold at the end (to spot state growing with N).
    #[serde(default)]
    pub state_sizes: StateSizes,
    /// The nodes' protocol counters, summed over every node and every life of it (a crashed node's count is kept).
    #[serde(default)]
    pub counters: ProtocolCounters,
}

/// Sums of the overlay's counters (`canopy_overlay::Counters`: duplicates, splits, takeovers, step-downs, ...) and
/// of routing's (`RoutingCounters`: grants made, subnets renumbered, blocks handed over or given back, ...), by
/// field name: a field added to either shows up here without a change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProtocolCounters {
    pub overlay: BTreeMap<String, u64>,
    pub routing: BTreeMap<String, u64>,
}

impl ProtocolCounters {
    /// Adds one node's counters.
    pub fn add(&mut self, overlay: &impl Serialize, routing: &impl Serialize) {
        add_fields(&mut self.overlay, overlay);
        add_fields(&mut self.routing, routing);
    }

    fn overlay_count(&self, name: &str) -> u64 {
        self.overlay.get(name).copied().unwrap_or(0)
    }

    fn routing_count(&self, name: &str) -> u64 {
        self.routing.get(name).copied().unwrap_or(0)
    }
}

/// Adds the unsigned integer fields of a counters struct into `sum`, by name.
fn add_fields(sum: &mut BTreeMap<String, u64>, counters: &impl Serialize) {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(counters) else { return };
    for (name, value) in fields {
        if let Some(n) = value.as_u64() {
            *sum.entry(name).or_default() += n;
        }
    }
}

/// Per-node state at the end of a run, over the live nodes: maximum and mean.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateSizes {
    /// Grants in a node's address pool (blocks it handed to its children and itself).
    pub pool_grants_max: usize,
    pub pool_grants_mean: f64,
    /// The node with the most grants.
    pub pool_grants_max_node: Option<usize>,
    /// Most grants one holder has in one pool.
    pub grants_per_holder_max: usize,
    /// Blocks a node's pool owns (granted to it from above).
    pub pool_owned_max: usize,
    pub registry_entries_max: usize,
    pub cache_entries_max: usize,
    /// Addresses in live machines' subnets.
    #[serde(default)]
    pub machine_addresses: u64,
    /// Addresses the roots have granted (to machines and coordinators' blocks): what the tree takes from the
    /// platform range.
    #[serde(default)]
    pub root_granted_addresses: u64,
    /// Free addresses in non-root pools: held by coordinators, granted to nobody.
    #[serde(default)]
    pub idle_pool_addresses: u64,
    /// Live nodes holding no machine subnet at the end.
    #[serde(default)]
    pub machines_without_subnet: usize,
    /// Subnets and blocks that could not be granted during the run (`AllocationFailed` events); many mean the
    /// platform range is too small for the fleet (set `[overlay] platform_range`).
    #[serde(default)]
    pub allocation_failures: u64,
    /// Machine subnets changed during the run (`SubnetChanged` events): each restarts that machine's data plane.
    #[serde(default)]
    pub machine_subnet_changes: u64,
}

/// Percentiles by nearest rank; `None` when there were no samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub count: usize,
    /// Measurements that started but never finished before the end of the run.
    pub incomplete: usize,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Stats {
    pub fn from_samples(samples: &[f64], incomplete: usize) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| -> Option<f64> {
            if sorted.is_empty() {
                return None;
            }
            let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            Some(sorted[rank.clamp(1, sorted.len()) - 1])
        };
        Self {
            count: sorted.len(),
            incomplete,
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: sorted.last().copied(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ByRole {
    /// Leaves and detached nodes.
    pub leaf: f64,
    /// Coordinators and roots.
    pub coordinator: f64,
    pub all: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageCounts {
    pub sent: u64,
    pub delivered: u64,
    pub bytes_sent: u64,
    pub dropped_loss: u64,
    pub dropped_partition: u64,
    /// Arrived at a crashed, left or never started node.
    pub dropped_dead: u64,
    /// Addressed to an id that is no node of this simulation.
    pub dropped_unknown: u64,
    /// Sent messages and bytes per message kind.
    #[serde(default)]
    pub by_kind: std::collections::BTreeMap<String, crate::kinds::KindTraffic>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalState {
    pub live: usize,
    /// Live nodes per side of the partition (one entry when there is none).
    pub component_sizes: Vec<usize>,
    pub roots_per_component: Vec<usize>,
    /// Live nodes whose parent chain does not reach a live root on their side.
    pub unattached: usize,
    pub cycles: usize,
    pub tree_depth: usize,
    /// `2 * ceil(ln(N) / ln(max_children / 2)) + 1` for the largest component.
    pub depth_bound: Option<usize>,
    pub fanout_max: usize,
    /// Live nodes by their number of children: entry `k` counts the nodes with `k` (entry 0, the leaves), so the
    /// tree's shape shows (how many coordinators, how full their groups are).
    #[serde(default)]
    pub nodes_by_children: Vec<usize>,
    /// Pairs of live nodes of one tree whose machine subnets overlap (must be 0).
    #[serde(default)]
    pub subnet_conflicts: usize,
    /// Addresses two services hold in the view of one tree's nodes (must be 0).
    #[serde(default)]
    pub serviceip_conflicts: usize,
}

impl FinalState {
    /// The convergence property: one root per component, everyone attached, no cycles, depth within bound.
    pub fn converged(&self) -> bool {
        self.roots_per_component.iter().all(|&r| r == 1)
            && self.unattached == 0
            && self.cycles == 0
            && self.depth_bound.is_none_or(|bound| self.tree_depth <= bound)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedEvent {
    pub t_s: f64,
    pub kind: String,
    pub target: Option<String>,
    pub nodes: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    pub t_s: f64,
    /// The node index (in scenario order) the violation is about, when there is one.
    pub node: Option<usize>,
    pub kind: String,
    pub detail: String,
}

impl Report {
    /// The report with the one non-deterministic field cleared, for comparisons.
    pub fn without_wall_time(&self) -> Report {
        Report { wall_seconds: 0.0, ..self.clone() }
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let stats = |s: &mut String, name: &str, st: &Stats| {
            let _ = writeln!(
                s,
                "  {name:<17} n={:<6} p50={:>6} p90={:>6} p99={:>6} max={:>6} ms  (incomplete {})",
                st.count,
                ms(st.p50),
                ms(st.p90),
                ms(st.p99),
                ms(st.max),
                st.incomplete
            );
        };
        let speed = if self.wall_seconds > 0.0 { self.sim_seconds / self.wall_seconds } else { f64::INFINITY };
        let _ = writeln!(
            s,
            "{}: {} nodes, seed {}, {:.0} sim s in {:.2} wall s ({speed:.1}x)",
            self.scenario, self.nodes, self.seed, self.sim_seconds, self.wall_seconds
        );
        stats(&mut s, "join", &self.join_ms);
        stats(&mut s, "rejoin", &self.rejoin_ms);
        stats(&mut s, "first subnet", &self.subnet_ms);
        stats(&mut s, "detection", &self.detection_ms);
        stats(&mut s, "reattach", &self.reattach_ms);
        stats(&mut s, "root failover", &self.root_failover_ms);
        if let Some(routes) = &self.routes {
            stats(&mut s, "route cold", &routes.route_cold_ms);
            stats(&mut s, "route update", &routes.route_update_ms);
        }
        let f = &self.r#final;
        let _ = writeln!(
            s,
            "  final: {} live, components {:?}, roots {:?}, unattached {}, cycles {}, depth {} (bound {}), fanout {}",
            f.live,
            f.component_sizes,
            f.roots_per_component,
            f.unattached,
            f.cycles,
            f.tree_depth,
            f.depth_bound.map_or("-".into(), |b| b.to_string()),
            f.fanout_max
        );
        if f.nodes_by_children.len() > 1 {
            let groups: Vec<String> = (f.nodes_by_children.iter().enumerate().skip(1))
                .filter(|&(_, &n)| n > 0)
                .map(|(k, n)| format!("{k}:{n}"))
                .collect();
            let coordinators: usize = f.nodes_by_children[1..].iter().sum();
            let _ = writeln!(s, "  coordinators: {coordinators}, by number of children {}", groups.join(" "));
        }
        let _ = writeln!(
            s,
            "  traffic per node per s: leaf {:.2} msgs / {:.0} B, coordinator {:.2} msgs / {:.0} B, all {:.2} msgs / {:.0} B",
            self.msgs_per_node_per_s.leaf,
            self.bytes_per_node_per_s.leaf,
            self.msgs_per_node_per_s.coordinator,
            self.bytes_per_node_per_s.coordinator,
            self.msgs_per_node_per_s.all,
            self.bytes_per_node_per_s.all
        );
        let _ = writeln!(
            s,
            "  grid bytes per node per s: leaf {:.0} B, coordinator {:.0} B, all {:.0} B",
            self.grid_bytes_per_node_per_s.leaf,
            self.grid_bytes_per_node_per_s.coordinator,
            self.grid_bytes_per_node_per_s.all
        );
        if let Some(routes) = &self.routes {
            let _ = writeln!(
                s,
                "  routes: {} services deployed ({} failed), {} queries ({} not found), {} updates unmeasured \
                 (interest lapsed first), subnet conflicts {}, ServiceIP conflicts {}",
                routes.services_deployed,
                routes.deploy_failures,
                routes.queries,
                routes.not_found,
                routes.route_updates_unmeasured,
                f.subnet_conflicts,
                f.serviceip_conflicts
            );
        }
        if let Some(e) = &self.closest_experiment {
            let _ = writeln!(
                s,
                "  closest experiment: {} instances ({} saturated), {} slow-access nodes, vivaldi error {:.1}%, \
                 grids show a saturated instance's region as full {:.1}%",
                e.instances,
                e.saturated,
                e.slow_access_nodes,
                e.vivaldi_relative_error * 100.0,
                e.grids_flag_saturated * 100.0
            );
            let x = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            for (name, p) in
                [("closest", &e.closest), ("latency", &e.latency), ("closest, grids only", &e.closest_grids_only)]
            {
                let _ = writeln!(
                    s,
                    "    {name:<8} n={} oracle-optimal {:.1}%, saturated {:.1}%, stretch km p50 {} p99 {}, rtt p50 {} p99 {}",
                    p.queries,
                    p.oracle_optimal * 100.0,
                    p.chose_saturated * 100.0,
                    x(p.stretch_distance.p50),
                    x(p.stretch_distance.p99),
                    x(p.stretch_rtt.p50),
                    x(p.stretch_rtt.p99)
                );
            }
        }
        let z = &self.state_sizes;
        let _ = writeln!(
            s,
            "  state per node: pool grants max {} (node {}) mean {:.2}, per holder max {}, owned blocks max {}, \
             registry max {}, cache max {}; addresses: machines {}, granted by roots {}, idle in coordinator pools {}; \
             machines without a subnet {}, machine subnets changed {}, allocation failures {}, subnet conflicts {}",
            z.pool_grants_max,
            z.pool_grants_max_node.map_or("-".into(), |n| n.to_string()),
            z.pool_grants_mean,
            z.grants_per_holder_max,
            z.pool_owned_max,
            z.registry_entries_max,
            z.cache_entries_max,
            z.machine_addresses,
            z.root_granted_addresses,
            z.idle_pool_addresses,
            z.machines_without_subnet,
            z.machine_subnet_changes,
            z.allocation_failures,
            f.subnet_conflicts
        );
        let c = &self.counters;
        let _ = writeln!(
            s,
            "  protocol: splits {}, takeovers {}, step-downs {}, merges {}, chain links collapsed {}, parent failures {}, \
             duplicates dropped {}; subnets granted {}, renumbered {}, blocks handed over {}, given back {}",
            c.overlay_count("splits"),
            c.overlay_count("takeovers"),
            c.overlay_count("step_downs"),
            c.overlay_count("merges"),
            c.overlay_count("chain_links_collapsed"),
            c.overlay_count("parent_failures"),
            c.overlay_count("duplicates"),
            c.routing_count("grants_made"),
            c.routing_count("renumbered"),
            c.routing_count("blocks_handed_over"),
            c.routing_count("blocks_given_back")
        );
        let m = &self.messages;
        let _ = writeln!(
            s,
            "  messages: {} sent, {} delivered, dropped: {} loss, {} partition, {} dead, {} unknown",
            m.sent, m.delivered, m.dropped_loss, m.dropped_partition, m.dropped_dead, m.dropped_unknown
        );
        let mut kinds: Vec<_> = m.by_kind.iter().collect();
        kinds.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(b.0)));
        let top: Vec<String> = kinds
            .iter()
            .take(6)
            .map(|(k, t)| format!("{k} {:.2} msgs / {:.0} B", t.msgs_per_node_per_s, t.bytes_per_node_per_s))
            .collect();
        if !top.is_empty() {
            let _ = writeln!(s, "  sent per node per s, by kind (most bytes first): {}", top.join(", "));
        }
        let _ = writeln!(s, "  converged: {}, violations: {}", f.converged(), self.violations_total);
        for v in self.violations.iter().take(5) {
            let node = v.node.map_or("-".into(), |n| n.to_string());
            let _ = writeln!(s, "    t={:.3}s node {node}: {} ({})", v.t_s, v.kind, v.detail);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::from_samples(&samples, 3);
        assert_eq!((s.count, s.incomplete), (100, 3));
        assert_eq!((s.p50, s.p90, s.p99, s.max), (Some(50.0), Some(90.0), Some(99.0), Some(100.0)));
        let one = Stats::from_samples(&[7.0], 0);
        assert_eq!((one.p50, one.p99, one.max), (Some(7.0), Some(7.0), Some(7.0)));
        assert_eq!(Stats::from_samples(&[], 0).p50, None);
    }

    #[test]
    fn convergence_needs_every_condition() {
        let good = FinalState {
            live: 10,
            component_sizes: vec![10],
            roots_per_component: vec![1],
            depth_bound: Some(3),
            tree_depth: 2,
            ..FinalState::default()
        };
        assert!(good.converged());
        assert!(!FinalState { roots_per_component: vec![2], ..good.clone() }.converged());
        assert!(!FinalState { unattached: 1, ..good.clone() }.converged());
        assert!(!FinalState { cycles: 1, ..good.clone() }.converged());
        assert!(!FinalState { tree_depth: 4, ..good.clone() }.converged());
    }
}
