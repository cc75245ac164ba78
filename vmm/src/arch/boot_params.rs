//! The zero page (`struct boot_params`) of the Linux boot protocol, with the e820 memory map.

use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::memory::GuestRamMap;
use crate::memory::RamRegion;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader type: we are not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// The zero page's e820 table has room for this many entries.
const E820_MAX_ENTRIES: usize = 128;

/// Errors writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// More e820 entries than the zero page holds.
    #[error("the e820 map has more than {E820_MAX_ENTRIES} entries")]
    E820TooLarge,
    /// The write into guest memory failed.
    #[error("cannot write the zero page into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// 1 = RAM, 2 = reserved.
    pub kind: u32,
}

/// The e820 map for the given RAM regions: base memory below the EBDA, the EBDA-to-1 MiB BIOS area
/// reserved (it holds the MP table), and RAM from 1 MiB on, split around the MMIO gap.
pub fn e820_map(regions: &[RamRegion]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in regions {
        let start = r.guest_start.max(HIMEM_START);
        let end = r.guest_start + r.size;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// What goes into the zero page.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootParamsSpec<'a> {
    /// The bzImage's own setup header, copied in first when booting a bzImage.
    pub setup_header: Option<setup_header>,
    /// Command line length, NUL included.
    pub cmdline_size: u32,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
    /// The e820 map.
    pub e820: &'a [E820Entry],
}

/// Builds the zero page.
pub fn build_boot_params(spec: &BootParamsSpec<'_>) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = spec.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = spec.cmdline_size;
    if let Some((addr, size)) = spec.initrd {
        // Both fit 32 bits: the initrd sits below the MMIO gap.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if spec.e820.len() > E820_MAX_ENTRIES || spec.e820.len() > params.e820_table.len() {
        return Err(BootParamsError::E820TooLarge);
    }
    for (slot, e) in params.e820_table.iter_mut().zip(spec.e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.type_ = e.kind;
    }
    params.e820_entries = spec.e820.len() as u8;
    Ok(params)
}

/// Writes the zero page at its fixed address.
pub fn write_boot_params(mem: &GuestRamMap, params: &boot_params) -> Result<(), BootParamsError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use crate::memory::ram_regions;

    #[test]
    fn e820_for_small_memory() {
        let map = e820_map(&ram_regions(128 << 20));
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: 2
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: 1
                },
            ]
        );
    }

    #[test]
    fn e820_splits_around_the_mmio_gap() {
        let map = e820_map(&ram_regions(4 << 30));
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, MMIO_GAP_END);
        let ram: u64 = map.iter().filter(|e| e.kind == 1).map(|e| e.size).sum();
        // All RAM but the 640K-1M hole is usable.
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn zero_page_fields() {
        let map = e820_map(&ram_regions(64 << 20));
        let p = build_boot_params(&BootParamsSpec {
            setup_header: None,
            cmdline_size: 14,
            initrd: Some((0x3ff_0000, 0x1_0000)),
            e820: &map,
        })
        .unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 14);
        assert_eq!({ p.hdr.ramdisk_image }, 0x3ff_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1_0000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, 0x10_0000);
        assert_eq!({ p.e820_table[2].type_ }, 1);
    }

    #[test]
    fn bzimage_header_is_kept_and_ours_wins() {
        let hdr = setup_header {
            setup_sects: 27,
            version: 0x020f,
            type_of_loader: 0x21,
            ..Default::default()
        };
        let p = build_boot_params(&BootParamsSpec {
            setup_header: Some(hdr),
            e820: &[],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.hdr.setup_sects, 27);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
    }

    #[test]
    fn too_many_e820_entries_are_refused() {
        let map = vec![
            E820Entry {
                addr: 0,
                size: 1,
                kind: 1
            };
            129
        ];
        assert!(matches!(
            build_boot_params(&BootParamsSpec {
                e820: &map,
                ..Default::default()
            }),
            Err(BootParamsError::E820TooLarge)
        ));
    }
}
