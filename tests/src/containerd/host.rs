//! What the harness reads from the host to find what containerd and its shims hold: mount points
//! (`/proc/self/mountinfo`), processes (`/proc/<pid>/cmdline` and `/proc/<pid>/root`), and a
//! process's proportional memory (`/proc/<pid>/smaps_rollup`, `/proc/<pid>/smaps`).

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procfs::process::MemoryMaps;

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

/// A process's resident, proportional and unique set sizes, and the part of each that is a VMM's
/// guest RAM: rund's VMM maps guest RAM `MADV_DONTDUMP` (`dd` in smaps' VmFlags), anonymous for a
/// cold boot and a snapshot's memory file for a restore; no other such mapping of a shim has the
/// flag. Of guest RAM mapped from a template's file: what is resident, and what the guest wrote
/// (its private copies, smaps' `Anonymous`), and how much of it is mapped 2 MiB at a time (then
/// the guest, too, can map it in 2 MiB pages): `ShmemPmdMapped` for a template on tmpfs, as the
/// store is, `FilePmdMapped` for one on another filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub uss_kib: u64,
    pub guest_ram_rss_kib: u64,
    pub guest_ram_pss_kib: u64,
    pub guest_ram_uss_kib: u64,
    pub template_rss_kib: u64,
    pub template_copied_kib: u64,
    pub template_pmd_mapped_kib: u64,
}

impl ProcessMemory {
    /// The figures of a process's smaps.
    pub fn from_maps(maps: &MemoryMaps) -> ProcessMemory {
        let mut m = ProcessMemory::default();
        for map in maps {
            let kib = |key: &str| map.extension.map.get(key).copied().unwrap_or(0) / 1024;
            let (rss, pss) = (kib("Rss"), kib("Pss"));
            let uss = kib("Private_Clean") + kib("Private_Dirty");
            m.rss_kib += rss;
            m.pss_kib += pss;
            m.uss_kib += uss;
            if vmm::memory::is_guest_ram(map) {
                m.guest_ram_rss_kib += rss;
                m.guest_ram_pss_kib += pss;
                m.guest_ram_uss_kib += uss;
                if matches!(map.pathname, procfs::process::MMapPath::Path(_)) {
                    m.template_rss_kib += rss;
                    m.template_copied_kib += kib("Anonymous");
                    m.template_pmd_mapped_kib += kib("ShmemPmdMapped") + kib("FilePmdMapped");
                }
            }
        }
        m
    }

    /// Everything but guest RAM.
    pub fn own_pss_kib(&self) -> u64 {
        self.pss_kib.saturating_sub(self.guest_ram_pss_kib)
    }
}

/// Reads `pid`'s memory figures.
pub fn process_memory(pid: i32) -> io::Result<ProcessMemory> {
    let maps = procfs::process::Process::new(pid)
        .and_then(|p| p.smaps())
        .map_err(|e| io::Error::other(format!("/proc/{pid}/smaps: {e}")))?;
    Ok(ProcessMemory::from_maps(&maps))
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
    fn guest_ram_is_the_unnamed_dontdump_mappings() {
        use procfs::FromBufRead;
        let smaps = "7f00-7f10 rw-p 00000000 00:00 0 \n\
                     Size: 64 kB\nRss: 48 kB\nPss:                  40 kB\n\
                     VmFlags: rd wr mr mw me ac hg dd\n\
                     7f20-7f30 r-xp 00000000 08:01 99 /usr/bin/x\n\
                     Rss: 8 kB\nPss:                   8 kB\nVmFlags: rd ex mr mw me\n\
                     7f40-7f50 rw-p 00000000 00:00 0 \nRss: 4 kB\nPss: 4 kB\nVmFlags: rd wr mr\n\
                     7f60-7f70 r--p 00000000 00:00 0 [vvar]\nRss: 2 kB\nPss: 2 kB\n\
                     VmFlags: rd mr pf io de dd\n\
                     7f80-7f90 rw-p 00000000 00:2a 7 /run/rund/templates/k/memory\n\
                     Rss: 16 kB\nPss: 4 kB\nShared_Clean: 12 kB\nPrivate_Dirty: 4 kB\n\
                     Anonymous: 4 kB\nShmemPmdMapped: 8 kB\nVmFlags: rd wr mr mw me ac dd\n";
        let maps = MemoryMaps::from_buf_read(smaps.as_bytes()).unwrap();
        let m = ProcessMemory::from_maps(&maps);
        assert_eq!(
            m,
            ProcessMemory {
                rss_kib: 78,
                pss_kib: 58,
                uss_kib: 4,
                guest_ram_rss_kib: 64,
                guest_ram_pss_kib: 44,
                guest_ram_uss_kib: 4,
                template_rss_kib: 16,
                template_copied_kib: 4,
                template_pmd_mapped_kib: 8,
            }
        );
        assert_eq!(m.own_pss_kib(), 14);
    }

    #[test]
    fn own_memory_is_read_and_guest_ram_found_in_it() {
        use vm_memory::{Bytes, GuestAddress};
        let before = process_memory(std::process::id() as i32).unwrap();
        assert!(before.pss_kib > 0);
        let ram = vmm::memory::map_ram(&[(GuestAddress(0), 8 << 20)]).unwrap();
        for page in 0..256u64 {
            ram.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = process_memory(std::process::id() as i32).unwrap();
        // 1 MiB touched: at least that resident, at most the 2 MiB huge page it may sit in.
        let grown = after.guest_ram_rss_kib - before.guest_ram_rss_kib;
        assert!((1024..=2048).contains(&grown), "{before:?} -> {after:?}");
        assert!(
            after.rss_kib - before.rss_kib >= grown,
            "{before:?} -> {after:?}"
        );
    }
}
