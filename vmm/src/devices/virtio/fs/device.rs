//! The virtio-fs device: configuration, activation (a fresh FUSE server per activation), serving
//! the queues, and the state a snapshot reads.

use fuse_backend_rs::abi::fuse_abi::{Opcode, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{self, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use virtio_queue::DescriptorChain;

use super::filesystem::ShareFs;
use super::guard::{self, Verdict};
use super::ids::GuestIds;
use super::{
    features, FS_DEVICE_ID, HIPRIO_QUEUE_SIZE, NUM_REQUEST_QUEUES, REQUEST_QUEUE_SIZE, TAG_LEN,
};
use crate::devices::virtio::common::{needs_interrupt, serve_queue};
use crate::devices::virtio::{
    read_config_space, ActivateError, DeviceStateError, QueueSnapshot, VirtioCommon, VirtioDevice,
};
use crate::memory::GuestRamMap;

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
    /// The host ids the guest may create and own files as (see [`GuestIds`]).
    pub ids: GuestIds,
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

/// The FUSE session of one activation.
struct Session {
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
    pub(super) common: VirtioCommon,
    /// Present exactly while the queues are active.
    session: Option<Session>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("config", &self.config)
            .field("common", &self.common)
            .field("mounted", &self.mounted())
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
            common: VirtioCommon::new(
                "virtio-fs",
                &[HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE],
                features::EVENT_IDX | features::INDIRECT_DESC,
            )
            .map_err(FsError::EventFd)?,
            session: None,
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
        self.session.as_ref().is_some_and(|s| s.mounted)
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
            avail_features: self.common.avail_features(),
            acked_features: self.common.acked_features(),
            activated: self.common.is_active(),
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
            // When the guest caches everything, it need not open files or directories on the
            // host at all (FUSE_NO_OPEN_SUPPORT): a small-file read is one READ instead of
            // OPEN, READ, FLUSH and RELEASE. The passthrough allows it with this policy only.
            no_open: c.cache == CachePolicy::Always,
            no_opendir: c.cache == CachePolicy::Always,
            ..Default::default()
        };
        let fs = PassthroughFs::<()>::new(cfg)?;
        Ok(Server::new(ShareFs::new(fs, c.read_only, c.ids.clone())))
    }

    /// Serves every available request on every queue, then interrupts the driver once if any
    /// queue it wants to hear about moved.
    pub fn process_queues(&mut self) {
        let (Some(active), Some(session)) = (self.common.active_mut(), self.session.as_mut())
        else {
            return;
        };
        let read_only = self.config.read_only;
        let mut notify = false;
        for (i, dq) in active.queues.iter_mut().enumerate() {
            let mem = &active.mem;
            let what = if i == 0 {
                "virtio-fs hiprio"
            } else {
                "virtio-fs requests"
            };
            let used = serve_queue(
                &mut dq.queue,
                mem,
                what,
                || true,
                |chain, size| Some(serve(session, mem, chain, size, read_only)),
            );
            notify |= needs_interrupt(&mut dq.queue, mem, used);
        }
        if notify {
            active.signal_used_ring();
        }
    }
}

/// Serves one chain; returns the bytes written into it (the used length).
fn serve(
    session: &mut Session,
    mem: &GuestRamMap,
    chain: DescriptorChain<&GuestRamMap>,
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
    let res = session.server.handle_message(reader, writer, None, None);
    if opcode == Opcode::Init as u32 {
        session.mounted = true;
    } else if opcode == Opcode::Destroy as u32 {
        session.mounted = false;
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
    mem: &GuestRamMap,
    chain: DescriptorChain<&GuestRamMap>,
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

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    // write_config: the configuration space is read-only for the driver (virtio 1.2, 5.11.4);
    // the default ignores writes.

    fn start_backend(&mut self) -> Result<(), ActivateError> {
        // A fresh server per activation: a driver that reset the device starts from INIT.
        let server = self
            .make_server()
            .map_err(|e| ActivateError::Device(format!("virtio-fs: FUSE server: {e}")))?;
        self.session = Some(Session {
            server,
            mounted: false,
        });
        Ok(())
    }

    fn stop_backend(&mut self) {
        // Dropping the server closes every host fd it held (inodes, open files, directories).
        self.session = None;
    }

    fn state_key(&self) -> String {
        format!("fs:{}", self.config.tag)
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
        let saved: FsState = self.common.saved_state(state)?;
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
