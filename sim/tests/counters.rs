//! The report's protocol counters cover every node and every life of it.

use canopy_sim::{Scenario, run};

#[test]
fn protocol_counters_add_up_to_the_engine_s_message_counts_across_crashes_and_restarts() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small_churn.toml");
    let scenario = Scenario::from_file(&path).expect("the small scenario parses");
    let report = run(&scenario, "small_churn").report;
    let overlay = &report.counters.overlay;
    // Every message the engine carried was sent by a node and counted there, including by nodes that crashed or
    // left before the end (their counts are kept when they go): the sums match the engine's exactly.
    assert_eq!(overlay["sent"], report.messages.sent, "{overlay:?}");
    assert_eq!(overlay["received"], report.messages.delivered, "duplicates included: {overlay:?}");
    // The scenario crashes coordinators and the root: their children noticed and someone took over.
    assert!(overlay["parent_failures"] > 0 && overlay["takeovers"] > 0, "{overlay:?}");
    // Attaches go out twice with one id (so that one lost copy costs no timeout): where both arrive, the receiver
    // drops the second as a duplicate instead of adopting the node again.
    let attaches = report.messages.by_kind["Attach"].msgs;
    assert!(overlay["duplicates"] > 0 && 2 * overlay["duplicates"] <= attaches, "{attaches} attaches, {overlay:?}");
    let routing = &report.counters.routing;
    assert!(routing["grants_made"] >= report.r#final.live as u64, "every live machine got a subnet: {routing:?}");
    // A machine whose subnet changes counts a renumbering too; routing also counts blocks and lapsed grants.
    let changes = report.state_sizes.machine_subnet_changes;
    assert!(changes > 0 && changes <= routing["renumbered"], "{changes} changes, {routing:?}");
    let summary = report.summary();
    assert!(summary.contains(&format!("takeovers {}", overlay["takeovers"])), "{summary}");
}
