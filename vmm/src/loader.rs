//! Kernel, initrd and command line into guest memory, for the 64-bit direct boot protocol.
//!
//! Two kernel formats: an uncompressed `vmlinux` ELF, entered at its ELF entry point, and a `bzImage`,
//! whose protected-mode part is loaded at 1 MiB and entered at its 64-bit entry (load address + 0x200).
//! The actual copying is linux-loader's; this module picks the format, bounds everything against guest
//! RAM and places the initrd.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

use crate::arch::layout::{HIMEM_START, KERNEL_DEFAULT_LOAD};
use crate::memory::GuestRamMap;

const PAGE_SIZE: u64 = 4096;
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// Boot protocol 2.12 brought `xloadflags` and its 64-bit entry flag.
const BZIMAGE_MIN_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point's offset from the protected-mode kernel's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors reading or loading the kernel and initrd.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file could not be opened or read.
    #[error("kernel {path}: cannot read")]
    KernelUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a 64-bit x86 ELF nor a bzImage this VMM can boot.
    #[error("kernel {path}: {reason}")]
    KernelMalformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// linux-loader refused the image.
    #[error("kernel {path}: cannot load it into guest memory")]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd could not be opened or read.
    #[error("initrd {path}: cannot read")]
    InitrdUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel's end at {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// The highest address the initrd may reach.
        limit: u64,
    },
    /// The initrd's copy into guest memory failed.
    #[error("initrd {path}: cannot copy into guest memory")]
    InitrdLoad {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The kernel image formats this VMM boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF (`vmlinux`).
    Elf,
    /// Compressed `bzImage`.
    BzImage,
}

/// What a kernel file is and how much memory it needs, read from its headers alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// The format.
    pub format: KernelFormat,
    /// Highest guest physical address the running kernel occupies (before any initrd).
    pub end: u64,
    /// The bzImage boot protocol's `initrd_addr_max`, where the header gives one.
    pub initrd_addr_max: Option<u64>,
}

fn malformed(path: &Path, reason: impl Into<String>) -> LoaderError {
    LoaderError::KernelMalformed {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_at(file: &mut File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), LoaderError> {
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(buf))
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                malformed(path, "file is too short for a kernel image")
            } else {
                LoaderError::KernelUnreadable {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Reads a kernel file's headers: its format and the memory it needs.
pub fn probe_kernel(path: &Path) -> Result<KernelInfo, LoaderError> {
    let mut file = File::open(path).map_err(|e| LoaderError::KernelUnreadable {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut head = [0u8; 0x270];
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len < 64 {
        return Err(malformed(path, "file is too short for a kernel image"));
    }
    let n = (len as usize).min(head.len());
    read_at(&mut file, path, 0, &mut head[..n])?;
    if head[..4] == ELF_MAGIC {
        return probe_elf(&mut file, path, &head[..n]);
    }
    if n >= 0x264 && u32_at(&head, 0x202) == BZIMAGE_MAGIC {
        return probe_bzimage(path, &head);
    }
    Err(malformed(
        path,
        "neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)",
    ))
}

fn probe_elf(file: &mut File, path: &Path, ehdr: &[u8]) -> Result<KernelInfo, LoaderError> {
    if ehdr[4] != ELFCLASS64 {
        return Err(malformed(path, "ELF is not 64-bit"));
    }
    if u16_at(ehdr, 18) != EM_X86_64 {
        return Err(malformed(path, "ELF is not for x86_64"));
    }
    let entry = u64_at(ehdr, 24);
    if entry < HIMEM_START {
        return Err(malformed(
            path,
            format!("ELF entry {entry:#x} lies below 1 MiB"),
        ));
    }
    let phoff = u64_at(ehdr, 32);
    let phentsize = u64::from(u16_at(ehdr, 54));
    let phnum = u64::from(u16_at(ehdr, 56));
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Err(malformed(path, "ELF has no usable program headers"));
    }
    let mut end = 0u64;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        read_at(file, path, phoff.saturating_add(i * phentsize), &mut ph)?;
        const PT_LOAD: u32 = 1;
        if u32_at(&ph, 0) != PT_LOAD {
            continue;
        }
        let paddr = u64_at(&ph, 24);
        let memsz = u64_at(&ph, 40);
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| malformed(path, "ELF segment end overflows"))?;
        if paddr < HIMEM_START {
            return Err(malformed(
                path,
                format!("ELF segment at {paddr:#x} lies below 1 MiB"),
            ));
        }
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(malformed(path, "ELF has no loadable segment"));
    }
    Ok(KernelInfo {
        format: KernelFormat::Elf,
        end,
        initrd_addr_max: None,
    })
}

fn probe_bzimage(path: &Path, head: &[u8]) -> Result<KernelInfo, LoaderError> {
    let version = u16_at(head, 0x206);
    if version < BZIMAGE_MIN_PROTOCOL {
        return Err(malformed(
            path,
            format!("bzImage boot protocol {version:#x} predates 2.12 (no 64-bit entry)"),
        ));
    }
    if u16_at(head, 0x236) & XLF_KERNEL_64 == 0 {
        return Err(malformed(path, "bzImage has no 64-bit entry point"));
    }
    let initrd_addr_max = u64::from(u32_at(head, 0x22c));
    let pref_address = u64_at(head, 0x258).max(KERNEL_DEFAULT_LOAD);
    let init_size = u64::from(u32_at(head, 0x260));
    Ok(KernelInfo {
        format: KernelFormat::BzImage,
        end: pref_address.saturating_add(init_size),
        initrd_addr_max: Some(initrd_addr_max),
    })
}

/// Where the kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// Highest address the running kernel occupies.
    pub end: u64,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(
    mem: &GuestRamMap,
    path: &Path,
    info: &KernelInfo,
) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(|e| LoaderError::KernelUnreadable {
        path: path.to_path_buf(),
        source: e,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |source| LoaderError::KernelLoad {
        path: path.to_path_buf(),
        source,
    };
    match info.format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0,
                setup_header: None,
                end: info.end.max(r.kernel_end),
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                setup_header: r.setup_header,
                end: info.end.max(r.kernel_end),
            })
        }
    }
}

/// Where the initrd landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Places the initrd at the top of low memory (below `limit`), page aligned, above `kernel_end`.
pub fn initrd_placement(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let addr = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Loads the initrd at `path` just below `limit`.
pub fn load_initrd(
    mem: &GuestRamMap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<LoadedInitrd, LoaderError> {
    let unreadable = |source| LoaderError::InitrdUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    let addr = initrd_placement(size, kernel_end, limit).ok_or(LoaderError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    })?;
    let len = usize::try_from(size).map_err(|_| LoaderError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    })?;
    read_into(mem, &mut file, addr, len).map_err(|source| LoaderError::InitrdLoad {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(LoadedInitrd { addr, size })
}

fn read_into<F: ReadVolatile>(
    mem: &GuestRamMap,
    src: &mut F,
    addr: u64,
    len: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.read_exact_volatile_from(GuestAddress(addr), src, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal x86_64 ELF with one PT_LOAD segment carrying `code` at `paddr`.
    pub fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        crate::testing::tiny_elf(paddr, code)
    }

    fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn probes_an_elf_kernel() {
        let f = write_tmp(&tiny_elf(0x20_0000, &[0xf4; 100]));
        let info = probe_kernel(f.path()).unwrap();
        assert_eq!(info.format, KernelFormat::Elf);
        assert_eq!(info.end, 0x20_0000 + 100);
    }

    #[test]
    fn refuses_garbage_and_short_files() {
        let f = write_tmp(&[0u8; 10]);
        let e = probe_kernel(f.path()).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
        let f = write_tmp(&[0x55u8; 4096]);
        let e = probe_kernel(f.path()).unwrap_err().to_string();
        assert!(e.contains("neither an ELF vmlinux nor a bzImage"), "{e}");
    }

    #[test]
    fn refuses_32_bit_and_foreign_elves() {
        let mut elf = tiny_elf(0x20_0000, &[0xf4]);
        elf[4] = 1; // ELFCLASS32
        let f = write_tmp(&elf);
        assert!(probe_kernel(f.path())
            .unwrap_err()
            .to_string()
            .contains("not 64-bit"));
        let mut elf = tiny_elf(0x20_0000, &[0xf4]);
        elf[18] = 183; // EM_AARCH64
        let f = write_tmp(&elf);
        assert!(probe_kernel(f.path())
            .unwrap_err()
            .to_string()
            .contains("not for x86_64"));
    }

    #[test]
    fn refuses_an_elf_below_1m() {
        let f = write_tmp(&tiny_elf(0x8000, &[0xf4]));
        assert!(probe_kernel(f.path())
            .unwrap_err()
            .to_string()
            .contains("below 1 MiB"));
    }

    #[test]
    fn probes_a_bzimage_header() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(&BZIMAGE_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes());
        let f = write_tmp(&img);
        let info = probe_kernel(f.path()).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage);
        assert_eq!(info.end, 0x180_0000);
        assert_eq!(info.initrd_addr_max, Some(0x7fff_ffff));
        // No 64-bit entry: refused.
        img[0x236] = 0;
        let f = write_tmp(&img);
        assert!(probe_kernel(f.path())
            .unwrap_err()
            .to_string()
            .contains("64-bit entry"));
        // Too old a protocol: refused.
        img[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
        let f = write_tmp(&img);
        assert!(probe_kernel(f.path())
            .unwrap_err()
            .to_string()
            .contains("predates"));
    }

    #[test]
    fn initrd_goes_to_the_top_page_aligned() {
        assert_eq!(
            initrd_placement(0x1800, 0x200_0000, 0x400_0000),
            Some(0x3ff_e000)
        );
        assert_eq!(initrd_placement(0x300_0000, 0x200_0000, 0x400_0000), None);
        assert_eq!(initrd_placement(u64::MAX, 0, 0x400_0000), None);
    }

    #[test]
    fn loads_an_elf_and_an_initrd() {
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let f = write_tmp(&tiny_elf(0x20_0000, &[0x90, 0xf4]));
        let info = probe_kernel(f.path()).unwrap();
        let k = load_kernel(&mem, f.path(), &info).unwrap();
        assert_eq!(k.entry, 0x20_0000);
        let b: u8 = mem.read_obj(GuestAddress(0x20_0001)).unwrap();
        assert_eq!(b, 0xf4);
        let initrd = write_tmp(&[7u8; 5000]);
        let r = load_initrd(&mem, initrd.path(), k.end, 32 << 20).unwrap();
        assert_eq!(r.size, 5000);
        assert_eq!(r.addr % PAGE_SIZE, 0);
        assert!(r.addr + r.size <= 32 << 20);
        let b: u8 = mem.read_obj(GuestAddress(r.addr + 4999)).unwrap();
        assert_eq!(b, 7);
        let big = write_tmp(&vec![0u8; 31 << 20]);
        assert!(matches!(
            load_initrd(&mem, big.path(), k.end, 32 << 20),
            Err(LoaderError::InitrdTooLarge { .. })
        ));
    }
}
