//! rund's parent cgroup (default `rund` below each mount point): made on start with the marker,
//! cpuset filled in on v1, and on v2 the controllers the pool applies switched on down to it
//! ([`switch_on`], which a dictated cgroup's parents get too: see [`crate::dictated`]).

use std::path::{Path, PathBuf};

use crate::cgroupfs::{self, CgroupFsError};
use crate::hierarchy::{CgroupDirs, CgroupVersion, Hierarchy};
use crate::limits::fill_cpuset_if_empty;
use crate::naming::Marker;

/// The v2 controllers the pool's limits use; switched on for the pool's cgroups where offered.
pub const V2_CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error("cannot make rund's parent cgroup: {0}")]
    Make(#[source] CgroupFsError),
    #[error("cannot switch on {controllers} in {dir}/cgroup.subtree_control for {cgroup}: {dir} has processes of its own{procs}, and cgroup v2 switches controllers on only for the children of a cgroup without processes (move them into a child cgroup first)")]
    InternalProcesses {
        dir: PathBuf,
        controllers: String,
        /// The cgroup below `dir` that needed them.
        cgroup: PathBuf,
        procs: Procs,
    },
    #[error("the {controller} controller is not available in cgroup v2 cgroup {dir} (its cgroup.controllers does not list it), so {cgroup} below it cannot have it")]
    NotOffered {
        controller: String,
        dir: PathBuf,
        cgroup: PathBuf,
    },
    #[error(transparent)]
    CgroupFs(#[from] CgroupFsError),
}

/// A few of the processes found in a cgroup, for an error message: ` (pid 42 among 3)`, or
/// nothing when none could be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Procs(pub Vec<u32>);

impl std::fmt::Display for Procs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.first() {
            Some(pid) => write!(f, " (pid {pid} among {})", self.0.len()),
            None => Ok(()),
        }
    }
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
                fill_cpuset_if_empty(&dir)?;
            }
        }
    }
    existing(hierarchy, relative, true)
}

/// A parent that exists (rund's, just made): on v2, with `enable`, switches the pool's
/// controllers on from the root down to it (each one the root offers is required), and reports
/// what its children get.
pub fn existing(
    hierarchy: &Hierarchy,
    relative: &Path,
    enable: bool,
) -> Result<Parent, ParentError> {
    let mut child_controllers = Vec::new();
    if hierarchy.version == CgroupVersion::V2 {
        let root = &hierarchy.mounts[0];
        let target = root.mount_point.join(relative);
        if enable {
            let needed: Vec<&str> = V2_CONTROLLERS
                .iter()
                .copied()
                .filter(|c| root.controllers.iter().any(|o| o == c))
                .collect();
            let mut dir = root.mount_point.clone();
            switch_on(&dir, &needed, &target)?;
            for component in relative.components() {
                dir.push(component);
                switch_on(&dir, &needed, &target)?;
            }
        }
        child_controllers = subtree_control(&target)?;
    }
    Ok(Parent {
        relative: relative.to_path_buf(),
        child_controllers,
    })
}

/// What a v2 cgroup gives its children (its `cgroup.subtree_control`).
pub fn subtree_control(dir: &Path) -> Result<Vec<String>, CgroupFsError> {
    read_words(&dir.join("cgroup.subtree_control"))
}

fn read_words(path: &Path) -> Result<Vec<String>, CgroupFsError> {
    Ok(cgroupfs::read_to_string(path)?
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// Switches on, for the children of the v2 cgroup `dir`, each of the pool's controllers
/// ([`V2_CONTROLLERS`]) that `dir` offers and has not switched on yet, in one write. Those in
/// `needed` (what `cgroup`, somewhere below `dir`, must get) are an error when `dir` does not
/// offer them or cannot switch them on; the others are then only logged, as runc ignores them.
pub fn switch_on(dir: &Path, needed: &[&str], cgroup: &Path) -> Result<(), ParentError> {
    let offered = read_words(&dir.join("cgroup.controllers"))?;
    if let Some(c) = needed.iter().find(|c| !offered.iter().any(|o| o == *c)) {
        return Err(ParentError::NotOffered {
            controller: c.to_string(),
            dir: dir.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        });
    }
    let enabled = subtree_control(dir)?;
    let missing: Vec<&str> = V2_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| offered.iter().any(|o| o == c) && !enabled.iter().any(|e| e == c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let controllers = missing
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let busy = |procs| ParentError::InternalProcesses {
        dir: dir.to_path_buf(),
        controllers: controllers.clone(),
        cgroup: cgroup.to_path_buf(),
        procs: Procs(procs),
    };
    // Looked at before writing, not only through the kernel's EBUSY: a cgroup with processes may
    // still switch on threaded controllers alone (cpu, cpuset, pids), and then becomes a thread
    // root whose plain children take no process at all. The hierarchy's root is exempt.
    let procs = if is_hierarchy_root(dir) {
        Vec::new()
    } else {
        cgroupfs::read_ids(&dir.join("cgroup.procs"))?
    };
    let result = if procs.is_empty() {
        cgroupfs::write(&dir.join("cgroup.subtree_control"), &controllers).map_err(|e| {
            if e.raw_os_error() == Some(cgroupfs::libc_errno::EBUSY) {
                let procs = cgroupfs::read_ids(&dir.join("cgroup.procs")).unwrap_or_default();
                busy(procs)
            } else {
                ParentError::CgroupFs(e)
            }
        })
    } else {
        Err(busy(procs))
    };
    match result {
        Err(e) if !missing.iter().any(|c| needed.contains(c)) => {
            log::warn!(
                "cgroup-pool: {e}; {} goes without them (no limit asks for them)",
                cgroup.display()
            );
            Ok(())
        }
        r => r,
    }
}

/// The root of a v2 hierarchy has no `cgroup.type` (and no "no internal processes" rule); a
/// cgroup namespace's root is an ordinary cgroup and has one.
fn is_hierarchy_root(dir: &Path) -> bool {
    !dir.join("cgroup.type").exists()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of plain files standing in for a v2 cgroup; removed on drop.
    struct FakeCgroup(PathBuf);

    impl FakeCgroup {
        fn new(tag: &str, offered: &str, enabled: &str, procs: Option<&str>) -> FakeCgroup {
            let dir = std::env::temp_dir().join(format!(
                "cgroup-pool-parent-unit-{tag}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cgroup.controllers"), offered).unwrap();
            std::fs::write(dir.join("cgroup.subtree_control"), enabled).unwrap();
            // No cgroup.type: the hierarchy's root, where processes do not matter.
            if let Some(procs) = procs {
                std::fs::write(dir.join("cgroup.type"), "domain\n").unwrap();
                std::fs::write(dir.join("cgroup.procs"), procs).unwrap();
            }
            FakeCgroup(dir)
        }

        fn subtree_control(&self) -> String {
            std::fs::read_to_string(self.0.join("cgroup.subtree_control")).unwrap()
        }
    }

    impl Drop for FakeCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn switches_on_what_is_offered_and_missing_in_one_write() {
        let cg = FakeCgroup::new("write", "cpu io memory pids\n", "pids\n", Some(""));
        switch_on(&cg.0, &["memory"], Path::new("/x/sb")).unwrap();
        // A plain file keeps the one write as it was: cpuset is not offered, pids is on.
        assert_eq!(cg.subtree_control(), "+cpu +memory");
        let all = FakeCgroup::new("none", "cpu memory\n", "cpu memory\n", Some(""));
        switch_on(&all.0, &["cpu", "memory"], Path::new("/x/sb")).unwrap();
        assert_eq!(all.subtree_control(), "cpu memory\n", "nothing written");
    }

    #[test]
    fn a_needed_controller_not_offered_names_the_cgroup_read() {
        let cg = FakeCgroup::new("offered", "cpu pids\n", "\n", Some(""));
        let err = switch_on(&cg.0, &["pids", "memory"], Path::new("/x/sb")).unwrap_err();
        assert!(
            matches!(&err, ParentError::NotOffered { controller, dir, .. }
                if controller == "memory" && dir == &cg.0),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&cg.0.display().to_string()) && msg.contains("/x/sb"));
        assert_eq!(cg.subtree_control(), "\n", "nothing written");
    }

    #[test]
    fn a_cgroup_with_processes_is_refused_before_any_write() {
        let cg = FakeCgroup::new("busy", "cpu cpuset pids\n", "\n", Some("4242\n77\n"));
        let err = switch_on(&cg.0, &["pids"], Path::new("/x/sb")).unwrap_err();
        assert!(
            matches!(&err, ParentError::InternalProcesses { procs, .. } if procs.0 == [4242, 77]),
            "{err}"
        );
        let msg = err.to_string();
        let file = cg.0.join("cgroup.subtree_control");
        assert!(msg.contains(&file.display().to_string()), "{msg}");
        assert!(
            msg.contains("pid 4242 among 2") && msg.contains("/x/sb"),
            "{msg}"
        );
        // Threaded controllers alone would have been accepted by the kernel, and turned the
        // cgroup into a thread root: nothing may be written.
        assert_eq!(cg.subtree_control(), "\n");
        // Without a limit that needs them, they are skipped (runc's way), still unwritten.
        switch_on(&cg.0, &[], Path::new("/x/sb")).unwrap();
        assert_eq!(cg.subtree_control(), "\n");
    }
}
