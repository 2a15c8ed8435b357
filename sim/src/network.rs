//! The network model: how long a message takes, whether it is lost, and who can reach whom.
//!
//! Latency is `base + distance / speed + jitter` between geographic positions, or `hops * hop_latency + jitter`
//! on a fixed switch tree (VineIO's evaluation topologies). A partition splits the world at a longitude.

use crate::scenario::{HostPlacement, Network, Topology, TopologyKind};
use canopy_policies::Position;
use rand::Rng;
use rand::seq::SliceRandom;

/// Where a node sits: its position, and its switch when a fixed topology is simulated.
#[derive(Debug, Clone, Copy)]
pub struct Attachment {
    /// Private, so it cannot change without `cos_lat` (see [`Attachment::new`]).
    position: Position,
    pub switch: u32,
    /// Extra one-way delay of this node's access link (a slow last mile), added to every message it sends or
    /// receives, so latency need not follow geography.
    pub access_ns: u64,
    /// The cosine of the latitude, which every distance from here needs (see [`distance_km`]).
    cos_lat: f64,
}

impl Attachment {
    pub fn new(position: Position, switch: u32, access_ns: u64) -> Self {
        Self { position, switch, access_ns, cos_lat: position.lat.to_radians().cos() }
    }

    pub fn position(&self) -> Position {
        self.position
    }
}

/// [`Position::distance_km`] (geo's haversine: the same operations in the same order, so the same bits) with each
/// end's cosine of latitude computed once per node: two of its four trigonometric calls were a few percent of a
/// large run, one distance per message.
fn distance_km(from: &Attachment, to: &Attachment) -> f64 {
    let delta_lat = (to.position.lat - from.position.lat).to_radians();
    let delta_lon = (to.position.lon - from.position.lon).to_radians();
    let a = (delta_lat / 2.0).sin().powi(2) + from.cos_lat * to.cos_lat * (delta_lon / 2.0).sin().powi(2);
    let c = 2.0 * a.sqrt().asin();
    geo::Haversine.radius() * c / 1000.0
}

#[derive(Debug, Clone)]
pub struct NetworkModel {
    base_ns: f64,
    ns_per_km: f64,
    jitter_ns: f64,
    loss: f64,
    switch_tree: Option<SwitchTree>,
    split_lon: Option<f64>,
}

impl NetworkModel {
    pub fn new(network: &Network, topology: Option<&Topology>) -> Self {
        Self {
            base_ns: network.base_latency_ms * 1e6,
            ns_per_km: 1e6 / network.km_per_ms,
            jitter_ns: network.jitter_ms * 1e6,
            loss: network.loss,
            switch_tree: topology.map(SwitchTree::new),
            split_lon: None,
        }
    }

    /// Picks a switch for each of `count` nodes: evenly over the eligible switches, in random order.
    pub fn assign_switches(&self, count: usize, rng: &mut impl Rng) -> Vec<u32> {
        let Some(tree) = &self.switch_tree else { return vec![0; count] };
        let mut eligible = tree.host_switches();
        eligible.shuffle(rng);
        (0..count).map(|i| eligible[i % eligible.len()]).collect()
    }

    /// One-way delay of one message, in nanoseconds.
    pub fn latency_ns(&self, from: &Attachment, to: &Attachment, rng: &mut impl Rng) -> u64 {
        self.latency_over_ns(self.path_ns(from, to), from, to, rng)
    }

    /// The part of the one-way delay between two places that is the same for every message, without access links
    /// (ns). The same both ways, to the bit, so a driver may keep it for a pair of nodes.
    pub fn path_ns(&self, a: &Attachment, b: &Attachment) -> f64 {
        match &self.switch_tree {
            Some(tree) => tree.hop_ns * f64::from(tree.host_hops(a.switch, b.switch)),
            None => self.base_ns + distance_km(a, b) * self.ns_per_km,
        }
    }

    /// [`NetworkModel::latency_ns`] for a path whose [`NetworkModel::path_ns`] is known already.
    pub fn latency_over_ns(&self, path_ns: f64, from: &Attachment, to: &Attachment, rng: &mut impl Rng) -> u64 {
        let jitter = if self.jitter_ns > 0.0 { rng.random::<f64>() * self.jitter_ns } else { 0.0 };
        (path_ns + jitter).round() as u64 + from.access_ns + to.access_ns
    }

    /// Round-trip time without jitter, in milliseconds (the truth the closest experiment scores against).
    pub fn rtt_ms(&self, a: &Attachment, b: &Attachment) -> f64 {
        2.0 * (self.path_ns(a, b) + (a.access_ns + b.access_ns) as f64) / 1e6
    }

    /// Draws whether a message is lost. Consumes randomness only when loss is configured, so a loss-free
    /// scenario's other random choices do not depend on message counts.
    pub fn lost(&self, rng: &mut impl Rng) -> bool {
        self.loss > 0.0 && rng.random::<f64>() < self.loss
    }

    pub fn partition(&mut self, split_lon: f64) {
        self.split_lon = Some(split_lon);
    }

    pub fn heal(&mut self) {
        self.split_lon = None;
    }

    pub fn split_lon(&self) -> Option<f64> {
        self.split_lon
    }

    /// Which side of the partition a node is on (always 0 when there is no partition).
    pub fn component(&self, at: &Attachment) -> usize {
        match self.split_lon {
            Some(split) if at.position.lon >= split => 1,
            _ => 0,
        }
    }

    pub fn can_talk(&self, a: &Attachment, b: &Attachment) -> bool {
        self.component(a) == self.component(b)
    }
}

/// A complete binary tree of switches in heap order: switch 0 is the top, `i`'s children are `2i+1`, `2i+2`.
#[derive(Debug, Clone)]
struct SwitchTree {
    levels: u32,
    hop_ns: f64,
    hosts_on: HostPlacement,
}

impl SwitchTree {
    fn new(topology: &Topology) -> Self {
        match topology.kind {
            TopologyKind::BinaryTree => {}
        }
        Self { levels: topology.levels, hop_ns: topology.hop_latency_ms * 1e6, hosts_on: topology.hosts_on }
    }

    fn host_switches(&self) -> Vec<u32> {
        let total = (1u32 << self.levels) - 1;
        match self.hosts_on {
            HostPlacement::AllSwitches => (0..total).collect(),
            HostPlacement::Leaves => ((1u32 << (self.levels - 1)) - 1..total).collect(),
        }
    }

    /// Links between two hosts: their two access links plus the switch-to-switch path.
    fn host_hops(&self, a: u32, b: u32) -> u32 {
        2 + switch_hops(a, b)
    }
}

fn depth_of(switch: u32) -> u32 {
    (switch + 1).ilog2()
}

fn switch_hops(mut a: u32, mut b: u32) -> u32 {
    let mut hops = 0;
    while a != b {
        if depth_of(a) >= depth_of(b) {
            a = (a - 1) / 2;
        } else {
            b = (b - 1) / 2;
        }
        hops += 1;
    }
    hops
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn at(lat: f64, lon: f64) -> Attachment {
        Attachment::new(Position::new(lat, lon), 0, 0)
    }

    #[test]
    fn geographic_latency_is_base_plus_distance() {
        let net =
            NetworkModel::new(&Network { base_latency_ms: 2.0, km_per_ms: 100.0, jitter_ms: 0.0, loss: 0.0 }, None);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let munich = at(48.14, 11.58);
        let berlin = at(52.52, 13.40);
        let km = munich.position.distance_km(&berlin.position);
        assert!((500.0..520.0).contains(&km), "{km}");
        let ns = net.latency_ns(&munich, &berlin, &mut rng);
        assert_eq!(ns, (2e6 + km * 1e4).round() as u64);
        assert_eq!(net.latency_ns(&munich, &munich, &mut rng), 2_000_000);
    }

    #[test]
    fn distances_are_the_positions_own_to_the_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..10_000 {
            let mut place = || at(rng.random_range(-90.0..=90.0), rng.random_range(-180.0..=180.0));
            let (a, b) = (place(), place());
            assert_eq!(distance_km(&a, &b).to_bits(), a.position.distance_km(&b.position).to_bits(), "{a:?} {b:?}");
        }
        let (pole, antipode) = (at(90.0, 0.0), at(-90.0, 180.0));
        assert_eq!(distance_km(&pole, &antipode).to_bits(), pole.position.distance_km(&antipode.position).to_bits());
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let net =
            NetworkModel::new(&Network { base_latency_ms: 1.0, km_per_ms: 100.0, jitter_ms: 3.0, loss: 0.0 }, None);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let p = at(0.0, 0.0);
        let samples: Vec<u64> = (0..1000).map(|_| net.latency_ns(&p, &p, &mut rng)).collect();
        assert!(samples.iter().all(|&s| (1_000_000..=4_000_000).contains(&s)));
        assert!(samples.iter().any(|&s| s > 3_500_000) && samples.iter().any(|&s| s < 1_500_000));
    }

    #[test]
    fn switch_tree_hops() {
        assert_eq!(switch_hops(0, 0), 0);
        assert_eq!(switch_hops(1, 2), 2);
        assert_eq!(switch_hops(3, 4), 2);
        assert_eq!(switch_hops(3, 6), 4);
        assert_eq!(switch_hops(0, 6), 2);
        let topo = Topology {
            kind: TopologyKind::BinaryTree,
            levels: 3,
            hop_latency_ms: 5.0,
            hosts_on: HostPlacement::Leaves,
        };
        let net = NetworkModel::new(&Network { jitter_ms: 0.0, ..Network::default() }, Some(&topo));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = Attachment::new(Position::new(48.1, 11.5), 3, 0);
        let b = Attachment::new(Position::new(48.1, 11.6), 6, 0);
        // 2 access links + 4 switch hops, 5 ms each.
        assert_eq!(net.latency_ns(&a, &b, &mut rng), 30_000_000);
        let switches = net.assign_switches(8, &mut rng);
        let mut sorted = switches.clone();
        sorted.sort();
        assert_eq!(sorted, vec![3, 3, 4, 4, 5, 5, 6, 6], "evenly spread over the leaves");
    }

    #[test]
    fn a_path_is_as_long_both_ways_to_the_bit() {
        // The engine keeps a node's path to its parent for the messages both ways.
        let net = NetworkModel::new(&Network::default(), None);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..10_000 {
            let mut place = || at(rng.random_range(-90.0..90.0), rng.random_range(-180.0..180.0));
            let (a, b) = (place(), place());
            assert_eq!(net.path_ns(&a, &b).to_bits(), net.path_ns(&b, &a).to_bits(), "{a:?} {b:?}");
        }
    }

    #[test]
    fn partition_splits_by_longitude() {
        let mut net = NetworkModel::new(&Network::default(), None);
        let (west, east) = (at(50.0, 5.0), at(50.0, 15.0));
        assert!(net.can_talk(&west, &east));
        net.partition(10.0);
        assert!(!net.can_talk(&west, &east));
        assert!(net.can_talk(&west, &west));
        net.heal();
        assert!(net.can_talk(&west, &east));
    }
}
