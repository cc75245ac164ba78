//! CPUID as the guest sees it: KVM's supported set, made to describe this VM's topology and to
//! announce KVM and its paravirtual features.
//!
//! The topology is one package of `count` cores with one thread each; vCPU `id` has APIC ID `id`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x4d];
/// The APIC timer runs at 1 GHz under KVM; leaf 0x40000010 reports it in kHz.
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Errors normalising CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The CPUID array is full.
    #[error("cannot add CPUID leaf {0:#x}: the entry array is full")]
    Full(u32),
    /// A topology KVM cannot express.
    #[error("vCPU {id} of {count} is not a valid topology position")]
    Topology {
        /// The vCPU.
        id: u32,
        /// The count.
        count: u32,
    },
}

/// CPU vendors whose topology leaves differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (and Hygon).
    Amd,
    /// Anything else.
    Other,
}

/// The vendor named by leaf 0.
pub fn vendor(cpuid: &CpuId) -> Vendor {
    match find(cpuid, LEAF_VENDOR, 0).map(|e| e.ebx) {
        Some(0x756e_6547) => Vendor::Intel,                   // "Genu"
        Some(0x6874_7541) | Some(0x6f67_7948) => Vendor::Amd, // "Auth", "Hygo"
        _ => Vendor::Other,
    }
}

fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn upsert(cpuid: &mut CpuId, entry: kvm_cpuid_entry2) -> Result<(), CpuidError> {
    if let Some(e) = cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == entry.function && e.index == entry.index)
    {
        *e = entry;
        return Ok(());
    }
    cpuid
        .push(entry)
        .map_err(|_| CpuidError::Full(entry.function))
}

fn remove_leaf(cpuid: &mut CpuId, function: u32) {
    cpuid.retain(|e| e.function != function);
}

/// Bits needed to number `count` things.
fn id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

/// What the normalised CPUID describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuTopology {
    /// This vCPU's index, which is also its APIC ID.
    pub id: u32,
    /// vCPUs in the VM.
    pub count: u32,
}

/// Rewrites `cpuid` (KVM_GET_SUPPORTED_CPUID's output) for one vCPU.
pub fn normalize(
    cpuid: &mut CpuId,
    topo: VcpuTopology,
    tsc_khz: Option<u32>,
    tsc_deadline: bool,
) -> Result<(), CpuidError> {
    let VcpuTopology { id, count } = topo;
    if count == 0 || id >= count || count > 255 {
        return Err(CpuidError::Topology { id, count });
    }
    let vendor = vendor(cpuid);
    let max_basic = find(cpuid, LEAF_VENDOR, 0).map_or(0, |e| e.eax);

    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // Brand index kept; CLFLUSH line 8 qwords; logical processor count; initial APIC ID.
                e.ebx = (e.ebx & 0xff) | (8 << 8) | (count << 16) | (id << 24);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                let level = (e.eax >> 5) & 0x7;
                // Cores per package minus one in [31:26]; threads sharing the cache minus one in
                // [25:14]: the last level is shared by every core, the others by one thread.
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            LEAF_EXT_FEATURES if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= ECX_AMD_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_AMD_CMP_LEGACY;
                }
            }
            LEAF_EXT_ADDRESS_SIZES if vendor == Vendor::Amd => {
                // Cores per package minus one, and the APIC ID bits that number them.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (id_bits(count) << 12);
            }
            LEAF_EXT_APIC_ID if vendor == Vendor::Amd => {
                e.eax = id;
                e.ebx = id & 0xff; // one thread per core: compute unit = core = id
                e.ecx = 0;
            }
            _ => {}
        }
    }

    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        remove_leaf(cpuid, leaf);
        if max_basic < leaf {
            continue;
        }
        let levels = [
            (0, 1, LEVEL_TYPE_SMT),
            (id_bits(count), count, LEVEL_TYPE_CORE),
            (0, 0, 0),
        ];
        for (index, (shift, logical, kind)) in levels.into_iter().enumerate() {
            let index = index as u32;
            upsert(
                cpuid,
                kvm_cpuid_entry2 {
                    function: leaf,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    eax: shift,
                    ebx: logical,
                    ecx: index | (kind << 8),
                    edx: id,
                    ..Default::default()
                },
            )?;
        }
    }

    let max_hv_leaf = if tsc_khz.is_some() {
        LEAF_HYPERVISOR_TIMING
    } else {
        LEAF_KVM_FEATURES
    };
    upsert(
        cpuid,
        kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: max_hv_leaf,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        },
    )?;
    if find(cpuid, LEAF_KVM_FEATURES, 0).is_none() {
        upsert(
            cpuid,
            kvm_cpuid_entry2 {
                function: LEAF_KVM_FEATURES,
                ..Default::default()
            },
        )?;
    }
    remove_leaf(cpuid, LEAF_HYPERVISOR_TIMING);
    if let Some(khz) = tsc_khz {
        upsert(
            cpuid,
            kvm_cpuid_entry2 {
                function: LEAF_HYPERVISOR_TIMING,
                eax: khz,
                ebx: KVM_APIC_BUS_KHZ,
                ..Default::default()
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn intel() -> CpuId {
        let entries = [
            entry(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x806c1, 0xdead_be01, 0x1, 0]),
            entry(4, 0, [0x121, 0, 0, 0]), // L1d
            entry(4, 1, [0x143, 0, 0, 0]), // L2
            entry(4, 2, [0x163, 0, 0, 0]), // L3
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0xb, 1, [4, 16, 0x201, 7]),
            entry(0x1f, 0, [1, 2, 0x100, 7]),
            entry(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            entry(0x4000_0001, 0, [0x1234, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *find(c, f, i).unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_flags() {
        let mut c = intel();
        normalize(&mut c, VcpuTopology { id: 1, count: 2 }, None, true).unwrap();
        let e = get(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 1, "APIC ID");
        assert_eq!((e.ebx >> 16) & 0xff, 2, "logical count");
        assert_eq!((e.ebx >> 8) & 0xff, 8, "CLFLUSH");
        assert_eq!(e.ebx & 0xff, 0x01, "brand index kept");
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e.edx & EDX_HTT, 0);

        let mut c = intel();
        normalize(&mut c, VcpuTopology { id: 0, count: 1 }, None, false).unwrap();
        let e = get(&c, 1, 0);
        assert_eq!(e.edx & EDX_HTT, 0);
        assert_eq!(e.ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn extended_topology_describes_one_package() {
        let mut c = intel();
        normalize(&mut c, VcpuTopology { id: 2, count: 3 }, None, false).unwrap();
        for leaf in [0xb, 0x1f] {
            let smt = get(&c, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            let core = get(&c, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
            let end = get(&c, leaf, 2);
            assert_eq!((end.ebx, end.ecx & 0xff00), (0, 0));
            assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        }
        assert_eq!(
            c.as_slice().iter().filter(|e| e.function == 0xb).count(),
            3,
            "old entries replaced"
        );
    }

    #[test]
    fn cache_leaves_share_only_the_last_level() {
        let mut c = intel();
        normalize(&mut c, VcpuTopology { id: 0, count: 4 }, None, false).unwrap();
        for (i, sharing) in [(0, 0), (1, 0), (2, 3)] {
            let e = get(&c, 4, i);
            assert_eq!(e.eax >> 26, 3, "cores per package - 1");
            assert_eq!((e.eax >> 14) & 0xfff, sharing);
            assert_eq!(e.eax & 0x3fff, get(&intel(), 4, i).eax & 0x3fff);
        }
    }

    #[test]
    fn kvm_leaves_and_tsc_frequency() {
        let mut c = intel();
        normalize(
            &mut c,
            VcpuTopology { id: 0, count: 1 },
            Some(2_100_000),
            false,
        )
        .unwrap();
        let hv = get(&c, 0x4000_0000, 0);
        assert_eq!(hv.eax, 0x4000_0010);
        let sig: Vec<u8> = [hv.ebx, hv.ecx, hv.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(get(&c, 0x4000_0001, 0).eax, 0x1234, "KVM features kept");
        let t = get(&c, 0x4000_0010, 0);
        assert_eq!((t.eax, t.ebx), (2_100_000, 1_000_000));

        let mut c = intel();
        normalize(&mut c, VcpuTopology { id: 0, count: 1 }, None, false).unwrap();
        assert_eq!(get(&c, 0x4000_0000, 0).eax, 0x4000_0001);
        assert!(find(&c, 0x4000_0010, 0).is_none());
    }

    #[test]
    fn amd_core_count_leaves() {
        let entries = [
            entry(0, 0, [0xa, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            entry(1, 0, [0, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0, 0]),
            entry(0x8000_0008, 0, [0x3030, 0, 0xffff_ffff, 0]),
            entry(0x8000_001e, 0, [9, 9, 9, 0]),
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        normalize(&mut c, VcpuTopology { id: 3, count: 4 }, None, false).unwrap();
        assert_eq!(vendor(&c), Vendor::Amd);
        assert_ne!(get(&c, 0x8000_0001, 0).ecx & ECX_AMD_CMP_LEGACY, 0);
        let e = get(&c, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xff, 3);
        assert_eq!((e.ecx >> 12) & 0xf, 2);
        assert_eq!(e.ecx & 0xffff_0000, 0xffff_0000, "other bits kept");
        let e = get(&c, 0x8000_001e, 0);
        assert_eq!((e.eax, e.ebx, e.ecx), (3, 3, 0));
        assert!(find(&c, 0xb, 0).is_none(), "max basic leaf 0xa has no 0xb");
    }

    #[test]
    fn bad_topology_is_refused() {
        let mut c = intel();
        assert!(normalize(&mut c, VcpuTopology { id: 2, count: 2 }, None, false).is_err());
        assert!(normalize(&mut c, VcpuTopology { id: 0, count: 0 }, None, false).is_err());
    }
}
