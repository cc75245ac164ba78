//! The process's working directory: made before a container exists, as runc makes it, and checked
//! before an exec.
//!
//! runc creates a missing `process.cwd` (MkdirAllInRoot, mode 0755, owned by root) after the mounts
//! and before pivot_root; libcontainer only chdirs, and its failure names neither the directory nor
//! the call. libcontainer has no step between its mounts and its chdir, so the agent makes the
//! directory before creating the container, in what will be seen at that path then:
//! - under no mount: in the root;
//! - under a bind mount: in the bind's source, which is what runc's mkdir after the mount reaches
//!   (the container could make it there itself); a read-only bind's must exist already;
//! - under a tmpfs: nowhere, since a tmpfs starts empty: refused, naming both (runc makes it there);
//! - under any other mount (proc, sysfs, ...): the kernel's files, left to libcontainer.
//!
//! A cwd that is a mount's destination is that mount's mount point, which libcontainer makes. Paths
//! are resolved with `pathrs` inside the directory they start from, so a symlink in the image cannot
//! lead out of it. Mount destinations are compared as spelled: one whose spelling goes through a
//! symlink of the image is not recognised as covering the cwd.

use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};
use pathrs::error::ErrorKind;
use pathrs::Root;

/// The mode of the directories made, as runc makes them (less the umask).
const MODE: u32 = 0o755;

/// Why the working directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CwdError {
    /// Relative, or with `..`.
    #[error("process.cwd {0}: must be an absolute path without '..'")]
    Invalid(PathBuf),
    /// Under a tmpfs, which is empty when it is mounted.
    #[error(
        "process.cwd {cwd}: it would be in the tmpfs mounted at {mount}, which starts empty: rund \
         cannot make the directory there"
    )]
    InTmpfs {
        /// The cwd.
        cwd: PathBuf,
        /// The tmpfs's destination.
        mount: PathBuf,
    },
    /// Under a bind mount whose source is not an absolute path.
    #[error("process.cwd {cwd}: the bind mount at {mount} has a relative source")]
    RelativeSource {
        /// The cwd.
        cwd: PathBuf,
        /// The bind's destination.
        mount: PathBuf,
    },
    /// The directory could not be made.
    #[error("process.cwd {cwd}: making it in {place}")]
    Create {
        /// The cwd.
        cwd: PathBuf,
        /// Where it was to be made.
        place: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The directory does not exist where it must.
    #[error("process.cwd {cwd}: in {place}")]
    Missing {
        /// The cwd.
        cwd: PathBuf,
        /// Where it was looked up.
        place: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl CwdError {
    /// Whether the spec itself is wrong (rather than the files it names).
    pub fn is_invalid_spec(&self) -> bool {
        matches!(
            self,
            CwdError::Invalid(_) | CwdError::InTmpfs { .. } | CwdError::RelativeSource { .. }
        )
    }
}

/// pathrs' error as the errno it carries (its own chain is long and names file descriptors).
fn io_error(e: pathrs::error::Error) -> io::Error {
    match e.kind() {
        ErrorKind::OsError(Some(errno)) => io::Error::from_raw_os_error(errno),
        _ => io::Error::other(e.to_string()),
    }
}

fn check_spelling(cwd: &Path) -> Result<(), CwdError> {
    if !cwd.is_absolute() || cwd.components().any(|c| c == Component::ParentDir) {
        return Err(CwdError::Invalid(cwd.to_owned()));
    }
    Ok(())
}

fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

fn is_read_only(mount: &Mount) -> bool {
    mount.options().iter().flatten().any(|o| o == "ro")
}

/// Where a cwd is to be made, with the part of it below that place.
#[derive(Debug, PartialEq, Eq)]
pub enum Place {
    /// In the container's root.
    Root(PathBuf),
    /// In a bind mount's source.
    Bind {
        /// The bind's destination.
        mount: PathBuf,
        /// Its source.
        source: PathBuf,
        /// The cwd below the destination.
        rest: PathBuf,
        /// Whether the bind is read-only.
        read_only: bool,
    },
    /// Nowhere: a mount point (libcontainer makes it) or the kernel's files.
    Nothing,
}

/// Where `cwd` is to be made: the mount seen at `cwd` is the last one mounted whose destination
/// contains it.
pub fn place(cwd: &Path, mounts: &[Mount]) -> Result<Place, CwdError> {
    check_spelling(cwd)?;
    let Some(mount) = mounts
        .iter()
        .rev()
        .find(|m| cwd.starts_with(m.destination()))
    else {
        return Ok(Place::Root(cwd.to_owned()));
    };
    let dest = mount.destination();
    // Checked by starts_with.
    let rest = cwd.strip_prefix(dest).unwrap_or(cwd).to_owned();
    if rest.as_os_str().is_empty() {
        return Ok(Place::Nothing);
    }
    if is_bind(mount) {
        let source = mount.source().clone().unwrap_or_default();
        if !source.is_absolute() {
            return Err(CwdError::RelativeSource {
                cwd: cwd.to_owned(),
                mount: dest.clone(),
            });
        }
        return Ok(Place::Bind {
            mount: dest.clone(),
            source,
            rest,
            read_only: is_read_only(mount),
        });
    }
    if mount.typ().as_deref() == Some("tmpfs") {
        return Err(CwdError::InTmpfs {
            cwd: cwd.to_owned(),
            mount: dest.clone(),
        });
    }
    Ok(Place::Nothing)
}

/// A pathrs root at `path`, which may be a symlink or a magic link (`/proc/<pid>/root`):
/// `Root::open` refuses to follow one.
fn open_root(path: &Path) -> io::Result<Root> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(Root::from_fd(std::os::fd::OwnedFd::from(dir)))
}

/// Makes `path` inside `root` (never outside it), as a directory.
fn mkdir_in(root: &Path, path: &Path) -> io::Result<()> {
    let root = open_root(root)?;
    root.mkdir_all(path, &std::fs::Permissions::from_mode(MODE))
        .map_err(io_error)?;
    Ok(())
}

/// Resolves `path` inside `root` and checks that it is a directory.
fn dir_in(root: &Path, path: &Path) -> io::Result<()> {
    let root = open_root(root)?;
    let handle = root.resolve(path).map_err(io_error)?;
    // An O_PATH descriptor: enough for fstat.
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(handle));
    if !file.metadata()?.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    Ok(())
}

/// Makes the spec's `process.cwd` where the container will see it (see the module's comment).
pub fn prepare(spec: &Spec) -> Result<(), CwdError> {
    let Some(process) = spec.process().as_ref() else {
        return Ok(());
    };
    let Some(root) = spec.root().as_ref().map(|r| r.path()) else {
        return Ok(());
    };
    let cwd = process.cwd();
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    match place(cwd, mounts)? {
        Place::Root(path) => mkdir_in(root, &path).map_err(|source| CwdError::Create {
            cwd: cwd.clone(),
            place: format!("the container's root {}", root.display()),
            source,
        }),
        Place::Bind {
            mount,
            source,
            rest,
            read_only: true,
        } => dir_in(&source, &rest).map_err(|e| CwdError::Missing {
            cwd: cwd.clone(),
            place: format!(
                "the read-only bind mount at {} (from {})",
                mount.display(),
                source.display()
            ),
            source: e,
        }),
        Place::Bind {
            mount,
            source,
            rest,
            read_only: false,
        } => mkdir_in(&source, &rest).map_err(|e| CwdError::Create {
            cwd: cwd.clone(),
            place: format!(
                "the bind mount at {} (from {})",
                mount.display(),
                source.display()
            ),
            source: e,
        }),
        Place::Nothing => Ok(()),
    }
}

/// Checks that `cwd` is a directory in a running container whose root (with its mounts) is at
/// `container_root` (`/proc/<pid>/root` of its init process). runc's exec does not make it either.
pub fn check(container_root: &Path, cwd: &Path) -> Result<(), CwdError> {
    check_spelling(cwd)?;
    dir_in(container_root, cwd).map_err(|source| CwdError::Missing {
        cwd: cwd.to_owned(),
        place: "the container".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(json: serde_json::Value) -> Vec<Mount> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn where_a_cwd_is_made() {
        let m = mounts(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/data", "type": "bind", "source": "/vol", "options": ["rbind", "rw"]},
            {"destination": "/conf", "type": "none", "source": "/cfg", "options": ["bind", "ro"]},
            {"destination": "/rel", "type": "bind", "source": "vol"},
            {"destination": "/data/inner", "type": "proc", "source": "proc"}
        ]));
        assert_eq!(
            place(Path::new("/work/app"), &m).unwrap(),
            Place::Root("/work/app".into())
        );
        // "/tmpx" is not under "/tmp": components count, not bytes.
        assert_eq!(
            place(Path::new("/tmpx"), &m).unwrap(),
            Place::Root("/tmpx".into())
        );
        // A mount point is libcontainer's to make.
        assert_eq!(place(Path::new("/tmp"), &m).unwrap(), Place::Nothing);
        assert_eq!(place(Path::new("/data/"), &m).unwrap(), Place::Nothing);
        assert!(matches!(
            place(Path::new("/tmp/work"), &m),
            Err(CwdError::InTmpfs { mount, .. }) if mount == Path::new("/tmp")
        ));
        assert_eq!(
            place(Path::new("/data/a/b"), &m).unwrap(),
            Place::Bind {
                mount: "/data".into(),
                source: "/vol".into(),
                rest: "a/b".into(),
                read_only: false
            }
        );
        assert_eq!(
            place(Path::new("/conf/x"), &m).unwrap(),
            Place::Bind {
                mount: "/conf".into(),
                source: "/cfg".into(),
                rest: "x".into(),
                read_only: true
            }
        );
        // The last mount covering the cwd is the one seen there.
        assert_eq!(
            place(Path::new("/data/inner/x"), &m).unwrap(),
            Place::Nothing
        );
        assert_eq!(place(Path::new("/proc/self"), &m).unwrap(), Place::Nothing);
        assert!(matches!(
            place(Path::new("/rel/x"), &m),
            Err(CwdError::RelativeSource { .. })
        ));
        for bad in ["relative", "/a/../../etc"] {
            assert!(
                matches!(place(Path::new(bad), &m), Err(CwdError::Invalid(_))),
                "{bad}"
            );
        }
    }

    fn spec(root: &Path, cwd: &str, mounts: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": cwd, "user": {"uid": 0, "gid": 0}},
            "root": {"path": root},
            "mounts": mounts
        }))
        .unwrap()
    }

    #[test]
    fn a_missing_cwd_is_made_in_the_root_and_never_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        prepare(&spec(&root, "/tmp", serde_json::json!([]))).unwrap();
        assert!(root.join("tmp").is_dir());
        prepare(&spec(&root, "/a/b/c", serde_json::json!([]))).unwrap();
        let meta = std::fs::metadata(root.join("a/b/c")).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o700, 0o700);
        // Existing: nothing to do.
        prepare(&spec(&root, "/a/b", serde_json::json!([]))).unwrap();

        // An absolute symlink in the image resolves inside the root: dangling there, it is an
        // error (as in runc), never a directory made outside.
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        assert!(prepare(&spec(&root, "/escape/x", serde_json::json!([]))).is_err());
        assert!(!outside.join("x").exists());
        let inside = root.join(outside.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        prepare(&spec(&root, "/escape/x", serde_json::json!([]))).unwrap();
        assert!(!outside.join("x").exists());
        assert!(inside.join("x").is_dir());
        // And so does a relative one with too many "..".
        std::os::unix::fs::symlink("../../../../../../..", root.join("up")).unwrap();
        prepare(&spec(&root, "/up/y", serde_json::json!([]))).unwrap();
        assert!(root.join("y").is_dir());

        // A file where the cwd should be.
        std::fs::write(root.join("file"), b"").unwrap();
        let e = prepare(&spec(&root, "/file/sub", serde_json::json!([]))).unwrap_err();
        assert!(
            matches!(&e, CwdError::Create { source, .. } if source.raw_os_error() == Some(libc::ENOTDIR)),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("process.cwd /file/sub: making it in the container's root"),
            "{e}"
        );
    }

    #[test]
    fn under_a_bind_the_cwd_is_made_in_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let (root, vol) = (dir.path().join("root"), dir.path().join("vol"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&vol).unwrap();
        let bind = |ro: bool| {
            let options = if ro {
                vec!["rbind", "ro"]
            } else {
                vec!["rbind"]
            };
            serde_json::json!([{"destination": "/data", "type": "bind", "source": vol, "options": options}])
        };
        prepare(&spec(&root, "/data/sub", bind(false))).unwrap();
        assert!(vol.join("sub").is_dir());
        // Not shadowed in the root.
        assert!(!root.join("data/sub").exists());
        // Read-only: it must exist.
        prepare(&spec(&root, "/data/sub", bind(true))).unwrap();
        let e = prepare(&spec(&root, "/data/other", bind(true))).unwrap_err();
        assert!(matches!(&e, CwdError::Missing { .. }), "{e:?}");
        assert!(!vol.join("other").exists());
        assert!(
            e.to_string().contains("read-only bind mount at /data"),
            "{e}"
        );
        // Under a tmpfs: refused, and nothing made in the root.
        let tmpfs =
            serde_json::json!([{"destination": "/scratch", "type": "tmpfs", "source": "tmpfs"}]);
        let e = prepare(&spec(&root, "/scratch/w", tmpfs)).unwrap_err();
        assert!(e.is_invalid_spec());
        assert!(!root.join("scratch").exists());
    }

    #[test]
    fn an_exec_cwd_must_be_a_directory_in_the_container() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        check(dir.path(), Path::new("/d")).unwrap();
        check(dir.path(), Path::new("/")).unwrap();
        // Through the magic link an exec's check goes through.
        check(Path::new("/proc/self/root"), Path::new("/proc")).unwrap();
        let e = check(dir.path(), Path::new("/f")).unwrap_err();
        assert!(
            matches!(&e, CwdError::Missing { source, .. } if source.raw_os_error() == Some(libc::ENOTDIR))
        );
        let e = check(dir.path(), Path::new("/missing")).unwrap_err();
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(
            format!("{e}: {}", source.unwrap_or_default()),
            "process.cwd /missing: in the container: No such file or directory (os error 2)"
        );
    }
}
