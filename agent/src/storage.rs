//! Storages and container roots: mounting what CreateContainer names, refusing paths that escape.
//!
//! A storage is mounted at `<storage dir>/<name>` (virtio-fs by tag, a block device with its
//! filesystem, or a bind of a guest directory) and reference-counted by name, so that the sandbox's
//! one virtio-fs share serves every container. A container root is an overlay whose lower directories
//! and upper/work directories are paths inside storages.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use agent_protocol::agent::{RootfsOverlay, Storage};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors of storages and roots.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A name or path from the request is not acceptable.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The storage driver is unknown.
    #[error("unknown storage driver {0:?} (virtiofs, block, bind)")]
    Driver(String),
    /// A mount option is unknown.
    #[error("unknown mount option {0:?}")]
    Option(String),
    /// A storage with this name is mounted with another source.
    #[error("storage {name:?} is already mounted from {existing:?}")]
    Conflict {
        /// The storage's name.
        name: String,
        /// What it is mounted from.
        existing: String,
    },
    /// A directory could not be made.
    #[error("creating {0}")]
    Mkdir(PathBuf, #[source] std::io::Error),
    /// A path does not exist.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// mount(2) failed.
    #[error("mounting {what} on {target}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
}

/// Checks a container or exec id, or a storage name: a plain file name.
pub fn validate_id(what: &'static str, id: &str) -> Result<(), StorageError> {
    let why = if id.is_empty() {
        Some("empty")
    } else if id.len() > 128 {
        Some("longer than 128 bytes")
    } else if id == "." || id == ".." {
        Some("a dot name")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        Some("only letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match why {
        Some(why) => Err(StorageError::Invalid {
            what,
            value: id.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// A relative path with no `..`, no root and no prefix: safe to join under a directory.
pub fn validate_relative(what: &'static str, path: &str) -> Result<PathBuf, StorageError> {
    let invalid = |why| StorageError::Invalid {
        what,
        value: path.to_owned(),
        why,
    };
    let mut out = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(invalid("'..' is not allowed")),
            Component::RootDir | Component::Prefix(_) => return Err(invalid("must be relative")),
        }
    }
    Ok(out)
}

/// An absolute path inside a container with no `..`: a mount destination that cannot escape the root
/// by its spelling. (Symlinks inside the root are resolved inside it by the runtime library.)
pub fn validate_container_path(path: &Path) -> Result<(), StorageError> {
    let invalid = |why| StorageError::Invalid {
        what: "mount destination",
        value: path.display().to_string(),
        why,
    };
    if !path.is_absolute() {
        return Err(invalid("must be absolute"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("'..' would escape the container's root"));
    }
    Ok(())
}

/// Mount flags and the data string from mount(8)-style options.
pub fn parse_options(options: &[String]) -> Result<(MsFlags, String), StorageError> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let flag = match option.as_str() {
            "ro" => MsFlags::MS_RDONLY,
            "rw" => MsFlags::empty(),
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            // Filesystem-specific options ("data=ordered", "discard") go to the filesystem, but not
            // ones that could smuggle in other directories.
            o if o.contains('=') || o.chars().all(|c| c.is_ascii_lowercase() || c == '_') => {
                if o.contains(',') || o.starts_with("lowerdir") || o.starts_with("upperdir") {
                    return Err(StorageError::Option(o.to_owned()));
                }
                data.push(o);
                continue;
            }
            o => return Err(StorageError::Option(o.to_owned())),
        };
        flags |= flag;
    }
    Ok((flags, data.join(",")))
}

struct Mounted {
    source: String,
    refs: usize,
}

/// The sandbox's mounted storages.
pub struct Storages {
    dir: PathBuf,
    mounted: Mutex<HashMap<String, Mounted>>,
}

fn mkdir(path: &Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(path).map_err(|e| StorageError::Mkdir(path.to_owned(), e))
}

impl Storages {
    /// Storages mounted under `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            mounted: Mutex::new(HashMap::new()),
        }
    }

    /// Where storage `name` is mounted.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Mounts `storage` (or takes one more reference on it). Returns its name.
    pub fn acquire(&self, storage: &Storage) -> Result<String, StorageError> {
        validate_id("storage name", &storage.name)?;
        let key = format!("{}:{}", storage.driver, storage.source);
        let mut mounted = self.mounted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mounted.get_mut(&storage.name) {
            if m.source != key {
                return Err(StorageError::Conflict {
                    name: storage.name.clone(),
                    existing: m.source.clone(),
                });
            }
            m.refs += 1;
            return Ok(storage.name.clone());
        }
        let target = self.path(&storage.name);
        mkdir(&target)?;
        let (flags, data) = parse_options(&storage.options)?;
        let data = (!data.is_empty()).then_some(data.as_str());
        let mount_err = |source| StorageError::Mount {
            what: key.clone(),
            target: target.clone(),
            source,
        };
        match storage.driver.as_str() {
            "virtiofs" => mount(
                Some(storage.source.as_str()),
                &target,
                Some("virtiofs"),
                flags,
                data,
            )
            .map_err(mount_err)?,
            "block" => {
                let source = Path::new(&storage.source);
                if !source.is_absolute() || !source.starts_with("/dev") {
                    return Err(StorageError::Invalid {
                        what: "block device",
                        value: storage.source.clone(),
                        why: "must be a path under /dev",
                    });
                }
                let fstype = if storage.fstype.is_empty() {
                    "ext4"
                } else {
                    storage.fstype.as_str()
                };
                mount(Some(source), &target, Some(fstype), flags, data).map_err(mount_err)?
            }
            "bind" => {
                let source = Path::new(&storage.source);
                if !source.is_dir() {
                    return Err(StorageError::Missing(source.to_owned()));
                }
                mount(
                    Some(source),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(mount_err)?;
                if flags.contains(MsFlags::MS_RDONLY) {
                    mount(
                        None::<&str>,
                        &target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                        None::<&str>,
                    )
                    .map_err(mount_err)?;
                }
            }
            other => return Err(StorageError::Driver(other.to_owned())),
        }
        mounted.insert(
            storage.name.clone(),
            Mounted {
                source: key,
                refs: 1,
            },
        );
        Ok(storage.name.clone())
    }

    /// Drops one reference on storage `name`, unmounting it with the last.
    pub fn release(&self, name: &str) {
        let mut mounted = self.mounted.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = mounted.get_mut(name) else {
            return;
        };
        m.refs -= 1;
        if m.refs == 0 {
            mounted.remove(name);
            let target = self.path(name);
            unmount_synced(&target);
            let _ = std::fs::remove_dir(&target);
        }
    }

    /// Resolves `"<storage>/<path>"` to a guest path; the storage must be mounted.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf, StorageError> {
        let rel = validate_relative("storage path", spec)?;
        let mut components = rel.components();
        let name = components
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .ok_or(StorageError::Invalid {
                what: "storage path",
                value: spec.to_owned(),
                why: "must start with a storage name",
            })?
            .to_owned();
        let known = self
            .mounted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&name);
        if !known {
            return Err(StorageError::Invalid {
                what: "storage path",
                value: spec.to_owned(),
                why: "names no storage of this container",
            });
        }
        Ok(self.path(&name).join(components.as_path()))
    }

    /// Mounts the overlay `root` at `target`: lower directories must exist; upper and work
    /// directories are made if missing.
    pub fn mount_overlay(&self, root: &RootfsOverlay, target: &Path) -> Result<(), StorageError> {
        if root.lower_dirs.is_empty() {
            return Err(StorageError::Invalid {
                what: "rootfs overlay",
                value: String::new(),
                why: "needs at least one lower directory",
            });
        }
        let mut lowers = Vec::new();
        for lower in &root.lower_dirs {
            let path = self.resolve(lower)?;
            if !path.is_dir() {
                return Err(StorageError::Missing(path));
            }
            lowers.push(overlay_escape(&path)?);
        }
        let upper = self.resolve(&root.upper_dir)?;
        let work = self.resolve(&root.work_dir)?;
        mkdir(&upper)?;
        mkdir(&work)?;
        mkdir(target)?;
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            overlay_escape(&upper)?,
            overlay_escape(&work)?
        );
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|source| StorageError::Mount {
            what: "overlay".into(),
            target: target.to_owned(),
            source,
        })
    }
}

/// A path as overlayfs' options take it: refused if it holds a separator overlayfs cannot escape.
fn overlay_escape(path: &Path) -> Result<String, StorageError> {
    let s = path.to_str().ok_or(StorageError::Invalid {
        what: "overlay path",
        value: path.display().to_string(),
        why: "not UTF-8",
    })?;
    if s.contains([',', ':', '\\']) {
        return Err(StorageError::Invalid {
            what: "overlay path",
            value: s.to_owned(),
            why: "',', ':' and '\\' are not allowed",
        });
    }
    Ok(s.to_owned())
}

/// Unmounts a container root mounted by [`Storages::mount_overlay`].
pub fn unmount_root(target: &Path) {
    unmount_synced(target);
}

/// Flushes the filesystem at `target` and unmounts it. A lazy unmount alone leaves dirty data in
/// the guest's page cache, and the host powers the VM off right after: the writable layer's last
/// writes were lost that way. A mount still busy is detached, but only after the flush.
fn unmount_synced(target: &Path) {
    if let Ok(dir) = std::fs::File::open(target) {
        let _ = nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir));
    }
    if umount2(target, MntFlags::empty()).is_err() {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("id", "abc-1_2.3").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a b",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(validate_id("id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            validate_relative("p", "share/./layers/1").unwrap(),
            PathBuf::from("share/layers/1")
        );
        assert!(validate_relative("p", "share/../../etc").is_err());
        assert!(validate_relative("p", "/etc").is_err());
    }

    #[test]
    fn container_paths() {
        assert!(validate_container_path(Path::new("/proc")).is_ok());
        assert!(validate_container_path(Path::new("/../../etc")).is_err());
        assert!(validate_container_path(Path::new("/a/../b")).is_err());
        assert!(validate_container_path(Path::new("tmp")).is_err());
    }

    #[test]
    fn options() {
        let (flags, data) =
            parse_options(&["ro".into(), "nosuid".into(), "data=ordered".into()]).unwrap();
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data, "data=ordered");
        assert!(parse_options(&["lowerdir=/etc".into()]).is_err());
        assert!(parse_options(&["a=b,upperdir=/x".into()]).is_err());
        assert!(parse_options(&["Weird!".into()]).is_err());
    }

    #[test]
    fn resolve_needs_a_known_storage() {
        let storages = Storages::new(PathBuf::from("/nonexistent"));
        assert!(storages.resolve("share/x").is_err());
        assert!(storages.resolve("../x").is_err());
    }

    #[test]
    fn overlay_paths_refuse_separators() {
        assert!(overlay_escape(Path::new("/a,b")).is_err());
        assert!(overlay_escape(Path::new("/a:b")).is_err());
        assert_eq!(overlay_escape(Path::new("/a/b")).unwrap(), "/a/b");
    }
}
