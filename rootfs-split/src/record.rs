//! The record of everything a sandbox's rootfs holds on the host, `<state_dir>/rootfs.json`.
//!
//! Each action is written (and synced) before it starts and marked done after, so after a crash
//! the record names a superset of what exists; cleanup undoes every entry and takes what was never
//! done as done. The file is replaced whole (temporary file, fsync, rename, fsync of the
//! directory): a crash leaves the old record or the new one, never a torn one. It is input from
//! disk when cleanup reads it, so every id and path in it is checked before use.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::id::check_id;
use crate::image::is_plain_absolute;

pub const RECORD_FILE: &str = "rootfs.json";
const RECORD_TMP: &str = ".rootfs.json.tmp";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot {op} the rootfs record {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("rootfs record {path} is not a record rund wrote: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("rootfs record {path} is refused: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("rootfs record {0} already exists: clean that sandbox up first")]
    Exists(PathBuf),
}

/// One of the sandbox's two virtio-fs shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Share {
    /// `share-ro/`: image layers and read-only volumes; the VMM serves it read-only.
    #[serde(rename = "ro")]
    ReadOnly,
    /// `share-rw/`: read-write volumes.
    #[serde(rename = "rw")]
    ReadWrite,
}

impl Share {
    pub const ALL: [Share; 2] = [Share::ReadOnly, Share::ReadWrite];

    /// Its directory's name under the state directory.
    pub fn dir_name(self) -> &'static str {
        match self {
            Share::ReadOnly => "share-ro",
            Share::ReadWrite => "share-rw",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Share::ReadOnly => 0,
            Share::ReadWrite => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MountKind {
    Layer,
    Volume,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub(crate) enum Action {
    /// `<state_dir>/share-{ro,rw}/`, and its bind mount on itself (read-only, private).
    ShareDir { share: Share },
    /// `<writable_dir>/sandboxes/<sandbox_id>.ext4`.
    Image,
    /// `<share>/<container>/`.
    ContainerDir { share: Share, container: String },
    /// `<share>/<container>/<kind>-<index>`: a mount point (a directory, or an empty file for a
    /// file volume) and the bind mount of `source` on it. `source` only informs a reader.
    Mount {
        share: Share,
        container: String,
        kind: MountKind,
        index: u32,
        source: PathBuf,
    },
}

impl Action {
    pub fn container(&self) -> Option<&str> {
        match self {
            Action::ContainerDir { container, .. } | Action::Mount { container, .. } => {
                Some(container)
            }
            Action::ShareDir { .. } | Action::Image => None,
        }
    }

    /// Where a container entry lives below its share directory.
    pub fn in_share(&self) -> Option<(Share, PathBuf)> {
        match self {
            Action::ContainerDir { share, container } => Some((*share, PathBuf::from(container))),
            Action::Mount {
                share,
                container,
                kind,
                index,
                ..
            } => Some((*share, mount_point_rel(container, *kind, *index))),
            Action::ShareDir { .. } | Action::Image => None,
        }
    }
}

/// `<container>/layer-<n>` or `<container>/volume-<n>`, relative to the share directory.
pub(crate) fn mount_point_rel(container: &str, kind: MountKind, index: u32) -> PathBuf {
    let kind = match kind {
        MountKind::Layer => "layer",
        MountKind::Volume => "volume",
    };
    Path::new(container).join(format!("{kind}-{index}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Progress {
    Started,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub seq: u64,
    pub progress: Progress,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Record {
    pub version: u32,
    pub sandbox_id: String,
    pub writable_dir: PathBuf,
    /// In the order the actions started.
    pub entries: Vec<Entry>,
}

impl Record {
    /// Every id a valid single path component, the writable directory a plain absolute path:
    /// then every path cleanup builds from the record stays inside the state directory or is
    /// exactly `<writable_dir>/sandboxes/<sandbox_id>.ext4`.
    fn validate(&self) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!(
                "version {} (this rund writes {VERSION})",
                self.version
            ));
        }
        check_id("sandbox", &self.sandbox_id).map_err(|e| e.to_string())?;
        if !is_plain_absolute(&self.writable_dir) {
            return Err(format!(
                "writable_dir {:?} is not a plain absolute path",
                self.writable_dir
            ));
        }
        for entry in &self.entries {
            if let Some(container) = entry.action.container() {
                check_id("container", container).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// The record of a live sandbox: kept in memory, written through on every change.
#[derive(Debug)]
pub(crate) struct RecordFile {
    state_dir: PathBuf,
    pub record: Record,
    next_seq: u64,
}

impl RecordFile {
    /// Starts an empty record; one must not exist (the caller holds the state directory's lock).
    pub fn create(
        state_dir: &Path,
        sandbox_id: &str,
        writable_dir: &Path,
    ) -> Result<RecordFile, RecordError> {
        let path = state_dir.join(RECORD_FILE);
        if path.symlink_metadata().is_ok() {
            return Err(RecordError::Exists(path));
        }
        let file = RecordFile {
            state_dir: state_dir.to_owned(),
            record: Record {
                version: VERSION,
                sandbox_id: sandbox_id.to_string(),
                writable_dir: writable_dir.to_owned(),
                entries: Vec::new(),
            },
            next_seq: 0,
        };
        file.save()?;
        Ok(file)
    }

    /// Reads and validates the record; `None` when there is none.
    pub fn load(state_dir: &Path) -> Result<Option<Record>, RecordError> {
        let path = state_dir.join(RECORD_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        let record: Record =
            serde_json::from_slice(&bytes).map_err(|source| RecordError::Parse {
                path: path.clone(),
                source,
            })?;
        record
            .validate()
            .map_err(|why| RecordError::Invalid { path, why })?;
        Ok(Some(record))
    }

    /// Removes the record of a sandbox that is all undone.
    pub fn remove(state_dir: &Path) -> Result<(), RecordError> {
        let path = state_dir.join(RECORD_FILE);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(RecordError::Io {
                op: "remove",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Records `action` as started, before it is done; returns its sequence number.
    pub fn begin(&mut self, action: Action) -> Result<u64, RecordError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.record.entries.push(Entry {
            seq,
            progress: Progress::Started,
            action,
        });
        self.save()?;
        Ok(seq)
    }

    pub fn done(&mut self, seq: u64) -> Result<(), RecordError> {
        for entry in self.record.entries.iter_mut().filter(|e| e.seq == seq) {
            entry.progress = Progress::Done;
        }
        self.save()
    }

    /// Drops entries that have been undone.
    pub fn forget(&mut self, seqs: &[u64]) -> Result<(), RecordError> {
        self.record.entries.retain(|e| !seqs.contains(&e.seq));
        self.save()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.record.entries
    }

    fn save(&self) -> Result<(), RecordError> {
        let tmp = self.state_dir.join(RECORD_TMP);
        let path = self.state_dir.join(RECORD_FILE);
        let io_err = |op, path: &Path| {
            let path = path.to_owned();
            move |source| RecordError::Io { op, path, source }
        };
        let bytes =
            serde_json::to_vec_pretty(&self.record).map_err(|source| RecordError::Parse {
                path: path.clone(),
                source,
            })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all(&bytes).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        File::open(&self.state_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync the directory of", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_with(container: &str, writable_dir: &str) -> Record {
        Record {
            version: VERSION,
            sandbox_id: "sb".into(),
            writable_dir: writable_dir.into(),
            entries: vec![Entry {
                seq: 0,
                progress: Progress::Started,
                action: Action::Mount {
                    share: Share::ReadOnly,
                    container: container.into(),
                    kind: MountKind::Layer,
                    index: 2,
                    source: "/var/lib/containerd/x".into(),
                },
            }],
        }
    }

    #[test]
    fn round_trips_and_names_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = RecordFile::create(dir.path(), "sb", Path::new("/var/lib/rund/w")).unwrap();
        let a = file
            .begin(Action::ShareDir {
                share: Share::ReadOnly,
            })
            .unwrap();
        file.done(a).unwrap();
        let b = file
            .begin(Action::Mount {
                share: Share::ReadWrite,
                container: "c1".into(),
                kind: MountKind::Volume,
                index: 3,
                source: "/data".into(),
            })
            .unwrap();
        let loaded = RecordFile::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, file.record);
        assert_eq!(loaded.entries[0].progress, Progress::Done);
        assert_eq!(loaded.entries[1].progress, Progress::Started);
        assert_eq!(
            loaded.entries[1].action.in_share(),
            Some((Share::ReadWrite, PathBuf::from("c1/volume-3")))
        );
        let text = fs::read_to_string(dir.path().join(RECORD_FILE)).unwrap();
        assert!(text.contains("\"action\": \"mount\""), "{text}");
        file.forget(&[b]).unwrap();
        assert_eq!(
            RecordFile::load(dir.path()).unwrap().unwrap().entries.len(),
            1
        );
        assert!(matches!(
            RecordFile::create(dir.path(), "sb", Path::new("/w")),
            Err(RecordError::Exists(_))
        ));
        RecordFile::remove(dir.path()).unwrap();
        RecordFile::remove(dir.path()).unwrap();
        assert!(RecordFile::load(dir.path()).unwrap().is_none());
    }

    #[test]
    fn validation_refuses_paths_that_could_escape() {
        assert!(record_with("c1", "/var/lib/rund/w").validate().is_ok());
        for (container, dir, why) in [
            ("../../etc", "/var/lib/rund/w", "container id"),
            ("c/d", "/var/lib/rund/w", "container id"),
            ("c1", "/var/lib/rund/../../etc", "writable_dir"),
            ("c1", "relative", "writable_dir"),
        ] {
            let e = record_with(container, dir).validate().unwrap_err();
            assert!(e.contains(why), "{container} {dir}: {e}");
        }
        let mut r = record_with("c1", "/w");
        r.sandbox_id = "..".into();
        assert!(r.validate().unwrap_err().contains("sandbox id"));
        r.sandbox_id = "sb".into();
        r.version = 9;
        assert!(r.validate().unwrap_err().contains("version 9"));
    }

    #[test]
    fn unreadable_records_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(RECORD_FILE), b"{\"version\": 1,").unwrap();
        let e = RecordFile::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains(RECORD_FILE), "{e}");
        let mut r = record_with("..", "/w");
        r.entries[0].seq = 1;
        fs::write(
            dir.path().join(RECORD_FILE),
            serde_json::to_vec(&r).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            RecordFile::load(dir.path()),
            Err(RecordError::Invalid { .. })
        ));
    }
}
