//! A snapshot on disk: a directory holding the guest's RAM ([`MEMORY_FILE`], sparse: pages that
//! hold nothing are holes) and everything else ([`STATE_FILE`]).
//!
//! The state file is a 24-byte header (magic, format version, CRC-32 of the body, body length)
//! and a JSON body: the VMM build that wrote it, the VM's shape (vCPUs, memory size), its device
//! layout (each virtio slot's device, by key) and the [`VmState`]. A restore refuses, naming the
//! reason, a file of another format or build, a truncated or corrupt one, and one whose parts
//! disagree; and, since the files hold a guest's memory, any that another user could have
//! written or read (a symlink, another owner, group or other permission bits).
//!
//! The build rule is strict on purpose: a state's meaning is the code's (device state layouts,
//! the MMIO slots the guest probed at boot), and a snapshot is cheap to remake.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::devices::legacy::SerialState;
use crate::state::VmState;

/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The state file's format; any other is refused.
pub const FORMAT_VERSION: u32 = 1;
/// The largest state file read: a few vCPUs' registers and device states take tens of KiB.
pub const MAX_STATE_BYTES: u64 = 16 << 20;
const MAGIC: [u8; 8] = *b"RUNDSNAP";
const HEADER_LEN: usize = 24;

/// The id of this VMM build: a hash of the crate's sources (see `build.rs`).
pub fn build_id() -> &'static str {
    env!("RUND_VMM_BUILD_ID")
}

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be created, opened, read or written.
    #[error("{path}: cannot {op}")]
    Io {
        /// What was tried.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the magic.
    #[error("{0}: not a rund snapshot state file")]
    NotASnapshot(PathBuf),
    /// Another format version.
    #[error("{path}: snapshot format {found}; this VMM reads format {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Shorter than its header says.
    #[error("{path}: truncated: {found} bytes where the header promises {expected}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        found: u64,
        /// Header and body length.
        expected: u64,
    },
    /// Longer than any state this VMM writes.
    #[error("{path}: {len} bytes of state, more than the {MAX_STATE_BYTES} a state may have")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The body's checksum does not match.
    #[error("{0}: checksum mismatch: the state is corrupt")]
    Checksum(PathBuf),
    /// The body is not a state this VMM understands.
    #[error("{0}: the state cannot be decoded")]
    Decode(PathBuf, #[source] serde_json::Error),
    /// The body could not be encoded.
    #[error("the state cannot be encoded")]
    Encode(#[source] serde_json::Error),
    /// Made by another build of the VMM.
    #[error("snapshot made by VMM build {found}; this is build {}", build_id())]
    Build {
        /// The snapshot's build id.
        found: String,
    },
    /// The state's parts disagree with each other or with the memory file.
    #[error("{path}: inconsistent snapshot: {what}")]
    Inconsistent {
        /// The file at fault.
        path: PathBuf,
        /// What disagrees.
        what: String,
    },
    /// A file another user could have written or read.
    #[error("{path}: refused: {what}")]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// Owner, mode or type.
        what: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// One virtio slot of the saved VM: which device sat there.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedDevice {
    /// The device's [`state_key`](crate::devices::virtio::VirtioDevice::state_key).
    pub key: String,
    /// Its virtio device ID.
    pub device_type: u32,
}

/// Everything of a snapshot but its memory.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The VMM build that wrote it.
    pub build_id: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes: the memory file's length.
    pub mem_size: u64,
    /// The virtio devices in slot order (slot i is at [`MmioSlot::nth`](crate::config::MmioSlot::nth)(i)).
    pub devices: Vec<SavedDevice>,
    /// The serial console's registers.
    pub serial: SerialState,
    /// vCPUs, irqchips, PIT, clock and the transports (in slot order).
    pub vm: VmState,
}

/// Why a file or directory is not this process's user's alone, if it is not: another owner, or
/// group or other permission bits (`at_most` names the widest mode allowed, for the message).
/// What holds guest memory or a template must pass it.
pub fn not_private(meta: &std::fs::Metadata, at_most: &str) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Some(format!("owned by uid {}, not {euid}", meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        return Some(format!(
            "mode {:o} lets others in ({at_most} at most)",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Opens `path` for reading only if it is a regular file (not a symlink) that this process's
/// user owns and nobody else may read or write.
fn open_private(path: &Path) -> Result<File, SnapshotError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                SnapshotError::Unsafe {
                    path: path.to_owned(),
                    what: "a symbolic link".into(),
                }
            } else {
                io_err("open", path)(e)
            }
        })?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    let unsafe_because = |what: String| SnapshotError::Unsafe {
        path: path.to_owned(),
        what,
    };
    if !meta.is_file() {
        return Err(unsafe_because("not a regular file".into()));
    }
    if let Some(why) = not_private(&meta, "0600") {
        return Err(unsafe_because(why));
    }
    Ok(file)
}

/// Creates `path` for writing, mode 0600; an existing file is an error (a snapshot directory is
/// written once).
pub(crate) fn create_private(path: &Path) -> Result<File, SnapshotError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("create", path))
}

impl Snapshot {
    /// Writes the state file into `dir` (which must not hold one yet).
    pub fn write(&self, dir: &Path) -> Result<u64, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let body = serde_json::to_vec(self).map_err(SnapshotError::Encode)?;
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        header[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        let mut file = create_private(&path)?;
        file.write_all(&header)
            .and_then(|()| file.write_all(&body))
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &path))?;
        Ok((HEADER_LEN + body.len()) as u64)
    }

    /// Reads and checks the state file in `dir`: the header, the checksum, the build, and that
    /// its parts agree.
    pub fn read(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let file = open_private(&path)?;
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        if len > MAX_STATE_BYTES {
            return Err(SnapshotError::TooLarge { path, len });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(MAX_STATE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io_err("read", &path))?;
        if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot(path));
        }
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let version = word(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                path,
                found: version,
            });
        }
        let crc = word(12);
        let body_len = u64::from(word(16)) | (u64::from(word(20)) << 32);
        let expected = (HEADER_LEN as u64).saturating_add(body_len);
        if bytes.len() as u64 != expected {
            return Err(SnapshotError::Truncated {
                path,
                found: bytes.len() as u64,
                expected,
            });
        }
        let body = &bytes[HEADER_LEN..];
        if crc32fast::hash(body) != crc {
            return Err(SnapshotError::Checksum(path));
        }
        let snapshot: Snapshot =
            serde_json::from_slice(body).map_err(|e| SnapshotError::Decode(path.clone(), e))?;
        if snapshot.build_id != build_id() {
            return Err(SnapshotError::Build {
                found: snapshot.build_id,
            });
        }
        snapshot.check(&path)?;
        Ok(snapshot)
    }

    fn check(&self, path: &Path) -> Result<(), SnapshotError> {
        let inconsistent = |what: String| SnapshotError::Inconsistent {
            path: path.to_owned(),
            what,
        };
        if self.vcpus as usize != self.vm.vcpus.len() || self.vcpus == 0 {
            return Err(inconsistent(format!(
                "{} vCPUs, {} vCPU states",
                self.vcpus,
                self.vm.vcpus.len()
            )));
        }
        if self.devices.len() != self.vm.transports.len() {
            return Err(inconsistent(format!(
                "{} devices, {} transport states",
                self.devices.len(),
                self.vm.transports.len()
            )));
        }
        for (d, t) in self.devices.iter().zip(&self.vm.transports) {
            if d.device_type != t.device_type {
                return Err(inconsistent(format!(
                    "device {} is type {}, its transport state type {}",
                    d.key, d.device_type, t.device_type
                )));
            }
        }
        if self.mem_size == 0 || self.mem_size % 4096 != 0 {
            return Err(inconsistent(format!(
                "{} bytes of memory is not a whole number of pages",
                self.mem_size
            )));
        }
        Ok(())
    }

    /// Opens the memory file in `dir`, checked as the state file is and for its length.
    pub fn open_memory(&self, dir: &Path) -> Result<File, SnapshotError> {
        let path = dir.join(MEMORY_FILE);
        let file = open_private(&path)?;
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        if len != self.mem_size {
            return Err(SnapshotError::Inconsistent {
                path,
                what: format!(
                    "{len} bytes of memory; the state says {} (truncated?)",
                    self.mem_size
                ),
            });
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> Snapshot {
        let state: VmState = serde_json::from_value(serde_json::json!({
            "vcpus": [],
            "irqchips": [],
            "pit": serde_json::to_value(kvm_bindings::kvm_pit_state2::default()).unwrap(),
            "clock": serde_json::to_value(kvm_bindings::kvm_clock_data::default()).unwrap(),
            "transports": [],
        }))
        .unwrap();
        Snapshot {
            build_id: build_id().into(),
            vcpus: 0,
            mem_size: 1 << 20,
            devices: vec![],
            serial: SerialState::default(),
            vm: state,
        }
    }

    /// A snapshot whose VmState holds no vCPU passes every check but the vCPU count, which
    /// lets these tests reach each check in turn.
    fn written(s: &Snapshot) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path()).unwrap();
        dir
    }

    fn state_bytes(dir: &Path) -> Vec<u8> {
        std::fs::read(dir.join(STATE_FILE)).unwrap()
    }

    fn rewrite(dir: &Path, bytes: &[u8]) {
        let path = dir.join(STATE_FILE);
        std::fs::remove_file(&path).unwrap();
        let mut f = create_private(&path).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn a_written_state_reads_back_to_its_checks() {
        let dir = written(&sample());
        let e = Snapshot::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("inconsistent snapshot: 0 vCPUs, 0 vCPU states"),
            "{e}"
        );
        let mode = std::fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn every_damage_is_named() {
        let dir = written(&sample());
        let good = state_bytes(dir.path());
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        cases.push((b"#!/bin/sh\n".to_vec(), "not a rund snapshot state file"));
        let mut v = good.clone();
        v[8] = 9;
        cases.push((v, "snapshot format 9; this VMM reads format 1"));
        cases.push((good[..good.len() - 3].to_vec(), "truncated"));
        let mut v = good.clone();
        let last = v.len() - 2;
        v[last] ^= 0x20;
        cases.push((v, "checksum mismatch"));
        for (bytes, want) in cases {
            rewrite(dir.path(), &bytes);
            let e = Snapshot::read(dir.path()).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want:?}");
        }
        let mut other = sample();
        other.build_id = "0123456789abcdef".into();
        let dir = written(&other);
        let e = Snapshot::read(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "snapshot made by VMM build 0123456789abcdef; this is build {}",
                build_id()
            )
        );
    }

    #[test]
    fn files_others_could_touch_are_refused() {
        let dir = written(&sample());
        let path = dir.path().join(STATE_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Snapshot::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("refused: mode 644 lets others in (0600 at most)"),
            "{e}"
        );
        let other = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&path, other.path().join(STATE_FILE)).unwrap();
        let e = Snapshot::read(other.path()).unwrap_err().to_string();
        assert!(e.ends_with("refused: a symbolic link"), "{e}");
        let missing = Snapshot::read(&other.path().join("nowhere")).unwrap_err();
        assert!(
            matches!(missing, SnapshotError::Io { op: "open", .. }),
            "{missing}"
        );
    }

    #[test]
    fn an_oversized_state_is_not_read() {
        let dir = written(&sample());
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(STATE_FILE))
            .unwrap();
        f.set_len(MAX_STATE_BYTES + 1).unwrap();
        let e = Snapshot::read(dir.path()).unwrap_err();
        assert!(matches!(e, SnapshotError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn a_memory_file_of_another_length_is_refused() {
        let s = sample();
        let dir = written(&s);
        let f = create_private(&dir.path().join(MEMORY_FILE)).unwrap();
        f.set_len(s.mem_size / 2).unwrap();
        let e = s.open_memory(dir.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("524288 bytes of memory; the state says 1048576 (truncated?)"),
            "{e}"
        );
        f.set_len(s.mem_size).unwrap();
        s.open_memory(dir.path()).unwrap();
    }
}
