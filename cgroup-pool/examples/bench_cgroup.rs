//! Sandbox cgroup setup: the pool (acquire = rename on v1 / claim on v2, then apply limits)
//! against a fresh mkdir in every hierarchy plus the same limits, at several concurrencies, in
//! one run. Run by `ci/bench-cgroup` (root; real cgroups).
//!
//! Both modes are timed the same way: `conc` threads wait at one barrier, then each takes its own
//! start time and sets up one sandbox cgroup (timed: from asking to holding a configured cgroup).
//! By default the level runs in rounds: every thread sets up once, all wait at a barrier while
//! holding their cgroups, then tear down (untimed: release to the pool, or rmdir in every
//! hierarchy), and the next round starts once the teardown is over (for the pool: its refill
//! thread has recycled the released slots). So setups contend only with each other, as in a burst
//! of sandbox starts, and neither side's teardown runs inside the other's timed section.
//! `--continuous` instead lets each thread repeat setup (timed) then teardown (untimed) without
//! rounds: setups then also contend with teardowns and with the pool's recycling.
//! Latency percentiles are of the setups alone; throughput is completed cycles (setup and
//! teardown, including the pool's recycling) per wall-clock second.
//!
//! The pool is started with the benchmark's limits as its default shape (pre-limited slots, the
//! common sandbox size); `--no-shape` leaves its free slots at the kernel defaults. The mkdir side
//! writes every limit file, as a runtime without a pool does. The pool's state directory is on
//! /dev/shm (tmpfs, as rund's default /run/rund is on a host) unless `--state-dir` says otherwise.
//!
//! Usage: bench-cgroup [--levels 1,10,100] [--ops N] [--version v1|v2] [--without cpuset,...]
//!                     [--continuous] [--no-shape] [--recycle refill|inline]
//!                     [--v1-claim rename|file] [--state-dir DIR]
//! `--ops` is the number of setups per level (split across the threads; default 1000).

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cgroup_pool::hierarchy::{CgroupDirs, Hierarchy};
use cgroup_pool::limits::{self, copy_cpuset_from_parent};
use cgroup_pool::resources::Limits;
use cgroup_pool::{
    cgroupfs, parent, CgroupPool, CgroupVersion, PoolConfig, Recycle, SandboxId, V1Claim,
};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};

struct Args {
    levels: Vec<usize>,
    ops: usize,
    version: Option<CgroupVersion>,
    /// Controllers to leave out of the limits (for finding what costs what).
    without: Vec<String>,
    /// No rounds: each thread repeats setup then teardown on its own.
    continuous: bool,
    /// Start the pool without a default shape.
    no_shape: bool,
    state_dir: Option<PathBuf>,
    recycle: Recycle,
    v1_claim: V1Claim,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        levels: vec![1, 10, 100],
        ops: 1000,
        version: None,
        without: Vec::new(),
        continuous: false,
        no_shape: false,
        state_dir: None,
        recycle: Recycle::Refill,
        v1_claim: V1Claim::Rename,
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
            "--continuous" => args.continuous = true,
            // Older spelling: held cgroups, torn down untimed, is what the rounds do.
            "--hold" => args.continuous = false,
            "--no-shape" => args.no_shape = true,
            "--v1-claim" => {
                args.v1_claim = match value()?.as_str() {
                    "rename" => V1Claim::Rename,
                    "file" => V1Claim::File,
                    v => return Err(format!("bad --v1-claim {v:?} (rename or file)")),
                }
            }
            "--recycle" => {
                args.recycle = match value()?.as_str() {
                    "refill" => Recycle::Refill,
                    "inline" => Recycle::Inline,
                    v => return Err(format!("bad --recycle {v:?} (refill or inline)")),
                }
            }
            "--state-dir" => args.state_dir = Some(PathBuf::from(value()?)),
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
    continuous: bool,
}

/// One mode's worker threads at one level, waiting at their barriers.
struct Workers {
    mode: Mode,
    handles: Vec<std::thread::JoinHandle<Result<Vec<Duration>, String>>>,
    start: Arc<Barrier>,
    held: Arc<Barrier>,
    torn: Arc<Barrier>,
}

fn spawn_workers(bench: &Bench, mode: Mode, threads: usize, rounds: usize) -> Workers {
    let Bench {
        pool,
        hierarchy,
        mkdir_parent,
        res,
        ops,
        continuous,
    } = bench;
    let (ops, continuous) = (*ops, *continuous);
    let per_thread = ops.div_ceil(threads);
    let per_round = if continuous { per_thread } else { 1 };
    let start = Arc::new(Barrier::new(threads + 1));
    let held = Arc::new(Barrier::new(threads + 1));
    let torn = Arc::new(Barrier::new(threads + 1));
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles = (0..threads)
        .map(|t| {
            let (pool, hierarchy, mkdir_parent, res) = (
                Arc::clone(pool),
                Arc::clone(hierarchy),
                Arc::clone(mkdir_parent),
                Arc::clone(res),
            );
            let (start, held, torn, failed) = (
                Arc::clone(&start),
                Arc::clone(&held),
                Arc::clone(&torn),
                Arc::clone(&failed),
            );
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let limits =
                    Limits::from_oci(&res, hierarchy.version).map_err(|e| e.to_string())?;
                let mut times = Vec::with_capacity(per_thread);
                let setup = |name: &str| -> Result<(), String> {
                    match mode {
                        Mode::Pool => {
                            let id = SandboxId::parse(name).map_err(|e| e.to_string())?;
                            pool.acquire(&id, &res)
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        }
                        Mode::Mkdir => {
                            let dirs = mkdir_parent.child_dirs(&hierarchy, name);
                            make_and_configure(&hierarchy, &dirs, &limits)
                        }
                    }
                };
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
                // Every thread passes every barrier even after a failure, so nobody hangs.
                let mut result = Ok(());
                for r in 0..rounds {
                    start.wait();
                    let mut mine = Vec::new();
                    for k in 0..per_round {
                        if result.is_err() || failed.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        let name = format!("b{t}-{}", r * per_round + k);
                        // Timed: from asking for a cgroup to holding a configured one.
                        let t0 = Instant::now();
                        if let Err(e) = setup(&name) {
                            result = Err(e);
                            break;
                        }
                        times.push(t0.elapsed());
                        if continuous {
                            if let Err(e) = teardown(&name) {
                                result = Err(e);
                            }
                        } else {
                            mine.push(name);
                        }
                    }
                    held.wait();
                    for name in mine {
                        if let Err(e) = teardown(&name) {
                            result = Err(e);
                        }
                    }
                    if result.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    torn.wait();
                }
                result.map(|()| times)
            })
        })
        .collect();
    Workers {
        mode,
        handles,
        start,
        held,
        torn,
    }
}

/// Runs one level for both modes in the same run, round by round alternating (mkdir round,
/// pool round, ...), so that the machine's background load falls on both alike. A round of a
/// mode ends when its teardown is over: its threads have torn down, the pool's refill has
/// recycled what was released, and the kernel has finished destroying removed cgroups
/// ([`settle`]); only then does the other mode's round start.
fn run_level(bench: &Bench, threads: usize) -> Result<[Outcome; 2], String> {
    let per_thread = bench.ops.div_ceil(threads);
    let rounds = if bench.continuous { 1 } else { per_thread };
    let workers = [
        spawn_workers(bench, Mode::Mkdir, threads, rounds),
        spawn_workers(bench, Mode::Pool, threads, rounds),
    ];
    let mut walls = [Duration::ZERO; 2];
    let mut failure = None;
    for _ in 0..rounds {
        for (i, w) in workers.iter().enumerate() {
            let t0 = Instant::now();
            w.start.wait();
            w.held.wait();
            w.torn.wait();
            if w.mode == Mode::Pool {
                if let Err(e) = wait_recycled(&bench.pool, threads.min(bench.ops)) {
                    failure.get_or_insert(e);
                }
            }
            walls[i] += t0.elapsed();
            settle();
        }
    }
    let mut out = Vec::new();
    for (w, wall) in workers.into_iter().zip(walls) {
        let mut setups = Vec::new();
        for h in w.handles {
            match h.join().map_err(|_| "worker panicked".to_string())? {
                Ok(t) => setups.extend(t),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        setups.sort();
        out.push(Outcome { setups, wall });
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let pool = out.pop().ok_or("no pool outcome")?;
    let mkdir = out.pop().ok_or("no mkdir outcome")?;
    Ok([mkdir, pool])
}

/// The number of cgroups the kernel still has, over every hierarchy (`/proc/cgroups`); a removed
/// cgroup counts until its deferred destruction (RCU, workqueues, under the cgroup mutex) is
/// done.
fn kernel_cgroup_count() -> u64 {
    std::fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}

/// Untimed, after each round of either mode: waits until the kernel's cgroup count stops
/// falling (dying cgroups being freed), at most 1 s, so a round's deferred teardown work does
/// not land in the next round's timed setups.
fn settle() {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut last = kernel_cgroup_count();
    let mut stable = 0;
    while stable < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        let now = kernel_cgroup_count();
        if now < last {
            stable = 0;
        } else {
            stable += 1;
        }
        last = now;
    }
}

/// Waits (untimed) until the pool has no released slot waiting and at least `free` free ones.
fn wait_recycled(pool: &CgroupPool, free: usize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = pool.stats();
        if s.recycling == 0 && s.free >= free {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the pool did not recycle within 60 s: {s:?}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
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
    // rund's default state directory, /run/rund, is a tmpfs on a host: so is /dev/shm.
    let state_root = args.state_dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let state_dir = state_root.join(format!("rund-bench-cgroup-{tag}"));
    let config = PoolConfig {
        parent: format!("rund-bench-{tag}"),
        state_dir: state_dir.clone(),
        version: args.version,
        mounts: None,
        // Sized for the load: at most `max_level` slots are held at once (plus a few released
        // ones waiting to be recycled), and the refill makes new ones only below the low
        // watermark, so it makes none while the benchmark runs.
        low_watermark: 8,
        high_watermark: max_level + 16,
        refill_interval: Duration::from_millis(500),
        background_refill: true,
        default_shape: None,
        recycle: args.recycle,
        v1_claim: args.v1_claim,
    };
    // The limits depend on the controllers offered, and the pool's default shape on the limits:
    // look at the hierarchy before starting the pool.
    let probe_controllers = {
        let h = Hierarchy::resolve(args.version, None).map_err(|e| e.to_string())?;
        match h.version {
            CgroupVersion::V1 => h
                .mounts
                .iter()
                .flat_map(|m| m.controllers.clone())
                .collect(),
            CgroupVersion::V2 => {
                // What rund's parent will offer its children: the root's controllers among
                // those the pool switches on.
                h.mounts[0]
                    .controllers
                    .iter()
                    .filter(|c| parent::V2_CONTROLLERS.contains(&c.as_str()))
                    .cloned()
                    .collect::<Vec<String>>()
            }
        }
    };
    let available: Vec<String> = probe_controllers
        .into_iter()
        .filter(|c| !args.without.contains(c))
        .collect();
    let (res, what) = resources(&available);
    let config = PoolConfig {
        default_shape: (!args.no_shape).then(|| res.clone()),
        ..config
    };
    let (pool, _) = CgroupPool::start(config, &|_| false).map_err(|e| e.to_string())?;
    pool.refill_now().map_err(|e| e.to_string())?;
    let pool = Arc::new(pool);
    let hierarchy = Arc::new(pool.hierarchy().clone());
    let mkdir_rel = PathBuf::from(format!("rund-bench-{tag}-mkdir"));
    let mkdir_parent =
        Arc::new(parent::prepare_owned(&hierarchy, &mkdir_rel).map_err(|e| e.to_string())?);
    if hierarchy.version == CgroupVersion::V2 {
        let missing: Vec<&String> = available
            .iter()
            .filter(|c| !mkdir_parent.child_controllers.contains(c))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "controllers {missing:?} not enabled for the mkdir side"
            ));
        }
    }
    let bench = Bench {
        pool: Arc::clone(&pool),
        hierarchy: Arc::clone(&hierarchy),
        mkdir_parent: Arc::clone(&mkdir_parent),
        res: Arc::new(res),
        ops: args.ops,
        continuous: args.continuous,
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
    println!(
        "pool: default shape {}, recycling by {:?}, v1 claims by {:?}, state dir {}; {}",
        if args.no_shape {
            "none (free slots at kernel defaults)"
        } else {
            "= these limits (pre-limited slots)"
        },
        args.recycle,
        args.v1_claim,
        state_root.display(),
        if args.continuous {
            "continuous cycles (setup timed, teardown untimed, no rounds)"
        } else {
            "rounds of conc setups (timed), held, then torn down (untimed)"
        }
    );
    println!("setup = pool: acquire (no mkdir) + limits; mkdir: mkdir in every hierarchy + limits");
    println!("throughput = sandbox cycles (setup + teardown) per wall second\n");
    println!(
        "{:>5} {:>6} {:>6} {:>10} {:>10} {:>12}",
        "conc", "mode", "ops", "p50 µs", "p99 µs", "cycles/s"
    );
    let mut ratios = Vec::new();
    let mut result = Ok(());
    for &c in &args.levels {
        let outcomes = match run_level(&bench, c) {
            Ok(o) => o,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let mut row = Vec::new();
        for (mode, out) in [Mode::Mkdir, Mode::Pool].into_iter().zip(&outcomes) {
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
        ratios.push((c, row[0], row[1]));
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
        "pool stats: from pool {}, fallbacks {}, slots made by refill {}, recycled {}, pre-limited hits {}, limit writes {} (skipped {})",
        stats.acquired_from_pool,
        stats.fallback_created,
        stats.slots_created,
        stats.recycled,
        stats.prelimited_hits,
        stats.limit_writes,
        stats.limit_writes_skipped
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
