//! Virtio devices: the trait a device implements, its interrupt, and the virtio-mmio transport that
//! puts it in front of the guest.
//!
//! A device is also an event-loop subscriber: once the driver activates it, it registers its queues'
//! notification eventfds (which KVM signals through ioeventfd, with no VM exit to user space) and
//! serves them on the VMM thread. [`common`] is that part, the same for every device, with the
//! feature bookkeeping.

pub mod block;
pub mod common;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod segments;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

pub use common::{ActiveQueues, QueueEvent, VirtioCommon};

use event_manager::MutEventSubscriber;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRamMap;

/// The device complies with virtio 1.x; a modern (version 2) MMIO transport requires it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Interrupt status bit: a used ring was updated.
pub const INTERRUPT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// Copies the bytes of a device's configuration space `config` from `offset` into `data`; bytes
/// past its end are left as they are.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    let Some(src) = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..))
    else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// A device's interrupt: the status register the guest reads and acknowledges, and the irqfd that
/// injects the interrupt.
#[derive(Debug)]
pub struct Interrupt {
    irqfd: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    /// An interrupt injected through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            irqfd,
            status: AtomicU32::new(0),
        }
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Tells the driver that a used ring moved.
    pub fn signal_used_ring(&self) -> std::io::Result<()> {
        self.signal(INTERRUPT_USED_RING)
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(INTERRUPT_CONFIG)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts back a saved InterruptStatus, without injecting (the irqchip state holds the line).
    pub fn set(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Back to no pending interrupt (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// A queue as the driver configured it, with the eventfd KVM signals when the driver notifies it.
#[derive(Debug)]
pub struct DeviceQueue {
    /// The queue.
    pub queue: Queue,
    /// Signalled on each driver notification.
    pub notify: EventFd,
}

/// One queue's state as a snapshot holds it: [`QueueState`], serialisable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available ring entry the device reads.
    pub next_avail: u16,
    /// Next used ring entry the device writes.
    pub next_used: u16,
    /// EVENT_IDX in use.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

/// Builds a [`Queue`] back from a snapshot; virtio-queue checks sizes and alignment.
impl TryFrom<QueueSnapshot> for Queue {
    type Error = virtio_queue::Error;

    fn try_from(s: QueueSnapshot) -> Result<Self, Self::Error> {
        Queue::try_from(QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        })
    }
}

/// Why a device's state could not be read out or put back.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// The saved state does not parse as this device's.
    #[error("virtio device state does not parse")]
    Format(#[source] serde_json::Error),
    /// The saved state does not fit the device it is put back into.
    #[error("virtio device state does not fit this device: {0}")]
    Mismatch(String),
    /// The device cannot take a state now (activated, or busy).
    #[error("virtio device cannot take a state now: {0}")]
    Busy(String),
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device was given fewer queues than it needs, or unusable ones.
    #[error("virtio device: queue {0} is not usable")]
    BadQueue(usize),
    /// The device's own set-up failed.
    #[error("virtio device: {0}")]
    Device(String),
}

/// A virtio device behind a transport. The features, the queues and their event-loop
/// registration live in the device's [`VirtioCommon`]; the default methods serve them from there.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// The virtio device ID (1 net, 2 block, 19 vsock, 26 fs, ...).
    fn device_type(&self) -> u32;
    /// The part every device keeps the same way.
    fn common(&self) -> &VirtioCommon;
    /// The part every device keeps the same way, to change it.
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// The maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().max_sizes()
    }
    /// Features offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64 {
        self.common().avail_features()
    }
    /// The subset the driver accepted, when it sets FEATURES_OK.
    fn set_acked_features(&mut self, features: u64) {
        self.common_mut().set_acked_features(features)
    }
    /// Reads the device-specific configuration space; out-of-range bytes stay as they are.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space. By default it is read-only for the
    /// driver, and a write is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio device type {}: {}-byte config write at {offset:#x} ignored",
            self.device_type(),
            data.len()
        );
    }
    /// The device's own work when the driver activates it, before the queues go live (virtio-fs
    /// starts a FUSE server); an error refuses the activation. Nothing by default.
    fn start_backend(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }
    /// The device's own work when the driver resets it (virtio-vsock drops host connections).
    /// Nothing by default.
    fn stop_backend(&mut self) {}
    /// The driver set DRIVER_OK: start serving `queues` (one per entry of `queue_max_sizes`).
    fn activate(
        &mut self,
        mem: GuestRamMap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        self.common().check(&queues)?;
        self.start_backend()?;
        self.common_mut().activate(mem, interrupt, queues)
    }
    /// The driver reset the device: stop serving and forget the queues and accepted features.
    fn reset(&mut self) {
        self.stop_backend();
        self.common_mut().reset()
    }
    /// The positions of an activated device's queues, in queue order (empty when not activated).
    fn queue_states(&self) -> Vec<QueueSnapshot> {
        self.common().queue_states()
    }
    /// One line on the device's state, for a report on a guest that stopped answering.
    fn report(&self) -> String {
        self.common().report()
    }
    /// The device's own part of a snapshot (configuration space, backend settings; not the queues
    /// nor the negotiated features, which the transport keeps). Read while the VM is paused.
    fn save_state(&self) -> Result<serde_json::Value, DeviceStateError>;
    /// Puts back what [`Self::save_state`] returned, into a device that is not activated; the
    /// transport then sets the acked features and activates it with the saved queues. A state
    /// that does not fit this device (another backend size, mode or ID) is refused.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceStateError>;
    /// The device's name in a snapshot's device layout: a restore hands each saved state to the
    /// device of the same key, wherever the caller listed it. By default the kind of device
    /// (`blk`, `vsock`, ...); the VMM numbers repeats (`blk#1`). virtio-fs adds its tag.
    fn state_key(&self) -> String {
        device_kind(self.device_type()).to_owned()
    }
    /// The VM was restored from a snapshot and is about to run: the host side of whatever the
    /// guest had open is gone (virtio-vsock resets its transport if there was any). Nothing by
    /// default.
    fn restored(&mut self) {}
    /// Connections the guest has through this device that a snapshot cannot carry (vsock's);
    /// none by default. A snapshot taken while there are none restores without a reset.
    fn open_connections(&self) -> usize {
        0
    }
}

/// A short name for a virtio device ID.
pub fn device_kind(device_type: u32) -> &'static str {
    match device_type {
        1 => "net",
        2 => "blk",
        19 => "vsock",
        26 => "fs",
        _ => "virtio",
    }
}
