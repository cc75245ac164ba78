//! `ci/bench-devices`: each device against the same operation done natively, in one run.
//!
//! Natively (in the machine that runs the VMM, the testbed here) and in a condensed-kernel guest,
//! the same code ([`rund_tests::devbench`]) measures: vsock against a unix socket pair (send and
//! receive throughput, 1-byte round trip), virtio-fs against the host's own filesystem (one large
//! file, a directory of small files; the host's page cache warm for both, the guest's dropped
//! before each read so that the files come through the device), and virtio-blk against O_DIRECT
//! on a host file like the one behind it (sequential 1 MiB writes and reads, random 4 KiB reads).
//!
//! The guest is configured as a sandbox is (one vCPU; the read-only share with the image layers'
//! cache policy, `always`). Its side of each benchmark is run by `rund-guest-probe bench-agent`,
//! driven over vsock, so that every figure is taken natively and in the guest one right after the
//! other, in [`ROUNDS`] rounds: the machine is shared and its speed drifts (the nested testbed's
//! by 2x and more within minutes), which a ratio of figures taken minutes apart would absorb. The
//! median of the rounds is reported, with rund's ratio to native (above 1 is better than native;
//! the target is 0.5).
//!
//! Where the time goes, for each guest figure: the CPU the vCPU thread (guest code and its exits)
//! and the VMM thread (the devices) used, and, where KVM's debugfs counters are readable, the
//! exits taken (all, to the VMM's user space for MMIO, halts) and interrupts injected.
//!
//! Needs RUND_GUEST_KERNEL_DIR, RUND_GUEST_PROBE and a Linux-capable KVM; RUND_BENCH_DIR names a
//! directory on a real disk filesystem (the testbed's /scratch) for the files.

use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rund_tests::devbench::{self, Figure};
use rund_tests::initramfs::{Initramfs, BUSYBOX};
use rund_tests::{GuestKernel, MarkerConsole, GUEST_CMDLINE};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::fs::{CachePolicy, Fs, FsConfig};
use vmm::devices::virtio::vsock::Vsock;
use vmm::{SerialOutput, Vm, VmConfig, VmExit};

/// Each figure is taken this many times, native and guest alternating; the median is reported.
const ROUNDS: usize = 3;
/// The large file read through virtio-fs.
const BIG_FILE: u64 = 128 << 20;
/// Files in the small-files directory, and their size.
const SMALL_FILES: usize = 10_000;
const SMALL_FILE_BYTES: usize = 1024;
/// The disk images (the guest's and the native one).
const DISK: u64 = 256 << 20;
/// Bytes of each sequential pass; random reads land in the same span.
const SEQ_BYTES: u64 = 128 << 20;
const RANDOM_OPS: u64 = 4000;
/// Bytes of each stream, and round trips of the latency figure.
const STREAM_BYTES: u64 = 64 << 20;
const ROUND_TRIPS: usize = 1000;
/// The guest's bench agent.
const PORT: u32 = 5000;
/// Boot, every round and shutdown; beyond it the guest is stopped and the bench fails.
const GUEST_DEADLINE: Duration = Duration::from_secs(900);

static STARTED: OnceLock<Instant> = OnceLock::new();

/// A progress line on stderr, with the seconds since the bench started (the testbed takes
/// minutes; this shows where).
fn progress(what: &str) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("bench-devices [{t:6.1}s] {what}");
}

fn run(cmd: &str) {
    let st = Command::new("sh").arg("-ec").arg(cmd).status().expect("sh");
    assert!(st.success(), "failed: {cmd}");
}

fn prepare(dir: &Path) {
    let d = dir.display();
    run(&format!(
        "mkdir -p {d}/share/small
         head -c {BIG_FILE} /dev/urandom > {d}/share/big
         fallocate -l {DISK} {d}/disk.img
         fallocate -l {DISK} {d}/native-disk.img"
    ));
    // Written here, not by a shell loop: 10,000 process spawns take minutes in the nested testbed.
    let mut pattern = rund_tests::stream::Pattern::new(7);
    let mut buf = [0u8; SMALL_FILE_BYTES];
    for i in 0..SMALL_FILES {
        pattern.fill(&mut buf);
        std::fs::write(dir.join(format!("share/small/{i}")), buf).expect("small file");
    }
    // The host's page cache warm for both sides, and nothing left to write back while measuring.
    run(&format!(
        "cat {d}/share/big > /dev/null; find {d}/share/small -type f -exec cat {{}} + > /dev/null; sync"
    ));
}

fn pair_served() -> UnixStream {
    let (a, b) = UnixStream::pair().expect("socketpair");
    thread::spawn(move || devbench::serve(b));
    a
}

/// A stream to the guest's bench agent, through the VMM's vsock socket.
fn connect(socket: &Path) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    writeln!(s, "CONNECT {PORT}")?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' && line.len() < 64 {
        io::Read::read_exact(&mut s, &mut b)?;
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::other(format!("CONNECT answered {line:?}")));
    }
    Ok(s)
}

/// One request to the guest's bench agent; returns its one-line answer.
fn ask_guest(socket: &Path, request: &str) -> io::Result<String> {
    let mut s = connect(socket)?;
    writeln!(s, "{request}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim().to_string())
}

/// Runs a file or disk benchmark in the guest (`args`: a `rund-guest-probe` bench line).
fn guest_run(socket: &Path, args: &str) -> io::Result<f64> {
    let answer = ask_guest(socket, &format!("RUN {args}"))?;
    Figure::parse(&answer)
        .map(|f| f.value)
        .ok_or_else(|| io::Error::other(format!("guest answered {answer:?}")))
}

type Measure = Box<dyn Fn() -> io::Result<f64>>;

/// One figure, and how to take it on each side.
struct Benchmark {
    name: &'static str,
    unit: &'static str,
    native: Measure,
    guest: Measure,
}

fn benchmarks(dir: &Path, socket: &Path) -> Vec<Benchmark> {
    let (share, native_disk) = (dir.join("share"), dir.join("native-disk.img"));
    let sock = socket.to_path_buf();
    let guest = move |args: String| -> Measure {
        let sock = sock.clone();
        Box::new(move || guest_run(&sock, &args))
    };
    let sock = socket.to_path_buf();
    let stream = move |f: fn(UnixStream) -> io::Result<f64>| -> (Measure, Measure) {
        let sock = sock.clone();
        (
            Box::new(move || f(pair_served())),
            Box::new(move || f(connect(&sock)?)),
        )
    };
    let (send_native, send_guest) =
        stream(|s| devbench::send_throughput(s, |s| s.shutdown(Shutdown::Write), STREAM_BYTES));
    let (receive_native, receive_guest) = stream(|s| devbench::receive_throughput(s, STREAM_BYTES));
    let (rtt_native, rtt_guest) = stream(|s| devbench::round_trip_us(s, ROUND_TRIPS));
    let big = share.join("big");
    let small = share.join("small");
    let (d1, d2, d3) = (native_disk.clone(), native_disk.clone(), native_disk);
    vec![
        Benchmark {
            name: "vsock-send",
            unit: "MB/s",
            native: send_native,
            guest: send_guest,
        },
        Benchmark {
            name: "vsock-receive",
            unit: "MB/s",
            native: receive_native,
            guest: receive_guest,
        },
        Benchmark {
            name: "vsock-round-trip",
            unit: "us",
            native: rtt_native,
            guest: rtt_guest,
        },
        Benchmark {
            name: "fs-read-file",
            unit: "MB/s",
            native: Box::new(move || devbench::read_file(&big)),
            guest: guest("--name fs-read-file read-file /mnt/share/big --drop-caches".into()),
        },
        Benchmark {
            name: "fs-read-tree",
            unit: "files/s",
            native: Box::new(move || devbench::read_tree(&small)),
            guest: guest("--name fs-read-tree read-tree /mnt/share/small --drop-caches".into()),
        },
        Benchmark {
            name: "blk-seq-write",
            unit: "MB/s",
            native: Box::new(move || devbench::sequential_direct(&d1, SEQ_BYTES, true)),
            guest: guest(format!(
                "--name blk-seq-write sequential /dev/vda --bytes {SEQ_BYTES} --write"
            )),
        },
        Benchmark {
            name: "blk-seq-read",
            unit: "MB/s",
            native: Box::new(move || devbench::sequential_direct(&d2, SEQ_BYTES, false)),
            guest: guest(format!(
                "--name blk-seq-read sequential /dev/vda --bytes {SEQ_BYTES}"
            )),
        },
        Benchmark {
            name: "blk-rand-read",
            unit: "IOPS",
            native: Box::new(move || devbench::random_reads_direct(&d3, SEQ_BYTES, RANDOM_OPS)),
            guest: guest(format!(
                "--name blk-rand-read random-reads /dev/vda --span {SEQ_BYTES} --ops {RANDOM_OPS}"
            )),
        },
    ]
}

fn guest_init() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /mnt/share
mount -t virtiofs share /mnt/share
/bin/rund-guest-probe bench-agent --port {PORT}
echo RUND-BENCH-DONE
reboot -f
"#
    )
}

fn wait_for(console: &MarkerConsole, what: &str, deadline: Instant) {
    while !console.text().contains(what) {
        assert!(
            Instant::now() < deadline,
            "guest never printed {what:?}; console:\n{}",
            console.text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's VM: the three devices over `dir`'s files, the probe as the bench agent.
fn guest_config(dir: &Path, kernel: &Path, socket: &Path, console: &MarkerConsole) -> VmConfig {
    let mut initramfs = Initramfs::new(BUSYBOX.as_ref()).expect("busybox");
    initramfs.init(&guest_init());
    let probe = std::env::var_os("RUND_GUEST_PROBE")
        .map(PathBuf::from)
        .expect("RUND_GUEST_PROBE names the rund-guest-probe binary (ci/bench-devices sets it)");
    initramfs
        .program(&probe, "/bin/rund-guest-probe")
        .expect("pack the probe");
    let initrd = dir.join("initrd.cpio");
    initramfs.write(&initrd).expect("write the initramfs");

    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd);
    config.cmdline = GUEST_CMDLINE.into();
    // A sandbox's default (shim-v2's `default_vcpus`).
    config.vcpus = 1;
    config.mem_mib = 512;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    config.devices = vec![
        Arc::new(Mutex::new(
            Block::new(&dir.join("disk.img"), false).expect("virtio-blk"),
        )),
        Arc::new(Mutex::new(
            Fs::new(FsConfig {
                tag: "share".into(),
                shared_dir: dir.join("share"),
                read_only: true,
                // What the shim gives read-only image layers.
                cache: CachePolicy::Always,
                xattr: false,
            })
            .expect("virtio-fs"),
        )),
        Arc::new(Mutex::new(Vsock::new(3, socket).expect("vsock"))),
    ];
    config
}

/// What the guest's side of a figure cost: CPU seconds per thread of this process (by name), and
/// KVM's counters.
struct Costs {
    threads: Vec<(String, f64)>,
    kvm: Vec<(&'static str, u64)>,
}

/// KVM's debugfs counters shown (all VMs of the machine; only the bench's runs).
const KVM_COUNTERS: [&str; 4] = ["exits", "mmio_exits", "halt_exits", "irq_injections"];

impl Costs {
    fn now() -> Costs {
        let mut threads: Vec<(String, f64)> = Vec::new();
        // Clock ticks, 100 a second on Linux.
        let ticks = |stat: &str| -> Option<(String, f64)> {
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let f: Vec<&str> = rest.split(' ').collect();
            let t = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some((name.to_string(), t / 100.0))
        };
        for task in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            if let Some((name, t)) = ticks(&stat) {
                match threads.iter_mut().find(|(n, _)| *n == name) {
                    Some(e) => e.1 += t,
                    None => threads.push((name, t)),
                }
            }
        }
        let kvm = KVM_COUNTERS
            .iter()
            .filter_map(|&c| {
                let v = std::fs::read_to_string(format!("/sys/kernel/debug/kvm/{c}")).ok()?;
                Some((c, v.trim().parse().ok()?))
            })
            .collect();
        Costs { threads, kvm }
    }

    /// What was spent since `before`, over `wall` seconds, as one line.
    fn since(&self, before: &Costs, wall: f64) -> String {
        let mut line = String::new();
        for (name, t) in &self.threads {
            let t0 = before
                .threads
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |x| x.1);
            if name.starts_with("rund-") {
                line += &format!(" {name} {:.0}%", 100.0 * (t - t0) / wall);
            }
        }
        for (name, v) in &self.kvm {
            let v0 = before
                .kvm
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |x| x.1);
            line += &format!(" {name}={}", v.saturating_sub(v0));
        }
        line
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    progress("starting");
    let kernel = GuestKernel::CondensedElf
        .path()
        .unwrap_or_else(|e| panic!("bench-devices needs the guest kernel: {e}"));
    if let Err(e) = vmm::host_check::check_host() {
        panic!("bench-devices needs a KVM that runs Linux guests: {e}");
    }
    let base = std::env::var_os("RUND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).expect("bench directory");
    progress(&format!("preparing files in {}", dir.path().display()));
    prepare(dir.path());

    progress("booting the guest");
    let socket = dir.path().join("vsock.sock");
    let console = MarkerConsole::echoing();
    let config = guest_config(dir.path(), &kernel, &socket, &console);
    let deadline = Instant::now() + GUEST_DEADLINE;
    let mut handle = Vm::new(config).expect("VM").start().expect("start");
    wait_for(&console, "bench-agent listening", deadline);

    let benches = benchmarks(dir.path(), &socket);
    let mut taken = vec![(Vec::new(), Vec::new()); benches.len()];
    for round in 1..=ROUNDS {
        for (b, (natives, guests)) in benches.iter().zip(&mut taken) {
            let native = (b.native)().unwrap_or_else(|e| panic!("native {}: {e}", b.name));
            let (before, started) = (Costs::now(), Instant::now());
            let guest = (b.guest)().unwrap_or_else(|e| panic!("rund {}: {e}", b.name));
            let wall = started.elapsed().as_secs_f64();
            progress(&format!(
                "round {round}: {:<16} native {native:10.2}  rund {guest:10.2}  {}\n    \
                 rund's {wall:.1}s:{}",
                b.name,
                b.unit,
                Costs::now().since(&before, wall)
            ));
            natives.push(native);
            guests.push(guest);
        }
    }
    let quit = ask_guest(&socket, "QUIT");
    let exit = handle.wait_timeout(deadline.saturating_duration_since(Instant::now()));
    if exit.is_none() {
        handle.shutdown();
    }
    assert_eq!(
        (quit.ok().as_deref(), exit),
        (Some("ok"), Some(VmExit::GuestReset)),
        "guest console:\n{}",
        console.text()
    );

    println!(
        "{:<18} {:>12} {:>12} {:>8}  unit (median of {ROUNDS} rounds)",
        "figure", "native", "rund", "ratio"
    );
    let mut worst = f64::INFINITY;
    for (b, (natives, guests)) in benches.iter().zip(taken) {
        let (n, g) = (median(natives), median(guests));
        // Higher is better except for latencies.
        let ratio = if b.unit == "us" { n / g } else { g / n };
        worst = worst.min(ratio);
        println!(
            "{:<18} {n:>12.2} {g:>12.2} {ratio:>7.2}x  {}",
            b.name, b.unit
        );
    }
    println!("lowest ratio: {worst:.2}x (target: every ratio at least 0.50x)");
}
