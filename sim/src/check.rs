//! Global checks over the whole tree, from every live node's own view (its `status()`): roots per component,
//! attachment, cycles, depth and fanout. Only the simulator can see all nodes at once, so only it can check these.

use canopy_overlay::Role;

/// One live node as the checker sees it.
#[derive(Debug, Clone, Copy)]
pub struct NodeView {
    pub role: Role,
    /// The parent's node index; `Some(usize::MAX)` when the parent id is no node of the simulation.
    pub parent: Option<usize>,
    /// Side of the partition.
    pub component: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TreeCheck {
    /// Indexed by component id; components without live nodes have size 0.
    pub component_sizes: Vec<usize>,
    pub roots: Vec<Vec<usize>>,
    /// Live nodes whose parent chain does not reach a live root in their component.
    pub unattached: Vec<usize>,
    /// One node from each parent cycle.
    pub cycles: Vec<usize>,
    pub depth_max: usize,
    pub deepest: Option<usize>,
    pub fanout_max: usize,
    pub widest: Option<usize>,
    /// Live nodes by their number of live children: entry `k` counts the nodes with `k` (entry 0, the leaves).
    pub nodes_by_children: Vec<usize>,
    /// Depth of each attached node (root = 0); `None` for dead or unattached nodes.
    pub depth: Vec<Option<usize>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Visit {
    New,
    OnPath,
    Done,
}

/// `views[i]` is `None` for nodes that are not live.
pub fn check_tree(views: &[Option<NodeView>]) -> TreeCheck {
    let n = views.len();
    let components = views.iter().flatten().map(|v| v.component + 1).max().unwrap_or(1);
    let mut out = TreeCheck {
        component_sizes: vec![0; components],
        roots: vec![Vec::new(); components],
        depth: vec![None; n],
        ..TreeCheck::default()
    };
    let live = |i: usize| views.get(i).copied().flatten();
    let mut visit = vec![Visit::New; n];
    let mut children = vec![0usize; n];
    let mut path = Vec::new();
    for (i, view) in views.iter().enumerate() {
        let Some(view) = view else { continue };
        out.component_sizes[view.component] += 1;
        if view.role == Role::Root {
            out.roots[view.component].push(i);
        }
        if let Some(p) = view.parent
            && live(p).is_some()
        {
            children[p] += 1;
        }
        if visit[i] != Visit::New {
            continue;
        }
        // Walk up until a root, a node already decided, a dead or foreign parent, or a node on this very path.
        path.clear();
        let mut cur = i;
        let (attached, mut depth) = loop {
            match visit[cur] {
                Visit::Done => break (out.depth[cur].is_some(), out.depth[cur].unwrap_or(0)),
                Visit::OnPath => {
                    out.cycles.push(cur);
                    break (false, 0);
                }
                Visit::New => {}
            }
            visit[cur] = Visit::OnPath;
            path.push(cur);
            let me = live(cur).expect("only live nodes are walked");
            if me.role == Role::Root {
                path.pop();
                visit[cur] = Visit::Done;
                out.depth[cur] = Some(0);
                break (true, 0);
            }
            match me.parent.and_then(|p| live(p).filter(|pv| pv.component == me.component).map(|_| p)) {
                Some(p) => cur = p,
                None => break (false, 0),
            }
        };
        for &node in path.iter().rev() {
            visit[node] = Visit::Done;
            if attached {
                depth += 1;
                out.depth[node] = Some(depth);
                if depth > out.depth_max {
                    out.depth_max = depth;
                    out.deepest = Some(node);
                }
            } else {
                out.unattached.push(node);
            }
        }
    }
    out.unattached.sort_unstable();
    for (i, &c) in children.iter().enumerate() {
        if c > out.fanout_max {
            out.fanout_max = c;
            out.widest = Some(i);
        }
    }
    out.nodes_by_children = vec![0; out.fanout_max + 1];
    for (i, &c) in children.iter().enumerate() {
        if views[i].is_some() {
            out.nodes_by_children[c] += 1;
        }
    }
    out
}

/// The depth a well-balanced tree must stay within: `2 * ceil(ln(N) / ln(max_children / 2)) + 1`.
/// `None` when `max_children / 2 <= 1` (the formula has no bound then).
pub fn depth_bound(nodes: usize, max_children: usize) -> Option<usize> {
    let base = max_children as f64 / 2.0;
    if base <= 1.0 || nodes == 0 {
        return None;
    }
    Some(2 * ((nodes as f64).ln() / base.ln()).ceil() as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(role: Role, parent: Option<usize>) -> Option<NodeView> {
        Some(NodeView { role, parent, component: 0 })
    }

    #[test]
    fn a_proper_tree_passes() {
        // 0 root; 1, 2 under 0; 3 under 1; 4 dead.
        let views = vec![
            v(Role::Root, None),
            v(Role::Coordinator, Some(0)),
            v(Role::Leaf, Some(0)),
            v(Role::Leaf, Some(1)),
            None,
        ];
        let c = check_tree(&views);
        assert_eq!(c.roots, vec![vec![0]]);
        assert!(c.unattached.is_empty() && c.cycles.is_empty());
        assert_eq!((c.depth_max, c.deepest), (2, Some(3)));
        assert_eq!((c.fanout_max, c.widest), (2, Some(0)));
        // Two leaves (2, 3), one node with a child (1), one with two (0); the dead node 4 is not counted.
        assert_eq!(c.nodes_by_children, vec![2, 1, 1]);
        assert_eq!(c.component_sizes, vec![4]);
    }

    #[test]
    fn finds_cycles_orphans_and_extra_roots() {
        let views = vec![
            v(Role::Root, None),
            v(Role::Leaf, Some(2)), // 1 -> 2 -> 1: a cycle
            v(Role::Coordinator, Some(1)),
            v(Role::Leaf, Some(1)), // hangs below the cycle
            v(Role::Leaf, Some(5)), // parent dead
            None,
            v(Role::Detached, None), // not in a tree
            v(Role::Root, None),     // a second root
            v(Role::Leaf, Some(usize::MAX)),
        ];
        let c = check_tree(&views);
        assert_eq!(c.roots, vec![vec![0, 7]]);
        assert_eq!(c.cycles.len(), 1);
        assert_eq!(c.unattached, vec![1, 2, 3, 4, 6, 8]);
    }

    #[test]
    fn a_parent_across_the_partition_does_not_count() {
        let views = vec![
            Some(NodeView { role: Role::Root, parent: None, component: 0 }),
            Some(NodeView { role: Role::Leaf, parent: Some(0), component: 1 }),
        ];
        let c = check_tree(&views);
        assert_eq!(c.component_sizes, vec![1, 1]);
        assert_eq!(c.roots, vec![vec![0], vec![]]);
        assert_eq!(c.unattached, vec![1]);
    }

    #[test]
    fn depth_bound_formula() {
        // 1000 nodes, 16 children: ln(1000)/ln(8) = 3.32 -> 4 -> 9.
        assert_eq!(depth_bound(1000, 16), Some(9));
        assert_eq!(depth_bound(1, 16), Some(1));
        assert_eq!(depth_bound(100, 2), None);
    }
}
