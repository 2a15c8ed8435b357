//! The routing policies the data plane applies to a new connection to a ServiceIP (seed 002 §3.6): `closest` sends
//! it to the instance on the machine nearest this one (positions from the route table, distances from
//! `canopy_policies::Position`), round-robin among equally near ones; every other policy is round-robin for now.

use super::proxy::{Chooser, RoundRobin};
use super::routes::RouteIndex;

/// Policy name of the ServiceIP that picks the nearest instance.
pub const CLOSEST: &str = "closest";

#[derive(Debug, Default)]
pub struct PolicyChooser {
    round_robin: RoundRobin,
    nearest: Vec<usize>,
}

impl Chooser for PolicyChooser {
    fn choose(&mut self, routes: &RouteIndex, service: usize, candidates: &[usize], local: Option<usize>) -> usize {
        if routes.services[service].policy == CLOSEST
            && let Some(here) = local.and_then(|node| routes.nodes[node].position)
        {
            let distance = |instance: usize| {
                let node = &routes.nodes[routes.instances[instance].node];
                node.position.map(|there| here.distance_km(&there))
            };
            // Instances on machines without a position are never "closest"; if none has one, fall back to rr.
            let best = candidates.iter().filter_map(|&i| distance(i)).min_by(f64::total_cmp);
            if let Some(best) = best {
                self.nearest.clear();
                // Equally near (within a metre): share the load among them.
                self.nearest
                    .extend(candidates.iter().copied().filter(|&i| distance(i).is_some_and(|d| d - best < 1e-3)));
                return self.round_robin.choose(routes, service, &self.nearest, local);
            }
        }
        self.round_robin.choose(routes, service, candidates, local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::routes::tests::two_machine_table;
    use canopy_policies::Position;

    fn index(with_positions: bool) -> RouteIndex {
        let mut table = two_machine_table();
        table.services[1].policy_ips.insert(CLOSEST.into(), "10.30.0.3".parse().unwrap());
        if with_positions {
            table.nodes[0].position = Some(Position::new(48.14, 11.58)); // a: Munich
            table.nodes[1].position = Some(Position::new(49.45, 11.08)); // b: Nuremberg
        }
        RouteIndex::build(&table).unwrap()
    }

    fn picks(index: &RouteIndex, service_ip: &str, local: &str, times: usize) -> Vec<String> {
        let Some(crate::dataplane::routes::Target::Service(service)) =
            index.overlay_target(service_ip.parse().unwrap())
        else {
            panic!("{service_ip} is no ServiceIP")
        };
        let candidates = index.services[service].instances.clone();
        let local = index.node_by_name(local);
        let mut chooser = PolicyChooser::default();
        (0..times)
            .map(|_| index.nodes[index.instances[chooser.choose(index, service, &candidates, local)].node].name.clone())
            .collect()
    }

    #[test]
    fn closest_picks_the_nearest_machine_and_rr_alternates() {
        let index = index(true);
        assert_eq!(picks(&index, "10.30.0.3", "a", 3), ["a", "a", "a"]);
        assert_eq!(picks(&index, "10.30.0.3", "b", 3), ["b", "b", "b"]);
        assert_eq!(picks(&index, "10.30.0.2", "a", 4), ["a", "b", "a", "b"]);
    }

    #[test]
    fn closest_without_positions_falls_back_to_round_robin() {
        let index = index(false);
        assert_eq!(picks(&index, "10.30.0.3", "a", 4), ["a", "b", "a", "b"]);
        // A machine missing from the table (no local position) cannot measure distance either.
        assert_eq!(picks(&index, "10.30.0.3", "nobody", 2), ["a", "b"]);
    }
}
