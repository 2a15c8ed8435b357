//! `canopy-sim bench`: runs the 1k, 10k (and 100k) node benchmark scenarios in one go and checks the targets:
//! re-attach p99 <= 3 s and root failover p99 <= 4 s at 1k and 10k nodes, per-node control traffic that does not
//! grow with N, and simulator speed >= 50x real time at 10k nodes and >= 1x at 100k.

use crate::engine::{Outcome, run};
use crate::report::Report;
use crate::scenario::Scenario;
use std::fmt::Write as _;

/// The benchmark scenarios, built in so `bench` runs from anywhere.
pub const SCENARIOS: [(&str, &str); 3] = [
    ("bench_1k", include_str!("../scenarios/bench_1k.toml")),
    ("bench_10k", include_str!("../scenarios/bench_10k.toml")),
    ("bench_100k", include_str!("../scenarios/bench_100k.toml")),
];

pub const REATTACH_P99_MS: f64 = 3000.0;
pub const FAILOVER_P99_MS: f64 = 4000.0;
pub const SPEED_10K: f64 = 50.0;
pub const SPEED_100K: f64 = 1.0;
/// Per-node traffic at 10k may exceed 1k by this factor and still count as "not growing with N".
pub const TRAFFIC_RATIO_MAX: f64 = 1.25;

pub struct BenchResult {
    pub reports: Vec<Report>,
    pub text: String,
    pub all_passed: bool,
}

pub fn speed(report: &Report) -> f64 {
    if report.wall_seconds > 0.0 { report.sim_seconds / report.wall_seconds } else { f64::INFINITY }
}

/// Runs the benchmark scenarios (`with_100k = false` skips the largest) and reports against the targets. `before` is
/// called with each scenario before it runs (the binary chooses the heap's page size there).
pub fn run_bench(
    with_100k: bool,
    mut before: impl FnMut(&Scenario),
    mut progress: impl FnMut(&Report),
) -> anyhow::Result<BenchResult> {
    let mut reports = Vec::new();
    for (name, text) in SCENARIOS.iter().take(if with_100k { 3 } else { 2 }) {
        let scenario = Scenario::from_toml(text, name)?;
        before(&scenario);
        let Outcome { report, .. } = run(&scenario, name);
        progress(&report);
        reports.push(report);
    }
    let mut text = String::new();
    let mut all_passed = true;
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let _ = writeln!(
        text,
        "{:<11} {:>7} {:>7} {:>8} {:>9} {:>10} {:>11} {:>12} {:>13} {:>9}",
        "scenario",
        "nodes",
        "sim s",
        "wall s",
        "speed",
        "msgs/n/s",
        "bytes/n/s",
        "reattach p99",
        "failover p99",
        "converged"
    );
    for r in &reports {
        let _ = writeln!(
            text,
            "{:<11} {:>7} {:>7.0} {:>8.2} {:>8.1}x {:>10.2} {:>11.0} {:>12} {:>13} {:>9}",
            r.scenario,
            r.nodes,
            r.sim_seconds,
            r.wall_seconds,
            speed(r),
            r.msgs_per_node_per_s.all,
            r.bytes_per_node_per_s.all,
            ms(r.reattach_ms.p99),
            ms(r.root_failover_ms.p99),
            r.r#final.converged()
        );
    }
    let mut verdict = |text: &mut String, what: String, ok: bool| {
        all_passed &= ok;
        let _ = writeln!(text, "  [{}] {what}", if ok { "PASS" } else { "FAIL" });
    };
    let _ = writeln!(text, "targets:");
    for r in reports.iter().take(2) {
        let within = |s: &crate::report::Stats, limit: f64| s.incomplete == 0 && s.p99.is_some_and(|p| p <= limit);
        verdict(
            &mut text,
            format!(
                "{}: re-attach p99 {} ms <= {REATTACH_P99_MS} (incomplete {})",
                r.scenario,
                ms(r.reattach_ms.p99),
                r.reattach_ms.incomplete
            ),
            within(&r.reattach_ms, REATTACH_P99_MS),
        );
        verdict(
            &mut text,
            format!(
                "{}: root failover p99 {} ms <= {FAILOVER_P99_MS} (incomplete {})",
                r.scenario,
                ms(r.root_failover_ms.p99),
                r.root_failover_ms.incomplete
            ),
            within(&r.root_failover_ms, FAILOVER_P99_MS),
        );
    }
    if let [small, large, ..] = &reports[..] {
        let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { f64::NAN };
        let msgs = ratio(small.msgs_per_node_per_s.all, large.msgs_per_node_per_s.all);
        let bytes = ratio(small.bytes_per_node_per_s.all, large.bytes_per_node_per_s.all);
        verdict(
            &mut text,
            format!("per-node msgs 10k/1k = {msgs:.3} <= {TRAFFIC_RATIO_MAX}"),
            msgs <= TRAFFIC_RATIO_MAX,
        );
        verdict(
            &mut text,
            format!("per-node bytes 10k/1k = {bytes:.3} <= {TRAFFIC_RATIO_MAX}"),
            bytes <= TRAFFIC_RATIO_MAX,
        );
        verdict(&mut text, format!("speed at 10k = {:.1}x >= {SPEED_10K}x", speed(large)), speed(large) >= SPEED_10K);
    }
    if let Some(huge) = reports.get(2) {
        verdict(&mut text, format!("speed at 100k = {:.2}x >= {SPEED_100K}x", speed(huge)), speed(huge) >= SPEED_100K);
    }
    Ok(BenchResult { reports, text, all_passed })
}
