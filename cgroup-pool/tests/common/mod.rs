//! Shared by the integration tests: unique pool parents and state directories that are removed
//! even when a test fails (guards), real child processes, and the skip rules for hosts without
//! the hierarchy a test needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cgroup_pool::mountinfo;
use cgroup_pool::{CgroupVersion, PoolConfig};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Where the cgroups of one test live, and what it removes on drop: every directory below its
/// parent in every cgroup mount (deepest first) and its state directory.
pub struct TestEnv {
    pub parent: String,
    pub state_dir: PathBuf,
    pub version: CgroupVersion,
    pub mounts: Vec<PathBuf>,
    /// How a v1 pool claims slots (rename unless a test asks for claim files).
    pub v1_claim: cgroup_pool::V1Claim,
}

impl TestEnv {
    pub fn new(version: CgroupVersion, mounts: Vec<PathBuf>) -> TestEnv {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        TestEnv {
            parent: format!("rund-test-{tag}"),
            state_dir: std::env::temp_dir().join(format!("rund-cgroup-pool-test-{tag}")),
            version,
            mounts,
            v1_claim: cgroup_pool::V1Claim::Rename,
        }
    }

    /// Whether held slots are renamed (`sandbox-<id>`) and released ones parked as `recycle-…`.
    pub fn renames(&self) -> bool {
        self.version == CgroupVersion::V1 && self.v1_claim == cgroup_pool::V1Claim::Rename
    }

    pub fn config(&self) -> PoolConfig {
        PoolConfig {
            parent: self.parent.clone(),
            state_dir: self.state_dir.clone(),
            version: Some(self.version),
            mounts: Some(self.mounts.clone()),
            low_watermark: 2,
            high_watermark: 4,
            refill_interval: Duration::from_millis(200),
            background_refill: false,
            default_shape: None,
            recycle: cgroup_pool::Recycle::Refill,
            v1_claim: self.v1_claim,
        }
    }

    /// `<mount>/<parent>` in each mount.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.mounts.iter().map(|m| m.join(&self.parent)).collect()
    }

    /// A directory next to the pool's parent (for a "platform" parent), removed on drop too.
    pub fn sibling(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.parent)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for mount in &self.mounts {
            let Ok(entries) = std::fs::read_dir(mount) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == self.parent || name.starts_with(&format!("{}-", self.parent)) {
                    remove_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// rmdir every cgroup below and at `dir`, deepest first; tasks left in one are moved to the
/// mount's root first so that nothing is leaked.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        evacuate(dir);
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("test cleanup: could not remove {}", dir.display());
}

fn evacuate(dir: &Path) {
    let Some(root) = mount_root_of(dir) else {
        return;
    };
    for file in ["cgroup.procs", "tasks"] {
        if let Ok(ids) = std::fs::read_to_string(dir.join(file)) {
            for id in ids.lines() {
                let _ = std::fs::write(root.join("cgroup.procs"), id);
            }
        }
    }
}

fn mount_root_of(dir: &Path) -> Option<PathBuf> {
    let mounts = mountinfo::cgroup_mounts().ok()?;
    mounts
        .into_iter()
        .filter(|m| dir.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| m.mount_point)
}

/// A `sleep` child, killed and reaped on drop.
pub struct Sleeper(pub Child);

impl Sleeper {
    pub fn spawn() -> Sleeper {
        Sleeper(
            Command::new("sleep")
                .arg("1000")
                .spawn()
                .expect("spawn sleep"),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The cgroup paths of a process, from /proc/<pid>/cgroup.
pub fn proc_cgroup(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// A missing prerequisite: fails the test when `var=1` requires it, otherwise prints the skip.
fn skip_unless_required<T>(var: &str, reason: &str) -> Option<T> {
    assert!(!required(var), "{var}=1: {reason}");
    eprintln!("SKIPPED: {reason}");
    None
}

/// The v1 controller hierarchies, or `None` (skip) on a host without them; with
/// `RUND_REQUIRE_CGROUP_V1=1` their absence fails the test instead.
pub fn v1_mounts() -> Option<Vec<PathBuf>> {
    let mounts: Vec<PathBuf> = mountinfo::cgroup_mounts()
        .expect("mountinfo")
        .into_iter()
        .filter(|m| {
            !m.v2 && !m.controllers.is_empty() && m.mount_point.starts_with("/sys/fs/cgroup")
        })
        .map(|m| m.mount_point)
        .collect();
    if mounts.is_empty() {
        return skip_unless_required(
            "RUND_REQUIRE_CGROUP_V1",
            "no cgroup v1 controller hierarchy is mounted under /sys/fs/cgroup",
        );
    }
    Some(mounts)
}

/// The v1 mounts, but only if every controller in `needed` is among them.
pub fn v1_mounts_with(needed: &[&str]) -> Option<Vec<PathBuf>> {
    let mounts = v1_mounts()?;
    let have: Vec<String> = mountinfo::cgroup_mounts()
        .expect("mountinfo")
        .into_iter()
        .filter(|m| mounts.contains(&m.mount_point))
        .flat_map(|m| m.controllers)
        .collect();
    let missing: Vec<&&str> = needed
        .iter()
        .filter(|c| !have.iter().any(|h| h == **c))
        .collect();
    if !missing.is_empty() {
        let msg = format!("cgroup v1 controllers {missing:?} are not mounted");
        return skip_unless_required("RUND_REQUIRE_CGROUP_V1", &msg);
    }
    Some(mounts)
}

/// A writable cgroup2 mount (the pure one at /sys/fs/cgroup when there is one, else a hybrid
/// host's) offering every controller in `needed`; `None` (skip) otherwise. With
/// `RUND_REQUIRE_CGROUP_V2=1` (CI in the testbed) the absence fails the test instead.
pub fn v2_mount_with(needed: &[&str]) -> Option<PathBuf> {
    let mounts = mountinfo::cgroup_mounts().expect("mountinfo");
    let v2: Vec<PathBuf> = mounts
        .into_iter()
        .filter(|m| m.v2)
        .map(|m| m.mount_point)
        .collect();
    let chosen = v2
        .iter()
        .find(|p| p.as_path() == Path::new("/sys/fs/cgroup"))
        .or_else(|| v2.iter().find(|p| p.starts_with("/sys/fs/cgroup")))
        .cloned();
    let reason = match &chosen {
        None => Some("no cgroup2 filesystem is mounted under /sys/fs/cgroup".to_string()),
        Some(p) => {
            let offered = std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default();
            let missing: Vec<&&str> = needed
                .iter()
                .filter(|c| !offered.split_whitespace().any(|o| o == **c))
                .collect();
            (!missing.is_empty()).then(|| {
                format!(
                    "the cgroup2 at {} offers no {missing:?} controller (it has: {:?})",
                    p.display(),
                    offered.trim()
                )
            })
        }
    };
    if let Some(reason) = reason {
        return skip_unless_required("RUND_REQUIRE_CGROUP_V2", &reason);
    }
    chosen
}

pub fn is_alive_none(_: &cgroup_pool::SandboxId) -> bool {
    false
}

pub fn id(s: &str) -> cgroup_pool::SandboxId {
    cgroup_pool::SandboxId::parse(s).unwrap()
}
pub mod scenarios;
