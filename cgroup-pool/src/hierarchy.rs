//! Which cgroup hierarchy the pool uses: cgroup v2 (one directory per cgroup) or v1 (the same
//! name in each mounted controller hierarchy), detected from the mounts or forced by a setting.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroupfs::{self, CgroupFsError};
use crate::mountinfo::{self, CgroupMount, MountinfoError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "cgroup v1",
            CgroupVersion::V2 => "cgroup v2",
        })
    }
}

/// Where a pure cgroup v2 host mounts its hierarchy; detection prefers v2 only when it is here.
pub const UNIFIED_MOUNT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum HierarchyError {
    #[error(transparent)]
    Mountinfo(#[from] MountinfoError),
    #[error("cgroup hierarchy {path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is not a cgroup or cgroup2 mount point (see /proc/self/mountinfo)")]
    NotACgroupMount { path: PathBuf },
    #[error("{path} is a {found} mount but {wanted} was asked for")]
    VersionMismatch {
        path: PathBuf,
        found: CgroupVersion,
        wanted: CgroupVersion,
    },
    #[error("the configured cgroup mounts mix cgroup v1 and cgroup v2: {paths:?}")]
    MixedVersions { paths: Vec<PathBuf> },
    #[error("no cgroup v1 controller hierarchy is mounted")]
    NoV1,
    #[error("no cgroup2 filesystem is mounted")]
    NoV2,
    #[error("no cgroup hierarchy is mounted (neither a cgroup2 at {UNIFIED_MOUNT} nor cgroup v1 controllers)")]
    NoHierarchy,
    #[error("cgroup hierarchy {path} is mounted read-only; rund needs to create cgroups in it")]
    ReadOnly { path: PathBuf },
    #[error("cannot statvfs {path}: {source}")]
    Statvfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    CgroupFs(#[from] CgroupFsError),
}

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HierarchyMount {
    pub mount_point: PathBuf,
    /// v1: the controllers bound to it; v2: the controllers its root offers (`cgroup.controllers`).
    pub controllers: Vec<String>,
}

/// The hierarchy the pool works in. On v1 `mounts` is sorted by path, and the first one is the
/// "lead" hierarchy whose rename claims a slot (every process sorts the same way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub version: CgroupVersion,
    pub mounts: Vec<HierarchyMount>,
}

impl Hierarchy {
    /// Finds the hierarchy to use. `version` forces v1 or v2; `explicit` names mount points to use
    /// instead of every one found (each must be a cgroup mount of one version). Every mount used
    /// must be writable.
    pub fn resolve(
        version: Option<CgroupVersion>,
        explicit: Option<&[PathBuf]>,
    ) -> Result<Hierarchy, HierarchyError> {
        let mounts = mountinfo::cgroup_mounts()?;
        let hierarchy = match explicit {
            Some(paths) => Self::from_explicit(&mounts, version, paths)?,
            None => Self::detect(&mounts, version)?,
        };
        for m in &hierarchy.mounts {
            check_writable(&m.mount_point)?;
        }
        Ok(hierarchy)
    }

    fn detect(
        mounts: &[CgroupMount],
        version: Option<CgroupVersion>,
    ) -> Result<Hierarchy, HierarchyError> {
        let v2_at_unified = mounts
            .iter()
            .find(|m| m.v2 && m.mount_point == Path::new(UNIFIED_MOUNT));
        let v1: Vec<&CgroupMount> = mounts
            .iter()
            .filter(|m| !m.v2 && !m.controllers.is_empty())
            .collect();
        match version {
            None => {
                if let Some(m) = v2_at_unified {
                    Self::v2(&m.mount_point)
                } else if !v1.is_empty() {
                    Ok(Self::v1(v1))
                } else {
                    Err(HierarchyError::NoHierarchy)
                }
            }
            Some(CgroupVersion::V1) if v1.is_empty() => Err(HierarchyError::NoV1),
            Some(CgroupVersion::V1) => Ok(Self::v1(v1)),
            Some(CgroupVersion::V2) => {
                let m = v2_at_unified
                    .or_else(|| mounts.iter().find(|m| m.v2))
                    .ok_or(HierarchyError::NoV2)?;
                Self::v2(&m.mount_point)
            }
        }
    }

    fn from_explicit(
        mounts: &[CgroupMount],
        version: Option<CgroupVersion>,
        paths: &[PathBuf],
    ) -> Result<Hierarchy, HierarchyError> {
        let mut chosen = Vec::new();
        for path in paths {
            if !path.exists() {
                return Err(HierarchyError::Missing { path: path.clone() });
            }
            // The last mount at a path is the visible one.
            let m = mounts
                .iter()
                .rev()
                .find(|m| &m.mount_point == path)
                .ok_or_else(|| HierarchyError::NotACgroupMount { path: path.clone() })?;
            let found = if m.v2 {
                CgroupVersion::V2
            } else {
                CgroupVersion::V1
            };
            if let Some(wanted) = version {
                if wanted != found {
                    return Err(HierarchyError::VersionMismatch {
                        path: path.clone(),
                        found,
                        wanted,
                    });
                }
            }
            chosen.push(m);
        }
        let v2_count = chosen.iter().filter(|m| m.v2).count();
        match (v2_count, chosen.len()) {
            (_, 0) => Err(match version {
                Some(CgroupVersion::V2) => HierarchyError::NoV2,
                _ => HierarchyError::NoV1,
            }),
            (0, _) => Ok(Self::v1(chosen)),
            (1, 1) => Self::v2(&chosen[0].mount_point),
            _ => Err(HierarchyError::MixedVersions {
                paths: paths.to_vec(),
            }),
        }
    }

    fn v1(mounts: Vec<&CgroupMount>) -> Hierarchy {
        // One mount per controller set: a hierarchy bind-mounted twice is used once, at its first
        // mount (mountinfo order).
        let mut seen: Vec<&Vec<String>> = Vec::new();
        let mut out = Vec::new();
        for m in mounts {
            if seen.contains(&&m.controllers) {
                continue;
            }
            seen.push(&m.controllers);
            out.push(HierarchyMount {
                mount_point: m.mount_point.clone(),
                controllers: m.controllers.clone(),
            });
        }
        out.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
        Hierarchy {
            version: CgroupVersion::V1,
            mounts: out,
        }
    }

    fn v2(mount_point: &Path) -> Result<Hierarchy, HierarchyError> {
        let controllers = cgroupfs::read_to_string(&mount_point.join("cgroup.controllers"))?
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Ok(Hierarchy {
            version: CgroupVersion::V2,
            mounts: vec![HierarchyMount {
                mount_point: mount_point.to_path_buf(),
                controllers,
            }],
        })
    }

    /// The directories of the cgroup at `relative` (a path below each mount point).
    /// `v2_controllers` is what the v2 cgroup's parent enables for it (ignored on v1).
    pub fn dirs_of(&self, relative: &Path, v2_controllers: &[String]) -> CgroupDirs {
        CgroupDirs {
            version: self.version,
            dirs: self
                .mounts
                .iter()
                .map(|m| CgroupDir {
                    path: m.mount_point.join(relative),
                    controllers: match self.version {
                        CgroupVersion::V1 => m.controllers.clone(),
                        CgroupVersion::V2 => v2_controllers.to_vec(),
                    },
                })
                .collect(),
        }
    }
}

fn check_writable(path: &Path) -> Result<(), HierarchyError> {
    let st = rustix::fs::statvfs(path).map_err(|e| HierarchyError::Statvfs {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    if st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) {
        return Err(HierarchyError::ReadOnly {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// One directory of a cgroup and the controllers that act on it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDir {
    pub path: PathBuf,
    pub controllers: Vec<String>,
}

/// All directories of one cgroup: one per v1 hierarchy, or the single v2 one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDirs {
    pub version: CgroupVersion,
    pub dirs: Vec<CgroupDir>,
}

impl CgroupDirs {
    /// The directory where `controller` acts, if the cgroup has it.
    pub fn dir_for(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| d.controllers.iter().any(|c| c == controller))
            .map(|d| d.path.as_path())
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|d| d.path.as_path())
    }

    /// The same cgroup under another name in the same parent (a v1 rename).
    pub fn renamed(&self, name: &str) -> CgroupDirs {
        CgroupDirs {
            version: self.version,
            dirs: self
                .dirs
                .iter()
                .map(|d| CgroupDir {
                    path: d.path.with_file_name(name),
                    controllers: d.controllers.clone(),
                })
                .collect(),
        }
    }

    /// Every task (thread) id in the cgroup, from each directory; read errors are errors.
    pub fn threads(&self) -> Result<Vec<u32>, CgroupFsError> {
        let file = match self.version {
            CgroupVersion::V1 => "tasks",
            CgroupVersion::V2 => "cgroup.threads",
        };
        let mut all = Vec::new();
        for d in &self.dirs {
            all.extend(cgroupfs::read_ids(&d.path.join(file))?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts() -> Vec<CgroupMount> {
        mountinfo::parse(
            "\
36 35 0:31 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
37 35 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
38 35 0:33 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
39 35 0:34 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
40 25 0:31 / /tmp/pids-again ro - cgroup cgroup rw,pids
",
        )
    }

    #[test]
    fn hybrid_detects_v1_sorted_without_named_or_duplicate_hierarchies() {
        let h = Hierarchy::detect(&mounts(), None).unwrap();
        assert_eq!(h.version, CgroupVersion::V1);
        let points: Vec<_> = h.mounts.iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(
            points,
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/pids")
            ]
        );
    }

    #[test]
    fn explicit_mounts_must_be_cgroup_mounts_of_the_wanted_version() {
        let m = mounts();
        let err = Hierarchy::from_explicit(&m, None, &[PathBuf::from("/tmp")]).unwrap_err();
        assert!(
            matches!(err, HierarchyError::NotACgroupMount { .. }),
            "{err}"
        );
        let err = Hierarchy::from_explicit(
            &m,
            Some(CgroupVersion::V2),
            &[PathBuf::from("/sys/fs/cgroup/cpu")],
        );
        // /sys/fs/cgroup/cpu may be absent where the unit tests run: then "missing" is right too.
        assert!(
            matches!(
                err,
                Err(HierarchyError::VersionMismatch { .. }) | Err(HierarchyError::Missing { .. })
            ),
            "{err:?}"
        );
        let err = Hierarchy::from_explicit(&m, None, &[PathBuf::from("/nonexistent-cgroup")])
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("/nonexistent-cgroup does not exist"));
    }

    #[test]
    fn v1_dirs_follow_each_hierarchy() {
        let h = Hierarchy::detect(&mounts(), Some(CgroupVersion::V1)).unwrap();
        let dirs = h.dirs_of(Path::new("rund/pool-1-1"), &[]);
        assert_eq!(
            dirs.dir_for("pids"),
            Some(Path::new("/sys/fs/cgroup/pids/rund/pool-1-1"))
        );
        assert_eq!(dirs.dir_for("memory"), None);
        let renamed = dirs.renamed("sandbox-x");
        assert_eq!(
            renamed.dir_for("cpu"),
            Some(Path::new("/sys/fs/cgroup/cpu/rund/sandbox-x"))
        );
    }
}
