//! The discrete-event engine: one virtual clock, one heap of (time, sequence) events, many overlay nodes.
//!
//! Nodes are indexed by a dense `u32`; node `i` has `NodeId::from_u64(i)`. A node's wakeup is scheduled lazily
//! from `poll_timeout` and stale heap entries are skipped. Messages in flight live in a slab so heap entries stay
//! 24 bytes. Each message's exact CBOR size is summed by [`crate::wire_size`] without encoding it.

use crate::check::{NodeView, TreeCheck, check_tree, depth_bound};
use crate::experiment::{Client, ExperimentReport, Setup};
use crate::message_size::{LastSent, MessageSizes};
use crate::network::{Attachment, NetworkModel};
use crate::prefetch::{prefetch, prefetch_ranges};
use crate::queue::{EventQueue, Timed};
use crate::report::{
    AppliedEvent, ByRole, FinalState, MessageCounts, ProtocolCounters, Report, StateSizes, Stats, Violation,
};
use crate::scenario::{EventKind, Scenario, Target};
use crate::trace::{Tracer, describe, describe_event};
use canopy_overlay::routes::pool::block_size;
use canopy_overlay::{
    Capacity, Command, Config, Envelope, Event, Input, Node, NodeId, NodeInfo, Output, Position, Role,
};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the whole tree is checked during a run (cycles, depth, fanout).
const CHECK_INTERVAL_NS: u64 = 5_000_000_000;
/// `Simulation::armed` for a node with no wakeup queued: a plain `u64` takes half the cache of an `Option<u64>`, and
/// that array is read on every event (no time reaches it: `u64::MAX` ns is 584 years).
const NOT_ARMED: u64 = u64::MAX;
/// The byte ranges of a [`SimNode`] an input to it reads, bar a few lines: its own fields in front of the node, and
/// the node's hot parts (see [`Node::hot_ranges`]).
const HOT_SIM_NODE_RANGES: [(usize, usize); 3] = {
    let node = std::mem::offset_of!(SimNode, node);
    let [(a, a_len), (b, b_len)] = Node::hot_ranges();
    [(0, node), (node + a, a_len), (node + b, b_len)]
};
// The ranges above take the node at the start of its `Option` (no tag in front).
const _: () = assert!(size_of::<Option<Node>>() == size_of::<Node>());

/// At most this many violations are kept in the report (all are counted).
const MAX_VIOLATIONS: usize = 200;

/// Everything a run produces: the report, plus the raw data the plots need.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub report: Report,
    pub join_samples_ms: Vec<f64>,
    pub detection_samples_ms: Vec<f64>,
    pub reattach_samples_ms: Vec<f64>,
    pub failover_samples_ms: Vec<f64>,
    /// The final tree: every live node with its position, parent index and role.
    pub final_tree: Vec<TreeNode>,
    /// The capacity grid the (first) root holds for its whole tree at the end.
    pub root_grid: Option<canopy_policies::CapacityGrid>,
}

#[derive(Debug, Clone)]
pub struct TreeNode {
    pub index: usize,
    pub position: Position,
    pub parent: Option<usize>,
    pub role: Role,
    pub attached: bool,
}

/// Runs a scenario to its end. `name` only labels the report.
pub fn run(scenario: &Scenario, name: &str) -> Outcome {
    run_with_progress(scenario, name, |_| {})
}

/// How far a run has come: handed to the progress callback at every periodic tree check (each simulated 5 s).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub sim_seconds: f64,
    pub wall_seconds: f64,
    pub live: usize,
    pub messages_sent: u64,
}

/// Like [`run`], calling `progress` at every periodic check, so a long run shows its speed before it ends.
pub fn run_with_progress(scenario: &Scenario, name: &str, progress: impl FnMut(Progress)) -> Outcome {
    run_traced(scenario, name, progress, None)
}

/// Like [`run_with_progress`], handing what the nodes `tracer` traces do to its sink as the run goes.
pub fn run_traced(scenario: &Scenario, name: &str, progress: impl FnMut(Progress), tracer: Option<Tracer>) -> Outcome {
    let started = Instant::now();
    let mut sim = Simulation::new(scenario);
    sim.tracer = tracer;
    sim.run_reporting(started, progress);
    sim.finish(name, started.elapsed().as_secs_f64())
}

/// The overlay configuration a scenario asks for.
pub fn overlay_config(scenario: &Scenario) -> Config {
    let mut config = match scenario.overlay.heartbeat_ms {
        // Every timeout scales with the heartbeat interval.
        Some(ms) => Config::with_interval(Duration::from_millis(ms)),
        None => Config::default(),
    };
    if let Some(m) = scenario.overlay.max_children {
        config.max_children = m;
    }
    if let Some(size) = scenario.overlay.grid_size {
        config.grids.size = size;
    }
    if let Some(every) = scenario.overlay.grid_refresh {
        config.grids.refresh_every = every;
    }
    if let Some(every) = scenario.overlay.grid_outside_every {
        config.grids.outside_every = every;
    }
    if let Some(range) = scenario.overlay.platform_range {
        config.routes.platform_range = range;
    }
    if let Some(prefix) = scenario.overlay.machine_prefix {
        config.routes.machine_prefix = prefix;
    }
    config
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Scheduled {
    at: u64,
    seq: u64,
    what: What,
}

impl Timed for Scheduled {
    fn at(&self) -> u64 {
        self.at
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum What {
    /// Deliver the message in this slab slot.
    Deliver(u32),
    Wakeup(u32),
    /// Start (node 0) or join (the others) for the first time.
    Boot(u32),
    ScenarioEvent(u32),
    LeaveDone(u32),
    Check,
    /// The routes workload's next step.
    Routes,
    /// The closest experiment: every node learns its free capacity.
    SetCapacity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    NotStarted,
    Live,
    Leaving,
    Crashed,
    Left,
}

// In this order: what every event reads (`life`, `at`, `role`) and the node's own hot part come first, and only
// those are prefetched (see `Simulation::prefetch_upcoming`).
#[repr(C)]
struct SimNode {
    life: Life,
    /// Role and parent as last announced by the node's events.
    role: Role,
    at: Attachment,
    parent: Option<u32>,
    /// [`NetworkModel::path_ns`] to `parent`, taken when the parent changed: most messages are heartbeats and
    /// reports between a node and its parent, and the distance's trigonometry was a few percent of a run.
    parent_path_ns: f64,
    /// What the node sent last, to size its repeats (see [`LastSent`]); in front of the node with what an input to
    /// it reads, as its outputs are sized then.
    last_sent: LastSent,
    node: Option<Node>,
    info: NodeInfo,
    incarnation: u64,
    role_at_crash: Role,
    /// When the current join started, and whether it is a rejoin after a restart.
    joining_since: Option<(u64, bool)>,
    /// When the node first joined, until its first machine subnet is granted (for `subnet_ms`).
    subnet_wanted_since: Option<u64>,
    /// When the node entered its current traffic bucket (for node-seconds per role).
    bucket_since: u64,
}

impl SimNode {
    fn alive(&self) -> bool {
        matches!(self.life, Life::Live | Life::Leaving)
    }
}

/// Who sent a message in flight to whom, and its encoded length.
#[derive(Clone, Copy, Default)]
struct Route {
    from: u32,
    to: u32,
    bytes: u32,
}

/// What [`Simulation::feed`] hands the node before its due timers fire.
// Lives for one call on the stack; boxing the input would allocate for every command.
#[allow(clippy::large_enum_variant)]
enum Feed {
    Nothing,
    Input(Input),
    /// The message in this slab slot.
    Delivery(u32),
}

/// A crash whose orphans are not all attached again yet (for a root crash: or whose side has no single root yet).
struct PendingReattach {
    crashed: u32,
    since: u64,
    orphans: Vec<u32>,
    /// Orphans that have not declared the crashed node dead yet (for `detection_ms`).
    undetected: Vec<u32>,
    /// For failovers: the side of the partition the old root was on.
    component: usize,
}

#[derive(Default, Clone, Copy)]
struct Traffic {
    msgs: u64,
    bytes: u64,
    /// Bytes of capacity grids in sent messages (counted for the sender only).
    grid_bytes: u64,
    node_ns: u128,
}

pub struct Simulation {
    /// `--trace`: what chosen nodes receive, send and report.
    tracer: Option<Tracer>,
    scenario: Scenario,
    /// One configuration for every node: the bootstrap members are the first few (a node skips itself).
    config: Arc<Config>,
    now: u64,
    end: u64,
    seq: u64,
    queue: EventQueue<Scheduled>,
    /// Messages in flight, stored as the inputs their receivers take: the node is handed the slot's content, one
    /// copy of about 240 bytes, where taking the envelope out and wrapping it in an input took three (bench_10k user
    /// time 0.98, reports identical).
    slab: Vec<Option<Input>>,
    /// Each slab slot's sender, receiver and length, apart from the slot: `prefetch_upcoming` reads them for a
    /// message a few events ahead, and a slot (written when the message was sent) is rarely cached by then.
    slab_routes: Vec<Route>,
    free_slots: Vec<u32>,
    nodes: Vec<SimNode>,
    /// The wakeup in the queue for each node; other Wakeup entries are stale. Kept apart from the nodes' records,
    /// so a stale entry is dropped without loading its node: in bench_10k 98% of the wakeups queued are stale, as
    /// each parent heartbeat runs the child's tick and moves its next wakeup. [`NOT_ARMED`] for none.
    armed: Vec<u64>,
    /// Nodes `0..booted` have been started at least once.
    booted: u32,
    net: NetworkModel,
    net_rng: ChaCha8Rng,
    choice_rng: ChaCha8Rng,
    out_buf: VecDeque<Output>,
    /// `AllocationFailed` events from all nodes.
    allocation_failures: u64,
    /// `SubnetChanged` events from all nodes.
    machine_subnet_changes: u64,
    /// Live nodes whose last role event said Root.
    roots: BTreeSet<u32>,
    pending: Vec<PendingReattach>,
    join_samples: Vec<f64>,
    rejoin_samples: Vec<f64>,
    subnet_samples: Vec<f64>,
    reattach_samples: Vec<f64>,
    detection_samples: Vec<f64>,
    failover_samples: Vec<f64>,
    failovers: Vec<PendingReattach>,
    /// [leaf, coordinator]
    traffic: [Traffic; 2],
    counts: MessageCounts,
    kinds: crate::kinds::KindCounter,
    violations: Vec<Violation>,
    violations_total: usize,
    applied: Vec<AppliedEvent>,
    depth_max: usize,
    fanout_max: usize,
    experiment: Option<Setup>,
    route_load: Option<crate::route_load::RouteLoad>,
    /// Wire lengths of the parts messages share.
    sizes: MessageSizes,
    /// The protocol counters of nodes taken down (crashed or left), which a restart starts again from zero.
    retired_counters: ProtocolCounters,
}

fn bucket(role: Role) -> usize {
    match role {
        Role::Leaf | Role::Detached => 0,
        Role::Coordinator | Role::Root => 1,
    }
}

fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn node_id(index: u32) -> NodeId {
    NodeId::from_u64(u64::from(index))
}

/// Mixes the run seed with a stream number, so node RNGs and the engine's RNGs are independent.
fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Simulation {
    pub fn new(scenario: &Scenario) -> Self {
        let seed = scenario.seed;
        let mut setup_rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 1));
        let net = NetworkModel::new(&scenario.network, scenario.topology.as_ref());
        let count = scenario.nodes.count;
        let switches = net.assign_switches(count, &mut setup_rng);
        let [lat_min, lon_min, lat_max, lon_max] = scenario.nodes.region;
        let nodes = (0..count)
            .map(|i| {
                let position = Position::new(
                    lat_min + setup_rng.random::<f64>() * (lat_max - lat_min),
                    lon_min + setup_rng.random::<f64>() * (lon_max - lon_min),
                );
                let capacity = Capacity {
                    cpu: f64::from(setup_rng.random_range(1..=32u32)),
                    mem_mb: f64::from(setup_rng.random_range(1..=64u32) * 1024),
                    bandwidth_mbps: f64::from(setup_rng.random_range(1..=100u32) * 10),
                };
                let info = NodeInfo {
                    id: node_id(i as u32),
                    addrs: vec![format!("sim:{i}")],
                    position,
                    capacity,
                    reachable: setup_rng.random::<f64>() < 0.7,
                };
                SimNode {
                    node: None,
                    info,
                    at: Attachment::new(position, switches[i], 0),
                    life: Life::NotStarted,
                    incarnation: 0,
                    role: Role::Detached,
                    parent: None,
                    parent_path_ns: 0.0,
                    last_sent: LastSent::default(),
                    role_at_crash: Role::Detached,
                    joining_since: None,
                    subnet_wanted_since: None,
                    bucket_since: 0,
                }
            })
            .collect();
        let experiment = scenario.experiment.as_ref().map(|e| {
            let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 4));
            Setup::new(e, count, &mut rng)
        });
        let mut nodes: Vec<SimNode> = nodes;
        if let Some(setup) = &experiment {
            for (node, &access_ns) in nodes.iter_mut().zip(&setup.access_ns) {
                node.at.access_ns = access_ns;
            }
        }
        let mut sim = Simulation {
            scenario: scenario.clone(),
            config: Arc::new(Config {
                bootstrap: (0..scenario.nodes.bootstrap.min(count) as u32).map(node_id).collect(),
                ..overlay_config(scenario)
            }),
            now: 0,
            end: scenario.duration().as_nanos() as u64,
            seq: 0,
            queue: EventQueue::new(),
            slab: Vec::new(),
            slab_routes: Vec::new(),
            free_slots: Vec::new(),
            armed: vec![NOT_ARMED; nodes.len()],
            nodes,
            booted: 0,
            net,
            net_rng: ChaCha8Rng::seed_from_u64(derive_seed(seed, 2)),
            choice_rng: ChaCha8Rng::seed_from_u64(derive_seed(seed, 3)),
            out_buf: VecDeque::new(),
            allocation_failures: 0,
            machine_subnet_changes: 0,
            roots: BTreeSet::new(),
            pending: Vec::new(),
            join_samples: Vec::new(),
            rejoin_samples: Vec::new(),
            subnet_samples: Vec::new(),
            reattach_samples: Vec::new(),
            detection_samples: Vec::new(),
            failover_samples: Vec::new(),
            failovers: Vec::new(),
            traffic: [Traffic::default(); 2],
            counts: MessageCounts::default(),
            kinds: crate::kinds::KindCounter::default(),
            violations: Vec::new(),
            violations_total: 0,
            applied: Vec::new(),
            depth_max: 0,
            fanout_max: 0,
            route_load: scenario.routes.clone().map(|r| crate::route_load::RouteLoad::new(r, derive_seed(seed, 7))),
            sizes: MessageSizes::default(),
            retired_counters: ProtocolCounters::default(),
            tracer: None,
            experiment,
        };
        if let Some(e) = &scenario.experiment {
            sim.schedule((e.set_capacity_at_s * 1e9) as u64, What::SetCapacity);
        }
        let join_over_ns = scenario.nodes.join_over_s * 1e9;
        for i in 0..count {
            let at = (join_over_ns * i as f64 / count as f64) as u64;
            sim.schedule(at, What::Boot(i as u32));
        }
        for (i, event) in scenario.events.iter().enumerate() {
            sim.schedule((event.at_s * 1e9) as u64, What::ScenarioEvent(i as u32));
        }
        sim.schedule(CHECK_INTERVAL_NS, What::Check);
        if let Some(start) = sim.route_load.as_ref().map(|l| l.start_ns()) {
            sim.schedule(start, What::Routes);
        }
        sim
    }

    fn schedule(&mut self, at: u64, what: What) {
        self.seq += 1;
        self.queue.push(Scheduled { at, seq: self.seq, what });
    }

    pub fn run(&mut self) {
        self.run_reporting(Instant::now(), |_| {});
    }

    fn run_reporting(&mut self, started: Instant, mut progress: impl FnMut(Progress)) {
        loop {
            // A wakeup whose node was re-armed since is stale (about a third of bench_10k's events): dropped when its
            // bucket's turn comes, it is neither sorted nor popped, nor takes a slot `prefetch_upcoming` looks at
            // (user time 0.982, solo runs 0.982, reports identical). One that turns stale later is caught by `wakeup`;
            // a node re-armed back to a dropped entry's instant has a new entry pushed for it, so no wakeup is lost.
            let armed = &self.armed;
            let Some(next) =
                self.queue.peek_live(|e| !matches!(e.what, What::Wakeup(i) if armed[i as usize] != e.at)).copied()
            else {
                break;
            };
            if next.at > self.end {
                break;
            }
            self.queue.pop();
            self.prefetch_upcoming();
            self.now = next.at;
            match next.what {
                What::Deliver(slot) => self.deliver(slot),
                What::Wakeup(i) => self.wakeup(i, next.at),
                What::Boot(i) => self.boot(i),
                What::ScenarioEvent(e) => self.apply_event(e as usize),
                What::LeaveDone(i) => self.leave_done(i),
                What::SetCapacity => self.set_capacities(),
                What::Routes => self.routes_step(),
                What::Check => {
                    self.periodic_check();
                    self.schedule(self.now + CHECK_INTERVAL_NS, What::Check);
                    progress(Progress {
                        sim_seconds: self.now as f64 / 1e9,
                        wall_seconds: started.elapsed().as_secs_f64(),
                        live: self.nodes.iter().filter(|n| n.alive()).count(),
                        messages_sent: self.counts.sent,
                    });
                }
            }
        }
        self.now = self.end;
    }

    /// Starts loading the hot ranges of the record of the node that the fourth event from now goes to (see
    /// [`HOT_SIM_NODE_RANGES`]): a heartbeat reads lines spread over them, and at 10,000 nodes they are rarely still
    /// cached. For a message, its slab slot too, and the receiver from a list of its own, not from the slot: with the
    /// tree beating in step, 6% faster (bench_10k). For the second event from now, whose receiver's list of children
    /// has been loaded by then, the sender's record among them: a coordinator's reports waited for it. bench_10k user
    /// time 0.98 against the third event alone; the third and first 0.995, the sixth and third slower than the fourth
    /// and second. Events pushed meanwhile may come first.
    fn prefetch_upcoming(&self) {
        if let Some(Scheduled { what: What::Deliver(slot), .. }) = self.queue.ahead(1)
            && let Route { from, to, .. } = self.slab_routes[*slot as usize]
            && let Some(node) = &self.nodes[to as usize].node
            && let Some(record) = node.sender_record(&node_id(from))
        {
            prefetch(record);
        }
        let Some(event) = self.queue.ahead(3) else { return };
        let target = match event.what {
            What::Deliver(slot) => {
                prefetch(&self.slab[slot as usize]);
                Some(self.slab_routes[slot as usize].to)
            }
            What::Wakeup(i) if self.armed[i as usize] == event.at => Some(i),
            _ => None,
        };
        if let Some(i) = target {
            prefetch_ranges(&self.nodes[i as usize], &HOT_SIM_NODE_RANGES);
            // Its wakeup time too, read when the event re-arms it: an array of 80 KB at 10,000 nodes, read at random.
            prefetch(&self.armed[i as usize]);
        }
    }

    fn now_time(&self) -> Duration {
        Duration::from_nanos(self.now)
    }

    fn violation(&mut self, node: Option<u32>, kind: &str, detail: String) {
        self.violations_total += 1;
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(Violation {
                t_s: self.now as f64 / 1e9,
                node: node.map(|n| n as usize),
                kind: kind.to_string(),
                detail,
            });
        }
    }

    // ---- driving nodes -------------------------------------------------------------------------------------

    /// Feeds one input, fires a due timer, drains outputs and re-arms the wakeup.
    fn feed(&mut self, i: u32, input: Feed) {
        let now = self.now_time();
        if self.nodes[i as usize].node.is_none() {
            if let Feed::Delivery(slot) = input {
                self.slab[slot as usize] = None;
            }
            return;
        }
        if self.tracer.as_ref().is_some_and(|t| t.traces(i)) {
            let given = match &input {
                Feed::Nothing => None,
                Feed::Input(input) => Some(input),
                Feed::Delivery(slot) => self.slab[*slot as usize].as_ref(),
            };
            if let Some(Input::Message { from, envelope }) = given {
                let line = format!("<- {} {}", self.name(from), describe(&envelope.body, |id| self.name(id)));
                self.trace(i, |_| line);
            }
        }
        let node = self.nodes[i as usize].node.as_mut().expect("checked above");
        // The node writes its outputs to the engine's queue, used a moment ago, instead of its own.
        let mut outputs = std::mem::take(&mut self.out_buf);
        node.swap_outputs(&mut outputs);
        if !outputs.is_empty() {
            // Outputs queued outside a feed (none are, as it stands): the node keeps its queue, so they go first.
            node.swap_outputs(&mut outputs);
        }
        match input {
            Feed::Nothing => {}
            Feed::Input(input) => node.handle(now, input),
            Feed::Delivery(slot) => {
                node.handle(now, self.slab[slot as usize].take().expect("each slot is delivered once"));
            }
        }
        let mut timeout = node.poll_timeout();
        if timeout.is_some_and(|t| t <= now) {
            node.handle_timeout(now);
            timeout = node.poll_timeout();
        }
        node.swap_outputs(&mut outputs);
        // Each send reads its receiver's attachment, rarely cached: ask for all of them first, so that a
        // coordinator's heartbeats to its children wait for them together, not one after another.
        for out in &outputs {
            if let Output::Send { to, .. } = out
                && let Some(to) = self.index_of(to)
            {
                prefetch(&self.nodes[to as usize].at);
            }
        }
        for out in outputs.drain(..) {
            match out {
                Output::Send { to, envelope } => self.send(i, to, envelope),
                Output::Event(event) => self.on_event(i, event),
            }
        }
        self.out_buf = outputs;
        self.arm(i, timeout);
    }

    /// Queues a wakeup for node `i` at `timeout`, its [`Node::poll_timeout`] (sending its outputs left the node as
    /// it was), unless one is queued for that instant already.
    fn arm(&mut self, i: u32, timeout: Option<Duration>) {
        debug_assert_eq!(self.nodes[i as usize].node.as_ref().and_then(Node::poll_timeout), timeout);
        // A timer in the past fires at the current instant, after what is already queued for it.
        let wanted = timeout.map_or(NOT_ARMED, |t| (t.as_nanos() as u64).max(self.now));
        if wanted != self.armed[i as usize] {
            self.armed[i as usize] = wanted;
            if wanted != NOT_ARMED {
                self.schedule(wanted, What::Wakeup(i));
            }
        }
    }

    fn wakeup(&mut self, i: u32, at: u64) {
        if self.armed[i as usize] != at || !self.nodes[i as usize].alive() {
            return; // stale entry
        }
        self.armed[i as usize] = NOT_ARMED;
        self.feed(i, Feed::Nothing);
    }

    fn send(&mut self, from: u32, to: NodeId, envelope: Envelope) {
        self.trace(from, |sim| format!("-> {} {}", sim.name(&to), describe(&envelope.body, |id| sim.name(id))));
        let (bytes, grid_bytes) = self.sizes.sized(&envelope, &mut self.nodes[from as usize].last_sent);
        let bytes = bytes as u32;
        self.counts.sent += 1;
        self.counts.bytes_sent += u64::from(bytes);
        self.kinds.count(&envelope.body, bytes as usize);
        let b = bucket(self.nodes[from as usize].role);
        self.traffic[b].msgs += 1;
        self.traffic[b].bytes += u64::from(bytes);
        self.traffic[b].grid_bytes += grid_bytes as u64;
        let Some(to) = self.index_of(&to) else {
            self.counts.dropped_unknown += 1;
            return;
        };
        if self.net.lost(&mut self.net_rng) {
            self.counts.dropped_loss += 1;
            return;
        }
        let (a, b) = (self.nodes[from as usize].at, self.nodes[to as usize].at);
        if !self.net.can_talk(&a, &b) {
            self.counts.dropped_partition += 1;
            return;
        }
        let path_ns = self.path_ns(from, to);
        let latency = self.net.latency_over_ns(path_ns, &a, &b, &mut self.net_rng);
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slab.push(None);
            self.slab_routes.push(Route::default());
            (self.slab.len() - 1) as u32
        });
        self.slab_routes[slot as usize] = Route { from, to, bytes };
        self.slab[slot as usize] = Some(Input::Message { from: node_id(from), envelope });
        self.schedule(self.now + latency, What::Deliver(slot));
    }

    /// [`NetworkModel::path_ns`] between two nodes, kept for a node and its parent.
    fn path_ns(&self, from: u32, to: u32) -> f64 {
        let (sender, receiver) = (&self.nodes[from as usize], &self.nodes[to as usize]);
        if receiver.parent == Some(from) {
            receiver.parent_path_ns
        } else if sender.parent == Some(to) {
            sender.parent_path_ns
        } else {
            self.net.path_ns(&sender.at, &receiver.at)
        }
    }

    fn deliver(&mut self, slot: u32) {
        let Route { from, to, bytes } = self.slab_routes[slot as usize];
        let from = from as usize;
        // Freed before the feed, which empties the slot before the node's answers can take it.
        self.free_slots.push(slot);
        if !self.nodes[to as usize].alive() {
            self.slab[slot as usize] = None;
            self.counts.dropped_dead += 1;
            return;
        }
        if !self.net.can_talk(&self.nodes[from].at, &self.nodes[to as usize].at) {
            self.slab[slot as usize] = None;
            self.counts.dropped_partition += 1;
            return;
        }
        self.counts.delivered += 1;
        let b = bucket(self.nodes[to as usize].role);
        self.traffic[b].msgs += 1;
        self.traffic[b].bytes += u64::from(bytes);
        self.feed(to, Feed::Delivery(slot));
    }

    /// Hands `what` to the tracer when it traces node `i` (built only then).
    fn trace(&mut self, i: u32, what: impl FnOnce(&Self) -> String) {
        if self.tracer.as_ref().is_some_and(|t| t.traces(i)) {
            let line = what(self);
            let now = self.now;
            self.tracer.as_mut().expect("checked above").emit(now, i, line);
        }
    }

    /// `n<index>` for a simulated node, the id itself for anything else.
    fn name(&self, id: &NodeId) -> String {
        self.index_of(id).map_or_else(|| id.to_string(), |i| format!("n{i}"))
    }

    fn index_of(&self, id: &NodeId) -> Option<u32> {
        let bytes: [u8; 8] = id.as_bytes().try_into().ok()?;
        let index = u64::from_be_bytes(bytes);
        (index < self.nodes.len() as u64).then_some(index as u32)
    }

    // ---- lifecycle -----------------------------------------------------------------------------------------

    fn bring_up(&mut self, i: u32) {
        let seed = derive_seed(self.scenario.seed, 1000 + u64::from(i) * 1000 + self.nodes[i as usize].incarnation);
        let now = self.now_time();
        let n = &mut self.nodes[i as usize];
        n.incarnation += 1;
        n.node = Some(Node::new(n.info.clone(), Arc::clone(&self.config), seed, now));
        n.life = Life::Live;
        self.armed[i as usize] = NOT_ARMED;
        n.role = Role::Detached;
        n.parent = None;
        n.bucket_since = self.now;
    }

    /// A random live member that is in a tree, else any other live node. Nodes boot in index order, so members
    /// are among `0..booted`; random tries make a join O(1) even in a large network, a scan covers the rare rest.
    fn pick_member(&mut self, except: u32) -> Option<u32> {
        let n = self.booted;
        if n == 0 {
            return None;
        }
        let usable = |s: &Self, j: u32, in_tree: bool| {
            let node = &s.nodes[j as usize];
            j != except && node.life == Life::Live && (!in_tree || node.role != Role::Detached)
        };
        for _ in 0..32 {
            let j = self.choice_rng.random_range(0..n);
            if usable(self, j, true) {
                return Some(j);
            }
        }
        for in_tree in [true, false] {
            let candidates: Vec<u32> = (0..n).filter(|&j| usable(self, j, in_tree)).collect();
            if let Some(&j) = candidates.choose(&mut self.choice_rng) {
                return Some(j);
            }
        }
        None
    }

    fn boot(&mut self, i: u32) {
        if self.nodes[i as usize].life != Life::NotStarted {
            return; // crashed or otherwise handled before its turn
        }
        self.booted = self.booted.max(i + 1);
        self.bring_up(i);
        self.start_or_join(i, false);
    }

    fn start_or_join(&mut self, i: u32, rejoin: bool) {
        let command = match self.pick_member(i) {
            Some(via) if i != 0 || rejoin => {
                self.nodes[i as usize].joining_since = Some((self.now, rejoin));
                if !rejoin {
                    self.nodes[i as usize].subnet_wanted_since = Some(self.now);
                }
                Command::Join { via: node_id(via) }
            }
            _ => Command::Start,
        };
        self.feed(i, Feed::Input(Input::Command(command)));
    }

    /// Closes the node's traffic accounting for the time it spent in its current bucket.
    fn close_bucket(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        if n.alive() {
            self.traffic[bucket(n.role)].node_ns += u128::from(self.now - n.bucket_since);
        }
        n.bucket_since = self.now;
    }

    fn take_down(&mut self, i: u32, life: Life) {
        self.close_bucket(i);
        let n = &mut self.nodes[i as usize];
        n.role_at_crash = n.role;
        if let Some(node) = n.node.take() {
            self.retired_counters.add(node.counters(), node.routing().counters());
        }
        n.life = life;
        self.armed[i as usize] = NOT_ARMED;
        n.role = Role::Detached;
        n.parent = None;
        n.joining_since = None;
        n.subnet_wanted_since = None;
        self.roots.remove(&i);
        for p in self.pending.iter_mut().chain(self.failovers.iter_mut()) {
            p.orphans.retain(|&o| o != i);
        }
        self.settle_pending();
    }

    fn crash(&mut self, i: u32) {
        if !self.nodes[i as usize].alive() {
            return;
        }
        let role = self.nodes[i as usize].role;
        let orphans: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&j| self.nodes[j as usize].alive() && self.nodes[j as usize].parent == Some(i))
            .collect();
        let component = self.net.component(&self.nodes[i as usize].at);
        self.trace(i, |_| "crashed".into());
        self.take_down(i, Life::Crashed);
        let undetected = orphans.clone();
        let pending = PendingReattach { crashed: i, since: self.now, orphans, undetected, component };
        if role == Role::Root {
            let orphans = pending.orphans.clone();
            self.failovers.push(PendingReattach { orphans, undetected: Vec::new(), ..pending });
        }
        if !pending.orphans.is_empty() {
            self.pending.push(pending);
        }
        self.settle_pending();
    }

    fn restart(&mut self, i: u32) {
        if self.nodes[i as usize].life != Life::Crashed {
            return;
        }
        self.trace(i, |_| "restarted".into());
        self.bring_up(i);
        self.start_or_join(i, true);
    }

    fn leave(&mut self, i: u32) {
        if self.nodes[i as usize].life != Life::Live {
            return;
        }
        self.nodes[i as usize].life = Life::Leaving;
        self.trace(i, |_| "leaving".into());
        self.feed(i, Feed::Input(Input::Command(Command::Leave)));
        let grace = (self.scenario.nodes.leave_grace_s * 1e9) as u64;
        self.schedule(self.now + grace, What::LeaveDone(i));
    }

    fn leave_done(&mut self, i: u32) {
        if self.nodes[i as usize].life == Life::Leaving {
            self.take_down(i, Life::Left);
        }
    }

    // ---- events from nodes ---------------------------------------------------------------------------------

    fn on_event(&mut self, i: u32, event: Event) {
        self.trace(i, |sim| describe_event(&event, |id| sim.name(id)));
        match event {
            Event::RoleChanged { role, .. } => {
                self.close_bucket(i);
                self.nodes[i as usize].role = role;
                if role == Role::Root {
                    self.roots.insert(i);
                } else {
                    self.roots.remove(&i);
                }
                self.settle_pending();
            }
            Event::ParentChanged { parent } => {
                let parent_index = parent.as_ref().map(|p| self.index_of(p).unwrap_or(u32::MAX));
                self.nodes[i as usize].parent = parent_index;
                if let Some(p) = parent_index.and_then(|p| self.nodes.get(p as usize)) {
                    self.nodes[i as usize].parent_path_ns = self.net.path_ns(&self.nodes[i as usize].at, &p.at);
                }
                if parent_index.is_some()
                    && let Some((since, rejoin)) = self.nodes[i as usize].joining_since.take()
                {
                    let ms = ns_to_ms(self.now - since);
                    if rejoin { self.rejoin_samples.push(ms) } else { self.join_samples.push(ms) }
                }
                self.settle_pending();
            }
            Event::ParentFailed(failed) => {
                for p in self.pending.iter_mut().filter(|p| node_id(p.crashed) == failed) {
                    if let Some(k) = p.undetected.iter().position(|&o| o == i) {
                        p.undetected.swap_remove(k);
                        self.detection_samples.push(ns_to_ms(self.now - p.since));
                    }
                }
            }
            Event::Route(e) => {
                match e {
                    canopy_overlay::routing::RouteEvent::AllocationFailed { .. } => self.allocation_failures += 1,
                    canopy_overlay::routing::RouteEvent::SubnetChanged { .. } => self.machine_subnet_changes += 1,
                    canopy_overlay::routing::RouteEvent::SubnetGranted { .. } => {
                        if let Some(since) = self.nodes[i as usize].subnet_wanted_since.take() {
                            self.subnet_samples.push(ns_to_ms(self.now - since));
                        }
                    }
                    _ => {}
                }
                self.route_event(i, &e)
            }
            _ => {}
        }
    }

    /// Whether node `o` counts as attached again after `crashed` went down.
    fn reattached(&self, o: u32, crashed: u32) -> bool {
        let n = &self.nodes[o as usize];
        match n.parent {
            _ if n.role == Role::Root => true,
            Some(p) => p != crashed && self.nodes.get(p as usize).is_some_and(SimNode::alive),
            None => false,
        }
    }

    /// Completes re-attach and failover measurements whose conditions now hold.
    fn settle_pending(&mut self) {
        if self.pending.is_empty() && self.failovers.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.retain_mut(|p| {
            p.orphans.retain(|&o| !self.reattached(o, p.crashed));
            if p.orphans.is_empty() {
                self.reattach_samples.push(ns_to_ms(self.now - p.since));
            }
            !p.orphans.is_empty()
        });
        self.pending = pending;
        let mut failovers = std::mem::take(&mut self.failovers);
        failovers.retain_mut(|f| {
            f.orphans.retain(|&o| !self.reattached(o, f.crashed));
            let component = f.component;
            let roots_here = self
                .roots
                .iter()
                .filter(|&&r| {
                    self.nodes[r as usize].alive() && self.net.component(&self.nodes[r as usize].at) == component
                })
                .count();
            let done = roots_here == 1 && f.orphans.is_empty();
            if done {
                self.failover_samples.push(ns_to_ms(self.now - f.since));
            }
            !done
        });
        self.failovers = failovers;
    }

    // ---- scenario events -----------------------------------------------------------------------------------

    fn apply_event(&mut self, e: usize) {
        let event = self.scenario.events[e].clone();
        let mut hit = Vec::new();
        match event.kind {
            EventKind::Crash | EventKind::Restart | EventKind::Leave => {
                let target = event.target.expect("validated: crash/restart/leave have a target");
                hit = self.resolve_target(event.kind, target);
                for &i in &hit {
                    match event.kind {
                        EventKind::Crash => self.crash(i),
                        EventKind::Restart => self.restart(i),
                        _ => self.leave(i),
                    }
                }
            }
            EventKind::Partition => {
                self.net.partition(event.split_lon.expect("validated: partition has split_lon"));
            }
            EventKind::Heal => self.net.heal(),
        }
        if hit.is_empty() && matches!(event.kind, EventKind::Crash | EventKind::Restart | EventKind::Leave) {
            self.violation(None, "empty_target", format!("{:?} {:?} matched no node", event.kind, event.target));
        }
        self.applied.push(AppliedEvent {
            t_s: self.now as f64 / 1e9,
            kind: format!("{:?}", event.kind).to_lowercase(),
            target: event.target.map(|t| t.to_string()),
            nodes: hit.iter().map(|&i| i as usize).collect(),
        });
    }

    fn resolve_target(&mut self, kind: EventKind, target: Target) -> Vec<u32> {
        let restart = kind == EventKind::Restart;
        let eligible: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&i| {
                let n = &self.nodes[i as usize];
                if restart { n.life == Life::Crashed } else { n.life == Life::Live }
            })
            .collect();
        let role_of = |n: &SimNode| if restart { n.role_at_crash } else { n.role };
        let mut pick = |mut from: Vec<u32>, k: usize| {
            from.shuffle(&mut self.choice_rng);
            from.truncate(k);
            from.sort_unstable();
            from
        };
        match target {
            Target::All => eligible,
            Target::Index(i) => eligible.into_iter().filter(|&j| j as usize == i).collect(),
            Target::Random(k) => pick(eligible, k),
            Target::Root => {
                let roots: Vec<u32> =
                    eligible.into_iter().filter(|&i| role_of(&self.nodes[i as usize]) == Role::Root).collect();
                if restart { roots } else { roots.into_iter().take(1).collect() }
            }
            Target::Coordinators(k) => {
                let coords: Vec<u32> =
                    eligible.into_iter().filter(|&i| role_of(&self.nodes[i as usize]) == Role::Coordinator).collect();
                pick(coords, k)
            }
        }
    }

    // ---- global checks -------------------------------------------------------------------------------------

    fn views(&self) -> Vec<Option<NodeView>> {
        self.nodes
            .iter()
            .map(|n| {
                if n.life != Life::Live {
                    return None;
                }
                // Role and parent only: `status()` would copy counters and lists for every node on every check.
                let node = n.node.as_ref()?;
                Some(NodeView {
                    role: node.role(),
                    parent: node.parent().map(|p| self.index_of(&p).map_or(usize::MAX, |i| i as usize)),
                    component: self.net.component(&n.at),
                })
            })
            .collect()
    }

    fn periodic_check(&mut self) {
        let check = check_tree(&self.views());
        for &c in &check.cycles {
            self.violation(Some(c as u32), "cycle", "parent pointers form a cycle through this node".into());
        }
        self.depth_max = self.depth_max.max(check.depth_max);
        self.fanout_max = self.fanout_max.max(check.fanout_max);
    }

    /// The routes workload acts: deployments, instances, queries, churn.
    fn routes_step(&mut self) {
        let Some(mut load) = self.route_load.take() else { return };
        let live: Vec<u32> = (0..self.nodes.len() as u32).filter(|&i| self.nodes[i as usize].alive()).collect();
        let nodes = &self.nodes;
        let node = |i: u32| nodes.get(i as usize).filter(|n| n.alive()).and_then(|n| n.node.as_ref());
        let (commands, next) = load.step(self.now, &live, &node);
        self.route_load = Some(load);
        for (i, cmd) in commands {
            self.feed(i, Feed::Input(Input::Command(Command::Route(cmd))));
        }
        if let Some(next) = next {
            self.schedule(next, What::Routes);
        }
    }

    fn route_event(&mut self, i: u32, event: &canopy_overlay::routing::RouteEvent) {
        let Some(mut load) = self.route_load.take() else { return };
        let commands = {
            let live: Vec<u32> = match event {
                canopy_overlay::routing::RouteEvent::ServiceDeployed { .. } => {
                    (0..self.nodes.len() as u32).filter(|&i| self.nodes[i as usize].alive()).collect()
                }
                _ => Vec::new(),
            };
            let nodes = &self.nodes;
            let node = |i: u32| nodes.get(i as usize).filter(|n| n.alive()).and_then(|n| n.node.as_ref());
            load.on_event(self.now, i, event, &live, &node)
        };
        self.route_load = Some(load);
        for (host, cmd) in commands {
            self.feed(host, Feed::Input(Input::Command(Command::Route(cmd))));
        }
    }

    /// Subnet and ServiceIP conflicts among the live nodes of each tree, and the routes workload's report.
    fn route_report(&mut self, state: &mut FinalState) -> Option<crate::route_load::RoutesReport> {
        let parents: Vec<Option<usize>> = self.views().iter().map(|v| v.and_then(|v| v.parent)).collect();
        let nodes: Vec<Option<&Node>> =
            self.nodes.iter().map(|n| if n.alive() { n.node.as_ref() } else { None }).collect();
        let (subnets, service_ips) = crate::route_load::conflicts(&nodes, &parents, self.now);
        state.subnet_conflicts = subnets;
        state.serviceip_conflicts = service_ips;
        let node = |i: u32| nodes.get(i as usize).copied().flatten();
        self.route_load.take().map(|l| l.report(self.now, &node))
    }

    fn final_check(&mut self) -> (FinalState, TreeCheck) {
        let views = self.views();
        let check = check_tree(&views);
        let largest = check.component_sizes.iter().copied().max().unwrap_or(0);
        let bound = depth_bound(largest, self.config.max_children);
        let sides: Vec<usize> = (0..check.component_sizes.len()).filter(|&c| check.component_sizes[c] > 0).collect();
        for &c in &sides {
            let roots = &check.roots[c];
            if roots.len() != 1 {
                self.violation(
                    roots.first().map(|&r| r as u32),
                    "roots",
                    format!(
                        "component {c} ({} live nodes) has {} roots: {:?}",
                        check.component_sizes[c],
                        roots.len(),
                        roots
                    ),
                );
            }
        }
        for &u in &check.unattached {
            let parent = views[u].and_then(|v| v.parent);
            self.violation(
                Some(u as u32),
                "unattached",
                format!("parent chain does not reach a root (parent {parent:?})"),
            );
        }
        for &c in &check.cycles {
            self.violation(Some(c as u32), "cycle", "parent pointers form a cycle through this node".into());
        }
        if let (Some(bound), Some(deepest)) = (bound, check.deepest)
            && check.depth_max > bound
        {
            self.violation(Some(deepest as u32), "depth", format!("depth {} exceeds bound {bound}", check.depth_max));
        }
        if check.fanout_max > self.config.max_children {
            let widest = check.widest.map(|w| w as u32);
            let detail = format!("{} children, max_children {}", check.fanout_max, self.config.max_children);
            self.violation(widest, "fanout", detail);
        }
        let stuck: Vec<(u32, String)> = self
            .pending
            .iter()
            .flat_map(|p| {
                let detail =
                    format!("orphan of node {} crashed at {:.3}s never re-attached", p.crashed, p.since as f64 / 1e9);
                p.orphans.iter().map(move |&o| (o, detail.clone()))
            })
            .collect();
        for (orphan, detail) in stuck {
            self.violation(Some(orphan), "reattach", detail);
        }
        self.depth_max = self.depth_max.max(check.depth_max);
        self.fanout_max = self.fanout_max.max(check.fanout_max);
        let state = FinalState {
            live: check.component_sizes.iter().sum(),
            component_sizes: sides.iter().map(|&c| check.component_sizes[c]).collect(),
            roots_per_component: sides.iter().map(|&c| check.roots[c].len()).collect(),
            unattached: check.unattached.len(),
            cycles: check.cycles.len(),
            tree_depth: check.depth_max,
            depth_bound: bound,
            fanout_max: check.fanout_max,
            nodes_by_children: check.nodes_by_children.clone(),
            subnet_conflicts: 0,
            serviceip_conflicts: 0,
        };
        (state, check)
    }

    /// Every live node learns its free capacity: saturated instances none, the others a random share of theirs.
    fn set_capacities(&mut self) {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.scenario.seed, 5));
        for i in 0..self.nodes.len() as u32 {
            let saturated = self.experiment.as_ref().is_some_and(|e| e.is_saturated_instance(i as usize));
            let total = self.nodes[i as usize].info.capacity;
            let share = 0.2 + 0.8 * rng.random::<f64>();
            let free = if saturated {
                Capacity::ZERO
            } else {
                Capacity::new(total.cpu * share, total.mem_mb * share, total.bandwidth_mbps * share)
            };
            if self.nodes[i as usize].alive() {
                self.feed(i, Feed::Input(Input::Command(Command::SetCapacity(free))));
            }
        }
    }

    /// Per-node protocol state over the live nodes.
    fn state_sizes(&self) -> StateSizes {
        let mut sizes = StateSizes {
            allocation_failures: self.allocation_failures,
            machine_subnet_changes: self.machine_subnet_changes,
            ..StateSizes::default()
        };
        let (mut total, mut live) = (0usize, 0usize);
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(node) = n.node.as_ref().filter(|_| n.alive()) else { continue };
            let routing = node.routing();
            let pool = routing.pool();
            let grants = pool.grants().count();
            live += 1;
            total += grants;
            if grants > sizes.pool_grants_max {
                sizes.pool_grants_max = grants;
                sizes.pool_grants_max_node = Some(i);
            }
            let mut per_holder: std::collections::HashMap<NodeId, usize> = std::collections::HashMap::new();
            for g in pool.grants() {
                *per_holder.entry(g.holder).or_default() += 1;
            }
            sizes.grants_per_holder_max =
                sizes.grants_per_holder_max.max(per_holder.values().copied().max().unwrap_or(0));
            sizes.pool_owned_max = sizes.pool_owned_max.max(pool.owned().len());
            sizes.registry_entries_max = sizes.registry_entries_max.max(routing.registry().len());
            sizes.cache_entries_max = sizes.cache_entries_max.max(routing.cache().len());
            sizes.machine_addresses +=
                routing.machine_subnets().iter().map(|m| block_size(m.prefix_len())).sum::<u64>();
            sizes.machines_without_subnet += usize::from(routing.machine_subnets().is_empty());
            if node.role() == canopy_overlay::Role::Root {
                sizes.root_granted_addresses += pool.grants().map(|g| block_size(g.block.prefix_len())).sum::<u64>();
            } else {
                sizes.idle_pool_addresses += pool.free_addresses();
            }
        }
        sizes.pool_grants_mean = if live == 0 { 0.0 } else { total as f64 / live as f64 };
        sizes
    }

    /// The counters of the nodes taken down during the run and of those still up.
    fn protocol_counters(&self) -> ProtocolCounters {
        let mut sum = self.retired_counters.clone();
        for node in self.nodes.iter().filter_map(|n| n.node.as_ref()) {
            sum.add(node.counters(), node.routing().counters());
        }
        sum
    }

    /// Scores the routing policies on what the nodes hold at the end of the run.
    fn run_experiment(&mut self) -> Option<ExperimentReport> {
        let setup = self.experiment.clone()?;
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].alive()).collect();
        let positions: Vec<Position> = self.nodes.iter().map(|n| n.at.position()).collect();
        let attachments: Vec<Attachment> = self.nodes.iter().map(|n| n.at).collect();
        let net = self.net.clone();
        let rtt = move |a: usize, b: usize| net.rtt_ms(&attachments[a], &attachments[b]);
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.scenario.seed, 6));
        let nodes = &mut self.nodes;
        let mut client = |i: usize| -> Option<Client> {
            let sim_node = nodes.get_mut(i)?;
            let position = sim_node.at.position();
            let node = sim_node.node.as_mut()?;
            Some(Client { position, grids: node.grids().held().to_vec(), own_free: node.grids().own_free() })
        };
        Some(crate::experiment::evaluate(&setup, &mut client, &live, &positions, &rtt, &mut rng))
    }

    pub fn finish(mut self, name: &str, wall_seconds: f64) -> Outcome {
        for i in 0..self.nodes.len() as u32 {
            self.close_bucket(i);
        }
        let (mut final_state, check) = self.final_check();
        let routes = self.route_report(&mut final_state);
        let sim_seconds = self.end as f64 / 1e9;
        let per_node_s = |t: &Traffic, v: u64| if t.node_ns == 0 { 0.0 } else { v as f64 / (t.node_ns as f64 / 1e9) };
        let all = Traffic {
            msgs: self.traffic[0].msgs + self.traffic[1].msgs,
            bytes: self.traffic[0].bytes + self.traffic[1].bytes,
            grid_bytes: self.traffic[0].grid_bytes + self.traffic[1].grid_bytes,
            node_ns: self.traffic[0].node_ns + self.traffic[1].node_ns,
        };
        let by_role = |f: &dyn Fn(&Traffic) -> u64| ByRole {
            leaf: per_node_s(&self.traffic[0], f(&self.traffic[0])),
            coordinator: per_node_s(&self.traffic[1], f(&self.traffic[1])),
            all: per_node_s(&all, f(&all)),
        };
        let msgs = by_role(&|t| t.msgs);
        let bytes = by_role(&|t| t.bytes);
        let grid_bytes = by_role(&|t| t.grid_bytes);
        let closest_experiment = self.run_experiment();
        let joins_incomplete = self.nodes.iter().filter(|n| n.joining_since.is_some_and(|(_, r)| !r)).count();
        let rejoins_incomplete = self.nodes.iter().filter(|n| n.joining_since.is_some_and(|(_, r)| r)).count();
        let subnets_incomplete = self.nodes.iter().filter(|n| n.subnet_wanted_since.is_some()).count();
        let reattach_incomplete = self.pending.iter().filter(|p| !p.orphans.is_empty()).count();
        let report = Report {
            scenario: name.to_string(),
            nodes: self.nodes.len(),
            seed: self.scenario.seed,
            sim_seconds,
            wall_seconds,
            heartbeat_ms: self.config.heartbeat_interval.as_millis() as u64,
            max_children: self.config.max_children,
            join_ms: Stats::from_samples(&self.join_samples, joins_incomplete),
            rejoin_ms: Stats::from_samples(&self.rejoin_samples, rejoins_incomplete),
            subnet_ms: Stats::from_samples(&self.subnet_samples, subnets_incomplete),
            detection_ms: Stats::from_samples(&self.detection_samples, 0),
            reattach_ms: Stats::from_samples(&self.reattach_samples, reattach_incomplete),
            root_failover_ms: Stats::from_samples(&self.failover_samples, self.failovers.len()),
            r#final: final_state,
            tree_depth_max: self.depth_max,
            fanout_max: self.fanout_max,
            msgs_per_node_per_s: msgs,
            bytes_per_node_per_s: bytes,
            grid_bytes_per_node_per_s: grid_bytes,
            closest_experiment,
            messages: MessageCounts { by_kind: self.kinds.report(all.node_ns as f64 / 1e9), ..self.counts.clone() },
            applied_events: std::mem::take(&mut self.applied),
            violations_total: self.violations_total,
            violations: std::mem::take(&mut self.violations),
            routes,
            state_sizes: self.state_sizes(),
            counters: self.protocol_counters(),
        };
        let views = self.views();
        let final_tree = views
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let v = (*v)?;
                Some(TreeNode {
                    index: i,
                    position: self.nodes[i].at.position(),
                    parent: v.parent.filter(|&p| p < self.nodes.len()),
                    role: v.role,
                    attached: check.depth[i].is_some(),
                })
            })
            .collect();
        let root_grid = self.roots.iter().next().and_then(|&r| {
            let node = self.nodes[r as usize].node.as_mut()?;
            Some(node.grids().subtree().clone())
        });
        Outcome {
            root_grid,
            report,
            join_samples_ms: self.join_samples,
            detection_samples_ms: self.detection_samples,
            reattach_samples_ms: self.reattach_samples,
            failover_samples_ms: self.failover_samples,
            final_tree,
        }
    }
}
