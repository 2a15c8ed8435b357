//! The route table the data plane works from: machines (subnet, tunnel endpoint), services (ServiceIP, policy)
//! and their instances (InstanceIP, namespace IP, hosting machine). Loaded from a file or set through the API now;
//! the routes issue feeds the same types from the overlay. `RouteIndex` is the validated, indexed form the proxy
//! looks addresses up in.

use anyhow::{Context, bail};
use canopy_policies::Position;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

/// A machine's identity on the tunnel: derived from its name so both ends agree without coordination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl NodeId {
    pub fn from_name(name: &str) -> Self {
        let hash = blake3::hash(name.as_bytes());
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&hash.as_bytes()[..8]);
        Self(u64::from_be_bytes(bytes))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    /// 64 hex digits: when set, tunnels are encrypted with per-pair keys derived from it and unsealed datagrams
    /// are refused. (The control plane will agree keys per peer instead.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_key: Option<String>,
    #[serde(default)]
    pub nodes: Vec<NodeRoute>,
    #[serde(default)]
    pub services: Vec<ServiceRoute>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRoute {
    pub name: String,
    /// The machine's instance subnet (its bridge holds `.1`).
    pub subnet: Ipv4Net,
    /// Further subnets of the machine, granted when the first one filled up (the bridge holds `.1` of each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_subnets: Vec<Ipv4Net>,
    /// Where its tunnel socket listens.
    pub endpoint: SocketAddr,
    /// Where the machine is (`{ lat = .., lon = .. }`): the `closest` policy picks the instance nearest the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRoute {
    /// `app.appns.service.servicens`
    pub name: String,
    pub service_ip: Ipv4Addr,
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Further ServiceIPs of the same service, one per other policy (e.g. `closest = "10.30.0.3"`): each address
    /// reaches the same instances, chosen by its own policy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policy_ips: BTreeMap<String, Ipv4Addr>,
    #[serde(default)]
    pub instances: Vec<InstanceRoute>,
}

fn default_policy() -> String {
    "rr".to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRoute {
    pub number: u32,
    pub instance_ip: Ipv4Addr,
    pub namespace_ip: Ipv4Addr,
    /// Name of the hosting machine (a `nodes` entry).
    pub node: String,
}

impl RouteTable {
    /// Reads a route table from JSON (`.json`) or TOML (any other extension).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading route table {}", path.display()))?;
        let table = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).with_context(|| format!("parsing route table {} as JSON", path.display()))?
        } else {
            toml::from_str(&text).with_context(|| format!("parsing route table {} as TOML", path.display()))?
        };
        Ok(table)
    }
}

impl NodeRoute {
    /// The machine's subnets, the first one first.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        std::iter::once(self.subnet).chain(self.extra_subnets.iter().copied())
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub id: NodeId,
    /// The first subnet first.
    pub subnets: Vec<Ipv4Net>,
    pub endpoint: SocketAddr,
    pub position: Option<Position>,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub number: u32,
    pub instance_ip: Ipv4Addr,
    pub namespace_ip: Ipv4Addr,
    pub node: usize,
    /// Cleared when the hosting machine answered "route not found"; the instance gets no new connections until
    /// a fresh route table arrives.
    pub available: bool,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub service_ip: Ipv4Addr,
    /// Policy name from the table; the proxy's `Chooser` interprets it.
    pub policy: String,
    pub instances: Vec<usize>,
}

/// What an address in the overlay range stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Service(usize),
    Instance(usize),
}

/// A validated route table indexed by every address the proxy looks up.
#[derive(Debug, Clone, Default)]
pub struct RouteIndex {
    pub tunnel_key: Option<[u8; 32]>,
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub instances: Vec<Instance>,
    node_by_id: HashMap<NodeId, usize>,
    node_by_name: HashMap<String, usize>,
    by_overlay_ip: HashMap<Ipv4Addr, Target>,
    by_namespace_ip: HashMap<Ipv4Addr, usize>,
}

fn parse_key(hex: &str) -> anyhow::Result<[u8; 32]> {
    let digits = hex.trim().as_bytes();
    if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
        bail!("tunnel_key must be 64 hex digits (32 bytes)");
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(digits.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).expect("ASCII"), 16).expect("hex checked");
    }
    Ok(key)
}

impl RouteIndex {
    /// Validates `table`: known nodes, unique names and addresses, namespace IPs inside their node's subnet,
    /// non-overlapping subnets.
    pub fn build(table: &RouteTable) -> anyhow::Result<Self> {
        let mut index = RouteIndex::default();
        if let Some(key) = &table.tunnel_key {
            index.tunnel_key = Some(parse_key(key)?);
        }
        for node in &table.nodes {
            let id = NodeId::from_name(&node.name);
            if index.node_by_name.contains_key(&node.name) {
                bail!("node {} is listed twice", node.name);
            }
            let subnets: Vec<Ipv4Net> = node.subnets().collect();
            for (i, subnet) in subnets.iter().enumerate() {
                let overlaps = |other: &Ipv4Net| other.contains(&subnet.network()) || subnet.contains(&other.network());
                if let Some(other) = subnets[..i].iter().find(|other| overlaps(other)) {
                    bail!("subnets {other} and {subnet} of node {} overlap", node.name);
                }
                if let Some((other, net)) =
                    index.nodes.iter().find_map(|n| n.subnets.iter().find(|net| overlaps(net)).map(|net| (n, net)))
                {
                    bail!("subnets of nodes {} ({net}) and {} ({subnet}) overlap", other.name, node.name);
                }
            }
            index.node_by_name.insert(node.name.clone(), index.nodes.len());
            index.node_by_id.insert(id, index.nodes.len());
            index.nodes.push(Node {
                name: node.name.clone(),
                id,
                subnets,
                endpoint: node.endpoint,
                position: node.position.and_then(|p| p.normalized()),
            });
        }
        let mut names = HashSet::new();
        for service in &table.services {
            if !names.insert(service.name.as_str()) {
                bail!("service {} is listed twice", service.name);
            }
            let service_index = index.services.len();
            index.claim_overlay_ip(service.service_ip, Target::Service(service_index), &service.name)?;
            let mut numbers = HashSet::new();
            let mut members = Vec::with_capacity(service.instances.len());
            for instance in &service.instances {
                let label = format!("{} instance {}", service.name, instance.number);
                if !numbers.insert(instance.number) {
                    bail!("{label} is listed twice");
                }
                let Some(&node) = index.node_by_name.get(&instance.node) else {
                    bail!("{label} is on unknown node {}", instance.node);
                };
                let subnets = &index.nodes[node].subnets;
                let host_of = |subnet: &Ipv4Net| {
                    subnet.contains(&instance.namespace_ip) && instance.namespace_ip != subnet.network()
                };
                if !subnets.iter().any(host_of) {
                    let listed: Vec<String> = subnets.iter().map(|s| s.to_string()).collect();
                    bail!(
                        "{label}: namespace IP {} is not a host of node {}'s subnets {}",
                        instance.namespace_ip,
                        instance.node,
                        listed.join(", ")
                    );
                }
                let instance_index = index.instances.len();
                index.claim_overlay_ip(instance.instance_ip, Target::Instance(instance_index), &label)?;
                if index.by_namespace_ip.insert(instance.namespace_ip, instance_index).is_some() {
                    bail!("{label}: namespace IP {} is used twice", instance.namespace_ip);
                }
                index.instances.push(Instance {
                    number: instance.number,
                    instance_ip: instance.instance_ip,
                    namespace_ip: instance.namespace_ip,
                    node,
                    available: true,
                });
                members.push(instance_index);
            }
            index.services.push(Service {
                name: service.name.clone(),
                service_ip: service.service_ip,
                policy: service.policy.clone(),
                instances: members.clone(),
            });
            for (policy, &service_ip) in &service.policy_ips {
                if *policy == service.policy {
                    bail!("{}: policy {policy} is given twice", service.name);
                }
                let label = format!("{} ({policy})", service.name);
                index.claim_overlay_ip(service_ip, Target::Service(index.services.len()), &label)?;
                index.services.push(Service {
                    name: service.name.clone(),
                    service_ip,
                    policy: policy.clone(),
                    instances: members.clone(),
                });
            }
        }
        Ok(index)
    }

    fn claim_overlay_ip(&mut self, ip: Ipv4Addr, target: Target, label: &str) -> anyhow::Result<()> {
        if let Some((node, subnet)) =
            self.nodes.iter().find_map(|n| n.subnets.iter().find(|s| s.contains(&ip)).map(|s| (n, s)))
        {
            bail!("{label}: overlay address {ip} lies in node {}'s subnet {subnet}", node.name);
        }
        if self.by_overlay_ip.insert(ip, target).is_some() {
            bail!("{label}: address {ip} is used twice");
        }
        Ok(())
    }

    pub fn overlay_target(&self, ip: Ipv4Addr) -> Option<Target> {
        self.by_overlay_ip.get(&ip).copied()
    }

    pub fn instance_by_namespace_ip(&self, ip: Ipv4Addr) -> Option<usize> {
        self.by_namespace_ip.get(&ip).copied()
    }

    pub fn node_by_id(&self, id: NodeId) -> Option<usize> {
        self.node_by_id.get(&id).copied()
    }

    pub fn node_by_name(&self, name: &str) -> Option<usize> {
        self.node_by_name.get(name).copied()
    }

    /// The node whose subnet holds `ip` (direct namespace-IP traffic).
    pub fn node_for_subnet_address(&self, ip: Ipv4Addr) -> Option<usize> {
        self.nodes.iter().position(|n| n.subnets.iter().any(|s| s.contains(&ip)))
    }

    /// Name of the service an instance (route-index position) belongs to.
    pub fn service_of_instance(&self, instance: usize) -> Option<&str> {
        self.services.iter().find(|s| s.instances.contains(&instance)).map(|s| s.name.as_str())
    }

    pub fn find_instance(&self, service: &str, number: u32) -> Option<usize> {
        let service = self.services.iter().position(|s| s.name == service)?;
        self.services[service].instances.iter().copied().find(|&i| self.instances[i].number == number)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two machines, a client service on `a`, and a web service with one instance on each machine.
    pub fn two_machine_table() -> RouteTable {
        let toml = r#"
            [[nodes]]
            name = "a"
            subnet = "10.16.0.0/26"
            endpoint = "192.0.2.1:50103"
            [[nodes]]
            name = "b"
            subnet = "10.16.0.64/26"
            endpoint = "192.0.2.2:50103"
            [[services]]
            name = "demo.default.client.default"
            service_ip = "10.30.0.1"
            instances = [{ number = 0, instance_ip = "10.30.1.1", namespace_ip = "10.16.0.2", node = "a" }]
            [[services]]
            name = "demo.default.web.default"
            service_ip = "10.30.0.2"
            policy = "rr"
            instances = [
                { number = 0, instance_ip = "10.30.2.1", namespace_ip = "10.16.0.3", node = "a" },
                { number = 1, instance_ip = "10.30.2.2", namespace_ip = "10.16.0.66", node = "b" },
            ]
        "#;
        toml::from_str(toml).expect("test table parses")
    }

    #[test]
    fn builds_index() {
        let index = RouteIndex::build(&two_machine_table()).unwrap();
        assert_eq!(index.overlay_target("10.30.0.2".parse().unwrap()), Some(Target::Service(1)));
        let web1 = index.find_instance("demo.default.web.default", 1).unwrap();
        assert_eq!(index.overlay_target("10.30.2.2".parse().unwrap()), Some(Target::Instance(web1)));
        assert_eq!(index.instance_by_namespace_ip("10.16.0.66".parse().unwrap()), Some(web1));
        assert_eq!(index.nodes[index.instances[web1].node].name, "b");
        assert_eq!(index.service_of_instance(web1), Some("demo.default.web.default"));
        assert_eq!(index.service_of_instance(99), None);
        assert_eq!(index.node_for_subnet_address("10.16.0.70".parse().unwrap()), index.node_by_name("b"));
    }

    #[test]
    fn further_policies_get_their_own_service_ip_over_the_same_instances() {
        let mut table = two_machine_table();
        table.services[1].policy_ips.insert("closest".into(), "10.30.0.3".parse().unwrap());
        let index = RouteIndex::build(&table).unwrap();
        let Some(Target::Service(closest)) = index.overlay_target("10.30.0.3".parse().unwrap()) else {
            panic!("closest ServiceIP not indexed")
        };
        assert_eq!(index.services[closest].policy, "closest");
        assert_eq!(index.services[closest].instances, index.services[1].instances);
        table.services[1].policy_ips.insert("rr".into(), "10.30.0.4".parse().unwrap());
        assert!(RouteIndex::build(&table).unwrap_err().to_string().contains("given twice"));
        table.services[1].policy_ips.remove("rr");
        table.services[1].policy_ips.insert("closest".into(), "10.30.0.2".parse().unwrap());
        assert!(RouteIndex::build(&table).unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn rejects_inconsistent_tables() {
        let mut table = two_machine_table();
        table.services[1].instances[1].node = "c".into();
        assert!(RouteIndex::build(&table).unwrap_err().to_string().contains("unknown node c"));
        let mut table = two_machine_table();
        table.services[1].instances[1].namespace_ip = "10.16.0.5".parse().unwrap();
        assert!(RouteIndex::build(&table).unwrap_err().to_string().contains("not a host of node b"));
        let mut table = two_machine_table();
        table.services[1].service_ip = "10.30.1.1".parse().unwrap();
        assert!(RouteIndex::build(&table).unwrap_err().to_string().contains("used twice"));
        let mut table = two_machine_table();
        table.tunnel_key = Some("abc".into());
        assert!(RouteIndex::build(&table).unwrap_err().to_string().contains("64 hex digits"));
        table.tunnel_key = Some("0f".repeat(32));
        assert_eq!(RouteIndex::build(&table).unwrap().tunnel_key, Some([0x0f; 32]));
        let mut table = two_machine_table();
        table.nodes[1].subnet = "10.16.0.0/25".parse().unwrap();
        assert!(RouteIndex::build(&table).unwrap_err().to_string().contains("overlap"));
    }

    /// A machine whose first subnet filled up got another: instances in either are its, and nobody else may use it.
    #[test]
    fn a_machine_with_a_second_subnet() {
        let mut table = two_machine_table();
        table.nodes[1].extra_subnets = vec!["10.16.1.0/26".parse().unwrap()];
        table.services[1].instances[1].namespace_ip = "10.16.1.5".parse().unwrap();
        let index = RouteIndex::build(&table).unwrap();
        let b = index.node_by_name("b");
        assert_eq!(index.node_for_subnet_address("10.16.1.9".parse().unwrap()), b);
        assert_eq!(index.node_for_subnet_address("10.16.0.70".parse().unwrap()), b);
        let web1 = index.find_instance("demo.default.web.default", 1).unwrap();
        assert_eq!(index.instance_by_namespace_ip("10.16.1.5".parse().unwrap()), Some(web1));

        let text = toml::to_string(&table).unwrap();
        assert!(text.contains("extra_subnets"), "{text}");
        assert_eq!(toml::from_str::<RouteTable>(&text).unwrap(), table);
        assert!(!toml::to_string(&two_machine_table()).unwrap().contains("extra_subnets"), "omitted when empty");

        let mut clash = table.clone();
        clash.nodes[0].extra_subnets = vec!["10.16.1.0/27".parse().unwrap()];
        assert!(RouteIndex::build(&clash).unwrap_err().to_string().contains("overlap"));
        let mut own = table.clone();
        own.nodes[1].extra_subnets.push("10.16.0.64/27".parse().unwrap());
        assert!(RouteIndex::build(&own).unwrap_err().to_string().contains("of node b overlap"));
        let mut outside = table;
        outside.services[1].instances[1].namespace_ip = "10.16.2.5".parse().unwrap();
        let err = RouteIndex::build(&outside).unwrap_err().to_string();
        assert!(err.contains("not a host of node b's subnets 10.16.0.64/26, 10.16.1.0/26"), "{err}");
    }
}
