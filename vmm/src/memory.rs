//! Guest RAM: anonymous private memory at 2 MiB-aligned host addresses, never prefaulted.
//!
//! The alignment is what lets the host back guest RAM with transparent huge pages and KVM map
//! each one into the guest whole: KVM uses a 2 MiB guest mapping only where the host address is
//! congruent to the guest address modulo 2 MiB. Without it a booting guest takes one nested page
//! fault per 4 KiB it touches (measured in the testbed: 5,100 against 860 to reach init, which
//! made the boot 1.7x Firecracker's). The regions are marked `MADV_HUGEPAGE`, so hosts whose THP
//! setting is `madvise` get huge pages too; an idle guest costs about 8 MiB more resident memory
//! for it (37.8 against 29.7 MiB for a 512 MiB guest). Guest RAM is kept out of core dumps
//! (`MADV_DONTDUMP`, `dd` in smaps' VmFlags, which is how the benchmarks find it).
//!
//! A VM restored from a snapshot maps the snapshot's memory file instead, `MAP_PRIVATE`: pages
//! fault in from the file when first touched, a guest write copies the page, and the file (shared
//! by every VM restored from it) never changes. [`GuestRam::write_memory_file`] writes such a
//! file: only the pages that hold something, the rest left as holes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use vm_memory::bitmap::BS;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestMemory;
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
    /// The memory file does not hold all of guest RAM.
    #[error("the memory file holds {found} bytes; guest RAM is {expected}")]
    FileSize {
        /// Its length.
        found: u64,
        /// What RAM needs.
        expected: u64,
    },
    /// Writing the memory file failed.
    #[error("cannot write the memory file")]
    Write(#[source] std::io::Error),
    /// Which pages the guest touched could not be read.
    #[error("cannot read this process's page map")]
    PageMap(#[source] procfs::ProcError),
}

/// Where a mapping's bytes come from.
#[derive(Clone, Copy)]
enum Backing<'a> {
    /// Fresh zeroed memory.
    Anonymous,
    /// A file's bytes from an offset, copy-on-write.
    File(&'a File, u64),
}

/// A private mapping whose start is 2 MiB-aligned; unmapped on drop.
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
    /// Maps `size` bytes (a multiple of the page size) at a 2 MiB boundary: a larger reservation
    /// whose unaligned head and tail are unmapped again, with the file (if any) mapped over the
    /// aligned part.
    fn new(size: usize, backing: Backing<'_>) -> Result<Self, MemoryError> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(MemoryError::Size(size));
        }
        let padded = size
            .checked_add(RAM_ALIGN)
            .ok_or_else(|| MemoryError::Map(size, std::io::ErrorKind::InvalidInput.into()))?;
        let prot = match backing {
            Backing::Anonymous => libc::PROT_READ | libc::PROT_WRITE,
            // Only a reservation: the file goes over the part that is kept.
            Backing::File(..) => libc::PROT_NONE,
        };
        // SAFETY: a new anonymous mapping at an address of the kernel's choice; the result is
        // checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                prot,
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
        if let Backing::File(file, offset) = backing {
            let offset = libc::off_t::try_from(offset)
                .map_err(|_| MemoryError::Map(size, std::io::ErrorKind::InvalidInput.into()));
            // SAFETY: MAP_FIXED replaces part of the reservation just made, which nothing else
            // uses; the result is checked below.
            let mapped = offset.map(|offset| unsafe {
                libc::mmap(
                    aligned as *mut libc::c_void,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    offset,
                )
            });
            let failed = match mapped {
                Ok(p) if p == libc::MAP_FAILED => {
                    Some(MemoryError::Map(size, std::io::Error::last_os_error()))
                }
                Ok(_) => None,
                Err(e) => Some(e),
            };
            if let Some(e) = failed {
                let _ = munmap(start, padded);
                return Err(e);
            }
        }
        let trimmed = munmap(start, aligned - start)
            .and_then(|()| munmap(aligned + size, start + padded - (aligned + size)));
        if let Err(e) = trimmed {
            // Whatever is still mapped of the padded range goes too.
            let _ = munmap(start, padded);
            return Err(MemoryError::Trim(e));
        }
        // Huge pages for fresh memory: advice only, which hosts without THP (or with it off)
        // ignore, and so may we. Left out of the VMM's core dumps: the guest's memory is the
        // guest's (and this flag is how a reader of /proc/<pid>/smaps tells guest RAM apart).
        let advice: &[libc::c_int] = match backing {
            Backing::Anonymous => &[libc::MADV_HUGEPAGE, libc::MADV_DONTDUMP],
            Backing::File(..) => &[libc::MADV_DONTDUMP],
        };
        for &advice in advice {
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
    from_file: bool,
}

impl RamMapping {
    /// `size` bytes of fresh RAM at guest address `start`.
    pub fn new(start: GuestAddress, size: usize) -> Result<Self, MemoryError> {
        Self::build(start, size, Backing::Anonymous)
    }

    /// `size` bytes of RAM at guest address `start` holding `file`'s bytes from `offset`,
    /// copy-on-write: guest writes never reach the file.
    pub fn from_file(
        start: GuestAddress,
        size: usize,
        file: &File,
        offset: u64,
    ) -> Result<Self, MemoryError> {
        Self::build(start, size, Backing::File(file, offset))
    }

    fn build(start: GuestAddress, size: usize, backing: Backing<'_>) -> Result<Self, MemoryError> {
        let mapping = AlignedMapping::new(size, backing)?;
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
            from_file: matches!(backing, Backing::File(..)),
        })
    }

    /// The region's bytes.
    fn bytes(&self) -> &[u8] {
        let len = self.region.len() as usize;
        // SAFETY: the mapping is live and `len` bytes long for as long as `self`; the guest may
        // change the bytes meanwhile (callers read them only from a paused VM, and a torn read
        // is then impossible; while running it would only give a torn copy, never a fault).
        unsafe { std::slice::from_raw_parts(self._mapping.addr.as_ptr(), len) }
    }

    /// Which of the region's pages may hold something: for fresh RAM, those the guest touched
    /// (in memory or swapped out); for file-backed RAM, all of them (untouched pages are the
    /// file's).
    fn touched_pages(&self) -> Result<Vec<bool>, MemoryError> {
        let pages = self.region.len() as usize / PAGE_SIZE;
        if self.from_file {
            return Ok(vec![true; pages]);
        }
        let first = self._mapping.addr.as_ptr() as usize / PAGE_SIZE;
        let mut map = procfs::process::Process::myself()
            .and_then(|p| p.pagemap())
            .map_err(MemoryError::PageMap)?;
        let info = map
            .get_range_info(first..first + pages)
            .map_err(MemoryError::PageMap)?;
        Ok(info
            .iter()
            .map(|i| match i {
                procfs::process::PageInfo::MemoryPage(flags) => {
                    flags.contains(procfs::process::MemoryPageFlags::PRESENT)
                }
                procfs::process::PageInfo::SwapPage(_) => true,
            })
            .collect())
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

/// Whether a mapping of some process (from its smaps) is a VMM's guest RAM: marked
/// `MADV_DONTDUMP` (`dd`) and anonymous (a cold boot) or a snapshot's memory file (a restore).
/// Nothing else of a VMM process has that flag but the kernel's `[vvar]`.
pub fn is_guest_ram(map: &procfs::process::MemoryMap) -> bool {
    use procfs::process::{MMapPath, VmFlags};
    let backing = match &map.pathname {
        MMapPath::Anonymous => true,
        MMapPath::Path(p) => {
            p.file_name().and_then(|n| n.to_str()) == Some(crate::snapshot::MEMORY_FILE)
        }
        _ => false,
    };
    backing && map.extension.vm_flags.contains(VmFlags::DD)
}

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

    /// `mem_size` bytes of guest RAM holding `file` (a memory file [`Self::write_memory_file`]
    /// wrote), copy-on-write. A file of another length is refused: a short one would fault the
    /// guest on its first touch past the end.
    pub fn from_file(mem_size: u64, file: &File) -> Result<Self, MemoryError> {
        let found = file.metadata().map_err(|e| MemoryError::Map(0, e))?.len();
        if found != mem_size {
            return Err(MemoryError::FileSize {
                found,
                expected: mem_size,
            });
        }
        let regions = ram_regions(mem_size);
        let mappings = regions
            .iter()
            .map(|r| {
                RamMapping::from_file(
                    GuestAddress(r.guest_start),
                    r.size as usize,
                    file,
                    r.file_offset,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GuestRam {
            memory: GuestRamMap::from_regions(mappings).map_err(MemoryError::Regions)?,
            regions,
        })
    }

    /// Maps the pages that `file` (the memory file this RAM maps, see [`Self::from_file`])
    /// holds into this process's page tables, without copying them: `MADV_POPULATE_READ` over
    /// each of its data extents; holes stay unmapped, so nothing is allocated for them (over a
    /// hole of a tmpfs file it would allocate the page). A restored guest's first touch of a
    /// template page then costs KVM no host page fault. Advice only: a kernel before 5.14 or a
    /// file system without SEEK_DATA maps nothing, and the guest faults pages in as it would.
    /// Returns the bytes mapped.
    pub fn map_file_pages(&self, file: &File) -> u64 {
        let mut mapped = 0;
        for (region, layout) in self.memory.iter().zip(&self.regions) {
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            let (start, end) = (layout.file_offset, layout.file_offset + layout.size);
            let mut pos = start;
            while pos < end {
                let Ok(data) = rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) else {
                    break; // ENXIO: only a hole from here on; EINVAL: no SEEK_DATA
                };
                if data >= end {
                    break;
                }
                let hole = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(data))
                    .map_or(end, |h| h.min(end));
                let len = (hole - data) as usize;
                // SAFETY: the range lies inside this region's live mapping (`data..hole` is
                // inside the region's file range, which the mapping covers from its start);
                // MADV_POPULATE_READ only faults pages in, as a read by this process would.
                let rc = unsafe {
                    libc::madvise(
                        host.add((data - start) as usize).cast(),
                        len,
                        libc::MADV_POPULATE_READ,
                    )
                };
                if rc != 0 {
                    return mapped;
                }
                mapped += len as u64;
                pos = hole;
            }
        }
        mapped
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// End of RAM below the MMIO gap.
    pub fn low_end(&self) -> u64 {
        self.regions[0].size
    }

    /// Writes all of RAM into `file` (empty, on a filesystem with sparse files: tmpfs), region
    /// after region at their file offsets, as [`Self::from_file`] maps it back: only pages that
    /// the guest touched and that are not all zeros are written; the rest stay holes. Call it on
    /// a paused VM. Returns the bytes written.
    pub fn write_memory_file(&self, file: &File) -> Result<u64, MemoryError> {
        file.set_len(self.size()).map_err(MemoryError::Write)?;
        let mut written = 0u64;
        for (mapping, layout) in self.memory.iter().zip(&self.regions) {
            let bytes = mapping.bytes();
            let touched = mapping.touched_pages()?;
            let holds_data = |page: usize| {
                touched[page]
                    && bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
                        .iter()
                        .any(|&b| b != 0)
            };
            // Runs of pages with data, one write each.
            let mut page = 0;
            while page < touched.len() {
                if !holds_data(page) {
                    page += 1;
                    continue;
                }
                let run_start = page;
                while page < touched.len() && holds_data(page) {
                    page += 1;
                }
                let run = &bytes[run_start * PAGE_SIZE..page * PAGE_SIZE];
                file.write_all_at(run, layout.file_offset + (run_start * PAGE_SIZE) as u64)
                    .map_err(MemoryError::Write)?;
                written += run.len() as u64;
            }
        }
        Ok(written)
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

    /// Resident pages of `ram`'s regions, by mincore(2).
    fn resident_pages(ram: &GuestRam) -> usize {
        let mut resident = 0;
        for region in ram.memory.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            let len = region.len() as usize;
            let mut vec = vec![0u8; len / PAGE_SIZE];
            // SAFETY: the range is the region's live mapping; `vec` has a byte per page.
            let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            resident += vec.iter().filter(|&&b| b & 1 == 1).count();
        }
        resident
    }

    #[test]
    fn mapping_a_memory_file_ahead_maps_its_data_and_leaves_its_holes() {
        let ram = GuestRam::new(16 << 20).unwrap();
        for page in [1u64, 2, 3, 100, 4095] {
            ram.memory
                .write_obj(0x5au8, GuestAddress(page * PAGE_SIZE as u64))
                .unwrap();
        }
        // On tmpfs, as the template store is: a read fault over a hole would allocate a page.
        let file = tempfile::tempfile_in("/dev/shm").unwrap();
        ram.write_memory_file(&file).unwrap();
        let blocks = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap());

        let clone = GuestRam::from_file(16 << 20, &file).unwrap();
        assert_eq!(clone.map_file_pages(&file), 5 * PAGE_SIZE as u64);
        assert_eq!(
            resident_pages(&clone),
            5,
            "the data pages, and only they, are mapped"
        );
        assert_eq!(
            std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap()),
            blocks,
            "no hole of the file was filled"
        );
        let read = |a: u64| clone.memory.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(
            (read(PAGE_SIZE as u64), read(4095 * PAGE_SIZE as u64)),
            (0x5a, 0x5a)
        );
    }

    #[test]
    fn a_memory_file_holds_only_pages_with_data_and_maps_back_copy_on_write() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.memory.write_obj(0x11u8, GuestAddress(0x1000)).unwrap();
        ram.memory.write_obj(0x22u8, GuestAddress(0x2fff)).unwrap();
        // Touched but zero: no data, so a hole.
        ram.memory.write_obj(0u8, GuestAddress(0x8000)).unwrap();
        ram.memory
            .write_obj(0x33u8, GuestAddress(0xff_f000))
            .unwrap();
        let file = tempfile::tempfile().unwrap();
        let written = ram.write_memory_file(&file).unwrap();
        assert_eq!(written, 3 * PAGE_SIZE as u64, "pages 1, 2 and the last one");
        assert_eq!(file.metadata().unwrap().len(), 16 << 20);

        let clone = GuestRam::from_file(16 << 20, &file).unwrap();
        let read = |m: &GuestRam, a: u64| m.memory.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(
            (
                read(&clone, 0x1000),
                read(&clone, 0x2fff),
                read(&clone, 0xff_f000)
            ),
            (0x11, 0x22, 0x33)
        );
        clone
            .memory
            .write_obj(0x44u8, GuestAddress(0x1000))
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 0x1000).unwrap();
        assert_eq!(byte, [0x11], "a clone's write never reaches the file");
        let other = GuestRam::from_file(16 << 20, &file).unwrap();
        assert_eq!(read(&other, 0x1000), 0x11, "nor another clone");
        // And a clone writes its own file whole: its pages from the file count as data.
        let again = tempfile::tempfile().unwrap();
        assert_eq!(
            clone.write_memory_file(&again).unwrap(),
            3 * PAGE_SIZE as u64
        );

        let e = GuestRam::from_file(32 << 20, &file).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the memory file holds 16777216 bytes; guest RAM is 33554432"
        );
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
