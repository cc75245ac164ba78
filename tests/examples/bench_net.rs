//! The benchmark behind `ci/bench-net`: a pod's network through a private containerd with
//! Debian's CNI plugins (a bridge, host-local addresses), runc against rund, in one run:
//!   (a) TCP throughput between the root namespace and a pod, both ways: `busybox httpd` in the
//!       pod serves a file from the container's tmpfs (pod to root) and takes a POST into a CGI
//!       that discards it (root to pod); `--runs` transfers of `--mib` MiB each way, the median;
//!   (b) round-trip time from the root namespace to the pod: Debian's `ping`, `--pings` of them;
//!   (c) what joining the pod's network adds to rund's start: the shims' `net_ms` (the host's
//!       part: the namespace read, the tap, the redirects) and `net_guest_ms` (the agent's).
//! rund's data path is vhost-net where `/dev/vhost-net` opens (the testbed), else the VMM thread.
//! Runtimes from `RUND_E2E_RUNTIMES`. Needs root, containerd, containernetworking-plugins and
//! iputils-ping; with rund, a KVM that runs Linux guests (the testbed). Compare ratios measured
//! in one run (the testbed is emulated).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use rund_tests::containerd::bench::start_splits;
use rund_tests::containerd::cni::PodCni;
use rund_tests::containerd::{
    missing_prerequisites, runtimes_under_test, Containerd, Runtime, BUSYBOX_IMAGE,
};
use rund_tests::cri::{container_config, pod_network_pod_config, CriClient};
use rund_tests::devbench::Figure;

#[derive(Parser, Clone, Copy)]
struct Args {
    /// Transfers per direction and runtime.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// MiB per transfer (the pod's tmpfs holds the file: at most 48).
    #[arg(long, default_value_t = 16)]
    mib: u64,
    /// Pings per runtime.
    #[arg(long, default_value_t = 20)]
    pings: usize,
    /// rund pods started (and removed) for (c) besides the measured one.
    #[arg(long, default_value_t = 5)]
    starts: usize,
}

/// The pod's server: the file to serve on its tmpfs, a CGI that swallows a POST, httpd.
fn server_script(mib: u64) -> String {
    format!(
        "set -e; mkdir -p /www/cgi-bin; \
         dd if=/dev/zero of=/dev/shm/big bs=1M count={mib} 2>/dev/null; ln -s /dev/shm/big /www/big; \
         printf '#!/bin/sh\\ncat > /dev/null\\nprintf \"Content-Type: text/plain\\\\r\\\\n\\\\r\\\\nok\\\\n\"\\n' \
           > /www/cgi-bin/sink; chmod 755 /www/cgi-bin/sink; exec httpd -f -p 80 -h /www"
    )
}

fn figure(name: String, value: f64, unit: &'static str) {
    println!("{}", Figure { name, value, unit });
}

/// Sends `req` then reads the whole answer; returns its bytes.
fn exchange(addr: SocketAddr, req: &[u8], body: Option<u64>) -> std::io::Result<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    s.write_all(req)?;
    if let Some(mut left) = body {
        let chunk = vec![0u8; 1 << 16];
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])?;
            left -= n as u64;
        }
    }
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf)? {
            0 => return Ok(got),
            n => got += n as u64,
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// MiB/s of `runs` transfers each way: (pod to root, root to pod).
fn throughput(ip: &str, args: &Args) -> Result<(f64, f64), String> {
    let addr: SocketAddr = format!("{ip}:80")
        .parse()
        .map_err(|e| format!("{ip}: {e}"))?;
    let bytes = args.mib << 20;
    // Until the server answers (it writes its file first).
    let deadline = Instant::now() + Duration::from_secs(120);
    while exchange(addr, b"GET / HTTP/1.0\r\n\r\n", None).is_err() {
        if Instant::now() > deadline {
            return Err(format!("no server at {addr}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (mut out, mut inn) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let t = Instant::now();
        let got = exchange(addr, b"GET /big HTTP/1.0\r\n\r\n", None).map_err(|e| e.to_string())?;
        if got < bytes {
            return Err(format!("GET /big: {got} bytes of {bytes}"));
        }
        out.push(args.mib as f64 / t.elapsed().as_secs_f64());
        let post = format!(
            "POST /cgi-bin/sink HTTP/1.0\r\nContent-Type: application/octet-stream\r\nContent-Length: {bytes}\r\n\r\n"
        );
        let t = Instant::now();
        exchange(addr, post.as_bytes(), Some(bytes)).map_err(|e| e.to_string())?;
        inn.push(args.mib as f64 / t.elapsed().as_secs_f64());
    }
    Ok((median(out).unwrap_or(0.0), median(inn).unwrap_or(0.0)))
}

/// Average round trip in ms (`ping -q`'s rtt line).
fn rtt_ms(ip: &str, pings: usize) -> Result<f64, String> {
    let out = Command::new("ping")
        .args(["-q", "-c", &pings.to_string(), "-i", "0.2", "-W", "5", ip])
        .output()
        .map_err(|e| format!("ping: {e} (apt-get install iputils-ping)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 0.051/0.070/0.102/0.016 ms"
    text.lines()
        .find_map(|l| l.split_once(" = ").filter(|(k, _)| k.starts_with("rtt")))
        .and_then(|(_, v)| v.split('/').nth(1)?.parse().ok())
        .ok_or_else(|| format!("ping {ip}: {text}"))
}

struct Measured {
    rt: Runtime,
    out: f64,
    inn: f64,
    rtt: f64,
}

async fn measure(
    cd: &Containerd,
    cri: &mut CriClient,
    rt: Runtime,
    args: &Args,
) -> Result<Measured, String> {
    let name = cd.unique_id("bench-net", rt);
    let log_dir = cd.dir().join(format!("logs-{name}"));
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let pod = pod_network_pod_config(&name, &name, &log_dir, "bench-net");
    let id = cri
        .run_pod_sandbox(&pod, rt.name())
        .await
        .map_err(|e| e.to_string())?;
    let ip = cri
        .pod_sandbox_status(&id)
        .await
        .map_err(|e| e.to_string())?
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    let c = container_config(
        "server",
        BUSYBOX_IMAGE,
        &["sh", "-c", &server_script(args.mib)],
        "server.log",
    );
    let result = async {
        let cid = cri
            .create_container(&id, &c, &pod)
            .await
            .map_err(|e| e.to_string())?;
        cri.start_container(&cid).await.map_err(|e| e.to_string())?;
        let (ip2, a) = (ip.clone(), *args);
        let (out, inn) = tokio::task::spawn_blocking(move || throughput(&ip2, &a))
            .await
            .map_err(|e| e.to_string())??;
        let rtt = rtt_ms(&ip, args.pings)?;
        Ok(Measured { rt, out, inn, rtt })
    }
    .await;
    let _ = cri.stop_pod_sandbox(&id).await;
    let _ = cri.remove_pod_sandbox(&id).await;
    result
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtimes = match runtimes_under_test() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-net: {e}");
            return ExitCode::from(2);
        }
    };
    let missing = missing_prerequisites(&runtimes);
    if !missing.is_empty() {
        eprintln!("bench-net: cannot run: {}", missing.join("; "));
        return ExitCode::FAILURE;
    }
    let Some(_cni) = PodCni::install("bench-net") else {
        return ExitCode::FAILURE;
    };
    let cd = match Containerd::start(&runtimes) {
        Ok(cd) => cd,
        Err(e) => {
            eprintln!("bench-net: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "bench-net: runtimes {}, {} x {} MiB each way, {} pings; rund's data path: {}",
        runtimes
            .iter()
            .map(|r| r.name())
            .collect::<Vec<_>>()
            .join(", "),
        args.runs,
        args.mib,
        args.pings,
        if vmm::devices::virtio::net::vhost::available() {
            "vhost-net"
        } else {
            "the VMM thread"
        }
    );
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-net: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let measured: Result<Vec<Measured>, String> = rt.block_on(async {
        let mut cri = CriClient::connect(cd.socket(), Duration::from_secs(120))
            .await
            .map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        for &r in &runtimes {
            all.push(
                measure(&cd, &mut cri, r, &args)
                    .await
                    .map_err(|e| format!("{}: {e}", r.name()))?,
            );
        }
        if runtimes.contains(&Runtime::Rund) {
            for i in 0..args.starts {
                let name = cd.unique_id(&format!("net-start{i}"), Runtime::Rund);
                let log_dir = cd.dir().join(format!("logs-{name}"));
                std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
                let pod = pod_network_pod_config(&name, &name, &log_dir, "net-start");
                let id = cri
                    .run_pod_sandbox(&pod, Runtime::Rund.name())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = cri.stop_pod_sandbox(&id).await;
                let _ = cri.remove_pod_sandbox(&id).await;
            }
        }
        Ok(all)
    });
    let measured = match measured {
        Ok(m) => m,
        Err(e) => {
            eprintln!("bench-net: {e}\n{}", cd.log_tail(30));
            return ExitCode::FAILURE;
        }
    };
    println!("bench-net (a, b): root namespace <-> pod");
    for m in &measured {
        let rt = m.rt.name();
        println!(
            "  {rt:5}: pod->root {:8.2} MiB/s   root->pod {:8.2} MiB/s   rtt {:7.3} ms",
            m.out, m.inn, m.rtt
        );
        figure(format!("net-{rt}-pod-to-root"), m.out, "MiB/s");
        figure(format!("net-{rt}-root-to-pod"), m.inn, "MiB/s");
        figure(format!("net-{rt}-rtt"), m.rtt, "ms");
    }
    if let [runc, rund] = &measured[..] {
        println!(
            "  ratio rund/runc: pod->root {:.2}x   root->pod {:.2}x   rtt {:.2}x   (1 = as runc)",
            rund.out / runc.out,
            rund.inn / runc.inn,
            rund.rtt / runc.rtt
        );
        figure("net-rund/runc-pod-to-root".into(), rund.out / runc.out, "x");
        figure("net-rund/runc-root-to-pod".into(), rund.inn / runc.inn, "x");
        figure("net-rund/runc-rtt".into(), rund.rtt / runc.rtt, "x");
    }
    println!("bench-net (c): joining the pod's network in rund's start (from the shims' log)");
    let log = std::fs::read_to_string(cd.log_path()).unwrap_or_default();
    for phase in ["net_ms", "net_guest_ms"] {
        let v: Vec<f64> = start_splits(&log)
            .iter()
            .filter_map(|s| s.phase(phase))
            .collect();
        let starts = v.len();
        match median(v) {
            Some(p50) => {
                println!("  {phase:12} p50 {p50:8.2} ms   ({starts} starts)");
                figure(format!("rund-start-{phase}-p50"), p50, "ms");
            }
            None => println!("  {phase}: no rund start logged it"),
        }
    }
    ExitCode::SUCCESS
}
