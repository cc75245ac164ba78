//! The backing file: positional reads and writes straight between it and guest memory, flush, and
//! deallocation. Offsets and lengths reaching here were checked against the capacity by the request
//! parser; this layer still refuses anything it cannot express rather than trusting that.
//!
//! A request's data moves with one `preadv`/`pwritev` over all its guest segments (a 1 MiB request
//! from a guest is up to 254 of them), through the host page cache. Direct I/O was tried in the
//! nested testbed (`ci/bench-devices`): it sped up neither sequential figure, and random 4 KiB
//! reads, which the page cache serves, ran about three times slower; Firecracker and Cloud
//! Hypervisor default to the page cache as well.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::{ID_BYTES, SECTOR_SHIFT};

/// iovecs per `preadv`/`pwritev` call (Linux's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file could not be opened.
    #[error("block device {path}: cannot open")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Its size or identity could not be read.
    #[error("block device {path}: cannot read its size")]
    Size {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A host file (or block device) serving as a disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// Opens `path` read-write, or read-only when `read_only`. The capacity is the size rounded
    /// down to whole sectors: a trailing partial sector is not reachable.
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            // The VMM may spawn helpers; the disk must not leak into them.
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size_err = |source| DiskError::Size {
            path: path.to_owned(),
            source,
        };
        // Seeking to the end works for block devices too, whose metadata length is 0.
        let size = (&file).seek(SeekFrom::End(0)).map_err(size_err)?;
        let meta = file.metadata().map_err(size_err)?;
        Ok(Disk {
            capacity: size >> SECTOR_SHIFT,
            read_only,
            id: disk_id(meta.dev(), meta.ino()),
            file,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the file was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The GET_ID string: stable for the same file, distinct between files on one host.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Fills `bufs`, one after the other, from the file at byte `offset`.
    pub fn read_vectored<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<B>],
    ) -> io::Result<()> {
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let iovecs = iovecs(guards.iter().map(|g| g.as_ptr()), bufs);
        self.transfer(offset, iovecs, false)?;
        for b in bufs {
            b.bitmap().mark_dirty(0, b.len());
        }
        Ok(())
    }

    /// Writes `bufs`, one after the other, to the file at byte `offset`.
    pub fn write_vectored<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<B>],
    ) -> io::Result<()> {
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
        let iovecs = iovecs(guards.iter().map(|g| g.as_ptr().cast_mut()), bufs);
        self.transfer(offset, iovecs, true)
    }

    /// Moves the bytes of `iovecs` (pointing into guest memory the caller keeps mapped) from or to
    /// the file at `offset`, in as few calls as the kernel allows.
    fn transfer(&self, offset: u64, mut iovecs: Vec<libc::iovec>, write: bool) -> io::Result<()> {
        // An empty one would read as the end of the file.
        iovecs.retain(|v| v.iov_len > 0);
        let fd = self.file.as_raw_fd();
        let mut pos = offset;
        let mut first = 0;
        while first < iovecs.len() {
            let batch = &iovecs[first..iovecs.len().min(first + MAX_IOVECS)];
            let at = libc::off_t::try_from(pos).map_err(|_| io::ErrorKind::InvalidInput)?;
            // SAFETY: every iovec points into guest memory that the caller's guards keep mapped,
            // for its length; preadv writes and pwritev reads only within them. No Rust reference
            // to guest memory is formed: the guest may touch it too.
            let n = unsafe {
                if write {
                    libc::pwritev(fd, batch.as_ptr(), batch.len() as libc::c_int, at)
                } else {
                    libc::preadv(fd, batch.as_ptr(), batch.len() as libc::c_int, at)
                }
            };
            let n = match n {
                0 if write => return Err(io::ErrorKind::WriteZero.into()),
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            pos += n as u64;
            // Skip what was done: whole iovecs, then part of the next.
            let mut left = n;
            while left > 0 && first < iovecs.len() {
                let v = &mut iovecs[first];
                if left < v.iov_len {
                    // SAFETY: `left` is less than the iovec's length: the pointer stays in it.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(left) }.cast();
                    v.iov_len -= left;
                    left = 0;
                } else {
                    left -= v.iov_len;
                    first += 1;
                }
            }
        }
        Ok(())
    }

    /// Makes completed writes durable. fdatasync is enough: it includes the metadata needed to
    /// read the data back, and a hole punched is such metadata.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeroes afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes `len` bytes at `offset`. With `unmap` the range may be deallocated (a hole);
    /// without it, it stays allocated, as the spec requires. Filesystems without the fallocate
    /// mode get zeroes written.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeroes_by_hand(offset, len)
            }
            r => r,
        }
    }

    fn write_zeroes_by_hand(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 64 * 1024;
        let zeroes = vec![0u8; CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(CHUNK, |r| r.min(CHUNK));
            let pos = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            std::os::unix::fs::FileExt::write_all_at(&self.file, &zeroes[..n], pos)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        loop {
            // SAFETY: fallocate on our own fd touches no memory of this process.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// One iovec per slice of `bufs`, at the address its guard gave (in `bases`).
fn iovecs<B: BitmapSlice>(
    bases: impl Iterator<Item = *mut u8>,
    bufs: &[VolatileSlice<B>],
) -> Vec<libc::iovec> {
    bases
        .zip(bufs)
        .map(|(base, b)| libc::iovec {
            iov_base: base.cast(),
            iov_len: b.len(),
        })
        .collect()
}

/// "<inode>-<device>" in hex, NUL-padded (the spec allows an unterminated 20-byte string).
/// The inode comes first so that truncation eats the less distinctive part.
fn disk_id(dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let s = format!("{ino:x}-{dev:x}");
    let mut id = [0u8; ID_BYTES];
    let n = s.len().min(ID_BYTES);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRamMap;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemory};

    fn disk_with(content: &[u8], ro: bool) -> (tempfile::NamedTempFile, Disk) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        let d = Disk::open(f.path(), ro).unwrap();
        (f, d)
    }

    #[test]
    fn capacity_rounds_down_to_sectors() {
        let (_f, d) = disk_with(&[7u8; 1536 + 100], false);
        assert_eq!(d.capacity(), 3);
        assert!(!d.read_only());
    }

    #[test]
    fn id_is_derived_from_the_inode_and_padded() {
        assert_eq!(&disk_id(0x803, 0x1234), b"1234-803\0\0\0\0\0\0\0\0\0\0\0\0");
        let long = disk_id(u64::MAX, u64::MAX);
        assert_eq!(&long[..17], b"ffffffffffffffff-");
        let (_f, d) = disk_with(&[0; 512], true);
        assert_ne!(d.id(), &[0u8; ID_BYTES]);
    }

    #[test]
    fn missing_file_is_an_open_error() {
        let e = Disk::open(Path::new("/nonexistent/rund-disk"), false).unwrap_err();
        assert!(matches!(e, DiskError::Open { .. }), "{e}");
    }

    fn mem() -> GuestRamMap {
        crate::memory::map_ram(&[(GuestAddress(0), 0x80_0000)]).unwrap()
    }

    #[test]
    fn read_only_disk_cannot_be_written() {
        for len in [512, 4096] {
            let (_f, d) = disk_with(&vec![1u8; len], true);
            let mem = mem();
            let s = [mem.get_slice(GuestAddress(0), len).unwrap()];
            assert!(d.write_vectored(0, &s).is_err(), "the fds are O_RDONLY");
            d.read_vectored(0, &s).unwrap();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(len as u64 - 1)).unwrap(), 1);
        }
    }

    #[test]
    fn reading_past_the_end_of_file_is_an_error() {
        let (_f, d) = disk_with(&[1u8; 512], false);
        let mem = mem();
        let s = [mem.get_slice(GuestAddress(0), 1024).unwrap()];
        assert_eq!(
            d.read_vectored(0, &s).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// Where [`round_trip`] reads back to.
    const READ_BACK: u64 = 0x40_0000;

    /// Writes `pieces` (guest address, length) as one request at `offset`, reads them back into
    /// other guest memory, and checks both against the file.
    fn round_trip(d: &Disk, f: &tempfile::NamedTempFile, offset: u64, pieces: &[(u64, usize)]) {
        let mem = mem();
        let mut want = Vec::new();
        for (i, &(addr, len)) in pieces.iter().enumerate() {
            let bytes: Vec<u8> = (0..len)
                .map(|j| (j * 7 + i * 13 + offset as usize) as u8)
                .collect();
            mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            want.extend(bytes);
        }
        let slices = |base: u64| -> Vec<_> {
            pieces
                .iter()
                .map(|&(a, l)| mem.get_slice(GuestAddress(base + a), l).unwrap())
                .collect()
        };
        d.write_vectored(offset, &slices(0)).unwrap();
        let file = std::fs::read(f.path()).unwrap();
        let at = offset as usize;
        assert_eq!(file[at..at + want.len()], want[..], "written at {offset}");
        d.read_vectored(offset, &slices(READ_BACK)).unwrap();
        let mut back = Vec::new();
        for &(a, l) in pieces {
            let mut b = vec![0u8; l];
            mem.read_slice(&mut b, GuestAddress(READ_BACK + a)).unwrap();
            back.extend(b);
        }
        assert_eq!(back, want, "read back at {offset}");
    }

    #[test]
    fn a_request_moves_its_scattered_segments_in_order() {
        let (f, d) = disk_with(&vec![0u8; 64 * 1024], false);
        let page = 4096;
        // Whole pages scattered in guest memory, out of address order.
        round_trip(
            &d,
            &f,
            2 * page,
            &[(5 * page, 4096), (page, 8192), (9 * page, 4096)],
        );
        // Odd lengths at odd guest addresses.
        round_trip(&d, &f, 512, &[(0x1003, 700), (0x3000, 324), (0x5000, 512)]);
        // Rewriting across both.
        round_trip(&d, &f, 0, &[(0, 8192)]);
        assert_eq!(std::fs::read(f.path()).unwrap().len(), 64 * 1024);
    }

    #[test]
    fn more_slices_than_one_call_takes() {
        let (f, d) = disk_with(&vec![0u8; 2 * MAX_IOVECS * 512 + 4096], false);
        // 2 * MAX_IOVECS + 3 slices of 512 bytes, alternating between two areas of guest memory.
        let pieces: Vec<_> = (0..2 * MAX_IOVECS as u64 + 3)
            .map(|i| ((i % 2) * 0x18_0000 + i * 512, 512))
            .collect();
        round_trip(&d, &f, 4096, &pieces);
    }

    #[test]
    fn zeroing_and_punching() {
        let (f, d) = disk_with(&[0xaau8; 8192], false);
        d.write_zeroes(512, 1024, false).unwrap();
        d.write_zeroes(4096, 512, true).unwrap();
        d.punch_hole(6144, 1024).unwrap();
        d.write_zeroes_by_hand(7680, 100).unwrap();
        let c = std::fs::read(f.path()).unwrap();
        assert_eq!(c.len(), 8192, "sizes are kept");
        let zero = |r: std::ops::Range<usize>| c[r].iter().all(|&b| b == 0);
        let set = |r: std::ops::Range<usize>| c[r].iter().all(|&b| b == 0xaa);
        assert!(set(0..512) && zero(512..1536) && set(1536..4096));
        assert!(zero(4096..4608) && set(4608..6144) && zero(6144..7168));
        assert!(set(7168..7680) && zero(7680..7780) && set(7780..8192));
    }
}
