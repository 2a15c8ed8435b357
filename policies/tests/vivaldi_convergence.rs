//! Vivaldi coordinates converge on a synthetic latency matrix: 50 hosts on a plane whose RTT is their Euclidean
//! distance in milliseconds, plus 5 hosts behind slow access links (extra delay on every path, what the height
//! models), with ±5% measurement jitter. Each round every host measures one random peer.

use canopy_policies::VivaldiCoord;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Host {
    at: [f64; 2],
    access_ms: f64,
}

fn true_rtt(a: &Host, b: &Host) -> f64 {
    (a.at[0] - b.at[0]).hypot(a.at[1] - b.at[1]) + a.access_ms + b.access_ms
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Outcome {
    /// Median over all pairs of |estimate - true| / true.
    median_error: f64,
    /// Mean learned height of the plane hosts and of the slow-access hosts (ms).
    heights: (f64, f64),
}

fn run(seed: u64, rounds: usize) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut hosts: Vec<Host> = (0..50)
        .map(|_| Host { at: [rng.random_range(0.0..150.0), rng.random_range(0.0..150.0)], access_ms: 0.5 })
        .collect();
    hosts.extend((0..5).map(|_| Host {
        at: [rng.random_range(0.0..150.0), rng.random_range(0.0..150.0)],
        access_ms: rng.random_range(15.0..40.0),
    }));
    let mut coords: Vec<VivaldiCoord> = (0..hosts.len() as u64).map(VivaldiCoord::new).collect();
    for _ in 0..rounds {
        for i in 0..hosts.len() {
            let mut j = rng.random_range(0..hosts.len() - 1);
            if j >= i {
                j += 1;
            }
            let rtt = true_rtt(&hosts[i], &hosts[j]) * rng.random_range(0.95..1.05);
            let remote = coords[j];
            coords[i].update(rtt, &remote, remote.error).expect("valid sample");
        }
    }
    let mut errors = Vec::new();
    for i in 0..hosts.len() {
        for j in i + 1..hosts.len() {
            let actual = true_rtt(&hosts[i], &hosts[j]);
            errors.push((coords[i].estimate_rtt(&coords[j]) - actual).abs() / actual);
        }
    }
    let mean =
        |range: std::ops::Range<usize>| range.clone().map(|i| coords[i].height).sum::<f64>() / range.len() as f64;
    Outcome { median_error: median(errors), heights: (mean(0..50), mean(50..55)) }
}

#[test]
fn coordinates_converge_on_a_plane_with_access_delays() {
    let early = run(7, 5).median_error;
    println!("median relative RTT error after 5 rounds (seed 7): {early:.3}");
    assert!(early > 0.2, "starting from the origin should be clearly wrong: {early}");
    for seed in [1u64, 2, 3] {
        let halfway = run(seed, 50).median_error;
        let settled = run(seed, 300);
        println!(
            "seed {seed}: median relative RTT error {halfway:.4} after 50 rounds, {:.4} after 300; \
             mean height {:.2} ms (plane hosts) vs {:.2} ms (slow-access hosts)",
            settled.median_error, settled.heights.0, settled.heights.1
        );
        assert!(settled.median_error < 0.05, "median relative error {} not below 5%", settled.median_error);
        assert!(settled.heights.1 > settled.heights.0 + 10.0, "heights should absorb the access delay");
    }
}
