//! The root's allocator of ServiceIPs (one per service and policy) and InstanceIPs (one per service instance),
//! both from the ServiceIP range (10.30.0.0/16 by default).
//!
//! Each key prefers a deterministic address derived from a stable hash of the service name and policy (or
//! instance number), so both sides of a partition usually pick the same address for the same service; on a
//! collision the next free address is taken (linear probing). A deployment may ask for fixed ServiceIPs and an
//! InstanceIP range (seed 002, section 3.6.3); asking for an address that is taken fails and names its holder.
//!
//! [`ServiceIpAllocator::merge`] joins the tables of two sides after a partition heals: both sides compute the
//! same table and the same list of moved addresses, whichever side runs it.

use super::PolicyKind;
use super::name::ServiceName;
use super::pool::SERVICE_IP_RANGE;
use crate::Time;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

/// What an address names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AddressKey {
    /// The ServiceIP of a service for one policy.
    Service { name: ServiceName, policy: PolicyKind },
    /// The InstanceIP of one instance.
    Instance { name: ServiceName, number: u32 },
}

impl AddressKey {
    pub fn service(&self) -> &ServiceName {
        match self {
            AddressKey::Service { name, .. } | AddressKey::Instance { name, .. } => name,
        }
    }

    /// Stable across machines and versions: FNV-1a over a fixed text form, then a 64-bit finaliser (MurmurHash3's
    /// `fmix64`) so the low bits used for the slot depend on every input byte.
    fn stable_hash(&self) -> u64 {
        let text = match self {
            AddressKey::Service { name, policy } => format!("service\0{name}\0{policy}"),
            AddressKey::Instance { name, number } => format!("instance\0{name}\0{number}"),
        };
        fmix64(fnv1a64(text.as_bytes()))
    }
}

impl fmt::Display for AddressKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressKey::Service { name, policy } => write!(f, "{name} ({policy})"),
            AddressKey::Instance { name, number } => write!(f, "{name} instance {number}"),
        }
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// How an address was chosen; requested addresses win over derived ones when a merge finds a clash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Origin {
    /// Asked for by a deployment (a fixed ServiceIP or an InstanceIP range).
    Requested,
    /// Derived from the name (preferred address or the next free one after it).
    Derived,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Assignment {
    pub key: AddressKey,
    pub addr: Ipv4Addr,
    pub origin: Origin,
}

/// A deployment's InstanceIP rule: instance `n` in `from..to` gets `base + (n - from)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceRange {
    pub service: ServiceName,
    pub from: u32,
    /// Exclusive: the rule covers `to - from` instances.
    pub to: u32,
    pub base: Ipv4Addr,
}

impl InstanceRange {
    fn covers(&self, number: u32) -> bool {
        (self.from..self.to).contains(&number)
    }

    fn address_of(&self, number: u32) -> Option<Ipv4Addr> {
        self.covers(number).then(|| Ipv4Addr::from(u32::from(self.base).wrapping_add(number - self.from)))
    }

    /// First and last address, when the rule fits the address space.
    fn span(&self) -> Option<(u32, u32)> {
        let first = u32::from(self.base);
        let len = self.to.checked_sub(self.from).filter(|&l| l > 0)?;
        Some((first, first.checked_add(len - 1)?))
    }
}

/// What a deployment asks for (seed 002's `addresses` block).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AddressRequest {
    /// Fixed ServiceIPs per policy; the other policies get derived ones.
    pub service_ips: BTreeMap<PolicyKind, Ipv4Addr>,
    /// An InstanceIP rule `(from, to, base)`, `to` exclusive.
    pub instances: Option<(u32, u32, Ipv4Addr)>,
}

/// A service's ServiceIPs, one per policy; travels down with the deployment and in route answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddresses {
    pub name: ServiceName,
    pub service_ips: BTreeMap<PolicyKind, Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("{addr} is outside the ServiceIP range {range}")]
    OutsideRange { addr: Ipv4Addr, range: Ipv4Net },
    #[error("{0} is the network or broadcast address of the ServiceIP range")]
    Unusable(Ipv4Addr),
    #[error("{addr} is taken by {holder}")]
    Taken { addr: Ipv4Addr, holder: AddressKey },
    #[error("{addr} is reserved for the instances of {service}")]
    ReservedForRange { addr: Ipv4Addr, service: ServiceName },
    #[error("{key} already has the address {addr}")]
    AlreadyAssigned { key: AddressKey, addr: Ipv4Addr },
    #[error("instance range {from}..{to} from {base} is empty or does not fit the ServiceIP range")]
    BadRange { from: u32, to: u32, base: Ipv4Addr },
    #[error("{service} already has an instance range")]
    RangeExists { service: ServiceName },
    #[error("the address {addr} is requested twice in one deployment")]
    DuplicateRequest { addr: Ipv4Addr },
    #[error("the ServiceIP range is full")]
    Exhausted,
}

/// The outcome of [`ServiceIpAllocator::merge`]; identical on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MergeReport {
    /// Assignments one side held that did not survive, sorted: their key now has `to` (`None` if the range is
    /// full). The services named here must learn their new address.
    pub moved: Vec<Moved>,
    /// Instance-range rules that clashed with another and were dropped.
    pub dropped_ranges: Vec<InstanceRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Moved {
    pub key: AddressKey,
    pub from: Ipv4Addr,
    pub to: Option<Ipv4Addr>,
}

/// The whole table, as it travels between roots when a partition heals, or to a successor root.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AllocatorState {
    pub assignments: Vec<Assignment>,
    pub ranges: Vec<InstanceRange>,
}

/// The root's table of ServiceIPs and InstanceIPs.
#[derive(Debug, Clone)]
pub struct ServiceIpAllocator {
    range: Ipv4Net,
    by_addr: BTreeMap<Ipv4Addr, (AddressKey, Origin)>,
    by_key: HashMap<AddressKey, Ipv4Addr>,
    ranges: BTreeMap<ServiceName, InstanceRange>,
    /// InstanceIPs whose instance went away, with when: freed once a grace period passes without it coming back
    /// (local time, never sent: a surviving root starts counting anew after a merge).
    gone: BTreeMap<AddressKey, Time>,
}

impl Default for ServiceIpAllocator {
    fn default() -> Self {
        Self::new(SERVICE_IP_RANGE)
    }
}

impl ServiceIpAllocator {
    /// Allocates from `range`, except its network and broadcast addresses.
    pub fn new(range: Ipv4Net) -> Self {
        ServiceIpAllocator {
            range: range.trunc(),
            by_addr: BTreeMap::new(),
            by_key: HashMap::new(),
            ranges: BTreeMap::new(),
            gone: BTreeMap::new(),
        }
    }

    pub fn range(&self) -> Ipv4Net {
        self.range
    }

    /// Number of assignable addresses.
    fn slots(&self) -> u64 {
        let size = 1u64 << (32 - u32::from(self.range.prefix_len()));
        // /31 and /32 have no network or broadcast address to skip (RFC 3021).
        if self.range.prefix_len() >= 31 { size } else { size - 2 }
    }

    fn slot_addr(&self, slot: u64) -> Ipv4Addr {
        let first = u32::from(self.range.network()) + u32::from(self.range.prefix_len() < 31);
        Ipv4Addr::from(first + slot as u32)
    }

    fn slot_of(&self, addr: Ipv4Addr) -> u64 {
        let first = u32::from(self.range.network()) + u32::from(self.range.prefix_len() < 31);
        u64::from(u32::from(addr) - first)
    }

    /// The address `key` gets when nothing else holds it; the same on every machine.
    pub fn preferred(&self, key: &AddressKey) -> Ipv4Addr {
        self.slot_addr(key.stable_hash() % self.slots())
    }

    /// Steps from `key`'s preferred address to `addr`, wrapping; orders merge candidates.
    fn probe_distance(&self, key: &AddressKey, addr: Ipv4Addr) -> u64 {
        let n = self.slots();
        (self.slot_of(addr) + n - key.stable_hash() % n) % n
    }

    fn check_usable(&self, addr: Ipv4Addr) -> Result<(), AllocError> {
        if !self.range.contains(&addr) {
            return Err(AllocError::OutsideRange { addr, range: self.range });
        }
        if self.range.prefix_len() < 31 && (addr == self.range.network() || addr == self.range.broadcast()) {
            return Err(AllocError::Unusable(addr));
        }
        Ok(())
    }

    /// The service whose instance range reserves `addr` for someone other than `key`, if any: an address in a
    /// range belongs to exactly one instance number of that range's service.
    fn reserved_for_other(&self, addr: Ipv4Addr, key: &AddressKey) -> Option<&ServiceName> {
        let a = u32::from(addr);
        let rule = self.ranges.values().find(|r| r.span().is_some_and(|(lo, hi)| (lo..=hi).contains(&a)))?;
        let owner = matches!(key, AddressKey::Instance { name, number }
            if *name == rule.service && rule.address_of(*number) == Some(addr));
        (!owner).then_some(&rule.service)
    }

    /// Why `key` may not take `addr`, if it may not.
    fn check_free_for(&self, key: &AddressKey, addr: Ipv4Addr) -> Result<(), AllocError> {
        self.check_usable(addr)?;
        if let Some((holder, _)) = self.by_addr.get(&addr)
            && holder != key
        {
            return Err(AllocError::Taken { addr, holder: holder.clone() });
        }
        if let Some(service) = self.reserved_for_other(addr, key) {
            return Err(AllocError::ReservedForRange { addr, service: service.clone() });
        }
        Ok(())
    }

    fn insert(&mut self, key: AddressKey, addr: Ipv4Addr, origin: Origin) {
        self.by_key.insert(key.clone(), addr);
        self.by_addr.insert(addr, (key, origin));
    }

    /// The first address from `key`'s preferred one on that `key` may take.
    fn derive(&self, key: &AddressKey) -> Result<Ipv4Addr, AllocError> {
        let n = self.slots();
        let start = key.stable_hash() % n;
        (0..n)
            .map(|step| self.slot_addr((start + step) % n))
            .find(|&addr| self.check_free_for(key, addr).is_ok())
            .ok_or(AllocError::Exhausted)
    }

    /// `key`'s address, allocating a derived one if it has none (idempotent).
    fn get_or_derive(&mut self, key: AddressKey) -> Result<Ipv4Addr, AllocError> {
        if let Some(&addr) = self.by_key.get(&key) {
            return Ok(addr);
        }
        let addr = self.derive(&key)?;
        self.insert(key, addr, Origin::Derived);
        Ok(addr)
    }

    /// The ServiceIP of `name` for `policy`, allocated on first use.
    pub fn service_ip(&mut self, name: &ServiceName, policy: PolicyKind) -> Result<Ipv4Addr, AllocError> {
        self.get_or_derive(AddressKey::Service { name: name.clone(), policy })
    }

    /// The InstanceIP of instance `number`, allocated on first use: from the service's instance range when it
    /// covers `number`, derived otherwise.
    pub fn instance_ip(&mut self, name: &ServiceName, number: u32) -> Result<Ipv4Addr, AllocError> {
        let key = AddressKey::Instance { name: name.clone(), number };
        if let Some(&addr) = self.by_key.get(&key) {
            return Ok(addr);
        }
        if let Some(addr) = self.ranges.get(name).and_then(|r| r.address_of(number)) {
            self.check_free_for(&key, addr)?;
            self.insert(key, addr, Origin::Requested);
            return Ok(addr);
        }
        self.get_or_derive(key)
    }

    /// Gives `key` exactly `addr` (a fixed address from a deployment descriptor).
    pub fn assign(&mut self, key: AddressKey, addr: Ipv4Addr) -> Result<(), AllocError> {
        match self.by_key.get(&key) {
            Some(&held) if held == addr => return Ok(()),
            Some(&held) => return Err(AllocError::AlreadyAssigned { key, addr: held }),
            None => {}
        }
        self.check_free_for(&key, addr)?;
        self.insert(key, addr, Origin::Requested);
        Ok(())
    }

    /// Checks an instance-range rule against the table without changing it.
    fn check_range(&self, rule: &InstanceRange) -> Result<(), AllocError> {
        let bad = || AllocError::BadRange { from: rule.from, to: rule.to, base: rule.base };
        let (lo, hi) = rule.span().ok_or_else(bad)?;
        self.check_usable(Ipv4Addr::from(lo)).map_err(|_| bad())?;
        self.check_usable(Ipv4Addr::from(hi)).map_err(|_| bad())?;
        if self.ranges.contains_key(&rule.service) {
            return Err(AllocError::RangeExists { service: rule.service.clone() });
        }
        if let Some(other) = self.ranges.values().find(|r| r.span().is_some_and(|(l, h)| l <= hi && lo <= h)) {
            return Err(AllocError::ReservedForRange { addr: other.base, service: other.service.clone() });
        }
        for (&addr, (holder, _)) in self.by_addr.range(Ipv4Addr::from(lo)..=Ipv4Addr::from(hi)) {
            let fits = matches!(holder, AddressKey::Instance { name, number }
                if *name == rule.service && rule.address_of(*number) == Some(addr));
            if !fits {
                return Err(AllocError::Taken { addr, holder: holder.clone() });
            }
        }
        Ok(())
    }

    /// Reserves `base + (n - from)` for instance `n` of `service`, `n` in `from..to`.
    pub fn set_instance_range(&mut self, rule: InstanceRange) -> Result<(), AllocError> {
        self.check_range(&rule)?;
        self.ranges.insert(rule.service.clone(), rule);
        Ok(())
    }

    /// Gives `name` one ServiceIP per policy, honouring the request's fixed addresses and instance range. Either
    /// everything is allocated or, on error, nothing changes.
    pub fn deploy(&mut self, name: &ServiceName, request: &AddressRequest) -> Result<ServiceAddresses, AllocError> {
        let mut seen = BTreeSet::new();
        for (&policy, &addr) in &request.service_ips {
            if !seen.insert(addr) {
                return Err(AllocError::DuplicateRequest { addr });
            }
            let key = AddressKey::Service { name: name.clone(), policy };
            if let Some(&held) = self.by_key.get(&key).filter(|&&held| held != addr) {
                return Err(AllocError::AlreadyAssigned { key, addr: held });
            }
            self.check_free_for(&key, addr)?;
        }
        let rule = request.instances.map(|(from, to, base)| InstanceRange { service: name.clone(), from, to, base });
        if let Some(rule) = &rule {
            self.check_range(rule)?;
            let (lo, hi) = rule.span().expect("checked");
            if let Some(&addr) = seen.iter().find(|a| (lo..=hi).contains(&u32::from(**a))) {
                return Err(AllocError::ReservedForRange { addr, service: name.clone() });
            }
        }
        // Validated; only running out of addresses can still fail, and then everything added is taken back.
        let before: BTreeSet<AddressKey> = PolicyKind::ALL
            .iter()
            .map(|&policy| AddressKey::Service { name: name.clone(), policy })
            .filter(|k| self.by_key.contains_key(k))
            .collect();
        for (&policy, &addr) in &request.service_ips {
            self.assign(AddressKey::Service { name: name.clone(), policy }, addr).expect("checked above");
        }
        let added_range = rule.is_some();
        if let Some(rule) = rule {
            self.ranges.insert(name.clone(), rule);
        }
        let mut service_ips = BTreeMap::new();
        for policy in PolicyKind::ALL {
            match self.service_ip(name, policy) {
                Ok(addr) => {
                    service_ips.insert(policy, addr);
                }
                Err(e) => {
                    for policy in PolicyKind::ALL {
                        let key = AddressKey::Service { name: name.clone(), policy };
                        if !before.contains(&key) {
                            self.release(&key);
                        }
                    }
                    if added_range {
                        self.ranges.remove(name);
                    }
                    return Err(e);
                }
            }
        }
        Ok(ServiceAddresses { name: name.clone(), service_ips })
    }

    /// Instance `number` of `name` stopped running (its last record left the tree) at `now`: its InstanceIP stays
    /// reserved for a grace period, so an instance that restarts or moves keeps its address
    /// ([`ServiceIpAllocator::release_lapsed`] frees it after that).
    pub fn instance_gone(&mut self, name: &ServiceName, number: u32, now: Time) {
        let key = AddressKey::Instance { name: name.clone(), number };
        if self.by_key.contains_key(&key) {
            self.gone.entry(key).or_insert(now);
        }
    }

    /// Instance `number` of `name` runs (again): its InstanceIP is no longer up for release.
    pub fn instance_running(&mut self, name: &ServiceName, number: u32) {
        if !self.gone.is_empty() {
            self.gone.remove(&AddressKey::Instance { name: name.clone(), number });
        }
    }

    /// Whether an address of a gone instance waits for its grace to pass (see [`ServiceIpAllocator::release_lapsed`]).
    pub fn has_lapsing(&self) -> bool {
        !self.gone.is_empty()
    }

    /// Frees the InstanceIPs of instances gone for `grace` or longer at `now`; returns them sorted by key.
    pub fn release_lapsed(&mut self, now: Time, grace: Duration) -> Vec<Assignment> {
        let lapsed: Vec<AddressKey> =
            self.gone.iter().filter(|(_, at)| now.saturating_sub(**at) >= grace).map(|(k, _)| k.clone()).collect();
        let mut freed = Vec::new();
        for key in lapsed {
            self.gone.remove(&key);
            let origin = self.by_key.get(&key).and_then(|a| self.by_addr.get(a)).map(|(_, o)| *o);
            if let (Some(addr), Some(origin)) = (self.release(&key), origin) {
                freed.push(Assignment { key, addr, origin });
            }
        }
        freed
    }

    /// Frees `key`'s address.
    pub fn release(&mut self, key: &AddressKey) -> Option<Ipv4Addr> {
        self.gone.remove(key);
        let addr = self.by_key.remove(key)?;
        self.by_addr.remove(&addr);
        Some(addr)
    }

    /// Frees every address of `name` and its instance range (the service was removed); returns what it held.
    pub fn release_service(&mut self, name: &ServiceName) -> Vec<Assignment> {
        self.ranges.remove(name);
        let held: Vec<Assignment> = self.assignments().filter(|a| a.key.service() == name).collect();
        for a in &held {
            self.release(&a.key);
        }
        held
    }

    pub fn address(&self, key: &AddressKey) -> Option<Ipv4Addr> {
        self.by_key.get(key).copied()
    }

    pub fn holder(&self, addr: Ipv4Addr) -> Option<&AddressKey> {
        self.by_addr.get(&addr).map(|(key, _)| key)
    }

    /// The ServiceIPs `name` has so far.
    pub fn service_addresses(&self, name: &ServiceName) -> ServiceAddresses {
        let service_ips = PolicyKind::ALL
            .iter()
            .filter_map(|&policy| {
                self.address(&AddressKey::Service { name: name.clone(), policy }).map(|addr| (policy, addr))
            })
            .collect();
        ServiceAddresses { name: name.clone(), service_ips }
    }

    /// The lowest instance number of `name` without an InstanceIP.
    pub fn next_instance_number(&self, name: &ServiceName) -> u32 {
        (0..).find(|&n| !self.by_key.contains_key(&AddressKey::Instance { name: name.clone(), number: n })).unwrap_or(0)
    }

    /// Every assignment, sorted by address.
    pub fn assignments(&self) -> impl Iterator<Item = Assignment> + '_ {
        self.by_addr.iter().map(|(&addr, (key, origin))| Assignment { key: key.clone(), addr, origin: *origin })
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    pub fn state(&self) -> AllocatorState {
        AllocatorState { assignments: self.assignments().collect(), ranges: self.ranges.values().cloned().collect() }
    }

    /// Rebuilds a table from a state received from another node, dropping what does not fit (as a merge with
    /// an empty table would).
    pub fn from_state(range: Ipv4Net, state: &AllocatorState) -> (Self, MergeReport) {
        let mut table = Self::new(range);
        let report = table.merge(state);
        (table, report)
    }

    /// Joins `other`'s table into this one after a partition heals. The result depends only on the union of the
    /// two tables, so both roots (or whichever merges) compute the same table and the same report:
    ///
    /// 1. instance ranges: kept in (service, rule) order unless they overlap a kept one or the service already
    ///    has one;
    /// 2. assignments: requested ones before derived ones, then the ones nearer their preferred address, then by
    ///    key and address; each is kept when neither its key nor its address is taken yet (and the address is
    ///    not in another service's range);
    /// 3. keys left without an address get a fresh one, in the order of step 2.
    pub fn merge(&mut self, other: &AllocatorState) -> MergeReport {
        let mut report = MergeReport::default();
        let mut rules: BTreeSet<InstanceRange> = self.ranges.values().cloned().collect();
        rules.extend(other.ranges.iter().cloned());
        let mut candidates: BTreeMap<(AddressKey, Ipv4Addr), Origin> = BTreeMap::new();
        for a in self.assignments().chain(other.assignments.iter().cloned()) {
            let origin = candidates.entry((a.key, a.addr)).or_insert(a.origin);
            *origin = (*origin).min(a.origin);
        }
        let mut merged = Self::new(self.range);
        for rule in rules {
            match merged.check_range(&rule) {
                Ok(()) => {
                    merged.ranges.insert(rule.service.clone(), rule);
                }
                Err(_) => report.dropped_ranges.push(rule),
            }
        }
        let mut ordered: Vec<((AddressKey, Ipv4Addr), Origin)> = candidates.into_iter().collect();
        ordered.sort_by_cached_key(|((key, addr), origin)| {
            (*origin, self.probe_distance_checked(key, *addr), key.clone(), *addr)
        });
        let mut losers = Vec::new();
        for ((key, addr), origin) in ordered {
            let in_own_range = |m: &Self| match &key {
                AddressKey::Instance { name, number } => m.ranges.get(name).and_then(|r| r.address_of(*number)),
                AddressKey::Service { .. } => None,
            };
            // An instance covered by its service's range may only keep the range's address.
            let range_ok = in_own_range(&merged).is_none_or(|a| a == addr);
            if range_ok && !merged.by_key.contains_key(&key) && merged.check_free_for(&key, addr).is_ok() {
                merged.insert(key, addr, origin);
            } else {
                losers.push((key, addr));
            }
        }
        for (key, from) in losers {
            let to = match merged.by_key.get(&key) {
                Some(&to) => Some(to),
                None => {
                    let wanted = match &key {
                        AddressKey::Instance { name, number } => {
                            merged.ranges.get(name).and_then(|r| r.address_of(*number))
                        }
                        AddressKey::Service { .. } => None,
                    };
                    let fresh = match wanted {
                        Some(addr) if merged.check_free_for(&key, addr).is_ok() => Some((addr, Origin::Requested)),
                        _ => merged.derive(&key).ok().map(|addr| (addr, Origin::Derived)),
                    };
                    fresh.map(|(addr, origin)| {
                        merged.insert(key.clone(), addr, origin);
                        addr
                    })
                }
            };
            report.moved.push(Moved { key, from, to });
        }
        report.moved.sort();
        *self = merged;
        report
    }

    /// Like `probe_distance`, but addresses outside the range sort last instead of overflowing.
    fn probe_distance_checked(&self, key: &AddressKey, addr: Ipv4Addr) -> u64 {
        if self.check_usable(addr).is_ok() { self.probe_distance(key, addr) } else { u64::MAX }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_stable_hash_matches_the_published_fnv_vectors_and_never_changes() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Pinned (checked against an independent Python computation): changing the derivation would move every
        // deployed service's address after an upgrade.
        let table = ServiceIpAllocator::default();
        let key = AddressKey::Service { name: name("test.tum.login.dev"), policy: PolicyKind::Rr };
        assert_eq!(table.preferred(&key), ip("10.30.28.83"));
    }

    #[test]
    fn an_instance_ip_outlives_its_instance_for_the_grace_period_only() {
        let secs = Duration::from_secs;
        let grace = secs(300);
        let svc = name("shop.acme.cart.prod");
        let mut table = ServiceIpAllocator::default();
        let zero = table.instance_ip(&svc, 0).unwrap();
        let one = table.instance_ip(&svc, 1).unwrap();
        // Instance 0 restarts within the grace period: it keeps its address.
        table.instance_gone(&svc, 0, secs(10));
        assert!(table.release_lapsed(secs(200), grace).is_empty());
        table.instance_running(&svc, 0);
        assert!(table.release_lapsed(secs(10_000), grace).is_empty());
        assert_eq!(table.instance_ip(&svc, 0).unwrap(), zero);
        // Instance 1 stays away: after the grace period its address is free (and the other one is not).
        table.instance_gone(&svc, 1, secs(20));
        table.instance_gone(&svc, 1, secs(250));
        assert!(table.release_lapsed(secs(319), grace).is_empty(), "the first time it went counts");
        let freed = table.release_lapsed(secs(320), grace);
        assert_eq!(freed.len(), 1);
        assert_eq!((freed[0].key.clone(), freed[0].addr), (AddressKey::Instance { name: svc.clone(), number: 1 }, one));
        assert_eq!(table.holder(one), None);
        assert_eq!(table.holder(zero), Some(&AddressKey::Instance { name: svc.clone(), number: 0 }));
        // Unknown instances and services without addresses are ignored.
        table.instance_gone(&name("no.such.svc.here"), 3, secs(0));
        table.instance_gone(&svc, 9, secs(0));
        assert!(table.release_lapsed(secs(100_000), grace).is_empty());
    }

    #[test]
    fn addresses_are_derived_per_policy_and_instance_and_are_idempotent() {
        let mut table = ServiceIpAllocator::default();
        let svc = name("a.b.c.d");
        let rr = table.service_ip(&svc, PolicyKind::Rr).unwrap();
        let closest = table.service_ip(&svc, PolicyKind::Closest).unwrap();
        let i0 = table.instance_ip(&svc, 0).unwrap();
        assert_ne!(rr, closest);
        assert_eq!(rr, table.preferred(&AddressKey::Service { name: svc.clone(), policy: PolicyKind::Rr }));
        assert_eq!(table.service_ip(&svc, PolicyKind::Rr).unwrap(), rr);
        assert_eq!(table.instance_ip(&svc, 0).unwrap(), i0);
        assert!(SERVICE_IP_RANGE.contains(&i0));
        assert_eq!(
            table.holder(closest),
            Some(&AddressKey::Service { name: svc.clone(), policy: PolicyKind::Closest })
        );
        assert_eq!(table.next_instance_number(&svc), 1);
        // Another machine computes the same addresses.
        let mut elsewhere = ServiceIpAllocator::default();
        assert_eq!(elsewhere.service_ip(&svc, PolicyKind::Rr).unwrap(), rr);
    }

    #[test]
    fn collisions_probe_to_the_next_free_address() {
        let mut table = ServiceIpAllocator::default();
        let key = AddressKey::Service { name: name("a.b.c.d"), policy: PolicyKind::Hc };
        let preferred = table.preferred(&key);
        let squatter = AddressKey::Instance { name: name("x.y.z.w"), number: 3 };
        table.assign(squatter.clone(), preferred).unwrap();
        let got = table.service_ip(&name("a.b.c.d"), PolicyKind::Hc).unwrap();
        assert_eq!(u32::from(got), u32::from(preferred) + 1);
        assert_eq!(
            table.assign(AddressKey::Service { name: name("q.q.q.q"), policy: PolicyKind::Rr }, preferred),
            Err(AllocError::Taken { addr: preferred, holder: squatter })
        );
    }

    #[test]
    fn fixed_requests_and_instance_ranges_follow_the_deployment_descriptor() {
        let mut table = ServiceIpAllocator::default();
        let svc = name("demo.default.service1.test");
        let request = AddressRequest {
            service_ips: BTreeMap::from([(PolicyKind::Rr, ip("10.30.25.3")), (PolicyKind::Closest, ip("10.30.25.4"))]),
            instances: Some((0, 10, ip("10.30.25.5"))),
        };
        let addrs = table.deploy(&svc, &request).unwrap();
        assert_eq!(addrs.service_ips.len(), PolicyKind::ALL.len());
        assert_eq!(addrs.service_ips[&PolicyKind::Rr], ip("10.30.25.3"));
        assert_eq!(addrs, table.service_addresses(&svc));
        assert_eq!(table.instance_ip(&svc, 0).unwrap(), ip("10.30.25.5"));
        assert_eq!(table.instance_ip(&svc, 9).unwrap(), ip("10.30.25.14"));
        // Inside its own range an instance gets only its own address.
        let wrong_slot = AddressKey::Instance { name: svc.clone(), number: 3 };
        assert_eq!(
            table.assign(wrong_slot, ip("10.30.25.12")),
            Err(AllocError::ReservedForRange { addr: ip("10.30.25.12"), service: svc.clone() })
        );
        let outside = table.instance_ip(&svc, 10).unwrap();
        assert!(!(u32::from(ip("10.30.25.5"))..=u32::from(ip("10.30.25.14"))).contains(&u32::from(outside)));

        // Another service may not take an address in that range, nor a taken ServiceIP.
        let other = name("demo.default.service2.test");
        let clash =
            AddressRequest { service_ips: BTreeMap::from([(PolicyKind::Hc, ip("10.30.25.7"))]), ..Default::default() };
        assert_eq!(
            table.deploy(&other, &clash),
            Err(AllocError::ReservedForRange { addr: ip("10.30.25.7"), service: svc.clone() })
        );
        let taken =
            AddressRequest { service_ips: BTreeMap::from([(PolicyKind::Hc, ip("10.30.25.3"))]), ..Default::default() };
        let err = table.deploy(&other, &taken).unwrap_err();
        assert_eq!(err.to_string(), "10.30.25.3 is taken by demo.default.service1.test (rr)");
        let overlapping = AddressRequest { instances: Some((0, 4, ip("10.30.25.12"))), ..Default::default() };
        assert!(matches!(table.deploy(&other, &overlapping), Err(AllocError::ReservedForRange { .. })));
        // Failed deployments left nothing behind.
        assert!(table.service_addresses(&other).service_ips.is_empty());
        // Bad requests.
        let outside_range =
            AddressRequest { service_ips: BTreeMap::from([(PolicyKind::Hc, ip("10.31.0.1"))]), ..Default::default() };
        assert!(matches!(table.deploy(&other, &outside_range), Err(AllocError::OutsideRange { .. })));
        let broadcast = AddressRequest {
            service_ips: BTreeMap::from([(PolicyKind::Hc, ip("10.30.255.255"))]),
            ..Default::default()
        };
        assert_eq!(table.deploy(&other, &broadcast), Err(AllocError::Unusable(ip("10.30.255.255"))));
        let empty = AddressRequest { instances: Some((5, 5, ip("10.30.40.0"))), ..Default::default() };
        assert!(matches!(table.deploy(&other, &empty), Err(AllocError::BadRange { .. })));
        let too_long = AddressRequest { instances: Some((0, 1000, ip("10.30.255.0"))), ..Default::default() };
        assert!(matches!(table.deploy(&other, &too_long), Err(AllocError::BadRange { .. })));
        let twice = AddressRequest {
            service_ips: BTreeMap::from([(PolicyKind::Hc, ip("10.30.9.9")), (PolicyKind::Rr, ip("10.30.9.9"))]),
            ..Default::default()
        };
        assert_eq!(table.deploy(&other, &twice), Err(AllocError::DuplicateRequest { addr: ip("10.30.9.9") }));
        assert!(table.service_addresses(&other).service_ips.is_empty());

        let released = table.release_service(&svc);
        assert_eq!(released.len(), PolicyKind::ALL.len() + 3);
        assert!(table.is_empty());
        assert!(table.deploy(&other, &overlapping).is_ok());
    }

    #[test]
    fn a_deployment_that_runs_out_of_addresses_leaves_nothing_behind() {
        // A /29 has 6 usable addresses; each service needs one per policy.
        let mut table = ServiceIpAllocator::new("10.30.0.0/29".parse().unwrap());
        table.deploy(&name("a.a.a.a"), &AddressRequest::default()).unwrap();
        let before = table.state();
        let fixed = AddressRequest {
            service_ips: BTreeMap::from([(
                PolicyKind::Latency,
                table.derive(&AddressKey::Instance { name: name("z.z.z.z"), number: 0 }).unwrap(),
            )]),
            ..Default::default()
        };
        assert_eq!(table.deploy(&name("b.b.b.b"), &fixed), Err(AllocError::Exhausted));
        assert_eq!(table.state(), before);
        assert_eq!(table.len(), PolicyKind::ALL.len());
    }

    #[test]
    fn a_merge_keeps_one_owner_per_address_and_reports_who_moves() {
        let svc_a = name("a.a.a.a");
        let svc_b = name("b.b.b.b");
        let key_a = AddressKey::Service { name: svc_a.clone(), policy: PolicyKind::Rr };
        let key_b = AddressKey::Service { name: svc_b.clone(), policy: PolicyKind::Rr };
        let contested = ip("10.30.1.1");
        // Side one: A asked for the address; side two: B derived into it (simulated with a derived entry).
        let mut one = ServiceIpAllocator::default();
        one.assign(key_a.clone(), contested).unwrap();
        let mut two = ServiceIpAllocator::default();
        two.insert(key_b.clone(), contested, Origin::Derived);
        let same_on_both = two.service_ip(&svc_a, PolicyKind::Hc).unwrap();
        one.service_ip(&svc_a, PolicyKind::Hc).unwrap();

        let (state_one, state_two) = (one.state(), two.state());
        let report_one = one.merge(&state_two);
        let report_two = two.merge(&state_one);
        assert_eq!(report_one, report_two);
        assert_eq!(one.state(), two.state());
        assert_eq!(one.address(&key_a), Some(contested));
        assert_eq!(report_one.moved.len(), 1);
        let moved = &report_one.moved[0];
        assert_eq!((&moved.key, moved.from), (&key_b, contested));
        assert_eq!(one.address(&key_b), moved.to);
        assert_eq!(one.address(&AddressKey::Service { name: svc_a, policy: PolicyKind::Hc }), Some(same_on_both));
    }

    fn key_strategy() -> impl Strategy<Value = AddressKey> {
        let svc = proptest::sample::select(vec!["a.a.a.a", "b.b.b.b", "c.c.c.c"]);
        (svc, proptest::option::of(0..4u32), proptest::sample::select(PolicyKind::ALL.to_vec())).prop_map(
            |(svc, number, policy)| match number {
                Some(number) => AddressKey::Instance { name: name(svc), number },
                None => AddressKey::Service { name: name(svc), policy },
            },
        )
    }

    fn table_strategy() -> impl Strategy<Value = ServiceIpAllocator> {
        // A tiny range so collisions are common.
        let ops = proptest::collection::vec((key_strategy(), proptest::option::of(0..14u32)), 0..20);
        let range = proptest::option::of((proptest::sample::select(vec!["a.a.a.a", "b.b.b.b"]), 0..12u32));
        (range, ops).prop_map(|(range, ops)| {
            let mut table = ServiceIpAllocator::new("10.30.0.0/28".parse().unwrap());
            if let Some((svc, offset)) = range {
                let base = Ipv4Addr::from(u32::from(ip("10.30.0.1")) + offset);
                table.set_instance_range(InstanceRange { service: name(svc), from: 1, to: 3, base }).unwrap();
            }
            for (key, fixed) in ops {
                match fixed {
                    Some(offset) => {
                        let _ = table.assign(key, Ipv4Addr::from(u32::from(ip("10.30.0.1")) + offset));
                    }
                    None => {
                        let _ = table.get_or_derive(key);
                    }
                }
            }
            table
        })
    }

    proptest! {
        #[test]
        fn merging_is_symmetric_and_keeps_one_owner_per_address(a in table_strategy(), b in table_strategy()) {
            let (mut left, mut right) = (a.clone(), b.clone());
            let report_left = left.merge(&b.state());
            let report_right = right.merge(&a.state());
            prop_assert_eq!(&report_left, &report_right);
            prop_assert_eq!(left.state(), right.state());
            // One address per key and one key per address.
            let keys: BTreeSet<AddressKey> = left.assignments().map(|x| x.key).collect();
            prop_assert_eq!(keys.len(), left.len());
            prop_assert_eq!(left.by_key.len(), left.len());
            // Kept instance ranges hold: an address inside one belongs to its instance.
            for x in left.assignments() {
                prop_assert!(left.reserved_for_other(x.addr, &x.key).is_none(), "{:?} breaks a range", x);
            }
            // Every key of either side still has an address unless the range ran out, and every assignment that
            // changed is reported.
            for side in [&a, &b] {
                for x in side.assignments() {
                    match left.address(&x.key) {
                        Some(addr) if addr == x.addr => {}
                        now => {
                            let expected = Moved { key: x.key.clone(), from: x.addr, to: now };
                            prop_assert!(report_left.moved.contains(&expected), "{:?} not reported", expected);
                        }
                    }
                }
            }
        }
    }
}
