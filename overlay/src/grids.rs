//! Capacity grids carried on the tree (VineIO, section 3.1.2), and the placement walk that uses them.
//!
//! What a node holds:
//! - its own free capacity (set by the agent from measurements, or by the simulator);
//! - the last subtree grid each child reported;
//! - from its parent: its siblings' subtree grids and one grid of everything outside the parent's subtree (the
//!   parent itself included), so the grids a node holds cover the whole tree exactly once;
//! - its merged subtree grid (children plus itself), which it reports up.
//!
//! Traffic stays bounded by the fanout, not by the tree size: a node reports its subtree grid only when it changed
//! significantly or every `refresh_every` reports (so a lost report heals), and a parent builds a new version of the
//! group's grids (one entry per child plus one outside grid) only when one of them changed significantly, or on the
//! same refresh when something changed at all. Each child gets a group version once: its reports name the version it
//! holds, and the parent resends only to a child whose report shows it missing (as for views). A child holding a
//! recent version gets only what changed since (the members whose grid changed, the outside grid if it did). A quiet
//! tree thus sends no grids at all, where resending the group every refresh made grids a third of a quiet tree's
//! control bytes, and one child's change costs each sibling one grid, not the group.
//! A leaf's "grid" is just its position and free capacity, which is what makes the common case cheap.
//!
//! Work stays bounded too: grids are shared (`Arc`), so one group message goes to every child without copying, and
//! the merged subtree and outside grids are recomputed only when one of their inputs changed. The outside grid a
//! coordinator builds for its children changes with every change anywhere outside their group, so while its
//! parent's grids keep changing it is rebuilt at most every `outside_every` rounds: news from afar reaches a node
//! up to that many rounds later per level above its parent; its children's and siblings' grids do not wait.
//!
//! Placement (VineIO's migration/replication target search) walks the tree: a query climbs while the outside grid
//! holds a nearer region that can host the demand than the node's own subtree, then descends into the children
//! whose grids have the nearest fitting regions; every machine that fits answers the origin directly.

use crate::Time;
use crate::id::NodeId;
use canopy_policies::{Capacity, CapacityGrid, DEFAULT_GRID_SIZE, GridInput, MAX_GRID_SIZE, MergeCache, Position};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// Children a placement query descends into at each coordinator (besides the coordinator itself).
pub const PLACEMENT_FANOUT: usize = 3;
/// Most candidates one placement query asks for.
pub const MAX_PLACEMENT_WANT: u8 = 32;
/// Placement queries travelling further than this are dropped.
const MAX_PLACEMENT_HOPS: u8 = 64;
/// Open placement queries a node keeps as origin; older ones are answered early.
const MAX_OPEN_QUERIES: usize = 64;

/// Tunables for grid exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GridConfig {
    /// Cells per side of the grids this node builds.
    pub size: u16,
    /// Relative change that makes a grid worth resending (see `CapacityGrid::differs_significantly`).
    pub threshold: f64,
    /// A report carries the subtree grid again after this many reports, so a lost one heals; a parent sends its
    /// children changes too small for a group of their own after this many heartbeat rounds (a lost group heals by
    /// the version the child reports).
    pub refresh_every: u32,
    /// A coordinator rebuilds the grid of everything outside its children's group (for them) at most every this
    /// many heartbeat rounds while its parent's grids keep changing (0: at every change); the first change after a
    /// quiet spell goes out at once. That grid changes with every change anywhere in the tree: rebuilt at every
    /// change, it set every coordinator merging and sending a new group to all its children each second of a busy
    /// tree.
    pub outside_every: u32,
    /// How long the origin of a placement query collects answers.
    pub placement_timeout: Duration,
}

impl Default for GridConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_GRID_SIZE,
            threshold: 0.1,
            refresh_every: 10,
            outside_every: 5,
            placement_timeout: Duration::from_secs(1),
        }
    }
}

/// A subtree's capacity as it travels: a leaf sends only itself, a coordinator its merged grid (shared, so that
/// holding, forwarding and resending it does not copy it; on the wire it is the plain grid).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SubtreeGrid {
    Node { position: Position, free: Capacity },
    Grid(Arc<CapacityGrid>),
}

impl SubtreeGrid {
    fn input(&self) -> GridInput<'_> {
        match self {
            SubtreeGrid::Node { position, free } => GridInput::Node { position: *position, free: *free },
            SubtreeGrid::Grid(grid) => GridInput::Grid(grid),
        }
    }

    /// As a grid (a single node becomes a one-node grid at the finest level).
    pub fn to_grid(&self, size: u16) -> CapacityGrid {
        match self {
            SubtreeGrid::Node { .. } => CapacityGrid::merge_sized(size, &[self.input()]),
            SubtreeGrid::Grid(grid) => (**grid).clone(),
        }
    }

    /// Grids are validated when decoded; a single node needs a finite position and capacity.
    pub fn is_valid(&self) -> bool {
        match self {
            SubtreeGrid::Node { position, free } => {
                position.normalized().is_some() && free.to_array().iter().all(|v| v.is_finite() && *v >= 0.0)
            }
            SubtreeGrid::Grid(_) => true,
        }
    }

    /// The nearest region (or the node itself) that may host `demand`, as a distance from `near`.
    pub fn nearest_fit_km(&self, near: Position, demand: &Capacity) -> Option<f64> {
        match self {
            SubtreeGrid::Node { position, free } => free.fits(demand).then(|| near.distance_km(position)),
            SubtreeGrid::Grid(grid) => grid.nearest_region_for(near, demand).map(|(_, d)| d),
        }
    }

    /// Whether `other` is worth sending instead of `self`.
    fn differs_significantly(&self, other: &SubtreeGrid, threshold: f64) -> bool {
        match (self, other) {
            (SubtreeGrid::Grid(a), SubtreeGrid::Grid(b)) if Arc::ptr_eq(a, b) => false,
            (SubtreeGrid::Node { position: p1, free: a }, SubtreeGrid::Node { position: p2, free: b }) => {
                p1 != p2
                    || a.to_array().iter().zip(b.to_array()).any(|(x, y)| (x - y).abs() > threshold * x.max(y))
                    // Crossing the "saturated" line always matters to the policies.
                    || a.fits(&Capacity::MIN_USEFUL) != b.fits(&Capacity::MIN_USEFUL)
            }
            (SubtreeGrid::Grid(a), SubtreeGrid::Grid(b)) => a.differs_significantly(b, threshold),
            _ => true,
        }
    }
}

/// What a parent sends its children: every child's subtree, and everything else; or, to a child holding a recent
/// version (`base`), only what changed since. One value is shared by all the heartbeats of a round that need it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupGrids {
    /// Counts up with every new group of the sender (from 1), so a child can say which one it holds.
    #[serde(default)]
    pub version: u64,
    /// 0: the whole group. Otherwise the version this one changes: only the members whose grid changed since are
    /// listed, and `outside` is `None` when it did not change.
    #[serde(default)]
    pub base: u64,
    /// Each child's subtree (the receiver's own among them).
    pub members: Vec<(NodeId, SubtreeGrid)>,
    /// The rest of the tree: the sender itself, its siblings' subtrees and what lies outside its parent.
    pub outside: Option<Arc<CapacityGrid>>,
}

impl GroupGrids {
    pub fn is_valid(&self) -> bool {
        self.members.len() <= crate::message::MAX_MEMBERS && self.members.iter().all(|(_, g)| g.is_valid())
    }
}

/// A placement query as it walks the tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementQuery {
    /// Unique per origin.
    pub id: u64,
    pub origin: NodeId,
    /// The origin's addresses, so the answering machines can reach it.
    pub origin_addrs: Vec<String>,
    pub near: Position,
    pub demand: Capacity,
    /// How many candidates the origin wants.
    pub want: u8,
    pub descending: bool,
    pub hops: u8,
}

impl PlacementQuery {
    pub fn is_valid(&self) -> bool {
        self.near.normalized().is_some()
            && self.demand.to_array().iter().all(|v| v.is_finite() && *v >= 0.0)
            && self.origin_addrs.len() <= crate::message::MAX_ADDRS
            && self.origin_addrs.iter().all(|a| a.len() <= crate::message::MAX_ADDR_LEN)
    }
}

/// One machine that can host the demand, as found by a placement query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementCandidate {
    pub node: NodeId,
    pub addrs: Vec<String>,
    pub position: Position,
    pub free: Capacity,
    /// From the query's `near` position.
    pub distance_km: f64,
}

impl PlacementCandidate {
    pub fn is_valid(&self) -> bool {
        self.position.normalized().is_some()
            && self.distance_km.is_finite()
            && self.free.to_array().iter().all(|v| v.is_finite())
            && self.addrs.len() <= crate::message::MAX_ADDRS
            && self.addrs.iter().all(|a| a.len() <= crate::message::MAX_ADDR_LEN)
    }
}

/// Where a node sends a placement query it received (or started).
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementStep {
    /// Forward the query here (to the parent while climbing, to children while descending).
    pub forward: Vec<(NodeId, PlacementQuery)>,
    /// This node fits the demand: answer the origin with this.
    pub answer: Option<PlacementCandidate>,
}

/// Counters for `agent status` and the simulator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridCounters {
    pub reports_with_grid: u64,
    pub groups_built: u64,
    pub grids_received: u64,
    pub rejected: u64,
}

struct OpenQuery {
    id: u64,
    /// The caller's label for the query, echoed in the result.
    tag: u64,
    deadline: Time,
    want: usize,
    found: Vec<PlacementCandidate>,
}

/// Grid state of one node. Pure: the node calls in on reports, heartbeats and ticks.
// In this order: what a leaf's heartbeat and report read comes first (see `Grids::HOT_LEN`).
#[repr(C)]
pub struct Grids {
    config: GridConfig,
    position: Position,
    own_free: Capacity,
    /// What we last reported, to whom, and how many reports ago.
    sent_up: Option<(NodeId, SubtreeGrid)>,
    reports_since_sent: u32,
    children: Vec<(NodeId, SubtreeGrid)>,
    open: Vec<OpenQuery>,
    counters: GridCounters,

    // Read by coordinators and on changes only: past `Grids::HOT_LEN`.
    siblings: Vec<(NodeId, SubtreeGrid)>,
    outside: Option<Arc<CapacityGrid>>,
    /// Merge of this node and its children; dropped when one of those changes.
    subtree: Option<Arc<CapacityGrid>>,
    /// Merge of this node, its siblings and its outside grid (what lies outside every child's group); dropped when
    /// our own capacity changes or we lose our parent, marked stale when the parent's grids change.
    outside_for_children: Option<Arc<CapacityGrid>>,
    /// The parent's grids changed since `outside_for_children` was built; it is rebuilt once `outside_every`
    /// rounds have passed since the last build.
    outside_stale: bool,
    rounds_since_outside: u32,
    /// This node and its siblings, as merged into `outside_for_children`: the outside grid changes with every change
    /// anywhere in the tree, they less often.
    own_and_siblings: MergeCache,
    /// A child's grid changed significantly since the last group we sent.
    group_dirty: bool,
    /// The children the last group was built for, and the group itself (the current version).
    sent_members: Vec<NodeId>,
    sent_group: Option<Arc<GroupGrids>>,
    /// What the recent versions changed (oldest first), so a child holding one of them gets only the difference.
    changes: VecDeque<GroupChange>,
    /// The differences from older versions to the current one built so far (by base version).
    deltas: Vec<Arc<GroupGrids>>,
    /// The latest outside grid found too close to the sent one to be worth a group (so it is compared once).
    outside_checked: Option<Arc<CapacityGrid>>,
    heartbeats_since_group: u32,
    held: Option<Vec<CapacityGrid>>,
    next_query: u64,
}

/// Versions of the group whose changes a parent remembers; a child further behind gets the whole group.
const GROUP_CHANGES_KEPT: usize = 16;

/// What one version of the group changed from the one before.
struct GroupChange {
    version: u64,
    /// The children whose grid changed.
    members: Vec<NodeId>,
    outside: bool,
    /// The children themselves changed (or there was no version before): only the whole group will do.
    whole: bool,
}

/// Whether two grids are the same value (the same shared grid, or equal ones).
fn same_grid(a: &Arc<CapacityGrid>, b: &Arc<CapacityGrid>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// Whether two subtree grids are the same value (shared grids compared by address first).
fn same_subtree(a: &SubtreeGrid, b: &SubtreeGrid) -> bool {
    match (a, b) {
        (SubtreeGrid::Grid(a), SubtreeGrid::Grid(b)) => same_grid(a, b),
        _ => a == b,
    }
}

impl Grids {
    /// How many leading bytes of a `Grids` a leaf's heartbeat and report read (see `Node::hot_ranges`).
    pub const HOT_LEN: usize = std::mem::offset_of!(Grids, siblings);

    pub fn new(config: GridConfig, position: Position, own_free: Capacity) -> Self {
        let config = GridConfig { size: config.size.clamp(1, MAX_GRID_SIZE), ..config };
        Self {
            config,
            position,
            own_free: own_free.sanitized(),
            children: Vec::new(),
            siblings: Vec::new(),
            outside: None,
            subtree: None,
            outside_for_children: None,
            outside_stale: false,
            rounds_since_outside: 0,
            own_and_siblings: MergeCache::default(),
            sent_up: None,
            reports_since_sent: 0,
            group_dirty: true,
            sent_members: Vec::new(),
            sent_group: None,
            changes: VecDeque::new(),
            deltas: Vec::new(),
            outside_checked: None,
            heartbeats_since_group: 0,
            held: None,
            open: Vec::new(),
            next_query: 1,
            counters: GridCounters::default(),
        }
    }

    pub fn config(&self) -> &GridConfig {
        &self.config
    }

    pub fn counters(&self) -> &GridCounters {
        &self.counters
    }

    pub fn own_free(&self) -> Capacity {
        self.own_free
    }

    /// This node's own capacity or position changed: every merge includes it.
    fn own_changed(&mut self) {
        self.subtree = None;
        self.outside_for_children = None;
        self.own_and_siblings.clear();
        self.held = None;
    }

    fn children_changed(&mut self) {
        self.subtree = None;
        self.held = None;
    }

    /// The outside grid, the siblings' grids or both changed.
    fn parent_grids_changed(&mut self, siblings_changed: bool) {
        self.outside_stale = true;
        if siblings_changed {
            self.own_and_siblings.clear();
        }
        self.held = None;
    }

    /// New measurement (or override) of this machine's free capacity.
    pub fn set_own_free(&mut self, free: Capacity) {
        let free = free.sanitized();
        if free != self.own_free {
            self.own_free = free;
            self.own_changed();
        }
    }

    pub fn set_position(&mut self, position: Position) {
        if position.normalized().is_some() && position != self.position {
            self.position = position;
            self.own_changed();
        }
    }

    fn own_input(&self) -> GridInput<'static> {
        GridInput::Node { position: self.position, free: self.own_free }
    }

    fn subtree_shared(&mut self) -> &Arc<CapacityGrid> {
        if self.subtree.is_none() {
            let mut inputs = vec![self.own_input()];
            inputs.extend(self.children.iter().map(|(_, g)| g.input()));
            self.subtree = Some(Arc::new(CapacityGrid::merge_sized(self.config.size, &inputs)));
        }
        self.subtree.as_ref().expect("just computed")
    }

    /// This node's subtree: its own capacity merged with its children's grids.
    pub fn subtree(&mut self) -> &CapacityGrid {
        self.subtree_shared()
    }

    fn subtree_payload(&mut self) -> SubtreeGrid {
        if self.children.is_empty() {
            SubtreeGrid::Node { position: self.position, free: self.own_free }
        } else {
            SubtreeGrid::Grid(Arc::clone(self.subtree_shared()))
        }
    }

    /// The grid to put in this tick's report to `parent`, when it is due: first report to this parent, a
    /// significant change, or the periodic refresh.
    pub fn report_grid(&mut self, parent: NodeId) -> Option<SubtreeGrid> {
        let current = self.subtree_payload();
        self.reports_since_sent += 1;
        let due = match &self.sent_up {
            None => true,
            Some((to, sent)) => {
                *to != parent
                    || self.reports_since_sent >= self.config.refresh_every
                    || sent.differs_significantly(&current, self.config.threshold)
            }
        };
        if !due {
            return None;
        }
        self.reports_since_sent = 0;
        self.sent_up = Some((parent, current.clone()));
        self.counters.reports_with_grid += 1;
        Some(current)
    }

    /// A child's report carried its subtree grid.
    pub fn on_child_grid(&mut self, child: NodeId, grid: SubtreeGrid) {
        if !grid.is_valid() {
            self.counters.rejected += 1;
            return;
        }
        self.counters.grids_received += 1;
        // The children hear about it with the next group only when it moved significantly from what they were
        // last sent (compared with the sent value, so slow drift adds up); the periodic refresh carries the rest.
        let sent = self.sent_group.as_ref().and_then(|g| g.members.iter().find(|(id, _)| *id == child));
        if sent.is_none_or(|(_, sent)| sent.differs_significantly(&grid, self.config.threshold)) {
            self.group_dirty = true;
        }
        match self.children.iter_mut().find(|(id, _)| *id == child) {
            // A refresh of what we hold: the merged grid stays as it is.
            Some(slot) if slot.1 == grid => return,
            Some(slot) => slot.1 = grid,
            None => self.children.push((child, grid)),
        }
        self.children_changed();
    }

    /// Forget grids of nodes that are no longer children.
    pub fn retain_children(&mut self, is_child: impl Fn(&NodeId) -> bool) {
        let before = self.children.len();
        self.children.retain(|(id, _)| is_child(id));
        if self.children.len() != before {
            self.group_dirty = true;
            self.children_changed();
        }
    }

    /// The parent's group grids arrived (`me` is this node's id, `held` the version of the parent's group we hold,
    /// 0 for none). Returns whether we hold `group.version` now. A difference from version `base` lists everything
    /// that changed after it, so it also fits any later version we hold; from a version we do not reach it is of no
    /// use (our next report names the version we hold, and the parent sends what fits).
    pub fn on_group(&mut self, me: NodeId, held: u64, group: &GroupGrids) -> bool {
        if !group.is_valid() {
            self.counters.rejected += 1;
            return false;
        }
        if held != 0 && group.version < held {
            return false; // older than what we hold (overtaken on the way)
        }
        if group.base != 0 {
            if held < group.base {
                return false;
            }
            if held == group.version {
                return true;
            }
            self.counters.grids_received += 1;
            let (mut siblings_changed, mut outside_changed) = (false, false);
            for (id, grid) in group.members.iter().filter(|(id, _)| *id != me) {
                match self.siblings.iter_mut().find(|(sibling, _)| sibling == id) {
                    Some((_, held)) if same_subtree(held, grid) => {}
                    Some((_, held)) => {
                        *held = grid.clone();
                        siblings_changed = true;
                    }
                    None => {
                        self.siblings.push((*id, grid.clone()));
                        siblings_changed = true;
                    }
                }
            }
            if let Some(outside) = &group.outside
                && !self.outside.as_ref().is_some_and(|held| same_grid(held, outside))
            {
                self.outside = Some(Arc::clone(outside));
                outside_changed = true;
            }
            if siblings_changed || outside_changed {
                self.parent_grids_changed(siblings_changed);
            }
            return true;
        }
        self.counters.grids_received += 1;
        let siblings = group.members.iter().filter(|(id, _)| *id != me);
        let same_outside = match (&self.outside, &group.outside) {
            (Some(a), Some(b)) => same_grid(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        let same_siblings = siblings.clone().eq(self.siblings.iter());
        if same_outside && same_siblings {
            return true; // a refresh of what we hold
        }
        if !same_siblings {
            self.siblings = siblings.cloned().collect();
        }
        self.outside = group.outside.clone();
        self.parent_grids_changed(!same_siblings);
        true
    }

    /// No parent any more (a root, or detached): nothing lies outside our subtree that we know of.
    pub fn clear_parent_grids(&mut self) {
        if !self.siblings.is_empty() || self.outside.is_some() {
            let siblings_changed = !self.siblings.is_empty();
            self.siblings.clear();
            self.outside = None;
            self.parent_grids_changed(siblings_changed);
            // Not stale but wrong: what lay outside is no longer there for the children.
            self.outside_for_children = None;
        }
    }

    /// Everything outside a child's subtree except its siblings: this node, its siblings and its outside grid.
    fn outside_for_children(&mut self) -> Arc<CapacityGrid> {
        if self.outside_stale && self.rounds_since_outside >= self.config.outside_every {
            self.outside_for_children = None;
        }
        if self.outside_for_children.is_none() {
            self.outside_stale = false;
            self.rounds_since_outside = 0;
            let mut shared = vec![self.own_input()];
            shared.extend(self.siblings.iter().map(|(_, g)| g.input()));
            let outside = self.outside.as_deref().map(GridInput::Grid);
            let merged =
                CapacityGrid::merge_sized_cached(self.config.size, &shared, outside, &mut self.own_and_siblings);
            self.outside_for_children = Some(Arc::new(merged));
        }
        Arc::clone(self.outside_for_children.as_ref().expect("just computed"))
    }

    /// Whether `outside` moved significantly from the outside grid of the last group sent.
    fn outside_changed(&mut self, outside: &Arc<CapacityGrid>) -> bool {
        let Some(sent) = self.sent_group.as_ref().and_then(|g| g.outside.as_ref()) else { return true };
        if Arc::ptr_eq(sent, outside) || self.outside_checked.as_ref().is_some_and(|c| Arc::ptr_eq(c, outside)) {
            return false;
        }
        let changed = sent.differs_significantly(outside, self.config.threshold);
        if !changed {
            self.outside_checked = Some(Arc::clone(outside));
        }
        changed
    }

    /// A new version of the group grids for this round of heartbeats to `children`, when one is due: a child's
    /// grid or the outside grid changed significantly, the children changed, or (every `refresh_every` rounds)
    /// anything changed at all. Each child that does not hold it yet gets it, whole or as a difference (see
    /// [`Grids::group_for_child`]).
    pub fn group_for_children(&mut self, children: &[NodeId]) -> Option<Arc<GroupGrids>> {
        if children.is_empty() {
            // No children to send an outside grid to: the sums kept for building one are only memory now.
            self.own_and_siblings.clear();
            return None;
        }
        self.heartbeats_since_group += 1;
        self.rounds_since_outside = self.rounds_since_outside.saturating_add(1);
        let outside = self.outside_for_children();
        // The same list in the same order, as a rule: checked first, as one pass instead of one per child.
        let members_changed = self.sent_members.as_slice() != children
            && (self.sent_members.len() != children.len() || children.iter().any(|c| !self.sent_members.contains(c)));
        let mut due = self.group_dirty || members_changed || self.outside_changed(&outside);
        if !due && self.heartbeats_since_group >= self.config.refresh_every {
            // Changes too small to matter on their own (and drift that has not added up yet) go out now.
            due = !self.group_is_current(&outside);
            self.heartbeats_since_group = 0;
        }
        if !due {
            return None;
        }
        self.group_dirty = false;
        self.heartbeats_since_group = 0;
        self.sent_members = children.to_vec();
        self.outside_checked = None;
        self.counters.groups_built += 1;
        let version = self.sent_group.as_ref().map_or(0, |g| g.version) + 1;
        let members: Vec<(NodeId, SubtreeGrid)> =
            self.children.iter().filter(|(id, _)| children.contains(id)).cloned().collect();
        let change = match &self.sent_group {
            Some(previous) if !members_changed => GroupChange {
                version,
                members: members
                    .iter()
                    .filter(|(id, grid)| {
                        !previous.members.iter().any(|(before, old)| before == id && same_subtree(old, grid))
                    })
                    .map(|(id, _)| *id)
                    .collect(),
                outside: !previous.outside.as_ref().is_some_and(|o| same_grid(o, &outside)),
                whole: false,
            },
            _ => GroupChange { version, members: Vec::new(), outside: true, whole: true },
        };
        if self.changes.len() == GROUP_CHANGES_KEPT {
            self.changes.pop_front();
        }
        self.changes.push_back(change);
        self.deltas.clear();
        let group = Arc::new(GroupGrids { version, base: 0, members, outside: Some(outside) });
        self.sent_group = Some(Arc::clone(&group));
        Some(group)
    }

    /// What to send a child that holds version `held` of our group (0: none): nothing when it is current, what
    /// changed since when we remember, else the whole group. Children holding the same version share one value.
    pub fn group_for_child(&mut self, held: u64) -> Option<Arc<GroupGrids>> {
        let current = self.sent_group.as_ref()?;
        if held == current.version {
            return None;
        }
        let whole = Some(Arc::clone(current));
        if held == 0 {
            return whole;
        }
        let Some(first) = self.changes.iter().position(|c| c.version == held + 1) else { return whole };
        if self.changes.iter().skip(first).any(|c| c.whole) {
            return whole;
        }
        if let Some(delta) = self.deltas.iter().find(|d| d.base == held) {
            return Some(Arc::clone(delta));
        }
        let since = || self.changes.iter().skip(first);
        let members: Vec<(NodeId, SubtreeGrid)> =
            current.members.iter().filter(|(id, _)| since().any(|c| c.members.contains(id))).cloned().collect();
        let outside_changed = since().any(|c| c.outside);
        if outside_changed && members.len() == current.members.len() {
            return whole; // everything changed: the difference is the group
        }
        let delta = Arc::new(GroupGrids {
            version: current.version,
            base: held,
            members,
            outside: if outside_changed { current.outside.clone() } else { None },
        });
        self.deltas.push(Arc::clone(&delta));
        Some(delta)
    }

    /// The latest group built for the children (the version each of them should hold), if any.
    pub fn current_group(&self) -> Option<&Arc<GroupGrids>> {
        self.sent_group.as_ref()
    }

    /// Whether the last group built holds exactly the children's grids and `outside` (its members are the current
    /// children: checked by the caller).
    fn group_is_current(&self, outside: &Arc<CapacityGrid>) -> bool {
        let Some(sent) = &self.sent_group else { return false };
        sent.outside.as_ref().is_some_and(|o| same_grid(o, outside))
            && sent.members.iter().all(|(id, sent)| {
                self.children.iter().find(|(child, _)| child == id).is_some_and(|(_, held)| same_subtree(sent, held))
            })
    }

    /// Every grid this node holds, finest knowledge included: its subtree, its children's, its siblings' and the
    /// outside grid. This is what a routing policy gets as `PickContext::grids`.
    pub fn held(&mut self) -> &[CapacityGrid] {
        if self.held.is_none() {
            let size = self.config.size;
            let mut held = vec![self.subtree().clone()];
            held.extend(self.children.iter().chain(&self.siblings).map(|(_, g)| g.to_grid(size)));
            held.extend(self.outside.iter().map(|g| CapacityGrid::clone(g)));
            self.held = Some(held);
        }
        self.held.as_deref().expect("just computed")
    }

    // ----- placement --------------------------------------------------------------------------------------------

    /// Start a placement query at this node (`tag` labels its result); the returned step is applied like a
    /// received query's.
    #[allow(clippy::too_many_arguments)]
    pub fn start_placement(
        &mut self,
        now: Time,
        tag: u64,
        me: NodeId,
        addrs: Vec<String>,
        near: Position,
        demand: Capacity,
        want: u8,
        parent: Option<NodeId>,
    ) -> (u64, PlacementStep) {
        let id = self.next_query;
        self.next_query += 1;
        let want = want.clamp(1, MAX_PLACEMENT_WANT);
        if self.open.len() >= MAX_OPEN_QUERIES {
            self.open.remove(0);
        }
        self.open.push(OpenQuery {
            id,
            tag,
            deadline: now + self.config.placement_timeout,
            want: usize::from(want),
            found: Vec::new(),
        });
        let query = PlacementQuery {
            id,
            origin: me,
            origin_addrs: addrs,
            near,
            demand: demand.sanitized(),
            want,
            descending: false,
            hops: 0,
        };
        let own_addrs = query.origin_addrs.clone();
        (id, self.route_placement(me, &own_addrs, query, parent))
    }

    /// Where a placement query goes next from this node, and whether this node answers it.
    pub fn route_placement(
        &mut self,
        me: NodeId,
        addrs: &[String],
        mut query: PlacementQuery,
        parent: Option<NodeId>,
    ) -> PlacementStep {
        let mut step = PlacementStep { forward: Vec::new(), answer: None };
        if query.hops >= MAX_PLACEMENT_HOPS || !query.is_valid() {
            self.counters.rejected += 1;
            return step;
        }
        query.hops += 1;
        if !query.descending {
            // Climb while something outside our subtree is nearer than anything inside it.
            let inside = self.subtree().nearest_region_for(query.near, &query.demand).map(|(_, d)| d);
            let outside = self.outside.as_ref().and_then(|g| g.nearest_region_for(query.near, &query.demand));
            let climb = match (inside, outside) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(i), Some((_, o))) => o < i,
            };
            if let (true, Some(parent)) = (climb, parent) {
                step.forward.push((parent, query));
                return step;
            }
            query.descending = true;
        }
        if self.own_free.fits(&query.demand) {
            step.answer = Some(PlacementCandidate {
                node: me,
                addrs: addrs.to_vec(),
                position: self.position,
                free: self.own_free,
                distance_km: query.near.distance_km(&self.position),
            });
        }
        let mut ranked: Vec<(NodeId, f64)> = self
            .children
            .iter()
            .filter_map(|(id, g)| g.nearest_fit_km(query.near, &query.demand).map(|d| (*id, d)))
            .collect();
        ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
        let fanout = PLACEMENT_FANOUT.min(usize::from(query.want));
        for (child, _) in ranked.into_iter().take(fanout) {
            step.forward.push((child, query.clone()));
        }
        step
    }

    /// An answer to one of our queries arrived.
    pub fn on_placement_answer(&mut self, query: u64, candidate: PlacementCandidate) {
        if !candidate.is_valid() {
            self.counters.rejected += 1;
            return;
        }
        if let Some(open) = self.open.iter_mut().find(|q| q.id == query)
            && !open.found.iter().any(|c| c.node == candidate.node)
        {
            open.found.push(candidate);
        }
    }

    /// The earliest deadline of an open query.
    pub fn next_deadline(&self) -> Option<Time> {
        self.open.iter().map(|q| q.deadline).min()
    }

    /// Queries whose collection time is over: their tags and candidates, nearest first, at most `want` of them.
    pub fn expire_placements(&mut self, now: Time) -> Vec<(u64, Vec<PlacementCandidate>)> {
        let mut done = Vec::new();
        self.open.retain_mut(|q| {
            if q.deadline > now {
                return true;
            }
            let mut found = std::mem::take(&mut q.found);
            found.sort_by(|a, b| a.distance_km.total_cmp(&b.distance_km).then(a.node.cmp(&b.node)));
            found.truncate(q.want);
            done.push((q.tag, found));
            false
        });
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> NodeId {
        NodeId::from_u64(n)
    }

    fn cap(cpu: f64) -> Capacity {
        Capacity::new(cpu, 4096.0, 100.0)
    }

    fn leaf(lat: f64, lon: f64, cpu: f64) -> SubtreeGrid {
        SubtreeGrid::Node { position: Position::new(lat, lon), free: cap(cpu) }
    }

    fn config() -> GridConfig {
        GridConfig { refresh_every: 5, ..GridConfig::default() }
    }

    #[test]
    fn reports_only_on_significant_change_or_refresh() {
        let mut g = Grids::new(config(), Position::new(48.0, 11.0), cap(4.0));
        let parent = id(1);
        assert!(matches!(g.report_grid(parent), Some(SubtreeGrid::Node { .. })), "first report carries the grid");
        assert!(g.report_grid(parent).is_none(), "unchanged");
        g.set_own_free(cap(3.9));
        assert!(g.report_grid(parent).is_none(), "2.5% is noise");
        g.set_own_free(cap(2.0));
        assert!(g.report_grid(parent).is_some(), "50% less is significant");
        let quiet = (0..10).filter(|_| g.report_grid(parent).is_some()).count();
        assert_eq!(quiet, 2, "refresh every 5 reports");
        assert!(g.report_grid(id(2)).is_some(), "a new parent gets the grid at once");
        g.set_own_free(Capacity::ZERO);
        assert!(g.report_grid(id(2)).is_some(), "saturation is always reported");
    }

    #[test]
    fn subtree_merges_children_and_self() {
        let mut g = Grids::new(config(), Position::new(48.0, 11.0), cap(1.0));
        g.on_child_grid(id(2), leaf(48.1, 11.1, 2.0));
        g.on_child_grid(id(3), leaf(52.5, 13.4, 4.0));
        g.on_child_grid(id(3), leaf(52.5, 13.4, 8.0));
        let total = g.subtree().total();
        assert_eq!(total.nodes, 3);
        assert_eq!(total.free.cpu, 11.0);
        assert!(matches!(g.report_grid(id(1)), Some(SubtreeGrid::Grid(_))));
        g.retain_children(|c| *c == id(2));
        assert_eq!(g.subtree().total().nodes, 2);
        g.on_child_grid(id(4), SubtreeGrid::Node { position: Position::new(f64::NAN, 0.0), free: cap(1.0) });
        assert_eq!(g.counters().rejected, 1);
        assert_eq!(g.subtree().total().nodes, 2);
    }

    #[test]
    fn held_grids_cover_the_tree_once() {
        // Parent P (48,11) with children A (us, 48.5,11.5) and B (40,2); P's outside holds one far node.
        let mut parent = Grids::new(config(), Position::new(48.0, 11.0), cap(1.0));
        parent.on_group(id(100), 0, &GroupGrids { version: 1, base: 0, members: vec![], outside: None });
        parent.on_child_grid(id(1), leaf(48.5, 11.5, 2.0));
        parent.on_child_grid(id(2), leaf(40.0, 2.0, 4.0));
        let group = parent.group_for_children(&[id(1), id(2)]).expect("first group is due");
        assert!(parent.group_for_children(&[id(1), id(2)]).is_none(), "unchanged group is not resent");
        assert!(parent.group_for_children(&[id(1)]).is_some(), "membership change resends");

        let mut me = Grids::new(config(), Position::new(48.5, 11.5), cap(2.0));
        me.on_group(id(1), 0, &group);
        let nodes: u64 = {
            let held = me.held();
            // subtree (me) + sibling B + outside (P)
            assert_eq!(held.len(), 3);
            held.iter().map(|g| g.node_count()).sum()
        };
        assert_eq!(nodes, 3);
    }

    #[test]
    fn group_refreshes_and_follows_outside_changes() {
        let mut g = Grids::new(config(), Position::new(0.0, 0.0), cap(1.0));
        g.on_child_grid(id(1), leaf(1.0, 1.0, 1.0));
        let kids = [id(1)];
        let first = g.group_for_children(&kids).expect("first group");
        assert_eq!(first.version, 1);
        let sent = (0..10).filter(|_| g.group_for_children(&kids).is_some()).count();
        assert_eq!(sent, 0, "nothing changed: no refresh");
        assert_eq!(g.current_group().map(|g| g.version), Some(1), "the children keep holding version 1");
        g.on_child_grid(id(1), leaf(1.0, 1.0, 1.02));
        let sent: Vec<u64> = (0..10).filter_map(|_| g.group_for_children(&kids)).map(|g| g.version).collect();
        assert_eq!(sent, [2], "a change too small for its own group goes out with the next refresh, once");
        g.set_own_free(Capacity::ZERO);
        assert!(g.group_for_children(&kids).is_some(), "our own saturation changes the children's outside grid");
        assert!(g.group_for_children(&[]).is_none());
    }

    #[test]
    fn children_get_what_changed_since_the_version_they_hold() {
        let mut parent = Grids::new(config(), Position::new(0.0, 0.0), cap(1.0));
        let kids = [id(1), id(2), id(3)];
        for (kid, lat) in kids.iter().zip([1.0, 2.0, 3.0]) {
            parent.on_child_grid(*kid, leaf(lat, 1.0, 4.0));
        }
        let v1 = parent.group_for_children(&kids).expect("first group");
        let mut child = Grids::new(config(), Position::new(1.0, 1.0), cap(4.0));
        assert!(child.on_group(id(1), 0, &v1));

        // Child 3's capacity halves: version 2 differs from version 1 in child 3's grid only.
        parent.on_child_grid(id(3), leaf(3.0, 1.0, 2.0));
        let v2 = parent.group_for_children(&kids).expect("a significant change");
        let delta = parent.group_for_child(1).expect("a child holding version 1 needs version 2");
        assert_eq!((delta.version, delta.base), (2, 1));
        assert_eq!(delta.members, vec![(id(3), leaf(3.0, 1.0, 2.0))]);
        assert!(delta.outside.is_none(), "the outside grid did not change");
        assert!(Arc::ptr_eq(&delta, &parent.group_for_child(1).expect("again")), "one value for all at version 1");
        assert!(parent.group_for_child(2).is_none(), "current");
        assert_eq!(parent.group_for_child(0).map(|g| g.base), Some(0), "nothing held: the whole group");
        assert_eq!(parent.group_for_child(7).map(|g| g.base), Some(0), "a version we never had: the whole group");

        // The difference gives the child what the whole group gives.
        let mut from_whole = Grids::new(config(), Position::new(1.0, 1.0), cap(4.0));
        assert!(from_whole.on_group(id(1), 0, &v2));
        assert!(child.on_group(id(1), 1, &delta));
        assert_eq!(child.held(), from_whole.held());
        assert!(child.on_group(id(1), 2, &delta), "held already");
        assert!(!child.on_group(id(1), 2, &v1), "an older version is not taken back");
        let mut fresh = Grids::new(config(), Position::new(1.0, 1.0), cap(4.0));
        assert!(!fresh.on_group(id(1), 0, &delta), "a difference from a version not held is of no use");

        // Version 3 changes child 2; a child at version 1 gets both changes, one at version 2 only the last.
        parent.on_child_grid(id(2), leaf(2.0, 1.0, 1.0));
        parent.group_for_children(&kids).expect("a significant change");
        let ids = |g: Arc<GroupGrids>| g.members.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!(parent.group_for_child(1).map(ids), Some(vec![id(2), id(3)]));
        assert_eq!(parent.group_for_child(2).map(ids), Some(vec![id(2)]));

        // A new child changes the group's members: only the whole group will do.
        parent.on_child_grid(id(4), leaf(4.0, 1.0, 1.0));
        parent.group_for_children(&[id(1), id(2), id(3), id(4)]).expect("new member");
        assert_eq!(parent.group_for_child(3).map(|g| g.base), Some(0));
    }

    #[test]
    fn group_follows_significant_child_changes_only() {
        let mut g = Grids::new(config(), Position::new(0.0, 0.0), cap(1.0));
        let kids = [id(1)];
        g.on_child_grid(id(1), leaf(1.0, 1.0, 4.0));
        assert!(g.group_for_children(&kids).is_some());
        g.on_child_grid(id(1), leaf(1.0, 1.0, 3.8));
        assert!(g.group_for_children(&kids).is_none(), "5% is noise");
        g.on_child_grid(id(1), leaf(1.0, 1.0, 3.5));
        let group = g.group_for_children(&kids).expect("12.5% below what the children were sent: drift adds up");
        assert_eq!(group.members, vec![(id(1), leaf(1.0, 1.0, 3.5))]);
        g.on_child_grid(id(2), leaf(2.0, 2.0, 1.0));
        assert!(g.group_for_children(&[id(1), id(2)]).is_some(), "a new child's grid");
    }

    #[test]
    fn merges_are_redone_only_when_an_input_changed() {
        let me = id(1);
        let at_once = GridConfig { outside_every: 0, ..config() };
        let mut g = Grids::new(at_once, Position::new(0.0, 0.0), cap(1.0));
        g.on_child_grid(id(2), leaf(1.0, 1.0, 4.0));
        let subtree = Arc::clone(g.subtree_shared());
        let outside = g.outside_for_children();
        g.on_child_grid(id(2), leaf(1.0, 1.0, 4.0));
        assert!(Arc::ptr_eq(&subtree, g.subtree_shared()), "a refresh of the same grid");
        let group = GroupGrids {
            version: 1,
            base: 0,
            members: vec![(me, leaf(0.0, 0.0, 1.0)), (id(3), leaf(5.0, 5.0, 2.0))],
            outside: None,
        };
        g.on_group(me, 0, &group);
        assert!(Arc::ptr_eq(&subtree, g.subtree_shared()), "siblings are not in our subtree");
        assert!(!Arc::ptr_eq(&outside, &g.outside_for_children()), "but in our children's outside grid");
        let outside = g.outside_for_children();
        g.on_group(me, 0, &group.clone());
        assert!(Arc::ptr_eq(&outside, &g.outside_for_children()), "the same group again");
        g.on_child_grid(id(2), leaf(1.0, 1.0, 3.0));
        assert!(Arc::ptr_eq(&outside, &g.outside_for_children()), "a child is not outside its siblings' subtrees");
        assert!(!Arc::ptr_eq(&subtree, g.subtree_shared()));
        assert_eq!(g.subtree().total().free.cpu, 4.0);
        g.set_own_free(cap(2.0));
        assert!(!Arc::ptr_eq(&outside, &g.outside_for_children()), "our own capacity is in both");
        assert_eq!(g.subtree().total().free.cpu, 5.0);
    }

    #[test]
    fn a_busy_outside_is_rebuilt_for_the_children_at_most_every_outside_every_rounds() {
        let me = id(1);
        let mut g = Grids::new(GridConfig { outside_every: 3, ..config() }, Position::new(0.0, 0.0), cap(1.0));
        g.on_child_grid(id(2), leaf(1.0, 1.0, 4.0));
        let kids = [id(2)];
        let group_from_parent = |version: u64, outside_cpu: f64| GroupGrids {
            version,
            base: 0,
            members: vec![(me, leaf(0.0, 0.0, 1.0))],
            outside: Some(Arc::new(leaf(20.0, 20.0, outside_cpu).to_grid(DEFAULT_GRID_SIZE))),
        };
        let outside_sent = |group: Option<Arc<GroupGrids>>| group.and_then(|g| g.outside.clone());
        g.on_group(me, 0, &group_from_parent(1, 8.0));
        let first = outside_sent(g.group_for_children(&kids)).expect("the first group carries the outside grid");
        // The parent's outside grid doubles every round: only every third round builds (and sends) a new one.
        let mut built = Vec::new();
        for round in 1..=6u32 {
            g.on_group(me, 0, &group_from_parent(u64::from(round) + 1, 8.0 * f64::from(1 << round)));
            if let Some(outside) = outside_sent(g.group_for_children(&kids)) {
                assert!(!Arc::ptr_eq(&outside, &first));
                built.push(round);
            }
        }
        assert_eq!(built, [3, 6]);
        // After a quiet spell, the next change goes out at once.
        for _ in 0..3 {
            assert!(g.group_for_children(&kids).is_none(), "nothing changed");
        }
        g.on_group(me, 0, &group_from_parent(9, 1.0));
        assert!(outside_sent(g.group_for_children(&kids)).is_some());
        // Losing the parent is not news to pace: the children's outside grid is rebuilt at the next round.
        g.clear_parent_grids();
        let alone = outside_sent(g.group_for_children(&kids)).expect("what lies outside changed");
        assert_eq!(alone.total().free.cpu, 1.0, "only this node lies outside its children's group now");
    }

    #[test]
    fn one_group_is_shared_by_all_children() {
        let mut g = Grids::new(config(), Position::new(0.0, 0.0), cap(1.0));
        g.on_child_grid(id(2), leaf(1.0, 1.0, 4.0));
        let mut coordinator = Grids::new(config(), Position::new(2.0, 2.0), cap(1.0));
        coordinator.on_child_grid(id(9), leaf(2.5, 2.5, 1.0));
        let Some(SubtreeGrid::Grid(sent)) = coordinator.report_grid(id(1)) else { panic!("a coordinator's grid") };
        g.on_child_grid(id(3), SubtreeGrid::Grid(Arc::clone(&sent)));
        let group = g.group_for_children(&[id(2), id(3)]).expect("first group");
        let Some((_, SubtreeGrid::Grid(carried))) = group.members.iter().find(|(c, _)| *c == id(3)) else {
            panic!("the coordinator child's grid is in the group")
        };
        assert!(Arc::ptr_eq(&sent, carried), "held and forwarded without a copy");
    }

    #[test]
    fn placement_climbs_then_descends_to_the_nearest_fit() {
        // Leaf L near Munich has no room; its outside grid says Vienna has room: the query climbs to the parent.
        let munich = Position::new(48.14, 11.58);
        let demand = Capacity::new(2.0, 512.0, 0.0);
        let mut l = Grids::new(config(), munich, cap(0.5));
        let outside = CapacityGrid::merge(&[GridInput::Node { position: Position::new(48.2, 16.37), free: cap(4.0) }]);
        l.on_group(id(7), 0, &GroupGrids { version: 1, base: 0, members: vec![], outside: Some(Arc::new(outside)) });
        let (qid, step) = l.start_placement(Time::ZERO, 42, id(7), vec!["a".into()], munich, demand, 2, Some(id(1)));
        assert!(step.answer.is_none());
        assert_eq!(step.forward.len(), 1);
        let (to, query) = step.forward[0].clone();
        assert_eq!(to, id(1));

        // The parent (Salzburg, full) has children Vienna (room), Berlin (room), Graz (full).
        let mut p = Grids::new(config(), Position::new(47.8, 13.04), cap(0.0));
        p.on_child_grid(id(7), leaf(48.14, 11.58, 0.5));
        p.on_child_grid(id(2), leaf(48.2, 16.37, 4.0));
        p.on_child_grid(id(3), leaf(52.52, 13.4, 8.0));
        p.on_child_grid(id(4), leaf(47.07, 15.44, 0.0));
        let step = p.route_placement(id(1), &[], query, None);
        assert!(step.answer.is_none(), "the parent itself is full");
        let targets: Vec<NodeId> = step.forward.iter().map(|(t, _)| *t).collect();
        assert_eq!(targets, [id(2), id(3)], "nearest fitting children first, full ones skipped");

        // Vienna and Berlin answer; the origin sorts by distance and keeps `want`.
        for (t, q) in step.forward {
            let pos = if t == id(2) { Position::new(48.2, 16.37) } else { Position::new(52.52, 13.4) };
            let mut child = Grids::new(config(), pos, cap(4.0));
            let answer = child.route_placement(t, &[], q, Some(id(1))).answer.expect("fits");
            l.on_placement_answer(qid, answer);
        }
        assert_eq!(l.next_deadline(), Some(Time::from_secs(1)));
        assert!(l.expire_placements(Time::from_millis(500)).is_empty());
        let done = l.expire_placements(Time::from_secs(1));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, 42, "the caller's tag comes back");
        let nodes: Vec<NodeId> = done[0].1.iter().map(|c| c.node).collect();
        assert_eq!(nodes, [id(2), id(3)]);
        assert!(l.next_deadline().is_none());
    }

    #[test]
    fn bad_queries_and_answers_are_dropped() {
        let mut g = Grids::new(config(), Position::new(0.0, 0.0), cap(1.0));
        let query = PlacementQuery {
            id: 1,
            origin: id(9),
            origin_addrs: vec![],
            near: Position::new(f64::NAN, 0.0),
            demand: Capacity::ZERO,
            want: 1,
            descending: true,
            hops: 0,
        };
        let step = g.route_placement(id(1), &[], query, None);
        assert!(step.forward.is_empty() && step.answer.is_none());
        let bad = PlacementCandidate {
            node: id(2),
            addrs: vec![],
            position: Position::new(0.0, 0.0),
            free: cap(1.0),
            distance_km: f64::INFINITY,
        };
        g.on_placement_answer(1, bad);
        assert_eq!(g.counters().rejected, 2);
    }
}
