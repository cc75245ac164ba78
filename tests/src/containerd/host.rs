//! What the harness reads from the host to find what containerd and its shims hold: mount points
//! (`/proc/self/mountinfo`), processes (`/proc/<pid>/cmdline` and `/proc/<pid>/root`), and a
//! process's proportional memory (`/proc/<pid>/smaps_rollup`, `/proc/<pid>/smaps`).

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// This process's mount points (rootfs-split's mountinfo parser).
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    Ok(rootfs_split::mountinfo::read_mountinfo()?
        .into_iter()
        .map(|m| m.mount_point)
        .collect())
}

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
pub fn mount_points_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    Ok(found)
}

/// Whether something is mounted on `path`.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(mount_points()?.iter().any(|m| m == path))
}

/// Whether `path` lives on an overlayfs (the testbed's root): containerd's overlayfs snapshotter
/// cannot put its upper directories there.
pub fn is_on_overlayfs(path: &Path) -> io::Result<bool> {
    let fs = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(fs.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
}

/// Detaches the mount on `path` (lazily: busy mounts go when their last user does).
pub fn unmount(path: &Path) -> io::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// A process as the harness sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    /// Its arguments (empty for kernel threads and zombies).
    pub cmdline: Vec<String>,
    /// Where its root directory is, as this process sees it (a container's rootfs for a
    /// process inside a container); `None` where unreadable.
    pub root: Option<PathBuf>,
}

impl Process {
    /// Whether its arguments hold `flag` followed by `value` (`-address /x/containerd.sock`).
    pub fn has_arg_pair(&self, flag: &str, value: &str) -> bool {
        self.cmdline
            .windows(2)
            .any(|w| w[0] == flag && w[1] == value)
    }

    /// The file name of its program (`containerd-shim-runc-v2`).
    pub fn program(&self) -> Option<&str> {
        self.cmdline
            .first()
            .map(|p| p.rsplit('/').next().unwrap_or(p))
    }
}

/// Every process but this one (those that end while being read are left out).
pub fn processes() -> io::Result<Vec<Process>> {
    let me = std::process::id() as i32;
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let root = std::fs::read_link(entry.path().join("root")).ok();
        all.push(Process { pid, cmdline, root });
    }
    Ok(all)
}

/// Sends SIGKILL to `pid`; a process already gone is not an error.
pub fn kill_process(pid: i32) -> io::Result<()> {
    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A process's proportional set size, and the part of it in memfd mappings (a VMM's guest RAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessMemory {
    pub pss_kib: u64,
    pub memfd_pss_kib: u64,
}

/// The `Pss:` line of an smaps_rollup text, in KiB.
fn rollup_pss_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The summed `Pss:` of the smaps entries whose mapping name starts with `/memfd:`, in KiB.
fn memfd_pss_kib(smaps: &str) -> u64 {
    let mut in_memfd = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        // A mapping's header starts with its address range "start-end".
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // Fields: range, perms, offset, dev, inode, then the name (which may hold spaces).
            let name = line
                .split_whitespace()
                .skip(5)
                .collect::<Vec<_>>()
                .join(" ");
            in_memfd = name.starts_with("/memfd:");
        } else if in_memfd && first == "Pss:" {
            total += words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Reads `pid`'s memory figures.
pub fn process_memory(pid: i32) -> io::Result<ProcessMemory> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let pss_kib = rollup_pss_kib(&rollup)
        .ok_or_else(|| io::Error::other(format!("no Pss line in /proc/{pid}/smaps_rollup")))?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(ProcessMemory {
        pss_kib,
        memfd_pss_kib: memfd_pss_kib(&smaps),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_listed_and_matched_by_their_arguments() {
        let list = processes().unwrap();
        assert!(!list.is_empty());
        assert!(list.iter().all(|p| p.pid != std::process::id() as i32));
        let p = Process {
            pid: 1,
            cmdline: vec![
                "/usr/bin/containerd-shim-runc-v2".into(),
                "-address".into(),
                "/s".into(),
            ],
            root: None,
        };
        assert!(p.has_arg_pair("-address", "/s"));
        assert!(!p.has_arg_pair("-address", "/t"));
        assert_eq!(p.program(), Some("containerd-shim-runc-v2"));
    }

    #[test]
    fn memfd_mappings_are_summed() {
        let smaps = "7f00-7f10 rw-s 00000000 00:01 12 /memfd:guest-ram (deleted)\n\
                     Size: 64 kB\nPss:                  40 kB\n\
                     7f20-7f30 r-xp 00000000 08:01 99 /usr/bin/x\n\
                     Pss:                   8 kB\n\
                     7f40-7f50 rw-p 00000000 00:00 0\nPss: 4 kB\n\
                     7f60-7f70 rw-s 00000000 00:01 13 /memfd:other\nPss: 2 kB\n";
        assert_eq!(memfd_pss_kib(smaps), 42);
        assert_eq!(rollup_pss_kib("Rss: 10 kB\nPss:   7 kB\n"), Some(7));
    }

    #[test]
    fn own_memory_is_read() {
        let m = process_memory(std::process::id() as i32).unwrap();
        assert!(m.pss_kib > 0);
    }
}
