//! Building a VM, two ways on shared steps: [`cold_boot`] makes fresh RAM, loads the kernel and
//! sets the boot vCPU up; [`restore`] maps a snapshot's memory file copy-on-write and puts every
//! saved state back. Both create the VM with its memory slots before the irqchip, attach the
//! legacy and virtio devices and create the vCPUs the same way; neither runs guest code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot_params::{build_boot_params, e820_map, write_boot_params, BootParamsSpec};
use crate::arch::cpuid::{normalize, VcpuTopology};
use crate::arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, I8042_PORT_BASE, KVM_TSS_ADDRESS, MMIO_GAP_START, SERIAL_IRQ,
    SERIAL_PORT_BASE,
};
use crate::arch::mptable::setup_mptable;
use crate::arch::regs::{configure_boot_vcpu, write_boot_tables};
use crate::config::{MmioSlot, SerialOutput, VirtioDeviceHandle, VmConfig, MAX_VCPUS_MP_TABLE};
use crate::devices::bus::{lock, Bus};
use crate::devices::legacy::{ResetController, SerialConsole};
use crate::devices::virtio::mmio::{reg, MmioTransport, MMIO_WINDOW_SIZE};
use crate::exit::ExitSignal;
use crate::loader::{load_initrd, load_kernel};
use crate::memory::GuestRam;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::state::VmState;
use crate::vcpu::{apply_state, Vcpu, VcpuControl};
use crate::vm::{kvm, new_eventfd, Vm, VmError};

/// What a restore needs besides the snapshot: the new VM's backends. Every device the snapshot
/// holds must be given, by [`state_key`](crate::devices::virtio::VirtioDevice::state_key), in
/// any order (each goes back into the slot the guest knows it at), with the same settings; a
/// snapshot taken before the guest mounted a share or opened a connection is the kind that
/// restores (see the templates crate).
pub struct RestoreSpec {
    /// The snapshot directory ([`VmHandle::snapshot`](crate::VmHandle::snapshot) wrote it).
    pub snapshot: PathBuf,
    /// Where the restored guest's console goes.
    pub serial: SerialOutput,
    /// The new VM's devices (its vsock socket, its writable-layer file, its shares).
    pub devices: Vec<VirtioDeviceHandle>,
}

fn open_kvm() -> Result<(Kvm, u32), VmError> {
    let kvm_sys = Kvm::new().map_err(kvm("opening /dev/kvm"))?;
    let max_vcpus = u32::try_from(kvm_sys.get_max_vcpus()).unwrap_or(u32::MAX);
    Ok((kvm_sys, max_vcpus))
}

/// The VM with its RAM in memory slots, then the TSS, the irqchip and the PIT. Slots go first:
/// KVM_SET_USER_MEMORY_REGION costs ~7 ms once an irqchip exists and ~0.1 ms before (measured on
/// the build machines).
fn create_vm(kvm_sys: &Kvm, ram: &GuestRam) -> Result<VmFd, VmError> {
    let vm_fd = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    for (slot, region) in ram.memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::State(format!("guest memory region: {e}")))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `len()` bytes owned by `ram`, which outlives
        // the VM fd: the VMM thread closes the VM fd before it unmaps guest memory.
        unsafe { vm_fd.set_user_memory_region(desc) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm("KVM_SET_TSS_ADDR"))?;
    vm_fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
    Ok(vm_fd)
}

/// The console (made by `make_serial` from its interrupt line) and the reset line on port I/O.
fn legacy_devices(
    vm_fd: &VmFd,
    exit: &Arc<ExitSignal>,
    make_serial: impl FnOnce(EventFd) -> Result<SerialConsole, VmError>,
) -> Result<(Bus, Arc<Mutex<SerialConsole>>), VmError> {
    let serial_irq = new_eventfd()?;
    vm_fd
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm("KVM_IRQFD"))?;
    let serial = Arc::new(Mutex::new(make_serial(serial_irq)?));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), u64::from(SERIAL_PORT_BASE), 8)?;
    pio.insert(
        Arc::new(Mutex::new(ResetController::new(exit.clone()))),
        u64::from(I8042_PORT_BASE),
        5,
    )?;
    Ok((pio, serial))
}

/// A virtio-mmio transport as the bus and the VMM share it.
type SharedTransport = Arc<Mutex<MmioTransport>>;

/// Each device on its virtio-mmio window at `slots[i]`: notifications by ioeventfd, interrupts
/// by irqfd.
fn virtio_devices(
    vm_fd: &VmFd,
    ram: &GuestRam,
    devices: &[VirtioDeviceHandle],
    slots: &[MmioSlot],
) -> Result<(Bus, Vec<SharedTransport>), VmError> {
    let mut mmio = Bus::new();
    let mut transports = Vec::with_capacity(devices.len());
    for (device, slot) in devices.iter().zip(slots) {
        let irq = new_eventfd()?;
        vm_fd
            .register_irqfd(&irq, slot.irq)
            .map_err(kvm("KVM_IRQFD"))?;
        let transport = MmioTransport::new(device.clone(), ram.memory.clone(), irq)?;
        for (queue, notify) in transport.queue_notifiers().iter().enumerate() {
            vm_fd
                .register_ioevent(
                    notify,
                    &IoEventAddress::Mmio(slot.base + reg::QUEUE_NOTIFY),
                    queue as u32,
                )
                .map_err(kvm("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), slot.base, MMIO_WINDOW_SIZE)?;
        transports.push(transport);
    }
    Ok((mmio, transports))
}

/// The buses, the exit signal and the vCPU control the vCPUs share.
struct VcpuShared {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    control: Arc<VcpuControl>,
    msr_indices: Arc<Vec<u32>>,
}

/// `count` vCPUs, each set up by `setup` (boot registers, or a saved state) after creation.
fn create_vcpus(
    vm_fd: &VmFd,
    count: u32,
    shared: &VcpuShared,
    mut setup: impl FnMut(u32, &VcpuFd) -> Result<(), VmError>,
) -> Result<Vec<Vcpu>, VmError> {
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let fd = vm_fd
            .create_vcpu(u64::from(index))
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        setup(index, &fd)?;
        vcpus.push(Vcpu::new(
            index,
            fd,
            shared.pio.clone(),
            shared.mmio.clone(),
            shared.exit.clone(),
            shared.control.clone(),
            shared.msr_indices.clone(),
        ));
    }
    Ok(vcpus)
}

fn vcpu_shared(
    kvm_sys: &Kvm,
    count: u32,
    (pio, mmio): (Bus, Bus),
    exit: Arc<ExitSignal>,
) -> Result<VcpuShared, VmError> {
    Ok(VcpuShared {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit,
        control: Arc::new(VcpuControl::new(count as usize)),
        msr_indices: Arc::new(
            kvm_sys
                .get_msr_index_list()
                .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice()
                .to_vec(),
        ),
    })
}

/// Puts back the VM-wide state: the kvm-clock (its value only: the flags say how it was read),
/// the PIT, the irqchips, then each transport (which reactivates the devices that were serving).
pub(crate) fn put_vm_state(
    vm_fd: &VmFd,
    state: &VmState,
    transports: &[SharedTransport],
) -> Result<(), VmError> {
    if state.transports.len() != transports.len() {
        return Err(VmError::State(format!(
            "{} virtio transports saved, {} present",
            state.transports.len(),
            transports.len()
        )));
    }
    if state.irqchips.len() != 3 {
        return Err(VmError::State(format!(
            "{} irqchips saved, 3 expected",
            state.irqchips.len()
        )));
    }
    let mut clock = state.clock;
    clock.flags = 0;
    vm_fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    vm_fd.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    for chip in &state.irqchips {
        vm_fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    for (i, (transport, saved)) in transports.iter().zip(&state.transports).enumerate() {
        lock(transport)
            .restore(saved)
            .map_err(|e| VmError::State(format!("virtio device {i}: {e}")))?;
    }
    Ok(())
}

/// Each device's key in a snapshot's layout: its own, numbered from the second of a kind on
/// (`blk`, `blk#1`).
pub(crate) fn device_keys(devices: &[VirtioDeviceHandle]) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    devices
        .iter()
        .map(|d| {
            let key = lock(d).state_key();
            let n = seen.entry(key.clone()).or_insert(0);
            let numbered = if *n == 0 { key } else { format!("{key}#{n}") };
            *n += 1;
            numbered
        })
        .collect()
}

/// A VM that boots `config`'s kernel.
pub(crate) fn cold_boot(config: VmConfig) -> Result<Vm, VmError> {
    let (kvm_sys, max_vcpus) = open_kvm()?;
    let valid = config.validate(max_vcpus)?;
    let ram = GuestRam::new(u64::from(config.mem_mib) << 20)?;
    let vm_fd = create_vm(&kvm_sys, &ram)?;

    // Guest memory contents: kernel, initrd, command line, zero page, MP table, boot tables.
    let mem = &ram.memory;
    let kernel = load_kernel(mem, &config.kernel, &valid.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => {
            let mut limit = ram.low_end().min(MMIO_GAP_START);
            if let Some(max) = valid.kernel.initrd_addr_max {
                limit = limit.min(max.saturating_add(1));
            }
            Some(load_initrd(mem, path, kernel.end, limit)?)
        }
        None => None,
    };
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| VmError::Cmdline(e.to_string()))?;
    if !valid.cmdline.is_empty() {
        cmdline
            .insert_str(&valid.cmdline)
            .map_err(|e| VmError::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| VmError::Cmdline(e.to_string()))?;
    let e820 = e820_map(&ram.regions);
    let params = build_boot_params(&BootParamsSpec {
        setup_header: kernel.setup_header,
        cmdline_size: valid.cmdline.len() as u32 + 1,
        initrd: initrd.map(|i| (i.addr, i.size)),
        e820: &e820,
    })?;
    write_boot_params(mem, &params)?;
    setup_mptable(mem, config.vcpus)?;
    write_boot_tables(mem)?;

    let exit = Arc::new(ExitSignal::new().map_err(VmError::EventFd)?);
    let serial_out = config.serial.open()?;
    let (pio, serial) =
        legacy_devices(&vm_fd, &exit, |irq| Ok(SerialConsole::new(irq, serial_out)))?;
    let (mmio, transports) = virtio_devices(&vm_fd, &ram, &config.devices, &valid.slots)?;
    let shared = vcpu_shared(&kvm_sys, config.vcpus, (pio, mmio), exit)?;

    let supported = kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm_sys.check_extension(Cap::TscDeadlineTimer);
    let vcpus = create_vcpus(&vm_fd, config.vcpus, &shared, |index, fd| {
        let mut cpuid = supported.clone();
        let tsc_khz = fd.get_tsc_khz().ok().filter(|&k| k > 0);
        normalize(
            &mut cpuid,
            VcpuTopology {
                id: index,
                count: config.vcpus,
            },
            tsc_khz,
            tsc_deadline,
        )?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        configure_boot_vcpu(fd, kernel.entry)?;
        Ok(())
    })?;

    Ok(Vm {
        vm_fd,
        ram,
        vcpus,
        serial,
        transports,
        devices: config.devices,
        exit: shared.exit,
        control: shared.control,
    })
}

/// The given devices in the snapshot's slot order, or what does not match.
fn in_saved_order(
    snapshot: &Snapshot,
    devices: Vec<VirtioDeviceHandle>,
) -> Result<Vec<VirtioDeviceHandle>, VmError> {
    let keys = device_keys(&devices);
    let saved: Vec<&str> = snapshot.devices.iter().map(|d| d.key.as_str()).collect();
    let mut given: HashMap<String, VirtioDeviceHandle> =
        keys.iter().cloned().zip(devices).collect();
    let mismatch = || {
        let mut keys = keys.clone();
        keys.sort();
        VmError::Devices {
            saved: saved.join(", "),
            given: keys.join(", "),
        }
    };
    if given.len() != saved.len() {
        return Err(mismatch());
    }
    let mut ordered = Vec::with_capacity(saved.len());
    for d in &snapshot.devices {
        let device = given.remove(&d.key).ok_or_else(mismatch)?;
        let device_type = lock(&device).device_type();
        if device_type != d.device_type {
            return Err(mismatch());
        }
        ordered.push(device);
    }
    Ok(ordered)
}

/// A restore's first half, which needs none of the new VM's backends: the snapshot read and
/// checked, its memory file mapped copy-on-write, the KVM VM made with its memory slots, irqchip
/// and PIT. A caller makes it while it sets the backends up ([`Vm::prepare_restore`]); dropping
/// it frees all of it.
pub struct PreparedRestore {
    dir: PathBuf,
    snapshot: Snapshot,
    kvm_sys: Kvm,
    vm_fd: VmFd,
    ram: GuestRam,
}

impl std::fmt::Debug for PreparedRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedRestore")
            .field("snapshot", &self.dir)
            .field("vcpus", &self.snapshot.vcpus)
            .field("mem_size", &self.snapshot.mem_size)
            .finish_non_exhaustive()
    }
}

/// When a restored VM's page tables get the template's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplatePages {
    /// As the guest first touches each (each touch a host page fault under KVM's).
    OnTouch,
    /// All of them while the restore is prepared ([`GuestRam::map_file_pages`]): not copied,
    /// holes left alone.
    MapAhead,
}

/// The first half of a restore of the snapshot in `dir`.
pub(crate) fn prepare_restore(
    dir: &Path,
    pages: TemplatePages,
) -> Result<PreparedRestore, VmError> {
    let snapshot = Snapshot::read(dir)?;
    let (kvm_sys, max_vcpus) = open_kvm()?;
    let max = max_vcpus.min(MAX_VCPUS_MP_TABLE);
    if snapshot.vcpus > max {
        return Err(VmError::Snapshot(SnapshotError::Inconsistent {
            path: dir.to_owned(),
            what: format!("{} vCPUs; this host allows {max}", snapshot.vcpus),
        }));
    }
    let memory_file = snapshot.open_memory(dir)?;
    let ram = GuestRam::from_file(snapshot.mem_size, &memory_file)?;
    if pages == TemplatePages::MapAhead {
        let mapped = ram.map_file_pages(&memory_file);
        log::debug!("{} KiB of template pages mapped ahead", mapped >> 10);
    }
    drop(memory_file);
    let vm_fd = create_vm(&kvm_sys, &ram)?;
    Ok(PreparedRestore {
        dir: dir.to_owned(),
        snapshot,
        kvm_sys,
        vm_fd,
        ram,
    })
}

/// A VM that goes on from the snapshot `spec` names, with `spec`'s backends.
pub(crate) fn restore(spec: RestoreSpec) -> Result<Vm, VmError> {
    prepare_restore(&spec.snapshot, TemplatePages::OnTouch)?.finish(spec.serial, spec.devices)
}

impl PreparedRestore {
    /// The snapshot directory this restore reads.
    pub fn snapshot_dir(&self) -> &Path {
        &self.dir
    }

    /// The second half: the new VM's devices on `devices` (see [`RestoreSpec`]) and every
    /// saved state put back. No guest code runs until [`Vm::start`].
    pub fn finish(
        self,
        serial: SerialOutput,
        devices: Vec<VirtioDeviceHandle>,
    ) -> Result<Vm, VmError> {
        let PreparedRestore {
            snapshot,
            kvm_sys,
            vm_fd,
            ram,
            ..
        } = self;
        let devices = in_saved_order(&snapshot, devices)?;
        let exit = Arc::new(ExitSignal::new().map_err(VmError::EventFd)?);
        let serial_out = serial.open()?;
        let (pio, serial) = legacy_devices(&vm_fd, &exit, |irq| {
            SerialConsole::restored(irq, serial_out, &snapshot.serial).map_err(VmError::Serial)
        })?;
        let slots: Vec<MmioSlot> = (0..devices.len()).map(MmioSlot::nth).collect();
        let (mmio, transports) = virtio_devices(&vm_fd, &ram, &devices, &slots)?;
        let shared = vcpu_shared(&kvm_sys, snapshot.vcpus, (pio, mmio), exit)?;

        put_vm_state(&vm_fd, &snapshot.vm, &transports)?;
        let states = &snapshot.vm.vcpus;
        let vcpus = create_vcpus(&vm_fd, snapshot.vcpus, &shared, |index, fd| {
            apply_state(fd, index, &states[index as usize])?;
            Ok(())
        })?;
        // The host side of the guest's connections is gone; and every queue is looked at once more
        // when the event loop starts: with EVENT_IDX, a buffer the guest added just before the
        // snapshot would otherwise wait for a kick that already happened (Firecracker #5969).
        for (device, transport) in devices.iter().zip(&transports) {
            lock(device).restored();
            for notify in lock(transport).queue_notifiers() {
                notify.write(1).map_err(VmError::EventFd)?;
            }
        }
        Ok(Vm {
            vm_fd,
            ram,
            vcpus,
            serial,
            transports,
            devices,
            exit: shared.exit,
            control: shared.control,
        })
    }
}
