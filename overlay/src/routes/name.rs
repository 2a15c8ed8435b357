//! Service names and the DNS names that resolve to ServiceIPs and InstanceIPs (seed 002, section 3.6.2):
//!
//! ```text
//! app.appns.service.servicens.{INSTANCE|any}.{POLICY|none}.<domain>
//! ```
//!
//! `any` requires a policy (the answer is that policy's ServiceIP); an instance number requires `none` (the answer
//! is that instance's InstanceIP). Names are case-insensitive; every label is a DNS label.

use super::PolicyKind;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// Longest DNS name in text form, without the trailing dot (RFC 1035).
const MAX_NAME_LEN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty label in {0:?}")]
    EmptyLabel(String),
    #[error("label {label:?} is longer than {MAX_LABEL_LEN} characters")]
    LabelTooLong { label: String },
    #[error("label {label:?} may only hold letters, digits and inner hyphens")]
    BadLabel { label: String },
    #[error("name of {0} characters is longer than {MAX_NAME_LEN}")]
    NameTooLong(usize),
    #[error("a service name has 4 labels (app.appns.service.servicens), {found} given in {name:?}")]
    ServiceLabelCount { name: String, found: usize },
    #[error("{name:?} is not under the domain {domain:?}")]
    NotUnderDomain { name: String, domain: String },
    #[error("{name:?} needs 6 labels before the domain (app.appns.service.servicens.instance.policy), found {found}")]
    TargetLabelCount { name: String, found: usize },
    #[error("instance {0:?} is neither `any` nor an instance number")]
    BadInstance(String),
    #[error("`any` needs a routing policy, not `none`")]
    AnyNeedsPolicy,
    #[error("an instance number needs the policy `none`, not {0:?}")]
    NumberNeedsNone(String),
    #[error(transparent)]
    UnknownPolicy(#[from] canopy_policies::policy::UnknownPolicy),
}

/// Checks one DNS label (letters, digits, inner hyphens; 1 to 63 characters) and returns it lower-cased.
fn dns_label(label: &str, whole: &str) -> Result<String, NameError> {
    if label.is_empty() {
        return Err(NameError::EmptyLabel(whole.to_owned()));
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(NameError::LabelTooLong { label: label.to_owned() });
    }
    let bytes = label.as_bytes();
    let valid_chars = bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-');
    if !valid_chars || bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return Err(NameError::BadLabel { label: label.to_owned() });
    }
    Ok(label.to_ascii_lowercase())
}

/// A fully qualified service, `app.appns.service.servicens`: four validated, lower-cased DNS labels.
///
/// Kept as one string so hashing, ordering and printing (it keys every route table) are cheap.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl ServiceName {
    pub fn new(app: &str, app_ns: &str, service: &str, service_ns: &str) -> Result<Self, NameError> {
        format!("{app}.{app_ns}.{service}.{service_ns}").parse()
    }

    fn label(&self, i: usize) -> &str {
        self.0.split('.').nth(i).expect("a ServiceName always has four labels")
    }

    pub fn app(&self) -> &str {
        self.label(0)
    }
    pub fn app_ns(&self) -> &str {
        self.label(1)
    }
    pub fn service(&self) -> &str {
        self.label(2)
    }
    pub fn service_ns(&self) -> &str {
        self.label(3)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let labels: Vec<&str> = s.split('.').collect();
        if labels.len() != 4 {
            return Err(NameError::ServiceLabelCount { name: s.to_owned(), found: labels.len() });
        }
        let labels = labels.iter().map(|l| dns_label(l, s)).collect::<Result<Vec<_>, _>>()?;
        Ok(ServiceName(labels.join(".")))
    }
}

impl TryFrom<String> for ServiceName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<ServiceName> for String {
    fn from(name: ServiceName) -> String {
        name.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceName({})", self.0)
    }
}

/// The domain the resolver answers for (e.g. `canopy` or `svc.example.org`): one or more DNS labels, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceDomain(String);

impl ServiceDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceDomain {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::NameTooLong(s.len()));
        }
        let labels = s.split('.').map(|l| dns_label(l, s)).collect::<Result<Vec<_>, _>>()?;
        Ok(ServiceDomain(labels.join(".")))
    }
}

impl TryFrom<String> for ServiceDomain {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<ServiceDomain> for String {
    fn from(domain: ServiceDomain) -> String {
        domain.0
    }
}

impl fmt::Display for ServiceDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a full DNS name asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DnsTarget {
    /// `...any.<policy>.<domain>`: the service's ServiceIP for that policy.
    Service { name: ServiceName, policy: PolicyKind },
    /// `...<number>.none.<domain>`: the InstanceIP of one instance.
    Instance { name: ServiceName, number: u32 },
}

impl DnsTarget {
    /// Parses `app.appns.svc.svcns.{N|any}.{policy|none}.<domain>` (case-insensitive, trailing dot allowed).
    pub fn parse(name: &str, domain: &ServiceDomain) -> Result<Self, NameError> {
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        if trimmed.len() > MAX_NAME_LEN {
            return Err(NameError::NameTooLong(trimmed.len()));
        }
        let lower = trimmed.to_ascii_lowercase();
        let not_under = || NameError::NotUnderDomain { name: name.to_owned(), domain: domain.0.clone() };
        let head = lower.strip_suffix(domain.as_str()).and_then(|h| h.strip_suffix('.')).ok_or_else(not_under)?;
        let labels: Vec<&str> = head.split('.').collect();
        if labels.len() != 6 {
            return Err(NameError::TargetLabelCount { name: name.to_owned(), found: labels.len() });
        }
        let service = ServiceName::new(labels[0], labels[1], labels[2], labels[3])?;
        let (instance, policy) = (labels[4], labels[5]);
        if instance == "any" {
            if policy == "none" {
                return Err(NameError::AnyNeedsPolicy);
            }
            return Ok(DnsTarget::Service { name: service, policy: policy.parse()? });
        }
        // Only plain decimal digits: `u32::from_str` would also take a leading `+`.
        if instance.is_empty() || !instance.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NameError::BadInstance(instance.to_owned()));
        }
        let number = instance.parse().map_err(|_| NameError::BadInstance(instance.to_owned()))?;
        if policy != "none" {
            return Err(NameError::NumberNeedsNone(policy.to_owned()));
        }
        Ok(DnsTarget::Instance { name: service, number })
    }

    pub fn service(&self) -> &ServiceName {
        match self {
            DnsTarget::Service { name, .. } | DnsTarget::Instance { name, .. } => name,
        }
    }

    /// The full DNS name (without trailing dot) that [`DnsTarget::parse`] maps back to `self`.
    pub fn to_fqdn(&self, domain: &ServiceDomain) -> String {
        match self {
            DnsTarget::Service { name, policy } => format!("{name}.any.{policy}.{domain}"),
            DnsTarget::Instance { name, number } => format!("{name}.{number}.none.{domain}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn domain(s: &str) -> ServiceDomain {
        s.parse().unwrap()
    }

    #[test]
    fn service_names_are_lower_cased_and_split_into_labels() {
        let name: ServiceName = "Test.TUM.Login.Dev".parse().unwrap();
        assert_eq!(name.as_str(), "test.tum.login.dev");
        assert_eq!((name.app(), name.app_ns(), name.service(), name.service_ns()), ("test", "tum", "login", "dev"));
        assert_eq!(ServiceName::new("a", "b", "c-1", "d").unwrap().to_string(), "a.b.c-1.d");
    }

    #[test]
    fn bad_service_names_are_rejected_with_the_reason() {
        assert!(matches!("a.b.c".parse::<ServiceName>(), Err(NameError::ServiceLabelCount { found: 3, .. })));
        assert!(matches!("a.b.c.d.e".parse::<ServiceName>(), Err(NameError::ServiceLabelCount { found: 5, .. })));
        assert!(matches!("a..c.d".parse::<ServiceName>(), Err(NameError::EmptyLabel(_))));
        assert!(matches!("a.-b.c.d".parse::<ServiceName>(), Err(NameError::BadLabel { .. })));
        assert!(matches!("a.b-.c.d".parse::<ServiceName>(), Err(NameError::BadLabel { .. })));
        assert!(matches!("a.b_c.c.d".parse::<ServiceName>(), Err(NameError::BadLabel { .. })));
        assert!(matches!("a.bé.c.d".parse::<ServiceName>(), Err(NameError::BadLabel { .. })));
        let long = "x".repeat(64);
        assert!(matches!(format!("a.{long}.c.d").parse::<ServiceName>(), Err(NameError::LabelTooLong { .. })));
        assert!(format!("a.{}.c.d", "x".repeat(63)).parse::<ServiceName>().is_ok());
    }

    #[test]
    fn service_names_travel_as_strings_and_reject_bad_input() {
        let name: ServiceName = "a.b.c.d".parse().unwrap();
        let mut buf = Vec::new();
        ciborium::into_writer(&name, &mut buf).unwrap();
        assert_eq!(ciborium::from_reader::<ServiceName, _>(&buf[..]).unwrap(), name);
        let mut bad = Vec::new();
        ciborium::into_writer(&"a.b.c", &mut bad).unwrap();
        assert!(ciborium::from_reader::<ServiceName, _>(&bad[..]).is_err());
    }

    #[test]
    fn parses_service_and_instance_targets() {
        let d = domain("canopy");
        let t = DnsTarget::parse("test.tum.login.develop.any.rr.canopy", &d).unwrap();
        assert_eq!(t, DnsTarget::Service { name: "test.tum.login.develop".parse().unwrap(), policy: PolicyKind::Rr });
        let t = DnsTarget::parse("TEST.tum.Login.develop.ANY.Closest-HC.Canopy.", &d).unwrap();
        assert_eq!(
            t,
            DnsTarget::Service { name: "test.tum.login.develop".parse().unwrap(), policy: PolicyKind::ClosestHc }
        );
        let t = DnsTarget::parse("a1.a.s1.s.0.none.canopy", &d).unwrap();
        assert_eq!(t, DnsTarget::Instance { name: "a1.a.s1.s".parse().unwrap(), number: 0 });
        let t = DnsTarget::parse("a1.a.s1.s.17.none.svc.example.org", &domain("svc.example.org")).unwrap();
        assert_eq!(t, DnsTarget::Instance { name: "a1.a.s1.s".parse().unwrap(), number: 17 });
    }

    #[test]
    fn enforces_the_any_policy_and_number_none_pairing() {
        let d = domain("canopy");
        assert_eq!(DnsTarget::parse("a1.a.s1.s.any.none.canopy", &d), Err(NameError::AnyNeedsPolicy));
        assert_eq!(DnsTarget::parse("a1.a.s1.s.0.rr.canopy", &d), Err(NameError::NumberNeedsNone("rr".into())));
        assert!(matches!(DnsTarget::parse("a1.a.s1.s.any.fastest.canopy", &d), Err(NameError::UnknownPolicy(_))));
        assert!(matches!(DnsTarget::parse("a1.a.s1.s.+1.none.canopy", &d), Err(NameError::BadInstance(_))));
        assert!(matches!(DnsTarget::parse("a1.a.s1.s.-1.none.canopy", &d), Err(NameError::BadInstance(_))));
        assert!(matches!(DnsTarget::parse("a1.a.s1.s.99999999999.none.canopy", &d), Err(NameError::BadInstance(_))));
    }

    #[test]
    fn rejects_names_outside_the_domain_or_with_the_wrong_shape() {
        let d = domain("canopy");
        assert!(matches!(DnsTarget::parse("a.b.c.d.any.rr.local", &d), Err(NameError::NotUnderDomain { .. })));
        // The domain must match whole labels, not a suffix of the last label.
        assert!(matches!(DnsTarget::parse("a.b.c.d.any.rr.xcanopy", &d), Err(NameError::NotUnderDomain { .. })));
        assert!(matches!(DnsTarget::parse("canopy", &d), Err(NameError::NotUnderDomain { .. })));
        assert!(matches!(
            DnsTarget::parse("b.c.d.any.rr.canopy", &d),
            Err(NameError::TargetLabelCount { found: 5, .. })
        ));
        assert!(matches!(DnsTarget::parse("a.b..d.any.rr.canopy", &d), Err(NameError::EmptyLabel(_))));
        assert!(matches!(DnsTarget::parse(&"a.".repeat(200), &d), Err(NameError::NameTooLong(_))));
        assert!("bad_domain".parse::<ServiceDomain>().is_err());
        assert!("".parse::<ServiceDomain>().is_err());
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?"
    }

    proptest! {
        #[test]
        fn targets_round_trip_through_their_fqdn(
            labels in proptest::collection::vec(label(), 4),
            number in proptest::option::of(any::<u32>()),
            policy in proptest::sample::select(PolicyKind::ALL.to_vec()),
        ) {
            let name = ServiceName::new(&labels[0], &labels[1], &labels[2], &labels[3]).unwrap();
            let target = match number {
                Some(number) => DnsTarget::Instance { name, number },
                None => DnsTarget::Service { name, policy },
            };
            let d = domain("Canopy.Example");
            let fqdn = target.to_fqdn(&d);
            prop_assert_eq!(DnsTarget::parse(&fqdn, &d).unwrap(), target.clone());
            prop_assert_eq!(DnsTarget::parse(&fqdn.to_uppercase(), &d).unwrap(), target);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,80}") {
            let _ = DnsTarget::parse(&s, &domain("canopy"));
            let _ = s.parse::<ServiceName>();
        }
    }
}
