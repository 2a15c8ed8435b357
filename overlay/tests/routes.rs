//! Routes and addresses across a tree of nodes on the deterministic driver in `common`: subnet grants, the
//! instance registry, route queries with interests, ServiceIP allocation, failures and partitions.

mod common;

use canopy_overlay::routes::{AddressRequest, InstanceRecord, PolicyKind, QueryKey, RouteChange, ServiceName};
use canopy_overlay::routing::{RouteCommand, RouteEvent};
use canopy_overlay::{Capacity, Command, Config, Event, Node};
use common::{MS, Net};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::time::Duration;

fn built(n: usize, max_children: usize) -> Net {
    let mut net = Net::new(n, Config { max_children, ..Config::default() });
    net.build(MS(100));
    net.run_for(Duration::from_secs(8));
    net
}

fn route(net: &mut Net, i: usize, cmd: RouteCommand) {
    net.command(i, Command::Route(cmd));
}

/// Route events of node `i` since event index `from`.
fn route_events(net: &Net, i: usize, from: usize) -> Vec<RouteEvent> {
    net.events[from..]
        .iter()
        .filter(|(_, n, _)| *n == i)
        .filter_map(|(_, _, e)| match e {
            Event::Route(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// Two nodes and their overlapping machine subnets.
type Overlap = (usize, usize, Ipv4Net, Ipv4Net);

/// Every pair of live nodes' machine subnets that overlap.
fn overlaps(net: &Net) -> Vec<Overlap> {
    let all: Vec<(usize, Ipv4Net)> =
        net.live().flat_map(|i| net.nodes[i].routing().machine_subnets().iter().map(move |b| (i, *b))).collect();
    let mut out = Vec::new();
    for (x, (i, a)) in all.iter().enumerate() {
        for (j, b) in &all[x + 1..] {
            if a.contains(b) || b.contains(a) {
                out.push((*i, *j, *a, *b));
            }
        }
    }
    out
}

fn subnets(net: &Net) -> Vec<Vec<Ipv4Net>> {
    (0..net.nodes.len()).map(|i| net.nodes[i].routing().machine_subnets().to_vec()).collect()
}

fn record(net: &Net, i: usize, service: &ServiceName, number: u32, ip: Ipv4Addr) -> InstanceRecord {
    let subnet = net.nodes[i].routing().machine_subnets()[0];
    InstanceRecord {
        service: service.clone(),
        number,
        instance_ip: ip,
        namespace_ip: subnet.hosts().nth(1).unwrap(),
        host: net.id(i),
        tunnel: vec!["192.0.2.1:50103".parse().unwrap()],
        position: net.nodes[i].info().position,
        free: Capacity::new(1.0, 512.0, 50.0),
        version: 1,
    }
}

fn deploy(net: &mut Net, from: usize, service: &ServiceName, request: AddressRequest, n: u32) -> RouteEvent {
    let mark = net.events.len();
    route(net, from, RouteCommand::DeployService { name: service.clone(), request, instances: n });
    net.run_for(Duration::from_secs(1));
    route_events(net, from, mark)
        .into_iter()
        .find(|e| matches!(e, RouteEvent::ServiceDeployed { .. } | RouteEvent::DeployFailed { .. }))
        .expect("the root answers a deployment")
}

#[test]
fn every_node_gets_a_disjoint_machine_subnet() {
    let net = built(40, 4);
    net.check_tree().unwrap();
    for i in net.live() {
        let s = net.nodes[i].routing().machine_subnets();
        assert_eq!(s.len(), 1, "node {i} has subnets {s:?}");
        assert_eq!(s[0].prefix_len(), 26);
        assert!(canopy_overlay::routing::is_machine_block(&s[0]), "{}", s[0]);
        let granted = route_events(&net, i, 0).iter().any(|e| matches!(e, RouteEvent::SubnetGranted { .. }));
        assert!(granted, "node {i} was never told its subnet");
    }
    assert_eq!(overlaps(&net), vec![]);
    // Coordinators grant from blocks their parent gave them, and say so on heartbeats.
    for c in net.coordinators() {
        assert!(!net.nodes[c].routing().group_blocks().is_empty(), "coordinator {c} has no block");
        assert!(net.nodes[c].status().address_block.is_some());
    }
}

#[test]
fn a_full_machine_asks_for_another_subnet() {
    let mut net = built(10, 4);
    let leaf = net.live().find(|&i| net.nodes[i].children().count() == 0).unwrap();
    let mark = net.events.len();
    route(&mut net, leaf, RouteCommand::RequestSubnet);
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.nodes[leaf].routing().machine_subnets().len(), 2);
    let events = route_events(&net, leaf, mark);
    assert!(events.iter().any(|e| matches!(e, RouteEvent::SubnetGranted { .. })), "{events:?}");
    assert_eq!(overlaps(&net), vec![]);
}

#[test]
fn a_crashed_machine_gives_its_subnet_back_and_a_successor_keeps_the_group_s_subnets() {
    let mut net = built(40, 4);
    let victim = *net
        .coordinators()
        .iter()
        .find(|&&c| net.nodes[c].parent().is_some() && net.nodes[c].children().count() >= 3)
        .expect("a coordinator below the root");
    let orphans: Vec<usize> = net.nodes[victim].children().map(|id| net.idx(id)).collect();
    let before = subnets(&net);
    let parent = net.idx(net.nodes[victim].parent().unwrap());
    let victim_subnet = before[victim][0];
    net.crash(victim);
    net.run_for(Duration::from_secs(10));
    net.check_tree().unwrap();
    assert_eq!(overlaps(&net), vec![]);
    for i in net.live() {
        assert!(!net.nodes[i].routing().machine_subnets().is_empty(), "node {i} lost its subnet");
    }
    let kept = orphans.iter().filter(|&&o| subnets(&net)[o] == before[o]).count();
    assert_eq!(kept, orphans.len(), "orphans kept their subnets: {kept} of {}", orphans.len());
    // The crashed machine's own subnet is free again in its parent's pool (or the successor's).
    let holder = net.nodes[parent].routing().pool().grants().find(|g| g.block == victim_subnet).map(|g| g.holder);
    assert_ne!(holder, Some(net.id(victim)));
}

#[test]
fn deploy_register_query_update_and_failure() {
    let mut net = built(40, 4);
    let svc: ServiceName = "shop.acme.cart.prod".parse().unwrap();
    let RouteEvent::ServiceDeployed { addresses, instance_ips } = deploy(&mut net, 7, &svc, Default::default(), 3)
    else {
        panic!("deployed")
    };
    assert_eq!(addresses.service_ips.len(), PolicyKind::ALL.len());
    assert_eq!(instance_ips.len(), 3);

    // Instance 0 runs on node 5; node 33 asks for the service by name.
    let rec0 = record(&net, 5, &svc, 0, instance_ips[0].1);
    route(&mut net, 5, RouteCommand::RegisterInstance(rec0.clone()));
    net.run_for(Duration::from_secs(1));
    let mark = net.events.len();
    let asked_at = net.now;
    route(&mut net, 33, RouteCommand::QueryRoute(QueryKey::Name(svc.clone())));
    net.run_for(Duration::from_secs(1));
    let answer = route_events(&net, 33, mark)
        .into_iter()
        .rev()
        .find_map(|e| match e {
            RouteEvent::RouteAnswer { answer, .. } => Some(answer),
            _ => None,
        })
        .expect("an answer");
    assert_eq!(answer.instances, vec![rec0.clone()]);
    assert_eq!(answer.addresses.as_ref(), Some(&addresses));
    let answered_at = net.events[mark..].iter().find(|(_, n, e)| *n == 33 && matches!(e, Event::Route(_))).unwrap().0;
    assert!(answered_at - asked_at <= MS(20) * 2 * 8, "cold query took {:?}", answered_at - asked_at);

    // By address, from another node: the ServiceIP of the closest policy names the service.
    let mark = net.events.len();
    let ip = addresses.service_ips[&PolicyKind::Closest];
    route(&mut net, 21, RouteCommand::QueryRoute(QueryKey::Address(ip)));
    net.run_for(Duration::from_secs(1));
    let by_addr = route_events(&net, 21, mark);
    assert!(
        by_addr.iter().any(|e| matches!(e, RouteEvent::RouteAnswer { answer, .. } if answer.service == svc)),
        "{by_addr:?}"
    );

    // A second instance on node 12 reaches the interested node 33 as a change.
    let mark = net.events.len();
    let rec1 = record(&net, 12, &svc, 1, instance_ips[1].1);
    route(&mut net, 12, RouteCommand::RegisterInstance(rec1.clone()));
    net.run_for(Duration::from_secs(1));
    let changes = route_events(&net, 33, mark);
    assert!(changes.contains(&RouteEvent::RouteChanged { change: RouteChange::Upsert(rec1.clone()) }), "{changes:?}");

    // Node 12 crashes: its instance disappears for node 33 once the failure is detected.
    let mark = net.events.len();
    net.crash(12);
    net.run_for(Duration::from_secs(6));
    let changes = route_events(&net, 33, mark);
    assert!(
        changes
            .iter()
            .any(|e| matches!(e, RouteEvent::RouteChanged { change: RouteChange::Removed { number: 1, .. } })),
        "{changes:?}"
    );
    // The root's index holds only instance 0 now.
    let root = net.roots()[0];
    let left: Vec<u32> = net.nodes[root].routing().registry().instances(&svc).map(|r| r.number).collect();
    assert_eq!(left, vec![0]);
}

#[test]
fn unknown_service_is_not_found_and_a_taken_address_fails_clearly() {
    let mut net = built(20, 4);
    let mark = net.events.len();
    let ghost: ServiceName = "no.such.svc.here".parse().unwrap();
    route(&mut net, 15, RouteCommand::QueryRoute(QueryKey::Name(ghost.clone())));
    net.run_for(Duration::from_secs(1));
    assert!(route_events(&net, 15, mark).contains(&RouteEvent::RouteNotFound { key: QueryKey::Name(ghost) }));

    let a: ServiceName = "a.x.svc.prod".parse().unwrap();
    let b: ServiceName = "b.x.svc.prod".parse().unwrap();
    let fixed = Ipv4Addr::new(10, 30, 7, 7);
    let request = AddressRequest { service_ips: [(PolicyKind::Rr, fixed)].into(), instances: None };
    let RouteEvent::ServiceDeployed { addresses, .. } = deploy(&mut net, 3, &a, request.clone(), 0) else {
        panic!("first deployment gets its fixed address")
    };
    assert_eq!(addresses.service_ips[&PolicyKind::Rr], fixed);
    match deploy(&mut net, 11, &b, request, 0) {
        RouteEvent::DeployFailed { name, reason } => {
            assert_eq!(name, b, "the failure names the service that asked");
            assert!(reason.contains("10.30.7.7") && reason.contains("a.x.svc.prod"), "{reason}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn interests_lapse_unless_the_route_is_used() {
    let mut net = built(20, 4);
    let svc: ServiceName = "shop.acme.cart.prod".parse().unwrap();
    let RouteEvent::ServiceDeployed { instance_ips, .. } = deploy(&mut net, 2, &svc, Default::default(), 1) else {
        panic!("deployed")
    };
    let rec = record(&net, 4, &svc, 0, instance_ips[0].1);
    route(&mut net, 4, RouteCommand::RegisterInstance(rec));
    route(&mut net, 17, RouteCommand::QueryRoute(QueryKey::Name(svc.clone())));
    route(&mut net, 18, RouteCommand::QueryRoute(QueryKey::Name(svc.clone())));
    net.run_for(Duration::from_secs(1));
    // Node 17 keeps using the route, node 18 does not.
    for _ in 0..9 {
        route(&mut net, 17, RouteCommand::RouteUsed(svc.clone()));
        net.run_for(Duration::from_secs(10));
    }
    let now = net.now;
    assert!(net.nodes[17].routing().interests().is_wanted(&svc, now));
    assert!(!net.nodes[18].routing().interests().is_wanted(&svc, now));
    // The host keeps its pinned interest without using it.
    assert!(net.nodes[4].routing().interests().is_wanted(&svc, now));
}

#[test]
fn partition_and_heal_leave_no_overlapping_subnets_or_service_ips() {
    let mut net = built(30, 4);
    for i in 0..30 {
        net.group[i] = (i % 2) as u8;
    }
    net.run_for(Duration::from_secs(20));
    // Each side deploys a service and new subnets are granted on both sides.
    let one: ServiceName = "one.x.svc.prod".parse().unwrap();
    let two: ServiceName = "two.x.svc.prod".parse().unwrap();
    let a = net.roots_in(0)[0];
    let b = net.roots_in(1)[0];
    assert!(matches!(deploy(&mut net, a, &one, Default::default(), 1), RouteEvent::ServiceDeployed { .. }));
    assert!(matches!(deploy(&mut net, b, &two, Default::default(), 1), RouteEvent::ServiceDeployed { .. }));
    net.group.iter_mut().for_each(|g| *g = 0);
    net.run_for(Duration::from_secs(30));
    assert_eq!(net.roots().len(), 1);
    net.check_tree().unwrap();
    assert_eq!(overlaps(&net), vec![]);
    for i in net.live() {
        assert!(!net.nodes[i].routing().machine_subnets().is_empty(), "node {i} has no subnet");
    }
    let root = net.roots()[0];
    let table = net.nodes[root].routing().allocator().expect("the root allocates");
    let services: Vec<ServiceName> = table.assignments().map(|a| a.key.service().clone()).collect();
    assert!(services.contains(&one) && services.contains(&two), "{services:?}");
}

/// Restarts crashed node `i` with the same id and a fresh state, restores `subnets`, and joins it via `via`.
fn restart(net: &mut Net, i: usize, subnets: Vec<Ipv4Net>, via: usize) {
    let config = net.nodes[i].config().clone();
    net.nodes[i] = Node::new(common::info(i), config, 77 + i as u64, net.now);
    net.alive[i] = true;
    route(net, i, RouteCommand::RestoreSubnets(subnets));
    let via = net.id(via);
    net.command(i, Command::Join { via });
}

/// A tree of `n` nodes where a coordinator below the root granted two of its leaves subnets from one block it holds,
/// after both crashed and the coordinator freed their grants: the tree, the coordinator, the leaf with the higher
/// subnet and that subnet. The lower one stays dead, so a fresh grant to the other would hand out the lower (free)
/// subnet instead of the old one. (In one block: a block left empty could go back up the tree, as idle.)
fn restart_setup(n: usize) -> Option<(Net, usize, usize, Vec<Ipv4Net>)> {
    let mut net = built(n, 4);
    let leaves_in_one_block = |net: &Net, p: usize| -> Option<(usize, usize)> {
        let pool = net.nodes[p].routing().pool();
        let mut kids: Vec<(Ipv4Net, usize)> = net.nodes[p]
            .children()
            .map(|c| net.idx(c))
            .filter(|&c| net.nodes[c].children().count() == 0)
            .map(|c| (net.nodes[c].routing().machine_subnets()[0], c))
            .filter(|(subnet, _)| pool.grant(*subnet).is_some())
            .collect();
        kids.sort();
        let block_of = |subnet: &Ipv4Net| pool.owned().iter().find(|b| b.contains(subnet)).copied();
        kids.windows(2).find(|w| block_of(&w[0].0) == block_of(&w[1].0)).map(|w| (w[0].1, w[1].1))
    };
    let (parent, (lower, leaf)) = net
        .coordinators()
        .into_iter()
        .filter(|&c| net.nodes[c].parent().is_some())
        .find_map(|c| leaves_in_one_block(&net, c).map(|pair| (c, pair)))?;
    let old = net.nodes[leaf].routing().machine_subnets().to_vec();
    // Crashed, and the parent noticed and freed the grants.
    net.crash(leaf);
    net.crash(lower);
    net.run_for(Duration::from_secs(10));
    let lower_free = |net: &Net, p: usize| {
        net.nodes[p].routing().pool().free_blocks().iter().any(|b| b.network() < old[0].network())
    };
    // Else a fresh grant would not differ from the old subnet.
    lower_free(&net, parent).then_some((net, parent, leaf, old))
}

#[test]
fn a_restarted_machine_gets_its_old_subnet_back_under_the_same_or_another_parent() {
    // Same parent: the first tree (of 40 nodes and more) where that setup holds; the leaf comes back with the same id.
    let (mut net, parent, leaf, old) = (40..=120)
        .step_by(4)
        .find_map(restart_setup)
        .expect("a tree with two leaves of one coordinator in one of its blocks");
    let mark = net.events.len();
    restart(&mut net, leaf, old.clone(), parent);
    net.run_for(Duration::from_secs(5));
    net.check_tree().unwrap();
    assert_eq!(net.idx(net.nodes[leaf].parent().unwrap()), parent);
    assert_eq!(net.nodes[leaf].routing().machine_subnets(), old.as_slice());
    assert_eq!(route_events(&net, leaf, mark), vec![RouteEvent::SubnetGranted { block: old[0] }]);
    assert_eq!(overlaps(&net), vec![]);

    // Another parent: the machine and its coordinator crash together; the machine comes back under whoever
    // took the coordinator's place (it inherited the group's blocks) and keeps its subnet.
    net.crash(leaf);
    net.crash(parent);
    net.run_for(Duration::from_secs(12));
    net.check_tree().unwrap();
    let mark = net.events.len();
    let root = net.roots()[0];
    restart(&mut net, leaf, old.clone(), root);
    net.run_for(Duration::from_secs(5));
    net.check_tree().unwrap();
    let new_parent = net.idx(net.nodes[leaf].parent().expect("attached"));
    assert_ne!(new_parent, parent);
    // (Whether a fresh grant would differ here depends on timing: the successor may have given the dead lower
    // leaf's block back up as idle. The first half shows the restore is not a coincidence of the allocator.)
    assert_eq!(net.nodes[leaf].routing().machine_subnets(), old.as_slice(), "under node {new_parent}");
    assert_eq!(route_events(&net, leaf, mark), vec![RouteEvent::SubnetGranted { block: old[0] }]);
    assert_eq!(overlaps(&net), vec![]);
}

/// Cuts a subtree two levels down off a tree of `n` nodes (so it joins back under a coordinator, not the root; it
/// becomes an island with its own root), optionally has both roots grant themselves extra subnets while apart (each
/// reuses space it believes free, so they clash with the other side), heals, and returns the machines that may be
/// renumbered (those inside a block the joining root had granted that overlaps a machine subnet of the surviving
/// side) and those renumbered (`SubnetChanged`) after the heal. `None` when the island did not join back under the
/// coordinator it was cut from: its blocks lie in that coordinator's space, which another one cannot claim them from,
/// so the island is renumbered whole (a limitation, see README's "Addressing and naming").
fn heal_and_count_renumbered(n: usize, extra_grants: usize) -> Option<(Vec<usize>, Vec<usize>)> {
    let mut net = built(n, 4);
    let root = net.roots()[0];
    let in_subtree = |net: &Net, mut i: usize, top: usize| loop {
        if i == top {
            return true;
        }
        match net.nodes[i].parent() {
            Some(p) => i = net.idx(p),
            None => return false,
        }
    };
    let cut = net
        .coordinators()
        .into_iter()
        .filter(|&c| net.nodes[c].parent().is_some_and(|p| p != net.id(root)))
        .max_by_key(|&c| net.live().filter(|&i| in_subtree(&net, i, c)).count())
        .expect("a coordinator two levels down");
    let cut_from = net.nodes[cut].parent().map(|p| net.idx(p));
    for i in 0..net.nodes.len() {
        net.group[i] = u8::from(in_subtree(&net, i, cut));
    }
    net.run_for(Duration::from_secs(20));
    let roots = [net.roots_in(0)[0], net.roots_in(1)[0]];
    for r in roots {
        for _ in 0..extra_grants {
            route(&mut net, r, RouteCommand::RequestSubnet);
        }
    }
    net.run_for(Duration::from_secs(5));
    let grants =
        |net: &Net, r: usize| -> Vec<Ipv4Net> { net.nodes[r].routing().pool().grants().map(|g| g.block).collect() };
    let before: Vec<Vec<Ipv4Net>> = [grants(&net, roots[0]), grants(&net, roots[1])].into();
    let machines = subnets(&net);
    let sides = net.group.clone();
    net.group.iter_mut().for_each(|g| *g = 0);
    let mark = net.events.len();
    net.run_for(Duration::from_secs(30));
    assert_eq!(net.roots().len(), 1);
    net.check_tree().unwrap();
    assert_eq!(overlaps(&net), vec![]);
    let joined = usize::from(net.roots()[0] == roots[0]);
    let joined_under = net.nodes[roots[joined]].parent().map(|p| net.idx(p));
    eprintln!("root {} joined under {joined_under:?} (root {}), cut from {cut_from:?}", roots[joined], net.roots()[0]);
    if joined != 1 || joined_under != cut_from {
        return None;
    }
    let survivors: Vec<Ipv4Net> =
        (0..net.nodes.len()).filter(|&i| usize::from(sides[i]) != joined).flat_map(|i| machines[i].clone()).collect();
    let clash = |b: &Ipv4Net| survivors.iter().any(|s| s.contains(b) || b.contains(s));
    let moving: Vec<Ipv4Net> = before[joined].iter().copied().filter(clash).collect();
    let movable: Vec<usize> = (0..net.nodes.len())
        .filter(|&i| usize::from(sides[i]) == joined)
        .filter(|&i| machines[i].iter().any(|m| moving.iter().any(|b| b.contains(m))))
        .collect();
    let renumbered: Vec<usize> = net
        .live()
        .filter(|&i| route_events(&net, i, mark).iter().any(|e| matches!(e, RouteEvent::SubnetChanged { .. })))
        .collect();
    let side = sides.iter().filter(|&&g| usize::from(g) == joined).count();
    eprintln!("joining side {side} machines, movable {movable:?}, renumbered {renumbered:?}");
    Some((movable, renumbered))
}

/// The first `cases` heals (trees of 30 nodes and more) whose island joined back where it was cut from.
fn heals_back_in_place(extra_grants: usize, cases: usize) -> Vec<(Vec<usize>, Vec<usize>)> {
    let found: Vec<_> = (30..50).filter_map(|n| heal_and_count_renumbered(n, extra_grants)).take(cases).collect();
    assert_eq!(found.len(), cases, "islands that joined back where they were cut from");
    found
}

#[test]
fn a_heal_renumbers_no_machine_when_the_islands_did_not_overlap() {
    for (movable, renumbered) in heals_back_in_place(0, 3) {
        assert_eq!(movable, Vec::<usize>::new(), "no new grants while apart, so nothing clashes");
        assert_eq!(renumbered, Vec::<usize>::new());
    }
}

#[test]
fn a_heal_renumbers_only_machines_whose_subnets_overlapped() {
    for (movable, renumbered) in heals_back_in_place(3, 3) {
        assert!(!renumbered.is_empty(), "the extra grants on both sides clash, so some machines move");
        assert!(renumbered.iter().all(|i| movable.contains(i)), "renumbered {renumbered:?}, movable {movable:?}");
    }
}

#[test]
fn the_root_frees_an_instance_ip_only_after_its_instance_stayed_away_for_the_grace_period() {
    let mut config = Config { max_children: 4, ..Config::default() };
    config.routes.instance_ip_grace = Duration::from_secs(20);
    let mut net = Net::new(20, config);
    net.build(MS(100));
    net.run_for(Duration::from_secs(8));
    let svc: ServiceName = "shop.acme.cart.prod".parse().unwrap();
    let RouteEvent::ServiceDeployed { instance_ips, .. } = deploy(&mut net, 3, &svc, Default::default(), 2) else {
        panic!("deployed")
    };
    let (ip0, ip1) = (instance_ips[0].1, instance_ips[1].1);
    let (rec0, rec1) = (record(&net, 5, &svc, 0, ip0), record(&net, 6, &svc, 1, ip1));
    route(&mut net, 5, RouteCommand::RegisterInstance(rec0));
    route(&mut net, 6, RouteCommand::RegisterInstance(rec1));
    net.run_for(Duration::from_secs(2));
    let held = |net: &Net, ip: Ipv4Addr| {
        let root = net.roots()[0];
        net.nodes[root].routing().allocator().expect("the root allocates").holder(ip).is_some()
    };
    // Instance 1 stops and comes back on another machine within the grace period; instance 0 stops for good.
    route(&mut net, 6, RouteCommand::UnregisterInstance { service: svc.clone(), number: 1, version: 2 });
    net.run_for(Duration::from_secs(10));
    let mut moved = record(&net, 9, &svc, 1, ip1);
    moved.version = 3;
    route(&mut net, 9, RouteCommand::RegisterInstance(moved));
    route(&mut net, 5, RouteCommand::UnregisterInstance { service: svc.clone(), number: 0, version: 2 });
    net.run_for(Duration::from_secs(15));
    assert!(held(&net, ip0), "instance 0 is still within its grace period");
    net.run_for(Duration::from_secs(10));
    assert!(!held(&net, ip0), "instance 0 stayed away longer than the grace period: its InstanceIP is free");
    assert!(held(&net, ip1), "instance 1 came back in time and keeps its InstanceIP");
}

/// How often machines stall: at most `at_once` at a time, a new one with probability `per_step` every 250 ms.
#[derive(Debug, Clone, Copy)]
struct Stalls {
    at_once: usize,
    per_step: f64,
}

/// Testbed conditions (CPU-starved machines on a loaded host): machines stall for a few seconds (their timers run
/// late and what they send or receive meanwhile is lost), so live parents are declared dead, children re-attach
/// to new parents, islands form and merge back, machines restart with their persisted subnets, links drop
/// messages for a while, and joins go on throughout. Returns every overlap of machine subnets that lasted longer
/// than `limit` (holders, blocks, from, until), and the overlaps left once everything settled.
fn starved_run(seed: u64, stalls: Stalls, limit: Duration) -> (Vec<String>, Vec<Overlap>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = 30;
    // Like `agent join` with well-known addresses: nodes 0..3 are everyone's bootstrap list, retried when a node
    // finds itself detached or the root of an island.
    let bootstrap: Vec<_> = (0..3).map(|i| common::info(i).id).collect();
    let mut net = Net::new(n, Config { max_children: 4, bootstrap, ..Config::default() });
    net.command(0, Command::Start);
    // Nodes 0..10 join first; the rest join while the faults go on.
    let mut joined = vec![false; n];
    joined[0] = true;
    let step = MS(250);
    let faults_until = Duration::from_secs(100);
    let mut frozen: Vec<(usize, Duration)> = Vec::new();
    let mut cuts: Vec<((usize, usize), Duration)> = Vec::new();
    let mut restarts = 0u64;
    // (i, j, a, b) -> first seen.
    let mut open: std::collections::BTreeMap<Overlap, Duration> = Default::default();
    let mut long = Vec::new();
    let report =
        |long: &mut Vec<String>, (i, j, a, b): (usize, usize, Ipv4Net, Ipv4Net), from: Duration, to: Duration| {
            if to - from > limit {
                long.push(format!(
                    "nodes {i} ({a}) and {j} ({b}) overlapped from {:.1}s to {:.1}s",
                    from.as_secs_f64(),
                    to.as_secs_f64()
                ));
            }
        };
    while net.now < faults_until + Duration::from_secs(60) {
        net.run_for(step);
        let now = net.now;
        // Stalled machines wake up; cut links come back.
        frozen.retain(|&(i, until)| {
            if until <= now {
                net.alive[i] = true;
                false
            } else {
                true
            }
        });
        let blocked: Vec<(usize, usize)> = cuts.iter().filter(|(_, until)| *until > now).map(|(l, _)| *l).collect();
        cuts.retain(|(_, until)| *until > now);
        net.blocked = blocked;
        let running: Vec<usize> = (0..n).filter(|&i| joined[i] && net.alive[i]).collect();
        if now < faults_until {
            // About one join a second until everyone is in.
            if rng.random_bool(0.25)
                && let Some(i) = (0..n).find(|&i| !joined[i])
            {
                let via = running[rng.random_range(0..running.len())];
                joined[i] = true;
                let via = net.id(via);
                net.command(i, Command::Join { via });
            }
            // A machine stalls for 2-8 s (up to three at once): its parent and children declare it dead.
            if frozen.len() < stalls.at_once && rng.random_bool(stalls.per_step) && running.len() > 3 {
                let i = running[rng.random_range(0..running.len())];
                net.alive[i] = false;
                frozen.push((i, now + MS(rng.random_range(2000..8000))));
            }
            // A link loses everything for 2-6 s.
            if rng.random_bool(0.04) && running.len() > 3 {
                let a = running[rng.random_range(0..running.len())];
                let b = running[rng.random_range(0..running.len())];
                if a != b {
                    cuts.push(((a, b), now + MS(rng.random_range(2000..6000))));
                }
            }
            // A machine restarts with the subnets it persisted.
            if rng.random_bool(0.02) && running.len() > 3 {
                let i = running[rng.random_range(0..running.len())];
                let via = running[rng.random_range(0..running.len())];
                if i != via {
                    let subnets = net.nodes[i].routing().machine_subnets().to_vec();
                    restarts += 1;
                    let config = net.nodes[i].config().clone();
                    net.nodes[i] = Node::new(common::info(i), config, 5000 + seed * 100 + restarts, now);
                    route(&mut net, i, RouteCommand::RestoreSubnets(subnets));
                    let via = net.id(via);
                    net.command(i, Command::Join { via });
                }
            }
        }
        // Machines that run (stalled ones included: they still use their subnets).
        let holders: Vec<(usize, Ipv4Net)> = (0..n)
            .filter(|&i| joined[i])
            .flat_map(|i| net.nodes[i].routing().machine_subnets().iter().map(move |b| (i, *b)))
            .collect();
        let mut current = std::collections::BTreeSet::new();
        for (x, (i, a)) in holders.iter().enumerate() {
            for (j, b) in &holders[x + 1..] {
                if a.contains(b) || b.contains(a) {
                    current.insert((*i, *j, *a, *b));
                    open.entry((*i, *j, *a, *b)).or_insert(now);
                }
            }
        }
        let ended: Vec<_> = open.keys().filter(|k| !current.contains(*k)).copied().collect();
        for k in ended {
            let from = open.remove(&k).unwrap();
            report(&mut long, k, from, now);
        }
    }
    for (k, from) in std::mem::take(&mut open) {
        report(&mut long, k, from, net.now);
    }
    let left = overlaps(&net);
    if let Err(e) = net.check_tree().and_then(|_| match net.roots().len() {
        1 => Ok(()),
        n => Err(format!("{n} roots")),
    }) {
        long.push(format!("the tree did not settle: {e}"));
    }
    (long, left)
}

/// The testbed's duplicate grants (issue 5): no two machines hold overlapping subnets for longer than one lease
/// plus one resync, and none at the end, whatever the stalls, re-attachments and restarts.
#[test]
fn stalls_reattachments_and_restarts_never_leave_two_machines_on_one_subnet() {
    let cfg = canopy_overlay::routing::RoutingConfig::default();
    let limit = cfg.lease + cfg.resync_interval;
    let mut failures = Vec::new();
    let mild = Stalls { at_once: 3, per_step: 0.06 };
    // Seed 9 of the harsh schedule once left a lone island root that had dropped every contact (all found inside
    // its own tree earlier): it never merged back, so the subnet it kept stayed granted twice.
    let harsh = Stalls { at_once: 5, per_step: 0.12 };
    let runs = (0..12).map(|seed| (seed, mild)).chain([3, 9, 17].map(|seed| (seed, harsh)));
    for (seed, stalls) in runs {
        let (long, left) = starved_run(seed, stalls, limit);
        if !long.is_empty() || !left.is_empty() {
            failures.push(format!("seed {seed} {stalls:?}: {long:#?}, left at the end: {left:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
