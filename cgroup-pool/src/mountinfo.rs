//! Cgroup mounts from `/proc/self/mountinfo`, written by hand: cgroups-rs's parser keeps only
//! cgroup v1 mounts, hides read errors (an empty list), and its v2 support assumes the mount is at
//! `/sys/fs/cgroup`, while a hybrid host has it at `/sys/fs/cgroup/unified`.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountinfoError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The v1 controllers rund knows. A v1 mount carrying none of them (such as `name=systemd`) is
/// not a controller hierarchy and is left out.
pub const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// One cgroup or cgroup2 mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub mount_point: PathBuf,
    pub v2: bool,
    /// v1: the controllers bound to this hierarchy (from the superblock options); v2: empty.
    pub controllers: Vec<String>,
}

pub fn cgroup_mounts() -> Result<Vec<CgroupMount>, MountinfoError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| MountinfoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse(&text))
}

/// Parses mountinfo text (proc(5)): `id parent dev root mount-point opts [optional...] - fstype
/// source super-opts`. Lines that do not parse are skipped: they cannot be cgroup mounts rund uses.
pub fn parse(text: &str) -> Vec<CgroupMount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<CgroupMount> {
    let (before, after) = line.split_once(" - ")?;
    let mount_point = before.split(' ').nth(4)?;
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let _source = after.next()?;
    let super_opts = after.next().unwrap_or("");
    let v2 = match fstype {
        "cgroup2" => true,
        "cgroup" => false,
        _ => return None,
    };
    let controllers = if v2 {
        Vec::new()
    } else {
        super_opts
            .split(',')
            .filter(|o| V1_CONTROLLERS.contains(o))
            .map(str::to_string)
            .collect()
    };
    Some(CgroupMount {
        mount_point: PathBuf::from(unescape(mount_point)),
        v2,
        controllers,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 25 0:30 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
37 35 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct,clone_children
38 35 0:33 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
39 35 0:34 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
40 25 0:35 / /tmp/with\\040space rw - cgroup cgroup ro,pids
";

    #[test]
    fn finds_v1_controllers_and_the_v2_mount() {
        let mounts = parse(HYBRID);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[0].controllers, vec!["cpu"]);
        assert_eq!(mounts[1].controllers, vec!["cpu", "cpuacct"]);
        assert!(
            mounts[2].controllers.is_empty(),
            "name=systemd is no controller"
        );
        assert!(mounts[3].v2);
        assert_eq!(
            mounts[3].mount_point,
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(mounts[4].mount_point, PathBuf::from("/tmp/with space"));
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse("nonsense\n1 2 3\n").is_empty());
    }
}
