//! A paused VM's state as plain data: what a snapshot writes out and a restore puts back.
//! Guest memory is not in here: it is the memory file itself.

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};

use crate::devices::virtio::mmio::MmioTransportState;
use crate::vcpu::VcpuState;

/// Everything KVM and the devices hold for a paused VM, but its memory.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// One per vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// The master PIC, the slave PIC and the IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The kvm-clock.
    pub clock: kvm_clock_data,
    /// Each virtio-mmio transport's registers, in device order.
    pub transports: Vec<MmioTransportState>,
}
