//! The kernel's vhost-net as the device's data path: the kernel moves frames between the tap and
//! the queues, woken by the queues' ioeventfds (the kicks KVM already signals), so neither a
//! frame nor a notification passes through the VMM thread. Used when `/dev/vhost-net` opens;
//! the user-space path in [`device`](super::device) serves otherwise.
//!
//! vhost signals a used ring on a "call" eventfd of its own. On virtio-mmio the driver reads
//! InterruptStatus before it looks at the rings, so the call cannot be the irqfd itself: the VMM
//! thread reads it, sets the used-ring bit and then raises the interrupt (Dragonball does the
//! same on MMIO).

use std::sync::Arc;

use vhost::vhost_kern::net::Net as VhostNet;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestMemory, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use crate::devices::virtio::DeviceQueue;
use crate::memory::GuestRamMap;

/// Where vhost-net's device node is.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";

/// Errors starting vhost-net on a device's queues.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("opening {VHOST_NET_PATH}")]
    Open(#[source] vhost::Error),
    #[error("vhost-net: {0}")]
    Ioctl(&'static str, #[source] vhost::Error),
    #[error("vhost-net: guest memory region at {0:#x} has no host address")]
    Memory(u64),
    #[error("vhost-net does not take feature bits {0:#x} the driver accepted")]
    Features(u64),
    #[error("vhost-net: cannot create a call eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Whether `/dev/vhost-net` can be opened here (the module loaded, the node readable and
/// writable).
pub fn available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_NET_PATH)
        .is_ok()
}

/// Feature bits that are vhost's to serve: the rings' and the header's; the rest (offloads,
/// MAC, MTU, status) are the tap's or the configuration space's.
const VHOST_FEATURES: u64 = (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF)
    | (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);

/// Each queue's call eventfd: made with the device, so that the VMM thread registers them once.
#[derive(Debug)]
pub struct Calls(pub Vec<EventFd>);

impl Calls {
    pub fn new(queues: usize) -> Result<Calls, VhostError> {
        (0..queues)
            .map(|_| {
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VhostError::EventFd)
            })
            .collect::<Result<_, _>>()
            .map(Calls)
    }
}

/// vhost-net serving one activation of the device's queues; stopped on drop.
pub struct VhostDataPath {
    net: VhostNet<Arc<GuestRamMap>>,
    queues: usize,
}

impl std::fmt::Debug for VhostDataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostDataPath")
            .field("queues", &self.queues)
            .finish()
    }
}

fn ioctl(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostError {
    move |e| VhostError::Ioctl(what, e)
}

impl VhostDataPath {
    /// Hands `queues` (at the positions the driver or a restore left them) and `tap` to a new
    /// vhost-net instance, with the `acked` features.
    pub fn start(
        mem: &GuestRamMap,
        queues: &[DeviceQueue],
        tap: &Tap,
        acked: u64,
        calls: &Calls,
    ) -> Result<VhostDataPath, VhostError> {
        let mem = Arc::new(mem.clone());
        let regions = mem
            .iter()
            .map(|r| {
                let start = r.start_addr().raw_value();
                let host = r
                    .get_host_address(MemoryRegionAddress(0))
                    .map_err(|_| VhostError::Memory(start))?;
                Ok(VhostUserMemoryRegionInfo {
                    guest_phys_addr: start,
                    memory_size: r.len(),
                    userspace_addr: host as u64,
                    mmap_offset: 0,
                    mmap_handle: -1,
                })
            })
            .collect::<Result<Vec<_>, VhostError>>()?;
        let net = VhostNet::new(mem).map_err(VhostError::Open)?;
        net.set_owner().map_err(ioctl("SET_OWNER"))?;
        let offered = net.get_features().map_err(ioctl("GET_FEATURES"))?;
        let wanted = acked & VHOST_FEATURES;
        if wanted & !offered != 0 {
            return Err(VhostError::Features(wanted & !offered));
        }
        net.set_features(wanted).map_err(ioctl("SET_FEATURES"))?;
        net.set_mem_table(&regions)
            .map_err(ioctl("SET_MEM_TABLE"))?;
        for (i, q) in queues.iter().enumerate() {
            let queue = &q.queue;
            net.set_vring_num(i, queue.size())
                .map_err(ioctl("SET_VRING_NUM"))?;
            let ring = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: queue.desc_table(),
                used_ring_addr: queue.used_ring(),
                avail_ring_addr: queue.avail_ring(),
                log_addr: None,
            };
            net.set_vring_addr(i, &ring)
                .map_err(ioctl("SET_VRING_ADDR"))?;
            net.set_vring_base(i, queue.next_avail())
                .map_err(ioctl("SET_VRING_BASE"))?;
            net.set_vring_call(i, &calls.0[i])
                .map_err(ioctl("SET_VRING_CALL"))?;
            net.set_vring_kick(i, &q.notify)
                .map_err(ioctl("SET_VRING_KICK"))?;
        }
        let path = VhostDataPath {
            net,
            queues: queues.len(),
        };
        for (i, q) in queues.iter().enumerate() {
            vhost::net::VhostNet::set_backend(&path.net, i, Some(tap.file()))
                .map_err(ioctl("NET_SET_BACKEND"))?;
            // Chains made available before the handover (a restore's) were kicked to no one.
            if let Err(e) = q.notify.write(1) {
                crate::guest_warn!("vhost-net: kicking queue {i}: {e}");
            }
        }
        Ok(path)
    }

    /// Where vhost would next take a chain from queue `i`.
    pub fn next_avail(&self, i: usize) -> Option<u16> {
        self.net.get_vring_base(i).ok().map(|n| n as u16)
    }
}

impl Drop for VhostDataPath {
    fn drop(&mut self) {
        // Detached before the fd closes, so that the kernel stops touching guest memory now.
        for i in 0..self.queues {
            if let Err(e) = vhost::net::VhostNet::set_backend(&self.net, i, None) {
                crate::guest_warn!("vhost-net: detaching queue {i}: {e}");
            }
        }
    }
}
