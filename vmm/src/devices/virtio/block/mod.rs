//! virtio-blk (virtio 1.2, 5.2) over a host file or block device.
//!
//! - [`disk`]: the host side: opening the backing file, positional I/O straight into guest memory,
//!   flush, hole punching and zeroing.
//! - [`request`]: turning a descriptor chain the guest wrote into a checked [`Request`]; everything in
//!   a chain is hostile, so this is where every address, length and sector is bounded.
//! - [`device`]: the device state, the [`VirtioDevice`](super::VirtioDevice) implementation and
//!   queue processing.
//! - `event_handler`: glue to the VMM thread's event loop.
//!
//! I/O is synchronous on the VMM thread: one queue, served in order.

pub mod device;
pub mod disk;
mod event_handler;
pub mod request;

pub use device::{Block, BlockConfig, BlockState};
pub use disk::{Disk, DiskError};
pub use request::{Request, RequestError, RequestType};

/// The virtio device ID of a block device.
pub const BLOCK_DEVICE_ID: u32 = 2;

/// Sectors are 512 bytes whatever the backing file's block size (virtio 1.2, 5.2.6).
pub const SECTOR_SHIFT: u32 = 9;
/// Bytes in a sector.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// The one request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;

/// Data segments per request: a chain also carries a header and a status descriptor, and without
/// indirect descriptors a whole chain must fit the queue.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Sectors one discard segment may cover (1 GiB): bounds the time one request holds the VMM thread.
pub const MAX_DISCARD_SECTORS: u32 = 1 << (30 - SECTOR_SHIFT);
/// Segments in one discard request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Discard granularity hint, in sectors: hole punching works in pages.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Sectors one write-zeroes segment may cover (1 GiB, as for discard; the fallback writes zeroes).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << (30 - SECTOR_SHIFT);
/// Segments in one write-zeroes request.
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;

/// Length of the device ID string GET_ID returns.
pub const ID_BYTES: usize = 20;

/// Request status values (virtio 1.2, 5.2.6).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The device or driver did something wrong, or the host I/O failed.
    pub const IOERR: u8 = 1;
    /// The request type (or a flag) is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Feature bits (as bit numbers in virtio-bindings; these are masks).
pub mod features {
    use virtio_bindings::virtio_blk as blk;
    use virtio_bindings::virtio_ring as ring;

    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
    /// The device is read-only.
    pub const RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
    /// FLUSH is supported.
    pub const FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;
    /// DISCARD is supported.
    pub const DISCARD: u64 = 1 << blk::VIRTIO_BLK_F_DISCARD;
    /// WRITE_ZEROES is supported.
    pub const WRITE_ZEROES: u64 = 1 << blk::VIRTIO_BLK_F_WRITE_ZEROES;
    /// used_event / avail_event notification suppression.
    pub const EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
}
