//! One bridged stream between a guest port and a host unix socket.
//!
//! Flow control (virtio 1.2, 5.10.6.3) both ways:
//! - guest to host: the device advertises [`CONN_BUF_ALLOC`] bytes of buffer and counts in
//!   `fwd_cnt` the guest bytes the host socket took. Payload is written straight from guest memory
//!   to the socket; only what the socket cannot take now is copied into `tx_buf`, which the
//!   guest's credit bounds (a guest overrunning it is reset). A CREDIT_UPDATE goes out once
//!   [`CREDIT_UPDATE_THRESHOLD`] forwarded bytes are unannounced (every packet carries the count).
//! - host to guest: the device never sends more than the guest's free space
//!   (`buf_alloc - (rx_cnt - fwd_cnt)`, from the guest's latest header) and reads the host socket
//!   straight into the guest's RX buffer, only when it has one: without RX buffers or credit, host
//!   data stays in the socket (back-pressure on the host writer).
//!
//! Half-close: the host's end of stream becomes SHUTDOWN(SEND) once all its data is in guest
//! buffers; the guest's SHUTDOWN(SEND) becomes `shutdown(Write)` once the buffered data reached the
//! socket. With both directions finished the device sends RST and forgets the connection.
//!
//! This module knows nothing of epoll or queues: it says what it wants ([`Connection::interest`],
//! [`Connection::has_rx_work`]) and the muxer arranges it.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, PacketError, RxBuffer, TxPacket};
use super::{op, shutdown, CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, HOST_CID, TYPE_STREAM};
use crate::memory::GuestRamMap;

/// Why a connection was reset by the device (logged; the guest gets RST).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Writing to the host socket failed.
    #[error("writing to the host socket: {0}")]
    HostWrite(#[source] io::Error),
    /// Reading from the host socket failed.
    #[error("reading from the host socket: {0}")]
    HostRead(#[source] io::Error),
    /// The guest sent more than the credit the device gave it.
    #[error("the guest overran its credit ({buffered} + {len} > {CONN_BUF_ALLOC})")]
    CreditOverrun {
        /// Bytes buffered.
        buffered: usize,
        /// Bytes in the packet.
        len: u32,
    },
    /// A packet the connection's state does not allow.
    #[error("op {op} in state {state:?}")]
    Protocol {
        /// The operation.
        op: u16,
        /// The state.
        state: State,
    },
    /// Guest memory failed under us.
    #[error("guest memory: {0}")]
    Memory(#[from] PacketError),
    /// A deadline passed (no RESPONSE, or no clean close).
    #[error("timed out")]
    Timeout,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: waiting for the guest's RESPONSE (or RST).
    LocalInit,
    /// Bridging.
    Established,
    /// Reset: RST to the guest is pending, then the connection goes.
    Killed,
}

/// Bytes waiting for the host socket, as the chunks they arrived in (one copy out of guest
/// memory, none on the way out: the chunks go to `writev` as they are).
#[derive(Debug, Default)]
struct TxBuf {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already written.
    front_off: usize,
    len: usize,
}

impl TxBuf {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, chunk: Vec<u8>) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    fn slices(&self) -> Vec<io::IoSlice<'_>> {
        self.chunks
            .iter()
            .take(16)
            .enumerate()
            .map(|(i, c)| io::IoSlice::new(if i == 0 { &c[self.front_off..] } else { c }))
            .collect()
    }

    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.len() - self.front_off;
            if n < left {
                self.front_off += n;
                return;
            }
            n -= left;
            self.front_off = 0;
            self.chunks.pop_front();
        }
    }
}

/// Control packets waiting for an RX buffer.
#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    request: bool,
    response: bool,
    rst: bool,
    shutdown_send: bool,
    credit_update: bool,
}

/// A bridged stream.
#[derive(Debug)]
pub struct Connection {
    /// The host side (nonblocking).
    pub stream: UnixStream,
    /// The host-side port (destination of the guest's packets).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    guest_cid: u64,
    state: State,
    pending: Pending,
    /// Set once the RST went out (or the guest reset it): the muxer removes the connection.
    done: bool,
    /// Kill the connection at this time (set while opening and while closing).
    pub deadline: Option<Instant>,

    // Guest to host.
    tx_buf: TxBuf,
    /// Bytes at the front of `tx_buf` that are not guest data (the `OK` line).
    tx_skip: usize,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    guest_shut: u32,
    host_write_shut: bool,

    // Host to guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    early_data: Vec<u8>,
    early_at: usize,
    host_readable: bool,
    host_eof: bool,
    shutdown_sent: bool,
    credit_requested: bool,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, guest_cid: u64) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state: State::LocalInit,
            pending: Pending::default(),
            done: false,
            deadline: None,
            tx_buf: TxBuf::default(),
            tx_skip: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_shut: 0,
            host_write_shut: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            early_data: Vec::new(),
            early_at: 0,
            host_readable: false,
            host_eof: false,
            shutdown_sent: false,
            credit_requested: false,
        }
    }

    /// A host-initiated connection: REQUEST to the guest is pending; `early_data` is host data
    /// read past the CONNECT line.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        early_data: Vec<u8>,
        deadline: Instant,
    ) -> Self {
        let mut c = Connection::new(stream, local_port, peer_port, guest_cid);
        c.pending.request = true;
        c.early_data = early_data;
        c.deadline = Some(deadline);
        c
    }

    /// A guest-initiated connection whose host socket connected: RESPONSE is pending.
    pub fn guest_initiated(stream: UnixStream, req: &Header, guest_cid: u64) -> Self {
        let mut c = Connection::new(stream, req.dst_port, req.src_port, guest_cid);
        c.state = State::Established;
        c.pending.response = true;
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        c
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the connection can go (RST sent or received).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Guest bytes buffered for the host socket.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len() - self.tx_skip
    }

    /// The guest's free receive space as last advertised, minus what was sent since.
    fn peer_free(&self) -> u32 {
        // A hostile fwd_cnt ahead of rx_cnt wraps to a huge in-flight count: no credit.
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn wants_host_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.guest_shut & shutdown::RCV == 0
    }

    /// Events wanted on the host socket (empty: take it out of the epoll set, so that a hang-up
    /// nobody waits for does not spin the loop).
    pub fn interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.state == State::Killed {
            return e;
        }
        if self.wants_host_data()
            && !self.host_readable
            && self.early_at >= self.early_data.len()
            && self.peer_free() > 0
        {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Whether [`Self::fill`] has something to put in an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        let p = &self.pending;
        if p.rst || p.request || p.response || p.shutdown_send || p.credit_update {
            return true;
        }
        if self.state != State::Established {
            return false;
        }
        let data =
            self.wants_host_data() && (self.host_readable || self.early_at < self.early_data.len());
        data && (self.peer_free() > 0 || !self.credit_requested)
    }

    /// Resets the connection: RST to the guest, host socket shut at once.
    pub fn kill(&mut self, why: &ConnectionError) {
        if self.state == State::Killed {
            return;
        }
        log::debug!(
            "virtio-vsock: resetting {}:{}: {why}",
            self.local_port,
            self.peer_port
        );
        self.state = State::Killed;
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
        self.tx_buf = TxBuf::default();
        self.tx_skip = 0;
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The guest reset the connection: it goes without a reply.
    pub fn guest_reset(&mut self) {
        self.state = State::Killed;
        self.pending = Pending::default();
        self.done = true;
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// A packet from the guest for this connection.
    pub fn on_packet(&mut self, pkt: &TxPacket, mem: &GuestRamMap) {
        let hdr = &pkt.hdr;
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if hdr.op == op::CREDIT_UPDATE {
            // A fresh credit ends a pending request for one.
            self.credit_requested = false;
        }
        if hdr.op == op::RST {
            return self.guest_reset();
        }
        if self.state == State::Killed {
            return;
        }
        let protocol = |state| ConnectionError::Protocol { op: hdr.op, state };
        match hdr.op {
            op::RESPONSE if self.state == State::LocalInit => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.push_host_bytes(line.as_bytes(), true);
            }
            op::RW if self.state == State::Established && self.guest_shut & shutdown::SEND == 0 => {
                if let Err(e) = self.forward(pkt, mem) {
                    self.kill(&e);
                }
            }
            op::SHUTDOWN if self.state == State::Established => {
                self.guest_shut |= hdr.flags & shutdown::BOTH;
                self.try_finish();
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.pending.credit_update = true,
            op::REQUEST | op::RESPONSE | op::RW | op::SHUTDOWN => self.kill(&protocol(self.state)),
            other => log::debug!("virtio-vsock: ignoring op {other}"),
        }
    }

    /// Guest payload to the host socket: straight from guest memory, buffering the rest.
    fn forward(&mut self, pkt: &TxPacket, mem: &GuestRamMap) -> Result<(), ConnectionError> {
        let len = pkt.hdr.len as usize;
        if len == 0 {
            return Ok(());
        }
        if self.buffered() + len > CONN_BUF_ALLOC as usize {
            return Err(ConnectionError::CreditOverrun {
                buffered: self.buffered(),
                len: pkt.hdr.len,
            });
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = match pkt.write_to(mem, 0, &mut self.stream) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(ConnectionError::HostWrite(e)),
            };
            self.forwarded(written);
        }
        if written < len {
            self.tx_buf.push(pkt.copy_out(mem, written)?);
        }
        Ok(())
    }

    /// Bytes for the host socket that are not guest data (`guest: false`) or are.
    fn push_host_bytes(&mut self, bytes: &[u8], control: bool) {
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match self.stream.write(bytes) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return self.kill(&ConnectionError::HostWrite(e)),
            }
        }
        if written < bytes.len() {
            if control {
                self.tx_skip += bytes.len() - written;
            }
            self.tx_buf.push(bytes[written..].to_vec());
        }
    }

    fn forwarded(&mut self, n: usize) {
        // Bounded by CONN_BUF_ALLOC per packet; the counter wraps by design.
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    /// The host socket is writable (or hung up): flush what is buffered.
    pub fn on_writable(&mut self) {
        while !self.tx_buf.is_empty() {
            let res = self.stream.write_vectored(&self.tx_buf.slices());
            match res {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.consume(n);
                    let control = n.min(self.tx_skip);
                    self.tx_skip -= control;
                    self.forwarded(n - control);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.kill(&ConnectionError::HostWrite(e)),
            }
        }
        self.try_finish();
    }

    /// The host socket is readable (or hung up).
    pub fn on_readable(&mut self) {
        if self.wants_host_data() {
            self.host_readable = true;
        }
    }

    /// Shuts what can be shut; resets the connection once both directions are finished.
    fn try_finish(&mut self) {
        if self.state != State::Established {
            return;
        }
        if self.guest_shut & shutdown::SEND != 0 && self.tx_buf.is_empty() && !self.host_write_shut
        {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        let to_host_done = self.host_write_shut;
        let to_guest_done =
            (self.host_eof && self.shutdown_sent) || self.guest_shut & shutdown::RCV != 0;
        if to_host_done && to_guest_done {
            // A clean close: RST is the protocol's last word, not an error.
            self.state = State::Killed;
            self.pending = Pending {
                rst: true,
                ..Pending::default()
            };
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }

    /// Whether only flushing is left before the connection ends (the guest closed both ways, or
    /// both sides finished sending), which a deadline bounds: a host that never reads would
    /// otherwise hold it forever. A half-closed connection still carrying data has no deadline.
    pub fn closing(&self) -> bool {
        self.state == State::Established
            && (self.guest_shut == shutdown::BOTH
                || (self.guest_shut & shutdown::SEND != 0 && self.host_eof))
    }

    fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The connection's flow state in a few words, for a report on a stuck guest.
    pub fn report(&self) -> String {
        format!(
            "{}:{} {:?} guest credit {} (alloc {}, sent {}, its fwd {}){}{}{}, {} bytes for the host, \
             pending {:?}",
            self.local_port,
            self.peer_port,
            self.state,
            self.peer_free(),
            self.peer_buf_alloc,
            self.rx_cnt,
            self.peer_fwd_cnt,
            if self.host_readable { ", host data waiting" } else { "" },
            if self.host_eof { ", host EOF" } else { "" },
            if self.credit_requested { ", credit requested" } else { "" },
            self.buffered(),
            self.pending,
        )
    }

    /// Puts the next packet for the guest into `buf`; returns the bytes written, or `None` when
    /// there is nothing to send.
    pub fn fill(&mut self, buf: &RxBuffer, mem: &GuestRamMap) -> Option<u32> {
        let hdr = self.next_packet(buf, mem)?;
        if hdr.op == op::RST {
            self.done = true;
        }
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        match buf.write_header(mem, &hdr) {
            Ok(n) => Some(n),
            Err(e) => {
                crate::guest_warn!("virtio-vsock: cannot write a header: {e}");
                Some(0)
            }
        }
    }

    fn next_packet(&mut self, buf: &RxBuffer, mem: &GuestRamMap) -> Option<Header> {
        if self.pending.rst {
            self.pending.rst = false;
            return Some(self.header(op::RST, 0, 0));
        }
        if self.pending.request {
            self.pending.request = false;
            return Some(self.header(op::REQUEST, 0, 0));
        }
        if self.pending.response {
            self.pending.response = false;
            return Some(self.header(op::RESPONSE, 0, 0));
        }
        if self.state == State::Established && self.wants_host_data() {
            let max = buf.capacity().min(self.peer_free());
            if self.early_at < self.early_data.len() {
                if max > 0 {
                    let end = self.early_data.len().min(self.early_at + max as usize);
                    if let Err(e) = buf.write_data(mem, &self.early_data[self.early_at..end]) {
                        self.kill(&e.into());
                        return self.next_packet(buf, mem);
                    }
                    let n = end - self.early_at;
                    self.early_at = end;
                    if self.early_at == self.early_data.len() {
                        self.early_data = Vec::new();
                        self.early_at = 0;
                        // Whatever else the host wrote is in the socket.
                        self.host_readable = true;
                    }
                    return Some(self.sent_data(n));
                }
            } else if self.host_readable && max > 0 {
                match buf.read_from(mem, &mut self.stream, max) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.host_readable = false;
                        self.pending.shutdown_send = true;
                    }
                    Ok(n) => {
                        if n < max as usize {
                            // Drained, most likely: let epoll say when there is more.
                            self.host_readable = false;
                        }
                        return Some(self.sent_data(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                    }
                    Err(e) => {
                        self.kill(&ConnectionError::HostRead(e));
                        return self.next_packet(buf, mem);
                    }
                }
            }
            let data_waiting = self.host_readable || self.early_at < self.early_data.len();
            if data_waiting && self.peer_free() == 0 && !self.credit_requested {
                self.credit_requested = true;
                return Some(self.header(op::CREDIT_REQUEST, 0, 0));
            }
        }
        if self.pending.shutdown_send {
            self.pending.shutdown_send = false;
            self.shutdown_sent = true;
            let hdr = self.header(op::SHUTDOWN, 0, shutdown::SEND);
            self.try_finish();
            return Some(hdr);
        }
        if self.pending.credit_update {
            return Some(self.header(op::CREDIT_UPDATE, 0, 0));
        }
        None
    }

    fn sent_data(&mut self, n: usize) -> Header {
        // At most the buffer's capacity, itself at most MAX_PKT_DATA.
        let n = n as u32;
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
        self.header(op::RW, n, 0)
    }
}
