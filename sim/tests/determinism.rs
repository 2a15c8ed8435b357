//! Same scenario and seed, same report (except `wall_seconds`); another seed, another world.

use canopy_sim::{Scenario, run};

fn small_scenario() -> Scenario {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small_churn.toml");
    Scenario::from_file(&path).expect("the small scenario parses")
}

#[test]
fn same_seed_same_report() {
    let scenario = small_scenario();
    let first = run(&scenario, "small_churn");
    let second = run(&scenario, "small_churn");
    let a = serde_json::to_string(&first.report.without_wall_time()).unwrap();
    let b = serde_json::to_string(&second.report.without_wall_time()).unwrap();
    assert_eq!(a, b);
    assert_eq!(first.join_samples_ms, second.join_samples_ms);
}

#[test]
fn another_seed_places_nodes_differently() {
    let scenario = small_scenario();
    let other = Scenario { seed: scenario.seed + 1, ..scenario.clone() };
    let a = run(&scenario, "a");
    let b = run(&other, "b");
    let positions =
        |o: &canopy_sim::Outcome| o.final_tree.iter().map(|n| (n.position.lat, n.position.lon)).collect::<Vec<_>>();
    assert_ne!(positions(&a), positions(&b));
}

#[test]
fn the_vineio_and_benchmark_scenarios_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut parsed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Scenario::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            parsed += 1;
        }
    }
    assert!(parsed >= 8, "only {parsed} scenarios");
}
