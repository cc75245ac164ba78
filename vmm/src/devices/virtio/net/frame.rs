//! Frames in descriptor chains: a TX chain copied out as one checked frame, an RX chain as a
//! checked buffer that frames are written into.
//!
//! A TX frame is copied out of guest memory before it reaches the tap: the guest could change it
//! while the kernel reads it otherwise, and one copy of at most [`MAX_PACKET`] bytes bounds what
//! a chain can cost the VMM thread.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use super::{HDR_LEN, MAX_PACKET};
use crate::devices::virtio::segments::{gather, scatter, walk_chain, ChainError, Segment};

/// Why a chain is not a usable frame or buffer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The descriptors themselves.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Fewer bytes than the virtio-net header.
    #[error("{0} bytes are too few for a virtio-net header")]
    ShortHeader(u64),
    /// More than a header and the largest frame.
    #[error("a {0}-byte frame is larger than {MAX_PACKET} bytes")]
    TooLarge(u64),
    /// Guest memory failed under us.
    #[error("guest memory access failed")]
    Memory,
}

/// Copies the frame (header first) a TX chain carries into `buf`, replacing what it held;
/// returns its length.
pub fn read_tx<M>(
    mut chain: DescriptorChain<M>,
    queue_size: u16,
    buf: &mut Vec<u8>,
) -> Result<usize, FrameError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let (segs, total) = walk_chain(&mut chain, queue_size, false)?;
    if total < HDR_LEN as u64 {
        return Err(FrameError::ShortHeader(total));
    }
    if total > MAX_PACKET as u64 {
        return Err(FrameError::TooLarge(total));
    }
    // Bounded by MAX_PACKET just above.
    let len = total as usize;
    buf.resize(len, 0);
    if !gather(chain.memory(), &segs, buf) {
        return Err(FrameError::Memory);
    }
    Ok(len)
}

/// A receive buffer the driver made available: device-writable throughout.
#[derive(Debug)]
pub struct RxBuffer {
    /// The chain's head, to return it used.
    pub head: u16,
    segs: Vec<Segment>,
    capacity: usize,
}

impl RxBuffer {
    /// Parses and bounds an RX chain. Every buffer must hold at least a header: the first of a
    /// packet carries it, and the driver posts all of them alike.
    pub fn parse<M>(mut chain: DescriptorChain<M>, queue_size: u16) -> Result<RxBuffer, FrameError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let (segs, total) = walk_chain(&mut chain, queue_size, true)?;
        if total < HDR_LEN as u64 {
            return Err(FrameError::ShortHeader(total));
        }
        Ok(RxBuffer {
            head,
            segs,
            // Bytes past one packet are never written: capped, so the sum of a few fits.
            capacity: total.min(MAX_PACKET as u64) as usize,
        })
    }

    /// Bytes it holds (at most [`MAX_PACKET`]).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `bytes` at its start (they must fit [`Self::capacity`]).
    pub fn write<M: GuestMemory + ?Sized>(&self, mem: &M, bytes: &[u8]) -> Result<(), FrameError> {
        if bytes.len() <= self.capacity && scatter(mem, &self.segs, 0, bytes) {
            Ok(())
        } else {
            Err(FrameError::Memory)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{QueueDriver, R, W};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    fn setup() -> (crate::memory::GuestRamMap, QueueDriver, Queue) {
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 0x4_0000)]).unwrap();
        let d = QueueDriver::new(&mem, 0, 16);
        let q = d.queue();
        (mem, d, q)
    }

    #[test]
    fn a_tx_chain_is_copied_whole_and_bounded() {
        let (mem, d, mut q) = setup();
        mem.write_slice(&[1u8; 12], GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"frame", GuestAddress(0x9000)).unwrap();
        d.add_chain(&[(0x8000, 12, R), (0x9000, 5, R)]);
        let mut buf = vec![7u8; 3];
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(read_tx(chain, 16, &mut buf), Ok(17));
        assert_eq!(&buf[12..], b"frame");

        d.add_chain(&[(0x8000, 11, R)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            read_tx(chain, 16, &mut buf),
            Err(FrameError::ShortHeader(11))
        );
        d.add_chain(&[(0x8000, 12, R), (0x9000, 5, W)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            read_tx(chain, 16, &mut buf),
            Err(FrameError::Chain(ChainError::WrongDirection))
        );
        // Two descriptors of 40 KiB each: more than any frame.
        d.add_chain(&[(0x1_0000, 0xa000, R), (0x1_a000, 0xa000, R)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            read_tx(chain, 16, &mut buf),
            Err(FrameError::TooLarge(0x1_4000))
        );
        d.add_chain(&[(0x3_f000, 0x2000, R)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert!(matches!(
            read_tx(chain, 16, &mut buf),
            Err(FrameError::Chain(ChainError::OutsideMemory { .. }))
        ));
    }

    #[test]
    fn an_rx_buffer_holds_a_header_and_takes_writes_across_descriptors() {
        let (mem, d, mut q) = setup();
        d.add_chain(&[(0x8000, 8, W), (0x9000, 8, W)]);
        let b = RxBuffer::parse(q.pop_descriptor_chain(&mem).unwrap(), 16).unwrap();
        assert_eq!(b.capacity(), 16);
        b.write(&mem, b"0123456789abcdef").unwrap();
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_eq!(&got, b"89abcdef");
        assert_eq!(b.write(&mem, &[0u8; 17]), Err(FrameError::Memory));

        d.add_chain(&[(0x8000, 11, W)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            RxBuffer::parse(chain, 16).unwrap_err(),
            FrameError::ShortHeader(11)
        );
        d.add_chain(&[(0x8000, 64, R)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            RxBuffer::parse(chain, 16).unwrap_err(),
            FrameError::Chain(ChainError::WrongDirection)
        );
    }
}
