//! containerd's task service for one pod: containers and their processes, each backed by the
//! agent in the pod's microVM, with the events containerd expects.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::agent::{
    ContainerRequest, ExecProcessRequest as AgentExec, ProcessRequest, RemoveContainerRequest,
    SignalProcessRequest, TtyWinResizeRequest, UpdateContainerRequest,
};
use agent_protocol::AgentClient;
use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryOomControl, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim::util::convert_to_any;
use log::{debug, info, warn};
use oci_spec::runtime::Spec;
use rootfs_split::{check_id, InvalidId, RootfsMount};
use serde::Deserialize;
use tokio::sync::Mutex as AsyncMutex;

use super::agent_reports::{checked_stats, Lie, ReportPace, REPORT_BURST, REPORT_INTERVAL};
use super::process::{OomReports, Process, ProcessStatus, Publish};
use super::sandbox::{Sandbox, SandboxError};
use super::spec::guest_spec;
use super::stdio::{StdioPaths, StdioPumps};
use crate::config::Config;

/// CRI's annotations: which pod a container belongs to, and whether it is the pod's sandbox.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// How long output may stay open after its process ended before the exit is reported anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// Status reported when the VM (or the agent) went away before the process's end was known.
const LOST_STATUS: u32 = 255;

type TtrpcResult<T> = ttrpc::Result<T>;

fn rpc_error(code: ttrpc::Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// An id that cannot be one plain file name: refused before it reaches a path or the guest.
fn invalid_id(e: InvalidId) -> ttrpc::Error {
    rpc_error(ttrpc::Code::INVALID_ARGUMENT, e)
}

fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    rpc_error(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}

/// The agent's error, passed on with its code (the agent speaks ttrpc 0.10, containerd 0.9).
/// `guest` describes the guest for a transport failure (no answer in time, a broken connection),
/// where the agent's own words are missing: whether the microVM still runs, its console's end.
fn from_agent(op: &str, e: ::ttrpc::Error, guest: impl FnOnce() -> String) -> ttrpc::Error {
    match e {
        ::ttrpc::Error::RpcStatus(s) => {
            let code =
                <ttrpc::Code as containerd_shim::protos::protobuf::Enum>::from_i32(s.code.value())
                    .unwrap_or(ttrpc::Code::UNKNOWN);
            rpc_error(code, format!("{op}: {}", s.message))
        }
        other => {
            let guest = guest();
            log::error!("{op}: {other}; {guest}");
            rpc_error(ttrpc::Code::UNAVAILABLE, format!("{op}: {other}; {guest}"))
        }
    }
}

/// A sandbox's failure to start or to create a container in it: UNAVAILABLE when the agent gave
/// no answer (as [`from_agent`] says it), FAILED_PRECONDITION otherwise.
fn sandbox_error(what: String, e: SandboxError) -> ttrpc::Error {
    let code = match e {
        SandboxError::AgentNoAnswer { .. } => ttrpc::Code::UNAVAILABLE,
        _ => ttrpc::Code::FAILED_PRECONDITION,
    };
    rpc_error(code, format!("{what}: {e}"))
}

fn agent_ctx() -> ::ttrpc::context::Context {
    ::ttrpc::context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

/// Whether the agent said the process is already gone.
fn is_gone(e: &::ttrpc::Error) -> bool {
    matches!(e, ::ttrpc::Error::RpcStatus(s) if s.code.value() == ::ttrpc::Code::NOT_FOUND as i32)
}

struct Container {
    id: String,
    bundle: String,
    /// Whether deleting this container ends the sandbox (a pod's sandbox container, or a plain
    /// `ctr run` container, which is a sandbox of its own).
    owns_sandbox: bool,
    /// Whether its processes run in the guest: all but a CRI pod's sandbox container. Its
    /// pause process would hold namespaces that nothing joins (the pod's containers share the
    /// VM's), so the microVM itself stands for it: it runs while the VM does.
    in_guest: bool,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: std::sync::atomic::AtomicBool,
    /// What containerd was told of the container's OOM kills. Held while a TaskOOM or the
    /// TaskExit of one of its processes is published: a kill goes out before the exit it caused.
    oom: Arc<AsyncMutex<OomReports>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found(format!("exec {exec_id} of container {}", self.id)))
    }
}

#[derive(Default)]
struct Pod {
    sandbox: Option<Arc<Sandbox>>,
    containers: HashMap<String, Arc<Container>>,
}

pub struct TaskService {
    config: Arc<Config>,
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    pod: Arc<Mutex<Pod>>,
    /// Serialises the calls that make or end containers (and the sandbox).
    lifecycle: AsyncMutex<()>,
}

impl TaskService {
    pub fn new(
        config: Arc<Config>,
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        TaskService {
            config,
            namespace: namespace.to_owned(),
            publisher: Arc::new(publisher),
            exit,
            pod: Arc::default(),
            lifecycle: AsyncMutex::new(()),
        }
    }

    fn pod(&self) -> std::sync::MutexGuard<'_, Pod> {
        self.pod.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.pod()
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("container {id}")))
    }

    /// Container `id`, refused for `op` if it has no processes in the guest.
    fn guest_container(&self, id: &str, op: &str) -> TtrpcResult<Arc<Container>> {
        let container = self.container(id)?;
        if !container.in_guest {
            return Err(rpc_error(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "{op}: {id} is the pod's sandbox, which the microVM stands for: it has no \
                     process of its own (its containers do)"
                ),
            ));
        }
        Ok(container)
    }

    fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.pod()
            .sandbox
            .clone()
            .ok_or_else(|| rpc_error(ttrpc::Code::FAILED_PRECONDITION, "no sandbox in this shim"))
    }

    /// [`from_agent`] with this pod's guest described.
    fn agent_failure(&self, op: &str, e: ::ttrpc::Error) -> ttrpc::Error {
        from_agent(op, e, || match self.sandbox() {
            Ok(sandbox) => sandbox.guest_report(),
            Err(_) => "no sandbox".to_owned(),
        })
    }

    fn agent(&self) -> TtrpcResult<Arc<AgentClient>> {
        Ok(self.sandbox()?.agent())
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event).await;
    }

    /// Watches `process` of `container` to its end: its status from the agent, its output
    /// drained, then the exit recorded and published, after a TaskOOM if the container's OOM
    /// kills (read by the agent after the process was reaped) include one not published yet.
    fn watch_exit(&self, container: &Container, process: Arc<Process>, mut pumps: StdioPumps) {
        let sandbox = self.sandbox();
        let (publisher, namespace) = (self.publisher.clone(), self.namespace.clone());
        let oom = container.oom.clone();
        tokio::spawn(async move {
            let (status, oom_kills) = match sandbox {
                Ok(sandbox) => {
                    let agent = sandbox.agent();
                    let mut req = ProcessRequest::new();
                    req.container_id = process.container_id.clone();
                    req.exec_id = process.exec_id.clone();
                    match agent
                        .wait_process(::ttrpc::context::with_timeout(0), &req)
                        .await
                    {
                        Ok(r) => (u32::try_from(r.status).unwrap_or(LOST_STATUS), r.oom_kills),
                        Err(e) => {
                            warn!(
                                "waiting for {}: {e}; {}",
                                process.event_id(),
                                sandbox.guest_report()
                            );
                            (LOST_STATUS, 0)
                        }
                    }
                }
                Err(_) => (LOST_STATUS, 0),
            };
            pumps.drained(DRAIN_LIMIT).await;
            let mut reports = oom.lock().await;
            for event in reports.exit(oom_kills) {
                match event {
                    Publish::Oom => {
                        info!(
                            "container {}: OOM kill reported with the exit of {}",
                            process.container_id,
                            process.event_id()
                        );
                        publish_oom(&publisher, &namespace, &process.container_id).await;
                    }
                    Publish::Exit => {
                        let exited_at = process.set_exited(status);
                        publish_exit(&publisher, &namespace, &process, status, exited_at).await;
                    }
                }
            }
        });
    }

    /// Forwards the agent's OOM events for as long as the sandbox lives, but for a kill an exit
    /// reported already, and for a container this shim no longer has.
    fn forward_oom_events(&self, sandbox: &Sandbox) {
        let (publisher, namespace) = (self.publisher.clone(), self.namespace.clone());
        let pod = self.pod.clone();
        let (agent, sandbox_id, lies) = (sandbox.agent(), sandbox.id.clone(), sandbox.lies());
        tokio::spawn(async move {
            // The events are the guest's: however fast it answers, the shim asks (and
            // publishes) at a bounded rate.
            let mut pace = ReportPace::new(REPORT_BURST, REPORT_INTERVAL);
            loop {
                let wait = pace.wait_before_next(Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                match agent
                    .get_oom_event(
                        ::ttrpc::context::with_timeout(0),
                        &agent_protocol::agent::Empty::new(),
                    )
                    .await
                {
                    Ok(ev) => {
                        let container = pod
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .containers
                            .get(&ev.container_id)
                            .cloned();
                        let Some(container) = container else {
                            lies.warn(&sandbox_id, Lie::UnknownContainer, || {
                                format!(
                                    "reported an OOM kill in {:?}, a container this pod does not have",
                                    ev.container_id
                                )
                            });
                            continue;
                        };
                        let mut reports = container.oom.lock().await;
                        if reports.event(ev.oom_kills).contains(&Publish::Oom) {
                            publish_oom(&publisher, &namespace, &container.id).await;
                        }
                    }
                    Err(e) => {
                        debug!("OOM events end: {e}");
                        // The agent is gone (the VM stopped, or its connection broke), not one
                        // of its answers: so is the sandbox that the VM stands for.
                        if !matches!(e, ::ttrpc::Error::RpcStatus(_)) {
                            let sandbox = pod
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .containers
                                .values()
                                .find(|c| !c.in_guest)
                                .cloned();
                            if let Some(c) = sandbox {
                                end_pod_sandbox(&publisher, &namespace, &c, LOST_STATUS).await;
                            }
                        }
                        return;
                    }
                }
            }
        });
    }

    async fn create_inner(&self, req: &CreateTaskRequest) -> TtrpcResult<()> {
        check_id("container", &req.id).map_err(invalid_id)?;
        let path = Path::new(&req.bundle).join("config.json");
        let bad = |why: String| {
            rpc_error(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("the bundle's config.json: {why}"),
            )
        };
        // serde_json directly: oci-spec's own loader drops the parser's message and position.
        let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let spec: Spec = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let kind = annotations.get(CONTAINER_TYPE).map(String::as_str);
        let joins = kind == Some("container");
        let pod_sandbox = kind == Some("sandbox");
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                kind: m.type_.clone(),
                source: m.source.clone().into(),
                options: m.options.clone(),
            })
            .collect();
        // What can never run is refused before a VM is booted for it: the same checks as the
        // container's creation below, with no volume shared yet.
        let refuse = |e: String| {
            rpc_error(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {}: {e}", req.id),
            )
        };
        rootfs_split::lower_layers(&rootfs).map_err(|e| refuse(e.to_string()))?;
        let mut no_share = |source: &Path, _read_only: bool| Ok(source.to_path_buf());
        guest_spec(&spec, &mut no_share).map_err(|e| refuse(e.to_string()))?;
        let started = Instant::now();

        let (sandbox, split) = if joins {
            let pod_id = annotations.get(SANDBOX_ID).cloned().unwrap_or_default();
            check_id("sandbox", &pod_id).map_err(invalid_id)?;
            let sandbox = self.sandbox()?;
            if sandbox.id != pod_id {
                return Err(rpc_error(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!(
                        "container {} belongs to pod {pod_id:?}, this shim serves {:?}",
                        req.id, sandbox.id
                    ),
                ));
            }
            (sandbox, None)
        } else {
            if let Some(s) = &self.pod().sandbox {
                return Err(rpc_error(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("this shim already serves sandbox {}", s.id),
                ));
            }
            let (sandbox, split) = Sandbox::start(self.config.clone(), &req.id, &spec, pod_sandbox)
                .await
                .map_err(|e| sandbox_error(format!("sandbox {}", req.id), e))?;
            let sandbox = Arc::new(sandbox);
            self.pod().sandbox = Some(sandbox.clone());
            self.forward_oom_events(&sandbox);
            (sandbox, Some(split))
        };

        let container_start = Instant::now();
        let created = if pod_sandbox {
            Ok(())
        } else {
            sandbox
                .create_container(&req.id, &spec, rootfs, req.terminal)
                .await
                .map_err(|e| sandbox_error(format!("container {}", req.id), e))
        };
        if let Err(e) = created {
            if !joins {
                self.pod().sandbox = None;
                sandbox.stop().await;
            }
            return Err(e);
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Arc::new(Process::new(&req.id, "", stdio, Vec::new()));
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            owns_sandbox: !joins,
            in_guest: !pod_sandbox,
            init,
            execs: Mutex::default(),
            paused: Default::default(),
            oom: Arc::default(),
        });
        self.pod().containers.insert(req.id.clone(), container);
        if let Some(split) = split {
            split.log(&req.id, container_start.elapsed());
            let s = sandbox.clone();
            tokio::spawn(async move { s.refill_pool().await });
        }
        debug!("container {} created in {:?}", req.id, started.elapsed());
        Ok(())
    }
}

impl TaskService {
    /// Freezes (or thaws) a container's processes in the guest, and says so to containerd.
    async fn set_paused(&self, id: &str, pause: bool) -> TtrpcResult<Empty> {
        let container = self.guest_container(id, if pause { "pause" } else { "resume" })?;
        let mut r = ContainerRequest::new();
        r.container_id = id.to_owned();
        let agent = self.agent()?;
        let (op, topic, event): (_, _, Box<dyn MessageDyn>) = if pause {
            agent
                .pause_container(agent_ctx(), &r)
                .await
                .map_err(|e| self.agent_failure("PauseContainer", e))?;
            let event = TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            };
            ("paused", topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event))
        } else {
            agent
                .resume_container(agent_ctx(), &r)
                .await
                .map_err(|e| self.agent_failure("ResumeContainer", e))?;
            let event = TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            };
            ("resumed", topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event))
        };
        container
            .paused
            .store(pause, std::sync::atomic::Ordering::SeqCst);
        debug!("container {id} {op}");
        self.publish(topic, event).await;
        Ok(Empty::new())
    }
}

async fn publish(
    publisher: &RemotePublisher,
    namespace: &str,
    topic: &str,
    event: Box<dyn MessageDyn>,
) {
    if let Err(e) = publisher
        .publish(ttrpc::context::Context::default(), topic, namespace, event)
        .await
    {
        warn!("publishing {topic}: {e}");
    }
}

async fn publish_exit(
    publisher: &RemotePublisher,
    namespace: &str,
    process: &Process,
    exit_status: u32,
    exited_at: Timestamp,
) {
    let event = TaskExit {
        container_id: process.container_id.clone(),
        id: process.event_id().to_owned(),
        pid: std::process::id(),
        exit_status,
        exited_at: MessageField::some(exited_at),
        ..Default::default()
    };
    publish(
        publisher,
        namespace,
        topics::TASK_EXIT_EVENT_TOPIC,
        Box::new(event),
    )
    .await;
}

/// Ends a pod's sandbox container (the microVM stands for it) with `exit_status` and says so,
/// unless it had ended already.
async fn end_pod_sandbox(
    publisher: &RemotePublisher,
    namespace: &str,
    container: &Container,
    exit_status: u32,
) {
    if let Ok(at) = container.init.end(exit_status) {
        info!("pod sandbox {} ended ({exit_status})", container.id);
        publish_exit(publisher, namespace, &container.init, exit_status, at).await;
    }
}

/// What a signal does to a pod's sandbox container, as it would to the pause process it stands
/// for (pid 1 of its namespace): SIGKILL ends it (137), SIGINT and SIGTERM make it exit 0, any
/// other signal is ignored.
fn pod_sandbox_exit_on(signal: u32) -> Option<u32> {
    match signal as libc::c_int {
        libc::SIGKILL => Some(128 + libc::SIGKILL as u32),
        libc::SIGINT | libc::SIGTERM => Some(0),
        _ => None,
    }
}

async fn publish_oom(publisher: &RemotePublisher, namespace: &str, container_id: &str) {
    let event = TaskOOM {
        container_id: container_id.to_owned(),
        ..Default::default()
    };
    publish(
        publisher,
        namespace,
        topics::TASK_OOM_EVENT_TOPIC,
        Box::new(event),
    )
    .await;
}

fn containerd_status(
    p: &Process,
    paused: bool,
) -> (
    Status,
    u32,
    MessageField<containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp>,
) {
    match p.status() {
        ProcessStatus::Created => (Status::CREATED, 0, MessageField::none()),
        ProcessStatus::Running if paused => (Status::PAUSED, 0, MessageField::none()),
        ProcessStatus::Running => (Status::RUNNING, 0, MessageField::none()),
        ProcessStatus::Stopped {
            exit_status,
            exited_at,
        } => (Status::STOPPED, exit_status, MessageField::some(exited_at)),
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(rpc_error(
                ttrpc::Code::UNIMPLEMENTED,
                "restoring a container from a checkpoint is not supported",
            ));
        }
        let _serial = self.lifecycle.lock().await;
        if self.pod().containers.contains_key(&req.id) {
            return Err(rpc_error(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        self.create_inner(&req).await?;
        let container = self.container(&req.id)?;
        if container.in_guest {
            // Output is copied from creation on, as runc's shim does: nothing written before
            // the start is lost.
            let agent = self.agent()?;
            let pumps = StdioPumps::start(agent, &req.id, "", &container.init.stdio);
            self.watch_exit(&container, container.init.clone(), pumps);
        }
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid: std::process::id(),
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
        info!("container {} created", req.id);
        Ok(CreateTaskResponse {
            pid: std::process::id(),
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if process.status() != ProcessStatus::Created {
            return Err(rpc_error(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("{} is not in the created state", process.event_id()),
            ));
        }
        let agent = self.agent()?;
        let pid = std::process::id();
        if req.exec_id.is_empty() {
            if container.in_guest {
                let mut r = ContainerRequest::new();
                r.container_id = req.id.clone();
                agent
                    .start_container(agent_ctx(), &r)
                    .await
                    .map_err(|e| self.agent_failure("StartContainer", e))?;
            }
            process.set_running();
            let event = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let mut r = AgentExec::new();
            r.container_id = req.id.clone();
            r.exec_id = req.exec_id.clone();
            r.process_json = process.process_json.clone();
            agent
                .exec_process(agent_ctx(), &r)
                .await
                .map_err(|e| self.agent_failure("ExecProcess", e))?;
            process.set_running();
            let pumps = StdioPumps::start(agent, &req.id, &req.exec_id, &process.stdio);
            self.watch_exit(&container, process.clone(), pumps);
            let event = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
                .await;
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let _serial = self.lifecycle.lock().await;
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let (exit_status, exited_at) = match process.status() {
            ProcessStatus::Running => {
                return Err(rpc_error(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("{} is still running: kill it first", process.event_id()),
                ))
            }
            ProcessStatus::Stopped {
                exit_status,
                exited_at,
            } => (exit_status, MessageField::some(exited_at)),
            ProcessStatus::Created => (0, MessageField::some(super::process::now())),
        };
        let pid = std::process::id();
        if !req.exec_id.is_empty() {
            container
                .execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&req.exec_id);
            return Ok(DeleteResponse {
                pid,
                exit_status,
                exited_at,
                ..Default::default()
            });
        }
        let sandbox = self.sandbox()?;
        if container.in_guest {
            let mut r = RemoveContainerRequest::new();
            r.container_id = req.id.clone();
            r.force = true;
            if let Err(e) = sandbox.agent().remove_container(agent_ctx(), &r).await {
                warn!("removing container {} in the guest: {e}", req.id);
            }
        }
        // The sandbox's owner keeps its shares until the VM has stopped (below): the VMM
        // holds files in them open until then.
        if !container.owns_sandbox {
            sandbox.forget_container(&req.id).await;
        }
        // Unblocks a waiter of a container that was created but never started.
        process.set_exited(exit_status);
        self.pod().containers.remove(&req.id);
        if container.owns_sandbox {
            let stopped = {
                let mut pod = self.pod();
                let others: Vec<Arc<Container>> = pod.containers.drain().map(|(_, c)| c).collect();
                for c in &others {
                    c.init.set_exited(LOST_STATUS);
                }
                pod.sandbox.take()
            };
            if let Some(s) = stopped {
                s.stop().await;
                info!("sandbox {} stopped", s.id);
            }
        }
        let event = TaskDelete {
            container_id: req.id.clone(),
            pid,
            exit_status,
            exited_at: exited_at.clone(),
            id: req.id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(DeleteResponse {
            pid,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        if !self.container(&req.id)?.in_guest {
            return Ok(PidsResponse::default());
        }
        let mut r = ContainerRequest::new();
        r.container_id = req.id.clone();
        let list = self
            .agent()?
            .list_processes(agent_ctx(), &r)
            .await
            .map_err(|e| self.agent_failure("ListProcesses", e))?;
        let processes = list
            .pids
            .into_iter()
            .map(|pid| ProcessInfo {
                pid: pid as u32,
                ..Default::default()
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.set_paused(&req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.set_paused(&req.id, false).await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if process.is_stopped() {
            return Err(not_found(format!(
                "{}: process already finished",
                process.event_id()
            )));
        }
        if !container.in_guest {
            if let Some(status) = pod_sandbox_exit_on(req.signal) {
                end_pod_sandbox(&self.publisher, &self.namespace, &container, status).await;
            }
            return Ok(Empty::new());
        }
        let mut r = SignalProcessRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.signal = req.signal;
        r.all = req.all;
        match self.agent()?.signal_process(agent_ctx(), &r).await {
            Ok(_) => Ok(Empty::new()),
            Err(e) if is_gone(&e) => Err(not_found(format!(
                "{}: process already finished",
                process.event_id()
            ))),
            Err(e) => Err(self.agent_failure("SignalProcess", e)),
        }
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        check_id("exec", &req.exec_id).map_err(invalid_id)?;
        let container = self.guest_container(&req.id, "exec")?;
        if container.init.is_stopped() {
            return Err(rpc_error(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let spec = req.spec.as_ref().ok_or_else(|| {
            rpc_error(ttrpc::Code::INVALID_ARGUMENT, "exec without a process spec")
        })?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // One parse: the process spec as the agent gets it (the request's terminal, not the
        // spec's, counts) and as the shim reads its user (the guest may own files as it too).
        let bad_spec = |e: serde_json::Error| {
            rpc_error(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("exec {}: its process spec: {e}", req.exec_id),
            )
        };
        let mut process_value: serde_json::Value =
            serde_json::from_slice(&spec.value).map_err(bad_spec)?;
        let process = oci_spec::runtime::Process::deserialize(&process_value).map_err(bad_spec)?;
        // An object: a process spec deserialised from it.
        process_value["terminal"] = serde_json::Value::Bool(req.terminal);
        let process_json = serde_json::to_vec(&process_value).map_err(bad_spec)?;
        self.sandbox()?
            .allow_user(process.user())
            .map_err(|e| rpc_error(ttrpc::Code::INVALID_ARGUMENT, e))?;
        {
            let mut execs = container.execs.lock().unwrap_or_else(|e| e.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(rpc_error(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            execs.insert(
                req.exec_id.clone(),
                Arc::new(Process::new(&req.id, &req.exec_id, stdio, process_json)),
            );
        }
        let event = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let container = self.guest_container(&req.id, "resize pty")?;
        let _ = container.process(&req.exec_id)?;
        let mut r = TtyWinResizeRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.row = req.height;
        r.column = req.width;
        self.agent()?
            .tty_win_resize(agent_ctx(), &r)
            .await
            .map_err(|e| self.agent_failure("TtyWinResize", e))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        // containerd closes its end of the stdin FIFO before asking: the copy sees the end of
        // the FIFO, hands over what it read and then closes the process's stdin itself, so
        // nothing written before the close is lost.
        let container = self.container(&req.id)?;
        let _ = container.process(&req.exec_id)?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let _ = self.guest_container(&req.id, "update")?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| rpc_error(ttrpc::Code::INVALID_ARGUMENT, "update without resources"))?;
        let mut r = UpdateContainerRequest::new();
        r.container_id = req.id.clone();
        r.resources_json = resources.value.clone();
        self.agent()?
            .update_container(agent_ctx(), &r)
            .await
            .map_err(|e| self.agent_failure("UpdateContainer", e))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let process = self.container(&req.id)?.process(&req.exec_id)?;
        let (exit_status, exited_at) = process.wait().await;
        Ok(WaitResponse {
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let _ = self.guest_container(&req.id, "stats")?;
        let mut r = ContainerRequest::new();
        r.container_id = req.id.clone();
        let sandbox = self.sandbox()?;
        let s = sandbox
            .agent()
            .stats_container(agent_ctx(), &r)
            .await
            .map_err(|e| self.agent_failure("StatsContainer", e))?;
        let (s, wrong) = checked_stats(s, sandbox.size(), sandbox.age());
        if !wrong.is_empty() {
            sandbox.lies().warn(&sandbox.id, Lie::ImpossibleStats, || {
                format!(
                    "reported impossible statistics of {} ({}): bounded by the guest's size",
                    req.id,
                    wrong.join(", ")
                )
            });
        }
        let entry = |usage, max, limit, failcnt| {
            MessageField::some(MemoryEntry {
                usage,
                max,
                limit,
                failcnt,
                ..Default::default()
            })
        };
        let metrics = Metrics {
            cpu: MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: s.cpu_usage_ns,
                    user: s.cpu_user_ns,
                    kernel: s.cpu_system_ns,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: entry(
                    s.memory_usage,
                    s.memory_max_usage,
                    s.memory_limit,
                    s.memory_failcnt,
                ),
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            }),
            memory_oom_control: MessageField::some(MemoryOomControl {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        };
        let stats = convert_to_any(Box::new(metrics))
            .map_err(|e| rpc_error(ttrpc::Code::INTERNAL, format!("encoding the metrics: {e}")))?;
        Ok(StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let paused = container.paused.load(std::sync::atomic::Ordering::SeqCst);
        let (status, exit_status, exited_at) = containerd_status(&process, paused);
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: container.bundle.clone(),
            pid: std::process::id(),
            status: status.into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status,
            exited_at,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let _ = self.container(&req.id)?;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        let pod = self.pod();
        if pod.containers.is_empty() && pod.sandbox.is_none() {
            info!("no container left: the shim exits");
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(e: ttrpc::Error) -> (i32, String) {
        match e {
            ttrpc::Error::RpcStatus(s) => (s.code.value(), s.message),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn agent_errors_keep_their_code_and_a_transport_failure_describes_the_guest() {
        let refused = ::ttrpc::Error::RpcStatus(::ttrpc::get_status(
            ::ttrpc::Code::NOT_FOUND,
            "container c1 not found",
        ));
        let (code, message) = status_of(from_agent("StartContainer", refused, || {
            panic!("the agent answered: nothing to describe")
        }));
        assert_eq!(code, ttrpc::Code::NOT_FOUND as i32);
        assert_eq!(message, "StartContainer: container c1 not found");

        let lost = ::ttrpc::Error::Others("Request deadline elapsed".into());
        let (code, message) = status_of(from_agent("StartContainer", lost, || {
            "the microVM runs; the guest console ends with:\nlast line".to_owned()
        }));
        assert_eq!(code, ttrpc::Code::UNAVAILABLE as i32);
        assert!(
            message.starts_with("StartContainer: ") && message.contains("Request deadline elapsed"),
            "{message}"
        );
        assert!(message.ends_with("the microVM runs; the guest console ends with:\nlast line"));
    }

    #[test]
    fn a_pod_sandbox_takes_signals_as_its_pause_process_would() {
        assert_eq!(pod_sandbox_exit_on(libc::SIGKILL as u32), Some(137));
        assert_eq!(pod_sandbox_exit_on(libc::SIGTERM as u32), Some(0));
        assert_eq!(pod_sandbox_exit_on(libc::SIGINT as u32), Some(0));
        for ignored in [
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGCHLD,
            libc::SIGWINCH,
            0,
            4096,
        ] {
            assert_eq!(
                pod_sandbox_exit_on(ignored as u32),
                None,
                "signal {ignored}"
            );
        }
    }

    #[test]
    fn a_sandbox_whose_agent_gave_no_answer_is_unavailable() {
        let e = SandboxError::AgentNoAnswer {
            op: "CreateContainer",
            error: "ttrpc err: Request deadline elapsed".into(),
            guest: "the microVM is gone; the guest console is empty".into(),
        };
        let (code, message) = status_of(sandbox_error("container c1".into(), e));
        assert_eq!(code, ttrpc::Code::UNAVAILABLE as i32);
        assert_eq!(
            message,
            "container c1: no answer from the agent to CreateContainer (ttrpc err: Request deadline \
             elapsed); the microVM is gone; the guest console is empty"
        );
        let e = SandboxError::AgentRefused {
            op: "CreateSandbox",
            message: "bad hostname".into(),
        };
        let (code, message) = status_of(sandbox_error("sandbox p1".into(), e));
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION as i32);
        assert_eq!(
            message,
            "sandbox p1: the agent refused CreateSandbox: bad hostname"
        );
    }
}
