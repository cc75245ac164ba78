//! Running a microVM: [`Vm::new`] (a cold boot) and [`Vm::restore`] (from a snapshot) make
//! everything without running guest code (see [`builder`](crate::builder)); [`Vm::start`] starts
//! the vCPU threads and the VMM thread and returns a [`VmHandle`] to steer, snapshot and wait for
//! it.
//!
//! The VMM thread runs the event loop (device queue notifications, host commands, the exit signal)
//! and owns the VM: when the VM ends it stops and joins the vCPUs and closes everything, so that after
//! [`VmHandle::wait`] no fd, thread or mapping of the VM remains in the process.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::boot_params::BootParamsError;
use crate::arch::cpuid::CpuidError;
use crate::arch::mptable::MpTableError;
use crate::arch::regs::RegsError;
use crate::builder::{
    self, device_keys, put_vm_state, PreparedRestore, RestoreSpec, TemplatePages,
};
use crate::config::{ConfigError, VirtioDeviceHandle, VmConfig};
use crate::devices::bus::{lock, BusError};
use crate::devices::legacy::SerialConsole;
use crate::devices::virtio::mmio::{MmioError, MmioTransport};
use crate::exit::{ExitSignal, VmExit};
use crate::loader::LoaderError;
use crate::memory::{GuestRam, MemoryError};
use crate::snapshot::{create_private, SavedDevice, Snapshot, SnapshotError, MEMORY_FILE};
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
    /// A snapshot could not be written, or was refused.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The devices given to a restore are not the snapshot's.
    #[error("the snapshot holds the devices [{saved}]; the restore was given [{given}]")]
    Devices {
        /// The snapshot's device keys, in slot order.
        saved: String,
        /// The given ones, sorted.
        given: String,
    },
    /// The console could not take its saved state.
    #[error("serial console: cannot restore its state")]
    Serial(#[source] std::io::Error),
}

/// What [`VmHandle::snapshot`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotSize {
    /// Bytes of guest memory written (the rest of the memory file is holes).
    pub memory_bytes: u64,
    /// Bytes of the state file.
    pub state_bytes: u64,
}

/// A built VM whose guest has not run yet (or, restored, has not run on).
pub struct Vm {
    pub(crate) vm_fd: VmFd,
    pub(crate) ram: GuestRam,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) devices: Vec<VirtioDeviceHandle>,
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) control: Arc<VcpuControl>,
}

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(op, e)
}

pub(crate) fn new_eventfd() -> Result<EventFd, VmError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmError::EventFd)
}

impl Vm {
    /// Builds the VM described by `config`. No guest code runs until [`Vm::start`].
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        builder::cold_boot(config)
    }

    /// Builds a VM that goes on from a snapshot, with new backends (see [`RestoreSpec`]). Its
    /// RAM maps the snapshot's memory file copy-on-write. No guest code runs until
    /// [`Vm::start`].
    pub fn restore(spec: RestoreSpec) -> Result<Vm, VmError> {
        builder::restore(spec)
    }

    /// The part of [`Vm::restore`] that needs no backend (the snapshot in `dir` read and
    /// checked, its memory mapped, the KVM VM made), for a caller to make while it sets the
    /// backends up; [`PreparedRestore::finish`] is the rest. KVM_CREATE_VM alone takes ~20 ms
    /// in the nested testbed (its kernel threads), the whole of it ~35 ms.
    pub fn prepare_restore(dir: &Path, pages: TemplatePages) -> Result<PreparedRestore, VmError> {
        builder::prepare_restore(dir, pages)
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
            ram,
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
    Snapshot(PathBuf),
}

enum Reply {
    Done,
    State(Box<VmState>),
    Snapshot(SnapshotSize),
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

/// `f` of `device`, taken from a running VM: `None` if the VMM thread holds the device for
/// longer than [`REPORT_LOCK_WAIT`] (a poisoned lock still gives its device).
fn glimpse<T>(
    device: &VirtioDeviceHandle,
    f: impl Fn(&dyn crate::devices::virtio::VirtioDevice) -> T,
) -> Option<T> {
    let deadline = Instant::now() + REPORT_LOCK_WAIT;
    loop {
        match device.try_lock() {
            Ok(d) => return Some(f(&*d)),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(f(&*p.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
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
    // The VM fd goes before the memory it maps (see the SAFETY note in `builder::create_vm`).
    vm_fd: VmFd,
    ram: GuestRam,
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
            Command::Snapshot(dir) => self.snapshot(&dir).map(Reply::Snapshot),
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
        put_vm_state(&self.vm_fd, &state, &self.transports)?;
        self.control
            .restore_states(state.vcpus)
            .map_err(VmError::State)
    }

    /// Writes the paused VM into `dir` (an empty directory): the memory file, then the state
    /// file, so that a directory with a state file holds a whole snapshot.
    fn snapshot(&self, dir: &Path) -> Result<SnapshotSize, VmError> {
        let vm = self.save_state()?;
        let devices = device_keys(&self.devices)
            .into_iter()
            .zip(&vm.transports)
            .map(|(key, t)| SavedDevice {
                key,
                device_type: t.device_type,
            })
            .collect();
        let snapshot = Snapshot {
            build_id: crate::snapshot::build_id().to_owned(),
            vcpus: vm.vcpus.len() as u32,
            mem_size: self.ram.size(),
            devices,
            serial: lock(&self.serial).state(),
            vm,
        };
        let path = dir.join(MEMORY_FILE);
        let memory = create_private(&path)?;
        let memory_bytes = self.ram.write_memory_file(&memory)?;
        memory.sync_all().map_err(|source| SnapshotError::Io {
            op: "sync",
            path,
            source,
        })?;
        let state_bytes = snapshot.write(dir)?;
        Ok(SnapshotSize {
            memory_bytes,
            state_bytes,
        })
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
            _ => Err(VmError::State("no state returned".into())),
        }
    }

    /// Puts back a state read by [`Self::save_state`] into this paused VM.
    pub fn restore_state(&self, state: VmState) -> Result<(), VmError> {
        self.call(Command::RestoreState(Box::new(state)))
            .map(|_| ())
    }

    /// Writes this paused VM as a snapshot into `dir`, an existing empty directory (files in it
    /// are never replaced), which [`Vm::restore`] then restores any number of times. A device
    /// whose state cannot be saved now (a mounted virtio-fs share) refuses it, and nothing is
    /// written past the memory file.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotSize, VmError> {
        match self.call(Command::Snapshot(dir.to_owned()))? {
            Reply::Snapshot(size) => Ok(size),
            _ => Err(VmError::State("no snapshot written".into())),
        }
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
        self.devices
            .iter()
            .map(|device| {
                glimpse(device, |d| d.report()).unwrap_or_else(|| {
                    format!("a device held by the VMM thread for {REPORT_LOCK_WAIT:?}")
                })
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Connections the guest has open through its devices (vsock's), as the devices know them.
    /// A device the VMM thread holds for longer than a moment counts as one.
    pub fn open_connections(&self) -> usize {
        self.devices
            .iter()
            .map(|device| glimpse(device, |d| d.open_connections()).unwrap_or(1))
            .sum()
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
