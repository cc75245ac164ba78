//! Sandbox cgroup setup: the pool (acquire = rename on v1 / claim on v2, then apply limits)
//! against a fresh mkdir in every hierarchy plus the same limits, at several concurrencies, in
//! one run. Run by `ci/bench-cgroup` (root; real cgroups).
//!
//! Each worker thread repeats a sandbox cycle: setup (timed) then teardown (untimed: release to
//! the pool, or rmdir). Latency percentiles are of the setup alone; throughput is completed
//! cycles per wall-clock second, so both modes pay their own teardown.
//!
//! Usage: bench-cgroup [--levels 1,10,100] [--ops N] [--version v1|v2] [--without cpuset,...]
//! `--ops` is the number of setups per level (split across the threads; default 1000).

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cgroup_pool::hierarchy::{CgroupDirs, Hierarchy};
use cgroup_pool::limits::{self, copy_cpuset_from_parent};
use cgroup_pool::resources::Limits;
use cgroup_pool::{cgroupfs, parent, CgroupPool, CgroupVersion, PoolConfig, SandboxId};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};

struct Args {
    levels: Vec<usize>,
    ops: usize,
    version: Option<CgroupVersion>,
    /// Controllers to leave out of the limits (for finding what costs what).
    without: Vec<String>,
    /// Keep every cgroup until the level's setups are all done, then tear down (untimed): setups
    /// then contend only with each other, not with teardowns.
    hold: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        levels: vec![1, 10, 100],
        ops: 1000,
        version: None,
        without: Vec::new(),
        hold: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--levels" => {
                args.levels = value()?
                    .split(',')
                    .map(|s| s.parse().map_err(|_| format!("bad level {s:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--ops" => args.ops = value()?.parse().map_err(|_| "bad --ops".to_string())?,
            "--version" => {
                args.version = Some(match value()?.as_str() {
                    "v1" => CgroupVersion::V1,
                    "v2" => CgroupVersion::V2,
                    v => return Err(format!("bad --version {v:?} (v1 or v2)")),
                })
            }
            "--hold" => args.hold = true,
            "--without" => args.without = value()?.split(',').map(str::to_string).collect(),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.levels.is_empty() || args.levels.contains(&0) || args.ops == 0 {
        return Err("levels and ops must be positive".into());
    }
    Ok(args)
}

/// Limits in every controller the host offers for the pool's cgroups.
fn resources(available: &[String]) -> (LinuxResources, String) {
    let has = |c: &str| available.iter().any(|a| a == c);
    let mut b = LinuxResourcesBuilder::default();
    let mut what = Vec::new();
    if has("cpu") {
        let mut cpu = LinuxCpuBuilder::default()
            .shares(512u64)
            .quota(50_000i64)
            .period(100_000u64);
        what.push("cpu shares 512, quota 50000/100000");
        if has("cpuset") {
            cpu = cpu.cpus("0");
            what.push("cpuset 0");
        }
        b = b.cpu(cpu.build().expect("cpu"));
    }
    if has("memory") {
        b = b.memory(
            LinuxMemoryBuilder::default()
                .limit(256i64 << 20)
                .build()
                .expect("memory"),
        );
        what.push("memory 256 MiB");
    }
    if has("pids") {
        b = b.pids(
            LinuxPidsBuilder::default()
                .limit(1024i64)
                .build()
                .expect("pids"),
        );
        what.push("pids 1024");
    }
    (b.build().expect("resources"), what.join(", "))
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Mkdir,
    Pool,
}

struct Outcome {
    setups: Vec<Duration>,
    wall: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What every level shares.
struct Bench {
    pool: Arc<CgroupPool>,
    hierarchy: Arc<Hierarchy>,
    mkdir_parent: Arc<parent::Parent>,
    res: Arc<LinuxResources>,
    ops: usize,
    hold: bool,
}

fn run_level(bench: &Bench, mode: Mode, threads: usize) -> Result<Outcome, String> {
    let Bench {
        pool,
        hierarchy,
        mkdir_parent,
        res,
        ops,
        hold,
    } = bench;
    let (ops, hold) = (*ops, *hold);
    let per_thread = ops.div_ceil(threads);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let done = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (pool, hierarchy, mkdir_parent, res, barrier, done) = (
                Arc::clone(pool),
                Arc::clone(hierarchy),
                Arc::clone(mkdir_parent),
                Arc::clone(res),
                Arc::clone(&barrier),
                Arc::clone(&done),
            );
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let limits =
                    Limits::from_oci(&res, hierarchy.version).map_err(|e| e.to_string())?;
                let mut times = Vec::with_capacity(per_thread);
                let teardown = |name: &str| -> Result<(), String> {
                    match mode {
                        Mode::Pool => {
                            let id = SandboxId::parse(name).map_err(|e| e.to_string())?;
                            pool.release(&id).map_err(|e| e.to_string())
                        }
                        Mode::Mkdir => {
                            let dirs = mkdir_parent.child_dirs(&hierarchy, name);
                            for d in dirs.dirs.iter().rev() {
                                cgroupfs::rmdir(&d.path).map_err(|e| e.to_string())?;
                            }
                            Ok(())
                        }
                    }
                };
                let mut held = Vec::new();
                barrier.wait();
                for k in 0..per_thread {
                    let name = format!("b{t}-{k}");
                    let t0 = Instant::now();
                    match mode {
                        Mode::Pool => {
                            let id = SandboxId::parse(&name).map_err(|e| e.to_string())?;
                            pool.acquire(&id, &res).map_err(|e| e.to_string())?;
                        }
                        Mode::Mkdir => {
                            let dirs = mkdir_parent.child_dirs(&hierarchy, &name);
                            make_and_configure(&hierarchy, &dirs, &limits)?;
                        }
                    }
                    times.push(t0.elapsed());
                    if hold {
                        held.push(name);
                    } else {
                        teardown(&name)?;
                    }
                }
                done.wait();
                for name in held {
                    teardown(&name)?;
                }
                Ok(times)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    done.wait();
    let wall = start.elapsed();
    let mut setups = Vec::new();
    for h in handles {
        setups.extend(h.join().map_err(|_| "worker panicked".to_string())??);
    }
    setups.sort();
    Ok(Outcome { setups, wall })
}

/// What a runtime without a pool does: mkdir in every hierarchy, then configure.
fn make_and_configure(hierarchy: &Hierarchy, dirs: &CgroupDirs, l: &Limits) -> Result<(), String> {
    for d in &dirs.dirs {
        cgroupfs::mkdir(&d.path).map_err(|e| e.to_string())?;
        if hierarchy.version == CgroupVersion::V1 && d.controllers.iter().any(|c| c == "cpuset") {
            copy_cpuset_from_parent(&d.path).map_err(|e| e.to_string())?;
        }
    }
    limits::apply(dirs, l).map_err(|e| e.to_string())
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bench-cgroup: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let args = parse_args()?;
    let tag = std::process::id();
    let max_level = args.levels.iter().copied().max().unwrap_or(1);
    let state_dir = std::env::temp_dir().join(format!("rund-bench-cgroup-{tag}"));
    let config = PoolConfig {
        parent: format!("rund-bench-{tag}"),
        state_dir: state_dir.clone(),
        version: args.version,
        mounts: None,
        low_watermark: if args.hold {
            args.ops + 8
        } else {
            max_level + 8
        },
        high_watermark: if args.hold {
            args.ops + 8
        } else {
            max_level + 8
        },
        refill_interval: Duration::from_millis(500),
        background_refill: true,
    };
    let (pool, _) = CgroupPool::start(config, &|_| false).map_err(|e| e.to_string())?;
    pool.refill_now().map_err(|e| e.to_string())?;
    let pool = Arc::new(pool);
    let hierarchy = Arc::new(pool.hierarchy().clone());
    let mkdir_rel = PathBuf::from(format!("rund-bench-{tag}-mkdir"));
    let mkdir_parent =
        Arc::new(parent::prepare_owned(&hierarchy, &mkdir_rel).map_err(|e| e.to_string())?);
    let available: Vec<String> = match hierarchy.version {
        CgroupVersion::V1 => hierarchy
            .mounts
            .iter()
            .flat_map(|m| m.controllers.clone())
            .collect(),
        CgroupVersion::V2 => mkdir_parent.child_controllers.clone(),
    };
    let available: Vec<String> = available
        .into_iter()
        .filter(|c| !args.without.contains(c))
        .collect();
    let (res, what) = resources(&available);
    let bench = Bench {
        pool: Arc::clone(&pool),
        hierarchy: Arc::clone(&hierarchy),
        mkdir_parent: Arc::clone(&mkdir_parent),
        res: Arc::new(res),
        ops: args.ops,
        hold: args.hold,
    };

    println!(
        "cgroup-pool benchmark: {} ({} hierarchies: {}), kernel {}, {} CPUs",
        hierarchy.version,
        hierarchy.mounts.len(),
        hierarchy
            .mounts
            .iter()
            .map(|m| m.mount_point.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    println!("limits applied in both modes: {what}");
    println!("setup = pool: acquire (no mkdir) + limits; mkdir: mkdir in every hierarchy + limits");
    println!("throughput = sandbox cycles (setup + teardown) per wall second\n");
    println!(
        "{:>5} {:>6} {:>6} {:>10} {:>10} {:>12}",
        "conc", "mode", "ops", "p50 µs", "p99 µs", "cycles/s"
    );
    let mut ratios = Vec::new();
    let mut result = Ok(());
    for &c in &args.levels {
        let mut row = Vec::new();
        for mode in [Mode::Mkdir, Mode::Pool] {
            let out = match run_level(&bench, mode, c) {
                Ok(o) => o,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let p50 = percentile(&out.setups, 0.50);
            let p99 = percentile(&out.setups, 0.99);
            let tput = out.setups.len() as f64 / out.wall.as_secs_f64();
            println!(
                "{:>5} {:>6} {:>6} {:>10.0} {:>10.0} {:>12.0}",
                c,
                if mode == Mode::Pool { "pool" } else { "mkdir" },
                out.setups.len(),
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6,
                tput
            );
            row.push((p50, p99, tput));
        }
        if row.len() == 2 {
            ratios.push((c, row[0], row[1]));
        }
        if result.is_err() {
            break;
        }
    }
    println!(
        "\nratios (mkdir / pool for latency, pool / mkdir for throughput; > 1 favours the pool):"
    );
    for (c, (m50, m99, mt), (p50, p99, pt)) in &ratios {
        println!(
            "  {:>3}-way: p50 {:>6.1}x  p99 {:>6.1}x  throughput {:>5.2}x",
            c,
            m50.as_secs_f64() / p50.as_secs_f64(),
            m99.as_secs_f64() / p99.as_secs_f64(),
            pt / mt
        );
    }
    if let Some((c, (_, m99, _), (_, p99, _))) = ratios.iter().find(|r| r.0 == 100) {
        let r = m99.as_secs_f64() / p99.as_secs_f64();
        println!(
            "target (100-way p99 at least 10x lower with the pool): {} ({c}-way p99 ratio {r:.1}x)",
            if r >= 10.0 { "met" } else { "NOT met" }
        );
    }
    let stats = pool.stats();
    println!(
        "pool stats: from pool {}, fallbacks {}, slots made by refill {}",
        stats.acquired_from_pool, stats.fallback_created, stats.slots_created
    );

    // Clean up: the pool's slots and parent, the mkdir parent, the state directory.
    drop(bench);
    let pool = Arc::try_unwrap(pool).map_err(|_| "pool still shared".to_string())?;
    let drained = pool.drain().map_err(|e| e.to_string());
    let leftovers = parent::remove_owned(&hierarchy, &mkdir_rel);
    let _ = std::fs::remove_dir_all(&state_dir);
    result?;
    drained?;
    if let Some(e) = leftovers.into_iter().next() {
        return Err(e.to_string());
    }
    Ok(())
}
