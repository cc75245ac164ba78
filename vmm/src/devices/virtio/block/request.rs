//! Parsing a descriptor chain into a block request: the part that reads hostile input.
//!
//! The layout follows the spec's message framing (virtio 1.2, 2.7.4 and 5.2.6) rather than fixed
//! descriptor roles: the device-readable bytes are the 16-byte header followed by any OUT data (or
//! discard/write-zeroes segments), the device-writable bytes are any IN data followed by the one
//! status byte, and descriptor boundaries may fall anywhere. A chain is bounded before anything is
//! done for it: it must end within the queue's size, put every readable descriptor before every
//! writable one, lie entirely in guest memory, and carry data of the right direction and size for
//! its type within the disk's capacity.

use std::ops::Deref;

use virtio_bindings::virtio_blk as blk;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemory};

use super::{
    status, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
    SECTOR_SHIFT, SECTOR_SIZE,
};
pub use crate::devices::virtio::segments::Segment;
use crate::devices::virtio::segments::{gather, sub_stream};

/// Size of `struct virtio_blk_outhdr`: type, reserved (ioprio), sector.
pub const HEADER_SIZE: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub const RANGE_SIZE: u64 = 16;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the guest.
    In,
    /// Write sectors from the guest.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Deallocate ranges (a hint).
    Discard,
    /// Zero ranges, deallocating them if `unmap` says so.
    WriteZeroes,
}

impl RequestType {
    fn from_raw(t: u32) -> Option<Self> {
        Some(match t {
            blk::VIRTIO_BLK_T_IN => RequestType::In,
            blk::VIRTIO_BLK_T_OUT => RequestType::Out,
            blk::VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            blk::VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            blk::VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            blk::VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            _ => return None,
        })
    }
}

/// One range of a discard or write-zeroes request, checked against the capacity and limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u32,
    /// Write zeroes may deallocate the range.
    pub unmap: bool,
}

/// A checked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Its type.
    pub kind: RequestType,
    /// First sector (IN and OUT).
    pub sector: u64,
    /// The data in guest memory: device-writable for IN and GET_ID, device-readable for OUT;
    /// empty otherwise.
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// The ranges of a discard or write-zeroes request.
    pub ranges: Vec<SectorRange>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The head index yields no descriptor.
    #[error("the descriptor chain is empty")]
    EmptyChain,
    /// The last descriptor read still has NEXT: a loop, a chain longer than the queue, or a next
    /// index outside the table.
    #[error("the descriptor chain does not end within the queue")]
    UnterminatedChain,
    /// More descriptors than the queue has entries (through an indirect table).
    #[error("the descriptor chain is longer than the queue size {0}")]
    TooLong(u16),
    /// No device-writable byte ends the chain.
    #[error("no device-writable status byte ends the chain")]
    NoStatus,
    /// The driver must put readable descriptors first.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    #[error("descriptor at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideMemory {
        /// Start.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Fewer readable bytes than a header.
    #[error("the header has {0} bytes, fewer than 16")]
    ShortHeader(u64),
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Data flowing the wrong way for the type (e.g. device-readable data for IN).
    #[error("{kind:?} request with {readable} device-readable bytes after the header and {writable} device-writable bytes before the status")]
    WrongDirection {
        /// The type.
        kind: RequestType,
        /// Readable bytes after the header.
        readable: u64,
        /// Writable bytes before the status byte.
        writable: u64,
    },
    /// A data-carrying request with no data.
    #[error("{0:?} request carries no data")]
    NoData(RequestType),
    /// IN/OUT data must be whole sectors.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// Sectors past the end of the disk (or an offset that overflows).
    #[error("sectors {sector}..+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Disk capacity.
        capacity: u64,
    },
    /// A discard/write-zeroes segment list that is not whole segments, or too many of them.
    #[error("a segment list of {0} bytes is not 1 to the maximum number of 16-byte segments")]
    BadSegmentList(u64),
    /// A discard/write-zeroes segment larger than the advertised maximum.
    #[error("a segment of {0} sectors exceeds the advertised maximum")]
    SegmentTooLarge(u32),
    /// Flags the spec makes UNSUPP: unknown ones, or unmap on a discard.
    #[error("unsupported segment flags {0:#x}")]
    UnsupportedFlags(u32),
    /// Reading the request out of guest memory failed after the range check.
    #[error("cannot read the request from guest memory")]
    GuestMemory,
}

impl RequestError {
    /// The status byte the driver gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// A refused chain, with where its status byte goes if it has a usable one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Why.
    pub error: RequestError,
    /// The status byte's address; `None` when the chain has no usable one (it is then returned
    /// with nothing written).
    pub status: Option<GuestAddress>,
}

impl Request {
    /// Parses `chain` from a queue of `queue_size` entries, for a disk of `capacity` sectors.
    pub fn parse<M>(
        mut chain: DescriptorChain<M>,
        queue_size: u16,
        capacity: u64,
    ) -> Result<Request, Rejected>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let reject = |error| Rejected {
            error,
            status: None,
        };
        // The iterator stops after `queue_size` descriptors of one table, so a loop ends; an
        // indirect table restarts that count, so the total is bounded here as well.
        let mut descs = Vec::new();
        let mut last_has_next = false;
        for d in chain.by_ref() {
            if descs.len() == usize::from(queue_size) {
                return Err(reject(RequestError::TooLong(queue_size)));
            }
            last_has_next = d.has_next();
            descs.push((d.addr(), d.len(), d.is_write_only()));
        }
        if descs.is_empty() {
            return Err(reject(RequestError::EmptyChain));
        }
        if last_has_next {
            return Err(reject(RequestError::UnterminatedChain));
        }
        let mem = chain.memory();

        // The status byte: the last byte of the last non-empty descriptor, if device-writable.
        let status = descs
            .iter()
            .rev()
            .find(|(_, len, _)| *len > 0)
            .filter(|(_, _, write)| *write)
            .and_then(|(addr, len, _)| addr.checked_add(u64::from(*len) - 1))
            .filter(|a| mem.check_range(*a, 1))
            .ok_or_else(|| reject(RequestError::NoStatus))?;
        let fail = |error| Rejected {
            error,
            status: Some(status),
        };

        let mut readable = Vec::new();
        let mut writable = Vec::new();
        for &(addr, len, write) in &descs {
            if len == 0 {
                continue;
            }
            if !mem.check_range(addr, len as usize) {
                return Err(fail(RequestError::OutsideMemory {
                    addr: addr.raw_value(),
                    len,
                }));
            }
            let seg = Segment { addr, len };
            if write {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                return Err(fail(RequestError::ReadableAfterWritable));
            }
        }
        let readable_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
        // At least the status byte, found above.
        let writable_len: u64 = writable.iter().map(|s| u64::from(s.len)).sum::<u64>() - 1;

        let mut header = [0u8; HEADER_SIZE as usize];
        if readable_len < HEADER_SIZE {
            return Err(fail(RequestError::ShortHeader(readable_len)));
        }
        read_stream(mem, &readable, &mut header).map_err(fail)?;
        let raw_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let kind =
            RequestType::from_raw(raw_type).ok_or(fail(RequestError::Unsupported(raw_type)))?;

        let payload = readable_len - HEADER_SIZE;
        let wrong_direction = RequestError::WrongDirection {
            kind,
            readable: payload,
            writable: writable_len,
        };
        let mut req = Request {
            kind,
            sector,
            data: Vec::new(),
            data_len: 0,
            ranges: Vec::new(),
            status,
        };
        match kind {
            RequestType::In | RequestType::Out => {
                let (data, len, other) = if kind == RequestType::In {
                    (
                        sub_stream(&writable, 0, writable_len),
                        writable_len,
                        payload,
                    )
                } else {
                    (
                        sub_stream(&readable, HEADER_SIZE, payload),
                        payload,
                        writable_len,
                    )
                };
                if other != 0 {
                    return Err(fail(wrong_direction));
                }
                if len == 0 {
                    return Err(fail(RequestError::NoData(kind)));
                }
                if len % SECTOR_SIZE != 0 {
                    return Err(fail(RequestError::Unaligned(len)));
                }
                check_range(sector, len >> SECTOR_SHIFT, capacity).map_err(fail)?;
                req.data = data;
                req.data_len = len;
            }
            // The spec asks the driver for sector 0 and no data; neither matters to a flush.
            RequestType::Flush => {}
            RequestType::GetId => {
                if payload != 0 {
                    return Err(fail(wrong_direction));
                }
                if writable_len == 0 {
                    return Err(fail(RequestError::NoData(kind)));
                }
                req.data = sub_stream(&writable, 0, writable_len);
                req.data_len = writable_len;
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if writable_len != 0 {
                    return Err(fail(wrong_direction));
                }
                let segments = sub_stream(&readable, HEADER_SIZE, payload);
                req.ranges = parse_ranges(mem, kind, &segments, payload, capacity).map_err(fail)?;
            }
        }
        Ok(req)
    }
}

/// The sector range `sector..sector + sectors` must end within `capacity`, its byte offset
/// representable.
fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    let out = RequestError::OutOfRange {
        sector,
        sectors,
        capacity,
    };
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity && end.checked_mul(SECTOR_SIZE).is_some() => Ok(()),
        _ => Err(out),
    }
}

fn parse_ranges<M: GuestMemory + ?Sized>(
    mem: &M,
    kind: RequestType,
    segments: &[Segment],
    len: u64,
    capacity: u64,
) -> Result<Vec<SectorRange>, RequestError> {
    let (max_seg, max_sectors) = if kind == RequestType::Discard {
        (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
    } else {
        (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
    };
    let count = len / RANGE_SIZE;
    if len == 0 || len % RANGE_SIZE != 0 || count > u64::from(max_seg) {
        return Err(RequestError::BadSegmentList(len));
    }
    // Bounded by the check above: at most max_seg * 16 bytes.
    let mut raw = vec![0u8; len as usize];
    read_stream(mem, segments, &mut raw)?;
    let mut ranges = Vec::with_capacity(count as usize);
    for r in raw.chunks_exact(RANGE_SIZE as usize) {
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&r[0..8]);
        let sector = u64::from_le_bytes(sector);
        let sectors = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
        let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
        let unmap = flags & blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // 5.2.6.2: UNSUPP for unknown flags, and for unmap on a discard.
        if flags & !blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
            || (unmap && kind == RequestType::Discard)
        {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if sectors > max_sectors {
            return Err(RequestError::SegmentTooLarge(sectors));
        }
        check_range(sector, u64::from(sectors), capacity)?;
        ranges.push(SectorRange {
            sector,
            sectors,
            unmap,
        });
    }
    Ok(ranges)
}

/// Fills `buf` from the start of the concatenation of `segs`.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    if gather(mem, segs, buf) {
        Ok(())
    } else {
        Err(RequestError::GuestMemory)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{QueueDriver, R, W};
    use crate::memory::GuestRamMap;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::QueueT;
    use vm_memory::Bytes;

    fn mem() -> GuestRamMap {
        crate::memory::map_ram(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    pub(crate) fn header(t: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// Parses the chain given as raw descriptors (addr, len, flags, next) placed at table index 0.
    fn parse_raw(
        mem: &GuestRamMap,
        descs: &[(u64, u32, u16, u16)],
        cap: u64,
    ) -> Result<Request, Rejected> {
        let driver = QueueDriver::new(mem, 0, 16);
        driver.push(descs, 0);
        let chain = driver.queue().pop_descriptor_chain(mem).unwrap();
        Request::parse(chain, 16, cap)
    }

    /// Parses a linear chain of (addr, len, flags).
    fn parse(mem: &GuestRamMap, descs: &[(u64, u32, u16)], cap: u64) -> Result<Request, Rejected> {
        parse_raw(mem, &QueueDriver::linked(descs, 0), cap)
    }

    #[test]
    fn a_header_split_over_two_descriptors_and_data_in_three_pieces() {
        let m = mem();
        let h = header(blk::VIRTIO_BLK_T_OUT, 3);
        m.write_slice(&h[..5], GuestAddress(0x8000)).unwrap();
        m.write_slice(&h[5..], GuestAddress(0x9000)).unwrap();
        // The second header descriptor carries 11 header bytes and 89 data bytes.
        let r = parse(
            &m,
            &[
                (0x8000, 5, R),
                (0x9000, 100, R),
                (0xa000, 400, R),
                (0xb000, 535, R),
                (0xc000, 1, W),
            ],
            8,
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::Out);
        assert_eq!(r.sector, 3);
        assert_eq!(r.data_len, 1024);
        assert_eq!(
            r.data,
            vec![
                Segment {
                    addr: GuestAddress(0x900b),
                    len: 89
                },
                Segment {
                    addr: GuestAddress(0xa000),
                    len: 400
                },
                Segment {
                    addr: GuestAddress(0xb000),
                    len: 535
                },
            ]
        );
        assert_eq!(r.status, GuestAddress(0xc000));
    }

    #[test]
    fn in_data_and_status_may_share_a_descriptor() {
        let m = mem();
        m.write_slice(&header(blk::VIRTIO_BLK_T_IN, 0), GuestAddress(0x8000))
            .unwrap();
        let r = parse(
            &m,
            &[(0x8000, 16, R), (0xa000, 300, W), (0xb000, 213, W)],
            8,
        )
        .unwrap();
        assert_eq!(r.data_len, 512);
        assert_eq!(
            r.data[1],
            Segment {
                addr: GuestAddress(0xb000),
                len: 212
            }
        );
        assert_eq!(r.status, GuestAddress(0xb000 + 212));
    }

    #[test]
    fn chains_without_a_usable_status_byte_are_dropped() {
        let m = mem();
        m.write_slice(&header(blk::VIRTIO_BLK_T_OUT, 0), GuestAddress(0x8000))
            .unwrap();
        let none = |r: Result<Request, Rejected>| r.unwrap_err().status;
        // Status descriptor readable.
        assert_eq!(
            none(parse(
                &m,
                &[(0x8000, 16, R), (0xa000, 512, R), (0xc000, 1, R)],
                8
            )),
            None
        );
        // Status outside guest memory.
        assert_eq!(
            none(parse(&m, &[(0x8000, 16, R), (0x20_0000, 1, W)], 8)),
            None
        );
        // Status address wraps.
        assert_eq!(
            none(parse(&m, &[(0x8000, 16, R), (u64::MAX, 2, W)], 8)),
            None
        );
        // Only zero-length writable descriptors.
        assert_eq!(none(parse(&m, &[(0x8000, 16, R), (0xc000, 0, W)], 8)), None);
    }

    #[test]
    fn a_zero_length_status_descriptor_moves_the_status_to_the_data() {
        let m = mem();
        m.write_slice(&header(blk::VIRTIO_BLK_T_IN, 0), GuestAddress(0x8000))
            .unwrap();
        let e = parse(&m, &[(0x8000, 16, R), (0xa000, 512, W), (0xc000, 0, W)], 8).unwrap_err();
        assert_eq!(e.error, RequestError::Unaligned(511));
        assert_eq!(e.status, Some(GuestAddress(0xa000 + 511)));
    }

    #[test]
    fn loops_and_bad_next_indices_are_dropped() {
        let m = mem();
        let n = VRING_DESC_F_NEXT as u16;
        let e = parse_raw(&m, &[(0x8000, 16, R | n, 1), (0xc000, 1, W | n, 0)], 8).unwrap_err();
        assert_eq!((e.error, e.status), (RequestError::UnterminatedChain, None));
        let e = parse_raw(&m, &[(0x8000, 16, R | n, 99)], 8).unwrap_err();
        assert_eq!(e.error, RequestError::UnterminatedChain);
    }

    #[test]
    fn an_indirect_table_longer_than_the_queue_is_refused() {
        let m = mem();
        m.write_slice(&header(blk::VIRTIO_BLK_T_OUT, 0), GuestAddress(0x8000))
            .unwrap();
        let table = GuestAddress(0x4_0000);
        let count = 20u16; // queue size is 16
        for i in 0..count {
            let (addr, len, flags) = match i {
                0 => (0x8000, 16, R),
                i if i == count - 1 => (0xc000, 1, W),
                _ => (0xa000, 512, R),
            };
            let flags = if i < count - 1 {
                flags | VRING_DESC_F_NEXT as u16
            } else {
                flags
            };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i + 1));
            m.write_obj(d, table.unchecked_add(16 * u64::from(i)))
                .unwrap();
        }
        let e = parse_raw(
            &m,
            &[(
                table.0,
                16 * u32::from(count),
                VRING_DESC_F_INDIRECT as u16,
                0,
            )],
            64,
        )
        .unwrap_err();
        assert_eq!((e.error, e.status), (RequestError::TooLong(16), None));
    }

    #[test]
    fn malformed_requests_get_an_error_status() {
        let m = mem();
        let h = |t, s| {
            m.write_slice(&header(t, s), GuestAddress(0x8000)).unwrap();
        };
        let err = |r: Result<Request, Rejected>| {
            let e = r.unwrap_err();
            assert_eq!(e.status, Some(GuestAddress(0xc000)));
            e.error
        };
        let st = |r: Result<Request, Rejected>| {
            let e = r.unwrap_err();
            assert_eq!(e.status, Some(GuestAddress(0xc000)));
            e.error.status()
        };
        h(blk::VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            err(parse(&m, &[(0x8000, 12, R), (0xc000, 1, W)], 8)),
            RequestError::ShortHeader(12)
        );
        assert_eq!(
            err(parse(&m, &[(0x8000, 16, R), (0xc000, 1, W)], 8)),
            RequestError::NoData(RequestType::Out)
        );
        assert_eq!(
            err(parse(
                &m,
                &[(0x8000, 16, R), (0xa000, 100, R), (0xc000, 1, W)],
                8
            )),
            RequestError::Unaligned(100)
        );
        assert!(matches!(
            err(parse(
                &m,
                &[(0x8000, 16, R), (0xa000, 512, W), (0xc000, 1, W)],
                8
            )),
            RequestError::WrongDirection { .. }
        ));
        assert_eq!(
            err(parse(
                &m,
                &[(0x8000, 16, R), (0xff000, 0x2000, R), (0xc000, 1, W)],
                8
            )),
            RequestError::OutsideMemory {
                addr: 0xff000,
                len: 0x2000
            }
        );
        assert_eq!(
            err(parse(
                &m,
                &[
                    (0x8000, 16, R),
                    (0xc000, 1, W),
                    (0xa000, 512, R),
                    (0xc000, 1, W)
                ],
                8
            )),
            RequestError::ReadableAfterWritable
        );
        // Past the end, and an offset that overflows.
        h(blk::VIRTIO_BLK_T_OUT, 7);
        assert!(matches!(
            err(parse(
                &m,
                &[(0x8000, 16, R), (0xa000, 1024, R), (0xc000, 1, W)],
                8
            )),
            RequestError::OutOfRange { .. }
        ));
        h(blk::VIRTIO_BLK_T_IN, u64::MAX);
        assert!(matches!(
            err(parse(
                &m,
                &[(0x8000, 16, R), (0xa000, 512, W), (0xc000, 1, W)],
                u64::MAX
            )),
            RequestError::OutOfRange { .. }
        ));
        h(blk::VIRTIO_BLK_T_IN, 0);
        assert!(matches!(
            err(parse(
                &m,
                &[(0x8000, 16, R), (0xa000, 512, R), (0xc000, 1, W)],
                8
            )),
            RequestError::WrongDirection { .. }
        ));
        h(blk::VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            err(parse(&m, &[(0x8000, 16, R), (0xc000, 1, W)], 8)),
            RequestError::NoData(RequestType::GetId)
        );
        h(77, 0);
        assert_eq!(
            st(parse(&m, &[(0x8000, 16, R), (0xc000, 1, W)], 8)),
            status::UNSUPP
        );
    }

    fn range(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&sectors.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        r
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        let unmap = blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let go = |t, segs: &[[u8; 16]]| {
            m.write_slice(&header(t, 0), GuestAddress(0x8000)).unwrap();
            for (i, s) in segs.iter().enumerate() {
                m.write_slice(s, GuestAddress(0xa000 + 16 * i as u64))
                    .unwrap();
            }
            let len = 16 * segs.len() as u32;
            parse(
                &m,
                &[(0x8000, 16, R), (0xa000, len, R), (0xc000, 1, W)],
                100,
            )
        };
        let r = go(
            blk::VIRTIO_BLK_T_WRITE_ZEROES,
            &[range(1, 2, unmap), range(50, 50, 0)],
        )
        .unwrap();
        assert_eq!(
            r.ranges,
            vec![
                SectorRange {
                    sector: 1,
                    sectors: 2,
                    unmap: true
                },
                SectorRange {
                    sector: 50,
                    sectors: 50,
                    unmap: false
                },
            ]
        );
        let status = |r: Result<Request, Rejected>| r.unwrap_err().error.status();
        assert_eq!(
            status(go(blk::VIRTIO_BLK_T_DISCARD, &[range(1, 2, unmap)])),
            status::UNSUPP
        );
        assert_eq!(
            status(go(blk::VIRTIO_BLK_T_WRITE_ZEROES, &[range(1, 2, 4)])),
            status::UNSUPP
        );
        assert_eq!(
            status(go(blk::VIRTIO_BLK_T_DISCARD, &[range(99, 2, 0)])),
            status::IOERR
        );
        assert_eq!(
            status(go(blk::VIRTIO_BLK_T_DISCARD, &[range(u64::MAX, 2, 0)])),
            status::IOERR
        );
        assert_eq!(
            go(
                blk::VIRTIO_BLK_T_DISCARD,
                &[range(0, MAX_DISCARD_SECTORS + 1, 0)]
            )
            .unwrap_err()
            .error,
            RequestError::SegmentTooLarge(MAX_DISCARD_SECTORS + 1)
        );
        let many = vec![range(0, 1, 0); MAX_DISCARD_SEG as usize + 1];
        assert!(matches!(
            go(blk::VIRTIO_BLK_T_DISCARD, &many).unwrap_err().error,
            RequestError::BadSegmentList(_)
        ));
        assert!(matches!(
            go(blk::VIRTIO_BLK_T_DISCARD, &[]).unwrap_err().error,
            RequestError::BadSegmentList(0)
        ));
    }
}
