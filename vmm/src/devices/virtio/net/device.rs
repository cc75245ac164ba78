//! The network device: configuration space, offloads, both queues served against the tap, and the
//! state a snapshot reads.
//!
//! RX: a frame read from the tap is written into as many receive buffers as it needs (with
//! VIRTIO_NET_F_MRG_RXBUF; one otherwise). A frame that finds too few buffers waits, read but
//! not delivered, until the driver posts more; meanwhile the tap is not read, so the kernel's
//! queue in front of it is the only backlog, and it is bounded by the tap's `txqueuelen`.
//! TX: each chain is copied out and written to the tap as one frame; a frame the tap refuses is
//! dropped, as a NIC drops what its wire cannot take.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::frame::{read_tx, FrameError, RxBuffer};
use super::tap::Tap;
use super::vhost::{self, Calls, VhostDataPath};
use super::{
    features, HDR_LEN, MAX_MTU, MAX_PACKET, MIN_MTU, NET_DEVICE_ID, QUEUE_SIZE, RX_QUEUE,
    STATUS_LINK_UP, TX_QUEUE,
};
use crate::devices::virtio::common::{needs_interrupt, serve_queue};
use crate::devices::virtio::{
    read_config_space, ActivateError, DeviceStateError, QueueSnapshot, VirtioCommon, VirtioDevice,
};
use crate::memory::GuestRamMap;

/// Byte offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_AT: usize = 10;

/// Errors making a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An MTU outside what the device announces.
    #[error("MTU {0} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u16),
    /// A multicast (or broadcast) MAC cannot be a NIC's own.
    #[error("MAC {0} is a multicast address")]
    MulticastMac(MacAddr),
    /// The control eventfd.
    #[error("network device: cannot create an eventfd")]
    EventFd(#[source] io::Error),
    #[error("network device")]
    Vhost(#[source] super::vhost::VhostError),
}

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts
                .next()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("MAC {s:?} is not six hex pairs"))?;
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("MAC {s:?} is not hex"))?;
        }
        if parts.next().is_some() {
            return Err(format!("MAC {s:?} is not six hex pairs"));
        }
        Ok(MacAddr(out))
    }
}

/// What the host sets of the NIC the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The NIC's MAC.
    pub mac: MacAddr,
    /// The MTU the driver starts with.
    pub mtu: u16,
}

impl NetConfig {
    /// Bytes of configuration space: `mac`, `status`, `max_virtqueue_pairs`, `mtu`.
    pub const SIZE: usize = 12;

    /// The little-endian layout of `struct virtio_net_config` up to `mtu` (virtio 1.2, 5.1.4).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..6].copy_from_slice(&self.mac.0);
        b[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }
}

/// The device's state as read out; a restore keeps the MAC and MTU the guest's driver read at
/// probe time, whatever the new device was made with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// Configuration space.
    pub config: NetConfig,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the driver activated the device.
    pub activated: bool,
    /// The live queues (empty unless activated).
    pub queues: Vec<QueueSnapshot>,
}

/// Frames and drops, both ways, since the device was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the tap dropped (no buffer could hold them, or a bad buffer).
    pub rx_dropped: u64,
    /// Frames the guest sent that reached the tap.
    pub tx_frames: u64,
    /// Frames the guest sent that were dropped (bad chain, no tap, the tap refused).
    pub tx_dropped: u64,
}

/// Who moves the frames between the tap and the queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// The kernel's vhost-net (`/dev/vhost-net`).
    Vhost,
    /// The VMM thread.
    UserSpace,
}

impl DataPath {
    /// vhost-net where `/dev/vhost-net` opens, said once in the log where it does not.
    pub fn best() -> DataPath {
        static SAID: std::sync::Once = std::sync::Once::new();
        if vhost::available() {
            return DataPath::Vhost;
        }
        SAID.call_once(|| {
            log::info!(
                "virtio-net: {} cannot be opened: frames go through the VMM thread",
                vhost::VHOST_NET_PATH
            )
        });
        DataPath::UserSpace
    }
}

/// A virtio-net device over a tap (or over nothing, for a template's NIC).
#[derive(Debug)]
pub struct Net {
    tap: Option<Tap>,
    data_path: DataPath,
    /// vhost's used-ring eventfds (with [`DataPath::Vhost`]), registered with the VMM thread.
    calls: Option<Calls>,
    /// vhost-net serving the active queues.
    vhost: Option<VhostDataPath>,
    /// Whether the tap is in the VMM thread's event loop (the user-space path).
    pub(super) tap_registered: bool,
    config: NetConfig,
    pub(super) common: VirtioCommon,
    /// One frame from the tap, header first; `rx_len` bytes of it wait for buffers.
    rx_frame: Vec<u8>,
    rx_len: usize,
    tx_frame: Vec<u8>,
    counters: NetCounters,
}

/// What became of one frame offered to the RX queue.
enum Delivery {
    Delivered,
    /// Too few buffers: the frame waits, every buffer it took back in the ring.
    NoRoom,
    /// Dropped; the buffers it took went back used with nothing written.
    Dropped(FrameError),
}

impl Net {
    /// A device with `config` over `tap` (none: frames sent are dropped, none arrive), served by
    /// vhost-net where it can be ([`DataPath::best`]).
    pub fn new(tap: Option<Tap>, config: NetConfig) -> Result<Net, NetError> {
        let path = if tap.is_some() {
            DataPath::best()
        } else {
            DataPath::UserSpace
        };
        Net::with_data_path(tap, config, path)
    }

    /// [`Net::new`] on `data_path` (vhost-net needs a tap: without one it is the user-space path).
    pub fn with_data_path(
        tap: Option<Tap>,
        config: NetConfig,
        data_path: DataPath,
    ) -> Result<Net, NetError> {
        if !(MIN_MTU..=MAX_MTU).contains(&config.mtu) {
            return Err(NetError::Mtu(config.mtu));
        }
        if config.mac.0[0] & 1 != 0 {
            return Err(NetError::MulticastMac(config.mac));
        }
        let avail_features = features::CSUM
            | features::GUEST_CSUM
            | features::MTU
            | features::MAC
            | features::GUEST_TSO4
            | features::GUEST_TSO6
            | features::HOST_TSO4
            | features::HOST_TSO6
            | features::MRG_RXBUF
            | features::STATUS
            | features::EVENT_IDX;
        let data_path = if tap.is_some() {
            data_path
        } else {
            DataPath::UserSpace
        };
        let calls = match data_path {
            DataPath::Vhost => Some(Calls::new(2).map_err(NetError::Vhost)?),
            DataPath::UserSpace => None,
        };
        Ok(Net {
            tap,
            data_path,
            calls,
            vhost: None,
            tap_registered: false,
            config,
            common: VirtioCommon::new("virtio-net", &[QUEUE_SIZE, QUEUE_SIZE], avail_features)
                .map_err(NetError::EventFd)?,
            rx_frame: vec![0; MAX_PACKET],
            rx_len: 0,
            tx_frame: Vec::with_capacity(MAX_PACKET),
            counters: NetCounters::default(),
        })
    }

    /// The configuration space.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The tap, if any.
    pub fn tap(&self) -> Option<&Tap> {
        self.tap.as_ref()
    }

    /// Who moves the frames.
    pub fn data_path(&self) -> DataPath {
        self.data_path
    }

    /// Whether vhost-net serves the active queues now.
    pub fn on_vhost(&self) -> bool {
        self.vhost.is_some()
    }

    /// vhost's used-ring eventfds, for the event loop.
    pub(super) fn calls(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        self.calls.as_ref().map_or(&[], |c| &c.0[..])
    }

    /// Frames and drops so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Bytes of a frame read from the tap that wait for receive buffers (0: none).
    pub fn rx_waiting(&self) -> usize {
        self.rx_len
    }

    /// The device state; meaningful while the VM is paused.
    pub fn state(&self) -> NetState {
        NetState {
            config: self.config,
            avail_features: self.common.avail_features(),
            acked_features: self.common.acked_features(),
            activated: self.common.is_active(),
            queues: self.queue_states(),
        }
    }

    /// The tap offloads (`TUN_F_*`) that frames for the guest may use: what its driver accepted.
    fn tap_offloads(&self) -> u32 {
        let c = &self.common;
        if !c.acked(features::GUEST_CSUM) {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if c.acked(features::GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if c.acked(features::GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        flags
    }

    /// Moves frames from the tap into the RX queue until the tap is empty or the buffers run out.
    pub fn process_rx(&mut self) {
        let mergeable = self.common.acked(features::MRG_RXBUF);
        let guest_csum = self.common.acked(features::GUEST_CSUM);
        let event_idx = self.common.acked(features::EVENT_IDX);
        let Net {
            tap,
            common,
            rx_frame,
            rx_len,
            counters,
            ..
        } = self;
        let (Some(tap), Some(active)) = (tap.as_ref(), common.active_mut()) else {
            return;
        };
        let (mem, q) = (&active.mem, &mut active.queues[RX_QUEUE].queue);
        let mut used = false;
        // Each retry follows buffers the driver posted meanwhile; bounded so that a driver
        // playing with its index cannot hold the VMM thread.
        let mut retries = 0;
        loop {
            if *rx_len == 0 {
                match tap.read_frame(rx_frame) {
                    Ok(n) if n >= HDR_LEN => *rx_len = n,
                    // No frame (a detached tap): nothing more to read now.
                    Ok(0) => break,
                    Ok(_) => {
                        counters.rx_dropped += 1;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        crate::guest_warn!("virtio-net: reading tap {}: {e}", tap.name());
                        break;
                    }
                }
            }
            let frame = &mut rx_frame[..*rx_len];
            if !guest_csum {
                // The driver takes no partial checksums nor GSO: no flag may be set
                // (virtio 1.2, 5.1.6.4).
                frame[..NUM_BUFFERS_AT].fill(0);
            }
            match deliver(q, mem, frame, mergeable) {
                (Delivery::Delivered, _) => {
                    counters.rx_frames += 1;
                    used = true;
                    *rx_len = 0;
                }
                (Delivery::Dropped(e), any) => {
                    log::debug!("virtio-net: dropping a received frame: {e}");
                    counters.rx_dropped += 1;
                    used |= any;
                    *rx_len = 0;
                }
                (Delivery::NoRoom, _) => {
                    retries += 1;
                    if !event_idx || retries > usize::from(QUEUE_SIZE) || !ask_for_buffers(q, mem) {
                        break;
                    }
                }
            }
        }
        if needs_interrupt(q, mem, used) {
            active.signal_used_ring();
        }
    }

    /// Writes every frame the guest made available to the tap.
    pub fn process_tx(&mut self) {
        let Net {
            tap,
            common,
            tx_frame,
            counters,
            ..
        } = self;
        let Some(active) = common.active_mut() else {
            return;
        };
        let (mem, q) = (&active.mem, &mut active.queues[TX_QUEUE].queue);
        let used = serve_queue(
            q,
            mem,
            "virtio-net tx",
            || true,
            |chain, size| {
                let sent = read_tx(chain, size, tx_frame)
                    .map_err(|e| log::debug!("virtio-net: dropping a sent frame: {e}"))
                    .ok()
                    .zip(tap.as_ref())
                    .map(|(len, tap)| tap.write_frame(&tx_frame[..len]));
                match sent {
                    Some(Ok(_)) => counters.tx_frames += 1,
                    Some(Err(e)) => {
                        log::debug!("virtio-net: tap {} refused a frame: {e}", tap_name(tap));
                        counters.tx_dropped += 1;
                    }
                    None => counters.tx_dropped += 1,
                }
                Some(0)
            },
        );
        if needs_interrupt(q, mem, used) {
            active.signal_used_ring();
        }
    }
}

fn tap_name(tap: &Option<Tap>) -> &str {
    tap.as_ref().map_or("-", Tap::name)
}

/// Writes `frame` into the buffers it needs; returns what happened and whether any buffer went
/// back used.
fn deliver(
    q: &mut Queue,
    mem: &GuestRamMap,
    frame: &mut [u8],
    mergeable: bool,
) -> (Delivery, bool) {
    let len = frame.len();
    let mut bufs: Vec<RxBuffer> = Vec::new();
    let mut room = 0usize;
    let give_back = |q: &mut Queue, bufs: &[RxBuffer], extra: Option<u16>| {
        for head in bufs.iter().map(|b| b.head).chain(extra) {
            if let Err(e) = q.add_used(mem, head, 0) {
                crate::guest_warn!("virtio-net rx: cannot return chain {head}: {e}");
            }
        }
    };
    while room < len {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            for _ in &bufs {
                q.go_to_previous_position();
            }
            return (Delivery::NoRoom, false);
        };
        let head = chain.head_index();
        match RxBuffer::parse(chain, q.size()) {
            Ok(b) => {
                room += b.capacity();
                bufs.push(b);
            }
            Err(e) => {
                give_back(q, &bufs, Some(head));
                return (Delivery::Dropped(e), true);
            }
        }
        if !mergeable && room < len {
            give_back(q, &bufs, None);
            return (Delivery::Dropped(FrameError::TooLarge(len as u64)), true);
        }
    }
    // At most a queue's worth of buffers.
    let count = bufs.len() as u16;
    frame[NUM_BUFFERS_AT..HDR_LEN].copy_from_slice(&count.to_le_bytes());
    let mut at = 0;
    for b in &bufs {
        let take = b.capacity().min(len - at);
        let written = match b.write(mem, &frame[at..at + take]) {
            Ok(()) => take,
            Err(e) => {
                crate::guest_warn!("virtio-net rx: writing a checked buffer: {e}");
                0
            }
        };
        if let Err(e) = q.add_used(mem, b.head, written as u32) {
            crate::guest_warn!("virtio-net rx: cannot return chain {}: {e}", b.head);
        }
        at += take;
    }
    (Delivery::Delivered, true)
}

/// With EVENT_IDX: asks the driver to notify at its next posted buffer (avail_event = its
/// current index, not ours: the buffers it posted already were too few). Returns whether it
/// posted some meanwhile, so that delivery should be tried again.
fn ask_for_buffers(q: &mut Queue, mem: &GuestRamMap) -> bool {
    let Ok(Wrapping(avail)) = q.avail_idx(mem, Ordering::Acquire) else {
        return false;
    };
    // virtio 1.2, 2.7.10: avail_event ends the used ring.
    let Some(at) = GuestAddress(q.used_ring()).checked_add(4 + 8 * u64::from(q.size())) else {
        return false;
    };
    if mem.write_obj(avail.to_le(), at).is_err() {
        return false;
    }
    fence(Ordering::SeqCst);
    q.avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|Wrapping(now)| now != avail)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_ID
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

    // write_config: `mac` is writable only without VIRTIO_NET_F_MAC (legacy); the default
    // ignores writes.

    fn start_backend(&mut self) -> Result<(), ActivateError> {
        let flags = self.tap_offloads();
        if let Some(tap) = &self.tap {
            tap.set_offload(flags)
                .map_err(|e| ActivateError::Device(crate::error_chain(&e)))?;
        }
        Ok(())
    }

    fn stop_backend(&mut self) {
        // A frame read for the old queues is not the new driver's.
        self.rx_len = 0;
        self.vhost = None;
    }

    fn activate(
        &mut self,
        mem: GuestRamMap,
        interrupt: std::sync::Arc<crate::devices::virtio::Interrupt>,
        queues: Vec<crate::devices::virtio::DeviceQueue>,
    ) -> Result<(), ActivateError> {
        self.common.check(&queues)?;
        self.start_backend()?;
        self.vhost = None;
        if let (DataPath::Vhost, Some(tap), Some(calls)) = (self.data_path, &self.tap, &self.calls)
        {
            match VhostDataPath::start(&mem, &queues, tap, self.common.acked_features(), calls) {
                Ok(path) => self.vhost = Some(path),
                Err(e) => {
                    crate::guest_warn!(
                        "{}; virtio-net falls back to the user-space path",
                        crate::error_chain(&e)
                    );
                    self.data_path = DataPath::UserSpace;
                }
            }
        }
        self.common.set_queues_external(self.vhost.is_some());
        self.common.activate(mem, interrupt, queues)
    }

    fn report(&self) -> String {
        let c = self.counters;
        if self.vhost.is_some() {
            return format!(
                "{}; tap {}: on vhost-net",
                self.common.report(),
                tap_name(&self.tap)
            );
        }
        format!(
            "{}; tap {}: rx {} (dropped {}, {} bytes waiting), tx {} (dropped {})",
            self.common.report(),
            tap_name(&self.tap),
            c.rx_frames,
            c.rx_dropped,
            self.rx_len,
            c.tx_frames,
            c.tx_dropped
        )
    }

    fn save_state(&self) -> Result<serde_json::Value, DeviceStateError> {
        // The kernel holds the rings' positions and may write guest memory until detached; a
        // template's NIC has no tap, so this never meets one.
        if self.vhost.is_some() {
            return Err(DeviceStateError::Busy(
                "virtio-net is served by vhost-net: its queues cannot be saved".into(),
            ));
        }
        serde_json::to_value(self.state()).map_err(DeviceStateError::Format)
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceStateError> {
        let saved: NetState = self.common.saved_state(state)?;
        let avail_features = self.common.avail_features();
        if saved.avail_features != avail_features {
            return Err(DeviceStateError::Mismatch(format!(
                "virtio-net offered features {:#x}, this device offers {avail_features:#x}",
                saved.avail_features
            )));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&saved.config.mtu) || saved.config.mac.0[0] & 1 != 0 {
            return Err(DeviceStateError::Mismatch(format!(
                "virtio-net state has MAC {} and MTU {}",
                saved.config.mac, saved.config.mtu
            )));
        }
        self.config = saved.config;
        Ok(())
    }
}
