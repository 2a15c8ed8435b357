//! The closest-instance experiment: many clients across a region pick an instance of one service, some instances
//! are saturated, and we score each policy's choice against an oracle that knows every machine's true free
//! capacity and the true network.
//!
//! Each client decides with what its overlay node actually holds: its position, the capacity grids it received over
//! the tree (`Node::grids().held()`), and, for the `latency` policy, Vivaldi coordinates learned from simulated RTT
//! samples. Candidates are the route answer the client's node would get: the instance records (each carrying its
//! host's free capacity as the host last announced it, `InstanceRecord::free`), pruned for the client's position to
//! the `answer_k` most relevant per policy as a parent does (`canopy_policies::prune`).
//!
//! Why the records' free capacity matters: a grid cell aggregates every machine in a region, so a saturated host
//! sharing its cell with any machine that has room looks fine in the grids. The report therefore also scores
//! `closest` with the grids alone (records announcing only the machines' size) and says how often the client's grids
//! showed a saturated instance's region as full.
//!
//! Latency does not have to follow geography: a fraction of nodes gets extra access delay (a slow last mile), which
//! the `latency` policy can learn and the geographic `closest` policy cannot.

use crate::report::Stats;
use canopy_policies::{
    Candidate, Capacity, CapacityGrid, PickContext, Policies, PolicyKind, Position, VivaldiCoord, prune,
};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The `[experiment]` table of a scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClosestExperiment {
    /// Nodes that host an instance of the service.
    pub instances: usize,
    /// Fraction of the instances whose machine has no free capacity.
    pub saturated_fraction: f64,
    /// Queries, each from a random node that hosts no instance.
    pub clients: usize,
    /// When every node learns its free capacity (grids then spread until the end of the run).
    pub set_capacity_at_s: f64,
    /// Fraction of nodes with extra one-way access delay, so latency does not follow geography.
    #[serde(default)]
    pub slow_access_fraction: f64,
    #[serde(default)]
    pub slow_access_ms: f64,
    /// RTT samples each node feeds its Vivaldi coordinate.
    #[serde(default = "default_vivaldi_samples")]
    pub vivaldi_samples: usize,
    /// Instances per policy a parent keeps in a route answer (the routes module's `k_per_policy`); 0 = all.
    #[serde(default = "default_answer_k")]
    pub answer_k: usize,
}

fn default_vivaldi_samples() -> usize {
    64
}

fn default_answer_k() -> usize {
    4
}

impl ClosestExperiment {
    pub fn validate(&self, nodes: usize) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: &str| Err((format!("experiment.{key}"), problem.to_string()));
        if self.instances == 0 || self.instances >= nodes {
            return bad("instances", "must be at least 1 and fewer than nodes.count");
        }
        if !(0.0..1.0).contains(&self.saturated_fraction) {
            return bad("saturated_fraction", "must be in [0, 1)");
        }
        if self.clients == 0 {
            return bad("clients", "must be at least 1");
        }
        if !(self.set_capacity_at_s.is_finite() && self.set_capacity_at_s >= 0.0) {
            return bad("set_capacity_at_s", "must be >= 0");
        }
        if !(0.0..=1.0).contains(&self.slow_access_fraction) {
            return bad("slow_access_fraction", "must be between 0 and 1");
        }
        if !(self.slow_access_ms.is_finite() && self.slow_access_ms >= 0.0) {
            return bad("slow_access_ms", "must be >= 0");
        }
        Ok(())
    }
}

/// How one policy did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyScore {
    pub queries: usize,
    /// Fraction of queries that got the oracle's instance (or one exactly as near).
    pub oracle_optimal: f64,
    /// Fraction of queries that got a saturated instance.
    pub chose_saturated: f64,
    /// Chosen / oracle great-circle distance (oracle: nearest instance with free capacity).
    pub stretch_distance: Stats,
    /// Chosen / oracle round-trip time (oracle: lowest-RTT instance with free capacity).
    pub stretch_rtt: Stats,
}

/// The experiment's section of the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExperimentReport {
    pub instances: usize,
    pub saturated: usize,
    pub slow_access_nodes: usize,
    /// Mean relative error of the learned Vivaldi RTT estimates against the true RTT (sampled pairs).
    pub vivaldi_relative_error: f64,
    /// `closest` scored against the geographic oracle (its own objective).
    pub closest: PolicyScore,
    /// `latency` scored against the RTT oracle (its own objective).
    pub latency: PolicyScore,
    /// `closest` when the records carry only the machines' size, so saturation is known from the grids alone.
    pub closest_grids_only: PolicyScore,
    /// Of all (query, saturated instance) pairs, the fraction whose region the client's grids showed as full.
    pub grids_flag_saturated: f64,
}

/// What the experiment needs to know about one live node.
pub struct Client {
    pub position: Position,
    /// What the node's overlay state holds (a copy: the node lives on in the simulation).
    pub grids: Vec<CapacityGrid>,
    /// The node's own free capacity as it knows it: what it announces in the records of instances it hosts.
    pub own_free: Capacity,
}

/// The experiment's fixed choices, made when the simulation is set up.
#[derive(Debug, Clone)]
pub struct Setup {
    pub config: ClosestExperiment,
    /// Node indices hosting an instance.
    pub instances: Vec<usize>,
    /// `saturated[i]`: instance node `instances[i]` has no free capacity.
    pub saturated: Vec<bool>,
    /// Extra one-way access delay per node, in nanoseconds.
    pub access_ns: Vec<u64>,
}

impl Setup {
    pub fn new(config: &ClosestExperiment, nodes: usize, rng: &mut impl Rng) -> Self {
        let instances = rand::seq::index::sample(rng, nodes, config.instances).into_vec();
        let saturated_count = (config.instances as f64 * config.saturated_fraction).round() as usize;
        let saturated = (0..instances.len()).map(|i| i < saturated_count).collect();
        let slow_ns = (config.slow_access_ms * 1e6) as u64;
        let access_ns =
            (0..nodes).map(|_| if rng.random::<f64>() < config.slow_access_fraction { slow_ns } else { 0 }).collect();
        Setup { config: config.clone(), instances, saturated, access_ns }
    }

    pub fn is_saturated_instance(&self, node: usize) -> bool {
        self.instances.iter().zip(&self.saturated).any(|(&i, &s)| i == node && s)
    }
}

/// Learns a Vivaldi coordinate per node from `samples` RTT measurements to random peers.
pub fn learn_coordinates(
    nodes: usize,
    samples: usize,
    rtt_ms: &dyn Fn(usize, usize) -> f64,
    rng: &mut impl Rng,
) -> Vec<VivaldiCoord> {
    let mut coords: Vec<VivaldiCoord> = (0..nodes).map(|i| VivaldiCoord::new(i as u64 + 1)).collect();
    if nodes < 2 {
        return coords;
    }
    // Rounds over all nodes, so everyone's coordinate moves while the others settle (as in a live system).
    for _ in 0..samples {
        for i in 0..nodes {
            let j = (i + rng.random_range(1..nodes)) % nodes;
            let remote = coords[j];
            // A sample with up to 5% measurement noise; a rejected sample just leaves the coordinate as is.
            let rtt = rtt_ms(i, j) * (1.0 + 0.05 * rng.random::<f64>());
            let _ = coords[i].update(rtt, &remote, remote.error);
        }
    }
    coords
}

/// Runs the queries. `clients(node)` is what a node holds; `setup` knows which instances are truly saturated and
/// `rtt_ms(a, b)` is the true RTT.
pub fn evaluate(
    setup: &Setup,
    clients: &mut dyn FnMut(usize) -> Option<Client>,
    live: &[usize],
    positions: &[Position],
    rtt_ms: &dyn Fn(usize, usize) -> f64,
    rng: &mut impl Rng,
) -> ExperimentReport {
    let coords = learn_coordinates(positions.len(), setup.config.vivaldi_samples, rtt_ms, rng);
    let vivaldi_relative_error = {
        let mut sum = 0.0;
        let n = 1000.min(positions.len() * positions.len());
        for _ in 0..n {
            let (a, b) = (rng.random_range(0..positions.len()), rng.random_range(0..positions.len()));
            if a != b {
                let truth = rtt_ms(a, b);
                sum += (coords[a].estimate_rtt(&coords[b]) - truth).abs() / truth;
            }
        }
        sum / n.max(1) as f64
    };
    let live_instances: Vec<usize> = setup.instances.iter().copied().filter(|i| live.contains(i)).collect();
    let has_room = |node: usize| !setup.is_saturated_instance(node);
    // The records as the hosts announce them; a host we cannot ask announces nothing (it is not live).
    let announced: Vec<(usize, Capacity)> =
        live_instances.iter().filter_map(|&node| clients(node).map(|host| (node, host.own_free))).collect();
    let records = |free: &dyn Fn(Capacity) -> Capacity| -> Vec<Candidate> {
        announced
            .iter()
            .map(|&(node, own_free)| Candidate {
                instance: node as u32,
                position: positions[node],
                free: free(own_free),
                coord: Some(coords[node]),
            })
            .collect()
    };
    let with_free = records(&|own_free| own_free);
    // What a record would say if it carried the machine's size instead of its free capacity.
    let size_only = records(&|_| Capacity::new(1e6, 1e9, 1e6));
    let answer_for = |all: &[Candidate], viewer: Position| -> Vec<Candidate> {
        if setup.config.answer_k == 0 {
            return all.to_vec();
        }
        prune(all, setup.config.answer_k, viewer).into_iter().map(|i| all[i]).collect()
    };
    let possible_clients: Vec<usize> = live.iter().copied().filter(|n| !setup.instances.contains(n)).collect();
    let mut policies = Policies::default();
    let mut scores = [Tally::default(), Tally::default(), Tally::default()];
    let (mut saturated_checks, mut saturated_flagged) = (0usize, 0usize);
    if !announced.is_empty() && !possible_clients.is_empty() && live_instances.iter().any(|&i| has_room(i)) {
        for _ in 0..setup.config.clients {
            let client = possible_clients[rng.random_range(0..possible_clients.len())];
            let Some(view) = clients(client) else { continue };
            let distance = |node: usize| view.position.distance_km(&positions[node]);
            let rtt = |node: usize| rtt_ms(client, node);
            let oracle = |cost: &dyn Fn(usize) -> f64| {
                live_instances.iter().copied().filter(|&i| has_room(i)).map(cost).fold(f64::INFINITY, f64::min)
            };
            let (best_km, best_rtt) = (oracle(&distance), oracle(&rtt));
            let ctx = PickContext::new("svc", view.position).with_grids(&view.grids).with_coord(&coords[client]);
            for &(node, _) in announced.iter().filter(|(node, _)| !has_room(*node)) {
                saturated_checks += 1;
                saturated_flagged += usize::from(!ctx.region_has_room(positions[node]));
            }
            let answer = answer_for(&with_free, view.position);
            let answer_size_only = answer_for(&size_only, view.position);
            for (slot, kind, candidates) in [
                (0, PolicyKind::Closest, &answer),
                (1, PolicyKind::Latency, &answer),
                (2, PolicyKind::Closest, &answer_size_only),
            ] {
                let Some(pick) = policies.pick(kind, &ctx, candidates) else { continue };
                let chosen = candidates[pick].instance as usize;
                let tally = &mut scores[slot];
                tally.queries += 1;
                tally.saturated += usize::from(!has_room(chosen));
                let (own_cost, best) =
                    if kind == PolicyKind::Closest { (distance(chosen), best_km) } else { (rtt(chosen), best_rtt) };
                // A nearer but saturated instance is not optimal: the oracle only counts instances with room.
                tally.optimal += usize::from(has_room(chosen) && own_cost <= best + 1e-9);
                tally.stretch_km.push(ratio(distance(chosen), best_km));
                tally.stretch_rtt.push(ratio(rtt(chosen), best_rtt));
            }
        }
    }
    ExperimentReport {
        instances: live_instances.len(),
        saturated: live_instances.iter().filter(|&&i| !has_room(i)).count(),
        slow_access_nodes: setup.access_ns.iter().filter(|&&a| a > 0).count(),
        vivaldi_relative_error,
        closest: scores[0].finish(),
        latency: scores[1].finish(),
        closest_grids_only: scores[2].finish(),
        grids_flag_saturated: if saturated_checks == 0 {
            0.0
        } else {
            saturated_flagged as f64 / saturated_checks as f64
        },
    }
}

/// Chosen over best; equal costs (including both zero) are a stretch of 1.
fn ratio(chosen: f64, best: f64) -> f64 {
    if chosen <= best { 1.0 } else { chosen / best.max(1e-9) }
}

#[derive(Default)]
struct Tally {
    queries: usize,
    optimal: usize,
    saturated: usize,
    stretch_km: Vec<f64>,
    stretch_rtt: Vec<f64>,
}

impl Tally {
    fn finish(&self) -> PolicyScore {
        let share = |n: usize| if self.queries == 0 { 0.0 } else { n as f64 / self.queries as f64 };
        PolicyScore {
            queries: self.queries,
            oracle_optimal: share(self.optimal),
            chose_saturated: share(self.saturated),
            stretch_distance: Stats::from_samples(&self.stretch_km, 0),
            stretch_rtt: Stats::from_samples(&self.stretch_rtt, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_policies::GridInput;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn setup(instances: Vec<usize>, saturated: Vec<bool>, nodes: usize) -> Setup {
        let config = ClosestExperiment {
            instances: instances.len(),
            saturated_fraction: 0.0,
            clients: 50,
            set_capacity_at_s: 0.0,
            slow_access_fraction: 0.0,
            slow_access_ms: 0.0,
            vivaldi_samples: 32,
            answer_k: 4,
        };
        Setup { config, instances, saturated, access_ns: vec![0; nodes] }
    }

    /// Nodes on the equator one degree apart; instances at 1 (saturated) and 3; the only client is node 0.
    fn equator() -> (Vec<Position>, Setup, Vec<Capacity>) {
        let positions: Vec<Position> = (0..4).map(|i| Position::new(0.0, f64::from(i))).collect();
        let free = vec![Capacity::new(2.0, 2048.0, 0.0), Capacity::ZERO, Capacity::new(2.0, 2048.0, 0.0), cap4()];
        (positions, setup(vec![1, 3], vec![true, false], 4), free)
    }

    fn cap4() -> Capacity {
        Capacity::new(4.0, 4096.0, 0.0)
    }

    fn run(positions: &[Position], s: &Setup, free: &[Capacity], grids: &[CapacityGrid]) -> ExperimentReport {
        let rtt = |a: usize, b: usize| 1.0 + positions[a].distance_km(&positions[b]) / 100.0;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let live: Vec<usize> = (0..positions.len()).collect();
        let mut view =
            |i: usize| Some(Client { position: positions[0], grids: grids.to_vec(), own_free: *free.get(i)? });
        evaluate(s, &mut view, &live, positions, &rtt, &mut rng)
    }

    #[test]
    fn grids_steer_closest_away_from_a_saturated_instance() {
        let (positions, s, free) = equator();
        // Fine grids where the saturated host is alone in its cell.
        let truth = CapacityGrid::merge_sized(
            64,
            &[
                GridInput::Node { position: positions[1], free: Capacity::ZERO },
                GridInput::Node { position: positions[3], free: cap4() },
            ],
        );
        let r = run(&positions, &s, &free, &[truth]);
        assert_eq!(r.closest_grids_only.queries, 50);
        assert_eq!(r.closest_grids_only.oracle_optimal, 1.0);
        assert_eq!(r.closest_grids_only.chose_saturated, 0.0);
        assert_eq!(r.grids_flag_saturated, 1.0);

        // Without grids, records announcing only the machines' size lead to the saturated, nearer instance.
        let r = run(&positions, &s, &free, &[]);
        assert_eq!(r.closest_grids_only.oracle_optimal, 0.0);
        assert_eq!(r.closest_grids_only.chose_saturated, 1.0);
        assert_eq!(r.closest_grids_only.stretch_distance.p50, Some(1.0), "a nearer (saturated) pick is no stretch");
        assert_eq!(r.grids_flag_saturated, 0.0);
    }

    #[test]
    fn announced_free_capacity_catches_what_a_shared_cell_hides() {
        let (positions, s, free) = equator();
        // A coarse grid: the saturated host shares its cell with node 2, which has room, so the cell looks fine.
        let coarse = CapacityGrid::merge_sized(
            1,
            &positions
                .iter()
                .zip(&free)
                .map(|(&position, &free)| GridInput::Node { position, free })
                .collect::<Vec<_>>(),
        );
        let r = run(&positions, &s, &free, &[coarse]);
        assert_eq!(r.grids_flag_saturated, 0.0, "the shared cell hides the saturated host");
        assert_eq!(r.closest_grids_only.chose_saturated, 1.0);
        assert_eq!(r.closest.oracle_optimal, 1.0, "the records' free capacity shows it");
        assert_eq!(r.closest.chose_saturated, 0.0);
        assert_eq!(r.latency.chose_saturated, 0.0);

        // A host that has not announced room yet (still zero) is avoided as well: the scores follow the records.
        let mut stale = free.clone();
        stale[3] = Capacity::ZERO;
        let r = run(&positions, &s, &stale, &[]);
        assert_eq!(r.closest.queries, 50);
        assert_eq!(r.closest.chose_saturated, 1.0, "with every record showing no room the policy falls back");
    }

    #[test]
    fn vivaldi_learns_a_metric_with_heights() {
        let positions: Vec<Position> = (0..60).map(|i| Position::new(f64::from(i % 6), f64::from(i / 6))).collect();
        let slow = |i: usize| if i.is_multiple_of(7) { 20.0 } else { 0.0 };
        let rtt = |a: usize, b: usize| 2.0 + positions[a].distance_km(&positions[b]) / 50.0 + slow(a) + slow(b);
        let coords = learn_coordinates(60, 200, &rtt, &mut ChaCha8Rng::seed_from_u64(3));
        let mut err = 0.0;
        let mut n = 0.0;
        for a in 0..60 {
            for b in (a + 1)..60 {
                err += (coords[a].estimate_rtt(&coords[b]) - rtt(a, b)).abs() / rtt(a, b);
                n += 1.0;
            }
        }
        assert!(err / n < 0.25, "mean relative error {}", err / n);
    }
}
