//! Building a microVM and running it: [`Vm::new`] makes everything (memory, irqchip, kernel, devices,
//! vCPUs) without running guest code; [`Vm::start`] starts the vCPU threads and the VMM thread and
//! returns a [`VmHandle`] to steer and wait for it.
//!
//! The VMM thread runs the event loop (device queue notifications, host commands, the exit signal)
//! and owns the VM: when the VM ends it stops and joins the vCPUs and closes everything, so that after
//! [`VmHandle::wait`] no fd, thread or mapping of the VM remains in the process.

use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::boot_params::{
    build_boot_params, e820_map, write_boot_params, BootParamsError, BootParamsSpec,
};
use crate::arch::cpuid::{normalize, CpuidError, VcpuTopology};
use crate::arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, I8042_PORT_BASE, KVM_TSS_ADDRESS, MMIO_GAP_START, SERIAL_IRQ,
    SERIAL_PORT_BASE,
};
use crate::arch::mptable::{setup_mptable, MpTableError};
use crate::arch::regs::{configure_boot_vcpu, write_boot_tables, RegsError};
use crate::config::{ConfigError, VirtioDeviceHandle, VmConfig};
use crate::devices::bus::{lock, Bus, BusError};
use crate::devices::legacy::{ResetController, SerialConsole};
use crate::devices::virtio::mmio::{reg, MmioError, MmioTransport, MMIO_WINDOW_SIZE};
use crate::exit::{ExitSignal, VmExit};
use crate::loader::{load_initrd, load_kernel, LoaderError};
use crate::memory::{GuestRam, MemoryError};
use crate::state::VmState;
use crate::vcpu::{install_kick_handler, kick_signal, Vcpu, VcpuControl, VcpuError};

/// How long a pause waits for all vCPUs before giving up, and how often it kicks them meanwhile.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const PAUSE_KICK_INTERVAL: Duration = Duration::from_millis(100);

/// Errors building, starting or steering a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A KVM system or VM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be made.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel or initrd could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The command line could not be built or written.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The zero page could not be written.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// A vCPU's boot state could not be set.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// CPUID could not be normalised.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A virtio transport could not be made.
    #[error(transparent)]
    Mmio(#[from] MmioError),
    /// vCPU state handling failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// The VM has ended.
    #[error("the VM is not running")]
    NotRunning,
    /// The operation needs a paused VM.
    #[error("the VM is not paused")]
    NotPaused,
    /// The vCPUs did not all stop in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// Reading or putting back state failed.
    #[error("VM state: {0}")]
    State(String),
}

/// A built VM whose guest has not run yet.
pub struct Vm {
    vm_fd: VmFd,
    ram: GuestRam,
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialConsole>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    devices: Vec<VirtioDeviceHandle>,
    exit: Arc<ExitSignal>,
    control: Arc<VcpuControl>,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(op, e)
}

fn new_eventfd() -> Result<EventFd, VmError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmError::EventFd)
}

impl Vm {
    /// Builds the VM described by `config`. No guest code runs until [`Vm::start`].
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let kvm_sys = Kvm::new().map_err(kvm("opening /dev/kvm"))?;
        let max_vcpus = u32::try_from(kvm_sys.get_max_vcpus()).unwrap_or(u32::MAX);
        let valid = config.validate(max_vcpus)?;
        let vm_fd = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;

        // Memory slots first: KVM_SET_USER_MEMORY_REGION costs ~7 ms once an irqchip exists and
        // ~0.1 ms before (measured on the build machines).
        let ram = GuestRam::new(u64::from(config.mem_mib) << 20)?;
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
            unsafe { vm_fd.set_user_memory_region(desc) }
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
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

        // Legacy devices on port I/O.
        let exit = Arc::new(ExitSignal::new().map_err(VmError::EventFd)?);
        let serial_irq = new_eventfd()?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq,
            config.serial.open()?,
        )));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), u64::from(SERIAL_PORT_BASE), 8)?;
        pio.insert(
            Arc::new(Mutex::new(ResetController::new(exit.clone()))),
            u64::from(I8042_PORT_BASE),
            5,
        )?;

        // Virtio devices on MMIO: notifications by ioeventfd, interrupts by irqfd.
        let mut mmio = Bus::new();
        let mut transports = Vec::with_capacity(config.devices.len());
        for (device, slot) in config.devices.iter().zip(&valid.slots) {
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

        // vCPUs.
        let control = Arc::new(VcpuControl::new(config.vcpus as usize));
        let supported = kvm_sys
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm_sys.check_extension(Cap::TscDeadlineTimer);
        let msr_indices = Arc::new(
            kvm_sys
                .get_msr_index_list()
                .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice()
                .to_vec(),
        );
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm("KVM_CREATE_VCPU"))?;
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
            configure_boot_vcpu(&fd, kernel.entry)?;
            vcpus.push(Vcpu::new(
                index,
                fd,
                pio.clone(),
                mmio.clone(),
                exit.clone(),
                control.clone(),
                msr_indices.clone(),
            ));
        }

        Ok(Vm {
            vm_fd,
            ram,
            vcpus,
            serial,
            transports,
            devices: config.devices,
            exit,
            control,
        })
    }

    /// Starts the vCPU threads and the VMM thread.
    pub fn start(self) -> Result<VmHandle, VmError> {
        install_kick_handler()?;
        let Vm {
            vm_fd,
            ram,
            vcpus,
            serial,
            transports,
            devices,
            exit,
            control,
        } = self;
        let (commands, command_rx) = mpsc::channel();
        let wake = Arc::new(new_eventfd()?);
        let finished = Arc::new((Mutex::new(None), Condvar::new()));
        let mut vcpu_threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let index = vcpu_threads.len();
            let spawned = std::thread::Builder::new()
                .name(format!("rund-vcpu-{index}"))
                .spawn(move || vcpu.run_loop());
            match spawned {
                Ok(t) => vcpu_threads.push(t),
                Err(e) => {
                    stop_vcpus(&control, &mut vcpu_threads);
                    return Err(VmError::Thread("vCPU", e));
                }
            }
        }
        let device_handles = devices.clone();
        let runtime = VmRuntime {
            vcpu_threads,
            commands: command_rx,
            transports,
            devices,
            serial,
            vm_fd,
            _ram: ram,
            exit: exit.clone(),
            control: control.clone(),
            wake: wake.clone(),
            paused: false,
            finished: finished.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("rund-vmm".into())
            .spawn(move || runtime.run());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                // The runtime was moved into the failed closure and dropped, which stopped the vCPUs.
                return Err(VmError::Thread("VMM", e));
            }
        };
        Ok(VmHandle {
            exit,
            control,
            commands,
            wake,
            finished,
            thread: Some(thread),
            devices: device_handles,
        })
    }
}

fn kick_all(threads: &[JoinHandle<()>]) {
    for t in threads {
        // A thread that already left its loop has nothing to interrupt.
        let _ = t.kill(kick_signal());
    }
}

fn stop_vcpus(control: &VcpuControl, threads: &mut Vec<JoinHandle<()>>) {
    control.request_stop();
    kick_all(threads);
    for t in threads.drain(..) {
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

enum Command {
    Pause,
    Resume,
    SaveState,
    RestoreState(Box<VmState>),
}

enum Reply {
    Done,
    State(Box<VmState>),
}

type CommandReply = mpsc::Sender<Result<Reply, VmError>>;

/// Wakes the event loop for a command or the end of the VM; the loop itself does the work.
struct Wakeup {
    exit: Arc<ExitSignal>,
    commands: Arc<EventFd>,
}

impl MutEventSubscriber for Wakeup {
    fn process(&mut self, events: Events, _: &mut EventOps) {
        // Reading resets the counter; the value is not needed.
        if events.fd() == self.commands.as_raw_fd() {
            let _ = self.commands.read();
        } else {
            let _ = self.exit.eventfd().read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit.eventfd(), &*self.commands] {
            if let Err(e) = ops.add(Events::new(fd, event_manager::EventSet::IN)) {
                log::error!("VMM event loop: cannot watch an eventfd: {e:?}");
            }
        }
    }
}

/// Everything the VMM thread owns while the VM runs. Dropping it tears the VM down: `Drop` stops the
/// vCPUs, then the fields go in declaration order, devices before the VM fd before guest memory.
struct VmRuntime {
    vcpu_threads: Vec<JoinHandle<()>>,
    commands: mpsc::Receiver<(Command, CommandReply)>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    devices: Vec<VirtioDeviceHandle>,
    serial: Arc<Mutex<SerialConsole>>,
    // The VM fd goes before the memory it maps (see the SAFETY note in `Vm::new`); the memory is
    // only held, never read, here.
    vm_fd: VmFd,
    _ram: GuestRam,
    exit: Arc<ExitSignal>,
    control: Arc<VcpuControl>,
    wake: Arc<EventFd>,
    paused: bool,
    finished: Arc<(Mutex<Option<VmExit>>, Condvar)>,
}

impl VmRuntime {
    fn run(mut self) -> VmExit {
        let reason = self.event_loop();
        let finished = self.finished.clone();
        drop(self);
        let (slot, cond) = &*finished;
        *lock(slot) = Some(reason.clone());
        cond.notify_all();
        reason
    }

    fn event_loop(&mut self) -> VmExit {
        let mut em = match EventManager::<Box<dyn MutEventSubscriber + Send>>::new() {
            Ok(em) => em,
            Err(e) => return VmExit::Error(format!("cannot create the VMM event loop: {e:?}")),
        };
        em.add_subscriber(Box::new(Wakeup {
            exit: self.exit.clone(),
            commands: self.wake.clone(),
        }));
        for device in &self.devices {
            em.add_subscriber(Box::new(device.clone()));
        }
        loop {
            if let Some(reason) = self.exit.reason() {
                return reason;
            }
            if let Err(e) = em.run() {
                self.exit
                    .raise(VmExit::Error(format!("VMM event loop failed: {e:?}")));
                continue;
            }
            while let Ok((command, reply)) = self.commands.try_recv() {
                // The caller may have given up waiting; its loss.
                let _ = reply.send(self.handle(command));
            }
        }
    }

    fn handle(&mut self, command: Command) -> Result<Reply, VmError> {
        match command {
            Command::Pause => self.pause().map(|_| Reply::Done),
            Command::Resume => {
                self.control.resume();
                self.paused = false;
                Ok(Reply::Done)
            }
            Command::SaveState => self.save_state().map(|s| Reply::State(Box::new(s))),
            Command::RestoreState(state) => self.restore_state(*state).map(|_| Reply::Done),
        }
    }

    fn pause(&mut self) -> Result<(), VmError> {
        if self.paused {
            return Ok(());
        }
        self.control.request_pause();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            kick_all(&self.vcpu_threads);
            if self.control.wait_parked(PAUSE_KICK_INTERVAL) {
                break;
            }
            if Instant::now() >= deadline {
                self.control.resume();
                return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
            }
        }
        if self.exit.reason().is_some() {
            return Err(VmError::NotRunning);
        }
        self.paused = true;
        Ok(())
    }

    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, VmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.vm_fd
            .get_irqchip(&mut chip)
            .map_err(kvm("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    fn save_state(&self) -> Result<VmState, VmError> {
        if !self.paused {
            return Err(VmError::NotPaused);
        }
        Ok(VmState {
            vcpus: self.control.saved_states().map_err(VmError::State)?,
            irqchips: vec![
                self.irqchip(KVM_IRQCHIP_PIC_MASTER)?,
                self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
                self.irqchip(KVM_IRQCHIP_IOAPIC)?,
            ],
            pit: self.vm_fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: self.vm_fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
            transports: self
                .transports
                .iter()
                .map(|t| lock(t).state())
                .collect::<Result<_, _>>()
                .map_err(|e| VmError::State(e.to_string()))?,
        })
    }

    fn restore_state(&self, state: VmState) -> Result<(), VmError> {
        if !self.paused {
            return Err(VmError::NotPaused);
        }
        if state.transports.len() != self.transports.len() {
            return Err(VmError::State(format!(
                "{} virtio transports saved, {} present",
                state.transports.len(),
                self.transports.len()
            )));
        }
        if state.irqchips.len() != 3 {
            return Err(VmError::State(format!(
                "{} irqchips saved, 3 expected",
                state.irqchips.len()
            )));
        }
        let mut clock = state.clock;
        // Only the clock value goes back; the flags describe how it was read.
        clock.flags = 0;
        self.vm_fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        self.vm_fd
            .set_pit2(&state.pit)
            .map_err(kvm("KVM_SET_PIT2"))?;
        for chip in &state.irqchips {
            self.vm_fd
                .set_irqchip(chip)
                .map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        for (i, (transport, saved)) in self.transports.iter().zip(&state.transports).enumerate() {
            lock(transport)
                .restore(saved)
                .map_err(|e| VmError::State(format!("virtio device {i}: {e}")))?;
        }
        self.control
            .restore_states(state.vcpus)
            .map_err(VmError::State)
    }
}

impl Drop for VmRuntime {
    fn drop(&mut self) {
        stop_vcpus(&self.control, &mut self.vcpu_threads);
        lock(&self.serial).flush();
    }
}

/// Steers a running VM and collects its end.
pub struct VmHandle {
    exit: Arc<ExitSignal>,
    control: Arc<VcpuControl>,
    commands: mpsc::Sender<(Command, CommandReply)>,
    wake: Arc<EventFd>,
    finished: Arc<(Mutex<Option<VmExit>>, Condvar)>,
    thread: Option<JoinHandle<VmExit>>,
    /// The virtio devices, for [`Self::device_report`].
    devices: Vec<VirtioDeviceHandle>,
}

/// How long [`VmHandle::device_report`] waits for a device the VMM thread is busy with.
const REPORT_LOCK_WAIT: Duration = Duration::from_millis(200);
/// How long [`VmHandle::vcpu_report`] waits for the register samples of vCPUs in the guest.
const REPORT_SAMPLE_WAIT: Duration = Duration::from_millis(200);

impl VmHandle {
    fn call(&self, command: Command) -> Result<Reply, VmError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send((command, tx))
            .map_err(|_| VmError::NotRunning)?;
        self.wake.write(1).map_err(VmError::EventFd)?;
        rx.recv().map_err(|_| VmError::NotRunning)?
    }

    /// Stops every vCPU outside `KVM_RUN` and reads its state out.
    pub fn pause(&self) -> Result<(), VmError> {
        self.call(Command::Pause).map(|_| ())
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<(), VmError> {
        self.call(Command::Resume).map(|_| ())
    }

    /// The state of a paused VM, its memory aside.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        match self.call(Command::SaveState)? {
            Reply::State(s) => Ok(*s),
            Reply::Done => Err(VmError::State("no state returned".into())),
        }
    }

    /// Puts back a state read by [`Self::save_state`] into this paused VM.
    pub fn restore_state(&self, state: VmState) -> Result<(), VmError> {
        self.call(Command::RestoreState(Box::new(state)))
            .map(|_| ())
    }

    /// Asks the VM to stop; [`Self::wait`] then returns [`VmExit::HostRequest`] unless it had ended
    /// already for another reason.
    pub fn shutdown(&self) {
        self.exit.raise(VmExit::HostRequest);
    }

    /// Why the VM ended, if it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.exit.reason()
    }

    /// One line per virtio device on what it and its queues are doing, for a report on a guest
    /// that stopped answering. Read while the VM runs, so only a glimpse; a device the VMM thread
    /// holds for longer than a moment is reported as busy rather than waited for.
    pub fn device_report(&self) -> String {
        let mut lines = Vec::with_capacity(self.devices.len());
        for device in &self.devices {
            let deadline = Instant::now() + REPORT_LOCK_WAIT;
            let line = loop {
                match device.try_lock() {
                    Ok(d) => break d.report(),
                    Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner().report(),
                    Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(std::sync::TryLockError::WouldBlock) => {
                        break format!("a device held by the VMM thread for {REPORT_LOCK_WAIT:?}")
                    }
                }
            };
            lines.push(line);
        }
        lines.join("\n")
    }

    /// One line per vCPU: in the guest for how long and where (a register sample), or in the VMM
    /// for how long and on what exit, with its exit count. Kicks each vCPU in the guest once.
    pub fn vcpu_report(&self) -> String {
        self.control.report(REPORT_SAMPLE_WAIT)
    }

    /// [`Self::vcpu_report`] and [`Self::device_report`] under headings: what a report on a guest
    /// that stopped answering carries.
    pub fn report(&self) -> String {
        format!(
            "vCPUs:\n{}\nvirtio devices:\n{}",
            self.vcpu_report(),
            self.device_report()
        )
    }

    /// How the VM ended, or that it runs and its [`Self::report`]: what an error on a guest that
    /// stopped answering says of it.
    pub fn status_report(&self) -> String {
        match self.exit_reason() {
            Some(exit) => format!("the microVM stopped ({exit})"),
            None => format!("the microVM runs; its {}", self.report()),
        }
    }

    /// When vCPU 0 first entered `KVM_RUN`.
    pub fn first_kvm_run(&self) -> Option<Instant> {
        self.control.first_run()
    }

    /// Waits until the VM has ended and is torn down.
    pub fn wait(mut self) -> VmExit {
        self.join()
    }

    /// Waits up to `timeout`; `None` if the VM is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<VmExit> {
        let (slot, cond) = &*self.finished;
        let guard = lock(slot);
        let (guard, _) = cond
            .wait_timeout_while(guard, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        let done = guard.is_some();
        drop(guard);
        done.then(|| self.join())
    }

    fn join(&mut self) -> VmExit {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| VmExit::Error("the VMM thread panicked".into())),
            None => lock(&self.finished.0)
                .clone()
                .unwrap_or_else(|| VmExit::Error("the VM was never started".into())),
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
            self.join();
        }
    }
}
