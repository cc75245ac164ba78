//! Files put in place whole or not at all: written to a temporary file in the destination's
//! directory, given their mode, synced, then renamed over the destination. A reader (containerd
//! starting a shim, a shim reading the kernel) sees the old file or the new one, never a torn one,
//! and a running binary is replaced without `ETXTBSY`. A destination that already holds the same
//! bytes and mode is left alone, so installing twice changes nothing.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

#[derive(Debug, thiserror::Error)]
pub enum AtomicFileError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{0} has no parent directory")]
    NoParent(PathBuf),
}

/// What happened to a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It was missing or different, and now holds the new contents.
    Written,
    /// It already held exactly these contents with this mode.
    Unchanged,
}

fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> AtomicFileError + 'a {
    move |source| AtomicFileError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Copies the regular file `src` to `dest` with `mode` (permission bits), atomically.
pub fn install_copy(src: &Path, dest: &Path, mode: u32) -> Result<Outcome, AtomicFileError> {
    let mut source = File::open(src).map_err(io_error("opening", src))?;
    let meta = source.metadata().map_err(io_error("reading", src))?;
    if !meta.is_file() {
        return Err(AtomicFileError::NotAFile(src.to_owned()));
    }
    if dest_matches(dest, mode, meta.len(), || {
        File::open(src).map_err(io_error("opening", src))
    })? {
        return Ok(Outcome::Unchanged);
    }
    replace(dest, mode, |tmp| {
        io::copy(&mut source, tmp)
            .map(|_| ())
            .map_err(io_error("copying", src))
    })?;
    Ok(Outcome::Written)
}

/// Writes `contents` to `dest` with `mode`, atomically.
pub fn install_bytes(dest: &Path, contents: &[u8], mode: u32) -> Result<Outcome, AtomicFileError> {
    if dest_matches(dest, mode, contents.len() as u64, || Ok(contents))? {
        return Ok(Outcome::Unchanged);
    }
    replace(dest, mode, |tmp| {
        tmp.write_all(contents).map_err(io_error("writing", dest))
    })?;
    Ok(Outcome::Written)
}

/// Writes `contents` to `dest` with `mode` only if `dest` does not exist, atomically: a file
/// that appears meanwhile is kept. Returns whether it wrote.
pub fn create_new(dest: &Path, contents: &[u8], mode: u32) -> Result<bool, AtomicFileError> {
    let tmp = filled_temp(dest, mode, |tmp| {
        tmp.write_all(contents).map_err(io_error("writing", dest))
    })?;
    // link(2) refuses an existing destination.
    match tmp.persist_noclobber(dest) {
        Ok(_) => {}
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_error("creating", dest)(e.error)),
    }
    sync_parent(dest)?;
    Ok(true)
}

/// Whether `dest` is a regular file with permission bits `mode`, `len` bytes long, holding what
/// `expected` reads.
fn dest_matches<R: Read>(
    dest: &Path,
    mode: u32,
    len: u64,
    expected: impl FnOnce() -> Result<R, AtomicFileError>,
) -> Result<bool, AtomicFileError> {
    let meta = match fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error("reading", dest)(e)),
    };
    if !meta.is_file() || meta.len() != len || meta.permissions().mode() & 0o7777 != mode {
        return Ok(false);
    }
    let current = File::open(dest).map_err(io_error("opening", dest))?;
    same_bytes(current, expected()?).map_err(io_error("comparing", dest))
}

/// Compares two readers chunk by chunk (kernels and debug binaries are tens of MiB).
fn same_bytes(a: impl Read, b: impl Read) -> io::Result<bool> {
    let (mut a, mut b) = (io::BufReader::new(a), io::BufReader::new(b));
    let (mut buf_a, mut buf_b) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut a, &mut buf_a)?;
        let m = read_full(&mut b, &mut buf_b)?;
        if n != m || buf_a[..n] != buf_b[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the reader ends.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A synced temporary file beside `dest` (its directory made if missing) with `mode`, filled by
/// `fill`. Dropped unpersisted, it is removed.
fn filled_temp(
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), AtomicFileError>,
) -> Result<NamedTempFile, AtomicFileError> {
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| AtomicFileError::NoParent(dest.to_owned()))?;
    fs::create_dir_all(dir).map_err(io_error("creating directory", dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".rund-install-")
        .tempfile_in(dir)
        .map_err(io_error("creating a temporary file in", dir))?;
    fill(tmp.as_file_mut())?;
    let file = tmp.as_file();
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error("setting the mode of", tmp.path()))?;
    file.sync_all().map_err(io_error("syncing", tmp.path()))?;
    Ok(tmp)
}

fn replace(
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), AtomicFileError>,
) -> Result<(), AtomicFileError> {
    let tmp = filled_temp(dest, mode, fill)?;
    tmp.persist(dest)
        .map_err(|e| io_error("renaming into", dest)(e.error))?;
    sync_parent(dest)
}

/// Makes a rename or link into `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), AtomicFileError> {
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("syncing directory", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".rund-install-"))
            .collect()
    }

    #[test]
    fn copy_writes_once_then_is_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, vec![7u8; 200_000]).unwrap();
        let dest = d.path().join("a/b/dest");
        assert_eq!(install_copy(&src, &dest, 0o755).unwrap(), Outcome::Written);
        assert_eq!(fs::read(&dest).unwrap(), fs::read(&src).unwrap());
        assert_eq!(mode_of(&dest), 0o755);
        assert_eq!(
            install_copy(&src, &dest, 0o755).unwrap(),
            Outcome::Unchanged
        );
        // Another mode or one changed byte is rewritten.
        assert_eq!(install_copy(&src, &dest, 0o644).unwrap(), Outcome::Written);
        assert_eq!(mode_of(&dest), 0o644);
        let mut changed = vec![7u8; 200_000];
        changed[150_000] = 8;
        fs::write(&src, &changed).unwrap();
        assert_eq!(install_copy(&src, &dest, 0o644).unwrap(), Outcome::Written);
        assert_eq!(fs::read(&dest).unwrap(), changed);
        assert!(leftovers(&d.path().join("a/b")).is_empty());
    }

    #[test]
    fn copy_refuses_a_directory_or_a_missing_source() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dest");
        let e = install_copy(d.path(), &dest, 0o644).unwrap_err();
        assert!(matches!(e, AtomicFileError::NotAFile(_)), "{e}");
        let missing = d.path().join("missing");
        let e = install_copy(&missing, &dest, 0o644)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
        assert!(!dest.exists());
    }

    #[test]
    fn bytes_replace_a_file_and_keep_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("f");
        fs::write(&dest, "old").unwrap();
        assert_eq!(
            install_bytes(&dest, b"new", 0o600).unwrap(),
            Outcome::Written
        );
        assert_eq!(fs::read_to_string(&dest).unwrap(), "new");
        assert_eq!(mode_of(&dest), 0o600);
        assert_eq!(
            install_bytes(&dest, b"new", 0o600).unwrap(),
            Outcome::Unchanged
        );
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn create_new_keeps_an_existing_file() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("etc/rund/config.toml");
        assert!(create_new(&dest, b"first", 0o644).unwrap());
        assert!(!create_new(&dest, b"second", 0o644).unwrap());
        assert_eq!(fs::read_to_string(&dest).unwrap(), "first");
        assert!(leftovers(&d.path().join("etc/rund")).is_empty());
    }
}
