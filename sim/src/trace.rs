//! `canopy-sim run --trace`: what chosen nodes receive, send and report, one line each, to follow a node through a
//! run (why did it end up detached? who redirected it? who else was granted its subnet?). Messages are named by
//! kind with the peers they point to, subnet messages with their blocks; whole views and grids are left out.

use crate::kinds::{KIND_NAMES, kind_of};
use canopy_overlay::routing::{Granted, RoutesMessage, Want};
use canopy_overlay::{Event, Message, NodeId};

/// One thing a traced node did: at simulated `at_ns`, node `node` (its index).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceLine {
    pub at_ns: u64,
    pub node: u32,
    pub what: String,
}

impl std::fmt::Display for TraceLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:>10.3} s  n{:<6} {}", self.at_ns as f64 / 1e9, self.node, self.what)
    }
}

/// Where trace lines go, and which nodes are traced.
pub struct Tracer {
    traced: Vec<bool>,
    sink: Box<dyn FnMut(&TraceLine)>,
}

impl Tracer {
    pub fn new(nodes: &[u32], sink: impl FnMut(&TraceLine) + 'static) -> Self {
        let len = nodes.iter().max().map_or(0, |&n| n as usize + 1);
        let mut traced = vec![false; len];
        for &n in nodes {
            traced[n as usize] = true;
        }
        Self { traced, sink: Box::new(sink) }
    }

    pub fn traces(&self, node: u32) -> bool {
        self.traced.get(node as usize).copied().unwrap_or(false)
    }

    pub fn emit(&mut self, at_ns: u64, node: u32, what: String) {
        (self.sink)(&TraceLine { at_ns, node, what });
    }
}

/// `message`'s kind and, for the tree's messages, the node it names: `name` turns an id into `n<index>`.
pub fn describe(message: &Message, name: impl Fn(&NodeId) -> String) -> String {
    let kind = KIND_NAMES[kind_of(message)];
    match message {
        Message::JoinRequest(r) => format!("{kind} for {}", name(&r.joiner.id)),
        Message::Accept(a) => format!("{kind} from parent {} (term {})", name(&a.parent.id), a.term),
        Message::Redirect { to } => format!("{kind} to {}", name(&to.id)),
        Message::Refuse(reason) => format!("{kind} {reason:?}"),
        Message::Attach(a) => match (a.replaces, a.orphaned_from) {
            (Some(old), _) => format!("{kind} replacing {} (term {})", name(&old), a.term),
            (None, Some(parent)) => format!("{kind} orphaned from {}", name(&parent)),
            (None, None) => kind.to_string(),
        },
        Message::Routes(r) => describe_subnets(kind, r, &name),
        _ => kind.to_string(),
    }
}

/// Subnet messages with their blocks (enough to follow one subnet through a run); other routes messages by kind.
fn describe_subnets(kind: &str, message: &RoutesMessage, name: &impl Fn(&NodeId) -> String) -> String {
    let list = |items: Vec<String>| format!("[{}]", items.join(", "));
    let want = |w: &Want| {
        let replacing = w.replaces.map(|b| format!(" replacing {b}")).unwrap_or_default();
        let on_behalf = w.on_behalf.map(|n| format!(" for {}", name(&n))).unwrap_or_default();
        format!("{:?} /{}{replacing}{on_behalf}", w.purpose, w.prefix)
    };
    let granted = |g: &Granted| match g.replaces {
        Some(old) if old != g.block => format!("{:?} {} replacing {old}", g.purpose, g.block),
        Some(_) => format!("{:?} {} kept", g.purpose, g.block),
        None => format!("{:?} {}", g.purpose, g.block),
    };
    match message {
        RoutesMessage::SubnetSync { held, want: wants } => format!(
            "{kind} held {} want {}",
            list(held.iter().map(|h| h.block.to_string()).collect()),
            list(wants.iter().map(want).collect())
        ),
        RoutesMessage::SubnetWant(wants) => format!("{kind} {}", list(wants.iter().map(want).collect())),
        RoutesMessage::SubnetReply { granted: g, refused } => {
            format!("{kind} granted {} refused {}", list(g.iter().map(granted).collect()), refused.len())
        }
        RoutesMessage::Moved { old, new } => match new {
            Some(new) => format!("{kind} {old} -> {new}"),
            None => format!("{kind} {old} -> none"),
        },
        RoutesMessage::SubnetHandOver(handed) => {
            format!("{kind} {}", list(handed.iter().map(|(b, n)| format!("{b} for {}", name(n))).collect()))
        }
        RoutesMessage::GroupBlocks(blocks) => {
            format!("{kind} {}", list(blocks.iter().map(|b| b.to_string()).collect()))
        }
        _ => kind.to_string(),
    }
}

/// A node's event, without the bulk (placement candidates are counted, not listed).
pub fn describe_event(event: &Event, name: impl Fn(&NodeId) -> String) -> String {
    match event {
        Event::RoleChanged { role, term } => format!("role {role:?} (term {term})"),
        Event::ParentChanged { parent } => format!("parent {}", parent.as_ref().map_or("none".into(), &name)),
        Event::Joined { parent, term } => {
            format!("joined under {} (term {term})", parent.as_ref().map_or("none (root)".into(), &name))
        }
        Event::MemberJoined(id) => format!("child {} joined", name(id)),
        Event::MemberLeft(id) => format!("child {} left", name(id)),
        Event::ParentFailed(id) => format!("parent {} failed", name(id)),
        Event::PlacementResult { tag, candidates } => format!("placement {tag}: {} candidates", candidates.len()),
        Event::Route(e) => format!("route {e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_overlay::message::Refuse;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn name(id: &NodeId) -> String {
        format!("n{}", u64::from_be_bytes(id.as_bytes().try_into().unwrap()))
    }

    #[test]
    fn names_kinds_and_the_nodes_tree_messages_point_to() {
        assert_eq!(describe(&Message::Refuse(Refuse::NotInTree), name), "Refuse NotInTree");
        let event = Event::ParentChanged { parent: Some(NodeId::from_u64(48)) };
        assert_eq!(describe_event(&event, name), "parent n48");
        assert_eq!(describe_event(&Event::ParentChanged { parent: None }, name), "parent none");
    }

    #[test]
    fn subnet_messages_show_their_blocks() {
        use canopy_overlay::routing::Purpose;
        let net = |s: &str| s.parse().unwrap();
        let routes = |m| Message::Routes(Box::new(m));
        let reply = RoutesMessage::SubnetReply {
            granted: vec![
                Granted { purpose: Purpose::Machine, block: net("10.16.0.0/26"), replaces: Some(net("10.17.0.0/26")) },
                Granted { purpose: Purpose::Block, block: net("10.18.0.0/24"), replaces: Some(net("10.18.0.0/24")) },
            ],
            refused: vec![],
        };
        assert_eq!(
            describe(&routes(reply), name),
            concat!(
                "Routes.SubnetReply granted [Machine 10.16.0.0/26 replacing 10.17.0.0/26, ",
                "Block 10.18.0.0/24 kept] refused 0"
            )
        );
        let claim = Want {
            purpose: Purpose::Block,
            prefix: 26,
            replaces: Some(net("10.17.0.0/26")),
            on_behalf: Some(NodeId::from_u64(7)),
        };
        assert_eq!(
            describe(&routes(RoutesMessage::SubnetWant(vec![claim])), name),
            "Routes.SubnetWant [Block /26 replacing 10.17.0.0/26 for n7]"
        );
        let moved = RoutesMessage::Moved { old: net("10.17.0.0/26"), new: Some(net("10.19.0.0/26")) };
        assert_eq!(describe(&routes(moved), name), "Routes.Moved 10.17.0.0/26 -> 10.19.0.0/26");
        let handed = RoutesMessage::SubnetHandOver(vec![(net("10.17.0.0/26"), NodeId::from_u64(7))]);
        assert_eq!(describe(&routes(handed), name), "Routes.SubnetHandOver [10.17.0.0/26 for n7]");
    }

    #[test]
    fn only_the_chosen_nodes_are_traced_and_lines_reach_the_sink() {
        let lines = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&lines);
        let mut tracer = Tracer::new(&[3, 7], move |line| seen.borrow_mut().push(line.to_string()));
        assert!(tracer.traces(3) && tracer.traces(7));
        assert!(!tracer.traces(4) && !tracer.traces(8) && !tracer.traces(1000));
        tracer.emit(1_500_000_000, 7, "parent none".into());
        assert_eq!(lines.borrow().as_slice(), ["     1.500 s  n7      parent none"]);
    }
}
