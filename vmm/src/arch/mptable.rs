//! The Intel MultiProcessor table (spec 1.4): how a guest without ACPI finds its CPUs, its IOAPIC and
//! how the ISA interrupt lines are wired.
//!
//! The floating pointer and the configuration table sit together at [`MPTABLE_START`], inside the BIOS
//! area Linux scans. Built as bytes (little-endian, as the spec lays them out) so that the layout is
//! checked by tests rather than by `repr(packed)` structs.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, BIOS_END, IOAPIC_PINS, IOAPIC_START, MPTABLE_START};
use crate::memory::GuestRamMap;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
/// CPU signature: family 6.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags: FPU and on-chip APIC.
const CPU_FEATURES: u32 = 0x001 | 0x200;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;
const BUS_ISA: u8 = 0;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More CPUs than APIC IDs the table can give.
    #[error("{0} vCPUs do not fit an MP table (1 to 254)")]
    TooManyCpus(u32),
    /// The table would run past the BIOS area.
    #[error("the MP table does not fit below 1 MiB")]
    TooLarge,
    /// The write into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP table's bytes for `num_cpus` CPUs, to be placed at `base`.
pub fn mptable_bytes(num_cpus: u32, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_FLAG_ENABLED | if cpu == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS as u8 {
        // ISA IRQ n wired to IOAPIC pin n, polarity and trigger conforming to the bus (edge, high).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            IRQ_TYPE_INT,
            0,
            0,
            BUS_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 of every local APIC is the 8259's ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        IRQ_TYPE_EXTINT,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        IRQ_TYPE_NMI,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUND    ");
    table.extend_from_slice(b"RUNDMICROVM ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((base + FLOATING_POINTER_LEN as u64) as u32).to_le_bytes());
    fp.push(1); // length in 16-byte paragraphs
    fp.push(MPC_SPEC_REV);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]); // no default configuration; IMCR absent
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    if base + fp.len() as u64 > BIOS_END {
        return Err(MpTableError::TooLarge);
    }
    Ok(fp)
}

/// Writes the MP table for `num_cpus` CPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestRamMap, num_cpus: u32) -> Result<(), MpTableError> {
    let bytes = mptable_bytes(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_are_zero() {
        for n in [1, 2, 31, 254] {
            let b = mptable_bytes(n, MPTABLE_START).unwrap();
            assert_eq!(sum(&b[..16]), 0, "floating pointer, {n} cpus");
            assert_eq!(sum(&b[16..]), 0, "config table, {n} cpus");
        }
    }

    #[test]
    fn layout_and_entries() {
        let b = mptable_bytes(2, MPTABLE_START).unwrap();
        assert_eq!(&b[..4], b"_MP_");
        let physptr = u32::from_le_bytes(b[4..8].try_into().unwrap());
        assert_eq!(u64::from(physptr), MPTABLE_START + 16);
        let t = &b[16..];
        assert_eq!(&t[..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        // 2 CPUs, 1 bus, 1 IOAPIC, 24 IRQs, 2 local interrupts.
        assert_eq!(u16::from_le_bytes([t[34], t[35]]), 2 + 1 + 1 + 24 + 2);
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        // First CPU: enabled bootstrap processor with APIC ID 0; second: enabled, APIC ID 1.
        let cpu0 = &t[44..64];
        assert_eq!(&cpu0[..4], &[0, 0, 0x14, 3]);
        let cpu1 = &t[64..84];
        assert_eq!(&cpu1[..4], &[0, 1, 0x14, 1]);
        assert_eq!(&t[84..92], b"\x01\x00ISA   ");
        // IOAPIC with the ID after the last CPU.
        assert_eq!(&t[92..96], &[2, 2, 0x11, 1]);
        assert_eq!(
            u32::from_le_bytes(t[96..100].try_into().unwrap()),
            0xfec0_0000
        );
        // IRQ 4 (COM1) is wired to IOAPIC pin 4.
        let irq4 = &t[100 + 4 * 8..100 + 5 * 8];
        assert_eq!(irq4, &[3, 0, 0, 0, 0, 4, 2, 4]);
        assert_eq!(&t[len - 16..len - 8], &[4, 3, 0, 0, 0, 0, 0xff, 0]);
        assert_eq!(&t[len - 8..], &[4, 1, 0, 0, 0, 0, 0xff, 1]);
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(matches!(
            mptable_bytes(0, MPTABLE_START),
            Err(MpTableError::TooManyCpus(0))
        ));
        assert!(matches!(
            mptable_bytes(255, MPTABLE_START),
            Err(MpTableError::TooManyCpus(255))
        ));
        assert!(matches!(
            mptable_bytes(254, 0xf_ff00),
            Err(MpTableError::TooLarge)
        ));
    }
}
