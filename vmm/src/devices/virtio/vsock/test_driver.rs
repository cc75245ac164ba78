//! The driver's side of a split queue at a chosen place in guest memory, for tests (the block
//! device's driver has one fixed layout; vsock needs three queues).

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Entries in each test queue.
pub const QSIZE: u16 = 64;

/// One queue: descriptor table at `base`, available ring at `base + 0x1000`, used ring at
/// `base + 0x2000`.
#[derive(Clone)]
pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub base: u64,
}

impl Driver {
    pub fn desc(&self) -> u64 {
        self.base
    }
    pub fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    pub fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// The device's view of the queue, as the transport would hand it over.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
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
        self.w16(self.avail() + 4 + 2 * u64::from(idx % QSIZE), head);
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Writes `descs` at `at` and makes `at` available.
    pub fn push(&self, descs: &[(u64, u32, u16, u16)], at: u16) {
        self.write_descs(descs, at);
        self.make_available(at);
    }

    pub fn avail_idx(&self) -> u16 {
        self.r16(self.avail() + 2)
    }

    pub fn set_avail_idx(&self, v: u16) {
        self.w16(self.avail() + 2, v)
    }

    pub fn used_idx(&self) -> u16 {
        self.r16(self.used() + 2)
    }

    /// Used ring entry `i`: (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used() + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// EVENT_IDX: the used index the driver wants an interrupt after.
    pub fn set_used_event(&self, v: u16) {
        self.w16(self.avail() + 4 + 2 * u64::from(QSIZE), v)
    }
}
