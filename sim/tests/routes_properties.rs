//! Routes under partitions: over many seeds, small networks are split and healed (with crashes in between)
//! while services are deployed, instances churn and nodes query routes. After the last heal has settled, no two
//! live nodes of one tree hold overlapping subnets and no address names two services.

use canopy_sim::{Scenario, run};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

fn scenario(seed: u64, count: usize, max_children: usize, faults: &[(f64, f64, f64)], crash_at: Option<f64>) -> String {
    let mut text = format!(
        "seed = {seed}\nduration_s = DURATION\n\
         [network]\nbase_latency_ms = 2.0\nkm_per_ms = 100.0\njitter_ms = 1.0\nloss = 0.0\n\
         [nodes]\ncount = {count}\nregion = [45.0, 0.0, 55.0, 20.0]\njoin_over_s = 8\nbootstrap = 3\n\
         [overlay]\nheartbeat_ms = 1000\nmax_children = {max_children}\n\
         [routes]\nstart_s = 12.0\nservices = 4\ninstances_per_service = 2\nqueries_per_s = 5.0\nchurn_per_s = 0.5\n"
    );
    let mut last: f64 = 20.0;
    for &(at, split_lon, heal_after) in faults {
        let heal = at + heal_after;
        text += &format!("[[events]]\nat_s = {at:.3}\nkind = \"partition\"\nsplit_lon = {split_lon:.3}\n");
        text += &format!("[[events]]\nat_s = {heal:.3}\nkind = \"heal\"\n");
        last = last.max(heal);
    }
    if let Some(at) = crash_at {
        text += &format!("[[events]]\nat_s = {at:.3}\nkind = \"crash\"\ntarget = \"coordinators:1\"\n");
        last = last.max(at);
    }
    // Settle: re-merge, renumber the younger grants, resync leases.
    text.replace("DURATION", &format!("{}", (last + 25.0).ceil()))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 8,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5e_b0e7),
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_conflicts_after_partitions_heal(
        seed in any::<u64>(),
        count in 20usize..70,
        max_children in 4usize..10,
        faults in prop::collection::vec((15.0f64..40.0, 3.0f64..17.0, 3.0f64..15.0), 1..3),
        crash_at in prop::option::of(15.0f64..45.0),
    ) {
        let text = scenario(seed, count, max_children, &faults, crash_at);
        let scenario = Scenario::from_toml(&text, "routes-property").expect("a valid scenario");
        let report = run(&scenario, "routes-property").report;
        let f = &report.r#final;
        prop_assert!(f.converged(), "tree did not converge:\n{text}\n{}", report.summary());
        prop_assert_eq!(f.subnet_conflicts, 0, "subnet conflicts:\n{}", text);
        prop_assert_eq!(f.serviceip_conflicts, 0, "ServiceIP conflicts:\n{}", text);
        let routes = report.routes.as_ref().expect("the routes workload ran");
        prop_assert!(routes.services_deployed > 0, "no service deployed:\n{}", text);
    }
}
