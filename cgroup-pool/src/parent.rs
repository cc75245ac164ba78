//! rund's parent cgroup (default `rund` below each mount point): made on start with the marker,
//! cpuset filled in on v1, and on v2 the controllers the pool applies switched on down to it.

use std::path::{Path, PathBuf};

use crate::cgroupfs::{self, CgroupFsError};
use crate::hierarchy::{CgroupDirs, CgroupVersion, Hierarchy};
use crate::limits::copy_cpuset_from_parent;
use crate::naming::Marker;

/// The v2 controllers the pool's limits use; switched on for the pool's cgroups where offered.
pub const V2_CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error("cannot make rund's parent cgroup: {0}")]
    Make(#[source] CgroupFsError),
    #[error("cannot switch on the {controllers} controllers in {file} (a cgroup v2 parent must have no processes of its own): {source}")]
    EnableControllers {
        file: PathBuf,
        controllers: String,
        #[source]
        source: CgroupFsError,
    },
    #[error(transparent)]
    CgroupFs(#[from] CgroupFsError),
}

/// A parent cgroup ready to hold children.
#[derive(Debug, Clone)]
pub struct Parent {
    /// Relative to each mount point.
    pub relative: PathBuf,
    /// On v2, the controllers its children get (its `cgroup.subtree_control`).
    pub child_controllers: Vec<String>,
}

impl Parent {
    /// The directories of the child `name`.
    pub fn child_dirs(&self, hierarchy: &Hierarchy, name: &str) -> CgroupDirs {
        hierarchy.dirs_of(&self.relative.join(name), &self.child_controllers)
    }

    /// The parent's own directory in each hierarchy.
    pub fn dirs(&self, hierarchy: &Hierarchy) -> Vec<PathBuf> {
        hierarchy
            .mounts
            .iter()
            .map(|m| m.mount_point.join(&self.relative))
            .collect()
    }
}

/// Makes rund's parent (and any missing ancestor, each marked as rund's) in every hierarchy.
pub fn prepare_owned(hierarchy: &Hierarchy, relative: &Path) -> Result<Parent, ParentError> {
    for mount in &hierarchy.mounts {
        let has_cpuset = mount.controllers.iter().any(|c| c == "cpuset");
        let mut dir = mount.mount_point.clone();
        for component in relative.components() {
            dir.push(component);
            match cgroupfs::mkdir(&dir) {
                Ok(()) => cgroupfs::set_marker(&dir, &Marker::Parent).map_err(ParentError::Make)?,
                Err(e) if cgroupfs::is_already_exists(&e) => {}
                Err(e) => return Err(ParentError::Make(e)),
            }
            if hierarchy.version == CgroupVersion::V1 && has_cpuset {
                let cpus = cgroupfs::read_to_string(&dir.join("cpuset.cpus"))?;
                if cpus.trim().is_empty() {
                    copy_cpuset_from_parent(&dir)?;
                }
            }
        }
    }
    existing(hierarchy, relative, true)
}

/// A parent someone else made (a dictated `cgroupsPath`'s parent): on v2, switches on what it can
/// when `enable` is set, and reports what its children get.
pub fn existing(
    hierarchy: &Hierarchy,
    relative: &Path,
    enable: bool,
) -> Result<Parent, ParentError> {
    let mut child_controllers = Vec::new();
    if hierarchy.version == CgroupVersion::V2 {
        let mount = &hierarchy.mounts[0].mount_point;
        let mut dir = mount.clone();
        let mut chain = vec![dir.clone()];
        for component in relative.components() {
            dir.push(component);
            chain.push(dir.clone());
        }
        if enable {
            for d in &chain {
                enable_controllers(d)?;
            }
        }
        child_controllers = read_words(&dir.join("cgroup.subtree_control"))?;
    }
    Ok(Parent {
        relative: relative.to_path_buf(),
        child_controllers,
    })
}

fn read_words(path: &Path) -> Result<Vec<String>, CgroupFsError> {
    Ok(cgroupfs::read_to_string(path)?
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

fn enable_controllers(dir: &Path) -> Result<(), ParentError> {
    let offered = read_words(&dir.join("cgroup.controllers"))?;
    let enabled = read_words(&dir.join("cgroup.subtree_control"))?;
    let missing: Vec<String> = V2_CONTROLLERS
        .iter()
        .filter(|c| offered.iter().any(|o| o == *c) && !enabled.iter().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let file = dir.join("cgroup.subtree_control");
    let controllers = missing.join(" ");
    cgroupfs::write(&file, &controllers).map_err(|source| ParentError::EnableControllers {
        file: file.clone(),
        controllers,
        source,
    })
}

/// Removes the parent directories rund made (marked), deepest first, in every hierarchy; stops
/// at one that is not rund's or not empty. Best effort: returns what it could not remove.
pub fn remove_owned(hierarchy: &Hierarchy, relative: &Path) -> Vec<CgroupFsError> {
    let mut errors = Vec::new();
    for mount in &hierarchy.mounts {
        let mut dir = mount.mount_point.join(relative);
        while dir != mount.mount_point {
            match cgroupfs::read_marker(&dir) {
                Ok(Some(Marker::Parent)) => {}
                Ok(_) => break,
                Err(e) => {
                    if !cgroupfs::is_not_found(&e) {
                        errors.push(e);
                    }
                    break;
                }
            }
            if let Err(e) = cgroupfs::rmdir(&dir) {
                if !matches!(
                    e.raw_os_error(),
                    Some(cgroupfs::libc_errno::EBUSY) | Some(cgroupfs::libc_errno::ENOTEMPTY)
                ) {
                    errors.push(e);
                }
                break;
            }
            if !dir.pop() {
                break;
            }
        }
    }
    errors
}
