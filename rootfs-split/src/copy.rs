//! Copying the pre-formatted image: a reflink (FICLONE) where the filesystem shares extents
//! (XFS with reflink=1, btrfs), otherwise a sparse copy that writes only the blocks holding data.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

/// How a sandbox's image was made from the base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// FICLONE: the copy shares every extent with the base until the guest writes.
    Reflink,
    /// No reflink on this filesystem: the base's data blocks were copied, its holes kept.
    SparseCopy,
}

/// Errnos with which FICLONE says "not here" rather than "failed": no reflink in this
/// filesystem (EOPNOTSUPP, and ENOTTY where it has no such ioctl at all), files on two
/// filesystems (EXDEV), or a filesystem that refuses this pair of files (EINVAL).
fn reflink_unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY
    )
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Makes `dst` (empty, open for writing) a copy of `src`: a reflink, or where the filesystem has
/// none a sparse copy, said once per process in the log.
pub(crate) fn clone_or_copy(src: &File, dst: &File, dst_path: &Path) -> io::Result<CopyMethod> {
    match rustix::fs::ioctl_ficlone(dst, src) {
        Ok(()) => return Ok(CopyMethod::Reflink),
        Err(e) if reflink_unsupported(e) => {
            if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "no reflink (FICLONE: {e}) in {}: writable layers are sparse copies of the base image, \
                     slower to make and not sharing blocks; put the writable-layer directory on XFS \
                     (mkfs.xfs -m reflink=1) or btrfs",
                    dst_path.parent().unwrap_or(dst_path).display()
                );
            }
        }
        Err(e) => return Err(e.into()),
    }
    sparse_copy(src, dst)?;
    Ok(CopyMethod::SparseCopy)
}

/// Zero blocks inside data extents are skipped too: mke2fs's own zeroing may leave written
/// zeros, and a hole reads back the same.
const BLOCK: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Copies the data segments of `src` (SEEK_DATA/SEEK_HOLE), writing only blocks that are not
/// all zeros; everything else stays a hole in `dst`.
pub(crate) fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(data) => data,
            Err(Errno::NXIO) => break, // only a hole from `pos` to the end
            // No SEEK_DATA here: treat the rest as data; skipping zero blocks still keeps holes.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => pos,
            Err(e) => return Err(e.into()),
        };
        let hole = match rustix::fs::seek(src, SeekFrom::Hole(data)) {
            Ok(hole) => hole.min(len),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => len,
            Err(e) => return Err(e.into()),
        };
        copy_nonzero_blocks(src, dst, data, hole, &mut buf)?;
        pos = hole;
    }
    Ok(())
}

fn copy_nonzero_blocks(
    src: &File,
    dst: &File,
    start: u64,
    end: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut offset = start;
    while offset < end {
        let n = usize::try_from(end - offset).map_or(buf.len(), |left| left.min(buf.len()));
        let chunk = &mut buf[..n];
        src.read_exact_at(chunk, offset)?;
        // Write each run of non-zero blocks with one pwrite.
        let mut run_start: Option<usize> = None;
        for (i, block) in chunk.chunks(BLOCK).enumerate() {
            let at = i * BLOCK;
            let zero = block.iter().all(|&b| b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(at),
                (true, Some(s)) => {
                    dst.write_all_at(&chunk[s..at], offset + s as u64)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            dst.write_all_at(&chunk[s..], offset + s as u64)?;
        }
        offset += n as u64;
    }
    Ok(())
}

/// Whether files in `dir` can be reflinked: FICLONE of one 4 KiB block between two unnamed files
/// there.
pub(crate) fn probe_reflink(dir: &Path) -> io::Result<bool> {
    let src = tempfile::tempfile_in(dir)?;
    src.write_all_at(&[0x5a; BLOCK], 0)?;
    let dst = tempfile::tempfile_in(dir)?;
    match rustix::fs::ioctl_ficlone(&dst, &src) {
        Ok(()) => Ok(true),
        Err(e) if reflink_unsupported(e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A 64 MiB file with data at a few places and holes elsewhere, one data block all zeros.
    fn patchy_file(dir: &Path) -> File {
        let f = tempfile::tempfile_in(dir).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 3 * BLOCK], 0).unwrap();
        f.write_all_at(&[0u8; BLOCK], 5 << 20).unwrap();
        f.write_all_at(b"middle", (20 << 20) + 17).unwrap();
        f.write_all_at(&[9u8; 100], (64 << 20) - 100).unwrap();
        f
    }

    fn contents(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = patchy_file(dir.path());
        let dst = tempfile::tempfile_in(dir.path()).unwrap();
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(contents(&src), contents(&dst));
        let (s, d) = (src.metadata().unwrap(), dst.metadata().unwrap());
        assert_eq!(s.len(), d.len());
        // 3 + 1 + 1 blocks of data at most; the all-zero block is not written.
        assert!(d.blocks() <= s.blocks(), "{} > {}", d.blocks(), s.blocks());
        assert!(
            d.blocks() * 512 <= 5 * BLOCK as u64,
            "{} blocks",
            d.blocks()
        );
    }

    #[test]
    fn sparse_copy_of_an_empty_or_all_hole_file() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1 << 20] {
            let src = tempfile::tempfile_in(dir.path()).unwrap();
            src.set_len(len).unwrap();
            let dst = tempfile::tempfile_in(dir.path()).unwrap();
            sparse_copy(&src, &dst).unwrap();
            assert_eq!(dst.metadata().unwrap().len(), len);
            assert_eq!(dst.metadata().unwrap().blocks(), 0);
        }
    }

    #[test]
    fn reflink_probe_answers_in_a_temporary_directory() {
        // The answer depends on the filesystem under /tmp; what must hold is that the probe
        // answers, and agrees with a direct FICLONE.
        let dir = tempfile::tempdir().unwrap();
        let probe = probe_reflink(dir.path()).unwrap();
        let src = tempfile::tempfile_in(dir.path()).unwrap();
        src.write_all_at(b"x", 0).unwrap();
        let dst = tempfile::tempfile_in(dir.path()).unwrap();
        assert_eq!(rustix::fs::ioctl_ficlone(&dst, &src).is_ok(), probe);
        assert!(probe_reflink(&dir.path().join("missing")).is_err());
    }
}
