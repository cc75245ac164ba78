//! The benchmark behind `ci/bench-net`: a pod's network through a private containerd with
//! Debian's CNI plugins (a bridge, host-local addresses), runc against rund, in one run:
//!   (a) TCP throughput between the root namespace and a pod, both ways: `busybox httpd` in the
//!       pod serves a file from the container's tmpfs (pod to root) and takes a POST into a CGI
//!       that discards it (root to pod); `--runs` transfers of `--mib` MiB each way, the median;
//!   (b) round-trip time from the root namespace to the pod: Debian's `ping`, `--pings` of them;
//!   (c) what joining the pod's network adds to rund's start: the shims' `net_ms` (the host's
//!       part: the namespace read, the tap, the redirects) and `net_guest_ms` (the agent's).
//! rund's data path is vhost-net where `/dev/vhost-net` opens (the testbed), else the VMM thread.
//! The peer VMM (a) and (b) are also measured against, with `--qemu` (ci/bench-net's default where
//! QEMU is installed): QEMU's microvm with vhost-net (`-netdev tap,vhost=on`), booting the same
//! condensed kernel with a busybox initramfs running the same server, on the same set-up as a
//! rund pod's (a network namespace with a veth on the CNI bridge and a tap, joined by tc ingress
//! redirects both ways), the guest at an address outside the pods' range.
//! Runtimes from `RUND_E2E_RUNTIMES`. Needs root, containerd, containernetworking-plugins and
//! iputils-ping; with rund, a KVM that runs Linux guests (the testbed). Compare ratios measured
//! in one run (the testbed is emulated).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use rund_tests::containerd::bench::start_splits;
use rund_tests::containerd::cni::PodCni;
use rund_tests::containerd::{
    missing_prerequisites, runtimes_under_test, Containerd, Runtime, BUSYBOX_IMAGE,
};
use rund_tests::cri::{container_config, pod_network_pod_config, CriClient};
use rund_tests::devbench::Figure;
use rund_tests::initramfs::{Initramfs, BUSYBOX};
use rund_tests::qemu::{qemu_bin, Microvm};
use rund_tests::{GuestKernel, GUEST_CMDLINE};

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
    /// Also measure QEMU's microvm with vhost-net on the same set-up.
    #[arg(long)]
    qemu: bool,
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

/// The QEMU peer: its network namespace, veth, tap and redirects, and the VM; all removed on drop.
struct QemuPod {
    netns: &'static str,
    qemu: Option<Child>,
    console: PathBuf,
}

impl QemuPod {
    const NETNS: &'static str = "rund-bench-qemu";
    /// The veth's end on the bridge.
    const BRIDGE_END: &'static str = "rbq-br";
    /// The guest's MAC (locally administered).
    const MAC: &'static str = "02:62:71:00:00:01";
    const MEM_MIB: u32 = 256;

    fn run(args: &[&str]) -> Result<(), String> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{}: {e}", args[0]))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn start(dir: &Path, mib: u64) -> Result<QemuPod, String> {
        let kernel = GuestKernel::CondensedBzImage.path()?;
        let mut pod = QemuPod {
            netns: Self::NETNS,
            qemu: None,
            console: dir.join("qemu-net-console.log"),
        };
        let ns = pod.netns;
        Self::run(&["ip", "netns", "add", ns])?;
        for cmd in [
            vec![
                "ip",
                "link",
                "add",
                Self::BRIDGE_END,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ],
            vec![
                "ip",
                "link",
                "set",
                Self::BRIDGE_END,
                "master",
                PodCni::BRIDGE,
                "up",
            ],
            vec!["ip", "-n", ns, "link", "set", "eth0", "up"],
            vec![
                "ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
            ],
            vec!["ip", "-n", ns, "link", "set", "tap0", "up"],
        ] {
            Self::run(&cmd)?;
        }
        for (from, to) in [("eth0", "tap0"), ("tap0", "eth0")] {
            Self::run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", from, "ingress",
            ])?;
            Self::run(&[
                "ip", "netns", "exec", ns, "tc", "filter", "add", "dev", from, "parent", "ffff:",
                "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress",
                "redirect", "dev", to,
            ])?;
        }
        let init = format!(
            "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
             mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
             mkdir -p /dev/shm; mount -t tmpfs shm /dev/shm\n\
             ip link set lo up; ip addr add {addr}/24 dev eth0; ip link set eth0 up\n\
             ip route add default via {gw}\n\
             echo BENCH-NET-UP\n\
             sh /server.sh\n\
             reboot -f\n",
            addr = PodCni::PEER_ADDRESS,
            gw = PodCni::GATEWAY,
        );
        let mut initramfs =
            Initramfs::new(BUSYBOX.as_ref()).map_err(|e| format!("busybox: {e}"))?;
        initramfs.init(&init);
        initramfs.file("server.sh", 0o755, server_script(mib).into_bytes());
        let initrd = dir.join("qemu-net-initrd.cpio");
        initramfs
            .write(&initrd)
            .map_err(|e| format!("{}: {e}", initrd.display()))?;
        let vm = Microvm {
            kernel,
            initrd,
            cmdline: GUEST_CMDLINE.into(),
            mem_mib: Self::MEM_MIB,
            shared_memory: false,
            console: pod.console.clone(),
        }
        .command(&qemu_bin());
        // In the namespace, where the tap is: QEMU opens it by name.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(vm.get_program())
            .args(vm.get_args())
            .args([
                "-netdev",
                "tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=on",
            ])
            .args([
                "-device",
                &format!("virtio-net-device,netdev=net0,mac={}", Self::MAC),
            ])
            .stdin(Stdio::null());
        pod.qemu = Some(cmd.spawn().map_err(|e| format!("starting QEMU: {e}"))?);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !pod.console_text().contains("BENCH-NET-UP") {
            if Instant::now() > deadline {
                return Err(format!(
                    "the QEMU guest never came up:\n{}",
                    pod.console_text()
                ));
            }
            if let Some(Ok(Some(status))) = pod.qemu.as_mut().map(|q| q.try_wait()) {
                return Err(format!("QEMU exited ({status}):\n{}", pod.console_text()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(pod)
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for QemuPod {
    fn drop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        // The namespace takes its tap, redirects and veth (both ends) with it.
        let _ = Self::run(&["ip", "netns", "del", self.netns]);
    }
}

/// The QEMU peer's figures, from the root namespace as a pod's are taken.
fn measure_qemu(dir: &Path, args: &Args) -> Result<(f64, f64, f64), String> {
    let pod = QemuPod::start(dir, args.mib)?;
    let ip = PodCni::PEER_ADDRESS.to_string();
    let (out, inn) = throughput(&ip, args)?;
    let rtt = rtt_ms(&ip, args.pings)?;
    drop(pod);
    Ok((out, inn, rtt))
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
    let qemu = if args.qemu {
        match measure_qemu(cd.dir(), &args) {
            Ok(q) => Some(q),
            Err(e) => {
                eprintln!("bench-net: qemu: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
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
    if let Some((out, inn, rtt)) = qemu {
        println!(
            "  qemu : pod->root {out:8.2} MiB/s   root->pod {inn:8.2} MiB/s   rtt {rtt:7.3} ms   \
             (microvm, vhost-net, the same kernel and server)"
        );
        figure("net-qemu-pod-to-root".into(), out, "MiB/s");
        figure("net-qemu-root-to-pod".into(), inn, "MiB/s");
        figure("net-qemu-rtt".into(), rtt, "ms");
        if let Some(rund) = measured.iter().find(|m| m.rt == Runtime::Rund) {
            println!(
                "  ratio rund/qemu: pod->root {:.2}x   root->pod {:.2}x   rtt {:.2}x   \
                 (target: throughput >= 0.8x)",
                rund.out / out,
                rund.inn / inn,
                rund.rtt / rtt
            );
            figure("net-rund/qemu-pod-to-root".into(), rund.out / out, "x");
            figure("net-rund/qemu-root-to-pod".into(), rund.inn / inn, "x");
            figure("net-rund/qemu-rtt".into(), rund.rtt / rtt, "x");
        }
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
