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

#[test]
fn tracing_a_node_shows_its_life_and_does_not_change_the_run() {
    use std::sync::{Arc, Mutex};
    let scenario = small_scenario();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let tracer = canopy_sim::trace::Tracer::new(&[5], move |line| sink.lock().unwrap().push(line.clone()));
    let traced = canopy_sim::run_traced(&scenario, "small_churn", |_| {}, Some(tracer));
    let plain = run(&scenario, "small_churn");
    let json = |o: &canopy_sim::Outcome| serde_json::to_string(&o.report.without_wall_time()).unwrap();
    assert_eq!(json(&traced), json(&plain), "tracing only watches");
    let lines = lines.lock().unwrap();
    assert!(lines.iter().all(|l| l.node == 5));
    assert!(lines.iter().any(|l| l.what.starts_with("joined under")), "node 5 joins");
    assert!(lines.iter().any(|l| l.what.starts_with("<- ")) && lines.iter().any(|l| l.what.starts_with("-> ")));
    assert!(lines.windows(2).all(|w| w[0].at_ns <= w[1].at_ns), "in time order");
}
