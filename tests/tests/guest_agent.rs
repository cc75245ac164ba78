//! The packed agent as PID 1 of a microVM: the host reaches it over hybrid vsock with the protocol
//! crate's client and runs `echo hello` in a container whose root is an overlay of a read-only
//! virtio-fs layer and an ext4 virtio-blk upper layer, as the shim will. Afterwards the host checks
//! that the container's write did not reach the shared layer.
//! Needs a KVM that runs Linux guests (the testbed) and the packed agent (`RUND_AGENT_INITRAMFS`,
//! which ci/test sets after `agent/pack-initramfs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::agent::{
    ContainerRequest, CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest, Empty,
    ProcessRequest, ReadStreamRequest, RemoveContainerRequest, RootfsOverlay,
};
use agent_protocol::client::connect_hybrid_vsock;
use agent_protocol::{storage, AgentClient, AGENT_VSOCK_PORT};
use rund_tests::{guest_tests_required, require_guest, GuestKernel, MarkerConsole, GUEST_CMDLINE};
use serde_json::json;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::fs::{CachePolicy, Fs, FsConfig, GuestIds};
use vmm::devices::virtio::vsock::Vsock;
use vmm::{SerialOutput, Vm, VmConfig, VmHandle};

/// How long the agent may take to answer its first call (a boot in the testbed takes seconds).
const TIMEOUT: Duration = Duration::from_secs(180);
/// How long any one agent call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

fn agent_initramfs(test: &str) -> Option<PathBuf> {
    match std::env::var_os("RUND_AGENT_INITRAMFS").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            let why = format!(
                "RUND_AGENT_INITRAMFS ({other:?}) does not name the packed agent (agent/pack-initramfs)"
            );
            if guest_tests_required() {
                panic!("{test}: cannot run: {why}");
            }
            eprintln!("skipping {test}: {why}");
            None
        }
    }
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-ec").arg(cmd).status().unwrap();
    assert!(st.success(), "host command failed: {cmd}");
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

/// The running microVM and its console, to say what the guest looks like when it fails a call.
struct Guest {
    handle: VmHandle,
    console: MarkerConsole,
}

impl Guest {
    /// Panics with `what` failed, `err`, and the guest's state: how the VM ended, or each vCPU's
    /// and device's report; then the console.
    fn fail(&self, what: &str, err: impl std::fmt::Display) -> ! {
        panic!(
            "{what}: {err}\n{}\nconsole:\n{}",
            self.handle.status_report(),
            self.console.text()
        );
    }

    async fn connect(&self, socket: &Path, deadline: Instant) -> AgentClient {
        loop {
            // Until the agent listens, the guest refuses the port and the VMM closes the stream.
            let attempt = connect_hybrid_vsock(socket, AGENT_VSOCK_PORT, Duration::from_secs(5));
            if let Ok(c) = attempt.await {
                if c.check(ctx(), &Empty::new()).await.is_ok() {
                    return c;
                }
            }
            if self.handle.exit_reason().is_some() {
                self.fail("the agent never answered", "the guest stopped");
            }
            if Instant::now() >= deadline {
                self.fail("the agent never answered", format!("not in {TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn read_stdout(guest: &Guest, c: &AgentClient, id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut req = ReadStreamRequest::new();
        req.container_id = id.into();
        req.len = 64 * 1024;
        let resp = c
            .read_stdout(ctx(), &req)
            .await
            .unwrap_or_else(|e| guest.fail("ReadStdout", e));
        if resp.eof {
            return out;
        }
        out.extend(resp.data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_hello_through_the_agent_over_vsock() {
    let test = "echo_hello_through_the_agent_over_vsock";
    let Some(kernel) = require_guest(test, GuestKernel::CondensedElf) else {
        return;
    };
    let Some(initrd) = agent_initramfs(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    // The image layer, as the e2e tests' busybox image has it.
    rund_tests::containerd::image::image_root(&share.join("layers/busybox")).unwrap();
    let image = dir.path().join("rw.img");
    sh(&format!(
        "truncate -s 64M {0} && mke2fs -q -t ext4 -F {0}",
        image.display()
    ));
    let socket = dir.path().join("vsock.sock");

    let console = MarkerConsole::echoing();
    let mut config = VmConfig::new(&kernel);
    config.initrd = Some(initrd);
    config.cmdline = GUEST_CMDLINE.into();
    config.vcpus = 2;
    config.mem_mib = 256;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    config.devices = vec![
        Arc::new(Mutex::new(Vsock::new(3, &socket).unwrap())),
        Arc::new(Mutex::new(
            Fs::new(FsConfig {
                tag: "share".into(),
                shared_dir: share.clone(),
                read_only: true,
                cache: CachePolicy::Always,
                xattr: false,
                ids: GuestIds::any(),
            })
            .unwrap(),
        )),
        Arc::new(Mutex::new(Block::new(&image, false).unwrap())),
    ];
    let start = Instant::now();
    let guest = Guest {
        handle: Vm::new(config).unwrap().start().unwrap(),
        console,
    };
    let c = guest.connect(&socket, start + TIMEOUT).await;
    let ready = start.elapsed();

    let mut sandbox = CreateSandboxRequest::new();
    sandbox.sandbox_id = "sb".into();
    sandbox.hostname = "pod".into();
    c.create_sandbox(ctx(), &sandbox)
        .await
        .unwrap_or_else(|e| guest.fail("CreateSandbox", e));

    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "args": ["sh", "-c", "echo hello; echo from-the-container > /written"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0}
        },
        "root": {"path": "rootfs"},
        "hostname": "box",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]}
    });
    let mut root = RootfsOverlay::new();
    root.lower_dirs = vec!["share/layers/busybox".into()];
    root.upper_dir = "rw/c1/upper".into();
    root.work_dir = "rw/c1/work".into();
    let mut req = CreateContainerRequest::new();
    req.container_id = "c1".into();
    req.spec_json = serde_json::to_vec(&spec).unwrap();
    req.storages = vec![
        storage("virtiofs", "share", "", "share", &["ro"]),
        storage("block", "/dev/vda", "ext4", "rw", &[]),
    ];
    req.rootfs = protobuf::MessageField::some(root);
    c.create_container(ctx(), &req)
        .await
        .unwrap_or_else(|e| guest.fail("CreateContainer", e));
    let mut id = ContainerRequest::new();
    id.container_id = "c1".into();
    c.start_container(ctx(), &id)
        .await
        .unwrap_or_else(|e| guest.fail("StartContainer", e));
    let out = read_stdout(&guest, &c, "c1").await;
    let mut wait = ProcessRequest::new();
    wait.container_id = "c1".into();
    let status = c
        .wait_process(ctx(), &wait)
        .await
        .unwrap_or_else(|e| guest.fail("WaitProcess", e))
        .status;
    let mut rm = RemoveContainerRequest::new();
    rm.container_id = "c1".into();
    c.remove_container(ctx(), &rm)
        .await
        .unwrap_or_else(|e| guest.fail("RemoveContainer", e));
    let mut destroy = DestroySandboxRequest::new();
    destroy.sandbox_id = "sb".into();
    c.destroy_sandbox(ctx(), &destroy)
        .await
        .unwrap_or_else(|e| guest.fail("DestroySandbox", e));
    let total = start.elapsed();

    let Guest { handle, console } = guest;
    handle.shutdown();
    handle.wait();
    assert_eq!(String::from_utf8_lossy(&out), "hello\n", "{test}: stdout");
    assert_eq!(status, 0, "{test}: exit status");
    // The write landed in the container's upper directory on the ext4 device (flushed when the
    // agent released the storage), and the shared layer is untouched.
    let out = Command::new("debugfs")
        .args(["-R", "cat /c1/upper/written"])
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from-the-container\n",
        "{test}: the container's write on the ext4 device (debugfs: {})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!share.join("layers/busybox/written").exists());
    eprintln!("{test}: agent answered {ready:?} after start; echo hello done after {total:?}");
    drop(console);
}
