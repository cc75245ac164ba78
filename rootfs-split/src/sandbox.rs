//! One sandbox's root filesystems on the host, under its state directory
//! (`/run/rund/<sandbox-id>/`):
//!
//! ```text
//! share-ro/                  virtio-fs, served read-only: bind-mounted on itself read-only
//!   <container>/layer-<n>    one image layer each, bind-mounted read-only (0 = top)
//!   <container>/volume-<n>   read-only volumes, bind-mounted read-only
//! share-rw/                  virtio-fs, served read-write: bind-mounted on itself read-only
//!   <container>/volume-<n>   read-write volumes
//! rootfs.json                the record (see `record`)
//! rootfs.lock                flock'd by the live sandbox, so cleanup never tears down a live one
//! ```
//! plus the writable layer `<writable_dir>/sandboxes/<sandbox-id>.ext4`.
//!
//! The shares' roots are read-only bind mounts of themselves: the guest can write only inside a
//! read-write volume, never create entries (symlinks included) next to the mount points that rund
//! later creates or removes. rund creates and removes entries through an fd of the directory
//! under that bind mount, and attaches mounts at paths resolved through the bind mount (without
//! following symlinks), which is what the VMM serves. Every mount rund makes is private: nothing
//! mounted here propagates into another mount namespace, and nothing from elsewhere arrives.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::bind::{self, Access, MountError};
use crate::copy::CopyMethod;
use crate::id::{check_id, InvalidId};
use crate::image::{ImageError, WritableLayer};
use crate::record::{mount_point_rel, Action, MountKind, Record, RecordError, RecordFile, Share};
use crate::spec::{self, MountSpecError, RootfsMount};
use crate::undo::{Places, UndoError};

const LOCK_FILE: &str = "rootfs.lock";

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Id(#[from] InvalidId),
    #[error("container {container}: {source}")]
    Spec {
        container: String,
        source: MountSpecError,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the sandbox rootfs in {0} is in use by a live process (rootfs.lock is held)")]
    InUse(PathBuf),
    #[error("container {0} already has a rootfs in this sandbox")]
    ContainerExists(String),
    #[error("container {container}: volume source {path:?} is not an absolute path")]
    RelativeVolume { container: String, path: PathBuf },
    #[error("container {container}: volume source {path}: {source}")]
    VolumeSource {
        container: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("container {container}: volume source {path} is neither a directory nor a regular file, which virtio-fs cannot share")]
    VolumeType { container: String, path: PathBuf },
    #[error("no rootfs record in {state_dir}, yet {paths:?} exist: left in place")]
    Unrecorded {
        state_dir: PathBuf,
        paths: Vec<PathBuf>,
    },
    #[error("undoing the sandbox rootfs in {state_dir} left {} problem(s): {}", .errors.len(), join(.errors))]
    Undo {
        state_dir: PathBuf,
        errors: Vec<UndoError>,
    },
}

fn join(errors: &[UndoError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn undo_result(state_dir: &Path, errors: Vec<UndoError>) -> Result<(), RootfsError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RootfsError::Undo {
            state_dir: state_dir.to_owned(),
            errors,
        })
    }
}

/// A path inside one of the shares, as the guest's agent is told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePath {
    pub share: Share,
    /// Relative to the share's root.
    pub path: PathBuf,
}

/// A container's rootfs as the guest mounts it: an overlay of these lower directories (in
/// `share-ro`, top first) under an upper directory on the writable ext4 device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRootfs {
    pub container_id: String,
    /// Relative to `share-ro`'s root, in overlay order (top first).
    pub lower_dirs: Vec<PathBuf>,
}

/// One share directory of a live sandbox.
#[derive(Debug)]
struct ShareFds {
    /// The directory itself, under its read-only bind mount: where rund makes and removes entries.
    backing: OwnedFd,
    /// The root of that bind mount (`O_PATH`): where mounts are attached, the tree the VMM serves.
    mounted: OwnedFd,
}

/// The host side of one sandbox's root filesystems; see the module docs for the layout.
///
/// Dropping it without [`SandboxRootfs::destroy`] leaves everything in place and recorded, for
/// [`SandboxRootfs::cleanup`]: exactly what a killed shim leaves.
#[derive(Debug)]
pub struct SandboxRootfs {
    state_dir: PathBuf,
    image: PathBuf,
    copy_method: CopyMethod,
    record: RecordFile,
    shares: Vec<ShareFds>,
    /// flock'd while this value lives (and by the kernel, until the process dies).
    _lock: File,
    finished: bool,
}

/// Takes `<state_dir>/rootfs.lock` without waiting.
fn lock_state_dir(state_dir: &Path) -> Result<File, RootfsError> {
    let path = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_error("open", &path))?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(RootfsError::InUse(state_dir.to_owned())),
        Err(e) => Err(io_error("lock", &path)(e.into())),
    }
}

fn remove_lock_file(state_dir: &Path) -> Result<(), RootfsError> {
    let path = state_dir.join(LOCK_FILE);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("remove", &path)(e)),
        _ => Ok(()),
    }
}

/// The state directory as mountinfo spells it (symlinks resolved), made if missing.
fn canonical_state_dir(state_dir: &Path) -> Result<PathBuf, RootfsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io_error("create directory", state_dir))?;
    fs::canonicalize(state_dir).map_err(io_error("resolve", state_dir))
}

fn open_dir(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        rel,
        flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Unmounts, sweeps and removes everything `record` names; the shares' fds must be closed
/// (an fd on a share's bind mount keeps it busy).
fn teardown(state_dir: &Path, record: &Record) -> Vec<UndoError> {
    let places = Places {
        state_dir,
        writable_dir: &record.writable_dir,
        sandbox_id: &record.sandbox_id,
    };
    let entries: Vec<_> = record.entries.iter().collect();
    let mut errors = places.unmount(&entries);
    errors.extend(places.sweep());
    // With the bind mounts gone, the share paths are the directories themselves.
    let mut backing: Vec<Option<OwnedFd>> = Vec::new();
    for share in Share::ALL {
        let path = places.share_dir(share);
        backing.push(match open_dir(rustix::fs::CWD, &path, OFlags::RDONLY) {
            Ok(fd) => Some(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                errors.push(UndoError::Remove { path, source });
                None
            }
        });
    }
    let borrowed = [
        backing[0].as_ref().map(|f| f.as_fd()),
        backing[1].as_ref().map(|f| f.as_fd()),
    ];
    errors.extend(places.remove(&entries, &borrowed));
    errors
}

impl SandboxRootfs {
    /// Makes `<state_dir>/share-ro/`, `<state_dir>/share-rw/` (each a read-only, private bind
    /// mount of itself) and the sandbox's writable image, recording each step. The VMM must open
    /// the share directories after this returns (before, it would see the directories under the
    /// bind mounts, where no container's mount appears).
    pub fn create(
        state_dir: &Path,
        sandbox_id: &str,
        writable: &WritableLayer,
    ) -> Result<SandboxRootfs, RootfsError> {
        check_id("sandbox", sandbox_id)?;
        let state_dir = canonical_state_dir(state_dir)?;
        let lock = lock_state_dir(&state_dir)?;
        let record = RecordFile::create(&state_dir, sandbox_id, writable.dir())?;
        let mut sandbox = SandboxRootfs {
            image: writable.sandbox_image_path(sandbox_id),
            state_dir,
            copy_method: CopyMethod::SparseCopy,
            record,
            shares: Vec::new(),
            _lock: lock,
            finished: false,
        };
        match sandbox.populate(writable) {
            Ok(()) => Ok(sandbox),
            Err(e) => {
                if let Err(undo) = sandbox.finish() {
                    log::error!("undoing a failed sandbox rootfs: {undo}");
                }
                Err(e)
            }
        }
    }

    fn populate(&mut self, writable: &WritableLayer) -> Result<(), RootfsError> {
        for share in Share::ALL {
            let fds = self.make_share(share)?;
            self.shares.push(fds);
        }
        let seq = self.record.begin(Action::Image)?;
        match writable.make_sandbox_image(&self.record.record.sandbox_id) {
            Ok(method) => self.copy_method = method,
            // Someone else's image (a sandbox of the same id not cleaned up): not ours to undo.
            Err(e @ ImageError::Exists(_)) => {
                self.record.forget(&[seq])?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        self.record.done(seq)?;
        Ok(())
    }

    fn make_share(&mut self, share: Share) -> Result<ShareFds, RootfsError> {
        let path = self.share_dir(share);
        // Checked before recording it: a directory rund did not make must not be undone.
        if path.symlink_metadata().is_ok() {
            return Err(io_error("create directory", &path)(
                io::ErrorKind::AlreadyExists.into(),
            ));
        }
        let seq = self.record.begin(Action::ShareDir { share })?;
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_error("create directory", &path))?;
        let backing =
            open_dir(rustix::fs::CWD, &path, OFlags::RDONLY).map_err(io_error("open", &path))?;
        bind::bind(&path, backing.as_fd(), &path, Access::ReadOnly)?;
        let mounted =
            open_dir(rustix::fs::CWD, &path, OFlags::PATH).map_err(io_error("open", &path))?;
        self.record.done(seq)?;
        Ok(ShareFds { backing, mounted })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `<state_dir>/share-ro` or `<state_dir>/share-rw`: what the VMM serves over virtio-fs.
    pub fn share_dir(&self, share: Share) -> PathBuf {
        self.state_dir.join(share.dir_name())
    }

    /// The sandbox's writable ext4 image, for virtio-blk.
    pub fn image_path(&self) -> &Path {
        &self.image
    }

    /// Whether the image is a reflink or a sparse copy of the base.
    pub fn copy_method(&self) -> CopyMethod {
        self.copy_method
    }

    /// Shares a container's image layers: each lower layer of `mounts` (containerd's rootfs
    /// mounts: one overlay or bind mount) is bind-mounted read-only on
    /// `share-ro/<container>/layer-<n>`. containerd's upperdir and workdir stay unused. On error
    /// nothing of this call stays mounted or created.
    pub fn add_container(
        &mut self,
        container_id: &str,
        mounts: &[RootfsMount],
    ) -> Result<ContainerRootfs, RootfsError> {
        check_id("container", container_id)?;
        let has_layers = self.record.entries().iter().any(|e| {
            matches!(&e.action, Action::Mount { container, kind: MountKind::Layer, .. } if container == container_id)
        });
        if has_layers {
            return Err(RootfsError::ContainerExists(container_id.to_string()));
        }
        let layers = spec::lower_layers(mounts).map_err(|source| RootfsError::Spec {
            container: container_id.to_string(),
            source,
        })?;
        let mut made = Vec::new();
        let result = self.share_layers(container_id, &layers, &mut made);
        self.roll_back_on_error(result, &made)
            .map(|lower_dirs| ContainerRootfs {
                container_id: container_id.to_string(),
                lower_dirs,
            })
    }

    fn share_layers(
        &mut self,
        container: &str,
        layers: &[PathBuf],
        made: &mut Vec<u64>,
    ) -> Result<Vec<PathBuf>, RootfsError> {
        self.ensure_container_dir(Share::ReadOnly, container, made)?;
        let mut lower_dirs = Vec::with_capacity(layers.len());
        for (index, layer) in (0u32..).zip(layers) {
            let mount = Mount {
                share: Share::ReadOnly,
                kind: MountKind::Layer,
                index,
                source: layer,
                directory: true,
                access: Access::ReadOnly,
            };
            lower_dirs.push(self.attach(container, mount, made)?);
        }
        Ok(lower_dirs)
    }

    /// Shares an OCI bind mount (a volume, file or directory) with the guest at
    /// `<share>/<container>/volume-<n>`: in `share-ro` and read-only when `read_only`, else in
    /// `share-rw`. Submounts of `source` come along (read-only too, when read-only).
    pub fn add_volume(
        &mut self,
        container_id: &str,
        source: &Path,
        read_only: bool,
    ) -> Result<SharePath, RootfsError> {
        check_id("container", container_id)?;
        let container = container_id.to_string();
        if !source.is_absolute() {
            return Err(RootfsError::RelativeVolume {
                container,
                path: source.to_owned(),
            });
        }
        let meta = fs::metadata(source).map_err(|e| RootfsError::VolumeSource {
            container: container.clone(),
            path: source.to_owned(),
            source: e,
        })?;
        if !meta.is_dir() && !meta.is_file() {
            return Err(RootfsError::VolumeType {
                container,
                path: source.to_owned(),
            });
        }
        let (share, access) = if read_only {
            (Share::ReadOnly, Access::ReadOnly)
        } else {
            (Share::ReadWrite, Access::ReadWrite)
        };
        let index = self.next_volume_index(container_id);
        let mount = Mount {
            share,
            kind: MountKind::Volume,
            index,
            source,
            directory: meta.is_dir(),
            access,
        };
        let mut made = Vec::new();
        let result = self
            .ensure_container_dir(share, container_id, &mut made)
            .and_then(|()| self.attach(container_id, mount, &mut made));
        self.roll_back_on_error(result, &made)
            .map(|path| SharePath { share, path })
    }

    fn next_volume_index(&self, container_id: &str) -> u32 {
        self.record
            .entries()
            .iter()
            .filter_map(|e| match &e.action {
                Action::Mount {
                    container,
                    kind: MountKind::Volume,
                    index,
                    ..
                } if container == container_id => Some(index + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Undoes a container's layers and volumes and removes its directories; a container with
    /// nothing shared is no error.
    pub fn remove_container(&mut self, container_id: &str) -> Result<(), RootfsError> {
        check_id("container", container_id)?;
        let seqs: Vec<u64> = self
            .record
            .entries()
            .iter()
            .filter(|e| e.action.container() == Some(container_id))
            .map(|e| e.seq)
            .collect();
        self.undo_live(&seqs)
    }

    /// Undoes everything: every container, the shares, the image, the record and lock files.
    /// Stop the VMM first: mounts its virtio-fs server still holds are detached (MNT_DETACH)
    /// rather than unmounted.
    pub fn destroy(mut self) -> Result<(), RootfsError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), RootfsError> {
        self.finished = true;
        self.shares.clear();
        let errors = teardown(&self.state_dir, &self.record.record);
        undo_result(&self.state_dir, errors)?;
        RecordFile::remove(&self.state_dir)?;
        remove_lock_file(&self.state_dir)
    }

    /// Undoes everything the record in `state_dir` names, for `containerd-shim-rund-v2 delete`
    /// after the shim died (SIGKILL included). Idempotent; refused while a live process holds the
    /// sandbox. Whatever the record says, nothing stays mounted below the shares (a mountinfo
    /// sweep); with an unreadable or invalid record, files are left in place and the error says
    /// why. The state directory itself is left (other parts of rund keep state there).
    pub fn cleanup(state_dir: &Path) -> Result<(), RootfsError> {
        let state_dir = match fs::canonicalize(state_dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("resolve", state_dir)(e)),
        };
        let _lock = lock_state_dir(&state_dir)?;
        let record = match RecordFile::load(&state_dir) {
            Ok(record) => record,
            Err(e) => {
                let errors = Places {
                    state_dir: &state_dir,
                    writable_dir: Path::new("/"),
                    sandbox_id: "",
                }
                .sweep();
                for error in errors {
                    log::error!("{error}");
                }
                return Err(e.into());
            }
        };
        match record {
            Some(record) => {
                undo_result(&state_dir, teardown(&state_dir, &record))?;
                RecordFile::remove(&state_dir)?;
            }
            None => Self::cleanup_unrecorded(&state_dir)?,
        }
        remove_lock_file(&state_dir)
    }

    /// No record: nothing was ever made, or the record was lost. Mounts below the shares still
    /// come off; share directories are not removed without a record saying they are rund's.
    fn cleanup_unrecorded(state_dir: &Path) -> Result<(), RootfsError> {
        let places = Places {
            state_dir,
            writable_dir: Path::new("/"),
            sandbox_id: "",
        };
        undo_result(state_dir, places.sweep())?;
        let paths: Vec<PathBuf> = Share::ALL
            .iter()
            .map(|s| places.share_dir(*s))
            .filter(|p| p.symlink_metadata().is_ok())
            .collect();
        if paths.is_empty() {
            Ok(())
        } else {
            Err(RootfsError::Unrecorded {
                state_dir: state_dir.to_owned(),
                paths,
            })
        }
    }

    fn ensure_container_dir(
        &mut self,
        share: Share,
        container: &str,
        made: &mut Vec<u64>,
    ) -> Result<(), RootfsError> {
        let exists = self.record.entries().iter().any(|e| {
            e.action
                == Action::ContainerDir {
                    share,
                    container: container.to_string(),
                }
        });
        if exists {
            return Ok(());
        }
        let seq = self.record.begin(Action::ContainerDir {
            share,
            container: container.to_string(),
        })?;
        made.push(seq);
        let backing = self.shares[share.index()].backing.as_fd();
        rustix::fs::mkdirat(backing, container, Mode::RWXU).map_err(|e| {
            io_error("create directory", &self.share_dir(share).join(container))(e.into())
        })?;
        self.record.done(seq)?;
        Ok(())
    }

    /// Makes the mount point of `mount` and binds its source there; returns the mount point
    /// relative to its share.
    fn attach(
        &mut self,
        container: &str,
        mount: Mount<'_>,
        made: &mut Vec<u64>,
    ) -> Result<PathBuf, RootfsError> {
        let seq = self.record.begin(Action::Mount {
            share: mount.share,
            container: container.to_string(),
            kind: mount.kind,
            index: mount.index,
            source: mount.source.to_owned(),
        })?;
        made.push(seq);
        let rel = mount_point_rel(container, mount.kind, mount.index);
        let shown = self.share_dir(mount.share).join(&rel);
        let fds = &self.shares[mount.share.index()];
        let made_point = if mount.directory {
            rustix::fs::mkdirat(fds.backing.as_fd(), &rel, Mode::RWXU)
        } else {
            rustix::fs::openat(
                fds.backing.as_fd(),
                &rel,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::RUSR | Mode::WUSR,
            )
            .map(drop)
        };
        made_point.map_err(|e| io_error("create mount point", &shown)(e.into()))?;
        let target = bind::open_target(fds.mounted.as_fd(), &rel, mount.directory)
            .map_err(io_error("open mount point", &shown))?;
        bind::bind(mount.source, target.as_fd(), &shown, mount.access)?;
        self.record.done(seq)?;
        Ok(rel)
    }

    fn roll_back_on_error<T>(
        &mut self,
        result: Result<T, RootfsError>,
        made: &[u64],
    ) -> Result<T, RootfsError> {
        if result.is_err() {
            if let Err(e) = self.undo_live(made) {
                log::error!("rolling back a failed step left: {e}; cleanup will retry");
            }
        }
        result
    }

    /// Undoes the entries `seqs` of this live sandbox (container entries only: the shares stay)
    /// and forgets them; on error they stay recorded for a later destroy or cleanup.
    fn undo_live(&mut self, seqs: &[u64]) -> Result<(), RootfsError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let record = &self.record.record;
        let places = Places {
            state_dir: &self.state_dir,
            writable_dir: &record.writable_dir,
            sandbox_id: &record.sandbox_id,
        };
        let entries: Vec<_> = record
            .entries
            .iter()
            .filter(|e| seqs.contains(&e.seq))
            .collect();
        let mut errors = places.unmount(&entries);
        let backing = [
            self.shares.first().map(|s| s.backing.as_fd()),
            self.shares.get(1).map(|s| s.backing.as_fd()),
        ];
        errors.extend(places.remove(&entries, &backing));
        undo_result(&self.state_dir, errors)?;
        self.record.forget(seqs)?;
        Ok(())
    }
}

/// What one bind mount into a share is.
struct Mount<'a> {
    share: Share,
    kind: MountKind,
    index: u32,
    source: &'a Path,
    /// A directory (else a regular file): the mount point is made to match.
    directory: bool,
    access: Access,
}

impl Drop for SandboxRootfs {
    fn drop(&mut self) {
        if !self.finished {
            log::warn!(
                "sandbox rootfs in {} dropped without destroy: its mounts and image stay, recorded for cleanup",
                self.state_dir.display()
            );
        }
    }
}
