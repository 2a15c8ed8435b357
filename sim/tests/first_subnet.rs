//! Every joining machine gets its first subnet within a few seconds, also over a lossy network: a lost request
//! for a subnet or for a coordinator's block is asked again after `answer_wait`, not after a resync interval.

use canopy_sim::{Scenario, run};

const SCENARIO: &str = r#"
seed = 3
duration_s = 20
[network]
base_latency_ms = 2.0
km_per_ms = 100.0
jitter_ms = 1.0
loss = 0.05
[nodes]
count = 300
region = [35.0, -10.0, 60.0, 30.0]
join_over_s = 5
[overlay]
heartbeat_ms = 1000
max_children = 16
"#;

#[test]
fn every_machine_gets_its_first_subnet_within_seconds_despite_loss() {
    let scenario = Scenario::from_toml(SCENARIO, "first_subnet").expect("the scenario parses");
    let report = run(&scenario, "first_subnet").report;
    let subnet = &report.subnet_ms;
    assert_eq!(subnet.count, 299, "every joiner got a subnet: {subnet:?}");
    assert_eq!(subnet.incomplete, 0, "{subnet:?}");
    assert_eq!(report.state_sizes.machines_without_subnet, 0);
    // With one message in twenty lost, some requests are lost on the way up; each loss costs an answer wait (2 s
    // and the next tick), not a resync interval (10 s).
    let max = subnet.max.expect("samples");
    assert!(max < 8_000.0, "slowest first subnet {max} ms: {subnet:?}");
    assert!(subnet.p50.expect("samples") < 1_000.0, "{subnet:?}");
}
