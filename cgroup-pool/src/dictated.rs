//! The parents of a platform-dictated cgroup (a CRI sandbox's `cgroupsPath`: containerd's
//! `/k8s.io/<id>` when the pod names no cgroup parent, the kubelet's
//! `/kubepods/burstable/pod<uid>/<id>`), made ready the way runc makes them: each missing
//! ancestor is made in every hierarchy (`mkdir -p`); on v1 a cpuset on the way with empty cpus
//! or mems gets its parent's (a cpuset without them takes no task); on v2 the pool's
//! controllers are switched on from the root down, since a cgroup only gets the controllers its
//! parent switched on.
//!
//! What is made here is the platform's once the sandbox's cgroup is in it, as with runc: no
//! marker, so that nothing of rund's (release, reconcile, drain) ever removes it; containerd
//! leaves `/k8s.io` in place too. Only an acquire that fails takes back the ancestors it made,
//! and only those still empty.

use std::path::{Path, PathBuf};

use crate::cgroupfs::{self, CgroupFsError};
use crate::hierarchy::{CgroupVersion, Hierarchy, HierarchyMount};
use crate::limits::fill_cpuset_if_empty;
use crate::parent::{self, Parent, ParentError};

/// How often a chain is walked again when a directory in it disappears meanwhile (another
/// acquire that failed took back an empty ancestor it had made, just after this one found it).
pub const MAX_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum DictatedError {
    #[error(transparent)]
    Parent(#[from] ParentError),
    #[error(transparent)]
    CgroupFs(#[from] CgroupFsError),
}

impl DictatedError {
    /// A directory on the way disappeared (ENOENT): walking the chain again makes it anew.
    fn vanished(&self) -> bool {
        match self {
            DictatedError::CgroupFs(e) | DictatedError::Parent(ParentError::CgroupFs(e)) => {
                cgroupfs::is_not_found(e)
            }
            DictatedError::Parent(_) => false,
        }
    }
}

/// The ancestors one acquire made, in the order it made them.
#[derive(Debug, Default)]
pub struct MadeParents(Vec<PathBuf>);

impl MadeParents {
    fn push(&mut self, dir: PathBuf) {
        if !self.0.contains(&dir) {
            self.0.push(dir);
        }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.0
    }

    /// After a failed acquire: removes them, the last made first. One that is not empty (another
    /// sandbox's cgroup was made in it meanwhile) is the platform's now and stays, and so do its
    /// ancestors. Best effort: a failure is logged.
    pub fn remove(self) {
        for dir in self.0.iter().rev() {
            match cgroupfs::rmdir(dir) {
                Ok(()) => {}
                Err(e)
                    if cgroupfs::is_not_found(&e)
                        || matches!(
                            e.raw_os_error(),
                            Some(cgroupfs::libc_errno::EBUSY)
                                | Some(cgroupfs::libc_errno::ENOTEMPTY)
                        ) => {}
                Err(e) => log::warn!("cgroup-pool: after a failed acquire: {e}"),
            }
        }
    }
}

/// Makes `parent` (relative to each mount point) ready to hold the cgroup `cgroup` (the same,
/// one level down): every missing ancestor made (recorded in `made`), cpusets filled on v1, and
/// on v2 the pool's controllers switched on down to it. `needed` are the v2 controllers the
/// sandbox's limits use: an error when they cannot be switched on (the others are skipped
/// where the kernel refuses them, as runc does).
pub fn prepare(
    hierarchy: &Hierarchy,
    parent: &Path,
    cgroup: &Path,
    needed: &[&str],
    made: &mut MadeParents,
) -> Result<Parent, DictatedError> {
    for mount in &hierarchy.mounts {
        let target = mount.mount_point.join(cgroup);
        let mut attempt = 1;
        loop {
            match make_chain(hierarchy.version, mount, parent, &target, needed, made) {
                Err(e) if e.vanished() && attempt < MAX_ATTEMPTS => attempt += 1,
                r => break r?,
            }
        }
    }
    let child_controllers = match hierarchy.version {
        CgroupVersion::V1 => Vec::new(),
        CgroupVersion::V2 => {
            parent::subtree_control(&hierarchy.mounts[0].mount_point.join(parent))?
        }
    };
    Ok(Parent {
        relative: parent.to_path_buf(),
        child_controllers,
    })
}

/// One walk from the mount point down to `parent`, top-down (a level is ready before its child
/// is made, so a failure leaves nothing below it).
fn make_chain(
    version: CgroupVersion,
    mount: &HierarchyMount,
    parent: &Path,
    target: &Path,
    needed: &[&str],
    made: &mut MadeParents,
) -> Result<(), DictatedError> {
    let has_cpuset = mount.controllers.iter().any(|c| c == "cpuset");
    let mut dir = mount.mount_point.clone();
    if version == CgroupVersion::V2 {
        parent::switch_on(&dir, needed, target)?;
    }
    for component in parent.components() {
        dir.push(component);
        // A stat first: the common case (the platform made it) takes no cgroup lock.
        if !dir.is_dir() {
            match cgroupfs::mkdir(&dir) {
                Ok(()) => made.push(dir.clone()),
                // Another shim made it a moment ago.
                Err(e) if cgroupfs::is_already_exists(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match version {
            CgroupVersion::V1 if has_cpuset => fill_cpuset_if_empty(&dir)?,
            CgroupVersion::V1 => {}
            CgroupVersion::V2 => parent::switch_on(&dir, needed, target)?,
        }
    }
    Ok(())
}
