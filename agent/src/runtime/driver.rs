//! The swarm task: owns the libp2p swarm and the overlay `Node`, moves messages between them, runs admission,
//! bootstraps (join with bounded retries), answers API requests and persists tree hints.
//!
//! Nothing in here blocks: the overlay core is called synchronously and returns at once; all waiting happens in one
//! `tokio::select!` over swarm events, API requests, the overlay's next timer and a housekeeping tick.

use super::admission::{Admission, Challenge, NetworkKey, Proof, Verdict};
use super::behaviour::{Behaviour, BehaviourEvent};
use super::metrics::Metrics;
use super::report::{Counters, PeerReport, StatusReport, TreeReport};
use super::{Request, node_id, node_name, peer_id};
use crate::persist::{KnownPeer, State, StateStore};
use anyhow::{Context, anyhow, bail};
use canopy_overlay::routing::RouteCommand;
use canopy_overlay::{Command, Envelope, Event, Input, Node, NodeId, NodeInfo, Output, Role, Status};
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionError, ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, mdns, ping, request_response};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Messages held per peer while its admission runs; more are dropped (and counted).
const MAX_QUEUED_PER_PEER: usize = 64;
/// How long one bootstrap attempt may take before we try again.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(16);
/// How long listeners may take to come up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the leave hand-over to go out before the agent stops.
const LEAVE_GRACE: Duration = Duration::from_millis(1500);
/// A refused peer gets its answer before we close the connection, so it can tell the operator why.
const REFUSE_GRACE: Duration = Duration::from_secs(2);
/// How long a failing agent keeps answering admission challenges before it exits.
const LINGER: Duration = Duration::from_millis(500);
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(2);
/// Peers written to the state file for rejoining after a restart.
const MAX_KNOWN_PEERS: usize = 16;

/// How this agent enters the overlay.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Become the root of a new overlay, unless the data dir remembers tree peers that still answer (then rejoin
    /// through them: a restarted former root must not split the overlay).
    Start,
    /// Join through any member.
    Join { bootstrap: Vec<Multiaddr>, label: String },
}

pub struct DriverConfig {
    pub network_key: NetworkKey,
    pub listen: Vec<Multiaddr>,
    pub mode: Mode,
    pub position: canopy_overlay::Position,
    pub capacity: canopy_overlay::Capacity,
    pub overlay: canopy_overlay::Config,
    pub bootstrap_attempts: u32,
    pub state: StateStore,
    pub metrics: Arc<Metrics>,
    /// Where the overlay's route events go (the tree-routes task); `None`: control plane only.
    pub route_events: Option<crate::tree_routes::EventSink>,
    /// Machine subnets this node held before it restarted: asked back before it starts or joins.
    pub restore_subnets: Vec<ipnet::Ipv4Net>,
}

/// A place to bootstrap through.
#[derive(Debug, Clone)]
struct Target {
    peer: Option<PeerId>,
    addrs: Vec<Multiaddr>,
    label: String,
}

#[derive(Debug)]
enum Phase {
    /// Dialing bootstrap targets; `dials` are this attempt's outstanding dials.
    Bootstrapping {
        targets: Vec<Target>,
        attempt: u32,
        max_attempts: u32,
        /// When nobody answers: become root (a restarted `start`) instead of failing.
        fall_back_to_root: bool,
        dials: HashSet<ConnectionId>,
        /// Connected peers from this attempt, waiting for admission.
        candidates: HashMap<PeerId, String>,
        deadline: Instant,
        retry_at: Option<Instant>,
        last_error: String,
    },
    Member,
    Leaving {
        until: Instant,
    },
}

#[derive(Debug, Default)]
struct PeerEntry {
    addrs: Vec<Multiaddr>,
    rtt: Option<Duration>,
    /// Overlay messages waiting for this peer's admission (outbound: we have not verified it yet).
    outbox: VecDeque<Vec<u8>>,
    /// Envelopes that arrived before we verified this peer.
    inbox: VecDeque<Envelope>,
    dialing: bool,
}

pub struct Driver {
    swarm: Swarm<Behaviour>,
    node: Node,
    local: PeerId,
    epoch: Instant,
    admission: Admission,
    peers: HashMap<PeerId, PeerEntry>,
    phase: Phase,
    requests: mpsc::Receiver<Request>,
    metrics: Arc<Metrics>,
    state_store: StateStore,
    saved_state: State,
    listen_addrs: Vec<Multiaddr>,
    info: NodeInfo,
    to_disconnect: Vec<(Instant, PeerId)>,
    route_events: Option<crate::tree_routes::EventSink>,
}

impl Driver {
    /// Opens the listeners and builds the overlay node with the addresses it will advertise.
    pub async fn new(
        mut swarm: Swarm<Behaviour>,
        config: DriverConfig,
        requests: mpsc::Receiver<Request>,
    ) -> anyhow::Result<Self> {
        let local = *swarm.local_peer_id();
        let listen_addrs = open_listeners(&mut swarm, &config.listen).await?;
        let epoch = Instant::now();
        let info = NodeInfo {
            id: node_id(&local),
            addrs: listen_addrs.iter().map(|a| a.to_string()).collect(),
            position: config.position,
            capacity: config.capacity,
            // Without NAT detection we only know that we listen on a non-loopback address.
            reachable: listen_addrs.iter().any(is_routable),
        };
        let mut node = Node::new(info.clone(), config.overlay.clone(), rand::random(), Duration::ZERO);
        if !config.restore_subnets.is_empty() {
            tracing::info!(subnets = ?config.restore_subnets, "asking the tree for this machine's previous subnet");
            let restore = RouteCommand::RestoreSubnets(config.restore_subnets.clone());
            node.handle(Duration::ZERO, Input::Command(Command::Route(restore)));
        }
        let saved_state = config.state.load()?;
        let known: Vec<Target> = saved_state
            .known_peers
            .iter()
            .filter_map(|k| {
                let peer: PeerId = k.peer_id.parse().ok()?;
                let addrs: Vec<Multiaddr> = k.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                (!addrs.is_empty() && peer != local).then(|| Target {
                    peer: Some(peer),
                    addrs,
                    label: k.peer_id.clone(),
                })
            })
            .collect();
        // The overlay retries these when it finds itself detached or islanded.
        for target in &known {
            if let Some(peer) = target.peer {
                node.handle(Duration::ZERO, Input::Command(Command::AddContact(node_id(&peer))));
            }
        }
        let phase = match &config.mode {
            Mode::Start if known.is_empty() => Phase::Member,
            Mode::Start => Phase::Bootstrapping {
                targets: known,
                attempt: 0,
                max_attempts: 2,
                fall_back_to_root: true,
                dials: HashSet::new(),
                candidates: HashMap::new(),
                deadline: epoch,
                retry_at: Some(epoch),
                last_error: String::new(),
            },
            Mode::Join { bootstrap, label } => {
                let mut targets = vec![Target { peer: None, addrs: bootstrap.clone(), label: label.clone() }];
                targets.extend(known);
                Phase::Bootstrapping {
                    targets,
                    attempt: 0,
                    max_attempts: config.bootstrap_attempts.max(1),
                    fall_back_to_root: false,
                    dials: HashSet::new(),
                    candidates: HashMap::new(),
                    deadline: epoch,
                    retry_at: Some(epoch),
                    last_error: String::new(),
                }
            }
        };
        let mut driver = Self {
            swarm,
            node,
            local,
            epoch,
            admission: Admission::new(config.network_key, local),
            peers: HashMap::new(),
            phase,
            requests,
            metrics: config.metrics,
            state_store: config.state,
            saved_state,
            listen_addrs,
            info,
            to_disconnect: Vec::new(),
            route_events: config.route_events,
        };
        if matches!(driver.phase, Phase::Member) {
            tracing::info!("starting a new overlay as its root");
            driver.node.handle(Duration::ZERO, Input::Command(Command::Start));
        } else if matches!(config.mode, Mode::Start) {
            tracing::info!("the data dir remembers tree peers: trying to rejoin through them before starting anew");
        }
        Ok(driver)
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    fn now(&self) -> Duration {
        Instant::now().duration_since(self.epoch)
    }

    /// Runs until `shutdown` resolves, the node has left, or a fatal error (bootstrap refused or unreachable).
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.drain_outputs();
            if let Phase::Leaving { until } = self.phase
                && Instant::now() >= until
            {
                self.saved_state.known_peers.clear();
                self.save_state(true);
                tracing::info!("left the overlay");
                return Ok(());
            }
            let overlay_deadline = self.node.poll_timeout().map(|t| self.epoch + t);
            let phase_deadline = self.phase_deadline();
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    if let Err(err) = self.on_swarm_event(event) {
                        self.linger().await;
                        return Err(err);
                    }
                }
                request = self.requests.recv() => match request {
                    Some(request) => self.on_request(request),
                    None => return Ok(()),
                },
                _ = sleep_until(overlay_deadline) => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                }
                _ = sleep_until(phase_deadline) => self.on_phase_deadline()?,
                _ = housekeeping.tick() => self.housekeeping(),
                _ = &mut shutdown => {
                    self.save_state(true);
                    tracing::info!("stopping (state saved; a restart rejoins the tree)");
                    return Ok(());
                }
            }
        }
    }

    /// Before a fatal exit: answer challenges for a moment more, so the peer that refused us learns why too.
    async fn linger(&mut self) {
        let until = Instant::now() + LINGER;
        while let Ok(event) = tokio::time::timeout_at(until, self.swarm.select_next_some()).await {
            if let SwarmEvent::Behaviour(BehaviourEvent::Admit(event)) = event {
                let _ = self.on_admit_event(event);
            }
        }
    }

    // ---- overlay outputs ----

    fn drain_outputs(&mut self) {
        while let Some(output) = self.node.poll_output() {
            match output {
                Output::Send { to, envelope } => self.send(to, envelope),
                Output::Event(event) => self.on_overlay_event(event),
            }
        }
        self.metrics.set_protocol(self.node.counters(), self.node.routing().counters());
    }

    fn send(&mut self, to: NodeId, envelope: Envelope) {
        let Some(peer) = peer_id(&to) else {
            self.metrics.dropped("unreachable");
            return;
        };
        if peer == self.local {
            // The overlay may address itself in corner cases; deliver without a network hop.
            let now = self.now();
            self.node.handle(now, Input::Message { from: to, envelope });
            return;
        }
        let bytes = envelope.encode();
        if self.admission.is_admitted(&peer) && self.swarm.is_connected(&peer) {
            self.swarm.behaviour_mut().overlay.send_request(&peer, bytes);
            self.metrics.messages_sent.inc();
            return;
        }
        let connected = self.swarm.is_connected(&peer);
        let entry = self.peers.entry(peer).or_default();
        if entry.outbox.len() >= MAX_QUEUED_PER_PEER {
            entry.outbox.pop_front();
            self.metrics.dropped("queue_full");
        }
        entry.outbox.push_back(bytes);
        if !connected && !entry.dialing {
            self.dial_peer(peer);
        }
    }

    fn dial_peer(&mut self, peer: PeerId) {
        let addrs = self.addresses_for(&peer);
        let entry = self.peers.entry(peer).or_default();
        entry.dialing = true;
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(err) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "cannot dial: {err}");
            self.on_unreachable(peer);
        }
    }

    /// Addresses we know for a peer: what the overlay passed on (its own advertisement), then what we learned
    /// from its connections and identify.
    fn addresses_for(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> =
            self.node.addresses_of(&node_id(peer)).unwrap_or_default().iter().filter_map(|a| a.parse().ok()).collect();
        for addr in self.peers.get(peer).map(|e| e.addrs.as_slice()).unwrap_or_default() {
            if !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
        }
        addrs
    }

    fn on_unreachable(&mut self, peer: PeerId) {
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.dialing = false;
            for _ in entry.outbox.drain(..) {
                self.metrics.dropped("unreachable");
            }
        }
        let now = self.now();
        self.node.handle(now, Input::PeerLost(node_id(&peer)));
    }

    fn on_overlay_event(&mut self, event: Event) {
        if let Event::Route(route_event) = event {
            tracing::debug!(event = ?route_event, "route event");
            if let Some(sink) = &self.route_events {
                sink.send(route_event);
            }
            return;
        }
        if let Event::PlacementResult { tag, candidates } = event {
            crate::grid_view::placement_done(tag, candidates);
            return;
        }
        match &event {
            Event::RoleChanged { role, term } => {
                tracing::info!(role = ?role, term, "role changed");
                self.metrics.role.set(role_number(*role));
                self.metrics.term.set(*term as i64);
            }
            Event::ParentChanged { parent } => {
                tracing::info!(parent = ?parent.as_ref().map(node_name), "parent changed");
            }
            Event::Joined { parent, term } => {
                tracing::info!(parent = ?parent.as_ref().map(node_name), term, "attached to the tree");
            }
            Event::ParentFailed(parent) => {
                tracing::warn!(parent = %node_name(parent), "parent declared dead; recovering");
            }
            other => tracing::debug!(event = ?other, "overlay event"),
        }
        // Persist role changes at once: they are what a restart needs.
        self.save_state(false);
    }

    // ---- swarm events ----

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> anyhow::Result<()> {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Admit(event)) => self.on_admit_event(event)?,
            SwarmEvent::Behaviour(BehaviourEvent::Overlay(event)) => self.on_overlay_rr_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                for addr in info.listen_addrs {
                    self.learn_address(peer_id, addr.clone());
                    if self.admission.is_admitted(&peer_id) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. })) => {
                self.peers.entry(peer).or_default().rtt = Some(rtt);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "found on the LAN");
                    self.learn_address(peer, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, addresses, .. })) => {
                for addr in addresses.iter() {
                    self.learn_address(peer, addr.clone());
                }
            }
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.learn_address(peer_id, address.clone());
                }
                if let Some(entry) = self.peers.get_mut(&peer_id) {
                    entry.dialing = false;
                }
                self.metrics.connected_peers.set(self.swarm.connected_peers().count() as i64);
                self.note_bootstrap_connection(peer_id, connection_id);
                if num_established.get() == 1 {
                    self.begin_admission(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, cause, .. } => {
                self.metrics.connected_peers.set(self.swarm.connected_peers().count() as i64);
                if num_established == 0 {
                    // An idle link closing is not a failure; a tree link never idles (heartbeats).
                    let lost = !matches!(cause, Some(ConnectionError::KeepAliveTimeout));
                    if lost && self.admission.is_admitted(&peer_id) {
                        tracing::debug!(peer = %peer_id, ?cause, "connection lost");
                        let now = self.now();
                        self.node.handle(now, Input::PeerLost(node_id(&peer_id)));
                    }
                    self.admission.forget(&peer_id);
                    if let Some(entry) = self.peers.get_mut(&peer_id) {
                        entry.inbox.clear();
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                let is_bootstrap = self.note_bootstrap_dial_failure(connection_id, &error.to_string());
                if let Some(peer) = peer_id
                    && !is_bootstrap
                    && !self.swarm.is_connected(&peer)
                {
                    tracing::debug!(%peer, "dial failed: {error}");
                    self.on_unreachable(peer);
                }
            }
            SwarmEvent::NewListenAddr { address, .. } if !self.listen_addrs.contains(&address) => {
                self.listen_addrs.push(address);
                self.advertise_addresses();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.advertise_addresses();
            }
            _ => {}
        }
        Ok(())
    }

    /// Tells the overlay our current addresses; they travel with our next report.
    fn advertise_addresses(&mut self) {
        self.info.addrs = self.listen_addrs.iter().map(|a| a.to_string()).collect();
        self.node.set_info(self.info.clone());
    }

    fn learn_address(&mut self, peer: PeerId, addr: Multiaddr) {
        let addr = without_p2p(addr);
        let entry = self.peers.entry(peer).or_default();
        if !entry.addrs.contains(&addr) {
            // Newest first, bounded.
            entry.addrs.insert(0, addr);
            entry.addrs.truncate(8);
        }
    }

    // ---- admission ----

    fn begin_admission(&mut self, peer: PeerId) {
        if let Some(challenge) = self.admission.on_connected(peer, rand::random()) {
            let bytes = encode_cbor(&challenge);
            self.swarm.behaviour_mut().admit.send_request(&peer, bytes);
        } else if self.admission.is_admitted(&peer) {
            self.on_admitted(peer);
        }
    }

    fn on_admit_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) -> anyhow::Result<()> {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message { peer, message: M::Request { request, channel, .. }, .. } => {
                match ciborium::from_reader::<Challenge, _>(&request[..]) {
                    Ok(challenge) => {
                        let proof = self.admission.answer(&peer, &challenge);
                        let _ = self.swarm.behaviour_mut().admit.send_response(channel, encode_cbor(&proof));
                    }
                    Err(_) => self.metrics.admission("malformed"),
                }
            }
            E::Message { peer, message: M::Response { response, .. }, .. } => {
                let verdict = match ciborium::from_reader::<Proof, _>(&response[..]) {
                    Ok(proof) => self.admission.on_proof(peer, &proof),
                    Err(_) => {
                        self.metrics.admission("malformed");
                        self.admission.on_failure(&peer);
                        return Ok(());
                    }
                };
                match verdict {
                    Verdict::Admitted => {
                        self.metrics.admission("admitted");
                        tracing::debug!(%peer, "peer admitted");
                        self.on_admitted(peer);
                    }
                    Verdict::Refused => {
                        self.metrics.admission("refused");
                        self.on_refused(peer)?;
                    }
                    Verdict::Unexpected => {}
                }
            }
            E::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "admission failed: {error}");
                self.admission.on_failure(&peer);
                self.metrics.admission("failed");
            }
            E::InboundFailure { .. } | E::ResponseSent { .. } => {}
        }
        Ok(())
    }

    fn on_admitted(&mut self, peer: PeerId) {
        let now = self.now();
        let node = node_id(&peer);
        for addr in self.addresses_for(&peer) {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        }
        self.node.handle(now, Input::PeerConnected(node));
        if self.admission.admitted_count() == 1 {
            // Kademlia needs one known member to start filling its table.
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
        let (outbox, inbox) = match self.peers.get_mut(&peer) {
            Some(entry) => (std::mem::take(&mut entry.outbox), std::mem::take(&mut entry.inbox)),
            None => Default::default(),
        };
        for envelope in inbox {
            self.metrics.messages_received.inc();
            self.node.handle(now, Input::Message { from: node, envelope });
        }
        for bytes in outbox {
            self.swarm.behaviour_mut().overlay.send_request(&peer, bytes);
            self.metrics.messages_sent.inc();
        }
        self.note_bootstrap_admitted(peer);
    }

    fn on_refused(&mut self, peer: PeerId) -> anyhow::Result<()> {
        if let Phase::Bootstrapping { candidates, .. } = &self.phase
            && let Some(label) = candidates.get(&peer)
        {
            bail!("the bootstrap peer {peer} at {label} refused our network key (wrong --network-key-file?)");
        }
        tracing::warn!(%peer, "refused peer: it does not know the network key; ignoring its tree messages");
        if let Some(entry) = self.peers.get_mut(&peer) {
            for _ in entry.inbox.drain(..) {
                self.metrics.dropped("not_member");
            }
            entry.outbox.clear();
        }
        self.to_disconnect.push((Instant::now() + REFUSE_GRACE, peer));
        Ok(())
    }

    // ---- tree messages ----

    fn on_overlay_rr_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message { peer, message: M::Request { request, channel, .. }, .. } => {
                // Acknowledge at once: the overlay has its own acks and timers; this only ends the stream.
                let _ = self.swarm.behaviour_mut().overlay.send_response(channel, Vec::new());
                self.on_tree_message(peer, &request);
            }
            E::Message { message: M::Response { .. }, .. } => {}
            E::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "tree message not delivered: {error}");
                self.metrics.dropped("send_failed");
                if matches!(error, request_response::OutboundFailure::DialFailure) {
                    self.on_unreachable(peer);
                }
            }
            E::InboundFailure { .. } | E::ResponseSent { .. } => {}
        }
    }

    fn on_tree_message(&mut self, peer: PeerId, bytes: &[u8]) {
        let envelope = match Envelope::decode(bytes) {
            Ok(envelope) => envelope,
            Err(err) => {
                tracing::debug!(%peer, "dropping tree message: {err}");
                self.metrics.dropped("malformed");
                self.node.record_decode_error(&err);
                return;
            }
        };
        let from = node_id(&peer);
        if envelope.from != from {
            // The transport authenticated `peer`; an envelope claiming another sender is forged.
            self.metrics.dropped("spoofed");
            return;
        }
        if self.admission.is_admitted(&peer) {
            self.metrics.messages_received.inc();
            let now = self.now();
            self.node.handle(now, Input::Message { from, envelope });
        } else if self.admission.is_pending(&peer) {
            let entry = self.peers.entry(peer).or_default();
            if entry.inbox.len() >= MAX_QUEUED_PER_PEER {
                entry.inbox.pop_front();
                self.metrics.dropped("queue_full");
            }
            entry.inbox.push_back(envelope);
        } else {
            self.metrics.dropped("not_member");
        }
    }

    // ---- bootstrapping ----

    fn phase_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Bootstrapping { retry_at: Some(at), .. } => Some(*at),
            Phase::Bootstrapping { deadline, .. } => Some(*deadline),
            Phase::Leaving { until } => Some(*until),
            Phase::Member => None,
        }
    }

    fn on_phase_deadline(&mut self) -> anyhow::Result<()> {
        let Phase::Bootstrapping { retry_at, .. } = &self.phase else {
            return Ok(());
        };
        if retry_at.is_some() {
            self.start_attempt();
            Ok(())
        } else {
            self.attempt_failed("no bootstrap peer answered within the attempt's time")
        }
    }

    fn start_attempt(&mut self) {
        let Phase::Bootstrapping { targets, attempt, max_attempts, dials, candidates, deadline, retry_at, .. } =
            &mut self.phase
        else {
            return;
        };
        *attempt += 1;
        *retry_at = None;
        *deadline = Instant::now() + ATTEMPT_TIMEOUT;
        candidates.clear();
        dials.clear();
        tracing::info!(
            "contacting {} (attempt {}/{})",
            targets.iter().map(|t| t.label.as_str()).collect::<Vec<_>>().join(", "),
            attempt,
            max_attempts
        );
        let mut plans = Vec::new();
        for target in targets.iter() {
            match target.peer {
                Some(peer) => plans.push((
                    DialOpts::peer_id(peer).addresses(target.addrs.clone()).condition(PeerCondition::Always).build(),
                    target.label.clone(),
                )),
                None => {
                    for addr in &target.addrs {
                        plans.push((DialOpts::unknown_peer_id().address(addr.clone()).build(), target.label.clone()));
                    }
                }
            }
        }
        let mut failures = Vec::new();
        for (opts, label) in plans {
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    if let Phase::Bootstrapping { dials, .. } = &mut self.phase {
                        dials.insert(id);
                    }
                }
                Err(err) => failures.push(format!("{label}: {err}")),
            }
        }
        if let Phase::Bootstrapping { dials, last_error, .. } = &mut self.phase
            && dials.is_empty()
        {
            *last_error = failures.join("; ");
            // Fail the attempt on the next loop turn (the deadline is now).
            self.phase_set_deadline_now();
        }
    }

    fn phase_set_deadline_now(&mut self) {
        if let Phase::Bootstrapping { deadline, .. } = &mut self.phase {
            *deadline = Instant::now();
        }
    }

    fn note_bootstrap_connection(&mut self, peer: PeerId, connection: ConnectionId) {
        let Phase::Bootstrapping { dials, candidates, targets, .. } = &mut self.phase else {
            return;
        };
        let by_dial = dials.remove(&connection);
        let known_target = targets.iter().find(|t| t.peer == Some(peer));
        if by_dial || known_target.is_some() {
            let label = known_target.map(|t| t.label.clone()).unwrap_or_else(|| {
                targets.iter().find(|t| t.peer.is_none()).map(|t| t.label.clone()).unwrap_or_default()
            });
            candidates.insert(peer, label);
            if self.admission.is_admitted(&peer) {
                self.note_bootstrap_admitted(peer);
            }
        }
    }

    /// Returns whether the failed dial was one of ours for bootstrapping.
    fn note_bootstrap_dial_failure(&mut self, connection: ConnectionId, error: &str) -> bool {
        let Phase::Bootstrapping { dials, candidates, last_error, retry_at, .. } = &mut self.phase else {
            return false;
        };
        if !dials.remove(&connection) {
            return false;
        }
        *last_error = error.to_string();
        if dials.is_empty() && candidates.is_empty() && retry_at.is_none() {
            self.phase_set_deadline_now();
        }
        true
    }

    fn note_bootstrap_admitted(&mut self, peer: PeerId) {
        let Phase::Bootstrapping { candidates, .. } = &self.phase else {
            return;
        };
        let Some(label) = candidates.get(&peer) else {
            return;
        };
        tracing::info!(via = %peer, at = %label, "admitted by the bootstrap peer; joining the tree");
        self.phase = Phase::Member;
        let now = self.now();
        self.node.handle(now, Input::Command(Command::Join { via: node_id(&peer) }));
    }

    fn attempt_failed(&mut self, why: &str) -> anyhow::Result<()> {
        let Phase::Bootstrapping { targets, attempt, max_attempts, fall_back_to_root, last_error, retry_at, .. } =
            &mut self.phase
        else {
            return Ok(());
        };
        let reason = if last_error.is_empty() { why.to_string() } else { last_error.clone() };
        let labels = targets.iter().map(|t| t.label.as_str()).collect::<Vec<_>>().join(", ");
        if *attempt >= *max_attempts {
            if *fall_back_to_root {
                tracing::warn!("none of the remembered tree peers answered ({reason}); starting a new overlay as root");
                self.phase = Phase::Member;
                let now = self.now();
                self.node.handle(now, Input::Command(Command::Start));
                return Ok(());
            }
            return Err(anyhow!("could not reach the bootstrap peer {labels} after {attempt} attempts: {reason}"));
        }
        let backoff = FIRST_BACKOFF.saturating_mul(1 << (*attempt - 1).min(8)).min(MAX_BACKOFF);
        tracing::warn!(
            "waiting for the bootstrap peer {labels} (attempt {attempt}/{max_attempts} failed: {reason}); \
             retrying in {}s",
            backoff.as_secs()
        );
        *retry_at = Some(Instant::now() + backoff);
        last_error.clear();
        Ok(())
    }

    // ---- API requests ----

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Status(reply) => {
                let _ = reply.send(self.status_report());
            }
            Request::Peers(reply) => {
                let _ = reply.send(self.peer_reports());
            }
            Request::Tree(reply) => {
                let status = self.node.status();
                let me = self.local.to_string();
                let note = format!("this node, {}, term {}", role_name(status.role), status.term);
                let ancestors: Vec<String> = status.ancestors.iter().map(node_name).collect();
                let children: Vec<String> = status.children.iter().map(node_name).collect();
                let _ = reply.send(TreeReport::from_path(me, note, &ancestors, &children));
            }
            Request::Route(command) => {
                let now = self.now();
                self.node.handle(now, Input::Command(Command::Route(command)));
            }
            Request::SetCapacity(free) => {
                let now = self.now();
                self.node.handle(now, Input::Command(Command::SetCapacity(free)));
            }
            Request::Grids(reply) => {
                let _ = reply.send(crate::grid_view::GridsReport::of(&mut self.node, self.info.position));
            }
            Request::Placement(request) => {
                let now = self.now();
                self.node.handle(now, Input::Command(request.command()));
            }
            Request::Leave(reply) => {
                tracing::info!("leaving the overlay");
                let now = self.now();
                self.node.handle(now, Input::Command(Command::Leave));
                self.phase = Phase::Leaving { until: Instant::now() + LEAVE_GRACE };
                let _ = reply.send(());
            }
        }
    }

    fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Bootstrapping { .. } => "joining",
            Phase::Member => "member",
            Phase::Leaving { .. } => "leaving",
        }
    }

    fn status_report(&self) -> StatusReport {
        let status: Status = self.node.status();
        StatusReport {
            peer_id: self.local.to_string(),
            role: role_name(status.role).to_string(),
            term: status.term,
            parent: status.parent.as_ref().map(node_name),
            children: status.children.iter().map(node_name).collect(),
            ancestors: status.ancestors.iter().map(node_name).collect(),
            addresses: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            subnet: self.node.routing().machine_subnets().first().map(|s| s.to_string()),
            address_block: status.address_block.map(|b| b.to_string()),
            subtree_size: status.subtree.size,
            subtree_height: status.subtree.height,
            phase: self.phase_name().to_string(),
            position: (self.info.position.lat, self.info.position.lon),
            uptime_secs: self.epoch.elapsed().as_secs(),
            counters: Counters {
                messages_sent: self.metrics.messages_sent.get(),
                messages_received: self.metrics.messages_received.get(),
                messages_dropped: self.metrics.dropped_total(),
                admitted_peers: self.admission.admitted_count() as u64,
                connected_peers: self.swarm.connected_peers().count() as u64,
            },
            overlay_counters: status.counters,
            routing_counters: self.node.routing().counters().clone(),
        }
    }

    fn peer_reports(&self) -> Vec<PeerReport> {
        let status = self.node.status();
        let relation = |peer: &PeerId| {
            let id = node_id(peer);
            if status.parent == Some(id) {
                "parent"
            } else if status.children.contains(&id) {
                "child"
            } else if status.ancestors.contains(&id) {
                "ancestor"
            } else {
                "other"
            }
        };
        let mut reports: Vec<PeerReport> = self
            .peers
            .iter()
            .filter(|(peer, _)| self.swarm.is_connected(peer) || self.admission.is_admitted(peer))
            .map(|(peer, entry)| PeerReport {
                peer_id: peer.to_string(),
                addresses: entry.addrs.iter().map(|a| a.to_string()).collect(),
                connected: self.swarm.is_connected(peer),
                admitted: self.admission.is_admitted(peer),
                relation: relation(peer).to_string(),
                rtt_ms: entry.rtt.map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect();
        reports.sort_by(|a, b| (a.relation.as_str(), &a.peer_id).cmp(&(b.relation.as_str(), &b.peer_id)));
        reports
    }

    // ---- housekeeping ----

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self.to_disconnect.iter().filter(|(at, _)| *at <= now).map(|(_, p)| *p).collect();
        self.to_disconnect.retain(|(at, _)| *at > now);
        for peer in due {
            if !self.admission.is_admitted(&peer) {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
        // A challenge lost in transit (timeout, stream error) is sent again while the connection lasts.
        let unchallenged: Vec<PeerId> =
            self.swarm.connected_peers().filter(|p| self.admission.is_unknown(p)).copied().collect();
        for peer in unchallenged {
            self.begin_admission(peer);
        }
        self.save_state(false);
    }

    /// Writes role, term, parent and the tree neighbours to rejoin through, when they changed (or `force`).
    fn save_state(&mut self, force: bool) {
        if matches!(self.phase, Phase::Bootstrapping { .. }) {
            // Keep the remembered peers until we are back in a tree.
            return;
        }
        let status = self.node.status();
        let mut state = self.saved_state.clone();
        state.role = Some(role_name(status.role).to_string());
        state.term = status.term;
        state.parent = status.parent.as_ref().map(node_name);
        let mut order: Vec<NodeId> = Vec::new();
        for id in status.parent.iter().chain(&status.ancestors).chain(&status.children) {
            if !order.contains(id) {
                order.push(*id);
            }
        }
        let mut known: Vec<KnownPeer> = order
            .iter()
            .filter_map(|id| {
                let peer = peer_id(id)?;
                let addrs = self.addresses_for(&peer);
                (!addrs.is_empty()).then(|| KnownPeer {
                    peer_id: peer.to_string(),
                    addrs: addrs.iter().map(|a| a.to_string()).collect(),
                })
            })
            .collect();
        if known.is_empty() && !matches!(self.phase, Phase::Leaving { .. }) {
            // Not attached right now (e.g. mid-failover): keep what we had.
            known = self.saved_state.known_peers.clone();
        }
        known.truncate(MAX_KNOWN_PEERS);
        state.known_peers = known;
        if !force && state == self.saved_state {
            return;
        }
        // Only the driver's fields change: grants, services and the rest belong to other subsystems.
        let written = self.state_store.update(|current| {
            current.role = state.role.clone();
            current.term = state.term;
            current.parent = state.parent.clone();
            current.known_peers = state.known_peers.clone();
            true
        });
        match written {
            Ok(_) => self.saved_state = state,
            Err(err) => tracing::warn!("cannot save the state file: {err:#}"),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Opens every listener and waits until each reported an address (so the node advertises real addresses).
async fn open_listeners(swarm: &mut Swarm<Behaviour>, listen: &[Multiaddr]) -> anyhow::Result<Vec<Multiaddr>> {
    let mut waiting = HashSet::new();
    for addr in listen {
        let id = swarm.listen_on(addr.clone()).with_context(|| format!("cannot listen on {addr}"))?;
        waiting.insert(id);
    }
    let mut addrs = Vec::new();
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while !waiting.is_empty() {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| anyhow!("the listeners did not come up within {LISTEN_TIMEOUT:?}"))?;
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } => {
                waiting.remove(&listener_id);
                addrs.push(address);
            }
            SwarmEvent::ListenerClosed { addresses, reason: Err(err), .. } => {
                bail!("cannot listen on {addresses:?}: {err}")
            }
            SwarmEvent::ListenerError { error, .. } => bail!("a listener failed: {error}"),
            _ => {}
        }
    }
    // Give a 0.0.0.0 listener a moment to report its other interfaces.
    while let Ok(SwarmEvent::NewListenAddr { address, .. }) =
        tokio::time::timeout(Duration::from_millis(50), swarm.select_next_some()).await
    {
        addrs.push(address);
    }
    Ok(addrs)
}

fn encode_cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    ciborium::into_writer(value, &mut buf).expect("writing CBOR into a Vec cannot fail");
    buf
}

fn without_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

fn is_routable(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => !ip.is_loopback() && !ip.is_private() && !ip.is_link_local() && !ip.is_unspecified(),
        Protocol::Ip6(ip) => !ip.is_loopback() && !ip.is_unspecified(),
        _ => false,
    })
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Detached => "detached",
        Role::Leaf => "leaf",
        Role::Coordinator => "coordinator",
        Role::Root => "root",
    }
}

fn role_number(role: Role) -> i64 {
    match role {
        Role::Detached => 0,
        Role::Leaf => 1,
        Role::Coordinator => 2,
        Role::Root => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_p2p_suffix_and_classifies_addresses() {
        let peer = PeerId::random();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}").parse().unwrap();
        assert_eq!(without_p2p(addr), "/ip4/127.0.0.1/tcp/4001".parse::<Multiaddr>().unwrap());
        assert!(!is_routable(&"/ip4/127.0.0.1/tcp/1".parse().unwrap()));
        assert!(!is_routable(&"/ip4/10.0.0.1/tcp/1".parse().unwrap()));
        assert!(is_routable(&"/ip4/8.8.8.8/udp/1/quic-v1".parse().unwrap()));
    }
}
