//! `ci/bench-devices`: each device against QEMU's and against the same operation done natively,
//! in one run.
//!
//! Natively (in the machine that runs the VMM, the testbed here), in a condensed-kernel guest of
//! rund's VMM and in the same guest under QEMU's microvm machine with its counterparts of rund's
//! devices (`virtio-blk-device`, `vhost-vsock-device`, `vhost-user-fs-device` served by
//! virtiofsd), the same code ([`rund_tests::devbench`]) measures: vsock against a unix socket pair (send and
//! receive throughput, 1-byte round trip), virtio-fs against the host's own filesystem (one large
//! file, a directory of small files; the host's page cache warm for both, the guest's dropped
//! before each read so that the files come through the device), and virtio-blk against O_DIRECT
//! on a host file like the one behind it (sequential 1 MiB writes and reads, random 4 KiB reads).
//!
//! The guest is configured as a sandbox is (one vCPU; the read-only share with the image layers'
//! cache policy, `always`). Its side of each benchmark is run by `rund-guest-probe bench-agent`,
//! driven over vsock, so that every figure is taken natively, under rund and under QEMU one right
//! after the other, in [`ROUNDS`] rounds: the machine is shared and its speed drifts (the nested
//! testbed's by 2x and more within minutes), which a ratio of figures taken minutes apart would
//! absorb. The median of the rounds is reported, with rund's ratio to QEMU (the target: at least
//! 1) and to native (context).
//!
//! Where the time goes, for each guest figure: the CPU each VMM's threads used, and, from KVM's
//! per-VM debugfs counters, the exits taken (all, to user space for MMIO, halts) and interrupts
//! injected; the table gives each side's exits per request.
//!
//! Needs RUND_GUEST_KERNEL_DIR, RUND_GUEST_PROBE, RUND_VIRTIOFSD (a virtiofsd binary), QEMU
//! (RUND_QEMU_BIN, default qemu-system-x86_64), /dev/vhost-vsock and a Linux-capable KVM;
//! RUND_BENCH_DIR names a directory on a real disk filesystem (the testbed's /scratch) for the
//! files. RUND_BENCH_ONLY (name prefixes, comma-separated: `vsock,blk-seq`) runs only the
//! benchmarks it names, for a look at one device.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rund_tests::devbench::{self, Figure};
use rund_tests::initramfs::{Initramfs, BUSYBOX};
use rund_tests::qemu::{self, Microvm};
use rund_tests::{GuestKernel, MarkerConsole, GUEST_CMDLINE};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::fs::{CachePolicy, Fs, FsConfig, GuestIds};
use vmm::devices::virtio::vsock::Vsock;
use vmm::{SerialOutput, Vm, VmConfig, VmExit};
use vsock::VsockStream;

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
         fallocate -l {DISK} {d}/qemu-disk.img
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

/// A stream to a guest's bench agent: through rund's hybrid vsock socket, or the host's vsock.
enum GuestStream {
    Hybrid(UnixStream),
    Vsock(VsockStream),
}

impl Read for GuestStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            GuestStream::Hybrid(s) => s.read(buf),
            GuestStream::Vsock(s) => s.read(buf),
        }
    }
}

impl Write for GuestStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            GuestStream::Hybrid(s) => s.write(buf),
            GuestStream::Vsock(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl GuestStream {
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            GuestStream::Hybrid(s) => s.shutdown(Shutdown::Write),
            GuestStream::Vsock(s) => s.shutdown(Shutdown::Write),
        }
    }
}

/// How a guest's bench agent is reached.
#[derive(Clone)]
enum GuestLink {
    /// rund's hybrid vsock: a unix socket and a `CONNECT <port>` line.
    Hybrid(PathBuf),
    /// The kernel's vsock to a guest CID (QEMU's vhost-vsock).
    Vsock(u32),
}

impl GuestLink {
    fn connect(&self) -> io::Result<GuestStream> {
        match self {
            GuestLink::Hybrid(socket) => {
                let mut s = UnixStream::connect(socket)?;
                writeln!(s, "CONNECT {PORT}")?;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while b[0] != b'\n' && line.len() < 64 {
                    s.read_exact(&mut b)?;
                    line.push(b[0]);
                }
                if !line.starts_with(b"OK ") {
                    return Err(io::Error::other(format!("CONNECT answered {line:?}")));
                }
                Ok(GuestStream::Hybrid(s))
            }
            GuestLink::Vsock(cid) => Ok(GuestStream::Vsock(VsockStream::connect_with_cid_port(
                *cid, PORT,
            )?)),
        }
    }

    /// One request to the guest's bench agent; returns its one-line answer.
    fn ask(&self, request: &str) -> io::Result<String> {
        let mut s = self.connect()?;
        writeln!(s, "{request}")?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer)?;
        Ok(answer.trim().to_string())
    }

    /// Runs a file or disk benchmark in the guest (`args`: a `rund-guest-probe` bench line).
    fn run(&self, args: &str) -> io::Result<f64> {
        let answer = self.ask(&format!("RUN {args}"))?;
        Figure::parse(&answer)
            .map(|f| f.value)
            .ok_or_else(|| io::Error::other(format!("guest answered {answer:?}")))
    }
}

type Measure = Box<dyn Fn() -> io::Result<f64>>;
type GuestMeasure = Box<dyn Fn(&GuestLink) -> io::Result<f64>>;

/// One figure, and how to take it natively and in a guest.
struct Benchmark {
    name: &'static str,
    unit: &'static str,
    /// What one request is, and how many a figure makes (for exits per request).
    request: (&'static str, f64),
    native: Measure,
    guest: GuestMeasure,
}

const MIB: f64 = (1 << 20) as f64;

fn benchmarks(dir: &Path) -> Vec<Benchmark> {
    let (share, native_disk) = (dir.join("share"), dir.join("native-disk.img"));
    let guest = |args: String| -> GuestMeasure { Box::new(move |link| link.run(&args)) };
    let stream = |f: fn(UnixStream) -> io::Result<f64>,
                  g: fn(GuestStream) -> io::Result<f64>|
     -> (Measure, GuestMeasure) {
        (
            Box::new(move || f(pair_served())),
            Box::new(move |link| g(link.connect()?)),
        )
    };
    let (send_native, send_guest) = stream(
        |s| devbench::send_throughput(s, |s| s.shutdown(Shutdown::Write), STREAM_BYTES),
        |s| devbench::send_throughput(s, GuestStream::shutdown_write, STREAM_BYTES),
    );
    let (receive_native, receive_guest) = stream(
        |s| devbench::receive_throughput(s, STREAM_BYTES),
        |s| devbench::receive_throughput(s, STREAM_BYTES),
    );
    let (rtt_native, rtt_guest) = stream(
        |s| devbench::round_trip_us(s, ROUND_TRIPS),
        |s| devbench::round_trip_us(s, ROUND_TRIPS),
    );
    let big = share.join("big");
    let small = share.join("small");
    let (d1, d2, d3) = (native_disk.clone(), native_disk.clone(), native_disk);
    let stream_mib = ("MiB", STREAM_BYTES as f64 / MIB);
    let seq_mib = ("MiB", SEQ_BYTES as f64 / MIB);
    vec![
        Benchmark {
            name: "vsock-send",
            unit: "MB/s",
            request: stream_mib,
            native: send_native,
            guest: send_guest,
        },
        Benchmark {
            name: "vsock-receive",
            unit: "MB/s",
            request: stream_mib,
            native: receive_native,
            guest: receive_guest,
        },
        Benchmark {
            name: "vsock-round-trip",
            unit: "us",
            request: ("round trip", ROUND_TRIPS as f64),
            native: rtt_native,
            guest: rtt_guest,
        },
        Benchmark {
            name: "fs-read-file",
            unit: "MB/s",
            request: ("MiB", BIG_FILE as f64 / MIB),
            native: Box::new(move || devbench::read_file(&big)),
            guest: guest("--name fs-read-file read-file /mnt/share/big --drop-caches".into()),
        },
        Benchmark {
            name: "fs-read-tree",
            unit: "files/s",
            request: ("file", SMALL_FILES as f64),
            native: Box::new(move || devbench::read_tree(&small)),
            guest: guest("--name fs-read-tree read-tree /mnt/share/small --drop-caches".into()),
        },
        Benchmark {
            name: "blk-seq-write",
            unit: "MB/s",
            request: seq_mib,
            native: Box::new(move || devbench::sequential_direct(&d1, SEQ_BYTES, true)),
            guest: guest(format!(
                "--name blk-seq-write sequential /dev/vda --bytes {SEQ_BYTES} --write"
            )),
        },
        Benchmark {
            name: "blk-seq-read",
            unit: "MB/s",
            request: seq_mib,
            native: Box::new(move || devbench::sequential_direct(&d2, SEQ_BYTES, false)),
            guest: guest(format!(
                "--name blk-seq-read sequential /dev/vda --bytes {SEQ_BYTES}"
            )),
        },
        Benchmark {
            name: "blk-rand-read",
            unit: "IOPS",
            request: ("read", RANDOM_OPS as f64),
            native: Box::new(move || devbench::random_reads_direct(&d3, SEQ_BYTES, RANDOM_OPS)),
            guest: guest(format!(
                "--name blk-rand-read random-reads /dev/vda --span {SEQ_BYTES} --ops {RANDOM_OPS}"
            )),
        },
    ]
}

/// The benchmarks whose names start with one of the comma-separated prefixes in `only` (all
/// without it); a selection that matches nothing is refused, not run empty.
fn selected(all: Vec<Benchmark>, only: Option<String>) -> Vec<Benchmark> {
    let Some(only) = only.filter(|o| !o.trim().is_empty()) else {
        return all;
    };
    let names: Vec<_> = all.iter().map(|b| b.name).collect();
    let prefixes: Vec<_> = only.split(',').map(str::trim).collect();
    let picked: Vec<_> = all
        .into_iter()
        .filter(|b| {
            prefixes
                .iter()
                .any(|p| !p.is_empty() && b.name.starts_with(p))
        })
        .collect();
    assert!(
        !picked.is_empty(),
        "RUND_BENCH_ONLY={only:?} names none of the benchmarks: {}",
        names.join(", ")
    );
    picked
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

fn wait_for(what: &str, deadline: Instant, text: impl Fn() -> String) {
    loop {
        let t = text();
        if t.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "guest never printed {what:?}; console:\n{t}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The initramfs both guests boot: busybox, the probe as the bench agent.
fn write_initramfs(dir: &Path) -> PathBuf {
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
    initrd
}

/// rund's VM: the three devices over `dir`'s files.
fn rund_config(dir: &Path, initrd: &Path, socket: &Path, console: &MarkerConsole) -> VmConfig {
    let kernel = GuestKernel::CondensedElf
        .path()
        .unwrap_or_else(|e| panic!("bench-devices needs the guest kernel: {e}"));
    let mut config = VmConfig::new(&kernel);
    config.initrd = Some(initrd.into());
    config.cmdline = GUEST_CMDLINE.into();
    // A sandbox's default (shim-v2's `default_vcpus`).
    config.vcpus = 1;
    config.mem_mib = GUEST_MEM_MIB;
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
                ids: GuestIds::any(),
            })
            .expect("virtio-fs"),
        )),
        Arc::new(Mutex::new(Vsock::new(3, socket).expect("vsock"))),
    ];
    config
}

/// Guest RAM of both guests.
const GUEST_MEM_MIB: u32 = 512;

/// The same guest under QEMU, with QEMU's counterparts of rund's devices: virtio-blk on a file
/// like rund's (host page cache, as rund's), vhost-vsock, and virtio-fs served by virtiofsd with
/// the same cache policy, read-only.
struct QemuGuest {
    qemu: Reaped,
    virtiofsd: Reaped,
    cid: u32,
    console: PathBuf,
}

impl QemuGuest {
    fn start(dir: &Path, initrd: &Path, deadline: Instant) -> QemuGuest {
        let virtiofsd_bin = std::env::var_os("RUND_VIRTIOFSD")
            .expect("RUND_VIRTIOFSD names a virtiofsd binary (ci/bench-devices installs one)");
        let fs_socket = dir.join("virtiofsd.sock");
        let virtiofsd = Command::new(virtiofsd_bin)
            .arg("--socket-path")
            .arg(&fs_socket)
            .arg("--shared-dir")
            .arg(dir.join("share"))
            .args(["--cache", "always", "--sandbox", "none", "--readonly"])
            .stdin(Stdio::null())
            .spawn()
            .map(Reaped)
            .expect("start virtiofsd");
        while !fs_socket.exists() {
            assert!(
                Instant::now() < deadline,
                "virtiofsd made no socket at {}",
                fs_socket.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
        let kernel = GuestKernel::CondensedBzImage
            .path()
            .unwrap_or_else(|e| panic!("bench-devices needs the guest bzImage: {e}"));
        let console = dir.join("qemu-console.log");
        // Unique on the machine while this process lives; 0-2 are reserved.
        let cid = 3 + std::process::id();
        let mut cmd = Microvm {
            kernel,
            initrd: initrd.into(),
            cmdline: GUEST_CMDLINE.into(),
            mem_mib: GUEST_MEM_MIB,
            shared_memory: true,
            console: console.clone(),
        }
        .command(&qemu::qemu_bin());
        cmd.arg("-drive")
            .arg(format!(
                "id=disk,file={},format=raw,if=none",
                dir.join("qemu-disk.img").display()
            ))
            .args(["-device", "virtio-blk-device,drive=disk"])
            .arg("-chardev")
            .arg(format!("socket,id=fs,path={}", fs_socket.display()))
            .args(["-device", "vhost-user-fs-device,chardev=fs,tag=share"])
            .args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
            .stdin(Stdio::null());
        let qemu = Reaped(cmd.spawn().expect("start qemu"));
        let guest = QemuGuest {
            qemu,
            virtiofsd,
            cid,
            console,
        };
        wait_for("bench-agent listening", deadline, || guest.console_text());
        guest
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for QEMU to exit (the guest rebooted, which `-no-reboot` makes an exit).
    fn wait(&mut self, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.qemu.0.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// A child process killed and reaped when dropped, so that a bench that panics (a guest that
/// never answered) leaves no QEMU or virtiofsd behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whose CPU a guest's figure is charged: this process's threads named `rund-*` (rund's VMM runs
/// here), or a whole process under a label (QEMU, virtiofsd).
#[derive(Clone, Copy)]
enum Watched {
    RundThreads,
    Process(u32, &'static str),
}

/// What a guest's side of a figure cost: CPU seconds by thread or process, and the VM's KVM
/// counters.
struct Costs {
    cpu: Vec<(String, f64)>,
    kvm: Vec<(&'static str, u64)>,
}

/// KVM's per-VM debugfs counters shown (the vCPUs' summed).
const KVM_COUNTERS: [&str; 4] = ["exits", "mmio_exits", "halt_exits", "irq_injections"];

/// CPU seconds of each thread of `pid`, by thread name (clock ticks, 100 a second on Linux).
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let ticks = |stat: &str| -> Option<(String, f64)> {
        let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let f: Vec<&str> = rest.split(' ').collect();
        let t = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some((name.to_string(), t / 100.0))
    };
    let mut threads: Vec<(String, f64)> = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
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
    threads
}

/// The debugfs directory of the one VM process `pid` made (`<pid>-<fd>`).
fn vm_debugfs(pid: u32) -> Option<PathBuf> {
    let prefix = format!("{pid}-");
    std::fs::read_dir("/sys/kernel/debug/kvm")
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
}

impl Costs {
    fn now(vm_pid: u32, watched: &[Watched]) -> Costs {
        let mut cpu = Vec::new();
        for w in watched {
            match *w {
                Watched::RundThreads => cpu.extend(
                    thread_cpu(std::process::id())
                        .into_iter()
                        .filter(|(n, _)| n.starts_with("rund-")),
                ),
                Watched::Process(pid, label) => {
                    cpu.push((label.into(), thread_cpu(pid).iter().map(|t| t.1).sum()))
                }
            }
        }
        let dir = vm_debugfs(vm_pid);
        let kvm = KVM_COUNTERS
            .iter()
            .filter_map(|&c| {
                let v = std::fs::read_to_string(dir.as_ref()?.join(c)).ok()?;
                Some((c, v.trim().parse().ok()?))
            })
            .collect();
        Costs { cpu, kvm }
    }

    /// How much KVM counter `name` grew since `before`, if it was readable both times.
    fn kvm_since(&self, before: &Costs, name: &str) -> Option<u64> {
        let now = self.kvm.iter().find(|(n, _)| *n == name)?.1;
        let then = before.kvm.iter().find(|(n, _)| *n == name)?.1;
        Some(now.saturating_sub(then))
    }

    /// What was spent since `before`, over `wall` seconds, as one line.
    fn since(&self, before: &Costs, wall: f64) -> String {
        let mut line = String::new();
        for (name, t) in &self.cpu {
            let t0 = before
                .cpu
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |x| x.1);
            line += &format!(" {name} {:.0}%", 100.0 * (t - t0) / wall);
        }
        for (name, _) in &self.kvm {
            if let Some(grown) = self.kvm_since(before, name) {
                line += &format!(" {name}={grown}");
            }
        }
        line
    }
}

/// A guest the figures are taken in.
struct Side {
    name: &'static str,
    link: GuestLink,
    vm_pid: u32,
    watched: Vec<Watched>,
}

/// Each side's figures of one benchmark, and its exits per request where counted.
#[derive(Default, Clone)]
struct Taken {
    values: Vec<f64>,
    exits_per_request: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    progress("starting");
    if let Err(e) = vmm::host_check::check_host() {
        panic!("bench-devices needs a KVM that runs Linux guests: {e}");
    }
    let base = std::env::var_os("RUND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).expect("bench directory");
    progress(&format!("preparing files in {}", dir.path().display()));
    prepare(dir.path());
    let initrd = write_initramfs(dir.path());

    progress("booting rund's guest");
    let socket = dir.path().join("vsock.sock");
    let console = MarkerConsole::echoing();
    let config = rund_config(dir.path(), &initrd, &socket, &console);
    let deadline = Instant::now() + GUEST_DEADLINE;
    let mut handle = Vm::new(config).expect("VM").start().expect("start");
    wait_for("bench-agent listening", deadline, || console.text());
    progress("booting QEMU's guest");
    let mut qemu = QemuGuest::start(dir.path(), &initrd, deadline);

    let sides = [
        Side {
            name: "rund",
            link: GuestLink::Hybrid(socket),
            vm_pid: std::process::id(),
            watched: vec![Watched::RundThreads],
        },
        Side {
            name: "qemu",
            link: GuestLink::Vsock(qemu.cid),
            vm_pid: qemu.qemu.0.id(),
            watched: vec![
                Watched::Process(qemu.qemu.0.id(), "qemu"),
                Watched::Process(qemu.virtiofsd.0.id(), "virtiofsd"),
            ],
        },
    ];
    let benches = selected(
        benchmarks(dir.path()),
        std::env::var("RUND_BENCH_ONLY").ok(),
    );
    // Per benchmark: native figures, then each side's.
    let mut taken = vec![(Vec::new(), vec![Taken::default(); sides.len()]); benches.len()];
    for round in 1..=ROUNDS {
        for (b, (natives, guests)) in benches.iter().zip(&mut taken) {
            let native = (b.native)().unwrap_or_else(|e| panic!("native {}: {e}", b.name));
            progress(&format!(
                "round {round}: {:<16} native {native:10.2} {}",
                b.name, b.unit
            ));
            natives.push(native);
            for (side, t) in sides.iter().zip(guests.iter_mut()) {
                let (before, started) = (Costs::now(side.vm_pid, &side.watched), Instant::now());
                let value = (b.guest)(&side.link)
                    .unwrap_or_else(|e| panic!("{} {}: {e}", side.name, b.name));
                let wall = started.elapsed().as_secs_f64();
                let after = Costs::now(side.vm_pid, &side.watched);
                progress(&format!(
                    "round {round}: {:<16} {:<6} {value:10.2} {}  in {wall:.1}s:{}",
                    b.name,
                    side.name,
                    b.unit,
                    after.since(&before, wall)
                ));
                t.values.push(value);
                if let Some(exits) = after.kvm_since(&before, "exits") {
                    t.exits_per_request.push(exits as f64 / b.request.1);
                }
            }
        }
    }
    let quit = (sides[0].link.ask("QUIT"), sides[1].link.ask("QUIT"));
    let exit = handle.wait_timeout(deadline.saturating_duration_since(Instant::now()));
    if exit.is_none() {
        handle.shutdown();
    }
    let qemu_exited = qemu.wait(deadline);
    assert_eq!(
        (quit.0.ok().as_deref(), exit),
        (Some("ok"), Some(VmExit::GuestReset)),
        "rund's guest console:\n{}",
        console.text()
    );
    assert!(
        quit.1.ok().as_deref() == Some("ok") && qemu_exited,
        "QEMU's guest did not quit; console:\n{}",
        qemu.console_text()
    );

    println!(
        "{:<17} {:>10} {:>10} {:>10} {:>9} {:>9}  {:<8} exits per request: rund, qemu \
         (median of {ROUNDS} rounds)",
        "figure", "native", "rund", "qemu", "rund/qemu", "rund/nat", "unit"
    );
    let mut worst = f64::INFINITY;
    for (b, (natives, guests)) in benches.iter().zip(taken) {
        let n = median(natives).unwrap_or(f64::NAN);
        let [r, q] = [&guests[0], &guests[1]].map(|t| median(t.values.clone()).unwrap_or(f64::NAN));
        // Higher is better except for latencies.
        let better = |a: f64, base: f64| if b.unit == "us" { base / a } else { a / base };
        let (vs_qemu, vs_native) = (better(r, q), better(r, n));
        worst = worst.min(vs_qemu);
        let exits = |t: &Taken| {
            median(t.exits_per_request.clone()).map_or_else(|| "-".into(), |e| format!("{e:.1}"))
        };
        println!(
            "{:<17} {n:>10.2} {r:>10.2} {q:>10.2} {vs_qemu:>8.2}x {vs_native:>8.2}x  {:<8} {} , {} per {}",
            b.name,
            b.unit,
            exits(&guests[0]),
            exits(&guests[1]),
            b.request.0
        );
    }
    println!("lowest ratio rund/qemu: {worst:.2}x (target: every device at least 1.00x)");
}
