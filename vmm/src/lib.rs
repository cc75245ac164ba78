//! rund's KVM microVM monitor, embedded in the shim process.
//!
//! A [`VmConfig`] names a kernel, an initrd, a command line, vCPUs, memory, a serial sink and virtio
//! devices. [`Vm::new`] builds the VM — memfd-backed RAM (never prefaulted), in-kernel irqchip and PIT,
//! a direct 64-bit boot of a vmlinux or bzImage with zero page, e820 map and MP table, normalised
//! CPUID, a 16550 console and the i8042 reset line, virtio-mmio transports — and [`Vm::start`] runs it,
//! returning a [`VmHandle`] that pauses, resumes, reads out and puts back state, stops, and waits
//! for the [`VmExit`] that says why the VM ended.
//!
//! Before booting a Linux guest, callers run [`host_check::check_host`]: a PVM-backed /dev/kvm answers
//! the KVM API but cannot run a Linux guest.

pub mod arch;
pub mod config;
pub mod devices;
pub mod exit;
pub mod host_check;
pub mod loader;
pub mod memory;
pub mod state;
pub mod testing;
pub mod vcpu;
pub mod vm;

pub use config::{SerialOutput, VmConfig};
pub use exit::VmExit;
pub use state::VmState;
pub use vm::{Vm, VmError, VmHandle};
