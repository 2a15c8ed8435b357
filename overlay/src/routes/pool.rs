//! Subnet grants: a pool of IPv4 address blocks from which a coordinator grants aligned subnets to its children
//! (a /26 to a machine, a larger block to a child coordinator for its subtree).
//!
//! The root's pool owns the platform range minus the ServiceIP range; a coordinator's pool owns the blocks its
//! parent granted it. Every grant carries a lease that heartbeats renew ([`AddressPool::renew`]) and that
//! [`AddressPool::expire`] reclaims. A successor coordinator takes its group's pool over with
//! [`AddressPool::inherit`]; after a partition heals, [`AddressPool::absorb`] merges the other side's grants and
//! renumbers the younger of any two that overlap ([`resolve_overlaps`]).
//!
//! Free space is kept as a buddy allocator: the maximal aligned blocks not granted, owned and not excluded, one
//! ordered set per prefix length. Allocation takes the smallest free block that fits (lowest address first) and
//! splits it; freeing merges a block with its buddy as long as the buddy is free too.
//!
//! Grants travel as [`GrantInfo`] (age and remaining lease, no timestamps) because nodes do not share a clock:
//! `Time` is measured from each driver's own epoch.

use crate::{NodeId, Time};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The platform range: machine subnets and the ServiceIP range live in it.
pub const PLATFORM_RANGE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 16, 0, 0), 12);
/// ServiceIPs and InstanceIPs; never granted as machine subnets.
pub const SERVICE_IP_RANGE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 30, 0, 0), 16);
/// A machine's subnet: gateway `.1`, 62 instances.
pub const DEFAULT_MACHINE_PREFIX: u8 = 26;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("prefix length /{0} is not between /0 and /32")]
    BadPrefix(u8),
    #[error("no free /{0} block left in the pool")]
    Exhausted(u8),
    #[error("{block} overlaps the grant {held} held by {holder}")]
    Taken { block: Ipv4Net, held: Ipv4Net, holder: NodeId },
    #[error("{0} is not inside the blocks this pool owns")]
    NotOwned(Ipv4Net),
    #[error("{0} overlaps an excluded range")]
    Excluded(Ipv4Net),
    #[error("{0} is not granted")]
    UnknownGrant(Ipv4Net),
    #[error("{0} overlaps a block this pool already owns")]
    AlreadyOwned(Ipv4Net),
    #[error("grants {0} and {1} overlap")]
    ConflictingGrants(Ipv4Net, Ipv4Net),
}

/// A live grant in this pool. Its age is kept as "age when learned" plus local time since, so grants inherited
/// from another machine keep their seniority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub block: Ipv4Net,
    pub holder: NodeId,
    /// Local time at which this pool granted or learned the grant, or last handed or moved it (see
    /// [`Grant::held_for`]).
    pub since: Time,
    /// The grant's age at `since` (zero for grants made here).
    pub age_at_since: Duration,
    pub expires_at: Time,
}

impl Grant {
    pub fn age(&self, now: Time) -> Duration {
        self.age_at_since.saturating_add(now.saturating_sub(self.since))
    }

    /// How long its current holder has had it here, as it is: a grant handed to another holder, or moved with its
    /// block, is as old as it was but new to the holder (a sync the holder sent before it knew may be on its way).
    pub fn held_for(&self, now: Time) -> Duration {
        now.saturating_sub(self.since)
    }

    /// The grant as new to its holder at `now`, keeping its age.
    fn restamped(self, now: Time) -> Grant {
        Grant { since: now, age_at_since: self.age(now), ..self }
    }

    /// The grant handed to `holder` at `now` with a lease from then, keeping its age.
    fn handed_to(self, holder: NodeId, now: Time, lease: Duration) -> Grant {
        Grant { holder, expires_at: self.expires_at.max(now + lease), ..self.restamped(now) }
    }

    pub fn info(&self, now: Time) -> GrantInfo {
        GrantInfo {
            block: self.block,
            holder: self.holder,
            age: self.age(now),
            remaining: self.expires_at.saturating_sub(now),
        }
    }
}

/// A grant as it travels between nodes: clock-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GrantInfo {
    pub block: Ipv4Net,
    pub holder: NodeId,
    /// Time since the grant was made.
    pub age: Duration,
    /// Lease left.
    pub remaining: Duration,
}

impl GrantInfo {
    /// Older grants are senior; ties go to the smaller holder, then the smaller block, so every node that
    /// compares the same two grants picks the same one.
    fn seniority_key(&self) -> (std::cmp::Reverse<Duration>, NodeId, Ipv4Net) {
        (std::cmp::Reverse(self.age), self.holder, self.block)
    }
}

/// Everything a successor needs to take a pool over, or a restarted node to restore it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PoolState {
    pub owned: Vec<Ipv4Net>,
    pub excluded: Vec<Ipv4Net>,
    pub grants: Vec<GrantInfo>,
}

/// The outcome of [`resolve_overlaps`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OverlapResolution {
    /// Grants that stay, pairwise disjoint, sorted by block.
    pub keep: Vec<GrantInfo>,
    /// Grants that overlapped a senior one and must be renumbered, sorted by block.
    pub renumber: Vec<GrantInfo>,
}

/// A holder whose grant was taken away by an overlap resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renumbered {
    pub holder: NodeId,
    pub old: Ipv4Net,
    /// Its replacement (same prefix length), or `None` when the pool had no room.
    pub new: Option<Ipv4Net>,
}

/// Keeps the senior of any overlapping grants (older first, then [`GrantInfo`]'s tie-break) and lists the rest.
///
/// The input may hold grants from both sides of a healed partition; an identical (block, holder) pair seen twice
/// counts once, with the larger age and remaining lease. The result does not depend on the input order.
pub fn resolve_overlaps(grants: impl IntoIterator<Item = GrantInfo>) -> OverlapResolution {
    let mut unique: BTreeMap<(Ipv4Net, NodeId), GrantInfo> = BTreeMap::new();
    for g in grants {
        let g = GrantInfo { block: g.block.trunc(), ..g };
        unique
            .entry((g.block, g.holder))
            .and_modify(|seen| {
                seen.age = seen.age.max(g.age);
                seen.remaining = seen.remaining.max(g.remaining);
            })
            .or_insert(g);
    }
    let mut by_seniority: Vec<GrantInfo> = unique.into_values().collect();
    by_seniority.sort_by_key(GrantInfo::seniority_key);
    let mut kept = BlockSet::default();
    let mut resolution = OverlapResolution::default();
    for g in by_seniority {
        if kept.overlapping(g.block).is_none() {
            kept.insert(g.block);
            resolution.keep.push(g);
        } else {
            resolution.renumber.push(g);
        }
    }
    resolution.keep.sort_by_key(|g| (g.block, g.holder));
    resolution.renumber.sort_by_key(|g| (g.block, g.holder));
    resolution
}

fn span(block: Ipv4Net) -> (u32, u32) {
    (u32::from(block.network()), u32::from(block.broadcast()))
}

fn block_at(start: u32, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::from(start), prefix)
}

/// Aligned blocks overlap exactly when one contains the other.
fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b) || b.contains(&a)
}

/// Addresses in a block of prefix length `prefix`.
pub fn block_size(prefix: u8) -> u64 {
    1u64 << (32 - u32::from(prefix))
}

/// Disjoint blocks keyed by first address, for "which of these overlaps that block" in O(log n).
#[derive(Debug, Clone, Default)]
struct BlockSet(BTreeMap<u32, Ipv4Net>);

impl BlockSet {
    fn insert(&mut self, block: Ipv4Net) {
        self.0.insert(span(block).0, block);
    }

    fn from_blocks(blocks: &[Ipv4Net]) -> Self {
        BlockSet(blocks.iter().map(|&b| (span(b).0, b)).collect())
    }

    /// Some block of the set overlapping `block` (aligned blocks either nest or are disjoint).
    fn overlapping(&self, block: Ipv4Net) -> Option<Ipv4Net> {
        let (start, end) = span(block);
        if let Some((_, &below)) = self.0.range(..=start).next_back()
            && span(below).1 >= start
        {
            return Some(below);
        }
        self.0.range(start..=end).next().map(|(_, &inside)| inside)
    }
}

/// A coordinator's address blocks and the grants it made from them.
#[derive(Debug, Clone)]
pub struct AddressPool {
    /// Disjoint, aggregated.
    owned: Vec<Ipv4Net>,
    /// `owned` for overlap lookups: a coordinator near the root of a large tree owns many blocks.
    owned_index: BlockSet,
    /// Disjoint, aggregated; never granted even where owned.
    excluded: Vec<Ipv4Net>,
    lease: Duration,
    grants: BTreeMap<Ipv4Net, Grant>,
    /// The blocks of each holder, sorted: renewals run every heartbeat for every child, so they must not scan all
    /// grants. A sorted vector, not a set: a holder's blocks are walked at every renewal and sync, and walking a
    /// tree's nodes was a cache miss each.
    by_holder: BTreeMap<NodeId, Vec<Ipv4Net>>,
    /// `free[p]` holds the first addresses of the free /p blocks.
    free: Vec<BTreeSet<u32>>,
    /// Changes whenever the owned blocks or the grants change, and differs between pools (see [`Self::version`]).
    version: u64,
}

/// Pool versions are drawn from one counter, so a pool built to replace another never repeats its version.
static POOL_VERSIONS: AtomicU64 = AtomicU64::new(1);

fn next_pool_version() -> u64 {
    POOL_VERSIONS.fetch_add(1, Ordering::Relaxed)
}

impl AddressPool {
    /// A pool owning `owned` minus `excluded`; grants last `lease` unless renewed. Host bits are cleared and
    /// overlapping blocks merged.
    pub fn new(
        owned: impl IntoIterator<Item = Ipv4Net>,
        excluded: impl IntoIterator<Item = Ipv4Net>,
        lease: Duration,
    ) -> Self {
        let owned = Ipv4Net::aggregate(&owned.into_iter().map(|n| n.trunc()).collect());
        let excluded = Ipv4Net::aggregate(&excluded.into_iter().map(|n| n.trunc()).collect());
        let mut pool = AddressPool {
            owned_index: BlockSet::from_blocks(&owned),
            owned,
            excluded,
            lease,
            grants: BTreeMap::new(),
            by_holder: BTreeMap::new(),
            free: vec![],
            version: next_pool_version(),
        };
        pool.rebuild_free();
        pool
    }

    /// The root's pool: the platform range minus the ServiceIP range.
    pub fn platform_root(platform: Ipv4Net, lease: Duration) -> Self {
        Self::new([platform], [SERVICE_IP_RANGE], lease)
    }

    /// Restores a pool exactly (e.g. after a restart); fails when the state is inconsistent.
    pub fn from_state(state: &PoolState, lease: Duration, now: Time) -> Result<Self, PoolError> {
        let mut pool = Self::new(state.owned.iter().copied(), state.excluded.iter().copied(), lease);
        for g in &state.grants {
            pool.claim(g.block, g.holder, now)?;
            let grant = pool.grants.get_mut(&g.block.trunc()).expect("just claimed");
            grant.age_at_since = g.age;
            grant.expires_at = now + g.remaining.min(lease);
        }
        Ok(pool)
    }

    pub fn state(&self, now: Time) -> PoolState {
        PoolState {
            owned: self.owned.clone(),
            excluded: self.excluded.clone(),
            grants: self.grants.values().map(|g| g.info(now)).collect(),
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Equal versions mean the same owned blocks and grants (lease times aside): a caller can skip checks that
    /// already ran against this version.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn owned(&self) -> &[Ipv4Net] {
        &self.owned
    }

    pub fn excluded(&self) -> &[Ipv4Net] {
        &self.excluded
    }

    /// Adds a block (e.g. a further grant from the parent when this pool ran out).
    pub fn add_owned(&mut self, block: Ipv4Net) -> Result<(), PoolError> {
        let block = block.trunc();
        if self.owned_index.overlapping(block).is_some() {
            return Err(PoolError::AlreadyOwned(block));
        }
        self.set_owned([&self.owned[..], &[block]].concat());
        // Only the new block's space becomes free (minus exclusions and any grant already made inside it), so a
        // pool of many blocks is not carved again from scratch for each one.
        let mut holes: Vec<Ipv4Net> = self.excluded.iter().copied().filter(|e| overlap(*e, block)).collect();
        holes.extend(self.grants_overlapping(block).map(|g| g.block));
        for piece in carve(&[block], &holes) {
            self.release_block(piece);
        }
        Ok(())
    }

    /// Gives owned blocks back (e.g. to the parent): each must lie in an owned block and hold no grant.
    pub fn remove_owned(&mut self, blocks: &[Ipv4Net]) -> Result<(), PoolError> {
        let blocks: Vec<Ipv4Net> = blocks.iter().map(|b| b.trunc()).collect();
        for &b in &blocks {
            if !self.inside_owned(b) {
                return Err(PoolError::NotOwned(b));
            }
            if let Some(g) = self.grants_overlapping(b).next() {
                return Err(PoolError::Taken { block: b, held: g.block, holder: g.holder });
            }
        }
        let owned = carve(&self.owned, &blocks);
        self.set_owned(owned);
        self.rebuild_free();
        Ok(())
    }

    /// Whether `block` is free as a whole: owned, not excluded, no grant inside.
    pub fn is_free(&self, block: Ipv4Net) -> bool {
        let block = block.trunc();
        self.grantable(block) && self.grants_overlapping(block).next().is_none()
    }

    fn inside_owned(&self, block: Ipv4Net) -> bool {
        self.owned_index.overlapping(block).is_some_and(|o| o.contains(&block))
    }

    /// Whether some owned block overlaps `block`.
    pub fn overlaps_owned(&self, block: Ipv4Net) -> bool {
        self.owned_index.overlapping(block.trunc()).is_some()
    }

    fn set_owned(&mut self, owned: Vec<Ipv4Net>) {
        self.version = next_pool_version();
        self.owned = Ipv4Net::aggregate(&owned);
        self.owned_index = BlockSet::from_blocks(&self.owned);
    }

    /// The grants overlapping `block`: one containing it, or those inside it (grants are disjoint).
    fn grants_overlapping(&self, block: Ipv4Net) -> impl Iterator<Item = &Grant> {
        let (start, end) = span(block);
        let containing = self
            .grants
            .range(..=block_at(start, 32))
            .next_back()
            .map(|(_, g)| g)
            .filter(|g| g.block.prefix_len() < block.prefix_len() && g.block.contains(&block));
        let inside = self.grants.range(block_at(start, 0)..=block_at(end, 32)).map(|(_, g)| g);
        containing.into_iter().chain(inside.filter(move |g| block.contains(&g.block)))
    }

    /// Grants the smallest free block that fits a /`prefix` (lowest address first) to `holder`.
    pub fn alloc(&mut self, holder: NodeId, prefix: u8, now: Time) -> Result<Ipv4Net, PoolError> {
        if prefix > 32 {
            return Err(PoolError::BadPrefix(prefix));
        }
        let (found_prefix, start) = (0..=prefix)
            .rev()
            .find_map(|p| self.free[usize::from(p)].first().map(|&s| (p, s)))
            .ok_or(PoolError::Exhausted(prefix))?;
        self.free[usize::from(found_prefix)].remove(&start);
        // Split down to the requested size, keeping the lower half each time and freeing the upper.
        for p in found_prefix + 1..=prefix {
            self.free[usize::from(p)].insert(start + block_size(p) as u32);
        }
        let block = block_at(start, prefix);
        self.insert_grant(block, holder, now);
        Ok(block)
    }

    /// Grants exactly `block` to `holder` (a restored or inherited grant, or one a deployment asked for).
    pub fn claim(&mut self, block: Ipv4Net, holder: NodeId, now: Time) -> Result<(), PoolError> {
        let block = block.trunc();
        let (start, _) = span(block);
        let containing = (0..=block.prefix_len()).rev().find_map(|p| {
            let candidate = block_at(start, p).trunc();
            self.free[usize::from(p)].contains(&span(candidate).0).then_some(candidate)
        });
        let Some(mut free_block) = containing else {
            return Err(self.why_not_free(block));
        };
        self.free[usize::from(free_block.prefix_len())].remove(&span(free_block).0);
        // Walk down towards `block`, freeing the half that does not contain it.
        while free_block.prefix_len() < block.prefix_len() {
            let halves = free_block.subnets(free_block.prefix_len() + 1).expect("prefix below 32");
            for half in halves {
                if half.contains(&block) {
                    free_block = half;
                } else {
                    self.free[usize::from(half.prefix_len())].insert(span(half).0);
                }
            }
        }
        self.insert_grant(block, holder, now);
        Ok(())
    }

    /// Claims `block` for `holder`, who may already hold parts of it, or a block containing it, here: a holder
    /// that moved brings blocks split or merged elsewhere. Its grants inside `block` become one grant of `block`;
    /// a grant of its that contains `block` already covers it. Blocks of other holders make it fail as `claim`.
    pub fn claim_merging(&mut self, block: Ipv4Net, holder: NodeId, now: Time) -> Result<(), PoolError> {
        let block = block.trunc();
        let overlapping: Vec<(Ipv4Net, NodeId)> = self.grants_overlapping(block).map(|g| (g.block, g.holder)).collect();
        if overlapping.is_empty() || overlapping.iter().any(|(_, h)| *h != holder) {
            return self.claim(block, holder, now);
        }
        if overlapping.iter().any(|(b, _)| b.prefix_len() <= block.prefix_len()) {
            return Ok(());
        }
        for (b, _) in overlapping {
            self.free(b)?;
        }
        self.claim(block, holder, now)
    }

    fn why_not_free(&self, block: Ipv4Net) -> PoolError {
        if !self.overlaps_owned(block) && !self.excluded.iter().any(|e| overlap(*e, block)) {
            // Outside the pool: no grant can be there either (grants lie inside owned blocks).
            return PoolError::NotOwned(block);
        }
        if let Some(g) = self.grants_overlapping(block).next() {
            return PoolError::Taken { block, held: g.block, holder: g.holder };
        }
        if self.excluded.iter().any(|e| overlap(*e, block)) {
            return PoolError::Excluded(block);
        }
        PoolError::NotOwned(block)
    }

    fn insert_grant(&mut self, block: Ipv4Net, holder: NodeId, now: Time) {
        let grant = Grant { block, holder, since: now, age_at_since: Duration::ZERO, expires_at: now + self.lease };
        self.put_grant(grant);
    }

    /// Records a grant in both indexes (replacing any grant of the same block).
    fn put_grant(&mut self, grant: Grant) {
        self.version = next_pool_version();
        let (block, holder) = (grant.block, grant.holder);
        if let Some(old) = self.grants.insert(block, grant) {
            self.unindex(old.holder, old.block);
        }
        let blocks = self.by_holder.entry(holder).or_default();
        if let Err(at) = blocks.binary_search(&block) {
            blocks.insert(at, block);
        }
    }

    /// Removes a grant from both indexes.
    fn take_grant(&mut self, block: Ipv4Net) -> Option<Grant> {
        let grant = self.grants.remove(&block)?;
        self.version = next_pool_version();
        self.unindex(grant.holder, grant.block);
        Some(grant)
    }

    fn unindex(&mut self, holder: NodeId, block: Ipv4Net) {
        if let Some(blocks) = self.by_holder.get_mut(&holder) {
            if let Ok(at) = blocks.binary_search(&block) {
                blocks.remove(at);
            }
            if blocks.is_empty() {
                self.by_holder.remove(&holder);
            }
        }
    }

    fn blocks_of(&self, holder: NodeId) -> Vec<Ipv4Net> {
        self.by_holder.get(&holder).cloned().unwrap_or_default()
    }

    /// Returns a grant's block to the free space.
    pub fn free(&mut self, block: Ipv4Net) -> Result<Grant, PoolError> {
        let grant = self.take_grant(block.trunc()).ok_or(PoolError::UnknownGrant(block))?;
        self.release_block(grant.block);
        Ok(grant)
    }

    fn release_block(&mut self, block: Ipv4Net) {
        let (mut start, _) = span(block);
        let mut prefix = block.prefix_len();
        // Merge with the buddy while it is free as a whole; both halves are then owned and not excluded.
        while prefix > 0 {
            let buddy = start ^ (block_size(prefix) as u32);
            if !self.free[usize::from(prefix)].remove(&buddy) {
                break;
            }
            start = start.min(buddy);
            prefix -= 1;
        }
        self.free[usize::from(prefix)].insert(start);
    }

    /// Frees every grant of `holder` (it left or was declared dead); returns them sorted by block.
    pub fn release_holder(&mut self, holder: NodeId) -> Vec<Grant> {
        self.blocks_of(holder).into_iter().map(|b| self.free(b).expect("indexed")).collect()
    }

    /// Whether any block is granted (to a child, or at the root to itself).
    pub fn has_grants(&self) -> bool {
        !self.grants.is_empty()
    }

    /// Extends every lease of `holder` to `now + lease`; returns how many it holds.
    pub fn renew(&mut self, holder: NodeId, now: Time) -> usize {
        let Some(blocks) = self.by_holder.get(&holder) else { return 0 };
        for block in blocks {
            let g = self.grants.get_mut(block).expect("indexed grants exist");
            g.expires_at = g.expires_at.max(now + self.lease);
        }
        blocks.len()
    }

    /// Hands every grant of `from` to `to` with a fresh lease (a successor coordinator took `from`'s place, so
    /// the block `from` held for the group is now `to`'s); returns how many moved.
    pub fn transfer(&mut self, from: NodeId, to: NodeId, now: Time) -> usize {
        let blocks = self.blocks_of(from);
        for &block in &blocks {
            let g = self.take_grant(block).expect("indexed grants exist");
            self.put_grant(g.handed_to(to, now, self.lease));
        }
        blocks.len()
    }

    /// Hands one grant to another holder with a fresh lease (its holder moved under `to`).
    pub fn reassign(&mut self, block: Ipv4Net, to: NodeId, now: Time) -> bool {
        let Some(g) = self.take_grant(block.trunc()) else { return false };
        self.put_grant(g.handed_to(to, now, self.lease));
        true
    }

    /// Hands `block` to `to` (`to` moved away from `from`, which gives the block back for it). `block` must lie in a
    /// grant of `from`, or be made of grants of `from` (it merged them); the rest of a grant containing it stays
    /// with `from` as the aligned pieces around `block`. The pieces and the handed block keep the grant's age; the
    /// handed block gets a lease from `now`.
    pub fn split_off(&mut self, block: Ipv4Net, from: NodeId, to: NodeId, now: Time) -> Result<(), PoolError> {
        let block = block.trunc();
        let overlapping: Vec<Grant> = self.grants_overlapping(block).cloned().collect();
        if let Some(other) = overlapping.iter().find(|g| g.holder != from) {
            return Err(PoolError::Taken { block, held: other.block, holder: other.holder });
        }
        let covered: u64 =
            overlapping.iter().map(|g| block_size(g.block.prefix_len()).min(block_size(block.prefix_len()))).sum();
        let Some(oldest) = overlapping.iter().max_by_key(|g| g.age(now)).cloned() else {
            return Err(PoolError::UnknownGrant(block));
        };
        if covered < block_size(block.prefix_len()) {
            return Err(PoolError::NotOwned(block));
        }
        for g in &overlapping {
            self.take_grant(g.block);
            for piece in carve(&[g.block], &[block]) {
                self.put_grant(Grant { block: piece, ..g.clone() });
            }
        }
        self.put_grant(Grant { block, ..oldest }.handed_to(to, now, self.lease));
        Ok(())
    }

    /// Reclaims every grant whose lease ran out at or before `now`; returns them sorted by block.
    pub fn expire(&mut self, now: Time) -> Vec<Grant> {
        let expired: Vec<Ipv4Net> = self.grants.values().filter(|g| g.expires_at <= now).map(|g| g.block).collect();
        expired.into_iter().map(|b| self.free(b).expect("listed above")).collect()
    }

    /// When the next lease runs out, for the caller's timer.
    pub fn next_expiry(&self) -> Option<Time> {
        self.grants.values().map(|g| g.expires_at).min()
    }

    /// Grants sorted by block.
    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.grants.values()
    }

    pub fn grant(&self, block: Ipv4Net) -> Option<&Grant> {
        self.grants.get(&block.trunc())
    }

    pub fn grants_of(&self, holder: NodeId) -> impl Iterator<Item = &Grant> {
        self.by_holder.get(&holder).into_iter().flatten().map(|b| &self.grants[b])
    }

    /// Free blocks, sorted by address.
    pub fn free_blocks(&self) -> Vec<Ipv4Net> {
        let mut blocks: Vec<Ipv4Net> =
            (0..=32u8).flat_map(|p| self.free[usize::from(p)].iter().map(move |&s| block_at(s, p))).collect();
        blocks.sort();
        blocks
    }

    /// Prefix length of the largest free block (`None`: nothing is free).
    pub fn largest_free_prefix(&self) -> Option<u8> {
        (0..=32u8).find(|&p| !self.free[usize::from(p)].is_empty())
    }

    /// Number of free addresses.
    pub fn free_addresses(&self) -> u64 {
        (0..=32u8).map(|p| self.free[usize::from(p)].len() as u64 * block_size(p)).sum()
    }

    /// Number of grantable addresses (owned and not excluded), free or granted.
    pub fn usable_addresses(&self) -> u64 {
        self.free_addresses() + self.grants.keys().map(|b| block_size(b.prefix_len())).sum::<u64>()
    }

    /// A successor takes over its group's pool: it adds the predecessor's blocks and grants. Inherited leases
    /// run one full lease from `now`, so holders have time to find their new coordinator. Grants that
    /// overlap grants already here are resolved by [`resolve_overlaps`].
    pub fn inherit(&mut self, state: &PoolState, now: Time) -> Vec<Renumbered> {
        let mut owned = self.owned.clone();
        owned.extend(state.owned.iter().map(|n| n.trunc()));
        self.set_owned(owned);
        let mut excluded = self.excluded.clone();
        excluded.extend(state.excluded.iter().map(|n| n.trunc()));
        self.excluded = Ipv4Net::aggregate(&excluded);
        let lease = self.lease;
        let incoming = state.grants.iter().map(|g| GrantInfo { remaining: lease, ..*g });
        self.merge_grants(incoming.collect(), now)
    }

    /// Merges grants made on the other side of a healed partition. Of two overlapping grants the younger is
    /// renumbered (it gets a fresh block of the same size when there is room); so is any incoming grant outside
    /// this pool's space. Returns the renumbered holders, sorted by old block.
    pub fn absorb(&mut self, others: &[GrantInfo], now: Time) -> Vec<Renumbered> {
        self.merge_grants(others.to_vec(), now)
    }

    fn merge_grants(&mut self, incoming: Vec<GrantInfo>, now: Time) -> Vec<Renumbered> {
        let (inside, outside): (Vec<GrantInfo>, Vec<GrantInfo>) = incoming
            .into_iter()
            .map(|g| GrantInfo { block: g.block.trunc(), ..g })
            .partition(|g| self.grantable(g.block));
        let current = self.grants.values().map(|g| g.info(now));
        let resolution = resolve_overlaps(current.chain(inside));
        self.grants.clear();
        self.by_holder.clear();
        self.version = next_pool_version();
        for g in &resolution.keep {
            let grant = Grant {
                block: g.block,
                holder: g.holder,
                since: now,
                age_at_since: g.age,
                // Leases from elsewhere never run longer than ours: holders renew them anyway.
                expires_at: now + g.remaining.min(self.lease),
            };
            self.put_grant(grant);
        }
        self.rebuild_free();
        let mut losers: Vec<GrantInfo> = resolution.renumber.into_iter().chain(outside).collect();
        losers.sort_by_key(|g| (g.block, g.holder));
        losers
            .into_iter()
            .map(|g| Renumbered {
                holder: g.holder,
                old: g.block,
                new: self.alloc(g.holder, g.block.prefix_len(), now).ok(),
            })
            .collect()
    }

    /// Inside an owned block and clear of every excluded range.
    fn grantable(&self, block: Ipv4Net) -> bool {
        self.inside_owned(block) && !self.excluded.iter().any(|e| e.contains(&block) || block.contains(e))
    }

    /// Recomputes the free blocks from scratch: owned minus excluded minus granted, as maximal aligned blocks.
    fn rebuild_free(&mut self) {
        let mut holes: Vec<Ipv4Net> = self.excluded.clone();
        holes.extend(self.grants.keys().copied());
        self.free = vec![BTreeSet::new(); 33];
        for block in carve(&self.owned, &holes) {
            self.free[usize::from(block.prefix_len())].insert(span(block).0);
        }
    }

    /// Moves an owned block to `new` (same size), shifting every grant inside it by the same offset: used when
    /// this coordinator's own block lost an overlap resolution at its parent and was renumbered. Grants keep
    /// their holder, age and lease, but are new to their holders at `now` (see [`Grant::held_for`]); the returned
    /// list says who moved where, sorted by old block.
    pub fn move_block(&mut self, old: Ipv4Net, new: Ipv4Net, now: Time) -> Result<Vec<Renumbered>, PoolError> {
        let (old, new) = (old.trunc(), new.trunc());
        if old.prefix_len() != new.prefix_len() {
            return Err(PoolError::BadPrefix(new.prefix_len()));
        }
        if !self.owned.iter().any(|o| o.contains(&old)) {
            return Err(PoolError::NotOwned(old));
        }
        let remaining = carve(&self.owned, &[old]);
        if remaining.iter().any(|o| o.contains(&new) || new.contains(o)) {
            return Err(PoolError::AlreadyOwned(new));
        }
        let shift = |b: Ipv4Net| block_at(span(b).0 - span(old).0 + span(new).0, b.prefix_len());
        let inside: Vec<Ipv4Net> = self.grants.keys().copied().filter(|b| old.contains(b)).collect();
        let mut moved = Vec::new();
        for block in inside {
            let grant = self.take_grant(block).expect("listed above");
            let new_block = shift(block);
            moved.push(Renumbered { holder: grant.holder, old: block, new: Some(new_block) });
            self.put_grant(Grant { block: new_block, ..grant.restamped(now) });
        }
        let mut owned = remaining;
        owned.push(new);
        self.set_owned(owned);
        self.rebuild_free();
        Ok(moved)
    }
}

/// `blocks` minus `holes`, as maximal aligned blocks.
pub fn carve(blocks: &[Ipv4Net], holes: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut hole_set = BlockSet::default();
    for &hole in &Ipv4Net::aggregate(&holes.to_vec()) {
        hole_set.insert(hole);
    }
    let mut out = Vec::new();
    let mut stack: Vec<Ipv4Net> = blocks.to_vec();
    while let Some(block) = stack.pop() {
        match hole_set.overlapping(block) {
            None => out.push(block),
            Some(hole) if hole.contains(&block) => {}
            Some(_) => stack.extend(block.subnets(block.prefix_len() + 1).expect("a /32 cannot be split")),
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE: Duration = Duration::from_secs(30);

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn node(n: u64) -> NodeId {
        NodeId::from_u64(n)
    }

    fn secs(s: u64) -> Time {
        Duration::from_secs(s)
    }

    #[test]
    fn the_version_moves_with_grants_and_owned_blocks_but_not_with_renewals() {
        let mut pool = AddressPool::new([net("10.16.0.0/24")], [], LEASE);
        let other = AddressPool::new([net("10.16.0.0/24")], [], LEASE);
        assert_ne!(pool.version(), other.version(), "a replacement pool never repeats a version");
        let v0 = pool.version();
        let block = pool.alloc(node(2), 26, secs(0)).unwrap();
        let v1 = pool.version();
        assert_ne!(v1, v0);
        pool.renew(node(2), secs(5));
        assert_eq!(pool.version(), v1, "a renewal changes no grant");
        assert!(pool.claim(block, node(3), secs(5)).is_err());
        assert_eq!(pool.version(), v1, "a refused claim changes nothing");
        pool.free(block).unwrap();
        let v2 = pool.version();
        assert_ne!(v2, v1);
        pool.add_owned(net("10.16.1.0/24")).unwrap();
        assert_ne!(pool.version(), v2);
    }

    #[test]
    fn the_root_pool_excludes_the_service_ip_range() {
        let mut pool = AddressPool::platform_root(PLATFORM_RANGE, LEASE);
        assert_eq!(pool.usable_addresses(), (1 << 20) - (1 << 16));
        assert_eq!(
            pool.free_blocks(),
            vec![net("10.16.0.0/13"), net("10.24.0.0/14"), net("10.28.0.0/15"), net("10.31.0.0/16")]
        );
        // 15 360 machine subnets fit, as in Oakestra, and none of them touches 10.30.0.0/16.
        let mut granted = 0;
        while let Ok(block) = pool.alloc(node(granted), DEFAULT_MACHINE_PREFIX, secs(0)) {
            assert!(!SERVICE_IP_RANGE.contains(&block) && PLATFORM_RANGE.contains(&block));
            granted += 1;
        }
        assert_eq!(granted, 15 * 1024);
        assert_eq!(pool.free_addresses(), 0);
        assert_eq!(pool.alloc(node(0), 26, secs(0)), Err(PoolError::Exhausted(26)));
    }

    #[test]
    fn allocation_is_best_fit_and_freeing_merges_buddies() {
        let mut pool = AddressPool::new([net("10.0.0.0/24")], [], LEASE);
        let a = pool.alloc(node(1), 26, secs(0)).unwrap();
        let b = pool.alloc(node(2), 25, secs(0)).unwrap();
        let c = pool.alloc(node(3), 26, secs(0)).unwrap();
        assert_eq!((a, b, c), (net("10.0.0.0/26"), net("10.0.0.128/25"), net("10.0.0.64/26")));
        assert_eq!(pool.alloc(node(4), 26, secs(0)), Err(PoolError::Exhausted(26)));
        pool.free(a).unwrap();
        pool.free(c).unwrap();
        assert_eq!(pool.free_blocks(), vec![net("10.0.0.0/25")]);
        assert_eq!(pool.free(a), Err(PoolError::UnknownGrant(a)));
        assert_eq!(pool.alloc(node(4), 33, secs(0)), Err(PoolError::BadPrefix(33)));
    }

    #[test]
    fn a_machine_that_runs_out_gets_another_subnet() {
        let mut pool = AddressPool::new([net("10.16.0.0/20")], [], LEASE);
        let first = pool.alloc(node(7), 26, secs(0)).unwrap();
        let second = pool.alloc(node(7), 26, secs(0)).unwrap();
        assert_ne!(first, second);
        assert_eq!(pool.grants_of(node(7)).count(), 2);
        assert_eq!(pool.release_holder(node(7)).len(), 2);
        assert_eq!(pool.free_blocks(), vec![net("10.16.0.0/20")]);
    }

    #[test]
    fn claim_takes_a_specific_block_or_says_why_not() {
        let mut pool = AddressPool::new([net("10.16.0.0/16")], [net("10.16.255.0/24")], LEASE);
        pool.claim(net("10.16.4.64/26"), node(1), secs(0)).unwrap();
        assert_eq!(
            pool.claim(net("10.16.4.0/24"), node(2), secs(0)),
            Err(PoolError::Taken { block: net("10.16.4.0/24"), held: net("10.16.4.64/26"), holder: node(1) })
        );
        assert_eq!(
            pool.claim(net("10.16.255.64/26"), node(2), secs(0)),
            Err(PoolError::Excluded(net("10.16.255.64/26")))
        );
        assert_eq!(pool.claim(net("10.17.0.0/26"), node(2), secs(0)), Err(PoolError::NotOwned(net("10.17.0.0/26"))));
        assert_eq!(pool.free_addresses(), (1 << 16) - 256 - 64);
    }

    /// Blocks from the parent come and go one at a time: the free space is updated in place (and matches a
    /// rebuild from scratch), a block with a grant inside cannot go, a grant can follow its holder elsewhere.
    #[test]
    fn blocks_are_added_and_given_back_without_rebuilding_the_pool() {
        let mut pool = AddressPool::new([net("10.16.0.0/24")], [], LEASE);
        let a = pool.alloc(node(1), 26, secs(0)).unwrap();
        pool.add_owned(net("10.16.1.0/24")).unwrap();
        pool.add_owned(net("10.16.3.0/24")).unwrap();
        assert_eq!(pool.add_owned(net("10.16.1.128/25")), Err(PoolError::AlreadyOwned(net("10.16.1.128/25"))));
        assert_eq!(pool.owned(), &[net("10.16.0.0/23"), net("10.16.3.0/24")]);
        let mut rebuilt = pool.clone();
        rebuilt.rebuild_free();
        assert_eq!(rebuilt.free_blocks(), pool.free_blocks());
        assert!(pool.is_free(net("10.16.3.0/24")) && !pool.is_free(net("10.16.0.0/24")));
        assert!(matches!(pool.remove_owned(&[net("10.16.0.0/24")]), Err(PoolError::Taken { .. })));
        pool.remove_owned(&[net("10.16.1.0/24"), net("10.16.3.0/24")]).unwrap();
        assert_eq!(pool.owned(), &[net("10.16.0.0/24")]);
        assert_eq!(pool.free_addresses(), 256 - 64);
        assert!(pool.reassign(a, node(2), secs(1)));
        assert_eq!(pool.grant(a).map(|g| g.holder), Some(node(2)));
        assert_eq!(pool.grants_of(node(1)).count(), 0);
    }

    /// A holder that moved lists a block it holds here in parts, or a part of a block it holds here: either way
    /// its claim succeeds without renumbering, and no one else's grant is merged.
    #[test]
    fn a_claim_merges_the_holder_s_own_grants_and_stops_at_others() {
        let mut pool = AddressPool::new([net("10.16.0.0/22")], [], LEASE);
        pool.claim(net("10.16.0.192/26"), node(1), secs(0)).unwrap();
        pool.claim(net("10.16.0.0/26"), node(1), secs(0)).unwrap();
        pool.claim(net("10.16.1.0/25"), node(2), secs(0)).unwrap();
        pool.claim_merging(net("10.16.0.0/24"), node(1), secs(1)).unwrap();
        assert_eq!(pool.grants_of(node(1)).map(|g| g.block).collect::<Vec<_>>(), vec![net("10.16.0.0/24")]);
        pool.claim_merging(net("10.16.0.64/26"), node(1), secs(2)).unwrap();
        assert_eq!(pool.grants_of(node(1)).count(), 1, "a part of its own grant is already its own");
        assert!(matches!(
            pool.claim_merging(net("10.16.1.0/24"), node(1), secs(3)),
            Err(PoolError::Taken { holder, .. }) if holder == node(2)
        ));
        assert_eq!(pool.largest_free_prefix(), Some(23), "10.16.2.0/23 is the largest free block");
        let mut rebuilt = pool.clone();
        rebuilt.rebuild_free();
        assert_eq!(rebuilt.free_blocks(), pool.free_blocks());
    }

    #[test]
    fn leases_are_renewed_by_the_holder_and_reclaimed_when_they_expire() {
        let mut pool = AddressPool::new([net("10.16.0.0/24")], [], LEASE);
        let a = pool.alloc(node(1), 26, secs(0)).unwrap();
        let b = pool.alloc(node(2), 26, secs(10)).unwrap();
        assert_eq!(pool.next_expiry(), Some(secs(30)));
        assert_eq!(pool.renew(node(1), secs(25)), 1);
        assert_eq!(pool.renew(node(9), secs(25)), 0);
        assert!(pool.expire(secs(39)).is_empty());
        let expired = pool.expire(secs(40));
        assert_eq!(expired.iter().map(|g| g.block).collect::<Vec<_>>(), vec![b]);
        assert_eq!(pool.grant(a).unwrap().expires_at, secs(55));
        assert_eq!(pool.expire(secs(55)).len(), 1);
        assert_eq!(pool.free_blocks(), vec![net("10.16.0.0/24")]);
    }

    #[test]
    fn a_successor_inherits_blocks_grants_and_their_age() {
        let mut old = AddressPool::new([net("10.16.0.0/22")], [], LEASE);
        let a = old.alloc(node(1), 26, secs(100)).unwrap();
        let state = old.state(secs(110));
        // The successor's clock started recently: ages survive the move anyway.
        let mut successor = AddressPool::new([], [], LEASE);
        assert!(successor.inherit(&state, secs(3)).is_empty());
        let g = successor.grant(a).unwrap();
        assert_eq!((g.holder, g.age(secs(5))), (node(1), secs(12)));
        assert_eq!(g.expires_at, secs(3) + LEASE);
        assert_eq!(successor.owned(), &[net("10.16.0.0/22")]);
        assert_ne!(successor.alloc(node(2), 26, secs(5)).unwrap(), a);
        let restored = AddressPool::from_state(&successor.state(secs(6)), LEASE, secs(0)).unwrap();
        assert_eq!(restored.free_blocks(), successor.free_blocks());
        assert_eq!(restored.grants().map(|g| g.info(secs(0))).collect::<Vec<_>>(), successor.state(secs(6)).grants);
    }

    #[test]
    fn a_block_split_off_a_grant_or_made_of_grants_goes_to_its_new_holder() {
        let mut pool = AddressPool::new([net("10.0.0.0/16")], [], LEASE);
        pool.claim(net("10.0.0.0/24"), node(1), secs(0)).unwrap();
        pool.split_off(net("10.0.0.64/26"), node(1), node(2), secs(20)).unwrap();
        let of = |pool: &AddressPool, n| pool.grants_of(node(n)).map(|g| g.block).collect::<Vec<_>>();
        assert_eq!(of(&pool, 1), vec![net("10.0.0.0/26"), net("10.0.0.128/25")]);
        assert_eq!(of(&pool, 2), vec![net("10.0.0.64/26")]);
        let handed = pool.grant(net("10.0.0.64/26")).unwrap();
        assert_eq!((handed.age(secs(20)), handed.held_for(secs(20))), (secs(20), secs(0)));
        // Grants of one holder that make up the block go as one.
        pool.claim(net("10.0.1.0/25"), node(3), secs(0)).unwrap();
        pool.claim(net("10.0.1.128/25"), node(3), secs(0)).unwrap();
        pool.split_off(net("10.0.1.0/24"), node(3), node(4), secs(20)).unwrap();
        assert_eq!(of(&pool, 4), vec![net("10.0.1.0/24")]);
        assert!(of(&pool, 3).is_empty());
        // Not from another holder's grant, nor from free space.
        assert!(matches!(pool.split_off(net("10.0.0.0/26"), node(3), node(5), secs(20)), Err(PoolError::Taken { .. })));
        pool.claim(net("10.0.2.0/25"), node(3), secs(0)).unwrap();
        assert!(pool.split_off(net("10.0.2.0/24"), node(3), node(5), secs(20)).is_err());
        assert!(pool.split_off(net("10.0.3.0/24"), node(3), node(5), secs(20)).is_err());
        assert_no_overlaps(&pool);
    }

    #[test]
    fn a_renumbered_coordinator_block_moves_its_grants_by_the_same_offset() {
        let mut pool = AddressPool::new([net("10.16.0.0/22"), net("10.20.0.0/24")], [], LEASE);
        let a = net("10.16.0.0/26");
        pool.claim(a, node(1), secs(0)).unwrap();
        pool.claim(net("10.16.2.64/26"), node(2), secs(0)).unwrap();
        pool.claim(net("10.20.0.0/26"), node(3), secs(0)).unwrap();
        let moved = pool.move_block(net("10.16.0.0/22"), net("10.24.4.0/22"), secs(30)).unwrap();
        let pairs: Vec<(NodeId, Ipv4Net, Ipv4Net)> = moved.iter().map(|r| (r.holder, r.old, r.new.unwrap())).collect();
        assert_eq!(
            pairs,
            vec![(node(1), a, net("10.24.4.0/26")), (node(2), net("10.16.2.64/26"), net("10.24.6.64/26"))]
        );
        assert_eq!(pool.owned(), &[net("10.20.0.0/24"), net("10.24.4.0/22")]);
        assert_eq!(pool.grant(net("10.20.0.0/26")).unwrap().holder, node(3));
        let shifted = pool.grant(net("10.24.4.0/26")).unwrap();
        assert_eq!(
            (shifted.age(secs(30)), shifted.held_for(secs(30))),
            (secs(30), secs(0)),
            "old, but new to its holder"
        );
        assert_no_overlaps(&pool);
        assert_eq!(pool.usable_addresses(), 1024 + 256);
        assert_eq!(
            pool.move_block(net("10.16.0.0/22"), net("10.28.0.0/22"), secs(30)),
            Err(PoolError::NotOwned(net("10.16.0.0/22")))
        );
        assert_eq!(pool.move_block(net("10.24.4.0/22"), net("10.28.0.0/24"), secs(30)), Err(PoolError::BadPrefix(24)));
        assert_eq!(
            pool.move_block(net("10.24.4.0/22"), net("10.20.0.0/22"), secs(30)),
            Err(PoolError::AlreadyOwned(net("10.20.0.0/22")))
        );
        // The grandparent hands the old coordinator's grants to its successor.
        assert_eq!(pool.transfer(node(1), node(9), secs(40)), 1);
        assert_eq!(pool.grant(net("10.24.4.0/26")).unwrap().expires_at, secs(40) + LEASE);
    }

    #[test]
    fn after_a_partition_the_younger_overlapping_grant_is_renumbered() {
        let mut ours = AddressPool::new([net("10.16.0.0/22")], [], LEASE);
        let old = ours.alloc(node(1), 26, secs(0)).unwrap();
        let theirs = [
            GrantInfo { block: old, holder: node(2), age: secs(5), remaining: secs(20) }, // younger: moves
            GrantInfo { block: net("10.16.1.0/24"), holder: node(3), age: secs(500), remaining: secs(20) }, // no clash
            GrantInfo { block: net("10.20.0.0/26"), holder: node(4), age: secs(900), remaining: secs(20) }, // foreign
        ];
        let renumbered = ours.absorb(&theirs, secs(100));
        assert_eq!(renumbered.len(), 2);
        assert_eq!((renumbered[0].holder, renumbered[0].old), (node(2), old));
        assert_eq!((renumbered[1].holder, renumbered[1].old), (node(4), net("10.20.0.0/26")));
        for r in &renumbered {
            let new = r.new.unwrap();
            assert_eq!(ours.grant(new).unwrap().holder, r.holder);
        }
        assert_eq!(ours.grant(old).unwrap().holder, node(1));
        assert_eq!(ours.grant(net("10.16.1.0/24")).unwrap().holder, node(3));
        assert_no_overlaps(&ours);
    }

    #[test]
    fn absurd_ages_and_leases_from_the_wire_do_not_panic() {
        let mut pool = AddressPool::new([net("10.16.0.0/22")], [], LEASE);
        let huge =
            GrantInfo { block: net("10.16.0.0/26"), holder: node(1), age: Duration::MAX, remaining: Duration::MAX };
        assert!(pool.absorb(&[huge], secs(5)).is_empty());
        assert!(pool.inherit(&PoolState { grants: vec![huge], ..Default::default() }, secs(6)).is_empty());
        assert_eq!(pool.grant(huge.block).unwrap().age(secs(100)), Duration::MAX);
        assert_eq!(pool.grant(huge.block).unwrap().expires_at, secs(6) + LEASE, "leases are capped");
        assert_eq!(pool.expire(secs(6) + LEASE).len(), 1);
        pool.absorb(&[huge], secs(7));
        assert!(AddressPool::from_state(&pool.state(secs(7)), LEASE, secs(8)).is_ok());
    }

    #[test]
    fn overlap_ties_go_to_the_smaller_holder_whatever_the_input_order() {
        let a = GrantInfo { block: net("10.16.0.0/24"), holder: node(1), age: secs(9), remaining: secs(1) };
        let b = GrantInfo { block: net("10.16.0.64/26"), holder: node(2), age: secs(9), remaining: secs(1) };
        let one = resolve_overlaps([a, b]);
        assert_eq!(one, resolve_overlaps([b, a]));
        assert_eq!((one.keep, one.renumber), (vec![a], vec![b]));
        // A big older grant beats several young small ones.
        let young = |i: u32| GrantInfo {
            block: block_at(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + i * 64, 26),
            holder: node(10 + u64::from(i)),
            age: secs(1),
            remaining: secs(1),
        };
        let r = resolve_overlaps([young(0), young(1), young(5), a]);
        assert_eq!(r.keep, vec![a, young(5)]);
        assert_eq!(r.renumber, vec![young(0), young(1)]);
    }

    fn assert_no_overlaps(pool: &AddressPool) {
        let blocks: Vec<Ipv4Net> = pool.grants().map(|g| g.block).chain(pool.free_blocks()).collect();
        for (i, x) in blocks.iter().enumerate() {
            assert!(pool.owned().iter().any(|o| o.contains(x)), "{x} outside owned space");
            assert!(!pool.excluded().iter().any(|e| e.contains(x) || x.contains(e)), "{x} touches an excluded range");
            for y in &blocks[i + 1..] {
                assert!(!x.contains(y) && !y.contains(x), "{x} overlaps {y}");
            }
        }
        // The holder index lists exactly the grants.
        let mut indexed: Vec<(NodeId, Ipv4Net)> =
            pool.by_holder.iter().flat_map(|(h, blocks)| blocks.iter().map(move |b| (*h, *b))).collect();
        let mut granted: Vec<(NodeId, Ipv4Net)> = pool.grants().map(|g| (g.holder, g.block)).collect();
        indexed.sort();
        granted.sort();
        assert_eq!(indexed, granted, "holder index out of step with the grants");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { holder: u64, prefix: u8 },
        Claim { holder: u64, offset: u32, prefix: u8 },
        Free { index: usize },
        Renew { holder: u64 },
        Advance { secs: u64 },
        Absorb { holder: u64, offset: u32, prefix: u8, age: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..6u64, 20..=30u8).prop_map(|(holder, prefix)| Op::Alloc { holder, prefix }),
            1 => (0..6u64, 0..(1u32 << 12), 20..=30u8).prop_map(|(holder, offset, prefix)| Op::Claim { holder, offset, prefix }),
            2 => any::<usize>().prop_map(|index| Op::Free { index }),
            1 => (0..6u64).prop_map(|holder| Op::Renew { holder }),
            1 => (0..40u64).prop_map(|secs| Op::Advance { secs }),
            1 => (0..6u64, 0..(1u32 << 12), 22..=28u8, 0..100u64)
                .prop_map(|(holder, offset, prefix, age)| Op::Absorb { holder, offset, prefix, age }),
        ]
    }

    proptest! {
        /// No two live grants overlap; grants and free blocks stay inside owned space and outside excluded
        /// ranges; no address is lost; expiry frees exactly the expired grants; freeing everything restores the
        /// pool's initial free blocks.
        #[test]
        fn pool_invariants_hold_under_any_operation_sequence(ops in proptest::collection::vec(op(), 1..60)) {
            let base = u32::from(Ipv4Addr::new(10, 16, 0, 0));
            let mut pool = AddressPool::new([net("10.16.0.0/20"), net("10.32.0.0/24")], [net("10.16.8.0/22")], LEASE);
            let initial_free = pool.free_blocks();
            let usable = pool.usable_addresses();
            let mut now = secs(0);
            for op in ops {
                match op {
                    Op::Alloc { holder, prefix } => { let _ = pool.alloc(node(holder), prefix, now); }
                    Op::Claim { holder, offset, prefix } => {
                        let _ = pool.claim(block_at(base + offset, prefix).trunc(), node(holder), now);
                    }
                    Op::Free { index } => {
                        let blocks: Vec<Ipv4Net> = pool.grants().map(|g| g.block).collect();
                        if !blocks.is_empty() { pool.free(blocks[index % blocks.len()]).unwrap(); }
                    }
                    Op::Renew { holder } => { pool.renew(node(holder), now); }
                    Op::Advance { secs: s } => {
                        now += secs(s);
                        let due: BTreeSet<Ipv4Net> =
                            pool.grants().filter(|g| g.expires_at <= now).map(|g| g.block).collect();
                        let expired: BTreeSet<Ipv4Net> = pool.expire(now).into_iter().map(|g| g.block).collect();
                        prop_assert_eq!(expired, due);
                        prop_assert!(pool.grants().all(|g| g.expires_at > now));
                    }
                    Op::Absorb { holder, offset, prefix, age } => {
                        let block = block_at(base + offset, prefix).trunc();
                        let info = GrantInfo { block, holder: node(holder), age: secs(age), remaining: LEASE };
                        pool.absorb(&[info], now);
                    }
                }
                assert_no_overlaps(&pool);
                prop_assert_eq!(pool.usable_addresses(), usable);
                let mut rebuilt = pool.clone();
                rebuilt.rebuild_free();
                prop_assert_eq!(rebuilt.free_blocks(), pool.free_blocks());
            }
            let blocks: Vec<Ipv4Net> = pool.grants().map(|g| g.block).collect();
            for b in blocks { pool.free(b).unwrap(); }
            prop_assert_eq!(pool.free_blocks(), initial_free);
        }

        #[test]
        fn overlap_resolution_keeps_disjoint_grants_and_loses_none(
            raw in proptest::collection::vec((0..(1u32 << 12), 22..=28u8, 0..5u64, 0..4u64), 0..30)
        ) {
            let base = u32::from(Ipv4Addr::new(10, 16, 0, 0));
            let grants: Vec<GrantInfo> = raw.iter().map(|&(o, p, h, a)| GrantInfo {
                block: block_at(base + o, p).trunc(), holder: node(h), age: secs(a), remaining: secs(1),
            }).collect();
            let r = resolve_overlaps(grants.clone());
            let mut reversed = grants.clone();
            reversed.reverse();
            prop_assert_eq!(&r, &resolve_overlaps(reversed));
            for (i, x) in r.keep.iter().enumerate() {
                for y in &r.keep[i + 1..] {
                    prop_assert!(!x.block.contains(&y.block) && !y.block.contains(&x.block));
                }
            }
            // Every renumbered grant clashes with a kept one that is at least as senior.
            for loser in &r.renumber {
                prop_assert!(r.keep.iter().any(|k| (k.block.contains(&loser.block) || loser.block.contains(&k.block))
                    && k.seniority_key() < loser.seniority_key()));
            }
            let distinct: BTreeSet<(Ipv4Net, NodeId)> = grants.iter().map(|g| (g.block, g.holder)).collect();
            prop_assert_eq!(r.keep.len() + r.renumber.len(), distinct.len());
        }
    }
}
