//! What each vCPU thread is doing, for a report on a guest that stopped answering.
//!
//! A vCPU's own thread records every entry into and exit from `KVM_RUN` (two clock reads per exit,
//! far below the cost of the exit itself); any thread reads the record. A hung guest is then told
//! apart from a hung VMM: a vCPU in the guest for minutes, and where (a register sample the thread
//! takes when kicked), or a vCPU stuck for minutes in the VMM handling one exit.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use kvm_bindings::{
    kvm_regs, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// The thread has not entered `KVM_RUN` yet.
    Starting = 0,
    /// In `KVM_RUN`: running guest code, or halted in the kernel.
    InGuest = 1,
    /// Out of `KVM_RUN`, handling an exit in the VMM.
    HandlingExit = 2,
    /// Parked outside `KVM_RUN` while the VM is paused.
    Parked = 3,
    /// The thread left its loop.
    Finished = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::InGuest,
            2 => Phase::HandlingExit,
            3 => Phase::Parked,
            4 => Phase::Finished,
            _ => Phase::Starting,
        }
    }
}

/// The guest's reason for an exit, as much as a report needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// None yet.
    None,
    /// `IN` from a port.
    IoIn(u16),
    /// `OUT` to a port.
    IoOut(u16),
    /// A read of unbacked guest-physical memory.
    MmioRead(u64),
    /// A write to unbacked guest-physical memory.
    MmioWrite(u64),
    /// Any other exit (halt, system event, failure).
    Other,
}

const ADDR_BITS: u32 = 56;
const ADDR_MASK: u64 = (1 << ADDR_BITS) - 1;

impl GuestExit {
    // Tag in the top byte, address below: MMIO addresses stay far under 2^56.
    fn pack(self) -> u64 {
        let (tag, addr) = match self {
            GuestExit::None => (0, 0),
            GuestExit::IoIn(p) => (1, u64::from(p)),
            GuestExit::IoOut(p) => (2, u64::from(p)),
            GuestExit::MmioRead(a) => (3, a & ADDR_MASK),
            GuestExit::MmioWrite(a) => (4, a & ADDR_MASK),
            GuestExit::Other => (5, 0),
        };
        (tag << ADDR_BITS) | addr
    }

    fn unpack(v: u64) -> GuestExit {
        let addr = v & ADDR_MASK;
        // Ports were packed from a u16; the mask only keeps the conversion total.
        let port = (addr & 0xffff) as u16;
        match v >> ADDR_BITS {
            1 => GuestExit::IoIn(port),
            2 => GuestExit::IoOut(port),
            3 => GuestExit::MmioRead(addr),
            4 => GuestExit::MmioWrite(addr),
            5 => GuestExit::Other,
            _ => GuestExit::None,
        }
    }

    fn describe(self) -> String {
        match self {
            GuestExit::None => "none".to_owned(),
            GuestExit::IoIn(p) => format!("an I/O read of port {p:#x}"),
            GuestExit::IoOut(p) => format!("an I/O write to port {p:#x}"),
            GuestExit::MmioRead(a) => format!("an MMIO read at {a:#x}"),
            GuestExit::MmioWrite(a) => format!("an MMIO write at {a:#x}"),
            GuestExit::Other => "an exit other than I/O".to_owned(),
        }
    }
}

/// One vCPU's record: written by its thread only, read by anyone.
#[derive(Debug, Default)]
pub struct VcpuActivity {
    phase: AtomicU8,
    /// When the phase last changed, in ns from the VM's epoch.
    since_ns: AtomicU64,
    exits: AtomicU64,
    last_exit: AtomicU64,
    sample_wanted: AtomicBool,
    /// Back from `KVM_RUN` for a kick, not for the guest: re-entering continues the same stay.
    kicked: AtomicBool,
}

impl VcpuActivity {
    /// The thread enters `KVM_RUN`.
    pub fn enter_guest(&self, now_ns: u64) {
        if !self.kicked.swap(false, Ordering::Relaxed) {
            self.since_ns.store(now_ns, Ordering::Relaxed);
        }
        self.phase.store(Phase::InGuest as u8, Ordering::Release);
    }

    /// The thread is back from `KVM_RUN`: for the guest's `exit`, or for a kick (`None`), which
    /// is not the guest's doing and is not counted.
    pub fn left_guest(&self, now_ns: u64, exit: Option<GuestExit>) {
        match exit {
            Some(exit) => {
                self.exits.fetch_add(1, Ordering::Relaxed);
                self.last_exit.store(exit.pack(), Ordering::Relaxed);
                self.set_phase(Phase::HandlingExit, now_ns);
            }
            None => {
                // The stay in the guest goes on after the kick; its start is kept.
                self.kicked.store(true, Ordering::Relaxed);
                self.phase
                    .store(Phase::HandlingExit as u8, Ordering::Release);
            }
        }
    }

    /// Records a phase change.
    pub fn set_phase(&self, phase: Phase, now_ns: u64) {
        self.kicked.store(false, Ordering::Relaxed);
        self.since_ns.store(now_ns, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Asks the thread for a register sample at its next return from `KVM_RUN`.
    pub fn want_sample(&self) {
        self.sample_wanted.store(true, Ordering::Release);
    }

    /// Whether a sample was asked for; clears the request.
    pub fn take_sample_request(&self) -> bool {
        self.sample_wanted.swap(false, Ordering::AcqRel)
    }

    /// The record as it stands at `now_ns`. A report takes it before it kicks the vCPU for a
    /// sample, so that the kick's own return from `KVM_RUN` does not show.
    pub fn snapshot(&self, now_ns: u64) -> ActivitySnapshot {
        let phase = self.phase();
        ActivitySnapshot {
            phase,
            for_ns: now_ns.saturating_sub(self.since_ns.load(Ordering::Relaxed)),
            exits: self.exits.load(Ordering::Relaxed),
            last_exit: GuestExit::unpack(self.last_exit.load(Ordering::Relaxed)),
        }
    }
}

/// A vCPU's record at one moment.
#[derive(Clone, Copy, Debug)]
pub struct ActivitySnapshot {
    phase: Phase,
    for_ns: u64,
    exits: u64,
    last_exit: GuestExit,
}

impl ActivitySnapshot {
    /// Its phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// One line on vCPU `index`, with the `sample` its thread took, if any.
    pub fn describe(&self, index: usize, sample: Option<&str>) -> String {
        let ActivitySnapshot { phase, exits, .. } = *self;
        let since = Duration::from_nanos(self.for_ns);
        let last = self.last_exit.describe();
        let mut line = format!("vCPU {index}: ");
        // Writing to a String cannot fail.
        let _ = match phase {
            Phase::Starting => write!(line, "not started"),
            Phase::InGuest => write!(
                line,
                "in the guest for {:.1} s, {}; {exits} exits, the last {last}",
                since.as_secs_f64(),
                sample.unwrap_or("no register sample (the thread did not answer a kick)")
            ),
            Phase::HandlingExit => write!(
                line,
                "in the VMM for {:.1} s handling {last}; {exits} exits",
                since.as_secs_f64()
            ),
            Phase::Parked => write!(
                line,
                "paused for {:.1} s; {exits} exits",
                since.as_secs_f64()
            ),
            Phase::Finished => write!(line, "stopped; {exits} exits, the last {last}"),
        };
        line
    }
}

/// A register sample in words: where the vCPU is and whether it can take an interrupt.
pub fn describe_sample(regs: &kvm_regs, mp_state: u32, rip_physical: Option<u64>) -> String {
    const RFLAGS_IF: u64 = 1 << 9;
    let interrupts = if regs.rflags & RFLAGS_IF != 0 {
        "on"
    } else {
        "off"
    };
    let state = match mp_state {
        KVM_MP_STATE_RUNNABLE => "runnable".to_owned(),
        KVM_MP_STATE_HALTED => "halted".to_owned(),
        KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED | KVM_MP_STATE_SIPI_RECEIVED => {
            "waiting for its start-up IPI".to_owned()
        }
        other => format!("in multiprocessing state {other}"),
    };
    let physical = rip_physical.map_or_else(String::new, |p| format!(" (guest-physical {p:#x})"));
    format!(
        "at rip {:#x}{physical}, rsp {:#x}, interrupts {interrupts}, {state}",
        regs.rip, regs.rsp
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_survive_packing() {
        for e in [
            GuestExit::None,
            GuestExit::IoIn(0x3fd),
            GuestExit::IoOut(0xffff),
            GuestExit::MmioRead(0xd000_0050),
            GuestExit::MmioWrite(0xfee0_00b0),
            GuestExit::Other,
        ] {
            assert_eq!(GuestExit::unpack(e.pack()), e);
        }
    }

    #[test]
    fn each_phase_is_described() {
        let a = VcpuActivity::default();
        assert_eq!(a.snapshot(5).describe(1, None), "vCPU 1: not started");
        a.enter_guest(1_000_000_000);
        a.left_guest(1_000_000_000, Some(GuestExit::IoOut(0x3f8)));
        a.enter_guest(2_000_000_000);
        // A kick is not the guest's exit, and the stay in the guest goes on.
        a.left_guest(2_500_000_000, None);
        a.enter_guest(2_500_000_000);
        assert_eq!(
            a.snapshot(4_000_000_000)
                .describe(0, Some("at rip 0x1000, interrupts off, halted")),
            "vCPU 0: in the guest for 2.0 s, at rip 0x1000, interrupts off, halted; 1 exits, \
             the last an I/O write to port 0x3f8"
        );
        assert!(a
            .snapshot(4_000_000_000)
            .describe(0, None)
            .contains("no register sample"));
        a.left_guest(4_000_000_000, Some(GuestExit::MmioWrite(0xd000_0050)));
        assert_eq!(
            a.snapshot(604_000_000_000).describe(0, None),
            "vCPU 0: in the VMM for 600.0 s handling an MMIO write at 0xd0000050; 2 exits"
        );
        a.set_phase(Phase::Parked, 5_000_000_000);
        assert_eq!(
            a.snapshot(7_000_000_000).describe(0, None),
            "vCPU 0: paused for 2.0 s; 2 exits"
        );
        a.set_phase(Phase::Finished, 8_000_000_000);
        assert_eq!(
            a.snapshot(9_000_000_000).describe(0, None),
            "vCPU 0: stopped; 2 exits, the last an MMIO write at 0xd0000050"
        );
    }

    #[test]
    fn a_sample_says_where_and_whether_interrupts_get_in() {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x202,
            ..Default::default()
        };
        assert_eq!(
            describe_sample(&regs, KVM_MP_STATE_HALTED, None),
            "at rip 0xffffffff81000000, rsp 0x0, interrupts on, halted"
        );
        let regs = kvm_regs {
            rflags: 0x2,
            rsp: 0x8000,
            ..regs
        };
        assert_eq!(
            describe_sample(&regs, KVM_MP_STATE_RUNNABLE, Some(0x100_0000)),
            "at rip 0xffffffff81000000 (guest-physical 0x1000000), rsp 0x8000, interrupts off, \
             runnable"
        );
        assert!(describe_sample(&regs, KVM_MP_STATE_UNINITIALIZED, None)
            .ends_with("interrupts off, waiting for its start-up IPI"));
        assert!(describe_sample(&regs, 7, None).ends_with("in multiprocessing state 7"));
    }

    #[test]
    fn a_sample_request_is_taken_once() {
        let a = VcpuActivity::default();
        assert!(!a.take_sample_request());
        a.want_sample();
        assert!(a.take_sample_request());
        assert!(!a.take_sample_request());
    }
}
