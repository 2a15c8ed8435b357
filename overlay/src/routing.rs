//! Routes and addresses inside a node: subnet grants down the tree, the instance registry up the tree, route
//! queries with interests, and the root's ServiceIP/InstanceIP allocation. A sub-state-machine owned by
//! [`crate::Node`]; it composes the blocks in [`crate::routes`].
//!
//! # API for the agent
//!
//! Commands go in as `Command::Route(RouteCommand::..)`, events come out as `Event::Route(RouteEvent::..)`:
//!
//! | command | effect |
//! |---|---|
//! | [`RouteCommand::DeployService`] | asks the root for the service's ServiceIPs (one per policy) and InstanceIPs; answer [`RouteEvent::ServiceDeployed`] or [`RouteEvent::DeployFailed`] naming the service (e.g. a fixed address is taken) |
//! | [`RouteCommand::RegisterInstance`] | an instance runs here: its record goes up the tree; the service is pinned (this node receives updates of its other instances) |
//! | [`RouteCommand::UnregisterInstance`] | it stopped: removal goes up |
//! | [`RouteCommand::QueryRoute`] | by name or by ServiceIP/InstanceIP: [`RouteEvent::RouteAnswer`] or [`RouteEvent::RouteNotFound`]; registers an interest, so later changes arrive as [`RouteEvent::RouteChanged`] |
//! | [`RouteCommand::RouteUsed`] | keeps the interest alive (call while connections use the route) |
//! | [`RouteCommand::InstanceUnreachable`] | a tunnel said "route not found": forgets that instance and queries again |
//! | [`RouteCommand::RequestSubnet`] | this machine's subnet is full: asks for another one ([`RouteEvent::SubnetGranted`]) |
//! | [`RouteCommand::RestoreSubnets`] | after a restart, before `Start`/`Join`: the subnets held before come back as [`RouteEvent::SubnetGranted`] (kept) or [`RouteEvent::SubnetChanged`] (replaced) |
//!
//! Subnets: every node gets a machine subnet (`/26` by default) from its parent ([`RouteEvent::SubnetGranted`]);
//! when it has to be renumbered (moved to another parent, overlap after a partition) it gets
//! [`RouteEvent::SubnetChanged`]. [`Routing::machine_subnets`] lists the current ones.
//!
//! # Protocol
//!
//! - Grants: a child sends [`RoutesMessage::SubnetSync`] (what it holds, what it wants) to its parent whenever its
//!   parent changes and every `resync_interval`. The parent keeps what it can (its pool holds or can claim the
//!   block), grants the wants and replaces what it cannot keep (same size, [`RoutesMessage::SubnetReply`]). A
//!   coordinator without room asks its own parent for another block first. Leases of current children are renewed
//!   on every tick and reclaimed after expiry; a dropped child's grants are released at once. A coordinator's
//!   block that moves shifts every grant inside it ([`RoutesMessage::Moved`] to the holders, recursively).
//!   A successor inherits the blocks of the group it takes over ([`RoutesMessage::GroupBlocks`] told it which),
//!   so its siblings keep their subnets when they sync with it.
//! - Splits: a coordinator whose children move up beside it (under its parent) hands the blocks it granted them
//!   to its parent ([`RoutesMessage::SubnetHandOver`]), which grants each to its holder, carved out of the
//!   coordinator's grant; a root keeps the grants of children it moves below another child. Either way the moved
//!   nodes' claims find their blocks and keep them (see [`Routing::hand_over`]).
//! - Keeping blocks: a want with `replaces: Some(b)` asks to keep `b` (a held block the parent could not claim,
//!   or a subnet from before a restart). The parent answers `Granted { block: b, replaces: Some(b) }` when `b`
//!   is free in its pool; when `b` lies outside its pool it asks its own parent for `b` as a block (up to the
//!   root, which owns the platform range) and grants it on. Only when `b` overlaps a live grant somewhere on the
//!   way is it replaced by a fresh block of the same size. So after a partition heals, the joining root's blocks
//!   that clash with nothing in the surviving tree keep their addresses; the clashing ones (the joining side's,
//!   whatever their age) are renumbered and shift every grant inside them.
//! - Registry: records go up ([`RoutesMessage::Up`]); a lost child's records go up as
//!   [`RoutesMessage::Lost`], removed only where they were learned through that path (they may be on their way up
//!   through a new parent), without tombstones. Every change is pushed down to interested children
//!   ([`RoutesMessage::Down`]).
//! - Queries: [`RoutesMessage::Query`] to the parent on a miss; the parent answers from its index or cache (pruned
//!   to `k` instances per policy for the asker), registers the asker's interest, and asks further up when it knows
//!   nothing; the root answers or says [`RoutesMessage::NotFound`]. Interests are renewed upwards with
//!   [`RoutesMessage::Renew`] every `renew_interval` while wanted.
//! - ServiceIPs: [`RoutesMessage::Deploy`] travels up to the root, the answer travels back down along the recorded
//!   path. A root that joins another tree sends its allocator table up ([`RoutesMessage::MergeAllocator`]); the
//!   surviving root merges it and pushes moved ServiceIPs down as address changes. The root frees the InstanceIP
//!   of an instance that left the tree once `instance_ip_grace` passed without it coming back (restarted or
//!   moved instances keep their address); a later instance with that number needs a new deployment.

use crate::id::NodeId;
use crate::routes::pool::{DEFAULT_MACHINE_PREFIX, PLATFORM_RANGE, SERVICE_IP_RANGE, block_size, carve};
use crate::routes::{
    AddressPool, AddressRequest, AllocatorState, CacheLookup, InstanceRecord, InterestTable, PoolError, QueryAnswer,
    QueryDecision, QueryKey, Registry, RouteCache, RouteChange, ServiceAddresses, ServiceIpAllocator, ServiceName, Via,
    decide,
};
use crate::{Position, Time};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

/// Most machine subnets a node restores after a restart.
pub const MAX_RESTORED: usize = 64;
/// The largest block a coordinator asks its parent for at once (16,384 addresses).
const MAX_BLOCK_PREFIX: u8 = 18;
/// Lease renewals and sweeps per lease.
const LEASE_SWEEPS: u32 = 6;
/// Longest path a deployment request records on its way up (deeper trees are a bug).
pub const MAX_PATH: usize = 64;
/// Bounds on lists in routes messages.
pub const MAX_LIST: usize = 4096;

/// Tunables for routes and addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RoutingConfig {
    /// The range machine subnets come from (the root owns it); it must hold the ServiceIP range, which is never
    /// granted. The same on every agent.
    pub platform_range: Ipv4Net,
    /// Prefix length of a machine subnet.
    pub machine_prefix: u8,
    /// Lease of a grant; renewed every tick while the holder is a child.
    pub lease: Duration,
    /// How often a child repeats its subnet sync (lost messages, reclaimed grants).
    pub resync_interval: Duration,
    /// How long a request to the parent (our own machine subnet, a block for our children) may go unanswered
    /// before it is asked again. Waiting a resync interval, one lost request near the root of a join storm left
    /// hundreds of machines below it without a subnet for ten seconds. A refusal still waits a resync interval.
    pub answer_wait: Duration,
    /// Interests lapse after this unless renewed.
    pub interest_ttl: Duration,
    /// How often wanted interests are renewed with the parent.
    pub renew_interval: Duration,
    /// "Not found" answers are cached this long.
    pub not_found_ttl: Duration,
    /// Instances per policy in an answer to a child.
    pub k_per_policy: usize,
    /// How long the root keeps the InstanceIP of an instance that stopped running: an instance that comes back
    /// within it (restart, move to another machine) keeps its address; after it the address is free.
    pub instance_ip_grace: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            platform_range: PLATFORM_RANGE,
            machine_prefix: DEFAULT_MACHINE_PREFIX,
            lease: Duration::from_secs(30),
            resync_interval: Duration::from_secs(10),
            answer_wait: Duration::from_secs(2),
            interest_ttl: Duration::from_secs(60),
            renew_interval: Duration::from_secs(20),
            not_found_ttl: Duration::from_secs(5),
            k_per_policy: 4,
            instance_ip_grace: Duration::from_secs(300),
        }
    }
}

/// Local commands for routes and addresses.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteCommand {
    DeployService {
        name: ServiceName,
        request: AddressRequest,
        instances: u32,
    },
    RegisterInstance(InstanceRecord),
    UnregisterInstance {
        service: ServiceName,
        number: u32,
        version: u64,
    },
    QueryRoute(QueryKey),
    RouteUsed(ServiceName),
    InstanceUnreachable {
        service: ServiceName,
        number: u32,
    },
    RequestSubnet,
    /// The machine subnets this node held before it restarted (persisted by the agent). Give it before `Start`
    /// or `Join` (or right after `Join`): each comes back as [`RouteEvent::SubnetGranted`] when the parent (or,
    /// at a new root, the platform range) can keep it, else as [`RouteEvent::SubnetChanged`] to a replacement.
    RestoreSubnets(Vec<Ipv4Net>),
}

/// Events for the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RouteEvent {
    SubnetGranted {
        block: Ipv4Net,
    },
    SubnetChanged {
        old: Ipv4Net,
        new: Ipv4Net,
    },
    /// A subnet was taken away without replacement (no room left).
    SubnetRevoked {
        block: Ipv4Net,
    },
    ServiceDeployed {
        addresses: ServiceAddresses,
        instance_ips: Vec<(u32, Ipv4Addr)>,
    },
    RouteAnswer {
        key: QueryKey,
        answer: QueryAnswer,
    },
    RouteNotFound {
        key: QueryKey,
    },
    /// A route this node is interested in changed.
    RouteChanged {
        change: RouteChange,
    },
    /// A subnet could not be granted or a record was refused (deployments fail with [`RouteEvent::DeployFailed`]).
    AllocationFailed {
        reason: String,
    },
    /// A [`RouteCommand::DeployService`] failed (e.g. a fixed address is taken, or no tree to ask).
    DeployFailed {
        name: ServiceName,
        reason: String,
    },
}

/// What a grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Purpose {
    /// The holder's own machine subnet.
    Machine,
    /// A block the holder grants from to its children.
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub purpose: Purpose,
    pub block: Ipv4Net,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Want {
    pub purpose: Purpose,
    pub prefix: u8,
    /// The block this one replaces (renumbering).
    pub replaces: Option<Ipv4Net>,
    /// Whose block `replaces` is, when a coordinator asks on behalf of a node below it: the node that granted it
    /// can hand the grant over even before it notices that node left its group (a split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf: Option<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    pub purpose: Purpose,
    pub block: Ipv4Net,
    pub replaces: Option<Ipv4Net>,
}

/// Messages of the routes protocol (inside `Message::Routes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RoutesMessage {
    SubnetSync {
        held: Vec<Held>,
        want: Vec<Want>,
    },
    /// Child -> parent: wants between full syncs (a block for what waits, a claim on behalf of a node below).
    /// What the child holds rides on its periodic `SubnetSync` only: a coordinator high in a large tree holds
    /// thousands of blocks, too many to list with every request.
    SubnetWant(Vec<Want>),
    SubnetReply {
        granted: Vec<Granted>,
        refused: Vec<(Want, String)>,
    },
    /// Parent -> child: your grant `old` now is `new` (`None`: revoked).
    Moved {
        old: Ipv4Net,
        new: Option<Ipv4Net>,
    },
    /// Parent -> children: the blocks of the group's pool, for a successor to inherit.
    GroupBlocks(Vec<Ipv4Net>),
    Up(RouteChange),
    /// Child -> parent: instances of a lost subtree, as (service, number).
    Lost(Vec<(ServiceName, u32)>),
    Down(RouteChange),
    Query {
        key: QueryKey,
        position: Position,
    },
    Answer {
        key: QueryKey,
        answer: QueryAnswer,
    },
    NotFound(QueryKey),
    Renew(Vec<ServiceName>),
    Deploy {
        name: ServiceName,
        request: AddressRequest,
        instances: u32,
        path: Vec<NodeId>,
    },
    Deployed {
        name: ServiceName,
        result: DeployResult,
        path: Vec<NodeId>,
    },
    MergeAllocator(AllocatorState),
    /// Child -> parent: blocks the child granted to its children that moved away in a split, with their holders.
    /// The parent grants each to its holder, carved out of the child's grant, so the holder keeps it when it claims
    /// it from its new place (see [`Routing::hand_over`]).
    SubnetHandOver(Vec<(Ipv4Net, NodeId)>),
}

impl RoutesMessage {
    /// Bounds checks after decoding.
    pub fn validate(&self) -> Result<(), &'static str> {
        let ok = |n: usize| if n <= MAX_LIST { Ok(()) } else { Err("routes list too long") };
        let path_ok = |p: &Vec<NodeId>| if p.len() <= MAX_PATH { Ok(()) } else { Err("deploy path too long") };
        let prefix_ok = |p: u8| if p <= 32 { Ok(()) } else { Err("prefix longer than /32") };
        match self {
            RoutesMessage::SubnetSync { held, want } => {
                ok(held.len() + want.len())?;
                want.iter().try_for_each(|w| prefix_ok(w.prefix))
            }
            RoutesMessage::SubnetWant(want) => {
                ok(want.len())?;
                want.iter().try_for_each(|w| prefix_ok(w.prefix))
            }
            RoutesMessage::SubnetReply { granted, refused } => ok(granted.len() + refused.len()),
            RoutesMessage::GroupBlocks(b) => ok(b.len()),
            RoutesMessage::SubnetHandOver(h) => ok(h.len()),
            RoutesMessage::Lost(l) => ok(l.len()),
            RoutesMessage::Renew(s) => ok(s.len()),
            RoutesMessage::Answer { answer, .. } => ok(answer.instances.len()),
            RoutesMessage::Deploy { path, .. } | RoutesMessage::Deployed { path, .. } => path_ok(path),
            RoutesMessage::MergeAllocator(s) => ok(s.assignments.len() / 16 + s.ranges.len()),
            RoutesMessage::Moved { .. }
            | RoutesMessage::Up(_)
            | RoutesMessage::Down(_)
            | RoutesMessage::Query { .. }
            | RoutesMessage::NotFound(_) => Ok(()),
        }
    }
}

/// The node's place in the tree, as the routes protocol needs it.
pub struct TreeCtx<'a> {
    pub me: NodeId,
    pub position: Position,
    pub parent: Option<NodeId>,
    pub is_root: bool,
    pub children: &'a [(NodeId, Position)],
    /// A number that changes whenever `children` does (the node counts the changes of its children); `None`:
    /// unknown, so routing compares the list with the one it saw last.
    pub children_generation: Option<u64>,
}

impl TreeCtx<'_> {
    fn child_position(&self, id: NodeId) -> Option<Position> {
        self.children.iter().find(|(c, _)| *c == id).map(|(_, p)| *p)
    }
}

/// What a parent can do with a child's wish to keep a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Kept,
    /// Asked our own parent for it; the want waits.
    AskedUp,
    /// We are moving ourselves (detached, our attach pending): the want waits for our parent, who may hold the
    /// block for us. A fresh block now would renumber the child's whole subtree.
    NoParentYet,
    No,
}

/// Who waits for the answer to a query this node sent up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asker {
    Local,
    Child(NodeId),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingCounters {
    pub grants_made: u64,
    /// Idle blocks a coordinator returned to its parent.
    pub blocks_given_back: u64,
    /// Blocks of children that moved away in a split, handed to the parent for them.
    pub blocks_handed_over: u64,
    /// This machine's subnets and this group's blocks moved to other ones, and children's grants that lapsed
    /// (their holder went silent or moved away): not only machines that were renumbered.
    pub renumbered: u64,
    pub queries_up: u64,
    pub answers: u64,
    pub not_found: u64,
    pub updates_down: u64,
    pub rejected: u64,
    /// Own deployments sent again (new parent, or unanswered for a resync interval).
    pub deploys_resent: u64,
}

/// Children's wants, ordered by child.
type Waiting = BTreeSet<(NodeId, Want)>;

/// This machine's subnets, with a count of their changes: `own_subnets_in_pool` runs on every poll and compared a
/// copy of the list with the list (two cache misses a call in a large simulation) to see whether they changed.
#[derive(Debug, Default)]
struct MachineSubnets {
    list: Vec<Ipv4Net>,
    changes: u64,
}

impl std::ops::Deref for MachineSubnets {
    type Target = [Ipv4Net];

    fn deref(&self) -> &[Ipv4Net] {
        &self.list
    }
}

impl MachineSubnets {
    fn push(&mut self, subnet: Ipv4Net) {
        self.list.push(subnet);
        self.changes += 1;
    }

    fn retain(&mut self, keep: impl FnMut(&Ipv4Net) -> bool) {
        let before = self.list.len();
        self.list.retain(keep);
        if self.list.len() != before {
            self.changes += 1;
        }
    }
}

/// When [`Routing::tick`] and the periodic poll have work, kept together so that [`Routing::skip_quiet_tick`] and
/// [`Routing::sync_due`] read one cache line. A quiet tick used to read a dozen lines of routing's state (and the poll
/// after it a dozen more) to find nothing to do, in every node at every heartbeat.
#[derive(Debug, Clone, Copy)]
struct TickSchedule {
    /// Nothing that expires or is waited for is held: no interests, cached routes, tombstones, lapsing service
    /// addresses, open block request, claims, replacements, refusals or deployments on their way. A tick then only
    /// sweeps leases and renews interests, each on its own schedule. Set by the tick that finds it so, cleared by
    /// every input.
    idle: bool,
    /// The pool held no grants after the last tick (a leaf's never does): a lease sweep then renews nothing. Only
    /// read while `idle`, which any input clears.
    pool_empty: bool,
    /// When the children's leases are next renewed and lapsed grants swept (a few times per lease, not every tick:
    /// a root holds thousands of grants).
    next_lease_sweep: Time,
    next_renew: Time,
    /// The next periodic resync with the parent (a poll does it; see [`Routing::sync_due`]).
    next_sync: Time,
}

// `schedule` first: every heartbeat reads it, and a driver prefetches it with the node's hot part (see
// `Routing::SCHEDULE_RANGE`).
#[repr(C)]
pub struct Routing {
    schedule: TickSchedule,
    cfg: RoutingConfig,
    /// This machine's subnets.
    machine: MachineSubnets,
    /// Blocks the parent granted this node for its group (exact grants, as the parent knows them).
    parent_blocks: Vec<Ipv4Net>,
    /// Grants to children (and, at the root, to itself). The root's owns the platform range.
    pool: AddressPool,
    pool_is_platform: bool,
    /// Children's wants waiting for a block from the parent.
    waiting: Waiting,
    /// Children's wants to keep a block we asked our parent for (`claims_up`), by that block: they wait for its
    /// answer (or for the block to come into our pool), not for every block that arrives (a coordinator near the
    /// root of 100k nodes had thousands, each tried again per arriving block).
    waiting_up: BTreeMap<Ipv4Net, Waiting>,
    /// Our pool's blocks when `waiting_up` was last checked against them.
    owned_checked: Vec<Ipv4Net>,
    block_asked_at: Option<Time>,
    /// The parent refused our open block request: asked again after a resync interval, not `answer_wait`.
    block_refused: bool,
    /// Our last sync wanted a machine subnet and no answer to it came yet: synced again after `answer_wait`.
    sync_awaits_answer: bool,
    extra_machine_wanted: bool,
    /// Machine subnets from before a restart, asked back from the parent (or claimed at a root).
    restoring: Vec<Ipv4Net>,
    /// Blocks a child wants kept that lie outside our pool: asked from our parent for ourselves, with when.
    claims_up: BTreeMap<Ipv4Net, Time>,
    /// Claims in `claims_up` made for children that moved away in a split since, with the holder each was for: the
    /// answer goes on to our parent for that holder (see [`Routing::hand_over`]), not into our pool.
    claims_handed: BTreeMap<Ipv4Net, NodeId>,
    /// Replacements granted lately, by (child, replaced block): a child repeats its syncs before our answer
    /// arrives, and each repeat must get the same replacement, not another fresh block.
    replacements: BTreeMap<(NodeId, Ipv4Net), (Ipv4Net, Time)>,
    /// Blocks our parent could not keep for us: a child's want for one of them gets a fresh block instead.
    unavailable_up: BTreeSet<Ipv4Net>,
    /// The group blocks of our parent (what we inherit when we take its place).
    parent_group: Vec<Ipv4Net>,
    synced_parent: Option<NodeId>,
    was_root: bool,
    known_children: Vec<NodeId>,
    /// The children's generation `known_children` was taken at (see [`TreeCtx::children_generation`]).
    known_generation: Option<u64>,
    sent_group: Vec<Ipv4Net>,

    registry: Registry,
    cache: RouteCache,
    interests: InterestTable,
    pending: HashMap<QueryKey, Vec<Asker>>,
    allocator: Option<ServiceIpAllocator>,
    /// The pool version and the machine subnets' change count `own_subnets_in_pool` last found in order (it runs on
    /// every poll).
    own_checked: Option<(u64, u64)>,
    /// Our own deployments on their way to the root, with when they were sent: sent again through a new parent,
    /// or when unanswered for a resync interval (the answer retraces the path up, which a parent change breaks).
    own_deploys: Vec<(OwnDeploy, Time)>,

    out: Vec<(NodeId, RoutesMessage)>,
    events: Vec<RouteEvent>,
    counters: RoutingCounters,
}

impl Routing {
    pub fn new(cfg: RoutingConfig) -> Self {
        let lease = cfg.lease;
        Routing {
            registry: Registry::new(lease * 2),
            cache: RouteCache::new(cfg.interest_ttl, cfg.not_found_ttl),
            interests: InterestTable::new(cfg.interest_ttl),
            pool: AddressPool::new([], [], lease),
            cfg,
            machine: MachineSubnets::default(),
            parent_blocks: Vec::new(),
            pool_is_platform: false,
            waiting: BTreeSet::new(),
            waiting_up: BTreeMap::new(),
            owned_checked: Vec::new(),
            block_asked_at: None,
            block_refused: false,
            sync_awaits_answer: false,
            own_checked: None,
            extra_machine_wanted: false,
            restoring: Vec::new(),
            claims_up: BTreeMap::new(),
            claims_handed: BTreeMap::new(),
            replacements: BTreeMap::new(),
            unavailable_up: BTreeSet::new(),
            parent_group: Vec::new(),
            synced_parent: None,
            was_root: false,
            known_children: Vec::new(),
            known_generation: None,
            sent_group: Vec::new(),
            pending: HashMap::new(),
            allocator: None,
            schedule: TickSchedule {
                idle: false,
                pool_empty: false,
                next_lease_sweep: Time::ZERO,
                next_renew: Time::ZERO,
                next_sync: Time::ZERO,
            },
            own_deploys: Vec::new(),
            out: Vec::new(),
            events: Vec::new(),
            counters: RoutingCounters::default(),
        }
    }

    // ----- read access --------------------------------------------------------------------------------------

    pub fn machine_subnets(&self) -> &[Ipv4Net] {
        &self.machine
    }

    /// Blocks this node grants from (its group's blocks; the platform range at the root).
    pub fn group_blocks(&self) -> &[Ipv4Net] {
        self.pool.owned()
    }

    pub fn pool(&self) -> &AddressPool {
        &self.pool
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn cache(&self) -> &RouteCache {
        &self.cache
    }

    pub fn interests(&self) -> &InterestTable {
        &self.interests
    }

    /// The root's allocator (None elsewhere).
    pub fn allocator(&self) -> Option<&ServiceIpAllocator> {
        self.allocator.as_ref()
    }

    pub fn counters(&self) -> &RoutingCounters {
        &self.counters
    }

    /// The group block announced on heartbeats.
    pub fn heartbeat_block(&self) -> Option<Ipv4Net> {
        self.pool.owned().first().copied()
    }

    /// Messages to send and events to report since the last call.
    pub fn drain(&mut self) -> (Vec<(NodeId, RoutesMessage)>, Vec<RouteEvent>) {
        (std::mem::take(&mut self.out), std::mem::take(&mut self.events))
    }

    fn send(&mut self, to: NodeId, m: RoutesMessage) {
        self.out.push((to, m));
    }

    // ----- tree changes -------------------------------------------------------------------------------------

    /// After every input: react to changes of parent, role and children. Returns whether it was quiet (sent
    /// nothing, reported nothing, left the pool as it was): then polling again with the same tree and no other
    /// input in between finds nothing to do until [`Routing::sync_due`].
    pub fn poll(&mut self, now: Time, ctx: &TreeCtx) -> bool {
        let before = (self.out.len(), self.events.len(), self.pool.version());
        if ctx.is_root != self.was_root {
            if ctx.is_root {
                self.become_root(now, ctx);
            } else {
                self.stop_being_root(now, ctx);
            }
            self.was_root = ctx.is_root;
        }
        if ctx.is_root && self.machine.is_empty() {
            self.grant_own_machine(now, ctx);
        }
        self.own_subnets_in_pool(now, ctx);
        // Children that went away: release their grants, forget their interests and records. The common case, the
        // same children in the same order, is checked without the pairwise scan, and by their generation when the
        // node gives it, without reading both lists (a kilobyte each for 16 children).
        let same_children = (ctx.children_generation.is_some() && ctx.children_generation == self.known_generation)
            || (self.known_children.len() == ctx.children.len()
                && self.known_children.iter().zip(ctx.children).all(|(k, (c, _))| k == c));
        if !same_children && self.known_children.iter().any(|k| !ctx.children.iter().any(|(c, _)| c == k)) {
            let gone: Vec<NodeId> =
                self.known_children.iter().copied().filter(|k| !ctx.children.iter().any(|(c, _)| c == k)).collect();
            for child in gone {
                self.child_lost(now, ctx, child);
            }
        }
        if self.sent_group.as_slice() != self.pool.owned() {
            let blocks = self.pool.owned().to_vec();
            for (c, _) in ctx.children {
                self.send(*c, RoutesMessage::GroupBlocks(blocks.clone()));
            }
            self.sent_group = blocks;
        }
        if !same_children {
            self.known_children = ctx.children.iter().map(|(c, _)| *c).collect();
        }
        self.known_generation = ctx.children_generation;
        if ctx.parent != self.synced_parent {
            self.synced_parent = ctx.parent;
            if let Some(parent) = ctx.parent {
                self.parent_changed(now, ctx, parent);
            }
        } else if ctx.parent.is_some() && now >= self.schedule.next_sync {
            self.sync(now, ctx);
        }
        // A coordinator needs a block to grant from.
        if !ctx.is_root && !ctx.children.is_empty() && self.pool.owned().is_empty() && self.block_asked_at.is_none() {
            self.ask_block(now, ctx);
        }
        let quiet = before == (self.out.len(), self.events.len(), self.pool.version());
        if !quiet {
            self.schedule.idle = false;
        }
        quiet
    }

    /// Whether the periodic resync with the parent is due (a poll does it).
    pub fn sync_due(&self, now: Time) -> bool {
        now >= self.schedule.next_sync
    }

    /// The bytes of a `Routing` every heartbeat reads, as (offset, length): the tick's schedule.
    pub const SCHEDULE_RANGE: (usize, usize) = (std::mem::offset_of!(Routing, schedule), size_of::<TickSchedule>());

    /// Skips a tick at `now` that would only move its lease sweep and interest renewal on (`has_parent`: the node
    /// has a parent): with nothing timed held and no grants in the pool, a sweep renews nothing and a renewal sends
    /// nothing. Returns whether it skipped; the caller then skips the tick, and the poll a tick starts.
    pub fn skip_quiet_tick(&mut self, now: Time, has_parent: bool) -> bool {
        let s = &mut self.schedule;
        if !s.idle || (now >= s.next_lease_sweep && !s.pool_empty) {
            return false;
        }
        if now >= s.next_lease_sweep {
            s.next_lease_sweep = now + self.cfg.lease / LEASE_SWEEPS;
        }
        if has_parent && now >= s.next_renew {
            s.next_renew = now + self.cfg.renew_interval;
        }
        true
    }

    /// Nothing held that a tick expires or waits for (see [`TickSchedule::idle`]).
    fn holds_nothing_timed(&self) -> bool {
        self.interests.is_empty()
            && self.cache.is_empty()
            && !self.registry.has_tombstones()
            && self.allocator.as_ref().is_none_or(|a| !a.has_lapsing())
            && self.block_asked_at.is_none()
            && self.claims_up.is_empty()
            && self.replacements.is_empty()
            && self.unavailable_up.is_empty()
            && self.own_deploys.is_empty()
    }

    /// Every heartbeat interval: renew children's leases, expire what lapsed, renew interests upwards.
    pub fn tick(&mut self, now: Time, ctx: &TreeCtx) {
        if now >= self.schedule.next_lease_sweep {
            // Renewed every sixth of a lease, a live child's grant never lapses; a lapsed one is freed at most that
            // much late.
            self.schedule.next_lease_sweep = now + self.cfg.lease / LEASE_SWEEPS;
            for (c, _) in ctx.children {
                self.pool.renew(*c, now);
            }
            self.pool.renew(ctx.me, now);
            let expired = self.pool.expire(now);
            self.counters.renumbered += expired.len() as u64;
        }
        let lapsed = self.interests.expire(now);
        for service in &lapsed.unwanted {
            self.cache.remove(service);
        }
        self.cache.expire(now);
        self.registry.expire(now);
        if let Some(table) = self.allocator.as_mut() {
            table.release_lapsed(now, self.cfg.instance_ip_grace);
        }
        let block_wait = if self.block_refused { self.cfg.resync_interval } else { self.cfg.answer_wait };
        if self.block_asked_at.is_some_and(|t| now.saturating_sub(t) > block_wait) {
            self.block_asked_at = None;
            // Lost or refused: what still waits asks again.
            if !self.waiting.is_empty() || !self.waiting_up.is_empty() {
                self.ask_block(now, ctx);
            }
        }
        // Unanswered claims are asked again (through the waiting wants); refusals matter while someone waits.
        let before = self.claims_up.len();
        let resync = self.cfg.resync_interval;
        let expired: Vec<Ipv4Net> =
            self.claims_up.iter().filter(|(_, at)| now.saturating_sub(**at) > resync).map(|(b, _)| *b).collect();
        for old in expired {
            self.claim_answered(old);
        }
        self.replacements.retain(|_, (_, at)| now.saturating_sub(*at) <= self.cfg.resync_interval * 2);
        if !self.unavailable_up.is_empty() {
            let waited_for: BTreeSet<Ipv4Net> =
                self.waiting.iter().filter_map(|(_, w)| w.replaces).chain(self.waiting_up.keys().copied()).collect();
            self.unavailable_up.retain(|b| waited_for.contains(b));
        }
        if self.claims_up.len() != before {
            self.serve_waiting(now, ctx);
        }
        self.resend_deploys(now, ctx, now.saturating_sub(self.cfg.resync_interval));
        if let Some(parent) = ctx.parent
            && now >= self.schedule.next_renew
        {
            self.schedule.next_renew = now + self.cfg.renew_interval;
            let wanted: Vec<ServiceName> = self.interests.wanted(now).into_iter().cloned().collect();
            if !wanted.is_empty() {
                for s in &wanted {
                    self.cache.refresh(s, now);
                }
                self.send(parent, RoutesMessage::Renew(wanted));
            }
        }
        self.schedule.idle = self.holds_nothing_timed();
        self.schedule.pool_empty = !self.pool.has_grants();
    }

    /// We took the place of our failed (or leaving) parent: its group blocks become ours.
    pub fn took_over(&mut self, now: Time, me: NodeId) {
        self.schedule.idle = false;
        let inherited = std::mem::take(&mut self.parent_group);
        if inherited.is_empty() {
            return;
        }
        // Our own grants from the old parent lie inside its blocks: we now hold those blocks instead.
        let mut state = self.pool.state(now);
        state.owned = inherited.clone();
        let mut pool = AddressPool::new(inherited.iter().copied(), [], self.cfg.lease);
        for g in &state.grants {
            let _ = pool.claim(g.block, g.holder, now);
        }
        // Our machine subnet lies inside the inherited blocks: it becomes a grant to ourselves.
        for m in self.machine.iter() {
            let _ = pool.claim(*m, me, now);
        }
        self.parent_blocks = inherited;
        self.pool = pool;
        self.schedule.next_sync = now;
    }

    fn become_root(&mut self, now: Time, ctx: &TreeCtx) {
        let mut pool = AddressPool::platform_root(self.cfg.platform_range, self.cfg.lease);
        for g in self.pool.grants() {
            let _ = pool.claim(g.block, g.holder, now);
        }
        for m in self.machine.iter() {
            let _ = pool.claim(*m, ctx.me, now);
        }
        self.pool = pool;
        self.pool_is_platform = true;
        self.parent_blocks.clear();
        self.parent_group.clear();
        self.block_asked_at = None;
        for old in self.claims_up.keys().copied().collect::<Vec<_>>() {
            self.claim_answered(old);
        }
        self.unavailable_up.clear();
        self.restore_at_root(now, ctx);
        if self.allocator.is_none() {
            self.allocator = Some(ServiceIpAllocator::default());
        }
        self.serve_waiting(now, ctx);
    }

    fn stop_being_root(&mut self, now: Time, ctx: &TreeCtx) {
        // Keep only what we granted: those blocks are what we hold from our new parent.
        let grants: Vec<(Ipv4Net, NodeId)> =
            self.pool.grants().filter(|g| g.holder != ctx.me).map(|g| (g.block, g.holder)).collect();
        let mut pool = AddressPool::new(grants.iter().map(|(b, _)| *b), [], self.cfg.lease);
        for (b, h) in &grants {
            let _ = pool.claim(*b, *h, now);
        }
        self.pool = pool;
        self.pool_is_platform = false;
        self.parent_blocks = grants.iter().map(|(b, _)| *b).collect();
        if let (Some(table), Some(parent)) = (self.allocator.take(), ctx.parent)
            && !table.is_empty()
        {
            self.send(parent, RoutesMessage::MergeAllocator(table.state()));
        }
    }

    /// Machine subnets from before a restart: checked, then claimed at once by a root, or asked back from the
    /// parent with the next sync.
    fn restore(&mut self, now: Time, ctx: &TreeCtx, blocks: Vec<Ipv4Net>) {
        for block in blocks.into_iter().map(|b| b.trunc()) {
            let limit = self.restoring.len() + self.machine.len() >= MAX_RESTORED;
            if limit || !is_machine_block_in(self.cfg.platform_range, &block) || block.prefix_len() > 30 {
                self.counters.rejected += 1;
                let reason = format!("cannot restore {block}: not a machine subnet of the platform range");
                self.events.push(RouteEvent::AllocationFailed { reason });
            } else if !self.machine.contains(&block) && !self.restoring.contains(&block) {
                self.restoring.push(block);
            }
        }
        if ctx.is_root {
            self.restore_at_root(now, ctx);
        } else if ctx.parent.is_some() && !self.restoring.is_empty() {
            self.sync(now, ctx);
        }
    }

    /// A root keeps restored subnets that are free in the platform range and replaces the others.
    fn restore_at_root(&mut self, now: Time, ctx: &TreeCtx) {
        for old in std::mem::take(&mut self.restoring) {
            if self.machine.contains(&old) {
                continue;
            }
            match self.pool.claim(old, ctx.me, now) {
                Ok(()) => {
                    self.machine.push(old);
                    self.events.push(RouteEvent::SubnetGranted { block: old });
                }
                Err(_) => match self.pool.alloc(ctx.me, old.prefix_len(), now) {
                    Ok(new) => {
                        self.counters.renumbered += 1;
                        self.machine.push(new);
                        self.events.push(RouteEvent::SubnetChanged { old, new });
                    }
                    Err(e) => self.events.push(RouteEvent::AllocationFailed { reason: e.to_string() }),
                },
            }
        }
    }

    fn grant_own_machine(&mut self, now: Time, ctx: &TreeCtx) {
        match self.pool.alloc(ctx.me, self.cfg.machine_prefix, now) {
            Ok(block) => {
                self.machine.push(block);
                self.events.push(RouteEvent::SubnetGranted { block });
            }
            Err(e) => self.events.push(RouteEvent::AllocationFailed { reason: e.to_string() }),
        }
    }

    fn parent_changed(&mut self, now: Time, ctx: &TreeCtx, parent: NodeId) {
        self.sync(now, ctx);
        // A block request to the old parent is not answered here: what waits asks the new one. Wants that came while
        // we had no parent are tried again: a claim to keep a block could not be asked up, and the child repeating
        // its sync does not bring it back (a repeated want counts once).
        self.block_asked_at = None;
        self.serve_waiting(now, ctx);
        if self.block_asked_at.is_none() && (!self.waiting.is_empty() || !self.waiting_up.is_empty()) {
            self.ask_block(now, ctx);
        }
        // Our subtree's records go up the new path; our interests are re-registered there.
        let records: Vec<InstanceRecord> = self
            .registry
            .services()
            .into_iter()
            .flat_map(|s| self.registry.instances(s).cloned().collect::<Vec<_>>())
            .collect();
        for r in records {
            self.send(parent, RoutesMessage::Up(RouteChange::Upsert(r)));
        }
        let wanted: Vec<ServiceName> = self.interests.wanted(now).into_iter().cloned().collect();
        for service in wanted {
            let key = QueryKey::Name(service);
            self.pending.entry(key.clone()).or_default();
            self.send(parent, RoutesMessage::Query { key, position: ctx.position });
        }
        self.schedule.next_renew = now + self.cfg.renew_interval;
        self.resend_deploys(now, ctx, Time::MAX);
    }

    /// What we hold from the parent: machine subnets (except those inside our own blocks, granted to ourselves
    /// after a takeover) and our group's blocks.
    fn held(&self) -> Vec<Held> {
        let own = |m: &Ipv4Net| self.parent_blocks.iter().any(|b| b.contains(m));
        let mut held: Vec<Held> =
            self.machine.iter().filter(|m| !own(m)).map(|&block| Held { purpose: Purpose::Machine, block }).collect();
        held.extend(self.parent_blocks.iter().map(|&block| Held { purpose: Purpose::Block, block }));
        held
    }

    fn sync(&mut self, now: Time, ctx: &TreeCtx) {
        let Some(parent) = ctx.parent else { return };
        self.schedule.next_sync = now + self.cfg.resync_interval;
        self.give_back_idle_blocks();
        let held = self.held();
        let mut want = Vec::new();
        if (self.machine.is_empty() && self.restoring.is_empty()) || self.extra_machine_wanted {
            want.push(Want {
                purpose: Purpose::Machine,
                prefix: self.cfg.machine_prefix,
                replaces: None,
                on_behalf: None,
            });
        }
        // Restored subnets are asked back by name: the parent keeps each or answers with a replacement.
        want.extend(self.restoring.iter().map(|&old| Want {
            purpose: Purpose::Machine,
            prefix: old.prefix_len(),
            replaces: Some(old),
            on_behalf: None,
        }));
        // A want is asked again soon if the answer does not come (see `answer_wait`); the parent counts a repeated
        // want once.
        self.sync_awaits_answer = !want.is_empty();
        if self.sync_awaits_answer {
            self.schedule.next_sync = now + self.cfg.answer_wait;
        }
        self.send(parent, RoutesMessage::SubnetSync { held, want });
    }

    /// Blocks from the parent in which nothing is granted go back (they are left out of the sync, and the parent
    /// frees what a child stops listing), keeping room for four machines: splits, moves and answers to repeated
    /// requests otherwise leave idle blocks behind, and the platform range is finite.
    fn give_back_idle_blocks(&mut self) {
        if !self.waiting.is_empty() || !self.waiting_up.is_empty() || self.pool_is_platform {
            return;
        }
        // Room for four machines: children that crashed come back to the subnets they had, without asking up.
        let headroom = 4 * block_size(self.cfg.machine_prefix);
        let mut free = self.pool.free_addresses();
        let mut idle = Vec::new();
        for &b in &self.parent_blocks {
            let size = block_size(b.prefix_len());
            if free >= headroom + size && self.pool.is_free(b) {
                free -= size;
                idle.push(b);
            }
        }
        if idle.is_empty() || self.pool.remove_owned(&idle).is_err() {
            return;
        }
        self.counters.blocks_given_back += idle.len() as u64;
        let idle: BTreeSet<Ipv4Net> = idle.into_iter().collect();
        self.parent_blocks.retain(|b| !idle.contains(b));
    }

    /// Asks the parent for a block sized to what waits (at least one machine subnet), and at least as large as all
    /// we hold, up to a /18. Sized to demand, a coordinator of two machines holds a /25, not a /24 three quarters
    /// idle (at 10k nodes, coordinators of one to three children left a third of the platform range idle); growing
    /// with what is held, a busy coordinator holds a few blocks rather than one per child, so its syncs, and the
    /// claims when it moves under another parent, stay small.
    fn ask_block(&mut self, now: Time, ctx: &TreeCtx) {
        let Some(parent) = ctx.parent else { return };
        self.block_asked_at = Some(now);
        self.block_refused = false;
        let held: u64 = self.parent_blocks.iter().map(|b| block_size(b.prefix_len())).sum();
        let waiting: u64 =
            self.waiting.iter().chain(self.waiting_up.values().flatten()).map(|(_, w)| block_size(w.prefix)).sum();
        let size = held.max(waiting).max(block_size(self.cfg.machine_prefix)).min(block_size(MAX_BLOCK_PREFIX));
        let prefix = 32 - size.next_power_of_two().ilog2() as u8;
        let want = vec![Want { purpose: Purpose::Block, prefix, replaces: None, on_behalf: None }];
        self.send(parent, RoutesMessage::SubnetWant(want));
    }

    /// Children that leave us in a split, for our parent (with the one of them that moves up beside us) or, at a
    /// root, for one of our children: the blocks we granted them stay theirs, so each is kept when its holder
    /// claims it from its new place (see `keep`). Moving up, their blocks go to our parent, carved out of our grant
    /// ([`RoutesMessage::SubnetHandOver`]); renumbered instead (our parent found them inside our grant), a moved
    /// subtree got fresh space at our parent while its old space sat idle here, and in a join storm, with splits at
    /// every level, the platform range ran dry. Moving down, their grants stay here until claimed or lapsed;
    /// released at once, they were granted afresh to others while the claims were on their way.
    pub fn hand_over(&mut self, now: Time, ctx: &TreeCtx, moved: &[NodeId]) {
        self.schedule.idle = false;
        // Blocks we are still asking our parent to keep for them follow them when the answer comes.
        let mut claimed: Vec<(Ipv4Net, NodeId)> = Vec::new();
        if let Some(parent) = ctx.parent
            && !self.pool_is_platform
        {
            self.hand_up(parent, moved);
            for (old, wants) in &self.waiting_up {
                let theirs = wants.iter().filter(|(c, _)| moved.contains(c));
                claimed.extend(theirs.map(|(c, w)| (*old, w.on_behalf.unwrap_or(*c))));
            }
        }
        for &child in moved {
            self.forget_child(now, ctx, child);
        }
        self.known_children.retain(|c| !moved.contains(c));
        for (old, holder) in claimed {
            if self.claims_up.contains_key(&old) && !self.waiting_up.contains_key(&old) {
                self.claims_handed.insert(old, holder);
            }
        }
    }

    fn hand_up(&mut self, parent: NodeId, moved: &[NodeId]) {
        let mut handed: Vec<(Ipv4Net, NodeId)> = Vec::new();
        for &child in moved {
            handed.extend(self.pool.release_holder(child).into_iter().map(|g| (g.block, child)));
        }
        let blocks: Vec<Ipv4Net> = handed.iter().map(|(b, _)| *b).collect();
        if blocks.is_empty() || self.pool.remove_owned(&blocks).is_err() {
            return;
        }
        // What stays ours are the pieces of our grants around the handed blocks, as the parent carves them.
        self.parent_blocks = carve(&self.parent_blocks, &blocks);
        self.counters.blocks_handed_over += handed.len() as u64;
        for chunk in handed.chunks(MAX_LIST) {
            self.send(parent, RoutesMessage::SubnetHandOver(chunk.to_vec()));
        }
    }

    fn child_lost(&mut self, now: Time, ctx: &TreeCtx, child: NodeId) {
        self.pool.release_holder(child);
        self.forget_child(now, ctx, child);
    }

    /// A child left: its wants, interests and records go (its grants are the caller's business).
    fn forget_child(&mut self, now: Time, ctx: &TreeCtx, child: NodeId) {
        self.waiting.retain(|(c, _)| *c != child);
        self.waiting_up.retain(|_, wants| {
            wants.retain(|(c, _)| *c != child);
            !wants.is_empty()
        });
        self.interests.remove_child(child);
        let removals = self.registry.remove_via(child);
        if removals.is_empty() {
            return;
        }
        let mut lost = Vec::with_capacity(removals.len());
        for change in removals {
            if let RouteChange::Removed { service, number, .. } = &change {
                lost.push((service.clone(), *number));
            }
            self.push_down(now, ctx, &change, None);
        }
        if let Some(parent) = ctx.parent {
            self.send(parent, RoutesMessage::Lost(lost));
        }
    }

    // ----- commands -----------------------------------------------------------------------------------------

    pub fn on_command(&mut self, now: Time, ctx: &TreeCtx, cmd: RouteCommand) {
        self.schedule.idle = false;
        match cmd {
            RouteCommand::DeployService { name, request, instances } => {
                if !ctx.is_root && ctx.parent.is_some() {
                    let deploy = OwnDeploy { name: name.clone(), request: request.clone(), instances };
                    self.own_deploys.retain(|(d, _)| d.name != name);
                    self.own_deploys.push((deploy, now));
                }
                self.on_deploy(now, ctx, ctx.me, name, request, instances, Vec::new())
            }
            RouteCommand::RegisterInstance(record) => {
                if record.host != ctx.me {
                    self.counters.rejected += 1;
                    self.events.push(RouteEvent::AllocationFailed {
                        reason: format!("instance {} {} is not hosted here", record.service, record.number),
                    });
                    return;
                }
                let service = record.service.clone();
                let fresh = self.registry.instance(&service, record.number).is_none();
                if let Some(change) = self.registry.apply(RouteChange::Upsert(record), Via::Local, now) {
                    if fresh {
                        self.interests.pin(&service);
                    }
                    self.publish(now, ctx, change, None);
                    // Deployment interest: the host learns the service's addresses and other instances.
                    if matches!(self.cache.lookup(&service, now), CacheLookup::Miss)
                        && let Some(parent) = ctx.parent
                    {
                        let key = QueryKey::Name(service);
                        self.pending.entry(key.clone()).or_default();
                        self.counters.queries_up += 1;
                        self.send(parent, RoutesMessage::Query { key, position: ctx.position });
                    }
                }
            }
            RouteCommand::UnregisterInstance { service, number, version } => {
                let hosted = self.registry.instance(&service, number).is_some();
                let change = RouteChange::Removed { service: service.clone(), number, version };
                if let Some(change) = self.registry.apply(change, Via::Local, now) {
                    if hosted {
                        self.interests.unpin(&service);
                    }
                    self.publish(now, ctx, change, None);
                }
            }
            RouteCommand::QueryRoute(key) => self.query_local(now, ctx, key),
            RouteCommand::RouteUsed(service) => {
                self.interests.use_locally(&service, now);
                self.cache.refresh(&service, now);
            }
            RouteCommand::InstanceUnreachable { service, number } => {
                self.cache.forget_instance(&service, number);
                match ctx.parent {
                    Some(parent) => {
                        let key = QueryKey::Name(service);
                        self.pending.entry(key.clone()).or_default().push(Asker::Local);
                        self.counters.queries_up += 1;
                        self.send(parent, RoutesMessage::Query { key, position: ctx.position });
                    }
                    None => self.query_local(now, ctx, QueryKey::Name(service)),
                }
            }
            RouteCommand::RestoreSubnets(blocks) => self.restore(now, ctx, blocks),
            RouteCommand::RequestSubnet => {
                if ctx.is_root {
                    self.grant_own_machine(now, ctx);
                } else {
                    self.extra_machine_wanted = true;
                    self.sync(now, ctx);
                }
            }
        }
    }

    /// A change of this node's registry: up to the parent, down to interested children, and to the agent.
    fn publish(&mut self, now: Time, ctx: &TreeCtx, change: RouteChange, from_child: Option<NodeId>) {
        self.push_down(now, ctx, &change, from_child);
        if let Some(parent) = ctx.parent {
            self.send(parent, RoutesMessage::Up(change));
        }
    }

    fn push_down(&mut self, now: Time, ctx: &TreeCtx, change: &RouteChange, except: Option<NodeId>) {
        // Every change of the registry passes here: the root's allocator learns which InstanceIPs are in use.
        if ctx.is_root
            && let Some(table) = self.allocator.as_mut()
        {
            match change {
                RouteChange::Upsert(r) => table.instance_running(&r.service, r.number),
                RouteChange::Removed { service, number, .. } => {
                    if self.registry.instance(service, *number).is_none() {
                        table.instance_gone(service, *number, now);
                    }
                }
                RouteChange::Addresses(_) => {}
            }
        }
        for child in self.interests.recipients(change.service(), now) {
            if Some(child) != except {
                self.counters.updates_down += 1;
                self.send(child, RoutesMessage::Down(change.clone()));
            }
        }
        if self.interests.is_wanted(change.service(), now) {
            self.events.push(RouteEvent::RouteChanged { change: change.clone() });
        }
    }

    fn query_local(&mut self, now: Time, ctx: &TreeCtx, key: QueryKey) {
        let k = self.cfg.k_per_policy;
        let decision = decide(
            &self.registry,
            &self.cache,
            &mut self.interests,
            Via::Local,
            &key,
            ctx.position,
            k,
            ctx.is_root,
            now,
        );
        match decision {
            QueryDecision::Answer { answer, ask_parent } => {
                self.counters.answers += 1;
                self.events.push(RouteEvent::RouteAnswer { key: key.clone(), answer });
                if ask_parent && let Some(parent) = ctx.parent {
                    self.pending.entry(key.clone()).or_default();
                    self.counters.queries_up += 1;
                    self.send(parent, RoutesMessage::Query { key, position: ctx.position });
                }
            }
            QueryDecision::AskParent => match ctx.parent {
                Some(parent) => {
                    let askers = self.pending.entry(key.clone()).or_default();
                    let first = askers.is_empty();
                    askers.push(Asker::Local);
                    if first {
                        self.counters.queries_up += 1;
                        self.send(parent, RoutesMessage::Query { key, position: ctx.position });
                    }
                }
                None => self.events.push(RouteEvent::RouteNotFound { key }),
            },
            QueryDecision::NotFound => {
                self.counters.not_found += 1;
                self.events.push(RouteEvent::RouteNotFound { key });
            }
        }
    }

    // ----- messages -----------------------------------------------------------------------------------------

    pub fn on_message(&mut self, now: Time, ctx: &TreeCtx, from: NodeId, m: RoutesMessage) {
        self.schedule.idle = false;
        let from_parent = ctx.parent == Some(from);
        let from_child = ctx.children.iter().any(|(c, _)| *c == from);
        match m {
            RoutesMessage::SubnetSync { held, want } if from_child => self.on_sync(now, ctx, from, held, want),
            RoutesMessage::SubnetWant(want) if from_child => self.on_wants(now, ctx, from, want),
            RoutesMessage::SubnetHandOver(handed) if from_child => self.on_hand_over(now, from, handed),
            RoutesMessage::SubnetReply { granted, refused } if from_parent => {
                // A refused block is not asked for again before a resync interval: asking at once makes a full
                // platform range a message storm (62,000 refusals to one coordinator in 50 s at 10k nodes).
                // Only the answer to our block request closes it, not a reply to a sync, a claim or a renumbering:
                // closed by any reply, a coordinator with many claims in flight asked again at each answer (for a
                // block as large as all it held, a /18 each time), and the parent granted every ask.
                let block_refused = refused.iter().any(|(w, _)| w.purpose == Purpose::Block && w.replaces.is_none());
                let block_granted = granted.iter().any(|g| g.purpose == Purpose::Block && g.replaces.is_none());
                let machine_answered = granted.iter().any(|g| g.purpose == Purpose::Machine)
                    || refused.iter().any(|(w, _)| w.purpose == Purpose::Machine);
                if machine_answered && self.sync_awaits_answer {
                    // Answered: the next sync waits a resync interval, unless what follows asks for one sooner.
                    self.sync_awaits_answer = false;
                    self.schedule.next_sync = self.schedule.next_sync.max(now + self.cfg.resync_interval);
                }
                if block_refused {
                    self.block_asked_at = Some(now);
                    self.block_refused = true;
                } else if block_granted {
                    self.block_asked_at = None;
                }
                for g in granted {
                    self.apply_granted(now, ctx, g);
                }
                for (want, reason) in refused {
                    if let Some(old) = want.replaces {
                        if self.claims_up.contains_key(&old) {
                            self.claim_answered(old);
                            // Our parent cannot keep it: the child that wanted it gets a fresh block from us.
                            self.unavailable_up.insert(old);
                            continue;
                        }
                        self.revoke(now, old);
                    }
                    self.events.push(RouteEvent::AllocationFailed { reason });
                }
                self.serve_waiting(now, ctx);
            }
            RoutesMessage::Moved { old, new } if from_parent => match new {
                Some(new) => {
                    let purpose = if self.machine.contains(&old) { Purpose::Machine } else { Purpose::Block };
                    self.apply_granted(now, ctx, Granted { purpose, block: new, replaces: Some(old) });
                }
                None => self.revoke(now, old),
            },
            RoutesMessage::GroupBlocks(blocks) if from_parent => self.parent_group = blocks,
            RoutesMessage::Up(change) if from_child => {
                if let Some(out) = self.registry.apply(change, Via::Child(from), now) {
                    self.publish(now, ctx, out, Some(from));
                }
            }
            RoutesMessage::Lost(list) if from_child => {
                let mut passed = Vec::new();
                for (service, number) in list {
                    if let Some(r) = self.registry.remove_if_via(&service, number, Via::Child(from)) {
                        let change = RouteChange::Removed { service: service.clone(), number, version: r.version };
                        self.push_down(now, ctx, &change, Some(from));
                        passed.push((service, number));
                    }
                }
                if !passed.is_empty()
                    && let Some(parent) = ctx.parent
                {
                    self.send(parent, RoutesMessage::Lost(passed));
                }
            }
            RoutesMessage::Down(change) if from_parent => {
                if self.cache.apply(&change, now) {
                    self.push_down(now, ctx, &change, None);
                } else if let RouteChange::Addresses(a) = &change
                    && self.registry.addresses(&a.name).is_some_and(|known| known != a)
                {
                    self.registry.set_addresses(a.clone());
                    self.push_down(now, ctx, &change, None);
                }
            }
            RoutesMessage::Query { key, position } if from_child => self.on_query(now, ctx, from, key, position),
            RoutesMessage::Answer { key, answer } if from_parent => self.on_answer(now, ctx, key, answer),
            RoutesMessage::NotFound(key) if from_parent => {
                if let QueryKey::Name(s) = &key {
                    self.cache.store_not_found(s, now);
                }
                for asker in self.pending.remove(&key).unwrap_or_default() {
                    match asker {
                        Asker::Local => {
                            self.counters.not_found += 1;
                            self.events.push(RouteEvent::RouteNotFound { key: key.clone() });
                        }
                        Asker::Child(c) => self.send(c, RoutesMessage::NotFound(key.clone())),
                    }
                }
            }
            RoutesMessage::Renew(services) if from_child => {
                for s in services {
                    self.interests.register(&s, from, now);
                }
            }
            RoutesMessage::Deploy { name, request, instances, path } if from_child => {
                self.on_deploy(now, ctx, from, name, request, instances, path)
            }
            RoutesMessage::Deployed { name, result, mut path } if from_parent => match path.pop() {
                Some(next) if ctx.children.iter().any(|(c, _)| *c == next) => {
                    self.send(next, RoutesMessage::Deployed { name, result, path })
                }
                Some(_) => self.counters.rejected += 1,
                None => self.deploy_answered(name, result),
            },
            RoutesMessage::MergeAllocator(state) if from_child => {
                if ctx.is_root {
                    self.merge_allocator(now, ctx, &state);
                } else if let Some(parent) = ctx.parent {
                    self.send(parent, RoutesMessage::MergeAllocator(state));
                }
            }
            _ => self.counters.rejected += 1,
        }
    }

    /// The surviving root merges a joining root's ServiceIP table; services whose addresses changed are pushed
    /// down as address changes.
    fn merge_allocator(&mut self, now: Time, ctx: &TreeCtx, state: &AllocatorState) {
        let table = self.allocator.get_or_insert_with(ServiceIpAllocator::default);
        let report = table.merge(state);
        let mut services: Vec<ServiceName> = state.assignments.iter().map(|a| a.key.service().clone()).collect();
        services.extend(report.moved.iter().map(|m| m.key.service().clone()));
        services.sort();
        services.dedup();
        let updates: Vec<ServiceAddresses> = services.iter().map(|s| table.service_addresses(s)).collect();
        for addresses in updates {
            if self.registry.set_addresses(addresses.clone()) {
                self.push_down(now, ctx, &RouteChange::Addresses(addresses), None);
            }
        }
    }

    // ----- grants -------------------------------------------------------------------------------------------

    fn on_sync(&mut self, now: Time, ctx: &TreeCtx, child: NodeId, held: Vec<Held>, mut want: Vec<Want>) {
        // Grants of this child it no longer lists (handed to it by a transfer, or replaced) are freed once it has
        // had them long enough for our answer not to be in flight. Counted from when they became its, not from when
        // they were made: a block kept for a child that moved here is as old as it was, and freed by its age, it
        // was granted afresh while the answer was lost or on its way.
        let listed: BTreeSet<Ipv4Net> = held.iter().map(|h| h.block).collect();
        let stale: Vec<Ipv4Net> = self
            .pool
            .grants_of(child)
            .filter(|g| !listed.contains(&g.block) && g.held_for(now) > self.cfg.resync_interval)
            .map(|g| g.block)
            .collect();
        for b in stale {
            let _ = self.pool.free(b);
        }
        // One renewal covers every lease of the child (a coordinator lists many blocks).
        let mut renewed = false;
        for h in &held {
            let ours = self.pool.grant(h.block).is_some_and(|g| g.holder == child);
            if ours {
                if !renewed {
                    self.pool.renew(child, now);
                    renewed = true;
                }
            } else if self.pool.claim_merging(h.block, child, now).is_err() {
                want.push(Want {
                    purpose: h.purpose,
                    prefix: h.block.prefix_len(),
                    replaces: Some(h.block),
                    on_behalf: None,
                });
            }
        }
        self.on_wants(now, ctx, child, want);
        // Every sync learns the group's blocks, so any child can take this node's place.
        self.send(child, RoutesMessage::GroupBlocks(self.pool.owned().to_vec()));
    }

    /// A child hands us blocks of children it lost in a split: each is granted to its holder (not our child yet,
    /// or never: the grant lapses with its lease unless claimed), so its claim finds it (see `keep`). One that
    /// lies in no grant of the child (its grant moved meanwhile) is left alone: the child's syncs list the rest.
    fn on_hand_over(&mut self, now: Time, child: NodeId, handed: Vec<(Ipv4Net, NodeId)>) {
        for (block, holder) in handed {
            let _ = self.pool.split_off(block, child, holder, now);
        }
    }

    fn on_wants(&mut self, now: Time, ctx: &TreeCtx, child: NodeId, mut want: Vec<Want>) {
        // A want repeated by a resync while it waits counts once.
        let waiting_up = |w: &Want| {
            w.replaces.and_then(|old| self.waiting_up.get(&old)).is_some_and(|set| set.contains(&(child, *w)))
        };
        want.retain(|w| !self.waiting.contains(&(child, *w)) && !waiting_up(w));
        // A coordinator has one block request open: a new one (sized to what waits there now) replaces the one
        // that waits here, else both would be granted.
        let is_block_ask = |w: &Want| w.purpose == Purpose::Block && w.replaces.is_none() && w.on_behalf.is_none();
        if want.iter().any(is_block_ask) {
            self.waiting.retain(|(c, w)| *c != child || !is_block_ask(w));
        }
        self.grant_wants(now, ctx, child, want);
    }

    fn grant_wants(&mut self, now: Time, ctx: &TreeCtx, child: NodeId, want: Vec<Want>) {
        // Nothing is granted from our pool before our own subnets in it are marked as ours.
        self.own_subnets_in_pool(now, ctx);
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        let mut short = false;
        for w in want {
            if w.prefix > 32 || w.prefix < MAX_BLOCK_PREFIX {
                refused.push((w, format!("prefix /{} is not allowed", w.prefix)));
                continue;
            }
            if w.purpose == Purpose::Machine && w.prefix != self.cfg.machine_prefix {
                // Every machine derives other machines' subnets from their instances' addresses with its own
                // prefix: mixed sizes would route to the wrong machines.
                let reason = format!(
                    "this overlay grants /{} machine subnets, this machine asked for a /{}: give every agent the same \
                     --machine-prefix",
                    self.cfg.machine_prefix, w.prefix
                );
                refused.push((w, reason));
                continue;
            }
            if let Some(old) = w.replaces
                && old.prefix_len() == w.prefix
            {
                match self.keep(now, ctx, child, old, w.on_behalf.unwrap_or(child)) {
                    Keep::Kept => {
                        granted.push(Granted { purpose: w.purpose, block: old, replaces: Some(old) });
                        continue;
                    }
                    Keep::AskedUp => {
                        self.waiting_up.entry(old).or_default().insert((child, w));
                        continue;
                    }
                    Keep::NoParentYet => {
                        self.waiting.insert((child, w));
                        continue;
                    }
                    Keep::No => {}
                }
            }
            if let Some(old) = w.replaces
                && let Some(&(new, _)) = self.replacements.get(&(child, old))
                && self.pool.grant(new).is_some_and(|g| g.holder == child)
            {
                granted.push(Granted { purpose: w.purpose, block: new, replaces: Some(old) });
                continue;
            }
            let mut allocated = self.pool.alloc(child, w.prefix, now);
            if allocated.is_err() && w.purpose == Purpose::Block && w.replaces.is_none() {
                // A coordinator asks for blocks as large as what it holds: when that much is not free here, a
                // smaller one (down to one machine subnet) still serves it.
                allocated = (w.prefix + 1..=self.cfg.machine_prefix)
                    .find_map(|p| self.pool.alloc(child, p, now).ok())
                    .ok_or(PoolError::Exhausted(w.prefix));
            }
            match allocated {
                Ok(block) => {
                    self.counters.grants_made += 1;
                    if let Some(old) = w.replaces {
                        self.replacements.insert((child, old), (block, now));
                    }
                    granted.push(Granted { purpose: w.purpose, block, replaces: w.replaces });
                }
                Err(e) if ctx.is_root => refused.push((w, e.to_string())),
                Err(_) => {
                    self.waiting.insert((child, w));
                    short = true;
                }
            }
        }
        if short && self.block_asked_at.is_none() {
            self.ask_block(now, ctx);
        }
        if !granted.is_empty() || !refused.is_empty() {
            self.send(child, RoutesMessage::SubnetReply { granted, refused });
        }
    }

    /// Whether a child may keep `old` (a block it held elsewhere, or before a restart): yes when it is free in our
    /// pool; when it lies outside our pool, we ask our parent for it as a block of our own (and so on up to the
    /// root, which owns the platform range), so blocks that clash with nothing are never renumbered.
    fn keep(&mut self, now: Time, ctx: &TreeCtx, child: NodeId, old: Ipv4Net, holder_below: NodeId) -> Keep {
        if self.pool.grant(old).is_some_and(|g| g.holder == child) {
            // It asks for a block it has: its own sync, sent just before, may not list it, and would free a grant
            // older than a resync interval. New to it from now (seen in a root_crash_10k run: a root freed a /18 so,
            // granted it to another coordinator 10 s later, and 91 machines below were renumbered).
            self.pool.reassign(old, child, now);
            return Keep::Kept;
        }
        // Already asked up: the answer serves it (re-checking every waiting want against the pool would cost
        // each new block a pass over all of them).
        if self.claims_up.contains_key(&old) && !self.pool.overlaps_owned(old) {
            return Keep::AskedUp;
        }
        match self.pool.claim_merging(old, child, now) {
            Ok(()) => Keep::Kept,
            // Held by a node that is no longer our child: it moved under `child` (a split, a re-attachment) and
            // `child` asks for it on its behalf. The grant follows it, so nothing is renumbered.
            Err(PoolError::Taken { held, holder, .. })
                if held == old.trunc()
                    && holder != ctx.me
                    && (holder == holder_below || !ctx.children.iter().any(|(c, _)| *c == holder)) =>
            {
                self.pool.reassign(old, child, now);
                Keep::Kept
            }
            Err(PoolError::NotOwned(_)) if !ctx.is_root && is_machine_block_in(self.cfg.platform_range, &old) => {
                let Some(parent) = ctx.parent else { return Keep::NoParentYet };
                // Our own subnets come from the parent too (it would see them as ours and say "kept"), and so do the
                // blocks our pool owns: looked up in the pool's index, as a coordinator high in a large tree holds
                // thousands (a scan of them per claim was a sixth of a 100k-node run).
                let overlaps = |b: &Ipv4Net| b.contains(&old) || old.contains(b);
                if self.unavailable_up.contains(&old)
                    || self.machine.iter().any(overlaps)
                    || self.pool.overlaps_owned(old)
                {
                    return Keep::No;
                }
                if let std::collections::btree_map::Entry::Vacant(claim) = self.claims_up.entry(old) {
                    claim.insert(now);
                    let want = vec![Want {
                        purpose: Purpose::Block,
                        prefix: old.prefix_len(),
                        replaces: Some(old),
                        on_behalf: Some(holder_below),
                    }];
                    self.send(parent, RoutesMessage::SubnetWant(want));
                }
                Keep::AskedUp
            }
            Err(_) => Keep::No,
        }
    }

    fn serve_waiting(&mut self, now: Time, ctx: &TreeCtx) {
        if self.waiting.is_empty() && self.waiting_up.is_empty() {
            return;
        }
        // Claims asked up for blocks that came into our pool meanwhile are ours to answer (as in `keep`). Only new
        // pool blocks can hold them: a claim is asked up because its block was outside the pool.
        let owned = self.pool.owned();
        if self.owned_checked.as_slice() != owned {
            let new: Vec<Ipv4Net> =
                owned.iter().filter(|b| self.owned_checked.binary_search(b).is_err()).copied().collect();
            self.owned_checked = owned.to_vec();
            let mut in_pool = Vec::new();
            for b in new {
                in_pool.extend(self.waiting_up.range(b..).map(|(old, _)| *old).take_while(|old| b.contains(old)));
                let supernets = (0..b.prefix_len()).filter_map(|p| Ipv4Net::new(b.network(), p).ok());
                in_pool.extend(supernets.map(|n| n.trunc()).filter(|n| self.waiting_up.contains_key(n)));
            }
            for old in in_pool {
                self.requeue_claim(old);
            }
        }
        // Only wants the pool may serve now are tried again; the others stay where they are. A coordinator near the
        // root of 100k nodes had thousands waiting, and each block that arrived took them all out and put them
        // back (most of the run in set inserts).
        let largest_free = self.pool.largest_free_prefix();
        let machine_prefix = self.cfg.machine_prefix;
        let may_serve = |w: &Want| {
            w.replaces.is_some()
                || largest_free
                    .is_some_and(|free| free <= w.prefix || (w.purpose == Purpose::Block && free <= machine_prefix))
        };
        let waiting: Vec<(NodeId, Want)> = self.waiting.extract_if(.., |(_, w)| may_serve(w)).collect();
        if waiting.is_empty() {
            return;
        }
        // Claims whose block is free here now (a claim we asked up for was answered "kept") go before anything
        // else: served in child order, another child's fresh grant or replacement took space out of the block just
        // kept for the claimer, who was then renumbered while its subtree still used it (a split at the root of a
        // 20k join storm: hundreds of overlapping subnets for 15 s).
        let keepable = |w: &Want| w.replaces.is_some_and(|old| old.prefix_len() == w.prefix && self.pool.is_free(old));
        let (first, rest): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|(_, w)| keepable(w));
        for batch in [first, rest] {
            // Ordered by child: each child's wants are consecutive.
            let mut by_child: Vec<(NodeId, Vec<Want>)> = Vec::new();
            for (c, w) in batch {
                match by_child.last_mut() {
                    Some((x, v)) if *x == c => v.push(w),
                    _ => by_child.push((c, vec![w])),
                }
            }
            for (c, wants) in by_child {
                if ctx.children.iter().any(|(x, _)| *x == c) {
                    self.grant_wants(now, ctx, c, wants);
                }
            }
        }
    }

    fn apply_granted(&mut self, now: Time, ctx: &TreeCtx, g: Granted) {
        match g.purpose {
            Purpose::Machine => match g.replaces {
                Some(old) if self.restoring.contains(&old) => {
                    self.restoring.retain(|m| *m != old);
                    if self.machine.contains(&g.block) {
                        return;
                    }
                    self.machine.push(g.block);
                    if g.block == old {
                        self.events.push(RouteEvent::SubnetGranted { block: old });
                    } else {
                        self.counters.renumbered += 1;
                        self.events.push(RouteEvent::SubnetChanged { old, new: g.block });
                    }
                }
                // Kept as it was.
                Some(old) if old == g.block => {}
                Some(old) if self.machine.contains(&old) => {
                    self.counters.renumbered += 1;
                    self.machine.retain(|m| *m != old);
                    self.machine.push(g.block);
                    self.events.push(RouteEvent::SubnetChanged { old, new: g.block });
                }
                Some(_) => {}
                None => {
                    if self.machine.contains(&g.block) {
                        return;
                    }
                    if !self.machine.is_empty() && !self.extra_machine_wanted {
                        // A duplicate answer to a repeated sync: give it back at the next sync (not listed).
                        return;
                    }
                    self.extra_machine_wanted = false;
                    self.machine.push(g.block);
                    self.events.push(RouteEvent::SubnetGranted { block: g.block });
                }
            },
            Purpose::Block => {
                match g.replaces {
                    // Kept as it was.
                    Some(old) if old == g.block && self.parent_blocks.contains(&old) => {}
                    Some(old) if self.parent_blocks.contains(&old) => {
                        self.counters.renumbered += 1;
                        self.parent_blocks.retain(|b| *b != old);
                        self.parent_blocks.push(g.block);
                        match self.pool.move_block(old, g.block, now) {
                            Ok(moved) => {
                                for r in moved {
                                    // Grants kept for nodes that moved away from us go with the block: their claims
                                    // name the old block, which they are told by whoever granted it.
                                    if r.holder == ctx.me || !self.known_children.contains(&r.holder) {
                                        continue;
                                    }
                                    self.send(r.holder, RoutesMessage::Moved { old: r.old, new: r.new });
                                }
                            }
                            Err(_) => self.rebuild_pool(now, ctx),
                        }
                    }
                    // The answer to a block we asked for on a child's behalf: ours either way; when it is not
                    // the block asked for, the child's want gets a fresh block from our pool.
                    Some(old) if self.claims_up.contains_key(&old) => {
                        let handed = self.claims_handed.get(&old).copied();
                        self.claim_answered(old);
                        if let Some(holder) = handed {
                            // Its holder moved away: kept, the block follows it; replaced, nobody here needs the
                            // replacement, and the parent frees it when our syncs leave it out.
                            if g.block == old
                                && let Some(parent) = ctx.parent
                            {
                                self.counters.blocks_handed_over += 1;
                                self.send(parent, RoutesMessage::SubnetHandOver(vec![(old, holder)]));
                            }
                            return;
                        }
                        if g.block != old {
                            self.unavailable_up.insert(old);
                        }
                        self.add_parent_block(now, ctx, g.block);
                    }
                    Some(_) => {}
                    None => {
                        if self.parent_blocks.contains(&g.block) {
                            return;
                        }
                        self.add_parent_block(now, ctx, g.block);
                    }
                }
                self.serve_waiting(now, ctx);
            }
        }
    }

    /// The claim for `old` is answered (or given up): the wants that waited for it are tried again.
    fn claim_answered(&mut self, old: Ipv4Net) {
        self.claims_up.remove(&old);
        self.claims_handed.remove(&old);
        self.requeue_claim(old);
    }

    /// The wants waiting for the claim of `old` go back to the wants tried when the pool may serve them.
    fn requeue_claim(&mut self, old: Ipv4Net) {
        if let Some(wants) = self.waiting_up.remove(&old) {
            self.waiting.extend(wants);
        }
    }

    /// A block from the parent joins our pool, unless a block we hold already covers it (an answer to a claim that
    /// crossed a larger grant: the parent merges the two when we list them).
    fn add_parent_block(&mut self, now: Time, ctx: &TreeCtx, block: Ipv4Net) {
        if self.parent_blocks.iter().any(|b| b.contains(&block)) {
            return;
        }
        self.parent_blocks.push(block);
        if self.pool.add_owned(block).is_err() {
            self.rebuild_pool(now, ctx);
        }
    }

    /// Our machine subnets that lie in our own pool are grants to ourselves there, so they are never granted to a
    /// child. They get there when the parent's answers cross: a machine subnet granted fresh by the parent while
    /// we asked it for the same block on a child's behalf (the parent sees one holder and says "kept"), a block
    /// granted to us that contains our subnet, a takeover. When part of one is already granted to a child, that
    /// grant is younger than ours or was made in ignorance of it: we move ourselves to a fresh subnet.
    fn own_subnets_in_pool(&mut self, now: Time, ctx: &TreeCtx) {
        let checked = (self.pool.version(), self.machine.changes);
        if self.own_checked == Some(checked) {
            return;
        }
        self.mark_own_subnets(now, ctx);
        self.own_checked = Some((self.pool.version(), self.machine.changes));
    }

    fn mark_own_subnets(&mut self, now: Time, ctx: &TreeCtx) {
        let me = ctx.me;
        let inside_pool = |pool: &AddressPool, m: &Ipv4Net| pool.overlaps_owned(*m);
        let unmarked: Vec<Ipv4Net> = self
            .machine
            .iter()
            .copied()
            .filter(|m| inside_pool(&self.pool, m) && self.pool.grant(*m).is_none_or(|g| g.holder != me))
            .collect();
        let clashing: Vec<Ipv4Net> = unmarked.into_iter().filter(|m| self.pool.claim(*m, me, now).is_err()).collect();
        for old in clashing {
            self.machine.retain(|m| *m != old);
            self.counters.renumbered += 1;
            match self.pool.alloc(me, old.prefix_len(), now) {
                Ok(new) => {
                    self.machine.push(new);
                    self.events.push(RouteEvent::SubnetChanged { old, new });
                }
                Err(_) => {
                    // No room here: the parent grants a fresh one with the next sync.
                    self.events.push(RouteEvent::SubnetRevoked { block: old });
                    self.schedule.next_sync = now;
                }
            }
        }
    }

    /// Rebuilds the pool from the parent's blocks, revoking grants that no longer fit.
    fn rebuild_pool(&mut self, now: Time, _ctx: &TreeCtx) {
        let grants: Vec<(Ipv4Net, NodeId)> = self.pool.grants().map(|g| (g.block, g.holder)).collect();
        let mut pool = AddressPool::new(self.parent_blocks.iter().copied(), [], self.cfg.lease);
        for (b, h) in grants {
            if pool.claim(b, h, now).is_err() && self.known_children.contains(&h) {
                self.send(h, RoutesMessage::Moved { old: b, new: None });
            }
        }
        self.pool = pool;
    }

    fn revoke(&mut self, now: Time, old: Ipv4Net) {
        if self.restoring.contains(&old) {
            self.restoring.retain(|m| *m != old);
            self.schedule.next_sync = now;
        } else if self.machine.contains(&old) {
            self.machine.retain(|m| *m != old);
            self.events.push(RouteEvent::SubnetRevoked { block: old });
            self.schedule.next_sync = now;
        } else if self.parent_blocks.contains(&old) {
            self.parent_blocks.retain(|b| *b != old);
            let grants: Vec<(Ipv4Net, NodeId)> = self.pool.grants().map(|g| (g.block, g.holder)).collect();
            let mut pool = AddressPool::new(self.parent_blocks.iter().copied(), [], self.cfg.lease);
            for (b, h) in grants {
                if pool.claim(b, h, now).is_err() && self.known_children.contains(&h) {
                    self.send(h, RoutesMessage::Moved { old: b, new: None });
                }
            }
            self.pool = pool;
        }
    }

    // ----- queries ------------------------------------------------------------------------------------------

    fn on_query(&mut self, now: Time, ctx: &TreeCtx, child: NodeId, key: QueryKey, position: Position) {
        let k = self.cfg.k_per_policy;
        let decision = decide(
            &self.registry,
            &self.cache,
            &mut self.interests,
            Via::Child(child),
            &key,
            position,
            k,
            ctx.is_root,
            now,
        );
        match decision {
            QueryDecision::Answer { answer, ask_parent } => {
                self.counters.answers += 1;
                self.send(child, RoutesMessage::Answer { key: key.clone(), answer });
                if ask_parent && let Some(parent) = ctx.parent {
                    self.pending.entry(key.clone()).or_default();
                    self.counters.queries_up += 1;
                    self.send(parent, RoutesMessage::Query { key, position: ctx.position });
                }
            }
            QueryDecision::AskParent => match ctx.parent {
                Some(parent) => {
                    let askers = self.pending.entry(key.clone()).or_default();
                    let first = askers.is_empty();
                    if !askers.contains(&Asker::Child(child)) {
                        askers.push(Asker::Child(child));
                    }
                    if first {
                        self.counters.queries_up += 1;
                        self.send(parent, RoutesMessage::Query { key, position: ctx.position });
                    }
                }
                None => self.send(child, RoutesMessage::NotFound(key)),
            },
            QueryDecision::NotFound => {
                self.counters.not_found += 1;
                self.send(child, RoutesMessage::NotFound(key));
            }
        }
    }

    fn on_answer(&mut self, now: Time, ctx: &TreeCtx, key: QueryKey, answer: QueryAnswer) {
        let service = answer.service.clone();
        self.cache.store(&service, answer.addresses, answer.instances, now);
        // Who asked by this key gets an answer to it (by InstanceIP: with that instance, pruned or not).
        let mut askers: Vec<(Asker, QueryKey)> =
            self.pending.remove(&key).unwrap_or_default().into_iter().map(|a| (a, key.clone())).collect();
        let name_key = QueryKey::Name(service.clone());
        let add = |askers: &mut Vec<(Asker, QueryKey)>, asker: Asker| {
            if !askers.iter().any(|(a, _)| *a == asker) {
                askers.push((asker, name_key.clone()));
            }
        };
        if key != name_key {
            for asker in self.pending.remove(&name_key).unwrap_or_default() {
                add(&mut askers, asker);
            }
        }
        // Everyone interested gets the fuller answer (it now includes instances outside this subtree).
        for child in self.interests.recipients(&service, now) {
            add(&mut askers, Asker::Child(child));
        }
        let k = self.cfg.k_per_policy;
        for (asker, asked) in askers {
            let (via, position) = match asker {
                Asker::Local => (Via::Local, ctx.position),
                Asker::Child(c) => match ctx.child_position(c) {
                    Some(p) => (Via::Child(c), p),
                    None => continue,
                },
            };
            let decision =
                decide(&self.registry, &self.cache, &mut self.interests, via, &asked, position, k, ctx.is_root, now);
            let QueryDecision::Answer { answer, .. } = decision else { continue };
            match asker {
                Asker::Local => self.events.push(RouteEvent::RouteAnswer { key: key.clone(), answer }),
                Asker::Child(c) => self.send(c, RoutesMessage::Answer { key: key.clone(), answer }),
            }
        }
    }

    // ----- ServiceIPs ---------------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn on_deploy(
        &mut self,
        now: Time,
        ctx: &TreeCtx,
        from: NodeId,
        name: ServiceName,
        request: AddressRequest,
        instances: u32,
        mut path: Vec<NodeId>,
    ) {
        if from != ctx.me {
            path.push(from);
        }
        if !ctx.is_root {
            match ctx.parent {
                Some(parent) if path.len() < MAX_PATH => {
                    self.send(parent, RoutesMessage::Deploy { name, request, instances, path })
                }
                _ => self.deployed(name, Err("not attached to a tree".to_string()), path),
            }
            return;
        }
        let table = self.allocator.get_or_insert_with(ServiceIpAllocator::default);
        let result = table.deploy(&name, &request).map_err(|e| e.to_string()).and_then(|addresses| {
            let mut ips = Vec::new();
            for n in 0..instances.min(MAX_LIST as u32) {
                let ip = table.instance_ip(&name, n).map_err(|e| e.to_string())?;
                ips.push((n, ip));
            }
            Ok((addresses, ips))
        });
        if let Ok((addresses, _)) = &result
            && self.registry.set_addresses(addresses.clone())
        {
            let change = RouteChange::Addresses(addresses.clone());
            self.push_down(now, ctx, &change, None);
        }
        self.deployed(name, result, path);
    }

    fn deployed(&mut self, name: ServiceName, result: DeployResult, mut path: Vec<NodeId>) {
        match path.pop() {
            Some(next) => self.send(next, RoutesMessage::Deployed { name, result, path }),
            None => self.deploy_answered(name, result),
        }
    }

    /// The answer to one of our own deployments (the first one counts; a resent deployment may answer twice).
    fn deploy_answered(&mut self, name: ServiceName, result: DeployResult) {
        self.own_deploys.retain(|(d, _)| d.name != name);
        self.events.push(deploy_event(name, result));
    }

    /// Sends our unanswered deployments again, those sent before `older_than` (all of them: `now`).
    fn resend_deploys(&mut self, now: Time, ctx: &TreeCtx, older_than: Time) {
        if !ctx.is_root && ctx.parent.is_none() {
            // Detached: the next parent gets them (a node that became root answers them itself).
            return;
        }
        let due: Vec<OwnDeploy> =
            self.own_deploys.iter().filter(|(_, sent)| *sent < older_than).map(|(d, _)| d.clone()).collect();
        for deploy in due {
            self.counters.deploys_resent += 1;
            self.own_deploys.retain(|(d, _)| d.name != deploy.name);
            self.own_deploys.push((deploy.clone(), now));
            self.on_deploy(now, ctx, ctx.me, deploy.name, deploy.request, deploy.instances, Vec::new());
        }
    }
}

/// A deployment this node asked for (kept to send again).
#[derive(Debug, Clone)]
struct OwnDeploy {
    name: ServiceName,
    request: AddressRequest,
    instances: u32,
}

/// The root's answer to a deployment: the addresses and InstanceIPs, or why not.
pub type DeployResult = Result<(ServiceAddresses, Vec<(u32, Ipv4Addr)>), String>;

fn deploy_event(name: ServiceName, result: DeployResult) -> RouteEvent {
    match result {
        Ok((addresses, instance_ips)) => RouteEvent::ServiceDeployed { addresses, instance_ips },
        Err(reason) => RouteEvent::DeployFailed { name, reason },
    }
}

/// Whether an address may be a machine subnet at all (inside the platform range, outside the ServiceIP range).
pub fn is_machine_block(block: &Ipv4Net) -> bool {
    is_machine_block_in(PLATFORM_RANGE, block)
}

/// Whether `block` may be a machine subnet (or a block of them) in `platform`: inside it, clear of the ServiceIPs.
pub fn is_machine_block_in(platform: Ipv4Net, block: &Ipv4Net) -> bool {
    platform.contains(block) && !SERVICE_IP_RANGE.contains(block) && !block.contains(&SERVICE_IP_RANGE)
}

/// Which two services claim the same ServiceIP or InstanceIP in `tables` (for checks).
pub fn address_conflicts<'a>(tables: impl IntoIterator<Item = &'a ServiceAddresses>) -> usize {
    let mut seen: HashMap<Ipv4Addr, &ServiceName> = HashMap::new();
    let mut conflicts = 0;
    for t in tables {
        for ip in t.service_ips.values() {
            match seen.get(ip) {
                Some(other) if *other != &t.name => conflicts += 1,
                Some(_) => {}
                None => {
                    seen.insert(*ip, &t.name);
                }
            }
        }
    }
    conflicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Envelope, Message};
    use crate::routes::PolicyKind;
    use canopy_policies::Capacity;

    fn svc() -> ServiceName {
        "shop.acme.cart.prod".parse().unwrap()
    }

    #[test]
    fn machine_subnets_count_their_changes_only() {
        let (a, b): (Ipv4Net, Ipv4Net) = ("10.0.0.0/26".parse().unwrap(), "10.0.0.64/26".parse().unwrap());
        let mut subnets = MachineSubnets::default();
        subnets.push(a);
        subnets.push(b);
        assert_eq!((&subnets[..], subnets.changes), (&[a, b][..], 2));
        subnets.retain(|_| true);
        assert_eq!(subnets.changes, 2, "nothing removed, nothing changed");
        subnets.retain(|m| *m != a);
        assert_eq!((&subnets[..], subnets.changes), (&[b][..], 3));
    }

    fn record() -> InstanceRecord {
        InstanceRecord {
            service: svc(),
            number: 0,
            instance_ip: Ipv4Addr::new(10, 30, 0, 9),
            namespace_ip: Ipv4Addr::new(10, 16, 0, 2),
            host: NodeId::from_u64(4),
            tunnel: vec!["192.0.2.1:50103".parse().unwrap()],
            position: Position::new(48.0, 11.0),
            free: Capacity::new(1.0, 512.0, 50.0),
            version: 1,
        }
    }

    fn envelope(m: RoutesMessage) -> Envelope {
        Envelope {
            version: crate::PROTOCOL_VERSION,
            id: 1,
            from: NodeId::from_u64(1),
            body: Message::Routes(Box::new(m)),
        }
    }

    #[test]
    fn routes_messages_round_trip() {
        let block: Ipv4Net = "10.16.0.0/26".parse().unwrap();
        let addresses =
            ServiceAddresses { name: svc(), service_ips: [(PolicyKind::Rr, Ipv4Addr::new(10, 30, 1, 1))].into() };
        let samples = vec![
            RoutesMessage::SubnetSync {
                held: vec![Held { purpose: Purpose::Machine, block }],
                want: vec![Want { purpose: Purpose::Block, prefix: 24, replaces: None, on_behalf: None }],
            },
            RoutesMessage::SubnetReply {
                granted: vec![Granted { purpose: Purpose::Machine, block, replaces: Some(block) }],
                refused: vec![(
                    Want { purpose: Purpose::Block, prefix: 20, replaces: None, on_behalf: None },
                    "full".into(),
                )],
            },
            RoutesMessage::Moved { old: block, new: None },
            RoutesMessage::GroupBlocks(vec![block]),
            RoutesMessage::Up(RouteChange::Upsert(record())),
            RoutesMessage::Lost(vec![(svc(), 3)]),
            RoutesMessage::Down(RouteChange::Removed { service: svc(), number: 0, version: 2 }),
            RoutesMessage::Query {
                key: QueryKey::Address(Ipv4Addr::new(10, 30, 1, 1)),
                position: Position::new(1.0, 2.0),
            },
            RoutesMessage::Answer {
                key: QueryKey::Name(svc()),
                answer: QueryAnswer { service: svc(), addresses: Some(addresses.clone()), instances: vec![record()] },
            },
            RoutesMessage::NotFound(QueryKey::Name(svc())),
            RoutesMessage::Renew(vec![svc()]),
            RoutesMessage::Deploy { name: svc(), request: AddressRequest::default(), instances: 2, path: vec![] },
            RoutesMessage::Deployed {
                name: svc(),
                result: Ok((addresses, vec![(0, Ipv4Addr::new(10, 30, 2, 2))])),
                path: vec![],
            },
            RoutesMessage::Deployed {
                name: svc(),
                result: Err("10.30.7.7 is taken".into()),
                path: vec![NodeId::from_u64(3)],
            },
            RoutesMessage::MergeAllocator(AllocatorState::default()),
        ];
        for m in samples {
            let e = envelope(m);
            assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        }
    }

    #[test]
    fn oversized_routes_messages_are_rejected() {
        let too_long = RoutesMessage::Renew(vec![svc(); MAX_LIST + 1]);
        assert!(Envelope::decode(&envelope(too_long).encode()).is_err());
        let path = RoutesMessage::Deploy {
            name: svc(),
            request: AddressRequest::default(),
            instances: 1,
            path: vec![NodeId::from_u64(1); MAX_PATH + 1],
        };
        assert!(Envelope::decode(&envelope(path).encode()).is_err());
        let bad_prefix = RoutesMessage::SubnetSync {
            held: vec![],
            want: vec![Want { purpose: Purpose::Machine, prefix: 40, replaces: None, on_behalf: None }],
        };
        assert!(Envelope::decode(&envelope(bad_prefix).encode()).is_err());
    }

    fn ctx<'a>(me: u64, parent: Option<u64>, is_root: bool, children: &'a [(NodeId, Position)]) -> TreeCtx<'a> {
        TreeCtx {
            me: NodeId::from_u64(me),
            position: Position::new(48.0, 11.0),
            parent: parent.map(NodeId::from_u64),
            is_root,
            children,
            children_generation: None,
        }
    }

    #[test]
    fn the_root_grants_disjoint_subnets_releases_a_dropped_child_s_and_renews_the_others() {
        let mut root = Routing::new(RoutingConfig::default());
        let kids: Vec<(NodeId, Position)> = (2..5).map(|n| (NodeId::from_u64(n), Position::new(1.0, 1.0))).collect();
        let t0 = Time::ZERO;
        root.poll(t0, &ctx(1, None, true, &kids));
        assert_eq!(root.machine_subnets().len(), 1, "the root grants itself a subnet");
        let mut granted = vec![root.machine_subnets()[0]];
        for (kid, _) in &kids {
            let want = vec![Want { purpose: Purpose::Machine, prefix: 26, replaces: None, on_behalf: None }];
            root.on_message(t0, &ctx(1, None, true, &kids), *kid, RoutesMessage::SubnetSync { held: vec![], want });
        }
        for (_, m) in root.drain().0 {
            if let RoutesMessage::SubnetReply { granted: g, .. } = m {
                granted.extend(g.iter().map(|g| g.block));
            }
        }
        assert_eq!(granted.len(), 4);
        for (i, a) in granted.iter().enumerate() {
            for b in &granted[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
            }
        }
        // Child 4 is dropped by the tree: its grant is released at once; 2 and 3 stay children, and ticks renew
        // their leases beyond the original expiry.
        let staying = &kids[..2];
        let lease = RoutingConfig::default().lease;
        root.poll(t0, &ctx(1, None, true, staying));
        let later = t0 + lease * 2;
        root.tick(later, &ctx(1, None, true, staying));
        let holders: Vec<NodeId> = root.pool().grants().map(|g| g.holder).collect();
        assert!(!holders.contains(&NodeId::from_u64(4)));
        assert!(holders.contains(&NodeId::from_u64(2)) && holders.contains(&NodeId::from_u64(3)));
    }

    /// A tick with nothing timed held and no grants in the pool is skipped (its sweep and renewal only move on);
    /// any input, a deployment on its way or grants to renew make ticks run again.
    #[test]
    fn a_quiet_tick_is_skipped_until_an_input_or_a_grant_gives_it_work() {
        let cfg = RoutingConfig::default();
        let sweep = cfg.lease / LEASE_SWEEPS;
        let mut node = Routing::new(cfg);
        let leaf = ctx(1, Some(2), false, &[]);
        let t0 = Time::from_secs(1);
        assert!(!node.skip_quiet_tick(t0, true), "a new node has not found out yet that it holds nothing timed");
        node.poll(t0, &leaf);
        node.tick(t0, &leaf);
        node.drain();
        let soon = t0 + Duration::from_millis(1);
        assert!(node.skip_quiet_tick(soon, true));
        assert!(node.skip_quiet_tick(t0 + sweep * 3, true), "an empty pool's sweep renews nothing");
        assert_eq!(node.schedule.next_lease_sweep, t0 + sweep * 4, "the sweep moves on as the tick would have");

        let later = t0 + sweep * 3;
        node.on_message(later, &leaf, NodeId::from_u64(2), RoutesMessage::GroupBlocks(vec![]));
        assert!(!node.skip_quiet_tick(later, true), "an input may have left something timed");
        node.tick(later, &leaf);
        assert!(node.skip_quiet_tick(later, true));

        let cmd = RouteCommand::DeployService { name: svc(), request: AddressRequest::default(), instances: 1 };
        node.on_command(later, &leaf, cmd);
        node.tick(later, &leaf);
        assert!(!node.skip_quiet_tick(later, true), "a deployment waits for its answer: every tick looks at it");

        // A root grants itself a subnet from its own pool: its sweeps renew it, so they run.
        let mut root = Routing::new(RoutingConfig::default());
        let top = ctx(1, None, true, &[]);
        root.poll(t0, &top);
        root.tick(t0, &top);
        root.drain();
        assert!(root.skip_quiet_tick(soon, false));
        assert!(!root.skip_quiet_tick(t0 + sweep, false), "a sweep with grants to renew");
    }

    #[test]
    fn children_are_compared_by_generation_when_the_node_gives_one() {
        let mut root = Routing::new(RoutingConfig::default());
        let kids: Vec<(NodeId, Position)> = (2..5).map(|n| (NodeId::from_u64(n), Position::new(1.0, 1.0))).collect();
        let with_generation =
            |children, generation| TreeCtx { children_generation: Some(generation), ..ctx(1, None, true, children) };
        let t0 = Time::ZERO;
        root.poll(t0, &with_generation(&kids, 1));
        for (kid, _) in &kids {
            let want = vec![Want { purpose: Purpose::Machine, prefix: 26, replaces: None, on_behalf: None }];
            root.on_message(t0, &with_generation(&kids, 1), *kid, RoutesMessage::SubnetSync { held: vec![], want });
        }
        root.drain();
        let holds = |root: &Routing, n: u64| root.pool().grants().any(|g| g.holder == NodeId::from_u64(n));
        // The same generation stands for the same children: the list is not read (here it even differs).
        root.poll(t0, &with_generation(&kids[..2], 1));
        assert!(holds(&root, 4));
        // A new generation: child 4 is gone, its grant released.
        root.poll(t0, &with_generation(&kids[..2], 2));
        assert!(!holds(&root, 4) && holds(&root, 2) && holds(&root, 3));
    }

    /// The answer to a deployment retraces the path it went up; a parent change on the way loses it. The
    /// deployment goes again through the new parent, and again after a resync interval without an answer.
    #[test]
    fn an_unanswered_deployment_is_sent_again_through_a_new_parent_and_after_a_resync_interval() {
        let mut node = Routing::new(RoutingConfig::default());
        let deploys_to = |node: &mut Routing| -> Vec<NodeId> {
            let (out, _) = node.drain();
            out.into_iter().filter(|(_, m)| matches!(m, RoutesMessage::Deploy { .. })).map(|(to, _)| to).collect()
        };
        let t0 = Time::from_secs(1);
        node.poll(t0, &ctx(1, Some(2), false, &[]));
        node.drain();
        let cmd = RouteCommand::DeployService { name: svc(), request: AddressRequest::default(), instances: 1 };
        node.on_command(t0, &ctx(1, Some(2), false, &[]), cmd);
        assert_eq!(deploys_to(&mut node), vec![NodeId::from_u64(2)]);

        node.poll(t0, &ctx(1, Some(3), false, &[]));
        assert_eq!(deploys_to(&mut node), vec![NodeId::from_u64(3)], "sent again through the new parent");
        node.tick(t0 + Time::from_secs(1), &ctx(1, Some(3), false, &[]));
        assert!(deploys_to(&mut node).is_empty(), "not again before a resync interval");
        let later = t0 + RoutingConfig::default().resync_interval + Time::from_secs(1);
        node.tick(later, &ctx(1, Some(3), false, &[]));
        assert_eq!(deploys_to(&mut node), vec![NodeId::from_u64(3)], "unanswered: sent again");

        // Answered: never again.
        let addresses = ServiceIpAllocator::default().deploy(&svc(), &AddressRequest::default()).unwrap();
        let answer = RoutesMessage::Deployed { name: svc(), result: Ok((addresses, vec![])), path: vec![] };
        node.on_message(later, &ctx(1, Some(3), false, &[]), NodeId::from_u64(3), answer);
        assert!(matches!(node.drain().1.as_slice(), [RouteEvent::ServiceDeployed { .. }]));
        node.poll(later, &ctx(1, Some(4), false, &[]));
        node.tick(later * 3, &ctx(1, Some(4), false, &[]));
        assert!(deploys_to(&mut node).is_empty(), "an answered deployment is not sent again");
        assert_eq!(node.counters().deploys_resent, 2);
    }

    #[test]
    fn a_machine_asking_for_another_subnet_size_is_refused_with_the_reason() {
        let mut root = Routing::new(RoutingConfig::default());
        let kids = [(NodeId::from_u64(2), Position::new(1.0, 1.0))];
        root.poll(Time::ZERO, &ctx(1, None, true, &kids));
        root.drain();
        let want = Want { purpose: Purpose::Machine, prefix: 29, replaces: None, on_behalf: None };
        let sync = RoutesMessage::SubnetSync { held: vec![], want: vec![want] };
        root.on_message(Time::ZERO, &ctx(1, None, true, &kids), NodeId::from_u64(2), sync);
        let (out, _) = root.drain();
        let refusal = out.iter().find_map(|(_, m)| match m {
            RoutesMessage::SubnetReply { granted, refused } if granted.is_empty() => refused.first().cloned(),
            _ => None,
        });
        let (_, reason) = refusal.expect("refused");
        assert!(reason.contains("grants /26 machine subnets") && reason.contains("--machine-prefix"), "{reason}");
        assert!(root.pool().grants().all(|g| g.holder != NodeId::from_u64(2)));
    }

    #[test]
    fn a_deployment_without_a_tree_fails_naming_its_service() {
        let mut node = Routing::new(RoutingConfig::default());
        let cmd = RouteCommand::DeployService { name: svc(), request: AddressRequest::default(), instances: 1 };
        node.on_command(Time::ZERO, &ctx(1, None, false, &[]), cmd);
        let events = node.drain().1;
        assert_eq!(events, vec![RouteEvent::DeployFailed { name: svc(), reason: "not attached to a tree".into() }]);
    }

    fn machine_reply(block: Ipv4Net, replaces: Ipv4Net) -> RoutesMessage {
        RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Machine, block, replaces: Some(replaces) }],
            refused: vec![],
        }
    }

    #[test]
    fn a_restarted_node_asks_its_old_subnets_back_and_learns_which_it_kept() {
        let kept: Ipv4Net = "10.16.4.64/26".parse().unwrap();
        let lost: Ipv4Net = "10.16.9.0/26".parse().unwrap();
        let new: Ipv4Net = "10.17.0.0/26".parse().unwrap();
        let mut node = Routing::new(RoutingConfig::default());
        let detached = ctx(1, None, false, &[]);
        let restore = vec![kept, lost, "10.30.1.0/26".parse().unwrap(), "8.8.8.0/26".parse().unwrap()];
        node.on_command(Time::ZERO, &detached, RouteCommand::RestoreSubnets(restore));
        let (sent, events) = node.drain();
        assert!(sent.is_empty(), "nothing to ask while detached");
        assert_eq!(events.len(), 2, "a ServiceIP block and a foreign block are refused: {events:?}");
        assert!(events.iter().all(|e| matches!(e, RouteEvent::AllocationFailed { .. })));
        // Attached: the sync asks for both back by name, and for no fresh subnet.
        let attached = ctx(1, Some(9), false, &[]);
        node.poll(Time::ZERO, &attached);
        let (sent, _) = node.drain();
        let wants: Vec<Want> = sent
            .iter()
            .find_map(|(to, m)| match m {
                RoutesMessage::SubnetSync { want, .. } if *to == NodeId::from_u64(9) => Some(want.clone()),
                _ => None,
            })
            .expect("a sync to the parent");
        assert_eq!(
            wants,
            vec![
                Want { purpose: Purpose::Machine, prefix: 26, replaces: Some(kept), on_behalf: None },
                Want { purpose: Purpose::Machine, prefix: 26, replaces: Some(lost), on_behalf: None }
            ]
        );
        let parent = NodeId::from_u64(9);
        node.on_message(Time::ZERO, &attached, parent, machine_reply(kept, kept));
        node.on_message(Time::ZERO, &attached, parent, machine_reply(new, lost));
        // A repeated answer changes nothing.
        node.on_message(Time::ZERO, &attached, parent, machine_reply(kept, kept));
        assert_eq!(
            node.drain().1,
            vec![RouteEvent::SubnetGranted { block: kept }, RouteEvent::SubnetChanged { old: lost, new }]
        );
        assert_eq!(node.machine_subnets(), &[kept, new]);
    }

    #[test]
    fn a_restarted_root_keeps_its_subnet_and_a_parent_keeps_a_child_s_free_one() {
        let old: Ipv4Net = "10.18.3.128/26".parse().unwrap();
        let mut root = Routing::new(RoutingConfig::default());
        root.on_command(Time::ZERO, &ctx(1, None, false, &[]), RouteCommand::RestoreSubnets(vec![old]));
        let kids = [(NodeId::from_u64(2), Position::new(1.0, 1.0))];
        let root_ctx = ctx(1, None, true, &kids);
        root.poll(Time::ZERO, &root_ctx);
        assert_eq!(root.machine_subnets(), &[old]);
        assert_eq!(root.drain().1, vec![RouteEvent::SubnetGranted { block: old }]);
        // A child asks for its old subnet (free) and for the root's (taken): it keeps the first only.
        let mine: Ipv4Net = "10.20.0.0/26".parse().unwrap();
        let want = vec![
            Want { purpose: Purpose::Machine, prefix: 26, replaces: Some(mine), on_behalf: None },
            Want { purpose: Purpose::Machine, prefix: 26, replaces: Some(old), on_behalf: None },
        ];
        root.on_message(Time::ZERO, &root_ctx, kids[0].0, RoutesMessage::SubnetSync { held: vec![], want });
        let granted: Vec<Granted> = root
            .drain()
            .0
            .into_iter()
            .find_map(|(_, m)| match m {
                RoutesMessage::SubnetReply { granted, .. } => Some(granted),
                _ => None,
            })
            .expect("a reply");
        assert_eq!(granted[0], Granted { purpose: Purpose::Machine, block: mine, replaces: Some(mine) });
        assert_ne!(granted[1].block, old);
        assert_eq!(granted[1].replaces, Some(old));
        assert_eq!(root.pool().grant(mine).map(|g| g.holder), Some(kids[0].0));
    }

    /// The grants in the subnet replies sent to `to`.
    fn granted_to(sent: Vec<(NodeId, RoutesMessage)>, to: NodeId) -> Vec<Granted> {
        let replies = sent.into_iter().filter_map(|(at, m)| match m {
            RoutesMessage::SubnetReply { granted, .. } if at == to => Some(granted),
            _ => None,
        });
        replies.flatten().collect()
    }

    /// The wants in the subnet syncs and wants sent to `to`.
    fn wanted_of(sent: Vec<(NodeId, RoutesMessage)>, to: NodeId) -> Vec<Want> {
        let syncs = sent.into_iter().filter_map(|(at, m)| match m {
            RoutesMessage::SubnetSync { want, .. } | RoutesMessage::SubnetWant(want) if at == to => Some(want),
            _ => None,
        });
        syncs.flatten().collect()
    }

    /// A coordinator whose parent granted it `block` for its group.
    fn coordinator_holding(block: Ipv4Net, c: &TreeCtx, parent: NodeId) -> Routing {
        let mut coord = Routing::new(RoutingConfig::default());
        coord.poll(Time::ZERO, c);
        let reply = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Block, block, replaces: None }],
            refused: vec![],
        };
        coord.on_message(Time::ZERO, c, parent, reply);
        coord
    }

    /// Coordinator 1 (parent 9) holding 10.16.0.0/24, with child 2, and a subnet from elsewhere (10.19.7.0/26).
    fn coordinator_with_a_child_from_elsewhere() -> (Routing, [(NodeId, Position); 1], Ipv4Net) {
        let kids = [(NodeId::from_u64(2), Position::new(1.0, 1.0))];
        let mut coord =
            coordinator_holding("10.16.0.0/24".parse().unwrap(), &ctx(1, Some(9), false, &kids), NodeId::from_u64(9));
        coord.drain();
        (coord, kids, "10.19.7.0/26".parse().unwrap())
    }

    #[test]
    fn a_coordinator_asks_its_parent_for_a_block_outside_its_pool_instead_of_renumbering() {
        let (mut coord, kids, foreign) = coordinator_with_a_child_from_elsewhere();
        let (parent, kid) = (NodeId::from_u64(9), kids[0].0);
        let c = ctx(1, Some(9), false, &kids);
        // The child held `foreign` under another parent: we ask ours for it rather than replace it.
        let held = vec![Held { purpose: Purpose::Machine, block: foreign }];
        coord.on_message(Time::ZERO, &c, kid, RoutesMessage::SubnetSync { held, want: vec![] });
        let sent = coord.drain().0;
        let up = Want { purpose: Purpose::Block, prefix: 26, replaces: Some(foreign), on_behalf: Some(kid) };
        assert!(
            sent.iter()
                .any(|(to, m)| *to == parent && matches!(m, RoutesMessage::SubnetWant(want) if want == &vec![up])),
            "{sent:?}"
        );
        assert!(!sent.iter().any(|(to, m)| *to == kid && matches!(m, RoutesMessage::SubnetReply { .. })));
        // The parent keeps it for us: the child is told it keeps it.
        let kept = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Block, block: foreign, replaces: Some(foreign) }],
            refused: vec![],
        };
        coord.on_message(Time::ZERO, &c, parent, kept);
        // The node polls after every input.
        coord.poll(Time::ZERO, &c);
        let sent = coord.drain().0;
        let told = sent.iter().find_map(|(to, m)| match m {
            RoutesMessage::SubnetReply { granted, .. } if *to == kid => Some(granted.clone()),
            _ => None,
        });
        assert_eq!(told, Some(vec![Granted { purpose: Purpose::Machine, block: foreign, replaces: Some(foreign) }]));
        assert_eq!(coord.pool().grant(foreign).map(|g| g.holder), Some(kid));

        // Another child's block clashes upstream: the parent answers with a replacement, so the child gets a
        // fresh subnet from our pool.
        let clash: Ipv4Net = "10.21.0.0/26".parse().unwrap();
        let held = vec![Held { purpose: Purpose::Machine, block: clash }];
        coord.on_message(Time::ZERO, &c, kid, RoutesMessage::SubnetSync { held, want: vec![] });
        coord.drain();
        let elsewhere: Ipv4Net = "10.22.0.0/26".parse().unwrap();
        let replaced = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Block, block: elsewhere, replaces: Some(clash) }],
            refused: vec![],
        };
        coord.on_message(Time::ZERO, &c, parent, replaced);
        let told = coord.drain().0.into_iter().find_map(|(to, m)| match m {
            RoutesMessage::SubnetReply { granted, .. } if to == kid => Some(granted),
            _ => None,
        });
        let told = told.expect("a replacement for the child");
        assert_eq!(told.len(), 1);
        assert_eq!(told[0].replaces, Some(clash));
        let ours: Ipv4Net = "10.16.0.0/24".parse().unwrap();
        assert!(ours.contains(&told[0].block) || elsewhere.contains(&told[0].block), "{told:?}");
    }

    /// The testbed's duplicate grant: our parent grants us, as our own machine subnet, the very block we are
    /// asking it for on a child's behalf (it was free there; the answers cross). Seeing one holder, the parent
    /// then says "kept" for the block as well. The block is ours, but our own subnet in it must never go to the
    /// child: the child gets a replacement.
    #[test]
    fn a_block_kept_for_a_child_that_the_parent_also_granted_as_our_own_subnet_is_not_granted_twice() {
        let ours: Ipv4Net = "10.16.0.0/24".parse().unwrap();
        let contested: Ipv4Net = "10.19.7.0/26".parse().unwrap();
        let (me, parent, kid) = (NodeId::from_u64(1), NodeId::from_u64(9), NodeId::from_u64(2));
        let kids = [(kid, Position::new(1.0, 1.0))];
        let c = ctx(1, Some(9), false, &kids);
        let mut coord = coordinator_holding(ours, &c, parent);
        let held = vec![Held { purpose: Purpose::Machine, block: contested }];
        coord.on_message(Time::ZERO, &c, kid, RoutesMessage::SubnetSync { held, want: vec![] });
        coord.drain();
        // The answer to our own want (a fresh machine subnet) crosses the claim: it is the contested block.
        let fresh = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Machine, block: contested, replaces: None }],
            refused: vec![],
        };
        coord.on_message(Time::ZERO, &c, parent, fresh);
        let kept = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Block, block: contested, replaces: Some(contested) }],
            refused: vec![],
        };
        coord.on_message(Time::ZERO, &c, parent, kept);
        // The node polls after every input.
        coord.poll(Time::ZERO, &c);
        let sent = coord.drain().0;
        let told: Vec<Granted> = sent
            .into_iter()
            .filter_map(|(to, m)| match m {
                RoutesMessage::SubnetReply { granted, .. } if to == kid => Some(granted),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(coord.machine_subnets(), &[contested]);
        assert_eq!(coord.pool().grant(contested).map(|g| g.holder), Some(me), "our own subnet is granted to us");
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].replaces, Some(contested));
        assert!(!told[0].block.contains(&contested) && !contested.contains(&told[0].block), "{told:?}");
        assert_eq!(coord.pool().grant(told[0].block).map(|g| g.holder), Some(kid));
    }

    /// A block granted to us that contains our own subnet (after a takeover, or answers that crossed) while part
    /// of that subnet already went to a child: we move to a fresh subnet and say so.
    #[test]
    fn our_own_subnet_granted_to_a_child_moves_us_to_a_fresh_one() {
        let ours: Ipv4Net = "10.16.0.0/24".parse().unwrap();
        let (me, parent, kid) = (NodeId::from_u64(1), NodeId::from_u64(9), NodeId::from_u64(2));
        let kids = [(kid, Position::new(1.0, 1.0))];
        let c = ctx(1, Some(9), false, &kids);
        let mut coord = Routing::new(RoutingConfig::default());
        coord.poll(Time::ZERO, &c);
        let reply = |granted| RoutesMessage::SubnetReply { granted, refused: vec![] };
        coord.on_message(
            Time::ZERO,
            &c,
            parent,
            reply(vec![Granted { purpose: Purpose::Block, block: ours, replaces: None }]),
        );
        let want = vec![Want { purpose: Purpose::Machine, prefix: 26, replaces: None, on_behalf: None }];
        coord.on_message(Time::ZERO, &c, kid, RoutesMessage::SubnetSync { held: vec![], want });
        let kid_block = coord.pool().grants_of(kid).next().expect("the child got a subnet").block;
        coord.drain();
        // Our parent's answer says our machine subnet is the one the child just got.
        coord.on_message(
            Time::ZERO,
            &c,
            parent,
            reply(vec![Granted { purpose: Purpose::Machine, block: kid_block, replaces: None }]),
        );
        coord.poll(Time::ZERO, &c);
        let events = coord.drain().1;
        let mine = coord.machine_subnets().to_vec();
        assert_eq!(mine.len(), 1);
        assert!(!mine[0].contains(&kid_block) && !kid_block.contains(&mine[0]), "{mine:?}");
        assert_eq!(coord.pool().grant(mine[0]).map(|g| g.holder), Some(me));
        assert_eq!(coord.pool().grant(kid_block).map(|g| g.holder), Some(kid));
        assert!(events.contains(&RouteEvent::SubnetChanged { old: kid_block, new: mine[0] }), "{events:?}");
    }

    /// A split moves a child's child under a sibling before the old parent notices: the sibling asks for the moved
    /// node's block on its behalf and the grant follows it, nothing is renumbered.
    #[test]
    fn a_block_asked_for_on_behalf_of_its_holder_is_handed_over_not_renumbered() {
        // The root is node 1 (see `ctx`).
        let (old_parent, new_parent) = (NodeId::from_u64(2), NodeId::from_u64(3));
        let kids = [(old_parent, Position::new(1.0, 1.0)), (new_parent, Position::new(2.0, 2.0))];
        let c = ctx(1, None, true, &kids);
        let mut node = Routing::new(RoutingConfig::default());
        node.poll(Time::ZERO, &c);
        let want = vec![Want { purpose: Purpose::Block, prefix: 24, replaces: None, on_behalf: None }];
        node.on_message(Time::ZERO, &c, old_parent, RoutesMessage::SubnetSync { held: vec![], want });
        let block = node.pool().grants_of(old_parent).next().expect("granted").block;
        node.drain();
        // `old_parent` itself moved under `new_parent`, which asks for its block.
        let claim = Want { purpose: Purpose::Block, prefix: 24, replaces: Some(block), on_behalf: Some(old_parent) };
        let held = vec![];
        node.on_message(Time::ZERO, &c, new_parent, RoutesMessage::SubnetSync { held, want: vec![claim] });
        assert_eq!(node.pool().grant(block).map(|g| g.holder), Some(new_parent));
        let kept = Granted { purpose: Purpose::Block, block, replaces: Some(block) };
        assert!(node.drain().0.iter().any(|(to, m)| *to == new_parent
            && matches!(m, RoutesMessage::SubnetReply { granted, .. } if granted == &vec![kept])));
    }

    /// A child repeats its sync before our answer arrives: every repeat gets the same replacement block.
    #[test]
    fn a_repeated_want_for_a_replacement_gets_the_same_block() {
        let (a, b) = (NodeId::from_u64(2), NodeId::from_u64(3));
        let kids = [(a, Position::new(1.0, 1.0)), (b, Position::new(2.0, 2.0))];
        let c = ctx(1, None, true, &kids);
        let mut node = Routing::new(RoutingConfig::default());
        node.poll(Time::ZERO, &c);
        let fresh = vec![Want { purpose: Purpose::Block, prefix: 24, replaces: None, on_behalf: None }];
        node.on_message(Time::ZERO, &c, a, RoutesMessage::SubnetSync { held: vec![], want: fresh });
        let taken = node.pool().grants_of(a).next().expect("granted").block;
        node.drain();
        // `b` holds `taken` too (another side of a partition): it cannot keep it, and asks twice.
        let mut answers = Vec::new();
        for t in [0, 5] {
            let held = vec![Held { purpose: Purpose::Block, block: taken }];
            node.on_message(Time::from_millis(t), &c, b, RoutesMessage::SubnetSync { held, want: vec![] });
            answers.extend(granted_to(node.drain().0, b));
        }
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert_eq!(answers[0], answers[1]);
        assert_ne!(answers[0].block, taken);
        assert_eq!(node.pool().grants_of(b).count(), 1, "one replacement, not one per sync");
    }

    /// A coordinator asks for a block as large as what it holds; when no such block is free, it gets the largest
    /// free one (down to one machine subnet) rather than a refusal or a wait.
    #[test]
    fn a_block_too_large_for_the_free_space_is_served_smaller() {
        let (parent, kid) = (NodeId::from_u64(9), NodeId::from_u64(2));
        let kids = [(kid, Position::new(1.0, 1.0))];
        let c = ctx(1, Some(9), false, &kids);
        let mut coord = coordinator_holding("10.16.0.0/23".parse().unwrap(), &c, parent);
        coord.drain();
        let want = vec![Want { purpose: Purpose::Block, prefix: 22, replaces: None, on_behalf: None }];
        coord.on_message(Time::ZERO, &c, kid, RoutesMessage::SubnetSync { held: vec![], want });
        let granted = granted_to(coord.drain().0, kid);
        assert_eq!(granted.len(), 1, "{granted:?}");
        assert_eq!(granted[0].block.prefix_len(), 23, "the largest free block, not a refusal: {granted:?}");
    }

    /// Blocks a coordinator no longer grants from go back to its parent (left out of its sync), and a coordinator
    /// asks for blocks as large as what it holds, so it holds a few blocks, not one per child.
    #[test]
    fn idle_blocks_go_back_and_further_blocks_double() {
        let (parent, kid) = (NodeId::from_u64(9), NodeId::from_u64(2));
        let kids = [(kid, Position::new(1.0, 1.0))];
        let c = ctx(1, Some(9), false, &kids);
        let first: Ipv4Net = "10.16.0.0/24".parse().unwrap();
        let mut coord = coordinator_holding(first, &c, parent);
        let second: Ipv4Net = "10.16.4.0/24".parse().unwrap();
        let reply = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Block, block: second, replaces: None }],
            refused: vec![],
        };
        coord.on_message(Time::ZERO, &c, parent, reply);
        coord.drain();
        // Nothing is granted from either: one goes back at the next sync, one stays as room for the next child.
        coord.poll(Time::from_secs(11), &c);
        let sent = coord.drain().0;
        let held: Vec<Ipv4Net> = sent
            .iter()
            .find_map(|(to, m)| match m {
                RoutesMessage::SubnetSync { held, .. } if *to == parent => {
                    Some(held.iter().filter(|h| h.purpose == Purpose::Block).map(|h| h.block).collect())
                }
                _ => None,
            })
            .expect("a sync");
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(coord.counters().blocks_given_back, 1);
        assert!(coord.pool().owned() == held.as_slice(), "{:?}", coord.pool().owned());
        // Asking again: the block asked for is as large as what we hold (here the /24 left).
        let wants: Vec<Want> =
            (0..5).map(|_| Want { purpose: Purpose::Machine, prefix: 26, replaces: None, on_behalf: None }).collect();
        coord.on_message(Time::from_secs(11), &c, kid, RoutesMessage::SubnetSync { held: vec![], want: wants });
        let asked = wanted_of(coord.drain().0, parent);
        assert_eq!(asked, vec![Want { purpose: Purpose::Block, prefix: 24, replaces: None, on_behalf: None }]);
    }

    /// Three machines, children of coordinator 1 (whose parent is 9) in the tests below.
    fn three_machines() -> Vec<(NodeId, Position)> {
        (2..5).map(|k| (NodeId::from_u64(k), Position::new(1.0, 1.0))).collect()
    }

    /// The sync of a machine that wants a subnet.
    fn machine_sync() -> RoutesMessage {
        let machine = Want { purpose: Purpose::Machine, prefix: 26, replaces: None, on_behalf: None };
        RoutesMessage::SubnetSync { held: vec![], want: vec![machine] }
    }

    #[test]
    fn a_block_is_sized_to_what_waits_and_a_refusal_is_not_asked_again_at_once() {
        let parent = NodeId::from_u64(9);
        let kids = three_machines();
        let c = ctx(1, Some(9), false, &kids);
        let mut coord = Routing::new(RoutingConfig::default());
        // Two machines wait for a subnet: a /25 is asked for, not a /24 half idle.
        coord.on_message(Time::ZERO, &c, kids[0].0, machine_sync());
        coord.on_message(Time::ZERO, &c, kids[1].0, machine_sync());
        let asked = wanted_of(coord.drain().0, parent);
        let first = Want { purpose: Purpose::Block, prefix: 26, replaces: None, on_behalf: None };
        assert_eq!(asked, vec![first], "the first machine's sync asks for one subnet's room");
        let refusal = |prefix: u8| RoutesMessage::SubnetReply {
            granted: vec![],
            refused: vec![(
                Want { purpose: Purpose::Block, prefix, replaces: None, on_behalf: None },
                format!("no free /{prefix} block left in the pool"),
            )],
        };
        // The parent has nothing left: the next machine's sync is not passed up again at once.
        coord.on_message(Time::from_millis(10), &c, parent, refusal(26));
        coord.on_message(Time::from_millis(20), &c, kids[2].0, machine_sync());
        assert_eq!(wanted_of(coord.drain().0, parent), vec![]);
        // Refused, not lost: not asked again after the short wait for a lost answer either.
        coord.tick(Time::ZERO + RoutingConfig::default().answer_wait + Duration::from_secs(1), &c);
        assert_eq!(wanted_of(coord.drain().0, parent), vec![]);
        // After a resync interval the block is asked for again, sized to the three machines waiting.
        let later = Time::ZERO + RoutingConfig::default().resync_interval + Duration::from_secs(1);
        coord.tick(later, &c);
        let asked = wanted_of(coord.drain().0, parent);
        assert_eq!(asked, vec![Want { purpose: Purpose::Block, prefix: 24, replaces: None, on_behalf: None }]);
    }

    #[test]
    fn an_unanswered_block_request_is_asked_again_after_the_answer_wait() {
        // One lost request near the root of a join storm left the machines below it without a subnet for a resync
        // interval (ten seconds).
        let parent = NodeId::from_u64(9);
        let kids = three_machines();
        let c = ctx(1, Some(9), false, &kids);
        let mut coord = Routing::new(RoutingConfig::default());
        let wait = RoutingConfig::default().answer_wait;
        coord.on_message(Time::ZERO, &c, kids[0].0, machine_sync());
        assert_eq!(wanted_of(coord.drain().0, parent).len(), 1, "one block asked for");
        coord.tick(wait, &c);
        assert_eq!(wanted_of(coord.drain().0, parent), vec![], "not before the answer is overdue");
        coord.tick(wait + Duration::from_secs(1), &c);
        let asked = wanted_of(coord.drain().0, parent);
        assert_eq!(asked, vec![Want { purpose: Purpose::Block, prefix: 26, replaces: None, on_behalf: None }]);
    }

    #[test]
    fn a_machine_asks_for_its_subnet_again_until_an_answer_comes_then_syncs_at_the_resync_interval() {
        let parent = NodeId::from_u64(1);
        let c = ctx(2, Some(1), false, &[]);
        let mut machine = Routing::new(RoutingConfig::default());
        let (wait, resync) = (RoutingConfig::default().answer_wait, RoutingConfig::default().resync_interval);
        let machine_want = Want { purpose: Purpose::Machine, prefix: 26, replaces: None, on_behalf: None };
        machine.poll(Time::ZERO, &c);
        assert_eq!(wanted_of(machine.drain().0, parent), vec![machine_want]);
        machine.poll(wait - Duration::from_millis(1), &c);
        assert_eq!(wanted_of(machine.drain().0, parent), vec![], "not before the answer is overdue");
        // The sync (or its answer) was lost: asked again.
        machine.poll(wait, &c);
        assert_eq!(wanted_of(machine.drain().0, parent), vec![machine_want]);
        let granted: Ipv4Net = "10.16.9.0/26".parse().unwrap();
        let reply = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Machine, block: granted, replaces: None }],
            refused: vec![],
        };
        let answered = wait + Duration::from_millis(10);
        machine.on_message(answered, &c, parent, reply);
        assert_eq!(machine.machine_subnets(), &[granted]);
        machine.drain();
        machine.poll(answered + resync - Duration::from_millis(1), &c);
        assert!(machine.drain().0.is_empty(), "answered: the next sync waits a resync interval");
        machine.poll(answered + resync, &c);
        let sent = machine.drain().0;
        assert!(
            sent.iter()
                .any(|(to, m)| *to == parent && matches!(m, RoutesMessage::SubnetSync { want, .. } if want.is_empty()))
        );
    }

    #[test]
    fn a_block_claimed_again_is_not_freed_by_a_sync_that_crossed_the_claim() {
        let kid = NodeId::from_u64(2);
        let kids = [(kid, Position::new(1.0, 1.0))];
        let c = ctx(1, None, true, &kids);
        let mut root = Routing::new(RoutingConfig::default());
        root.poll(Time::ZERO, &c);
        let block: Ipv4Net = "10.17.0.0/24".parse().unwrap();
        let claim =
            Want { purpose: Purpose::Block, prefix: 24, replaces: Some(block), on_behalf: Some(NodeId::from_u64(3)) };
        root.on_message(Time::ZERO, &c, kid, RoutesMessage::SubnetWant(vec![claim]));
        assert_eq!(granted_to(root.drain().0, kid)[0].block, block, "kept for the claim");
        // Later the child claims it again (a grandchild moved under it) while its sync, sent just before, omits it.
        let resync = RoutingConfig::default().resync_interval;
        let later = Time::ZERO + resync + Duration::from_secs(1);
        root.on_message(later, &c, kid, RoutesMessage::SubnetWant(vec![claim]));
        assert_eq!(granted_to(root.drain().0, kid)[0].block, block, "kept again");
        root.on_message(later, &c, kid, RoutesMessage::SubnetSync { held: vec![], want: vec![] });
        assert!(root.pool().grant(block).is_some_and(|g| g.holder == kid), "the crossing sync does not free it");
        // A sync a resync interval after the claim that still omits it does.
        let much_later = later + resync + Duration::from_secs(1);
        root.on_message(much_later, &c, kid, RoutesMessage::SubnetSync { held: vec![], want: vec![] });
        assert!(root.pool().grant(block).is_none());
    }

    #[test]
    fn a_moving_coordinator_keeps_a_child_s_claim_waiting_for_its_parent_instead_of_renumbering_it() {
        let (parent, kid) = (NodeId::from_u64(9), NodeId::from_u64(2));
        let kids = [(kid, Position::new(1.0, 1.0))];
        let mut coord = Routing::new(RoutingConfig::default());
        let attached = ctx(1, Some(9), false, &kids);
        coord.poll(Time::ZERO, &attached);
        // Its parent granted it a block, with room for a fresh /24.
        let pool_block: Ipv4Net = "10.16.0.0/22".parse().unwrap();
        let reply = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Block, block: pool_block, replaces: None }],
            refused: vec![],
        };
        coord.on_message(Time::from_millis(5), &attached, parent, reply);
        coord.drain();
        // Now it moves (detached, its attach pending: no parent, not a root), and a child claims the block its
        // subtree uses, held from elsewhere.
        let moving = ctx(1, None, false, &kids);
        coord.poll(Time::from_millis(10), &moving);
        let block: Ipv4Net = "10.17.0.0/24".parse().unwrap();
        let claim = Want { purpose: Purpose::Block, prefix: 24, replaces: Some(block), on_behalf: None };
        coord.on_message(Time::from_millis(20), &moving, kid, RoutesMessage::SubnetWant(vec![claim]));
        let (sent, _) = coord.drain();
        assert_eq!(granted_to(sent, kid), vec![], "no fresh block (renumbering the subtree) while there is no parent");
        // Attached again: the claim goes up for the block itself.
        coord.poll(Time::from_millis(50), &attached);
        let asked = wanted_of(coord.drain().0, parent);
        assert!(asked.iter().any(|w| w.replaces == Some(block) && w.prefix == 24), "claimed up: {asked:?}");
    }

    #[test]
    fn only_the_answer_to_a_block_request_closes_it() {
        let parent = NodeId::from_u64(9);
        let kids = three_machines();
        let c = ctx(1, Some(9), false, &kids);
        let mut coord = Routing::new(RoutingConfig::default());
        coord.on_message(Time::ZERO, &c, kids[0].0, machine_sync());
        let asked = wanted_of(coord.drain().0, parent);
        assert_eq!(asked.len(), 1, "one block asked for: {asked:?}");
        // The parent answers something else first (our own machine's subnet): the block request stays open, so
        // the next machine waiting asks nothing more (closed by any reply, a coordinator with many claims in
        // flight asked again at each answer, and a parent with room granted every ask).
        let own: Ipv4Net = "10.16.9.0/26".parse().unwrap();
        let reply = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Machine, block: own, replaces: None }],
            refused: vec![],
        };
        coord.on_message(Time::from_millis(10), &c, parent, reply);
        coord.on_message(Time::from_millis(20), &c, kids[1].0, machine_sync());
        assert_eq!(wanted_of(coord.drain().0, parent), vec![]);
        // The block arrives (room for one of the two machines waiting): the request is closed, and the other
        // machine's want asks again.
        let block: Ipv4Net = "10.16.10.0/26".parse().unwrap();
        let reply = RoutesMessage::SubnetReply {
            granted: vec![Granted { purpose: Purpose::Block, block, replaces: None }],
            refused: vec![],
        };
        coord.on_message(Time::from_millis(30), &c, parent, reply);
        assert_eq!(wanted_of(coord.drain().0, parent).len(), 1, "a new request once the first was answered");
    }

    #[test]
    fn a_block_request_open_at_a_parent_change_is_asked_of_the_new_parent() {
        let (old_parent, new_parent) = (NodeId::from_u64(9), NodeId::from_u64(8));
        let kids = three_machines();
        let mut coord = Routing::new(RoutingConfig::default());
        let before = ctx(1, Some(9), false, &kids);
        coord.on_message(Time::ZERO, &before, kids[0].0, machine_sync());
        assert_eq!(wanted_of(coord.drain().0, old_parent).len(), 1, "a block asked of the first parent");
        // The old parent will not answer to us any more: what waits asks the new one at once, not after a resync
        // interval.
        let after = ctx(1, Some(8), false, &kids);
        coord.poll(Time::from_millis(10), &after);
        let asked = wanted_of(coord.drain().0, new_parent);
        assert!(asked.iter().any(|w| w.purpose == Purpose::Block && w.replaces.is_none()), "{asked:?}");
    }

    /// The root (1) granted coordinator A (2) a block; A granted the machines X (6) and M (7) a subnet each.
    fn root_and_coordinator_with_two_machines() -> (Routing, Routing, Ipv4Net, Ipv4Net, Ipv4Net) {
        let (root_id, a, x, m) = (NodeId::from_u64(1), NodeId::from_u64(2), NodeId::from_u64(6), NodeId::from_u64(7));
        let root_kids = [(a, Position::new(1.0, 1.0))];
        let at_root = ctx(1, None, true, &root_kids);
        let mut root = Routing::new(RoutingConfig::default());
        root.poll(Time::ZERO, &at_root);
        let want = vec![Want { purpose: Purpose::Block, prefix: 24, replaces: None, on_behalf: None }];
        root.on_message(Time::ZERO, &at_root, a, RoutesMessage::SubnetSync { held: vec![], want });
        let block = granted_to(root.drain().0, a)[0].block;
        let a_kids = [(x, Position::new(2.0, 2.0)), (m, Position::new(3.0, 3.0))];
        let at_a = ctx(2, Some(1), false, &a_kids);
        let mut coord = coordinator_holding(block, &at_a, root_id);
        coord.on_message(Time::ZERO, &at_a, x, machine_sync());
        coord.on_message(Time::ZERO, &at_a, m, machine_sync());
        let sent = coord.drain().0;
        let (x_subnet, m_subnet) = (granted_to(sent.clone(), x)[0].block, granted_to(sent, m)[0].block);
        (root, coord, block, x_subnet, m_subnet)
    }

    /// A splits: X moves up beside it (under the root) and M under X. The root must keep M's subnet when X claims it
    /// for M: renumbered (the root found it inside A's grant), every split left the moved subtree's space idle at A
    /// and took fresh space from the root, and a 20k join storm ran the platform range dry.
    #[test]
    fn a_split_hands_the_moved_children_s_blocks_to_the_parent_so_they_keep_them() {
        let (mut root, mut coord, block, x_subnet, m_subnet) = root_and_coordinator_with_two_machines();
        let (root_id, a, x, m) = (NodeId::from_u64(1), NodeId::from_u64(2), NodeId::from_u64(6), NodeId::from_u64(7));
        let at_a = ctx(2, Some(1), false, &[]);
        coord.hand_over(Time::from_secs(1), &at_a, &[x, m]);
        coord.poll(Time::from_secs(1), &at_a);
        assert!(coord.pool().free_addresses() < block_size(24), "the moved blocks left A's pool");
        let root_kids = [(a, Position::new(1.0, 1.0)), (x, Position::new(2.0, 2.0))];
        let at_root = ctx(1, None, true, &root_kids);
        for (to, msg) in coord.drain().0 {
            if to == root_id {
                root.on_message(Time::from_secs(1), &at_root, a, msg);
            }
        }
        root.drain();
        // X lists its subnet, and claims M's on M's behalf: both are kept.
        let held = vec![Held { purpose: Purpose::Machine, block: x_subnet }];
        root.on_message(Time::from_secs(1), &at_root, x, RoutesMessage::SubnetSync { held, want: vec![] });
        let claim = Want { purpose: Purpose::Block, prefix: 26, replaces: Some(m_subnet), on_behalf: Some(m) };
        root.on_message(Time::from_secs(1), &at_root, x, RoutesMessage::SubnetWant(vec![claim]));
        let answers = granted_to(root.drain().0, x);
        assert_eq!(answers, vec![Granted { purpose: Purpose::Block, block: m_subnet, replaces: Some(m_subnet) }]);
        assert_eq!(root.pool().grant(x_subnet).map(|g| g.holder), Some(x));
        assert_eq!(root.pool().grant(m_subnet).map(|g| g.holder), Some(x));
        // What A keeps is the rest of its block, as the root now grants it: its sync needs no answer.
        let at_a = ctx(2, Some(1), false, &[]);
        coord.poll(Time::from_secs(11), &at_a);
        for (to, msg) in coord.drain().0 {
            if to == root_id && matches!(msg, RoutesMessage::SubnetSync { .. }) {
                root.on_message(Time::from_secs(11), &at_root, a, msg);
            }
        }
        let answers = granted_to(root.drain().0, a);
        assert!(answers.iter().all(|g| g.replaces.is_none()), "nothing replaced: {answers:?}");
        let inside = root.pool().grants_of(a).filter(|g| block.contains(&g.block));
        assert_eq!(inside.map(|g| block_size(g.block.prefix_len())).sum::<u64>(), block_size(24) - 2 * block_size(26));
    }

    /// At a root, the members of a split move under one of its children: their grants wait for the claims, not
    /// granted afresh to whoever asks first.
    #[test]
    fn a_root_keeps_the_grants_of_children_moved_below_another_child_for_their_claims() {
        let (x, m, other) = (NodeId::from_u64(6), NodeId::from_u64(7), NodeId::from_u64(8));
        let before = [(x, Position::new(2.0, 2.0)), (m, Position::new(3.0, 3.0)), (other, Position::new(4.0, 4.0))];
        let c = ctx(1, None, true, &before);
        let mut root = Routing::new(RoutingConfig::default());
        root.poll(Time::ZERO, &c);
        root.on_message(Time::ZERO, &c, m, machine_sync());
        let m_subnet = granted_to(root.drain().0, m)[0].block;
        let after = [(x, Position::new(2.0, 2.0)), (other, Position::new(4.0, 4.0))];
        let c = ctx(1, None, true, &after);
        root.hand_over(Time::from_secs(1), &c, &[m]);
        root.poll(Time::from_secs(1), &c);
        // Another child asks before X claims M's subnet: it gets another one.
        root.on_message(Time::from_secs(1), &c, other, machine_sync());
        assert_ne!(granted_to(root.drain().0, other)[0].block, m_subnet);
        let claim = Want { purpose: Purpose::Machine, prefix: 26, replaces: Some(m_subnet), on_behalf: Some(m) };
        root.on_message(Time::from_secs(1), &c, x, RoutesMessage::SubnetWant(vec![claim]));
        let kept = Granted { purpose: Purpose::Machine, block: m_subnet, replaces: Some(m_subnet) };
        assert_eq!(granted_to(root.drain().0, x), vec![kept]);
    }

    /// A grant kept for a child that moved here is as old as it was, but new to the child: a sync the child sent
    /// before our answer arrived (or after it was lost) does not free it.
    #[test]
    fn a_grant_handed_to_a_child_is_not_freed_by_a_sync_that_does_not_know_it_yet() {
        let (x, m) = (NodeId::from_u64(6), NodeId::from_u64(7));
        let before = [(x, Position::new(2.0, 2.0)), (m, Position::new(3.0, 3.0))];
        let c = ctx(1, None, true, &before);
        let mut root = Routing::new(RoutingConfig::default());
        root.poll(Time::ZERO, &c);
        root.on_message(Time::ZERO, &c, m, machine_sync());
        let m_subnet = granted_to(root.drain().0, m)[0].block;
        let after = [(x, Position::new(2.0, 2.0))];
        let c = ctx(1, None, true, &after);
        let later = Time::from_secs(60);
        root.hand_over(later, &c, &[m]);
        let claim = Want { purpose: Purpose::Block, prefix: 26, replaces: Some(m_subnet), on_behalf: Some(m) };
        root.on_message(later, &c, x, RoutesMessage::SubnetWant(vec![claim]));
        root.drain();
        let unaware = RoutesMessage::SubnetSync { held: vec![], want: vec![] };
        root.on_message(later + Time::from_secs(1), &c, x, unaware);
        assert_eq!(root.pool().grant(m_subnet).map(|g| g.holder), Some(x));
    }

    /// A coordinator asked its parent to keep a block for a child that then moved away in a split: the answer goes
    /// on to the parent for the child, not into the coordinator's pool (where nobody would claim it).
    #[test]
    fn a_claim_open_for_a_child_that_moved_away_follows_it_when_answered() {
        let (mut coord, kids, foreign) = coordinator_with_a_child_from_elsewhere();
        let (parent, kid) = (NodeId::from_u64(9), kids[0].0);
        let c = ctx(1, Some(9), false, &kids);
        let claim = Want { purpose: Purpose::Machine, prefix: 26, replaces: Some(foreign), on_behalf: None };
        coord.on_message(Time::ZERO, &c, kid, RoutesMessage::SubnetWant(vec![claim]));
        let asked = wanted_of(coord.drain().0, parent);
        assert_eq!(
            asked,
            vec![Want { purpose: Purpose::Block, prefix: 26, replaces: Some(foreign), on_behalf: Some(kid) }]
        );
        let after = ctx(1, Some(9), false, &[]);
        coord.hand_over(Time::from_secs(1), &after, &[kid]);
        let kept = Granted { purpose: Purpose::Block, block: foreign, replaces: Some(foreign) };
        let reply = RoutesMessage::SubnetReply { granted: vec![kept], refused: vec![] };
        coord.on_message(Time::from_secs(2), &after, parent, reply);
        let handed: Vec<_> = coord
            .drain()
            .0
            .into_iter()
            .filter_map(|(to, m)| match m {
                RoutesMessage::SubnetHandOver(h) if to == parent => Some(h),
                _ => None,
            })
            .collect();
        assert_eq!(handed, vec![vec![(foreign, kid)]]);
        assert!(!coord.pool().overlaps_owned(foreign), "the kept block is not ours");
    }

    /// Our block is renumbered: a sync a child sent before it learned of its new subnet lists the old one. Its moved
    /// grant is new to it and stays; freed by the grant's age, it went to the next machine that asked (a 20k join
    /// storm: two machines on one subnet until the next resync).
    #[test]
    fn a_grant_moved_with_our_block_is_not_freed_by_the_child_s_sync_from_before() {
        let ours: Ipv4Net = "10.16.0.0/24".parse().unwrap();
        let moved_to: Ipv4Net = "10.24.0.0/24".parse().unwrap();
        let parent = NodeId::from_u64(9);
        let kids = three_machines();
        let c = ctx(1, Some(9), false, &kids);
        let mut coord = coordinator_holding(ours, &c, parent);
        coord.on_message(Time::ZERO, &c, kids[0].0, machine_sync());
        let subnet = granted_to(coord.drain().0, kids[0].0)[0].block;
        let later = Time::from_secs(60);
        coord.on_message(later, &c, parent, RoutesMessage::Moved { old: ours, new: Some(moved_to) });
        let shifted = coord.pool().grants_of(kids[0].0).map(|g| g.block).next().expect("the grant moved");
        assert!(moved_to.contains(&shifted));
        let before =
            RoutesMessage::SubnetSync { held: vec![Held { purpose: Purpose::Machine, block: subnet }], want: vec![] };
        coord.on_message(later, &c, kids[0].0, before);
        coord.on_message(later, &c, kids[1].0, machine_sync());
        assert_eq!(coord.pool().grant(shifted).map(|g| g.holder), Some(kids[0].0));
        assert!(granted_to(coord.drain().0, kids[1].0).iter().all(|g| g.block != shifted));
    }

    /// A block our parent kept for a child's claim arrives while other children wait: served in child order, another
    /// child's want took it and the claimer was renumbered while its subtree still used the block.
    #[test]
    fn a_claim_kept_upstream_goes_to_its_claimer_before_other_children_s_waiting_wants() {
        let foreign: Ipv4Net = "10.19.7.0/26".parse().unwrap();
        let (parent, early, claimer) = (NodeId::from_u64(9), NodeId::from_u64(2), NodeId::from_u64(3));
        let kids = [(early, Position::new(1.0, 1.0)), (claimer, Position::new(2.0, 2.0))];
        let c = ctx(1, Some(9), false, &kids);
        let mut coord = Routing::new(RoutingConfig::default());
        coord.poll(Time::ZERO, &c);
        // The claimer held `foreign` elsewhere: asked up. The other child (first in child order) waits for any subnet.
        let claim = Want { purpose: Purpose::Machine, prefix: 26, replaces: Some(foreign), on_behalf: None };
        coord.on_message(Time::ZERO, &c, claimer, RoutesMessage::SubnetWant(vec![claim]));
        let fresh = Want { purpose: Purpose::Machine, prefix: 26, replaces: None, on_behalf: None };
        coord.on_message(Time::ZERO, &c, early, RoutesMessage::SubnetWant(vec![fresh]));
        coord.drain();
        // The parent keeps `foreign` for us: it is the claimer's, not the first free /26 for whoever comes first.
        let kept = Granted { purpose: Purpose::Block, block: foreign, replaces: Some(foreign) };
        let reply = RoutesMessage::SubnetReply { granted: vec![kept], refused: vec![] };
        coord.on_message(Time::from_millis(10), &c, parent, reply);
        let sent = coord.drain().0;
        let to_claimer = Granted { purpose: Purpose::Machine, block: foreign, replaces: Some(foreign) };
        assert_eq!(granted_to(sent.clone(), claimer), vec![to_claimer]);
        assert_eq!(granted_to(sent, early), vec![], "nothing left for the other child until a block comes");
        assert_eq!(coord.pool().grant(foreign).map(|g| g.holder), Some(claimer));
    }

    /// A claim that came while the coordinator had no parent could not be asked up; the child repeating it counts
    /// once, so the coordinator asks it of its next parent itself.
    #[test]
    fn a_claim_that_waited_without_a_parent_is_asked_of_the_next_parent_at_once() {
        let foreign: Ipv4Net = "10.19.7.0/26".parse().unwrap();
        let (parent, kid) = (NodeId::from_u64(9), NodeId::from_u64(2));
        let kids = [(kid, Position::new(1.0, 1.0))];
        let orphan = ctx(1, None, false, &kids);
        let mut coord = Routing::new(RoutingConfig::default());
        coord.poll(Time::ZERO, &orphan);
        let claim = Want { purpose: Purpose::Machine, prefix: 26, replaces: Some(foreign), on_behalf: None };
        coord.on_message(Time::ZERO, &orphan, kid, RoutesMessage::SubnetWant(vec![claim]));
        coord.drain();
        let attached = ctx(1, Some(9), false, &kids);
        coord.poll(Time::from_secs(1), &attached);
        let asked = wanted_of(coord.drain().0, parent);
        let up = Want { purpose: Purpose::Block, prefix: 26, replaces: Some(foreign), on_behalf: Some(kid) };
        assert!(asked.contains(&up), "{asked:?}");
    }

    #[test]
    fn messages_from_strangers_are_counted_and_dropped() {
        let mut node = Routing::new(RoutingConfig::default());
        let c = ctx(1, Some(9), false, &[]);
        node.on_message(Time::ZERO, &c, NodeId::from_u64(5), RoutesMessage::Up(RouteChange::Upsert(record())));
        node.on_message(Time::ZERO, &c, NodeId::from_u64(5), RoutesMessage::GroupBlocks(vec![]));
        assert_eq!(node.counters().rejected, 2);
        assert!(node.registry().is_empty());
    }
}
