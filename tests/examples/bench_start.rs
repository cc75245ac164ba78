//! The benchmark behind `ci/bench-start`: container and pod start through a private containerd,
//! each runtime under test against runc in one run (rounds interleaved):
//!   (a) `ctr run --rm` of a `true` container: p50, p99, ratio to runc;
//!   (b) RunPodSandbox through CRI (StopPodSandbox and RemovePodSandbox untimed): same;
//!   (c) the shim's memory per running sandbox: PSS of the shim process, and for rund the same
//!       with guest RAM (its memfd mappings) left out;
//!   (d) the split of rund's sandbox starts that its shim logs (`rund-start-split` lines in
//!       containerd's log): p50 per phase.
//! Runtimes from `RUND_E2E_RUNTIMES` (see `rund_tests::containerd`). Needs root and containerd;
//! with rund, a KVM that runs Linux guests (the testbed).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use rund_tests::containerd::bench::{p50_p99_ms, start_splits, START_PHASES};
use rund_tests::containerd::host::process_memory;
use rund_tests::containerd::{
    missing_prerequisites, runtimes_under_test, Containerd, Runtime, BUSYBOX_IMAGE, CTR_NAMESPACE,
};
use rund_tests::cri::{host_network_pod_config, CriClient};
use rund_tests::devbench::Figure;

#[derive(Parser)]
struct Args {
    /// Timed runs per runtime and measurement.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Untimed runs per runtime before them (first start of a shim, caches).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// How long a sandbox idles before its shim's memory is read.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
}

type Samples = Vec<(Runtime, Vec<Duration>)>;

fn figure(name: String, value: f64, unit: &'static str) {
    println!("{}", Figure { name, value, unit });
}

/// Prints p50/p99 per runtime and each runtime's ratio to runc (the first).
fn report(what: &str, samples: &Samples) {
    let mut runc = None;
    for (rt, durations) in samples {
        let Some((p50, p99)) = p50_p99_ms(durations) else {
            println!("  {rt}: no samples");
            continue;
        };
        println!("  {rt:5}: p50 {p50:9.2} ms   p99 {p99:9.2} ms");
        figure(format!("{what}-{rt}-p50"), p50, "ms");
        figure(format!("{what}-{rt}-p99"), p99, "ms");
        match runc {
            None => runc = Some((p50, p99)),
            Some((r50, r99)) => {
                println!(
                    "  ratio {rt}/runc: p50 {:6.2}x   p99 {:6.2}x   (1 = as fast as runc)",
                    p50 / r50,
                    p99 / r99
                );
                figure(format!("{what}-{rt}/runc-p50"), p50 / r50, "x");
                figure(format!("{what}-{rt}/runc-p99"), p99 / r99, "x");
            }
        }
    }
}

/// (a) `ctr run --rm <image> <id> true`, interleaved.
fn ctr_run_true(cd: &Containerd, args: &Args) -> Result<Samples, String> {
    let mut samples: Samples = cd.runtimes().iter().map(|&rt| (rt, Vec::new())).collect();
    for i in 0..args.warmup + args.runs {
        for (rt, durations) in samples.iter_mut() {
            let id = cd.unique_id(&format!("bench-run-{i}"), *rt);
            let start = Instant::now();
            let out = cd
                .ctr(&[
                    "run",
                    "--rm",
                    "--runtime",
                    rt.runtime_type(),
                    BUSYBOX_IMAGE,
                    &id,
                    "true",
                ])
                .map_err(|e| e.to_string())?;
            let took = start.elapsed();
            eprintln!("  (a) round {i} {rt}: {:.2} s", took.as_secs_f64());
            if !out.success() {
                return Err(format!(
                    "{rt}: ctr run exited {:?}: {}",
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
    let mut samples: Samples = cd.runtimes().iter().map(|&rt| (rt, Vec::new())).collect();
    for i in 0..args.warmup + args.runs {
        for (rt, durations) in samples.iter_mut() {
            let name = cd.unique_id(&format!("bench-pod-{i}"), *rt);
            let config = host_network_pod_config(&name, &name, &log_dir);
            let start = Instant::now();
            let id = cri
                .run_pod_sandbox(&config, rt.name())
                .await
                .map_err(|e| format!("{rt}: {e}"))?;
            let took = start.elapsed();
            eprintln!("  (b) round {i} {rt}: {:.2} s", took.as_secs_f64());
            cri.stop_pod_sandbox(&id)
                .await
                .map_err(|e| format!("{rt}: {e}"))?;
            cri.remove_pod_sandbox(&id)
                .await
                .map_err(|e| format!("{rt}: {e}"))?;
            if i >= args.warmup {
                durations.push(took);
            }
        }
    }
    Ok(samples)
}

/// (c) The shim's memory while one `sleep` container of each runtime idles.
fn shim_memory(cd: &Containerd, args: &Args) -> Result<(), String> {
    for &rt in cd.runtimes() {
        let id = cd.unique_id("bench-memory", rt);
        cd.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            rt.runtime_type(),
            BUSYBOX_IMAGE,
            &id,
            "sleep",
            "100000",
        ])
        .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(args.settle_secs));
        // The only sandbox running, so the only shim of this containerd.
        let shims = cd.shim_servers().map_err(|e| e.to_string())?;
        let measured = match shims.as_slice() {
            [shim] => process_memory(shim.pid).map_err(|e| format!("{rt}: shim {}: {e}", shim.pid)),
            other => Err(format!("{rt}: expected one shim, found {}", other.len())),
        };
        // Removed before any error is returned: the next runtime starts from a clean host.
        for args in [
            vec!["task", "kill", "-s", "SIGKILL", &id],
            vec!["task", "delete", "-f", &id],
            vec!["container", "delete", &id],
        ] {
            if let Err(e) = cd.ctr_ok(&args) {
                eprintln!("{rt}: cleanup: {e}");
            }
        }
        let m = measured?;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let own = m.own_pss_kib();
        println!(
            "  {rt:5} ({}): PSS {:7.2} MiB   without guest RAM {:7.2} MiB   guest RAM {:7.2} MiB",
            rt.shim_name(),
            mib(m.pss_kib),
            mib(own),
            mib(m.guest_ram_pss_kib)
        );
        figure(format!("shim-pss-{rt}"), mib(m.pss_kib), "MiB");
        figure(format!("shim-pss-without-guest-ram-{rt}"), mib(own), "MiB");
    }
    cd.wait_until_clean(CTR_NAMESPACE)
        .map_err(|e| e.to_string())
}

/// (d) p50 of each phase over every split line rund's shim logged during this run.
fn start_split(cd: &Containerd) -> Result<(), String> {
    let log = std::fs::read_to_string(cd.log_path()).map_err(|e| e.to_string())?;
    let splits = start_splits(&log);
    if splits.is_empty() {
        return Err(format!(
            "no rund-start-split line in containerd's log {}",
            cd.log_path().display()
        ));
    }
    println!("  {} sandbox starts", splits.len());
    for phase in START_PHASES {
        let mut ms: Vec<f64> = splits.iter().filter_map(|s| s.phase(phase)).collect();
        ms.sort_by(f64::total_cmp);
        match ms.get(ms.len().saturating_sub(1) / 2) {
            Some(p50) => {
                println!("  {phase:13} p50 {p50:9.2} ms   ({} lines)", ms.len());
                figure(format!("rund-start-{phase}-p50"), *p50, "ms");
            }
            None => println!("  {phase:13} missing from every line"),
        }
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

    println!("bench-start (c): the shim's memory with one idle sandbox (PSS)");
    step("(c)", shim_memory(&cd, &args));

    println!("bench-start (d): split of rund's sandbox start (from the shim's log)");
    if runtimes.contains(&Runtime::Rund) {
        step("(d)", start_split(&cd));
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
