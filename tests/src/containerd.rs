//! The containerd end-to-end harness: a containerd of the test's own (its root, state and socket
//! in a temporary directory) with the `runc` and `rund` runtimes, locally built images imported
//! into the `default` (ctr) and `k8s.io` (CRI) namespaces, a `ctr` helper, and the checks that a
//! scenario left nothing behind. On drop it removes every task and container, stops containerd,
//! kills any shim or container process it left, unmounts what was mounted under its directory and
//! deletes the directory.
//!
//! Two worlds ([`World`]). By default, the user's ([`node`]): rund installed with `rund install
//! --write-containerd-config` onto containerd's stock `/etc/containerd/config.toml` and rund's
//! default `/etc/rund/config.toml`, containerd started on that file (only its root, state and
//! socket moved to the test's directory, by command-line flags), the pause image imported under
//! the name the stock configuration expects. [`World::Fixture`] instead writes a containerd
//! configuration naming both runtimes and a rund configuration of its own (`RUND_CONFIG`), as an
//! operator writing them by hand would.
//!
//! Every scenario runs for each runtime under test and compares the outcome with runc's under
//! the same containerd. The runtimes come from `RUND_E2E_RUNTIMES` (default `runc,rund`; runc is
//! always included). rund's shim is `containerd-shim-rund-v2` from `RUND_SHIM_BINARY`, else beside
//! the test executable's target directory (`target/<profile>/`), and `rund` beside it (kernel
//! from `RUND_GUEST_KERNEL_DIR`/vmlinux, initramfs from `RUND_AGENT_INITRAMFS`).
//!
//! Needs root, Debian's `containerd`, `runc`, `umoci` and `busybox-static`, and for rund a KVM
//! that runs Linux guests (the testbed). Where one is missing the test prints why and returns,
//! unless `RUND_REQUIRE_E2E_TESTS=1`, where it fails. The directory goes under `RUND_E2E_DIR`,
//! else `/scratch` when mounted (the testbed's XFS disk), else the temporary directory; on an
//! overlayfs (the testbed's root) a tmpfs is mounted on it first, as containerd's overlayfs
//! snapshotter cannot put its upper directories on an overlay. `RUND_E2E_KEEP=1` keeps the
//! directory (and containerd's log) after the test for a post-mortem.

pub mod bench;
pub mod cni;
pub mod config;
pub mod host;
pub mod image;
pub mod node;

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use config::{ContainerdConfig, RundConfig, BTRFS_SNAPSHOTTER};
pub use image::{BUSYBOX_IMAGE, BUSYBOX_NOENV_IMAGE, IMAGE_FILE, IMAGE_FILE_CONTENT, PAUSE_IMAGE};

/// The namespace `ctr` uses by default.
pub const CTR_NAMESPACE: &str = "default";
/// The namespace of containerd's CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Which runtimes to test, comma-separated (`runc`, `rund`).
pub const RUNTIMES_ENV: &str = "RUND_E2E_RUNTIMES";
/// The runtimes tested when [`RUNTIMES_ENV`] is unset.
pub const DEFAULT_RUNTIMES: &str = "runc,rund";
/// `1`: a missing prerequisite fails the test instead of skipping it.
pub const REQUIRE_ENV: &str = "RUND_REQUIRE_E2E_TESTS";
/// The rund shim binary under test.
pub const SHIM_ENV: &str = "RUND_SHIM_BINARY";
/// The shim's file name: containerd derives it from the runtime type.
pub const RUND_SHIM_NAME: &str = "containerd-shim-rund-v2";
/// How long one `ctr` command may take (a rund sandbox cold-boots in the emulated testbed).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a runtime may take to release everything after its last task is deleted.
pub const CLEAN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long containerd may take to answer after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The btrfs image under the btrfs snapshotter (sparse; mkfs.btrfs wants more than 114 MiB).
const BTRFS_IMAGE_BYTES: u64 = 512 << 20;
/// Commands the harness runs.
const TOOLS: &[&str] = &[
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    "runc",
    "umoci",
    "tar",
];

/// A runtime under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// runc through `containerd-shim-runc-v2`: the reference.
    Runc,
    /// rund through `containerd-shim-rund-v2`.
    Rund,
}

impl Runtime {
    /// Its name, which is also its CRI runtime handler.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Rund => "rund",
        }
    }

    /// Its containerd runtime type (`ctr run --runtime`).
    pub fn runtime_type(self) -> &'static str {
        match self {
            Runtime::Runc => "io.containerd.runc.v2",
            Runtime::Rund => "io.containerd.rund.v2",
        }
    }

    /// The file name of its shim binary.
    pub fn shim_name(self) -> &'static str {
        match self {
            Runtime::Runc => "containerd-shim-runc-v2",
            Runtime::Rund => RUND_SHIM_NAME,
        }
    }

    fn from_name(name: &str) -> Option<Runtime> {
        [Runtime::Runc, Runtime::Rund]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Checks that every runtime's outcome equals runc's (the first); returns runc's.
pub fn same_as_runc<T: PartialEq + fmt::Debug>(outcomes: &[(Runtime, T)]) -> &T {
    let Some((Runtime::Runc, reference)) = outcomes.first() else {
        panic!("runc's outcome must come first: {outcomes:?}");
    };
    for (rt, outcome) in &outcomes[1..] {
        assert_eq!(outcome, reference, "{rt} (left) differs from runc (right)");
    }
    reference
}

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{RUNTIMES_ENV}={value:?}: unknown runtime {name:?} (known: runc, rund)")]
    UnknownRuntime { value: String, name: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Prerequisite(String),
    #[error("building the test images: {0}")]
    Image(#[from] image::ImageError),
    #[error("containerd exited ({status}) before answering; its log ends with:\n{log}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("containerd did not answer within {0:?}; its log ends with:\n{1}")]
    NotReady(Duration, String),
    #[error("`{command}` still running after {timeout:?}; stdout: {stdout:?}; stderr: {stderr:?}")]
    Timeout {
        command: String,
        timeout: Duration,
        stdout: String,
        stderr: String,
    },
    #[error("`{command}` failed ({code:?}): {stderr}")]
    Failed {
        command: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("left behind after {waited:?}: {leftovers}")]
    Leftovers {
        waited: Duration,
        leftovers: Box<Leftovers>,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerdError {
    let what = what.into();
    move |source| ContainerdError::Io { what, source }
}

/// Parses a runtimes list (`runc,rund`): runc first and always, each runtime once.
pub fn parse_runtimes(value: &str) -> Result<Vec<Runtime>, ContainerdError> {
    let mut runtimes = vec![Runtime::Runc];
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let rt = Runtime::from_name(name).ok_or_else(|| ContainerdError::UnknownRuntime {
            value: value.into(),
            name: name.into(),
        })?;
        if !runtimes.contains(&rt) {
            runtimes.push(rt);
        }
    }
    Ok(runtimes)
}

/// The runtimes under test, from [`RUNTIMES_ENV`].
pub fn runtimes_under_test() -> Result<Vec<Runtime>, ContainerdError> {
    parse_runtimes(&std::env::var(RUNTIMES_ENV).unwrap_or_else(|_| DEFAULT_RUNTIMES.to_string()))
}

/// Whether a missing prerequisite fails the test rather than skipping it.
pub fn e2e_required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The rund shim under test: [`SHIM_ENV`], else `containerd-shim-rund-v2` in the target
/// directory of this executable (`target/<profile>/deps/x` or `target/<profile>/examples/x`).
pub fn rund_shim_binary() -> Result<PathBuf, String> {
    let path = match std::env::var_os(SHIM_ENV) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this executable: {e}"))?
            .parent()
            .and_then(Path::parent)
            .ok_or("this executable is not in a cargo target directory")?
            .join(RUND_SHIM_NAME),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the rund shim {} does not exist (build it: cargo build -p shim-v2, or set {SHIM_ENV})",
            path.display()
        ))
    }
}

/// The kernel and initramfs rund boots, from the environment the guest tests use.
fn rund_guest_files() -> Result<(PathBuf, PathBuf), String> {
    let kernel = crate::GuestKernel::CondensedElf.path()?;
    let initramfs = std::env::var_os("RUND_AGENT_INITRAMFS")
        .map(PathBuf::from)
        .ok_or("RUND_AGENT_INITRAMFS is not set (ci/test sets it after agent/pack-initramfs)")?;
    if !initramfs.is_file() {
        return Err(format!("{} does not exist", initramfs.display()));
    }
    Ok((kernel, initramfs))
}

/// Why the harness cannot run here with `runtimes` (empty when it can).
pub fn missing_prerequisites(runtimes: &[Runtime]) -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("needs root".to_string());
    }
    for tool in TOOLS {
        if !on_path(tool) {
            missing.push(format!(
                "{tool} is not installed (apt-get install containerd runc umoci tar)"
            ));
        }
    }
    if !Path::new(image::BUSYBOX).is_file() {
        missing.push(format!(
            "{} is missing (apt-get install busybox-static)",
            image::BUSYBOX
        ));
    }
    if runtimes.contains(&Runtime::Rund) {
        if let Err(e) = vmm::host_check::check_host() {
            missing.push(format!("rund: {e}"));
        }
        if let Err(e) = rund_shim_binary() {
            missing.push(format!("rund: {e}"));
        }
        if let Err(e) = rund_guest_files() {
            missing.push(format!("rund: {e}"));
        }
    }
    missing
}

/// Starts a private containerd for `test` with the runtimes under test, or returns `None` after
/// printing why the test is skipped. Panics where the skip is not allowed ([`REQUIRE_ENV`]),
/// and when the harness itself fails.
pub fn start_for_test(test: &str) -> Option<Containerd> {
    start_for_test_with(test, Options::default())
}

/// [`start_for_test`] with `options`.
pub fn start_for_test_with(test: &str, options: Options) -> Option<Containerd> {
    let runtimes = runtimes_under_test().unwrap_or_else(|e| panic!("{test}: {e}"));
    let mut missing = missing_prerequisites(&runtimes);
    if options.world == World::Node {
        missing.extend(node::not_allowed());
        if runtimes.contains(&Runtime::Rund) {
            if let Err(e) = rund_shim_binary().and_then(|shim| node::admin_binary(&shim)) {
                missing.push(format!("rund: {e}"));
            }
        }
    }
    if options.btrfs_snapshotter && !on_path("mkfs.btrfs") {
        missing.push("mkfs.btrfs is not installed (apt-get install btrfs-progs)".into());
    }
    if !missing.is_empty() {
        let why = missing.join("; ");
        if e2e_required() {
            panic!("{test}: cannot run: {why}");
        }
        eprintln!("skipping {test}: {why}");
        return None;
    }
    match Containerd::start_with(&runtimes, options) {
        Ok(c) => Some(c),
        Err(e) => panic!("{test}: cannot start the private containerd: {e}"),
    }
}

/// Where the harness directory goes (see the module's documentation).
fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUND_E2E_DIR") {
        return PathBuf::from(dir);
    }
    let scratch = Path::new("/scratch");
    if host::is_mount_point(scratch).unwrap_or(false) {
        return scratch.to_path_buf();
    }
    std::env::temp_dir()
}

/// What a command printed and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOutput {
    pub stdout: String,
    pub stderr: String,
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn read_all_in_background(
    mut from: impl Read + Send + 'static,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // What was read before an error is still worth showing.
        let _ = from.read_to_end(&mut buf);
        buf
    })
}

/// Runs `cmd` with stdin from /dev/null, its output captured, killing it after `timeout`.
pub fn run_command(cmd: &mut Command, timeout: Duration) -> Result<CommandOutput, ContainerdError> {
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_error(format!("cannot run `{command}`")))?;
    let stdout = child.stdout.take().map(read_all_in_background);
    let stderr = child.stderr.take().map(read_all_in_background);
    let status = wait_with_deadline(&mut child, Instant::now() + timeout)
        .map_err(io_error(format!("waiting for `{command}`")))?;
    let text = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let (stdout, stderr) = (text(stdout), text(stderr));
    match status {
        Some(status) => Ok(CommandOutput {
            stdout,
            stderr,
            code: status.code(),
        }),
        None => Err(ContainerdError::Timeout {
            command,
            timeout,
            stdout,
            stderr,
        }),
    }
}

/// Waits for `child` until `deadline`; kills and reaps it then, returning `None`.
pub fn wait_with_deadline(
    child: &mut Child,
    deadline: Instant,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            // Already gone is fine: it is reaped just below.
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One line of `ctr task ls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRow {
    pub id: String,
    pub pid: u32,
    /// `RUNNING`, `PAUSED`, `STOPPED`, ...
    pub status: String,
}

/// Parses `ctr task ls` output (a header, then `ID PID STATUS` per task).
pub fn parse_task_list(text: &str) -> Vec<TaskRow> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(TaskRow {
                id: w.next()?.to_string(),
                pid: w.next()?.parse().ok()?,
                status: w.next()?.to_string(),
            })
        })
        .collect()
}

/// What a runtime left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Tasks and containers containerd still lists in the namespace.
    pub tasks: Vec<String>,
    pub containers: Vec<String>,
    /// Shims of this containerd still running (pid, program).
    pub shims: Vec<(i32, String)>,
    /// Processes whose root is under the harness directory (a runc container's processes).
    pub container_processes: Vec<(i32, String)>,
    /// Mounts under containerd's root or state directory.
    pub mounts: Vec<PathBuf>,
    /// Entries of rund's run directory other than the cgroup pool's state.
    pub rund_state: Vec<PathBuf>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tasks {:?}, containers {:?}, shims {:?}, container processes {:?}, mounts {:?}, rund state {:?}",
            self.tasks,
            self.containers,
            self.shims,
            self.container_processes,
            self.mounts,
            self.rund_state
        )
    }
}

/// One row of `rund template list --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateRow {
    pub key: String,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub size_on_disk: u64,
    pub restores: u64,
    /// Its inputs are today's.
    pub current: bool,
    pub dir: PathBuf,
}

impl TemplateRow {
    fn from_json(v: &serde_json::Value) -> TemplateRow {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        TemplateRow {
            key: v["key"].as_str().unwrap_or_default().to_owned(),
            vcpus: n("vcpus"),
            memory_mib: n("memory_mib"),
            size_on_disk: n("size_on_disk"),
            restores: n("restores"),
            current: v["current"].as_bool().unwrap_or(false),
            dir: PathBuf::from(v["dir"].as_str().unwrap_or_default()),
        }
    }
}

/// Where `RUND_E2E_TEMPLATE_MODE` (`auto`, `require`, `off`) names the template mode every
/// harness sets in rund's configuration; unset, the configuration's own (`auto` by default).
pub const TEMPLATE_MODE_ENV: &str = "RUND_E2E_TEMPLATE_MODE";

/// The rund side of the harness: where its configuration and state live.
#[derive(Clone, Debug)]
pub struct RundSetup {
    /// The file `RUND_CONFIG` names.
    pub config_path: PathBuf,
    pub config: RundConfig,
}

/// Whose configuration containerd and rund run with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum World {
    /// The user's: containerd's stock configuration edited by `rund install`, rund's as `rund
    /// install` writes it ([`node`]).
    #[default]
    Node,
    /// The harness's own configuration files, naming both runtimes.
    Fixture,
}

/// How a private containerd is started, besides its runtimes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// The btrfs snapshotter's root a loop-mounted btrfs image in the harness's directory, so
    /// that its plugin loads (its rootfs mounts have type `btrfs`).
    pub btrfs_snapshotter: bool,
    pub world: World,
}

/// A private containerd and everything it was given.
pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    config: ContainerdConfig,
    runtimes: Vec<Runtime>,
    images: Option<image::Images>,
    rund: Option<RundSetup>,
    world: World,
    log_path: PathBuf,
    child: Option<Child>,
    /// Unique to this harness on the host: process id and instance number.
    nonce: String,
    /// rund's configuration file as it was before [`Containerd::set_template_mode`].
    rund_config_saved: std::sync::Mutex<Option<String>>,
}

/// Numbers the harnesses of this process (tests run in parallel threads).
static INSTANCES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Containerd {
    /// Makes the directory, builds the images, starts containerd, waits until it answers and
    /// imports the images into both namespaces.
    pub fn start(runtimes: &[Runtime]) -> Result<Containerd, ContainerdError> {
        Containerd::start_with(runtimes, Options::default())
    }

    /// [`Containerd::start`] with `options`.
    pub fn start_with(
        runtimes: &[Runtime],
        options: Options,
    ) -> Result<Containerd, ContainerdError> {
        let base = base_dir();
        let dir = tempfile::Builder::new()
            .prefix("rund-e2e-")
            .tempdir_in(&base)
            .map_err(io_error(format!(
                "making a directory in {}",
                base.display()
            )))?;
        let path = dir.path().to_path_buf();
        let mut cd = Containerd {
            config: ContainerdConfig {
                root: path.join("root"),
                state: path.join("state"),
                socket: path.join("containerd.sock"),
                opt: path.join("opt"),
                cni_conf_dir: path.join("cni/conf"),
                cni_bin_dir: path.join("cni/bin"),
                runc_root: path.join("runc"),
                sandbox_image: PAUSE_IMAGE.into(),
                btrfs_snapshotter: options.btrfs_snapshotter,
            },
            dir: Some(dir),
            log_path: path.join("containerd.log"),
            path,
            runtimes: runtimes.to_vec(),
            images: None,
            rund: None,
            world: options.world,
            child: None,
            nonce: format!(
                "{}-{}",
                std::process::id(),
                INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            rund_config_saved: std::sync::Mutex::new(None),
        };
        // From here on, a failure drops `cd`, which cleans up what was made so far.
        if host::is_on_overlayfs(&cd.path).map_err(io_error("statfs"))? {
            nix::mount::mount(
                Some("tmpfs"),
                &cd.path,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("mode=0700"),
            )
            .map_err(|e| ContainerdError::Io {
                what: format!(
                    "mounting a tmpfs on {} (it is on an overlayfs)",
                    cd.path.display()
                ),
                source: e.into(),
            })?;
        }
        for d in [
            &cd.config.root,
            &cd.config.state,
            &cd.config.opt,
            &cd.config.cni_conf_dir,
            &cd.config.cni_bin_dir,
            &cd.config.runc_root,
            &cd.path.join("bin"),
            &cd.path.join("images"),
        ] {
            std::fs::create_dir_all(d).map_err(io_error(format!("mkdir {}", d.display())))?;
        }
        let started = Instant::now();
        cd.images = Some(image::build(&cd.path.join("images"))?);
        let built = started.elapsed();
        let config_path = match options.world {
            World::Fixture => {
                if runtimes.contains(&Runtime::Rund) {
                    cd.rund = Some(cd.prepare_rund()?);
                }
                let path = cd.path.join("config.toml");
                std::fs::write(&path, cd.config.render())
                    .map_err(io_error(format!("writing {}", path.display())))?;
                path
            }
            World::Node => {
                if runtimes.contains(&Runtime::Rund) {
                    cd.rund = Some(cd.install_rund()?);
                }
                let path = PathBuf::from(node::CONTAINERD_CONFIG);
                cd.config.sandbox_image = node::sandbox_image(&path)?;
                path
            }
        };
        if options.btrfs_snapshotter {
            cd.mount_btrfs_snapshotter_root()?;
        }
        if cd.rund.is_some() {
            if let Ok(mode) = std::env::var(TEMPLATE_MODE_ENV) {
                cd.set_template_mode(&mode)?;
            }
        }
        let configured = started.elapsed();
        cd.spawn(&config_path)?;
        cd.wait_ready()?;
        let ready = started.elapsed();
        let archive = cd.images_archive().to_string_lossy().into_owned();
        for ns in [CTR_NAMESPACE, CRI_NAMESPACE] {
            cd.ctr_ok(&[
                "-n",
                ns,
                "image",
                "import",
                "--base-name",
                image::IMAGE_BASE_NAME,
                &archive,
            ])?;
        }
        if options.world == World::Node {
            // As an operator of a node without a registry does: the pause image under the name
            // containerd's configuration expects. It is the one without `Env`, as pause images
            // built FROM scratch are.
            let sandbox_image = cd.config.sandbox_image.clone();
            cd.ctr_ok(&[
                "-n",
                CRI_NAMESPACE,
                "image",
                "tag",
                "--force",
                image::PAUSE_NOENV_IMAGE,
                &sandbox_image,
            ])?;
        }
        eprintln!(
            "containerd in {}: images built in {:.1} s, rund set up at {:.1} s, answering at {:.1} s, images imported at {:.1} s",
            cd.path.display(),
            built.as_secs_f64(),
            configured.as_secs_f64(),
            ready.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        Ok(cd)
    }

    /// Where the btrfs snapshotter keeps its subvolumes; a mount point when it is on.
    fn btrfs_snapshotter_root(&self) -> Option<PathBuf> {
        self.config
            .btrfs_snapshotter
            .then(|| self.config.root.join(BTRFS_SNAPSHOTTER))
    }

    /// Formats a sparse btrfs image and loop-mounts it where the btrfs snapshotter wants its
    /// root: the plugin only loads on btrfs. `mount -o loop` frees the loop device at unmount.
    fn mount_btrfs_snapshotter_root(&self) -> Result<(), ContainerdError> {
        let Some(target) = self.btrfs_snapshotter_root() else {
            return Ok(());
        };
        let image = self.path.join("btrfs.img");
        File::create(&image)
            .and_then(|f| f.set_len(BTRFS_IMAGE_BYTES))
            .map_err(io_error(format!("making {}", image.display())))?;
        std::fs::create_dir_all(&target)
            .map_err(io_error(format!("mkdir {}", target.display())))?;
        // Where btrfs is a module, mount(8) alone may not load it.
        let _ = run_command(
            Command::new("modprobe").args(["-q", "btrfs"]),
            Duration::from_secs(30),
        );
        let mut mkfs = Command::new("mkfs.btrfs");
        mkfs.arg("-q").arg(&image);
        let mut mount = Command::new("mount");
        mount.args(["-o", "loop"]).arg(&image).arg(&target);
        for cmd in [&mut mkfs, &mut mount] {
            let out = run_command(cmd, Duration::from_secs(60))?;
            if !out.success() {
                return Err(ContainerdError::Failed {
                    command: describe(cmd),
                    code: out.code,
                    stderr: out.stderr,
                });
            }
        }
        Ok(())
    }

    /// Puts the shim under test on containerd's PATH and writes rund's configuration.
    fn prepare_rund(&self) -> Result<RundSetup, ContainerdError> {
        let shim = rund_shim_binary().map_err(ContainerdError::Prerequisite)?;
        let link = self.path.join("bin").join(RUND_SHIM_NAME);
        std::os::unix::fs::symlink(&shim, &link)
            .map_err(io_error(format!("linking {}", link.display())))?;
        let (kernel, initramfs) = rund_guest_files().map_err(ContainerdError::Prerequisite)?;
        let rund_dir = self.path.join("rund");
        let config = RundConfig {
            kernel,
            initramfs,
            writable_layer_dir: rund_dir.join("writable"),
            run_dir: rund_dir.join("run"),
            lib_dir: rund_dir.join("lib"),
            template_dir: rund_dir.join("templates"),
            cgroup_parent: format!("rund-e2e-{}", self.nonce),
        };
        for d in [&config.writable_layer_dir, &config.run_dir, &config.lib_dir] {
            std::fs::create_dir_all(d).map_err(io_error(format!("mkdir {}", d.display())))?;
        }
        let config_path = rund_dir.join("config.toml");
        std::fs::write(&config_path, config.render())
            .map_err(io_error(format!("writing {}", config_path.display())))?;
        Ok(RundSetup {
            config_path,
            config,
        })
    }

    /// `rund install` onto the node (the [`World::Node`] set-up).
    fn install_rund(&self) -> Result<RundSetup, ContainerdError> {
        let shim = rund_shim_binary().map_err(ContainerdError::Prerequisite)?;
        let (kernel, initramfs) = rund_guest_files().map_err(ContainerdError::Prerequisite)?;
        let installed = node::install(&shim, &kernel, &initramfs)?;
        eprintln!("rund install:\n{}", installed.install_log.trim_end());
        Ok(RundSetup {
            config_path: PathBuf::from(node::RUND_CONFIG),
            config: installed.rund_config,
        })
    }

    fn spawn(&mut self, config_path: &Path) -> Result<(), ContainerdError> {
        let log = File::create(&self.log_path)
            .map_err(io_error(format!("creating {}", self.log_path.display())))?;
        let log2 = log.try_clone().map_err(io_error("dup of the log file"))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(config_path);
        match self.world {
            World::Fixture => {
                let mut path = vec![self.path.join("bin")];
                if let Some(p) = std::env::var_os("PATH") {
                    path.extend(std::env::split_paths(&p));
                }
                cmd.env(
                    "PATH",
                    std::env::join_paths(path).map_err(|e| ContainerdError::Io {
                        what: "PATH".into(),
                        source: std::io::Error::other(e),
                    })?,
                );
                if let Some(rund) = &self.rund {
                    cmd.env("RUND_CONFIG", &rund.config_path);
                }
            }
            World::Node => {
                // The node's configuration as it is; only where containerd keeps its files moves
                // to the test's directory, so that each test starts from an empty containerd. A
                // service's environment: nothing of the test's.
                cmd.arg("--root")
                    .arg(&self.config.root)
                    .arg("--state")
                    .arg(&self.config.state)
                    .arg("--address")
                    .arg(&self.config.socket)
                    .env_clear()
                    .env("PATH", node::SERVICE_PATH);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a ^C to the test does not reach it before the cleanup.
            .process_group(0);
        self.child = Some(cmd.spawn().map_err(io_error("cannot run containerd"))?);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child
                    .try_wait()
                    .map_err(io_error("waiting for containerd"))?
                {
                    self.child = None;
                    return Err(ContainerdError::Exited {
                        status,
                        log: self.log_tail(30),
                    });
                }
            }
            let answered = self
                .ctr_timeout(&["version"], Duration::from_secs(10))
                .is_ok_and(|o| o.success());
            if answered {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ContainerdError::NotReady(READY_TIMEOUT, self.log_tail(30)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The runtimes under test, runc first.
    pub fn runtimes(&self) -> &[Runtime] {
        &self.runtimes
    }

    /// containerd's gRPC socket (`ctr --address`, CRI).
    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// containerd's root and state directories.
    pub fn root(&self) -> &Path {
        &self.config.root
    }
    pub fn state(&self) -> &Path {
        &self.config.state
    }

    /// The harness's whole directory.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The image root as a plain directory (a bundle rootfs for `ctr run --config`).
    pub fn image_rootfs(&self) -> &Path {
        self.images.as_ref().map_or(Path::new(""), |i| &i.rootfs)
    }

    fn images_archive(&self) -> &Path {
        self.images.as_ref().map_or(Path::new(""), |i| &i.archive)
    }

    /// rund's configuration, when rund is under test.
    pub fn rund(&self) -> Option<&RundSetup> {
        self.rund.as_ref()
    }

    /// Sets `[template] mode` in rund's configuration file, as an operator edits it (the shim
    /// reads it at each sandbox start); the file as it was comes back when the harness ends.
    pub fn set_template_mode(&self, mode: &str) -> Result<(), ContainerdError> {
        self.edit_template(|t| t["mode"] = toml_edit::value(mode))
    }

    /// Sets rund's `[template] keep_ready` to `shapes` (vCPUs, MiB), restored as
    /// [`Self::set_template_mode`]'s edit is.
    pub fn set_template_keep_ready(&self, shapes: &[(u32, u32)]) -> Result<(), ContainerdError> {
        let mut list = toml_edit::Array::new();
        for &(vcpus, memory_mib) in shapes {
            let mut shape = toml_edit::InlineTable::new();
            shape.insert("vcpus", i64::from(vcpus).into());
            shape.insert("memory_mib", i64::from(memory_mib).into());
            list.push(shape);
        }
        self.edit_template(|t| t["keep_ready"] = toml_edit::value(list))
    }

    /// Sets rund's `[guest] extra_cmdline` (what the guest kernel's command line gains), restored
    /// as [`Self::set_template_mode`]'s edit is.
    pub fn set_guest_extra_cmdline(&self, cmdline: &str) -> Result<(), ContainerdError> {
        self.edit_table("guest", |t| t["extra_cmdline"] = toml_edit::value(cmdline))
    }

    fn edit_template(
        &self,
        edit: impl FnOnce(&mut toml_edit::Item),
    ) -> Result<(), ContainerdError> {
        self.edit_table("template", edit)
    }

    /// Edits table `table` of rund's configuration, keeping the text it had before the first
    /// edit for the drop to put back.
    fn edit_table(
        &self,
        table: &str,
        edit: impl FnOnce(&mut toml_edit::Item),
    ) -> Result<(), ContainerdError> {
        let rund = self
            .rund
            .as_ref()
            .ok_or_else(|| ContainerdError::Prerequisite("rund is not under test".into()))?;
        let path = &rund.config_path;
        let text = std::fs::read_to_string(path)
            .map_err(io_error(format!("reading {}", path.display())))?;
        let mut doc: toml_edit::DocumentMut =
            text.parse()
                .map_err(|e: toml_edit::TomlError| ContainerdError::Io {
                    what: format!("parsing {}", path.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
        edit(&mut doc[table]);
        {
            let mut saved = self
                .rund_config_saved
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            saved.get_or_insert(text);
        }
        std::fs::write(path, doc.to_string())
            .map_err(io_error(format!("writing {}", path.display())))
    }

    /// `rund ARGS` with the admin binary under test and rund's configuration.
    pub fn rund_admin(&self, args: &[&str]) -> Result<CommandOutput, ContainerdError> {
        let rund = self
            .rund
            .as_ref()
            .ok_or_else(|| ContainerdError::Prerequisite("rund is not under test".into()))?;
        let shim = rund_shim_binary().map_err(ContainerdError::Prerequisite)?;
        let admin = node::admin_binary(&shim).map_err(ContainerdError::Prerequisite)?;
        let mut cmd = Command::new(admin);
        cmd.args(args).env("RUND_CONFIG", &rund.config_path);
        run_command(&mut cmd, Duration::from_secs(300))
    }

    /// The templates `rund template list --json` lists.
    pub fn templates(&self) -> Result<Vec<TemplateRow>, ContainerdError> {
        let out = self.rund_admin(&["template", "list", "--json"])?;
        if !out.success() {
            return Err(ContainerdError::Failed {
                command: "rund template list --json".into(),
                code: out.code,
                stderr: out.stderr,
            });
        }
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&out.stdout).map_err(|e| ContainerdError::Io {
                what: format!("parsing `rund template list --json`: {}", out.stdout),
                source: std::io::Error::other(e),
            })?;
        Ok(rows.iter().map(TemplateRow::from_json).collect())
    }

    /// Waits up to `timeout` until no `rund template create` runs on this host (a shim in `auto`
    /// mode starts one after a cold start); true if none is left.
    pub fn wait_for_template_makers(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let makers = host::processes().unwrap_or_default().into_iter().any(|p| {
                p.cmdline.get(1).map(String::as_str) == Some("template")
                    && p.cmdline.get(2).map(String::as_str) == Some("create")
            });
            if !makers {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// containerd's log: its stdout and stderr, shims' logs included.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// An id unique to this scenario, runtime and harness (the host's cgroup paths and runc's
    /// state directory are shared by every containerd on the host).
    pub fn unique_id(&self, scenario: &str, rt: Runtime) -> String {
        format!("{scenario}-{}-{}", rt.name(), self.nonce)
    }

    /// `ctr --address <socket>`, for callers that need their own stdio.
    pub fn ctr_command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.config.socket);
        cmd
    }

    /// Kills and removes container `id` of [`CTR_NAMESPACE`] (one `ctr run -d` started): every
    /// step is tried; the first failure is returned.
    pub fn remove_container(&self, id: &str) -> Result<(), ContainerdError> {
        let mut first = Ok(());
        for args in [
            ["task", "kill", "-s", "SIGKILL", id].as_slice(),
            &["task", "delete", "-f", id],
            &["container", "delete", id],
        ] {
            if let Err(e) = self.ctr_ok(args) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Runs `ctr --address <socket> ARGS...` (stdin /dev/null, [`COMMAND_TIMEOUT`]).
    pub fn ctr(&self, args: &[&str]) -> Result<CommandOutput, ContainerdError> {
        self.ctr_timeout(args, COMMAND_TIMEOUT)
    }

    fn ctr_timeout(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<CommandOutput, ContainerdError> {
        run_command(self.ctr_command().args(args), timeout)
    }

    /// Runs ctr and returns its stdout; a non-zero exit is an error.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String, ContainerdError> {
        let out = self.ctr(args)?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(ContainerdError::Failed {
                command: format!("ctr {}", args.join(" ")),
                code: out.code,
                stderr: out.stderr,
            })
        }
    }

    /// The tasks of `namespace`.
    pub fn tasks(&self, namespace: &str) -> Result<Vec<TaskRow>, ContainerdError> {
        Ok(parse_task_list(
            &self.ctr_ok(&["-n", namespace, "task", "ls"])?,
        ))
    }

    /// The container ids of `namespace`.
    pub fn containers(&self, namespace: &str) -> Result<Vec<String>, ContainerdError> {
        Ok(self
            .ctr_ok(&["-n", namespace, "container", "ls", "-q"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Shim processes started by this containerd (they carry `-address <socket>`).
    pub fn shims(&self) -> Result<Vec<host::Process>, ContainerdError> {
        let socket = self.config.socket.to_string_lossy();
        Ok(host::processes()
            .map_err(io_error("listing processes"))?
            .into_iter()
            .filter(|p| p.has_arg_pair("-address", &socket))
            .collect())
    }

    /// The long-running shims of this containerd: [`Containerd::shims`] without the short-lived
    /// `start` and `delete` invocations of a shim binary.
    pub fn shim_servers(&self) -> Result<Vec<host::Process>, ContainerdError> {
        Ok(self
            .shims()?
            .into_iter()
            .filter(|p| {
                !matches!(
                    p.cmdline.last().map(String::as_str),
                    Some("start" | "delete")
                )
            })
            .collect())
    }

    /// Kills the shim serving task `id` with SIGKILL (as the OOM killer or an operator would) and
    /// waits until containerd has noticed, run the shim's `delete` and forgotten the task.
    pub fn kill_shim(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        let shim = self
            .shim_servers()?
            .into_iter()
            .find(|p| p.has_arg_pair("-id", id))
            .ok_or_else(|| ContainerdError::Prerequisite(format!("no shim serves {id}")))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| ContainerdError::Io {
            what: format!("killing shim {}", shim.pid),
            source: e.into(),
        })?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while self.tasks(namespace)?.iter().any(|t| t.id == id) {
            if Instant::now() >= deadline {
                return Err(ContainerdError::Prerequisite(format!(
                    "containerd still lists task {id} {COMMAND_TIMEOUT:?} after its shim was \
                     killed; its log ends with:\n{}",
                    self.log_tail(40)
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Processes whose root directory is under the harness directory: processes of runc
    /// containers (a rund container's processes live in the guest).
    fn container_processes(&self) -> Result<Vec<host::Process>, ContainerdError> {
        Ok(host::processes()
            .map_err(io_error("listing processes"))?
            .into_iter()
            .filter(|p| p.root.as_ref().is_some_and(|r| r.starts_with(&self.path)))
            .collect())
    }

    /// What is left in `namespace` and on the host.
    pub fn leftovers(&self, namespace: &str) -> Result<Leftovers, ContainerdError> {
        let named = |ps: Vec<host::Process>| {
            ps.into_iter()
                .map(|p| (p.pid, p.cmdline.join(" ")))
                .collect()
        };
        let mut mounts = Vec::new();
        for d in [&self.config.root, &self.config.state] {
            mounts.extend(host::mount_points_under(d).map_err(io_error("reading mountinfo"))?);
        }
        // The harness's own mount, there for containerd's lifetime.
        let btrfs_root = self.btrfs_snapshotter_root();
        mounts.retain(|m| Some(m) != btrfs_root.as_ref());
        let rund_state = match &self.rund {
            // No shim has run yet on this node: nothing to leave.
            Some(r) if !r.config.run_dir.exists() => Vec::new(),
            Some(r) => std::fs::read_dir(&r.config.run_dir)
                .map_err(io_error(format!("listing {}", r.config.run_dir.display())))?
                .filter_map(Result::ok)
                // The cgroup pool keeps its own state there for the host's lifetime, and the
                // template store may be there too (`/run/rund/templates` by default).
                .filter(|e| e.file_name() != "cgroup-pool")
                .map(|e| e.path())
                .filter(|p| *p != r.config.template_dir)
                .collect(),
            None => Vec::new(),
        };
        Ok(Leftovers {
            tasks: self.tasks(namespace)?.into_iter().map(|t| t.id).collect(),
            containers: self.containers(namespace)?,
            shims: named(self.shims()?),
            container_processes: named(self.container_processes()?),
            mounts,
            rund_state,
        })
    }

    /// Waits until nothing is left in `namespace` and on the host (shims exit a moment after
    /// their last task is deleted), up to [`CLEAN_TIMEOUT`].
    pub fn wait_until_clean(&self, namespace: &str) -> Result<(), ContainerdError> {
        let start = Instant::now();
        loop {
            let left = self.leftovers(namespace)?;
            if left.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= CLEAN_TIMEOUT {
                return Err(ContainerdError::Leftovers {
                    waited: CLEAN_TIMEOUT,
                    leftovers: Box::new(left),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `scenario` once per runtime under test (runc first) and checks after each that the
    /// runtime left nothing behind in `namespace`; returns each runtime's outcome.
    pub fn for_each_runtime<T>(
        &self,
        namespace: &str,
        mut scenario: impl FnMut(Runtime) -> T,
    ) -> Vec<(Runtime, T)> {
        self.runtimes
            .clone()
            .into_iter()
            .map(|rt| {
                eprintln!("== {rt}");
                let outcome = scenario(rt);
                if let Err(e) = self.wait_until_clean(namespace) {
                    panic!("{rt}: {e}");
                }
                (rt, outcome)
            })
            .collect()
    }

    /// Removes every task and container containerd still has, best effort.
    fn remove_all(&self) {
        let timeout = Duration::from_secs(60);
        for ns in [CTR_NAMESPACE, CRI_NAMESPACE] {
            let Ok(tasks) = self.tasks(ns) else { continue };
            for t in tasks {
                // Each step may fail when the task is already gone: what matters is the end.
                let _ = self.ctr_timeout(
                    &["-n", ns, "task", "kill", "-a", "-s", "SIGKILL", &t.id],
                    timeout,
                );
                let _ = self.ctr_timeout(&["-n", ns, "task", "delete", "-f", &t.id], timeout);
            }
            if let Ok(containers) = self.containers(ns) {
                for c in containers {
                    let _ = self.ctr_timeout(&["-n", ns, "container", "delete", &c], timeout);
                }
            }
        }
    }

    fn stop_containerd(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        // It may have exited already; the wait below settles it either way.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if let Ok(None) = wait_with_deadline(&mut child, Instant::now() + Duration::from_secs(15)) {
            eprintln!("containerd ignored SIGTERM for 15 s: killed");
        }
    }

    /// Kills what survived containerd: its shims, and processes of containers.
    fn kill_leftover_processes(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut left = self.shims().unwrap_or_default();
            left.extend(self.container_processes().unwrap_or_default());
            if left.is_empty() || Instant::now() >= deadline {
                for p in &left {
                    eprintln!("still running: {} {}", p.pid, p.cmdline.join(" "));
                }
                return;
            }
            for p in left {
                if let Err(e) = host::kill_process(p.pid) {
                    eprintln!("cannot kill {}: {e}", p.pid);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn restore_rund_config(&self) {
        let saved = self
            .rund_config_saved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(text), Some(rund)) = (saved, &self.rund) {
            if let Err(e) = std::fs::write(&rund.config_path, text) {
                eprintln!("cannot restore {}: {e}", rund.config_path.display());
            }
        }
    }

    fn unmount_all(&self) {
        match host::mount_points_under(&self.path) {
            Ok(mounts) => {
                for m in mounts {
                    if let Err(e) = host::unmount(&m) {
                        eprintln!("cannot unmount {}: {e}", m.display());
                    }
                }
            }
            Err(e) => eprintln!("cannot read mountinfo: {e}"),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "containerd's log ({}), last lines:\n{}",
                self.log_path.display(),
                self.log_tail(60)
            );
        }
        if self.child.is_some() {
            self.remove_all();
        }
        self.stop_containerd();
        self.kill_leftover_processes();
        // A template a shim started making uses rund's configuration and its writable-layer
        // directory: both are put back or removed below.
        if self.rund.is_some() && !self.wait_for_template_makers(Duration::from_secs(120)) {
            eprintln!("a `rund template create` still runs after 120 s");
        }
        self.unmount_all();
        self.restore_rund_config();
        if std::env::var("RUND_E2E_KEEP").is_ok_and(|v| v == "1") {
            if let Some(dir) = self.dir.take() {
                eprintln!("RUND_E2E_KEEP=1: kept {}", dir.keep().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimes_list_always_starts_with_runc() {
        assert_eq!(
            parse_runtimes("runc,rund").unwrap(),
            [Runtime::Runc, Runtime::Rund]
        );
        assert_eq!(
            parse_runtimes("rund").unwrap(),
            [Runtime::Runc, Runtime::Rund]
        );
        assert_eq!(parse_runtimes(" runc , ").unwrap(), [Runtime::Runc]);
        assert_eq!(parse_runtimes("").unwrap(), [Runtime::Runc]);
        let e = parse_runtimes("runc,kata").unwrap_err().to_string();
        assert!(e.contains("\"kata\""), "{e}");
    }

    #[test]
    fn task_list_is_parsed() {
        let text =
            "TASK    PID      STATUS    \nt1      24794    RUNNING\nt2      0        STOPPED\n";
        assert_eq!(
            parse_task_list(text),
            vec![
                TaskRow {
                    id: "t1".into(),
                    pid: 24794,
                    status: "RUNNING".into()
                },
                TaskRow {
                    id: "t2".into(),
                    pid: 0,
                    status: "STOPPED".into()
                }
            ]
        );
        assert!(parse_task_list("TASK PID STATUS\n").is_empty());
    }

    #[test]
    fn commands_are_timed_out_and_their_output_kept() {
        let out = run_command(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(
            out,
            CommandOutput {
                stdout: "out\n".into(),
                stderr: "err\n".into(),
                code: Some(3)
            }
        );
        let start = Instant::now();
        let e = run_command(
            Command::new("sh").args(["-c", "echo before; exec sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10));
        match e {
            ContainerdError::Timeout { stdout, .. } => assert_eq!(stdout, "before\n"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn leftovers_print_what_is_left() {
        let l = Leftovers {
            tasks: vec!["t1".into()],
            ..Leftovers::default()
        };
        assert!(!l.is_empty());
        assert!(l.to_string().contains("tasks [\"t1\"]"));
        assert!(Leftovers::default().is_empty());
    }
}
