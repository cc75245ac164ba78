//! virtio-net (virtio 1.2, 5.1) over a host tap: through the kernel's vhost-net where
//! `/dev/vhost-net` opens, else served in user space on the VMM thread.
//!
//! - [`tap`]: the host side: a tap opened by name (in whatever network namespace the opening
//!   thread is in) with the virtio-net header on, nonblocking, and its offloads.
//! - [`frame`]: turning a chain the guest wrote into a checked TX frame, and a frame into RX
//!   buffers. Everything in a chain is hostile; this is where lengths are bounded.
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) implementation, both queues, and the
//!   state a snapshot keeps.
//! - [`vhost`]: the kernel's vhost-net as the data path (the queues' kicks go to the kernel, its
//!   used-ring calls come back through the VMM thread, which sets InterruptStatus).
//! - `event_handler`: glue to the VMM thread's event loop (the tap's fd beside the queues').
//!
//! A device may have no tap (a template's NIC: the clone restored from it gets its own); it then
//! drops what the guest sends and has nothing to receive.

pub mod device;
mod event_handler;
pub mod frame;
pub mod tap;
#[cfg(test)]
mod tests;
pub mod vhost;

pub use device::{DataPath, MacAddr, Net, NetConfig, NetCounters, NetError, NetState};
pub use tap::{Tap, TapError};

/// The virtio device ID of a network device.
pub const NET_DEVICE_ID: u32 = 1;

/// Queue indices: one receive and one transmit queue (no multiqueue, no control queue).
pub const RX_QUEUE: usize = 0;
/// The driver-to-device queue.
pub const TX_QUEUE: usize = 1;

/// Every queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;

/// Bytes of `struct virtio_net_hdr_v1`, which precedes every frame both ways (virtio 1.x always
/// has `num_buffers`).
pub const HDR_LEN: usize = 12;

/// The largest frame either way: a 64 KiB GSO packet plus its Ethernet header (and a VLAN tag).
pub const MAX_FRAME: usize = 65_550;

/// The largest header-plus-frame a chain may carry or a tap read may return.
pub const MAX_PACKET: usize = HDR_LEN + MAX_FRAME;

/// The smallest and largest MTU the device announces (RFC 791's minimum for IPv4 and a jumbo
/// frame's usual maximum).
pub const MIN_MTU: u16 = 68;
/// See [`MIN_MTU`].
pub const MAX_MTU: u16 = 9000;

/// Feature bits (as bit numbers in virtio-bindings; these are masks).
pub mod features {
    use virtio_bindings::virtio_net as net;
    use virtio_bindings::virtio_ring as ring;

    /// The device handles frames with a partial checksum (the guest may leave it to the host).
    pub const CSUM: u64 = 1 << net::VIRTIO_NET_F_CSUM;
    /// The driver handles frames with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << net::VIRTIO_NET_F_GUEST_CSUM;
    /// `mtu` is valid.
    pub const MTU: u64 = 1 << net::VIRTIO_NET_F_MTU;
    /// `mac` is valid.
    pub const MAC: u64 = 1 << net::VIRTIO_NET_F_MAC;
    /// The driver takes TCPv4 segmentation offload.
    pub const GUEST_TSO4: u64 = 1 << net::VIRTIO_NET_F_GUEST_TSO4;
    /// The driver takes TCPv6 segmentation offload.
    pub const GUEST_TSO6: u64 = 1 << net::VIRTIO_NET_F_GUEST_TSO6;
    /// The device takes TCPv4 segmentation offload.
    pub const HOST_TSO4: u64 = 1 << net::VIRTIO_NET_F_HOST_TSO4;
    /// The device takes TCPv6 segmentation offload.
    pub const HOST_TSO6: u64 = 1 << net::VIRTIO_NET_F_HOST_TSO6;
    /// A received packet may span several receive buffers.
    pub const MRG_RXBUF: u64 = 1 << net::VIRTIO_NET_F_MRG_RXBUF;
    /// `status` is valid.
    pub const STATUS: u64 = 1 << net::VIRTIO_NET_F_STATUS;
    /// used_event / avail_event notification suppression.
    pub const EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
}

/// `status` bit: the link is up.
pub const STATUS_LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
