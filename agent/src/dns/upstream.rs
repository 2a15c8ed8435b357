//! The resolvers other names are forwarded to: read from resolv.conf (or given), never ourselves, and the
//! hickory forwarder (a [`Catalog`] with one [`ForwardZoneHandler`] for the root zone) that asks them.

use anyhow::Context;
use hickory_server::proto::rr::{LowerName, Name};
use hickory_server::resolver::config::{ConnectionConfig, NameServerConfig, ResolverOpts};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::Catalog;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The `nameserver` entries of a resolv.conf file, as socket addresses (port 53), in file order.
pub fn upstreams_from_resolv_conf(path: &Path) -> anyhow::Result<Vec<SocketAddr>> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (config, _options) = hickory_server::resolver::system_conf::parse_resolv_conf(text)
        .with_context(|| format!("no usable nameserver in {}", path.display()))?;
    let mut upstreams = Vec::new();
    for server in config.name_servers() {
        for connection in &server.connections {
            let address = SocketAddr::new(server.ip, connection.port);
            if !upstreams.contains(&address) {
                upstreams.push(address);
            }
        }
    }
    Ok(upstreams)
}

/// Drops the upstreams that are this resolver itself, which would make every forwarded query loop until it times
/// out: the exact listening address, and for a wildcard listener any loopback or unspecified address on its port.
pub fn without_self(upstreams: &[SocketAddr], listening: SocketAddr) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    upstreams.iter().copied().partition(|upstream| !is_self(*upstream, listening))
}

fn is_self(upstream: SocketAddr, listening: SocketAddr) -> bool {
    if upstream == listening {
        return true;
    }
    let same_port = upstream.port() == listening.port();
    let local_ip = |ip: IpAddr| ip.is_loopback() || ip.is_unspecified();
    same_port && (local_ip(upstream.ip()) && listening.ip().is_unspecified() || upstream.ip().is_unspecified())
}

/// A catalog that forwards every name to `upstreams` (UDP, TCP on truncation), tried in order.
pub fn forwarding_catalog(upstreams: &[SocketAddr], timeout: Duration) -> anyhow::Result<Catalog> {
    let name_servers = upstreams
        .iter()
        .map(|upstream| {
            let mut udp = ConnectionConfig::udp();
            udp.port = upstream.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = upstream.port();
            NameServerConfig::new(upstream.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.timeout = timeout;
    // One try per upstream: a client that gets SERVFAIL retries on its own schedule.
    options.attempts = 1;
    let config = ForwardConfig { name_servers, options: Some(options) };
    let forwarder = ForwardZoneHandler::builder_tokio(config)
        .build()
        .map_err(|error| anyhow::anyhow!("cannot set up the DNS forwarder: {error}"))?;
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&Name::root()), vec![Arc::new(forwarder)]);
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn reads_nameservers_from_resolv_conf() {
        let dir = std::env::temp_dir().join(format!("canopy-dns-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nsearch example.org\nnameserver 10.0.0.2\nnameserver 2001:db8::1\noptions ndots:2\n",
        )
        .unwrap();
        let upstreams = upstreams_from_resolv_conf(&path);
        std::fs::write(&path, "search example.org\n").unwrap();
        let none = upstreams_from_resolv_conf(&path);
        let missing = upstreams_from_resolv_conf(&dir.join("absent"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(upstreams.unwrap(), vec![addr("10.0.0.2:53"), addr("[2001:db8::1]:53")]);
        assert!(none.is_err());
        assert!(missing.unwrap_err().to_string().contains("absent"));
    }

    #[test]
    fn never_forwards_to_itself() {
        let upstreams = [addr("10.30.0.1:53"), addr("127.0.0.53:53"), addr("0.0.0.0:53"), addr("8.8.8.8:53")];
        let (kept, dropped) = without_self(&upstreams, addr("10.30.0.1:53"));
        assert_eq!(kept, vec![addr("127.0.0.53:53"), addr("8.8.8.8:53")]);
        assert_eq!(dropped, vec![addr("10.30.0.1:53"), addr("0.0.0.0:53")]);
        // A wildcard listener is also reachable on loopback.
        let (kept, dropped) = without_self(&upstreams, addr("0.0.0.0:53"));
        assert!(kept.contains(&addr("8.8.8.8:53")));
        assert_eq!(dropped, vec![addr("127.0.0.53:53"), addr("0.0.0.0:53")]);
        // A different port is a different server.
        let (kept, _) = without_self(&[addr("127.0.0.1:53")], addr("127.0.0.1:5353"));
        assert_eq!(kept, vec![addr("127.0.0.1:53")]);
    }
}
