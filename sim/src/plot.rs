//! PNG plots of a run: CDFs of join, failure detection, re-attach and failover times, the final tree over the map,
//! and the root's capacity grid as a heatmap.

use crate::engine::{Outcome, TreeNode};
use canopy_overlay::Role;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Writes `cdf.png`, `tree.png` and (when the root holds one) `grid.png` into `dir` (created if missing) and
/// returns their paths.
pub fn write_plots(outcome: &Outcome, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create plot directory {}: {e}", dir.display()))?;
    let cdf = dir.join("cdf.png");
    let tree = dir.join("tree.png");
    plot_cdfs(
        &cdf,
        &[
            ("join", &outcome.join_samples_ms, BLUE),
            ("detection", &outcome.detection_samples_ms, MAGENTA),
            ("re-attach", &outcome.reattach_samples_ms, RED),
            ("root failover", &outcome.failover_samples_ms, GREEN),
        ],
    )
    .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", cdf.display()))?;
    plot_tree(&tree, &outcome.final_tree).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", tree.display()))?;
    let mut written = vec![cdf, tree];
    if let Some(grid) = &outcome.root_grid {
        let path = dir.join("grid.png");
        plot_grid(&path, grid).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The root's capacity grid as a heatmap of free CPU per cell (white: no nodes), with node counts.
pub fn plot_grid(path: &Path, grid: &canopy_policies::CapacityGrid) -> DrawResult {
    let root = BitMapBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let b = grid.bounds();
    let most = grid.cells().map(|c| c.region.free.cpu).fold(0.0f64, f64::max).max(1e-9);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Root capacity grid: free CPU per cell ({} nodes, max {most:.0} cores)", grid.node_count()),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(b.west..b.east, b.south..b.north)?;
    chart.configure_mesh().x_desc("longitude").y_desc("latitude").draw()?;
    chart.draw_series(grid.cells().filter(|c| c.region.nodes > 0).map(|c| {
        // Light yellow (little free) to dark green (most free).
        let t = (c.region.free.cpu / most).clamp(0.0, 1.0);
        let color = RGBColor((250.0 - 230.0 * t) as u8, (240.0 - 110.0 * t) as u8, (150.0 - 110.0 * t) as u8);
        let cb = c.bounds;
        Rectangle::new([(cb.west, cb.south), (cb.east, cb.north)], color.filled())
    }))?;
    chart.draw_series(grid.cells().filter(|c| c.region.nodes > 0).map(|c| {
        let cb = c.bounds;
        Text::new(c.region.nodes.to_string(), (cb.west, cb.north), ("sans-serif", 11).into_font())
    }))?;
    root.present()?;
    Ok(())
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn plot_cdfs(path: &Path, series: &[(&str, &Vec<f64>, RGBColor)]) -> DrawResult {
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = series.iter().flat_map(|(_, s, _)| s.iter().copied()).fold(1.0f64, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption("CDF of join, failure detection, re-attach and root failover times", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    chart.configure_mesh().x_desc("milliseconds").y_desc("fraction").draw()?;
    for (name, samples, color) in series {
        let mut sorted = (*samples).clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let points: Vec<(f64, f64)> = sorted.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)).collect();
        let color = *color;
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!("{name} (n={})", sorted.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

fn plot_tree(path: &Path, nodes: &[TreeNode]) -> DrawResult {
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (mut lon_min, mut lon_max, mut lat_min, mut lat_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for n in nodes {
        lon_min = lon_min.min(n.position.lon);
        lon_max = lon_max.max(n.position.lon);
        lat_min = lat_min.min(n.position.lat);
        lat_max = lat_max.max(n.position.lat);
    }
    if nodes.is_empty() {
        (lon_min, lon_max, lat_min, lat_max) = (-1.0, 1.0, -1.0, 1.0);
    }
    let pad_lon = ((lon_max - lon_min) * 0.03).max(0.01);
    let pad_lat = ((lat_max - lat_min) * 0.03).max(0.01);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Final tree: {} live nodes (roots: orange triangles, coordinators: blue, unattached: red)",
                nodes.len()
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lon_min - pad_lon)..(lon_max + pad_lon), (lat_min - pad_lat)..(lat_max + pad_lat))?;
    chart.configure_mesh().x_desc("longitude").y_desc("latitude").draw()?;
    let by_index: std::collections::BTreeMap<usize, &TreeNode> = nodes.iter().map(|n| (n.index, n)).collect();
    let edge_style = RGBColor(120, 120, 120).mix(0.5);
    chart.draw_series(nodes.iter().filter_map(|n| {
        let parent = by_index.get(&n.parent?)?;
        Some(PathElement::new(
            vec![(n.position.lon, n.position.lat), (parent.position.lon, parent.position.lat)],
            edge_style,
        ))
    }))?;
    chart.draw_series(nodes.iter().filter(|n| n.role != Role::Root).map(|n| {
        let (color, size) = match (n.attached, n.role) {
            (false, _) => (RED, 3),
            (true, Role::Coordinator) => (BLUE, 3),
            _ => (RGBColor(40, 40, 40), 2),
        };
        Circle::new((n.position.lon, n.position.lat), size, color.filled())
    }))?;
    chart.draw_series(
        nodes
            .iter()
            .filter(|n| n.role == Role::Root)
            .map(|n| TriangleMarker::new((n.position.lon, n.position.lat), 10, RGBColor(230, 140, 0).filled())),
    )?;
    root.present()?;
    Ok(())
}
