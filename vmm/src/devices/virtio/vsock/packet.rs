//! The vsock packet header, and descriptor chains turned into checked packets and buffers.
//!
//! The layout follows the spec's message framing rather than fixed descriptor roles: a TX chain's
//! device-readable bytes are the 44-byte header followed by `len` bytes of payload, an RX chain's
//! device-writable bytes take a header and then payload, and descriptor boundaries may fall
//! anywhere (Linux puts header and payload in one descriptor, or in two, or spreads the payload of
//! a zero-copy send over several). A chain is bounded before anything is done for it: it must end
//! within the queue's size, have the right direction throughout and lie entirely in guest memory;
//! a TX header must be complete and its `len` within the chain and within [`MAX_PKT_DATA`].
//!
//! (The virtio-vsock crate parses packets too, but wants the header in one descriptor and the
//! payload in at most one more; this framing takes any split.)

use std::io;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory, ReadVolatile, WriteVolatile};

use super::{HOST_CID, MAX_PKT_DATA, TYPE_STREAM};
pub use crate::devices::virtio::segments::Segment;
use crate::devices::virtio::segments::{gather, scatter, sub_stream, walk_chain, ChainError};
use crate::memory::GuestRamMap;

/// Size of `struct virtio_vsock_hdr` (packed).
pub const HDR_SIZE: usize = 44;

/// Why a chain is not a usable packet or buffer; the chain is then returned unused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The descriptors themselves.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Fewer than 44 bytes for the header.
    #[error("{0} bytes are too few for a packet header")]
    ShortHeader(u64),
    /// The header's `len` is beyond the bytes the chain carries.
    #[error("payload of {len} bytes in a chain carrying {carried}")]
    DataBeyondChain {
        /// Claimed payload length.
        len: u32,
        /// Bytes after the header.
        carried: u64,
    },
    /// The header's `len` is beyond [`MAX_PKT_DATA`].
    #[error("payload of {0} bytes is too large")]
    TooLarge(u32),
    /// A socket type other than STREAM.
    #[error("socket type {0} is not supported")]
    BadType(u16),
    /// The source CID is not the guest's.
    #[error("source CID {0} is not the guest's")]
    BadSrcCid(u64),
    /// The destination CID is not the host's.
    #[error("destination CID {0} is not the host's")]
    BadDstCid(u64),
    /// Guest memory failed under us.
    #[error("guest memory access failed")]
    Memory,
}

/// `struct virtio_vsock_hdr` (all fields little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Parses the wire layout.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Header {
        Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// The wire layout.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks the addressing of a packet from the guest whose CID is `guest_cid`.
    pub fn check_from_guest(&self, guest_cid: u64) -> Result<(), PacketError> {
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::BadType(self.type_));
        }
        if self.src_cid != guest_cid {
            return Err(PacketError::BadSrcCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(PacketError::BadDstCid(self.dst_cid));
        }
        Ok(())
    }
}

/// A packet from the guest's TX queue: its header and where its payload lies.
#[derive(Debug)]
pub struct TxPacket {
    /// The header.
    pub hdr: Header,
    /// The `hdr.len` payload bytes.
    pub data: Vec<Segment>,
}

impl TxPacket {
    /// Parses and bounds a TX chain (header addressing is checked separately, by
    /// [`Header::check_from_guest`]).
    pub fn parse<M>(
        mut chain: DescriptorChain<M>,
        queue_size: u16,
        mem: &GuestRamMap,
    ) -> Result<TxPacket, PacketError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let (segs, total) = walk_chain(&mut chain, queue_size, false)?;
        if total < HDR_SIZE as u64 {
            return Err(PacketError::ShortHeader(total));
        }
        let mut raw = [0u8; HDR_SIZE];
        if !gather(mem, &segs, &mut raw) {
            return Err(PacketError::Memory);
        }
        let hdr = Header::from_bytes(&raw);
        if hdr.len > MAX_PKT_DATA {
            return Err(PacketError::TooLarge(hdr.len));
        }
        let carried = total - HDR_SIZE as u64;
        if u64::from(hdr.len) > carried {
            return Err(PacketError::DataBeyondChain {
                len: hdr.len,
                carried,
            });
        }
        let data = sub_stream(&segs, HDR_SIZE as u64, u64::from(hdr.len));
        Ok(TxPacket { hdr, data })
    }

    /// Writes as much of the payload from byte `skip` on as `dst` takes without blocking;
    /// returns the bytes written. `WouldBlock` only if nothing was written.
    pub fn write_to<W: WriteVolatile>(
        &self,
        mem: &GuestRamMap,
        skip: usize,
        dst: &mut W,
    ) -> io::Result<usize> {
        let mut done = 0usize;
        for seg in sub_stream(&self.data, skip as u64, u64::MAX) {
            for slice in mem.get_slices(seg.addr, seg.len as usize) {
                let slice = slice.map_err(io::Error::other)?;
                let mut off = 0;
                while off < slice.len() {
                    let part = slice
                        .subslice(off, slice.len() - off)
                        .map_err(io::Error::other)?;
                    match dst.write_volatile(&part) {
                        Ok(0) => return Ok(done),
                        Ok(n) => {
                            off += n;
                            done += n;
                        }
                        Err(vm_memory::VolatileMemoryError::IOError(e)) => {
                            if done > 0 && e.kind() == io::ErrorKind::WouldBlock {
                                return Ok(done);
                            }
                            if e.kind() == io::ErrorKind::Interrupted {
                                continue;
                            }
                            return Err(e);
                        }
                        Err(e) => return Err(io::Error::other(e)),
                    }
                }
            }
        }
        Ok(done)
    }

    /// The payload from byte `skip` on, copied out (for data the host cannot take now).
    pub fn copy_out(&self, mem: &GuestRamMap, skip: usize) -> Result<Vec<u8>, PacketError> {
        let segs = sub_stream(&self.data, skip as u64, u64::MAX);
        let total: usize = segs.iter().map(|s| s.len as usize).sum();
        let mut out = vec![0u8; total];
        let mut at = 0;
        for seg in segs {
            let n = seg.len as usize;
            mem.read_slice(&mut out[at..at + n], seg.addr)
                .map_err(|_| PacketError::Memory)?;
            at += n;
        }
        Ok(out)
    }
}

/// A buffer from the guest's RX queue: where a header and payload may be written.
#[derive(Debug)]
pub struct RxBuffer {
    segs: Vec<Segment>,
    total: u64,
}

impl RxBuffer {
    /// Parses and bounds an RX chain: device-writable throughout, room for a header and at least
    /// one payload byte (a buffer without payload room could never carry the data that is due).
    pub fn parse<M>(mut chain: DescriptorChain<M>, queue_size: u16) -> Result<RxBuffer, PacketError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let (segs, total) = walk_chain(&mut chain, queue_size, true)?;
        if total <= HDR_SIZE as u64 {
            return Err(PacketError::ShortHeader(total));
        }
        Ok(RxBuffer { segs, total })
    }

    /// Payload bytes the buffer holds after a header (at most [`MAX_PKT_DATA`]).
    pub fn capacity(&self) -> u32 {
        u32::try_from(self.total - HDR_SIZE as u64)
            .unwrap_or(u32::MAX)
            .min(MAX_PKT_DATA)
    }

    /// Writes the header; returns the bytes used (header plus `hdr.len`).
    pub fn write_header(&self, mem: &GuestRamMap, hdr: &Header) -> Result<u32, PacketError> {
        let raw = hdr.to_bytes();
        self.write_at(mem, 0, &raw)?;
        Ok(HDR_SIZE as u32 + hdr.len)
    }

    /// Writes `bytes` as payload (they must fit [`Self::capacity`]).
    pub fn write_data(&self, mem: &GuestRamMap, bytes: &[u8]) -> Result<(), PacketError> {
        self.write_at(mem, HDR_SIZE as u64, bytes)
    }

    fn write_at(&self, mem: &GuestRamMap, skip: u64, bytes: &[u8]) -> Result<(), PacketError> {
        if scatter(mem, &self.segs, skip, bytes) {
            Ok(())
        } else {
            Err(PacketError::Memory)
        }
    }

    /// Reads up to `max` payload bytes from `src` straight into guest memory, stopping at the first
    /// short read. Returns the bytes read: 0 means end of stream; `WouldBlock` only if nothing was
    /// read.
    pub fn read_from<R: ReadVolatile>(
        &self,
        mem: &GuestRamMap,
        src: &mut R,
        max: u32,
    ) -> io::Result<usize> {
        let mut done = 0usize;
        for seg in sub_stream(&self.segs, HDR_SIZE as u64, u64::from(max)) {
            for slice in mem.get_slices(seg.addr, seg.len as usize) {
                let mut slice = slice.map_err(io::Error::other)?;
                let want = slice.len();
                let n = loop {
                    match src.read_volatile(&mut slice) {
                        Ok(n) => break n,
                        Err(vm_memory::VolatileMemoryError::IOError(e)) => {
                            if e.kind() == io::ErrorKind::Interrupted {
                                continue;
                            }
                            if done > 0 && e.kind() == io::ErrorKind::WouldBlock {
                                return Ok(done);
                            }
                            return Err(e);
                        }
                        Err(e) => return Err(io::Error::other(e)),
                    }
                };
                done += n;
                if n < want {
                    return Ok(done);
                }
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_wire_order() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 0x5678,
            len: 9,
            type_: 1,
            op: 5,
            flags: 2,
            buf_alloc: 0x40000,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 3);
        assert_eq!(b[8], 2);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }
}
