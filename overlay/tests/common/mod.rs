//! A tiny deterministic driver: a Vec of nodes, a message queue on a virtual clock, crashes and partitions.
//! Every message goes through `encode`/`decode`, so the codec is exercised too.

#![allow(dead_code)]

use canopy_overlay::message::View;
use canopy_overlay::{
    Capacity, Command, Config, Envelope, Event, Input, Message, Node, NodeId, NodeInfo, Output, Position, Role,
};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

pub const MS: fn(u64) -> Duration = Duration::from_millis;

/// A message in flight: arrival time, sequence (tie-break), receiver index, encoded bytes, sender.
type Flight = (Duration, u64, usize, Vec<u8>, NodeId);

pub struct Net {
    pub nodes: Vec<Node>,
    pub alive: Vec<bool>,
    /// Nodes in different groups cannot talk.
    pub group: Vec<u8>,
    /// Links cut in both directions.
    pub blocked: Vec<(usize, usize)>,
    /// Peers that sent node i a message (it may answer them without knowing their address).
    heard_from: Vec<std::collections::HashSet<NodeId>>,
    pub now: Duration,
    pub latency: Duration,
    queue: BinaryHeap<Reverse<Flight>>,
    seq: u64,
    index: HashMap<NodeId, usize>,
    /// (time, node, event) in order.
    pub events: Vec<(Duration, usize, Event)>,
    /// Messages and bytes sent, by message kind (and heartbeats with grids or a view).
    pub traffic: std::collections::BTreeMap<String, (u64, u64)>,
    /// The last view sent to each node.
    pub last_view_to: Vec<Option<View>>,
}

pub fn info(i: usize) -> NodeInfo {
    // Spread over a 40 x 60 degree area, capacities varied so ranks differ beyond the id.
    NodeInfo {
        id: NodeId::from_u64(i as u64 + 1),
        addrs: vec![format!("/ip4/10.0.{}.{}/udp/4001/quic-v1", i / 250, i % 250)],
        position: Position::new(30.0 + (i * 7 % 40) as f64, -10.0 + (i * 13 % 60) as f64),
        capacity: Capacity { cpu: 1.0 + (i * 5 % 8) as f64, mem_mb: 4096.0, bandwidth_mbps: 100.0 },
        reachable: true,
    }
}

impl Net {
    pub fn new(n: usize, config: Config) -> Self {
        let nodes: Vec<Node> =
            (0..n).map(|i| Node::new(info(i), config.clone(), 1000 + i as u64, Duration::ZERO)).collect();
        let index = nodes.iter().enumerate().map(|(i, n)| (n.id(), i)).collect();
        Net {
            nodes,
            alive: vec![true; n],
            group: vec![0; n],
            blocked: Vec::new(),
            heard_from: vec![Default::default(); n],
            now: Duration::ZERO,
            latency: MS(20),
            queue: BinaryHeap::new(),
            seq: 0,
            index,
            events: Vec::new(),
            traffic: Default::default(),
            last_view_to: vec![None; n],
        }
    }

    pub fn idx(&self, id: NodeId) -> usize {
        self.index[&id]
    }

    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].id()
    }

    pub fn command(&mut self, i: usize, cmd: Command) {
        let now = self.now;
        self.nodes[i].handle(now, Input::Command(cmd));
        self.drain(i);
    }

    pub fn crash(&mut self, i: usize) {
        self.alive[i] = false;
    }

    fn drain(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].poll_output() {
            match out {
                Output::Send { to, envelope } => {
                    let Some(&j) = self.index.get(&to) else { continue };
                    // The first hop of a join goes to a contact the driver was given (bootstrap), not learnt.
                    // Replies may go back over the connection the peer opened.
                    let to_contact = matches!(&envelope.body, Message::JoinRequest(r) if r.hops == 0);
                    let reply = self.heard_from[i].contains(&to);
                    assert!(
                        to_contact || reply || self.nodes[i].addresses_of(&to).is_some(),
                        "node {i} sends {:?} to {to} without knowing its address",
                        envelope.body
                    );
                    // Deterministic small jitter so messages do not all arrive at once.
                    let jitter = MS((self.seq * 7 + i as u64 * 3) % 10);
                    self.seq += 1;
                    let at = self.now + self.latency + jitter;
                    let bytes = envelope.encode();
                    let kind: String =
                        format!("{:?}", envelope.body).chars().take_while(|c| c.is_alphanumeric()).collect();
                    let entry = self.traffic.entry(kind).or_default();
                    entry.0 += 1;
                    entry.1 += bytes.len() as u64;
                    if let Message::Heartbeat(h) = &envelope.body {
                        for (part, carried) in [("grids", h.grids.is_some()), ("view", h.view.is_some())] {
                            if carried {
                                let entry = self.traffic.entry(format!("Heartbeat with {part}")).or_default();
                                entry.0 += 1;
                                entry.1 += bytes.len() as u64;
                            }
                        }
                        if let Some(view) = &h.view {
                            self.last_view_to[j] = Some(View::clone(view));
                        }
                    }
                    self.queue.push(Reverse((at, self.seq, j, bytes, self.nodes[i].id())));
                }
                Output::Event(e) => self.events.push((self.now, i, e)),
            }
        }
    }

    /// Advance the virtual clock to `until`, delivering messages and firing timers in time order.
    pub fn run_until(&mut self, until: Duration) {
        loop {
            let next_msg = self.queue.peek().map(|Reverse((t, ..))| *t);
            let next_timer = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| self.alive[*i])
                .filter_map(|(i, n)| n.poll_timeout().map(|t| (t, i)))
                .min();
            let t_msg = next_msg.unwrap_or(Duration::MAX);
            let t_timer = next_timer.map_or(Duration::MAX, |(t, _)| t);
            let t = t_msg.min(t_timer);
            if t > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(t);
            let now = self.now;
            if t_msg <= t_timer {
                let Reverse((_, _, to, bytes, from)) = self.queue.pop().unwrap();
                let from_i = self.index[&from];
                let cut = self.blocked.iter().any(|&(a, b)| (a, b) == (from_i, to) || (b, a) == (from_i, to));
                if cut || !self.alive[to] || !self.alive[from_i] || self.group[to] != self.group[from_i] {
                    continue;
                }
                let envelope = Envelope::decode(&bytes).expect("our own messages decode");
                self.heard_from[to].insert(from);
                self.nodes[to].handle(now, Input::Message { from, envelope });
                self.drain(to);
            } else {
                let (_, i) = next_timer.unwrap();
                self.nodes[i].handle_timeout(now);
                self.drain(i);
            }
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Start node 0 as root and join the others one by one through earlier nodes.
    pub fn build(&mut self, gap: Duration) {
        self.command(0, Command::Start);
        for i in 1..self.nodes.len() {
            self.run_for(gap);
            let via = self.id((i * 7919) % i);
            self.command(i, Command::Join { via });
        }
    }

    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.alive[*i])
    }

    pub fn roots_in(&self, group: u8) -> Vec<usize> {
        self.live().filter(|&i| self.group[i] == group && self.nodes[i].role() == Role::Root).collect()
    }

    pub fn roots(&self) -> Vec<usize> {
        self.live().filter(|&i| self.nodes[i].role() == Role::Root).collect()
    }

    /// Every live node attached, its parent alive and listing it as a child, no cycles; returns the tree depth.
    pub fn check_tree(&self) -> Result<usize, String> {
        let mut depth = 0;
        for i in self.live() {
            let mut cur = i;
            let mut hops = 0;
            loop {
                let n = &self.nodes[cur];
                match n.role() {
                    Role::Root => break,
                    Role::Detached => return Err(format!("node {cur} is detached (from {i})")),
                    _ => {}
                }
                let p = n.parent().unwrap();
                let pi = self.idx(p);
                if !self.alive[pi] {
                    return Err(format!("node {cur} has a dead parent {pi}"));
                }
                if self.group[pi] != self.group[cur] {
                    return Err(format!("node {cur} has a parent {pi} across a partition"));
                }
                if !self.nodes[pi].children().any(|c| c == n.id()) {
                    return Err(format!("node {cur}'s parent {pi} does not list it as a child"));
                }
                cur = pi;
                hops += 1;
                if hops > self.nodes.len() {
                    return Err(format!("cycle through node {i}"));
                }
            }
            depth = depth.max(hops);
        }
        Ok(depth)
    }

    /// Print a node's events (for debugging failing scenarios).
    pub fn dump(&self, i: usize) {
        for (t, n, e) in &self.events {
            if *n == i {
                eprintln!("{:>8.3} node {i}: {e:?}", t.as_secs_f64());
            }
        }
        eprintln!("node {i}: {:?}", self.nodes[i].status());
    }

    pub fn coordinators(&self) -> Vec<usize> {
        self.live().filter(|&i| self.nodes[i].role() == Role::Coordinator).collect()
    }

    /// When node `i` last got `Some` parent at or after `since`.
    pub fn attached_at(&self, i: usize, since: Duration) -> Option<Duration> {
        self.events
            .iter()
            .filter(|(t, n, e)| *n == i && *t >= since && matches!(e, Event::ParentChanged { parent: Some(_) }))
            .map(|(t, ..)| *t)
            .next_back()
    }
}

/// The depth bound the simulator checks.
pub fn depth_bound(n: usize, max_children: usize) -> usize {
    let levels = ((n as f64).ln() / ((max_children as f64) / 2.0).ln()).ceil() as usize;
    2 * levels + 1
}
