//! The virtio-fs device: configuration, activation (a fresh FUSE server per activation), serving
//! the queues, and the state a snapshot reads.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{Opcode, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{self, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::filesystem::ShareFs;
use super::guard::{self, Verdict};
use super::{
    features, FS_DEVICE_ID, HIPRIO_QUEUE_SIZE, NUM_REQUEST_QUEUES, REQUEST_QUEUE_SIZE, TAG_LEN,
};
use crate::devices::virtio::{
    ActivateError, DeviceQueue, DeviceStateError, Interrupt, QueueSnapshot, VirtioDevice,
};

/// How much the guest may cache (the passthrough's cache policy, and the entry and attribute
/// timeouts that go with it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CachePolicy {
    /// Nothing: every read goes to the host (direct I/O), names and attributes expire at once.
    /// For shares the host changes under the guest.
    None,
    /// Close-to-open: file data cached while open, names and attributes for one second.
    #[default]
    Auto,
    /// Everything, for a day: for shares nothing but this guest changes (read-only image layers).
    Always,
}

impl CachePolicy {
    fn passthrough(self) -> passthrough::CachePolicy {
        match self {
            CachePolicy::None => passthrough::CachePolicy::Never,
            CachePolicy::Auto => passthrough::CachePolicy::Auto,
            CachePolicy::Always => passthrough::CachePolicy::Always,
        }
    }

    fn timeout(self) -> Duration {
        match self {
            CachePolicy::None => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86_400),
        }
    }
}

impl std::str::FromStr for CachePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" | "never" => Ok(CachePolicy::None),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            _ => Err(format!("cache policy {s:?}: expected none, auto or always")),
        }
    }
}

/// What to share and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The name the guest mounts (`mount -t virtiofs TAG /mnt`): 1 to 36 bytes, no NUL.
    pub tag: String,
    /// The host directory shared; nothing outside it is reachable.
    pub shared_dir: PathBuf,
    /// Refuse every change (EROFS) and open files read-only on the host.
    pub read_only: bool,
    /// What the guest may cache.
    pub cache: CachePolicy,
    /// Serve extended attributes (ENOSYS otherwise, which the guest kernel then stops asking).
    pub xattr: bool,
}

/// Errors making a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty.
    #[error("virtio-fs tag is empty")]
    EmptyTag,
    /// The tag does not fit the configuration space.
    #[error("virtio-fs tag {tag:?} is {len} bytes, longer than {TAG_LEN}")]
    TagTooLong {
        /// The tag.
        tag: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The tag holds a NUL byte.
    #[error("virtio-fs tag {0:?} holds a NUL byte")]
    TagNul(String),
    /// The shared directory cannot be reached.
    #[error("virtio-fs shared directory {}", path.display())]
    SharedDir {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The shared path is not a directory.
    #[error("virtio-fs shared directory {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The control eventfd.
    #[error("virtio-fs: cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

/// The device's state as read out: its settings, the negotiated features and the queues. The
/// share's contents and the FUSE server's inode table are not in it (see [`Fs`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsState {
    /// The tag.
    pub tag: String,
    /// Read-only mode.
    pub read_only: bool,
    /// Cache policy.
    pub cache: CachePolicy,
    /// Extended attributes served.
    pub xattr: bool,
    /// Request queues (besides the high-priority one).
    pub num_request_queues: u32,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the driver activated the device.
    pub activated: bool,
    /// The live queues (empty unless activated).
    pub queues: Vec<QueueSnapshot>,
}

pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    server: Server<ShareFs>,
    /// The guest sent INIT: it holds nodeids a fresh server would not know.
    mounted: bool,
}

/// A virtio-fs device sharing one host directory.
///
/// Snapshots: [`VirtioDevice::save_state`] refuses while the guest has the share mounted (FUSE
/// INIT seen since activation, no DESTROY after it), because the passthrough inode table (guest
/// nodeids to host fds) cannot be written out, and a restored guest would send nodeids that a new
/// server does not know or maps to other files. Templates are taken before the share is mounted.
pub struct Fs {
    config: FsConfig,
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
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("config", &self.config)
            .field("acked_features", &self.acked_features)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Fs {
    /// A device for `config`; the shared directory is resolved now (symlinks in its path
    /// followed once, here) and opened when the driver activates the device.
    pub fn new(mut config: FsConfig) -> Result<Fs, FsError> {
        let len = config.tag.len();
        if len == 0 {
            return Err(FsError::EmptyTag);
        }
        if len > TAG_LEN {
            return Err(FsError::TagTooLong {
                tag: config.tag,
                len,
            });
        }
        if config.tag.contains('\0') {
            return Err(FsError::TagNul(config.tag));
        }
        let dir = config
            .shared_dir
            .canonicalize()
            .map_err(|source| FsError::SharedDir {
                path: config.shared_dir.clone(),
                source,
            })?;
        if !dir.is_dir() {
            return Err(FsError::NotADirectory(config.shared_dir));
        }
        config.shared_dir = dir;
        Ok(Fs {
            config,
            avail_features: features::EVENT_IDX | features::INDIRECT_DESC,
            acked_features: 0,
            control: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(FsError::EventFd)?,
            queues: Vec::new(),
            retired: Vec::new(),
            registered: false,
            active: None,
        })
    }

    /// The configuration (with the shared directory resolved).
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The shared directory, resolved.
    pub fn shared_dir(&self) -> &Path {
        &self.config.shared_dir
    }

    /// Whether the guest has the share mounted (FUSE INIT seen, no DESTROY since).
    pub fn mounted(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.mounted)
    }

    /// The configuration space: the tag, NUL-padded, then `num_request_queues` (le32).
    pub fn config_space(&self) -> [u8; TAG_LEN + 4] {
        let mut b = [0u8; TAG_LEN + 4];
        let tag = self.config.tag.as_bytes();
        b[..tag.len()].copy_from_slice(tag);
        b[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        b
    }

    /// The device state; meaningful while the VM is paused (the queues move otherwise).
    pub fn state(&self) -> FsState {
        FsState {
            tag: self.config.tag.clone(),
            read_only: self.config.read_only,
            cache: self.config.cache,
            xattr: self.config.xattr,
            num_request_queues: NUM_REQUEST_QUEUES,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            activated: self.active.is_some(),
            queues: self.queue_states(),
        }
    }

    fn make_server(&self) -> io::Result<Server<ShareFs>> {
        let c = &self.config;
        let root_dir = c
            .shared_dir
            .to_str()
            .ok_or_else(|| io::Error::other("shared directory path is not UTF-8"))?
            .to_owned();
        let cfg = passthrough::Config {
            root_dir,
            xattr: c.xattr,
            cache_policy: c.cache.passthrough(),
            entry_timeout: c.cache.timeout(),
            attr_timeout: c.cache.timeout(),
            // Import the root at INIT, and keep the passthrough's own name checks (it skips
            // them when it believes a VFS layer above it did them).
            do_import: true,
            writeback: false,
            // Inodes are held as O_PATH fds, never as file handles a guest could name.
            inode_file_handles: false,
            ..Default::default()
        };
        let fs = PassthroughFs::<()>::new(cfg)?;
        Ok(Server::new(ShareFs::new(fs, c.read_only)))
    }

    fn kick_control(&self) {
        if let Err(e) = self.control.write(1) {
            log::error!("virtio-fs: cannot wake the event loop: {e}");
        }
    }

    /// Serves every available request on every queue, then interrupts the driver once if any
    /// queue it wants to hear about moved.
    pub fn process_queues(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let read_only = self.config.read_only;
        let mut notify = false;
        for (i, dq) in self.queues.iter_mut().enumerate() {
            let used = serve_queue(active, &mut dq.queue, read_only, i);
            // With EVENT_IDX the driver says which used index it wants to hear about.
            notify |= used && dq.queue.needs_notification(&active.mem).unwrap_or(true);
        }
        if notify {
            if let Err(e) = active.interrupt.signal_used_ring() {
                log::error!("virtio-fs: cannot signal the used ring: {e}");
            }
        }
    }
}

/// Serves one queue until it is empty; returns whether any chain was returned.
fn serve_queue(
    active: &mut Active,
    q: &mut virtio_queue::Queue,
    read_only: bool,
    index: usize,
) -> bool {
    let mem = active.mem.clone();
    let mut used = false;
    let mut idle_rounds = 0;
    loop {
        if let Err(e) = q.disable_notification(&mem) {
            log::warn!("virtio-fs: queue {index}: cannot disable notifications: {e}");
            break;
        }
        let mut progressed = false;
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            progressed = true;
            let head = chain.head_index();
            let len = serve(active, &mem, chain, q.size(), read_only);
            match q.add_used(&mem, head, len) {
                Ok(()) => used = true,
                Err(e) => log::warn!("virtio-fs: queue {index}: cannot return chain {head}: {e}"),
            }
        }
        match q.enable_notification(&mem) {
            Ok(false) => break,
            Ok(true) => {
                // More work arrived, or the available index is more than a queue ahead of us,
                // which the queue refuses to pop: a second round without progress tells the two
                // apart without spinning forever on a hostile index.
                idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
                if idle_rounds > 1 {
                    log::warn!("virtio-fs: queue {index}: available index is invalid; stalled");
                    break;
                }
            }
            Err(e) => {
                log::warn!("virtio-fs: queue {index}: cannot enable notifications: {e}");
                break;
            }
        }
    }
    used
}

/// Serves one chain; returns the bytes written into it (the used length).
fn serve(
    active: &mut Active,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    queue_size: u16,
    read_only: bool,
) -> u32 {
    // Guest-triggered problems are logged at debug level, so a hostile guest cannot flood the
    // host log.
    let opcode = match guard::check(mem, chain.clone(), queue_size, read_only) {
        Verdict::Drop(e) => {
            log::debug!("virtio-fs: dropping a chain: {e}");
            return 0;
        }
        Verdict::Reply { unique, errno } => return reply_error(mem, chain, unique, errno),
        Verdict::Serve { opcode } => opcode,
    };
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("virtio-fs: dropping a chain: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => Writer::VirtioFs(w),
        Err(e) => {
            log::debug!("virtio-fs: dropping a chain: {e}");
            return 0;
        }
    };
    let res = active.server.handle_message(reader, writer, None, None);
    if opcode == Opcode::Init as u32 {
        active.mounted = true;
    } else if opcode == Opcode::Destroy as u32 {
        active.mounted = false;
    }
    match res {
        // A reply is at most the chain's writable length, which fits a u32.
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(e) => {
            log::debug!("virtio-fs: request (opcode {opcode}) failed without a reply: {e}");
            0
        }
    }
}

/// Writes an error reply for request `unique`; returns its length (0 if it cannot be written).
fn reply_error(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    unique: u64,
    errno: i32,
) -> u32 {
    let header = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    let written = VirtioFsWriter::new(mem, chain)
        .map_err(|e| e.to_string())
        .and_then(|mut w| w.write_obj(header).map_err(|e| e.to_string()));
    match written {
        Ok(()) => header.len,
        Err(e) => {
            log::debug!("virtio-fs: cannot write an error reply: {e}");
            0
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        FS_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The configuration space is read-only for the driver (virtio 1.2, 5.11.4).
        log::debug!(
            "virtio-fs: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        let want = self.queue_max_sizes().len();
        if queues.len() != want {
            return Err(ActivateError::BadQueue(queues.len().min(want)));
        }
        if let Some(i) = queues.iter().position(|q| !q.queue.ready()) {
            return Err(ActivateError::BadQueue(i));
        }
        if self.active.is_some() {
            self.reset();
        }
        let server = self
            .make_server()
            .map_err(|e| ActivateError::Device(format!("virtio-fs: FUSE server: {e}")))?;
        let event_idx = self.acked_features & features::EVENT_IDX != 0;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        self.queues = queues;
        self.active = Some(Active {
            mem,
            interrupt,
            server,
            mounted: false,
        });
        self.kick_control();
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the server closes every host fd it held (inodes, open files, directories).
        self.active = None;
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
        if self.mounted() {
            return Err(DeviceStateError::Busy(format!(
                "virtio-fs {:?} is mounted: its inode table cannot be saved; \
                 snapshot before the guest mounts the share",
                self.config.tag
            )));
        }
        serde_json::to_value(self.state()).map_err(DeviceStateError::Format)
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceStateError> {
        let saved: FsState =
            serde_json::from_value(state.clone()).map_err(DeviceStateError::Format)?;
        if self.active.is_some() {
            return Err(DeviceStateError::Busy("virtio-fs is activated".into()));
        }
        let now = self.state();
        let fits = saved.tag == now.tag
            && saved.read_only == now.read_only
            && saved.cache == now.cache
            && saved.xattr == now.xattr
            && saved.num_request_queues == now.num_request_queues
            && saved.avail_features == now.avail_features;
        if !fits {
            return Err(DeviceStateError::Mismatch(format!(
                "virtio-fs was tag={:?} read-only={} cache={:?} xattr={} queues={} \
                 features={:#x}; this device is tag={:?} read-only={} cache={:?} xattr={} \
                 queues={} features={:#x}",
                saved.tag,
                saved.read_only,
                saved.cache,
                saved.xattr,
                saved.num_request_queues,
                saved.avail_features,
                now.tag,
                now.read_only,
                now.cache,
                now.xattr,
                now.num_request_queues,
                now.avail_features
            )));
        }
        Ok(())
    }
}
