//! Host-side VM setup time, from `Vm::new` to vCPU 0's first `KVM_RUN`, against the floor: the bare
//! KVM ioctls any VMM makes for the same VM (open /dev/kvm, create VM, one memory slot, TSS, irqchip,
//! PIT, vCPU, CPUID, registers, first `KVM_RUN`), in the fast order (memory slot before irqchip), in
//! the same run. Runs on any KVM host, PVM included: the guest is a hand-made payload.
//!
//! `cargo bench -p vmm --bench setup [-- RUNS]`

use std::io::Write;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};
use vmm::arch::regs::{boot_regs, boot_sregs, write_boot_tables};
use vmm::memory::map_ram;
use vmm::testing::{ms, percentile, tiny_elf, Asm, PAYLOAD_ADDR};
use vmm::{Vm, VmConfig};

const MEM_MIB: u32 = 128;

fn payload() -> Vec<u8> {
    // Halts forever (interrupts off): the host stops it.
    Asm::new().cli().hlt().jmp_back(2).finish()
}

/// One rund VM: setup time until vCPU 0 is about to enter KVM_RUN.
fn rund_setup(kernel: &std::path::Path) -> Duration {
    let mut config = VmConfig::new(kernel);
    config.mem_mib = MEM_MIB;
    let start = Instant::now();
    let handle = Vm::new(config)
        .expect("Vm::new")
        .start()
        .expect("Vm::start");
    let first = loop {
        if let Some(t) = handle.first_kvm_run() {
            break t;
        }
        std::thread::yield_now();
    };
    handle.shutdown();
    handle.wait();
    first - start
}

/// The floor: the same VM made with bare ioctls, first KVM_RUN on this thread.
fn floor_setup(code: &[u8]) -> Duration {
    let start = Instant::now();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let size = u64::from(MEM_MIB) << 20;
    // The same aligned, huge-page-advised RAM as the VMM's.
    let mem = map_ram(&[(GuestAddress(0), size as usize)]).unwrap();
    let region = mem.iter().next().unwrap();
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .unwrap();
    // SAFETY: the mapping lives in `mem` until after `vm` is dropped at the end of this function.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host as u64,
        })
    }
    .unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    mem.write_slice(code, GuestAddress(PAYLOAD_ADDR)).unwrap();
    write_boot_tables(&mem).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    vcpu.set_regs(&boot_regs(PAYLOAD_ADDR)).unwrap();
    let sregs = vcpu.get_sregs().unwrap();
    vcpu.set_sregs(&boot_sregs(sregs)).unwrap();
    let elapsed = start.elapsed();
    // Enter once so the work really is the same; the payload's first instruction exits... it halts
    // in-kernel, so ask for an immediate exit instead of waiting.
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    elapsed
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let code = payload();
    let mut kernel = tempfile::NamedTempFile::new().unwrap();
    kernel.write_all(&tiny_elf(PAYLOAD_ADDR, &code)).unwrap();
    // Warm up both paths (page cache, first-touch costs), then interleave so noise hits both alike.
    rund_setup(kernel.path());
    floor_setup(&code);
    let (mut rund, mut floor) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        rund.push(rund_setup(kernel.path()));
        floor.push(floor_setup(&code));
    }
    rund.sort();
    floor.sort();
    let (r50, r99) = (percentile(&rund, 0.5), percentile(&rund, 0.99));
    let (f50, f99) = (percentile(&floor, 0.5), percentile(&floor, 0.99));
    println!("bench-boot (a): host-side setup, Vm::new to first KVM_RUN, {runs} runs, {MEM_MIB} MiB, 1 vCPU");
    println!("  rund   p50 {:7.3} ms   p99 {:7.3} ms", ms(r50), ms(r99));
    println!(
        "  floor  p50 {:7.3} ms   p99 {:7.3} ms   (bare ioctls, same order, same run)",
        ms(f50),
        ms(f99)
    );
    println!(
        "  ratio rund/floor: p50 {:.2}x   p99 {:.2}x   (target: within 1.5x)",
        ms(r50) / ms(f50),
        ms(r99) / ms(f99)
    );
}
