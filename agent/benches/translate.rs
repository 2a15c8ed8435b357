//! Per-packet cost of the data plane's pure hot path: proxy translation (outgoing with a live flow, incoming
//! reply with reverse translation), the first packet of a connection, and tunnel header decoding.
//! Run: `cargo bench -p canopy-agent --bench translate`.
//!
//! The agent is a binary crate, so the pure modules are compiled in here by path.

// Test-only items of the included modules are unused here.
#![allow(dead_code, unused_imports)]

// Top-level modules: their `super::` paths then resolve to this crate root, as they do in the agent.
#[path = "../src/dataplane/counters.rs"]
mod counters;
#[path = "../src/dataplane/crypto.rs"]
mod crypto;
#[path = "../src/dataplane/flow.rs"]
mod flow;
#[path = "../src/dataplane/liveness.rs"]
mod liveness;
#[path = "../src/dataplane/packet.rs"]
mod packet;
#[path = "../src/dataplane/proxy.rs"]
mod proxy;
#[path = "../src/dataplane/reply_routes.rs"]
mod reply_routes;
#[path = "../src/dataplane/routes.rs"]
mod routes;
#[path = "../src/dataplane/tunnel.rs"]
mod tunnel;

use counters::Counters;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use flow::FlowTimeouts;
use proxy::{Chooser, Proxy, ProxyConfig, Verdict};
use routes::{NodeId, RouteIndex, RouteTable};
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::Duration;

const PAYLOAD: usize = 1380;

fn table() -> RouteTable {
    serde_json::from_value(serde_json::json!({
        "nodes": [
            {"name": "a", "subnet": "10.16.0.0/26", "endpoint": "192.0.2.1:50103"},
            {"name": "b", "subnet": "10.16.0.64/26", "endpoint": "192.0.2.2:50103"},
        ],
        "services": [
            {"name": "bench.default.client.default", "service_ip": "10.30.0.1", "instances": [
                {"number": 0, "instance_ip": "10.30.1.1", "namespace_ip": "10.16.0.2", "node": "a"}]},
            {"name": "bench.default.server.default", "service_ip": "10.30.0.2", "instances": [
                {"number": 0, "instance_ip": "10.30.2.1", "namespace_ip": "10.16.0.66", "node": "b"},
                {"number": 1, "instance_ip": "10.30.2.2", "namespace_ip": "10.16.0.67", "node": "b"}]},
        ],
    }))
    .expect("bench table")
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 65000).ack(1).write(&mut out, &[7u8; PAYLOAD]).unwrap();
    out
}

/// Round-robin over the candidates (the agent's `PolicyChooser` does the same for `rr`).
#[derive(Default)]
struct RoundRobin {
    next: usize,
}

impl Chooser for RoundRobin {
    fn choose(&mut self, _routes: &RouteIndex, _service: usize, candidates: &[usize], _local: Option<usize>) -> usize {
        self.next = self.next.wrapping_add(1);
        candidates[(self.next - 1) % candidates.len()]
    }
}

fn proxy(node: &str) -> Proxy {
    let config = ProxyConfig {
        max_mss: 1420,
        flow_capacity: NonZeroUsize::new(65536).unwrap(),
        timeouts: FlowTimeouts::default(),
        service_range: "10.30.0.0/16".parse().unwrap(),
        reply_route_capacity: NonZeroUsize::new(16384).unwrap(),
        reply_route_idle: Duration::from_secs(180),
    };
    let mut proxy = Proxy::new(node.into(), config, Box::new(RoundRobin::default()));
    proxy.set_routes(&table()).unwrap();
    proxy
}

fn bench(c: &mut Criterion) {
    let counters = Counters::default();
    let now = Duration::from_secs(1);
    let mut client = proxy("a");
    client.attach([10, 16, 0, 2].into(), [10, 30, 1, 1].into());
    // 1000 live connections so lookups hit a populated table.
    for port in 0..1000u16 {
        let mut packet = tcp([10, 16, 0, 2], [10, 30, 0, 2], 20000 + port, 80);
        assert!(matches!(client.outgoing(&mut packet, now, &counters), Verdict::Tunnel(_)));
    }
    let outgoing = tcp([10, 16, 0, 2], [10, 30, 0, 2], 20500, 80);
    // Round-robin gave even-numbered connections (port 20000 + 2k) to instance 0.
    let instance_ip = [10, 30, 2, 1];
    let reply = tcp(instance_ip, [10, 16, 0, 2], 80, 20500);

    let mut group = c.benchmark_group("translate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("outgoing_service_ip_live_flow", |b| {
        b.iter_batched_ref(
            || outgoing.clone(),
            |packet| assert!(matches!(client.outgoing(black_box(packet), now, &counters), Verdict::Tunnel(_))),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("incoming_reply_reverse_translation", |b| {
        b.iter_batched_ref(
            || reply.clone(),
            |packet| {
                assert_eq!(client.incoming(black_box(packet), NodeId::from_name("b"), now, &counters), Verdict::Local)
            },
            BatchSize::SmallInput,
        )
    });
    let mut next_port = 30000u16;
    group.bench_function("outgoing_new_connection", |b| {
        b.iter_batched_ref(
            || {
                next_port = next_port.wrapping_add(1).max(30000);
                tcp([10, 16, 0, 2], [10, 30, 0, 2], next_port, 81)
            },
            |packet| client.outgoing(black_box(packet), now, &counters),
            BatchSize::SmallInput,
        )
    });
    let mut datagram = vec![0u8; tunnel::HEADER_LEN];
    tunnel::write_header(&mut datagram, tunnel::MessageType::Data, NodeId(7), false);
    datagram.extend_from_slice(&outgoing);
    group.bench_function("tunnel_decode", |b| {
        b.iter(|| {
            let header = tunnel::decode_header(black_box(&datagram)).unwrap();
            tunnel::decode_body(header.kind, &datagram[tunnel::HEADER_LEN..]).is_ok()
        })
    });
    // Sealing and opening a full-size packet (ChaCha20-Poly1305, in place).
    let (a, b_id) = (NodeId(1), NodeId(2));
    let cipher = crypto::pair_cipher(&[9u8; 32], a, b_id);
    let mut sealed = vec![0u8; crypto::PAYLOAD_OFFSET + outgoing.len() + crypto::TAG_LEN];
    let mut counter = 0u64;
    group.throughput(Throughput::Bytes(outgoing.len() as u64));
    group.bench_function("seal_1420B", |b| {
        b.iter(|| {
            counter += 1;
            tunnel::write_header(&mut sealed, tunnel::MessageType::Data, a, true);
            crypto::seal(&cipher, black_box(&mut sealed), outgoing.len(), a, b_id, counter)
        })
    });
    let mut message = sealed.clone();
    tunnel::write_header(&mut message, tunnel::MessageType::Data, a, true);
    message[crypto::PAYLOAD_OFFSET..crypto::PAYLOAD_OFFSET + outgoing.len()].copy_from_slice(&outgoing);
    let len = crypto::seal(&cipher, &mut message, outgoing.len(), a, b_id, 1);
    group.bench_function("open_1420B", |b| {
        b.iter_batched_ref(
            || message.clone(),
            |m| assert!(crypto::open(&cipher, black_box(&mut m[..len]), a, b_id).is_some()),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
