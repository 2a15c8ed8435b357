//! Machine setup over netlink (rtnetlink): the bridge holding the subnet's gateway, routes into the TUN, veths for
//! service namespaces, and the sysctls forwarding needs. Every link the agent creates is named with its prefix, so
//! a restarted agent finds and removes what a crashed run left behind.

use anyhow::{Context, anyhow, bail};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Opens a netlink connection in the calling thread's network namespace, driven on the current tokio runtime.
pub fn connect() -> anyhow::Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

pub async fn link_index(handle: &Handle, name: &str) -> anyhow::Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        // The kernel answers ENODEV for a name that does not exist.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("looking up link {name}"))),
    }
}

/// Deletes every link whose name starts with `prefix` (left by this agent or a crashed run). Returns their names.
pub async fn remove_links_with_prefix(handle: &Handle, prefix: &str) -> anyhow::Result<Vec<String>> {
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.context("listing links")?;
    let mut removed = Vec::new();
    for link in links {
        let Some(name) = link_name(&link) else { continue };
        if name.starts_with(prefix) {
            let name = name.to_string();
            match handle.link().del(link.header.index).execute().await {
                Ok(()) => removed.push(name),
                // The peer of a veth deleted just before disappears with it.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
                Err(e) => return Err(anyhow!(e).context(format!("deleting link {name}"))),
            }
        }
    }
    Ok(removed)
}

pub async fn delete_link(handle: &Handle, name: &str) -> anyhow::Result<()> {
    if let Some(index) = link_index(handle, name).await? {
        handle.link().del(index).execute().await.with_context(|| format!("deleting link {name}"))?;
    }
    Ok(())
}

pub async fn set_up(handle: &Handle, index: u32) -> anyhow::Result<()> {
    handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.context("setting link up")
}

/// Creates the bridge with the gateway address and MTU, up. Returns its index.
pub async fn create_bridge(handle: &Handle, name: &str, gateway: Ipv4Net, mtu: u32) -> anyhow::Result<u32> {
    handle
        .link()
        .add(LinkBridge::new(name).mtu(mtu).up().build())
        .execute()
        .await
        .with_context(|| format!("creating bridge {name}"))?;
    let index = link_index(handle, name).await?.ok_or_else(|| anyhow!("bridge {name} vanished after creation"))?;
    add_address(handle, index, gateway).await.with_context(|| format!("setting up bridge {name}"))?;
    Ok(index)
}

pub async fn add_address(handle: &Handle, interface: u32, address: Ipv4Net) -> anyhow::Result<()> {
    handle
        .address()
        .add(interface, address.addr().into(), address.prefix_len())
        .execute()
        .await
        .with_context(|| format!("adding {address} to interface {interface}"))
}

fn route_to(destination: Ipv4Net, interface: u32) -> netlink_packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination.network(), destination.prefix_len())
        .output_interface(interface)
        .build()
}

pub async fn add_route(handle: &Handle, destination: Ipv4Net, interface: u32) -> anyhow::Result<()> {
    handle
        .route()
        .add(route_to(destination, interface))
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding route {destination}"))
}

pub async fn delete_route(handle: &Handle, destination: Ipv4Net, interface: u32) -> anyhow::Result<()> {
    handle
        .route()
        .del(route_to(destination, interface))
        .execute()
        .await
        .with_context(|| format!("deleting route {destination}"))
}

/// Creates a veth pair: `host` enslaved to the bridge and up, `peer` moved into the namespace at `netns`.
pub async fn create_veth(
    handle: &Handle,
    host: &str,
    peer: &str,
    mtu: u32,
    bridge: u32,
    netns: &Path,
) -> anyhow::Result<()> {
    let netns_file =
        std::fs::File::open(netns).with_context(|| format!("opening network namespace {}", netns.display()))?;
    handle
        .link()
        .add(LinkVeth::new(host, peer).mtu(mtu).build())
        .execute()
        .await
        .with_context(|| format!("creating veth pair {host}/{peer}"))?;
    let result = async {
        let host_index = link_index(handle, host).await?.ok_or_else(|| anyhow!("veth {host} vanished"))?;
        let peer_index = link_index(handle, peer).await?.ok_or_else(|| anyhow!("veth {peer} vanished"))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(peer_index).mtu(mtu).setns_by_fd(netns_file.as_raw_fd()).build())
            .execute()
            .await
            .context("moving the veth peer into the namespace")?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(host_index).controller(bridge).up().build())
            .execute()
            .await
            .context("attaching the veth to the bridge")?;
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        let _ = delete_link(handle, host).await;
    }
    result
}

/// Writes a sysctl under /proc/sys, returning the previous value so it can be restored.
pub fn write_sysctl(key: &str, value: &str) -> anyhow::Result<String> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let old = std::fs::read_to_string(&path).with_context(|| format!("reading sysctl {key}"))?;
    std::fs::write(&path, value).with_context(|| format!("setting sysctl {key}={value}"))?;
    Ok(old.trim().to_string())
}

/// Checks a link name fits the kernel's limit (15 bytes).
pub fn check_link_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 15 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("link name {name:?} must be 1-15 characters of [A-Za-z0-9_-]");
    }
    Ok(())
}
