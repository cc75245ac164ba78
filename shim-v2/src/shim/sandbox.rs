//! One sandbox: its host cgroup, its split rootfs, its microVM (in this process) and the agent in
//! it. Started in the order of DESIGN.md, torn down backwards; everything it takes on the host is
//! under `<run_dir>/<sandbox-id>/`, whose record is written first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest, Empty, RootfsOverlay,
};
use agent_protocol::client::connect_hybrid_vsock;
use agent_protocol::{storage, AgentClient, AGENT_VSOCK_PORT, GUEST_STORAGE_DIR};
use log::{debug, info, warn};
use oci_spec::runtime::Spec;
use rootfs_split::{RootfsMount, SandboxRootfs, Share, WritableLayer};
use templates::Template;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::fs::ids::TooManyIds;
use vmm::devices::virtio::fs::{CachePolicy, Fs, FsConfig, GuestIds};
use vmm::devices::virtio::net::{Net, NetConfig, Tap};
use vmm::devices::virtio::vsock::Vsock;
use vmm::{error_chain, PreparedRestore, SerialOutput, TemplatePages, Vm, VmConfig, VmHandle};

use super::agent_reports::OnceLog;
use super::console::ConsoleTail;
use super::host_cgroup::{host_resources, HostCgroup};
use super::pod_network::{netns_path, NetworkRecord, PodNetwork, NIC_DEVICE_MAC, NIC_MTU};
use super::record::{remove_sandbox_dir, sandbox_dir, SandboxRecord};
use super::sizing::{vm_size, VmSize};
use super::spec::guest_spec;
use super::template;
use crate::config::{Config, LogLevel, TemplateMode};

/// The kernel command line rund starts from; the VMM appends its devices.
const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
const GUEST_CID: u64 = 3;
/// Short: a unix socket path holds at most 107 bytes, and a CRI sandbox id alone is 64.
pub(super) const VSOCK_SOCKET: &str = "vsock";
/// Storage names in the guest (`<GUEST_STORAGE_DIR>/<name>`) and their virtio-fs tags.
pub(super) const SHARE_RO: &str = "share-ro";
pub(super) const SHARE_RW: &str = "share-rw";
const WRITABLE: &str = "rw";
/// The writable device: the first (and only) virtio-blk disk.
const WRITABLE_DEVICE: &str = "/dev/vda";
/// How long the agent gets to flush and unmount at teardown.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {0}: {1}")]
    Record(String, super::record::RecordError),
    #[error("sizing the microVM: {0}")]
    Sizing(#[from] super::sizing::SizingError),
    #[error("{what} {path}: {source}")]
    GuestFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this host cannot run the sandbox's microVM: {0}")]
    Host(#[from] vmm::host_check::HostCheckError),
    #[error("the sandbox's cgroup: {0}")]
    Cgroup(#[from] super::host_cgroup::HostCgroupError),
    #[error("the sandbox's root filesystem: {0}")]
    Rootfs(#[from] rootfs_split::RootfsError),
    #[error("the sandbox's writable layer: {0}")]
    WritableLayer(#[from] rootfs_split::ImageError),
    #[error("the microVM's devices: {0}")]
    Device(String),
    #[error("starting the microVM: {0}")]
    Vm(String),
    #[error("the agent did not answer within {timeout:?} of the VM's start; {guest}")]
    AgentTimeout {
        timeout: Duration,
        /// [`describe_guest`]: where the vCPUs are, what the devices hold, the console's end.
        guest: String,
    },
    #[error("the guest stopped before its agent answered ({exit}){}", console_tail(.console))]
    GuestStopped { exit: String, console: String },
    #[error("the agent refused {op}: {message}")]
    AgentRefused { op: &'static str, message: String },
    /// No answer in time, or a broken connection: the agent's own words are missing, so the
    /// guest's state stands in for them.
    #[error("no answer from the agent to {op} ({error}); {guest}")]
    AgentNoAnswer {
        op: &'static str,
        error: String,
        /// [`describe_guest`]: whether the microVM runs, its vCPUs and devices, its console.
        guest: String,
    },
    #[error("the container's spec: {0}")]
    Spec(#[from] super::spec::SpecError),
    #[error("a blocking task of the sandbox failed: {0}")]
    Join(String),
    #[error("templates: {0}")]
    Template(String),
    #[error("the pod's network: {0}")]
    Network(#[from] super::pod_network::PodNetworkError),
    #[error("the process's user: {0}")]
    Ids(#[from] TooManyIds),
}

/// How long each step of a sandbox's start took.
#[derive(Clone, Copy, Debug, Default)]
pub struct StartSplit {
    pub cgroup: Duration,
    pub rootfs: Duration,
    pub vm: Duration,
    pub agent: Duration,
    /// Of `agent`: until the agent first answered (the rest is the guest's identity and
    /// `CreateSandbox`). `vm` + `answer` is a boot's or a restore's time to a working guest.
    pub answer: Duration,
    /// Of `answer`: the try that got it, until the guest took the vsock connection.
    pub connect: Duration,
    /// Tries to get that answer (a cold guest refuses them until its agent listens).
    pub answer_tries: u32,
    /// Of `agent`: a restored guest's `SetGuestIdentity`.
    pub identity: Duration,
    /// Finding the template and preparing its restore (reading the snapshot, mapping its
    /// memory, making the KVM VM), beside `cgroup` and `rootfs`: what is left of it once they
    /// are done is in `vm`.
    pub prepare: Duration,
    /// The VM was restored from a template (then `vm` is the restore).
    pub from_template: bool,
    /// Joining the pod's network namespace on the host: reading it, the tap, the redirects.
    pub net: Duration,
    /// Of `agent`: the guest's side of the pod's network (its NIC, routes, neighbours).
    pub net_guest: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl StartSplit {
    /// The line ci/bench-start parses: one per sandbox start.
    pub fn log(&self, sandbox_id: &str, container: Duration) {
        let total = self.cgroup + self.rootfs + self.net + self.vm + self.agent + container;
        info!(
            "rund-start-split sandbox={sandbox_id} cgroup_ms={:.1} rootfs_ms={:.1} vm_ms={:.1} agent_ms={:.1} container_ms={:.1} total_ms={:.1} answer_ms={:.1} connect_ms={:.1} answer_tries={} identity_ms={:.1} prepare_ms={:.1} restore_ms={:.1} net_ms={:.1} net_guest_ms={:.1} start={}",
            ms(self.cgroup),
            ms(self.rootfs),
            ms(self.vm),
            ms(self.agent),
            ms(container),
            ms(total),
            ms(self.answer),
            ms(self.connect),
            self.answer_tries,
            ms(self.identity),
            ms(self.prepare),
            if self.from_template { ms(self.vm) } else { 0.0 },
            ms(self.net),
            ms(self.net_guest),
            if self.from_template { "template" } else { "cold" }
        );
    }
}

/// What a sandbox holds, in the order it was taken; undone backwards.
struct Held {
    cgroup: Option<HostCgroup>,
    rootfs: Option<SandboxRootfs>,
    /// The pod's network as joined (its tap is the VM's; the redirects are undone after it).
    network: Option<NetworkRecord>,
    vm: Option<VmHandle>,
}

impl Held {
    fn undo(&mut self, dir: &Path, id: &str) {
        if let Some(vm) = self.vm.take() {
            vm.shutdown();
            let exit = vm.wait();
            debug!("microVM stopped: {exit:?}");
        }
        if let Some(network) = self.network.take() {
            if let Err(e) = network.unwire() {
                warn!("undoing the pod's network: {}", error_chain(&e));
            }
        }
        if let Some(rootfs) = self.rootfs.take() {
            if let Err(e) = rootfs.destroy() {
                warn!("removing the sandbox's root filesystem: {e}");
            }
        }
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.release();
        }
        if let Err(e) = remove_sandbox_dir(dir, id) {
            warn!("{e}");
        }
    }
}

pub struct Sandbox {
    pub id: String,
    dir: PathBuf,
    agent: Arc<AgentClient>,
    held: Mutex<Held>,
    size: VmSize,
    console: ConsoleTail,
    /// The host ids the guest may make and own files as on the shares: those of the pod's
    /// processes, added as each starts.
    guest_ids: GuestIds,
    started: Instant,
    /// Which of the agent's lies were logged already.
    lies: Arc<OnceLog>,
}

pub(super) fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos() as i64)
}

/// The agent's failure to do `op`: its status message (the status's Debug form is protobuf
/// noise), or for a transport failure (its deadline passed, the connection broke) what `guest`
/// says of the guest.
fn agent_err(
    op: &'static str,
    guest: impl FnOnce() -> String,
) -> impl FnOnce(ttrpc::Error) -> SandboxError {
    move |e| match e {
        ttrpc::Error::RpcStatus(s) => SandboxError::AgentRefused {
            op,
            message: s.message,
        },
        other => SandboxError::AgentNoAnswer {
            op,
            error: other.to_string(),
            guest: guest(),
        },
    }
}

fn readable(what: &'static str, path: &Path) -> Result<(), SandboxError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| SandboxError::GuestFile {
            what,
            path: path.to_owned(),
            source,
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SandboxError> + Send + 'static,
) -> Result<T, SandboxError> {
    joined(tokio::task::spawn_blocking(f)).await
}

/// The result of a blocking step started earlier.
async fn joined<T>(
    task: tokio::task::JoinHandle<Result<T, SandboxError>>,
) -> Result<T, SandboxError> {
    task.await.map_err(|e| SandboxError::Join(e.to_string()))?
}

/// The platform's cgroup parent: only a CRI pod sandbox has one (plain `ctr run` specs carry
/// `/<namespace>/<id>`, which is containerd's default, not a platform's choice).
fn dictated_parent(spec: &Spec, is_cri_sandbox: bool) -> Option<String> {
    if !is_cri_sandbox {
        return None;
    }
    let path = spec.linux().as_ref()?.cgroups_path().as_ref()?;
    Some(path.to_string_lossy().into_owned())
}

/// Whether the microVM runs (with its vCPUs and devices) or how it ended, then its console's end.
fn describe_guest(vm: Option<&VmHandle>, console: &ConsoleTail) -> String {
    let state = match vm {
        None => "the microVM is gone".to_owned(),
        Some(vm) => vm.status_report(),
    };
    format!(
        "{state}{}",
        console_tail(&console.last_lines(CONSOLE_LINES))
    )
}

/// How an error quotes the guest console's last lines.
fn console_tail(lines: &str) -> String {
    if lines.is_empty() {
        "; the guest console is empty".to_owned()
    } else {
        format!("; the guest console ends with:\n{lines}")
    }
}

pub(super) fn vm_config(
    config: &Config,
    dir: &Path,
    console: &ConsoleTail,
    rootfs: &SandboxRootfs,
    size: VmSize,
    tap: Option<Tap>,
    ids: &GuestIds,
) -> Result<VmConfig, SandboxError> {
    let mut vm = VmConfig::new(&config.guest.kernel);
    vm.initrd = Some(config.guest.initramfs.clone());
    vm.cmdline = guest_cmdline(config);
    vm.vcpus = size.vcpus;
    vm.mem_mib = size.memory_mib;
    vm.serial = serial(config, dir, console)?;
    vm.devices = sandbox_devices(dir, rootfs, tap, ids)?;
    Ok(vm)
}

/// The guest kernel's command line (the VMM adds its devices).
pub(super) fn guest_cmdline(config: &Config) -> String {
    format!("{BASE_CMDLINE} {}", config.guest.extra_cmdline)
        .trim_end()
        .to_owned()
}

/// The console: its tail kept for error messages, and a log file at debug level.
fn serial(
    config: &Config,
    dir: &Path,
    console: &ConsoleTail,
) -> Result<SerialOutput, SandboxError> {
    let console_log = dir.join("console.log");
    let file = match config.log_level {
        LogLevel::Debug | LogLevel::Trace => Some(console_log.as_path()),
        _ => None,
    };
    Ok(SerialOutput::Writer(Box::new(
        console.writer(file).map_err(|e| {
            SandboxError::Device(format!("the console log {}: {e}", console_log.display()))
        })?,
    )))
}

/// A sandbox's devices, in the order its guest knows them (a template's layout too): the
/// writable layer, the read-only and read-write shares, vsock on `<dir>/vsock`, the NIC (on the
/// pod's tap; without one, as a template's and a pod's without a network namespace, it carries
/// nothing and the guest leaves it down).
fn sandbox_devices(
    dir: &Path,
    rootfs: &SandboxRootfs,
    tap: Option<Tap>,
    ids: &GuestIds,
) -> Result<Vec<vmm::config::VirtioDeviceHandle>, SandboxError> {
    let device = |e: &dyn std::fmt::Display| SandboxError::Device(e.to_string());
    let share = |tag: &str, shared_dir: &Path, read_only: bool| {
        Fs::new(FsConfig {
            tag: tag.into(),
            shared_dir: shared_dir.to_owned(),
            read_only,
            cache: if read_only {
                CachePolicy::Always
            } else {
                CachePolicy::Auto
            },
            xattr: false,
            ids: ids.clone(),
        })
        .map_err(|e| device(&e))
    };
    Ok(vec![
        Arc::new(Mutex::new(
            Block::new(rootfs.image_path(), false).map_err(|e| device(&e))?,
        )),
        Arc::new(Mutex::new(share(
            SHARE_RO,
            &rootfs.share_dir(Share::ReadOnly),
            true,
        )?)),
        Arc::new(Mutex::new(share(
            SHARE_RW,
            &rootfs.share_dir(Share::ReadWrite),
            false,
        )?)),
        Arc::new(Mutex::new(
            Vsock::new(GUEST_CID, &dir.join(VSOCK_SOCKET)).map_err(|e| device(&e))?,
        )),
        Arc::new(Mutex::new(
            Net::new(
                tap,
                NetConfig {
                    mac: NIC_DEVICE_MAC,
                    mtu: NIC_MTU,
                },
            )
            .map_err(|e| device(&e))?,
        )),
    ])
}

/// Lines of the console an error quotes.
const CONSOLE_LINES: usize = 20;

/// How the agent's first answer came.
#[derive(Clone, Copy, Debug)]
pub(super) struct FirstAnswer {
    pub tries: u32,
    /// Of the last try: until the guest took the vsock connection (the rest is `Check`).
    pub connect: Duration,
}

/// Connects to the agent once it answers `Check`; fails at `timeout`, or as soon as the guest
/// has stopped, quoting the console's end either way.
pub(super) async fn connect_agent(
    socket: &Path,
    timeout: Duration,
    vm: &VmHandle,
    console: &ConsoleTail,
) -> Result<(AgentClient, FirstAnswer), SandboxError> {
    let deadline = Instant::now() + timeout;
    let mut tries = 0;
    loop {
        tries += 1;
        let t = Instant::now();
        // Until the agent listens, the guest refuses the port and the VMM closes the stream.
        if let Ok(c) = connect_hybrid_vsock(socket, AGENT_VSOCK_PORT, Duration::from_secs(5)).await
        {
            let connect = t.elapsed();
            if c.check(ctx(Duration::from_secs(5)), &Empty::new())
                .await
                .is_ok()
            {
                return Ok((c, FirstAnswer { tries, connect }));
            }
        }
        if let Some(exit) = vm.exit_reason() {
            return Err(SandboxError::GuestStopped {
                exit: exit.to_string(),
                console: console.last_lines(CONSOLE_LINES),
            });
        }
        if Instant::now() >= deadline {
            return Err(SandboxError::AgentTimeout {
                timeout,
                guest: describe_guest(Some(vm), console),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Gives the guest's NIC the pod's interface: name, MAC, MTU, addresses, then its routes and
/// permanent neighbours.
async fn configure_guest_network(
    agent: &AgentClient,
    pod: &PodNetwork,
    timeout: Duration,
    guest: impl Fn() -> String,
) -> Result<(), SandboxError> {
    let (iface, routes, neighbors) = pod.agent_requests();
    agent
        .update_interface(ctx(timeout), &iface)
        .await
        .map_err(agent_err("UpdateInterface", &guest))?;
    if !routes.routes.is_empty() {
        agent
            .update_routes(ctx(timeout), &routes)
            .await
            .map_err(agent_err("UpdateRoutes", &guest))?;
    }
    if !neighbors.neighbors.is_empty() {
        agent
            .add_arp_neighbors(ctx(timeout), &neighbors)
            .await
            .map_err(agent_err("AddARPNeighbors", &guest))?;
    }
    Ok(())
}

/// A restore made ready before its backends exist.
struct Prepared {
    restore: PreparedRestore,
    /// How long the lookup and the preparation took.
    took: Duration,
}

/// The template of `size` as the configured mode finds it (`require`: made now if missing), and
/// its restore prepared ([`Vm::prepare_restore`]). Blocking.
fn prepare_restore(
    config: &Arc<Config>,
    size: VmSize,
    runtime: tokio::runtime::Handle,
) -> Result<Option<(Template, Prepared)>, SandboxError> {
    let t = Instant::now();
    let found = match config.template.mode {
        TemplateMode::Off => None,
        TemplateMode::Auto => {
            let inputs = template::inputs(config, size)?;
            let found = template::store(config)?
                .find(&inputs)
                .map_err(|e| SandboxError::Template(error_chain(&e)))?;
            if found.is_none() {
                info!(
                    "no template {} ({} vCPUs, {} MiB) yet: a cold boot",
                    inputs.key(),
                    size.vcpus,
                    size.memory_mib
                );
            }
            found
        }
        TemplateMode::Require => template::get_or_make(config, size, true, runtime)?,
    };
    let Some(found) = found else {
        return Ok(None);
    };
    let pages = if config.template.map_ahead {
        TemplatePages::MapAhead
    } else {
        TemplatePages::OnTouch
    };
    let restore =
        Vm::prepare_restore(&found.dir, pages).map_err(|e| SandboxError::Vm(error_chain(&e)))?;
    let took = t.elapsed();
    Ok(Some((found, Prepared { restore, took })))
}

impl Sandbox {
    /// Starts sandbox `id` for its first container, whose spec is `spec`.
    pub async fn start(
        config: Arc<Config>,
        id: &str,
        spec: &Spec,
        is_cri_sandbox: bool,
    ) -> Result<(Sandbox, StartSplit), SandboxError> {
        let dir = sandbox_dir(&config.paths.run_dir, id)
            .map_err(|e| SandboxError::Record(id.to_owned(), e.into()))?;
        SandboxRecord::for_this_process(id)
            .and_then(|r| r.write(&dir))
            .map_err(|e| SandboxError::Record(id.to_owned(), e))?;
        let mut held = Held {
            cgroup: None,
            rootfs: None,
            network: None,
            vm: None,
        };
        let console = ConsoleTail::new();
        let up = Self::bring_up(&config, id, spec, is_cri_sandbox, &dir, &console, &mut held);
        match up.await {
            Ok((agent, size, split, guest_ids)) => Ok((
                Sandbox {
                    id: id.to_owned(),
                    dir,
                    agent: Arc::new(agent),
                    held: Mutex::new(held),
                    size,
                    console,
                    guest_ids,
                    started: Instant::now(),
                    lies: Arc::default(),
                },
                split,
            )),
            Err(e) => {
                let dir2 = dir.clone();
                let id2 = id.to_owned();
                let _ = tokio::task::spawn_blocking(move || held.undo(&dir2, &id2)).await;
                Err(e)
            }
        }
    }

    async fn bring_up(
        config: &Arc<Config>,
        id: &str,
        spec: &Spec,
        is_cri_sandbox: bool,
        dir: &Path,
        console: &ConsoleTail,
        held: &mut Held,
    ) -> Result<(AgentClient, VmSize, StartSplit, GuestIds), SandboxError> {
        // Nobody's ids until the pod's first process is allowed (`allow_user`).
        let guest_ids = GuestIds::none();
        let mut split = StartSplit::default();
        let size = vm_size(spec, &config.guest)?;
        readable("guest kernel", &config.guest.kernel)?;
        readable("guest initramfs", &config.guest.initramfs)?;
        vmm::host_check::check_host()?;

        // The restore's first half needs none of the cgroup and rootfs steps: it runs beside them.
        // What it allocates in the kernel (the KVM VM, page tables of the mapped template) is
        // charged to the shim's cgroup of before the move (tens of KiB of page tables); the
        // guest's own pages come later, in the sandbox's cgroup.
        let (c, rt) = (config.clone(), tokio::runtime::Handle::current());
        let preparing = tokio::task::spawn_blocking(move || prepare_restore(&c, size, rt));

        let t = Instant::now();
        if config.cgroup_pool.enabled {
            let pod = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
            let resources = host_resources(pod, size.memory_mib);
            let parent = dictated_parent(spec, is_cri_sandbox);
            let (c, sid) = (config.clone(), id.to_owned());
            held.cgroup = Some(
                blocking(move || {
                    Ok(HostCgroup::acquire(
                        &c,
                        &sid,
                        parent.as_deref(),
                        &resources,
                    )?)
                })
                .await?,
            );
        }
        split.cgroup = t.elapsed();

        // Before the rootfs: a namespace rund cannot join is refused before anything is made.
        let t = Instant::now();
        let pod_network = match netns_path(spec) {
            Some(netns) => {
                let (d, sid) = (dir.to_owned(), id.to_owned());
                let (pod, tap) = blocking(move || {
                    Ok(PodNetwork::join(&netns, |pod| {
                        // Recorded before the namespace changes: a `kill -9` from here on is
                        // undone by `delete`.
                        SandboxRecord::for_this_process(&sid)
                            .map(|r| r.with_network(pod.record()))
                            .and_then(|r| r.write(&d))
                            .map_err(|e| SandboxError::Record(sid.clone(), e).into())
                    })?)
                })
                .await?;
                held.network = Some(pod.record());
                Some((pod, tap))
            }
            None => None,
        };
        let (pod_network, tap) = match pod_network {
            Some((pod, tap)) => (Some(pod), Some(tap)),
            None => (None, None),
        };
        split.net = t.elapsed();

        let t = Instant::now();
        let (c, d, sid) = (config.clone(), dir.to_owned(), id.to_owned());
        let rootfs = blocking(move || {
            let layer = WritableLayer::new(&c.writable_layer.dir, c.writable_layer.size_mib)?;
            Ok(SandboxRootfs::create(&d, &sid, &layer)?)
        })
        .await?;
        split.rootfs = t.elapsed();

        let t = Instant::now();
        let template = joined(preparing).await?;
        if let Some((_, p)) = &template {
            split.prepare = p.took;
        }
        let vm = vm_config(config, dir, console, &rootfs, size, tap, &guest_ids);
        held.rootfs = Some(rootfs);
        let vm = vm?;
        split.from_template = template.is_some();
        let handle = blocking(move || {
            let (template, vm) = match template {
                Some((t, p)) => (Some(t), p.restore.finish(vm.serial, vm.devices)),
                None => (None, Vm::new(vm)),
            };
            let handle = vm
                .and_then(|vm| vm.start())
                .map_err(|e| SandboxError::Vm(error_chain(&e)))?;
            if let Some(t) = &template {
                if let Err(e) = t.record_restore() {
                    warn!("template {}: {}", t.key, error_chain(&e));
                }
            }
            Ok(handle)
        })
        .await?;
        held.vm = Some(handle);
        split.vm = t.elapsed();

        let t = Instant::now();
        let timeout = Duration::from_secs(config.guest.agent_timeout_secs);
        let vm = held
            .vm
            .as_ref()
            .ok_or_else(|| SandboxError::Vm("the microVM is gone".into()))?;
        let (agent, first) = connect_agent(&dir.join(VSOCK_SOCKET), timeout, vm, console).await?;
        split.answer = t.elapsed();
        split.connect = first.connect;
        split.answer_tries = first.tries;
        if split.from_template {
            let hostname = spec.hostname().clone().unwrap_or_default();
            let t = Instant::now();
            template::set_identity(&agent, &hostname, timeout).await?;
            split.identity = t.elapsed();
        }
        if let Some(pod) = &pod_network {
            let t = Instant::now();
            configure_guest_network(&agent, pod, timeout, || describe_guest(Some(vm), console))
                .await?;
            split.net_guest = t.elapsed();
        }
        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = id.to_owned();
        req.hostname = spec.hostname().clone().unwrap_or_default();
        req.storages = vec![
            storage("virtiofs", SHARE_RO, "", SHARE_RO, &["ro"]),
            storage("virtiofs", SHARE_RW, "", SHARE_RW, &[]),
            storage("block", WRITABLE_DEVICE, "ext4", WRITABLE, &[]),
        ];
        agent
            .create_sandbox(ctx(timeout), &req)
            .await
            .map_err(agent_err("CreateSandbox", || {
                describe_guest(Some(vm), console)
            }))?;
        split.agent = t.elapsed();
        info!(
            "sandbox {id}: {} vCPUs, {} MiB, started {} in {:?}",
            size.vcpus,
            size.memory_mib,
            if split.from_template {
                "from a template"
            } else {
                "cold"
            },
            split.cgroup + split.rootfs + split.vm + split.agent
        );
        if config.template.mode != TemplateMode::Off {
            let home: Vec<PathBuf> = held
                .cgroup
                .as_ref()
                .map(|c| c.home_dirs().to_vec())
                .unwrap_or_default();
            let own = config.template.mode == TemplateMode::Auto && !split.from_template;
            if own {
                // The next sandbox of this shape restores it; this one does not wait for it.
                let made = template::store(config)
                    .and_then(|store| template::make_detached(&store, size, &home));
                if let Err(e) = made {
                    warn!("cannot start making the template of this shape: {e}");
                }
            }
            if !config.template.keep_ready.is_empty() {
                let c = config.clone();
                let except = own.then_some(size);
                tokio::task::spawn_blocking(move || template::keep_ready(&c, except, &home));
            }
        }
        Ok((agent, size, split, guest_ids))
    }

    pub fn agent(&self) -> Arc<AgentClient> {
        self.agent.clone()
    }

    pub fn size(&self) -> VmSize {
        self.size
    }

    /// How long the sandbox has run.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// The agent's lies logged so far: one line per kind and sandbox.
    pub fn lies(&self) -> Arc<OnceLog> {
        self.lies.clone()
    }

    /// Tops the cgroup pool up, off the start path.
    pub async fn refill_pool(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(c) = me.lock_held().cgroup.as_ref() {
                c.refill();
            }
        })
        .await;
    }

    /// The guest's state for a log line when the agent's connection breaks: whether the VM still
    /// runs (then each vCPU's and each virtio device's line, which kicks the vCPUs and may wait
    /// up to 200 ms for each: only for failure paths) or how it ended, and the console's end.
    pub fn guest_report(&self) -> String {
        describe_guest(self.lock_held().vm.as_ref(), &self.console)
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the guest make and own files on the shares as `user`, whom one of the pod's
    /// processes is about to run as.
    pub fn allow_user(&self, user: &oci_spec::runtime::User) -> Result<(), SandboxError> {
        let groups = user.additional_gids().clone().unwrap_or_default();
        Ok(self
            .guest_ids
            .allow_process(user.uid(), user.gid(), &groups)?)
    }

    /// Creates container `cid` in the guest: its layers and volumes shared, its spec turned into
    /// the guest's.
    pub async fn create_container(
        self: &Arc<Self>,
        cid: &str,
        spec: &Spec,
        rootfs: Vec<RootfsMount>,
        terminal: bool,
    ) -> Result<(), SandboxError> {
        if let Some(p) = spec.process() {
            self.allow_user(p.user())?;
        }
        let me = self.clone();
        let (cid2, spec2) = (cid.to_owned(), spec.clone());
        let (lowers, mut guest) = blocking(move || {
            let mut held = me.lock_held();
            let fs = held
                .rootfs
                .as_mut()
                .ok_or_else(|| SandboxError::Vm("the sandbox is stopping".into()))?;
            let layers = fs.add_container(&cid2, &rootfs)?;
            let mut share = |source: &Path, read_only: bool| {
                fs.add_volume(&cid2, source, read_only)
                    .map(|v| {
                        let storage = match v.share {
                            Share::ReadOnly => SHARE_RO,
                            Share::ReadWrite => SHARE_RW,
                        };
                        Path::new(GUEST_STORAGE_DIR).join(storage).join(v.path)
                    })
                    .map_err(|e| e.to_string())
            };
            match guest_spec(&spec2, &mut share) {
                Ok(g) => Ok((layers.lower_dirs, g)),
                Err(e) => {
                    if let Err(undo) = fs.remove_container(&cid2) {
                        warn!("container {cid2}: undoing its shares: {undo}");
                    }
                    Err(e.into())
                }
            }
        })
        .await?;
        if let Some(p) = guest.process_mut() {
            p.set_terminal(Some(terminal));
        }
        let mut root = RootfsOverlay::new();
        root.lower_dirs = lowers
            .iter()
            .map(|l| format!("{SHARE_RO}/{}", l.display()))
            .collect();
        root.upper_dir = format!("{WRITABLE}/{cid}/upper");
        root.work_dir = format!("{WRITABLE}/{cid}/work");
        let mut req = CreateContainerRequest::new();
        req.container_id = cid.to_owned();
        req.spec_json = serde_json::to_vec(&guest).map_err(|e| {
            SandboxError::Spec(super::spec::SpecError::Build {
                destination: PathBuf::from("/"),
                why: e.to_string(),
            })
        })?;
        req.rootfs = protobuf::MessageField::some(root);
        let created = self
            .agent
            .create_container(ctx(Duration::from_secs(60)), &req)
            .await
            .map_err(agent_err("CreateContainer", || self.guest_report()));
        if created.is_err() {
            self.forget_container(cid).await;
        }
        created.map(drop)
    }

    /// Undoes a container's host side (its layer and volume mounts).
    pub async fn forget_container(self: &Arc<Self>, cid: &str) {
        let me = self.clone();
        let cid = cid.to_owned();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(fs) = me.lock_held().rootfs.as_mut() {
                if let Err(e) = fs.remove_container(&cid) {
                    warn!("container {cid}: removing its shares: {e}");
                }
            }
        })
        .await;
    }

    /// Tears the sandbox down: the agent flushes and unmounts, the VM stops, the host side goes.
    pub async fn stop(self: &Arc<Self>) {
        let mut req = DestroySandboxRequest::new();
        req.sandbox_id = self.id.clone();
        if let Err(e) = self.agent.destroy_sandbox(ctx(DESTROY_TIMEOUT), &req).await {
            warn!("sandbox {}: DestroySandbox: {e}", self.id);
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let dir = me.dir.clone();
            me.lock_held().undo(&dir, &me.id);
        })
        .await;
    }
}

/// What `containerd-shim-rund-v2 delete` does after the shim holding sandbox `id` was killed:
/// undoes what its record names. Refuses while that shim still runs.
pub fn cleanup_dead(config: &Config, id: &str) -> Result<bool, String> {
    let dir = sandbox_dir(&config.paths.run_dir, id).map_err(|e| e.to_string())?;
    let network = match SandboxRecord::read(&dir) {
        Ok(Some(r)) if r.shim_alive() => return Ok(false),
        Ok(r) => r.and_then(|r| r.network),
        Err(e) => {
            warn!("{e}; cleaning up anyway");
            None
        }
    };
    // Until this succeeds the record stays, so that the next `delete` tries again.
    if let Some(network) = network {
        network.unwire().map_err(|e| error_chain(&e))?;
    }
    if dir.exists() {
        SandboxRootfs::cleanup(&dir).map_err(|e| e.to_string())?;
    }
    // The record must still be there (saying "dead") while the pool reconciles.
    if config.cgroup_pool.enabled {
        super::host_cgroup::reclaim_dead(config, &config.paths.run_dir)
            .map_err(|e| e.to_string())?;
    }
    remove_sandbox_dir(&dir, id).map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_agent_status_is_a_refusal_and_no_answer_says_what_the_guest_looks_like() {
        let refused = ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::INVALID_ARGUMENT,
            "no such image layer",
        ));
        let e = agent_err("CreateContainer", || {
            unreachable!("a refusal needs no report")
        })(refused);
        assert_eq!(
            e.to_string(),
            "the agent refused CreateContainer: no such image layer"
        );

        // ttrpc's own deadline is a transport error, not the agent's word.
        let late = ttrpc::Error::Others("Request deadline elapsed".into());
        let e = agent_err("CreateContainer", || {
            "the microVM runs; its vCPUs: …".into()
        })(late);
        assert_eq!(
            e.to_string(),
            "no answer from the agent to CreateContainer (ttrpc err: Request deadline elapsed); \
             the microVM runs; its vCPUs: …"
        );
    }

    #[test]
    fn delete_removes_nothing_outside_the_sandboxes_it_made() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.paths.run_dir = tmp.path().join("run");
        config.cgroup_pool.enabled = false;
        std::fs::create_dir(&config.paths.run_dir).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("data"), b"precious").unwrap();
        for id in ["../victim", "..", "/", "", "a/../../victim"] {
            let e = cleanup_dead(&config, id).unwrap_err();
            assert!(e.starts_with("sandbox id"), "{id:?}: {e}");
        }
        assert!(victim.join("data").exists());
        assert!(config.paths.run_dir.exists());

        // A directory under the run directory that no shim of rund made.
        let stray = config.paths.run_dir.join("stray");
        std::fs::create_dir(&stray).unwrap();
        std::fs::write(stray.join("keep"), b"x").unwrap();
        let e = cleanup_dead(&config, "stray").unwrap_err();
        assert!(e.contains("left in place"), "{e}");
        assert!(stray.join("keep").exists());
    }

    #[test]
    fn a_guest_without_a_vm_says_so_with_its_console() {
        let console = ConsoleTail::new();
        assert_eq!(
            describe_guest(None, &console),
            "the microVM is gone; the guest console is empty"
        );
        console
            .writer(None)
            .unwrap()
            .write_all(b"booting\nKernel panic\n")
            .unwrap();
        assert_eq!(
            describe_guest(None, &console),
            "the microVM is gone; the guest console ends with:\nbooting\nKernel panic"
        );
    }
}
