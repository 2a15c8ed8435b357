//! The routing policies the data plane applies to a new connection to a ServiceIP (seed 002 §3.6), dispatched to
//! the one implementation in `canopy_policies` (the simulator scores the same code): the ServiceIP's policy name
//! selects `rr`, `closest`, `hc`, `closest-hc` or `latency`.
//!
//! What the data plane knows about each instance comes from the route table: the hosting machine's position. It
//! holds no capacity grids or network coordinates, so `latency` ranks by distance (its documented fallback) and the
//! capacity policies see every machine as having room. Policies that need positions fall back to round-robin when
//! this machine or every candidate's machine has none; an unknown policy name is round-robin too.

use super::proxy::Chooser;
use super::routes::RouteIndex;
use canopy_policies::{Candidate, Capacity, PickContext, Policies, PolicyKind, Position};
use std::fmt::Write as _;

/// Free capacity assumed for a machine the route table says nothing about: enough for anything, so no instance is
/// skipped as full on information nobody gave us.
const UNKNOWN_FREE: Capacity = Capacity { cpu: f64::MAX, mem_mb: f64::MAX, bandwidth_mbps: f64::MAX };

#[derive(Debug, Default)]
pub struct PolicyChooser {
    policies: Policies,
    /// Reused per pick: the policy's view of the candidates, and their route-index positions.
    candidates: Vec<Candidate>,
    indices: Vec<usize>,
    /// Reused per pick: the ServiceIP as text, the key of the round-robin cursor (one cursor per ServiceIP).
    cursor_key: String,
}

impl PolicyChooser {
    fn collect(&mut self, routes: &RouteIndex, candidates: &[usize], need_position: bool) {
        self.candidates.clear();
        self.indices.clear();
        for &index in candidates {
            let instance = &routes.instances[index];
            let position = routes.nodes[instance.node].position;
            if need_position && position.is_none() {
                continue;
            }
            self.candidates.push(Candidate {
                instance: instance.number,
                position: position.unwrap_or_default(),
                free: UNKNOWN_FREE,
                coord: None,
            });
            self.indices.push(index);
        }
    }

    fn pick(&mut self, kind: PolicyKind, here: Position) -> Option<usize> {
        let ctx = PickContext::new(&self.cursor_key, here);
        self.policies.pick(kind, &ctx, &self.candidates).map(|i| self.indices[i])
    }
}

impl Chooser for PolicyChooser {
    fn choose(&mut self, routes: &RouteIndex, service: usize, candidates: &[usize], local: Option<usize>) -> usize {
        let entry = &routes.services[service];
        let kind = entry.policy.parse::<PolicyKind>().unwrap_or(PolicyKind::Rr);
        self.cursor_key.clear();
        let _ = write!(self.cursor_key, "{}", entry.service_ip);
        let here = local.and_then(|node| routes.nodes[node].position);
        if kind != PolicyKind::Rr
            && let Some(here) = here
        {
            // Instances on machines without a position are never "closest"; if none has one, fall back to rr.
            self.collect(routes, candidates, true);
            if let Some(pick) = self.pick(kind, here) {
                return pick;
            }
        }
        self.collect(routes, candidates, false);
        // `candidates` is never empty (the Chooser contract), so neither is the collected list.
        self.pick(PolicyKind::Rr, Position::default()).unwrap_or(candidates[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::routes::tests::two_machine_table;
    use crate::dataplane::routes::{InstanceRoute, NodeRoute};

    const CLOSEST_IP: &str = "10.30.0.3";
    const HC_IP: &str = "10.30.0.4";
    const MYSTERY_IP: &str = "10.30.0.5";

    /// Machines a (Munich) and b (Nuremberg) from the routes tests, plus c (Vienna) when `with_positions`; web has
    /// instance 0 on a, 1 on b and (when `with_positions`) 2 and 3 on c.
    fn index(with_positions: bool) -> RouteIndex {
        let mut table = two_machine_table();
        let web = &mut table.services[1];
        web.policy_ips.insert("closest".into(), CLOSEST_IP.parse().unwrap());
        web.policy_ips.insert("hc".into(), HC_IP.parse().unwrap());
        web.policy_ips.insert("no-such-policy".into(), MYSTERY_IP.parse().unwrap());
        if with_positions {
            table.nodes[0].position = Some(Position::new(48.14, 11.58));
            table.nodes[1].position = Some(Position::new(49.45, 11.08));
            table.nodes.push(NodeRoute {
                name: "c".into(),
                subnet: "10.16.0.128/26".parse().unwrap(),
                extra_subnets: Vec::new(),
                endpoint: "192.0.2.3:50103".parse().unwrap(),
                position: Some(Position::new(48.21, 16.37)),
            });
            for (number, last) in [(2u32, 130u8), (3, 131)] {
                table.services[1].instances.push(InstanceRoute {
                    number,
                    instance_ip: format!("10.30.2.{}", number + 1).parse().unwrap(),
                    namespace_ip: format!("10.16.0.{last}").parse().unwrap(),
                    node: "c".into(),
                });
            }
        }
        RouteIndex::build(&table).unwrap()
    }

    /// (machine, instance number) of `times` picks for new connections to `service_ip` from machine `local`.
    fn picks(index: &RouteIndex, service_ip: &str, local: &str, times: usize) -> Vec<(String, u32)> {
        let Some(crate::dataplane::routes::Target::Service(service)) =
            index.overlay_target(service_ip.parse().unwrap())
        else {
            panic!("{service_ip} is no ServiceIP")
        };
        let candidates = index.services[service].instances.clone();
        let local = index.node_by_name(local);
        let mut chooser = PolicyChooser::default();
        (0..times)
            .map(|_| {
                let instance = &index.instances[chooser.choose(index, service, &candidates, local)];
                (index.nodes[instance.node].name.clone(), instance.number)
            })
            .collect()
    }

    fn machines(picks: &[(String, u32)]) -> Vec<&str> {
        picks.iter().map(|(m, _)| m.as_str()).collect()
    }

    #[test]
    fn closest_picks_the_nearest_machine() {
        let index = index(true);
        assert_eq!(machines(&picks(&index, CLOSEST_IP, "a", 3)), ["a", "a", "a"]);
        assert_eq!(machines(&picks(&index, CLOSEST_IP, "b", 3)), ["b", "b", "b"]);
        // From Vienna: its own machine, the lower instance number of the two there (the policy's tie-break).
        assert_eq!(picks(&index, CLOSEST_IP, "c", 2), [("c".to_string(), 2), ("c".to_string(), 2)]);
    }

    #[test]
    fn rr_cycles_in_instance_order_and_unknown_policies_are_rr() {
        let index = index(true);
        let numbers = |ip: &str| picks(&index, ip, "a", 5).into_iter().map(|(_, n)| n).collect::<Vec<_>>();
        assert_eq!(numbers("10.30.0.2"), [0, 1, 2, 3, 0]);
        assert_eq!(numbers(MYSTERY_IP), [0, 1, 2, 3, 0]);
    }

    #[test]
    fn hc_without_capacity_information_is_deterministic() {
        // The route table carries no free capacity: every machine ties and the lowest instance number wins.
        let index = index(true);
        assert_eq!(picks(&index, HC_IP, "b", 2), [("a".to_string(), 0), ("a".to_string(), 0)]);
    }

    #[test]
    fn closest_without_positions_falls_back_to_round_robin() {
        let index = index(false);
        assert_eq!(machines(&picks(&index, CLOSEST_IP, "a", 4)), ["a", "b", "a", "b"]);
        // A machine missing from the table (no local position) cannot measure distance either.
        assert_eq!(machines(&picks(&index, CLOSEST_IP, "nobody", 2)), ["a", "b"]);
    }
}
