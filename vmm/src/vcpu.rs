//! vCPUs: one thread each, running `KVM_RUN` and dispatching its exits.
//!
//! The VMM thread steers vCPUs through [`VcpuControl`]: it sets a request (run, pause, stop) and kicks
//! each thread with a signal whose handler sets `immediate_exit` in the thread's `kvm_run`, so a kick
//! can never be lost between the request check and the next `KVM_RUN`. A paused vCPU parks outside
//! `KVM_RUN` after reading its state out; put-back state is applied by the vCPU's own thread.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::bus::{lock, Bus};
use crate::exit::{ExitSignal, VmExit};
use crate::vcpu_activity::{describe_sample, GuestExit, Phase, VcpuActivity};

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler; null on threads that are not vCPUs.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: a non-null pointer is this thread's own kvm_run mapping, set by the vCPU loop
            // and cleared before the mapping goes away; a volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(VcpuError::SignalHandler)
}

/// Errors of vCPU state handling.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {op} failed")]
    Kvm {
        /// The vCPU.
        index: u32,
        /// The ioctl.
        op: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(String),
    /// State from a snapshot does not fit.
    #[error("vCPU {index}: saved state is unusable: {reason}")]
    BadState {
        /// The vCPU.
        index: u32,
        /// Why.
        reason: String,
    },
}

/// Everything KVM holds for one vCPU, as read out while it is paused.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state: the 4 KiB `kvm_xsave` region.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}

fn kvm_err(index: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { index, op, source }
}

/// Reads `indices` MSRs, dropping any KVM will not read (it stops at the first it cannot).
fn read_msrs(fd: &VcpuFd, index: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut wanted: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut read = Vec::with_capacity(wanted.len());
    while !wanted.is_empty() {
        let mut msrs = Msrs::from_entries(&wanted).map_err(|e| VcpuError::BadState {
            index,
            reason: format!("MSR list: {e:?}"),
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(index, "KVM_GET_MSRS"))?;
        read.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n is one KVM refuses on this host: skip it and go on with the rest.
        wanted.drain(..(n + 1).min(wanted.len()));
    }
    Ok(read)
}

/// Reads the whole vCPU state.
pub fn capture_state(fd: &VcpuFd, index: u32, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
    let mp_state = fd
        .get_mp_state()
        .map_err(kvm_err(index, "KVM_GET_MP_STATE"))?;
    Ok(VcpuState {
        cpuid: fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(index, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
        regs: fd.get_regs().map_err(kvm_err(index, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?,
        xsave: fd
            .get_xsave()
            .map_err(kvm_err(index, "KVM_GET_XSAVE"))?
            .region
            .to_vec(),
        xcrs: fd.get_xcrs().map_err(kvm_err(index, "KVM_GET_XCRS"))?,
        debug_regs: fd
            .get_debug_regs()
            .map_err(kvm_err(index, "KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?,
        msrs: read_msrs(fd, index, msr_indices)?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm_err(index, "KVM_GET_VCPU_EVENTS"))?,
        mp_state,
    })
}

/// Puts a state read by [`capture_state`] back, in the order KVM needs (CPUID first, events last).
pub fn apply_state(fd: &VcpuFd, index: u32, s: &VcpuState) -> Result<(), VcpuError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| VcpuError::BadState {
        index,
        reason: format!("CPUID: {e:?}"),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(kvm_err(index, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs)
        .map_err(kvm_err(index, "KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs)
        .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
    let mut xsave = kvm_xsave::default();
    if s.xsave.len() != xsave.region.len() {
        return Err(VcpuError::BadState {
            index,
            reason: format!(
                "xsave area of {} words, {} expected",
                s.xsave.len(),
                xsave.region.len()
            ),
        });
    }
    xsave.region.copy_from_slice(&s.xsave);
    // SAFETY: the xsave area came from KVM_GET_XSAVE of a vCPU with the same CPUID, so it has the
    // layout KVM expects; the legacy 4 KiB ioctl is used, which covers it entirely.
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm_err(index, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs)
        .map_err(kvm_err(index, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(kvm_err(index, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic)
        .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|e| VcpuError::BadState {
        index,
        reason: format!("MSRs: {e:?}"),
    })?;
    let set = fd.set_msrs(&msrs).map_err(kvm_err(index, "KVM_SET_MSRS"))?;
    if set != s.msrs.len() {
        return Err(VcpuError::BadState {
            index,
            reason: format!("KVM took {set} of {} MSRs", s.msrs.len()),
        });
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm_err(index, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

const REQUEST_RUN: u8 = 0;
const REQUEST_PAUSE: u8 = 1;
const REQUEST_STOP: u8 = 2;

#[derive(Default)]
struct Park {
    parked: usize,
    finished: usize,
    saved: Vec<Option<Result<VcpuState, String>>>,
    restore: Vec<Option<VcpuState>>,
    restored: Vec<Option<Result<(), String>>>,
    /// Each live vCPU thread, for kicks from outside the VMM thread; a thread removes itself
    /// under this lock before it ends, so a kick under the lock never reaches a gone thread.
    threads: Vec<Option<libc::pthread_t>>,
    /// The register samples the threads took for [`VcpuControl::report`].
    samples: Vec<Option<String>>,
}

/// Shared between the VMM thread and every vCPU thread of one VM.
pub struct VcpuControl {
    request: AtomicU8,
    park: Mutex<Park>,
    cond: Condvar,
    count: usize,
    first_run: OnceLock<Instant>,
    epoch: Instant,
    activity: Vec<VcpuActivity>,
}

impl VcpuControl {
    /// Control for `count` vCPUs, all told to run.
    pub fn new(count: usize) -> Self {
        VcpuControl {
            request: AtomicU8::new(REQUEST_RUN),
            park: Mutex::new(Park {
                saved: vec![None; count],
                restore: vec![None; count],
                restored: vec![None; count],
                threads: vec![None; count],
                samples: vec![None; count],
                ..Default::default()
            }),
            cond: Condvar::new(),
            count,
            first_run: OnceLock::new(),
            epoch: Instant::now(),
            activity: (0..count).map(|_| VcpuActivity::default()).collect(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// One line per vCPU on what it is doing: in the guest and where (each such vCPU is kicked
    /// for a register sample, waited for up to `wait`), in the VMM and on what exit, paused or
    /// stopped. Safe to call while the VM runs; it never waits on a busy vCPU beyond `wait`.
    pub fn report(&self, wait: Duration) -> String {
        let mut p = self.lock();
        let now = self.now_ns();
        let snapshots: Vec<_> = self.activity.iter().map(|a| a.snapshot(now)).collect();
        let mut asked = Vec::new();
        for (i, (a, snap)) in self.activity.iter().zip(&snapshots).enumerate() {
            p.samples[i] = None;
            if snap.phase() != Phase::InGuest {
                continue;
            }
            let Some(thread) = p.threads[i] else {
                continue;
            };
            a.want_sample();
            // SAFETY: the thread is live: it clears its entry under this lock, held here, before
            // it ends. The kick handler is installed before any vCPU thread starts.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
            asked.push(i);
        }
        let (p, _) = self
            .cond
            .wait_timeout_while(p, wait, |p| asked.iter().any(|&i| p.samples[i].is_none()))
            .unwrap_or_else(|e| e.into_inner());
        snapshots
            .iter()
            .enumerate()
            .map(|(i, snap)| snap.describe(i, p.samples[i].as_deref()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn lock(&self) -> MutexGuard<'_, Park> {
        lock(&self.park)
    }

    /// When the first vCPU first entered `KVM_RUN`.
    pub fn first_run(&self) -> Option<Instant> {
        self.first_run.get().copied()
    }

    /// Asks every vCPU to pause; the caller kicks them, then waits with [`Self::wait_parked`].
    pub fn request_pause(&self) {
        let mut p = self.lock();
        p.saved.iter_mut().for_each(|s| *s = None);
        self.request.store(REQUEST_PAUSE, Ordering::SeqCst);
    }

    /// Waits up to `timeout` until every live vCPU is parked; true if they are.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let p = self.lock();
        let (p, _) = self
            .cond
            .wait_timeout_while(p, timeout, |p| p.parked + p.finished < self.count)
            .unwrap_or_else(|e| e.into_inner());
        p.parked + p.finished >= self.count
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let _p = self.lock();
        self.request.store(REQUEST_RUN, Ordering::SeqCst);
        self.cond.notify_all();
    }

    /// Tells every vCPU to leave its loop; the caller kicks them.
    pub fn request_stop(&self) {
        let _p = self.lock();
        self.request.store(REQUEST_STOP, Ordering::SeqCst);
        self.cond.notify_all();
    }

    /// Whether the vCPUs were asked to pause.
    pub fn pause_requested(&self) -> bool {
        self.request.load(Ordering::SeqCst) == REQUEST_PAUSE
    }

    /// The states the parked vCPUs read out, in vCPU order.
    pub fn saved_states(&self) -> Result<Vec<VcpuState>, String> {
        let p = self.lock();
        p.saved
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(Ok(s)) => Ok(s.clone()),
                Some(Err(e)) => Err(e.clone()),
                None => Err(format!("vCPU {i} is not parked")),
            })
            .collect()
    }

    /// Has each parked vCPU apply its state from `states`, and waits for all of them.
    pub fn restore_states(&self, states: Vec<VcpuState>) -> Result<(), String> {
        if states.len() != self.count {
            return Err(format!(
                "{} vCPU states for {} vCPUs",
                states.len(),
                self.count
            ));
        }
        let mut p = self.lock();
        if p.parked != self.count {
            return Err("not every vCPU is parked".into());
        }
        for (i, s) in states.into_iter().enumerate() {
            p.restore[i] = Some(s);
            p.restored[i] = None;
        }
        self.cond.notify_all();
        let p = self
            .cond
            .wait_while(p, |p| p.restored.iter().any(Option::is_none))
            .unwrap_or_else(|e| e.into_inner());
        p.restored
            .iter()
            .flatten()
            .find_map(|r| r.clone().err())
            .map_or(Ok(()), Err)
    }
}

/// A vCPU with what its thread needs to run it.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    control: Arc<VcpuControl>,
    msr_indices: Arc<Vec<u32>>,
}

/// What one exit means for the loop.
enum Next {
    Continue,
    End(VmExit),
}

/// What the guest left `KVM_RUN` for; `None` for a kick, which is the VMM's doing.
fn guest_exit(result: &Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Option<GuestExit> {
    Some(match result {
        Ok(VcpuExit::IoIn(port, _)) => GuestExit::IoIn(*port),
        Ok(VcpuExit::IoOut(port, _)) => GuestExit::IoOut(*port),
        Ok(VcpuExit::MmioRead(addr, _)) => GuestExit::MmioRead(*addr),
        Ok(VcpuExit::MmioWrite(addr, _)) => GuestExit::MmioWrite(*addr),
        Ok(VcpuExit::Intr) => return None,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return None,
        _ => GuestExit::Other,
    })
}

/// What the registers say of a triple fault. KVM on AMD resets the vCPU when it intercepts the
/// shutdown (the VMCB is undefined after it), so there the registers read back are the power-on
/// state (real mode at 0xfff0), which this guest, booted straight into long mode, never runs in:
/// that is said instead of passing reset values off as the fault's place.
fn describe_fault(r: &kvm_regs, s: &kvm_sregs) -> String {
    const CR0_PE: u64 = 1;
    if r.rip == 0xfff0 && s.cr0 & CR0_PE == 0 && s.efer == 0 {
        return "registers lost: KVM reset the vCPU at the shutdown, as it does on AMD".to_owned();
    }
    format!(
        "rip {:#x} rsp {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
        r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
    )
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(
        index: u32,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        control: Arc<VcpuControl>,
        msr_indices: Arc<Vec<u32>>,
    ) -> Self {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
            exit,
            control,
            msr_indices,
        }
    }

    /// The thread body: runs until the VM ends or the VMM stops it.
    pub fn run_loop(mut self) {
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        let i = self.index as usize;
        // SAFETY: pthread_self has no preconditions.
        self.control.lock().threads[i] = Some(unsafe { libc::pthread_self() });
        loop {
            match self.control.request.load(Ordering::SeqCst) {
                REQUEST_STOP => break,
                REQUEST_PAUSE => {
                    self.park();
                    continue;
                }
                _ => {}
            }
            if self.index == 0 {
                self.control.first_run.get_or_init(Instant::now);
            }
            let next = self.run_once();
            if self.control.activity[i].take_sample_request() {
                self.answer_sample();
            }
            if let Next::End(reason) = next {
                self.exit.raise(reason);
                break;
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        let mut p = self.control.lock();
        p.threads[i] = None;
        self.control.activity[i].set_phase(Phase::Finished, self.control.now_ns());
        p.finished += 1;
        self.control.cond.notify_all();
    }

    /// Takes the register sample [`VcpuControl::report`] asked for.
    fn answer_sample(&self) {
        let sample = match (self.fd.get_regs(), self.fd.get_mp_state()) {
            (Ok(r), Ok(m)) => {
                // Where rip is in guest-physical memory: a kernel address outside the image's
                // text is placed by the page it runs from.
                let physical = self
                    .fd
                    .translate_gva(r.rip)
                    .ok()
                    .filter(|t| t.valid != 0)
                    .map(|t| t.physical_address);
                describe_sample(&r, m.mp_state, physical)
            }
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        };
        let mut p = self.control.lock();
        p.samples[self.index as usize] = Some(sample);
        self.control.cond.notify_all();
    }

    fn park(&mut self) {
        let state =
            capture_state(&self.fd, self.index, &self.msr_indices).map_err(|e| e.to_string());
        let i = self.index as usize;
        self.control.activity[i].set_phase(Phase::Parked, self.control.now_ns());
        let mut p = self.control.lock();
        p.saved[i] = Some(state);
        p.parked += 1;
        self.control.cond.notify_all();
        loop {
            if let Some(s) = p.restore[i].take() {
                p.restored[i] =
                    Some(apply_state(&self.fd, self.index, &s).map_err(|e| e.to_string()));
                self.control.cond.notify_all();
                continue;
            }
            if self.control.request.load(Ordering::SeqCst) != REQUEST_PAUSE {
                break;
            }
            p = self.control.cond.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.parked -= 1;
    }

    /// The registers that place a triple fault, in one line; empty if KVM would not give them.
    fn fault_registers(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => describe_fault(&r, &s),
            _ => String::new(),
        }
    }

    fn run_once(&mut self) -> Next {
        let index = self.index;
        let activity = &self.control.activity[index as usize];
        activity.enter_guest(self.control.now_ns());
        let result = self.fd.run();
        activity.left_guest(self.control.now_ns(), guest_exit(&result));
        match result {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        crate::guest_warn!("vCPU {index}: read of unmapped MMIO {addr:#x}");
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.mmio.write(addr, data) {
                        crate::guest_warn!("vCPU {index}: write to unmapped MMIO {addr:#x} ignored");
                    }
                    Next::Continue
                }
                // With the in-kernel LAPIC, KVM handles HLT itself; one seen here is spurious.
                VcpuExit::Hlt => Next::Continue,
                VcpuExit::Intr => Next::Continue,
                VcpuExit::Shutdown => Next::End(VmExit::TripleFault {
                    vcpu: index,
                    registers: self.fault_registers(),
                }),
                VcpuExit::InternalError => {
                    // SAFETY: on KVM_EXIT_INTERNAL_ERROR the `internal` member of the union is the
                    // one KVM filled in.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    Next::End(VmExit::EmulationFailure {
                        vcpu: index,
                        suberror,
                    })
                }
                VcpuExit::SystemEvent(kind, _) => Next::End(match kind {
                    KVM_SYSTEM_EVENT_RESET => VmExit::GuestReset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::GuestPowerOff,
                    KVM_SYSTEM_EVENT_CRASH => VmExit::Error(format!("vCPU {index}: guest crashed")),
                    other => VmExit::Error(format!("vCPU {index}: unknown system event {other}")),
                }),
                VcpuExit::FailEntry(reason, cpu) => Next::End(VmExit::Error(format!(
                    "vCPU {index}: KVM_RUN entry failed (hardware reason {reason:#x} on host CPU {cpu})"
                ))),
                other => Next::End(VmExit::Error(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::End(VmExit::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_is_placed_unless_kvm_reset_the_vcpu() {
        let mut r = kvm_regs {
            rip: 0xffff_ffff_8100_2876,
            rsp: 0xffff_c900_0001_3f00,
            ..Default::default()
        };
        let mut s = kvm_sregs {
            cr0: 0x8005_0033,
            cr3: 0x1_0000,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        assert_eq!(
            describe_fault(&r, &s),
            "rip 0xffffffff81002876 rsp 0xffffc90000013f00 cr0 0x80050033 cr2 0x0 cr3 0x10000 \
             cr4 0x20 efer 0x500"
        );
        // What KVM on AMD reads back after a shutdown intercept.
        r.rip = 0xfff0;
        r.rsp = 0;
        s.cr0 = 0x10;
        s.cr3 = 0;
        s.cr4 = 0;
        s.efer = 0;
        assert!(describe_fault(&r, &s).starts_with("registers lost"));
    }

    #[test]
    fn control_counts_parked_and_finished_vcpus() {
        let c = VcpuControl::new(2);
        c.request_pause();
        assert!(c.pause_requested());
        assert!(!c.wait_parked(Duration::from_millis(10)));
        c.lock().parked = 1;
        c.lock().finished = 1;
        assert!(c.wait_parked(Duration::from_millis(10)));
        assert!(c
            .saved_states()
            .unwrap_err()
            .contains("vCPU 0 is not parked"));
        c.resume();
        assert!(!c.pause_requested());
    }

    #[test]
    fn restore_refuses_a_wrong_count() {
        let c = VcpuControl::new(2);
        assert!(c
            .restore_states(vec![])
            .unwrap_err()
            .contains("0 vCPU states for 2"));
    }
}
