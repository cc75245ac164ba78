//! rund's KVM microVM monitor, embedded in the shim process.
//!
//! A [`VmConfig`] names a kernel, an initrd, a command line, vCPUs, memory, a serial sink and virtio
//! devices. [`Vm::new`] builds the VM — anonymous RAM (never prefaulted), in-kernel irqchip and PIT,
//! a direct 64-bit boot of a vmlinux or bzImage with zero page, e820 map and MP table, normalised
//! CPUID, a 16550 console and the i8042 reset line, virtio-mmio transports — and [`Vm::start`] runs it,
//! returning a [`VmHandle`] that pauses, resumes, reads out and puts back state, writes a
//! [`snapshot`] that [`Vm::restore`] restores (RAM mapped copy-on-write from its memory file),
//! stops, and waits for the [`VmExit`] that says why the VM ended.
//!
//! Before booting a Linux guest, callers run [`host_check::check_host`]: a PVM-backed /dev/kvm answers
//! the KVM API but cannot run a Linux guest.

pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
pub mod guest_log;
pub mod host_check;
pub mod loader;
pub mod memory;
pub mod snapshot;
pub mod state;
pub mod testing;
pub mod vcpu;
pub mod vcpu_activity;
pub mod vm;

pub use builder::{PreparedRestore, RestoreSpec, TemplatePages};
pub use config::{SerialOutput, VmConfig};
pub use exit::VmExit;
pub use state::VmState;
pub use vm::{SnapshotSize, Vm, VmError, VmHandle};

/// An error and its sources on one line (`a: b: c`), for messages a user reads. A cause whose
/// text the message already holds (thiserror messages often repeat their source) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod error_chain_tests {
    #[test]
    fn every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading {0}")]
        struct Outer(&'static str, #[source] std::io::Error);
        let e = Outer("/x", std::io::Error::other("disk on fire"));
        assert_eq!(super::error_chain(&e), "reading /x: disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("opening: {0}")]
        struct Repeats(#[source] std::io::Error);
        let e = Repeats(std::io::Error::other("gone"));
        assert_eq!(super::error_chain(&e), "opening: gone");
    }
}
