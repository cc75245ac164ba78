//! In a KVM that runs Linux guests (the testbed): (b) VMM start to the guest init's marker, the
//! condensed kernel against Debian's stock kernel, same VMM, same run, interleaved; then, as
//! processes, rund-vmm against QEMU's microvm machine (the peer a user would otherwise reach for)
//! booting the same condensed bzImage, initramfs and command line, interleaved; (d) the memory of
//! the `rund-vmm` process running the condensed kernel, guest RAM left out.
//!
//! Environment: RUND_GUEST_KERNEL_DIR, RUND_STOCK_KERNEL (as for the guest tests), RUND_VMM_BIN (the
//! rund-vmm binary), RUND_QEMU_BIN (default qemu-system-x86_64), RUND_BENCH_RUNS (boots per
//! kernel, default 5).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rund_tests::containerd::host::{process_memory, ProcessMemory};
use rund_tests::initramfs::{write_busybox_initramfs, BUSYBOX, MARKER_INIT};
use rund_tests::qemu::{self, Microvm};
use rund_tests::{boot_once, GuestKernel, BOOT_TIMEOUT, GUEST_CMDLINE, MARKER};

/// Prints the marker, then stays up long enough to be measured.
const MARKER_THEN_IDLE_INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo \"RUND-MARKER nproc=$(/bin/busybox nproc) $(/bin/busybox grep MemTotal /proc/meminfo)\"
/bin/busybox sleep 3
/bin/busybox reboot -f
";

fn median(v: &mut [Duration]) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn boot_times(initrd: &Path, runs: usize) -> (Vec<Duration>, Vec<Duration>, usize) {
    let condensed = GuestKernel::CondensedElf.path().expect("condensed kernel");
    let stock = GuestKernel::Stock.path().expect("stock kernel");
    let (mut c, mut s, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs {
        for (kernel, out) in [(&condensed, &mut c), (&stock, &mut s)] {
            match boot_once(kernel, initrd, 1, 256) {
                Ok(b) if b.to_marker.is_some() => out.extend(b.to_marker),
                Ok(b) => {
                    failed += 1;
                    eprintln!(
                        "boot of {} ended ({}) before its marker",
                        kernel.display(),
                        b.exit
                    );
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("boot of {} failed: {e}", kernel.display());
                }
            }
        }
    }
    (c, s, failed)
}

/// Runs a VMM process until the marker shows in its serial console file and returns what
/// `at_marker` makes of the process and the time to the marker; the process is killed if it has
/// not exited 30 s after the marker (or after `timeout` without one).
fn run_to_marker<T>(
    mut cmd: Command,
    console: &Path,
    timeout: Duration,
    at_marker: impl FnOnce(&Child, Duration) -> Result<T, String>,
) -> Result<T, String> {
    let _ = std::fs::remove_file(console);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let result = loop {
        let seen = std::fs::read_to_string(console).unwrap_or_default();
        if seen.contains(MARKER) {
            break at_marker(&child, start.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            break Err(format!("ended ({status}) before the marker: {err}{seen}"));
        }
        if start.elapsed() > timeout {
            break Err(format!("no marker after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn rund_vmm_command(vmm_bin: &Path, kernel: &Path, initrd: &Path, console: &Path) -> Command {
    let mut cmd = Command::new(vmm_bin);
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--vcpus",
            "1",
            "--mem-mib",
            "256",
            "--cmdline",
            GUEST_CMDLINE,
        ])
        .arg("--serial")
        .arg(console);
    cmd
}

/// QEMU's microvm booting what rund-vmm boots, with as much memory.
fn qemu_microvm_command(qemu_bin: &Path, kernel: &Path, initrd: &Path, console: &Path) -> Command {
    Microvm {
        kernel: kernel.into(),
        initrd: initrd.into(),
        cmdline: GUEST_CMDLINE.into(),
        mem_mib: 256,
        shared_memory: false,
        console: console.into(),
    }
    .command(qemu_bin)
}

/// rund-vmm and QEMU microvm, each started as a process, alternating.
fn peer_boot_times(
    vmm_bin: &Path,
    qemu_bin: &Path,
    initrd: &Path,
    dir: &Path,
    runs: usize,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let kernel = GuestKernel::CondensedBzImage
        .path()
        .expect("condensed bzImage");
    let console = dir.join("peer-console.log");
    let (mut rund, mut qemu, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs {
        let commands = [
            (
                "rund-vmm",
                rund_vmm_command(vmm_bin, &kernel, initrd, &console),
            ),
            (
                "qemu microvm",
                qemu_microvm_command(qemu_bin, &kernel, initrd, &console),
            ),
        ];
        for ((name, cmd), out) in commands.into_iter().zip([&mut rund, &mut qemu]) {
            match run_to_marker(cmd, &console, BOOT_TIMEOUT, |_, d| Ok(d)) {
                Ok(d) => out.push(d),
                Err(e) => {
                    failed += 1;
                    eprintln!("{name} boot failed: {e}");
                }
            }
        }
    }
    (rund, qemu, failed)
}

/// Prints one series' median and every figure; returns the median.
fn print_series(label: &str, times: &mut [Duration]) -> Option<Duration> {
    let m = median(times);
    let all: Vec<String> = times
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect();
    println!("  {label:<20}median {}   all: {all:?}", secs(m));
    m
}

/// Prints `label`: `num`'s median over `den`'s and the target, when both exist, then the
/// failed boots.
fn print_ratio(
    label: &str,
    (num, den): (Option<Duration>, Option<Duration>),
    target: &str,
    failed: usize,
) {
    if let (Some(num), Some(den)) = (num, den) {
        println!(
            "  {label}: {:.2}x   (target: {target})",
            num.as_secs_f64() / den.as_secs_f64()
        );
    }
    if failed > 0 {
        println!("  boots that failed before the marker: {failed}");
    }
}

fn vmm_memory(vmm_bin: &Path, initrd: &Path, dir: &Path) -> Result<ProcessMemory, String> {
    let kernel = GuestKernel::CondensedElf.path()?;
    let console = dir.join("console.log");
    let cmd = rund_vmm_command(vmm_bin, &kernel, initrd, &console);
    run_to_marker(cmd, &console, Duration::from_secs(120), |child, _| {
        process_memory(child.id() as i32).map_err(|e| e.to_string())
    })
    .map_err(|e| format!("rund-vmm: {e}"))
}

fn size(p: &Path) -> String {
    std::fs::metadata(p).map_or("n/a".into(), |m| {
        format!("{:.2} MiB", m.len() as f64 / (1 << 20) as f64)
    })
}

fn main() {
    let runs: usize = std::env::var("RUND_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().expect("temp dir");
    let initrd = dir.path().join("initrd.cpio");
    write_busybox_initramfs(BUSYBOX.as_ref(), MARKER_INIT, &initrd).expect("initramfs");

    let (mut c, mut s, failed) = boot_times(&initrd, runs);
    println!("bench-boot (b): VMM start to the guest's init marker, 1 vCPU, 256 MiB, {runs} boots each, interleaved");
    let cm = print_series("condensed vmlinux", &mut c);
    let sm = print_series("stock bzImage", &mut s);
    print_ratio("ratio stock/condensed", (sm, cm), "at least 3x", failed);

    let vmm_bin =
        PathBuf::from(std::env::var_os("RUND_VMM_BIN").unwrap_or_else(|| "rund-vmm".into()));
    let qemu_bin = qemu::qemu_bin();
    let (mut r, mut q, failed) = peer_boot_times(&vmm_bin, &qemu_bin, &initrd, dir.path(), runs);
    println!(
        "bench-boot (b): process start to the init marker, condensed bzImage, 1 vCPU, 256 MiB, \
         {runs} boots each, interleaved"
    );
    let rm = print_series("rund-vmm", &mut r);
    let qm = print_series("qemu -M microvm", &mut q);
    print_ratio("ratio rund-vmm/qemu", (rm, qm), "at most 1x", failed);

    let stock = GuestKernel::Stock.path().unwrap_or_default();
    let kdir = PathBuf::from(std::env::var_os("RUND_GUEST_KERNEL_DIR").unwrap_or_default());
    println!("bench-boot (c): kernel sizes");
    println!(
        "  condensed vmlinux {}   bzImage {}",
        size(&kdir.join("vmlinux")),
        size(&kdir.join("bzImage"))
    );
    println!("  stock bzImage     {}", size(&stock));

    let idle_initrd = dir.path().join("idle.cpio");
    write_busybox_initramfs(BUSYBOX.as_ref(), MARKER_THEN_IDLE_INIT, &idle_initrd)
        .expect("initramfs");
    println!("bench-boot (d): rund-vmm process memory with the condensed kernel at its init, 256 MiB guest");
    match vmm_memory(&vmm_bin, &idle_initrd, dir.path()) {
        Ok(m) => {
            println!(
                "  VMM without guest RAM: Rss {:.2} MiB, Pss {:.2} MiB   (target: under 5 MiB)",
                (m.rss_kib - m.guest_ram_rss_kib) as f64 / 1024.0,
                m.own_pss_kib() as f64 / 1024.0
            );
            println!(
                "  with guest RAM:        Rss {:.2} MiB, Pss {:.2} MiB (guest touched {:.2} MiB)",
                m.rss_kib as f64 / 1024.0,
                m.pss_kib as f64 / 1024.0,
                m.guest_ram_rss_kib as f64 / 1024.0
            );
        }
        Err(e) => println!("  not measured: {e}"),
    }
}
