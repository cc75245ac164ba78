//! The harness of rund's integration tests that boot a Linux guest.
//!
//! Such tests need a KVM that runs Linux guests: a host with hardware virtualisation, or the nested
//! testbed (`ci/testbed`). On other hosts they print why and return, unless `RUND_REQUIRE_GUEST_TESTS=1`
//! (set by `ci/test`, which runs them in the testbed), where a missing prerequisite fails the test.
//!
//! Kernels come from the environment: `RUND_GUEST_KERNEL_DIR` (the condensed kernel's `vmlinux` and
//! `bzImage`, from `guest-kernel-config/build`) and `RUND_STOCK_KERNEL` (Debian's generic bzImage).

pub mod containerd;
pub mod cri;
pub mod devbench;
pub mod initramfs;
pub mod kubelet;
pub mod qemu;
pub mod stream;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{SerialOutput, Vm, VmConfig, VmExit};

/// The marker line the test init prints.
pub const MARKER: &str = "RUND-MARKER";

/// Kernel command line for the test guests: serial console, reboot through the i8042, reboot on panic,
/// and the i8042 driver told not to probe what is not there (for kernels that have it).
pub const GUEST_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// How long one guest boot may take in the (slow, emulated) testbed before it counts as hung.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Which kernel to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKernel {
    /// The condensed kernel as an ELF vmlinux.
    CondensedElf,
    /// The condensed kernel as a bzImage.
    CondensedBzImage,
    /// Debian's generic kernel, a bzImage.
    Stock,
}

impl GuestKernel {
    /// The kernel's path from the environment, or why it is unknown.
    pub fn path(self) -> Result<PathBuf, String> {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} is not set (ci/test sets it)"))
        };
        let path = match self {
            GuestKernel::CondensedElf => var("RUND_GUEST_KERNEL_DIR")?.join("vmlinux"),
            GuestKernel::CondensedBzImage => var("RUND_GUEST_KERNEL_DIR")?.join("bzImage"),
            GuestKernel::Stock => var("RUND_STOCK_KERNEL")?,
        };
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{} does not exist", path.display()))
        }
    }
}

/// Waits until `deadline` for the guest to end; one still running then is described and stopped.
/// Joins the VMM thread either way (its devices are gone after this). Returns how it ended (`None`:
/// stopped at the deadline) and a clause for failure messages.
pub fn wait_or_stop(mut handle: vmm::VmHandle, deadline: Instant) -> (Option<VmExit>, String) {
    let exit = handle.wait_timeout(deadline.saturating_duration_since(Instant::now()));
    let report = match &exit {
        Some(exit) => format!(" (the microVM stopped: {exit})"),
        None => {
            let report = format!("\n{}", handle.status_report());
            handle.shutdown();
            report
        }
    };
    handle.wait();
    (exit, report)
}

/// Checks a guest's `RUND-CHECK <name> ok|FAIL ...` console lines: each of `want` exactly once,
/// each ok, and no other.
pub fn assert_guest_checks(test: &str, console: &str, want: &[&str]) {
    let mut seen = std::collections::BTreeSet::new();
    for line in console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RUND-CHECK "))
    {
        let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
        assert!(
            rest.split_whitespace().next() == Some("ok"),
            "{test}: check {name}: {rest}"
        );
        assert!(seen.insert(name), "{test}: {name} reported twice");
    }
    let want = want.iter().copied().collect();
    assert_eq!(seen, want, "{test}: the guest's checks");
}

/// Whether a missing prerequisite fails the test rather than skipping it.
pub fn guest_tests_required() -> bool {
    std::env::var("RUND_REQUIRE_GUEST_TESTS").is_ok_and(|v| v == "1")
}

/// Checks that this host can boot `kernel`; returns its path, or `None` after printing why the test
/// is skipped. Panics instead when guest tests are required.
pub fn require_guest(test: &str, kernel: GuestKernel) -> Option<PathBuf> {
    let why = match vmm::host_check::check_host() {
        Err(e) => e.to_string(),
        Ok(_) => match kernel.path() {
            Ok(p) => return Some(p),
            Err(e) => e,
        },
    };
    if guest_tests_required() {
        panic!("{test}: cannot run: {why}");
    }
    eprintln!("skipping {test}: {why}");
    None
}

/// A console writer that keeps everything and notes when the marker line was complete.
#[derive(Clone, Default)]
pub struct MarkerConsole {
    inner: Arc<Mutex<(Vec<u8>, Option<Instant>)>>,
    /// Also copies the console to stderr as it comes (long guest tests show their progress),
    /// through [`echo_thread`]: the vCPU that writes the console never waits on stderr.
    echo: Option<mpsc::Sender<Vec<u8>>>,
}

impl Write for MarkerConsole {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.extend_from_slice(b);
        if let Some(echo) = &self.echo {
            // Best effort: a gone echo thread must not stop the guest's console.
            let _ = echo.send(b.to_vec());
        }
        if g.1.is_none() && b.contains(&b'\n') && find_marker(&g.0).is_some() {
            g.1 = Some(Instant::now());
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How long the echo holds an unfinished line before it writes it out anyway.
const ECHO_LINGER: Duration = Duration::from_millis(200);

/// Copies what the console receives to `out` (stderr) a line at a time (the guest writes the serial port
/// a byte per exit; a write per byte is slow in the testbed), and a partial line once the guest
/// has paused for [`ECHO_LINGER`], so the last thing a stuck guest printed is shown. Ends, after
/// writing what it holds, when every sender is gone.
fn echo_thread(rx: mpsc::Receiver<Vec<u8>>, mut out: impl Write) {
    let mut pending = Vec::new();
    loop {
        let (bytes, open) = match rx.recv_timeout(ECHO_LINGER) {
            Ok(bytes) => (Some(bytes), true),
            Err(mpsc::RecvTimeoutError::Timeout) => (None, true),
            Err(mpsc::RecvTimeoutError::Disconnected) => (None, false),
        };
        let linger_over = bytes.is_none();
        if let Some(bytes) = bytes {
            pending.extend_from_slice(&bytes);
        }
        let upto = if linger_over {
            pending.len()
        } else {
            pending
                .iter()
                .rposition(|&c| c == b'\n')
                .map_or(0, |i| i + 1)
        };
        if upto > 0 {
            // Best effort: a closed stderr only loses the echo.
            let _ = out.write_all(&pending[..upto]);
            pending.drain(..upto);
        }
        if !open {
            return;
        }
    }
}

impl MarkerConsole {
    /// A console that also copies what the guest prints to stderr, live.
    pub fn echoing() -> Self {
        let (tx, rx) = mpsc::channel();
        let echo = std::thread::Builder::new()
            .name("console-echo".into())
            .spawn(move || echo_thread(rx, std::io::stderr()));
        MarkerConsole {
            // Without its thread the console only keeps the text.
            echo: echo.is_ok().then_some(tx),
            ..Default::default()
        }
    }

    /// The console so far.
    pub fn text(&self) -> String {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&g.0).into_owned()
    }
    /// When the marker line was complete.
    pub fn marker_at(&self) -> Option<Instant> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// What the test init reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// `nproc` in the guest.
    pub nproc: u32,
    /// MemTotal in KiB.
    pub mem_total_kib: u64,
}

fn find_marker(console: &[u8]) -> Option<Marker> {
    let text = String::from_utf8_lossy(console);
    let line = text.lines().find(|l| l.starts_with(MARKER))?;
    // "RUND-MARKER nproc=2 MemTotal:         245940 kB"
    let mut words = line.split_whitespace().skip(1);
    let nproc = words.next()?.strip_prefix("nproc=")?.parse().ok()?;
    if words.next()? != "MemTotal:" {
        return None;
    }
    let mem_total_kib = words.next()?.parse().ok()?;
    Some(Marker {
        nproc,
        mem_total_kib,
    })
}

/// One guest boot's outcome.
#[derive(Debug)]
pub struct Boot {
    /// Why the VM ended.
    pub exit: VmExit,
    /// What the init reported, if it got that far.
    pub marker: Option<Marker>,
    /// From `Vm::new` to the marker line on the console.
    pub to_marker: Option<Duration>,
    /// The whole console.
    pub console: String,
}

/// Errors booting a test guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The VM could not be built or started.
    #[error("cannot start the VM")]
    Vm(#[from] vmm::VmError),
    /// The initramfs could not be made.
    #[error("cannot build the test initramfs")]
    Initramfs(#[from] std::io::Error),
    /// The guest ran past [`BOOT_TIMEOUT`]: its vCPUs' and devices' report, and its console.
    #[error("guest still running after {0:?}; its {1}\nconsole:\n{2}")]
    Hung(Duration, String, String),
}

/// Boots `kernel` with the marker initramfs `initrd`, once.
pub fn boot_once(
    kernel: &Path,
    initrd: &Path,
    vcpus: u32,
    mem_mib: u32,
) -> Result<Boot, BootError> {
    let console = MarkerConsole::default();
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd.to_path_buf());
    config.cmdline = GUEST_CMDLINE.into();
    config.vcpus = vcpus;
    config.mem_mib = mem_mib;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    let start = Instant::now();
    let mut handle = Vm::new(config)?.start()?;
    let exit = match handle.wait_timeout(BOOT_TIMEOUT) {
        Some(exit) => exit,
        None => {
            let report = handle.report();
            handle.shutdown();
            handle.wait();
            return Err(BootError::Hung(BOOT_TIMEOUT, report, console.text()));
        }
    };
    let text = console.text();
    Ok(Boot {
        exit,
        marker: find_marker(text.as_bytes()),
        to_marker: console.marker_at().map(|t| t - start),
        console: text,
    })
}

/// Boots and, if the guest did not reach its marker, boots once more: nested guests in the emulated
/// testbed occasionally crash their init (about 1 boot in 28 measured). The retry is announced.
pub fn boot_with_retry(
    kernel: &Path,
    initrd: &Path,
    vcpus: u32,
    mem_mib: u32,
) -> Result<Boot, BootError> {
    match boot_once(kernel, initrd, vcpus, mem_mib) {
        Ok(b) if b.marker.is_some() => Ok(b),
        first => {
            let why = match &first {
                Ok(b) => format!(
                    "ended with \"{}\" before its marker; console:\n{}",
                    b.exit, b.console
                ),
                Err(e) => e.to_string(),
            };
            eprintln!(
                "RETRY: nested guest boot of {} failed once ({why}); booting it once more",
                kernel.display()
            );
            boot_once(kernel, initrd, vcpus, mem_mib)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<String>>>);

    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(b).into_owned());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_echo_writes_whole_lines_then_a_stalled_partial_one() {
        let (tx, rx) = mpsc::channel();
        let writes = Writes::default();
        let out = writes.clone();
        let echo = std::thread::spawn(move || echo_thread(rx, out));
        for chunk in ["Lin", "ux\nUnpa", "cking\n", "Unpacking initramfs."] {
            tx.send(chunk.as_bytes().to_vec()).unwrap();
        }
        // The guest goes quiet mid-line: the partial line comes out after the linger.
        let deadline = Instant::now() + Duration::from_secs(30);
        while writes.0.lock().unwrap().len() < 3 && Instant::now() < deadline {
            std::thread::sleep(ECHO_LINGER / 4);
        }
        tx.send(b"..\nbye".to_vec()).unwrap();
        drop(tx);
        echo.join().unwrap();
        // Whole lines as they complete, not a write per chunk; the stalled partial line after the
        // linger; the rest when the console closes.
        assert_eq!(
            *writes.0.lock().unwrap(),
            [
                "Linux\n",
                "Unpacking\n",
                "Unpacking initramfs.",
                "..\n",
                "bye"
            ]
        );
    }

    #[test]
    fn marker_is_parsed() {
        let c = b"[ 1.0] Run /init\nRUND-MARKER nproc=2 MemTotal:         245940 kB\nreboot\n";
        assert_eq!(
            find_marker(c),
            Some(Marker {
                nproc: 2,
                mem_total_kib: 245_940
            })
        );
        assert_eq!(find_marker(b"RUND-MARKER nproc=x MemTotal: 1 kB\n"), None);
        assert_eq!(find_marker(b"no marker\n"), None);
    }

    #[test]
    fn marker_console_notes_the_time() {
        let mut c = MarkerConsole::default();
        c.write_all(b"RUND-MARKER nproc=1 ").unwrap();
        assert!(c.marker_at().is_none());
        c.write_all(b"MemTotal: 10 kB\n").unwrap();
        assert!(c.marker_at().is_some());
    }
}
