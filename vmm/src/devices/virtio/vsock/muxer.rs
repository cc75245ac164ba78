//! The host side of the device: the listening unix socket, host streams still sending their
//! CONNECT line, the bridged connections by port pair, and the order in which they get RX buffers.
//!
//! All host sockets live in a private epoll set whose one fd the device registers with the VMM's
//! event loop (as Firecracker's muxer does): connections come and go from queue processing, from
//! a transport reset or from a reset by the driver without touching the VMM's registrations.
//! Sockets are level-triggered and registered only while the connection wants something of them
//! (see [`Connection::interest`]), so data the guest cannot take yet stays in the socket without
//! waking the loop. Deadlines (CONNECT line, guest RESPONSE, clean close) are swept by a timer.

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, ConnectionError, State};
use super::handshake::{ConnectRequest, Handshake};
use super::packet::{Header, RxBuffer, TxPacket};
use super::{op, FIRST_LOCAL_PORT, HOST_CID, MAX_CONNECTIONS, TYPE_STREAM};
use crate::memory::GuestRamMap;

/// Longest unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
pub const MAX_PATH_LEN: usize = 107;

/// RSTs for unknown connections waiting for RX buffers; more are dropped (the guest's own
/// timeouts cover a lost one).
const MAX_PENDING_RSTS: usize = 256;

const LISTENER: u64 = 0;
const TIMER: u64 = 1;

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The CID is reserved.
    #[error("vsock guest CID {0} is reserved (guest CIDs are 3 to 2^32 - 2)")]
    ReservedCid(u64),
    /// An empty socket path.
    #[error("vsock socket path is empty")]
    EmptyPath,
    /// The socket path does not fit `sun_path` (guest connections also need room for `_<port>`).
    #[error("vsock socket path {path:?} is {len} bytes, more than the {MAX_PATH_LEN} a unix socket path can have")]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Something that is not a socket is in the way.
    #[error("vsock socket path {0:?} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process listens on the path.
    #[error("vsock socket path {0:?} is in use by another listener")]
    InUse(PathBuf),
    /// Binding or setting up the listener failed.
    #[error("vsock socket {path:?}: cannot {what}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The private epoll set or timer.
    #[error("vsock: cannot create its {0}")]
    Setup(&'static str, #[source] io::Error),
}

/// Deadlines; the defaults suit production, tests shorten them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// For a host stream to send its CONNECT line.
    pub handshake: Duration,
    /// For the guest to answer a host-initiated REQUEST.
    pub connect: Duration,
    /// For a connection to finish closing once a side shut down.
    pub close: Duration,
    /// How often deadlines are checked.
    pub tick: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(5),
            connect: Duration::from_secs(2),
            close: Duration::from_secs(8),
            tick: Duration::from_millis(250),
        }
    }
}

/// The host side.
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we bound, so that drop removes only our own.
    listener_id: (u64, u64),
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Connections at once (bridged, being set up, or sending their CONNECT line).
    pub max_connections: usize,
    handshakes: HashMap<u64, (Handshake, Instant)>,
    conns: HashMap<u64, Connection>,
    /// Interest registered in the epoll set per connection token (absent: not registered).
    registered: HashMap<u64, EventSet>,
    by_ports: HashMap<(u32, u32), u64>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    next_token: u64,
    rx_ready: VecDeque<u64>,
    in_rx_ready: HashSet<u64>,
    rsts: VecDeque<Header>,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("path", &self.path)
            .field("connections", &self.conns.len())
            .field("handshakes", &self.handshakes.len())
            .finish()
    }
}

/// Binds `path`, refusing one another listener holds; a stale socket file (nobody listening) is
/// replaced.
fn bind(path: &Path) -> Result<(UnixListener, (u64, u64)), MuxerError> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(MuxerError::EmptyPath);
    }
    if len > MAX_PATH_LEN {
        return Err(MuxerError::PathTooLong {
            path: path.into(),
            len,
        });
    }
    let listen_err = |what, source| MuxerError::Listen {
        path: path.into(),
        what,
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(MuxerError::NotASocket(path.into()));
        }
        match UnixStream::connect(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| listen_err("remove a stale socket", e))?;
            }
            _ => return Err(MuxerError::InUse(path.into())),
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| listen_err("bind", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| listen_err("make it nonblocking", e))?;
    let meta = std::fs::metadata(path).map_err(|e| listen_err("stat", e))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// A nonblocking connect to a unix socket: a listener with a full backlog (EAGAIN) counts as a
/// refusal rather than stalling the VMM thread.
fn connect(path: &OsString) -> io::Result<UnixStream> {
    let addr = SocketAddrUnix::new(path.as_os_str())?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &addr)?;
    Ok(UnixStream::from(fd))
}

impl Muxer {
    /// Binds the listener at `path` for the guest with `guest_cid`.
    pub fn new(guest_cid: u64, path: &Path) -> Result<Muxer, MuxerError> {
        if guest_cid < super::MIN_GUEST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(MuxerError::ReservedCid(guest_cid));
        }
        let (listener, listener_id) = bind(path)?;
        let m = Muxer {
            guest_cid,
            path: path.into(),
            listener,
            listener_id,
            epoll: Epoll::new().map_err(|e| MuxerError::Setup("epoll set", e))?,
            timer: TimerFd::new().map_err(|e| MuxerError::Setup("timer", e.into()))?,
            timer_armed: false,
            timeouts: Timeouts::default(),
            max_connections: MAX_CONNECTIONS,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            registered: HashMap::new(),
            by_ports: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            next_token: 2,
            rx_ready: VecDeque::new(),
            in_rx_ready: HashSet::new(),
            rsts: VecDeque::new(),
        };
        let listener_fd = m.listener.as_raw_fd();
        let timer_fd = m.timer.as_raw_fd();
        m.ctl(ControlOperation::Add, listener_fd, EventSet::IN, LISTENER)
            .map_err(|e| MuxerError::Setup("epoll registration", e))?;
        m.ctl(ControlOperation::Add, timer_fd, EventSet::IN, TIMER)
            .map_err(|e| MuxerError::Setup("epoll registration", e))?;
        Ok(m)
    }

    /// The listening socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The guest CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The epoll fd to watch: readable when a host socket or deadline needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Bridged connections (and ones being set up).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Connections the guest side knows of: bridged, being set up, or owed an RST.
    pub fn guest_side_count(&self) -> usize {
        self.conns.len() + self.rsts.len()
    }

    /// Host streams still sending their CONNECT line.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(events, token))
    }

    fn ensure_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let tick = self.timeouts.tick;
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => crate::guest_error!("virtio-vsock: cannot arm the deadline timer: {e}"),
        }
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Serves whatever the private epoll set reports, without blocking.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::guest_error!("virtio-vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let set = ev.event_set();
                match ev.data() {
                    LISTENER => self.accept(),
                    TIMER => self.sweep(),
                    t => self.socket_event(t, set),
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: leave the rest in the backlog for the next wake-up.
                    crate::guest_warn!("virtio-vsock: accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() + self.handshakes.len() >= self.max_connections {
                crate::guest_warn!(
                    "virtio-vsock: connection limit reached; closing a host connection"
                );
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                crate::guest_warn!("virtio-vsock: cannot make a host stream nonblocking: {e}");
                continue;
            }
            let token = self.token();
            if let Err(e) = self.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EventSet::IN,
                token,
            ) {
                crate::guest_warn!("virtio-vsock: cannot watch a host stream: {e}");
                continue;
            }
            let deadline = Instant::now() + self.timeouts.handshake;
            self.handshakes
                .insert(token, (Handshake::new(stream), deadline));
            self.ensure_timer();
        }
    }

    fn socket_event(&mut self, token: u64, set: EventSet) {
        if let Some((hs, _)) = self.handshakes.get_mut(&token) {
            match hs.poll() {
                Ok(None) => {}
                Ok(Some(req)) => self.host_connect(token, req),
                Err(e) => {
                    log::debug!("virtio-vsock: closing a host connection: {e}");
                    self.drop_handshake(token);
                }
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let hup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if set.contains(EventSet::OUT) || hup {
            conn.on_writable();
        }
        if set.contains(EventSet::IN) || hup {
            conn.on_readable();
        }
        self.update(token);
    }

    fn drop_handshake(&mut self, token: u64) -> Option<Handshake> {
        let (hs, _) = self.handshakes.remove(&token)?;
        let _ = self.ctl(
            ControlOperation::Delete,
            hs.stream.as_raw_fd(),
            EventSet::empty(),
            token,
        );
        Some(hs)
    }

    /// A complete CONNECT line: a new connection with a REQUEST for the guest.
    fn host_connect(&mut self, token: u64, req: ConnectRequest) {
        let Some(hs) = self.drop_handshake(token) else {
            return;
        };
        let Some(local_port) = self.allocate_port(req.port) else {
            crate::guest_warn!("virtio-vsock: no free host port; closing a host connection");
            return;
        };
        let deadline = Instant::now() + self.timeouts.connect;
        let conn = Connection::host_initiated(
            hs.stream,
            local_port,
            req.port,
            self.guest_cid,
            req.early_data,
            deadline,
        );
        self.insert(conn);
        self.ensure_timer();
    }

    fn allocate_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.local_ports.contains(&p) && !self.by_ports.contains_key(&(p, peer_port)) {
                self.local_ports.insert(p);
                return Some(p);
            }
        }
        None
    }

    fn insert(&mut self, conn: Connection) {
        let token = self.token();
        self.by_ports
            .insert((conn.local_port, conn.peer_port), token);
        self.conns.insert(token, conn);
        self.update(token);
    }

    /// After anything happened to a connection: its epoll interest, its place in the RX order,
    /// its deadline, and its removal once done.
    fn update(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.is_done() {
            self.remove(token);
            return;
        }
        if conn.closing() && conn.deadline.is_none() {
            conn.deadline = Some(Instant::now() + self.timeouts.close);
            self.ensure_timer();
        }
        let conn = &self.conns[&token];
        let want = conn.interest();
        let fd = conn.stream.as_fd().as_raw_fd();
        let has_rx = conn.has_rx_work();
        let had = self.registered.get(&token).copied();
        let res = match (had, want.is_empty()) {
            (None, true) => Ok(()),
            (None, false) => self.ctl(ControlOperation::Add, fd, want, token),
            (Some(_), true) => self.ctl(ControlOperation::Delete, fd, want, token),
            (Some(h), false) if h == want => Ok(()),
            (Some(_), false) => self.ctl(ControlOperation::Modify, fd, want, token),
        };
        match res {
            Ok(()) if want.is_empty() => {
                self.registered.remove(&token);
            }
            Ok(()) => {
                self.registered.insert(token, want);
            }
            Err(e) => crate::guest_warn!("virtio-vsock: cannot update a host socket's events: {e}"),
        }
        if has_rx && self.in_rx_ready.insert(token) {
            self.rx_ready.push_back(token);
        }
    }

    fn remove(&mut self, token: u64) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        if self.registered.remove(&token).is_some() {
            let _ = self.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EventSet::empty(),
                token,
            );
        }
        self.by_ports.remove(&(conn.local_port, conn.peer_port));
        self.local_ports.remove(&conn.local_port);
        self.in_rx_ready.remove(&token);
        // A stale token in `rx_ready` is skipped when reached.
    }

    /// Deadlines: unfinished CONNECT lines are closed, connections reset.
    fn sweep(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            log::debug!("virtio-vsock: no CONNECT line in time; closing a host connection");
            self.drop_handshake(t);
        }
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now) && c.state() != State::Killed)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            if let Some(c) = self.conns.get_mut(&t) {
                c.kill(&ConnectionError::Timeout);
            }
            self.update(t);
        }
        let pending = !self.handshakes.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.deadline.is_some() && c.state() != State::Killed);
        if !pending {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    fn rst_for(&mut self, hdr: &Header) {
        if self.rsts.len() >= MAX_PENDING_RSTS {
            log::debug!("virtio-vsock: too many pending RSTs; dropping one");
            return;
        }
        self.rsts.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// A checked packet from the guest (addressing already verified).
    pub fn send_to_host(&mut self, pkt: &TxPacket, mem: &GuestRamMap) {
        let hdr = &pkt.hdr;
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(&token) = self.by_ports.get(&key) {
            if let Some(conn) = self.conns.get_mut(&token) {
                conn.on_packet(pkt, mem);
            }
            self.update(token);
            return;
        }
        match hdr.op {
            op::REQUEST => self.guest_connect(hdr),
            // Nothing to reset.
            op::RST => {}
            op::RESPONSE | op::RW | op::SHUTDOWN | op::CREDIT_UPDATE | op::CREDIT_REQUEST => {
                self.rst_for(hdr)
            }
            other => log::debug!("virtio-vsock: ignoring op {other} for no connection"),
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() + self.handshakes.len() >= self.max_connections {
            log::debug!("virtio-vsock: connection limit reached; refusing a guest connection");
            return self.rst_for(hdr);
        }
        let mut path = self.path.as_os_str().to_owned();
        path.push(format!("_{}", hdr.dst_port));
        match connect(&path) {
            Ok(stream) => {
                let conn = Connection::guest_initiated(stream, hdr, self.guest_cid);
                self.insert(conn);
            }
            Err(e) => {
                log::debug!("virtio-vsock: guest connection to {path:?} refused: {e}");
                self.rst_for(hdr);
            }
        }
    }

    /// Whether anything waits for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_ready.is_empty()
    }

    /// Connections, handshakes and what waits for RX buffers, in a few words.
    pub fn report(&self) -> String {
        let established = self
            .conns
            .values()
            .filter(|c| c.state() == State::Established)
            .count();
        let with_rx = self.conns.values().filter(|c| c.has_rx_work()).count();
        let buffered: usize = self.conns.values().map(Connection::buffered).sum();
        format!(
            "{} connections ({established} established, {with_rx} with data or control for the \
             guest, {buffered} guest bytes the host has not taken), {} handshakes, {} in the RX \
             line, {} RSTs waiting",
            self.conns.len(),
            self.handshakes.len(),
            self.rx_ready.len(),
            self.rsts.len()
        ) + &self
            .conns
            .values()
            .map(|c| format!("; {}", c.report()))
            .collect::<String>()
    }

    /// Puts the next packet for the guest into `buf`, connections taking turns; returns the
    /// bytes written, or `None` when nothing is due.
    pub fn recv_for_guest(&mut self, buf: &RxBuffer, mem: &GuestRamMap) -> Option<u32> {
        if let Some(hdr) = self.rsts.pop_front() {
            return Some(buf.write_header(mem, &hdr).unwrap_or_else(|e| {
                crate::guest_warn!("virtio-vsock: cannot write a header: {e}");
                0
            }));
        }
        // Each connection gets one try: one with nothing after all is not queued again.
        for _ in 0..self.rx_ready.len() {
            let Some(token) = self.rx_ready.pop_front() else {
                break;
            };
            if !self.in_rx_ready.remove(&token) {
                continue;
            }
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            let res = conn.fill(buf, mem);
            // Back in line (at the end) if it has more.
            self.update(token);
            if res.is_some() {
                return res;
            }
        }
        None
    }

    /// Drops every connection (a transport reset or a device reset); the listener and host
    /// streams still sending their CONNECT line stay.
    pub fn reset_connections(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            if let Some(c) = self.conns.get_mut(&t) {
                c.guest_reset();
            }
            self.remove(t);
        }
        self.rx_ready.clear();
        self.in_rx_ready.clear();
        self.rsts.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Remove the socket file only if it is still the one we bound.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.listener_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}
