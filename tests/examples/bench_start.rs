//! The benchmark behind `ci/bench-start` and the testbed part of `ci/bench-template`: container
//! and pod start through a private containerd, runc against rund with its sandboxes restored
//! from a template (`--rund-starts template`) and cold-booted (`cold`), each a side, in one run
//! (rounds interleaved):
//!   (a) `ctr run --rm` of a `true` container: p50, p99, ratio to runc;
//!   (b) RunPodSandbox through CRI (StopPodSandbox and RemovePodSandbox untimed): same;
//!   (c) the shims' memory per idle sandbox (`--idle N` of them per side, side by side): PSS and
//!       USS of the shim process with guest RAM, and PSS without it; template/cold ratio;
//!   (d) of the template's pages, how many its idle clones still share (not copied on write);
//!   (e) the split of rund's sandbox starts that its shims log (`rund-start-split` lines in
//!       containerd's log), restored and cold apart: p50 per phase, and the time to a working
//!       guest (VM plus the agent's first answer), cold against template.
//! Runtimes from `RUND_E2E_RUNTIMES` (see `rund_tests::containerd`). Needs root and containerd;
//! with rund, a KVM that runs Linux guests (the testbed).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use rund_tests::containerd::bench::{p50_p99_ms, start_splits, StartSplit, START_PHASES};
use rund_tests::containerd::host::{process_memory, ProcessMemory};
use rund_tests::containerd::{
    missing_prerequisites, runtimes_under_test, Containerd, Runtime, BUSYBOX_IMAGE, CTR_NAMESPACE,
};
use rund_tests::cri::{host_network_pod_config, CriClient};
use rund_tests::devbench::Figure;

#[derive(Parser)]
struct Args {
    /// Timed runs per side and measurement.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Untimed runs per side before them (first start of a shim, caches).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// How long the idle sandboxes idle before their shims' memory is read.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Idle sandboxes per side for (c): memory per sandbox, and what of a template's memory
    /// its clones still share.
    #[arg(long, default_value_t = 1)]
    idle: usize,
    /// How rund's sandboxes start, each a side of its own: `template` (restored: the default
    /// `auto` mode, with the template made before the timed runs) and `cold` (mode `off`).
    #[arg(long, value_delimiter = ',', default_value = "template,cold")]
    rund_starts: Vec<RundStart>,
    /// Words rund's guests' kernel command line gains (`[guest] extra_cmdline`), for both rund
    /// sides and the template: to measure a kernel parameter's cost or what it shares.
    #[arg(long)]
    guest_cmdline: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RundStart {
    Template,
    Cold,
}

/// One side of the comparison: runc, or rund with its sandboxes started one way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Side {
    rt: Runtime,
    start: Option<RundStart>,
}

impl Side {
    fn label(self) -> &'static str {
        match self.start {
            None => self.rt.name(),
            Some(RundStart::Template) => "rund-template",
            Some(RundStart::Cold) => "rund-cold",
        }
    }

    /// Sets rund's template mode for this side's next sandboxes (the shim reads its
    /// configuration at each start).
    fn prepare(self, cd: &Containerd) -> Result<(), String> {
        let mode = match self.start {
            None => return Ok(()),
            Some(RundStart::Template) => "auto",
            Some(RundStart::Cold) => "off",
        };
        cd.set_template_mode(mode).map_err(|e| e.to_string())
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

fn sides(cd: &Containerd, args: &Args) -> Vec<Side> {
    cd.runtimes()
        .iter()
        .flat_map(|&rt| match rt {
            Runtime::Runc => vec![Side { rt, start: None }],
            Runtime::Rund => args
                .rund_starts
                .iter()
                .map(|&s| Side { rt, start: Some(s) })
                .collect(),
        })
        .collect()
}

type Samples = Vec<(Side, Vec<Duration>)>;

fn figure(name: String, value: f64, unit: &'static str) {
    println!("{}", Figure { name, value, unit });
}

/// Prints p50/p99 per side and each side's ratio to runc (the first).
fn report(what: &str, samples: &Samples) {
    let mut runc = None;
    for (side, durations) in samples {
        let Some((p50, p99)) = p50_p99_ms(durations) else {
            println!("  {side}: no samples");
            continue;
        };
        println!("  {side:13}: p50 {p50:9.2} ms   p99 {p99:9.2} ms");
        figure(format!("{what}-{side}-p50"), p50, "ms");
        figure(format!("{what}-{side}-p99"), p99, "ms");
        match runc {
            None => runc = Some((p50, p99)),
            Some((r50, r99)) => {
                println!(
                    "  ratio {side}/runc: p50 {:6.2}x   p99 {:6.2}x   (1 = as fast as runc)",
                    p50 / r50,
                    p99 / r99
                );
                figure(format!("{what}-{side}/runc-p50"), p50 / r50, "x");
                figure(format!("{what}-{side}/runc-p99"), p99 / r99, "x");
            }
        }
    }
}

/// (a) `ctr run --rm <image> <id> true`, interleaved.
fn ctr_run_true(cd: &Containerd, args: &Args) -> Result<Samples, String> {
    let mut samples: Samples = sides(cd, args)
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    for i in 0..args.warmup + args.runs {
        for (side, durations) in samples.iter_mut() {
            side.prepare(cd)?;
            let id = cd.unique_id(&format!("bench-run-{i}-{}", side.label()), side.rt);
            let start = Instant::now();
            let out = cd
                .ctr(&[
                    "run",
                    "--rm",
                    "--runtime",
                    side.rt.runtime_type(),
                    BUSYBOX_IMAGE,
                    &id,
                    "true",
                ])
                .map_err(|e| e.to_string())?;
            let took = start.elapsed();
            eprintln!("  (a) round {i} {side}: {:.2} s", took.as_secs_f64());
            if !out.success() {
                return Err(format!(
                    "{side}: ctr run exited {:?}: {}",
                    out.code, out.stderr
                ));
            }
            if i >= args.warmup {
                durations.push(took);
            }
        }
    }
    Ok(samples)
}

/// (b) RunPodSandbox, interleaved; each pod is stopped and removed untimed.
async fn run_pod_sandbox(cd: &Containerd, args: &Args) -> Result<Samples, String> {
    let mut cri = CriClient::connect(cd.socket(), Duration::from_secs(120))
        .await
        .map_err(|e| e.to_string())?;
    let log_dir = cd.dir().join("bench-pod-logs");
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let mut samples: Samples = sides(cd, args)
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    for i in 0..args.warmup + args.runs {
        for (side, durations) in samples.iter_mut() {
            side.prepare(cd)?;
            let name = cd.unique_id(&format!("bench-pod-{i}-{}", side.label()), side.rt);
            let config = host_network_pod_config(&name, &name, &log_dir);
            let start = Instant::now();
            let id = cri
                .run_pod_sandbox(&config, side.rt.name())
                .await
                .map_err(|e| format!("{side}: {e}"))?;
            let took = start.elapsed();
            eprintln!("  (b) round {i} {side}: {:.2} s", took.as_secs_f64());
            cri.stop_pod_sandbox(&id)
                .await
                .map_err(|e| format!("{side}: {e}"))?;
            cri.remove_pod_sandbox(&id)
                .await
                .map_err(|e| format!("{side}: {e}"))?;
            if i >= args.warmup {
                durations.push(took);
            }
        }
    }
    Ok(samples)
}

/// Kills and removes the `ctr run -d` containers `ids`, saying what failed.
fn remove_all(cd: &Containerd, side: Side, ids: &[String]) {
    for id in ids {
        if let Err(e) = cd.remove_container(id) {
            eprintln!("{side}: cleanup: {e}");
        }
    }
}

/// The memory of the shims serving `ids`.
fn measure_shims(
    cd: &Containerd,
    side: Side,
    ids: &[String],
) -> Result<Vec<ProcessMemory>, String> {
    let shims = cd.shim_servers().map_err(|e| e.to_string())?;
    ids.iter()
        .map(|id| {
            let shim = shims
                .iter()
                .find(|p| p.has_arg_pair("-id", id))
                .ok_or_else(|| format!("{side}: no shim serves {id}"))?;
            process_memory(shim.pid).map_err(|e| format!("{side}: shim {}: {e}", shim.pid))
        })
        .collect()
}

/// (c) The memory of `--idle` sandboxes of each side idling side by side (`sleep` containers:
/// a container ran in each), per sandbox: the shim's PSS and USS with guest RAM, and without;
/// for clones of a template, what of the template's pages each copied.
fn shim_memory(cd: &Containerd, args: &Args) -> Result<(), String> {
    let mib = |kib: f64| kib / 1024.0;
    let mut pss_by_side = Vec::new();
    for side in sides(cd, args) {
        side.prepare(cd)?;
        let mut ids = Vec::new();
        let mut started = Ok(());
        for i in 0..args.idle {
            let id = cd.unique_id(&format!("bench-idle-{i}-{}", side.label()), side.rt);
            let out = cd
                .ctr(&[
                    "run",
                    "-d",
                    "--runtime",
                    side.rt.runtime_type(),
                    BUSYBOX_IMAGE,
                    &id,
                    "sleep",
                    "100000",
                ])
                .map_err(|e| e.to_string())?;
            ids.push(id);
            if !out.success() {
                started = Err(format!("{side}: ctr run -d: {}", out.stderr));
                break;
            }
        }
        let measured = started.and_then(|()| {
            std::thread::sleep(Duration::from_secs(args.settle_secs));
            measure_shims(cd, side, &ids)
        });
        // Removed before any error is returned: the next side starts from a clean host.
        remove_all(cd, side, &ids);
        let all = measured?;
        let n = all.len().max(1) as f64;
        let mean = |f: fn(&ProcessMemory) -> u64| all.iter().map(f).sum::<u64>() as f64 / n;
        let (pss, uss) = (mean(|m| m.pss_kib), mean(|m| m.uss_kib));
        let own = mean(|m| m.own_pss_kib());
        println!(
            "  {side:13} ({} sandboxes, per sandbox): PSS {:7.2} MiB   USS {:7.2} MiB   \
             without guest RAM: PSS {:7.2} MiB   guest RAM PSS {:7.2} MiB",
            all.len(),
            mib(pss),
            mib(uss),
            mib(own),
            mib(mean(|m| m.guest_ram_pss_kib)),
        );
        figure(format!("shim-pss-{side}"), mib(pss), "MiB");
        figure(format!("shim-uss-{side}"), mib(uss), "MiB");
        figure(
            format!("shim-pss-without-guest-ram-{side}"),
            mib(own),
            "MiB",
        );
        pss_by_side.push((side, pss));
        if side.start == Some(RundStart::Template) {
            template_sharing(cd, &all)?;
        }
    }
    let pss_of = |start| {
        pss_by_side
            .iter()
            .find(|(s, _)| s.start == Some(start))
            .map(|(_, p)| *p)
    };
    if let (Some(t), Some(c)) = (pss_of(RundStart::Template), pss_of(RundStart::Cold)) {
        println!("  PSS per sandbox, template/cold: {:.2}x", t / c);
        figure("shim-pss-template/cold".into(), t / c, "x");
    }
    cd.wait_until_clean(CTR_NAMESPACE)
        .map_err(|e| e.to_string())
}

/// (d) What of the template's memory its idle clones still share: the template file holds
/// `memory_bytes` of pages; each page a clone wrote is a private copy (its mapping's
/// `Anonymous`, which also counts pages the template had as holes: so at least this much is
/// still shared).
fn template_sharing(cd: &Containerd, clones: &[ProcessMemory]) -> Result<(), String> {
    let rows = cd.templates().map_err(|e| e.to_string())?;
    let [template] = rows.as_slice() else {
        return Err(format!("expected one template, found {rows:?}"));
    };
    let info = std::fs::read_to_string(template.dir.join("template.json"))
        .map_err(|e| format!("{}: {e}", template.dir.display()))?;
    let info: serde_json::Value = serde_json::from_str(&info).map_err(|e| e.to_string())?;
    let template_kib = info["memory_bytes"].as_u64().unwrap_or(0) / 1024;
    if template_kib == 0 {
        return Err("the template's memory_bytes is unknown".into());
    }
    let n = clones.len().max(1) as f64;
    let per_clone = |kib: fn(&ProcessMemory) -> u64| clones.iter().map(kib).sum::<u64>() as f64 / n;
    let copied = per_clone(|m| m.template_copied_kib);
    let resident = per_clone(|m| m.template_rss_kib);
    let pmd_mapped = per_clone(|m| m.template_pmd_mapped_kib);
    let shared = 1.0 - (copied / template_kib as f64).min(1.0);
    println!(
        "  template {} ({:.2} MiB of pages): per clone {:.2} MiB of it resident, {:.2} MiB \
         copied on write, {:.2} MiB mapped 2 MiB at a time; at least {:.1}% of the \
         template's pages still shared",
        template.key,
        template_kib as f64 / 1024.0,
        resident / 1024.0,
        copied / 1024.0,
        pmd_mapped / 1024.0,
        shared * 100.0
    );
    figure(
        "template-pages-mib".into(),
        template_kib as f64 / 1024.0,
        "MiB",
    );
    figure(
        "template-copied-per-clone-mib".into(),
        copied / 1024.0,
        "MiB",
    );
    figure(
        "template-pmd-mapped-per-clone-mib".into(),
        pmd_mapped / 1024.0,
        "MiB",
    );
    figure("template-still-shared".into(), shared * 100.0, "%");
    Ok(())
}

/// (e) p50 of each phase over every split line rund's shims logged during this run, for
/// restored and cold-booted sandboxes apart, and their time to a working guest (VM plus the
/// agent's first answer) against each other.
fn start_split(cd: &Containerd) -> Result<(), String> {
    let log = std::fs::read_to_string(cd.log_path()).map_err(|e| e.to_string())?;
    let splits = start_splits(&log);
    if splits.is_empty() {
        return Err(format!(
            "no rund-start-split line in containerd's log {}",
            cd.log_path().display()
        ));
    }
    let p50 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len().saturating_sub(1) / 2).copied()
    };
    let mut to_guest = Vec::new();
    for (kind, restored) in [("template", true), ("cold", false)] {
        let of_kind: Vec<&StartSplit> = splits
            .iter()
            .filter(|s| s.from_template() == restored)
            .collect();
        println!("  {kind}: {} sandbox starts", of_kind.len());
        if restored && of_kind.is_empty() {
            // Say why: the shims log what they looked for.
            for line in log.lines().filter(|l| l.contains("template")).take(10) {
                println!("    containerd's log: {line}");
            }
        }
        for phase in START_PHASES {
            let mut ms: Vec<f64> = of_kind.iter().filter_map(|s| s.phase(phase)).collect();
            if let Some(v) = p50(&mut ms) {
                println!("    {phase:13} p50 {v:9.2} ms   ({} lines)", ms.len());
                figure(format!("rund-start-{kind}-{phase}-p50"), v, "ms");
            }
        }
        let mut tries: Vec<f64> = of_kind
            .iter()
            .filter_map(|s| s.answer_tries.map(f64::from))
            .collect();
        if let Some(v) = p50(&mut tries) {
            let most = tries.last().copied().unwrap_or(v);
            println!("    answer_tries  p50 {v:9.0}      max {most:.0}");
        }
        let mut guest: Vec<f64> = of_kind
            .iter()
            .filter_map(|s| Some(s.phase("vm_ms")? + s.phase("answer_ms")?))
            .collect();
        if let Some(v) = p50(&mut guest) {
            println!("    to a working guest (vm + answer) p50 {v:9.2} ms");
            figure(format!("rund-start-{kind}-to-guest-p50"), v, "ms");
            to_guest.push(v);
        }
    }
    if let [template, cold] = to_guest[..] {
        println!(
            "  to a working guest: a restore is {:.1}x faster than a cold boot",
            cold / template
        );
        figure("rund-to-guest-cold/template".into(), cold / template, "x");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtimes = match runtimes_under_test() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-start: {e}");
            return ExitCode::from(2);
        }
    };
    let missing = missing_prerequisites(&runtimes);
    if !missing.is_empty() {
        eprintln!("bench-start: cannot run: {}", missing.join("; "));
        return ExitCode::FAILURE;
    }
    let cd = match Containerd::start(&runtimes) {
        Ok(cd) => cd,
        Err(e) => {
            eprintln!("bench-start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let names: Vec<&str> = runtimes.iter().map(|r| r.name()).collect();
    println!(
        "bench-start: containerd {} in {}, runtimes {}, {} runs each (+{} warm-up), interleaved",
        cd.ctr_ok(&["version"])
            .ok()
            .and_then(|v| {
                v.lines().find_map(|l| {
                    l.trim()
                        .strip_prefix("Version:")
                        .map(|v| v.trim().to_string())
                })
            })
            .unwrap_or_default(),
        cd.dir().display(),
        names.join(", "),
        args.runs,
        args.warmup
    );
    let labels: Vec<&str> = sides(&cd, &args).iter().map(|s| s.label()).collect();
    println!("  sides: {}", labels.join(", "));
    if let (Some(cmdline), true) = (&args.guest_cmdline, runtimes.contains(&Runtime::Rund)) {
        if let Err(e) = cd.set_guest_extra_cmdline(cmdline) {
            eprintln!("bench-start: [guest] extra_cmdline: {e}");
            return ExitCode::from(2);
        }
        println!("  rund's guests' extra command line: {cmdline}");
    }
    if args.rund_starts.contains(&RundStart::Template) && runtimes.contains(&Runtime::Rund) {
        // As an operator prepares a node; `auto` would also make it after the first cold start.
        let start = Instant::now();
        match cd.rund_admin(&["template", "create"]) {
            Ok(out) if out.success() => println!(
                "  rund template create: {:.2} s: {}",
                start.elapsed().as_secs_f64(),
                out.stdout.trim()
            ),
            Ok(out) => {
                eprintln!("bench-start: rund template create: {}", out.stderr);
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("bench-start: rund template create: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut failed = false;
    let mut step = |title: &str, result: Result<(), String>| {
        if let Err(e) = result {
            println!("  FAILED: {e}");
            eprintln!("bench-start: {title}: {e}");
            failed = true;
        }
    };

    println!("bench-start (a): `ctr run --rm` of a `true` container");
    step(
        "(a)",
        ctr_run_true(&cd, &args).map(|s| report("ctr-run", &s)),
    );

    println!("bench-start (b): RunPodSandbox through CRI (host network; stop and remove untimed)");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let pods = match rt {
        Ok(rt) => rt.block_on(run_pod_sandbox(&cd, &args)),
        Err(e) => Err(format!("tokio runtime: {e}")),
    };
    step("(b)", pods.map(|s| report("run-pod-sandbox", &s)));

    println!(
        "bench-start (c, d): the shims' memory with {} idle sandboxes per side; what clones share",
        args.idle
    );
    step("(c)", shim_memory(&cd, &args));

    println!("bench-start (e): split of rund's sandbox starts (from the shims' log)");
    if runtimes.contains(&Runtime::Rund) {
        step("(e)", start_split(&cd));
    } else {
        println!("  not measured: rund is not in RUND_E2E_RUNTIMES");
    }
    drop(cd);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
