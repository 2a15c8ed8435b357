//! Routing policies on fixed candidate sets.

use canopy_policies::{
    Candidate, Capacity, CapacityGrid, GridInput, PickContext, Policies, Policy, PolicyKind, Position, VivaldiCoord,
    policy::{Closest, ClosestHighestCapacity, HighestCapacity, LowestLatency, RoundRobin},
    prune, prune_for,
};
use std::collections::HashMap;

const MUNICH: Position = Position { lat: 48.137, lon: 11.575 };

fn at(instance: u32, lat: f64, lon: f64, cpu: f64) -> Candidate {
    Candidate { instance, position: Position::new(lat, lon), free: Capacity::new(cpu, 2048.0, 100.0), coord: None }
}

fn instances(candidates: &[Candidate], picks: impl IntoIterator<Item = Option<usize>>) -> Vec<u32> {
    picks.into_iter().map(|i| candidates[i.expect("a pick")].instance).collect()
}

#[test]
fn rr_cycles_in_instance_order() {
    let mut rr = RoundRobin::new();
    let ctx = PickContext::new("web", MUNICH);
    let candidates = [at(7, 0.0, 0.0, 1.0), at(2, 0.0, 0.0, 1.0), at(4, 0.0, 0.0, 1.0)];
    let picks = instances(&candidates, (0..7).map(|_| rr.pick(&ctx, &candidates)));
    assert_eq!(picks, [2, 4, 7, 2, 4, 7, 2]);
    // Another service has its own cursor.
    let other = PickContext::new("db", MUNICH);
    assert_eq!(candidates[rr.pick(&other, &candidates).unwrap()].instance, 2);
    assert_eq!(rr.tracked_services(), 2);
    rr.forget("db");
    assert_eq!(rr.tracked_services(), 1);
    assert_eq!(rr.pick(&ctx, &[]), None);
}

#[test]
fn rr_continues_after_the_last_instance_when_the_set_changes() {
    let mut rr = RoundRobin::new();
    let ctx = PickContext::new("web", MUNICH);
    let first = [at(1, 0.0, 0.0, 1.0), at(2, 0.0, 0.0, 1.0), at(3, 0.0, 0.0, 1.0)];
    assert_eq!(instances(&first, (0..2).map(|_| rr.pick(&ctx, &first))), [1, 2]);
    // Instance 2 (the last picked) disappears and 4 appears: the rotation goes on with 3, then 4, then wraps.
    let second = [at(4, 0.0, 0.0, 1.0), at(3, 0.0, 0.0, 1.0), at(1, 0.0, 0.0, 1.0)];
    assert_eq!(instances(&second, (0..4).map(|_| rr.pick(&ctx, &second))), [3, 4, 1, 3]);
}

#[test]
fn rr_stays_fair_under_churn() {
    // Instances come and go every few picks; every instance present for a whole cycle gets exactly one pick per
    // cycle, so counts over a long run differ by at most the churn, not by order in the list.
    let mut rr = RoundRobin::new();
    let ctx = PickContext::new("web", MUNICH);
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let stable = [10u32, 20, 30, 40];
    for round in 0..1000u32 {
        let mut candidates: Vec<Candidate> = stable.iter().map(|&i| at(i, 0.0, 0.0, 1.0)).collect();
        // A flapping instance present two rounds out of three, inserted at varying positions.
        if round % 3 != 0 {
            candidates.insert((round as usize) % 4, at(25, 0.0, 0.0, 1.0));
        }
        let shift = (round as usize) % candidates.len();
        candidates.rotate_left(shift);
        let picked = candidates[rr.pick(&ctx, &candidates).unwrap()].instance;
        *counts.entry(picked).or_default() += 1;
    }
    let stable_counts: Vec<u32> = stable.iter().map(|i| counts[i]).collect();
    let (min, max) = (stable_counts.iter().min().unwrap(), stable_counts.iter().max().unwrap());
    // Each stable instance gets exactly one pick per cycle, whatever the list order and the flapping.
    assert!(max - min <= 1, "unfair: {counts:?}");
    assert!(counts[&25] > 0);
}

#[test]
fn closest_picks_the_nearest_instance_with_capacity() {
    let mut closest = Closest;
    let candidates = [
        at(1, 52.52, 13.40, 4.0), // Berlin
        at(2, 48.14, 11.58, 0.0), // Munich, saturated
        at(3, 48.21, 16.37, 2.0), // Vienna
        at(4, 40.41, -3.70, 8.0), // Madrid
    ];
    let ctx = PickContext::new("web", MUNICH);
    assert_eq!(candidates[closest.pick(&ctx, &candidates).unwrap()].instance, 3);

    // With the saturated one freed, it wins.
    let mut freed = candidates;
    freed[1].free.cpu = 1.0;
    assert_eq!(freed[closest.pick(&ctx, &freed).unwrap()].instance, 2);

    // Its node reports room, but the grid shows the Munich region full (fresher than the instance record):
    // skipped again.
    let munich_grid = CapacityGrid::merge(&[
        GridInput::Node { position: Position::new(48.14, 11.58), free: Capacity::ZERO },
        GridInput::Node { position: Position::new(48.141, 11.581), free: Capacity::new(0.0, 4096.0, 0.0) },
    ]);
    let grids = [munich_grid];
    let with_grid = ctx.with_grids(&grids);
    assert!(!with_grid.region_has_room(Position::new(48.14, 11.58)));
    assert!(with_grid.region_has_room(Position::new(48.21, 16.37)), "no grid covers Vienna: unknown means room");
    assert_eq!(freed[closest.pick(&with_grid, &freed).unwrap()].instance, 3);

    // All saturated: fall back to the nearest rather than refuse.
    let all_full: Vec<Candidate> = candidates.iter().map(|c| Candidate { free: Capacity::ZERO, ..*c }).collect();
    assert_eq!(all_full[closest.pick(&ctx, &all_full).unwrap()].instance, 2);
    assert_eq!(closest.pick(&ctx, &[]), None);
}

#[test]
fn finer_grids_override_coarser_ones() {
    // A coarse grid lumps Munich with a busy neighbour; the finer child grid knows the Munich cell is full.
    let full = GridInput::Node { position: Position::new(48.14, 11.58), free: Capacity::ZERO };
    let roomy = GridInput::Node { position: Position::new(47.0, 10.0), free: Capacity::new(8.0, 8192.0, 0.0) };
    let coarse = CapacityGrid::merge_sized(1, &[full, roomy]);
    let fine = CapacityGrid::merge(&[full]);
    assert!(fine.level() > coarse.level());
    let p = Position::new(48.14, 11.58);
    let coarse_only = [coarse.clone()];
    assert!(PickContext::new("web", MUNICH).with_grids(&coarse_only).region_has_room(p));
    let both = [coarse, fine];
    assert!(!PickContext::new("web", MUNICH).with_grids(&both).region_has_room(p));
}

#[test]
fn hc_picks_the_most_free_capacity() {
    let mut hc = HighestCapacity;
    let ctx = PickContext::new("web", MUNICH);
    let candidates = [at(1, 0.0, 0.0, 2.0), at(2, 10.0, 10.0, 6.0), at(3, 20.0, 20.0, 4.0)];
    assert_eq!(candidates[hc.pick(&ctx, &candidates).unwrap()].instance, 2);
    // Equal CPU: memory decides.
    let mut tie = candidates;
    tie[2].free = Capacity::new(6.0, 4096.0, 0.0);
    assert_eq!(tie[hc.pick(&ctx, &tie).unwrap()].instance, 3);
    // Lots of CPU but no memory left: saturated, not picked.
    let mut no_mem = candidates;
    no_mem[1].free.mem_mb = 0.0;
    assert_eq!(no_mem[hc.pick(&ctx, &no_mem).unwrap()].instance, 3);
}

#[test]
fn closest_hc_picks_the_highest_capacity_among_the_k_closest() {
    let candidates = [
        at(1, 48.2, 11.6, 1.0),  // Munich
        at(2, 48.8, 9.2, 3.0),   // Stuttgart
        at(3, 50.1, 8.7, 2.0),   // Frankfurt
        at(4, 52.5, 13.4, 16.0), // Berlin: most capacity, 4th closest
        at(5, 40.4, -3.7, 64.0), // Madrid: far
    ];
    let ctx = PickContext::new("web", MUNICH);
    assert_eq!(candidates[ClosestHighestCapacity::default().pick(&ctx, &candidates).unwrap()].instance, 2);
    assert_eq!(candidates[ClosestHighestCapacity::new(4).pick(&ctx, &candidates).unwrap()].instance, 4);
    assert_eq!(candidates[ClosestHighestCapacity::new(1).pick(&ctx, &candidates).unwrap()].instance, 1);
    assert_eq!(candidates[ClosestHighestCapacity::new(100).pick(&ctx, &candidates).unwrap()].instance, 5);
    // A saturated node among the nearest does not count towards k.
    let mut saturated = candidates;
    saturated[0].free = Capacity::ZERO;
    assert_eq!(saturated[ClosestHighestCapacity::new(3).pick(&ctx, &saturated).unwrap()].instance, 4);
}

#[test]
fn latency_prefers_estimated_rtt_over_geography() {
    let mut me = VivaldiCoord::new(1);
    me.position = [0.0, 0.0];
    let mut near_but_slow = VivaldiCoord::new(2);
    near_but_slow.position = [5.0, 0.0];
    near_but_slow.height = 80.0;
    let mut far_but_fast = VivaldiCoord::new(3);
    far_but_fast.position = [30.0, 0.0];
    let candidates = [
        Candidate { coord: Some(near_but_slow), ..at(1, 48.2, 11.6, 1.0) },
        Candidate { coord: Some(far_but_fast), ..at(2, 52.5, 13.4, 1.0) },
        at(3, 48.1, 11.5, 1.0), // no coordinate: ranks after all estimates
    ];
    let ctx = PickContext::new("web", MUNICH).with_coord(&me);
    assert_eq!(candidates[LowestLatency.pick(&ctx, &candidates).unwrap()].instance, 2);
    // Without our own coordinate, geography decides.
    let blind = PickContext::new("web", MUNICH);
    assert_eq!(candidates[LowestLatency.pick(&blind, &candidates).unwrap()].instance, 3);
}

#[test]
fn dispatch_by_kind() {
    let mut policies = Policies::new(2);
    let candidates = [at(1, 48.2, 11.6, 1.0), at(2, 52.5, 13.4, 8.0), at(3, 50.1, 8.7, 4.0)];
    let ctx = PickContext::new("web", MUNICH);
    let pick = |p: &mut Policies, kind| candidates[p.pick(kind, &ctx, &candidates).unwrap()].instance;
    assert_eq!(pick(&mut policies, PolicyKind::Closest), 1);
    assert_eq!(pick(&mut policies, PolicyKind::Hc), 2);
    assert_eq!(pick(&mut policies, PolicyKind::ClosestHc), 3);
    assert_eq!(pick(&mut policies, PolicyKind::Rr), 1);
    assert_eq!(pick(&mut policies, PolicyKind::Rr), 2);
    for kind in PolicyKind::ALL {
        assert_eq!(policies.get_mut(kind).kind(), kind);
    }
}

#[test]
fn pruning_keeps_what_each_policy_needs() {
    let candidates: Vec<Candidate> =
        (0..20).map(|i| at(i, 40.0 + f64::from(i), 10.0, if i == 0 { 0.0 } else { f64::from(i % 7) + 0.5 })).collect();
    let viewer = Position::new(40.0, 10.0);
    // closest: the 3 nearest with room (instance 0 sits on the viewer but is saturated).
    let closest: Vec<u32> =
        prune_for(PolicyKind::Closest, &candidates, 3, viewer).iter().map(|&i| candidates[i].instance).collect();
    assert_eq!(closest, [1, 2, 3]);
    // hc: the 3 roomiest (6.5 cores: instances 6, 13; then 5.5: 5, 12, 19 -> lowest number wins ties).
    let hc: Vec<u32> =
        prune_for(PolicyKind::Hc, &candidates, 3, viewer).iter().map(|&i| candidates[i].instance).collect();
    assert_eq!(hc, [5, 6, 13]);
    // rr: k consecutive instances; different children get different windows.
    let windows: std::collections::HashSet<Vec<usize>> = (0..20)
        .map(|i| prune_for(PolicyKind::Rr, &candidates, 3, Position::new(f64::from(i), 0.0)))
        .inspect(|w| assert_eq!(w.len(), 3))
        .collect();
    assert!(windows.len() > 5, "rr windows should spread: {windows:?}");
    // The union has no duplicates and covers each policy's choice.
    let all = prune(&candidates, 3, viewer);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    for kind in PolicyKind::ALL {
        assert!(prune_for(kind, &candidates, 3, viewer).iter().all(|i| all.contains(i)));
    }
    // Fewer candidates than k: keep them all.
    assert_eq!(prune(&candidates[..2], 3, viewer), [0, 1]);
}
