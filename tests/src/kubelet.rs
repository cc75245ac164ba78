//! What a kubelet does on a node besides its CRI calls, as far as the end-to-end tests need it: the
//! pod's cgroup under the QoS class's (`/kubepods/burstable/pod<uid>`), made the way the kubelet's
//! cgroupfs driver makes it before `RunPodSandbox` (libcontainer's cgroup manager: each level made
//! in every hierarchy; on cgroup v2 every controller a level offers switched on for its children,
//! from the root down; on v1 a new cpuset level gets its parent's CPUs and memory nodes), and
//! removed after the pod is gone.

use std::path::{Path, PathBuf};

/// The cgroup filesystem's mount point.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum KubeletCgroupError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy is mounted under {CGROUP_ROOT}")]
    NoHierarchy,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KubeletCgroupError {
    let path = path.to_path_buf();
    move |source| KubeletCgroupError::Io { what, path, source }
}

/// A pod's cgroup made as a kubelet makes it; removed (with the levels it made) on drop.
#[derive(Debug)]
pub struct PodCgroup {
    /// The pod's `cgroup_parent` in CRI's terms: `/kubepods/burstable/pod<uid>`.
    pub parent: String,
    /// Directories this made, in the order made (removed deepest first).
    made: Vec<PathBuf>,
}

/// Whether `/sys/fs/cgroup` is a pure cgroup v2 hierarchy.
fn is_v2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").is_file()
}

/// The roots of the hierarchies a level is made in: the v2 mount, or every v1 hierarchy mounted
/// below /sys/fs/cgroup (a directory holding `cgroup.procs`).
fn hierarchy_roots() -> Result<Vec<PathBuf>, KubeletCgroupError> {
    let root = Path::new(CGROUP_ROOT);
    if is_v2() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut roots = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io("listing", root))? {
        let path = entry.map_err(io("listing", root))?.path();
        if path.join("cgroup.procs").is_file() && !path.is_symlink() {
            roots.push(path);
        }
    }
    if roots.is_empty() {
        return Err(KubeletCgroupError::NoHierarchy);
    }
    Ok(roots)
}

/// v2: switches on, for `dir`'s children, every controller `dir` offers.
fn enable_all_controllers(dir: &Path) -> Result<(), KubeletCgroupError> {
    let offered = dir.join("cgroup.controllers");
    let text = std::fs::read_to_string(&offered).map_err(io("reading", &offered))?;
    let enable: Vec<String> = text.split_whitespace().map(|c| format!("+{c}")).collect();
    if enable.is_empty() {
        return Ok(());
    }
    let control = dir.join("cgroup.subtree_control");
    std::fs::write(&control, enable.join(" ")).map_err(io("writing", &control))
}

/// v1: a new cpuset cgroup starts with no CPUs and no memory nodes; give it its parent's.
fn inherit_cpuset(dir: &Path) -> Result<(), KubeletCgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let Some(parent) = dir.parent() else {
            return Ok(());
        };
        let from = parent.join(file);
        if !own.is_file() {
            continue;
        }
        let value = std::fs::read_to_string(&from).map_err(io("reading", &from))?;
        std::fs::write(&own, value.trim()).map_err(io("writing", &own))?;
    }
    Ok(())
}

impl PodCgroup {
    /// Makes `/kubepods/burstable/pod<uid>` in every hierarchy.
    pub fn make(uid: &str) -> Result<PodCgroup, KubeletCgroupError> {
        let relative = PathBuf::from("kubepods/burstable").join(format!("pod{uid}"));
        let mut cgroup = PodCgroup {
            parent: format!("/{}", relative.display()),
            made: Vec::new(),
        };
        let v2 = is_v2();
        for root in hierarchy_roots()? {
            let mut dir = root.clone();
            if v2 {
                enable_all_controllers(&dir)?;
            }
            for component in relative.components() {
                dir.push(component);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {
                        cgroup.made.push(dir.clone());
                        if !v2 {
                            inherit_cpuset(&dir)?;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io("making", &dir)(e)),
                }
                if v2 {
                    enable_all_controllers(&dir)?;
                }
            }
        }
        Ok(cgroup)
    }

    /// The pod cgroup's directory in the first hierarchy (the v2 mount, on v2).
    pub fn dir(&self) -> PathBuf {
        Path::new(CGROUP_ROOT).join(self.parent.trim_start_matches('/'))
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            // A level still in use (another pod's, a runtime's leftover) stays; the test's own
            // leftover checks say what was left.
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("kubelet: cannot remove {}: {e}", dir.display());
            }
        }
    }
}
