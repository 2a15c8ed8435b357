//! The libp2p side: transports (QUIC, TCP + noise + yamux), and the behaviours the agent combines.

use super::codec::{ADMIT_PROTOCOL, BytesCodec, OVERLAY_PROTOCOL};
use anyhow::Context;
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{StreamProtocol, Swarm, identify, kad, mdns, noise, ping, request_response, tcp, yamux};
use std::time::Duration;

const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/canopy/kad/1.0.0");
const IDENTIFY_PROTOCOL: &str = "/canopy/id/1";
/// Admission messages are tiny; anything bigger is an attack.
const ADMIT_MAX_BYTES: usize = 1024;
/// Connections with no tree traffic are closed after this long. Tree links stay up: heartbeats flow every second.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub admit: request_response::Behaviour<BytesCodec>,
    pub overlay: request_response::Behaviour<BytesCodec>,
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

pub struct SwarmOptions {
    pub mdns: bool,
    pub request_timeout: Duration,
}

pub fn build_swarm(keypair: Keypair, options: SwarmOptions) -> anyhow::Result<Swarm<Behaviour>> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .context("setting up the TCP transport")?
        .with_quic()
        .with_dns()
        .context("reading the system DNS configuration")?
        .with_behaviour(|key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
            let local = key.public().to_peer_id();
            let rr_config = request_response::Config::default().with_request_timeout(options.request_timeout);
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            // Our records are tree messages, not DHT values; Kademlia only finds peers.
            kad_config.set_record_ttl(None).set_provider_record_ttl(None);
            // The driver bootstraps Kademlia once a first peer is admitted; a lone root has nobody to ask.
            kad_config.set_periodic_bootstrap_interval(None);
            let mut kad = kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_config);
            // Every member is admitted by the network key, so every member can serve lookups.
            kad.set_mode(Some(kad::Mode::Server));
            let mdns =
                if options.mdns { Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?) } else { None };
            Ok(Behaviour {
                admit: request_response::Behaviour::with_codec(
                    BytesCodec::new(ADMIT_MAX_BYTES),
                    [(ADMIT_PROTOCOL, request_response::ProtocolSupport::Full)],
                    rr_config.clone(),
                ),
                overlay: request_response::Behaviour::with_codec(
                    BytesCodec::new(canopy_overlay::message::MAX_MESSAGE_BYTES),
                    [(OVERLAY_PROTOCOL, request_response::ProtocolSupport::Full)],
                    rr_config,
                ),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                        .with_agent_version(format!("canopy-agent/{}", env!("CARGO_PKG_VERSION")))
                        .with_interval(Duration::from_secs(300)),
                ),
                kad,
                ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
                mdns: mdns.into(),
            })
        })
        .map_err(|e| anyhow::anyhow!("setting up the libp2p behaviours: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}
