//! What the resolver asks when a name in our domain comes in: which address a [`DnsTarget`] has right now.
//!
//! The agent's route cache implements [`ServiceLookup`] (answer from the cache, or send a table query up the tree
//! and wait); [`StaticLookup`] is a plain map for the standalone data plane and for tests.

use canopy_overlay::routes::DnsTarget;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::RwLock;

/// Why a lookup gave no answer, as opposed to answering "no such service" (`Ok(None)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The table query did not come back in time; the client gets SERVFAIL and may retry.
    #[error("the route lookup timed out")]
    Timeout,
    /// The lookup could not be made at all (e.g. no parent to ask right now).
    #[error("the route lookup is unavailable: {0}")]
    Unavailable(String),
}

/// Resolves a service or instance name to its ServiceIP or InstanceIP.
///
/// `Ok(None)` means the tree says the service (or instance) does not exist: the client gets NXDOMAIN. The server
/// bounds every call with its own lookup timeout, so an implementation may simply wait for its table query.
#[async_trait::async_trait]
pub trait ServiceLookup: Send + Sync + 'static {
    async fn resolve(&self, target: &DnsTarget) -> Result<Option<Ipv4Addr>, LookupError>;
}

/// A fixed name -> address map (standalone data plane with a static route table, tests).
#[derive(Debug, Default)]
pub struct StaticLookup {
    entries: RwLock<HashMap<DnsTarget, Ipv4Addr>>,
}

impl StaticLookup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the address of `target`; returns the previous one.
    pub fn insert(&self, target: DnsTarget, address: Ipv4Addr) -> Option<Ipv4Addr> {
        self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(target, address)
    }

    pub fn remove(&self, target: &DnsTarget) -> Option<Ipv4Addr> {
        self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(target)
    }

    /// Replaces every entry at once (e.g. when the static route table is reloaded).
    pub fn replace_all(&self, entries: impl IntoIterator<Item = (DnsTarget, Ipv4Addr)>) {
        *self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = entries.into_iter().collect();
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<(DnsTarget, Ipv4Addr)> for StaticLookup {
    fn from_iter<I: IntoIterator<Item = (DnsTarget, Ipv4Addr)>>(entries: I) -> Self {
        Self { entries: RwLock::new(entries.into_iter().collect()) }
    }
}

#[async_trait::async_trait]
impl ServiceLookup for StaticLookup {
    async fn resolve(&self, target: &DnsTarget) -> Result<Option<Ipv4Addr>, LookupError> {
        Ok(self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(target).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_overlay::routes::PolicyKind;

    fn service(name: &str, policy: PolicyKind) -> DnsTarget {
        DnsTarget::Service { name: name.parse().unwrap(), policy }
    }

    #[tokio::test]
    async fn static_lookup_answers_only_what_it_holds() {
        let lookup: StaticLookup =
            [(service("a.b.c.d", PolicyKind::Rr), Ipv4Addr::new(10, 30, 0, 3))].into_iter().collect();
        assert_eq!(lookup.resolve(&service("a.b.c.d", PolicyKind::Rr)).await, Ok(Some(Ipv4Addr::new(10, 30, 0, 3))));
        // Same service, other policy: a different ServiceIP, so not known.
        assert_eq!(lookup.resolve(&service("a.b.c.d", PolicyKind::Closest)).await, Ok(None));
        let instance = DnsTarget::Instance { name: "a.b.c.d".parse().unwrap(), number: 0 };
        assert_eq!(lookup.insert(instance.clone(), Ipv4Addr::new(10, 30, 0, 4)), None);
        assert_eq!(lookup.resolve(&instance).await, Ok(Some(Ipv4Addr::new(10, 30, 0, 4))));
        assert_eq!(lookup.remove(&instance), Some(Ipv4Addr::new(10, 30, 0, 4)));
        assert_eq!(lookup.resolve(&instance).await, Ok(None));
        lookup.replace_all([]);
        assert!(lookup.is_empty());
    }
}
