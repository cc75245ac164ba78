//! The store's own tmpfs, whose files are held in 2 MiB pages where they hold data.
//!
//! A clone maps its template's memory file `MAP_PRIVATE`; KVM maps guest memory into the guest's
//! page tables no larger than the host maps it. On a plain tmpfs (`/run`) that is 4 KiB, so every
//! page a restored guest touches first costs a nested page fault, an exit of the VM. On a tmpfs
//! mounted `huge=within_size` the memory file's data sits in 2 MiB pages: a clone's read faults
//! map them whole and its guest takes one fault per 2 MiB it reads, while a write still copies
//! only the 4 KiB it changes (the host splits the mapping, not the page). The price is the holes
//! inside each 2 MiB that holds data: measured in the testbed, 51 MiB on the filesystem for a
//! template of 39 MiB of pages. The mount's `size` bounds what templates can take of the host's
//! memory; a template that does not fit fails to be made and sandboxes cold-boot.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::mount::MountFlags;

/// The file whose flock makes concurrent mounters one.
const MOUNT_LOCK: &str = ".mount.lock";

/// Errors setting up the store's filesystem.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFsError {
    /// A file or directory operation failed.
    #[error("{path}: cannot {op}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store's root is `/` (or empty): nothing to mount on.
    #[error("{0}: the template store's root needs a parent directory")]
    NoParent(PathBuf),
}

/// What [`ensure`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryFs {
    /// The root was a mount point already (ours from before, or the operator's): used as it is.
    Existing,
    /// A tmpfs with huge pages was mounted on it.
    MountedHuge,
    /// A tmpfs was mounted on it without huge pages (the host's kernel has no shmem THP).
    MountedPlain,
    /// The root held templates already (an earlier rund's, say): left as it is rather than
    /// hiding them under a mount, where they would hold memory until a reboot.
    NotEmpty,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MemoryFsError + 'a {
    move |source| MemoryFsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Makes `root` (0700) a tmpfs of at most `size_mib` MiB with huge pages, unless it is a mount
/// point already or holds templates. Shims opening the store at once mount it once: each takes an
/// flock on `root/.mount.lock` first and looks again. (One that opened the file before the mount
/// waits on the file the mount then hides, and finds the mount; one that opens it after gets the
/// new filesystem's file, and finds the mount too.) Needs `CAP_SYS_ADMIN`; the caller decides
/// what a failure means (the store works on a plain directory too, only slower to restore).
pub fn ensure(root: &Path, size_mib: u64) -> Result<MemoryFs, MemoryFsError> {
    if root.parent().is_none_or(|p| p.as_os_str().is_empty()) {
        return Err(MemoryFsError::NoParent(root.to_owned()));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(io_err("create", root))?;
    let lock_path = root.join(MOUNT_LOCK);
    let _lock =
        crate::store::lock_file(&lock_path, true).map_err(|(op, e)| io_err(op, &lock_path)(e))?;
    if is_mount_point(root)? {
        return Ok(MemoryFs::Existing);
    }
    // A template is a directory (so is one being made); the log and lock files may go under.
    let holds_templates = fs::read_dir(root)
        .map_err(io_err("list", root))?
        .filter_map(Result::ok)
        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    if holds_templates {
        return Ok(MemoryFs::NotEmpty);
    }
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let options = |huge: bool| {
        let huge = if huge { ",huge=within_size" } else { "" };
        CString::new(format!("mode=0700,size={size_mib}m{huge}"))
            .map_err(|e| io_err("mount", root)(std::io::Error::other(e)))
    };
    let mount = |data: &CString| {
        rustix::mount::mount("rund-templates", root, "tmpfs", flags, data.as_c_str())
    };
    match mount(&options(true)?) {
        Ok(()) => Ok(MemoryFs::MountedHuge),
        // A kernel without CONFIG_TRANSPARENT_HUGEPAGE refuses the option.
        Err(rustix::io::Errno::INVAL) => mount(&options(false)?)
            .map(|()| MemoryFs::MountedPlain)
            .map_err(|e| io_err("mount a tmpfs on", root)(e.into())),
        Err(e) => Err(io_err("mount a tmpfs on", root)(e.into())),
    }
}

/// Whether `path` is the root of a mount: it lies on another device than its parent, or is the
/// same inode as the parent (`/`).
fn is_mount_point(path: &Path) -> Result<bool, MemoryFsError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    let parent = path.join("..");
    let up = fs::metadata(&parent).map_err(io_err("stat", &parent))?;
    Ok(meta.dev() != up.dev() || meta.ino() == up.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_tests() -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var_os("RUND_REQUIRE_ROOT_TESTS").is_none(),
            "RUND_REQUIRE_ROOT_TESTS is set but this test does not run as root"
        );
        eprintln!("skipping: mounting a tmpfs needs root");
        false
    }

    /// The mountinfo lines of mounts on `root`.
    fn mounts_on(root: &Path) -> Vec<String> {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
        text.lines()
            .filter(|l| l.split(' ').nth(4) == root.to_str())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_root_that_holds_templates_is_left_as_it_is() {
        if !root_tests() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("templates");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("maker.log"), "").unwrap();
        fs::create_dir(root.join("0123456789abcdef")).unwrap();
        assert_eq!(ensure(&root, 64).unwrap(), MemoryFs::NotEmpty);
        assert!(mounts_on(&root).is_empty());
    }

    #[test]
    fn a_root_without_a_parent_is_refused() {
        let e = ensure(Path::new("/"), 16).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/: the template store's root needs a parent directory"
        );
    }

    /// Detaches the mount on `0` when dropped, passed or failed.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }

    #[test]
    fn the_store_gets_one_bounded_tmpfs_with_huge_pages() {
        if !root_tests() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("templates");
        let first = ensure(&root, 64).unwrap();
        let mounted = Unmount(root.clone());
        let line = mounts_on(&root).pop().expect("a mount on the root");
        assert!(
            matches!(first, MemoryFs::MountedHuge | MemoryFs::MountedPlain),
            "{first:?}"
        );
        assert!(line.contains(" - tmpfs rund-templates "), "{line}");
        assert!(
            line.contains("size=65536k") && line.contains("mode=700"),
            "{line}"
        );
        if first == MemoryFs::MountedHuge {
            assert!(line.contains("huge=within_size"), "{line}");
        }
        // Once is enough: the next opener finds it.
        assert_eq!(ensure(&root, 64).unwrap(), MemoryFs::Existing);
        let on_root = mounts_on(&root);
        assert_eq!(on_root.len(), 1, "{on_root:?}");
        // The bound holds: 80 MiB do not fit in 64.
        let e = fs::write(root.join("big"), vec![1u8; 80 << 20]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        drop(mounted);
        assert!(mounts_on(&root).is_empty());
    }
}
