//! Service network namespaces: creating named ones (like `ip netns add`), configuring the interface inside one
//! over netlink, giving it a resolv.conf, and entering one to run a command.

use crate::dataplane::setup;
use anyhow::{Context, anyhow};
use ipnet::Ipv4Net;
use nix::sched::CloneFlags;
use rtnetlink::{LinkUnspec, NetworkNamespace, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where named namespaces live (the convention `ip netns` uses).
pub const NETNS_DIR: &str = "/run/netns";
/// Per-namespace files bind-mounted over /etc (the convention `ip netns exec` uses).
pub const NETNS_ETC_DIR: &str = "/etc/netns";
/// Name of the service's interface inside its namespace.
pub const INTERFACE: &str = "canopy0";

/// A network namespace to attach: a process's (a container's) or a named one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamespaceRef {
    Pid(u32),
    Named(String),
}

impl NamespaceRef {
    pub fn path(&self) -> PathBuf {
        match self {
            NamespaceRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            NamespaceRef::Named(name) => Path::new(NETNS_DIR).join(name),
        }
    }

    /// Whether the namespace (or the process holding it) still exists.
    pub fn alive(&self) -> bool {
        match self {
            NamespaceRef::Pid(pid) => process_alive(*pid),
            NamespaceRef::Named(_) => self.path().exists(),
        }
    }
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; the command name before it is in parentheses and may hold spaces.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub async fn create_named(name: &str) -> anyhow::Result<()> {
    NetworkNamespace::add(name.to_string()).await.map_err(|e| anyhow!("creating network namespace {name}: {e}"))
}

pub async fn delete_named(name: &str) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC_DIR).join(name));
    if Path::new(NETNS_DIR).join(name).exists() {
        NetworkNamespace::del(name.to_string()).await.map_err(|e| anyhow!("deleting network namespace {name}: {e}"))?;
    }
    Ok(())
}

/// Named namespaces whose name starts with `prefix` (left by a crashed run).
pub fn list_named(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|name| name.starts_with(prefix)).collect()
}

/// Writes the namespace's resolv.conf (bind-mounted over /etc/resolv.conf by `enter`), pointing at the bridge
/// gateway where the agent's resolver answers.
pub fn write_resolv_conf(name: &str, nameserver: Ipv4Addr) -> anyhow::Result<()> {
    let dir = Path::new(NETNS_ETC_DIR).join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("resolv.conf"), format!("nameserver {nameserver}\n"))
        .with_context(|| format!("writing {}/resolv.conf", dir.display()))
}

/// Inside the namespace at `netns`: renames `peer` to `INTERFACE`, gives it `address`, brings it and `lo` up and
/// routes everything via `gateway`. Runs on a short-lived thread that enters the namespace, so the caller's
/// threads stay where they are.
pub async fn configure_inside(netns: &Path, peer: &str, address: Ipv4Net, gateway: Ipv4Addr) -> anyhow::Result<()> {
    let file = std::fs::File::open(netns).with_context(|| format!("opening network namespace {}", netns.display()))?;
    let peer = peer.to_string();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-setup".into())
        .spawn(move || {
            let outcome = (|| {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).context("entering the network namespace")?;
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async {
                    let handle = setup::connect()?;
                    if setup::link_index(&handle, INTERFACE).await?.is_some() {
                        anyhow::bail!("the namespace already has an interface named {INTERFACE}");
                    }
                    let index = setup::link_index(&handle, &peer)
                        .await?
                        .ok_or_else(|| anyhow!("interface {peer} did not arrive in the namespace"))?;
                    handle
                        .link()
                        .set(LinkUnspec::new_with_index(index).name(INTERFACE.to_string()).build())
                        .execute()
                        .await
                        .context("renaming the interface")?;
                    handle
                        .address()
                        .add(index, address.addr().into(), address.prefix_len())
                        .execute()
                        .await
                        .with_context(|| format!("adding address {address}"))?;
                    setup::set_up(&handle, index).await?;
                    if let Some(lo) = setup::link_index(&handle, "lo").await? {
                        setup::set_up(&handle, lo).await?;
                    }
                    let default = RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                        .gateway(gateway)
                        .build();
                    handle.route().add(default).replace().execute().await.context("adding the default route")?;
                    anyhow::Ok(())
                })
            })();
            let _ = done.send(outcome);
        })
        .context("spawning the namespace setup thread")?;
    result.await.map_err(|_| anyhow!("the namespace setup thread died"))?
}

/// Prepares the current process (called between fork and exec) to run inside the namespace: enters it and, when
/// `resolv_conf` is given, mounts it over /etc/resolv.conf in a private mount namespace.
///
/// # Safety
/// Runs in a forked child: only system calls, no allocation (paths are prepared by the caller).
pub fn enter_for_exec(netns: &std::fs::File, resolv_conf: Option<&Path>) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    nix::sched::setns(netns, CloneFlags::CLONE_NEWNET)?;
    if let Some(resolv_conf) = resolv_conf {
        nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)?;
        mount(Some(resolv_conf), "/etc/resolv.conf", None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_live_and_dead_processes() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
        assert!(NamespaceRef::Pid(std::process::id()).alive());
        assert!(!NamespaceRef::Named("canopy-test-no-such-namespace".into()).alive());
        assert_eq!(NamespaceRef::Pid(7).path(), PathBuf::from("/proc/7/ns/net"));
    }
}
