//! `/proc/self/mountinfo`: which mounts exist below a directory, and their propagation. Cleanup
//! uses it as a last sweep so that no mount under a sandbox's shares outlives the sandbox, whatever
//! its record says; tests use it to check that nothing is left.

use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo (proc(5)), the fields rund looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u64,
    pub parent_id: u64,
    /// The directory of the source filesystem this mount shows.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`, `nosuid`, ...).
    pub options: String,
    /// Propagation: `shared:N`, `master:N`, `propagate_from:N`, `unbindable`; none for private.
    pub optional_fields: Vec<String>,
    pub fs_type: String,
}

impl MountInfo {
    pub fn is_read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    /// No `shared:` or `master:` field: mounts neither propagate out of nor into this one.
    pub fn is_private(&self) -> bool {
        !self
            .optional_fields
            .iter()
            .any(|f| f.starts_with("shared:") || f.starts_with("master:"))
    }
}

/// Parses one mountinfo line; `None` when it does not have the documented shape.
pub fn parse_line(line: &str) -> Option<MountInfo> {
    let mut fields = line.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let parent_id = fields.next()?.parse().ok()?;
    let _major_minor = fields.next()?;
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let options = fields.next()?.to_string();
    let mut optional_fields = Vec::new();
    loop {
        match fields.next()? {
            "-" => break,
            field => optional_fields.push(field.to_string()),
        }
    }
    let fs_type = fields.next()?.to_string();
    Some(MountInfo {
        mount_id,
        parent_id,
        root,
        mount_point,
        options,
        optional_fields,
        fs_type,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Every mount of this process's namespace.
pub fn read_mountinfo() -> io::Result<Vec<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// The mounts at `dir` or below it, in mountinfo order (a mount on top of another comes later).
pub fn mounts_under(dir: &Path) -> io::Result<Vec<MountInfo>> {
    Ok(read_mountinfo()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_shared_mount_with_escapes() {
        let line = "36 35 98:0 /mnt1 /mnt/my\\040dir rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue";
        let m = parse_line(line).unwrap();
        assert_eq!(m.mount_id, 36);
        assert_eq!(m.parent_id, 35);
        assert_eq!(m.root, PathBuf::from("/mnt1"));
        assert_eq!(m.mount_point, PathBuf::from("/mnt/my dir"));
        assert_eq!(m.optional_fields, vec!["master:1", "shared:7"]);
        assert_eq!(m.fs_type, "ext3");
        assert!(!m.is_read_only());
        assert!(!m.is_private());
    }

    #[test]
    fn parses_a_private_read_only_mount() {
        let m = parse_line("50 27 0:25 /x /run/a ro,nosuid,nodev - tmpfs tmpfs ro").unwrap();
        assert!(m.is_read_only());
        assert!(m.is_private());
        assert!(m.optional_fields.is_empty());
    }

    #[test]
    fn refuses_malformed_lines() {
        assert!(parse_line("").is_none());
        assert!(parse_line("x 1 0:1 / / rw - ext4 a rw").is_none());
        assert!(parse_line("1 1 0:1 / / rw shared:1").is_none());
    }

    #[test]
    fn mounts_under_compares_whole_components() {
        let all = read_mountinfo().unwrap();
        assert!(all.iter().any(|m| m.mount_point == Path::new("/")));
        assert!(all.iter().any(|m| m.mount_point == Path::new("/proc")));
        let under = mounts_under(Path::new("/pro")).unwrap();
        assert!(under.is_empty(), "{under:?}");
    }
}
