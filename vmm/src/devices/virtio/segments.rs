//! The guest memory a descriptor chain names, once checked: a request's or a packet's bytes as
//! the concatenation of its segments, and the pieces of it that hold a header or a payload.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

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
