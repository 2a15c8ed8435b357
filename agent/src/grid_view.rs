//! `agent placement` and `agent grid`: the capacity grids and the placement search of the overlay (VineIO's
//! migration/replication target search), as local API endpoints and CLI commands.
//!
//! - `agent placement --near LAT,LON [--cpu X] [--mem Y] [--want N] [--json]`: machines that can host the demand,
//!   nearest first, with their free capacity;
//! - `agent grid [--ascii] [--png FILE] [--json] [--resource R] [--held]`: this node's subtree grid (or every grid
//!   it holds) as a heatmap over its region.

use crate::api::client::Client;
use crate::api::{ApiError, ApiResult};
use crate::cli::GlobalArgs;
use crate::control::block_on;
use crate::runtime::{Handle, node_name};
use anyhow::{Context, anyhow};
use axum::Json;
use axum::extract::State;
use canopy_overlay::grids::{MAX_PLACEMENT_WANT, PlacementCandidate};
use canopy_overlay::{Command, Node};
use canopy_policies::{Capacity, CapacityGrid, Position, Resource};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;

/// How long the API waits for a placement result; the overlay answers after its own collection timeout (1 s by
/// default), so this only fires when the swarm task is stuck.
const PLACEMENT_WAIT: Duration = Duration::from_secs(15);

// ----- what the swarm task answers ---------------------------------------------------------------------------

/// The grids a node holds: its subtree first, then its children's, its siblings' and the outside grid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridsReport {
    pub position: Position,
    pub own_free: Capacity,
    pub subtree: CapacityGrid,
    pub held: Vec<CapacityGrid>,
}

impl GridsReport {
    pub fn of(node: &mut Node, position: Position) -> Self {
        let grids = node.grids();
        GridsReport {
            position,
            own_free: grids.own_free(),
            subtree: grids.subtree().clone(),
            held: grids.held().to_vec(),
        }
    }
}

/// A placement query as the API receives it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PlacementQuery {
    pub near: Position,
    pub demand: Capacity,
    pub want: u8,
}

impl PlacementQuery {
    pub fn validate(&self) -> Result<(), String> {
        if self.near.normalized().is_none() || self.near.lat.abs() > 90.0 || self.near.lon.abs() > 180.0 {
            return Err(format!("near {},{} is not a position", self.near.lat, self.near.lon));
        }
        if !self.demand.to_array().iter().all(|v| v.is_finite() && *v >= 0.0) {
            return Err("the demand must be finite numbers >= 0".into());
        }
        if !(1..=MAX_PLACEMENT_WANT).contains(&self.want) {
            return Err(format!("want must be 1..={MAX_PLACEMENT_WANT}"));
        }
        Ok(())
    }
}

type Waiters = HashMap<u64, oneshot::Sender<Vec<PlacementCandidate>>>;

/// Open placement queries by tag. A process-wide table because the swarm task's state belongs to the driver; the
/// tags are unique in the process, so several agents in one process (tests) do not mix up their answers.
static WAITERS: Mutex<Option<Waiters>> = Mutex::new(None);
static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

fn waiters<T>(f: impl FnOnce(&mut Waiters) -> T) -> T {
    let mut guard = WAITERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

/// A placement query on its way to the swarm task, with the tag its result will carry.
#[derive(Debug)]
pub struct PlacementRequest {
    tag: u64,
    query: PlacementQuery,
}

/// Where a placement result arrives.
pub struct PlacementWait {
    tag: u64,
    answer: oneshot::Receiver<Vec<PlacementCandidate>>,
}

impl PlacementRequest {
    pub fn new(query: PlacementQuery) -> (Self, PlacementWait) {
        let tag = NEXT_TAG.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        waiters(|w| w.insert(tag, reply));
        (PlacementRequest { tag, query }, PlacementWait { tag, answer })
    }

    pub fn command(&self) -> Command {
        let PlacementQuery { near, demand, want } = self.query;
        Command::Placement { tag: self.tag, near, demand, want }
    }
}

impl PlacementWait {
    pub async fn wait(self) -> anyhow::Result<Vec<PlacementCandidate>> {
        let result = tokio::time::timeout(PLACEMENT_WAIT, self.answer).await;
        waiters(|w| w.remove(&self.tag));
        match result {
            Ok(Ok(candidates)) => Ok(candidates),
            Ok(Err(_)) => Err(anyhow!("the agent is shutting down")),
            Err(_) => Err(anyhow!("no placement result within {PLACEMENT_WAIT:?}")),
        }
    }
}

/// The swarm task got the overlay's result for `tag`.
pub fn placement_done(tag: u64, candidates: Vec<PlacementCandidate>) {
    if let Some(reply) = waiters(|w| w.remove(&tag)) {
        let _ = reply.send(candidates);
    }
}

// ----- API -------------------------------------------------------------------------------------------------------

pub async fn grids_endpoint(State(handle): State<Handle>) -> ApiResult<GridsReport> {
    handle.grids().await.map(Json).map_err(|e| ApiError::unavailable(e.to_string()))
}

pub async fn placement_endpoint(
    State(handle): State<Handle>,
    Json(query): Json<PlacementQuery>,
) -> ApiResult<Vec<PlacementCandidate>> {
    query.validate().map_err(ApiError::bad_request)?;
    handle.placement(query).await.map(Json).map_err(|e| ApiError::unavailable(e.to_string()))
}

// ----- CLI -------------------------------------------------------------------------------------------------------

#[derive(Debug, clap::Args)]
pub struct PlacementArgs {
    /// Where the machines should be, latitude,longitude in degrees.
    #[arg(long, value_name = "LAT,LON", value_parser = crate::daemon::parse_position)]
    pub near: Position,
    /// Free CPU cores needed.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub cpu: f64,
    /// Free memory needed, MiB.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub mem: f64,
    /// Free bandwidth needed, Mbit/s.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub bandwidth: f64,
    /// How many machines to find.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_PLACEMENT_WANT)))]
    pub want: u8,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a number >= 0")),
    }
}

pub fn placement(global: &GlobalArgs, args: &PlacementArgs) -> anyhow::Result<()> {
    let query =
        PlacementQuery { near: args.near, demand: Capacity::new(args.cpu, args.mem, args.bandwidth), want: args.want };
    let candidates: Vec<PlacementCandidate> = block_on(Client::new(&global.data_dir).post("/placement", &query))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&candidates)?);
    } else {
        print!("{}", render_candidates(&query, &candidates));
    }
    Ok(())
}

pub fn render_candidates(query: &PlacementQuery, candidates: &[PlacementCandidate]) -> String {
    let mut out = String::new();
    let d = query.demand;
    let _ = writeln!(
        out,
        "machines near {:.4},{:.4} with at least {} cores, {} MiB, {} Mbit/s free: {} found",
        query.near.lat,
        query.near.lon,
        d.cpu,
        d.mem_mb,
        d.bandwidth_mbps,
        candidates.len()
    );
    if candidates.is_empty() {
        return out;
    }
    let _ = writeln!(out, "{:>10}  {:>9}  {:>8}  {:>10}  {:>8}  machine", "km", "position", "cpu", "mem MiB", "Mbit/s");
    let mut sorted: Vec<&PlacementCandidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| a.distance_km.total_cmp(&b.distance_km));
    for c in sorted {
        let _ = writeln!(
            out,
            "{:>10.1}  {:>4.1},{:<4.1}  {:>8.2}  {:>10.0}  {:>8.0}  {}",
            c.distance_km,
            c.position.lat,
            c.position.lon,
            c.free.cpu,
            c.free.mem_mb,
            c.free.bandwidth_mbps,
            node_name(&c.node)
        );
    }
    out
}

#[derive(Debug, clap::Args)]
pub struct GridArgs {
    /// Print the heatmap as text (the default when neither --png nor --json is given).
    #[arg(long)]
    pub ascii: bool,
    /// Write the heatmap as a PNG image.
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
    /// Print the grids as JSON.
    #[arg(long)]
    pub json: bool,
    /// Which resource to shade: cpu, mem or bandwidth.
    #[arg(long, default_value = "cpu")]
    pub resource: Resource,
    /// Every grid the node holds (children's, siblings', the outside), not just its subtree.
    #[arg(long)]
    pub held: bool,
}

pub fn grid(global: &GlobalArgs, args: &GridArgs) -> anyhow::Result<()> {
    let report: GridsReport = block_on(Client::new(&global.data_dir).get("/grids"))?;
    let grids: Vec<&CapacityGrid> =
        if args.held { report.held.iter().collect() } else { std::iter::once(&report.subtree).collect() };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if let Some(path) = &args.png {
        let first = grids.first().ok_or_else(|| anyhow!("the node holds no grid"))?;
        write_png(first, args.resource, path)?;
        eprintln!("wrote {} ({} of {} grids)", path.display(), 1, grids.len());
    }
    if args.ascii || (args.png.is_none() && !args.json) {
        let f = report.own_free;
        println!(
            "this machine at {:.4},{:.4}: {:.2} cores, {:.0} MiB, {:.0} Mbit/s free",
            report.position.lat, report.position.lon, f.cpu, f.mem_mb, f.bandwidth_mbps
        );
        for grid in grids {
            print!("{}", grid.to_ascii(args.resource));
        }
    }
    Ok(())
}

/// Pixels per cell edge in the PNG.
const CELL_PX: u32 = 24;

/// The grid as an RGB heatmap, north up: empty cells grey, cells from dark red (no free `resource`) to bright
/// green (the most any cell has).
pub fn heatmap_rgb(grid: &CapacityGrid, resource: Resource) -> (u32, u32, Vec<u8>) {
    let size = u32::from(grid.size());
    let cells: Vec<_> = grid.cells().collect();
    let max = cells.iter().filter(|c| c.region.nodes > 0).map(|c| c.region.free.get(resource)).fold(0.0f64, f64::max);
    let side = size * CELL_PX;
    let mut pixels = vec![0u8; (side * side * 3) as usize];
    for cell in &cells {
        let color = if cell.region.nodes == 0 {
            [200, 200, 200]
        } else {
            let share = if max > 0.0 { (cell.region.free.get(resource) / max).clamp(0.0, 1.0) } else { 0.0 };
            [(200.0 * (1.0 - share)) as u8 + 40, (215.0 * share) as u8 + 40, 40]
        };
        // Row 0 is the southern edge; images start at the top.
        let top = (size - 1 - u32::from(cell.row)) * CELL_PX;
        let left = u32::from(cell.col) * CELL_PX;
        for y in top..top + CELL_PX {
            for x in left..left + CELL_PX {
                // A one-pixel grid line between cells.
                let line = x % CELL_PX == 0 || y % CELL_PX == 0;
                let at = ((y * side + x) * 3) as usize;
                pixels[at..at + 3].copy_from_slice(if line { &[90, 90, 90] } else { &color });
            }
        }
    }
    (side, side, pixels)
}

fn write_png(grid: &CapacityGrid, resource: Resource, path: &Path) -> anyhow::Result<()> {
    let (width, height, pixels) = heatmap_rgb(grid, resource);
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("writing the PNG header")?;
    writer.write_image_data(&pixels).context("writing the PNG image")?;
    writer.finish().context("finishing the PNG")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_policies::GridInput;

    fn grid() -> CapacityGrid {
        CapacityGrid::merge_sized(
            4,
            &[
                GridInput::Node { position: Position::new(48.1, 11.5), free: Capacity::new(4.0, 4096.0, 0.0) },
                GridInput::Node { position: Position::new(52.5, 13.4), free: Capacity::ZERO },
            ],
        )
    }

    #[test]
    fn heatmap_shades_full_and_free_cells_apart() {
        let g = grid();
        let (w, h, pixels) = heatmap_rgb(&g, Resource::Cpu);
        assert_eq!((w, h), (4 * CELL_PX, 4 * CELL_PX));
        assert_eq!(pixels.len(), (w * h * 3) as usize);
        let at = |p: Position| {
            let cell = g.cells().find(|c| c.bounds.contains(p)).expect("inside the grid");
            let (x, y) =
                (u32::from(cell.col) * CELL_PX + CELL_PX / 2, (3 - u32::from(cell.row)) * CELL_PX + CELL_PX / 2);
            let i = ((y * w + x) * 3) as usize;
            [pixels[i], pixels[i + 1], pixels[i + 2]]
        };
        let free = at(Position::new(48.1, 11.5));
        let full = at(Position::new(52.5, 13.4));
        assert!(free[1] > free[0], "the roomy cell is green: {free:?}");
        assert!(full[0] > full[1], "the saturated cell is red: {full:?}");
    }

    #[test]
    fn png_round_trips_through_the_decoder() {
        let path = std::env::temp_dir().join(format!("canopy-grid-test-{}.png", std::process::id()));
        write_png(&grid(), Resource::Mem, &path).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (4 * CELL_PX, 4 * CELL_PX));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn placement_queries_are_checked_and_answers_reach_their_waiter() {
        let ok = PlacementQuery { near: Position::new(48.0, 11.0), demand: Capacity::new(1.0, 0.0, 0.0), want: 3 };
        assert!(ok.validate().is_ok());
        assert!(PlacementQuery { want: 0, ..ok }.validate().is_err());
        assert!(PlacementQuery { near: Position::new(f64::NAN, 0.0), ..ok }.validate().is_err());
        assert!(PlacementQuery { near: Position::new(91.0, 0.0), ..ok }.validate().is_err());
        assert!(PlacementQuery { demand: Capacity::new(-1.0, 0.0, 0.0), ..ok }.validate().is_err());

        let (request, wait) = PlacementRequest::new(ok);
        let Command::Placement { tag, want, .. } = request.command() else { panic!("not a placement command") };
        assert_eq!(want, 3);
        placement_done(tag + 1_000_000, Vec::new()); // someone else's tag: ignored
        placement_done(tag, Vec::new());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(wait.wait()).unwrap(), Vec::new());
        assert!(waiters(|w| !w.contains_key(&tag)), "the waiter is gone");
    }
}
