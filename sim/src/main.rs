//! `canopy-sim`: run a scenario (`run`) or the scaling benchmark (`bench`).

use anyhow::Context;
use canopy_sim::trace::Tracer;
use canopy_sim::{Progress, Scenario, bench, plot, run_traced};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod allocator;

// A run allocates and frees small messages and state by the million; mimalloc keeps them closer together than the
// system allocator (bench_10k about 10% faster, same report).
#[global_allocator]
static ALLOCATOR: allocator::WordAlignedMimalloc = allocator::WordAlignedMimalloc;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 option enums; the -sys crate names no constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory instead of handing it back to the kernel 10 ms after it was freed (mimalloc's default). The
/// heap churns all run long, and memory handed back came back as fresh transparent huge pages that the kernel zeroes
/// 2 MiB at a time: bench_10k took 2,600-3,800 page faults and often 0.6 s of system time, 10% of the run; without
/// purging it takes about 330 faults and usually about 0.1 s, for 3% more resident memory. `MIMALLOC_PURGE_DELAY` in
/// the environment still wins.
fn keep_freed_memory() {
    // mimalloc reads its options when the process loads, so setting a default now would not take: set the option,
    // unless the user chose a value.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists (the setter is not thread-safe).
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Runs of this many nodes and more keep transparent huge pages; smaller ones put the heap on 4 KiB pages.
const HUGE_PAGES_FROM_NODES: usize = 75_000;

/// Chooses the page size of the heap for a run of `nodes` nodes (mimalloc asks for transparent huge pages for its
/// arenas). On a VM whose balloon reports free memory to the host (this machine's does: virtio-balloon free page
/// reporting), a fresh 2 MiB page is fresh host memory too, while 4 KiB pages mostly come from memory the guest
/// kept. Measured here, each run after 10 s of quiet: bench_10k 3.08-3.35 s on 4 KiB pages against 3.32-3.69 s
/// (system time 0.1 s against 0.8 s, user time 7% up), a 20,000-node join storm 1.7 s against 2.8 s, 50,000 nodes
/// 11.6 s against 13.5 s; from 100,000 nodes (2 GB) the host's cost is the same either way and huge pages' fewer TLB
/// misses win, 27.4 s against 31.0 s. `MIMALLOC_ALLOW_THP` in the environment (0 or 1) decides instead.
fn choose_page_size(nodes: usize) {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // Checked at every page fault, so the flag also covers the arenas mimalloc reserved already.
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and changes only the process's huge page flag.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, libc::c_ulong::from(nodes < HUGE_PAGES_FROM_NODES), 0, 0, 0);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nodes;
}

#[derive(Parser)]
#[command(name = "canopy-sim", version, about = "Deterministic discrete-event simulator for the Canopy overlay")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario and print a summary (and optionally a JSON report and plots).
    Run {
        /// Scenario file (TOML).
        scenario: PathBuf,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override the scenario's node count.
        #[arg(long)]
        nodes: Option<usize>,
        /// Write the JSON report here (`-` for stdout).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write PNG plots (CDFs, final tree) into this directory.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Exit with status 1 unless the final tree converged (one root per component, all attached, no cycles).
        #[arg(long)]
        check: bool,
        /// Print a line to stderr every simulated 5 s: simulated and wall time, speed, live nodes, messages.
        #[arg(long)]
        progress: bool,
        /// Print to stderr what these nodes (indices, comma-separated) receive, send and report, as the run goes.
        #[arg(long, value_delimiter = ',', value_name = "NODES")]
        trace: Vec<u32>,
    },
    /// Run the 1k, 10k and 100k node benchmark scenarios and check the scaling and speed targets.
    Bench {
        /// Skip the 100k-node speed run.
        #[arg(long)]
        skip_100k: bool,
        /// Write all reports as a JSON array here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    keep_freed_memory();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("canopy-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn write_json(path: &PathBuf, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    if path.as_os_str() == "-" {
        println!("{text}");
        Ok(())
    } else {
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
    }
}

/// One progress line: totals so far, and the speed since the previous line (the interesting figure in a long run).
fn progress_line(now: &Progress, previous: Option<&Progress>) -> String {
    let (sim0, wall0, msgs0) = previous.map_or((0.0, 0.0, 0), |p| (p.sim_seconds, p.wall_seconds, p.messages_sent));
    let wall = (now.wall_seconds - wall0).max(1e-9);
    format!(
        "t={:>6.1} sim s  wall {:>8.1} s  total {:>6.1}x  last {:>6.1}x  live {}  msgs {} ({:.0}/wall s)",
        now.sim_seconds,
        now.wall_seconds,
        now.sim_seconds / now.wall_seconds.max(1e-9),
        (now.sim_seconds - sim0) / wall,
        now.live,
        now.messages_sent,
        (now.messages_sent - msgs0) as f64 / wall,
    )
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Cmd::Run { scenario: path, seed, nodes, json, plot: plot_dir, check, progress, trace } => {
            let mut scenario = Scenario::from_file(&path)?;
            if let Some(seed) = seed {
                scenario.seed = seed;
            }
            if let Some(nodes) = nodes {
                scenario.nodes.count = nodes;
            }
            scenario.validate().map_err(|(key, problem)| anyhow::anyhow!("`{key}` {problem}"))?;
            let name = path.file_stem().map_or("scenario".into(), |s| s.to_string_lossy().into_owned());
            let count = scenario.nodes.count;
            choose_page_size(count);
            if let Some(&missing) = trace.iter().find(|&&n| n as usize >= count) {
                anyhow::bail!("--trace {missing}: the scenario has {count} nodes, numbered 0 to {}", count - 1);
            }
            let tracer = (!trace.is_empty()).then(|| Tracer::new(&trace, |line| eprintln!("{line}")));
            let mut last: Option<Progress> = None;
            let progress = |p: Progress| {
                if progress {
                    eprintln!("{}", progress_line(&p, last.as_ref()));
                    last = Some(p);
                }
            };
            let outcome = run_traced(&scenario, &name, progress, tracer);
            if json.as_ref().is_none_or(|p| p.as_os_str() != "-") {
                print!("{}", outcome.report.summary());
            }
            if let Some(json) = &json {
                write_json(json, &outcome.report)?;
            }
            if let Some(dir) = plot_dir {
                for written in plot::write_plots(&outcome, &dir)? {
                    eprintln!("wrote {}", written.display());
                }
            }
            Ok(if check && !outcome.report.r#final.converged() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Cmd::Bench { skip_100k, json } => {
            let result = bench::run_bench(
                !skip_100k,
                |s| choose_page_size(s.nodes.count),
                |r| {
                    eprintln!(
                        "{}: {} nodes done in {:.2} s ({:.1}x)",
                        r.scenario,
                        r.nodes,
                        r.wall_seconds,
                        bench::speed(r)
                    )
                },
            )?;
            print!("{}", result.text);
            if let Some(json) = &json {
                write_json(json, &result.reports)?;
            }
            Ok(if result.all_passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The process's huge page flag as the kernel reports it (`PR_GET_THP_DISABLE`: 1 when disabled).
    fn huge_pages_disabled() -> bool {
        // SAFETY: PR_GET_THP_DISABLE reads the flag and takes no pointers.
        unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
    }

    #[test]
    fn small_runs_keep_the_heap_off_huge_pages_and_large_ones_on() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            eprintln!("skipped: MIMALLOC_ALLOW_THP is set, so the environment chooses the page size");
            return;
        }
        choose_page_size(10_000);
        assert!(huge_pages_disabled(), "10,000 nodes: 4 KiB pages");
        choose_page_size(HUGE_PAGES_FROM_NODES);
        assert!(!huge_pages_disabled(), "from {HUGE_PAGES_FROM_NODES} nodes: huge pages");
        choose_page_size(HUGE_PAGES_FROM_NODES - 1);
        assert!(huge_pages_disabled());
    }
}
