//! The report's failure detection times follow from the detector's settings.

use canopy_sim::{Scenario, run};

/// 300 nodes, no loss, 1 s heartbeats; three coordinators crash once the tree has formed.
const SCENARIO: &str = r#"
seed = 3
duration_s = 40
[network]
base_latency_ms = 2.0
km_per_ms = 100.0
jitter_ms = 1.0
loss = 0.0
[nodes]
count = 300
region = [45.0, 5.0, 50.0, 15.0]
join_over_s = 10
[overlay]
heartbeat_ms = 1000
[[events]]
at_s = 25
kind = "crash"
target = "coordinators:3"
"#;

#[test]
fn children_declare_a_crashed_parent_dead_within_the_detector_bounds() {
    let scenario = Scenario::from_toml(SCENARIO, "detection").expect("the scenario parses");
    let report = run(&scenario, "detection").report;
    let detection = &report.detection_ms;
    assert!(detection.count >= 3, "each crashed coordinator's children should detect it: {detection:?}");
    // A child heard its parent at most one heartbeat (1 s) before the crash and at the latest just after it;
    // it suspects after 1.5 s of silence and declares the parent dead when the probes get no answer 0.5 s later.
    // So 1.0 to 2.0 s after the crash, give or take the links' latency (a few ms over 500 km).
    let (p50, max) = (detection.p50.unwrap(), detection.max.unwrap());
    assert!((950.0..=2100.0).contains(&p50), "p50 {p50} ms");
    assert!(max <= 2100.0, "max {max} ms");
}
