//! Undoing recorded actions, for a live sandbox (`remove_container`, `destroy`, rollback of a
//! failed step) and after a crash (`cleanup`), in two passes:
//! 1. unmount, newest first: container mounts, then the shares' own bind mounts; then a sweep of
//!    mountinfo for anything still mounted below the shares;
//! 2. remove, newest first: mount points, container directories, share directories, the image.
//!
//! Removal never recurses: a mount point is `rmdir`ed (or, for a file volume, its empty file
//! unlinked), so a mount that failed to come off makes the removal fail (EBUSY) instead of deleting
//! what the mount shows, such as a volume's host data. Entries whose object is already gone count
//! as undone, so every pass can run again.

use std::fs;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType};
use rustix::io::Errno;

use crate::bind::{self, MountError};
use crate::image::sandbox_image_path;
use crate::mountinfo;
use crate::record::{Action, Entry, Share};

#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error(transparent)]
    Unmount(#[from] MountError),
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("{path} is a {found}, not what rund made there: left in place")]
    Unexpected { path: PathBuf, found: &'static str },
    #[error("cannot read the mounts below {path} (/proc/self/mountinfo): {source}")]
    Mountinfo { path: PathBuf, source: io::Error },
}

/// Where the entries of one sandbox live.
pub(crate) struct Places<'a> {
    pub state_dir: &'a Path,
    pub writable_dir: &'a Path,
    pub sandbox_id: &'a str,
}

impl Places<'_> {
    pub fn share_dir(&self, share: Share) -> PathBuf {
        self.state_dir.join(share.dir_name())
    }

    /// The path an entry's mount sits on, if it has one.
    fn mount_path(&self, action: &Action) -> Option<PathBuf> {
        match action {
            Action::ShareDir { share } => Some(self.share_dir(*share)),
            Action::Mount { .. } => action
                .in_share()
                .map(|(share, rel)| self.share_dir(share).join(rel)),
            Action::ContainerDir { .. } | Action::Image => None,
        }
    }

    /// Pass 1 for `entries`: unmounts what they mounted, newest first.
    pub fn unmount(&self, entries: &[&Entry]) -> Vec<UndoError> {
        let mut errors = Vec::new();
        for entry in entries.iter().rev() {
            if let Some(path) = self.mount_path(&entry.action) {
                if let Err(e) = bind::unmount_all(&path) {
                    errors.push(e.into());
                }
            }
        }
        errors
    }

    /// Unmounts whatever mountinfo still shows below the share directories (deepest first),
    /// record or not: those directories are this sandbox's alone.
    pub fn sweep(&self) -> Vec<UndoError> {
        let mut errors = Vec::new();
        for share in Share::ALL {
            let dir = self.share_dir(share);
            let mut mounts = match mountinfo::mounts_under(&dir) {
                Ok(mounts) => mounts,
                Err(source) => {
                    errors.push(UndoError::Mountinfo { path: dir, source });
                    continue;
                }
            };
            mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
            for m in mounts {
                log::warn!(
                    "{} was still mounted after its recorded unmounts: unmounting it",
                    m.mount_point.display()
                );
                if let Err(e) = bind::unmount_all(&m.mount_point) {
                    errors.push(e.into());
                }
            }
        }
        errors
    }

    /// Pass 2 for `entries`, newest first. `backing` holds, per share, a directory fd of the
    /// share's own directory (not its read-only bind mount), or `None` when it is gone.
    pub fn remove(
        &self,
        entries: &[&Entry],
        backing: &[Option<BorrowedFd<'_>>; 2],
    ) -> Vec<UndoError> {
        let mut errors = Vec::new();
        for entry in entries.iter().rev() {
            let result = match &entry.action {
                Action::ShareDir { share } => remove_path(&self.share_dir(*share)),
                Action::Image => {
                    remove_path(&sandbox_image_path(self.writable_dir, self.sandbox_id))
                }
                action => match action.in_share() {
                    Some((share, rel)) => match backing[share.index()] {
                        Some(dir) => remove_at(dir, &rel, &self.share_dir(share).join(&rel)),
                        None => Ok(()),
                    },
                    None => Ok(()),
                },
            };
            if let Err(e) = result {
                errors.push(e);
            }
        }
        errors
    }
}

fn file_type_name(t: FileType) -> &'static str {
    match t {
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "special file",
    }
}

/// Removes the directory or regular file `rel` below `dir` (never following a symlink, never
/// recursing); `shown` names it in errors.
fn remove_at(dir: BorrowedFd<'_>, rel: &Path, shown: &Path) -> Result<(), UndoError> {
    let remove_err = |source: Errno| UndoError::Remove {
        path: shown.to_owned(),
        source: source.into(),
    };
    let stat = match rustix::fs::statat(dir, rel, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(remove_err(e)),
    };
    let flags = match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => AtFlags::REMOVEDIR,
        FileType::RegularFile => AtFlags::empty(),
        other => {
            return Err(UndoError::Unexpected {
                path: shown.to_owned(),
                found: file_type_name(other),
            })
        }
    };
    match rustix::fs::unlinkat(dir, rel, flags) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(remove_err(e)),
    }
}

/// [`remove_at`] for an absolute path whose parents rund made (share directories, the image).
fn remove_path(path: &Path) -> Result<(), UndoError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    match fs::File::open(parent) {
        Ok(dir) => remove_at(std::os::fd::AsFd::as_fd(&dir), Path::new(name), path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(UndoError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}
