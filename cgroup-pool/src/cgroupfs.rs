//! The few cgroupfs operations cgroups-rs does not offer in a usable form, written by hand:
//! rename, marker xattrs, and task listings whose read errors are reported instead of being read
//! as "no tasks" (cgroups-rs's `tasks()` returns an empty list when the file cannot be read, which
//! would let `release` hand out a cgroup that still has tasks).

use std::io;
use std::path::{Path, PathBuf};

use crate::naming::{Marker, MARKER_XATTR, SHAPE_XATTR};

/// A cgroupfs operation that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
pub enum CgroupFsError {
    #[error("cannot create cgroup {path}: {source}")]
    Mkdir { path: PathBuf, source: io::Error },
    #[error("cannot remove cgroup {path}: {source}")]
    Rmdir { path: PathBuf, source: io::Error },
    #[error("cannot rename cgroup {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("cannot set the rund marker xattr on {path} (cgroupfs must support trusted.* xattrs, which needs CAP_SYS_ADMIN): {source}")]
    SetMarker { path: PathBuf, source: io::Error },
    #[error("cannot read the rund marker xattr of {path}: {source}")]
    GetMarker { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot list {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("{path} holds {content:?}, which is not a list of task ids")]
    BadTaskList { path: PathBuf, content: String },
}

impl CgroupFsError {
    /// The OS error behind this failure, for callers that branch on ENOENT or EEXIST.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            CgroupFsError::Mkdir { source, .. }
            | CgroupFsError::Rmdir { source, .. }
            | CgroupFsError::Rename { source, .. }
            | CgroupFsError::SetMarker { source, .. }
            | CgroupFsError::GetMarker { source, .. }
            | CgroupFsError::Read { source, .. }
            | CgroupFsError::Write { source, .. }
            | CgroupFsError::ReadDir { source, .. } => source.raw_os_error(),
            CgroupFsError::BadTaskList { .. } => None,
        }
    }
}

pub fn mkdir(path: &Path) -> Result<(), CgroupFsError> {
    std::fs::create_dir(path).map_err(|source| CgroupFsError::Mkdir {
        path: path.to_path_buf(),
        source,
    })
}

/// One rmdir: cgroupfs removes a cgroup that has no tasks and no children.
pub fn rmdir(path: &Path) -> Result<(), CgroupFsError> {
    std::fs::remove_dir(path).map_err(|source| CgroupFsError::Rmdir {
        path: path.to_path_buf(),
        source,
    })
}

/// rename(2) within one parent. cgroup v1 allows it (kernfs refuses an existing target with
/// EEXIST, which makes a rename an atomic claim); cgroup v2 refuses it with EPERM.
pub fn rename(from: &Path, to: &Path) -> Result<(), CgroupFsError> {
    std::fs::rename(from, to).map_err(|source| CgroupFsError::Rename {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}

/// An open handle on a parent cgroup directory, for renaming its children by name: the kernel
/// then looks up one component instead of walking both whole paths (kernfs path walks take the
/// hierarchy's lock, which the renames themselves take for writing).
#[derive(Debug)]
pub struct ParentDir {
    path: PathBuf,
    fd: rustix::fd::OwnedFd,
}

impl ParentDir {
    pub fn open(path: &Path) -> Result<ParentDir, CgroupFsError> {
        use rustix::fs::{Mode, OFlags, CWD};
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CgroupFsError::ReadDir {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        Ok(ParentDir {
            path: path.to_path_buf(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`rename`] of `from` to `to` when both are children of this directory (through the
    /// handle); otherwise by path.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<(), CgroupFsError> {
        let names = (|| {
            (from.parent()? == self.path && to.parent()? == self.path)
                .then_some((from.file_name()?, to.file_name()?))
        })();
        let Some((old, new)) = names else {
            return rename(from, to);
        };
        rustix::fs::renameat(&self.fd, old, &self.fd, new).map_err(|e| CgroupFsError::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            source: e.into(),
        })
    }
}

pub fn set_marker(path: &Path, marker: &Marker) -> Result<(), CgroupFsError> {
    rustix::fs::setxattr(
        path,
        MARKER_XATTR,
        marker.encode().as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| CgroupFsError::SetMarker {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// What the marker says, `Ok(None)` when there is no marker (or one rund never writes): such a
/// directory is foreign.
pub fn read_marker(path: &Path) -> Result<Option<Marker>, CgroupFsError> {
    let mut buf = [0u8; 512];
    match rustix::fs::getxattr(path, MARKER_XATTR, &mut buf[..]) {
        Ok(n) => Ok(std::str::from_utf8(&buf[..n]).ok().and_then(Marker::decode)),
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(CgroupFsError::GetMarker {
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Records on a free slot's lead directory which limits it already carries (see
/// [`crate::resources::Limits::shape_key`]), so that an acquire asking for exactly those writes
/// nothing.
pub fn set_shape(path: &Path, key: &str) -> Result<(), CgroupFsError> {
    rustix::fs::setxattr(
        path,
        SHAPE_XATTR,
        key.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| CgroupFsError::SetMarker {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// The limits a free slot carries, `Ok(None)` when it says nothing (kernel defaults).
pub fn read_shape(path: &Path) -> Result<Option<String>, CgroupFsError> {
    let mut buf = [0u8; 512];
    match rustix::fs::getxattr(path, SHAPE_XATTR, &mut buf[..]) {
        Ok(n) => Ok(std::str::from_utf8(&buf[..n]).ok().map(str::to_string)),
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(CgroupFsError::GetMarker {
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Forgets which limits a slot carries (before they change).
pub fn remove_shape(path: &Path) -> Result<(), CgroupFsError> {
    match rustix::fs::removexattr(path, SHAPE_XATTR) {
        Ok(()) | Err(rustix::io::Errno::NODATA) => Ok(()),
        Err(e) => Err(CgroupFsError::SetMarker {
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

pub fn read_to_string(path: &Path) -> Result<String, CgroupFsError> {
    std::fs::read_to_string(path).map_err(|source| CgroupFsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// One write(2) of `value`: a cgroup control file takes each write as one command.
pub fn write(path: &Path, value: &str) -> Result<(), CgroupFsError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupFsError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        })
}

/// The ids listed in a `tasks`, `cgroup.procs` or `cgroup.threads` file.
pub fn read_ids(path: &Path) -> Result<Vec<u32>, CgroupFsError> {
    let content = read_to_string(path)?;
    content
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse::<u32>())
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| CgroupFsError::BadTaskList {
            path: path.to_path_buf(),
            content,
        })
}

/// The names of the sub-directories (child cgroups) of `path`.
pub fn child_dirs(path: &Path) -> Result<Vec<String>, CgroupFsError> {
    let err = |source| CgroupFsError::ReadDir {
        path: path.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path).map_err(err)? {
        let entry = entry.map_err(err)?;
        if entry.file_type().map_err(err)?.is_dir() {
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

pub fn is_not_found(e: &CgroupFsError) -> bool {
    e.raw_os_error() == Some(libc_errno::ENOENT)
}

pub fn is_already_exists(e: &CgroupFsError) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EEXIST) | Some(libc_errno::ENOTEMPTY)
    )
}

/// The errno values this crate branches on, from rustix so that no libc dependency is needed.
pub(crate) mod libc_errno {
    pub const ENOENT: i32 = rustix::io::Errno::NOENT.raw_os_error();
    pub const EEXIST: i32 = rustix::io::Errno::EXIST.raw_os_error();
    pub const ENOTEMPTY: i32 = rustix::io::Errno::NOTEMPTY.raw_os_error();
    pub const EBUSY: i32 = rustix::io::Errno::BUSY.raw_os_error();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removes the test's directory even when an assertion fails.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn task_lists_parse_and_garbage_is_an_error() {
        let dir =
            TempDir(std::env::temp_dir().join(format!("cgroupfs-unit-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let f = dir.0.join("tasks");
        std::fs::write(&f, "1\n23\n\n").unwrap();
        assert_eq!(read_ids(&f).unwrap(), vec![1, 23]);
        std::fs::write(&f, "1\nx\n").unwrap();
        let err = read_ids(&f).unwrap_err();
        assert!(matches!(err, CgroupFsError::BadTaskList { .. }));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = read_ids(Path::new("/nonexistent/tasks")).unwrap_err();
        assert!(is_not_found(&err));
        assert!(err.to_string().contains("/nonexistent/tasks"));
    }
}
