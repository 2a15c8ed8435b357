//! The report's per-node state sizes describe the live nodes' address pools.

use canopy_sim::{Scenario, run};

#[test]
fn state_sizes_name_a_live_node_with_the_most_grants() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small_churn.toml");
    let scenario = Scenario::from_file(&path).expect("the small scenario parses");
    let outcome = run(&scenario, "small_churn");
    let sizes = &outcome.report.state_sizes;
    // Coordinators grant machine subnets to their children, so some pool holds grants.
    assert!(sizes.pool_grants_max >= 1, "{sizes:?}");
    assert!(sizes.pool_grants_mean > 0.0 && sizes.pool_grants_mean <= sizes.pool_grants_max as f64, "{sizes:?}");
    assert!(sizes.grants_per_holder_max >= 1 && sizes.grants_per_holder_max <= sizes.pool_grants_max, "{sizes:?}");
    let busiest = sizes.pool_grants_max_node.expect("a node with the most grants");
    let node = outcome.final_tree.iter().find(|n| n.index == busiest).expect("the busiest node is live at the end");
    assert!(
        outcome.final_tree.iter().any(|n| n.parent == Some(node.index)) || node.parent.is_none(),
        "a node granting subnets has children or is the root"
    );
}
