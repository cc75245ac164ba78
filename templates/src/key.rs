//! A template's inputs and its key. Any input that changes makes another key, so a template made
//! from an old kernel, initramfs or VMM build is never found for the new ones.
//!
//! Files are known by identity, not content: device, inode, size and modification time. The
//! install path replaces a file by renaming a new one over it (a new inode), and hashing a
//! kernel and an initramfs on every sandbox start would cost tens of milliseconds.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Which file, as it is now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileIdentity {
    /// Its path.
    pub path: PathBuf,
    /// The filesystem's device.
    pub dev: u64,
    /// The inode.
    pub ino: u64,
    /// Its length.
    pub size: u64,
    /// Its modification time, in nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileIdentity {
    /// The identity of `path` (following symlinks: it is what a VM would read).
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Everything a template depends on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateInputs {
    /// The guest kernel.
    pub kernel: FileIdentity,
    /// The initramfs (the agent).
    pub initrd: Option<FileIdentity>,
    /// The kernel command line as given (the VMM adds its devices).
    pub cmdline: String,
    /// The VMM build ([`vmm::snapshot::build_id`]).
    pub vmm_build: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// The devices, one description each, in slot order (`vsock`, `fs:rund ro cache=always`,
    /// `blk rw`): what the guest's drivers bound to at boot.
    pub devices: Vec<String>,
}

/// A template's name: a hash of its inputs, 16 hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TemplateKey(String);

impl TemplateKey {
    /// A key read back from a directory name, if it is one.
    pub fn parse(s: &str) -> Option<TemplateKey> {
        (s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| TemplateKey(s.to_owned()))
    }

    /// The key as text (a directory name).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TemplateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TemplateInputs {
    /// The key these inputs make.
    pub fn key(&self) -> TemplateKey {
        // Serialising a struct of plain fields cannot fail; an empty hash input would still give
        // a key, never a wrong match, since the inputs are compared again on use.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        TemplateKey(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The shape: what a sandbox asks for (vCPUs, memory, devices). Two templates of one shape
    /// with different keys are an old one and its replacement.
    pub fn same_shape(&self, other: &TemplateInputs) -> bool {
        self.vcpus == other.vcpus && self.mem_mib == other.mem_mib && self.devices == other.devices
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn inputs(kernel: &Path) -> TemplateInputs {
        TemplateInputs {
            kernel: FileIdentity::of(kernel).unwrap(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vmm_build: vmm::snapshot::build_id().into(),
            vcpus: 1,
            mem_mib: 128,
            devices: vec!["vsock".into()],
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let mut k = tempfile::NamedTempFile::new().unwrap();
        k.write_all(b"kernel").unwrap();
        let base = inputs(k.path());
        let key = base.key();
        assert_eq!(key, inputs(k.path()).key(), "the same inputs, the same key");
        assert!(TemplateKey::parse(key.as_str()).is_some());
        let mut changed = vec![];
        let mut i = base.clone();
        i.vcpus = 2;
        changed.push(i);
        let mut i = base.clone();
        i.mem_mib = 256;
        changed.push(i);
        let mut i = base.clone();
        i.cmdline.push_str(" quiet");
        changed.push(i);
        let mut i = base.clone();
        i.vmm_build = "0000000000000000".into();
        changed.push(i);
        let mut i = base.clone();
        i.devices.push("blk rw".into());
        changed.push(i);
        // A kernel replaced the way an install does it: a new file renamed over the old.
        let dir = k.path().parent().unwrap();
        let mut new = tempfile::NamedTempFile::new_in(dir).unwrap();
        new.write_all(b"kernel").unwrap();
        new.persist(k.path()).unwrap();
        changed.push(inputs(k.path()));
        for c in changed {
            assert_ne!(c.key(), key, "{c:?}");
        }
    }

    #[test]
    fn only_key_shaped_names_parse() {
        for bad in [
            "",
            "0123",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "../../etc/passwd",
            "0123456789abcdef0",
        ] {
            assert!(TemplateKey::parse(bad).is_none(), "{bad}");
        }
        assert!(TemplateKey::parse("0123456789abcdef").is_some());
    }
}
