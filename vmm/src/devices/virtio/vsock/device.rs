//! The vsock device: configuration space (the guest CID), feature negotiation, activation, the
//! three queues, and the transport-reset event.
//!
//! One processing pass serves the TX queue completely (TX never waits: guest data the host cannot
//! take is buffered within the credit the guest was given), delivers a pending transport reset on
//! the event queue, fills RX buffers while connections have something for the guest (rewinding the
//! one buffer it could not use), and then interrupts the driver once, if it wants it (EVENT_IDX).

use std::io;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Muxer, MuxerError, Timeouts};
use super::packet::{RxBuffer, TxPacket};
use super::persist::VsockState;
use super::{
    features, EVENT_QUEUE, EVENT_TRANSPORT_RESET, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VSOCK_DEVICE_ID,
};
use crate::devices::virtio::{
    ActivateError, DeviceQueue, DeviceStateError, Interrupt, QueueSnapshot, VirtioDevice,
};

/// Errors making a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID or the unix socket.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// The control eventfd.
    #[error("vsock device: cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
}

/// A virtio-vsock device bridging guest streams to host unix sockets.
pub struct Vsock {
    pub(super) muxer: Muxer,
    avail_features: u64,
    acked_features: u64,
    /// Written by `activate` and `reset` (on a vCPU thread) so that the VMM thread, which alone
    /// can touch the event loop, (un)registers the queue notifiers.
    pub(super) control: EventFd,
    pub(super) queues: Vec<DeviceQueue>,
    /// Notifiers of queues a reset dropped, still registered until the VMM thread removes them.
    pub(super) retired: Vec<EventFd>,
    /// Whether `queues`' notifiers are registered with the event loop.
    pub(super) registered: bool,
    pub(super) active: Option<Active>,
    /// A transport reset waiting for an event-queue buffer.
    pending_reset_event: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("muxer", &self.muxer)
            .field("acked_features", &self.acked_features)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Vsock {
    /// A device for the guest with `guest_cid` (3 or more), listening on the unix socket
    /// `uds_path` (refused if another listener holds it, or if it does not fit `sun_path`; a stale
    /// socket file is replaced). Guest connections to host port P go to `<uds_path>_P`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        let muxer = Muxer::new(guest_cid, uds_path)?;
        Ok(Vsock {
            muxer,
            avail_features: features::EVENT_IDX,
            acked_features: 0,
            control: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(VsockError::EventFd)?,
            queues: Vec::new(),
            retired: Vec::new(),
            registered: false,
            active: None,
            pending_reset_event: false,
        })
    }

    /// Replaces the deadlines (CONNECT line, guest RESPONSE, clean close).
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.muxer.timeouts = timeouts;
    }

    /// Replaces the connection limit ([`MAX_CONNECTIONS`](super::MAX_CONNECTIONS) by default).
    pub fn set_max_connections(&mut self, max: usize) {
        self.muxer.max_connections = max;
    }

    /// The guest CID.
    pub fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid()
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        self.muxer.path()
    }

    /// Live connections (bridged or being set up).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Whether a transport reset still waits for an event-queue buffer.
    pub fn transport_reset_pending(&self) -> bool {
        self.pending_reset_event
    }

    /// The device state; meaningful while the VM is paused (the queues move otherwise).
    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid(),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            activated: self.active.is_some(),
            queues: self.queue_states(),
        }
    }

    /// Sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drops every connection: the guest drops its
    /// own (its listening sockets survive). Call it after a restore, or whenever the host side's
    /// connections are gone. Without an event-queue buffer (or before activation) the event waits
    /// for one.
    pub fn send_transport_reset(&mut self) {
        self.muxer.reset_connections();
        self.pending_reset_event = true;
        self.process_queues();
    }

    fn kick_control(&self) {
        if let Err(e) = self.control.write(1) {
            log::error!("virtio-vsock: cannot wake the event loop: {e}");
        }
    }

    /// One processing pass over every queue and the host side's pending work.
    pub fn process_queues(&mut self) {
        let Some(active) = &self.active else {
            return;
        };
        if self.queues.len() != 3 {
            return;
        }
        let (mem, interrupt) = (&active.mem, active.interrupt.clone());
        let mut notify = false;
        let (rx, rest) = self.queues.split_at_mut(TX_QUEUE);
        let (tx, event) = rest.split_at_mut(1);
        let (rxq, txq, evq) = (&mut rx[0].queue, &mut tx[0].queue, &mut event[0].queue);

        if process_tx(txq, mem, &mut self.muxer) {
            notify |= txq.needs_notification(mem).unwrap_or(true);
        }
        if self.pending_reset_event {
            if let Some(used) = deliver_reset(evq, mem) {
                self.pending_reset_event = false;
                if used {
                    notify |= evq.needs_notification(mem).unwrap_or(true);
                }
            }
        }
        if process_rx(rxq, mem, &mut self.muxer) {
            notify |= rxq.needs_notification(mem).unwrap_or(true);
        }
        if notify {
            if let Err(e) = interrupt.signal_used_ring() {
                log::error!("virtio-vsock: cannot signal the used ring: {e}");
            }
        }
    }

    /// Host sockets, listener and deadlines, then a processing pass.
    pub fn process_backend(&mut self) {
        self.muxer.process_events();
        self.process_queues();
    }
}

/// Runs `body` on each available chain until the queue is empty, the disable/enable dance of
/// notification suppression included. `body` returns `Some(len)` to return the chain used, or
/// `None` to put it back and stop. Returns whether any chain was used.
fn drain_queue(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    name: &str,
    mut want_more: impl FnMut() -> bool,
    mut body: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>, u16) -> Option<u32>,
) -> bool {
    let mut used = false;
    let mut idle_rounds = 0;
    loop {
        if let Err(e) = q.disable_notification(mem) {
            log::warn!("virtio-vsock: {name}: cannot disable notifications: {e}");
            break;
        }
        let mut progressed = false;
        let mut stopped = false;
        while want_more() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let size = q.size();
            match body(chain, size) {
                Some(len) => {
                    progressed = true;
                    match q.add_used(mem, head, len) {
                        Ok(()) => used = true,
                        Err(e) => {
                            log::warn!("virtio-vsock: {name}: cannot return chain {head}: {e}")
                        }
                    }
                }
                None => {
                    q.go_to_previous_position();
                    stopped = true;
                    break;
                }
            }
        }
        if stopped || !want_more() {
            break;
        }
        match q.enable_notification(mem) {
            Ok(false) => break,
            Ok(true) => {
                // More buffers arrived, or the available index is more than a queue ahead of us,
                // which the queue refuses to pop: a second round without progress tells the two
                // apart without spinning forever on a hostile index.
                idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
                if idle_rounds > 1 {
                    log::warn!(
                        "virtio-vsock: {name}: available ring index is invalid; queue stalled"
                    );
                    break;
                }
            }
            Err(e) => {
                log::warn!("virtio-vsock: {name}: cannot enable notifications: {e}");
                break;
            }
        }
    }
    used
}

/// Serves every TX chain; a bad one is returned unused and logged (at debug level: a hostile guest
/// must not flood the host log).
fn process_tx(q: &mut Queue, mem: &GuestMemoryMmap, muxer: &mut Muxer) -> bool {
    let cid = muxer.guest_cid();
    drain_queue(
        q,
        mem,
        "tx",
        || true,
        |chain, size| {
            match TxPacket::parse(chain, size, mem)
                .and_then(|p| p.hdr.check_from_guest(cid).map(|()| p))
            {
                Ok(pkt) => muxer.send_to_host(&pkt, mem),
                Err(e) => log::debug!("virtio-vsock: dropping a TX chain: {e}"),
            }
            Some(0)
        },
    )
}

/// Fills RX buffers while the host side has something for the guest.
fn process_rx(q: &mut Queue, mem: &GuestMemoryMmap, muxer: &mut Muxer) -> bool {
    if !muxer.has_rx_work() {
        return false;
    }
    let work = std::cell::Cell::new(true);
    let muxer = std::cell::RefCell::new(muxer);
    drain_queue(
        q,
        mem,
        "rx",
        || work.get() && muxer.borrow().has_rx_work(),
        |chain, size| match RxBuffer::parse(chain, size) {
            Ok(buf) => {
                let res = muxer.borrow_mut().recv_for_guest(&buf, mem);
                if res.is_none() {
                    work.set(false);
                }
                res
            }
            Err(e) => {
                log::debug!("virtio-vsock: dropping an RX chain: {e}");
                Some(0)
            }
        },
    )
}

/// Puts a transport-reset event into an event buffer. `Some(true)` if delivered, `Some(false)` if
/// a bad buffer was consumed without it (the event is then dropped: the driver broke its queue),
/// `None` if no buffer is available.
fn deliver_reset(q: &mut Queue, mem: &GuestMemoryMmap) -> Option<bool> {
    let chain = q.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let mut len = 0;
    let mut ok = false;
    for d in chain {
        if d.is_write_only() && d.len() >= 4 {
            if mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                .is_ok()
            {
                len = 4;
                ok = true;
            }
            break;
        }
    }
    if !ok {
        log::debug!("virtio-vsock: unusable event buffer; transport reset not delivered");
    }
    if let Err(e) = q.add_used(mem, head, len) {
        log::warn!("virtio-vsock: event: cannot return chain {head}: {e}");
    }
    Some(ok)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.guest_cid().to_le_bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-vsock: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::BadQueue(queues.len().min(3)));
        }
        if let Some(i) = queues.iter().position(|q| !q.queue.ready()) {
            return Err(ActivateError::BadQueue(i));
        }
        if self.active.is_some() {
            self.reset();
        }
        let event_idx = self.acked_features & features::EVENT_IDX != 0;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        debug_assert_eq!((RX_QUEUE, EVENT_QUEUE), (0, 2));
        self.queues = queues;
        self.active = Some(Active { mem, interrupt });
        // The VMM thread registers the notifiers and then processes every queue once: buffers
        // made available before activation (a restore) would otherwise wait for a notification
        // that already happened (Firecracker issue #5969).
        self.kick_control();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset_connections();
        self.pending_reset_event = false;
        if self.registered {
            self.retired
                .extend(self.queues.drain(..).map(|q: DeviceQueue| q.notify));
            self.registered = false;
            self.kick_control();
        } else {
            self.queues.clear();
        }
        self.acked_features = 0;
    }

    fn queue_states(&self) -> Vec<QueueSnapshot> {
        self.queues
            .iter()
            .map(|q| QueueSnapshot::from(q.queue.state()))
            .collect()
    }

    fn save_state(&self) -> Result<serde_json::Value, DeviceStateError> {
        serde_json::to_value(self.state()).map_err(DeviceStateError::Format)
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceStateError> {
        let saved: VsockState =
            serde_json::from_value(state.clone()).map_err(DeviceStateError::Format)?;
        if self.active.is_some() {
            return Err(DeviceStateError::Busy("virtio-vsock is activated".into()));
        }
        saved.check_fits(self.guest_cid(), self.avail_features)
    }
}
