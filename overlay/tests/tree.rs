//! Multi-node scenarios on the deterministic driver in `common`.

mod common;

use canopy_overlay::{Command, Config, Event, Role};
use common::{MS, Net, depth_bound};
use std::time::Duration;

fn config(max_children: usize) -> Config {
    Config { max_children, ..Config::default() }
}

fn built(n: usize, max_children: usize) -> Net {
    let mut net = Net::new(n, config(max_children));
    net.build(MS(100));
    net.run_for(Duration::from_secs(5));
    net
}

#[test]
fn twenty_nodes_join_into_one_tree() {
    let net = built(20, 4);
    assert_eq!(net.roots(), vec![0]);
    let depth = net.check_tree().unwrap();
    assert!(depth <= depth_bound(20, 4), "depth {depth}");
    assert!(!net.coordinators().is_empty(), "with 4 children per group there are coordinators");
    for i in net.live() {
        assert!(net.nodes[i].children().count() <= 4, "node {i} has too many children");
        let joined = net.events.iter().any(|(_, n, e)| *n == i && matches!(e, Event::Joined { .. }));
        assert!(joined, "node {i} reported no Joined event");
    }
    // Every node knows its whole ancestor chain up to the root.
    for i in net.live() {
        let st = net.nodes[i].status();
        if st.role != Role::Root {
            assert_eq!(st.ancestors.first(), Some(&net.id(0)), "node {i}: {:?}", st.ancestors);
            assert_eq!(st.ancestors.last(), st.parent.as_ref());
        }
    }
}

#[test]
fn join_bursts_stay_shallow_with_default_fanout() {
    let mut net = Net::new(300, Config::default());
    net.build(MS(5));
    net.run_for(Duration::from_secs(6));
    assert_eq!(net.roots().len(), 1);
    let depth = net.check_tree().unwrap();
    assert!(depth <= depth_bound(300, 16), "depth {depth} > {}", depth_bound(300, 16));
}

#[test]
fn root_crash_leaves_one_new_root_and_everyone_attached() {
    let mut net = built(20, 4);
    let crash_at = net.now;
    net.crash(0);
    net.run_for(Duration::from_secs(4));
    let roots = net.roots();
    assert_eq!(roots.len(), 1, "roots {roots:?}");
    net.check_tree().unwrap();
    let root = roots[0];
    assert!(net.nodes[root].term() >= 1, "the successor root raised the term");
    let failover = net
        .events
        .iter()
        .find(|(t, n, e)| *t >= crash_at && *n == root && matches!(e, Event::RoleChanged { role: Role::Root, .. }))
        .map(|(t, ..)| *t - crash_at)
        .unwrap();
    assert!(failover <= Duration::from_secs(4), "root failover took {failover:?}");
}

#[test]
fn coordinator_crash_orphans_reattach_within_three_seconds() {
    let mut net = built(20, 4);
    let victim = *net.coordinators().first().expect("a coordinator");
    let orphans: Vec<usize> = net.nodes[victim].children().map(|c| net.idx(c)).collect();
    assert!(!orphans.is_empty());
    net.run_for(MS(370)); // crash at an arbitrary point of the heartbeat cycle
    let crash_at = net.now;
    net.crash(victim);
    net.run_for(Duration::from_secs(5));
    net.check_tree().unwrap();
    assert_eq!(net.roots(), vec![0]);
    for o in orphans {
        let t = net.attached_at(o, crash_at).unwrap_or_else(|| panic!("orphan {o} never re-attached"));
        assert!(t - crash_at <= Duration::from_secs(3), "orphan {o} took {:?}", t - crash_at);
    }
}

#[test]
fn lossy_parent_link_alone_does_not_trigger_takeover() {
    let mut net = built(12, 4);
    // Cut the link between one leaf and its parent only, for 2.5 s: the leaf suspects, but siblings vouch.
    let leaf = net.live().find(|&i| net.nodes[i].role() == Role::Leaf && net.nodes[i].parent() != Some(net.id(0)));
    let Some(leaf) = leaf else { panic!("no leaf under a coordinator") };
    let parent = net.idx(net.nodes[leaf].parent().unwrap());
    let siblings = net.nodes[parent].children().count();
    assert!(siblings >= 2);
    net.blocked.push((leaf, parent));
    net.run_for(MS(2500));
    net.blocked.clear();
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.nodes[leaf].counters().parent_failures, 0);
    assert_eq!(net.nodes[leaf].parent(), Some(net.id(parent)));
}

#[test]
fn vouches_do_not_keep_a_crashed_parent_alive() {
    // A leaf cut off from its parent gets vouched for by siblings; if that second-hand news counted as having
    // heard the parent, the leaf would vouch back once the parent really crashed, and the siblings would keep
    // each other believing in a dead parent forever (seed 9050266835929872200 in the simulator).
    for crash_after_ms in (200..1500).step_by(100) {
        let mut net = built(12, 4);
        let leaf = net.live().find(|&i| net.nodes[i].role() == Role::Leaf && net.nodes[i].parent() != Some(net.id(0)));
        let Some(leaf) = leaf else { panic!("no leaf under a coordinator") };
        let parent = net.idx(net.nodes[leaf].parent().unwrap());
        let orphans: Vec<usize> = net.nodes[parent].children().map(|c| net.idx(c)).collect();
        assert!(orphans.len() >= 3);
        net.blocked.push((leaf, parent));
        net.run_for(MS(crash_after_ms));
        let crash_at = net.now;
        net.crash(parent);
        net.run_for(Duration::from_secs(6));
        for o in orphans {
            let t = net.attached_at(o, crash_at);
            assert!(
                t.is_some_and(|t| t - crash_at <= Duration::from_secs(4)),
                "crash after {crash_after_ms} ms: orphan {o} re-attached at {t:?}, still under {:?}",
                net.nodes[o].parent()
            );
        }
        net.check_tree().unwrap();
    }
}

#[test]
fn graceful_leave_of_a_coordinator_hands_over() {
    let mut net = built(20, 4);
    let leaver = *net.coordinators().first().expect("a coordinator");
    let children: Vec<usize> = net.nodes[leaver].children().map(|c| net.idx(c)).collect();
    let leave_at = net.now;
    net.command(leaver, Command::Leave);
    net.run_for(MS(500));
    // Handover is immediate: no failure detection needed.
    for c in &children {
        assert!(net.attached_at(*c, leave_at).is_some(), "child {c} not re-attached after 500 ms");
    }
    net.crash(leaver); // gone for good
    net.run_for(Duration::from_secs(3));
    net.check_tree().unwrap();
    assert_eq!(net.roots(), vec![0]);
    for c in children {
        assert_eq!(net.nodes[c].counters().parent_failures, 0, "child {c} went through failure detection");
    }
}

#[test]
fn graceful_leave_of_the_root() {
    let mut net = built(10, 4);
    net.command(0, Command::Leave);
    net.run_for(MS(500));
    net.crash(0);
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.roots().len(), 1);
    net.check_tree().unwrap();
}

/// The root leaves together with the child it hands over to and one more of its children, all at once: its other
/// children are redirected to the heir and find it gone, and the leavers' heirs climb to the departed root and
/// become island roots. Nobody may stay detached, and the islands (which know of each other only through the
/// views they held) must merge into one tree.
#[test]
fn root_leaving_with_its_heir_still_converges() {
    let mut net = built(20, 4);
    let root_children: Vec<usize> = net.nodes[0].children().map(|c| net.idx(c)).collect();
    assert!(root_children.len() >= 3, "root children {root_children:?}");
    let heir = *root_children.iter().max_by_key(|&&c| net.nodes[c].rank()).unwrap();
    let other = *root_children.iter().find(|&&c| c != heir).unwrap();
    let leavers = [0, heir, other];
    for l in leavers {
        net.command(l, Command::Leave);
    }
    net.run_for(Duration::from_secs(3));
    for l in leavers {
        net.crash(l);
    }
    net.run_for(Duration::from_secs(20));
    assert_eq!(net.roots().len(), 1, "roots {:?} after {leavers:?} left", net.roots());
    net.check_tree().unwrap();
}

#[test]
fn partition_into_halves_gives_two_roots_and_heals_to_one() {
    let mut net = built(20, 4);
    for i in 0..20 {
        net.group[i] = (i % 2) as u8;
    }
    net.run_for(Duration::from_secs(20));
    assert_eq!(net.roots_in(0).len(), 1, "half 0 roots {:?}", net.roots_in(0));
    assert_eq!(net.roots_in(1).len(), 1, "half 1 roots {:?}", net.roots_in(1));
    net.check_tree().unwrap();
    net.group.iter_mut().for_each(|g| *g = 0);
    let healed_at = net.now;
    net.run_for(Duration::from_secs(4));
    assert_eq!(net.roots().len(), 1, "roots after heal {:?}", net.roots());
    net.check_tree().unwrap();
    let _ = healed_at;
}

#[test]
fn replaced_coordinator_coming_back_steps_down_and_rejoins_as_leaf() {
    let mut net = built(20, 4);
    let victim = *net.coordinators().first().expect("a coordinator");
    let children: Vec<usize> = net.nodes[victim].children().map(|c| net.idx(c)).collect();
    net.group[victim] = 1;
    net.run_for(Duration::from_secs(8));
    for c in &children {
        assert_ne!(net.nodes[*c].parent(), Some(net.id(victim)), "child {c} still under the isolated coordinator");
    }
    net.group[victim] = 0;
    net.run_for(Duration::from_secs(5));
    assert_eq!(net.roots(), vec![0]);
    net.check_tree().unwrap();
    assert_eq!(net.nodes[victim].role(), Role::Leaf, "the old coordinator rejoined as a leaf");
}

#[test]
fn replaced_root_coming_back_rejoins_as_leaf() {
    let mut net = built(20, 4);
    net.group[0] = 1;
    net.run_for(Duration::from_secs(8));
    assert_eq!(net.roots_in(0).len(), 1);
    net.group[0] = 0;
    net.run_for(Duration::from_secs(5));
    let roots = net.roots();
    assert_eq!(roots.len(), 1, "roots {roots:?}");
    assert_ne!(roots[0], 0);
    net.check_tree().unwrap();
    assert_eq!(net.nodes[0].role(), Role::Leaf);
}

#[test]
fn garbage_and_duplicates_are_counted_not_fatal() {
    let mut net = built(3, 4);
    let now = net.now;
    let from = net.id(1);
    net.nodes[0].handle_bytes(now, from, &[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(net.nodes[0].counters().malformed, 1);
    // Replay the same envelope twice: the second copy is dropped.
    let env = canopy_overlay::Envelope {
        version: canopy_overlay::PROTOCOL_VERSION,
        id: 42,
        from,
        body: canopy_overlay::Message::Probe { seq: 1 },
    };
    let bytes = env.encode();
    net.nodes[0].handle_bytes(now, from, &bytes);
    net.nodes[0].handle_bytes(now, from, &bytes);
    assert_eq!(net.nodes[0].counters().duplicates, 1);
    let mut wrong = env.clone();
    wrong.version += 1;
    net.nodes[0].handle_bytes(now, from, &wrong.encode());
    assert_eq!(net.nodes[0].counters().bad_version, 1);
    net.run_for(Duration::from_secs(2));
    net.check_tree().unwrap();
}

#[test]
fn a_replayed_message_from_the_parent_or_a_child_is_dropped_as_a_duplicate() {
    // The parent's heartbeats and routing messages, and a child's reports and routing messages, are checked in
    // windows kept with the parent's and the children's records, the rest in the shared table: each must still catch
    // a copy.
    use canopy_overlay::message::{Heartbeat, Report};
    use canopy_overlay::routing::RoutesMessage;
    use canopy_overlay::{Capacity, Envelope, Message, PROTOCOL_VERSION, Position, Rank, Summary};
    let mut net = built(3, 4);
    let root = net.roots()[0];
    let child = (0..3).find(|&i| net.nodes[i].parent() == Some(net.id(root))).expect("the root has a child");
    let (root_id, child_id) = (net.id(root), net.id(child));
    let envelope = |from, id, body| Envelope { version: PROTOCOL_VERSION, id, from, body };
    let heartbeat = Heartbeat {
        term: net.nodes[root].term(),
        view_version: 0,
        view: None,
        address_block: None,
        grids: None,
        between_rounds: false,
    };
    let report = Report {
        view_version: 0,
        rank: Rank::new(child_id, true, &Capacity::ZERO, Duration::ZERO),
        summary: Summary::leaf(Position::new(48.0, 11.0)),
        grid: None,
        group_version: 0,
    };
    let routes = || Message::Routes(Box::new(RoutesMessage::GroupBlocks(vec![])));
    let now = net.now;
    let down = [
        envelope(root_id, 1 << 40, Message::Heartbeat(heartbeat)).encode(),
        envelope(root_id, (1 << 40) + 1, routes()).encode(),
    ];
    let up = [
        envelope(child_id, 1 << 40, Message::Report(report)).encode(),
        envelope(child_id, (1 << 40) + 1, routes()).encode(),
    ];
    let (child_before, root_before) = (net.nodes[child].counters().duplicates, net.nodes[root].counters().duplicates);
    for _ in 0..2 {
        for (to_child, to_root) in down.iter().zip(&up) {
            net.nodes[child].handle_bytes(now, root_id, to_child);
            net.nodes[root].handle_bytes(now, child_id, to_root);
        }
    }
    assert_eq!(net.nodes[child].counters().duplicates, child_before + 2);
    assert_eq!(net.nodes[root].counters().duplicates, root_before + 2);
    net.run_for(Duration::from_secs(2));
    net.check_tree().unwrap();
}

#[test]
fn a_burst_of_joiners_pushes_the_view_a_few_times_not_once_per_joiner() {
    // Sixteen joiners within 32 ms under one root: pushing every change of the view to every child would send
    // 1 + 2 + ... + 15 heartbeats with views; coalesced, a few rounds to all children.
    let mut net = Net::new(17, Config::default());
    net.build(MS(2));
    net.run_for(MS(300));
    assert_eq!(net.nodes[0].children().count(), 16);
    let heartbeats = net.traffic.get("Heartbeat").map_or(0, |(msgs, _)| *msgs);
    assert!(heartbeats <= 3 * 16, "{heartbeats} heartbeats in the first 332 ms");
    // And the tree is whole.
    net.run_for(Duration::from_secs(2));
    for i in 1..17 {
        assert_eq!(net.nodes[i].status().parent, Some(net.id(0)));
    }
    assert!(net.check_tree().is_ok());
}

#[test]
fn rank_changes_alone_reach_the_children_late_and_once() {
    // Every machine's uptime class ticks over at one minute. Each child reports its new rank; the root resends the
    // view with the new ranks after `rank_push_delay` (30 s), once, not at once to all children.
    let views = |net: &Net| net.traffic.get("Heartbeat with view").map_or(0, |(msgs, _)| *msgs);
    let mut net = Net::new(17, Config::default());
    net.build(MS(2));
    net.run_until(Duration::from_secs(50));
    let before = views(&net);
    net.run_until(Duration::from_secs(85));
    assert_eq!(views(&net) - before, 0, "no view for rank changes alone within the push delay");
    let seen_by_5 = |net: &Net| {
        let view = net.last_view_to[5].as_ref().expect("child 5 got a view");
        view.members.iter().map(|m| m.rank.uptime_class).collect::<Vec<_>>()
    };
    assert!(seen_by_5(&net).iter().all(|class| *class == 0));
    net.run_until(Duration::from_secs(100));
    let pushed = views(&net) - before;
    assert!((16..=20).contains(&pushed), "one view to each of 16 children (and a few resends): {pushed}");
    assert!(seen_by_5(&net).iter().all(|class| *class == 1), "the new ranks arrived: {:?}", seen_by_5(&net));
    // A real change of the view still goes out at once.
    net.crash(9);
    let before = views(&net);
    net.run_for(Duration::from_secs(5));
    assert!(views(&net) - before >= 15, "a member's loss is pushed to the others within the child timeout");
    assert!(net.check_tree().is_ok());
}

/// The join requests a lone node sends, with the contact each goes to, while time runs to `until` in 10 ms steps.
fn join_requests_until(
    node: &mut canopy_overlay::Node,
    from: Duration,
    until: Duration,
) -> Vec<(Duration, canopy_overlay::NodeId)> {
    use canopy_overlay::{Message, Output};
    let mut sent = Vec::new();
    let mut now = from;
    while now <= until {
        if node.poll_timeout().is_some_and(|t| t <= now) {
            node.handle_timeout(now);
        }
        while let Some(out) = node.poll_output() {
            if let Output::Send { to, envelope } = out
                && matches!(envelope.body, Message::JoinRequest(_))
            {
                sent.push((now, to));
            }
        }
        now += MS(10);
    }
    sent
}

#[test]
fn a_lone_joiner_asks_one_contact_at_a_time_and_the_next_once_the_answer_is_overdue() {
    use canopy_overlay::{Input, Node};
    let config = Config::default();
    let wait = config.join_answer_wait;
    let mut node = Node::new(common::info(9), config, 7, Duration::ZERO);
    node.handle(Duration::ZERO, Input::Command(Command::AddContact(common::info(2).id)));
    node.handle(Duration::ZERO, Input::Command(Command::Join { via: common::info(1).id }));
    // Its first tick falls somewhere in the first heartbeat interval: it must not ask a second contact while the
    // first one's answer may still be on its way (both could accept, and one would be left at once).
    let sent = join_requests_until(&mut node, Duration::ZERO, wait - MS(10));
    assert_eq!(sent, vec![(Duration::ZERO, common::info(1).id)], "one request, to the contact given");
    // No answer in time: it asks again at once rather than at its next tick, one contact at a time, going round
    // its contacts (the one given first comes round again first).
    let sent = join_requests_until(&mut node, wait, 2 * wait + MS(20));
    let times: Vec<Duration> = sent.iter().map(|(t, _)| *t).collect();
    assert_eq!(times, vec![wait, 2 * wait], "{sent:?}");
    assert!(sent.iter().any(|(_, to)| *to == common::info(2).id), "the other contact is asked too: {sent:?}");
}

/// Every message `node` has queued, in order.
fn sent_by(node: &mut canopy_overlay::Node) -> Vec<(canopy_overlay::NodeId, canopy_overlay::Envelope)> {
    let mut sent = Vec::new();
    while let Some(out) = node.poll_output() {
        if let canopy_overlay::Output::Send { to, envelope } = out {
            sent.push((to, envelope));
        }
    }
    sent
}

#[test]
fn a_heartbeat_that_overtakes_the_accept_does_not_make_the_parent_drop_the_joiner() {
    // A parent's first heartbeat to a child it just adopted can arrive before its `Accept` (jitter, separate
    // streams). Answering it with `NotYourChild` made the parent drop the child, which then attached anyway; its
    // next report was refused, it attached again directly and over-filled the parent: the first split of a cascade.
    use canopy_overlay::{Input, Message, Node};
    let config = Config::default();
    let mut root = Node::new(common::info(1), config.clone(), 1, Duration::ZERO);
    let mut joiner = Node::new(common::info(2), config, 2, Duration::ZERO);
    let (root_id, joiner_id) = (root.id(), joiner.id());
    root.handle(Duration::ZERO, Input::Command(Command::Start));
    joiner.handle(Duration::ZERO, Input::Command(Command::Join { via: root_id }));
    let mut now = MS(5);
    for (to, envelope) in sent_by(&mut joiner) {
        assert_eq!(to, root_id);
        root.handle(now, Input::Message { from: joiner_id, envelope });
    }
    let mut to_joiner: Vec<_> = sent_by(&mut root).into_iter().filter(|(to, _)| *to == joiner_id).collect();
    let accept = to_joiner.iter().position(|(_, e)| matches!(e.body, Message::Accept(_))).expect("the root accepts");
    let accept = to_joiner.remove(accept).1;
    let heartbeat = loop {
        now += MS(10);
        assert!(now < Duration::from_secs(3), "the root sends its child a heartbeat within an interval");
        if root.poll_timeout().is_some_and(|t| t <= now) {
            root.handle_timeout(now);
        }
        let sent = sent_by(&mut root);
        if let Some((_, e)) =
            sent.into_iter().find(|(to, e)| *to == joiner_id && matches!(e.body, Message::Heartbeat(_)))
        {
            break e;
        }
    };
    // The heartbeat arrives first, then the accept.
    joiner.handle(now, Input::Message { from: root_id, envelope: heartbeat });
    assert!(
        sent_by(&mut joiner).iter().all(|(_, e)| !matches!(e.body, Message::NotYourChild(_))),
        "the joiner waits for its answer instead of disowning the parent"
    );
    assert_eq!(joiner.counters().early_heartbeats, 1);
    joiner.handle(now + MS(1), Input::Message { from: root_id, envelope: accept });
    assert_eq!(joiner.parent(), Some(root_id));
    assert!(root.children().any(|c| c == joiner_id), "the root still counts the joiner as its child");
    // Once attached, a heartbeat from a coordinator that is not our parent is disowned again.
    let stranger = Node::new(common::info(3), Config::default(), 3, Duration::ZERO).id();
    let stray = canopy_overlay::Envelope {
        version: canopy_overlay::PROTOCOL_VERSION,
        id: 77,
        from: stranger,
        body: Message::Heartbeat(canopy_overlay::message::Heartbeat {
            term: 0,
            view_version: 0,
            view: None,
            address_block: None,
            grids: None,
            between_rounds: false,
        }),
    };
    joiner.handle(now + MS(2), Input::Message { from: stranger, envelope: stray });
    assert!(sent_by(&mut joiner).iter().any(|(to, e)| *to == stranger && matches!(e.body, Message::NotYourChild(_))));
}

/// Node 9 joined under root 1 (given `contacts` first), then redirected by it to node 5 at 20 ms; returns the
/// parent and the node with the messages the redirect made the node send.
fn redirected_child(
    config: &Config,
    contacts: &[usize],
) -> (canopy_overlay::Node, canopy_overlay::Node, Vec<(canopy_overlay::NodeId, canopy_overlay::Envelope)>) {
    use canopy_overlay::{Envelope, Input, Message, Node, PROTOCOL_VERSION};
    let mut parent = Node::new(common::info(1), config.clone(), 1, Duration::ZERO);
    let mut node = Node::new(common::info(9), config.clone(), 9, Duration::ZERO);
    let (parent_id, node_id) = (parent.id(), node.id());
    parent.handle(Duration::ZERO, Input::Command(Command::Start));
    for &old in contacts {
        node.handle(Duration::ZERO, Input::Command(Command::AddContact(common::info(old).id)));
    }
    node.handle(Duration::ZERO, Input::Command(Command::Join { via: parent_id }));
    for (_, envelope) in sent_by(&mut node) {
        parent.handle(MS(5), Input::Message { from: node_id, envelope });
    }
    for (_, envelope) in sent_by(&mut parent).into_iter().filter(|(to, _)| *to == node_id) {
        node.handle(MS(10), Input::Message { from: parent_id, envelope });
    }
    assert_eq!(node.parent(), Some(parent_id));
    let redirect = Envelope {
        version: PROTOCOL_VERSION,
        id: 1_000,
        from: parent_id,
        body: Message::Redirect { to: Box::new(common::info(5)) },
    };
    node.handle(MS(20), Input::Message { from: parent_id, envelope: redirect });
    let sent = sent_by(&mut node);
    (parent, node, sent)
}

#[test]
fn a_node_whose_attach_after_a_redirect_goes_unanswered_asks_the_target_then_the_parent_first() {
    // Redirected by a split, a node attaches to the target; when that answer is lost it joins through its contacts.
    // Older contacts (ancestors that may have crashed, each costing a join wait) came first, and a node in a
    // property schedule was still detached 3 s later.
    use canopy_overlay::Message;
    let config = Config::default();
    let (parent, mut node, sent) = redirected_child(&config, &[2, 3]);
    let target = common::info(5).id;
    assert!(sent.iter().any(|(to, e)| *to == target && matches!(e.body, Message::Attach(_))));
    // Nothing answers the attach: the joins that follow go to the target, then to the parent that sent us there.
    let until = MS(20) + config.attach_timeout + config.heartbeat_interval + 2 * config.join_answer_wait;
    let asked: Vec<_> = join_requests_until(&mut node, MS(30), until).into_iter().map(|(_, to)| to).collect();
    assert_eq!(asked.get(..2), Some(&[target, parent.id()][..]), "asked, in order: {asked:?}");
}

#[test]
fn a_redirected_node_keeps_its_parent_until_the_target_accepts() {
    // Make before break: a subtree moved by a split or a collapsed chain link stays attached while it moves, so
    // the tree never shows it cut off for the round trip of its attach.
    use canopy_overlay::{Input, Message, Node};
    let config = Config::default();
    let (parent, mut node, sent) = redirected_child(&config, &[]);
    let mut target = Node::new(common::info(5), config.clone(), 5, Duration::ZERO);
    target.handle(Duration::ZERO, Input::Command(Command::Start));
    let (target_id, node_id) = (target.id(), node.id());
    let attaches: Vec<_> = sent.into_iter().filter(|(to, _)| *to == target_id).collect();
    assert!(attaches.iter().any(|(_, e)| matches!(e.body, Message::Attach(_))), "attaches to the target");
    assert_eq!(node.parent(), Some(parent.id()), "still linked to the parent while the attach is open");
    assert_ne!(node.role(), Role::Detached);
    for (_, envelope) in attaches {
        target.handle(MS(25), Input::Message { from: node_id, envelope });
    }
    for (_, envelope) in sent_by(&mut target).into_iter().filter(|(to, _)| *to == node_id) {
        node.handle(MS(30), Input::Message { from: target_id, envelope });
    }
    assert_eq!(node.parent(), Some(target_id), "moved once the target accepted");
}

#[test]
fn a_redirected_node_whose_target_does_not_answer_lets_its_parent_go() {
    let config = Config::default();
    let (_parent, mut node, _) = redirected_child(&config, &[]);
    node.handle_timeout(MS(20) + config.attach_timeout);
    assert_eq!(node.parent(), None, "the parent let it go: the kept link goes with the failed move");
}
