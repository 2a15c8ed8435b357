//! `agent services [--json]`: the services this machine knows (used or hosted), with their ServiceIPs and instances.

use super::ServiceReport;
use crate::api::client::Client;
use crate::cli::GlobalArgs;
use crate::control::{OutputArgs, block_on};
use std::fmt::Write;

pub fn services(global: &GlobalArgs, args: &OutputArgs) -> anyhow::Result<()> {
    let services: Vec<ServiceReport> = block_on(Client::new(&global.data_dir).get("/v1/services"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&services)?);
    } else {
        print!("{}", render(&services));
    }
    Ok(())
}

fn render(services: &[ServiceReport]) -> String {
    if services.is_empty() {
        return "no services known here yet (they appear when an instance runs here or a name is resolved)\n".into();
    }
    let mut out = String::new();
    for service in services {
        let ips: Vec<String> = service.service_ips.iter().map(|(policy, ip)| format!("{policy} {ip}")).collect();
        let _ = writeln!(
            out,
            "{}  [{}]",
            service.name,
            if ips.is_empty() { "ServiceIPs unknown".into() } else { ips.join(", ") }
        );
        for instance in &service.instances {
            let host = if instance.local { "this machine".to_string() } else { short(&instance.host) };
            let _ = writeln!(
                out,
                "  #{:<3} {:<15} -> {:<15} on {host}",
                instance.number, instance.instance_ip, instance.namespace_ip
            );
        }
    }
    out
}

/// Peer ids are long; their tail tells machines apart.
fn short(peer: &str) -> String {
    match peer.len() {
        n if n > 12 => format!("…{}", &peer[n - 10..]),
        _ => peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree_routes::InstanceReport;

    #[test]
    fn renders_services_with_their_instances() {
        let services = vec![ServiceReport {
            name: "shop.acme.web.prod".into(),
            service_ips: [
                ("closest".to_string(), "10.30.0.2".parse().unwrap()),
                ("rr".into(), "10.30.0.1".parse().unwrap()),
            ]
            .into(),
            instances: vec![InstanceReport {
                number: 0,
                instance_ip: "10.30.1.1".parse().unwrap(),
                namespace_ip: "10.16.0.2".parse().unwrap(),
                host: "12D3KooWAbCdEfGhIjKlMnOp".into(),
                local: false,
            }],
        }];
        let text = render(&services);
        assert!(text.contains("shop.acme.web.prod  [closest 10.30.0.2, rr 10.30.0.1]"), "{text}");
        assert!(text.contains("10.30.1.1") && text.contains("…GhIjKlMnOp"), "{text}");
        assert!(render(&[]).contains("no services known"));
    }
}
