//! The agent as a host process (root) on a unix socket, driven through the protocol crate's client,
//! with a busybox bundle.
//!
//! Needs root, cgroups and /bin/busybox (busybox-static). Without them each test prints why and
//! passes, unless `RUND_REQUIRE_AGENT_TESTS=1`, which turns the skip into a failure.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use agent_protocol::agent::*;
use agent_protocol::client::{client_from_stream, connect_unix};
use agent_protocol::AgentClient;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use ttrpc::Code;

const BUSYBOX: &str = "/bin/busybox";

/// Why these tests cannot run here, if they cannot.
fn missing_requirement() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("the agent's host tests need root".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!(
            "{BUSYBOX} is missing (apt-get install busybox-static)"
        ));
    }
    if !Path::new("/sys/fs/cgroup/memory").is_dir()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        return Some("no cgroup v1 memory hierarchy nor cgroup2 at /sys/fs/cgroup".into());
    }
    None
}

/// Returns true if the test must be skipped (after printing why); panics instead when
/// RUND_REQUIRE_AGENT_TESTS=1.
fn skip() -> bool {
    let Some(reason) = missing_requirement() else {
        return false;
    };
    if std::env::var("RUND_REQUIRE_AGENT_TESTS").as_deref() == Ok("1") {
        panic!("required agent test cannot run: {reason}");
    }
    eprintln!("skipped: {reason}");
    true
}

/// A busybox root: /bin/busybox and a symlink per applet.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    root
}

fn process(args: &[&str], terminal: bool) -> Value {
    json!({
        "terminal": terminal,
        "args": args,
        "env": ["PATH=/bin", "HOME=/root", "TERM=xterm"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "capabilities": {
            "bounding": ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
            "effective": ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
            "permitted": ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"]
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

/// A runnable spec for `args` in `root`.
fn spec(root: &Path, args: &[&str], terminal: bool, resources: Option<Value>) -> Value {
    let mut linux = json!({
        "namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}
        ],
        "maskedPaths": ["/proc/kcore"],
        "readonlyPaths": ["/proc/sys"]
    });
    if let Some(r) = resources {
        linux["resources"] = r;
    }
    json!({
        "ociVersion": "1.0.2",
        "process": process(args, terminal),
        "root": {"path": root, "readonly": false},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": linux
    })
}

/// A running agent, killed when dropped.
struct AgentProcess {
    child: Child,
    dir: tempfile::TempDir,
    client: AgentClient,
    rootfs: PathBuf,
    prefix: String,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProcess {
    async fn start(prefix: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rund-agent"));
        cmd.arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"));
        // SAFETY: the closure runs in the forked child before exec and only makes a syscall.
        unsafe {
            cmd.pre_exec(|| {
                // Its own UTS namespace: SetGuestIdentity's hostname must not rename this host.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().unwrap();
        let mut client = None;
        for _ in 0..200 {
            if socket.exists() {
                if let Ok(c) = connect_unix(&socket).await {
                    client = Some(c);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let rootfs = busybox_rootfs(dir.path());
        AgentProcess {
            child,
            client: client.expect("the agent did not listen"),
            dir,
            rootfs,
            prefix: format!("{prefix}-{}", std::process::id()),
        }
    }

    fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    async fn create(&self, name: &str, spec: &Value) -> ttrpc::Result<String> {
        let id = self.id(name);
        let mut req = CreateContainerRequest::new();
        req.container_id = id.clone();
        req.spec_json = serde_json::to_vec(spec).unwrap();
        self.client.create_container(ctx(), &req).await?;
        Ok(id)
    }

    async fn run(&self, name: &str, args: &[&str]) -> String {
        let id = self
            .create(name, &spec(&self.rootfs, args, false, None))
            .await
            .unwrap();
        self.client
            .start_container(ctx(), &container_req(&id))
            .await
            .unwrap();
        id
    }

    async fn wait(&self, id: &str, exec: &str) -> i32 {
        self.client
            .wait_process(ctx(), &process_req(id, exec))
            .await
            .unwrap()
            .status
    }

    async fn read_all(&self, id: &str, exec: &str, stderr: bool) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut req = ReadStreamRequest::new();
            req.container_id = id.into();
            req.exec_id = exec.into();
            req.len = 64 * 1024;
            let resp = if stderr {
                self.client.read_stderr(ctx(), &req).await.unwrap()
            } else {
                self.client.read_stdout(ctx(), &req).await.unwrap()
            };
            if resp.eof {
                return out;
            }
            out.extend(resp.data);
        }
    }

    async fn write(&self, id: &str, exec: &str, data: &[u8]) {
        let mut req = WriteStreamRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.data = data.to_vec();
        let resp = self.client.write_stdin(ctx(), &req).await.unwrap();
        assert_eq!(resp.len as usize, data.len());
    }

    async fn remove(&self, id: &str) {
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.into();
        req.force = true;
        self.client.remove_container(ctx(), &req).await.unwrap();
    }

    async fn check(&self) {
        assert!(
            self.client
                .check(ctx(), &Empty::new())
                .await
                .unwrap()
                .serving
        );
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

fn container_req(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.into();
    r
}

fn process_req(id: &str, exec: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = id.into();
    r.exec_id = exec.into();
    r
}

fn exec_req(id: &str, exec: &str, process: &Value) -> ExecProcessRequest {
    let mut r = ExecProcessRequest::new();
    r.container_id = id.into();
    r.exec_id = exec.into();
    r.process_json = serde_json::to_vec(process).unwrap();
    r
}

fn code_of<T: std::fmt::Debug>(result: ttrpc::Result<T>) -> (Code, String) {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => (status.code(), status.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_stdio_exec_tty_pause_stats_identity() {
    if skip() {
        return;
    }
    let agent = AgentProcess::start("life").await;
    let c = &agent.client;
    agent.check().await;
    let version = c.version(ctx(), &Empty::new()).await.unwrap();
    assert_eq!(version.protocol_version, agent_protocol::PROTOCOL_VERSION);

    let mut sandbox = CreateSandboxRequest::new();
    sandbox.sandbox_id = agent.id("sb");
    sandbox.hostname = "sandbox-host".into();
    c.create_sandbox(ctx(), &sandbox).await.unwrap();
    assert_eq!(
        code_of(c.create_sandbox(ctx(), &sandbox).await).0,
        Code::ALREADY_EXISTS
    );

    // Init process: hostname, stdio both ways, exit code.
    let script = "hostname; echo to-stderr >&2; read line; echo got:$line; exit 3";
    let id = agent.run("main", &["sh", "-c", script]).await;
    agent.write(&id, "", b"hello\n").await;
    c.close_stdin(ctx(), &process_req(&id, "")).await.unwrap();
    assert_eq!(agent.read_all(&id, "", false).await, b"box\ngot:hello\n");
    assert_eq!(agent.read_all(&id, "", true).await, b"to-stderr\n");
    assert_eq!(agent.wait(&id, "").await, 3);
    agent.remove(&id).await;
    assert_eq!(
        code_of(c.start_container(ctx(), &container_req(&id)).await).0,
        Code::NOT_FOUND
    );

    // A busy container: stats move, processes are listed, pause and resume, update.
    let resources = json!({"memory": {"limit": 256u64 << 20}, "pids": {"limit": 64}});
    let busy = agent
        .create(
            "busy",
            &spec(
                &agent.rootfs,
                &["sh", "-c", "while :; do :; done"],
                false,
                Some(resources),
            ),
        )
        .await
        .unwrap();
    c.start_container(ctx(), &container_req(&busy))
        .await
        .unwrap();
    let before = c
        .stats_container(ctx(), &container_req(&busy))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = c
        .stats_container(ctx(), &container_req(&busy))
        .await
        .unwrap();
    assert!(
        after.cpu_usage_ns > before.cpu_usage_ns,
        "cpu {} -> {}",
        before.cpu_usage_ns,
        after.cpu_usage_ns
    );
    assert!(after.memory_usage > 0);
    assert_eq!(after.memory_limit, 256 << 20);
    assert_eq!(after.pids_limit, 64);
    assert!(after.pids_current >= 1);
    let pids = c
        .list_processes(ctx(), &container_req(&busy))
        .await
        .unwrap();
    assert!(!pids.pids.is_empty());

    let mut update = UpdateContainerRequest::new();
    update.container_id = busy.clone();
    update.resources_json = serde_json::to_vec(&json!({"pids": {"limit": 32}})).unwrap();
    c.update_container(ctx(), &update).await.unwrap();
    let updated = c
        .stats_container(ctx(), &container_req(&busy))
        .await
        .unwrap();
    assert_eq!(updated.pids_limit, 32);

    c.pause_container(ctx(), &container_req(&busy))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let p1 = c
        .stats_container(ctx(), &container_req(&busy))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p2 = c
        .stats_container(ctx(), &container_req(&busy))
        .await
        .unwrap();
    assert_eq!(
        p1.cpu_usage_ns, p2.cpu_usage_ns,
        "a paused container uses no CPU"
    );
    c.resume_container(ctx(), &container_req(&busy))
        .await
        .unwrap();

    // Exec without a tty.
    c.exec_process(
        ctx(),
        &exec_req(
            &busy,
            "e1",
            &process(&["sh", "-c", "echo exec-out; exit 7"], false),
        ),
    )
    .await
    .unwrap();
    assert_eq!(agent.read_all(&busy, "e1", false).await, b"exec-out\n");
    assert_eq!(agent.wait(&busy, "e1").await, 7);
    assert_eq!(
        code_of(
            c.exec_process(ctx(), &exec_req(&busy, "e1", &process(&["true"], false)))
                .await
        )
        .0,
        Code::ALREADY_EXISTS
    );

    // Exec with a tty: the window size reaches the process; stdin and stdout are the terminal.
    c.exec_process(
        ctx(),
        &exec_req(
            &busy,
            "tty",
            &process(&["sh", "-c", "read x; stty size; tty"], true),
        ),
    )
    .await
    .unwrap();
    let mut resize = TtyWinResizeRequest::new();
    resize.container_id = busy.clone();
    resize.exec_id = "tty".into();
    resize.row = 33;
    resize.column = 101;
    c.tty_win_resize(ctx(), &resize).await.unwrap();
    agent.write(&busy, "tty", b"go\n").await;
    let out = String::from_utf8_lossy(&agent.read_all(&busy, "tty", false).await).into_owned();
    assert!(out.contains("33 101"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert_eq!(agent.wait(&busy, "tty").await, 0);
    // No tty on a plain process.
    resize.exec_id = "e1".into();
    assert_eq!(
        code_of(c.tty_win_resize(ctx(), &resize).await).0,
        Code::FAILED_PRECONDITION
    );

    // Signals: SIGTERM to an exec'd sleep, SIGKILL to the container.
    c.exec_process(
        ctx(),
        &exec_req(&busy, "sleeper", &process(&["sleep", "100"], false)),
    )
    .await
    .unwrap();
    let mut sig = SignalProcessRequest::new();
    sig.container_id = busy.clone();
    sig.exec_id = "sleeper".into();
    sig.signal = 15;
    c.signal_process(ctx(), &sig).await.unwrap();
    assert_eq!(agent.wait(&busy, "sleeper").await, 143);
    sig.exec_id = String::new();
    sig.signal = 9;
    c.signal_process(ctx(), &sig).await.unwrap();
    assert_eq!(agent.wait(&busy, "").await, 137);
    agent.remove(&busy).await;

    // A fresh identity: hostname, entropy credited and the CRNG reseeded (the clock stays).
    let mut identity = SetGuestIdentityRequest::new();
    identity.hostname = "clone-7".into();
    identity.random_seed = vec![0xa5; 256];
    c.set_guest_identity(ctx(), &identity).await.unwrap();
    identity.random_seed = vec![0; 5000];
    assert_eq!(
        code_of(c.set_guest_identity(ctx(), &identity).await).0,
        Code::INVALID_ARGUMENT
    );

    let mut destroy = DestroySandboxRequest::new();
    destroy.sandbox_id = sandbox.sandbox_id.clone();
    c.destroy_sandbox(ctx(), &destroy).await.unwrap();
    agent.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_through_stdin_and_back() {
    if skip() {
        return;
    }
    let agent = AgentProcess::start("bulk").await;
    let id = agent.run("cat", &["cat"]).await;
    let mut data = vec![0u8; 10 << 20];
    let mut x: u32 = 0x1234_5678;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let sent = Sha256::digest(&data);
    let writer = async {
        for chunk in data.chunks(256 * 1024) {
            agent.write(&id, "", chunk).await;
        }
        agent
            .client
            .close_stdin(ctx(), &process_req(&id, ""))
            .await
            .unwrap();
    };
    let (_, echoed) = tokio::join!(writer, agent.read_all(&id, "", false));
    assert_eq!(echoed.len(), data.len());
    assert_eq!(Sha256::digest(&echoed), sent);
    assert_eq!(agent.wait(&id, "").await, 0);
    agent.remove(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_as_runc_reports_them() {
    if skip() {
        return;
    }
    let agent = AgentProcess::start("exit").await;
    let t = agent.run("true", &["true"]).await;
    let f = agent.run("false", &["false"]).await;
    let k = agent.run("killed", &["sleep", "100"]).await;
    let mut sig = SignalProcessRequest::new();
    sig.container_id = k.clone();
    sig.signal = 9;
    agent.client.signal_process(ctx(), &sig).await.unwrap();
    assert_eq!(agent.wait(&t, "").await, 0);
    assert_eq!(agent.wait(&f, "").await, 1);
    assert_eq!(agent.wait(&k, "").await, 137);
    // Waiting again gives the same status.
    assert_eq!(agent.wait(&f, "").await, 1);
    // No OOM kill there.
    let exit = agent
        .client
        .wait_process(ctx(), &process_req(&k, ""))
        .await
        .unwrap();
    assert_eq!((exit.status, exit.oom_kills), (137, 0));
    for id in [t, f, k] {
        agent.remove(&id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_event_under_a_memory_limit() {
    if skip() {
        return;
    }
    let agent = AgentProcess::start("oom").await;
    let resources = json!({"memory": {"limit": 16u64 << 20}});
    let hog = "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived";
    let id = agent
        .create(
            "hog",
            &spec(&agent.rootfs, &["sh", "-c", hog], false, Some(resources)),
        )
        .await
        .unwrap();
    let client = agent.client.clone();
    let event = tokio::spawn(async move { client.get_oom_event(ctx(), &Empty::new()).await });
    agent
        .client
        .start_container(ctx(), &container_req(&id))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), event)
        .await
        .expect("no OOM event within 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(event.container_id, id);
    let stats = agent
        .client
        .stats_container(ctx(), &container_req(&id))
        .await
        .unwrap();
    assert!(stats.oom_kills >= 1);
    assert!(event.oom_kills >= 1, "{event:?}");
    // The shell's command substitution child was killed; the shell may survive it or not. Either
    // way the exit carries the kill, counted before the process was reaped.
    let exit = agent
        .client
        .wait_process(ctx(), &process_req(&id, ""))
        .await
        .unwrap();
    assert!(exit.status == 0 || exit.status == 137, "{exit:?}");
    assert!(exit.oom_kills >= event.oom_kills, "{exit:?} {event:?}");
    agent.remove(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_agent_keeps_serving() {
    if skip() {
        return;
    }
    let agent = AgentProcess::start("bad").await;
    let c = &agent.client;

    // Unknown container.
    let (code, msg) = code_of(c.start_container(ctx(), &container_req("nope")).await);
    assert_eq!(code, Code::NOT_FOUND);
    assert!(msg.contains("nope"), "{msg}");
    assert_eq!(
        code_of(c.wait_process(ctx(), &process_req("nope", "")).await).0,
        Code::NOT_FOUND
    );
    agent.check().await;

    // Ids that are paths.
    let mut req = CreateContainerRequest::new();
    req.container_id = "../escape".into();
    req.spec_json = serde_json::to_vec(&spec(&agent.rootfs, &["true"], false, None)).unwrap();
    assert_eq!(
        code_of(c.create_container(ctx(), &req).await).0,
        Code::INVALID_ARGUMENT
    );
    agent.check().await;

    // Duplicate id.
    let id = agent
        .create("dup", &spec(&agent.rootfs, &["true"], false, None))
        .await
        .unwrap();
    let (code, msg) = code_of(
        agent
            .create("dup", &spec(&agent.rootfs, &["true"], false, None))
            .await,
    );
    assert_eq!(code, Code::ALREADY_EXISTS, "{msg}");
    agent.check().await;

    // Exec into a stopped container.
    c.start_container(ctx(), &container_req(&id)).await.unwrap();
    assert_eq!(agent.wait(&id, "").await, 0);
    let (code, msg) = code_of(
        c.exec_process(ctx(), &exec_req(&id, "late", &process(&["true"], false)))
            .await,
    );
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.to_lowercase().contains("stopped"), "{msg}");
    agent.remove(&id).await;
    agent.check().await;

    // Removing a running container needs force.
    let running = agent.run("running", &["sleep", "100"]).await;
    let mut rm = RemoveContainerRequest::new();
    rm.container_id = running.clone();
    let (code, msg) = code_of(c.remove_container(ctx(), &rm).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    agent.remove(&running).await;
    assert_eq!(
        code_of(c.wait_process(ctx(), &process_req(&running, "")).await).0,
        Code::NOT_FOUND
    );
    agent.check().await;

    // A bundle whose rootfs is missing.
    let missing = agent.dir.path().join("no-such-rootfs");
    let (code, msg) = code_of(
        agent
            .create("norootfs", &spec(&missing, &["true"], false, None))
            .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("does not exist"), "{msg}");
    agent.check().await;

    // A malformed spec.
    let mut req = CreateContainerRequest::new();
    req.container_id = agent.id("malformed");
    req.spec_json = b"{\"ociVersion\": 1, \"process\": [".to_vec();
    let (code, msg) = code_of(c.create_container(ctx(), &req).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("malformed"), "{msg}");
    agent.check().await;

    // A mount that escapes the rootfs.
    let mut escaping = spec(&agent.rootfs, &["true"], false, None);
    escaping["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/../../../etc/evil", "type": "tmpfs", "source": "tmpfs"}));
    let (code, msg) = code_of(agent.create("escape", &escaping).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("escape"), "{msg}");
    agent.check().await;

    // An id taken by none of these failures: they left nothing behind.
    let again = agent
        .create("norootfs", &spec(&agent.rootfs, &["true"], false, None))
        .await
        .unwrap();
    agent.remove(&again).await;

    // A huge message: the client refuses to send it...
    let mut huge = CreateContainerRequest::new();
    huge.container_id = agent.id("huge");
    huge.spec_json = vec![b' '; 5 << 20];
    assert!(c.create_container(ctx(), &huge).await.is_err());
    agent.check().await;
    // ...and the agent refuses one sent anyway, answering with an error on the same connection.
    let socket = agent.dir.path().join("agent.sock");
    let mut raw = tokio::net::UnixStream::connect(&socket).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let len: u32 = 5 << 20;
    let mut frame = Vec::new();
    frame.extend(len.to_be_bytes());
    frame.extend(1u32.to_be_bytes()); // stream id
    frame.push(1); // request
    frame.push(0); // flags
    frame.resize(10 + len as usize, 0);
    raw.write_all(&frame).await.unwrap();
    let mut header = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), raw.read_exact(&mut header))
        .await
        .expect("no answer to a huge message")
        .unwrap();
    assert_eq!(header[8], 2, "a response");
    let body_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut body = vec![0u8; body_len];
    raw.read_exact(&mut body).await.unwrap();
    assert!(
        String::from_utf8_lossy(&body).contains("exceed"),
        "{body:?}"
    );
    // The raw connection still serves a well-formed request.
    let fresh = client_from_stream(raw);
    assert!(fresh.check(ctx(), &Empty::new()).await.unwrap().serving);

    // Too much data in one write.
    let id = agent.run("cat", &["cat"]).await;
    let mut write = WriteStreamRequest::new();
    write.container_id = id.clone();
    write.data = vec![0; agent_protocol::MAX_IO_CHUNK + 1];
    assert_eq!(
        code_of(c.write_stdin(ctx(), &write).await).0,
        Code::INVALID_ARGUMENT
    );
    agent.remove(&id).await;
    agent.check().await;
}

/// A loop device over an ext4 image, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn ext4_loop(image: &Path) -> Result<Loop, String> {
    let file = std::fs::File::create(image).map_err(|e| e.to_string())?;
    file.set_len(64 << 20).map_err(|e| e.to_string())?;
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(image)
        .status()
        .map_err(|e| format!("mkfs.ext4: {e}"))?;
    if !mkfs.success() {
        return Err("mkfs.ext4 failed".into());
    }
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_root_from_storages() {
    if skip() {
        return;
    }
    let agent = AgentProcess::start("overlay").await;
    // The read-only layer: a directory bound in ("bind" stands in for the virtio-fs share, which
    // needs a VM); the writable layer: a real ext4 block device.
    let share = agent.dir.path().join("share");
    std::fs::create_dir_all(share.join("layers")).unwrap();
    std::fs::rename(&agent.rootfs, share.join("layers/busybox")).unwrap();
    let dev = match ext4_loop(&agent.dir.path().join("rw.img")) {
        Ok(dev) => dev,
        Err(reason) => {
            if std::env::var("RUND_REQUIRE_AGENT_TESTS").as_deref() == Ok("1") {
                panic!("required agent test cannot run: {reason}");
            }
            eprintln!("skipped: no loop device for the writable layer: {reason}");
            return;
        }
    };
    let storage = |driver: &str, source: &str, name: &str, options: &[&str]| {
        agent_protocol::storage(driver, source, "ext4", name, options)
    };
    let mut root = RootfsOverlay::new();
    root.lower_dirs = vec!["share/layers/busybox".into()];
    root.upper_dir = "rw/c1/upper".into();
    root.work_dir = "rw/c1/work".into();
    let script = "echo written > /new-file; cat /new-file; ls /bin/busybox";
    let mut req = CreateContainerRequest::new();
    req.container_id = agent.id("c1");
    req.spec_json = serde_json::to_vec(&spec(
        Path::new("rootfs"),
        &["sh", "-c", script],
        false,
        None,
    ))
    .unwrap();
    req.storages = vec![
        storage("bind", share.to_str().unwrap(), "share", &["ro"]),
        storage("block", &dev.0, "rw", &[]),
    ];
    req.rootfs = protobuf::MessageField::some(root.clone());
    agent.client.create_container(ctx(), &req).await.unwrap();
    agent
        .client
        .start_container(ctx(), &container_req(&req.container_id))
        .await
        .unwrap();
    assert_eq!(
        agent.read_all(&req.container_id, "", false).await,
        b"written\n/bin/busybox\n"
    );
    assert_eq!(agent.wait(&req.container_id, "").await, 0);
    // The write went to the upper directory on the block device, not to the shared layer.
    assert!(!share.join("layers/busybox/new-file").exists());
    let state = agent.dir.path().join("state");
    let upper = state.join("storage/rw/c1/upper/new-file");
    assert_eq!(std::fs::read(&upper).unwrap(), b"written\n");
    agent.remove(&req.container_id).await;
    // Removing the container unmounted the root and released both storages.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(state.to_str().unwrap()), "{mounts}");
    // And the write is still on the device (a removal once recursed through the mounted root).
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /c1/upper/new-file", &dev.0])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "written\n");

    // A lower directory outside every storage is refused.
    root.lower_dirs = vec!["share/../../etc".into()];
    req.rootfs = protobuf::MessageField::some(root);
    req.container_id = agent.id("c2");
    let (code, msg) = code_of(agent.client.create_container(ctx(), &req).await);
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    agent.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executables_and_working_directories_as_runc_finds_them() {
    if skip() {
        return;
    }
    let agent = AgentProcess::start("lookup").await;
    let c = &agent.client;
    let without_path = |args: &[&str], cwd: &str| {
        let mut s = spec(&agent.rootfs, args, false, None);
        s["process"]["env"] = json!(["HOME=/root"]);
        s["process"]["cwd"] = json!(cwd);
        s
    };

    // A pause image built FROM scratch: no PATH, an absolute entrypoint, and a working directory
    // the image does not have (made in the root, as runc makes it).
    assert!(!agent.rootfs.join("work").exists());
    let id = agent
        .create(
            "nopath",
            &without_path(&["/bin/sh", "-c", "pwd"], "/work/dir"),
        )
        .await
        .unwrap();
    c.start_container(ctx(), &container_req(&id)).await.unwrap();
    assert_eq!(agent.read_all(&id, "", false).await, b"/work/dir\n");
    assert_eq!(agent.wait(&id, "").await, 0);
    assert!(agent.rootfs.join("work/dir").is_dir());
    agent.remove(&id).await;

    // A name with '/' is relative to the working directory; a bare name needs PATH.
    let id = agent
        .create("relative", &without_path(&["./busybox", "true"], "/bin"))
        .await
        .unwrap();
    c.start_container(ctx(), &container_req(&id)).await.unwrap();
    assert_eq!(agent.wait(&id, "").await, 0);
    agent.remove(&id).await;
    let (_, msg) = code_of(
        agent
            .create("bare", &without_path(&["sleep", "1"], "/"))
            .await,
    );
    assert!(
        msg.contains("exec: \"sleep\": executable file not found in $PATH"),
        "{msg}"
    );
    agent.check().await;
    let (_, msg) = code_of(
        agent
            .create("plain", &without_path(&["/etc/passwd"], "/"))
            .await,
    );
    assert!(
        msg.contains("exec: \"/etc/passwd\": Permission denied"),
        "{msg}"
    );
    agent.check().await;

    // A working directory in a tmpfs (empty when mounted) cannot be made beforehand: refused,
    // naming both, and nothing is left shadowed in the root.
    let (code, msg) = code_of(
        agent
            .create("tmpfs-cwd", &without_path(&["/bin/true"], "/dev/work"))
            .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.contains("process.cwd /dev/work") && msg.contains("tmpfs mounted at /dev"),
        "{msg}"
    );
    assert!(!agent.rootfs.join("dev/work").exists());
    agent.check().await;

    // Exec: an absolute path without PATH runs; a missing working directory is named.
    let id = agent.run("busy", &["sleep", "100"]).await;
    let mut p = process(&["/bin/sh", "-c", "pwd"], false);
    p["env"] = json!([]);
    p["cwd"] = json!("/etc");
    c.exec_process(ctx(), &exec_req(&id, "e1", &p))
        .await
        .unwrap();
    assert_eq!(agent.read_all(&id, "e1", false).await, b"/etc\n");
    assert_eq!(agent.wait(&id, "e1").await, 0);
    p["cwd"] = json!("/nowhere");
    let (code, msg) = code_of(c.exec_process(ctx(), &exec_req(&id, "e2", &p)).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(
        msg.contains("process.cwd /nowhere: in the container"),
        "{msg}"
    );
    p["cwd"] = json!("/");
    p["args"] = json!(["sleep", "1"]);
    let (_, msg) = code_of(c.exec_process(ctx(), &exec_req(&id, "e3", &p)).await);
    assert!(msg.contains("executable file not found in $PATH"), "{msg}");
    agent.remove(&id).await;
    agent.check().await;
}
