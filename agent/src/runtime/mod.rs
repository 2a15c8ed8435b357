//! The agent runtime: one tokio task owns the libp2p swarm and the sans-IO overlay `Node`, and the rest of the
//! program (local API, CLI) talks to it through a cloneable [`Handle`] with command and reply channels (the shape of
//! rust-libp2p's `examples/file-sharing`).

pub mod admission;
pub mod api;
pub mod behaviour;
pub mod codec;
pub mod driver;
pub mod metrics;
pub mod report;

use anyhow::anyhow;
use canopy_overlay::NodeId;
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

pub use report::{PeerReport, StatusReport, TreeReport};

/// What the API asks the swarm task.
#[derive(Debug)]
pub enum Request {
    Status(oneshot::Sender<StatusReport>),
    Peers(oneshot::Sender<Vec<PeerReport>>),
    Tree(oneshot::Sender<TreeReport>),
    /// Leave the overlay gracefully, then stop the agent.
    Leave(oneshot::Sender<()>),
    /// A routes command for the overlay (from the tree-routes task); its answers come back as route events.
    Route(canopy_overlay::routing::RouteCommand),
    /// This machine's free capacity changed (from the capacity monitor).
    SetCapacity(canopy_overlay::Capacity),
    /// The capacity grids this node holds.
    Grids(oneshot::Sender<crate::grid_view::GridsReport>),
    /// Start a placement query; the result goes to the waiter registered under `tag` in `grid_view`.
    Placement(crate::grid_view::PlacementRequest),
}

/// A cloneable way to talk to the swarm task.
#[derive(Debug, Clone)]
pub struct Handle {
    requests: mpsc::Sender<Request>,
}

impl Handle {
    pub fn new(requests: mpsc::Sender<Request>) -> Self {
        Self { requests }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> anyhow::Result<T> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(make(reply)).await.map_err(|_| anyhow!("the agent is shutting down"))?;
        answer.await.map_err(|_| anyhow!("the agent is shutting down"))
    }

    pub async fn status(&self) -> anyhow::Result<StatusReport> {
        self.ask(Request::Status).await
    }

    pub async fn peers(&self) -> anyhow::Result<Vec<PeerReport>> {
        self.ask(Request::Peers).await
    }

    pub async fn tree(&self) -> anyhow::Result<TreeReport> {
        self.ask(Request::Tree).await
    }

    pub async fn leave(&self) -> anyhow::Result<()> {
        self.ask(Request::Leave).await
    }

    pub async fn route(&self, command: canopy_overlay::routing::RouteCommand) -> anyhow::Result<()> {
        self.requests.send(Request::Route(command)).await.map_err(|_| anyhow!("the agent is shutting down"))
    }

    pub async fn set_capacity(&self, free: canopy_overlay::Capacity) -> anyhow::Result<()> {
        self.requests.send(Request::SetCapacity(free)).await.map_err(|_| anyhow!("the agent is shutting down"))
    }

    pub async fn grids(&self) -> anyhow::Result<crate::grid_view::GridsReport> {
        self.ask(Request::Grids).await
    }

    /// Machines near `query.near` that can host `query.demand`, nearest first (waits for the overlay's query).
    pub async fn placement(
        &self,
        query: crate::grid_view::PlacementQuery,
    ) -> anyhow::Result<Vec<canopy_overlay::grids::PlacementCandidate>> {
        let (request, answer) = crate::grid_view::PlacementRequest::new(query);
        self.requests.send(Request::Placement(request)).await.map_err(|_| anyhow!("the agent is shutting down"))?;
        answer.wait().await
    }
}

/// The overlay names nodes by the bytes of their libp2p peer id.
pub fn node_id(peer: &PeerId) -> NodeId {
    NodeId::from_bytes(&peer.to_bytes()).expect("an Ed25519 peer id fits in a NodeId")
}

/// `None` for ids that are not peer ids (only the simulator makes those).
pub fn peer_id(node: &NodeId) -> Option<PeerId> {
    PeerId::from_bytes(node.as_bytes()).ok()
}

/// A node id for display: its peer id when it is one.
pub fn node_name(node: &NodeId) -> String {
    peer_id(node).map(|p| p.to_string()).unwrap_or_else(|| node.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_and_node_ids_convert_both_ways() {
        let peer = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
        let node = node_id(&peer);
        assert_eq!(peer_id(&node), Some(peer));
        assert_eq!(node_name(&node), peer.to_string());
        assert_eq!(peer_id(&NodeId::from_u64(3)), None);
    }
}
