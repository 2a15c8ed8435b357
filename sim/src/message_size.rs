//! The wire bytes of every message a run carries: exact CBOR lengths ([`crate::wire_size`]), with the parts that
//! messages share behind `Arc`s (views, group grids, subtree grids) sized once per value rather than once per
//! message. A subtree grid, for one, travels in its coordinator's report and then in its parent's group grids to
//! every sibling; walking its few hundred numbers each time made sizing a fifth of a 10,000-node run's instructions
//! (cachegrind).

use crate::wire_size::{self, ArcLengths, Presized};
use canopy_overlay::grids::{GroupGrids, SubtreeGrid};
use canopy_overlay::message::{Heartbeat, Report, View};
use canopy_overlay::routing::RoutesMessage;
use canopy_overlay::{Envelope, Message};
use canopy_policies::CapacityGrid;
use std::sync::Arc;

/// The fields that hold capacity grids, in the message body (depth 2: inside the envelope).
const GRID_FIELDS: [&str; 2] = ["grid", "grids"];

/// 16,384 slots per kind of shared part. Two values sharing a slot only cost a second walk of the one evicted.
const SLOT_BITS: u32 = 14;

/// The lengths of shared parts sized so far.
pub struct MessageSizes {
    views: ArcLengths<View>,
    groups: ArcLengths<GroupGrids>,
    grids: ArcLengths<CapacityGrid>,
}

impl Default for MessageSizes {
    fn default() -> Self {
        Self {
            views: ArcLengths::new(SLOT_BITS),
            groups: ArcLengths::new(SLOT_BITS),
            grids: ArcLengths::new(SLOT_BITS),
        }
    }
}

/// What one node sent last of the kinds that repeat, with their lengths. A leaf's reports and a coordinator's
/// heartbeats repeat round after round but for the envelope's message id and a few counters (the versions and the
/// term they carry), and so do the routes messages of a round (a coordinator's address blocks to each child, a
/// child's resync with its parent); a heartbeat carrying a view or grids goes alike to every child that needs them.
/// A repeat is sized from the one before, corrected for the lengths of the id and of the counters that changed:
/// nothing else in the envelope changes (the sender's id and the protocol version are the node's own). Walking them
/// was most of the sizing of a 10,000-node run; reports whose versions had moved were still a quarter of the
/// messages walked in full.
#[derive(Default)]
pub struct LastSent {
    report: Option<Sized<Report>>,
    heartbeat: Option<Sized<Heartbeat>>,
    full_heartbeat: Option<Sized<Heartbeat>>,
    /// A coordinator's address blocks to its children, apart from its other routes messages (its resync with its
    /// parent, among them), which would otherwise take turns in one slot.
    group_blocks: Option<Sized<RoutesMessage>>,
    routes: Option<Sized<RoutesMessage>>,
}

struct Sized<T> {
    body: T,
    /// The whole envelope's encoded length, the part of it that is capacity grids, and its message id's length.
    len: u32,
    grid_len: u32,
    id_len: u8,
}

/// The length of `envelope` and of its grids (see [`MessageSizes::sized`]), whose body is `body`: from the last one
/// `last` holds when `alike` finds the bodies alike, else by `size`. `alike(last, body)` is the difference in
/// encoded length between the two bodies when they differ at most in integers outside the grids, `None` otherwise.
fn repeated<T: Clone>(
    last: &mut Option<Sized<T>>,
    body: &T,
    envelope: &Envelope,
    alike: impl Fn(&T, &T) -> Option<isize>,
    size: impl FnOnce() -> (usize, usize),
) -> (usize, usize) {
    let id_len = wire_size::header_len(envelope.id);
    if let Some(sized) = last
        && let Some(difference) = alike(&sized.body, body)
    {
        // The body kept stays the one `len` was measured for, so later differences are taken from it too.
        let len = sized.len as isize - isize::from(sized.id_len) + id_len as isize + difference;
        return (len as usize, sized.grid_len as usize);
    }
    let (len, grid_len) = size();
    *last = Some(Sized { body: body.clone(), len: len as u32, grid_len: grid_len as u32, id_len: id_len as u8 });
    (len, grid_len)
}

/// How much longer `b` encodes than `a`, two unsigned integers.
fn integer_growth(a: u64, b: u64) -> isize {
    wire_size::header_len(b) as isize - wire_size::header_len(a) as isize
}

/// Heartbeats alike but for their term and view version, with the same shared parts: the same allocations, not only
/// equal values (comparing views would cost what sizing them does).
fn heartbeat_growth(a: &Heartbeat, b: &Heartbeat) -> Option<isize> {
    let Heartbeat { term, view_version, view, address_block, grids, between_rounds } = a;
    (same_allocation(view, &b.view)
        && *address_block == b.address_block
        && same_allocation(grids, &b.grids)
        && *between_rounds == b.between_rounds)
        .then(|| integer_growth(*term, b.term) + integer_growth(*view_version, b.view_version))
}

/// Reports without grids, alike but for the versions they acknowledge.
fn report_growth(a: &Report, b: &Report) -> Option<isize> {
    let Report { view_version, rank, summary, grid, group_version } = a;
    (grid.is_none() && b.grid.is_none() && *rank == b.rank && *summary == b.summary)
        .then(|| integer_growth(*view_version, b.view_version) + integer_growth(*group_version, b.group_version))
}

fn equal<T: PartialEq>(a: &T, b: &T) -> Option<isize> {
    (a == b).then_some(0)
}

fn same_allocation<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

impl MessageSizes {
    /// The exact encoded length of a message, and how many of those bytes are the capacity grids it carries.
    /// `last` holds what the sender sent before (see [`LastSent`]).
    pub fn sized(&mut self, envelope: &Envelope, last: &mut LastSent) -> (usize, usize) {
        let whole = || (wire_size::cbor_len(envelope), 0);
        let (len, grids) = match &envelope.body {
            Message::Heartbeat(heartbeat) if heartbeat.view.is_none() && heartbeat.grids.is_none() => {
                repeated(&mut last.heartbeat, heartbeat, envelope, heartbeat_growth, whole)
            }
            Message::Heartbeat(heartbeat) => {
                repeated(&mut last.full_heartbeat, heartbeat, envelope, heartbeat_growth, || {
                    // In field order: the view comes before the grids.
                    let view = heartbeat
                        .view
                        .as_ref()
                        .map(|view| Presized::Struct("View", self.views.get_or_size(view, wire_size::cbor_len)));
                    let grids = &mut self.grids;
                    let group = heartbeat.grids.as_ref().map(|group| {
                        Presized::Struct("GroupGrids", self.groups.get_or_size(group, |g| group_len(g, grids)))
                    });
                    let parts: Vec<Presized> = view.into_iter().chain(group).collect();
                    wire_size::cbor_len_presized(envelope, 2, &GRID_FIELDS, &parts)
                })
            }
            Message::Report(report) => match report.grid.as_deref() {
                Some(SubtreeGrid::Grid(grid)) => {
                    let grid = Presized::Struct("CapacityGrid", self.grids.get_or_size(grid, grid_len));
                    wire_size::cbor_len_presized(envelope, 2, &GRID_FIELDS, &[grid])
                }
                Some(SubtreeGrid::Node { .. }) => wire_size::cbor_len_with_fields(envelope, 2, &GRID_FIELDS),
                None => repeated(&mut last.report, report, envelope, report_growth, whole),
            },
            Message::Routes(routes) => {
                let slot = match **routes {
                    RoutesMessage::GroupBlocks(_) => &mut last.group_blocks,
                    _ => &mut last.routes,
                };
                repeated(slot, &**routes, envelope, equal, whole)
            }
            _ => whole(),
        };
        debug_assert_eq!(len, wire_size::encoded_len(envelope), "wire_size disagrees with ciborium");
        debug_assert_eq!(
            grids,
            match &envelope.body {
                Message::Report(r) => r.grid.as_ref().map_or(0, wire_size::encoded_len),
                Message::Heartbeat(h) => h.grids.as_ref().map_or(0, wire_size::encoded_len),
                _ => 0,
            },
            "grid bytes"
        );
        (len, grids)
    }
}

/// A group's length, its members' grids and the outside grid (in that order on the wire) sized once each.
fn group_len(group: &GroupGrids, grids: &mut ArcLengths<CapacityGrid>) -> usize {
    let members = group.members.iter().filter_map(|(_, subtree)| match subtree {
        SubtreeGrid::Grid(grid) => Some(grid),
        SubtreeGrid::Node { .. } => None,
    });
    let parts: Vec<Presized> = members
        .chain(&group.outside)
        .map(|grid| Presized::Struct("CapacityGrid", grids.get_or_size(grid, grid_len)))
        .collect();
    wire_size::cbor_len_presized(group, 0, &[], &parts).0
}

/// A grid's length: its few scalar fields walked, its number arrays (hundreds of numbers) sized in bulk.
fn grid_len(grid: &CapacityGrid) -> usize {
    let (nodes, [free, largest, centroid]) = grid.number_arrays();
    let sized = [free, largest, centroid].map(wire_size::f32_seq_len);
    let [Some(free), Some(largest), Some(centroid)] = sized else {
        return wire_size::cbor_len(grid); // a NaN: left to the real encoder
    };
    let arrays = [wire_size::u32_seq_len(nodes), free, largest, centroid].map(Presized::Seq);
    wire_size::cbor_len_presized(grid, 0, &[], &arrays).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_overlay::{NodeId, NodeInfo, PROTOCOL_VERSION, Rank, Summary};
    use canopy_policies::{Capacity, GridInput, Position};

    #[test]
    fn a_repeated_report_or_heartbeat_has_its_encoded_length() {
        let rank = |capacity| Rank { reachable: true, capacity, uptime_class: 2, id: NodeId::from_u64(5) };
        let report = |view_version, group_version, capacity| {
            Message::Report(Report {
                view_version,
                rank: rank(capacity),
                summary: Summary::leaf(Position::new(48.1, 11.5)),
                grid: None,
                group_version,
            })
        };
        let heartbeat = |term, view_version, address_block: Option<&str>| {
            Message::Heartbeat(Heartbeat {
                term,
                view_version,
                view: None,
                address_block: address_block.map(|b| b.parse().unwrap()),
                grids: None,
                between_rounds: false,
            })
        };
        let (mut sizes, mut last) = (MessageSizes::default(), LastSent::default());
        // Message ids, versions and terms across every length of an integer's header (a term of 24 takes a byte
        // more than one of 23), each moving on its own, and now and then a change that is not a counter's.
        let counters = [0, 23, 24, 255, 256, 65_535, 65_536, u64::from(u32::MAX), 1 << 32, u64::MAX];
        let at = |n: usize| counters[n % counters.len()];
        for n in 0..40 {
            let capacity = if n % 7 == 6 { 1_000 } else { 17 };
            let block = (n % 9 == 8).then_some("10.1.0.0/20");
            let bodies = [report(at(n / 2), at(n / 3), capacity), heartbeat(at(n / 3), at(n / 4), block)];
            for body in bodies {
                let envelope = Envelope { version: PROTOCOL_VERSION, id: at(n), from: NodeId::from_u64(5), body };
                assert_eq!(sizes.sized(&envelope, &mut last), (wire_size::encoded_len(&envelope), 0), "{envelope:?}");
            }
        }
    }

    /// Heartbeats with a view and routes messages repeat too: the one before is reused only for the same view (the
    /// same allocation) and an equal routes message.
    #[test]
    fn a_repeated_view_or_routes_message_has_its_encoded_length() {
        let info = |n: u64, lat: f64| NodeInfo {
            id: NodeId::from_u64(n),
            addrs: vec![format!("sim:{n}")],
            position: Position::new(lat, 11.5),
            capacity: Capacity { cpu: 4.0, mem_mb: 8192.0, bandwidth_mbps: 100.0 },
            reachable: true,
        };
        let view = |lat: f64| {
            Arc::new(View {
                version: 4,
                ancestors: Arc::from([info(1, lat)]),
                members: Arc::from([]),
                uncles: Arc::from([]),
            })
        };
        // Two views alike but for a position's length on the wire (48.0 fits an f16, 48.1 takes an f64).
        let (short, long) = (view(48.0), view(48.1));
        let heartbeat = |view: &Arc<View>| {
            Message::Heartbeat(Heartbeat {
                term: 3,
                view_version: 4,
                view: Some(Arc::clone(view)),
                address_block: None,
                grids: None,
                between_rounds: false,
            })
        };
        let blocks = |n: u8| {
            Message::Routes(Box::new(RoutesMessage::GroupBlocks(vec![format!("10.{n}.0.0/16").parse().unwrap()])))
        };
        let (mut sizes, mut last) = (MessageSizes::default(), LastSent::default());
        let bodies = [heartbeat(&short), heartbeat(&short), heartbeat(&long), blocks(1), blocks(1), blocks(200)];
        for (n, body) in bodies.into_iter().enumerate() {
            let envelope = Envelope { version: PROTOCOL_VERSION, id: 20 + n as u64, from: NodeId::from_u64(5), body };
            assert_eq!(sizes.sized(&envelope, &mut last), (wire_size::encoded_len(&envelope), 0), "{envelope:?}");
        }
    }

    #[test]
    fn a_grid_sized_in_bulk_has_its_encoded_length() {
        let node = |lat: f64, lon: f64, cpu: f64| GridInput::Node {
            position: Position::new(lat, lon),
            free: Capacity { cpu, mem_mb: 1000.0 + cpu * 333.3, bandwidth_mbps: 100.0 },
        };
        let city = CapacityGrid::merge(&[node(48.1, 11.5, 2.0), node(48.2, 11.6, 0.5), node(48.15, 11.55, 1e-6)]);
        let region = CapacityGrid::merge(&[GridInput::Grid(&city), node(52.5, 13.4, 70_000.0), node(40.0, -3.7, 3.25)]);
        for grid in [CapacityGrid::empty(8), city, region, CapacityGrid::empty(64)] {
            assert_eq!(grid_len(&grid), wire_size::encoded_len(&grid));
        }
    }
}
