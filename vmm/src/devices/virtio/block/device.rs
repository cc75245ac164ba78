//! The block device: configuration space, feature negotiation, activation, serving the request
//! queue, and the state a snapshot reads.

use std::io;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::disk::{Disk, DiskError};
use super::request::{Rejected, Request, RequestType, Segment};
use super::{
    features, status, BLOCK_DEVICE_ID, DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SHIFT,
    SEG_MAX,
};
use crate::devices::virtio::common::{needs_interrupt, serve_queue};
use crate::devices::virtio::{
    read_config_space, DeviceStateError, QueueSnapshot, VirtioCommon, VirtioDevice,
};
use crate::memory::GuestRamMap;

/// Errors making a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The control eventfd.
    #[error("block device: cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

/// The fields of `struct virtio_blk_config` this device fills; the others read as zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Data segments per request.
    pub seg_max: u32,
    /// Sectors per discard segment.
    pub max_discard_sectors: u32,
    /// Segments per discard request.
    pub max_discard_seg: u32,
    /// Discard granularity in sectors.
    pub discard_sector_alignment: u32,
    /// Sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Segments per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Write zeroes with unmap may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlockConfig {
    /// Bytes of configuration space, up to and including `write_zeroes_may_unmap`'s padding.
    pub const SIZE: usize = 60;

    /// The little-endian layout of `struct virtio_blk_config` (virtio 1.2, 5.2.4).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8), geometry (16), blk_size (20), topology (24), writeback (32) and
        // num_queues (34) belong to features this device does not offer.
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }
}

/// The device's state as read out (the disk contents are the file's business); a snapshot keeps it
/// whole, and a restore checks the fields that describe the disk against the disk it is given.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// Read-only mode.
    pub read_only: bool,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Configuration space.
    pub config: BlockConfig,
    /// Whether the driver activated the device.
    pub activated: bool,
    /// The live queues (empty unless activated).
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio-blk device over a host file.
#[derive(Debug)]
pub struct Block {
    pub(super) disk: Disk,
    config: BlockConfig,
    pub(super) common: VirtioCommon,
}

impl Block {
    /// A device over `path`; with `read_only` the file is opened O_RDONLY and VIRTIO_BLK_F_RO is
    /// offered.
    pub fn new(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let disk = Disk::open(path, read_only)?;
        let mut avail_features = features::SEG_MAX | features::FLUSH | features::EVENT_IDX;
        let mut config = BlockConfig {
            capacity: disk.capacity(),
            seg_max: SEG_MAX,
            ..Default::default()
        };
        if read_only {
            avail_features |= features::RO;
        } else {
            avail_features |= features::DISCARD | features::WRITE_ZEROES;
            config.max_discard_sectors = MAX_DISCARD_SECTORS;
            config.max_discard_seg = MAX_DISCARD_SEG;
            config.discard_sector_alignment = DISCARD_SECTOR_ALIGNMENT;
            config.max_write_zeroes_sectors = MAX_WRITE_ZEROES_SECTORS;
            config.max_write_zeroes_seg = MAX_WRITE_ZEROES_SEG;
            config.write_zeroes_may_unmap = 1;
        }
        Ok(Block {
            disk,
            config,
            common: VirtioCommon::new("virtio-blk", &[QUEUE_SIZE], avail_features)
                .map_err(BlockError::EventFd)?,
        })
    }

    /// The configuration space.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The device state; meaningful while the VM is paused (the queues move otherwise).
    pub fn state(&self) -> BlockState {
        BlockState {
            read_only: self.disk.read_only(),
            avail_features: self.common.avail_features(),
            acked_features: self.common.acked_features(),
            config: self.config,
            activated: self.common.is_active(),
            queues: self.queue_states(),
        }
    }

    /// Serves every available request on the queue, then interrupts the driver if it wants it.
    pub fn process_queue(&mut self) {
        let (disk, acked) = (&self.disk, self.common.acked_features());
        let Some(active) = self.common.active_mut() else {
            return;
        };
        let (mem, q) = (&active.mem, &mut active.queues[0].queue);
        let used = serve_queue(
            q,
            mem,
            "virtio-blk",
            || true,
            |chain, size| Some(serve(disk, acked, mem, chain, size)),
        );
        if needs_interrupt(q, mem, used) {
            active.signal_used_ring();
        }
    }
}

/// Serves one chain; returns the bytes written into it (the used length).
fn serve<M>(
    disk: &Disk,
    acked: u64,
    mem: &GuestRamMap,
    chain: virtio_queue::DescriptorChain<M>,
    queue_size: u16,
) -> u32
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    match Request::parse(chain, queue_size, disk.capacity()) {
        Err(Rejected {
            error,
            status: None,
        }) => {
            // Guest-triggered: debug, so a hostile guest cannot flood the host log.
            log::debug!("virtio-blk: dropping a chain: {error}");
            0
        }
        Err(Rejected {
            error,
            status: Some(addr),
        }) => {
            log::debug!("virtio-blk: refusing a request: {error}");
            write_status(mem, addr, error.status());
            1
        }
        Ok(req) => {
            let (st, written) = match execute(disk, acked, mem, &req) {
                Ok(written) => (status::OK, written),
                Err(st) => (st, 0),
            };
            write_status(mem, req.status, st);
            written.saturating_add(1)
        }
    }
}

fn write_status(mem: &GuestRamMap, addr: GuestAddress, st: u8) {
    // The parser checked the address; a failure here means guest memory changed under us.
    if let Err(e) = mem.write_obj(st, addr) {
        crate::guest_warn!("virtio-blk: cannot write the status byte: {e}");
    }
}

/// Runs a parsed request; returns the data bytes written into guest memory, or the error status.
fn execute(disk: &Disk, acked: u64, mem: &GuestRamMap, req: &Request) -> Result<u32, u8> {
    let io_err = |what: &str, e: io::Error| {
        crate::guest_warn!("virtio-blk: {what} failed: {e}");
        status::IOERR
    };
    // Sector numbers were checked against the capacity, so these offsets fit.
    let offset = req.sector << SECTOR_SHIFT;
    match req.kind {
        RequestType::In => {
            disk.read_vectored(offset, &guest_slices(mem, &req.data)?)
                .map_err(|e| io_err("read", e))?;
            // A chain is shorter than 4 GiB (the queue crate ends one that is not).
            Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
        }
        RequestType::Out => {
            if disk.read_only() {
                return Err(status::IOERR);
            }
            disk.write_vectored(offset, &guest_slices(mem, &req.data)?)
                .map_err(|e| io_err("write", e))?;
            Ok(0)
        }
        RequestType::Flush => {
            if !disk.read_only() {
                disk.flush().map_err(|e| io_err("flush", e))?;
            }
            Ok(0)
        }
        RequestType::GetId => {
            let id = disk.id();
            let mut at = 0;
            for s in &req.data {
                let n = (s.len as usize).min(id.len() - at);
                mem.write_slice(&id[at..at + n], s.addr)
                    .map_err(|_| status::IOERR)?;
                at += n;
                if at == id.len() {
                    break;
                }
            }
            Ok(at as u32)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            let discard = req.kind == RequestType::Discard;
            let feature = if discard {
                features::DISCARD
            } else {
                features::WRITE_ZEROES
            };
            // Never offered read-only; a driver sending it anyway gets UNSUPP.
            if disk.read_only() || acked & feature == 0 {
                return Err(status::UNSUPP);
            }
            for r in &req.ranges {
                let (off, len) = (
                    r.sector << SECTOR_SHIFT,
                    u64::from(r.sectors) << SECTOR_SHIFT,
                );
                let res = if discard {
                    match disk.punch_hole(off, len) {
                        // Discard is a hint: a filesystem without holes may ignore it.
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                        r => r,
                    }
                } else {
                    disk.write_zeroes(off, len, r.unmap)
                };
                res.map_err(|e| io_err(if discard { "discard" } else { "write zeroes" }, e))?;
            }
            Ok(0)
        }
    }
}

/// The host slices of guest memory behind `segs`, in order (the parser checked that they lie in
/// guest memory; a failure means it changed under us).
fn guest_slices<'m>(
    mem: &'m GuestRamMap,
    segs: &[Segment],
) -> Result<Vec<vm_memory::VolatileSlice<'m, ()>>, u8> {
    let mut slices = Vec::with_capacity(segs.len());
    for seg in segs {
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            slices.push(slice.map_err(|e| {
                crate::guest_warn!("virtio-blk: guest memory of a checked request: {e}");
                status::IOERR
            })?);
        }
    }
    Ok(slices)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_ID
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config.to_bytes(), offset, data);
    }

    // write_config: the only writable field, writeback, needs VIRTIO_BLK_F_CONFIG_WCE, which is
    // not offered; the default ignores writes.

    fn save_state(&self) -> Result<serde_json::Value, DeviceStateError> {
        serde_json::to_value(self.state()).map_err(DeviceStateError::Format)
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceStateError> {
        let saved: BlockState = self.common.saved_state(state)?;
        // The disk behind a restored guest must be the one it saw: same size, same mode, same
        // features; the transport puts back the acked features and queues.
        if saved.read_only != self.disk.read_only() {
            return Err(DeviceStateError::Mismatch(format!(
                "virtio-blk was read-only={}, this disk is read-only={}",
                saved.read_only,
                self.disk.read_only()
            )));
        }
        let avail_features = self.common.avail_features();
        if saved.config != self.config || saved.avail_features != avail_features {
            return Err(DeviceStateError::Mismatch(format!(
                "virtio-blk had {} sectors and features {:#x}, this disk has {} and {:#x}",
                saved.config.capacity, saved.avail_features, self.config.capacity, avail_features
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::tests::header;
    use crate::devices::virtio::test_utils::{activate, QueueDriver, N, R, W};
    use crate::devices::virtio::{DeviceQueue, Interrupt, VIRTIO_F_VERSION_1};
    use std::io::Write as _;
    use std::sync::Arc;
    use virtio_bindings::virtio_blk as blk;
    use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::{Queue, QueueT};
    use vmm_sys_util::eventfd::EventFd;

    const HDR: u64 = 0x8000;
    const DATA: u64 = 0x1_0000;
    const STATUS: u64 = 0x7000;
    const SECTORS: u64 = 64;
    /// Entries in the test queue.
    const QSIZE: u16 = 16;

    struct Harness {
        mem: GuestRamMap,
        mq: QueueDriver,
        dev: Block,
        irq: EventFd,
        file: tempfile::NamedTempFile,
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    impl Harness {
        fn new(ro: bool, acked: u64) -> Harness {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            file.write_all(&pattern(SECTORS as usize * 512, 0x5a))
                .unwrap();
            let mem = crate::memory::map_ram(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let mq = QueueDriver::new(&mem, 0, QSIZE);
            let mut dev = Block::new(file.path(), ro).unwrap();
            let irq = activate(&mut dev, &mem, &[&mq], acked);
            Harness {
                mem,
                mq,
                dev,
                irq,
                file,
            }
        }

        fn rw() -> Harness {
            let all = VIRTIO_F_VERSION_1
                | Block::new(Path::new("/dev/null"), false)
                    .unwrap()
                    .features();
            Harness::new(false, all & !features::EVENT_IDX)
        }

        /// Submits a linear chain, runs the device, returns the used element (id, len).
        fn submit(&mut self, descs: &[(u64, u32, u16)]) -> (u32, u32) {
            let head = self.mq.add_chain(descs);
            self.run_one(head)
        }

        fn run_one(&mut self, head: u16) -> (u32, u32) {
            let before = self.mq.used_idx();
            self.dev.process_queue();
            assert_eq!(
                self.mq.used_idx(),
                before.wrapping_add(1),
                "one chain returned"
            );
            let e = self.mq.used_elem(before);
            assert_eq!(e.0, u32::from(head));
            e
        }

        fn put(&self, addr: u64, bytes: &[u8]) {
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        }

        fn get(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn status(&self) -> u8 {
            self.get(STATUS, 1)[0]
        }

        /// A request with header `t`/`sector` at HDR, the status byte reset to 0xff first.
        fn prepare(&self, t: u32, sector: u64) {
            self.put(HDR, &header(t, sector));
            self.put(STATUS, &[0xff]);
        }

        fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
            self.prepare(blk::VIRTIO_BLK_T_OUT, sector);
            self.put(DATA, data);
            let (_, len) =
                self.submit(&[(HDR, 16, R), (DATA, data.len() as u32, R), (STATUS, 1, W)]);
            assert_eq!(len, 1);
            self.status()
        }

        fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
            self.prepare(blk::VIRTIO_BLK_T_IN, sector);
            self.put(DATA, &vec![0xee; len]);
            let (_, used) = self.submit(&[(HDR, 16, R), (DATA, len as u32, W), (STATUS, 1, W)]);
            let st = self.status();
            if st == status::OK {
                assert_eq!(used as usize, len + 1);
            }
            (st, self.get(DATA, len))
        }

        /// A write and a read-back of fresh data: the device still serves.
        fn still_serves(&mut self) {
            let data = pattern(1024, self.mq.next_slot() as u8);
            assert_eq!(self.write(10, &data), status::OK);
            assert_eq!(self.read(10, 1024), (status::OK, data));
        }

        fn file(&self) -> Vec<u8> {
            std::fs::read(self.file.path()).unwrap()
        }

        fn segments(&self, t: u32, ranges: &[(u64, u32, u32)]) -> u32 {
            self.prepare(t, 0);
            for (i, &(sector, n, flags)) in ranges.iter().enumerate() {
                let mut r = [0u8; 16];
                r[0..8].copy_from_slice(&sector.to_le_bytes());
                r[8..12].copy_from_slice(&n.to_le_bytes());
                r[12..16].copy_from_slice(&flags.to_le_bytes());
                self.put(DATA + 16 * i as u64, &r);
            }
            (ranges.len() * 16) as u32
        }
    }

    #[test]
    fn features_and_config_space() {
        let h = Harness::rw();
        let f = h.dev.features();
        for bit in [
            features::SEG_MAX,
            features::FLUSH,
            features::DISCARD,
            features::WRITE_ZEROES,
            features::EVENT_IDX,
        ] {
            assert_ne!(f & bit, 0);
        }
        assert_eq!(f & features::RO, 0);
        assert_eq!(h.dev.device_type(), 2);
        assert_eq!(h.dev.queue_max_sizes(), &[256]);
        let mut c = [0u8; 60];
        h.dev.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), SECTORS);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(
            u32::from_le_bytes(c[36..40].try_into().unwrap()),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_DISCARD_SEG
        );
        assert_eq!(
            u32::from_le_bytes(c[52..56].try_into().unwrap()),
            MAX_WRITE_ZEROES_SEG
        );
        assert_eq!(c[56], 1);
        // A read straddling the end copies what exists; past the end nothing.
        let mut tail = [0x11u8; 8];
        h.dev.read_config(56, &mut tail);
        assert_eq!(tail, [1, 0, 0, 0, 0x11, 0x11, 0x11, 0x11]);
        let mut far = [0x22u8; 4];
        h.dev.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0x22; 4]);

        let ro = Harness::new(true, 0);
        let f = ro.dev.features();
        assert_ne!(f & features::RO, 0);
        assert_eq!(f & (features::DISCARD | features::WRITE_ZEROES), 0);
        assert_eq!(ro.dev.config().max_discard_sectors, 0);
    }

    #[test]
    fn write_then_read_back() {
        let mut h = Harness::rw();
        let data = pattern(4096, 1);
        assert_eq!(h.write(8, &data), status::OK);
        assert_eq!(&h.file()[8 * 512..8 * 512 + 4096], &data[..]);
        assert_eq!(h.read(8, 4096), (status::OK, data));
        // The last sector is reachable; the first past it is not.
        assert_eq!(h.write(SECTORS - 1, &[7; 512]), status::OK);
        assert_eq!(h.write(SECTORS, &[7; 512]), status::IOERR);
        assert_eq!(h.read(SECTORS - 1, 1024).0, status::IOERR);
        assert_ne!(h.irq.read().unwrap(), 0, "the driver was interrupted");
    }

    #[test]
    fn odd_descriptor_boundaries() {
        let mut h = Harness::rw();
        let data = pattern(1024, 2);
        let hdr = header(blk::VIRTIO_BLK_T_OUT, 4);
        // Header in two pieces, the second also holding the first 89 data bytes.
        h.put(HDR, &hdr[..5]);
        h.put(0x9000, &hdr[5..]);
        h.put(0x9000 + 11, &data[..89]);
        h.put(0xa000, &data[89..489]);
        h.put(0xb000, &data[489..]);
        h.put(STATUS, &[0xff]);
        let (_, len) = h.submit(&[
            (HDR, 5, R),
            (0x9000, 100, R),
            (0xa000, 400, R),
            (0xb000, 535, R),
            (STATUS, 1, W),
        ]);
        assert_eq!((len, h.status()), (1, status::OK));
        assert_eq!(&h.file()[4 * 512..4 * 512 + 1024], &data[..]);
        // Read it back into three uneven pieces, the last one also holding the status byte.
        h.prepare(blk::VIRTIO_BLK_T_IN, 4);
        let (_, len) = h.submit(&[
            (HDR, 16, R),
            (0xa000, 3, W),
            (0xb000, 700, W),
            (0xc000, 322, W),
        ]);
        assert_eq!(len, 1025);
        assert_eq!(h.get(0xc000 + 321, 1)[0], status::OK);
        let mut back = h.get(0xa000, 3);
        back.extend(h.get(0xb000, 700));
        back.extend(h.get(0xc000, 321));
        assert_eq!(back, data);
    }

    #[test]
    fn flush_and_get_id() {
        let mut h = Harness::rw();
        h.prepare(blk::VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.submit(&[(HDR, 16, R), (STATUS, 1, W)]).1, 1);
        assert_eq!(h.status(), status::OK);

        h.prepare(blk::VIRTIO_BLK_T_GET_ID, 0);
        let (_, len) = h.submit(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
        assert_eq!((len, h.status()), (21, status::OK));
        let id = h.get(DATA, 20);
        assert_eq!(&id[..], h.dev.disk.id());
        let meta = h.file.as_file().metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        let want = format!("{:x}-{:x}", meta.ino(), meta.dev());
        assert!(String::from_utf8_lossy(&id).starts_with(&want[..want.len().min(20)]));
        // A shorter buffer gets what fits.
        h.prepare(blk::VIRTIO_BLK_T_GET_ID, 0);
        h.put(DATA, &[0xee; 20]);
        let (_, len) = h.submit(&[(HDR, 16, R), (DATA, 8, W), (STATUS, 1, W)]);
        assert_eq!((len, h.status()), (9, status::OK));
        assert_eq!(h.get(DATA, 20)[..8], id[..8]);
        assert_eq!(h.get(DATA, 20)[8..], [0xee; 12]);
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_range() {
        let mut h = Harness::rw();
        let before = h.file();
        let unmap = blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let len = h.segments(blk::VIRTIO_BLK_T_WRITE_ZEROES, &[(2, 2, 0), (20, 8, unmap)]);
        assert_eq!(
            h.submit(&[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]).1,
            1
        );
        assert_eq!(h.status(), status::OK);
        let len = h.segments(blk::VIRTIO_BLK_T_DISCARD, &[(40, 8, 0)]);
        h.submit(&[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(h.status(), status::OK);
        let after = h.file();
        assert_eq!(after.len(), before.len());
        for s in 0..SECTORS as usize {
            let r = s * 512..(s + 1) * 512;
            let zeroed = (2..4).contains(&s) || (20..28).contains(&s) || (40..48).contains(&s);
            if zeroed {
                assert!(after[r].iter().all(|&b| b == 0), "sector {s} zeroed");
            } else {
                assert_eq!(after[r.clone()], before[r], "sector {s} untouched");
            }
        }
        assert_eq!(h.read(20, 512), (status::OK, vec![0; 512]));
        // Discard with unmap, and segments past the end.
        let len = h.segments(blk::VIRTIO_BLK_T_DISCARD, &[(0, 1, unmap)]);
        h.submit(&[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(h.status(), status::UNSUPP);
        let len = h.segments(
            blk::VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, 1, 0), (SECTORS - 1, 2, 0)],
        );
        h.submit(&[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(h.status(), status::IOERR);
        h.still_serves();
    }

    #[test]
    fn unnegotiated_discard_is_unsupported() {
        let mut h = Harness::new(false, VIRTIO_F_VERSION_1 | features::FLUSH);
        let before = h.file();
        for t in [blk::VIRTIO_BLK_T_DISCARD, blk::VIRTIO_BLK_T_WRITE_ZEROES] {
            let len = h.segments(t, &[(0, 8, 0)]);
            h.submit(&[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
            assert_eq!(h.status(), status::UNSUPP);
        }
        assert_eq!(h.file(), before);
    }

    #[test]
    fn read_only_refuses_every_change() {
        let mut h = Harness::new(true, VIRTIO_F_VERSION_1 | features::RO | features::FLUSH);
        let before = h.file();
        assert_eq!(h.write(0, &[1; 512]), status::IOERR);
        for t in [blk::VIRTIO_BLK_T_DISCARD, blk::VIRTIO_BLK_T_WRITE_ZEROES] {
            let len = h.segments(t, &[(0, 8, 0)]);
            h.submit(&[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
            assert_eq!(h.status(), status::UNSUPP);
        }
        h.prepare(blk::VIRTIO_BLK_T_FLUSH, 0);
        h.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!(h.status(), status::OK);
        assert_eq!(h.read(1, 512), (status::OK, before[512..1024].to_vec()));
        assert_eq!(h.file(), before);
    }

    #[test]
    fn malformed_requests_do_not_stop_the_device() {
        let mut h = Harness::rw();
        let before = h.file();
        let out = blk::VIRTIO_BLK_T_OUT;
        let inn = blk::VIRTIO_BLK_T_IN;
        // (type, sector, chain, expected status; None = dropped with nothing written)
        type Case = (&'static str, u32, u64, Vec<(u64, u32, u16)>, Option<u8>);
        let cases: Vec<Case> = vec![
            (
                "zero-length data",
                out,
                0,
                vec![(HDR, 16, R), (DATA, 0, R), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "zero-length read",
                inn,
                0,
                vec![(HDR, 16, R), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "data outside memory",
                out,
                0,
                vec![(HDR, 16, R), (0xf_fe00, 1024, R), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "data address wraps",
                inn,
                0,
                vec![(HDR, 16, R), (u64::MAX - 100, 512, W), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "header outside memory",
                out,
                0,
                vec![(0x20_0000, 16, R), (DATA, 512, R), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "write with writable data",
                out,
                0,
                vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "read with readable data",
                inn,
                0,
                vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "unknown type",
                0x77,
                0,
                vec![(HDR, 16, R), (STATUS, 1, W)],
                Some(status::UNSUPP),
            ),
            (
                "short header",
                out,
                0,
                vec![(HDR, 15, R), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "past the end",
                out,
                SECTORS - 1,
                vec![(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "sector overflows",
                inn,
                u64::MAX >> 9,
                vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "partial sector",
                out,
                0,
                vec![(HDR, 16, R), (DATA, 500, R), (STATUS, 1, W)],
                Some(status::IOERR),
            ),
            (
                "status readable",
                out,
                0,
                vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)],
                None,
            ),
            (
                "status zero-length",
                out,
                0,
                vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 0, W)],
                None,
            ),
            (
                "status outside memory",
                out,
                0,
                vec![(HDR, 16, R), (DATA, 512, R), (0x20_0000, 1, W)],
                None,
            ),
        ];
        for (name, t, sector, chain, want) in cases {
            h.prepare(t, sector);
            let (_, len) = h.submit(&chain);
            match want {
                Some(st) => assert_eq!((h.status(), len), (st, 1), "{name}"),
                None => assert_eq!((h.status(), len), (0xff, 0), "{name}: dropped"),
            }
            assert_eq!(
                h.file()[..512 * 8],
                before[..512 * 8],
                "{name}: disk untouched"
            );
            h.still_serves();
        }
    }

    #[test]
    fn loops_and_overlong_chains_are_dropped() {
        let mut h = Harness::rw();
        let n = N;
        // Two descriptors pointing at each other.
        h.prepare(blk::VIRTIO_BLK_T_OUT, 0);
        h.mq.push(&[(HDR, 16, R | n, 1), (STATUS, 1, W | n, 0)], 0);
        assert_eq!(h.run_one(0).1, 0);
        assert_eq!(h.status(), 0xff);
        h.still_serves();
        // A next index outside the table.
        h.mq.push(&[(HDR, 16, R | n, 200)], 0);
        assert_eq!(h.run_one(0).1, 0);
        h.still_serves();
        // More descriptors than the queue has, through an indirect table.
        let table = 0x4_0000u64;
        let count = QSIZE + 4;
        for i in 0..count {
            let (a, l, f) = match i {
                0 => (HDR, 16, R),
                i if i == count - 1 => (STATUS, 1, W),
                _ => (DATA, 512, R),
            };
            let f = if i + 1 < count { f | n } else { f };
            h.mem
                .write_obj(
                    RawDescriptor::from(SplitDescriptor::new(a, l, f, i + 1)),
                    GuestAddress(table + 16 * u64::from(i)),
                )
                .unwrap();
        }
        h.prepare(blk::VIRTIO_BLK_T_OUT, 0);
        h.mq.push(
            &[(
                table,
                16 * u32::from(count),
                VRING_DESC_F_INDIRECT as u16,
                0,
            )],
            0,
        );
        assert_eq!(h.run_one(0).1, 0);
        assert_eq!(h.status(), 0xff);
        h.still_serves();
    }

    #[test]
    fn a_bogus_available_index_does_not_hang_the_device() {
        let mut h = Harness::rw();
        h.mq.set_avail_idx(QSIZE + 5);
        h.dev.process_queue();
        assert_eq!(h.mq.used_idx(), 0);
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
        let all = VIRTIO_F_VERSION_1
            | Block::new(Path::new("/dev/null"), false)
                .unwrap()
                .features();
        let mut h = Harness::new(false, all);
        let used_event = |h: &Harness, v: u16| h.mq.set_used_event(v);
        // The driver wants to hear when used idx passes 0: the first completion interrupts.
        used_event(&h, 0);
        assert_eq!(h.write(0, &[1; 512]), status::OK);
        assert_eq!(h.irq.read().unwrap(), 1);
        // It now asks for an interrupt only after entry 5.
        used_event(&h, 5);
        assert_eq!(h.write(0, &[2; 512]), status::OK);
        assert!(h.irq.read().is_err(), "no interrupt for entry 1");
        // avail_event tells the driver which index to notify at: the next one.
        assert_eq!(h.mq.avail_event(), 2);
        used_event(&h, 2);
        assert_eq!(h.write(0, &[3; 512]), status::OK);
        assert_eq!(h.irq.read().unwrap(), 1);
    }

    #[test]
    fn state_is_plain_serde_data() {
        let mut h = Harness::rw();
        h.still_serves();
        let s = h.dev.state();
        assert!(s.activated && !s.read_only);
        assert_eq!(s.acked_features, h.dev.common.acked_features());
        assert_eq!(s.config.capacity, SECTORS);
        assert_eq!(s.queues.len(), 1);
        let q = s.queues[0];
        assert_eq!(
            (q.size, q.ready, q.next_avail, q.next_used),
            (QSIZE, true, 2, 2)
        );
        assert_eq!(q.used_ring, h.mq.used());
        let back: BlockState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let queue = Queue::try_from(q).unwrap();
        assert_eq!(QueueSnapshot::from(queue.state()), q);
        h.dev.reset();
        let s = h.dev.state();
        assert!(!s.activated && s.queues.is_empty() && s.acked_features == 0);
    }

    #[test]
    fn restore_checks_the_disk_it_is_given() {
        let h = Harness::rw();
        let saved = h.dev.save_state().unwrap();
        let same = tempfile::NamedTempFile::new().unwrap();
        same.as_file()
            .set_len(SECTORS * super::super::SECTOR_SIZE)
            .unwrap();
        let mut fresh = Block::new(same.path(), false).unwrap();
        fresh.restore_state(&saved).unwrap();
        let mut ro = Block::new(same.path(), true).unwrap();
        assert!(matches!(
            ro.restore_state(&saved),
            Err(DeviceStateError::Mismatch(_))
        ));
        same.as_file()
            .set_len(2 * SECTORS * super::super::SECTOR_SIZE)
            .unwrap();
        let mut bigger = Block::new(same.path(), false).unwrap();
        assert!(matches!(
            bigger.restore_state(&saved),
            Err(DeviceStateError::Mismatch(_))
        ));
        assert!(matches!(
            fresh.restore_state(&serde_json::json!({"read_only": 3})),
            Err(DeviceStateError::Format(_))
        ));
        let mut live = Harness::rw();
        assert!(matches!(
            live.dev.restore_state(&saved),
            Err(DeviceStateError::Busy(_))
        ));
        live.dev.reset();
    }

    #[test]
    fn activation_needs_one_ready_queue() {
        let mut h = Harness::rw();
        h.dev.reset();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        assert!(h.dev.activate(h.mem.clone(), irq.clone(), vec![]).is_err());
        let notify = EventFd::new(0).unwrap();
        let queue = Queue::new(16).unwrap();
        assert!(h
            .dev
            .activate(h.mem.clone(), irq, vec![DeviceQueue { queue, notify }])
            .is_err());
        assert!(h.dev.state().queues.is_empty());
    }
}

#[cfg(test)]
mod transport_tests {
    //! The device behind the real virtio-mmio transport and event loop, as the VMM runs it.
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::block::request::tests::header;
    use crate::devices::virtio::mmio::{reg, MmioTransport};
    use crate::devices::virtio::test_utils::{
        bring_up, read_reg, run_until, write_reg, QueueDriver, R, W,
    };
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};
    use virtio_bindings::virtio_blk as blk;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn served_through_mmio_and_the_event_loop_across_a_reset() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(64 * 512).unwrap();
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Block::new(file.path(), false).unwrap()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(dev.clone(), mem.clone(), irq.try_clone().unwrap()).unwrap();
        let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        em.add_subscriber(dev.clone());

        assert_eq!(read_reg(&mut t, reg::DEVICE_ID), 2);
        let mut cap = [0u8; 8];
        t.read(reg::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 64);

        let mq = QueueDriver::new(&mem, 0, 16);
        for round in 0..2u8 {
            bring_up(&mut t, &[&mq]);
            // The VMM thread registers the queue notifier.
            let registered = || dev.lock().unwrap().common.is_registered();
            run_until(&mut em, registered, "registration");
            let data = vec![0x40 + round; 512];
            mem.write_slice(&header(blk::VIRTIO_BLK_T_OUT, 3), GuestAddress(0x8000))
                .unwrap();
            mem.write_slice(&data, GuestAddress(0x1_0000)).unwrap();
            mq.add_chain(&[(0x8000, 16, R), (0x1_0000, 512, R), (0x7000, 1, W)]);
            // What KVM's ioeventfd does on a QueueNotify write.
            t.queue_notifiers()[0].write(1).unwrap();
            run_until(&mut em, || mq.used_idx() == 1, "the request served");
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(0x7000)).unwrap(),
                status::OK
            );
            assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 1);
            assert_eq!(irq.read().unwrap(), 1);
            write_reg(&mut t, reg::INTERRUPT_ACK, 1);
            let on_disk = std::fs::read(file.path()).unwrap();
            assert_eq!(on_disk[3 * 512..4 * 512], data[..]);
            assert!(dev.lock().unwrap().state().activated);
            // The driver resets the device; the VMM thread retires the old notifier. The rings
            // are reused from scratch next round, as a freshly probing driver would.
            write_reg(&mut t, reg::STATUS, 0);
            let retired = || !dev.lock().unwrap().common.has_retired();
            run_until(&mut em, retired, "retirement");
            assert!(!dev.lock().unwrap().state().activated);
            // A stale notification after the reset reaches nobody.
            t.queue_notifiers()[0].write(1).unwrap();
            em.run_with_timeout(10).unwrap();
            let _ = t.queue_notifiers()[0].read();
            mq.clear();
        }
    }
}
