//! Sandboxes from templates (docs/templates.md): what a sandbox's template is made from, making
//! one from a cold-booted VM whose agent answered, and the fresh identity a restored guest gets
//! before any container exists.
//!
//! A template VM has a sandbox's devices in a sandbox's order, with backends of its own: a
//! writable layer copied from the same base image (the guest's block layer cached what it read of
//! it at boot, the partition table's page, which a sandbox's copy then holds too) and empty
//! shares, which the guest has not mounted when the snapshot is taken.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_protocol::agent::SetGuestIdentityRequest;
use agent_protocol::AgentClient;
use log::{info, warn};
use rootfs_split::{SandboxRootfs, WritableLayer};
use templates::memory_fs::MemoryFs;
use templates::{FileIdentity, Template, TemplateInputs, TemplateStore};
use vmm::devices::virtio::fs::GuestIds;
use vmm::{error_chain, Vm};

use super::console::ConsoleTail;
use super::sandbox::{
    connect_agent, ctx, guest_cmdline, vm_config, SandboxError, SHARE_RO, SHARE_RW, VSOCK_SOCKET,
};
use super::sizing::VmSize;
use crate::config::Config;

/// Fresh randomness a restored guest's CRNG is reseeded with.
const SEED_BYTES: usize = 64;
/// Where in the directory of a template being made its VM keeps its own state.
const MAKER_WORK_DIR: &str = "work";
/// The background makers' log, in the store; cut when it grows past this before a maker starts.
const MAKER_LOG: &str = "maker.log";
/// How long a template VM's connections get to close before its snapshot.
const QUIESCE_WAIT: Duration = Duration::from_secs(5);
const MAKER_LOG_MAX_BYTES: u64 = 1 << 20;

fn template_err(e: templates::TemplateError) -> SandboxError {
    SandboxError::Template(error_chain(&e))
}

/// The host's template store. A maker that died left its template VM's root filesystem in
/// `work/` of its directory (a writable-layer copy beside the others, share directories): the
/// next maker undoes it by its record.
pub fn store(config: &Config) -> Result<TemplateStore, SandboxError> {
    let t = &config.template;
    if t.store_mib > 0 {
        match templates::memory_fs::ensure(&t.dir, t.store_mib) {
            Ok(MemoryFs::MountedHuge) => info!(
                "template store {}: a tmpfs of {} MiB with huge pages",
                t.dir.display(),
                t.store_mib
            ),
            Ok(MemoryFs::MountedPlain) => warn!(
                "template store {}: a tmpfs of {} MiB without huge pages (the kernel has no \
                 shmem THP): restores fault in 4 KiB pages",
                t.dir.display(),
                t.store_mib
            ),
            Ok(MemoryFs::NotEmpty) => warn!(
                "template store {}: holds templates but is no mount of its own; after `rund \
                 template remove all` the next start mounts one",
                t.dir.display()
            ),
            Ok(MemoryFs::Existing) => {}
            // The store works on the directory as it is, only slower to restore from.
            Err(e) => warn!("template store: {}", error_chain(&e)),
        }
    }
    Ok(TemplateStore::open(&t.dir)
        .map_err(template_err)?
        .undo_leftovers_with(|dir| {
            if let Err(e) = SandboxRootfs::cleanup(&dir.join(MAKER_WORK_DIR)) {
                log::warn!("undoing a dead template maker's root filesystem: {e}");
            }
        }))
}

/// What the template of a sandbox of `size` is made from.
pub fn inputs(config: &Config, size: VmSize) -> Result<TemplateInputs, SandboxError> {
    let identity = |what: &'static str, path: &Path| {
        FileIdentity::of(path).map_err(|source| SandboxError::GuestFile {
            what,
            path: path.to_owned(),
            source,
        })
    };
    Ok(TemplateInputs {
        kernel: identity("guest kernel", &config.guest.kernel)?,
        initrd: Some(identity("guest initramfs", &config.guest.initramfs)?),
        cmdline: guest_cmdline(config),
        vmm_build: vmm::snapshot::build_id().to_owned(),
        vcpus: size.vcpus,
        mem_mib: size.memory_mib,
        devices: vec![
            format!("blk rw {}M", config.writable_layer.size_mib),
            format!("fs:{SHARE_RO} ro"),
            format!("fs:{SHARE_RW} rw"),
            "vsock".to_owned(),
            format!(
                "net {} mtu {}",
                super::pod_network::NIC_DEVICE_MAC,
                super::pod_network::NIC_MTU
            ),
        ],
    })
}

/// The template for `size`: found, or made now (a cold boot of a template VM to its agent's
/// answer, then its snapshot). With `wait`, a template another process is making is waited for;
/// without, `None` comes back at once. Blocking: call it off the async runtime's threads.
pub fn get_or_make(
    config: &Arc<Config>,
    size: VmSize,
    wait: bool,
    runtime: tokio::runtime::Handle,
) -> Result<Option<Template>, SandboxError> {
    let store = store(config)?;
    let inputs = inputs(config, size)?;
    store
        .get_or_make(&inputs, wait, |dir| {
            snapshot_template_vm(config, size, dir, &runtime).map_err(|e| e.to_string().into())
        })
        .map_err(template_err)
}

/// Boots a template VM, waits for its agent, and snapshots it into `dir`.
fn snapshot_template_vm(
    config: &Arc<Config>,
    size: VmSize,
    dir: &Path,
    runtime: &tokio::runtime::Handle,
) -> Result<u64, SandboxError> {
    // The VM's own state (sockets, shares, image record) lives beside the snapshot being made
    // and goes with it: `dir` is renamed into place or removed.
    let work = dir.join(MAKER_WORK_DIR);
    std::fs::create_dir(&work)
        .map_err(|e| SandboxError::Device(format!("{}: {e}", work.display())))?;
    let layer = WritableLayer::new(&config.writable_layer.dir, config.writable_layer.size_mib)?;
    let id = format!(
        "template-{}-{}",
        std::process::id(),
        dir.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().replace('.', ""))
    );
    let rootfs = SandboxRootfs::create(&work, &id, &layer)?;
    let console = ConsoleTail::new();
    let result = (|| {
        // A template's guest never mounts its shares (a restore brings the sandbox's own).
        let vm = vm_config(
            config,
            &work,
            &console,
            &rootfs,
            size,
            None,
            &GuestIds::none(),
        )?;
        let handle = Vm::new(vm)
            .and_then(Vm::start)
            .map_err(|e| SandboxError::Vm(error_chain(&e)))?;
        let timeout = Duration::from_secs(config.guest.agent_timeout_secs);
        let answered = runtime.block_on(async {
            let (agent, _) =
                connect_agent(&work.join(VSOCK_SOCKET), timeout, &handle, &console).await?;
            // No connection may be open in a template: clones could not go on with it.
            drop(agent);
            Ok::<(), SandboxError>(())
        });
        let snapshot = answered.and_then(|()| {
            // The guest sees its connection close before it stops: a template without open
            // connections restores without a vsock transport reset, which would race (and kill)
            // each clone's first connection. One still open after the wait is reset instead.
            let deadline = Instant::now() + QUIESCE_WAIT;
            while handle.open_connections() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let open = handle.open_connections();
            if open > 0 {
                log::warn!(
                    "{open} guest connection(s) still open after {QUIESCE_WAIT:?}: clones will \
                     reset their vsock transport"
                );
            }
            handle
                .pause()
                .and_then(|()| handle.snapshot(dir))
                .map_err(|e| SandboxError::Vm(error_chain(&e)))
        });
        handle.shutdown();
        handle.wait();
        snapshot
    })();
    if let Err(e) = rootfs.destroy() {
        log::warn!("removing the template VM's root filesystem: {e}");
    }
    if let Err(e) = std::fs::remove_dir_all(&work) {
        log::warn!("removing {}: {e}", work.display());
    }
    let size = result?;
    info!(
        "template snapshot: {} KiB of guest memory, {} KiB of state",
        size.memory_bytes >> 10,
        size.state_bytes >> 10
    );
    Ok(size.memory_bytes)
}

/// Opens the background makers' log for appending, emptied first if it grew past its bound.
fn open_maker_log(store: &TemplateStore) -> std::io::Result<(std::fs::File, std::path::PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = store.root().join(MAKER_LOG);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    if log.metadata()?.len() > MAKER_LOG_MAX_BYTES {
        log.set_len(0)?;
    }
    Ok((log, path))
}

/// Starts `rund template create --no-wait` for `size` as a process of its own session, which
/// outlives this shim: a shim exits with its last container, and a template half made when it
/// does would be lost. `rund` is the one installed beside this shim; its output goes to
/// `maker.log` in the store, which a pipe to a shim that exited could not take. Shims that start
/// one each for the same shape at once make the template once: the others find it being made
/// and exit (`store` is the host's, whose log they write). The maker starts in `cgroups` (the shim's own before it joined the sandbox's): a
/// template is the node's, and a maker left in the sandbox's cgroup would be charged to it and
/// keep it busy after the sandbox ended.
pub fn make_detached(
    store: &TemplateStore,
    size: VmSize,
    cgroups: &[PathBuf],
) -> Result<(), SandboxError> {
    use std::os::unix::process::CommandExt;
    let io = |what: &str, e: std::io::Error| SandboxError::Template(format!("{what}: {e}"));
    let rund = std::env::current_exe()
        .map_err(|e| io("the shim's own path", e))?
        .parent()
        .map(|d| d.join("rund"))
        .ok_or_else(|| SandboxError::Template("the shim's own path has no directory".into()))?;
    let (log, log_path) = open_maker_log(store).map_err(|e| io("the template makers' log", e))?;
    let mut command = std::process::Command::new(&rund);
    command
        .args(["template", "create", "--no-wait", "--vcpus"])
        .arg(size.vcpus.to_string())
        .arg("--memory-mib")
        .arg(size.memory_mib.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| io("the template makers' log", e))?,
        )
        .stderr(log);
    let procs: Vec<CString> = cgroups
        .iter()
        .map(|d| CString::new(d.join("cgroup.procs").into_os_string().into_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| SandboxError::Template(format!("a cgroup path: {e}")))?;
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, open, write, close) on
    // memory made before the fork; the child touches nothing of the parent's state.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for path in &procs {
                // "0": the writer itself.
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| io(&rund.display().to_string(), e))?;
    info!(
        "making the template of {} vCPUs, {} MiB in the background (pid {}, log {})",
        size.vcpus,
        size.memory_mib,
        child.id(),
        log_path.display()
    );
    // Reaped here while the shim lives; after that, by whoever inherits it.
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            if !status.success() {
                log::warn!(
                    "`rund template create` failed ({status}); see {}",
                    log_path.display()
                );
            }
        }
    });
    Ok(())
}

/// Starts a maker (as [`make_detached`]) for each shape of `[template] keep_ready` that has no
/// template, `except` the one a caller makes itself. A shape whose maker already runs costs one
/// maker that exits at once (the store's lock). Blocking: a few stats and small reads per shape.
pub fn keep_ready(config: &Config, except: Option<VmSize>, cgroups: &[PathBuf]) {
    let Ok(store) = store(config) else {
        return;
    };
    for &shape in &config.template.keep_ready {
        let size = VmSize::from(shape);
        if Some(size) == except {
            continue;
        }
        let found = inputs(config, size).and_then(|i| store.find(&i).map_err(template_err));
        match found {
            Ok(Some(_)) => {}
            Ok(None) => {
                if let Err(e) = make_detached(&store, size, cgroups) {
                    log::warn!(
                        "cannot start making the template of {} vCPUs, {} MiB to keep ready: {e}",
                        size.vcpus,
                        size.memory_mib
                    );
                }
            }
            Err(e) => log::warn!(
                "the template of {} vCPUs, {} MiB to keep ready: {e}",
                size.vcpus,
                size.memory_mib
            ),
        }
    }
}

/// Gives a restored guest its own identity before anything else runs in it: fresh entropy
/// credited and the CRNG reseeded, the wall clock set to the host's, the sandbox's hostname.
pub async fn set_identity(
    agent: &AgentClient,
    hostname: &str,
    timeout: Duration,
) -> Result<(), SandboxError> {
    let mut seed = vec![0u8; SEED_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| SandboxError::Device(format!("reading /dev/urandom: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut req = SetGuestIdentityRequest::new();
    req.hostname = hostname.to_owned();
    req.random_seed = seed;
    req.clock_sec = now.as_secs() as i64;
    req.clock_nsec = now.subsec_nanos();
    agent
        .set_guest_identity(ctx(timeout), &req)
        .await
        .map(drop)
        .map_err(|e| SandboxError::AgentRefused {
            op: "SetGuestIdentity",
            message: e.to_string(),
        })
}
