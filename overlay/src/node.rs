//! The overlay node state machine. (Skeleton: the tree protocol is being filled in.)

use crate::Time;
use crate::id::NodeId;
use crate::message::{Envelope, Message};
use canopy_policies::{Capacity, Position};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

/// Tunables. Defaults follow the design: 1 s heartbeats, 16 children per coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub heartbeat_interval: Duration,
    pub max_children: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { heartbeat_interval: Duration::from_secs(1), max_children: 16 }
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
    /// Join the overlay through any member.
    Join { via: NodeId },
    /// Leave gracefully (a coordinator hands its role over first).
    Leave,
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
    RoleChanged { role: Role, term: u64 },
    ParentChanged { parent: Option<NodeId> },
    MemberJoined(NodeId),
    MemberLeft(NodeId),
}

/// A snapshot for `agent status` and the simulator's checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: u64,
    pub parent: Option<NodeId>,
    pub children: Vec<NodeId>,
    pub ancestors: Vec<NodeId>,
}

pub struct Node {
    info: NodeInfo,
    #[allow(dead_code)]
    config: Config,
    outputs: VecDeque<Output>,
    next_msg_id: u64,
}

impl Node {
    pub fn new(info: NodeInfo, config: Config, _seed: u64, _now: Time) -> Self {
        Self { info, config, outputs: VecDeque::new(), next_msg_id: 0 }
    }

    pub fn id(&self) -> NodeId {
        self.info.id
    }

    pub fn handle(&mut self, _now: Time, _input: Input) {}

    /// The earliest time at which [`Node::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Time> {
        None
    }

    pub fn handle_timeout(&mut self, _now: Time) {}

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    pub fn status(&self) -> Status {
        Status { id: self.info.id, role: Role::Detached, term: 0, parent: None, children: vec![], ancestors: vec![] }
    }

    #[allow(dead_code)]
    fn envelope(&mut self, body: Message) -> Envelope {
        self.next_msg_id += 1;
        Envelope { version: crate::PROTOCOL_VERSION, id: self.next_msg_id, from: self.info.id, body }
    }
}
