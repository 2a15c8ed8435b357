//! The pure building blocks of routes and addresses: service names, subnet grants, ServiceIP/InstanceIP
//! allocation, the instance registry, interests and the route cache, and a coordinator's answer to a route query.
//!
//! Everything here is plain data with methods; time comes in as `now` ([`crate::Time`]) where expiry matters, and
//! nothing does I/O. Types that travel between nodes are serde types. Outputs whose order matters are sorted, so
//! two nodes fed the same inputs produce the same results.
//!
//! - [`name`]: [`ServiceName`] (`app.appns.svc.svcns`) and [`DnsTarget`] (full DNS names under a domain);
//! - [`pool`]: [`AddressPool`], aligned subnet grants with leases, inheritance and overlap resolution;
//! - [`service_ips`]: [`ServiceIpAllocator`], the root's ServiceIP/InstanceIP allocator and its partition merge;
//! - [`registry`]: [`InstanceRecord`] and [`Registry`], the index of a subtree's instances;
//! - [`interest`]: [`InterestTable`] (who gets which updates) and [`RouteCache`] (answers from the parent);
//! - [`query`]: what a coordinator does with a route query, and the pruning of answers to `k` per policy.

pub mod interest;
pub mod name;
pub mod pool;
pub mod query;
pub mod registry;
pub mod service_ips;

pub use canopy_policies::PolicyKind;
pub use interest::{CacheLookup, ExpiredInterests, InterestTable, RouteCache};
pub use name::{DnsTarget, NameError, ServiceDomain, ServiceName};
pub use pool::{AddressPool, Grant, GrantInfo, OverlapResolution, PoolError, PoolState, Renumbered, resolve_overlaps};
pub use query::{QueryAnswer, QueryDecision, QueryKey, decide, prune_for_child};
pub use registry::{InstanceRecord, Registry, RouteChange, UpsertOutcome, Via};
pub use service_ips::{
    AddressKey, AddressRequest, AllocError, AllocatorState, Assignment, InstanceRange, MergeReport, Moved, Origin,
    ServiceAddresses, ServiceIpAllocator,
};
