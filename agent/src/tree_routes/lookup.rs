//! The resolver's view of the tree's routes: a Canopy name becomes a lookup in what this machine knows, or a table
//! query up the tree.

use super::TreeRoutes;
use crate::dns::{LookupError, ServiceLookup};
use canopy_overlay::routes::{DnsTarget, QueryKey};
use std::net::Ipv4Addr;

pub struct TreeLookup {
    routes: TreeRoutes,
}

impl TreeLookup {
    pub fn new(routes: TreeRoutes) -> Self {
        Self { routes }
    }
}

#[async_trait::async_trait]
impl ServiceLookup for TreeLookup {
    async fn resolve(&self, target: &DnsTarget) -> Result<Option<Ipv4Addr>, LookupError> {
        let routes = self
            .routes
            .lookup(QueryKey::Name(target.service().clone()))
            .await
            .map_err(|e| LookupError::Unavailable(e.to_string()))?;
        let Some(routes) = routes else { return Ok(None) };
        Ok(match target {
            DnsTarget::Service { policy, .. } => {
                // The service exists but its ServiceIPs have not arrived yet: SERVFAIL (retry), not NXDOMAIN.
                let addresses = routes
                    .addresses
                    .ok_or_else(|| LookupError::Unavailable("the service's ServiceIPs are not known yet".into()))?;
                addresses.service_ips.get(policy).copied()
            }
            DnsTarget::Instance { number, .. } => routes.instances.get(number).map(|r| r.instance_ip),
        })
    }
}
