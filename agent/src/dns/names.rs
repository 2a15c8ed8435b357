//! Which query names the resolver answers itself and which it forwards.
//!
//! Ours are the names under the configured domain (`a1.a.s1.s.any.rr.canopy`) and, for convenience, the same
//! names without the domain (`a1.a.s1.s.any.rr`, as in the thesis' resolution table) — recognised by their last
//! label being a routing policy or `none`, none of which is a top-level domain. Everything else goes upstream.

use canopy_overlay::routes::{DnsTarget, NameError, PolicyKind, ServiceDomain};

/// Where a query name belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameClass {
    /// The domain itself (`canopy.`): it exists but holds no addresses.
    Apex,
    /// A name we answer: the parsed target, or why the name is malformed (answered NXDOMAIN).
    Ours(Result<DnsTarget, NameError>),
    /// Any other name: forwarded to the upstream resolvers.
    Foreign,
}

/// Classifies a query name in text form (trailing dot optional, any case).
pub fn classify(query_name: &str, domain: &ServiceDomain) -> NameClass {
    let name = query_name.strip_suffix('.').unwrap_or(query_name).to_ascii_lowercase();
    let domain_text = domain.as_str();
    if name == domain_text {
        return NameClass::Apex;
    }
    if name.strip_suffix(domain_text).is_some_and(|head| head.ends_with('.')) {
        return NameClass::Ours(DnsTarget::parse(&name, domain));
    }
    let last_label = name.rsplit('.').next().unwrap_or_default();
    if is_policy_label(last_label) {
        return NameClass::Ours(DnsTarget::parse(&format!("{name}.{domain_text}"), domain));
    }
    NameClass::Foreign
}

fn is_policy_label(label: &str) -> bool {
    label == "none" || label.parse::<PolicyKind>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canopy() -> ServiceDomain {
        "canopy".parse().unwrap()
    }

    fn target(name: &str) -> DnsTarget {
        DnsTarget::parse(name, &canopy()).unwrap()
    }

    #[test]
    fn names_under_the_domain_are_ours() {
        let d = canopy();
        assert_eq!(classify("a1.a.s1.s.any.rr.canopy.", &d), NameClass::Ours(Ok(target("a1.a.s1.s.any.rr.canopy"))));
        assert_eq!(classify("A1.A.S1.S.0.NONE.Canopy", &d), NameClass::Ours(Ok(target("a1.a.s1.s.0.none.canopy"))));
        assert_eq!(classify("canopy.", &d), NameClass::Apex);
        assert_eq!(classify("Canopy", &d), NameClass::Apex);
    }

    #[test]
    fn malformed_names_under_the_domain_are_still_ours() {
        let d = canopy();
        assert_eq!(
            classify("a1.a.s1.s.0.rr.canopy.", &d),
            NameClass::Ours(Err(NameError::NumberNeedsNone("rr".into())))
        );
        assert_eq!(classify("a1.a.s1.s.any.none.canopy.", &d), NameClass::Ours(Err(NameError::AnyNeedsPolicy)));
        assert!(matches!(classify("www.canopy.", &d), NameClass::Ours(Err(NameError::TargetLabelCount { .. }))));
        assert!(matches!(
            classify("a.b.c.d.any.fastest.canopy", &d),
            NameClass::Ours(Err(NameError::UnknownPolicy(_)))
        ));
    }

    #[test]
    fn bare_names_ending_in_a_policy_or_none_are_ours() {
        let d = canopy();
        assert_eq!(classify("a1.a.s1.s.any.closest.", &d), NameClass::Ours(Ok(target("a1.a.s1.s.any.closest.canopy"))));
        assert_eq!(classify("a1.a.s1.s.3.none", &d), NameClass::Ours(Ok(target("a1.a.s1.s.3.none.canopy"))));
        assert_eq!(classify("a1.a.s1.s.3.rr", &d), NameClass::Ours(Err(NameError::NumberNeedsNone("rr".into()))));
        assert!(matches!(classify("rr.", &d), NameClass::Ours(Err(NameError::TargetLabelCount { found: 1, .. }))));
    }

    #[test]
    fn other_names_are_forwarded() {
        let d = canopy();
        assert_eq!(classify("example.com.", &d), NameClass::Foreign);
        assert_eq!(classify("a1.a.s1.s.any.rr.xcanopy.", &d), NameClass::Foreign);
        assert_eq!(classify("canopy.example.org.", &d), NameClass::Foreign);
        assert_eq!(classify(".", &d), NameClass::Foreign);
        assert_eq!(classify("", &d), NameClass::Foreign);
        let multi: ServiceDomain = "svc.example.org".parse().unwrap();
        assert_eq!(classify("example.org.", &multi), NameClass::Foreign);
        assert!(matches!(classify("a.b.c.d.any.rr.svc.example.org.", &multi), NameClass::Ours(Ok(_))));
    }
}
