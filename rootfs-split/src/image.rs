//! The writable layer's images: the pre-formatted base `<dir>/base-<size>M.ext4`, made by mke2fs
//! once for every shim on the host, and each sandbox's `<dir>/sandboxes/<sandbox-id>.ext4`, a
//! reflink (or sparse) copy of it that the guest gets over virtio-blk and that dies with the
//! sandbox.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use rustix::fs::FlockOperation;

use crate::copy::{self, CopyMethod};
use crate::id::{check_id, InvalidId};

/// Below `dir`: the sandboxes' images.
pub const SANDBOXES_DIR: &str = "sandboxes";

/// ext4 with rund's options does not fit in less.
pub const MIN_SIZE_MIB: u64 = 16;

/// Where mke2fs is looked for before PATH (a shim's PATH, set by containerd, may lack sbin).
const MKE2FS_PATHS: &[&str] = &["/sbin/mke2fs", "/usr/sbin/mke2fs"];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("writable-layer directory {0:?} must be an absolute path without '.' or '..'")]
    BadDir(PathBuf),
    #[error(
        "a writable layer of {size_mib} MiB is too small: ext4 needs at least {MIN_SIZE_MIB} MiB"
    )]
    TooSmall { size_mib: u64 },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("mke2fs not found in /sbin, /usr/sbin or PATH: install e2fsprogs")]
    NoMke2fs,
    #[error("{mke2fs} failed making {path} ({status}): {stderr}")]
    Mke2fs {
        mke2fs: PathBuf,
        path: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    #[error("image {0} already exists: clean its sandbox up first")]
    Exists(PathBuf),
    #[error(transparent)]
    Id(#[from] InvalidId),
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Absolute, and no `.` or `..` anywhere: such a path names one place however it is joined.
pub(crate) fn is_plain_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// `<dir>/sandboxes/<sandbox-id>.ext4`.
pub(crate) fn sandbox_image_path(dir: &Path, sandbox_id: &str) -> PathBuf {
    dir.join(SANDBOXES_DIR).join(format!("{sandbox_id}.ext4"))
}

/// Whether [`WritableLayer::ensure_base_image`] made the base image or found it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseImage {
    Existing,
    Made,
}

/// The writable-layer directory and image size from rund's configuration; make one per process.
#[derive(Debug, Clone)]
pub struct WritableLayer {
    dir: PathBuf,
    size_mib: u64,
}

impl WritableLayer {
    /// Checks the settings and makes `<dir>/sandboxes/` (mode 0700). The base image is made on
    /// first use.
    pub fn new(dir: &Path, size_mib: u64) -> Result<WritableLayer, ImageError> {
        if !is_plain_absolute(dir) {
            return Err(ImageError::BadDir(dir.to_owned()));
        }
        if size_mib < MIN_SIZE_MIB {
            return Err(ImageError::TooSmall { size_mib });
        }
        let sandboxes = dir.join(SANDBOXES_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&sandboxes)
            .map_err(io_error("create directory", &sandboxes))?;
        Ok(WritableLayer {
            dir: dir.to_owned(),
            size_mib,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size_mib(&self) -> u64 {
        self.size_mib
    }

    /// `<dir>/base-<size>M.ext4`.
    pub fn base_image_path(&self) -> PathBuf {
        self.dir.join(self.base_name())
    }

    fn base_name(&self) -> String {
        format!("base-{}M.ext4", self.size_mib)
    }

    pub fn sandbox_image_path(&self, sandbox_id: &str) -> PathBuf {
        sandbox_image_path(&self.dir, sandbox_id)
    }

    /// Makes the base image unless it exists. Shims starting at once make it once: the maker
    /// holds an flock on `.base-<size>M.ext4.lock`, builds under a temporary name and renames,
    /// so the base name only ever shows a complete image.
    pub fn ensure_base_image(&self) -> Result<BaseImage, ImageError> {
        let base = self.base_image_path();
        if base.exists() {
            return Ok(BaseImage::Existing);
        }
        let lock_path = self.dir.join(format!(".{}.lock", self.base_name()));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        rustix::fs::flock(&lock, FlockOperation::LockExclusive)
            .map_err(|e| io_error("lock", &lock_path)(e.into()))?;
        if base.exists() {
            return Ok(BaseImage::Existing);
        }
        self.remove_stale_temporaries();
        self.make_base_image(&base)?;
        log::info!("made the writable layer's base image {}", base.display());
        Ok(BaseImage::Made)
    }

    fn temp_prefix(&self) -> String {
        format!(".{}.tmp", self.base_name())
    }

    /// Temporary images of a maker that died: nobody else is making one while we hold the lock.
    fn remove_stale_temporaries(&self) {
        let prefix = self.temp_prefix();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let path = entry.path();
                if let Err(e) = fs::remove_file(&path) {
                    log::warn!("cannot remove the stale {}: {e}", path.display());
                }
            }
        }
    }

    fn make_base_image(&self, base: &Path) -> Result<(), ImageError> {
        let tmp = tempfile::Builder::new()
            .prefix(&self.temp_prefix())
            .tempfile_in(&self.dir)
            .map_err(io_error("create a temporary image in", &self.dir))?;
        tmp.as_file()
            .set_len(self.size_mib << 20)
            .map_err(io_error("size", tmp.path()))?;
        run_mke2fs(tmp.path())?;
        // The image must be on disk before its name is: a base that a host crash left empty
        // under the final name would be copied into every later sandbox.
        tmp.as_file()
            .sync_all()
            .map_err(io_error("sync", tmp.path()))?;
        tmp.as_file()
            .set_permissions(Permissions::from_mode(0o400))
            .map_err(io_error("make read-only", tmp.path()))?;
        tmp.persist(base)
            .map_err(|e| io_error("rename the new base image to", base)(e.error))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("sync directory", &self.dir))
    }

    /// Makes `<dir>/sandboxes/<sandbox-id>.ext4` from the base image (made now if missing).
    pub(crate) fn make_sandbox_image(&self, sandbox_id: &str) -> Result<CopyMethod, ImageError> {
        check_id("sandbox", sandbox_id)?;
        self.copy_base_image(&self.sandbox_image_path(sandbox_id))
    }

    /// Copies the base image (made now if missing) to the new file `dest`: a reflink where the
    /// filesystem has it, else a sparse copy. `dest` must not exist; a failed copy is removed.
    /// The copy is not synced: a writable layer is volatile and never outlives its sandbox, a
    /// host crash included.
    pub fn copy_base_image(&self, dest: &Path) -> Result<CopyMethod, ImageError> {
        self.ensure_base_image()?;
        let base = self.base_image_path();
        let src = File::open(&base).map_err(io_error("open", &base))?;
        let dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dest)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => ImageError::Exists(dest.to_owned()),
                _ => io_error("create", dest)(e),
            })?;
        copy::clone_or_copy(&src, &dst, dest).map_err(|e| {
            if let Err(rm) = fs::remove_file(dest) {
                log::warn!("cannot remove the failed copy {}: {rm}", dest.display());
            }
            io_error("copy the base image to", dest)(e)
        })
    }
}

/// Whether `dir` can give sandboxes reflink copies (for `rund check`).
pub fn reflink_supported(dir: &Path) -> Result<bool, ImageError> {
    copy::probe_reflink(dir).map_err(io_error("probe reflink (FICLONE) in", dir))
}

fn find_mke2fs() -> Option<PathBuf> {
    let fixed = MKE2FS_PATHS.iter().map(PathBuf::from);
    let in_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mke2fs"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    fixed.chain(in_path).find(|p| p.is_file())
}

/// ext4 for a volatile layer: no journal (the image never outlives the sandbox, so crash
/// consistency buys nothing, and a journal is 32 MiB of writes per 1 GiB image that would unshare
/// reflinked blocks), inode tables zeroed now (mke2fs punches them into holes, so the guest's
/// lazy-init thread has nothing to write), no blocks reserved for root (the container's root is
/// the only user), 4 KiB blocks whatever the size.
fn run_mke2fs(path: &Path) -> Result<(), ImageError> {
    let mke2fs = find_mke2fs().ok_or(ImageError::NoMke2fs)?;
    let out = Command::new(&mke2fs)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-O",
            "^has_journal",
            "-m",
            "0",
        ])
        .args([
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-L",
            "rund-writable",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(io_error("run", &mke2fs))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ImageError::Mke2fs {
        mke2fs,
        path: path.to_owned(),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn settings_are_checked() {
        assert!(matches!(
            WritableLayer::new(Path::new("rel/dir"), 64),
            Err(ImageError::BadDir(_))
        ));
        assert!(matches!(
            WritableLayer::new(Path::new("/a/../b"), 64),
            Err(ImageError::BadDir(_))
        ));
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            WritableLayer::new(tmp.path(), 8),
            Err(ImageError::TooSmall { size_mib: 8 })
        ));
    }

    #[test]
    fn base_image_is_made_once_and_read_only() {
        let tmp = tempfile::tempdir().unwrap();
        let layer = WritableLayer::new(tmp.path(), 32).unwrap();
        assert_eq!(layer.ensure_base_image().unwrap(), BaseImage::Made);
        assert_eq!(layer.ensure_base_image().unwrap(), BaseImage::Existing);
        let meta = fs::metadata(layer.base_image_path()).unwrap();
        assert_eq!(meta.len(), 32 << 20);
        assert_eq!(meta.mode() & 0o777, 0o400);
        // Sparse: a few hundred KiB of metadata in 32 MiB.
        assert!(meta.blocks() * 512 < 4 << 20, "{} blocks", meta.blocks());
        // ext4's magic at 1024 + 0x38.
        let mut magic = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(
            &File::open(layer.base_image_path()).unwrap(),
            &mut magic,
            1024 + 0x38,
        )
        .unwrap();
        assert_eq!(magic, [0x53, 0xef]);
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
    }

    #[test]
    fn stale_temporaries_are_removed_and_sandbox_images_are_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let layer = WritableLayer::new(tmp.path(), 16).unwrap();
        let stale = tmp.path().join(".base-16M.ext4.tmpXYZ");
        fs::write(&stale, b"half made").unwrap();
        layer.make_sandbox_image("sb1").unwrap();
        assert!(!stale.exists());
        assert!(matches!(
            layer.make_sandbox_image("sb1"),
            Err(ImageError::Exists(_))
        ));
        assert!(matches!(
            layer.make_sandbox_image("../x"),
            Err(ImageError::Id(_))
        ));
    }
}
