//! Guest RAM: one memfd, mapped shared and never prefaulted.
//!
//! Backing RAM with a file (rather than anonymous memory) is what lets a later template be the same file
//! mapped copy-on-write into many sandboxes. Pages are only allocated when the guest touches them.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors making guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory file")]
    CreateFile(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory file to {0} bytes")]
    SizeFile(u64, #[source] std::io::Error),
    /// Duplicating the memfd for a second region failed.
    #[error("cannot duplicate the guest memory file")]
    CloneFile(#[source] std::io::Error),
    /// Mapping the regions failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// One RAM region: where it sits in the guest and where in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical start.
    pub guest_start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the memory file.
    pub file_offset: u64,
}

/// The RAM regions for `mem_size` bytes: everything below the MMIO gap, the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<RamRegion> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut regions = vec![RamRegion {
        guest_start: 0,
        size: low,
        file_offset: 0,
    }];
    if mem_size > low {
        regions.push(RamRegion {
            guest_start: MMIO_GAP_END,
            size: mem_size - low,
            file_offset: low,
        });
    }
    regions
}

/// Guest RAM and the file behind it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestMemoryMmap,
    /// The layout, in the order of `memory`'s regions.
    pub regions: Vec<RamRegion>,
    /// The memfd: kept so that a snapshot can save it or a template can replace it.
    pub file: File,
}

impl GuestRam {
    /// Makes `mem_size` bytes of guest RAM backed by a fresh memfd.
    pub fn new(mem_size: u64) -> Result<Self, MemoryError> {
        let name = CString::new("rund-guest-ram").map_err(|e| MemoryError::CreateFile(e.into()))?;
        // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::CreateFile(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(mem_size)
            .map_err(|e| MemoryError::SizeFile(mem_size, e))?;
        let regions = ram_regions(mem_size);
        let mut ranges = Vec::with_capacity(regions.len());
        for r in &regions {
            let f = file.try_clone().map_err(MemoryError::CloneFile)?;
            ranges.push((
                GuestAddress(r.guest_start),
                r.size as usize,
                Some(FileOffset::new(f, r.file_offset)),
            ));
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        Ok(GuestRam {
            memory,
            regions,
            file,
        })
    }

    /// End of RAM below the MMIO gap.
    pub fn low_end(&self) -> u64 {
        self.regions[0].size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory};

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(
            ram_regions(128 << 20),
            vec![RamRegion {
                guest_start: 0,
                size: 128 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn memory_past_the_gap_resumes_at_4g() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, MMIO_GAP_START);
        assert_eq!(r[1].guest_start, MMIO_GAP_END);
        assert_eq!(r[1].size, (4 << 30) - MMIO_GAP_START);
        assert_eq!(r[1].file_offset, MMIO_GAP_START);
    }

    #[test]
    fn ram_is_file_backed_and_writable() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let v: u32 = ram.memory.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert!(ram.memory.find_region(GuestAddress(16 << 20)).is_none());
        assert_eq!(ram.file.metadata().unwrap().len(), 16 << 20);
    }
}
