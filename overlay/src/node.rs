//! The overlay node state machine: joins, heartbeats, failure detection, succession, splits, leaves, partitions.
//!
//! Protocol summary (see `DESIGN.md`, "The tree"):
//! - A joiner sends `JoinRequest` to any member; it goes up to the root, then down towards the nearest balanced
//!   subtree until a coordinator with room answers `Accept` (parent, ancestor chain, term, member list).
//! - Parents send children `Heartbeat`s (full view only when a child reports an older version); children send
//!   `Report`s with their rank and a subtree summary. A parent's periodic heartbeat starts its child's own round (the
//!   report up, and a coordinator's heartbeats down), so the tree beats in step with its root; a node's own timer
//!   takes over when its parent's heartbeats stop.
//! - A child that misses heartbeats probes its parent directly and through a few siblings; when nobody reaches it,
//!   all children compute the same successor (highest rank) from the member list. The successor takes the term
//!   + 1 and attaches to the grandparent (or further up, or becomes an island root); the others attach to it.
//! - Roots retry known contacts; two trees merge so that the higher (term, id) root stays root.

use crate::Time;
use crate::children::{Child, Children};
use crate::dedup::{Dedup, Window};
use crate::failure::{Detector, Verdict};
use crate::grids::{GridConfig, Grids, PlacementCandidate, PlacementStep};
use crate::id::NodeId;
use crate::join::choose_descent;
use crate::membership::choose_successor;
use crate::message::{
    Accept, Attach, Envelope, Heartbeat, JoinRequest, MAX_ANCESTORS, Member, Message, NotYourChild, Refuse, Report,
    RootClaim, View,
};
use crate::rank::Rank;
use crate::routing::{RouteCommand, RouteEvent, Routing, RoutingConfig, TreeCtx};
use crate::split::{Candidate, split_group};
use crate::summary::Summary;
use canopy_policies::{Capacity, Position};
use ipnet::Ipv4Net;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Join requests travelling further than this are dropped (a loop in stale state).
const MAX_HOPS: u8 = 64;
/// Contacts a node keeps for rejoining and merging after partitions.
const MAX_CONTACTS: usize = 48;
/// Retry intervals between two rounds of asking the anchors again (see `refill_contacts`).
const ANCHOR_RETRY_INTERVALS: u32 = 3;
/// Peers whose addresses we remember beyond parent, children and view (joiners we must answer).
const MAX_PEER_CACHE: usize = 1024;
/// Coordinators replaced by a successor that we remember, to tell them to step down if they come back.
const MAX_REPLACED: usize = 32;
/// Contacts a detached node or a root tries per retry.
const CONTACTS_PER_RETRY: usize = 3;
/// Indirect probes we run for siblings at a time.
const MAX_RELAYS: usize = 32;
/// A group over-filled by an attach splits a heartbeat interval divided by this later (see `on_attach`).
const SPLIT_GRACE_DIVISOR: u32 = 4;
/// Heartbeat intervals a coordinator waits, with one child that heads a subtree of its own, before that child moves
/// up beside it (see `Node::collapse_chain_link`): long enough for a split, a merge or a join to settle first.
const CHAIN_LINK_GRACE_BEATS: u32 = 3;
/// Changes of a coordinator's view reach its children at most once per heartbeat interval divided by this.
const VIEW_PUSH_DIVISOR: u32 = 10;
/// A node ticks on its parent's periodic heartbeat unless it ticked less than a heartbeat interval divided by this
/// ago (see `on_heartbeat`)...
const BEAT_TICK_GAP_DIVISOR: u32 = 2;
/// ...and its timer then waits this fraction of an interval longer than the parent's next round should take, so
/// that the heartbeat, not the timer, starts the next tick; the timer ticks only when heartbeats stop coming.
const BEAT_TICK_SLACK_DIVISOR: u32 = 4;

/// Tunables. Defaults follow the design: 1 s heartbeats, 16 children per coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub heartbeat_interval: Duration,
    pub max_children: usize,
    /// Silence from the parent after which it is suspected (then probed). Default 1.5 heartbeat intervals.
    pub suspect_after: Duration,
    /// How long direct and indirect probes may take before the parent is declared dead. Default 0.5 intervals.
    pub probe_timeout: Duration,
    /// Siblings asked to probe a suspected parent.
    pub indirect_probes: usize,
    /// Silence from a child after which it is dropped. Default 3 intervals.
    pub child_timeout: Duration,
    /// How long to wait for an `Accept` to a direct `Attach`. Default half an interval.
    pub attach_timeout: Duration,
    /// How long a root waits for an `Accept` to a `JoinRequest` (merging islands), and with `retry_interval` how
    /// long a detached node with a subtree waits before it makes itself an island's root. Default 2 intervals.
    pub join_timeout: Duration,
    /// How long a detached node waits for the answer to a `JoinRequest` before it asks its next contact (one at a
    /// time: asking another while the answer is on its way got the node adopted twice). Default half an interval.
    pub join_answer_wait: Duration,
    /// How often a root (or a detached node) retries its contacts. Default 1 interval.
    pub retry_interval: Duration,
    /// A change of members' ranks alone (a machine's uptime class ticking over, its reachability) reaches the
    /// children with the next change of the view, or after this long at the latest, instead of resending the whole
    /// view to every child at once. Default 30 intervals.
    pub rank_push_delay: Duration,
    /// Members to retry when detached or islanded, besides the `Join { via }` ones.
    pub bootstrap: Vec<NodeId>,
    /// Capacity grid exchange and placement (see `grids`).
    pub grids: GridConfig,
    /// Subnet grants, route queries and interests (see `routing`).
    pub routes: RoutingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self::with_interval(Duration::from_secs(1))
    }
}

impl Config {
    /// All timeouts scaled to `heartbeat_interval`.
    pub fn with_interval(heartbeat_interval: Duration) -> Self {
        Self {
            heartbeat_interval,
            max_children: 16,
            suspect_after: heartbeat_interval * 3 / 2,
            probe_timeout: heartbeat_interval / 2,
            indirect_probes: 3,
            child_timeout: heartbeat_interval * 3,
            attach_timeout: heartbeat_interval / 2,
            join_timeout: heartbeat_interval * 2,
            join_answer_wait: heartbeat_interval / 2,
            retry_interval: heartbeat_interval,
            rank_push_delay: heartbeat_interval * 30,
            bootstrap: Vec::new(),
            grids: GridConfig { placement_timeout: heartbeat_interval, ..GridConfig::default() },
            routes: RoutingConfig::default(),
        }
    }

    /// The time from a parent's last heartbeat to its children declaring it dead.
    pub fn detection_timeout(&self) -> Duration {
        self.suspect_after + self.probe_timeout
    }
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Opaque to the overlay (multiaddrs in the agent); passed on so others can dial this node.
    pub addrs: Vec<String>,
    pub position: Position,
    pub capacity: Capacity,
    /// Publicly reachable (not behind NAT): ranks first for succession.
    pub reachable: bool,
}

/// What the driver feeds in.
#[derive(Debug, Clone)]
pub enum Input {
    /// A decoded envelope from a peer (the driver authenticated `from`).
    Message {
        from: NodeId,
        envelope: Envelope,
    },
    PeerConnected(NodeId),
    /// The driver could not reach, or lost, this peer.
    PeerLost(NodeId),
    Command(Command),
}

/// Local commands from the agent's API or the simulator's scenario.
#[derive(Debug, Clone)]
pub enum Command {
    /// Become the root of a new overlay.
    Start,
    /// Join the overlay through any member. `via` is remembered and retried after partitions.
    Join { via: NodeId },
    /// Leave gracefully (a coordinator hands its role over first).
    Leave,
    /// Remember another member to retry when detached or islanded.
    AddContact(NodeId),
    /// This machine's free capacity changed (measured, or overridden for experiments).
    SetCapacity(Capacity),
    /// Find up to `want` machines near `near` that can host `demand`; answered by `Event::PlacementResult`
    /// with the same `tag` after the placement timeout.
    Placement { tag: u64, near: Position, demand: Capacity, want: u8 },
    /// Routes and addresses (see `routing`).
    Route(RouteCommand),
}

/// What the driver drains.
#[derive(Debug, Clone)]
pub enum Output {
    Send { to: NodeId, envelope: Envelope },
    Event(Event),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Not in a tree (yet, or any more).
    Detached,
    Leaf,
    Coordinator,
    Root,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    RoleChanged {
        role: Role,
        term: u64,
    },
    /// `Some` means attached under that parent; a root has `None`.
    ParentChanged {
        parent: Option<NodeId>,
    },
    /// Attached to a tree (as a child: `parent` is `Some`; as a root: `None`).
    Joined {
        parent: Option<NodeId>,
        term: u64,
    },
    MemberJoined(NodeId),
    MemberLeft(NodeId),
    /// The parent was declared dead after missed heartbeats and failed probes.
    ParentFailed(NodeId),
    /// Machines that can host a placement's demand, nearest first.
    PlacementResult {
        tag: u64,
        candidates: Vec<PlacementCandidate>,
    },
    /// Routes and addresses (see `routing`).
    Route(RouteEvent),
}

/// Protocol health counters (dropped input and notable events).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub received: u64,
    pub sent: u64,
    pub duplicates: u64,
    pub bad_version: u64,
    pub malformed: u64,
    /// Envelopes whose `from` differs from the authenticated sender.
    pub spoofed: u64,
    /// Heartbeats/reports/probe answers from nodes that are not our parent or child.
    pub from_non_members: u64,
    /// Heartbeats that overtook the `Accept` we wait for: not answered with `NotYourChild`, which would make the
    /// parent drop us just before we attach to it.
    pub early_heartbeats: u64,
    pub unexpected: u64,
    pub join_refused: u64,
    pub join_lost: u64,
    pub cycles_avoided: u64,
    pub parent_failures: u64,
    pub takeovers: u64,
    pub splits: u64,
    pub step_downs: u64,
    pub merges: u64,
    /// Times a coordinator with one child, itself a coordinator, moved it up beside itself (see
    /// `Node::collapse_chain_link`).
    pub chain_links_collapsed: u64,
}

/// A snapshot for `agent status` and the simulator's checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: u64,
    pub parent: Option<NodeId>,
    pub children: Vec<NodeId>,
    /// Root first, the parent last.
    pub ancestors: Vec<NodeId>,
    pub subtree: Summary,
    pub address_block: Option<Ipv4Net>,
    pub counters: Counters,
}

struct ParentLink {
    info: NodeInfo,
    term: u64,
    detector: Detector,
    view_version: u64,
    /// The version of the parent's group grids we hold (0: none yet from this parent).
    group_version: u64,
    /// The ids of its heartbeats seen lately (see `Node::fresh`).
    heartbeats_seen: Window,
}

/// What we remember about a parent we lost, to find the successor and climb the ancestor chain.
struct Orphan {
    old_parent: NodeId,
    old_term: u64,
    /// Members (siblings) and ancestors above the old parent, grandparent last.
    members: Arc<[Member]>,
    climb: Vec<NodeInfo>,
    /// Candidates that did not answer.
    tried: Vec<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttachPurpose {
    /// An orphan attaching to the computed successor.
    ToSuccessor,
    /// A successor (or handover heir) attaching to an ancestor in its old parent's place.
    Climb,
    /// Told to attach elsewhere (split, leave, step-down), or reconnecting to a parent that dropped us.
    Direct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    Join { contact: NodeId, deadline: Time },
    Attach { target: NodeId, deadline: Time, purpose: AttachPurpose },
}

/// An indirect probe we run for a sibling.
struct Relay {
    requester: NodeId,
    target: NodeId,
    their_seq: u64,
    our_seq: u64,
    deadline: Time,
}

// Laid out in declaration order: what every input reads (see `handle`, `finish`, `poll_timeout` and `send`) comes
// first, so that an input touches a few cache lines of the node instead of one per field (this order cut a
// 10,000-node simulation's cache misses by 6% against the compiler's).
#[repr(C)]
pub struct Node {
    leaving: bool,
    is_root: bool,
    view_dirty: bool,
    next_tick: Time,
    /// When `tick` last ran.
    last_tick: Time,
    /// The earliest time changes of the view are pushed to the children again (see `finish`).
    next_view_push: Time,
    /// When a group over-filled by an attach splits (see `on_attach`); the tick splits any over-full group too.
    split_due: Option<Time>,
    next_msg_id: u64,
    /// `info.id.key()`: every input checks that it is not from ourselves, and `info` lies in another cache line.
    id_key: u64,
    /// The term of the group this node coordinates (raised by succession).
    term: u64,
    /// Since when we have had no parent without being root (reset on attaching or becoming root).
    detached_since: Option<Time>,
    last_role: (Role, u64),
    outputs: VecDeque<Output>,
    children: Children,
    dedup: Dedup,
    pending: Pending,
    parent: Option<ParentLink>,
    info: NodeInfo,
    last_parent: Option<NodeId>,
    /// The tree as the last routing poll saw it, while routing has had no input since: polling again would find
    /// nothing to do unless a resync is due (see `finish`).
    routing_polled: Option<RoutingPollKey>,
    counters: Counters,

    /// Shared by a simulator's nodes, so the many lines of it a tick reads stay in the cache.
    config: Arc<Config>,
    started: Time,
    /// Root first, the parent last (kept while orphaned, for cycle checks).
    ancestors: Arc<[NodeInfo]>,
    /// Our parent's children (us included), from the parent's view.
    members: Arc<[Member]>,
    /// Our parent's siblings, from the parent's view.
    uncles: Arc<[Member]>,
    /// Version of the view we send our children; bumped on any change to it.
    view_version: u64,
    /// Since when the view we sent holds outdated ranks only (pushed after `rank_push_delay`).
    ranks_stale_since: Option<Time>,
    address_block: Option<Ipv4Net>,
    relays: Vec<Relay>,
    probe_seq: u64,
    grids: Grids,
    routing: Routing,
    /// The routing context's children with their positions, and the children's generation it was built at.
    routing_children: (Vec<(NodeId, Position)>, u64),

    // Read by few inputs (joins, successions, probes): after everything a heartbeat reads, out of the part of the
    // record a driver prefetches (see `Node::hot_ranges`).
    rng: ChaCha8Rng,
    orphan: Option<Orphan>,
    contacts: VecDeque<NodeId>,
    /// Contacts we were given (bootstrap, `Join { via }`, `AddContact`): contacts found inside our own tree are
    /// dropped, but these come back when no contact is left, so a node that ends up alone still finds the tree.
    anchors: Vec<NodeId>,
    anchors_retry_at: Time,
    next_contact: usize,
    retry_at: Time,
    peers: HashMap<NodeId, NodeInfo>,
    peer_order: VecDeque<NodeId>,
    replaced: VecDeque<(NodeId, NodeInfo, u64)>,
    /// Since when our children (by their generation) have been one coordinator (see `collapse_chain_link`).
    lone_child_since: Option<(u64, Time)>,
}

/// Everything a routing poll reads from the node (see [`TreeCtx`]), children by generation.
#[derive(Clone, Copy)]
struct RoutingPollKey {
    is_root: bool,
    parent: Option<NodeId>,
    position: Position,
    children_generation: u64,
}

/// Whether two member lists name the same machines in the same order, whatever their ranks.
fn same_members_but_ranks(a: &[Member], b: &[Member]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.info == y.info)
}

impl Node {
    /// A node that has not joined yet. `config` may be shared: a simulator's nodes all read one copy.
    pub fn new(info: NodeInfo, config: impl Into<Arc<Config>>, seed: u64, now: Time) -> Self {
        let config = config.into();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (now.as_nanos() as u64).rotate_left(17));
        // Random id base: a restarted node does not reuse ids a peer's dedup window still holds.
        let next_msg_id = rng.random::<u32>() as u64 * (1 << 24);
        let first_tick = now + config.heartbeat_interval.mul_f64(rng.random::<f64>());
        let anchors: Vec<NodeId> = config.bootstrap.iter().copied().filter(|c| *c != info.id).collect();
        let contacts = anchors.iter().copied().collect();
        // Until the driver measures it, all of the machine's capacity counts as free.
        let grids = Grids::new(config.grids.clone(), info.position, info.capacity);
        let routing = Routing::new(config.routes.clone());
        let id_key = info.id.key();
        Self {
            info,
            config,
            rng,
            outputs: VecDeque::new(),
            next_msg_id,
            id_key,
            started: now,
            term: 0,
            is_root: false,
            parent: None,
            ancestors: Arc::default(),
            members: Arc::default(),
            uncles: Arc::default(),
            children: Children::default(),
            view_version: 1,
            view_dirty: false,
            ranks_stale_since: None,
            address_block: None,
            orphan: None,
            pending: Pending::None,
            contacts,
            anchors,
            anchors_retry_at: now,
            next_contact: 0,
            retry_at: now,
            detached_since: None,
            leaving: false,
            peers: HashMap::new(),
            peer_order: VecDeque::new(),
            replaced: VecDeque::new(),
            lone_child_since: None,
            relays: Vec::new(),
            probe_seq: 0,
            dedup: Dedup::new(64),
            next_tick: first_tick,
            last_tick: Time::ZERO,
            split_due: None,
            next_view_push: Time::ZERO,
            counters: Counters::default(),
            last_role: (Role::Detached, 0),
            last_parent: None,
            grids,
            routing,
            routing_children: (Vec::new(), 0),
            routing_polled: None,
        }
    }

    /// The byte ranges (offset, length) of a `Node` that a heartbeat or report reads, bar a few lines: a driver of
    /// many nodes may prefetch those ahead of an input, and only those (the rest would crowd the cache).
    pub const fn hot_ranges() -> [(usize, usize); 2] {
        let grids = std::mem::offset_of!(Node, grids);
        let (schedule, schedule_len) = Routing::SCHEDULE_RANGE;
        [(0, grids + Grids::HOT_LEN), (std::mem::offset_of!(Node, routing) + schedule, schedule_len)]
    }

    /// What a message from `from` reads outside [`Node::hot_ranges`]: the sender's record, when it is our child (its
    /// report updates it). A driver of many nodes may prefetch it; it is a hint, found by key without confirming.
    pub fn sender_record(&self, from: &NodeId) -> Option<&(impl Sized + use<>)> {
        self.children.record_by_key(from)
    }

    pub fn id(&self) -> NodeId {
        self.info.id
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Routes and addresses held by this node.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// Runs a routing step with the node's place in the tree, then sends its messages and reports its events.
    fn with_routing(&mut self, f: impl FnOnce(&mut Routing, &TreeCtx)) {
        // Rebuilt only when the children changed, not on every input: walking every child costs a few cache lines
        // each.
        let (mut children, generation) = std::mem::take(&mut self.routing_children);
        if generation != self.children.generation() {
            children.clear();
            children.extend(self.children.iter().map(|c| (c.info.id, c.info.position)));
        }
        debug_assert!(
            children.iter().copied().eq(self.children.iter().map(|c| (c.info.id, c.info.position))),
            "children changed without a new generation"
        );
        self.routing_polled = None;
        let ctx = TreeCtx {
            me: self.info.id,
            position: self.info.position,
            parent: self.parent.as_ref().map(|p| p.info.id),
            is_root: self.is_root,
            children: &children,
            children_generation: Some(self.children.generation()),
        };
        f(&mut self.routing, &ctx);
        self.routing_children = (children, self.children.generation());
        let (sends, events) = self.routing.drain();
        for (to, m) in sends {
            self.send(to, Message::Routes(Box::new(m)));
        }
        for e in events {
            self.push_event(Event::Route(e));
        }
        self.address_block = self.routing.heartbeat_block();
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The capacity grids this node holds (see `grids`); `held()` is what routing policies use.
    pub fn grids(&mut self) -> &mut Grids {
        &mut self.grids
    }

    pub fn role(&self) -> Role {
        if self.is_root {
            Role::Root
        } else if self.parent.is_none() {
            Role::Detached
        } else if self.children.is_empty() {
            Role::Leaf
        } else {
            Role::Coordinator
        }
    }

    /// Attached, root, or holding a subtree while recovering.
    fn in_tree(&self) -> bool {
        self.parent.is_some() || self.is_root || self.orphan.is_some() || !self.children.is_empty()
    }

    pub fn parent(&self) -> Option<NodeId> {
        self.parent.as_ref().map(|p| p.info.id)
    }

    pub fn children(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.children.iter().map(|c| c.info.id)
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    /// Where to reach a peer the overlay asked to send to (or knows of).
    pub fn addresses_of(&self, id: &NodeId) -> Option<&[String]> {
        self.info_of(id).map(|i| i.addrs.as_slice())
    }

    /// Update what this node says about itself (new addresses, measured capacity); sent with the next report.
    pub fn set_info(&mut self, info: NodeInfo) {
        if info.id == self.info.id {
            self.grids.set_position(info.position);
            self.info = info;
        }
    }

    /// The driver failed to decode bytes from a peer: count it.
    pub fn record_decode_error(&mut self, err: &crate::DecodeError) {
        match err {
            crate::DecodeError::Version(_) => self.counters.bad_version += 1,
            _ => self.counters.malformed += 1,
        }
    }

    /// Decode and handle raw bytes from `from`; bad input is counted and dropped.
    pub fn handle_bytes(&mut self, now: Time, from: NodeId, bytes: &[u8]) {
        match Envelope::decode(bytes) {
            Ok(envelope) => self.handle(now, Input::Message { from, envelope }),
            Err(e) => self.record_decode_error(&e),
        }
    }

    pub fn handle(&mut self, now: Time, input: Input) {
        match input {
            Input::Message { from, envelope } => self.on_envelope(now, from, envelope),
            Input::PeerConnected(_) => {}
            Input::PeerLost(peer) => self.on_peer_lost(now, peer),
            Input::Command(cmd) => self.on_command(now, cmd),
        }
        self.finish(now);
    }

    /// The earliest time at which [`Node::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.leaving {
            return None;
        }
        let mut t = self.next_tick;
        if let Some(p) = &self.parent {
            t = t.min(p.detector.deadline());
        }
        match self.pending {
            Pending::None => {}
            Pending::Join { deadline, .. } | Pending::Attach { deadline, .. } => t = t.min(deadline),
        }
        if let Some(deadline) = self.grids.next_deadline() {
            t = t.min(deadline);
        }
        if let Some(due) = self.split_due {
            t = t.min(due);
        }
        if self.view_dirty {
            t = t.min(self.next_view_push);
        }
        Some(t)
    }

    pub fn handle_timeout(&mut self, now: Time) {
        if self.leaving {
            return;
        }
        self.check_parent(now);
        self.check_pending(now);
        for (tag, candidates) in self.grids.expire_placements(now) {
            self.push_event(Event::PlacementResult { tag, candidates });
        }
        if self.split_due.is_some_and(|due| now >= due) {
            self.split_due = None;
            if self.children.len() > self.config.max_children {
                self.split(now);
            }
        }
        if now >= self.next_tick {
            self.next_tick = (self.next_tick + self.config.heartbeat_interval).max(now);
            self.tick(now);
        }
        self.finish(now);
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Swaps the node's queue of outputs with `queue`. A driver of many nodes can lend each node it feeds the same
    /// empty queue and take it back full: outputs are then written to memory the driver just used, not to each
    /// node's own queue, which is long out of the cache by the time a simulator feeds that node again.
    pub fn swap_outputs(&mut self, queue: &mut VecDeque<Output>) {
        std::mem::swap(&mut self.outputs, queue);
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.info.id,
            role: self.role(),
            term: self.term,
            parent: self.parent(),
            children: self.children().collect(),
            ancestors: self.ancestors.iter().map(|a| a.id).collect(),
            subtree: self.summary(),
            address_block: self.address_block,
            counters: self.counters.clone(),
        }
    }

    // ----- inputs -------------------------------------------------------------------------------------------

    fn on_command(&mut self, now: Time, cmd: Command) {
        if self.leaving {
            return;
        }
        match cmd {
            Command::Start => {
                if self.parent.is_none() && !self.is_root {
                    self.become_root();
                }
            }
            Command::Join { via } => {
                self.add_anchor(via);
                self.add_contact_front(via);
                if self.parent.is_none() && !self.is_root && self.pending == Pending::None {
                    self.send_join(now, via);
                }
            }
            Command::AddContact(id) => {
                self.add_anchor(id);
                self.add_contact(id);
            }
            Command::Leave => self.leave(),
            Command::Route(cmd) => self.with_routing(|r, ctx| r.on_command(now, ctx, cmd)),
            Command::SetCapacity(free) => self.grids.set_own_free(free),
            Command::Placement { tag, near, demand, want } => {
                let (me, addrs, parent) = (self.info.id, self.info.addrs.clone(), self.parent());
                let (query, step) = self.grids.start_placement(now, tag, me, addrs, near, demand, want, parent);
                self.apply_placement(me, query, step);
            }
        }
    }

    /// Whether a message was not seen before (and records it). Ids count up per sender over everything it sends, and
    /// one window of them per sender tells a duplicate. The windows of the parent and of each child, for their
    /// periodic traffic (heartbeats, reports, routing's syncs and answers: most of what a node hears), are kept in
    /// those records, which the handler reads next anyway; the shared table cost two more cache misses a message in
    /// a large simulation, and scanning it for routing's messages alone 2% of a 10,000-node run. A duplicate has its
    /// original's kind, so it meets the same window (unless the sender stopped being our parent or child in between:
    /// then it may be taken once more, which handlers bear, as when the shared table forgets a sender). Attaches and
    /// accepts stay in the shared table: a copy sent twice (see `send_twice`) may arrive after the first made the
    /// sender our child, when the new child's window holds neither.
    fn fresh(&mut self, from: NodeId, env: &Envelope) -> bool {
        match (&env.body, &mut self.parent) {
            (Message::Heartbeat(_) | Message::Routes(_), Some(p)) if p.info.id == from => {
                p.heartbeats_seen.check(env.id)
            }
            (Message::Report(_) | Message::Routes(_), _) => match self.children.get_mut(&from) {
                Some(child) => child.reports_seen.check(env.id),
                None => self.dedup.check(from, env.id),
            },
            _ => self.dedup.check(from, env.id),
        }
    }

    fn on_peer_lost(&mut self, now: Time, peer: NodeId) {
        if let Some(p) = &mut self.parent
            && p.info.id == peer
        {
            p.detector.suspect_now(now);
        }
        match self.pending {
            Pending::Attach { target, .. } if target == peer => self.attach_failed(now),
            Pending::Join { contact, .. } if contact == peer => self.pending = Pending::None,
            _ => {}
        }
    }

    fn on_envelope(&mut self, now: Time, from: NodeId, env: Envelope) {
        self.counters.received += 1;
        if env.from != from {
            self.counters.spoofed += 1;
            return;
        }
        if env.version != crate::PROTOCOL_VERSION {
            self.counters.bad_version += 1;
            return;
        }
        if !self.fresh(from, &env) {
            self.counters.duplicates += 1;
            return;
        }
        if self.leaving || (from.key() == self.id_key && from == self.info.id) {
            return;
        }
        match env.body {
            Message::JoinRequest(r) => self.on_join_request(now, *r),
            Message::Accept(a) => self.on_accept(now, from, *a),
            Message::Refuse(r) => self.on_refuse(now, from, r),
            Message::Attach(a) => self.on_attach(now, from, *a),
            Message::Heartbeat(h) => self.on_heartbeat(now, from, h),
            Message::Report(r) => self.on_report(now, from, r),
            Message::NotYourChild(n) => self.on_not_your_child(now, from, *n),
            Message::Probe { seq } => self.send(from, Message::ProbeAck { seq }),
            Message::ProbeAck { seq } => self.on_probe_ack(now, from, seq),
            Message::ProbeRequest { target, seq } => self.on_probe_request(now, from, target, seq),
            Message::ProbeResult { target, seq, alive } => {
                if let Some(p) = &mut self.parent
                    && p.info.id == target
                    && alive
                {
                    p.detector.vouched(now, seq);
                }
            }
            Message::Redirect { to } => self.on_redirect(now, from, *to),
            Message::Handover { term, ancestors } => self.on_handover(now, from, term, ancestors),
            Message::Leaving => self.on_leaving(from),
            Message::Routes(m) => self.with_routing(|r, ctx| r.on_message(now, ctx, from, *m)),
            Message::PlacementQuery(q) => {
                // The answer goes straight to the origin, which may be far away in the tree.
                let (origin, query) = (q.origin, q.id);
                if origin != self.info.id && !q.origin_addrs.is_empty() {
                    let mut origin_info = self.info.clone();
                    origin_info.id = origin;
                    origin_info.addrs = q.origin_addrs.clone();
                    self.remember_peer(origin_info);
                }
                let (me, parent) = (self.info.id, self.parent());
                let step = self.grids.route_placement(me, &self.info.addrs, *q, parent);
                self.apply_placement(origin, query, step);
            }
            Message::PlacementAnswer { query, candidate } => self.grids.on_placement_answer(query, *candidate),
        }
    }

    fn apply_placement(&mut self, origin: NodeId, query: u64, step: PlacementStep) {
        for (to, q) in step.forward {
            self.send(to, Message::PlacementQuery(Box::new(q)));
        }
        if let Some(candidate) = step.answer {
            if origin == self.info.id {
                self.grids.on_placement_answer(query, candidate);
            } else {
                self.send(origin, Message::PlacementAnswer { query, candidate: Box::new(candidate) });
            }
        }
    }

    // ----- joining --------------------------------------------------------------------------------------------

    fn join_request(&self, contact: NodeId) -> JoinRequest {
        JoinRequest {
            joiner: self.info.clone(),
            rank: self.rank(),
            summary: self.summary(),
            root_claim: self.is_root.then(|| self.root_claim()),
            contact,
            descending: false,
            hops: 0,
        }
    }

    fn send_join(&mut self, now: Time, contact: NodeId) {
        let req = self.join_request(contact);
        self.send(contact, Message::JoinRequest(Box::new(req)));
        self.pending = Pending::Join { contact, deadline: now + self.join_wait() };
        self.retry_at = now + self.config.retry_interval;
    }

    /// How long the answer to our `JoinRequest` may take before we ask elsewhere (see `Config::join_answer_wait`).
    fn join_wait(&self) -> Duration {
        if self.is_root { self.config.join_timeout } else { self.config.join_answer_wait }
    }

    fn on_join_request(&mut self, now: Time, mut r: JoinRequest) {
        let joiner = r.joiner.id;
        if joiner == self.info.id {
            // Our own request came back up to us: that contact is inside our own tree.
            self.contacts.retain(|c| *c != r.contact);
            if matches!(self.pending, Pending::Join { contact, .. } if contact == r.contact) {
                self.pending = Pending::None;
            }
            return;
        }
        self.remember_peer(r.joiner.clone());
        if r.hops >= MAX_HOPS {
            self.counters.join_lost += 1;
            self.send(joiner, Message::Refuse(Refuse::Lost));
            return;
        }
        r.hops += 1;
        if !r.descending {
            if let Some(p) = &self.parent {
                let to = p.info.id;
                self.send(to, Message::JoinRequest(Box::new(r)));
                return;
            }
            if !self.is_root {
                self.send(joiner, Message::Refuse(Refuse::NotInTree));
                // A root looking for other trees is a live tree for us to join (with our subtree, if any).
                if r.root_claim.is_some() && self.orphan.is_none() {
                    self.add_contact_front(joiner);
                    if self.pending == Pending::None {
                        self.send_join(now, joiner);
                    }
                }
                return;
            }
            if let Some(claim) = r.root_claim
                && claim > self.root_claim()
            {
                // The other tree's root outranks us: we join it (with our whole tree) instead.
                self.send(joiner, Message::Refuse(Refuse::LowerRoot));
                self.add_contact_front(joiner);
                if !matches!(self.pending, Pending::Join { .. }) {
                    self.send_join(now, joiner);
                }
                return;
            }
            r.descending = true;
        } else if self.parent.is_none() && !self.is_root {
            self.send(joiner, Message::Refuse(Refuse::NotInTree));
            return;
        }
        if self.ancestors.iter().any(|a| a.id == joiner) {
            self.counters.cycles_avoided += 1;
            self.send(joiner, Message::Refuse(Refuse::Cycle));
            return;
        }
        let is_child = self.children.contains(&joiner);
        if is_child || self.children.len() < self.config.max_children {
            self.adopt(now, r.joiner, r.rank, r.summary);
            return;
        }
        let kids = self.children.iter().map(|c| (c.info.id, c.summary));
        match choose_descent((r.joiner.position, &r.summary), joiner, kids, self.config.max_children) {
            Some(next) => {
                // Count the joiner in at once, so a burst of joins fills groups and spreads as it should before the
                // next reports arrive: a leaf that takes one leads a group from now on.
                if let Some(c) = self.children.get_mut(&next) {
                    c.summary.size = c.summary.size.saturating_add(r.summary.size);
                    c.summary.height = c.summary.height.max(r.summary.height.saturating_add(1));
                }
                self.send(next, Message::JoinRequest(Box::new(r)));
            }
            None => self.adopt(now, r.joiner, r.rank, r.summary),
        }
    }

    fn on_accept(&mut self, now: Time, from: NodeId, a: Accept) {
        if a.parent.id != from {
            self.counters.unexpected += 1;
            return;
        }
        let expected = match self.pending {
            Pending::Join { .. } => true,
            Pending::Attach { target, .. } => target == from,
            Pending::None => false,
        };
        if !expected {
            if self.parent() != Some(from) {
                // A late answer: we attached elsewhere meanwhile. Tell it not to keep us.
                self.counters.unexpected += 1;
                self.send(from, Message::Leaving);
            }
            return;
        }
        // A root (its chain is itself alone) that has not reported to us for longer than a heartbeat is not our
        // child, whatever our list says: that record is stale (a root trying to merge lets our heartbeats pass
        // unanswered while its join is open, so it was never disowned), and keeping it refused the merge for good
        // (two roots to the end of a property schedule). One we adopted a moment ago is our child: its Accept
        // crossed ours.
        let silent_root = a.view.ancestors.len() == 1
            && a.view.ancestors[0].id == from
            && self
                .children
                .get(&from)
                .is_some_and(|c| now.saturating_sub(c.last_heard) > self.config.heartbeat_interval * 3 / 2);
        if silent_root {
            self.children.remove(&from);
            self.push_event(Event::MemberLeft(from));
            self.mark_view_changed();
        }
        let chain_ok = a.view.ancestors.len() <= MAX_ANCESTORS
            && a.view.ancestors.last().map(|p| p.id) == Some(from)
            && !a.view.ancestors.iter().any(|x| x.id == self.info.id)
            && !self.children.contains(&from);
        if !chain_ok {
            self.counters.cycles_avoided += 1;
            self.send(from, Message::Leaving);
            return;
        }
        if self.is_root && self.pending != Pending::None {
            self.counters.merges += 1;
        }
        self.pending = Pending::None;
        self.orphan = None;
        self.is_root = false;
        self.remember_peer(a.parent.clone());
        self.attach_under(now, a.parent, a.term, a.view);
    }

    fn attach_under(&mut self, now: Time, parent: NodeInfo, term: u64, view: View) {
        let detector = Detector::new(now, self.config.suspect_after, self.config.probe_timeout);
        for anc in view.ancestors.iter() {
            if anc.id != parent.id {
                self.remember_peer(anc.clone());
            }
        }
        self.ancestors = view.ancestors;
        self.members = view.members;
        self.uncles = view.uncles;
        self.parent = Some(ParentLink {
            info: parent,
            term,
            detector,
            view_version: view.version,
            group_version: 0,
            heartbeats_seen: Window::default(),
        });
        self.mark_view_changed();
    }

    fn on_refuse(&mut self, now: Time, from: NodeId, r: Refuse) {
        self.counters.join_refused += 1;
        match self.pending {
            Pending::Join { contact, .. } => {
                if r == Refuse::SameTree {
                    self.contacts.retain(|c| *c != contact);
                }
                // LowerRoot: the other root joins us; otherwise the next tick retries another contact.
                self.pending = Pending::None;
            }
            Pending::Attach { target, .. } if target == from => self.attach_failed(now),
            _ => {}
        }
    }

    // ----- direct attach (succession, split, leave) ----------------------------------------------------------

    fn on_attach(&mut self, now: Time, from: NodeId, a: Attach) {
        if a.info.id != from {
            self.counters.unexpected += 1;
            return;
        }
        self.remember_peer(a.info.clone());
        if self.ancestors.iter().any(|x| x.id == from) || self.parent() == Some(from) {
            self.counters.cycles_avoided += 1;
            self.send(from, Message::Refuse(Refuse::Cycle));
            return;
        }
        // A sibling found our common parent dead and picked us as successor: trust its probes and take over.
        if let Some(p) = &self.parent
            && a.orphaned_from == Some(p.info.id)
        {
            let failed = p.info.id;
            self.parent_failed(now, failed);
        }
        // Orphans and nodes moving elsewhere (split, redirect) keep their subtree and accept new children too.
        let in_tree = self.parent.is_some()
            || self.is_root
            || self.orphan.is_some()
            || !self.children.is_empty()
            || matches!(self.pending, Pending::Attach { .. });
        if !in_tree {
            self.send(from, Message::Refuse(Refuse::NotInTree));
            return;
        }
        if let Some(old) = a.replaces
            && self.children.remove(&old).is_some()
        {
            self.push_event(Event::MemberLeft(old));
            self.replaced.push_back((old, a.info.clone(), a.term));
            if self.replaced.len() > MAX_REPLACED {
                self.replaced.pop_front();
            }
        }
        self.adopt(now, a.info, a.rank, a.summary);
        // A group over-filled by an attach (orphans after a failover, a coordinator moved up by a split below)
        // splits after a short grace rather than at the next tick: such splits cascade level by level (each moves
        // a coordinator up and over-fills the level above), and a tick per level kept subtrees moving for seconds.
        if self.children.len() > self.config.max_children && self.split_due.is_none() {
            self.split_due = Some(now + self.config.heartbeat_interval / SPLIT_GRACE_DIVISOR);
        }
    }

    fn send_attach(&mut self, now: Time, target: NodeId, replaces: Option<NodeId>, purpose: AttachPurpose) {
        let term = match (&self.orphan, purpose) {
            (Some(o), AttachPurpose::ToSuccessor) => o.old_term + 1,
            _ => self.term,
        };
        let orphaned_from = match (&self.orphan, purpose) {
            (Some(o), AttachPurpose::ToSuccessor) => Some(o.old_parent),
            _ => None,
        };
        let attach = Attach {
            info: self.info.clone(),
            rank: self.rank(),
            summary: self.summary(),
            replaces,
            orphaned_from,
            term,
        };
        // Recovery and moves (a split or leave redirects whole groups) are on the clock: send twice, so that one
        // lost message does not cost an attach timeout and a detour through the bootstrap contacts.
        self.send_twice(target, Message::Attach(Box::new(attach)));
        self.pending = Pending::Attach { target, deadline: now + self.config.attach_timeout, purpose };
    }

    fn adopt(&mut self, now: Time, info: NodeInfo, rank: Rank, summary: Summary) {
        let id = info.id;
        match self.children.position(&id) {
            Some(i) => {
                let c = self.children.replace_info(i, info.clone());
                c.rank = rank;
                c.summary = summary;
                c.last_heard = now;
                // Attached anew: it holds none of our grids.
                c.acked_group = 0;
                c.sent_group = 0;
            }
            None => {
                self.children.push(Child {
                    info: info.clone(),
                    rank,
                    summary,
                    last_heard: now,
                    reports_seen: Window::default(),
                    acked_version: 0,
                    sent_version: 0,
                    acked_group: 0,
                    sent_group: 0,
                });
                self.push_event(Event::MemberJoined(id));
            }
        }
        self.mark_view_changed();
        let view = self.view_for_children();
        if let Some(c) = self.children.get_mut(&id) {
            c.acked_version = view.version;
            c.sent_version = view.version;
        }
        let accept = Accept { parent: self.info.clone(), term: self.term, view: Arc::unwrap_or_clone(view) };
        self.send(id, Message::Accept(Box::new(accept)));
        // Over-full groups split on the next tick, so transient extra children (a joiner that also got another
        // accept and will decline ours) do not cause a split, and one split serves a burst of joiners.
    }

    fn split(&mut self, now: Time) {
        let kids: Vec<_> = self
            .children
            .iter()
            .map(|c| Candidate { id: c.info.id, position: c.info.position, rank: c.rank, subtree_size: c.summary.size })
            .collect();
        let Some(s) = split_group(self.info.position, &kids, self.config.max_children) else { return };
        let Some(coordinator) = self.children.get(&s.coordinator).map(|c| c.info.clone()) else {
            return;
        };
        self.counters.splits += 1;
        // Like a B-tree: the new group's coordinator moves up beside us (under our parent), so the depth of the
        // moved half does not grow. A root keeps it as a child (the tree grows by one level at the top).
        let up = self.parent.as_ref().map(|p| (coordinator.id, p.info.clone()));
        let down = s.members.iter().map(|id| (*id, coordinator.clone()));
        let moves: Vec<(NodeId, NodeInfo)> = up.into_iter().chain(down).collect();
        self.redirect_children(now, &moves);
    }

    /// Lets each child go to its new parent (`Redirect`), with the subnets we granted it (see `Routing::hand_over`).
    fn redirect_children(&mut self, now: Time, moves: &[(NodeId, NodeInfo)]) {
        for (id, to) in moves {
            self.children.remove(id);
            self.send(*id, Message::Redirect { to: Box::new(to.clone()) });
            self.push_event(Event::MemberLeft(*id));
        }
        let moved: Vec<NodeId> = moves.iter().map(|(id, _)| *id).collect();
        self.with_routing(|r, ctx| r.hand_over(now, ctx, &moved));
        self.mark_view_changed();
    }

    /// A coordinator whose only child heads a subtree of its own is a link in a chain: it adds a level to that whole
    /// subtree and leads no group. Merging islands make such links (a joining tree descends to the smallest
    /// subtree, often a leaf, which adopts it whole), and their levels add up (depth 8 against a bound of 7 in a
    /// property schedule with two partitions healed). Once the link has lasted a few heartbeats and our parent's
    /// group has room, the child moves up beside us with its subnets, as a split moves a new group's coordinator,
    /// and we are a leaf again.
    fn collapse_chain_link(&mut self, now: Time) {
        // Most nodes have no child or several: decided without reading the colder fields below.
        let link = match (&self.children[..], &self.parent) {
            ([only], Some(p))
                if only.summary.height >= 2
                    && self.members.len() < self.config.max_children
                    && !self.leaving
                    && self.orphan.is_none()
                    && self.pending == Pending::None =>
            {
                Some((only.info.id, p.info.clone()))
            }
            _ => None,
        };
        let Some((child, parent)) = link else { return };
        // The grace counts from when the children became what they are (a change of children changes the generation).
        let generation = self.children.generation();
        match self.lone_child_since {
            Some((seen, since)) if seen == generation => {
                if now.saturating_sub(since) < self.config.heartbeat_interval * CHAIN_LINK_GRACE_BEATS {
                    return;
                }
            }
            _ => {
                self.lone_child_since = Some((generation, now));
                return;
            }
        }
        self.counters.chain_links_collapsed += 1;
        self.redirect_children(now, &[(child, parent)]);
    }

    fn on_redirect(&mut self, now: Time, from: NodeId, to: NodeInfo) {
        if self.parent() != Some(from) || to.id == self.info.id {
            self.counters.unexpected += 1;
            return;
        }
        self.remember_peer(to.clone());
        // If the new parent is gone too (it may be leaving as well), we rejoin through the tree we knew.
        self.remember_tree_contacts(from);
        // The parent that redirected us is alive: after the target, the first to ask.
        self.add_contact_front(from);
        // Make before break: the link to the parent that sent us stays until the target accepts (or refuses, or the
        // attach times out), so a subtree on the move is never cut off from the tree. Cut at once, every move left
        // the subtree detached for a round trip, where a snapshot of the tree found it.
        self.send_attach(now, to.id, None, AttachPurpose::Direct);
    }

    /// An attach (after a redirect) is open to another node than our parent: the link to the parent is only kept
    /// until the move completes.
    fn moving_from_parent(&self) -> bool {
        matches!(self.pending, Pending::Attach { target, purpose: AttachPurpose::Direct, .. }
            if self.parent.as_ref().is_some_and(|p| p.info.id != target))
    }

    // ----- heartbeats ---------------------------------------------------------------------------------------

    /// A parent's periodic heartbeat also starts the tick: the report goes up at once (acknowledging the view and
    /// grids just received), a coordinator's heartbeats go down one hop later, and the tree ticks in step with its
    /// root instead of each node on its own timer (a simulator wakes a node half as often). Reports stay at least
    /// half an interval apart, and at most 3/2 of one while the parent's rounds take over from the timer, 5/4 when a
    /// heartbeat is lost (the timer ticks), 7/4 when both happen at once.
    fn on_heartbeat(&mut self, now: Time, from: NodeId, h: Heartbeat) {
        let round = !h.between_rounds;
        self.apply_heartbeat(now, from, h);
        let interval = self.config.heartbeat_interval;
        if round && self.parent.as_ref().is_some_and(|p| p.info.id == from) {
            self.next_tick = now + interval + interval / BEAT_TICK_SLACK_DIVISOR;
            if now >= self.last_tick + interval / BEAT_TICK_GAP_DIVISOR {
                self.tick(now);
            }
        }
    }

    fn apply_heartbeat(&mut self, now: Time, from: NodeId, h: Heartbeat) {
        let Some(p) = self.parent.as_mut().filter(|p| p.info.id == from) else {
            // A parent that just adopted us sends its next heartbeat right after the `Accept`, and with jitter
            // (or separate streams) it can arrive first. While our join or attach is open, any coordinator may be
            // the one that accepted us (a join descends), so we wait for the answer instead of disowning it.
            let awaiting_accept = match self.pending {
                Pending::Join { .. } => true,
                Pending::Attach { target, .. } => target == from,
                Pending::None => false,
            };
            if awaiting_accept {
                self.counters.early_heartbeats += 1;
                return;
            }
            self.counters.from_non_members += 1;
            self.send(
                from,
                Message::NotYourChild(Box::new(NotYourChild {
                    replaced_by: None,
                    term: self.term,
                    in_tree: self.in_tree(),
                })),
            );
            return;
        };
        p.detector.heard(now);
        p.term = h.term;
        if let Some(group) = h.grids
            && self.grids.on_group(self.info.id, p.group_version, &group)
        {
            p.group_version = group.version;
        }
        let Some(view) = h.view else { return };
        p.view_version = view.version;
        if view.ancestors.iter().any(|a| a.id == self.info.id) || view.ancestors.len() > MAX_ANCESTORS {
            // A cycle formed from stale state: leave it and join again through a contact.
            self.counters.cycles_avoided += 1;
            self.send(from, Message::Leaving);
            self.add_contact(from);
            self.parent = None;
            if !self.children.is_empty() && self.orphan.is_none() {
                // Our subtree is whole: it has a root at once while we merge again (a root retries its contacts).
                // Two island roots that each joined the other's tree both found the cycle and left as detached
                // nodes: the whole tree was without a root until the island wait passed (property schedules).
                self.become_root();
            }
            return;
        }
        // Our children's view holds our ancestors and our siblings (their uncles).
        if view.ancestors != self.ancestors || !same_members_but_ranks(&view.members, &self.members) {
            self.mark_view_changed();
        } else if view.members != self.members {
            self.mark_ranks_changed(now);
        }
        self.ancestors = Arc::clone(&view.ancestors);
        self.members = Arc::clone(&view.members);
        self.uncles = Arc::clone(&view.uncles);
    }

    fn on_report(&mut self, now: Time, from: NodeId, r: Report) {
        let Some(c) = self.children.get_mut(&from) else {
            self.counters.from_non_members += 1;
            let replaced = self.replaced.iter().rev().find(|(old, _, _)| *old == from);
            let reply = match replaced {
                Some((_, by, term)) => NotYourChild { replaced_by: Some(by.clone()), term: *term, in_tree: true },
                None => NotYourChild { replaced_by: None, term: self.term, in_tree: self.in_tree() },
            };
            self.send(from, Message::NotYourChild(Box::new(reply)));
            return;
        };
        c.last_heard = now;
        c.summary = r.summary;
        if let Some(grid) = r.grid {
            self.grids.on_child_grid(from, *grid);
        }
        c.acked_version = r.view_version;
        if c.acked_version != self.view_version && c.sent_version == self.view_version {
            // It reports an older view although we sent the current one: lost (or crossed); send it again.
            c.sent_version = 0;
        }
        c.acked_group = r.group_version;
        if let Some(group) = self.grids.current_group()
            && c.acked_group != group.version
            && c.sent_group == group.version
        {
            c.sent_group = 0; // as for the view: lost or crossed, send it again
        }
        if c.rank != r.rank {
            c.rank = r.rank;
            self.mark_ranks_changed(now);
        }
    }

    fn on_not_your_child(&mut self, now: Time, from: NodeId, n: NotYourChild) {
        if self.children.remove(&from).is_some() {
            // It attached elsewhere; it is alive and in some tree, so a useful contact for merging.
            self.push_event(Event::MemberLeft(from));
            self.mark_view_changed();
            self.add_contact(from);
            return;
        }
        if self.parent() != Some(from) {
            return;
        }
        match n.replaced_by {
            Some(successor) if successor.id != self.info.id => self.step_down(now, successor),
            // It let us go (a redirect) and our attach elsewhere is open: it answers a report sent before we knew.
            // The link stays until the move completes or fails.
            _ if self.moving_from_parent() => {}
            // Our parent restarted and lost its state: as good as crashed, so the group elects a successor.
            _ if !n.in_tree => self.parent_failed(now, from),
            _ => {
                // Our parent dropped us (missed reports): attach to it again directly.
                self.parent = None;
                self.send_attach(now, from, None, AttachPurpose::Direct);
            }
        }
    }

    /// We were replaced by a successor while away: hand our remaining children to it and rejoin as a leaf.
    fn step_down(&mut self, now: Time, successor: NodeInfo) {
        self.counters.step_downs += 1;
        for c in self.children.take() {
            self.send(c.info.id, Message::Redirect { to: Box::new(successor.clone()) });
            self.push_event(Event::MemberLeft(c.info.id));
        }
        self.parent = None;
        self.is_root = false;
        self.orphan = None;
        self.remember_peer(successor.clone());
        self.add_contact_front(successor.id);
        self.send_join(now, successor.id);
    }

    fn tick(&mut self, now: Time) {
        self.last_tick = now;
        // Drop silent children.
        let timeout = self.config.child_timeout;
        let mut dropped = Vec::new();
        self.children.retain(|c| {
            let alive = now.saturating_sub(c.last_heard) < timeout;
            if !alive {
                dropped.push(c.info.id);
            }
            alive
        });
        for id in dropped {
            self.push_event(Event::MemberLeft(id));
            self.mark_view_changed();
        }
        if self.ranks_stale_since.is_some_and(|since| now.saturating_sub(since) >= self.config.rank_push_delay) {
            self.mark_view_changed();
        }
        if self.children.len() > self.config.max_children {
            self.split(now);
        }
        self.collapse_chain_link(now);
        let children = &self.children;
        self.grids.retain_children(|id| children.contains(id));
        // A quiet routing tick is skipped, and so is the poll a tick starts (see `finish`): the two read a few dozen
        // cache lines of routing's state in every node at every heartbeat.
        if !self.routing.skip_quiet_tick(now, self.parent.is_some()) {
            self.with_routing(|r, ctx| r.tick(now, ctx));
        }
        self.send_heartbeats(false);
        // A parent we are moving away from (see `on_redirect`) let us go: it would only answer `NotYourChild`.
        let moving = self.moving_from_parent();
        if let Some(p) = &self.parent
            && !moving
        {
            let to = p.info.id;
            let grid = self.grids.report_grid(to).map(Box::new);
            let report = Report {
                view_version: p.view_version,
                rank: self.rank(),
                summary: self.summary(),
                grid,
                group_version: p.group_version,
            };
            self.send(to, Message::Report(report));
        } else if self.parent.is_none() {
            self.grids.clear_parent_grids();
        }
        self.relays.retain(|r| r.deadline > now);
        // Detached with a subtree and no contact took us in: we are an island's root (like a successor with no
        // ancestor left). As a root we keep retrying our contacts, and roots that reach each other merge; a
        // detached node only refuses joins, so islands of detached nodes would otherwise wait on each other.
        let island_after = self.config.join_timeout + self.config.retry_interval;
        if self.is_detached()
            && self.pending == Pending::None
            && !self.children.is_empty()
            && self.detached_since.is_some_and(|t| now.saturating_sub(t) >= island_after)
        {
            self.become_root();
        }
        // Detached, or a root that may be an island: retry contacts. A detached node waits for the answer to the
        // join it sent (`check_pending` asks the next contact once it is overdue).
        let detached = self.is_detached();
        let attaching = matches!(self.pending, Pending::Attach { .. });
        let joining = detached && matches!(self.pending, Pending::Join { .. });
        if !attaching && !joining && (detached || self.is_root) && now >= self.retry_at {
            self.retry_contacts(now);
        }
    }

    /// Without a parent, not a root and not running a succession as an orphan: a node that must join through its
    /// contacts.
    fn is_detached(&self) -> bool {
        self.parent.is_none() && !self.is_root && self.orphan.is_none()
    }

    /// Asks the next contact (a root: several) to take us in.
    fn retry_contacts(&mut self, now: Time) {
        self.retry_at = now + self.config.retry_interval;
        // Several contacts at once: some may be unreachable (a partition); the first to accept wins and
        // later accepts are declined.
        let mut first = None;
        // A lone detached node asks one contact at a time: parallel accepts would make parents adopt and
        // drop it again. A root brings a tree and merges are rare, so it asks several.
        let fanout = if self.is_root { CONTACTS_PER_RETRY } else { 1 };
        self.refill_contacts(now);
        for _ in 0..fanout.min(self.contacts.len()) {
            if let Some(contact) = self.pick_contact()
                && first != Some(contact)
            {
                let req = self.join_request(contact);
                self.send(contact, Message::JoinRequest(Box::new(req)));
                first.get_or_insert(contact);
            }
        }
        if let Some(contact) = first {
            self.pending = Pending::Join { contact, deadline: now + self.join_wait() };
        }
    }

    /// Heartbeats to all children, with the full view for those whose copy is stale and who were not sent the
    /// current one yet; `changes_only` sends only those.
    fn send_heartbeats(&mut self, changes_only: bool) {
        if self.children.is_empty() {
            return;
        }
        let version = self.view_version;
        let needs_view = |c: &Child| c.acked_version != version && c.sent_version != version;
        let view = self.children.iter().any(needs_view).then(|| self.view_for_children());
        // Grids ride on the periodic round only, to the children that do not hold the current group: what changed
        // since the version they hold, or the whole group (see `grids`).
        let current_group = if changes_only {
            None
        } else {
            let ids: Vec<NodeId> = self.children.iter().map(|c| c.info.id).collect();
            self.grids.group_for_children(&ids);
            self.grids.current_group().map(|g| g.version)
        };
        let mut targets = Vec::with_capacity(self.children.len());
        for c in self.children.iter_mut() {
            let full = needs_view(c);
            if full {
                c.sent_version = version;
            }
            let group = current_group.filter(|v| c.acked_group != *v && c.sent_group != *v).and_then(|v| {
                c.sent_group = v;
                self.grids.group_for_child(c.acked_group)
            });
            if full || !changes_only {
                targets.push((c.info.id, full, group));
            }
        }
        for (id, full, grids) in targets {
            let hb = Heartbeat {
                term: self.term,
                view_version: version,
                view: if full { view.clone() } else { None },
                address_block: self.address_block,
                grids,
                between_rounds: changes_only,
            };
            self.send(id, Message::Heartbeat(hb));
        }
    }

    fn view_for_children(&self) -> Arc<View> {
        let above = if self.parent.is_some() { &self.ancestors[..] } else { &[] };
        let ancestors = above.iter().chain([&self.info]).cloned().collect();
        let members = self.children.iter().map(|c| Member { info: c.info.clone(), rank: c.rank }).collect();
        let uncles = if self.parent.is_some() { Arc::clone(&self.members) } else { Arc::default() };
        Arc::new(View { version: self.view_version, ancestors, members, uncles })
    }

    fn mark_view_changed(&mut self) {
        self.view_version += 1;
        self.view_dirty = true;
        self.ranks_stale_since = None; // the new view carries the current ranks
    }

    /// Only ranks changed: not worth a view to every child on its own (see `Config::rank_push_delay`).
    fn mark_ranks_changed(&mut self, now: Time) {
        self.ranks_stale_since.get_or_insert(now);
    }

    // ----- failure detection and succession ------------------------------------------------------------------

    fn check_parent(&mut self, now: Time) {
        let Some(p) = &mut self.parent else { return };
        let seq = self.probe_seq + 1;
        match p.detector.poll(now, seq) {
            Verdict::Wait => {}
            Verdict::Probe(seq) => {
                self.probe_seq = seq;
                let target = p.info.id;
                self.send(target, Message::Probe { seq });
                let siblings: Vec<NodeId> =
                    self.members.iter().map(|m| m.info.id).filter(|id| *id != self.info.id && *id != target).collect();
                for _ in 0..self.config.indirect_probes.min(siblings.len()) {
                    let pick = siblings[self.rng.random_range(0..siblings.len())];
                    self.send(pick, Message::ProbeRequest { target, seq });
                }
            }
            Verdict::Dead => {
                let failed = p.info.id;
                self.parent_failed(now, failed);
            }
        }
    }

    fn on_probe_ack(&mut self, now: Time, from: NodeId, seq: u64) {
        if let Some(p) = &mut self.parent
            && p.info.id == from
        {
            p.detector.probe_answered(now, seq);
        }
        if let Some(i) = self.relays.iter().position(|r| r.target == from && r.our_seq == seq) {
            let r = self.relays.swap_remove(i);
            self.send(r.requester, Message::ProbeResult { target: r.target, seq: r.their_seq, alive: true });
        }
    }

    fn on_probe_request(&mut self, now: Time, from: NodeId, target: NodeId, seq: u64) {
        let heard_recently = self.parent.as_ref().is_some_and(|p| {
            p.info.id == target && now.saturating_sub(p.detector.last_heard_directly()) < self.config.heartbeat_interval
        });
        if heard_recently {
            self.send(from, Message::ProbeResult { target, seq, alive: true });
            return;
        }
        if self.relays.len() >= MAX_RELAYS {
            return;
        }
        self.probe_seq += 1;
        let our_seq = self.probe_seq;
        self.relays.push(Relay {
            requester: from,
            target,
            their_seq: seq,
            our_seq,
            deadline: now + self.config.probe_timeout,
        });
        self.send(target, Message::Probe { seq: our_seq });
    }

    fn parent_failed(&mut self, now: Time, failed: NodeId) {
        let Some(p) = self.parent.take() else { return };
        self.counters.parent_failures += 1;
        self.push_event(Event::ParentFailed(failed));
        let climb: Vec<NodeInfo> = self.ancestors.iter().filter(|a| a.id != failed).cloned().collect();
        let uncles: Vec<NodeId> = std::mem::take(&mut self.uncles).iter().map(|u| u.info.id).collect();
        for id in climb.iter().map(|a| a.id).chain(uncles) {
            self.add_contact(id);
        }
        self.orphan = Some(Orphan {
            old_parent: failed,
            old_term: p.term,
            members: std::mem::take(&mut self.members),
            climb,
            tried: Vec::new(),
        });
        self.pending = Pending::None;
        self.next_succession_step(now);
    }

    /// Attach to the best live successor, or take over when that is us.
    fn next_succession_step(&mut self, now: Time) {
        let Some(o) = &self.orphan else { return };
        let successor = choose_successor(&o.members, self.rank(), o.old_parent, &o.tried);
        if successor == self.info.id {
            self.take_over(now);
        } else {
            self.send_attach(now, successor, None, AttachPurpose::ToSuccessor);
        }
    }

    /// Take the failed (or leaving) parent's place: a higher term, attached to the nearest live ancestor.
    fn take_over(&mut self, now: Time) {
        let Some(o) = &self.orphan else { return };
        self.term = self.term.max(o.old_term) + 1;
        self.counters.takeovers += 1;
        // The group's address blocks come with the role.
        self.routing.took_over(now, self.info.id);
        self.routing_polled = None;
        self.climb(now);
    }

    fn climb(&mut self, now: Time) {
        let Some(o) = &mut self.orphan else { return };
        let replaces = o.old_parent;
        match o.climb.pop() {
            Some(next) => {
                o.tried.push(next.id);
                self.send_attach(now, next.id, Some(replaces), AttachPurpose::Climb);
            }
            None => {
                // No ancestor answers: we are an island's root until a contact answers again. Former siblings
                // on our side of a partition may be island roots too: keep them as contacts to merge with.
                let siblings: Vec<NodeId> = o.members.iter().map(|m| m.info.id).filter(|id| *id != replaces).collect();
                for id in siblings {
                    self.add_contact(id);
                }
                self.orphan = None;
                self.pending = Pending::None;
                self.become_root();
            }
        }
    }

    fn become_root(&mut self) {
        self.is_root = true;
        self.parent = None;
        self.ancestors = Arc::default();
        self.members = Arc::default();
        self.uncles = Arc::default();
        self.mark_view_changed();
    }

    fn check_pending(&mut self, now: Time) {
        match self.pending {
            Pending::Join { deadline, .. } if now >= deadline => {
                self.counters.join_lost += 1;
                self.pending = Pending::None;
                // A detached node asks its next contact at once; a root retries with its tick.
                if self.is_detached() {
                    self.retry_contacts(now);
                }
            }
            Pending::Attach { deadline, .. } if now >= deadline => self.attach_failed(now),
            _ => {}
        }
    }

    fn attach_failed(&mut self, now: Time) {
        let Pending::Attach { target, purpose, .. } = self.pending else { return };
        self.pending = Pending::None;
        match purpose {
            AttachPurpose::ToSuccessor => {
                if let Some(o) = &mut self.orphan {
                    o.tried.push(target);
                }
                self.next_succession_step(now);
            }
            AttachPurpose::Climb => self.climb(now),
            AttachPurpose::Direct => {
                // The parent that redirected us let us go: the link kept for the move goes too.
                if self.parent.as_ref().is_some_and(|p| p.info.id != target) {
                    self.parent = None;
                }
                // Fall back to a normal join through our contacts (next tick), asking the target first: a live
                // parent sent us there, and its answer may be what was lost. Behind older contacts (ancestors that
                // may have crashed, each costing a join wait), a node redirected by a split was still detached 3 s
                // later in a property schedule with 1.9% loss.
                self.add_contact_front(target);
            }
        }
    }

    // ----- leaving ------------------------------------------------------------------------------------------

    fn on_handover(&mut self, now: Time, from: NodeId, term: u64, ancestors: Vec<NodeInfo>) {
        if self.parent() != Some(from) {
            self.counters.unexpected += 1;
            return;
        }
        self.parent = None;
        self.term = self.term.max(term.saturating_sub(1));
        let old_term = term.saturating_sub(1);
        // The ancestors may be leaving too: keep the rest of the tree we knew as contacts to rejoin or merge with.
        self.remember_tree_contacts(from);
        let members = std::mem::take(&mut self.members);
        self.orphan = Some(Orphan { old_parent: from, old_term, members, climb: ancestors, tried: Vec::new() });
        self.take_over(now);
    }

    fn on_leaving(&mut self, from: NodeId) {
        if self.children.remove(&from).is_some() {
            self.push_event(Event::MemberLeft(from));
            self.mark_view_changed();
        } else if self.parent() == Some(from) {
            self.parent = None;
            self.remember_tree_contacts(from);
            self.add_contact(from);
        }
    }

    fn leave(&mut self) {
        if let Some(p) = &self.parent {
            let to = p.info.id;
            self.send(to, Message::Leaving);
        }
        if let Some(heir) = self.children.iter().max_by_key(|c| c.rank).map(|c| c.info.clone()) {
            let ancestors = if self.parent.is_some() { self.ancestors.to_vec() } else { Vec::new() };
            self.send(heir.id, Message::Handover { term: self.term + 1, ancestors });
            let others: Vec<NodeId> = self.children.iter().map(|c| c.info.id).filter(|id| *id != heir.id).collect();
            for id in others {
                self.send(id, Message::Redirect { to: Box::new(heir.clone()) });
            }
        }
        self.children.clear();
        self.parent = None;
        self.is_root = false;
        self.orphan = None;
        self.pending = Pending::None;
        self.leaving = true;
    }

    // ----- helpers ------------------------------------------------------------------------------------------

    pub fn rank(&self) -> Rank {
        let uptime = self.next_tick.saturating_sub(self.started);
        Rank::new(self.info.id, self.info.reachable, &self.info.capacity, uptime)
    }

    fn root_claim(&self) -> RootClaim {
        let size = self.summary().size;
        RootClaim { size_class: (u32::BITS - size.leading_zeros()) as u8, term: self.term, id: self.info.id }
    }

    pub fn summary(&self) -> Summary {
        Summary::aggregate(self.info.position, self.children.iter().map(|c| &c.summary))
    }

    fn info_of(&self, id: &NodeId) -> Option<&NodeInfo> {
        if let Some(p) = &self.parent
            && p.info.id == *id
        {
            return Some(&p.info);
        }
        self.children
            .iter()
            .map(|c| &c.info)
            .chain(self.members.iter().map(|m| &m.info))
            .chain(self.uncles.iter().map(|m| &m.info))
            .chain(self.ancestors.iter())
            .chain(self.orphan.iter().flat_map(|o| o.members.iter().map(|m| &m.info)))
            .find(|i| i.id == *id)
            .or_else(|| self.peers.get(id))
    }

    fn remember_peer(&mut self, info: NodeInfo) {
        if info.id == self.info.id {
            return;
        }
        let id = info.id;
        if self.peers.insert(id, info).is_none() {
            self.peer_order.push_back(id);
            if self.peer_order.len() > MAX_PEER_CACHE
                && let Some(old) = self.peer_order.pop_front()
            {
                self.peers.remove(&old);
            }
        }
    }

    /// Keep the ancestors, uncles and siblings we knew (but not `leaving`) as contacts to rejoin through.
    fn remember_tree_contacts(&mut self, leaving: NodeId) {
        let known: Vec<NodeId> = (self.ancestors.iter().rev())
            .chain(self.uncles.iter().map(|m| &m.info))
            .chain(self.members.iter().map(|m| &m.info))
            .map(|i| i.id)
            .filter(|id| *id != leaving)
            .collect();
        for id in known {
            self.add_contact(id);
        }
    }

    fn add_contact(&mut self, id: NodeId) {
        if id == self.info.id || self.contacts.contains(&id) {
            return;
        }
        self.contacts.push_back(id);
        if self.contacts.len() > MAX_CONTACTS {
            self.contacts.pop_front();
        }
    }

    fn add_contact_front(&mut self, id: NodeId) {
        if id == self.info.id {
            return;
        }
        self.contacts.retain(|c| *c != id);
        self.contacts.push_front(id);
        self.contacts.truncate(MAX_CONTACTS);
        self.next_contact = 0;
    }

    fn add_anchor(&mut self, id: NodeId) {
        if id != self.info.id && !self.anchors.contains(&id) {
            self.anchors.push(id);
            if self.anchors.len() > MAX_CONTACTS {
                self.anchors.remove(0);
            }
        }
    }

    /// The anchors become contacts again every `ANCHOR_RETRY_INTERVALS` retries (not every retry: in a lone tree
    /// they are the root's own members), also while other contacts are listed: those may all be dead, and an
    /// anchor dropped as "inside our tree" during a partition may be the way to the other side after the heal
    /// (two island roots whose only contacts had crashed kept asking them and never merged).
    fn refill_contacts(&mut self, now: Time) {
        if now < self.anchors_retry_at {
            return;
        }
        self.anchors_retry_at = now + self.config.retry_interval * ANCHOR_RETRY_INTERVALS;
        for anchor in self.anchors.clone() {
            self.add_contact(anchor);
        }
        // The anchors may all be gone (crashed roots): a few peers we once heard of, newest first, besides.
        let heard: Vec<NodeId> = self
            .peer_order
            .iter()
            .rev()
            .copied()
            .filter(|p| !self.children.contains(p) && !self.contacts.contains(p))
            .take(CONTACTS_PER_RETRY)
            .collect();
        for peer in heard {
            self.add_contact(peer);
        }
    }

    /// Round-robin over contacts that are not our own children (those are in our tree for sure).
    fn pick_contact(&mut self) -> Option<NodeId> {
        for _ in 0..self.contacts.len() {
            let i = self.next_contact % self.contacts.len();
            self.next_contact = i + 1;
            let c = self.contacts[i];
            if !self.children.contains(&c) {
                return Some(c);
            }
        }
        None
    }

    fn send(&mut self, to: NodeId, body: Message) {
        self.next_msg_id += 1;
        self.counters.sent += 1;
        let envelope = Envelope { version: crate::PROTOCOL_VERSION, id: self.next_msg_id, from: self.info.id, body };
        self.outputs.push_back(Output::Send { to, envelope });
    }

    /// Sends `body` and a copy with the same id: the receiver's duplicate check drops the copy when the first
    /// arrived, so it only stands in for a lost first. (Copies with ids of their own were each handled: a parent
    /// that split between the two adopted a child again that it had just sent elsewhere, and a block it then kept
    /// for that child went to another one while the child's subtree still used it.)
    fn send_twice(&mut self, to: NodeId, body: Message) {
        self.send(to, body);
        if let Some(Output::Send { envelope, .. }) = self.outputs.back() {
            let envelope = envelope.clone();
            self.counters.sent += 1;
            self.outputs.push_back(Output::Send { to, envelope });
        }
    }

    fn push_event(&mut self, e: Event) {
        self.outputs.push_back(Output::Event(e));
    }

    /// After every input: push changed views to children and report role/parent changes.
    fn finish(&mut self, now: Time) {
        // Polling runs after every input, but finds work only when routing had an input, the tree around it
        // changed, or a resync is due: skipping the rest spares most inputs reading routing's state. The key is
        // compared in place and built only for a poll: copying the parent's id for it, and again below, was a tenth
        // of this function's instructions.
        let parent = self.parent.as_ref().map(|p| &p.info.id);
        let polled_as_is = self.routing_polled.as_ref().is_some_and(|key| {
            let RoutingPollKey { is_root, parent: polled_parent, position, children_generation } = key;
            *is_root == self.is_root
                && polled_parent.as_ref() == parent
                && *position == self.info.position
                && *children_generation == self.children.generation()
        });
        if !polled_as_is || (parent.is_some() && self.routing.sync_due(now)) {
            let key = RoutingPollKey {
                is_root: self.is_root,
                parent: self.parent(),
                position: self.info.position,
                children_generation: self.children.generation(),
            };
            let mut quiet = false;
            self.with_routing(|r, ctx| quiet = r.poll(now, ctx));
            // A poll that did something may find more to do on the next input, as it always could.
            self.routing_polled = quiet.then_some(key);
        }
        // View changes go out at once, then at most every `VIEW_PUSH_DIVISOR`th of a heartbeat: while thousands
        // join, a coordinator's view changed with every joiner, and each change sent the whole view to every child.
        if self.view_dirty && now >= self.next_view_push {
            self.view_dirty = false;
            self.next_view_push = now + self.config.heartbeat_interval / VIEW_PUSH_DIVISOR;
            self.send_heartbeats(true);
        }
        let role = (self.role(), self.term);
        if role.0 != Role::Detached {
            self.detached_since = None;
        } else if self.detached_since.is_none() {
            self.detached_since = Some(now);
        }
        if self.last_parent.as_ref() != self.parent.as_ref().map(|p| &p.info.id) {
            let parent = self.parent();
            self.last_parent = parent;
            self.push_event(Event::ParentChanged { parent });
        }
        if role != self.last_role {
            let was_detached = self.last_role.0 == Role::Detached;
            self.last_role = role;
            self.push_event(Event::RoleChanged { role: role.0, term: role.1 });
            if was_detached && role.0 != Role::Detached {
                self.push_event(Event::Joined { parent: self.parent(), term: role.1 });
            }
        }
    }
}
