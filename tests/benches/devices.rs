//! `ci/bench-devices`: each device against the same operation done natively, in one run.
//!
//! Natively (in the machine that runs the VMM, the testbed here) and in a condensed-kernel guest,
//! the same code ([`rund_tests::devbench`]) measures: vsock against a unix socket pair (send and
//! receive throughput, 1-byte round trip), virtio-fs against the host's own filesystem (one large
//! file, 10,000 small files; the host's page cache warm for both), and virtio-blk against O_DIRECT
//! on the host file behind it (sequential 1 MiB, random 4 KiB reads). Prints the raw figures and
//! rund's ratio to native (above 1 is better than native; the target is 0.5).
//!
//! Needs RUND_GUEST_KERNEL_DIR and a Linux-capable KVM; RUND_BENCH_DIR names a directory on a real
//! disk filesystem (the testbed's /scratch) for the files.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rund_tests::devbench::{self, Figure};
use rund_tests::initramfs::{Initramfs, BUSYBOX};
use rund_tests::{GuestKernel, MarkerConsole, GUEST_CMDLINE};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::fs::{CachePolicy, Fs, FsConfig};
use vmm::devices::virtio::vsock::Vsock;
use vmm::{SerialOutput, Vm, VmConfig, VmExit};

const BIG_FILE: u64 = 128 << 20;
const SMALL_FILES: usize = 10_000;
const DISK: u64 = 256 << 20;
const SEQ_BYTES: u64 = 128 << 20;
const RANDOM_OPS: u64 = 4000;
const STREAM_BYTES: u64 = 256 << 20;
const ROUNDS: usize = 2000;
const PORT: u32 = 5000;

fn run(cmd: &str) {
    let st = Command::new("sh").arg("-ec").arg(cmd).status().expect("sh");
    assert!(st.success(), "failed: {cmd}");
}

fn prepare(dir: &Path) {
    let d = dir.display();
    run(&format!(
        "mkdir -p {d}/share/small
         head -c {BIG_FILE} /dev/urandom > {d}/share/big
         rm -f {d}/disk.img && fallocate -l {DISK} {d}/disk.img"
    ));
    // Written here, not by a shell loop: 10,000 process spawns take minutes in the nested testbed.
    let mut pattern = rund_tests::stream::Pattern::new(7);
    let mut buf = [0u8; 1024];
    for i in 0..SMALL_FILES {
        pattern.fill(&mut buf);
        std::fs::write(dir.join(format!("share/small/{i}")), buf).expect("small file");
    }
    // The host's page cache warm for both sides.
    run(&format!(
        "cat {d}/share/big > /dev/null; find {d}/share/small -type f -exec cat {{}} + > /dev/null"
    ));
}

fn figure(name: &str, value: std::io::Result<f64>, unit: &'static str) -> Figure {
    let f = Figure {
        name: name.into(),
        value: value.unwrap_or_else(|e| panic!("native {name}: {e}")),
        unit,
    };
    // Progress: each figure as it comes (the nested testbed takes minutes per phase).
    eprintln!("bench-devices: native {f}");
    f
}

fn pair_served() -> UnixStream {
    let (a, b) = UnixStream::pair().expect("socketpair");
    thread::spawn(move || devbench::serve(b));
    a
}

fn native(dir: &Path) -> Vec<Figure> {
    let share = dir.join("share");
    let disk = dir.join("disk.img");
    vec![
        figure(
            "vsock-send",
            devbench::send_throughput(pair_served(), |s| s.shutdown(Shutdown::Write), STREAM_BYTES),
            "MB/s",
        ),
        figure(
            "vsock-receive",
            devbench::receive_throughput(pair_served(), STREAM_BYTES),
            "MB/s",
        ),
        figure(
            "vsock-round-trip",
            devbench::round_trip_us(pair_served(), ROUNDS),
            "us",
        ),
        figure(
            "fs-read-file",
            devbench::read_file(&share.join("big")),
            "MB/s",
        ),
        figure(
            "fs-read-tree",
            devbench::read_tree(&share.join("small")),
            "files/s",
        ),
        figure(
            "blk-seq-write",
            devbench::sequential_direct(&disk, SEQ_BYTES, true),
            "MB/s",
        ),
        figure(
            "blk-seq-read",
            devbench::sequential_direct(&disk, SEQ_BYTES, false),
            "MB/s",
        ),
        figure(
            "blk-rand-read",
            devbench::random_reads_direct(&disk, SEQ_BYTES, RANDOM_OPS),
            "IOPS",
        ),
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
p=/bin/rund-guest-probe
$p bench --name fs-read-file read-file /mnt/share/big
$p bench --name fs-read-tree read-tree /mnt/share/small
$p bench --name blk-seq-write sequential /dev/vda --bytes {SEQ_BYTES} --write
$p bench --name blk-seq-read sequential /dev/vda --bytes {SEQ_BYTES}
$p bench --name blk-rand-read random-reads /dev/vda --span {SEQ_BYTES} --ops {RANDOM_OPS}
$p bench-serve --port {PORT} --count 3
echo RUND-BENCH-DONE
reboot -f
"#
    )
}

fn connect(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect to the VMM's vsock socket");
    writeln!(s, "CONNECT {PORT}").expect("CONNECT");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' && line.len() < 64 {
        std::io::Read::read_exact(&mut s, &mut b).expect("OK line");
        line.push(b[0]);
    }
    assert!(line.starts_with(b"OK "), "CONNECT answered {line:?}");
    s
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

fn in_guest(dir: &Path, kernel: &Path) -> Vec<Figure> {
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
    let socket = dir.join("vsock.sock");

    let console = MarkerConsole::echoing();
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd);
    config.cmdline = GUEST_CMDLINE.into();
    config.vcpus = 2;
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
                cache: CachePolicy::Auto,
                xattr: false,
            })
            .expect("virtio-fs"),
        )),
        Arc::new(Mutex::new(Vsock::new(3, &socket).expect("vsock"))),
    ];
    let deadline = Instant::now() + Duration::from_secs(1200);
    let mut handle = Vm::new(config).expect("VM").start().expect("start");
    wait_for(&console, "bench-serve listening", deadline);
    let vsock = [
        (
            "vsock-send",
            devbench::send_throughput(
                connect(&socket),
                |s| s.shutdown(Shutdown::Write),
                STREAM_BYTES,
            ),
            "MB/s",
        ),
        (
            "vsock-receive",
            devbench::receive_throughput(connect(&socket), STREAM_BYTES),
            "MB/s",
        ),
        (
            "vsock-round-trip",
            devbench::round_trip_us(connect(&socket), ROUNDS),
            "us",
        ),
    ];
    let exit = handle.wait_timeout(deadline.saturating_duration_since(Instant::now()));
    if exit.is_none() {
        handle.shutdown();
    }
    let text = console.text();
    assert_eq!(exit, Some(VmExit::GuestReset), "guest console:\n{text}");
    let mut figures: Vec<Figure> = vsock
        .into_iter()
        .map(|(name, v, unit)| Figure {
            name: name.into(),
            value: v.unwrap_or_else(|e| panic!("guest {name}: {e}")),
            unit,
        })
        .collect();
    figures.extend(text.lines().filter_map(Figure::parse));
    figures
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
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
    eprintln!("bench-devices: preparing files in {}", dir.path().display());
    prepare(dir.path());
    eprintln!("bench-devices: files ready; native figures");
    let native = native(dir.path());
    eprintln!("bench-devices: booting the guest");
    let guest = in_guest(dir.path(), &kernel);

    println!(
        "{:<18} {:>12} {:>12} {:>8}  unit",
        "figure", "native", "rund", "ratio"
    );
    let mut worst = f64::INFINITY;
    for n in &native {
        let Some(g) = guest.iter().find(|g| g.name == n.name) else {
            panic!("the guest reported no {}", n.name);
        };
        // Higher is better except for latencies.
        let ratio = if n.unit == "us" {
            n.value / g.value
        } else {
            g.value / n.value
        };
        worst = worst.min(ratio);
        println!(
            "{:<18} {:>12.2} {:>12.2} {:>7.2}x  {}",
            n.name, n.value, g.value, ratio, n.unit
        );
    }
    println!("lowest ratio: {worst:.2}x (target: every ratio at least 0.50x)");
}
