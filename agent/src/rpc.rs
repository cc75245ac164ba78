//! The ttrpc service: each RPC checks its request, then calls the module that does the work.
//!
//! Errors become ttrpc statuses with a code the shim can act on (NOT_FOUND, ALREADY_EXISTS,
//! INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL) and the whole error chain as the message. Nothing a
//! request carries can panic the agent; blocking work (mounts, the runtime library) runs on blocking
//! threads.

use crate::error_chain as chain;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agent_protocol::agent::*;
use agent_protocol::agent_ttrpc::AgentService;
use agent_protocol::{MAX_IO_CHUNK, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;

use crate::container::{self, ChildStdio, ContainerError, Runtime};
use crate::identity::{self, IdentityError};
use crate::network::{self, Network, NetworkError};
use crate::pod_pid::{PodPidError, PodPidNamespace};
use crate::reaper::Reaper;
use crate::registry::{ContainerEntry, ProcessEntry, Registry, RegistryError};
use crate::stdio::{self, Stdio, StdioError};
use crate::storage::{self, StorageError, Storages};

/// An RPC's failure: a status code and a message.
#[derive(Debug)]
pub struct RpcError {
    code: Code,
    message: String,
}

impl RpcError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    fn from_err(code: Code, err: &dyn std::error::Error) -> Self {
        Self::new(code, chain(err))
    }
}

impl From<RpcError> for ttrpc::Error {
    fn from(e: RpcError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code, e.message))
    }
}

impl From<RegistryError> for RpcError {
    fn from(e: RegistryError) -> Self {
        let code = match e {
            RegistryError::NoContainer(_) | RegistryError::NoProcess { .. } => Code::NOT_FOUND,
            RegistryError::Exists { .. } => Code::ALREADY_EXISTS,
            RegistryError::TooManyExecs(_) => Code::RESOURCE_EXHAUSTED,
        };
        Self::from_err(code, &e)
    }
}

impl From<StorageError> for RpcError {
    fn from(e: StorageError) -> Self {
        let code = match e {
            StorageError::Mount { .. } | StorageError::Mkdir(..) => Code::INTERNAL,
            StorageError::Conflict { .. } => Code::ALREADY_EXISTS,
            _ => Code::INVALID_ARGUMENT,
        };
        Self::from_err(code, &e)
    }
}

impl From<ContainerError> for RpcError {
    fn from(e: ContainerError) -> Self {
        let code = match e {
            ContainerError::Malformed { .. }
            | ContainerError::TooLarge { .. }
            | ContainerError::Invalid(_)
            | ContainerError::RootfsMissing(_)
            | ContainerError::Path(_) => Code::INVALID_ARGUMENT,
            ContainerError::Cwd(ref c) if c.is_invalid_spec() => Code::INVALID_ARGUMENT,
            ContainerError::Cwd(_) => Code::FAILED_PRECONDITION,
            ContainerError::State { .. }
            | ContainerError::Runtime {
                source: libcontainer::error::LibcontainerError::IncorrectStatus(_),
                ..
            } => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        };
        Self::from_err(code, &e)
    }
}

impl From<StdioError> for RpcError {
    fn from(e: StdioError) -> Self {
        let code = match e {
            StdioError::Closed | StdioError::NoTty => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        };
        Self::from_err(code, &e)
    }
}

impl From<IdentityError> for RpcError {
    fn from(e: IdentityError) -> Self {
        let code = match e {
            IdentityError::SeedTooLarge(_)
            | IdentityError::Hostname(_)
            | IdentityError::Clock(..) => Code::INVALID_ARGUMENT,
            _ => Code::INTERNAL,
        };
        Self::from_err(code, &e)
    }
}

impl From<NetworkError> for RpcError {
    fn from(e: NetworkError) -> Self {
        let code = match e {
            NetworkError::Invalid { .. } | NetworkError::TooMany { .. } => Code::INVALID_ARGUMENT,
            NetworkError::NoSuchNic(_) | NetworkError::NoSuchDevice(_) => Code::NOT_FOUND,
            _ => Code::INTERNAL,
        };
        Self::from_err(code, &e)
    }
}

impl From<PodPidError> for RpcError {
    fn from(e: PodPidError) -> Self {
        let code = match e {
            PodPidError::Ended(_) => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        };
        Self::from_err(code, &e)
    }
}

type RpcResult<T> = Result<T, RpcError>;

/// Runs blocking work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> RpcResult<T> + Send + 'static,
) -> RpcResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RpcError::new(Code::INTERNAL, format!("blocking task failed: {e}")))?
}

struct Sandbox {
    id: String,
    storages: Vec<String>,
}

/// The agent's state and its service.
pub struct Agent {
    runtime: Arc<Runtime>,
    storages: Arc<Storages>,
    reaper: Arc<Reaper>,
    registry: Registry,
    sandbox: Mutex<Option<Sandbox>>,
    pod_pid: PodPidNamespace,
    console_dir: PathBuf,
    console_seq: AtomicU64,
    oom_tx: tokio::sync::mpsc::Sender<OomKills>,
    oom_rx: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<OomKills>>,
}

/// A container's OOM-kill count, as GetOOMEvent reports it.
struct OomKills {
    container_id: String,
    count: u64,
}

/// OOM events queued for GetOOMEvent; more are dropped: each carries the count so far, so the
/// next one, or the count WaitProcess reports with the exit, makes up for a dropped one.
const OOM_QUEUE: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// An agent keeping its state under `state_dir`.
    pub fn new(
        state_dir: &std::path::Path,
        reaper: Arc<Reaper>,
    ) -> Result<Arc<Self>, ContainerError> {
        let runtime = Runtime::new(state_dir)?;
        let console_dir = state_dir.join("console");
        std::fs::create_dir_all(&console_dir)
            .map_err(|e| ContainerError::Io(console_dir.clone(), e))?;
        let (oom_tx, oom_rx) = tokio::sync::mpsc::channel(OOM_QUEUE);
        Ok(Arc::new(Self {
            runtime: Arc::new(runtime),
            storages: Arc::new(Storages::new(state_dir.join("storage"))),
            pod_pid: PodPidNamespace::new(reaper.clone()),
            reaper,
            registry: Registry::default(),
            sandbox: Mutex::new(None),
            console_dir,
            console_seq: AtomicU64::new(0),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
        }))
    }

    /// Polls the containers' OOM counters and queues an event whenever one grew. The events may
    /// come after the process's exit: WaitProcess carries the count too, for the shim to report
    /// the kill before the exit.
    pub fn spawn_oom_watcher(self: &Arc<Self>) {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let Some(agent) = agent.upgrade() else { return };
                for c in agent.registry.all() {
                    let kills = container::oom_kills(&c.cgroup_path);
                    if kills > c.oom_seen.swap(kills, Ordering::Relaxed) {
                        let _ = agent.oom_tx.try_send(OomKills {
                            container_id: c.id.clone(),
                            count: kills,
                        });
                    }
                }
            }
        });
    }

    fn process(&self, container_id: &str, exec_id: &str) -> RpcResult<Arc<ProcessEntry>> {
        Ok(self.registry.get(container_id)?.process(exec_id)?)
    }

    /// Makes a process's stdio: pipes, or a console socket whose pty master a thread receives.
    fn make_stdio(
        &self,
        terminal: bool,
    ) -> RpcResult<(ChildStdio, Option<PendingConsole>, Option<Stdio>)> {
        if terminal {
            let n = self.console_seq.fetch_add(1, Ordering::Relaxed);
            let path = self.console_dir.join(format!("{n}.sock"));
            let _ = std::fs::remove_file(&path);
            let thread = stdio::console_socket(&path)?;
            Ok((
                ChildStdio::Console(path.clone()),
                Some(PendingConsole { path, thread }),
                None,
            ))
        } else {
            let (stdio, child) = Stdio::pipes()?;
            Ok((ChildStdio::Pipes(child), None, Some(stdio)))
        }
    }

    async fn create_container(&self, req: CreateContainerRequest) -> RpcResult<()> {
        let id = req.container_id.clone();
        storage::validate_id("container id", &id)?;
        let reservation = self.registry.reserve(&id)?;

        // Storages, then the overlay root.
        let storages = self.storages.clone();
        let runtime = self.runtime.clone();
        let req = Arc::new(req);
        let mount_req = req.clone();
        let (held, rootfs_mount) = blocking(move || {
            let mut held = Vec::new();
            let release = |held: &[String]| held.iter().for_each(|n| storages.release(n));
            for s in &mount_req.storages {
                match storages.acquire(s) {
                    Ok(name) => held.push(name),
                    Err(e) => {
                        release(&held);
                        return Err(e.into());
                    }
                }
            }
            let mut rootfs_mount = None;
            if let Some(root) = mount_req.rootfs.as_ref() {
                let target = runtime.bundle(&mount_req.container_id).join("rootfs");
                if let Err(e) = storages.mount_overlay(root, &target) {
                    release(&held);
                    return Err(e.into());
                }
                rootfs_mount = Some(target);
            }
            Ok((held, rootfs_mount))
        })
        .await?;

        let result = self.build_container(&id, &req, rootfs_mount.clone()).await;
        match result {
            Ok((pid, mark, stdio, cgroup_path)) => {
                let exit = self.reaper.watch(pid, mark);
                let entry = Arc::new(ContainerEntry {
                    id: id.clone(),
                    cgroup_path,
                    init: Arc::new(ProcessEntry { pid, exit, stdio }),
                    execs: Mutex::default(),
                    storages: held,
                    rootfs_mount,
                    oom_seen: Default::default(),
                });
                self.registry.insert(reservation, entry);
                Ok(())
            }
            Err(e) => {
                let storages = self.storages.clone();
                let runtime = self.runtime.clone();
                let _ = blocking(move || {
                    let _ = runtime.delete(&id, true);
                    if let Some(root) = rootfs_mount {
                        storage::unmount_root(&root);
                    }
                    runtime.remove_bundle(&id);
                    held.iter().for_each(|n| storages.release(n));
                    Ok(())
                })
                .await;
                Err(e)
            }
        }
    }

    /// Puts the real path of the pod's PID namespace (made now if it is the first container to
    /// join it) where the spec names [`agent_protocol::POD_PID_NAMESPACE`], the only namespace
    /// path [`container::prepare_spec`] lets through.
    fn join_pod_namespaces(&self, spec: &mut oci_spec::runtime::Spec) -> RpcResult<()> {
        let Some(list) = spec.linux().as_ref().and_then(|l| l.namespaces().clone()) else {
            return Ok(());
        };
        if !list.iter().any(|ns| ns.path().is_some()) {
            return Ok(());
        }
        let pod = self.pod_pid.path()?;
        let list = list
            .into_iter()
            .map(|mut ns| {
                if ns.path().is_some() {
                    ns.set_path(Some(pod.clone()));
                }
                ns
            })
            .collect();
        if let Some(linux) = spec.linux_mut().as_mut() {
            linux.set_namespaces(Some(list));
        }
        Ok(())
    }

    async fn build_container(
        &self,
        id: &str,
        req: &Arc<CreateContainerRequest>,
        rootfs: Option<PathBuf>,
    ) -> RpcResult<(i32, u64, Stdio, PathBuf)> {
        let mut spec = container::prepare_spec(id, &req.spec_json, rootfs.as_deref())?;
        self.join_pod_namespaces(&mut spec)?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let cgroup_path = container::cgroup_path(&spec);
        let (child, console, stdio) = self.make_stdio(terminal)?;
        let mark = self.reaper.mark();
        let runtime = self.runtime.clone();
        let id_owned = id.to_owned();
        let created = blocking(move || Ok(runtime.create(&id_owned, &spec, child)?)).await;
        let stdio = finish_stdio(created.is_ok(), console, stdio).await?;
        Ok((created?, mark, stdio, cgroup_path))
    }

    async fn exec_process(&self, req: ExecProcessRequest) -> RpcResult<()> {
        let entry = self.registry.get(&req.container_id)?;
        storage::validate_id("exec id", &req.exec_id)?;
        entry.check_exec(&req.exec_id)?;
        let process = container::prepare_process(&req.process_json)?;
        let terminal = process.terminal().unwrap_or(false);
        let (child, console, stdio) = self.make_stdio(terminal)?;
        let mark = self.reaper.mark();
        let runtime = self.runtime.clone();
        let (id, exec_id) = (req.container_id.clone(), req.exec_id.clone());
        let pid = blocking(move || Ok(runtime.exec(&id, &exec_id, &process, child)?)).await;
        let stdio = finish_stdio(pid.is_ok(), console, stdio).await?;
        let pid = pid?;
        let exit = self.reaper.watch(pid, mark);
        entry.add_exec(&req.exec_id, Arc::new(ProcessEntry { pid, exit, stdio }))?;
        Ok(())
    }

    async fn remove_container(&self, req: RemoveContainerRequest) -> RpcResult<()> {
        let entry = self.registry.get(&req.container_id)?;
        let runtime = self.runtime.clone();
        let id = req.container_id.clone();
        let force = req.force;
        blocking(move || Ok(runtime.delete(&id, force)?)).await?;
        // Deleting kills a created or (forced) running container: let the reaper see its end.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), entry.init.wait()).await;
        self.registry.remove(&req.container_id);
        let storages = self.storages.clone();
        let runtime = self.runtime.clone();
        blocking(move || {
            if let Some(root) = &entry.rootfs_mount {
                storage::unmount_root(root);
            }
            runtime.remove_bundle(&entry.id);
            entry.storages.iter().for_each(|n| storages.release(n));
            Ok(())
        })
        .await
    }

    /// ReadStdout or ReadStderr: the next chunk of that stream, `eof` at its end.
    async fn read_stream(
        &self,
        req: ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<ReadStreamResponse> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        let len = Agent::io_len(req.len);
        let data = if stderr {
            process.stdio.read_stderr(len).await
        } else {
            process.stdio.read_stdout(len).await
        }
        .map_err(RpcError::from)?;
        let mut resp = ReadStreamResponse::new();
        resp.eof = data.is_empty();
        resp.data = data;
        Ok(resp)
    }

    fn io_len(len: u32) -> usize {
        match len as usize {
            0 => MAX_IO_CHUNK,
            n => n.min(MAX_IO_CHUNK),
        }
    }
}

/// A console socket waiting for its pty master.
struct PendingConsole {
    path: PathBuf,
    thread: std::thread::JoinHandle<Result<std::os::fd::OwnedFd, StdioError>>,
}

/// After the runtime call: takes the pty master from the console thread (or the pipes as they are).
/// If the call failed, unblocks the console thread with an empty connection.
async fn finish_stdio(
    created: bool,
    console: Option<PendingConsole>,
    stdio: Option<Stdio>,
) -> RpcResult<Stdio> {
    if let Some(stdio) = stdio {
        return Ok(stdio);
    }
    let Some(console) = console else {
        return Err(RpcError::new(Code::INTERNAL, "no stdio"));
    };
    if !created {
        let _ = std::os::unix::net::UnixStream::connect(&console.path);
    }
    let path = console.path.clone();
    let master = blocking(move || {
        console
            .thread
            .join()
            .map_err(|_| RpcError::new(Code::INTERNAL, "console thread panicked"))?
            .map_err(RpcError::from)
    })
    .await;
    let _ = std::fs::remove_file(path);
    Ok(Stdio::tty(master?)?)
}

#[agent_protocol::async_trait]
impl AgentService for Agent {
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        storage::validate_id("sandbox id", &req.sandbox_id).map_err(RpcError::from)?;
        if let Some(s) = lock(&self.sandbox).as_ref() {
            return Err(RpcError::new(
                Code::ALREADY_EXISTS,
                format!("sandbox {:?} already exists", s.id),
            )
            .into());
        }
        if !req.hostname.is_empty() {
            identity::set_hostname(&req.hostname).map_err(RpcError::from)?;
        }
        let storages = self.storages.clone();
        let list = req.storages.clone();
        let held = blocking(move || {
            let mut held = Vec::new();
            for s in &list {
                match storages.acquire(s) {
                    Ok(n) => held.push(n),
                    Err(e) => {
                        held.iter().for_each(|n| storages.release(n));
                        return Err(e.into());
                    }
                }
            }
            Ok(held)
        })
        .await?;
        *lock(&self.sandbox) = Some(Sandbox {
            id: req.sandbox_id,
            storages: held,
        });
        Ok(Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let known = lock(&self.sandbox).as_ref().map(|s| s.id.clone());
        if known.as_deref() != Some(req.sandbox_id.as_str()) {
            return Err(RpcError::new(
                Code::NOT_FOUND,
                format!("sandbox {:?} not found", req.sandbox_id),
            )
            .into());
        }
        for c in self.registry.all() {
            self.remove_container(RemoveContainerRequest {
                container_id: c.id.clone(),
                force: true,
                ..Default::default()
            })
            .await?;
        }
        self.pod_pid.end();
        if let Some(s) = lock(&self.sandbox).take() {
            s.storages.iter().for_each(|n| self.storages.release(n));
        }
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Agent::create_container(self, req).await?;
        Ok(Empty::new())
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.registry
            .get(&req.container_id)
            .map_err(RpcError::from)?;
        let runtime = self.runtime.clone();
        blocking(move || Ok(runtime.start(&req.container_id)?)).await?;
        Ok(Empty::new())
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Agent::remove_container(self, req).await?;
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        Agent::exec_process(self, req).await?;
        Ok(Empty::new())
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let entry = self
            .registry
            .get(&req.container_id)
            .map_err(RpcError::from)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| {
                RpcError::new(
                    Code::INVALID_ARGUMENT,
                    format!("invalid signal {}", req.signal),
                )
            })?;
        if req.exec_id.is_empty() {
            let runtime = self.runtime.clone();
            blocking(move || Ok(runtime.kill(&req.container_id, signal, req.all)?)).await?;
        } else {
            let process = entry.process(&req.exec_id).map_err(RpcError::from)?;
            if process.exited().is_some() {
                return Err(
                    RpcError::new(Code::FAILED_PRECONDITION, "the process has exited").into(),
                );
            }
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(process.pid), signal)
                .map_err(|e| RpcError::from_err(Code::INTERNAL, &e))?;
        }
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let entry = self
            .registry
            .get(&req.container_id)
            .map_err(RpcError::from)?;
        let process = entry.process(&req.exec_id).map_err(RpcError::from)?;
        let mut resp = WaitProcessResponse::new();
        resp.status = process.wait().await;
        // Read after the process was reaped: the kernel counts an OOM kill before it sends the
        // SIGKILL, so a kill that ended the process is in the count.
        resp.oom_kills = container::oom_kills(&entry.cgroup_path);
        Ok(resp)
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        Agent::read_stream(self, req, false).await
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        Agent::read_stream(self, req, true).await
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        if req.data.len() > MAX_IO_CHUNK {
            return Err(RpcError::new(
                Code::INVALID_ARGUMENT,
                format!(
                    "{} bytes exceed the {MAX_IO_CHUNK}-byte write limit",
                    req.data.len()
                ),
            )
            .into());
        }
        let process = self.process(&req.container_id, &req.exec_id)?;
        let n = process
            .stdio
            .write_stdin(&req.data)
            .await
            .map_err(RpcError::from)?;
        let mut resp = WriteStreamResponse::new();
        resp.len = n as u32;
        Ok(resp)
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        process.stdio.close_stdin().await.map_err(RpcError::from)?;
        Ok(Empty::new())
    }

    async fn tty_win_resize(
        &self,
        _: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        let rows = u16::try_from(req.row)
            .map_err(|_| RpcError::new(Code::INVALID_ARGUMENT, "row out of range"))?;
        let cols = u16::try_from(req.column)
            .map_err(|_| RpcError::new(Code::INVALID_ARGUMENT, "column out of range"))?;
        process.stdio.resize(rows, cols).map_err(RpcError::from)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let entry = self
            .registry
            .get(&req.container_id)
            .map_err(RpcError::from)?;
        let resp = blocking(move || {
            let stats = container::basic_stats(&entry.id, &entry.cgroup_path)?;
            let mut resp = StatsContainerResponse::new();
            resp.cpu_usage_ns = stats.cpu_usage_ns;
            resp.cpu_user_ns = stats.cpu_user_ns;
            resp.cpu_system_ns = stats.cpu_system_ns;
            resp.memory_usage = stats.memory_usage;
            resp.memory_max_usage = stats.memory_max_usage;
            resp.memory_limit = stats.memory_limit;
            resp.memory_failcnt = stats.memory_failcnt;
            resp.pids_current = stats.pids_current;
            resp.pids_limit = stats.pids_limit;
            resp.oom_kills = container::oom_kills(&entry.cgroup_path);
            Ok(resp)
        })
        .await?;
        Ok(resp)
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let entry = self
            .registry
            .get(&req.container_id)
            .map_err(RpcError::from)?;
        blocking(move || {
            Ok(container::update(
                &entry.id,
                &entry.cgroup_path,
                &req.resources_json,
            )?)
        })
        .await?;
        Ok(Empty::new())
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.registry
            .get(&req.container_id)
            .map_err(RpcError::from)?;
        let runtime = self.runtime.clone();
        blocking(move || Ok(runtime.pause(&req.container_id)?)).await?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.registry
            .get(&req.container_id)
            .map_err(RpcError::from)?;
        let runtime = self.runtime.clone();
        blocking(move || Ok(runtime.resume(&req.container_id)?)).await?;
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<OOMEvent> {
        let kills = self
            .oom_rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| RpcError::new(Code::UNAVAILABLE, "the agent is shutting down"))?;
        let mut resp = OOMEvent::new();
        resp.container_id = kills.container_id;
        resp.oom_kills = kills.count;
        Ok(resp)
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let entry = self
            .registry
            .get(&req.container_id)
            .map_err(RpcError::from)?;
        let pids = blocking(move || Ok(container::pids(&entry.id, &entry.cgroup_path)?)).await?;
        let mut resp = ListProcessesResponse::new();
        resp.pids = pids;
        Ok(resp)
    }

    async fn check(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<CheckResponse> {
        let mut resp = CheckResponse::new();
        resp.serving = true;
        Ok(resp)
    }

    async fn version(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<VersionResponse> {
        let mut resp = VersionResponse::new();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_owned();
        resp.protocol_version = PROTOCOL_VERSION;
        Ok(resp)
    }

    async fn set_guest_identity(
        &self,
        _: &TtrpcContext,
        req: SetGuestIdentityRequest,
    ) -> ttrpc::Result<Empty> {
        if req.random_seed.len() > identity::MAX_SEED {
            return Err(RpcError::from(IdentityError::SeedTooLarge(req.random_seed.len())).into());
        }
        if !req.hostname.is_empty() {
            identity::validate_hostname(&req.hostname).map_err(RpcError::from)?;
        }
        blocking(move || {
            if !req.hostname.is_empty() {
                identity::set_hostname(&req.hostname)?;
            }
            if !req.random_seed.is_empty() {
                identity::reseed(&req.random_seed)?;
            }
            if req.clock_sec != 0 || req.clock_nsec != 0 {
                identity::set_clock(req.clock_sec, req.clock_nsec)?;
            }
            Ok(())
        })
        .await?;
        Ok(Empty::new())
    }

    async fn update_interface(
        &self,
        _: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<Empty> {
        let iface = req.interface.into_option().unwrap_or_default();
        let spec = network::InterfaceSpec::parse(&iface).map_err(RpcError::from)?;
        let net = Network::connect().map_err(RpcError::from)?;
        net.update_interface(&spec).await.map_err(RpcError::from)?;
        Ok(Empty::new())
    }

    async fn update_routes(
        &self,
        _: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<Empty> {
        let routes = network::parse_routes(&req.routes).map_err(RpcError::from)?;
        let net = Network::connect().map_err(RpcError::from)?;
        net.update_routes(&routes).await.map_err(RpcError::from)?;
        Ok(Empty::new())
    }

    async fn add_arp_neighbors(
        &self,
        _: &TtrpcContext,
        req: AddARPNeighborsRequest,
    ) -> ttrpc::Result<Empty> {
        let neighbors = network::parse_neighbors(&req.neighbors).map_err(RpcError::from)?;
        let net = Network::connect().map_err(RpcError::from)?;
        net.add_neighbors(&neighbors)
            .await
            .map_err(RpcError::from)?;
        Ok(Empty::new())
    }
}
