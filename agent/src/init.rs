//! PID 1 duties: the guest's pseudo-filesystems and cgroups, before the agent serves.
//!
//! The kernel hands PID 1 a bare root (the initramfs): this mounts proc, sys, dev (devtmpfs, with pts
//! and shm), run and tmp, and cgroup2 at /sys/fs/cgroup with every available controller enabled for the
//! containers' cgroups, or, if asked, cgroup v1 with one hierarchy per controller. Already mounted
//! filesystems (EBUSY) are fine: a restored sandbox runs this again.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// Errors of the PID 1 set-up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("mounting {fstype} on {target}")]
    Mount {
        /// The filesystem type.
        fstype: String,
        /// Where.
        target: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A directory could not be made or a file read or written.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

fn mount_fs(
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    std::fs::create_dir_all(target).map_err(|e| InitError::Io(format!("creating {target}"), e))?;
    match mount(Some(fstype), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount {
            fstype: fstype.to_owned(),
            target: target.to_owned(),
            source,
        }),
    }
}

/// The cgroup v1 controllers of /proc/cgroups that are enabled.
pub fn v1_controllers(proc_cgroups: &str) -> Vec<String> {
    proc_cgroups
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() >= 4 && fields[3] == "1").then(|| fields[0].to_owned())
        })
        .collect()
}

/// The `+ctrl` line enabling every controller in `cgroup.controllers` for the children.
pub fn subtree_control_line(controllers: &str) -> String {
    controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Marks a root this agent already moved onto a tmpfs.
const MOVED_ROOT_MARKER: &str = "/.rund-root";
/// Where the new root is assembled before it is moved over `/`.
const NEW_ROOT: &str = "/.rund-newroot";

/// Copies `from` (a directory, file or symlink of the initramfs) to `to`; device nodes and other
/// special files are skipped (devtmpfs provides the devices).
fn copy_tree(from: &Path, to: &Path) -> Result<(), InitError> {
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e| InitError::Io(what, e)
    };
    let meta = std::fs::symlink_metadata(from).map_err(io("reading", from))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir(to).map_err(io("creating", to))?;
        std::fs::set_permissions(to, meta.permissions()).map_err(io("chmod", to))?;
        for entry in std::fs::read_dir(from).map_err(io("listing", from))? {
            let entry = entry.map_err(io("listing", from))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(from).map_err(io("reading link", from))?;
        std::os::unix::fs::symlink(target, to).map_err(io("linking", to))?;
    } else if ft.is_file() {
        std::fs::copy(from, to).map_err(io("copying", from))?;
    }
    Ok(())
}

/// Leaves the kernel's rootfs (the initramfs) for a tmpfs root, as switch_root does.
///
/// OCI runtimes `pivot_root` into each container's root, and the kernel refuses pivot_root away
/// from rootfs (EINVAL), so containers could only be chroot'ed (no-pivot, escapable with enough
/// privilege). On a tmpfs root mounted over `/` they get a real pivot_root. The initramfs copy is
/// deleted afterwards, so its memory is not held twice.
pub fn leave_initramfs() -> Result<(), InitError> {
    if Path::new(MOVED_ROOT_MARKER).exists() {
        return Ok(());
    }
    std::fs::create_dir_all(NEW_ROOT)
        .map_err(|e| InitError::Io(format!("creating {NEW_ROOT}"), e))?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|source| InitError::Mount {
        fstype: "tmpfs".into(),
        target: NEW_ROOT.into(),
        source,
    })?;
    let top: Vec<_> = std::fs::read_dir("/")
        .map_err(|e| InitError::Io("listing /".into(), e))?
        .filter_map(Result::ok)
        .filter(|e| e.path() != Path::new(NEW_ROOT))
        .collect();
    for entry in &top {
        copy_tree(&entry.path(), &Path::new(NEW_ROOT).join(entry.file_name()))?;
    }
    std::fs::write(Path::new(NEW_ROOT).join(&MOVED_ROOT_MARKER[1..]), b"")
        .map_err(|e| InitError::Io(format!("writing {MOVED_ROOT_MARKER}"), e))?;
    // The old copy only costs memory now; what cannot be removed stays.
    for entry in &top {
        let p = entry.path();
        let _ = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
    let remount = |source| InitError::Mount {
        fstype: "tmpfs".into(),
        target: "/".into(),
        source,
    };
    nix::unistd::chdir(NEW_ROOT).map_err(remount)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(remount)?;
    nix::unistd::chroot(".").map_err(remount)?;
    nix::unistd::chdir("/").map_err(remount)?;
    Ok(())
}

/// Mounts the guest's filesystems. `cgroup_v1`: one v1 hierarchy per controller instead of cgroup2.
pub fn setup(cgroup_v1: bool) -> Result<(), InitError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", nosuid_nodev_noexec, None)?;
    mount_fs("sysfs", "/sys", nosuid_nodev_noexec, None)?;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    if cgroup_v1 {
        mount_fs(
            "tmpfs",
            "/sys/fs/cgroup",
            nosuid_nodev_noexec,
            Some("mode=0755"),
        )?;
        let proc_cgroups = std::fs::read_to_string("/proc/cgroups")
            .map_err(|e| InitError::Io("reading /proc/cgroups".into(), e))?;
        for controller in v1_controllers(&proc_cgroups) {
            let target = format!("/sys/fs/cgroup/{controller}");
            std::fs::create_dir_all(&target)
                .map_err(|e| InitError::Io(format!("creating {target}"), e))?;
            match mount(
                Some("cgroup"),
                target.as_str(),
                Some("cgroup"),
                nosuid_nodev_noexec,
                Some(controller.as_str()),
            ) {
                Ok(()) | Err(Errno::EBUSY) => {}
                Err(source) => {
                    return Err(InitError::Mount {
                        fstype: format!("cgroup ({controller})"),
                        target,
                        source,
                    })
                }
            }
        }
    } else {
        mount_fs(
            "cgroup2",
            "/sys/fs/cgroup",
            nosuid_nodev_noexec,
            Some("nsdelegate"),
        )?;
        let root = Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(|e| InitError::Io("reading cgroup.controllers".into(), e))?;
        let line = subtree_control_line(&controllers);
        if !line.is_empty() {
            std::fs::write(root.join("cgroup.subtree_control"), line)
                .map_err(|e| InitError::Io("enabling cgroup controllers".into(), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_copied_with_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        std::fs::create_dir_all(from.join("lib/sub")).unwrap();
        std::fs::write(from.join("init"), b"agent").unwrap();
        std::fs::set_permissions(from.join("init"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::write(from.join("lib/sub/libc.so.6"), b"libc").unwrap();
        std::os::unix::fs::symlink("sub/libc.so.6", from.join("lib/libc.so")).unwrap();
        let to = dir.path().join("to");
        copy_tree(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join("init")).unwrap(), b"agent");
        let mode = std::fs::metadata(to.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
        assert_eq!(std::fs::read(to.join("lib/libc.so")).unwrap(), b"libc");
        assert!(std::fs::symlink_metadata(to.join("lib/libc.so"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(copy_tree(&dir.path().join("missing"), &dir.path().join("x")).is_err());
    }

    #[test]
    fn controllers_from_proc_cgroups() {
        let text = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t1\t4\t1\nmemory\t2\t9\t1\nrdma\t0\t1\t0\n";
        assert_eq!(v1_controllers(text), vec!["cpu", "memory"]);
    }

    #[test]
    fn subtree_line() {
        assert_eq!(
            subtree_control_line("cpu memory pids\n"),
            "+cpu +memory +pids"
        );
        assert_eq!(subtree_control_line(""), "");
    }
}
