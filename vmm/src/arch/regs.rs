//! The state a vCPU starts in for the 64-bit boot protocol: long mode with an identity map, flat
//! segments, the zero page in RSI; plus the FPU, boot MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PD_COUNT, BOOT_STACK_POINTER, PDPT_START, PD_START,
    PML4_START, ZERO_PAGE_START,
};
use crate::memory::GuestRamMap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables failed.
    #[error("cannot write the boot {0} into guest memory")]
    WriteTables(&'static str, #[source] vm_memory::GuestMemoryError),
    /// A KVM vCPU ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    MsrsPartial {
        /// Accepted.
        set: usize,
        /// Given.
        wanted: usize,
    },
    /// The MSR list could not be built.
    #[error("cannot build the boot MSR list")]
    MsrList,
}

/// A GDT entry from its flags, base and limit (as in the kernel's `GDT_ENTRY`).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The KVM segment described by GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0x000f_0000_0000_0000) >> 32 | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT, the (empty) IDT and the identity-mapping page tables for the first 4 GiB.
pub fn write_boot_tables(mem: &GuestRamMap) -> Result<(), RegsError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|e| RegsError::WriteTables("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| RegsError::WriteTables("IDT", e))?;
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| RegsError::WriteTables("page tables", e))
    };
    w(PML4_START, PDPT_START | PAGE_PRESENT_RW)?;
    for pd in 0..BOOT_PD_COUNT {
        let pd_addr = PD_START + pd * 0x1000;
        w(PDPT_START + pd * 8, pd_addr | PAGE_PRESENT_RW)?;
        let mut table = [0u8; 4096];
        for (j, slot) in table.chunks_exact_mut(8).enumerate() {
            let phys = ((pd << 9) + j as u64) << 21;
            slot.copy_from_slice(&(phys | PAGE_PRESENT_RW | PAGE_HUGE).to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd_addr))
            .map_err(|e| RegsError::WriteTables("page tables", e))?;
    }
    Ok(())
}

/// Long-mode special registers on top of KVM's defaults.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the kernel's 64-bit entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The MSRs a kernel expects to find initialised.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

fn set_lvt(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// Puts a vCPU in the boot state: registers, special registers, FPU, MSRs and LAPIC LINT pins.
/// Application processors get the same; KVM keeps them waiting for INIT/SIPI regardless.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("KVM_SET_FPU", e))?;
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::MsrList)?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(RegsError::MsrsPartial {
            set,
            wanted: entries.len(),
        });
    }
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|e| RegsError::Kvm("KVM_SET_REGS", e))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("KVM_GET_SREGS", e))?;
    vcpu.set_sregs(&boot_sregs(sregs))
        .map_err(|e| RegsError::Kvm("KVM_SET_SREGS", e))?;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(code.selector, 8);
        assert_eq!((code.base, code.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code.l, code.db, code.present, code.s, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((data.selector, data.db, data.l, data.type_), (16, 1, 0, 3));
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tss.selector, tss.s, tss.type_), (24, 0, 0xb));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let r = boot_regs(0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
        for pd in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPT_START + pd * 8)).unwrap();
            assert_eq!(pdpte, (PD_START + pd * 0x1000) | 3);
            let last: u64 = mem
                .read_obj(GuestAddress(PD_START + pd * 0x1000 + 511 * 8))
                .unwrap();
            assert_eq!(last, (((pd + 1) << 30) - (2 << 20)) | 0x83);
        }
        // 0xd0000000 (the MMIO gap) is mapped to itself.
        let e: u64 = mem
            .read_obj(GuestAddress(PD_START + 3 * 0x1000 + 0x80 * 8))
            .unwrap();
        assert_eq!(e & !0xfff, 0xd000_0000);
    }

    #[test]
    fn lvt_mode_is_set_without_touching_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_lvt(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
