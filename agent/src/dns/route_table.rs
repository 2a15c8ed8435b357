//! The resolver beside a data plane with a static route table: its names come from the table in force (every
//! service's name + policy -> ServiceIP, every instance's name + number -> InstanceIP) and follow it when the table
//! is replaced. The route cache will take this place once the tree distributes routes.

use super::api::resolve_router;
use super::lookup::StaticLookup;
use super::{DEFAULT_DOMAIN, DNS_PORT, DnsConfig, RunningResolver};
use crate::dataplane::DataPlane;
use crate::dataplane::routes::RouteTable;
use anyhow::Context;
use canopy_overlay::routes::{DnsTarget, PolicyKind, ServiceDomain, ServiceName};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// Every name the table answers. Entries whose service name or policy the resolver cannot express are left out
/// (and logged): the data plane still routes their addresses.
pub fn names_in(table: &RouteTable) -> Vec<(DnsTarget, Ipv4Addr)> {
    let mut names = Vec::new();
    for service in &table.services {
        let name: ServiceName = match service.name.parse() {
            Ok(name) => name,
            Err(err) => {
                tracing::warn!(service = %service.name, "no DNS name for this service: {err}");
                continue;
            }
        };
        let policies = std::iter::once((&service.policy, service.service_ip))
            .chain(service.policy_ips.iter().map(|(p, ip)| (p, *ip)));
        for (policy, address) in policies {
            match policy.parse::<PolicyKind>() {
                Ok(policy) => names.push((DnsTarget::Service { name: name.clone(), policy }, address)),
                Err(err) => tracing::warn!(service = %service.name, %policy, "no DNS name for this policy: {err}"),
            }
        }
        for instance in &service.instances {
            names.push((DnsTarget::Instance { name: name.clone(), number: instance.number }, instance.instance_ip));
        }
    }
    names
}

/// Starts the resolver on the data plane's bridge gateway (port 53) answering from its route table, and keeps the
/// names in step with the table. Returns the resolver (keep it alive) and its API routes (`GET /v1/dns`,
/// `GET /v1/dns/resolve/{name}`).
pub async fn serve_for(dataplane: &DataPlane) -> anyhow::Result<(RunningResolver, axum::Router)> {
    let gateway = dataplane.status().await?.gateway;
    let domain: ServiceDomain = DEFAULT_DOMAIN.parse().context("the default DNS domain")?;
    let lookup = Arc::new(StaticLookup::new());
    let mut routes = dataplane.watch_routes();
    lookup.replace_all(names_in(&routes.borrow_and_update()));
    let config = DnsConfig::with_system_upstreams((gateway, DNS_PORT).into(), domain.clone())?;
    let resolver = super::spawn(config, lookup.clone()).await?;
    let router = resolver.router().merge(resolve_router(domain, lookup.clone()));
    // Ends with the data plane (its watch sender goes away).
    tokio::spawn(async move {
        while routes.changed().await.is_ok() {
            let names = names_in(&routes.borrow_and_update());
            tracing::info!(names = names.len(), "DNS names follow the new route table");
            lookup.replace_all(names);
        }
    });
    tracing::info!(listen = %resolver.local_addr(), "DNS resolver running");
    Ok((resolver, router))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::routes::tests::two_machine_table;

    #[test]
    fn every_service_policy_and_instance_gets_a_name() {
        let mut table = two_machine_table();
        table.services[1].policy_ips.insert("closest".into(), "10.30.0.3".parse().unwrap());
        table.services[0].policy = "fastest".into();
        let names: std::collections::HashMap<_, _> = names_in(&table).into_iter().collect();
        let web: ServiceName = "demo.default.web.default".parse().unwrap();
        let service = |policy| DnsTarget::Service { name: web.clone(), policy };
        assert_eq!(names[&service(PolicyKind::Rr)], Ipv4Addr::new(10, 30, 0, 2));
        assert_eq!(names[&service(PolicyKind::Closest)], Ipv4Addr::new(10, 30, 0, 3));
        assert_eq!(names[&DnsTarget::Instance { name: web.clone(), number: 1 }], Ipv4Addr::new(10, 30, 2, 2));
        // The client service's unknown policy gets no service name, but its instance still has one.
        let client: ServiceName = "demo.default.client.default".parse().unwrap();
        assert_eq!(names[&DnsTarget::Instance { name: client, number: 0 }], Ipv4Addr::new(10, 30, 1, 1));
        assert_eq!(names.len(), 5, "rr, closest, two web instances, one client instance");
    }
}
