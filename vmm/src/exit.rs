//! Why a VM ended, and the one-shot signal that records it.
//!
//! Whoever sees the end first (a vCPU thread, the reset controller, the host) raises the signal; the
//! first reason wins and wakes the VMM thread, which stops the other vCPUs and tears the VM down.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset, or KVM's reset system event): a reboot.
    GuestReset,
    /// The guest asked to power off (KVM's shutdown system event).
    GuestPowerOff,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Where it stood: the instruction and stack pointers, the last page fault's address and
        /// the paging registers, to find the faulting code in the guest kernel's symbols. Empty if
        /// KVM would not say; a note instead where KVM reset the vCPU at the fault (AMD).
        #[serde(default)]
        registers: String,
    },
    /// KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR).
    EmulationFailure {
        /// The vCPU.
        vcpu: u32,
        /// KVM's suberror (1: instruction emulation failed).
        suberror: u32,
    },
    /// The host asked the VM to stop.
    HostRequest,
    /// Something failed: a KVM ioctl, a thread, an unexpected exit.
    Error(String),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "guest reset"),
            VmExit::GuestPowerOff => write!(f, "guest power-off"),
            VmExit::TripleFault { vcpu, registers } if registers.is_empty() => {
                write!(f, "triple fault on vCPU {vcpu}")
            }
            VmExit::TripleFault { vcpu, registers } => {
                write!(f, "triple fault on vCPU {vcpu} ({registers})")
            }
            VmExit::EmulationFailure { vcpu, suberror } => write!(
                f,
                "instruction emulation failed on vCPU {vcpu} (KVM internal error, suberror {suberror})"
            ),
            VmExit::HostRequest => write!(f, "stopped by the host"),
            VmExit::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// The first reason raised, and an eventfd that tells the VMM thread.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal not yet raised.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Records `reason` unless one was recorded already, and wakes the VMM thread.
    pub fn raise(&self, reason: VmExit) {
        let mut r = crate::devices::bus::lock(&self.reason);
        if r.is_none() {
            log::debug!("VM exit: {reason}");
            *r = Some(reason);
        }
        drop(r);
        // A full eventfd counter already wakes the reader.
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if raised.
    pub fn reason(&self) -> Option<VmExit> {
        crate::devices::bus::lock(&self.reason).clone()
    }

    /// The eventfd the VMM thread waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        let fault = VmExit::TripleFault {
            vcpu: 1,
            registers: String::new(),
        };
        s.raise(fault.clone());
        s.raise(VmExit::HostRequest);
        assert_eq!(s.reason(), Some(fault));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(
            VmExit::EmulationFailure {
                vcpu: 0,
                suberror: 1
            }
            .to_string(),
            "instruction emulation failed on vCPU 0 (KVM internal error, suberror 1)"
        );
    }
}
