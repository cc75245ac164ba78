//! virtio-fs (virtio 1.2, 5.11) served inside the VMM process: no virtiofsd, no daemon per pod.
//!
//! The FUSE server is fuse-backend-rs's, over its passthrough filesystem of one host directory;
//! this module puts a hostile guest in front of it:
//!
//! - [`filesystem`]: [`ShareFs`], the `FileSystem` the server calls: the passthrough filesystem
//!   behind read-only enforcement and name checks (the crate's own checks are not relied on alone).
//! - [`ids`]: [`GuestIds`], the host ids a guest's requests may act as (never the guest's word).
//! - [`guard`]: checks every raw FUSE message before the server parses it: header and argument
//!   sizes, the length the guest claims, names (NUL, `/`), opcodes the crate would mishandle,
//!   mutating opcodes in read-only mode, and room for the reply.
//! - [`device`]: the [`Fs`] device: configuration, the [`VirtioDevice`](super::VirtioDevice)
//!   implementation, queue processing and the state a snapshot reads.
//! - `event_handler`: glue to the VMM thread's event loop.
//!
//! Requests are served synchronously on the VMM thread, in queue order. READ replies go straight
//! from the host file into guest memory (`preadv` into the descriptors' slices; no bounce buffer).
//!
//! One request queue: the VMM thread serves all queues in turn, so more request queues would add
//! no parallelism, only more notifiers to watch. Queue 0 is the high-priority queue (FORGET,
//! BATCH_FORGET, INTERRUPT), queue 1 the request queue. No DAX window.
//!
//! Snapshots: a mounted share's passthrough inode table (guest nodeids to host fds) cannot be
//! carried, so [`Fs`] refuses to save its state once the guest sent FUSE INIT; templates are
//! taken before the share is mounted.

pub mod device;
mod event_handler;
pub mod filesystem;
pub mod guard;
pub mod ids;
#[cfg(test)]
mod tests;

pub use device::{CachePolicy, Fs, FsConfig, FsError, FsState};
pub use filesystem::ShareFs;
pub use ids::GuestIds;

/// The virtio device ID of a filesystem device.
pub const FS_DEVICE_ID: u32 = 26;

/// Bytes of the tag in the configuration space (NUL-padded, not necessarily NUL-terminated).
pub const TAG_LEN: usize = 36;

/// Request queues besides the high-priority one.
pub const NUM_REQUEST_QUEUES: u32 = 1;

/// The high-priority queue's maximum size: it carries only FORGET and INTERRUPT.
pub const HIPRIO_QUEUE_SIZE: u16 = 128;

/// The request queue's maximum size: a 1 MiB READ without indirect descriptors takes 256 data
/// descriptors and a few more for headers, and the whole chain must fit the queue.
pub const REQUEST_QUEUE_SIZE: u16 = 1024;

/// Feature bits offered (masks).
pub mod features {
    use virtio_bindings::virtio_ring as ring;

    /// used_event / avail_event notification suppression.
    pub const EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
    /// Indirect descriptor tables (virtio-queue follows them; each gets the queue's length cap).
    pub const INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
}
