//! Wire messages between overlay nodes: serde types encoded as CBOR (ciborium), versioned, size-limited.

use crate::grids::{GroupGrids, PlacementCandidate, PlacementQuery, SubtreeGrid};
use crate::id::NodeId;
use crate::node::NodeInfo;
use crate::rank::Rank;
use crate::summary::Summary;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Bumped on every incompatible change; a node drops envelopes with another version (and counts them). 2: group
/// grids may be differences from a version the child holds, which a version 1 node would take for the whole group.
pub const PROTOCOL_VERSION: u16 = 2;

/// Largest encoded envelope we accept or produce.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Bounds checked after decoding, so a peer cannot make us hold or iterate over absurd lists.
pub const MAX_MEMBERS: usize = 1024;
pub const MAX_ANCESTORS: usize = 64;
pub const MAX_ADDRS: usize = 16;
pub const MAX_ADDR_LEN: usize = 512;
const MAX_NESTING: usize = 32;

/// What travels on the wire. `id` is unique per sender, so a receiver drops duplicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub id: u64,
    pub from: NodeId,
    pub body: Message,
}

/// The protocol's messages. Big payloads are boxed so that queued envelopes stay small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Find me a parent. Travels up to the root, then down towards the nearest subtree with room.
    JoinRequest(Box<JoinRequest>),
    /// You are my child now (answer to `JoinRequest` or `Attach`).
    Accept(Box<Accept>),
    /// Your join or attach was not taken.
    Refuse(Refuse),
    /// Make me your child directly (succession, split, handover, reconnect).
    Attach(Box<Attach>),
    /// Parent -> child, every heartbeat interval; carries the full view only when the child's copy is stale.
    Heartbeat(Heartbeat),
    /// Child -> parent, every heartbeat interval.
    Report(Report),
    /// Answer to a heartbeat or report from someone who is not my parent/child (any more).
    NotYourChild(Box<NotYourChild>),
    /// Direct liveness probe and its answer.
    Probe {
        seq: u64,
    },
    ProbeAck {
        seq: u64,
    },
    /// SWIM ping-req: "can you reach `target`?", and the answer.
    ProbeRequest {
        target: NodeId,
        seq: u64,
    },
    ProbeResult {
        target: NodeId,
        seq: u64,
        alive: bool,
    },
    /// Attach to `to` instead of me (split, graceful leave, step-down, a collapsed chain link). The receiver keeps me
    /// as its parent until `to` accepts it.
    Redirect {
        to: Box<NodeInfo>,
    },
    /// Graceful leave of a coordinator: you take my place with `term`; `ancestors` are mine (root first).
    Handover {
        term: u64,
        ancestors: Vec<NodeInfo>,
    },
    /// I am leaving you (a child leaving its parent, or a parent dropping a child that attached elsewhere).
    Leaving,
    /// Routes and addresses: grants, registry, queries (see `routing`).
    Routes(Box<crate::routing::RoutesMessage>),
    /// A placement search walking the tree (see `grids`).
    PlacementQuery(Box<PlacementQuery>),
    /// A machine that fits a placement query, sent straight to the query's origin.
    PlacementAnswer {
        query: u64,
        candidate: Box<PlacementCandidate>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub joiner: NodeInfo,
    pub rank: Rank,
    /// The joiner's subtree (it may bring children along).
    pub summary: Summary,
    /// Set when the joiner is the root of another tree: trees merge so that the higher claim stays root.
    pub root_claim: Option<RootClaim>,
    /// The member the joiner sent this to first, so the joiner learns when a contact is in its own tree.
    pub contact: NodeId,
    pub descending: bool,
    pub hops: u8,
}

/// Which root stays root when two trees meet: the bigger tree (by `floor(log2(size))`, so that small changes in
/// size do not flip the order), then the higher term, then the higher id. Size first, so that a lone coordinator
/// that was cut off (and raised its term while islanded) rejoins the main tree instead of taking it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RootClaim {
    pub size_class: u8,
    pub term: u64,
    pub id: NodeId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accept {
    pub parent: NodeInfo,
    /// The parent's term.
    pub term: u64,
    pub view: View,
}

/// What a child knows about its place: the chain above it and its group.
///
/// The lists are shared (`Arc`): one view goes to every child of a group, and the child keeps the lists as they
/// came (and passes its group on as its children's uncles) without copying them. On the wire they are plain lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub version: u64,
    /// Root first, the parent last.
    pub ancestors: Arc<[NodeInfo]>,
    /// The parent's children (the receiver included), with their ranks: every child computes the same successor.
    pub members: Arc<[Member]>,
    /// The parent's own siblings: contacts to merge with when a partition islands several parts of the tree.
    pub uncles: Arc<[Member]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub info: NodeInfo,
    pub rank: Rank,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refuse {
    /// The receiver is not in a tree (joining or recovering itself); try another contact.
    NotInTree,
    /// The joiner's request came back to itself: the contact is in its own tree.
    SameTree,
    /// Your tree's root outranks mine: I join you instead.
    LowerRoot,
    /// You are one of my ancestors.
    Cycle,
    /// Too many hops.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attach {
    pub info: NodeInfo,
    pub rank: Rank,
    pub summary: Summary,
    /// Succession: the failed coordinator whose place the sender takes (its old parent drops it).
    pub replaces: Option<NodeId>,
    /// Orphan attaching to the successor it computed: its failed parent (the receiver takes over at once).
    pub orphaned_from: Option<NodeId>,
    /// The sender's term (successor: the failed coordinator's term + 1).
    pub term: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub term: u64,
    pub view_version: u64,
    /// The full view, when the child reported an older version (shared by the heartbeats of one round).
    pub view: Option<Arc<View>>,
    /// The group's address block (filled in by the routes issue).
    pub address_block: Option<Ipv4Net>,
    /// The children's subtree grids and the grid of the rest of the tree, when the child lacks the current version:
    /// the whole group, or what changed since the version it holds (see `grids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grids: Option<Arc<GroupGrids>>,
    /// Sent between two rounds because the view changed: it does not start the child's tick (see `Node::on_heartbeat`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub between_rounds: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The view version the child holds; the parent resends the view when it differs.
    pub view_version: u64,
    pub rank: Rank,
    pub summary: Summary,
    /// The child's subtree grid, when it changed significantly or is due for a refresh (see `grids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<Box<SubtreeGrid>>,
    /// The version of the parent's group grids the child holds (0: none); the parent resends when it differs.
    #[serde(default)]
    pub group_version: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotYourChild {
    /// Set when the receiver was replaced by a successor: it must step down.
    pub replaced_by: Option<NodeInfo>,
    pub term: u64,
    /// `false` when the sender is not in a tree at all (it restarted and lost its state): its old children
    /// treat it as failed and run succession.
    pub in_tree: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("protocol version {0} is not supported (this node speaks {PROTOCOL_VERSION})")]
    Version(u16),
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128);
        ciborium::into_writer(self, &mut buf).expect("writing CBOR into a Vec cannot fail");
        buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let env: Envelope = ciborium::de::from_reader_with_recursion_limit(bytes, MAX_NESTING)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if env.version != PROTOCOL_VERSION {
            return Err(DecodeError::Version(env.version));
        }
        env.body.validate().map_err(|what| DecodeError::Malformed(what.to_string()))?;
        Ok(env)
    }
}

fn check_info(info: &NodeInfo) -> Result<(), &'static str> {
    if info.addrs.len() > MAX_ADDRS || info.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN) {
        return Err("too many or too long addresses");
    }
    if !info.position.lat.is_finite() || !info.position.lon.is_finite() {
        return Err("position is not finite");
    }
    Ok(())
}

fn check_view(view: &View) -> Result<(), &'static str> {
    if view.ancestors.len() > MAX_ANCESTORS || view.members.len() > MAX_MEMBERS || view.uncles.len() > MAX_MEMBERS {
        return Err("view too long");
    }
    view.ancestors.iter().try_for_each(check_info)?;
    view.members.iter().chain(view.uncles.iter()).try_for_each(|m| check_info(&m.info))
}

impl Message {
    /// Bounds and sanity checks beyond what the types express.
    pub fn validate(&self) -> Result<(), &'static str> {
        let summary_ok = |s: &Summary| if s.is_valid() { Ok(()) } else { Err("invalid summary") };
        match self {
            Message::JoinRequest(r) => {
                check_info(&r.joiner)?;
                summary_ok(&r.summary)
            }
            Message::Accept(a) => {
                check_info(&a.parent)?;
                check_view(&a.view)
            }
            Message::Attach(a) => {
                check_info(&a.info)?;
                summary_ok(&a.summary)
            }
            Message::Heartbeat(h) => {
                if h.grids.as_ref().is_some_and(|g| !g.is_valid()) {
                    return Err("invalid group grids");
                }
                h.view.as_deref().map_or(Ok(()), check_view)
            }
            Message::Report(r) => {
                if r.grid.as_ref().is_some_and(|g| !g.is_valid()) {
                    return Err("invalid subtree grid");
                }
                summary_ok(&r.summary)
            }
            Message::PlacementQuery(q) => q.is_valid().then_some(()).ok_or("invalid placement query"),
            Message::PlacementAnswer { candidate, .. } => {
                candidate.is_valid().then_some(()).ok_or("invalid placement candidate")
            }
            Message::NotYourChild(n) => n.replaced_by.as_ref().map_or(Ok(()), check_info),
            Message::Redirect { to } => check_info(to),
            Message::Handover { ancestors, .. } => {
                if ancestors.len() > MAX_ANCESTORS {
                    return Err("too many ancestors");
                }
                ancestors.iter().try_for_each(check_info)
            }
            Message::Routes(m) => m.validate(),
            Message::Refuse(_)
            | Message::Probe { .. }
            | Message::ProbeAck { .. }
            | Message::ProbeRequest { .. }
            | Message::ProbeResult { .. }
            | Message::Leaving => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_policies::{Capacity, Position};
    use proptest::prelude::*;
    use std::time::Duration;

    fn info(n: u64) -> NodeInfo {
        NodeInfo {
            id: NodeId::from_u64(n),
            addrs: vec![format!("/ip4/10.0.0.{n}/udp/4001/quic-v1")],
            position: Position::new(48.0, 11.0),
            capacity: Capacity { cpu: 4.0, mem_mb: 8192.0, bandwidth_mbps: 1000.0 },
            reachable: true,
        }
    }

    fn env(body: Message) -> Envelope {
        Envelope { version: PROTOCOL_VERSION, id: 7, from: NodeId::from_u64(1), body }
    }

    fn samples() -> Vec<Message> {
        let rank = Rank::new(NodeId::from_u64(2), true, &info(2).capacity, Duration::from_secs(5));
        let summary = Summary::leaf(Position::new(1.0, 2.0));
        let view = View {
            version: 3,
            ancestors: Arc::from([info(1)]),
            members: Arc::from([Member { info: info(2), rank }]),
            uncles: Arc::default(),
        };
        vec![
            Message::JoinRequest(Box::new(JoinRequest {
                joiner: info(2),
                rank,
                summary,
                root_claim: Some(RootClaim { size_class: 3, term: 2, id: NodeId::from_u64(2) }),
                contact: NodeId::from_u64(3),
                descending: true,
                hops: 4,
            })),
            Message::Accept(Box::new(Accept { parent: info(1), term: 1, view: view.clone() })),
            Message::Refuse(Refuse::LowerRoot),
            Message::Attach(Box::new(Attach {
                info: info(2),
                rank,
                summary,
                replaces: Some(NodeId::from_u64(9)),
                orphaned_from: None,
                term: 4,
            })),
            Message::Heartbeat(Heartbeat {
                term: 1,
                view_version: 3,
                view: Some(Arc::new(view)),
                address_block: Some("10.17.0.0/20".parse().unwrap()),
                grids: None,
                between_rounds: true,
            }),
            Message::Report(Report { view_version: 3, rank, summary, grid: None, group_version: 2 }),
            Message::NotYourChild(Box::new(NotYourChild { replaced_by: Some(info(5)), term: 2, in_tree: true })),
            Message::Probe { seq: 1 },
            Message::ProbeAck { seq: 1 },
            Message::ProbeRequest { target: NodeId::from_u64(1), seq: 2 },
            Message::ProbeResult { target: NodeId::from_u64(1), seq: 2, alive: false },
            Message::Redirect { to: Box::new(info(4)) },
            Message::Handover { term: 5, ancestors: vec![info(1)] },
            Message::Leaving,
            Message::Report(Report {
                view_version: 3,
                rank,
                summary,
                grid: Some(Box::new(SubtreeGrid::Node { position: Position::new(1.0, 2.0), free: info(2).capacity })),
                group_version: 0,
            }),
            Message::Heartbeat(Heartbeat {
                term: 1,
                view_version: 3,
                view: None,
                address_block: None,
                grids: Some(std::sync::Arc::new(GroupGrids {
                    version: 4,
                    base: 0,
                    members: vec![(
                        NodeId::from_u64(2),
                        SubtreeGrid::Node { position: Position::new(1.0, 2.0), free: info(2).capacity },
                    )],
                    outside: Some(std::sync::Arc::new(canopy_policies::CapacityGrid::merge(&[
                        canopy_policies::GridInput::Node { position: Position::new(3.0, 4.0), free: info(3).capacity },
                    ]))),
                })),
                between_rounds: false,
            }),
            Message::PlacementQuery(Box::new(PlacementQuery {
                id: 1,
                origin: NodeId::from_u64(2),
                origin_addrs: vec!["sim:2".into()],
                near: Position::new(48.0, 11.0),
                demand: Capacity::new(1.0, 512.0, 0.0),
                want: 3,
                descending: false,
                hops: 0,
            })),
            Message::PlacementAnswer {
                query: 1,
                candidate: Box::new(PlacementCandidate {
                    node: NodeId::from_u64(3),
                    addrs: vec![],
                    position: Position::new(48.0, 11.0),
                    free: info(3).capacity,
                    distance_km: 0.0,
                }),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for body in samples() {
            let e = env(body);
            assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        }
    }

    #[test]
    fn envelopes_stay_small_in_memory() {
        assert!(std::mem::size_of::<Envelope>() <= 192, "{}", std::mem::size_of::<Envelope>());
    }

    #[test]
    fn periodic_heartbeat_and_report_are_small() {
        let hb = env(Message::Heartbeat(Heartbeat {
            term: 3,
            view_version: 9,
            view: None,
            address_block: None,
            grids: None,
            between_rounds: false,
        }));
        assert!(hb.encode().len() < 128, "{} bytes", hb.encode().len());
        let rank = Rank::new(NodeId::from_u64(2), true, &info(2).capacity, Duration::from_secs(5));
        let rep = env(Message::Report(Report {
            view_version: 9,
            rank,
            summary: Summary::leaf(Position::new(1.0, 2.0)),
            grid: None,
            group_version: 12,
        }));
        assert!(rep.encode().len() < 256, "{} bytes", rep.encode().len());
    }

    #[test]
    fn rejects_wrong_version_oversize_garbage_and_bad_content() {
        let mut e = env(Message::Leaving);
        e.version = PROTOCOL_VERSION + 1;
        assert!(matches!(Envelope::decode(&e.encode()), Err(DecodeError::Version(_))));
        assert!(matches!(Envelope::decode(&vec![0u8; MAX_MESSAGE_BYTES + 1]), Err(DecodeError::TooLarge(_))));
        assert!(matches!(Envelope::decode(&[0xff, 0x00, 0x13]), Err(DecodeError::Malformed(_))));
        assert!(matches!(Envelope::decode(&[]), Err(DecodeError::Malformed(_))));
        let mut bad = info(3);
        bad.position.lat = f64::NAN;
        assert!(matches!(
            Envelope::decode(&env(Message::Redirect { to: Box::new(bad) }).encode()),
            Err(DecodeError::Malformed(_))
        ));
        let mut many = info(3);
        many.addrs = vec!["x".into(); MAX_ADDRS + 1];
        assert!(Envelope::decode(&env(Message::Redirect { to: Box::new(many) }).encode()).is_err());
        // Deeply nested arrays must hit the recursion limit, not the stack.
        let nested = [vec![0x81u8; 10_000], vec![0x00]].concat();
        assert!(Envelope::decode(&nested).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Envelope::decode(&bytes);
        }

        #[test]
        fn corrupted_messages_never_panic(idx in 0usize..18, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = env(samples()[idx].clone()).encode();
            for (pos, val) in flips {
                let n = bytes.len();
                bytes[pos % n] = val;
            }
            let _ = Envelope::decode(&bytes);
        }
    }
}
