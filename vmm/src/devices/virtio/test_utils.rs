//! What the device tests share: the driver's side of a split queue in guest memory (chains
//! written, completions read back), a device activated directly on such queues, and a device
//! brought up through the virtio-mmio registers as a guest driver does.
//!
//! virtio-queue's own `MockSplitQueue` places the used ring inside the available ring for some
//! sizes (16 entries: avail at 256..294, used at 276), so [`QueueDriver`] uses a fixed, roomy
//! layout: descriptor table at its base, available ring 4 KiB above, used ring 8 KiB above.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{reg, MmioTransport};
use super::{status, DeviceQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::memory::GuestRamMap;

/// A descriptor the device reads.
pub const R: u16 = 0;
/// A descriptor the device writes.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// The chain goes on at the descriptor named in `next`.
pub const N: u16 = VRING_DESC_F_NEXT as u16;

/// One split queue as a driver laid it out in guest memory.
#[derive(Clone)]
pub struct QueueDriver {
    mem: GuestRamMap,
    base: u64,
    size: u16,
    /// The descriptor table slot [`Self::add_chain`] writes next.
    next_slot: Cell<u16>,
}

impl QueueDriver {
    /// A queue of `size` entries whose descriptor table is at `base`.
    pub fn new(mem: &GuestRamMap, base: u64, size: u16) -> QueueDriver {
        QueueDriver {
            mem: mem.clone(),
            base,
            size,
            next_slot: Cell::new(0),
        }
    }

    /// Entries in the queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The descriptor table's address.
    pub fn desc(&self) -> u64 {
        self.base
    }

    /// The available ring's address.
    pub fn avail(&self) -> u64 {
        self.base + 0x1000
    }

    /// The used ring's address.
    pub fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// The device's view of the queue, as the transport would hand it over.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc() as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail() as u32), Some(0));
        q.set_used_ring_address(Some(self.used() as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn w16(&self, addr: u64, v: u16) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    fn r16(&self, addr: u64) -> u16 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Writes `descs` (addr, len, flags, next) at table index `at` onwards.
    pub fn write_descs(&self, descs: &[(u64, u32, u16, u16)], at: u16) {
        for (i, &(a, l, f, n)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
            let addr = self.desc() + 16 * u64::from(at + i as u16);
            self.mem.write_obj(d, GuestAddress(addr)).unwrap();
        }
    }

    /// Makes the chain starting at `head` available.
    pub fn make_available(&self, head: u16) {
        let idx = self.avail_idx();
        self.w16(self.avail() + 4 + 2 * u64::from(idx % self.size), head);
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Writes `descs` at `at` and makes `at` available.
    pub fn push(&self, descs: &[(u64, u32, u16, u16)], at: u16) {
        self.write_descs(descs, at);
        self.make_available(at);
    }

    /// `descs` (addr, len, flags) as a chain at table index `at`: each linked to the next with
    /// NEXT.
    pub fn linked(descs: &[(u64, u32, u16)], at: u16) -> Vec<(u64, u32, u16, u16)> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let f = if i + 1 < descs.len() { f | N } else { f };
                (a, l, f, at + i as u16 + 1)
            })
            .collect()
    }

    /// Makes a chain of `descs` (addr, len, flags) available in the next free table slots
    /// (starting over at 0 when they run out); returns its head.
    pub fn add_chain(&self, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        if self.next_slot.get() + n > self.size {
            self.next_slot.set(0);
        }
        let at = self.next_slot.get();
        self.next_slot.set(at + n);
        self.push(&Self::linked(descs, at), at);
        at
    }

    /// The table slot [`Self::add_chain`] uses next.
    pub fn next_slot(&self) -> u16 {
        self.next_slot.get()
    }

    /// The available index.
    pub fn avail_idx(&self) -> u16 {
        self.r16(self.avail() + 2)
    }

    /// Sets the available index (a hostile one, too).
    pub fn set_avail_idx(&self, v: u16) {
        self.w16(self.avail() + 2, v)
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        self.r16(self.used() + 2)
    }

    /// Used ring entry `i`: (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used() + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// EVENT_IDX: the used index the driver wants an interrupt after.
    pub fn set_used_event(&self, v: u16) {
        self.w16(self.avail() + 4 + 2 * u64::from(self.size), v)
    }

    /// EVENT_IDX: the available index the device wants a notification at.
    pub fn avail_event(&self) -> u16 {
        self.r16(self.used() + 4 + 8 * u64::from(self.size))
    }

    /// Both rings back to empty, as a driver probing afresh leaves them.
    pub fn clear(&self) {
        self.set_avail_idx(0);
        self.w16(self.used() + 2, 0);
        self.next_slot.set(0);
    }
}

/// Accepts `acked` and activates `dev` directly (no transport) on `drivers`' queues, each with its
/// own notifier; returns the eventfd the device's interrupt writes.
pub fn activate(
    dev: &mut dyn VirtioDevice,
    mem: &GuestRamMap,
    drivers: &[&QueueDriver],
    acked: u64,
) -> EventFd {
    dev.set_acked_features(acked);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let queues = drivers
        .iter()
        .map(|d| DeviceQueue {
            queue: d.queue(),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        })
        .collect();
    dev.activate(
        mem.clone(),
        Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        queues,
    )
    .unwrap();
    irq
}

/// Reads a 32-bit register of the transport.
pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(offset, &mut d);
    u32::from_le_bytes(d)
}

/// Writes a 32-bit register of the transport.
pub fn write_reg(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Drives the device from its current status to FEATURES_OK, accepting `features`.
pub fn negotiate(t: &mut MmioTransport, features: u64) {
    use status::*;
    write_reg(t, reg::STATUS, ACKNOWLEDGE);
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    write_reg(t, reg::DRIVER_FEATURES_SEL, 0);
    write_reg(t, reg::DRIVER_FEATURES, features as u32);
    write_reg(t, reg::DRIVER_FEATURES_SEL, 1);
    write_reg(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

/// Sets up queue `index` with `size` entries at `desc`, `avail` and `used`, and makes it ready.
pub fn setup_queue(
    t: &mut MmioTransport,
    index: u32,
    size: u16,
    (desc, avail, used): (u64, u64, u64),
) {
    write_reg(t, reg::QUEUE_SEL, index);
    write_reg(t, reg::QUEUE_NUM, u32::from(size));
    for (low, v) in [
        (reg::QUEUE_DESC_LOW, desc),
        (reg::QUEUE_DRIVER_LOW, avail),
        (reg::QUEUE_DEVICE_LOW, used),
    ] {
        write_reg(t, low, v as u32);
        write_reg(t, low + 4, (v >> 32) as u32);
    }
    write_reg(t, reg::QUEUE_READY, 1);
}

/// What a guest driver does to start a device: reset, accept every feature offered, set up one
/// queue per driver, DRIVER_OK. Panics if the device then needs a reset.
pub fn bring_up(t: &mut MmioTransport, drivers: &[&QueueDriver]) {
    use status::*;
    write_reg(t, reg::STATUS, 0);
    write_reg(t, reg::DEVICE_FEATURES_SEL, 0);
    let offered = read_reg(t, reg::DEVICE_FEATURES);
    negotiate(t, u64::from(offered) | VIRTIO_F_VERSION_1);
    for (i, d) in drivers.iter().enumerate() {
        write_reg(t, reg::QUEUE_SEL, i as u32);
        assert!(read_reg(t, reg::QUEUE_NUM_MAX) >= u32::from(d.size()));
        setup_queue(t, i as u32, d.size(), (d.desc(), d.avail(), d.used()));
    }
    write_reg(
        t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(t.status() & DEVICE_NEEDS_RESET, 0);
}

/// Runs the event loop until `done` holds; panics naming `what` after two seconds.
pub fn run_until<T: MutEventSubscriber>(
    em: &mut EventManager<T>,
    mut done: impl FnMut() -> bool,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        em.run_with_timeout(50).unwrap();
    }
}
