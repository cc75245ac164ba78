//! The OCI runtime: youki's libcontainer, driven synchronously.
//!
//! Every call here forks or touches libcontainer's state directory, and libcontainer changes the
//! process's working directory while it connects a console socket, so calls are serialized by one lock
//! and run on a blocking thread (the async side never waits on it directly). The agent passes its own
//! pipe ends or a console socket; processes are created as children of the agent (libcontainer's init
//! process is a sibling of its intermediate process), so the [`crate::reaper`] gets their statuses.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use agent_protocol::POD_PID_NAMESPACE;
use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
};
use libcgroups::stats::Stats;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};

use crate::cwd::{self, CwdError};
use crate::executor::LookPathExecutor;
use crate::stdio::ChildPipes;
use crate::storage::{validate_container_path, StorageError};

/// The largest spec or process JSON accepted.
pub const MAX_SPEC_SIZE: usize = 1 << 20;

/// The cgroup parent of containers whose spec names no cgroup.
pub const CGROUP_PARENT: &str = "/rund";

static RUNTIME_LOCK: Mutex<()> = Mutex::new(());

fn runtime_lock() -> MutexGuard<'static, ()> {
    RUNTIME_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The spec is not valid JSON for an OCI spec.
    #[error("malformed OCI {what}")]
    Malformed {
        /// Spec or process.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The spec is too large.
    #[error("OCI {what} of {size} bytes exceeds {MAX_SPEC_SIZE}")]
    TooLarge {
        /// Spec or process.
        what: &'static str,
        /// Its size.
        size: usize,
    },
    /// The spec parses but cannot be run.
    #[error("invalid OCI spec: {0}")]
    Invalid(String),
    /// The container's root does not exist.
    #[error("the container's root {0} does not exist")]
    RootfsMissing(PathBuf),
    /// A path in the spec is refused.
    #[error(transparent)]
    Path(#[from] StorageError),
    /// The process's working directory cannot be made or used.
    #[error(transparent)]
    Cwd(#[from] CwdError),
    /// A file of the bundle could not be written.
    #[error("writing {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// libcontainer failed.
    #[error("{op}")]
    Runtime {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: LibcontainerError,
    },
    /// The container is not in a state that allows this.
    #[error("container is {status}: cannot {op}")]
    State {
        /// Its state.
        status: String,
        /// What was asked.
        op: &'static str,
    },
    /// The cgroup could not be opened or read.
    #[error("cgroup {what}: {message}")]
    Cgroup {
        /// What was being done.
        what: &'static str,
        /// The cause, as text (libcgroups' errors are not `Send` in every variant).
        message: String,
    },
}

fn runtime_err(op: &'static str) -> impl FnOnce(LibcontainerError) -> ContainerError {
    move |source| ContainerError::Runtime { op, source }
}

/// How a new process's stdio is connected.
pub enum ChildStdio {
    /// Plain pipes.
    Pipes(ChildPipes),
    /// A pty, whose master goes to the console socket at this path.
    Console(PathBuf),
}

/// Parses and checks a container spec; `rootfs`, if given, replaces root.path.
pub fn prepare_spec(id: &str, json: &[u8], rootfs: Option<&Path>) -> Result<Spec, ContainerError> {
    if json.len() > MAX_SPEC_SIZE {
        return Err(ContainerError::TooLarge {
            what: "spec",
            size: json.len(),
        });
    }
    let mut spec: Spec =
        serde_json::from_slice(json).map_err(|source| ContainerError::Malformed {
            what: "spec",
            source,
        })?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| ContainerError::Invalid("no process".into()))?;
    check_process(process)?;
    let root = spec
        .root_mut()
        .as_mut()
        .ok_or_else(|| ContainerError::Invalid("no root".into()))?;
    match rootfs {
        Some(path) => {
            root.set_path(path.to_owned());
        }
        None => {
            if !root.path().is_absolute() {
                return Err(ContainerError::Invalid(format!(
                    "root.path {} must be absolute when no rootfs storage is given",
                    root.path().display()
                )));
            }
        }
    }
    if !root.path().is_dir() {
        return Err(ContainerError::RootfsMissing(root.path().clone()));
    }
    for mount in spec.mounts().iter().flatten() {
        validate_container_path(mount.destination())?;
    }
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| ContainerError::Invalid("no linux section".into()))?;
    for ns in linux.namespaces().iter().flatten() {
        let Some(path) = ns.path() else { continue };
        if ns.typ() != LinuxNamespaceType::Pid || path != Path::new(POD_PID_NAMESPACE) {
            return Err(ContainerError::Invalid(format!(
                "namespace {:?} with path {}: the only namespace a container may join is the \
                 pod's PID namespace ({POD_PID_NAMESPACE})",
                ns.typ(),
                path.display()
            )));
        }
    }
    if linux.cgroups_path().is_none() {
        linux.set_cgroups_path(Some(PathBuf::from(format!("{CGROUP_PARENT}/{id}"))));
    }
    Ok(spec)
}

/// Parses and checks an exec'd process.
pub fn prepare_process(json: &[u8]) -> Result<Process, ContainerError> {
    if json.len() > MAX_SPEC_SIZE {
        return Err(ContainerError::TooLarge {
            what: "process",
            size: json.len(),
        });
    }
    let process: Process =
        serde_json::from_slice(json).map_err(|source| ContainerError::Malformed {
            what: "process",
            source,
        })?;
    check_process(&process)?;
    Ok(process)
}

fn check_process(process: &Process) -> Result<(), ContainerError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(ContainerError::Invalid("process.args is empty".into()));
    }
    if !process.cwd().is_absolute() {
        return Err(ContainerError::Invalid(
            "process.cwd must be absolute".into(),
        ));
    }
    Ok(())
}

/// The cgroup path a prepared spec runs in.
pub fn cgroup_path(spec: &Spec) -> PathBuf {
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .unwrap_or_default()
}

/// libcontainer's state directory and the agent's bundles.
pub struct Runtime {
    state_root: PathBuf,
    bundles: PathBuf,
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), ContainerError> {
    std::fs::write(path, data).map_err(|e| ContainerError::Io(path.to_owned(), e))
}

fn builder_with_stdio(mut builder: ContainerBuilder, stdio: ChildStdio) -> ContainerBuilder {
    match stdio {
        ChildStdio::Pipes(pipes) => {
            builder = builder
                .with_stdin(pipes.stdin)
                .with_stdout(pipes.stdout)
                .with_stderr(pipes.stderr);
        }
        ChildStdio::Console(path) => builder = builder.with_console_socket(Some(path)),
    }
    builder
}

impl Runtime {
    /// A runtime keeping its state under `dir`.
    pub fn new(dir: &Path) -> Result<Self, ContainerError> {
        let state_root = dir.join("containers");
        let bundles = dir.join("bundles");
        for d in [&state_root, &bundles] {
            std::fs::create_dir_all(d).map_err(|e| ContainerError::Io(d.clone(), e))?;
        }
        Ok(Self {
            state_root,
            bundles,
        })
    }

    /// The bundle directory of container `id` (where the agent writes its config.json).
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.bundles.join(id)
    }

    fn builder(&self, id: &str) -> Result<ContainerBuilder, ContainerError> {
        ContainerBuilder::new(id.to_owned(), SyscallType::Linux)
            .with_executor(LookPathExecutor)
            .with_root_path(&self.state_root)
            .map_err(runtime_err("setting the state directory"))
    }

    fn load(&self, id: &str) -> Result<Container, ContainerError> {
        Container::load(self.state_root.join(id))
            .map_err(runtime_err("loading the container state"))
    }

    /// Creates container `id` from `spec` (created state: its process waits for start), its
    /// working directory made first. Returns the pid of its init process.
    pub fn create(&self, id: &str, spec: &Spec, stdio: ChildStdio) -> Result<i32, ContainerError> {
        cwd::prepare(spec)?;
        let bundle = self.bundle(id);
        std::fs::create_dir_all(&bundle).map_err(|e| ContainerError::Io(bundle.clone(), e))?;
        let json = serde_json::to_vec(spec).map_err(|source| ContainerError::Malformed {
            what: "spec",
            source,
        })?;
        write_file(&bundle.join("config.json"), &json)?;
        let _lock = runtime_lock();
        let container = builder_with_stdio(self.builder(id)?, stdio)
            .as_init(&bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(runtime_err("creating the container"))?;
        container
            .pid()
            .map(|p| p.as_raw())
            .ok_or_else(|| ContainerError::Invalid("the runtime reported no pid".into()))
    }

    /// Starts the created container `id`.
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let _lock = runtime_lock();
        let mut container = self.load(id)?;
        if !container.can_start() {
            return Err(ContainerError::State {
                status: container.status().to_string(),
                op: "start",
            });
        }
        container
            .start()
            .map_err(runtime_err("starting the container"))
    }

    /// Runs `process` in the running container `id`. Returns its pid.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &Process,
        stdio: ChildStdio,
    ) -> Result<i32, ContainerError> {
        let path = self.bundle(id).join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(process).map_err(|source| ContainerError::Malformed {
            what: "process",
            source,
        })?;
        write_file(&path, &json)?;
        let _lock = runtime_lock();
        let mut container = self.load(id)?;
        container
            .refresh_status()
            .map_err(runtime_err("reading the container's status"))?;
        if container.status() != ContainerStatus::Running {
            let _ = std::fs::remove_file(&path);
            return Err(ContainerError::State {
                status: container.status().to_string(),
                op: "exec",
            });
        }
        // libcontainer's chdir failure would name neither the directory nor the call.
        if let Some(pid) = container.pid() {
            let root = PathBuf::from(format!("/proc/{pid}/root"));
            if let Err(e) = cwd::check(&root, process.cwd()) {
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
        }
        let pid = builder_with_stdio(self.builder(id)?, stdio)
            .as_tenant()
            .with_process(Some(&path))
            .with_detach(true)
            .build()
            .map_err(runtime_err("executing the process"));
        let _ = std::fs::remove_file(&path);
        Ok(pid?.as_raw())
    }

    /// Sends `signal` to the container's init process (or every process, `all`).
    pub fn kill(
        &self,
        id: &str,
        signal: nix::sys::signal::Signal,
        all: bool,
    ) -> Result<(), ContainerError> {
        let signal = Signal::from(signal);
        let _lock = runtime_lock();
        let mut container = self.load(id)?;
        container
            .kill(signal, all)
            .map_err(runtime_err("signalling the container"))
    }

    /// Freezes the container.
    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let _lock = runtime_lock();
        self.load(id)?
            .pause()
            .map_err(runtime_err("pausing the container"))
    }

    /// Thaws the container.
    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let _lock = runtime_lock();
        self.load(id)?
            .resume()
            .map_err(runtime_err("resuming the container"))
    }

    /// The container's status.
    pub fn status(&self, id: &str) -> Result<ContainerStatus, ContainerError> {
        let _lock = runtime_lock();
        let mut container = self.load(id)?;
        container
            .refresh_status()
            .map_err(runtime_err("reading the container's status"))?;
        Ok(container.status())
    }

    /// Deletes the container's state and cgroup (killing it first if `force`). The bundle stays:
    /// its root may still be mounted (see [`Runtime::remove_bundle`]).
    pub fn delete(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let _lock = runtime_lock();
        if let Ok(mut container) = self.load(id) {
            container
                .delete(force)
                .map_err(runtime_err("deleting the container"))?;
        }
        Ok(())
    }

    /// Removes the bundle once its root is unmounted. Never recursive: a recursive removal
    /// through a root still mounted would delete the container's files from its writable layer
    /// (it once did). A root that is still a mount point stays, and so does the bundle.
    pub fn remove_bundle(&self, id: &str) {
        let bundle = self.bundle(id);
        let _ = std::fs::remove_file(bundle.join("config.json"));
        let _ = std::fs::remove_dir(bundle.join("rootfs"));
        let _ = std::fs::remove_dir(&bundle);
    }
}

/// The container's cgroup.
pub fn cgroup(id: &str, path: &Path) -> Result<AnyCgroupManager, ContainerError> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_owned(),
        systemd_cgroup: false,
        container_name: id.to_owned(),
    })
    .map_err(|e| ContainerError::Cgroup {
        what: "opening",
        message: e.to_string(),
    })
}

/// The cgroup's statistics.
pub fn stats(id: &str, path: &Path) -> Result<Stats, ContainerError> {
    cgroup(id, path)?
        .stats()
        .map_err(|e| ContainerError::Cgroup {
            what: "statistics",
            message: e.to_string(),
        })
}

/// The pids in the cgroup.
pub fn pids(id: &str, path: &Path) -> Result<Vec<i32>, ContainerError> {
    Ok(cgroup(id, path)?
        .get_all_pids()
        .map_err(|e| ContainerError::Cgroup {
            what: "listing processes",
            message: e.to_string(),
        })?
        .into_iter()
        .map(|p| p.as_raw())
        .collect())
}

/// Applies new resource limits to the cgroup.
pub fn update(id: &str, path: &Path, json: &[u8]) -> Result<(), ContainerError> {
    if json.len() > MAX_SPEC_SIZE {
        return Err(ContainerError::TooLarge {
            what: "resources",
            size: json.len(),
        });
    }
    let resources: LinuxResources =
        serde_json::from_slice(json).map_err(|source| ContainerError::Malformed {
            what: "resources",
            source,
        })?;
    cgroup(id, path)?
        .apply(&ControllerOpt {
            resources: &resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| ContainerError::Cgroup {
            what: "update",
            message: e.to_string(),
        })
}

/// The number of OOM kills in the cgroup (cgroup v2 `memory.events`, v1 `memory.oom_control`).
pub fn oom_kills(path: &Path) -> u64 {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let candidates = [
        Path::new("/sys/fs/cgroup").join(rel).join("memory.events"),
        Path::new("/sys/fs/cgroup/memory")
            .join(rel)
            .join("memory.oom_control"),
    ];
    candidates
        .iter()
        .find_map(|file| std::fs::read_to_string(file).ok())
        .map(|text| parse_oom_kill(&text))
        .unwrap_or(0)
}

/// What StatsContainer reports of a cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicStats {
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub memory_usage: u64,
    pub memory_max_usage: u64,
    pub memory_limit: u64,
    pub memory_failcnt: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
}

impl From<&Stats> for BasicStats {
    fn from(s: &Stats) -> Self {
        BasicStats {
            cpu_usage_ns: s.cpu.usage.usage_total,
            cpu_user_ns: s.cpu.usage.usage_user,
            cpu_system_ns: s.cpu.usage.usage_kernel,
            memory_usage: s.memory.memory.usage,
            memory_max_usage: s.memory.memory.max_usage,
            memory_limit: s.memory.memory.limit,
            memory_failcnt: s.memory.memory.fail_count,
            pids_current: s.pids.current,
            pids_limit: s.pids.limit,
        }
    }
}

/// A `key value` line of a flat-keyed cgroup file.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A single-value cgroup file; `max` (no limit) reads as `u64::MAX`, as libcgroups reports it.
fn single(dir: &Path, file: &str) -> u64 {
    match std::fs::read_to_string(dir.join(file)) {
        Ok(v) if v.trim() == "max" => u64::MAX,
        Ok(v) => v.trim().parse().unwrap_or(0),
        Err(_) => 0,
    }
}

/// The statistics read straight from a cgroup v2 directory: cpu, memory and pids only.
/// libcgroups' whole-cgroup statistics fail unless every controller's files exist (hugetlb and
/// io among them), and the condensed guest kernel has neither.
pub fn basic_stats_v2(dir: &Path) -> Result<BasicStats, ContainerError> {
    let cpu = std::fs::read_to_string(dir.join("cpu.stat"))
        .map_err(|e| ContainerError::Io(dir.join("cpu.stat"), e))?;
    let events = std::fs::read_to_string(dir.join("memory.events")).unwrap_or_default();
    Ok(BasicStats {
        cpu_usage_ns: keyed(&cpu, "usage_usec") * 1000,
        cpu_user_ns: keyed(&cpu, "user_usec") * 1000,
        cpu_system_ns: keyed(&cpu, "system_usec") * 1000,
        memory_usage: single(dir, "memory.current"),
        memory_max_usage: single(dir, "memory.peak"),
        memory_limit: single(dir, "memory.max"),
        memory_failcnt: keyed(&events, "max"),
        pids_current: single(dir, "pids.current"),
        pids_limit: single(dir, "pids.max"),
    })
}

/// The container's statistics: libcgroups', else (cgroup v2) [`basic_stats_v2`].
pub fn basic_stats(id: &str, path: &Path) -> Result<BasicStats, ContainerError> {
    match stats(id, path) {
        Ok(s) => Ok(BasicStats::from(&s)),
        Err(e) => {
            let dir = Path::new("/sys/fs/cgroup").join(path.strip_prefix("/").unwrap_or(path));
            if dir.join("cgroup.controllers").exists() {
                basic_stats_v2(&dir)
            } else {
                Err(e)
            }
        }
    }
}

/// The `oom_kill N` line of memory.events or memory.oom_control.
pub fn parse_oom_kill(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_statistics_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let w = |f: &str, t: &str| std::fs::write(dir.path().join(f), t).unwrap();
        w(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
        );
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n");
        w("pids.current", "2\n");
        w("pids.max", "1024\n");
        let s = basic_stats_v2(dir.path()).unwrap();
        assert_eq!(
            s,
            BasicStats {
                cpu_usage_ns: 1_500_000,
                cpu_user_ns: 1_000_000,
                cpu_system_ns: 500_000,
                memory_usage: 4096,
                memory_max_usage: 0,
                memory_limit: u64::MAX,
                memory_failcnt: 3,
                pids_current: 2,
                pids_limit: 1024,
            }
        );
        std::fs::remove_file(dir.path().join("cpu.stat")).unwrap();
        assert!(basic_stats_v2(dir.path()).is_err());
    }

    fn spec_json(root: &str, extra_mount: Option<&str>) -> Vec<u8> {
        let mut mounts =
            vec![serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"})];
        if let Some(dest) = extra_mount {
            mounts.push(serde_json::json!({"destination": dest, "type": "bind", "source": "/tmp", "options": ["rbind"]}));
        }
        serde_json::to_vec(&serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": root},
            "mounts": mounts,
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        }))
        .unwrap()
    }

    #[test]
    fn spec_checks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        let spec = prepare_spec("c1", &spec_json(root, None), None).unwrap();
        assert_eq!(cgroup_path(&spec), PathBuf::from("/rund/c1"));

        assert!(matches!(
            prepare_spec("c1", b"{not json", None),
            Err(ContainerError::Malformed { .. })
        ));
        assert!(matches!(
            prepare_spec("c1", &spec_json("/nonexistent/rootfs", None), None),
            Err(ContainerError::RootfsMissing(_))
        ));
        assert!(matches!(
            prepare_spec("c1", &spec_json("rootfs", None), None),
            Err(ContainerError::Invalid(_))
        ));
        assert!(matches!(
            prepare_spec("c1", &spec_json(root, Some("/../../etc")), None),
            Err(ContainerError::Path(_))
        ));
        let big = vec![b' '; MAX_SPEC_SIZE + 1];
        assert!(matches!(
            prepare_spec("c1", &big, None),
            Err(ContainerError::TooLarge { .. })
        ));
        // root.path is replaced by the overlay's mount point.
        let spec = prepare_spec("c1", &spec_json("rootfs", None), Some(dir.path())).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().path(), dir.path());
    }

    #[test]
    fn only_the_pods_pid_namespace_may_be_joined() {
        let dir = tempfile::tempdir().unwrap();
        let with_ns = |ns: serde_json::Value| {
            let mut v: serde_json::Value =
                serde_json::from_slice(&spec_json(dir.path().to_str().unwrap(), None)).unwrap();
            v["linux"]["namespaces"] = ns;
            prepare_spec("c1", &serde_json::to_vec(&v).unwrap(), None)
        };
        assert!(with_ns(serde_json::json!([{"type": "pid", "path": POD_PID_NAMESPACE}])).is_ok());
        for bad in [
            serde_json::json!([{"type": "pid", "path": "/proc/1/ns/pid"}]),
            serde_json::json!([{"type": "network", "path": POD_PID_NAMESPACE}]),
            serde_json::json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}]),
        ] {
            let e = with_ns(bad.clone()).unwrap_err();
            assert!(
                matches!(&e, ContainerError::Invalid(m) if m.contains("path")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn process_checks() {
        assert!(
            prepare_process(br#"{"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#)
                .is_ok()
        );
        assert!(
            prepare_process(br#"{"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#).is_err()
        );
        assert!(prepare_process(
            br#"{"args": ["sh"], "cwd": "rel", "user": {"uid": 0, "gid": 0}}"#
        )
        .is_err());
        assert!(prepare_process(b"[]").is_err());
    }

    #[test]
    fn oom_kill_lines() {
        assert_eq!(
            parse_oom_kill("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n"),
            2
        );
        assert_eq!(
            parse_oom_kill("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"),
            5
        );
        assert_eq!(parse_oom_kill(""), 0);
    }
}
