//! Names of the routing policies. They appear in DNS names (`...any.closest-hc.<domain>`) and feed the
//! deterministic ServiceIP allocation, so each policy has exactly one spelling.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Round-robin over the service's instances.
    Rr,
    /// Geographically nearest instance with free capacity.
    Closest,
    /// Instance with the highest free capacity.
    Hc,
    /// Highest free capacity among the k nearest.
    ClosestHc,
    /// Lowest round-trip time estimated from network coordinates.
    Latency,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 5] =
        [PolicyKind::Rr, PolicyKind::Closest, PolicyKind::Hc, PolicyKind::ClosestHc, PolicyKind::Latency];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Rr => "rr",
            PolicyKind::Closest => "closest",
            PolicyKind::Hc => "hc",
            PolicyKind::ClosestHc => "closest-hc",
            PolicyKind::Latency => "latency",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown routing policy {0:?} (expected rr, closest, hc, closest-hc or latency)")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_serde() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.to_string().parse::<PolicyKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<PolicyKind>(&json).unwrap(), kind);
        }
        assert_eq!("closest-hc".parse::<PolicyKind>().unwrap(), PolicyKind::ClosestHc);
        assert!("closesthc".parse::<PolicyKind>().is_err());
        assert!("RR".parse::<PolicyKind>().is_err());
        assert!("".parse::<PolicyKind>().is_err());
    }
}
