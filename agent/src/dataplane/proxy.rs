//! The L4 proxy (seed 002, fig. 3.9/3.10): the translation decision for each packet, made in place.
//!
//! Outgoing (read from the TUN, sent by a local instance):
//! - source namespace IP -> the sender's InstanceIP;
//! - destination ServiceIP -> the namespace IP of the instance chosen for this connection (sticky per 5-tuple,
//!   a new connection asks the `Chooser`); destination InstanceIP -> its namespace IP;
//! - destination in another machine's subnet: routed untranslated;
//! - destination an overlay address the table does not know, but a learned reply route does (`reply_routes`: a
//!   client whose machine our table does not list called us): tunnelled to that peer, destination unchanged;
//! - any other overlay address: `UnknownAddress`; the engine holds the packet (`pending`) and tells the agent
//!   (it runs a table query).
//!
//! Delivery (from the tunnel, or outgoing to an instance on this machine): the destination must be an attached
//! instance (its namespace IP, or its InstanceIP when the sender only had a reply route, translated to the
//! namespace IP here), else the sender gets "route not found"; a reply of a ServiceIP connection gets the
//! ServiceIP back as its source, so the client sees the address it called.

use super::counters::Counters;
use super::flow::{Flow, FlowKey, FlowTable, FlowTimeouts};
use super::packet::{self, PacketInfo};
use super::reply_routes::{Learned, ReplyRoutes};
use super::routes::{NodeId, RouteIndex, RouteTable, Target};
use ipnet::Ipv4Net;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;
use std::time::Duration;

/// Picks an instance for a new connection. Swappable so the policies crate can plug in.
pub trait Chooser: Send {
    /// `candidates` are route-index positions of the service's available instances (never empty); `local` is this
    /// machine's route-index position, if the table lists it.
    fn choose(&mut self, routes: &RouteIndex, service: usize, candidates: &[usize], local: Option<usize>) -> usize;
}

/// What to do with a packet after translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Dropped; the reason is counted.
    Drop,
    /// Write it to the TUN: the kernel delivers it to a local instance over the bridge.
    Local,
    /// Send it through the tunnel to this route-index node.
    Tunnel(usize),
    /// Send it through the tunnel to this peer, which the route table may not list (a learned reply route).
    TunnelToPeer(NodeId),
    /// The destination is not hosted here: tell the sender.
    RouteNotFound(Ipv4Addr),
    /// An overlay address nobody told us about; worth a table query. Not counted here: the engine holds the
    /// packet until a route table knows the address, and counts it as `drop_no_route` if none does in time.
    UnknownAddress(Ipv4Addr),
}

#[derive(Debug, Clone, Copy)]
pub struct ProxyConfig {
    pub max_mss: u16,
    pub flow_capacity: NonZeroUsize,
    pub timeouts: FlowTimeouts,
    /// ServiceIPs and InstanceIPs: sources in it that the table does not know are remembered as reply routes.
    pub service_range: Ipv4Net,
    pub reply_route_capacity: NonZeroUsize,
    /// Reply routes unused for this long are forgotten (the peer idle timeout).
    pub reply_route_idle: Duration,
}

pub struct Proxy {
    local_node_name: String,
    local_node: Option<usize>,
    routes: RouteIndex,
    /// Instances attached on this machine: namespace IP -> InstanceIP.
    attached: HashMap<Ipv4Addr, Ipv4Addr>,
    /// The same, InstanceIP -> namespace IP: packets sent along a reply route arrive for the InstanceIP.
    attached_by_instance_ip: HashMap<Ipv4Addr, Ipv4Addr>,
    flows: FlowTable,
    reply_routes: ReplyRoutes,
    service_range: Ipv4Net,
    chooser: Box<dyn Chooser>,
    candidates: Vec<usize>,
    max_mss: u16,
    /// Service (route-index position) the last new connection went to, until the engine takes it.
    new_connection: Option<usize>,
    /// Instances their machine answered route-not-found for, since the last table (route-index positions).
    not_found: HashSet<usize>,
    /// Machines that stopped answering (`liveness`): their instances get no new connections, in every table,
    /// until they are heard from again.
    unreachable_nodes: HashSet<NodeId>,
}

impl Proxy {
    pub fn new(local_node_name: String, config: ProxyConfig, chooser: Box<dyn Chooser>) -> Self {
        Self {
            local_node_name,
            local_node: None,
            routes: RouteIndex::default(),
            attached: HashMap::new(),
            attached_by_instance_ip: HashMap::new(),
            flows: FlowTable::new(config.flow_capacity, config.timeouts),
            reply_routes: ReplyRoutes::new(config.reply_route_capacity, config.reply_route_idle),
            service_range: config.service_range,
            chooser,
            candidates: Vec::new(),
            max_mss: config.max_mss,
            new_connection: None,
            not_found: HashSet::new(),
            unreachable_nodes: HashSet::new(),
        }
    }

    pub fn routes(&self) -> &RouteIndex {
        &self.routes
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn reply_route_count(&self) -> usize {
        self.reply_routes.len()
    }

    /// The service (route-index position) a new connection went to since the last call, if any.
    pub fn take_new_connection(&mut self) -> Option<usize> {
        self.new_connection.take()
    }

    /// Replaces the route table. Live connections whose instance is still listed keep it; the others are dropped.
    pub fn set_routes(&mut self, table: &RouteTable) -> anyhow::Result<()> {
        let routes = RouteIndex::build(table)?;
        let by_instance_ip: HashMap<Ipv4Addr, usize> =
            routes.instances.iter().enumerate().map(|(i, inst)| (inst.instance_ip, i)).collect();
        self.flows.remove_where(|_, flow| !by_instance_ip.contains_key(&flow.instance_ip));
        self.flows.remap_instances(|flow| by_instance_ip[&flow.instance_ip]);
        self.local_node = routes.node_by_name(&self.local_node_name);
        self.routes = routes;
        self.not_found.clear();
        for instance in &mut self.routes.instances {
            if self.unreachable_nodes.contains(&self.routes.nodes[instance.node].id) {
                instance.available = false;
            }
        }
        Ok(())
    }

    /// Whether the route table knows `address` (a ServiceIP or InstanceIP): held packets for it can go.
    pub fn knows(&self, address: Ipv4Addr) -> bool {
        self.routes.overlay_target(address).is_some()
    }

    /// The machine `peer` stopped answering: its instances get no new connections (in this and later tables) and
    /// their connections are forgotten, so retransmissions pick another instance. Returns the route-index
    /// positions of the instances this made unavailable.
    pub fn node_unreachable(&mut self, peer: NodeId) -> Vec<usize> {
        self.unreachable_nodes.insert(peer);
        let Some(node) = self.routes.node_by_id(peer) else { return Vec::new() };
        let lost: Vec<usize> = (0..self.routes.instances.len())
            .filter(|&i| self.routes.instances[i].node == node && self.routes.instances[i].available)
            .collect();
        for &instance in &lost {
            self.routes.instances[instance].available = false;
        }
        self.flows.remove_where(|_, flow| lost.contains(&flow.instance));
        lost
    }

    /// The machine `peer` is heard from again (or forgotten): its instances are available at once, except those
    /// it answered route-not-found for.
    pub fn node_reachable(&mut self, peer: NodeId) {
        if !self.unreachable_nodes.remove(&peer) {
            return;
        }
        let Some(node) = self.routes.node_by_id(peer) else { return };
        for (position, instance) in self.routes.instances.iter_mut().enumerate() {
            if instance.node == node && !self.not_found.contains(&position) {
                instance.available = true;
            }
        }
    }

    pub fn attach(&mut self, namespace_ip: Ipv4Addr, instance_ip: Ipv4Addr) {
        if let Some(old) = self.attached.insert(namespace_ip, instance_ip) {
            self.attached_by_instance_ip.remove(&old);
        }
        self.attached_by_instance_ip.insert(instance_ip, namespace_ip);
    }

    pub fn detach(&mut self, namespace_ip: Ipv4Addr) {
        if let Some(instance_ip) = self.attached.remove(&namespace_ip) {
            self.attached_by_instance_ip.remove(&instance_ip);
        }
        self.flows.remove_where(|key, _| key.src == namespace_ip);
    }

    /// Removes expired flows and reply routes; returns how many of each.
    pub fn expire(&mut self, now: Duration) -> (usize, usize) {
        (self.flows.expire(now), self.reply_routes.expire(now))
    }

    /// Translates a packet read from the TUN.
    pub fn outgoing(&mut self, buf: &mut [u8], now: Duration, counters: &Counters) -> Verdict {
        let info = match packet::parse(buf) {
            Ok(info) => info,
            Err(reason) => {
                counters.malformed(reason);
                return Verdict::Drop;
            }
        };
        let Some(&own_instance_ip) = self.attached.get(&info.src) else {
            Counters::inc(&counters.drop_unknown_source);
            return Verdict::Drop;
        };
        let (new_src, new_dst, node) = match self.routes.overlay_target(info.dst) {
            Some(Target::Service(service)) => {
                let Some(instance) = self.instance_for_connection(service, &info, now, counters) else {
                    Counters::inc(&counters.drop_no_instance);
                    return Verdict::Drop;
                };
                let instance = &self.routes.instances[instance];
                (own_instance_ip, instance.namespace_ip, Some(instance.node))
            }
            Some(Target::Instance(instance)) => {
                let instance = &self.routes.instances[instance];
                (own_instance_ip, instance.namespace_ip, Some(instance.node))
            }
            None => match self.routes.node_for_subnet_address(info.dst) {
                Some(node) => (info.src, info.dst, Some(node)),
                None if self.service_range.contains(&info.dst) => {
                    let Some(peer) = self.reply_routes.peer(info.dst, now) else {
                        return Verdict::UnknownAddress(info.dst);
                    };
                    // A reply to a client we know only from its traffic: its machine translates the InstanceIP.
                    packet::rewrite_addresses(buf, &info, own_instance_ip, info.dst);
                    if packet::clamp_mss(buf, &info, self.max_mss) {
                        Counters::inc(&counters.mss_clamped);
                    }
                    return Verdict::TunnelToPeer(peer);
                }
                None => {
                    Counters::inc(&counters.drop_no_route);
                    return Verdict::Drop;
                }
            },
        };
        packet::rewrite_addresses(buf, &info, new_src, new_dst);
        if packet::clamp_mss(buf, &info, self.max_mss) {
            Counters::inc(&counters.mss_clamped);
        }
        let translated = PacketInfo { src: new_src, dst: new_dst, ..info };
        match node {
            Some(node) if Some(node) != self.local_node => Verdict::Tunnel(node),
            _ => {
                Counters::inc(&counters.local_deliveries);
                self.deliver(buf, &translated, now, counters)
            }
        }
    }

    /// Handles a packet that arrived through the tunnel from the authenticated (or listed) peer `sender`.
    pub fn incoming(&mut self, buf: &mut [u8], sender: NodeId, now: Duration, counters: &Counters) -> Verdict {
        let info = match packet::parse(buf) {
            Ok(info) => info,
            Err(reason) => {
                counters.malformed(reason);
                return Verdict::Drop;
            }
        };
        let verdict = self.deliver(buf, &info, now, counters);
        if verdict == Verdict::Local
            && self.service_range.contains(&info.src)
            && self.routes.overlay_target(info.src).is_none()
        {
            match self.reply_routes.learn(info.src, sender, now) {
                Learned::New { evicted } => {
                    Counters::inc(&counters.reply_routes_learned);
                    if evicted {
                        Counters::inc(&counters.reply_routes_evicted);
                    }
                }
                Learned::Known => {}
            }
        }
        verdict
    }

    /// The tunnel peer `sender` does not host `missing` any more: a reply route through it is forgotten; a listed
    /// instance there gets no new connections, and its connections are forgotten so their retransmissions pick
    /// another. Returns the route-index position of the instance made unavailable, if any.
    pub fn route_not_found(&mut self, sender: NodeId, missing: Ipv4Addr) -> Option<usize> {
        self.reply_routes.forget(missing, sender);
        let node = self.routes.node_by_id(sender)?;
        let instance = self.routes.instance_by_namespace_ip(missing)?;
        if self.routes.instances[instance].node != node || !self.routes.instances[instance].available {
            return None;
        }
        self.routes.instances[instance].available = false;
        self.not_found.insert(instance);
        self.flows.remove_where(|_, flow| flow.instance == instance);
        Some(instance)
    }

    fn instance_for_connection(
        &mut self,
        service: usize,
        info: &PacketInfo,
        now: Duration,
        counters: &Counters,
    ) -> Option<usize> {
        let key = FlowKey {
            protocol: info.protocol,
            src: info.src,
            src_port: info.src_port,
            dst: info.dst,
            dst_port: info.dst_port,
        };
        if let Some(flow) = self.flows.outgoing(&key, info.tcp_flags, now) {
            return Some(flow.instance);
        }
        self.candidates.clear();
        let routes = &self.routes;
        self.candidates
            .extend(routes.services[service].instances.iter().copied().filter(|&i| routes.instances[i].available));
        if self.candidates.is_empty() {
            return None;
        }
        let instance = self.chooser.choose(&self.routes, service, &self.candidates, self.local_node);
        let instance_ip = self.routes.instances[instance].instance_ip;
        // The reply comes from the instance's InstanceIP (translated on its machine) to our namespace IP.
        let reply_key = FlowKey {
            protocol: info.protocol,
            src: instance_ip,
            src_port: info.dst_port,
            dst: info.src,
            dst_port: info.src_port,
        };
        if self.flows.insert(key, Flow::new(info.dst, instance, instance_ip, reply_key), info.tcp_flags, now) {
            Counters::inc(&counters.flows_evicted);
        }
        self.new_connection = Some(service);
        Some(instance)
    }

    fn deliver(&mut self, buf: &mut [u8], info: &PacketInfo, now: Duration, counters: &Counters) -> Verdict {
        let translated;
        let info = if self.attached.contains_key(&info.dst) {
            info
        } else if let Some(&namespace_ip) = self.attached_by_instance_ip.get(&info.dst) {
            packet::rewrite_addresses(buf, info, info.src, namespace_ip);
            translated = PacketInfo { dst: namespace_ip, ..*info };
            &translated
        } else {
            return Verdict::RouteNotFound(info.dst);
        };
        let reply_key = FlowKey {
            protocol: info.protocol,
            src: info.src,
            src_port: info.src_port,
            dst: info.dst,
            dst_port: info.dst_port,
        };
        if let Some(service_ip) = self.flows.incoming(&reply_key, info.tcp_flags, now) {
            packet::rewrite_addresses(buf, info, service_ip, info.dst);
        }
        if packet::clamp_mss(buf, info, self.max_mss) {
            Counters::inc(&counters.mss_clamped);
        }
        Verdict::Local
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::parse;
    use super::super::packet::tests::{assert_checksums_valid, icmp_echo, tcp_packet, udp_packet};
    use super::super::routes::tests::two_machine_table;
    use super::*;
    use proptest::prelude::*;

    const CLIENT_NS: [u8; 4] = [10, 16, 0, 2];
    const CLIENT_INSTANCE: [u8; 4] = [10, 30, 1, 1];
    const WEB_SERVICE: [u8; 4] = [10, 30, 0, 2];
    const WEB0_NS: [u8; 4] = [10, 16, 0, 3];
    const WEB0_INSTANCE: [u8; 4] = [10, 30, 2, 1];
    const WEB1_NS: [u8; 4] = [10, 16, 0, 66];
    const WEB1_INSTANCE: [u8; 4] = [10, 30, 2, 2];

    /// Round-robin over the available instances (the agent uses `policy::PolicyChooser`).
    #[derive(Debug, Default)]
    pub struct RoundRobin {
        next: HashMap<Ipv4Addr, usize>,
    }

    impl Chooser for RoundRobin {
        fn choose(
            &mut self,
            routes: &RouteIndex,
            service: usize,
            candidates: &[usize],
            _local: Option<usize>,
        ) -> usize {
            let counter = self.next.entry(routes.services[service].service_ip).or_default();
            let pick = candidates[*counter % candidates.len()];
            *counter = counter.wrapping_add(1);
            pick
        }
    }

    fn config() -> ProxyConfig {
        ProxyConfig {
            max_mss: 1400,
            flow_capacity: NonZeroUsize::new(64).unwrap(),
            timeouts: FlowTimeouts::default(),
            service_range: "10.30.0.0/16".parse().unwrap(),
            reply_route_capacity: NonZeroUsize::new(16).unwrap(),
            reply_route_idle: Duration::from_secs(180),
        }
    }

    fn id(name: &str) -> NodeId {
        NodeId::from_name(name)
    }

    /// Machine `a` hosts the client and web#0, machine `b` hosts web#1.
    fn machines() -> (Proxy, Proxy) {
        let table = two_machine_table();
        let mut a = Proxy::new("a".into(), config(), Box::new(RoundRobin::default()));
        let mut b = Proxy::new("b".into(), config(), Box::new(RoundRobin::default()));
        a.set_routes(&table).unwrap();
        b.set_routes(&table).unwrap();
        a.attach(CLIENT_NS.into(), CLIENT_INSTANCE.into());
        a.attach(WEB0_NS.into(), WEB0_INSTANCE.into());
        b.attach(WEB1_NS.into(), WEB1_INSTANCE.into());
        (a, b)
    }

    fn addresses(buf: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
        let info = parse(buf).unwrap();
        (info.src, info.dst)
    }

    #[test]
    fn new_connections_alternate_and_replies_come_from_the_service_ip() {
        let (mut a, mut b) = machines();
        let counters = Counters::default();
        let now = Duration::from_secs(1);
        let b_index = a.routes().node_by_name("b").unwrap();

        // Connection 1 goes to web#0, on this machine: delivered locally, source becomes the client InstanceIP.
        let mut syn = tcp_packet(CLIENT_NS, WEB_SERVICE, 40000, 80, true, b"");
        assert_eq!(a.outgoing(&mut syn, now, &counters), Verdict::Local);
        assert_eq!(addresses(&syn), (CLIENT_INSTANCE.into(), WEB0_NS.into()));
        // Connection 2 goes to web#1 on machine b through the tunnel.
        let mut syn2 = tcp_packet(CLIENT_NS, WEB_SERVICE, 40001, 80, true, b"");
        assert_eq!(a.outgoing(&mut syn2, now, &counters), Verdict::Tunnel(b_index));
        assert_eq!(addresses(&syn2), (CLIENT_INSTANCE.into(), WEB1_NS.into()));
        // A later packet of connection 1 stays on web#0.
        let mut data = tcp_packet(CLIENT_NS, WEB_SERVICE, 40000, 80, false, b"GET /");
        assert_eq!(a.outgoing(&mut data, now, &counters), Verdict::Local);
        assert_eq!(addresses(&data).1, Ipv4Addr::from(WEB0_NS));

        // Machine b delivers connection 2 and web#1 replies; b translates the reply for the client's machine.
        assert_eq!(b.incoming(&mut syn2, id("a"), now, &counters), Verdict::Local);
        let mut reply = tcp_packet(WEB1_NS, CLIENT_INSTANCE, 80, 40001, false, b"200 OK");
        let a_index = b.routes().node_by_name("a").unwrap();
        assert_eq!(b.outgoing(&mut reply, now, &counters), Verdict::Tunnel(a_index));
        assert_eq!(addresses(&reply), (WEB1_INSTANCE.into(), CLIENT_NS.into()));
        // Machine a restores the ServiceIP as the source.
        assert_eq!(a.incoming(&mut reply, id("b"), now, &counters), Verdict::Local);
        assert_eq!(addresses(&reply), (WEB_SERVICE.into(), CLIENT_NS.into()));

        // Local reply path: web#0 answers connection 1.
        let mut local_reply = tcp_packet(WEB0_NS, CLIENT_INSTANCE, 80, 40000, false, b"200 OK");
        assert_eq!(a.outgoing(&mut local_reply, now, &counters), Verdict::Local);
        assert_eq!(addresses(&local_reply), (WEB_SERVICE.into(), CLIENT_NS.into()));
        assert_eq!(counters.snapshot().mss_clamped, 2, "both SYNs carried MSS 1460 > 1400");
    }

    #[test]
    fn instance_ip_maps_directly_and_icmp_echo_works() {
        let (mut a, mut b) = machines();
        let counters = Counters::default();
        let now = Duration::ZERO;
        let mut ping = icmp_echo(CLIENT_NS, WEB1_INSTANCE, 9, 1, false);
        assert!(matches!(a.outgoing(&mut ping, now, &counters), Verdict::Tunnel(_)));
        assert_eq!(addresses(&ping), (CLIENT_INSTANCE.into(), WEB1_NS.into()));
        assert_eq!(b.incoming(&mut ping, id("a"), now, &counters), Verdict::Local);
        let mut pong = icmp_echo(WEB1_NS, CLIENT_INSTANCE, 9, 1, true);
        b.outgoing(&mut pong, now, &counters);
        assert_eq!(a.incoming(&mut pong, id("b"), now, &counters), Verdict::Local);
        assert_eq!(addresses(&pong), (WEB1_INSTANCE.into(), CLIENT_NS.into()), "the InstanceIP it called");

        // Echo to the ServiceIP: the second ping (new id) goes to web#1 and its reply comes from the ServiceIP.
        let mut first = icmp_echo(CLIENT_NS, WEB_SERVICE, 10, 1, false);
        assert_eq!(a.outgoing(&mut first, now, &counters), Verdict::Local);
        let mut second = icmp_echo(CLIENT_NS, WEB_SERVICE, 11, 1, false);
        assert!(matches!(a.outgoing(&mut second, now, &counters), Verdict::Tunnel(_)));
        b.incoming(&mut second, id("a"), now, &counters);
        let mut pong = icmp_echo(WEB1_NS, CLIENT_INSTANCE, 11, 1, true);
        b.outgoing(&mut pong, now, &counters);
        a.incoming(&mut pong, id("b"), now, &counters);
        assert_eq!(addresses(&pong), (WEB_SERVICE.into(), CLIENT_NS.into()));
    }

    #[test]
    fn route_not_found_moves_new_and_retried_connections() {
        let (mut a, mut b) = machines();
        let counters = Counters::default();
        let now = Duration::ZERO;
        let b_index = a.routes().node_by_name("b").unwrap();
        let mut first = udp_packet(CLIENT_NS, WEB_SERVICE, 5000, 7, b"x");
        assert_eq!(a.outgoing(&mut first, now, &counters), Verdict::Local);
        let mut second = udp_packet(CLIENT_NS, WEB_SERVICE, 5001, 7, b"x");
        assert_eq!(a.outgoing(&mut second, now, &counters), Verdict::Tunnel(b_index));
        // web#1 stops: machine b answers route-not-found.
        b.detach(WEB1_NS.into());
        assert_eq!(b.incoming(&mut second, id("a"), now, &counters), Verdict::RouteNotFound(WEB1_NS.into()));
        assert!(a.route_not_found(id("b"), WEB1_NS.into()).is_some());
        // The retransmission and every new connection now go to web#0.
        for port in [5001, 5002, 5003] {
            let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, port, 7, b"x");
            assert_eq!(a.outgoing(&mut packet, now, &counters), Verdict::Local, "port {port}");
        }
        // A route-not-found from a machine that never hosted the address is ignored.
        assert_eq!(a.route_not_found(id("b"), WEB0_NS.into()), None);
        // With no instance left, packets are dropped and counted.
        a.route_not_found(id("a"), WEB0_NS.into());
        let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, 6000, 7, b"x");
        assert_eq!(a.outgoing(&mut packet, now, &counters), Verdict::Drop);
        assert_eq!(counters.snapshot().drop_no_instance, 1);
    }

    #[test]
    fn unknown_sources_and_destinations_are_counted() {
        let (mut a, _) = machines();
        let counters = Counters::default();
        let mut stranger = udp_packet([10, 16, 0, 9], WEB_SERVICE, 1, 2, b"");
        assert_eq!(a.outgoing(&mut stranger, Duration::ZERO, &counters), Verdict::Drop);
        let mut nowhere = udp_packet(CLIENT_NS, [10, 30, 9, 9], 1, 2, b"");
        let untouched = nowhere.clone();
        assert_eq!(a.outgoing(&mut nowhere, Duration::ZERO, &counters), Verdict::UnknownAddress([10, 30, 9, 9].into()));
        assert_eq!(nowhere, untouched, "held packets are sent on later as they came: nothing translated yet");
        let mut outside = udp_packet(CLIENT_NS, [192, 0, 2, 9], 1, 2, b"");
        assert_eq!(a.outgoing(&mut outside, Duration::ZERO, &counters), Verdict::Drop);
        let mut garbage = vec![0x45, 0, 0];
        assert_eq!(a.incoming(&mut garbage, id("b"), Duration::ZERO, &counters), Verdict::Drop);
        let snapshot = counters.snapshot();
        assert_eq!((snapshot.drop_unknown_source, snapshot.drop_no_route, snapshot.drop_malformed), (1, 1, 1));
    }

    /// Machine `b`'s table lists only itself and web#1 (routes from the tree: nobody told it about `a`).
    fn server_only_table() -> RouteTable {
        let mut table = two_machine_table();
        table.nodes.retain(|n| n.name == "b");
        table.services.retain(|s| s.name == "demo.default.web.default");
        table.services[0].instances.retain(|i| i.node == "b");
        table
    }

    #[test]
    fn replies_go_back_along_routes_learned_from_clients_the_table_does_not_know() {
        let (mut a, mut b) = machines();
        b.set_routes(&server_only_table()).unwrap();
        let counters = Counters::default();
        let now = Duration::from_secs(5);
        // Before the client spoke, the server's packets to the client's InstanceIP have no route.
        let mut early = tcp_packet(WEB1_NS, CLIENT_INSTANCE, 80, 40001, false, b"");
        assert_eq!(b.outgoing(&mut early, now, &counters), Verdict::UnknownAddress(CLIENT_INSTANCE.into()));
        assert_eq!(counters.snapshot().drop_no_route, 0, "the engine holds it, and counts it if it gets no route");

        // Connection 2 of the client (round-robin) goes to web#1 on b, which learns the reply route.
        let mut syn = tcp_packet(CLIENT_NS, WEB_SERVICE, 40000, 80, true, b"");
        assert_eq!(a.outgoing(&mut syn, now, &counters), Verdict::Local);
        let mut syn = tcp_packet(CLIENT_NS, WEB_SERVICE, 40001, 80, true, b"");
        assert!(matches!(a.outgoing(&mut syn, now, &counters), Verdict::Tunnel(_)));
        assert_eq!(b.incoming(&mut syn, id("a"), now, &counters), Verdict::Local);
        assert_eq!(addresses(&syn), (CLIENT_INSTANCE.into(), WEB1_NS.into()));
        assert_eq!(counters.snapshot().reply_routes_learned, 1);
        assert_eq!(b.reply_route_count(), 1);

        // The reply is tunnelled to a with the client's InstanceIP as destination...
        let mut reply = tcp_packet(WEB1_NS, CLIENT_INSTANCE, 80, 40001, false, b"200 OK");
        assert_eq!(b.outgoing(&mut reply, now, &counters), Verdict::TunnelToPeer(id("a")));
        assert_eq!(addresses(&reply), (WEB1_INSTANCE.into(), CLIENT_INSTANCE.into()));
        assert_checksums_valid(&reply);
        // ... and a delivers it to the client's namespace IP, from the ServiceIP the client called.
        assert_eq!(a.incoming(&mut reply, id("b"), now, &counters), Verdict::Local);
        assert_eq!(addresses(&reply), (WEB_SERVICE.into(), CLIENT_NS.into()));
        assert_checksums_valid(&reply);
        assert_eq!(counters.snapshot().reply_routes_learned, 1, "a knows b's instance: nothing learned");

        // UDP and ICMP to the InstanceIP take the same way back; a UDP packet without checksum keeps none.
        let mut ping = icmp_echo(CLIENT_NS, WEB1_INSTANCE, 3, 1, false);
        assert!(matches!(a.outgoing(&mut ping, now, &counters), Verdict::Tunnel(_)));
        assert_eq!(b.incoming(&mut ping, id("a"), now, &counters), Verdict::Local);
        let mut pong = icmp_echo(WEB1_NS, CLIENT_INSTANCE, 3, 1, true);
        assert_eq!(b.outgoing(&mut pong, now, &counters), Verdict::TunnelToPeer(id("a")));
        assert_eq!(a.incoming(&mut pong, id("b"), now, &counters), Verdict::Local);
        assert_eq!(addresses(&pong), (WEB1_INSTANCE.into(), CLIENT_NS.into()));
        let mut datagram = udp_packet(WEB1_NS, CLIENT_INSTANCE, 7, 5000, b"x");
        datagram[26..28].copy_from_slice(&[0, 0]);
        assert_eq!(b.outgoing(&mut datagram, now, &counters), Verdict::TunnelToPeer(id("a")));
        assert_eq!(a.incoming(&mut datagram, id("b"), now, &counters), Verdict::Local);
        assert_eq!(&datagram[26..28], &[0, 0]);
        assert_eq!(addresses(&datagram), (WEB1_INSTANCE.into(), CLIENT_NS.into()));

        // The client goes away: a answers route-not-found for its InstanceIP and b forgets the route.
        a.detach(CLIENT_NS.into());
        let mut late = tcp_packet(WEB1_NS, CLIENT_INSTANCE, 80, 40001, false, b"late");
        assert_eq!(b.outgoing(&mut late, now, &counters), Verdict::TunnelToPeer(id("a")));
        assert_eq!(a.incoming(&mut late, id("b"), now, &counters), Verdict::RouteNotFound(CLIENT_INSTANCE.into()));
        assert_eq!(b.route_not_found(id("a"), CLIENT_INSTANCE.into()), None, "no listed instance affected");
        let mut after = tcp_packet(WEB1_NS, CLIENT_INSTANCE, 80, 40001, false, b"");
        assert_eq!(b.outgoing(&mut after, now, &counters), Verdict::UnknownAddress(CLIENT_INSTANCE.into()));
    }

    #[test]
    fn learned_reply_routes_expire_when_idle() {
        let (mut a, mut b) = machines();
        b.set_routes(&server_only_table()).unwrap();
        let counters = Counters::default();
        let mut ping = icmp_echo(CLIENT_NS, WEB1_INSTANCE, 3, 1, false);
        a.outgoing(&mut ping, Duration::ZERO, &counters);
        assert_eq!(b.incoming(&mut ping, id("a"), Duration::ZERO, &counters), Verdict::Local);
        let mut pong = icmp_echo(WEB1_NS, CLIENT_INSTANCE, 3, 1, true);
        assert_eq!(b.outgoing(&mut pong, Duration::from_secs(180), &counters), Verdict::TunnelToPeer(id("a")));
        let mut pong = icmp_echo(WEB1_NS, CLIENT_INSTANCE, 3, 2, true);
        assert!(matches!(b.outgoing(&mut pong, Duration::from_secs(181), &counters), Verdict::UnknownAddress(_)));
        assert_eq!(b.expire(Duration::from_secs(181)).1, 1);
        assert_eq!(b.reply_route_count(), 0);
    }

    #[test]
    fn new_connections_name_their_service_once() {
        let (mut a, _) = machines();
        let counters = Counters::default();
        let mut syn = tcp_packet(CLIENT_NS, WEB_SERVICE, 40000, 80, true, b"");
        a.outgoing(&mut syn, Duration::ZERO, &counters);
        let service = a.take_new_connection().expect("a new connection");
        assert_eq!(a.routes().services[service].name, "demo.default.web.default");
        assert_eq!(a.take_new_connection(), None);
        let mut data = tcp_packet(CLIENT_NS, WEB_SERVICE, 40000, 80, false, b"GET /");
        a.outgoing(&mut data, Duration::ZERO, &counters);
        assert_eq!(a.take_new_connection(), None, "same connection");
    }

    #[test]
    fn new_route_table_keeps_live_connections() {
        let (mut a, _) = machines();
        let counters = Counters::default();
        let mut first = udp_packet(CLIENT_NS, WEB_SERVICE, 5000, 7, b"x");
        a.outgoing(&mut first, Duration::ZERO, &counters);
        let mut second = udp_packet(CLIENT_NS, WEB_SERVICE, 5001, 7, b"x");
        assert!(matches!(a.outgoing(&mut second, Duration::ZERO, &counters), Verdict::Tunnel(_)));
        // Same services, instances listed in a different order.
        let mut table = two_machine_table();
        table.services[1].instances.reverse();
        a.set_routes(&table).unwrap();
        let mut again = udp_packet(CLIENT_NS, WEB_SERVICE, 5001, 7, b"x");
        assert!(matches!(a.outgoing(&mut again, Duration::ZERO, &counters), Verdict::Tunnel(_)));
        assert_eq!(addresses(&again).1, Ipv4Addr::from(WEB1_NS));
    }

    #[test]
    fn a_held_packet_goes_out_once_a_table_knows_its_address() {
        let (mut a, _) = machines();
        let counters = Counters::default();
        let mut table = two_machine_table();
        let web = table.services.iter().position(|s| s.name == "demo.default.web.default").unwrap();
        let web_service = table.services.remove(web);
        a.set_routes(&table).unwrap();
        let mut syn = tcp_packet(CLIENT_NS, WEB_SERVICE, 40000, 80, true, b"");
        assert_eq!(a.outgoing(&mut syn, Duration::ZERO, &counters), Verdict::UnknownAddress(WEB_SERVICE.into()));
        assert!(!a.knows(WEB_SERVICE.into()));
        table.services.push(web_service);
        a.set_routes(&table).unwrap();
        assert!(a.knows(WEB_SERVICE.into()));
        assert_eq!(a.outgoing(&mut syn, Duration::from_millis(200), &counters), Verdict::Local);
        assert_eq!(addresses(&syn), (CLIENT_INSTANCE.into(), WEB0_NS.into()));
    }

    #[test]
    fn an_unreachable_machine_gets_no_new_connections_until_heard_again() {
        let (mut a, _) = machines();
        let counters = Counters::default();
        let now = Duration::ZERO;
        // Connection 5001 goes to web#1 on b.
        let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, 5000, 7, b"x");
        assert_eq!(a.outgoing(&mut packet, now, &counters), Verdict::Local);
        let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, 5001, 7, b"x");
        assert!(matches!(a.outgoing(&mut packet, now, &counters), Verdict::Tunnel(_)));
        let lost = a.node_unreachable(id("b"));
        assert_eq!(lost.len(), 1);
        assert_eq!(a.routes().instances[lost[0]].namespace_ip, Ipv4Addr::from(WEB1_NS));
        assert!(a.node_unreachable(id("b")).is_empty(), "already unavailable");
        // Its connection and every new one go to web#0 now, also under a new table.
        for port in [5001, 5002, 5003] {
            let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, port, 7, b"x");
            assert_eq!(a.outgoing(&mut packet, now, &counters), Verdict::Local, "port {port}");
        }
        a.set_routes(&two_machine_table()).unwrap();
        let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, 5004, 7, b"x");
        assert_eq!(a.outgoing(&mut packet, now, &counters), Verdict::Local, "a new table does not revive it");
        // Heard again: available at once, unless it said route-not-found for the instance meanwhile.
        a.node_reachable(id("b"));
        let mut packets = 0;
        for port in 5005..5009 {
            let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, port, 7, b"x");
            packets += usize::from(matches!(a.outgoing(&mut packet, now, &counters), Verdict::Tunnel(_)));
        }
        assert_eq!(packets, 2, "round-robin over both again");
        a.node_unreachable(id("b"));
        assert!(a.route_not_found(id("b"), WEB1_NS.into()).is_none(), "already unavailable");
        a.set_routes(&two_machine_table()).unwrap();
        assert!(a.route_not_found(id("a"), WEB0_NS.into()).is_some());
        a.node_reachable(id("b"));
        let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, 6000, 7, b"x");
        assert!(matches!(a.outgoing(&mut packet, now, &counters), Verdict::Tunnel(_)), "b's instance is back");
        a.node_unreachable(id("b"));
        let mut packet = udp_packet(CLIENT_NS, WEB_SERVICE, 6001, 7, b"x");
        assert_eq!(a.outgoing(&mut packet, now, &counters), Verdict::Drop, "no instance left");
    }

    proptest! {
        /// Fuzz the translation path: arbitrary bytes, and valid headers with arbitrary addresses, never panic.
        #[test]
        fn translation_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..96),
            dst_last in any::<u8>(), sport in any::<u16>(), kind in 0u8..3, flip in 0usize..60, value in any::<u8>(),
        ) {
            let (mut a, mut b) = machines();
            let counters = Counters::default();
            let mut garbage = bytes.clone();
            a.outgoing(&mut garbage, Duration::ZERO, &counters);
            let mut garbage = bytes;
            b.incoming(&mut garbage, id("a"), Duration::ZERO, &counters);
            let dst = [10, 30, 2, dst_last];
            let mut packet = match kind {
                0 => tcp_packet(CLIENT_NS, dst, sport, 80, true, b"abc"),
                1 => udp_packet(CLIENT_NS, dst, sport, 80, b"abc"),
                _ => icmp_echo(CLIENT_NS, dst, sport, 1, false),
            };
            if flip < packet.len() { packet[flip] = value; }
            if let Verdict::Tunnel(_) = a.outgoing(&mut packet, Duration::ZERO, &counters) {
                b.incoming(&mut packet, id("a"), Duration::ZERO, &counters);
            }
        }
    }
}
