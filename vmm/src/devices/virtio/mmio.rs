//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register window a guest driver uses
//! to discover, negotiate with, configure and activate a device.
//!
//! Everything here is written by the guest and so is checked: register accesses must be aligned
//! 32-bit; queue set-up is only accepted between FEATURES_OK and DRIVER_OK on a queue that is not
//! ready; status may only move forward one step at a time; a device is activated only with queues that
//! fit guest memory. A refused access is logged and ignored, never fatal to the VMM.

use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    status, DeviceQueue, DeviceStateError, Interrupt, QueueSnapshot, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::devices::bus::{lock, BusDevice};
use crate::memory::GuestRamMap;

/// "virt"
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern register layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID: "RUND" is not a PCI vendor; virtio-mmio leaves the value free.
pub const MMIO_VENDOR_ID: u32 = 0x444e_5552;

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Size of the register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// A device behind its transport, as a snapshot reads it out and puts it back: the registers,
/// the queues (their live positions once the device is activated) and the device's own part.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    /// The virtio device ID, so that a state is never put back into another kind of device.
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device was activated (serving its queues).
    pub activated: bool,
    /// Each queue.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own part ([`VirtioDevice::save_state`]).
    pub device: serde_json::Value,
}

/// Errors making a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue size the device gave is not a valid virtio queue size.
    #[error("virtio device offers an invalid queue size")]
    QueueSize(#[source] virtio_queue::Error),
    /// The notification eventfd could not be made.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The virtio-mmio register window of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestRamMap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// A transport for `device`, raising its interrupt through `irqfd`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestRamMap,
        irqfd: EventFd,
    ) -> Result<Self, MmioError> {
        let sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut notify = Vec::with_capacity(sizes.len());
        for size in sizes {
            queues.push(Queue::new(size).map_err(MmioError::QueueSize)?);
            notify.push(
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MmioError::EventFd)?,
            );
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The notification eventfd of each queue, for registration as ioeventfds.
    pub fn queue_notifiers(&self) -> &[EventFd] {
        &self.notify
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device and its registers, for a snapshot; read while the VM is paused.
    pub fn state(&self) -> Result<MmioTransportState, DeviceStateError> {
        let device = lock(&self.device);
        // Once activated, the device owns the queues and only it knows how far they moved.
        let queues = if self.activated {
            device.queue_states()
        } else {
            self.queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect()
        };
        Ok(MmioTransportState {
            device_type: device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues,
            device: device.save_state()?,
        })
    }

    /// Puts back a [`Self::state`] read from a transport in front of the same kind of device: the
    /// registers, the device's own part, and, if it was serving, the device activated with the
    /// saved queue positions. The transport checks its part before anything changes; if the
    /// device then refuses its own part, the transport is left reset.
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), DeviceStateError> {
        let device_type = lock(&self.device).device_type();
        if state.device_type != device_type {
            return Err(DeviceStateError::Mismatch(format!(
                "state of virtio device type {}, device is type {device_type}",
                state.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(DeviceStateError::Mismatch(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        if state.acked_features & !self.offered_features() != 0 {
            return Err(DeviceStateError::Mismatch(format!(
                "features {:#x} were acked, the device offers {:#x}",
                state.acked_features,
                self.offered_features()
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(DeviceStateError::Mismatch(format!(
                    "queue {i} had maximum size {}, the device offers {}",
                    saved.max_size,
                    current.max_size()
                )));
            }
            let queue = Queue::try_from(*saved)
                .map_err(|e| DeviceStateError::Mismatch(format!("queue {i}: {e}")))?;
            if state.activated && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(DeviceStateError::Mismatch(format!(
                    "queue {i} does not fit guest memory"
                )));
            }
            queues.push(queue);
        }
        let serving =
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        if state.activated && state.status & serving != serving {
            return Err(DeviceStateError::Mismatch(format!(
                "activated with status {:#x}",
                state.status
            )));
        }

        self.reset();
        let mut device = lock(&self.device);
        device.restore_state(&state.device)?;
        if state.status & status::FEATURES_OK != 0 {
            device.set_acked_features(state.acked_features);
        }
        if state.activated {
            let mut device_queues = Vec::with_capacity(queues.len());
            for (i, (queue, evt)) in queues.iter().zip(&self.notify).enumerate() {
                let notify = evt.try_clone().map_err(|e| {
                    DeviceStateError::Busy(format!("cannot clone queue {i}'s eventfd: {e}"))
                })?;
                let queue = Queue::try_from(QueueSnapshot::from(queue.state()))
                    .map_err(|e| DeviceStateError::Mismatch(format!("queue {i}: {e}")))?;
                device_queues.push(DeviceQueue { queue, notify });
            }
            device
                .activate(self.mem.clone(), self.interrupt.clone(), device_queues)
                .map_err(|e| DeviceStateError::Mismatch(e.to_string()))?;
        }
        drop(device);
        self.queues = queues;
        self.activated = state.activated;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.set(state.interrupt_status);
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        lock(&self.device).features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may be written only while the driver sets the device up, on a queue that is
    /// not live yet.
    fn queue_writable(&mut self) -> bool {
        let setting_up =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        setting_up && self.selected_queue().is_some_and(|q| !q.ready())
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_select = v,
            reg::QUEUE_NOTIFY => self.notify_queue(v),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_NUM | reg::QUEUE_READY | reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH => {
                self.write_queue_register(offset, v)
            }
            _ => crate::guest_warn!(
                "virtio-mmio: write {v:#x} to read-only or unknown register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
            crate::guest_warn!("virtio-mmio: driver features written outside negotiation; ignored");
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                crate::guest_warn!(
                    "virtio-mmio: driver features page {sel} does not exist; ignored"
                );
                return;
            }
        };
        let mask = 0xffff_ffffu64 << shift;
        // Bits the device did not offer are dropped: a driver cannot enable what is not there.
        let accepted = (u64::from(v) << shift) & self.offered_features();
        self.acked_features = (self.acked_features & !mask) | accepted;
    }

    fn write_queue_register(&mut self, offset: u64, v: u32) {
        if !self.queue_writable() {
            crate::guest_warn!(
                "virtio-mmio: queue {} register {offset:#x} written while not configurable; ignored",
                self.queue_select
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        match offset {
            reg::QUEUE_NUM => {
                if let Err(e) = q.try_set_size(v.min(u32::from(u16::MAX)) as u16) {
                    crate::guest_warn!("virtio-mmio: queue size {v}: {e}; ignored");
                }
            }
            reg::QUEUE_READY => q.set_ready(v == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => crate::guest_warn!("virtio-mmio: register {offset:#x} is not a queue register"),
        }
    }

    fn notify_queue(&self, index: u32) {
        // Normally KVM catches this write with an ioeventfd; this path serves a VM built without one.
        match self.notify.get(index as usize) {
            Some(evt) if self.activated => {
                let _ = evt.write(1);
            }
            _ => crate::guest_warn!("virtio-mmio: notification of queue {index} ignored"),
        }
    }

    fn write_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        if v & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        let old = self.status;
        let added = v & !old;
        if v & old != old || added.count_ones() != 1 {
            crate::guest_warn!(
                "virtio-mmio: status {old:#x} -> {v:#x} is not one step forward; ignored"
            );
            return;
        }
        let allowed = match added {
            ACKNOWLEDGE => old == 0,
            DRIVER => old == ACKNOWLEDGE,
            FEATURES_OK => old == ACKNOWLEDGE | DRIVER,
            DRIVER_OK => old == ACKNOWLEDGE | DRIVER | FEATURES_OK,
            _ => false,
        };
        if !allowed {
            crate::guest_warn!("virtio-mmio: status {old:#x} -> {v:#x} out of order; ignored");
            return;
        }
        match added {
            FEATURES_OK => {
                if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                    // The driver reads Status back and sees FEATURES_OK missing: negotiation failed.
                    crate::guest_warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
                    return;
                }
                lock(&self.device).set_acked_features(self.acked_features);
            }
            DRIVER_OK => {
                self.status = v;
                self.activate();
                return;
            }
            _ => {}
        }
        self.status = v;
    }

    fn activate(&mut self) {
        let mut device_queues = Vec::with_capacity(self.queues.len());
        for (i, (q, evt)) in self.queues.iter().zip(&self.notify).enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                crate::guest_warn!(
                    "virtio-mmio: queue {i} does not fit guest memory; device needs reset"
                );
                self.needs_reset();
                return;
            }
            let notify = match evt.try_clone() {
                Ok(e) => e,
                Err(e) => {
                    crate::guest_error!("virtio-mmio: cannot clone queue {i}'s eventfd: {e}");
                    self.needs_reset();
                    return;
                }
            };
            let queue = match Queue::try_from(q.state()) {
                Ok(queue) => queue,
                Err(e) => {
                    crate::guest_warn!("virtio-mmio: queue {i}: {e}; device needs reset");
                    self.needs_reset();
                    return;
                }
            };
            device_queues.push(DeviceQueue { queue, notify });
        }
        let mut device = lock(&self.device);
        match device.activate(self.mem.clone(), self.interrupt.clone(), device_queues) {
            Ok(()) => self.activated = true,
            Err(e) => {
                drop(device);
                crate::guest_warn!("{e}; device needs reset");
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        let _ = self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.status = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            crate::guest_warn!(
                "virtio-mmio: {}-byte read at {offset:#x} is not an aligned 32-bit access",
                data.len()
            );
            data.fill(0xff);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER_OK == 0 && self.status & status::DRIVER == 0 {
                crate::guest_warn!(
                    "virtio-mmio: config write before the driver is attached; ignored"
                );
                return;
            }
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            crate::guest_warn!(
                "virtio-mmio: {}-byte write at {offset:#x} is not an aligned 32-bit access",
                data.len()
            );
            return;
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(data);
        self.write_register(offset, u32::from_le_bytes(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        negotiate, read_reg as r, setup_queue, write_reg as w,
    };
    use crate::devices::virtio::VirtioCommon;
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use status::*;
    use vm_memory::GuestAddress;

    /// A device with two queues and an 8-byte config space, recording what the transport tells it.
    struct TestDevice {
        common: VirtioCommon,
        acked: u64,
        config: [u8; 8],
        activated_with: Option<Vec<(u16, bool)>>,
        resets: u32,
        refuse: bool,
    }

    impl Default for TestDevice {
        fn default() -> Self {
            TestDevice {
                common: VirtioCommon::new("test", &[256, 16], 0b101).unwrap(),
                acked: 0,
                config: [0; 8],
                activated_with: None,
                resets: 0,
                refuse: false,
            }
        }
    }

    impl MutEventSubscriber for TestDevice {
        fn process(&mut self, _: Events, _: &mut EventOps) {}
        fn init(&mut self, _: &mut EventOps) {}
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.common
        }
        fn set_acked_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let start = offset as usize;
            if let Some(src) = self.config.get(start..start + data.len()) {
                data.copy_from_slice(src);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let start = offset as usize;
            if let Some(dst) = self.config.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _: GuestRamMap,
            _: Arc<Interrupt>,
            queues: Vec<DeviceQueue>,
        ) -> Result<(), super::super::ActivateError> {
            if self.refuse {
                return Err(super::super::ActivateError::Device("refused".into()));
            }
            self.activated_with = Some(
                queues
                    .iter()
                    .map(|q| (q.queue.size(), q.queue.ready()))
                    .collect(),
            );
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated_with = None;
        }
        fn queue_states(&self) -> Vec<QueueSnapshot> {
            self.activated_with
                .as_ref()
                .map(|qs| {
                    qs.iter()
                        .zip(self.queue_max_sizes())
                        .map(|(&(size, ready), &max_size)| QueueSnapshot {
                            max_size,
                            size,
                            ready,
                            next_avail: 7,
                            ..Default::default()
                        })
                        .collect()
                })
                .unwrap_or_default()
        }
        fn save_state(&self) -> Result<serde_json::Value, DeviceStateError> {
            Ok(serde_json::json!({ "config": self.config }))
        }
        fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceStateError> {
            let config = state
                .get("config")
                .cloned()
                .ok_or_else(|| DeviceStateError::Mismatch("no config".into()))?;
            self.config = serde_json::from_value(config).map_err(DeviceStateError::Format)?;
            Ok(())
        }
    }

    struct Fixture {
        dev: Arc<Mutex<TestDevice>>,
        t: MmioTransport,
        irq: EventFd,
    }

    fn fixture() -> Fixture {
        let dev = Arc::new(Mutex::new(TestDevice::default()));
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(dev.clone(), mem, irq.try_clone().unwrap()).unwrap();
        Fixture { dev, t, irq }
    }

    /// A queue's rings laid out from `base`, 4 KiB apart.
    fn rings(base: u64) -> (u64, u64, u64) {
        (base, base + 0x1000, base + 0x2000)
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        assert_eq!(r(&mut f.t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut f.t, reg::VERSION), 2);
        assert_eq!(r(&mut f.t, reg::DEVICE_ID), 4);
        assert_eq!(r(&mut f.t, reg::VENDOR_ID), MMIO_VENDOR_ID);
        w(&mut f.t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut f.t, reg::QUEUE_NUM_MAX), 16);
        w(&mut f.t, reg::QUEUE_SEL, 7);
        assert_eq!(r(&mut f.t, reg::QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn features_are_paged_and_include_version_1() {
        let mut f = fixture();
        assert_eq!(r(&mut f.t, reg::DEVICE_FEATURES), 0b101);
        w(&mut f.t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut f.t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w(&mut f.t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut f.t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn negotiation_keeps_only_offered_bits() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1 | 0b111 | (1 << 40));
        assert_eq!(f.t.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(f.dev.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0b101);
    }

    #[test]
    fn a_legacy_driver_cannot_reach_features_ok() {
        let mut f = fixture();
        negotiate(&mut f.t, 0b1);
        assert_eq!(f.t.status(), ACKNOWLEDGE | DRIVER, "FEATURES_OK refused");
        assert_eq!(f.dev.lock().unwrap().acked, 0);
    }

    #[test]
    fn features_cannot_change_after_features_ok() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1 | 1);
        w(&mut f.t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut f.t, reg::DRIVER_FEATURES, 0b100);
        assert_eq!(f.t.state().unwrap().acked_features, VIRTIO_F_VERSION_1 | 1);
    }

    #[test]
    fn status_moves_one_step_at_a_time() {
        let mut f = fixture();
        w(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        assert_eq!(f.t.status(), 0, "skipping ACKNOWLEDGE");
        w(&mut f.t, reg::STATUS, DRIVER_OK);
        assert_eq!(f.t.status(), 0);
        w(&mut f.t, reg::STATUS, ACKNOWLEDGE);
        w(
            &mut f.t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(f.t.status(), ACKNOWLEDGE, "two steps at once");
        w(&mut f.t, reg::STATUS, 0x40);
        assert_eq!(
            f.t.status(),
            ACKNOWLEDGE,
            "NEEDS_RESET is the device's to set"
        );
        w(&mut f.t, reg::STATUS, ACKNOWLEDGE | FAILED);
        assert_eq!(f.t.status(), ACKNOWLEDGE | FAILED);
    }

    #[test]
    fn queues_are_configurable_only_during_setup() {
        let mut f = fixture();
        // Before FEATURES_OK: ignored.
        w(&mut f.t, reg::QUEUE_SEL, 0);
        w(&mut f.t, reg::QUEUE_NUM, 64);
        assert_eq!(f.t.state().unwrap().queues[0].size, 256);
        negotiate(&mut f.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.t, 0, 64, rings(0x1_0000));
        let q = &f.t.state().unwrap().queues[0];
        assert_eq!(
            (q.size, q.ready, q.desc_table, q.avail_ring, q.used_ring),
            (64, true, 0x1_0000, 0x1_1000, 0x1_2000)
        );
        // A ready queue is frozen.
        w(&mut f.t, reg::QUEUE_NUM, 32);
        w(&mut f.t, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(f.t.state().unwrap().queues[0].size, 64);
        assert_eq!(f.t.state().unwrap().queues[0].desc_table, 0x1_0000);
        // Invalid sizes (not a power of two, above the maximum) are refused.
        w(&mut f.t, reg::QUEUE_SEL, 1);
        w(&mut f.t, reg::QUEUE_NUM, 12);
        w(&mut f.t, reg::QUEUE_NUM, 32);
        assert_eq!(f.t.state().unwrap().queues[1].size, 16);
        // An unselectable queue is ignored without harm.
        w(&mut f.t, reg::QUEUE_SEL, 9);
        w(&mut f.t, reg::QUEUE_NUM, 8);
        assert_eq!(r(&mut f.t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn driver_ok_activates_with_valid_queues() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.t, 0, 64, rings(0x1_0000));
        setup_queue(&mut f.t, 1, 16, rings(0x2_0000));
        w(
            &mut f.t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(f.t.status() & DRIVER_OK, DRIVER_OK);
        assert_eq!(
            f.dev.lock().unwrap().activated_with,
            Some(vec![(64, true), (16, true)])
        );
        // Queue set-up is closed once live.
        w(&mut f.t, reg::QUEUE_SEL, 0);
        w(&mut f.t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut f.t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn a_queue_outside_guest_memory_needs_reset() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.t, 0, 64, rings(0xffff_0000));
        w(
            &mut f.t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(f.t.status() & DEVICE_NEEDS_RESET, 0);
        assert!(f.dev.lock().unwrap().activated_with.is_none());
        assert_eq!(
            r(&mut f.t, reg::INTERRUPT_STATUS),
            super::super::INTERRUPT_CONFIG
        );
        assert_eq!(f.irq.read().unwrap(), 1);
    }

    #[test]
    fn a_refusing_device_needs_reset() {
        let mut f = fixture();
        f.dev.lock().unwrap().refuse = true;
        negotiate(&mut f.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.t, 0, 64, rings(0x1_0000));
        w(
            &mut f.t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(f.t.status() & DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn interrupts_are_acknowledged_bit_by_bit() {
        let f = fixture();
        let mut t = f.t;
        t.interrupt.signal_used_ring().unwrap();
        t.interrupt.signal_config_change().unwrap();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 3);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 2);
        assert_eq!(f.irq.read().unwrap(), 2);
    }

    #[test]
    fn reset_returns_to_the_initial_state() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1 | 1);
        setup_queue(&mut f.t, 0, 64, rings(0x1_0000));
        w(
            &mut f.t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        f.t.interrupt.signal_used_ring().unwrap();
        w(&mut f.t, reg::STATUS, 0);
        let s = f.t.state().unwrap();
        assert_eq!((s.status, s.acked_features, s.interrupt_status), (0, 0, 0));
        assert_eq!(
            s.queues[0],
            QueueSnapshot {
                max_size: 256,
                size: 256,
                ..Default::default()
            }
        );
        assert_eq!(f.dev.lock().unwrap().resets, 1);
        assert!(f.dev.lock().unwrap().activated_with.is_none());
    }

    #[test]
    fn short_unaligned_and_out_of_range_accesses() {
        let mut f = fixture();
        let mut two = [0u8; 2];
        f.t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut four = [0u8; 4];
        f.t.read(reg::MAGIC + 1, &mut four);
        assert_eq!(four, [0xff; 4]);
        w(&mut f.t, reg::STATUS, ACKNOWLEDGE);
        f.t.write(reg::STATUS, &[3u8]);
        f.t.write(reg::STATUS + 2, &3u32.to_le_bytes());
        assert_eq!(
            f.t.status(),
            ACKNOWLEDGE,
            "short/unaligned status writes ignored"
        );
        assert_eq!(r(&mut f.t, 0x0f8), 0, "unknown register reads as 0");
        w(&mut f.t, reg::MAGIC, 0);
        assert_eq!(r(&mut f.t, reg::MAGIC), MMIO_MAGIC, "read-only register");
        // Config space: any width, bounds left to the device.
        w(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        f.t.write(reg::CONFIG + 2, &[0xaa, 0xbb]);
        let mut c = [0u8; 4];
        f.t.read(reg::CONFIG, &mut c);
        assert_eq!(c, [0, 0, 0xaa, 0xbb]);
        let mut far = [0x11u8; 4];
        f.t.read(reg::CONFIG + 0x800, &mut far);
        assert_eq!(far, [0; 4], "past the device's config space");
    }

    #[test]
    fn state_reads_out_every_register() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1 | 1);
        w(&mut f.t, reg::QUEUE_SEL, 1);
        let s = f.t.state().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let back: MmioTransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.queue_select, 1);
        assert_eq!(back.queues.len(), 2);
    }

    #[test]
    fn restore_puts_an_activated_device_back() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1 | 1);
        setup_queue(&mut f.t, 0, 64, rings(0x1_0000));
        w(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w(
            &mut f.t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        f.dev.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
        f.t.interrupt.signal_used_ring().unwrap();
        let saved = f.t.state().unwrap();
        assert!(saved.activated);
        assert_eq!(
            saved.queues[0].next_avail, 7,
            "live positions come from the device"
        );
        let json = serde_json::to_string(&saved).unwrap();

        let mut g = fixture();
        g.t.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        let dev = g.dev.lock().unwrap();
        assert_eq!(dev.config, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(dev.acked, VIRTIO_F_VERSION_1 | 1);
        assert_eq!(dev.activated_with, Some(vec![(64, true), (16, false)]));
        drop(dev);
        assert_eq!(g.t.status(), saved.status);
        assert_eq!(r(&mut g.t, reg::INTERRUPT_STATUS), INTERRUPT_USED_RING_BIT);
        assert_eq!(g.t.state().unwrap(), saved);
    }

    const INTERRUPT_USED_RING_BIT: u32 = super::super::INTERRUPT_USED_RING;

    #[test]
    fn restore_refuses_a_state_that_does_not_fit() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1 | 1);
        let good = f.t.state().unwrap();
        let mut g = fixture();

        let mut other_type = good.clone();
        other_type.device_type = 2;
        let mut few_queues = good.clone();
        few_queues.queues.pop();
        let mut unoffered = good.clone();
        unoffered.acked_features |= 1 << 1;
        let mut bigger = good.clone();
        bigger.queues[1].max_size = 32;
        let mut odd_size = good.clone();
        odd_size.queues[0].size = 3;
        let mut not_ok = good.clone();
        not_ok.activated = true;
        let mut outside = good.clone();
        outside.activated = true;
        outside.status = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        outside.queues[0].ready = true;
        outside.queues[0].desc_table = 0x1000_0000;
        let mut bad_device = good.clone();
        bad_device.device = serde_json::json!({ "config": "nope" });
        for (what, state) in [
            ("type", other_type),
            ("queue count", few_queues),
            ("features", unoffered),
            ("max size", bigger),
            ("queue size", odd_size),
            ("status", not_ok),
            ("memory", outside),
            ("device part", bad_device),
        ] {
            assert!(g.t.restore(&state).is_err(), "{what} accepted");
            assert!(g.dev.lock().unwrap().activated_with.is_none(), "{what}");
        }
        g.t.restore(&good).unwrap();
        assert_eq!(g.t.state().unwrap(), good);
    }
}
