//! `/run/rund/<sandbox-id>/sandbox.json`: which shim process holds a sandbox. Written before the
//! sandbox takes anything on the host, so that a `delete` after a `kill -9` of the shim (or a
//! reconcile of the cgroup pool) can tell a dead sandbox from a live one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use rootfs_split::{check_id, InvalidId};

use crate::admin::atomic_file::{install_bytes, AtomicFileError};

pub const RECORD_FILE: &str = "sandbox.json";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a sandbox record: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Write(#[from] AtomicFileError),
    #[error("reading this process's start time: {0}")]
    StartTime(String),
    #[error(transparent)]
    Id(#[from] InvalidId),
    #[error("{path} is not the directory rund made for sandbox {id}: {why}; left in place")]
    NotASandboxDir {
        path: PathBuf,
        id: String,
        why: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub sandbox_id: String,
    /// The shim process holding the sandbox, and its start time in clock ticks since boot
    /// (field 22 of /proc/<pid>/stat): a pid alone could have been reused.
    pub shim_pid: u32,
    pub shim_start_ticks: u64,
    /// The pod's network namespace and the interface rund joined in it, once it is joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<super::pod_network::NetworkRecord>,
}

/// Field 22 of `/proc/<pid>/stat`, `None` when there is no such process.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl SandboxRecord {
    /// The record of a sandbox held by this process.
    pub fn for_this_process(sandbox_id: &str) -> Result<SandboxRecord, RecordError> {
        let pid = std::process::id();
        let ticks = start_ticks(pid).ok_or_else(|| RecordError::StartTime(format!("pid {pid}")))?;
        Ok(SandboxRecord {
            sandbox_id: sandbox_id.to_owned(),
            shim_pid: pid,
            shim_start_ticks: ticks,
            network: None,
        })
    }

    /// This record, naming the pod's network too.
    pub fn with_network(mut self, network: super::pod_network::NetworkRecord) -> SandboxRecord {
        self.network = Some(network);
        self
    }

    /// Writes the record into `dir` (made if missing), atomically.
    pub fn write(&self, dir: &Path) -> Result<(), RecordError> {
        std::fs::create_dir_all(dir).map_err(|source| RecordError::Io {
            op: "creating",
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(RECORD_FILE);
        let text = serde_json::to_vec(self).map_err(|source| RecordError::Format {
            path: path.clone(),
            source,
        })?;
        install_bytes(&path, &text, 0o600)?;
        Ok(())
    }

    /// The record in `dir`, `None` when there is none.
    pub fn read(dir: &Path) -> Result<Option<SandboxRecord>, RecordError> {
        let path = dir.join(RECORD_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Io {
                    op: "reading",
                    path,
                    source,
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| RecordError::Format { path, source })
    }

    /// Whether the shim that wrote the record still runs.
    pub fn shim_alive(&self) -> bool {
        start_ticks(self.shim_pid) == Some(self.shim_start_ticks)
    }
}

/// `run_dir/<id>`, sandbox `id`'s directory, once `id` is known to be one plain path component.
pub fn sandbox_dir(run_dir: &Path, id: &str) -> Result<PathBuf, InvalidId> {
    check_id("sandbox", id)?;
    Ok(run_dir.join(id))
}

/// Whether sandbox `id` under `run_dir` is held by a live shim.
pub fn sandbox_alive(run_dir: &Path, id: &str) -> bool {
    let Ok(dir) = sandbox_dir(run_dir, id) else {
        return false;
    };
    matches!(SandboxRecord::read(&dir), Ok(Some(r)) if r.shim_alive())
}

/// Removes `dir`, sandbox `id`'s directory, with everything in it, but only if rund made it for
/// that sandbox: its record names `id`. An empty directory goes too (a shim killed between
/// making it and writing the record); anything else is left and named in the error.
pub fn remove_sandbox_dir(dir: &Path, id: &str) -> Result<(), RecordError> {
    let not_ours = |why: String| RecordError::NotASandboxDir {
        path: dir.to_owned(),
        id: id.to_owned(),
        why,
    };
    let io = |op, source| RecordError::Io {
        op,
        path: dir.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("inspecting", e)),
        Ok(m) if !m.is_dir() => return Err(not_ours("not a directory".into())),
        Ok(_) => {}
    }
    match SandboxRecord::read(dir) {
        Ok(Some(r)) if r.sandbox_id == id => {
            std::fs::remove_dir_all(dir).map_err(|e| io("removing", e))
        }
        Ok(Some(r)) => Err(not_ours(format!(
            "its record is sandbox {:?}'s",
            r.sandbox_id
        ))),
        Ok(None) => std::fs::remove_dir(dir).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => {
                not_ours(format!("it holds no {RECORD_FILE} but is not empty"))
            }
            _ => io("removing", e),
        }),
        Err(e) => Err(not_ours(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_liveness() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SandboxRecord::read(dir.path()).unwrap(), None);
        let rec = SandboxRecord::for_this_process("sb1").unwrap();
        rec.write(&dir.path().join("sb1")).unwrap();
        let back = SandboxRecord::read(&dir.path().join("sb1"))
            .unwrap()
            .unwrap();
        assert_eq!(back, rec);
        assert!(back.shim_alive());
        assert!(sandbox_alive(dir.path(), "sb1"));
        assert!(!sandbox_alive(dir.path(), "sb2"));

        // Same pid, another start time: a reused pid is not the shim.
        let stale = SandboxRecord {
            shim_start_ticks: rec.shim_start_ticks + 1,
            ..rec
        };
        assert!(!stale.shim_alive());
    }

    #[test]
    fn a_torn_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RECORD_FILE), b"{\"sandbox_id\":").unwrap();
        let e = SandboxRecord::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains(RECORD_FILE), "{e}");
    }

    #[test]
    fn an_id_that_is_not_one_plain_name_has_no_directory() {
        let run = Path::new("/run/rund");
        assert_eq!(sandbox_dir(run, "pod-1").unwrap(), run.join("pod-1"));
        for id in ["", "/", "..", "../..", "a/b", "../etc", ".hidden", "a\0b"] {
            let e = sandbox_dir(run, id).unwrap_err().to_string();
            assert!(e.starts_with("sandbox id"), "{id:?}: {e}");
            assert!(!sandbox_alive(run, id));
        }
    }

    #[test]
    fn only_a_directory_rund_made_for_the_sandbox_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        // Its own record: removed with everything in it.
        let mine = tmp.path().join("sb1");
        SandboxRecord::for_this_process("sb1")
            .unwrap()
            .write(&mine)
            .unwrap();
        std::fs::write(mine.join("rootfs.json"), b"{}").unwrap();
        remove_sandbox_dir(&mine, "sb1").unwrap();
        assert!(!mine.exists());
        // Gone already: nothing to do.
        remove_sandbox_dir(&mine, "sb1").unwrap();

        // Another sandbox's record, no record but files, a file: each left as it was.
        let other = tmp.path().join("sb2");
        SandboxRecord::for_this_process("sb3")
            .unwrap()
            .write(&other)
            .unwrap();
        let e = remove_sandbox_dir(&other, "sb2").unwrap_err().to_string();
        assert!(
            e.contains("sandbox \"sb3\"'s") && e.contains("left in place"),
            "{e}"
        );
        assert!(other.join(RECORD_FILE).exists());

        let foreign = tmp.path().join("etc");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("passwd"), b"root:x:0:0").unwrap();
        let e = remove_sandbox_dir(&foreign, "etc").unwrap_err().to_string();
        assert!(e.contains("holds no sandbox.json but is not empty"), "{e}");
        assert!(foreign.join("passwd").exists());

        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = remove_sandbox_dir(&file, "f").unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");

        // Made but killed before its record: empty, removed.
        let empty = tmp.path().join("sb4");
        std::fs::create_dir(&empty).unwrap();
        remove_sandbox_dir(&empty, "sb4").unwrap();
        assert!(!empty.exists());
    }

    #[test]
    fn start_ticks_parse_names_with_parentheses() {
        // This test process exists; pid 0 never has a /proc entry.
        assert!(start_ticks(std::process::id()).is_some());
        assert!(start_ticks(0).is_none());
    }
}
