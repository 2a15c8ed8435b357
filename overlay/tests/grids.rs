//! Capacity grids on a running tree: a group goes to each child once, and a lost one is sent again.

mod common;

use canopy_overlay::{Capacity, Command, Config};
use common::{MS, Net};
use std::time::Duration;

/// Heartbeats with grids sent so far, and their bytes.
fn grid_heartbeats(net: &Net) -> u64 {
    net.traffic.get("Heartbeat with grids").map_or(0, |(msgs, _)| *msgs)
}

fn grid_heartbeat_bytes(net: &Net) -> u64 {
    net.traffic.get("Heartbeat with grids").map_or(0, |(_, bytes)| *bytes)
}

/// Free CPU over every grid node `i` holds (its subtree, its siblings' and the outside grid: the whole tree once).
fn free_cpu_seen_by(net: &mut Net, i: usize) -> f64 {
    net.nodes[i].grids().held().iter().map(|g| g.total().free.cpu).sum()
}

#[test]
fn a_quiet_group_gets_its_grids_once_and_a_lost_group_is_sent_again() {
    // A root with 16 leaf children: one group.
    let mut net = Net::new(17, Config::default());
    net.build(MS(2));
    net.run_for(Duration::from_secs(20));
    assert_eq!(net.nodes[0].children().count(), 16);
    let before = free_cpu_seen_by(&mut net, 1);
    assert_eq!(free_cpu_seen_by(&mut net, 5), before, "every child sees the same tree");
    // What a group costs on the wire during the build (mostly whole groups: the members changed with each joiner;
    // any difference among them only lowers this average and makes the check below stricter).
    let whole_group = grid_heartbeat_bytes(&net) / grid_heartbeats(&net);

    // Nothing changes: no grids travel, however many refresh periods pass.
    let quiet_start = grid_heartbeats(&net);
    net.run_for(Duration::from_secs(60));
    assert_eq!(grid_heartbeats(&net) - quiet_start, 0, "a quiet tree resends no grids");

    // Child 3 loses most of its capacity; child 5 cannot hear the root while the new group goes out.
    let (change_start, change_bytes) = (grid_heartbeats(&net), grid_heartbeat_bytes(&net));
    net.command(3, Command::SetCapacity(Capacity { cpu: 0.0, mem_mb: 64.0, bandwidth_mbps: 1.0 }));
    net.blocked.push((0, 5));
    // Two seconds: child 3's report carries the change after the root's next heartbeat, and the root's round
    // after that sends the group; shorter than the root's child timeout (3 s) with a missed report on each side.
    net.run_for(Duration::from_secs(2));
    net.blocked.clear();
    let after = free_cpu_seen_by(&mut net, 1);
    assert!(after < before, "child 1 got the new group: {after} < {before}");
    assert_eq!(free_cpu_seen_by(&mut net, 5), before, "child 5 missed it");

    // Child 5's next report names the old version: the root sends the group again, to it alone.
    net.run_for(Duration::from_secs(3));
    assert_eq!(free_cpu_seen_by(&mut net, 5), after, "child 5 caught up");
    // One group to each of 16 children and the resend to child 5. Children report right after the root's heartbeat,
    // so no report crosses the group on the way (and makes the root send it again).
    let sent = grid_heartbeats(&net) - change_start;
    assert_eq!(sent, 17, "heartbeats with grids for one change");
    // Each carries child 3's new grid, not the group: 16 children's grids and the outside grid.
    let per_heartbeat = (grid_heartbeat_bytes(&net) - change_bytes) / sent;
    assert!(per_heartbeat * 3 < whole_group, "{per_heartbeat} bytes per heartbeat, a whole group takes {whole_group}");
    assert!(net.check_tree().is_ok());
}
