//! Bind mounts and unmounts, on the new mount API (Linux 5.12: `open_tree`, `mount_setattr`,
//! `move_mount`).
//!
//! Why that API rather than `mount(MS_BIND)` and a remount: the clone of the source is made
//! read-only (recursively, submounts included) while it is still detached, so it is never visible
//! writable, and the target is an `O_PATH` fd opened without following symlinks, so nothing can
//! redirect the mount elsewhere between the check and the mount.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{MoveMountFlags, OpenTreeFlags, UnmountFlags};

#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {path}: {source}")]
pub struct MountError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl MountError {
    fn new(op: &'static str, path: &Path, source: impl Into<io::Error>) -> MountError {
        MountError {
            op,
            path: path.to_owned(),
            source: source.into(),
        }
    }
}

/// Whether a bind mount may be written through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadOnly,
    ReadWrite,
}

// <linux/mount.h>, spelled out here: libc 0.2 does not export them on every target.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_int = 0x8000;

/// `struct mount_attr` (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, ...)`: sets flags and propagation on the
/// mount `fd` refers to and every mount below it.
fn set_mount_attr(tree: BorrowedFd<'_>, attr_set: u64, propagation: u64) -> io::Result<()> {
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads a NUL-terminated path (an empty C string literal) and
    // `size_of::<MountAttr>()` bytes of `attr`, a live `struct mount_attr` laid out as the kernel
    // expects; `tree` is an open fd for the whole call. Nothing is written back.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Binds the tree at `source` (recursively: submounts come along) onto the mount point `target`
/// (an `O_PATH` fd; `target_path` only names it in errors). Every mount of the new tree is
/// nosuid, nodev, read-only when asked, and private.
///
/// Private, and set after attaching: a mount attached under a shared parent becomes shared and
/// is copied into the parent's peers (attach_recursive_mnt), so the flag must be cleared after
/// the attach. A private mount neither sends later mounts under it to other namespaces nor
/// receives theirs, and unmounting it touches no other namespace.
pub(crate) fn bind(
    source: &Path,
    target: BorrowedFd<'_>,
    target_path: &Path,
    access: Access,
) -> Result<(), MountError> {
    let tree = rustix::mount::open_tree(
        CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )
    .map_err(|e| MountError::new("clone the mount tree of", source, e))?;
    let mut flags = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if access == Access::ReadOnly {
        flags |= MOUNT_ATTR_RDONLY;
    }
    set_mount_attr(tree.as_fd(), flags, 0).map_err(|e| {
        MountError::new(
            "set mount flags (mount_setattr, Linux 5.12+) on a clone of",
            source,
            e,
        )
    })?;
    rustix::mount::move_mount(
        &tree,
        c"",
        target,
        c"",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| MountError::new("attach a bind mount on", target_path, e))?;
    set_mount_attr(tree.as_fd(), 0, libc::MS_PRIVATE)
        .map_err(|e| MountError::new("make private the bind mount on", target_path, e))
}

/// Mounts stacked on one mount point that `unmount_all` takes off before giving up.
const MAX_STACKED: usize = 16;

/// What [`unmount_all`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Unmounted {
    pub unmounted: usize,
    /// How many were busy and were detached (MNT_DETACH) instead.
    pub detached: usize,
}

/// Unmounts every mount stacked on `path`, without following a symlink at `path`. A missing path
/// or one that is not a mount point counts as done (cleanup runs again after partial work).
///
/// A busy mount (EBUSY: a process has a file open or its cwd inside, e.g. the VMM's virtio-fs
/// server still holding inodes of a layer) is detached with MNT_DETACH: it leaves the mount
/// namespace at once, so no path shows it and the mount point can be removed, and the kernel
/// drops it when its last user closes. Waiting instead could block a shim's teardown forever, and
/// leaving it mounted would leak it.
pub(crate) fn unmount_all(path: &Path) -> Result<Unmounted, MountError> {
    let mut done = Unmounted::default();
    for _ in 0..MAX_STACKED {
        match rustix::mount::unmount(path, UnmountFlags::NOFOLLOW) {
            Ok(()) => done.unmounted += 1,
            Err(Errno::INVAL | Errno::NOENT | Errno::NOTDIR) => return Ok(done),
            Err(Errno::BUSY) => {
                rustix::mount::unmount(path, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH)
                    .map_err(|e| MountError::new("detach (MNT_DETACH) the busy mount", path, e))?;
                log::info!("{} was busy: detached it (MNT_DETACH)", path.display());
                done.detached += 1;
            }
            Err(e) => return Err(MountError::new("unmount", path, e)),
        }
    }
    Err(MountError::new(
        "unmount (more than 16 mounts stacked)",
        path,
        io::Error::from(io::ErrorKind::Other),
    ))
}

/// Opens `rel` below `dir` as an `O_PATH` fd for a mount target, refusing symlinks anywhere on
/// the way and any escape from `dir`.
pub(crate) fn open_target(dir: BorrowedFd<'_>, rel: &Path, directory: bool) -> io::Result<OwnedFd> {
    let mut flags = OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    if directory {
        flags |= OFlags::DIRECTORY;
    }
    Ok(rustix::fs::openat2(
        dir,
        rel,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?)
}
