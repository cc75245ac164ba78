//! The vsock device: configuration space (the guest CID), feature negotiation, activation, the
//! three queues, and the transport-reset event.
//!
//! One processing pass serves the TX queue completely (TX never waits: guest data the host cannot
//! take is buffered within the credit the guest was given), delivers a pending transport reset on
//! the event queue, fills RX buffers while connections have something for the guest (rewinding the
//! one buffer it could not use), and then interrupts the driver once, if it wants it (EVENT_IDX).

use std::io;
use std::path::Path;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::muxer::{Muxer, MuxerError, Timeouts};
use super::packet::{RxBuffer, TxPacket};
use super::persist::VsockState;
use super::{
    features, EVENT_QUEUE, EVENT_TRANSPORT_RESET, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VSOCK_DEVICE_ID,
};
use crate::devices::virtio::common::{needs_interrupt, serve_queue};
use crate::devices::virtio::{read_config_space, DeviceStateError, VirtioCommon, VirtioDevice};
use crate::memory::GuestRamMap;

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

/// A virtio-vsock device bridging guest streams to host unix sockets.
#[derive(Debug)]
pub struct Vsock {
    pub(super) muxer: Muxer,
    pub(super) common: VirtioCommon,
    /// A transport reset waiting for an event-queue buffer.
    pending_reset_event: bool,
    /// Whether the guest may hold connections this device does not know (restored from a
    /// state whose host side had some): then its restore resets the transport.
    reset_on_restore: bool,
}

impl Vsock {
    /// A device for the guest with `guest_cid` (3 or more), listening on the unix socket
    /// `uds_path` (refused if another listener holds it, or if it does not fit `sun_path`; a stale
    /// socket file is replaced). Guest connections to host port P go to `<uds_path>_P`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        let muxer = Muxer::new(guest_cid, uds_path)?;
        Ok(Vsock {
            muxer,
            common: VirtioCommon::new("virtio-vsock", &[QUEUE_SIZE; 3], features::EVENT_IDX)
                .map_err(VsockError::EventFd)?,
            pending_reset_event: false,
            reset_on_restore: true,
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
            avail_features: self.common.avail_features(),
            acked_features: self.common.acked_features(),
            activated: self.common.is_active(),
            queues: self.queue_states(),
            guest_connections: Some(self.muxer.guest_side_count() as u64),
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

    /// One processing pass over every queue and the host side's pending work.
    pub fn process_queues(&mut self) {
        let Some(active) = self.common.active_mut() else {
            return;
        };
        let mem = &active.mem;
        let [rx, tx, event] = &mut active.queues[..] else {
            return;
        };
        debug_assert_eq!((RX_QUEUE, TX_QUEUE, EVENT_QUEUE), (0, 1, 2));
        let (rxq, txq, evq) = (&mut rx.queue, &mut tx.queue, &mut event.queue);

        let used = process_tx(txq, mem, &mut self.muxer);
        let mut notify = needs_interrupt(txq, mem, used);
        if self.pending_reset_event {
            if let Some(used) = deliver_reset(evq, mem) {
                self.pending_reset_event = false;
                notify |= needs_interrupt(evq, mem, used);
            }
        }
        let used = process_rx(rxq, mem, &mut self.muxer);
        notify |= needs_interrupt(rxq, mem, used);
        if notify {
            active.signal_used_ring();
        }
    }

    /// Host sockets, listener and deadlines, then a processing pass.
    pub fn process_backend(&mut self) {
        self.muxer.process_events();
        self.process_queues();
    }
}

/// Serves every TX chain; a bad one is returned unused and logged (at debug level: a hostile guest
/// must not flood the host log).
fn process_tx(q: &mut Queue, mem: &GuestRamMap, muxer: &mut Muxer) -> bool {
    let cid = muxer.guest_cid();
    serve_queue(
        q,
        mem,
        "virtio-vsock tx",
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
fn process_rx(q: &mut Queue, mem: &GuestRamMap, muxer: &mut Muxer) -> bool {
    if !muxer.has_rx_work() {
        return false;
    }
    let work = std::cell::Cell::new(true);
    let muxer = std::cell::RefCell::new(muxer);
    serve_queue(
        q,
        mem,
        "virtio-vsock rx",
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
fn deliver_reset(q: &mut Queue, mem: &GuestRamMap) -> Option<bool> {
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
        crate::guest_warn!("virtio-vsock: event: cannot return chain {head}: {e}");
    }
    Some(ok)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_space(&self.guest_cid().to_le_bytes(), offset, data);
    }

    // activate: the default. The VMM thread registers the notifiers, then serves the host side
    // and every queue once (see `event_handler`).

    fn report(&self) -> String {
        format!(
            "{}; {}{}",
            self.common.report(),
            self.muxer.report(),
            if self.pending_reset_event {
                "; a transport reset waits for an event buffer"
            } else {
                ""
            }
        )
    }

    fn stop_backend(&mut self) {
        self.muxer.reset_connections();
        self.pending_reset_event = false;
    }

    // The guest's connections died with the snapshot's host side: it must drop them (its
    // listeners survive), or a guest-initiated connect would wait forever. A guest that had
    // none is left alone: the reset races the host's first connection (the guest handles its
    // event and RX queues in separate work items) and would kill it.
    fn restored(&mut self) {
        if self.reset_on_restore {
            self.send_transport_reset();
        }
    }

    fn open_connections(&self) -> usize {
        self.muxer.guest_side_count()
    }

    fn save_state(&self) -> Result<serde_json::Value, DeviceStateError> {
        serde_json::to_value(self.state()).map_err(DeviceStateError::Format)
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceStateError> {
        let saved: VsockState = self.common.saved_state(state)?;
        saved.check_fits(self.guest_cid(), self.common.avail_features())?;
        self.reset_on_restore = saved.guest_connections != Some(0);
        Ok(())
    }
}
