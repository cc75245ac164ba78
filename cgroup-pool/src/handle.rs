//! A sandbox's cgroup, as handed out by the pool or found again from rund's state.

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use crate::cgroupfs::{self, CgroupFsError};
use crate::hierarchy::{CgroupDirs, CgroupVersion};
use crate::limits::{self, LimitsError};
use crate::resources::{Limits, ResourceError};
use crate::sandbox_id::SandboxId;
use crate::state::{Placement, SandboxRecord, StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("cannot move process {pid} into sandbox {id}'s cgroup: {source}")]
    AttachProcess {
        pid: u32,
        id: SandboxId,
        #[source]
        source: CgroupFsError,
    },
    #[error("cannot move thread {tid} into sandbox {id}'s cgroup{hint}: {source}")]
    AttachThread {
        tid: u32,
        id: SandboxId,
        hint: &'static str,
        #[source]
        source: CgroupFsError,
    },
    #[error(transparent)]
    Resources(#[from] ResourceError),
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error(transparent)]
    CgroupFs(#[from] CgroupFsError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// One sandbox's cgroup: its directories (one per v1 hierarchy, or one on v2) and where it came
/// from. Cheap to clone; holds no file descriptors. Give it back with
/// [`crate::CgroupPool::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCgroup {
    record: SandboxRecord,
}

impl SandboxCgroup {
    pub(crate) fn new(record: SandboxRecord) -> SandboxCgroup {
        SandboxCgroup { record }
    }

    /// Finds a sandbox's cgroup from rund's state directory alone, without a pool (for `rund`,
    /// or a shim's `delete` after the shim that held it was killed).
    pub fn lookup(state_dir: &Path, id: &SandboxId) -> Result<Option<SandboxCgroup>, HandleError> {
        Ok(StateDir::existing(state_dir)
            .read_record(id)?
            .map(SandboxCgroup::new))
    }

    pub fn sandbox_id(&self) -> &SandboxId {
        &self.record.sandbox_id
    }

    pub fn version(&self) -> CgroupVersion {
        self.record.dirs.version
    }

    pub fn placement(&self) -> &Placement {
        &self.record.placement
    }

    /// True when the cgroup was made in a platform-dictated parent (a pool bypass).
    pub fn is_bypass(&self) -> bool {
        matches!(self.record.placement, Placement::Dictated { .. })
    }

    pub fn dirs(&self) -> &CgroupDirs {
        &self.record.dirs
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.record.dirs.paths().map(Path::to_path_buf).collect()
    }

    /// The directory where `controller` acts (`cpu`, `memory`, ...).
    pub fn path_for(&self, controller: &str) -> Option<&Path> {
        self.record.dirs.dir_for(controller)
    }

    /// Moves a whole process (all its threads) in: `cgroup.procs` in every directory.
    pub fn attach_process(&self, pid: u32) -> Result<(), HandleError> {
        for dir in self.record.dirs.paths() {
            cgroupfs::write(&dir.join("cgroup.procs"), &pid.to_string()).map_err(|source| {
                HandleError::AttachProcess {
                    pid,
                    id: self.record.sandbox_id.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Moves one thread in (for example a vCPU thread of the shim): `tasks` on v1. On v2 a domain
    /// cgroup takes whole processes only; the kernel refuses a lone thread unless the cgroups are
    /// threaded, and the error says so.
    pub fn attach_thread(&self, tid: u32) -> Result<(), HandleError> {
        let (file, hint) = match self.version() {
            CgroupVersion::V1 => ("tasks", ""),
            CgroupVersion::V2 => (
                "cgroup.threads",
                " (cgroup v2 moves whole processes; use attach_process, or threaded cgroups)",
            ),
        };
        for dir in self.record.dirs.paths() {
            cgroupfs::write(&dir.join(file), &tid.to_string()).map_err(|source| {
                HandleError::AttachThread {
                    tid,
                    id: self.record.sandbox_id.clone(),
                    hint,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Every thread id in the cgroup (all directories).
    pub fn threads(&self) -> Result<Vec<u32>, HandleError> {
        Ok(self.record.dirs.threads()?)
    }

    /// Applies (or updates) the sandbox's limits.
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), HandleError> {
        let limits = Limits::from_oci(resources, self.version())?;
        log_ignored(&self.record.sandbox_id, &limits);
        limits::apply_if_changed(&self.record.dirs, &limits)?;
        Ok(())
    }
}

pub(crate) fn log_ignored(id: &SandboxId, limits: &Limits) {
    if !limits.ignored.is_empty() {
        log::info!(
            "cgroup-pool: sandbox {id}: not applied on the host cgroup: {}",
            limits.ignored.join(", ")
        );
    }
}
