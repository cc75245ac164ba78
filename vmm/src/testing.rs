//! Hand-made guest payloads for tests and benchmarks: tiny long-mode programs wrapped in an ELF that the
//! VMM boots exactly as it boots a vmlinux. They run on any KVM host, including those whose /dev/kvm
//! cannot run a Linux guest.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Guest physical address where payloads are loaded and entered.
pub const PAYLOAD_ADDR: u64 = 0x20_0000;

/// A minimal x86_64 ELF64 executable with one `PT_LOAD` segment holding `code` at `paddr`, entered at
/// `paddr`.
pub fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut elf = vec![0u8; EHDR + PHDR];
    elf[..4].copy_from_slice(&[0x7f, b'E', b'L', b'F']);
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // little endian
    elf[6] = 1; // EV_CURRENT
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    elf[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut elf[EHDR..];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    let off = (EHDR + PHDR) as u64;
    ph[8..16].copy_from_slice(&off.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// A tiny assembler for the handful of instructions the payloads use.
#[derive(Default)]
pub struct Asm {
    code: Vec<u8>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }
    /// `mov dx, port`
    pub fn mov_dx(mut self, port: u16) -> Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self
    }
    /// `mov al, v`
    pub fn mov_al(mut self, v: u8) -> Self {
        self.code.extend_from_slice(&[0xb0, v]);
        self
    }
    /// `out dx, al`
    pub fn out_dx_al(mut self) -> Self {
        self.code.push(0xee);
        self
    }
    /// `in al, dx`
    pub fn in_al_dx(mut self) -> Self {
        self.code.push(0xec);
        self
    }
    /// Writes each byte of `s` to the serial port.
    pub fn print(mut self, s: &[u8]) -> Self {
        self = self.mov_dx(0x3f8);
        for &b in s {
            self = self.mov_al(b).out_dx_al();
        }
        self
    }
    /// `mov eax, [moffs64]`: a 32-bit load from a 64-bit absolute address (a 32-bit displacement
    /// would be sign-extended, turning 0x8000_0000 and up into kernel-half addresses).
    pub fn load_eax_abs(mut self, addr: u64) -> Self {
        self.code.push(0xa1);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// `mov [moffs64], eax`
    pub fn store_eax_abs(mut self, addr: u64) -> Self {
        self.code.push(0xa3);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// `mov eax, imm32`
    pub fn mov_eax(mut self, v: u32) -> Self {
        self.code.push(0xb8);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `mov dx, 0x3f8; out dx, al`: writes AL to the serial port.
    pub fn out_serial_al(self) -> Self {
        self.mov_dx(0x3f8).out_dx_al()
    }
    /// Resets the machine through the i8042 (`out 0x64, 0xfe`).
    pub fn i8042_reset(self) -> Self {
        self.mov_dx(0x64).mov_al(0xfe).out_dx_al()
    }
    /// `cli`
    pub fn cli(mut self) -> Self {
        self.code.push(0xfa);
        self
    }
    /// `hlt`
    pub fn hlt(mut self) -> Self {
        self.code.push(0xf4);
        self
    }
    /// `jmp $-N` back to the instruction `back` bytes before the end (a short jump).
    pub fn jmp_back(mut self, back: u8) -> Self {
        // rel8 is relative to the end of this 2-byte instruction.
        self.code
            .extend_from_slice(&[0xeb, 0u8.wrapping_sub(back).wrapping_sub(2)]);
        self
    }
    /// `xor ecx, ecx; div ecx`: a divide error.
    pub fn divide_by_zero(mut self) -> Self {
        self.code.extend_from_slice(&[0x31, 0xc9, 0xf7, 0xf1]);
        self
    }
    /// `lidt [abs32]`
    pub fn lidt_abs(mut self, addr: u32) -> Self {
        self.code.extend_from_slice(&[0x0f, 0x01, 0x1c, 0x25]);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// Raw machine code.
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.code.extend_from_slice(bytes);
        self
    }
    /// Current length, for computing jumps.
    pub fn len(&self) -> usize {
        self.code.len()
    }
    /// True when no instruction was emitted.
    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }
    /// The machine code.
    pub fn finish(self) -> Vec<u8> {
        self.code
    }
}

/// A serial console sink that tests can read back while the VM runs.
#[derive(Clone, Default)]
pub struct ConsoleBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for ConsoleBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        crate::devices::bus::lock(&self.0).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleBuffer {
    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        crate::devices::bus::lock(&self.0).clone()
    }
}

/// What a VM could leave behind in this process: open fds, VMM threads (named `rund-*`), and
/// mappings of guest RAM. Equal footprints before and after a VM mean it left nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct ProcessFootprint {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads named `rund-*` (vCPU and VMM threads); other threads come and go with the test harness.
    pub vmm_threads: usize,
    /// Guest RAM mappings: those marked `MADV_DONTDUMP` (`dd` in smaps), anonymous or a
    /// snapshot's memory file, which is how the VMM maps guest RAM.
    pub guest_ram_maps: usize,
}

impl ProcessFootprint {
    /// The footprint now.
    pub fn now() -> std::io::Result<Self> {
        let fds = std::fs::read_dir("/proc/self/fd")?.count();
        let mut vmm_threads = 0;
        for task in std::fs::read_dir("/proc/self/task")? {
            // A thread may end between listing and reading.
            if let Ok(name) = std::fs::read_to_string(task?.path().join("comm")) {
                vmm_threads += usize::from(name.starts_with("rund-"));
            }
        }
        let maps = procfs::process::Process::myself()
            .and_then(|p| p.smaps())
            .map_err(std::io::Error::other)?;
        let guest_ram_maps = maps
            .iter()
            .filter(|m| crate::memory::is_guest_ram(m))
            .count();
        Ok(ProcessFootprint {
            fds,
            vmm_threads,
            guest_ram_maps,
        })
    }

    /// The footprint once it equals `expected`, or as it is after a second. A joined thread can
    /// still be listed in /proc for a moment: join returns when the kernel clears the thread's tid,
    /// a little before the task is reaped.
    pub fn settled_to(expected: &ProcessFootprint) -> std::io::Result<Self> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let now = Self::now()?;
            if now == *expected || std::time::Instant::now() >= deadline {
                return Ok(now);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// The percentile `p` (0 to 1) of `sorted` (ascending, not empty), by the nearest rank of
/// `(len - 1) * p`: what the VMM's benchmarks report.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A duration in milliseconds, for printing.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
