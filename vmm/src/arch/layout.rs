//! Where things sit in guest physical memory (x86_64).
//!
//! Low memory holds the boot structures the VMM writes before the first `KVM_RUN`; the kernel and initrd
//! go above 1 MiB; the MMIO gap below 4 GiB holds the virtio-mmio devices, so RAM past its start is
//! placed above 4 GiB.

/// GDT written for the 64-bit boot protocol.
pub const BOOT_GDT_START: u64 = 0x500;
/// A single null IDT entry: any exception before the kernel sets its own IDT triple-faults.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, then one PDPT, then [`BOOT_PD_COUNT`] page directories.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPT_START: u64 = 0xa000;
/// First of the page directories (2 MiB pages) of the boot identity map.
pub const PD_START: u64 = 0xb000;
/// The boot identity map covers 4 GiB, so that hand-made payloads can reach the MMIO gap too.
pub const BOOT_PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length, NUL included (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the end-of-base-memory reserved area (EBDA); RAM below 640 KiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table sits in the BIOS area, which Linux scans for the MP floating pointer; it leaves room
/// for the largest vCPU count we allow.
pub const MPTABLE_START: u64 = 0xf0000;
/// End of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// High memory: the kernel may not be loaded below this.
pub const HIMEM_START: u64 = 0x10_0000;
/// Default physical load address of a relocatable kernel (`CONFIG_PHYSICAL_START`).
pub const KERNEL_DEFAULT_LOAD: u64 = 0x100_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap (4 GiB): RAM beyond the gap's start resumes here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// The TSS area KVM needs on Intel hosts (three pages below the IOAPIC-free top of the gap).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI handed to virtio-mmio devices (0-4 are legacy: timer, keyboard, cascade, COM2, COM1).
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// The serial console's IRQ (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// Base I/O port of COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// The i8042 keyboard controller's ports: data at 0x60, command/status at 0x64.
pub const I8042_PORT_BASE: u16 = 0x60;
