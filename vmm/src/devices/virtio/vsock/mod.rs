//! virtio-vsock (virtio 1.2, 5.10) with a unix-socket backend: the "hybrid vsock" of Firecracker
//! and Dragonball, so that the host needs neither `/dev/vhost-vsock` nor a CID of its own.
//!
//! - A host process connects to the device's unix socket and writes `CONNECT <port>\n`; the device
//!   asks the guest for a connection to that port and, once the guest accepts, answers
//!   `OK <host-port>\n` and bridges the stream.
//! - A guest connection to host port P is bridged to the unix socket `<path>_P`.
//!
//! Modules, one job each:
//! - [`packet`]: the 44-byte header, and turning a descriptor chain the guest wrote into a checked
//!   TX packet or RX buffer. Everything in a chain is hostile; this is where it is bounded.
//! - [`handshake`]: reading and parsing the host's `CONNECT <port>\n` line.
//! - [`connection`]: one bridged stream: its state machine, credit-based flow control both ways,
//!   half-close, and the bounded buffer for guest data the host socket cannot take yet.
//! - [`muxer`]: the host side: the listening socket, the connections by port pair, a private epoll
//!   set for all host sockets (so that connections come and go without touching the VMM's event
//!   loop), deadlines, and the order in which connections get RX buffers.
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) implementation, queue processing and the
//!   transport-reset event.
//! - [`persist`]: the device's part of a snapshot.
//! - `event_handler`: glue to the VMM thread's event loop.
//!
//! Live host connections cannot survive a snapshot: the unix streams belong to the process that
//! took it. After a restore the VMM sends a transport-reset event, on which the guest drops its
//! connections (its listening sockets survive), as Firecracker does.

pub mod connection;
pub mod device;
mod event_handler;
pub mod handshake;
pub mod muxer;
pub mod packet;
pub mod persist;
#[cfg(test)]
mod tests;

pub use device::{Vsock, VsockError};
pub use persist::VsockState;

/// The virtio device ID of a socket device.
pub const VSOCK_DEVICE_ID: u32 = 19;

/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// The driver-to-device packet queue.
pub const TX_QUEUE: usize = 1;
/// The event queue (transport reset).
pub const EVENT_QUEUE: usize = 2;

/// Every queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;

/// The host's CID, the only destination a guest packet may have.
pub const HOST_CID: u64 = 2;
/// The smallest CID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

/// Largest payload of one packet the device accepts or produces (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Buffer space the device advertises to the guest per connection: guest data the host socket has
/// not taken yet is kept up to this bound, and a guest sending beyond it gets its connection reset.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded-but-unannounced bytes after which the device sends a CREDIT_UPDATE: once less than
/// one full packet of the advertised space is left unannounced, as Linux's own transport does
/// (`virtio_transport_stream_do_dequeue`). Each update is a packet for the guest, so an interrupt,
/// which costs the most in a nested guest; a sender that streams still has a packet's worth of
/// credit while the update travels.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC - MAX_PKT_DATA;

/// Connections (bridged, being set up, or waiting for their CONNECT line) at once; more are
/// refused (a guest REQUEST gets RST, a host connection is closed).
pub const MAX_CONNECTIONS: usize = 512;

/// First host port handed out to host-initiated connections (Firecracker's choice: far from the
/// ports guests listen on).
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Packet operations (virtio 1.2, 5.10.6).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (or refused).
    pub const RST: u16 = 3;
    /// One or both directions shut down (flags).
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// The sender's buffer state changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// The one socket type supported.
pub const TYPE_STREAM: u16 = 1;

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both.
    pub const BOTH: u32 = RCV | SEND;
}

/// `struct virtio_vsock_event`'s ID for a transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Feature bits offered (masks).
pub mod features {
    use virtio_bindings::virtio_ring as ring;

    /// used_event / avail_event notification suppression.
    pub const EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
}
