//! A coordinator's children: the records a node keeps of them, found by id through a compact list of keys.
//!
//! Reports arrive from every child each heartbeat, and each one is looked up by sender. Scanning the records
//! themselves (about 250 bytes each) touched a cache line per child passed over; the keys of sixteen children fit in
//! two lines, kept inside the node's own state, so that the lookup loads nothing but the child's record. The list
//! also counts its changes (`generation`), so that what is derived from the set of children (the routing context)
//! is rebuilt only when it changed.

use crate::Time;
use crate::dedup::Window;
use crate::id::{NodeId, position_by_key};
use crate::node::NodeInfo;
use crate::rank::Rank;
use crate::summary::Summary;
use smallvec::SmallVec;

pub(crate) struct Child {
    /// Replaced through [`Children::replace_info`] only, which keeps the keys and the generation right.
    pub info: NodeInfo,
    pub rank: Rank,
    pub summary: Summary,
    pub last_heard: Time,
    /// The ids of its reports seen lately (duplicates are dropped; see `Node::fresh`).
    pub reports_seen: Window,
    /// The view version this child last reported holding.
    pub acked_version: u64,
    /// The view version we last sent it in full (not resent until a report shows it missing).
    pub sent_version: u64,
    /// The same two for our group grids.
    pub acked_group: u64,
    pub sent_group: u64,
}

/// The children in the order they were adopted, with `keys[i] == list[i].info.id.key()`.
#[derive(Default)]
pub(crate) struct Children {
    list: Vec<Child>,
    /// The first 16 (the default `max_children`) inside the node's own state, so that finding the child a report
    /// came from reads only the child's record outside it.
    keys: SmallVec<[u64; 16]>,
    generation: u64,
}

impl std::ops::Deref for Children {
    type Target = [Child];

    fn deref(&self) -> &[Child] {
        &self.list
    }
}

impl Children {
    /// Changes whenever a child is added or removed or its info replaced.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn position(&self, id: &NodeId) -> Option<usize> {
        position_by_key(&self.keys, id, |i| self.list[i].info.id == *id)
    }

    /// The record of the child whose key is `id`'s, found from the keys alone: confirming the id would read the
    /// record. A hint of what a message from `id` will read, never a lookup.
    pub fn record_by_key(&self, id: &NodeId) -> Option<&Child> {
        position_by_key(&self.keys, id, |_| true).map(|i| &self.list[i])
    }

    pub fn contains(&self, id: &NodeId) -> bool {
        self.position(id).is_some()
    }

    pub fn get(&self, id: &NodeId) -> Option<&Child> {
        self.position(id).map(|i| &self.list[i])
    }

    /// The child's record, to update what it reported (not its info: see [`Children::replace_info`]).
    pub fn get_mut(&mut self, id: &NodeId) -> Option<&mut Child> {
        self.position(id).map(|i| &mut self.list[i])
    }

    /// Every record, to update what the children reported or what we sent them (not their info).
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Child> {
        self.list.iter_mut()
    }

    /// Replaces what the `i`th child says about itself (same id): it came back, maybe with a new position or
    /// addresses. Returns its record for the rest of the update.
    pub fn replace_info(&mut self, i: usize, info: NodeInfo) -> &mut Child {
        debug_assert!(self.list[i].info.id == info.id, "a child's id does not change");
        self.generation += 1;
        let child = &mut self.list[i];
        child.info = info;
        child
    }

    pub fn push(&mut self, child: Child) {
        self.keys.push(child.info.id.key());
        self.list.push(child);
        self.generation += 1;
    }

    pub fn remove(&mut self, id: &NodeId) -> Option<Child> {
        let i = self.position(id)?;
        self.keys.remove(i);
        self.generation += 1;
        Some(self.list.remove(i))
    }

    /// Keeps the children for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&Child) -> bool) {
        let before = self.list.len();
        self.list.retain(|c| keep(c));
        if self.list.len() != before {
            self.keys = self.list.iter().map(|c| c.info.id.key()).collect();
            self.generation += 1;
        }
    }

    /// Removes every child, returning them.
    pub fn take(&mut self) -> Vec<Child> {
        self.keys.clear();
        self.generation += 1;
        std::mem::take(&mut self.list)
    }

    pub fn clear(&mut self) {
        self.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_policies::{Capacity, Position};

    fn child(n: u64) -> Child {
        let (id, position) = (NodeId::from_u64(n), Position::new(48.0, 11.0));
        Child {
            info: NodeInfo { id, addrs: Vec::new(), position, capacity: Capacity::ZERO, reachable: true },
            rank: Rank::new(id, true, &Capacity::ZERO, Time::ZERO),
            summary: Summary::leaf(position),
            last_heard: Time::ZERO,
            reports_seen: Window::default(),
            acked_version: 0,
            sent_version: 0,
            acked_group: 0,
            sent_group: 0,
        }
    }

    fn ids(children: &Children) -> Vec<NodeId> {
        children.iter().map(|c| c.info.id).collect()
    }

    #[test]
    fn lookups_follow_every_change_and_each_change_is_counted() {
        let mut children = Children::default();
        let mut generation = children.generation();
        let mut changed = |children: &Children| {
            let moved = children.generation() != generation;
            generation = children.generation();
            moved
        };
        for n in 1..=5 {
            children.push(child(n));
        }
        assert!(changed(&children));
        assert_eq!(children.position(&NodeId::from_u64(4)), Some(3));
        assert!(!children.contains(&NodeId::from_u64(9)));

        children.get_mut(&NodeId::from_u64(2)).expect("a child").acked_version = 7;
        assert!(!changed(&children), "updating what a child reported changes nothing derived from the set");
        assert_eq!(children.get(&NodeId::from_u64(2)).map(|c| c.acked_version), Some(7));

        assert!(children.remove(&NodeId::from_u64(2)).is_some());
        assert!(children.remove(&NodeId::from_u64(2)).is_none());
        assert!(changed(&children));
        assert_eq!(children.position(&NodeId::from_u64(5)), Some(3), "keys moved with the records");

        children.retain(|c| c.info.id != NodeId::from_u64(1));
        assert!(changed(&children));
        children.retain(|_| true);
        assert!(!changed(&children), "keeping everyone is no change");
        assert_eq!(ids(&children), [3, 4, 5].map(NodeId::from_u64));
        assert_eq!(children.position(&NodeId::from_u64(3)), Some(0));

        let mut moved = child(4).info;
        moved.position = Position::new(52.5, 13.4);
        children.replace_info(1, moved).acked_group = 3;
        assert!(changed(&children));
        let four = children.get(&NodeId::from_u64(4)).expect("still a child");
        assert_eq!((four.info.position, four.acked_group), (Position::new(52.5, 13.4), 3));

        assert_eq!(children.take().len(), 3);
        assert!(changed(&children));
        children.push(child(6));
        children.clear();
        assert!(changed(&children));
        assert!(children.is_empty() && !children.contains(&NodeId::from_u64(4)));
    }

    #[test]
    fn a_senders_record_is_found_by_its_key_alone() {
        let mut children = Children::default();
        for n in 1..=3 {
            children.push(child(n));
        }
        let record = children.record_by_key(&NodeId::from_u64(2)).expect("a child");
        assert!(std::ptr::eq(record, &children[1]));
        assert!(children.record_by_key(&NodeId::from_u64(9)).is_none());
        // A hint, not a lookup: a colliding key names the first record with it.
        children.keys[2] = children.keys[0];
        assert!(std::ptr::eq(children.record_by_key(&NodeId::from_u64(1)).expect("by key"), &children[0]));
    }

    #[test]
    fn ids_with_equal_keys_are_still_told_apart() {
        let mut children = Children::default();
        children.push(child(1));
        children.push(child(2));
        // Force a collision: the second record's key claims to be the first one's.
        children.keys[1] = children.keys[0];
        assert_eq!(children.position(&NodeId::from_u64(1)), Some(0));
        assert_eq!(children.position(&NodeId::from_u64(2)), None, "a key alone never matches");
        children.keys[0] = NodeId::from_u64(2).key();
        children.keys[1] = NodeId::from_u64(2).key();
        assert_eq!(children.position(&NodeId::from_u64(2)), Some(1), "scanning goes on past a false match");
    }
}
