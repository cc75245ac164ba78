//! The guest memory a descriptor chain names, once checked: a request's or a packet's bytes as
//! the concatenation of its segments, and the pieces of it that hold a header or a payload.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Why a chain's descriptors are not one checked run of guest memory in one direction.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A chain without descriptors.
    #[error("empty descriptor chain")]
    Empty,
    /// More descriptors than the queue has entries (a loop, or an indirect table too long).
    #[error("descriptor chain longer than the queue ({0})")]
    TooLong(u16),
    /// The last descriptor still says NEXT (its next index is outside the table).
    #[error("descriptor chain does not end")]
    Unterminated,
    /// A device-writable descriptor where the device reads, or a readable one where it writes.
    #[error("descriptor of the wrong direction")]
    WrongDirection,
    /// A descriptor outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
}

/// Walks a chain into checked segments that all go one way (`writable`: the device writes them),
/// with their total length; empty descriptors are skipped.
pub fn walk_chain<M>(
    chain: &mut DescriptorChain<M>,
    queue_size: u16,
    writable: bool,
) -> Result<(Vec<Segment>, u64), ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    // The iterator stops after `queue_size` descriptors of one table, so a loop ends; an indirect
    // table restarts that count, so the total is bounded here as well.
    let mut descs = Vec::new();
    let mut last_has_next = false;
    for d in chain.by_ref() {
        if descs.len() == usize::from(queue_size) {
            return Err(ChainError::TooLong(queue_size));
        }
        last_has_next = d.has_next();
        descs.push((d.addr(), d.len(), d.is_write_only()));
    }
    if descs.is_empty() {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Unterminated);
    }
    let mem = chain.memory();
    let mut segs = Vec::with_capacity(descs.len());
    let mut total = 0u64;
    for (addr, len, write) in descs {
        if write != writable {
            return Err(ChainError::WrongDirection);
        }
        if len == 0 {
            continue;
        }
        if !mem.check_range(addr, len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: addr.raw_value(),
                len,
            });
        }
        segs.push(Segment { addr, len });
        total += u64::from(len);
    }
    Ok((segs, total))
}

/// A piece of guest memory, checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// The segments holding bytes `skip..skip + len` of the concatenation of `segs`.
pub fn sub_stream(segs: &[Segment], mut skip: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(s.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(len);
        // Both bounded by the segment's u32 length; the address was checked with it.
        out.push(Segment {
            addr: s.addr.unchecked_add(skip),
            len: take as u32,
        });
        len -= take;
        skip = 0;
    }
    out
}

/// Writes `bytes` into the concatenation of `segs` from byte `skip` on; false if the segments are
/// shorter, or if guest memory refused a write.
pub fn scatter<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    bytes: &[u8],
) -> bool {
    let mut at = 0;
    for s in sub_stream(segs, skip, bytes.len() as u64) {
        let end = at + s.len as usize;
        if mem.write_slice(&bytes[at..end], s.addr).is_err() {
            return false;
        }
        at = end;
    }
    at == bytes.len()
}

/// Fills `buf` from the start of the concatenation of `segs`; false if the segments are shorter,
/// or if guest memory refused a read.
pub fn gather<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut at = 0;
    for s in sub_stream(segs, 0, buf.len() as u64) {
        let end = at + s.len as usize;
        if mem.read_slice(&mut buf[at..end], s.addr).is_err() {
            return false;
        }
        at = end;
    }
    at == buf.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn sub_stream_splits_at_any_boundary() {
        let segs = [seg(100, 10), seg(200, 5), seg(300, 20)];
        let s = sub_stream(&segs, 12, 10);
        assert_eq!(s, vec![seg(202, 3), seg(300, 7)]);
        assert!(sub_stream(&segs, 35, 5).is_empty());
    }

    #[test]
    fn gather_reads_across_segments_and_refuses_short_ones() {
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_slice(b"abc", GuestAddress(10)).unwrap();
        mem.write_slice(b"defg", GuestAddress(100)).unwrap();
        let segs = [seg(10, 3), seg(100, 4)];
        let mut buf = [0u8; 5];
        assert!(gather(&mem, &segs, &mut buf));
        assert_eq!(&buf, b"abcde");
        let mut long = [0u8; 8];
        assert!(!gather(&mem, &segs, &mut long), "the segments hold 7 bytes");
        let mut outside = [0u8; 4];
        assert!(!gather(&mem, &[seg(0xffe, 4)], &mut outside));
    }
}
