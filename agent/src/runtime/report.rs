//! What `agent status`, `agent peers` and `agent tree` show: JSON bodies of the local API, and their text forms.

use serde::{Deserialize, Serialize};
use std::fmt::Write;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub messages_sent: u64,
    pub messages_received: u64,
    pub messages_dropped: u64,
    pub admitted_peers: u64,
    pub connected_peers: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub peer_id: String,
    /// detached, leaf, coordinator or root.
    pub role: String,
    pub term: u64,
    pub parent: Option<String>,
    pub children: Vec<String>,
    /// Root first, parent last.
    pub ancestors: Vec<String>,
    /// Where this agent listens (and what it advertises in the tree).
    pub addresses: Vec<String>,
    /// The machine subnet granted by the tree, once there is one.
    pub subnet: Option<String>,
    /// The address block of this node's group, as the tree handed it down.
    pub address_block: Option<String>,
    /// Nodes in this node's subtree (itself included) and its height, as the overlay aggregates them.
    pub subtree_size: u32,
    pub subtree_height: u16,
    /// What the runtime is doing: starting, joining (waiting for a bootstrap peer), member, leaving.
    pub phase: String,
    pub position: (f64, f64),
    pub uptime_secs: u64,
    pub counters: Counters,
    /// The overlay core's own counters (duplicates, spoofed, join refusals, takeovers, ...).
    pub overlay_counters: canopy_overlay::Counters,
    /// Routing's counters (subnets granted and renumbered, blocks handed over or given back, route queries, ...).
    /// Absent from the reports of agents built before it, hence the default.
    #[serde(default)]
    pub routing_counters: canopy_overlay::routing::RoutingCounters,
}

impl StatusReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let none = "-".to_string();
        let _ = writeln!(out, "peer id:    {}", self.peer_id);
        let _ = writeln!(out, "role:       {} (term {}, {})", self.role, self.term, self.phase);
        let _ = writeln!(out, "parent:     {}", self.parent.as_ref().unwrap_or(&none));
        let _ = writeln!(
            out,
            "ancestors:  {}",
            if self.ancestors.is_empty() { none.clone() } else { self.ancestors.join(" -> ") }
        );
        let _ = writeln!(out, "children:   {}", self.children.len());
        for child in &self.children {
            let _ = writeln!(out, "  {child}");
        }
        let _ = writeln!(out, "subnet:     {}", self.subnet.as_ref().unwrap_or(&none));
        let _ = writeln!(out, "block:      {}", self.address_block.as_ref().unwrap_or(&none));
        let _ = writeln!(out, "subtree:    {} nodes, height {}", self.subtree_size, self.subtree_height);
        let _ = writeln!(out, "position:   {},{}", self.position.0, self.position.1);
        let _ = writeln!(out, "uptime:     {}s", self.uptime_secs);
        let _ = writeln!(out, "addresses:");
        for addr in &self.addresses {
            let _ = writeln!(out, "  {addr}");
        }
        let c = &self.counters;
        let _ = writeln!(
            out,
            "counters:   sent {} received {} dropped {} admitted peers {} connected peers {}",
            c.messages_sent, c.messages_received, c.messages_dropped, c.admitted_peers, c.connected_peers
        );
        let (o, r) = (&self.overlay_counters, &self.routing_counters);
        let _ = writeln!(
            out,
            "tree:       duplicates {} parent failures {} takeovers {} splits {} step-downs {} join refusals {}",
            o.duplicates, o.parent_failures, o.takeovers, o.splits, o.step_downs, o.join_refused
        );
        let _ = writeln!(
            out,
            "subnets:    granted {} renumbered {} blocks handed over {} given back {}",
            r.grants_made, r.renumbered, r.blocks_handed_over, r.blocks_given_back
        );
        out
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub connected: bool,
    pub admitted: bool,
    /// parent, ancestor, child or other.
    pub relation: String,
    pub rtt_ms: Option<f64>,
}

pub fn render_peers(peers: &[PeerReport]) -> String {
    if peers.is_empty() {
        return "no peers\n".to_string();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<54} {:<9} {:<9} {:<9} {:>8}  ADDRESS",
        "PEER", "RELATION", "CONNECTED", "ADMITTED", "RTT(ms)"
    );
    for p in peers {
        let rtt = p.rtt_ms.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
        let addr = p.addresses.first().map(String::as_str).unwrap_or("-");
        let _ = writeln!(
            out,
            "{:<54} {:<9} {:<9} {:<9} {:>8}  {addr}",
            p.peer_id, p.relation, p.connected, p.admitted, rtt
        );
    }
    out
}

/// One node of the drawn tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeNode {
    pub peer_id: String,
    pub note: Option<String>,
    pub children: Vec<TreeNode>,
}

/// The part of the tree this node knows: the path from the root down to it, and its children.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeReport {
    pub root: TreeNode,
}

impl TreeReport {
    /// `ancestors` root first, parent last (as in the status); `children` of this node.
    pub fn from_path(me: String, note: String, ancestors: &[String], children: &[String]) -> Self {
        let mut node = TreeNode {
            peer_id: me,
            note: Some(note),
            children: children.iter().map(|c| TreeNode { peer_id: c.clone(), note: None, children: vec![] }).collect(),
        };
        for ancestor in ancestors.iter().rev() {
            node = TreeNode { peer_id: ancestor.clone(), note: None, children: vec![node] };
        }
        Self { root: node }
    }

    pub fn render(&self) -> String {
        fn walk(node: &TreeNode, depth: usize, out: &mut String) {
            let note = node.note.as_ref().map(|n| format!("  ({n})")).unwrap_or_default();
            let _ = writeln!(out, "{}{}{note}", "  ".repeat(depth), node.peer_id);
            for child in &node.children {
                walk(child, depth + 1, out);
            }
        }
        let mut out = String::new();
        walk(&self.root, 0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> StatusReport {
        StatusReport {
            peer_id: "me".into(),
            role: "coordinator".into(),
            term: 2,
            parent: Some("p".into()),
            children: vec!["c1".into()],
            ancestors: vec!["p".into()],
            addresses: vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()],
            subnet: Some("10.16.0.0/26".into()),
            address_block: Some("10.16.0.0/22".into()),
            subtree_size: 2,
            subtree_height: 2,
            phase: "member".into(),
            position: (48.1, 11.6),
            uptime_secs: 5,
            counters: Counters::default(),
            overlay_counters: canopy_overlay::Counters { takeovers: 3, splits: 1, ..Default::default() },
            routing_counters: canopy_overlay::routing::RoutingCounters {
                renumbered: 4,
                blocks_handed_over: 2,
                ..Default::default()
            },
        }
    }

    #[test]
    fn status_shows_the_tree_and_subnet_counters() {
        let text = status().render();
        assert!(text.contains("takeovers 3 splits 1"), "{text}");
        assert!(text.contains("renumbered 4 blocks handed over 2"), "{text}");
    }

    #[test]
    fn a_status_from_an_agent_without_routing_counters_still_reads() {
        let mut json = serde_json::to_value(status()).unwrap();
        json.as_object_mut().unwrap().remove("routing_counters");
        let read: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(read.routing_counters, Default::default());
        assert_eq!(read.overlay_counters.takeovers, 3);
    }

    #[test]
    fn tree_draws_path_and_children_indented() {
        let tree = TreeReport::from_path(
            "me".into(),
            "this node, leaf".into(),
            &["root".into(), "parent".into()],
            &["c1".into(), "c2".into()],
        );
        assert_eq!(tree.render(), "root\n  parent\n    me  (this node, leaf)\n      c1\n      c2\n");
        let alone = TreeReport::from_path("me".into(), "root".into(), &[], &[]);
        assert_eq!(alone.render(), "me  (root)\n");
    }

    #[test]
    fn peers_table_has_a_line_per_peer() {
        let peers = vec![PeerReport {
            peer_id: "p".into(),
            addresses: vec!["/ip4/127.0.0.1/tcp/1".into()],
            connected: true,
            admitted: true,
            relation: "parent".into(),
            rtt_ms: Some(0.5),
        }];
        let text = render_peers(&peers);
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("parent") && text.contains("0.50") && text.contains("/ip4/127.0.0.1/tcp/1"));
        assert_eq!(render_peers(&[]), "no peers\n");
    }
}
