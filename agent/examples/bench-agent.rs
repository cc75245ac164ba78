//! Benchmark: create, start and wait (and remove) of a `true` container through the agent on this
//! host, against `runc run` of the same bundle, interleaved in one run. Prints p50/p99 of each and
//! the agent/runc ratios. Run by `ci/bench-agent` (root; needs runc and /bin/busybox).
//!
//!   bench-agent --agent PATH [--runc runc] [--iterations 100] [--warmup 5]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::agent::*;
use agent_protocol::client::connect_unix;
use serde_json::json;

struct Args {
    agent: PathBuf,
    runc: String,
    iterations: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        agent: PathBuf::new(),
        runc: "runc".into(),
        iterations: 100,
        warmup: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--agent" => args.agent = PathBuf::from(value()?),
            "--runc" => args.runc = value()?,
            "--iterations" => args.iterations = value()?.parse().map_err(|e| format!("{e}"))?,
            "--warmup" => args.warmup = value()?.parse().map_err(|e| format!("{e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.agent.as_os_str().is_empty() {
        return Err("--agent PATH is required".into());
    }
    Ok(args)
}

fn bundle(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    for d in ["proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/true")).unwrap();
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false, "args": ["/bin/true"], "env": ["PATH=/bin"], "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]}
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&spec).unwrap(),
    )
    .unwrap();
    dir.to_owned()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args = parse_args()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let bundle = bundle(&dir.path().join("bundle"));
    let socket = dir.path().join("agent.sock");
    let mut agent = Command::new(&args.agent)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", args.agent.display()))?;
    let mut client = None;
    for _ in 0..400 {
        if let Ok(c) = connect_unix(&socket).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let client = client.ok_or("the agent did not listen")?;
    let ctx = || ttrpc::context::with_timeout(0);
    let mut spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(bundle.join("config.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    spec["root"]["path"] = json!(bundle.join("rootfs"));
    let spec_json = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    let runc_root = dir.path().join("runc-root");

    let mut agent_times = Vec::new();
    let mut runc_times = Vec::new();
    for i in 0..args.warmup + args.iterations {
        // The agent's path: CreateContainer, StartContainer, WaitProcess, RemoveContainer.
        let id = format!("bench-agent-{}-{i}", std::process::id());
        let t = Instant::now();
        let mut create = CreateContainerRequest::new();
        create.container_id = id.clone();
        create.spec_json = spec_json.clone();
        client
            .create_container(ctx(), &create)
            .await
            .map_err(|e| format!("create: {e:?}"))?;
        let mut c = ContainerRequest::new();
        c.container_id = id.clone();
        client
            .start_container(ctx(), &c)
            .await
            .map_err(|e| format!("start: {e:?}"))?;
        let mut w = ProcessRequest::new();
        w.container_id = id.clone();
        let status = client
            .wait_process(ctx(), &w)
            .await
            .map_err(|e| format!("wait: {e:?}"))?
            .status;
        let mut r = RemoveContainerRequest::new();
        r.container_id = id;
        client
            .remove_container(ctx(), &r)
            .await
            .map_err(|e| format!("remove: {e:?}"))?;
        let agent_time = t.elapsed();
        if status != 0 {
            return Err(format!("the agent's container exited {status}"));
        }

        // runc's path: `runc run` creates, starts, waits and deletes.
        let id = format!("bench-runc-{}-{i}", std::process::id());
        let t = Instant::now();
        let st = Command::new(&args.runc)
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| format!("running {}: {e}", args.runc))?;
        let runc_time = t.elapsed();
        if !st.success() {
            return Err(format!("runc run exited {st}"));
        }
        if i >= args.warmup {
            agent_times.push(agent_time);
            runc_times.push(runc_time);
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();

    agent_times.sort();
    runc_times.sort();
    let (a50, a99) = (
        percentile(&agent_times, 0.5),
        percentile(&agent_times, 0.99),
    );
    let (r50, r99) = (percentile(&runc_times, 0.5), percentile(&runc_times, 0.99));
    println!(
        "create+start+wait+remove of a `true` container, {} runs each, interleaved",
        args.iterations
    );
    println!(
        "agent (ttrpc, libcontainer): p50 {:8.2} ms  p99 {:8.2} ms",
        ms(a50),
        ms(a99)
    );
    println!(
        "runc run                   : p50 {:8.2} ms  p99 {:8.2} ms",
        ms(r50),
        ms(r99)
    );
    println!(
        "ratio agent/runc           : p50 {:8.2}     p99 {:8.2}   (< 1: the agent is faster)",
        ms(a50) / ms(r50),
        ms(a99) / ms(r99)
    );
    Ok(())
}
