//! Guest RAM: anonymous private memory at 2 MiB-aligned host addresses, never prefaulted.
//!
//! The alignment is what lets the host back guest RAM with transparent huge pages and KVM map
//! each one into the guest whole: KVM uses a 2 MiB guest mapping only where the host address is
//! congruent to the guest address modulo 2 MiB. Without it a booting guest takes one nested page
//! fault per 4 KiB it touches (measured in the testbed: 5,100 against 860 to reach init, which
//! made the boot 1.7x Firecracker's). The regions are marked `MADV_HUGEPAGE`, so hosts whose THP
//! setting is `madvise` get huge pages too; an idle guest costs about 8 MiB more resident memory
//! for it (37.8 against 29.7 MiB for a 512 MiB guest). Guest RAM is kept out of core dumps
//! (`MADV_DONTDUMP`, `dd` in smaps' VmFlags, which is how the benchmarks find it). A template's
//! clones will map its memory file instead (copy-on-write).

use std::ptr::NonNull;

use vm_memory::bitmap::BS;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestRegionCollection, GuestRegionMmap, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Huge page size and so the alignment of every RAM mapping.
const RAM_ALIGN: usize = 2 << 20;
/// The x86-64 base page size: RAM regions are whole pages.
const PAGE_SIZE: usize = 4096;

/// Guest memory as the VMM and its devices see it: the RAM regions of [`RamMapping`].
pub type GuestRamMap = GuestRegionCollection<RamMapping>;

/// Errors making guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region size mmap cannot give exactly.
    #[error("a guest memory region of {0} bytes is not a non-zero whole number of 4 KiB pages")]
    Size(usize),
    /// mmap failed.
    #[error("cannot map {0} bytes of guest memory")]
    Map(usize, #[source] std::io::Error),
    /// Trimming the mapping to its aligned part failed.
    #[error("cannot trim the guest memory mapping to a 2 MiB boundary")]
    Trim(#[source] std::io::Error),
    /// A region could not be described to vm-memory.
    #[error("guest memory region at {0:#x} of {1} bytes is not valid")]
    Region(u64, usize),
    /// The regions overlap or are not in order.
    #[error("guest memory regions are not valid")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// An anonymous private mapping whose start is 2 MiB-aligned; unmapped on drop.
#[derive(Debug)]
struct AlignedMapping {
    addr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access to its bytes goes through
// vm-memory's volatile accessors, which may be used from any thread.
unsafe impl Send for AlignedMapping {}
// SAFETY: as above; `&AlignedMapping` gives no access to the bytes by itself.
unsafe impl Sync for AlignedMapping {}

fn munmap(addr: usize, len: usize) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: callers pass a range inside a mapping this module made and nothing else uses.
    if unsafe { libc::munmap(addr as *mut libc::c_void, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl AlignedMapping {
    /// Maps `size` bytes (a multiple of the page size) at a 2 MiB boundary: a larger mapping
    /// whose unaligned head and tail are unmapped again.
    fn new(size: usize) -> Result<Self, MemoryError> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(MemoryError::Size(size));
        }
        let padded = size
            .checked_add(RAM_ALIGN)
            .ok_or_else(|| MemoryError::Map(size, std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a new anonymous mapping at an address of the kernel's choice; the result is
        // checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(MemoryError::Map(size, std::io::Error::last_os_error()));
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(RAM_ALIGN);
        let trimmed = munmap(start, aligned - start)
            .and_then(|()| munmap(aligned + size, start + padded - (aligned + size)));
        if let Err(e) = trimmed {
            // Whatever is still mapped of the padded range goes too.
            let _ = munmap(start, padded);
            return Err(MemoryError::Trim(e));
        }
        // Huge pages: advice only, which hosts without THP (or with it off) ignore, and so may we.
        // Left out of the VMM's core dumps: the guest's memory is the guest's (and this flag is
        // how a reader of /proc/<pid>/smaps tells guest RAM apart).
        for advice in [libc::MADV_HUGEPAGE, libc::MADV_DONTDUMP] {
            // SAFETY: the range is the mapping just made.
            unsafe { libc::madvise(aligned as *mut libc::c_void, size, advice) };
        }
        let addr = NonNull::new(aligned as *mut u8)
            .ok_or_else(|| MemoryError::Map(size, std::io::ErrorKind::InvalidData.into()))?;
        Ok(AlignedMapping { addr, size })
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // Nothing to do if it fails: the range stays mapped until the process ends.
        let _ = munmap(self.addr.as_ptr() as usize, self.size);
    }
}

/// One region of guest RAM: vm-memory's view of an [`AlignedMapping`], which it owns.
#[derive(Debug)]
pub struct RamMapping {
    // Declared first so that it goes before the mapping it points into.
    region: GuestRegionMmap,
    _mapping: AlignedMapping,
}

impl RamMapping {
    /// `size` bytes of fresh RAM at guest address `start`.
    pub fn new(start: GuestAddress, size: usize) -> Result<Self, MemoryError> {
        let mapping = AlignedMapping::new(size)?;
        // SAFETY: `mapping` is a live read-write mapping of exactly `size` bytes, owned by the
        // `RamMapping` built here, which drops the vm-memory region before it.
        let mmap = unsafe {
            MmapRegionBuilder::new(size)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(mapping.addr.as_ptr())
        }
        .build()
        .map_err(|_| MemoryError::Region(start.0, size))?;
        let region = GuestRegionMmap::new(mmap, start).ok_or(MemoryError::Region(start.0, size))?;
        Ok(RamMapping {
            region,
            _mapping: mapping,
        })
    }
}

impl GuestMemoryRegion for RamMapping {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.region.len()
    }

    fn start_addr(&self) -> GuestAddress {
        self.region.start_addr()
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        self.region.get_host_address(addr)
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        None
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, ()>>, GuestMemoryError> {
        self.region.get_slice(offset, count)
    }
}

impl GuestMemoryRegionBytes for RamMapping {}

/// Fresh guest memory with RAM at each `(start, size)`.
pub fn map_ram(ranges: &[(GuestAddress, usize)]) -> Result<GuestRamMap, MemoryError> {
    let regions = ranges
        .iter()
        .map(|&(start, size)| RamMapping::new(start, size))
        .collect::<Result<Vec<_>, _>>()?;
    GuestRamMap::from_regions(regions).map_err(MemoryError::Regions)
}

/// One RAM region: where it sits in the guest and where in a memory file that holds all of RAM
/// (a snapshot's), region after region.
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

/// Guest RAM and its layout.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestRamMap,
    /// The layout, in the order of `memory`'s regions.
    pub regions: Vec<RamRegion>,
}

impl GuestRam {
    /// Makes `mem_size` bytes of guest RAM.
    pub fn new(mem_size: u64) -> Result<Self, MemoryError> {
        let regions = ram_regions(mem_size);
        let ranges: Vec<_> = regions
            .iter()
            .map(|r| (GuestAddress(r.guest_start), r.size as usize))
            .collect();
        Ok(GuestRam {
            memory: map_ram(&ranges)?,
            regions,
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
    fn ram_is_writable_and_ends_where_asked() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let v: u32 = ram.memory.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert!(ram.memory.find_region(GuestAddress(16 << 20)).is_none());
        assert!(ram.memory.read_obj::<u8>(GuestAddress(16 << 20)).is_err());
    }

    /// Which host ranges of this process are mapped, from /proc/self/maps.
    fn mapped(addr: usize, len: usize) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().any(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            a < addr + len && addr < b
        })
    }

    #[test]
    fn every_region_is_2mib_aligned_and_unmapped_with_its_last_user() {
        let mem = map_ram(&[(GuestAddress(0), 6 << 20), (GuestAddress(1 << 32), 4 << 20)]).unwrap();
        let hosts: Vec<(usize, usize)> = mem
            .iter()
            .map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
                (host, r.len() as usize)
            })
            .collect();
        for &(host, len) in &hosts {
            assert_eq!(
                host % RAM_ALIGN,
                0,
                "region at {host:#x} is not 2 MiB-aligned"
            );
            assert!(mapped(host, len));
        }
        // A clone (as a device holds) keeps the memory mapped after the first is gone.
        let device_view = mem.clone();
        drop(mem);
        device_view.write_obj(7u8, GuestAddress(0)).unwrap();
        assert!(hosts.iter().all(|&(h, l)| mapped(h, l)));
        drop(device_view);
        for &(host, len) in &hosts {
            assert!(!mapped(host, len), "region at {host:#x} is still mapped");
        }
    }

    #[test]
    fn impossible_sizes_are_refused() {
        let e = map_ram(&[(GuestAddress(0), usize::MAX - 4095)]).unwrap_err();
        assert!(matches!(e, MemoryError::Map(..)), "{e}");
        for size in [0, 5000] {
            let e = map_ram(&[(GuestAddress(0), size)]).unwrap_err();
            assert!(matches!(e, MemoryError::Size(s) if s == size), "{e}");
            assert!(e.to_string().contains(&format!("{size} bytes")), "{e}");
        }
    }
}
