//! rund's record of which sandbox holds which cgroup, in a state directory (default
//! `/run/rund/cgroup-pool`: tmpfs, so it lives exactly as long as the cgroups do, until reboot).
//!
//! Layout:
//! - `sandboxes/<sandbox-id>.json`: one [`SandboxRecord`] per held cgroup, for the shim, `rund`
//!   and a restarted process to find a sandbox's cgroup by id;
//! - `claims/<slot>`: on cgroup v2 (where a slot cannot be renamed) the claim on a slot, holding
//!   the sandbox id; made with O_EXCL, so two processes cannot claim one slot;
//! - `lock`: flock'd shared by every acquire/release/refill and exclusively by reconcile, so a
//!   reconcile in one process never sees another process's operation half done.
//!
//! Every file is written whole to a temporary name and then linked (exclusive) or renamed
//! (replace) into place, so a crash leaves either the old file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::hierarchy::{CgroupDirs, CgroupVersion};
use crate::sandbox_id::SandboxId;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use rund's cgroup state directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid cgroup record: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("sandbox {0} already has a cgroup record")]
    AlreadyRecorded(SandboxId),
}

/// Where a held cgroup came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Placement {
    /// A pool slot (its original name; on v1 the directories are now `sandbox-<id>`).
    Pool { slot: String },
    /// Made in a parent the platform dictated (pool bypass); `path` is below each mount point.
    Dictated { path: PathBuf },
}

/// What the state directory says about one sandbox's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub sandbox_id: SandboxId,
    pub placement: Placement,
    pub dirs: CgroupDirs,
}

impl SandboxRecord {
    pub fn version(&self) -> CgroupVersion {
        self.dirs.version
    }
}

/// The claim a slot carries while it is being removed: not a valid sandbox id, so nobody's.
pub const TRIM_HOLDER: &str = "-trim-";

/// The claim a released v2 slot carries until the refill has recycled it: nobody's, so a
/// reconcile resets and frees it.
pub const RECYCLE_HOLDER: &str = "-recycle-";

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// rund's cgroup state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// Held while an operation runs; dropping it unlocks.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateDir {
    /// Opens (creating) the directory and its sub-directories.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        for dir in [
            root.to_path_buf(),
            root.join("sandboxes"),
            root.join("claims"),
        ] {
            fs::create_dir_all(&dir).map_err(|source| StateError::Dir { path: dir, source })?;
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    /// Opens an existing directory without creating anything (for read-only users such as the
    /// `rund` CLI).
    pub fn existing(root: &Path) -> StateDir {
        StateDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, op: rustix::fs::FlockOperation) -> Result<StateLock, StateError> {
        let path = self.root.join("lock");
        let err = |source| StateError::Lock {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(err)?;
        rustix::fs::flock(&file, op).map_err(|e| err(e.into()))?;
        Ok(StateLock { _file: file })
    }

    pub fn lock_shared(&self) -> Result<StateLock, StateError> {
        self.lock(rustix::fs::FlockOperation::LockShared)
    }

    pub fn lock_exclusive(&self) -> Result<StateLock, StateError> {
        self.lock(rustix::fs::FlockOperation::LockExclusive)
    }

    fn record_path(&self, id: &SandboxId) -> PathBuf {
        self.root.join("sandboxes").join(format!("{id}.json"))
    }

    fn claim_path(&self, slot: &str) -> PathBuf {
        self.root.join("claims").join(slot)
    }

    /// Writes `bytes` to a new temporary file next to `target`, returning its path.
    fn write_temp(&self, target: &Path, bytes: &[u8]) -> Result<PathBuf, StateError> {
        let dir = target.parent().unwrap_or(&self.root);
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes));
        if let Err(source) = result {
            let _ = fs::remove_file(&tmp);
            return Err(StateError::Write { path: tmp, source });
        }
        Ok(tmp)
    }

    /// Publishes a complete file at `target` unless the name exists (`Ok(false)`): atomic and
    /// exclusive. An unnamed `O_TMPFILE` linked into place when the filesystem offers it (one
    /// directory operation, nothing to clean up after a crash), else a temporary name linked and
    /// then removed.
    fn publish_exclusive(&self, target: &Path, bytes: &[u8]) -> Result<bool, StateError> {
        let exists = |e: &io::Error| e.kind() == io::ErrorKind::AlreadyExists;
        if let Some(linked) = link_tmpfile(target, bytes) {
            return match linked {
                Ok(()) => Ok(true),
                Err(e) if exists(&e) => Ok(false),
                Err(source) => Err(StateError::Write {
                    path: target.to_path_buf(),
                    source,
                }),
            };
        }
        let tmp = self.write_temp(target, bytes)?;
        // link(2) publishes the complete file and fails if the name exists.
        let linked = fs::hard_link(&tmp, target);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if exists(&e) => Ok(false),
            Err(source) => Err(StateError::Write {
                path: target.to_path_buf(),
                source,
            }),
        }
    }

    /// Records a sandbox's cgroup; fails with [`StateError::AlreadyRecorded`] if it has one.
    pub fn create_record(&self, record: &SandboxRecord) -> Result<(), StateError> {
        let path = self.record_path(&record.sandbox_id);
        if self.publish_exclusive(&path, &to_json(record))? {
            Ok(())
        } else {
            Err(StateError::AlreadyRecorded(record.sandbox_id.clone()))
        }
    }

    /// Records a sandbox's cgroup, replacing any record it had.
    pub fn replace_record(&self, record: &SandboxRecord) -> Result<(), StateError> {
        let path = self.record_path(&record.sandbox_id);
        let tmp = self.write_temp(&path, &to_json(record))?;
        fs::rename(&tmp, &path).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            StateError::Write { path, source }
        })
    }

    pub fn read_record(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StateError> {
        read_json(&self.record_path(id))
    }

    pub fn remove_record(&self, id: &SandboxId) -> Result<(), StateError> {
        remove_if_present(&self.record_path(id))
    }

    /// Every record; one that cannot be read is returned as an error in its place.
    pub fn records(&self) -> Result<Vec<Result<SandboxRecord, StateError>>, StateError> {
        let dir = self.root.join("sandboxes");
        let mut out = Vec::new();
        for name in list(&dir)? {
            if name.ends_with(".json") && !name.starts_with('.') {
                match read_json(&dir.join(&name)) {
                    Ok(Some(r)) => out.push(Ok(r)),
                    Ok(None) => {}
                    Err(e) => out.push(Err(e)),
                }
            }
        }
        Ok(out)
    }

    /// Claims a v2 slot for `holder` (a sandbox id, or [`TRIM_HOLDER`] while the refill removes
    /// the slot). `Ok(false)`: someone else holds it.
    pub fn claim_slot(&self, slot: &str, holder: &str) -> Result<bool, StateError> {
        self.publish_exclusive(&self.claim_path(slot), holder.as_bytes())
    }

    /// Hands a claimed v2 slot over to another holder (the sandbox's claim becomes
    /// [`RECYCLE_HOLDER`]'s) in one atomic rename.
    pub fn reassign_slot(&self, slot: &str, holder: &str) -> Result<(), StateError> {
        let path = self.claim_path(slot);
        let tmp = self.write_temp(&path, holder.as_bytes())?;
        fs::rename(&tmp, &path).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            StateError::Write { path, source }
        })
    }

    pub fn unclaim_slot(&self, slot: &str) -> Result<(), StateError> {
        remove_if_present(&self.claim_path(slot))
    }

    /// Who claimed a v2 slot. A claim whose content is not a sandbox id reads as `Some(None)`.
    pub fn slot_holder(&self, slot: &str) -> Result<Option<Option<SandboxId>>, StateError> {
        let path = self.claim_path(slot);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(SandboxId::parse(s.trim()).ok())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    pub fn claimed_slots(&self) -> Result<Vec<String>, StateError> {
        Ok(list(&self.root.join("claims"))?
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect())
    }

    /// Removes temporary files a crashed writer left behind. Returns how many.
    pub fn remove_stale_temporaries(&self) -> Result<usize, StateError> {
        let mut n = 0;
        for sub in ["sandboxes", "claims"] {
            let dir = self.root.join(sub);
            for name in list(&dir)? {
                if name.starts_with(".tmp-") {
                    remove_if_present(&dir.join(name))?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// Writes `bytes` to an unnamed file in `target`'s directory and links it at `target`
/// (`linkat` of the descriptor, `AT_EMPTY_PATH`: needs `CAP_DAC_READ_SEARCH`, which rund has as
/// root). `None` when that is not possible here (no `O_TMPFILE` on this filesystem, or no
/// permission): the caller then uses a temporary name.
fn link_tmpfile(target: &Path, bytes: &[u8]) -> Option<io::Result<()>> {
    use rustix::fs::{AtFlags, Mode, OFlags, CWD};
    let dir = target.parent()?;
    let fd = rustix::fs::openat(
        CWD,
        dir,
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .ok()?;
    let mut file = File::from(fd);
    if let Err(e) = file.write_all(bytes) {
        return Some(Err(e));
    }
    match rustix::fs::linkat(&file, "", CWD, target, AtFlags::EMPTY_PATH) {
        Ok(()) => Some(Ok(())),
        Err(rustix::io::Errno::EXIST) => Some(Err(io::ErrorKind::AlreadyExists.into())),
        // No permission for AT_EMPTY_PATH, or a filesystem that cannot: use a temporary name.
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM | rustix::io::Errno::OPNOTSUPP) => {
            None
        }
        Err(e) => Some(Err(e.into())),
    }
}

fn to_json(record: &SandboxRecord) -> Vec<u8> {
    // Serialising these plain types cannot fail (no maps with non-string keys, no floats).
    serde_json::to_vec_pretty(record).unwrap_or_default()
}

fn read_json(path: &Path) -> Result<Option<SandboxRecord>, StateError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn remove_if_present(path: &Path) -> Result<(), StateError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn list(dir: &Path) -> Result<Vec<String>, StateError> {
    let err = |source| StateError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(err)? {
        if let Ok(name) = entry.map_err(err)?.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hierarchy::CgroupDir;

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            sandbox_id: SandboxId::parse(id).unwrap(),
            placement: Placement::Pool {
                slot: "pool-1-1".into(),
            },
            dirs: CgroupDirs {
                version: CgroupVersion::V2,
                dirs: vec![CgroupDir {
                    path: "/sys/fs/cgroup/rund/pool-1-1".into(),
                    controllers: vec!["cpu".into()],
                }],
            },
        }
    }

    #[test]
    fn records_are_exclusive_and_round_trip() {
        let tmp = TempDir(std::env::temp_dir().join(format!("state-unit-{}", std::process::id())));
        let state = StateDir::open(&tmp.0).unwrap();
        let r = record("sb1");
        state.create_record(&r).unwrap();
        assert!(matches!(
            state.create_record(&r),
            Err(StateError::AlreadyRecorded(_))
        ));
        assert_eq!(state.read_record(&r.sandbox_id).unwrap(), Some(r.clone()));
        assert_eq!(state.records().unwrap().len(), 1);
        state.remove_record(&r.sandbox_id).unwrap();
        assert_eq!(state.read_record(&r.sandbox_id).unwrap(), None);

        assert!(state.claim_slot("pool-1-1", r.sandbox_id.as_str()).unwrap());
        assert!(!state.claim_slot("pool-1-1", r.sandbox_id.as_str()).unwrap());
        assert_eq!(
            state.slot_holder("pool-1-1").unwrap(),
            Some(Some(r.sandbox_id.clone()))
        );
        state.unclaim_slot("pool-1-1").unwrap();
        assert_eq!(state.slot_holder("pool-1-1").unwrap(), None);
        assert_eq!(state.remove_stale_temporaries().unwrap(), 0);
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_file() {
        let tmp =
            TempDir(std::env::temp_dir().join(format!("state-corrupt-{}", std::process::id())));
        let state = StateDir::open(&tmp.0).unwrap();
        fs::write(tmp.0.join("sandboxes/x.json"), b"{not json").unwrap();
        let err = state
            .read_record(&SandboxId::parse("x").unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("x.json"), "{err}");
    }
}
