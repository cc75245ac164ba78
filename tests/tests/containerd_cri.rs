//! Kubernetes' CRI end to end, on the node as `rund install` leaves it (containerd's stock
//! configuration edited by `rund install`; see `rund_tests::containerd` for the harness and
//! `rund_tests::cri` for the client), with the runtime handler of each runtime under test,
//! compared with runc's:
//! - the calls `crictl runp`, `create`, `start`, `exec`, `inspect`, `stopp` and `rmp` make for a
//!   minimal pod.json (no `cgroup_parent`: containerd dictates `/k8s.io/<id>`): a host-network pod
//!   with two containers, one serving ExecSync until the pod stops, the other exiting by itself,
//!   each in a PID namespace of its own; the same on a containerd configuration written by hand,
//!   the pod sharing one PID namespace (`shareProcessNamespace`: PID 1 is the pod's init, and
//!   one container sees the other's processes);
//! - a pod as a kubelet sends it, in a kubelet-made `/kubepods/burstable/pod<uid>` cgroup, with
//!   the container fields a kubelet sets (security context, working directory, env, an image
//!   without `Env`, resources and their update, stats, a restart, StopPodSandbox with a container
//!   running);
//! - OOM kills reported as such.
//!
//! Afterwards nothing may be left: no pod or container listed, no task, shim, container process
//! or mount. Runs in the testbed (`ci/test`); needs root, containerd, runc, umoci and
//! busybox-static.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use k8s_cri::v1::NamespaceMode;
use k8s_cri::v1::{
    Capability, ContainerState, Int64Value, KeyValue, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, Mount,
};
use rund_tests::containerd::{
    same_as_runc, start_for_test, start_for_test_with, Containerd, Options, Runtime, World,
    BUSYBOX_IMAGE, BUSYBOX_NOENV_IMAGE, COMMAND_TIMEOUT, CRI_NAMESPACE,
};
use rund_tests::cri::{
    container_config, host_network_pod_config, host_network_pod_config_in, log_lines,
    namespace_options_mut, with_pod_namespaces, CriClient, CriError,
};
use rund_tests::kubelet::PodCgroup;

/// What one pod's life looked like through CRI.
#[derive(Debug, PartialEq)]
struct PodOutcome {
    /// ExecSync in the first container: stdout, stderr, exit code.
    exec: (String, String, i32),
    /// The first container's state and name while the pod runs.
    running: (ContainerState, String),
    /// Shims serving the pod (one per pod, whatever the number of containers).
    shims: usize,
    /// The pod's sandbox task as `ctr task ls` shows it while the pod runs.
    sandbox_task: String,
    /// The second container, which exits by itself: state, exit code, stdout and stderr lines
    /// of its CRI log (the IPC namespace line left out).
    exited: (ContainerState, i32, Vec<String>, Vec<String>),
    /// Whether both containers are in the pod's IPC namespace.
    same_ipc: bool,
    /// PID 1 as the first container sees it: `its own` process, or `pod init` in a pod sharing
    /// its PID namespace (runc's pause process, rund's `rund-pod-init`).
    pid1: String,
    /// The first container after StopPodSandbox: state, exit code.
    stopped: (ContainerState, i32),
    /// Pods and containers the CRI plugin still lists after RemovePodSandbox.
    listed_after: (Vec<String>, Vec<String>),
}

/// The oneshot container's look for the server's `sleep` in a pod sharing its PID namespace.
const SEES_SERVER: &str = "for i in $(seq 100); do \
     grep -qx sleep /proc/[0-9]*/comm 2>/dev/null && { echo sees-server; break; }; sleep 0.1; done; ";

async fn pod_flow(
    cd: &Containerd,
    cri: &mut CriClient,
    rt: Runtime,
    share_pid: bool,
) -> PodOutcome {
    let name = cd.unique_id("pod", rt);
    let log_dir = cd.dir().join(format!("logs-{name}"));
    std::fs::create_dir_all(&log_dir).expect("mkdir log dir");
    let mut pod = host_network_pod_config(&name, &name, &log_dir);
    if share_pid {
        if let Some(ns) = namespace_options_mut(&mut pod) {
            ns.pid = NamespaceMode::Pod as i32;
        }
    }

    eprintln!("{rt}: RunPodSandbox");
    let pod_id = cri
        .run_pod_sandbox(&pod, rt.name())
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let mut server = container_config(
        "server",
        BUSYBOX_IMAGE,
        &["sh", "-c", "echo server-started; exec sleep 1000"],
        "server.log",
    );
    let script = format!(
        "{}echo oneshot-out; readlink /proc/self/ns/ipc; echo oneshot-err >&2; exit 7",
        if share_pid { SEES_SERVER } else { "" }
    );
    let mut oneshot = container_config(
        "oneshot",
        BUSYBOX_IMAGE,
        &["sh", "-c", &script],
        "oneshot.log",
    );
    for c in [&mut server, &mut oneshot] {
        with_pod_namespaces(c, &pod);
    }
    let mut ids = Vec::new();
    for config in [&server, &oneshot] {
        // `crictl create` asks for the image first and would pull it if it were missing.
        let image = cri.image_status(BUSYBOX_IMAGE).await.expect("ImageStatus");
        assert!(
            image.is_some(),
            "the CRI plugin does not see {BUSYBOX_IMAGE}"
        );
        eprintln!("{rt}: CreateContainer");
        ids.push(
            cri.create_container(&pod_id, config, &pod)
                .await
                .unwrap_or_else(|e| panic!("{rt}: {e}")),
        );
    }
    for id in &ids {
        eprintln!("{rt}: StartContainer");
        cri.start_container(id)
            .await
            .unwrap_or_else(|e| panic!("{rt}: {e}"));
    }
    let (server_id, oneshot_id) = (&ids[0], &ids[1]);

    eprintln!("{rt}: ExecSync");
    let exec = cri
        .exec_sync(
            server_id,
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            COMMAND_TIMEOUT,
        )
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let ipc = cri
        .exec_sync(
            server_id,
            &["readlink", "/proc/self/ns/ipc"],
            COMMAND_TIMEOUT,
        )
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let server_ipc = String::from_utf8_lossy(&ipc.stdout).trim().to_string();
    let pid1 = cri
        .exec_sync(
            server_id,
            &[
                "sh",
                "-c",
                "cat /proc/1/comm; tr '\\0' ' ' < /proc/1/cmdline",
            ],
            COMMAND_TIMEOUT,
        )
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let pid1 = String::from_utf8_lossy(&pid1.stdout).into_owned();
    // The harness's pause image is a shell waiting for SIGTERM (rund_tests::containerd::image);
    // the guest's own init (rund-agent as `init`) would show a pod joined to the VM's namespace.
    let pid1 = match pid1.lines().collect::<Vec<_>>()[..] {
        [_, cmdline] if cmdline.contains("sleep 1000") => "its own".to_string(),
        ["pause" | "sh" | "rund-pod-init", _] => "pod init".to_string(),
        _ => pid1,
    };

    let status = cri
        .container_status(server_id)
        .await
        .expect("ContainerStatus");
    let running = (
        status.state(),
        status.metadata.map(|m| m.name).unwrap_or_default(),
    );
    let shims = cd.shim_servers().expect("shims");
    eprintln!("{rt}: shims {shims:?}");
    let shims = shims.len();
    let sandbox_task = sandbox_task(cd, rt, &pod_id);

    let status = cri
        .wait_exited(oneshot_id, COMMAND_TIMEOUT)
        .await
        .expect("ContainerStatus");
    let log = std::fs::read_to_string(log_dir.join("oneshot.log")).unwrap_or_default();
    let stdout = log_lines(&log, "stdout");
    let same_ipc = !server_ipc.is_empty() && stdout.contains(&server_ipc.as_str());
    let exited = (
        status.state(),
        status.exit_code,
        stdout
            .iter()
            .filter(|l| !l.starts_with("ipc:"))
            .map(|l| l.to_string())
            .collect(),
        log_lines(&log, "stderr")
            .into_iter()
            .map(String::from)
            .collect(),
    );

    eprintln!("{rt}: StopPodSandbox");
    cri.stop_pod_sandbox(&pod_id)
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let status = cri
        .container_status(server_id)
        .await
        .expect("ContainerStatus");
    let stopped = (status.state(), status.exit_code);
    eprintln!("{rt}: RemovePodSandbox");
    cri.remove_pod_sandbox(&pod_id)
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let listed_after = (
        cri.list_pod_sandboxes().await.expect("ListPodSandbox"),
        cri.list_containers().await.expect("ListContainers"),
    );
    PodOutcome {
        exec: (
            String::from_utf8_lossy(&exec.stdout).into_owned(),
            String::from_utf8_lossy(&exec.stderr).into_owned(),
            exec.exit_code,
        ),
        running,
        shims,
        sandbox_task,
        exited,
        same_ipc,
        pid1,
        stopped,
        listed_after,
    }
}

/// The status `ctr task ls` gives the pod's sandbox task; and its processes, as `ctr task ps`
/// lists them, checked: runc's pause process among them, and none under rund, whose microVM
/// stands for the sandbox (nothing joins a pause process's namespaces there).
fn sandbox_task(cd: &Containerd, rt: Runtime, pod_id: &str) -> String {
    let ns = ["-n", CRI_NAMESPACE];
    let tasks = cd
        .ctr_ok(&[&ns[..], &["task", "ls"]].concat())
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let status = tasks
        .lines()
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words.first() == Some(&pod_id)).then(|| words.last().unwrap_or(&"").to_string())
        })
        .unwrap_or_else(|| panic!("{rt}: no task {pod_id} in `ctr task ls`:\n{tasks}"));
    let ps = cd
        .ctr_ok(&[&ns[..], &["task", "ps", pod_id]].concat())
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let processes = ps.lines().skip(1).filter(|l| !l.trim().is_empty()).count();
    // runc's lists the pause process and whatever else is in the pod's cgroup.
    let expected = match rt {
        Runtime::Runc => processes > 0,
        Runtime::Rund => processes == 0,
    };
    assert!(expected, "{rt}: the pod's sandbox task's processes:\n{ps}");
    status
}

/// Connects to `cd`'s CRI plugin and runs `flow` once per runtime under test (runc first),
/// checking after each that the runtime left nothing behind; returns each runtime's outcome.
async fn for_each_runtime<T: std::fmt::Debug>(
    cd: &Containerd,
    flow: impl AsyncFn(&Containerd, &mut CriClient, Runtime) -> T,
) -> Vec<(Runtime, T)> {
    let mut cri = CriClient::connect(cd.socket(), Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut outcomes = Vec::new();
    for &rt in cd.runtimes() {
        eprintln!("== {rt}");
        let outcome = flow(cd, &mut cri, rt).await;
        eprintln!("{rt}: {outcome:#?}");
        outcomes.push((rt, outcome));
        if let Err(e) = cd.wait_until_clean(CRI_NAMESPACE) {
            panic!("{rt}: {e}");
        }
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_with_two_containers_as_crictl_drives_it() {
    let Some(cd) = start_for_test("pod_with_two_containers_as_crictl_drives_it") else {
        return;
    };
    let outcomes =
        for_each_runtime(&cd, async |cd, cri, rt| pod_flow(cd, cri, rt, false).await).await;
    assert_eq!(
        same_as_runc(&outcomes),
        &PodOutcome {
            exec: ("out\n".into(), "err\n".into(), 3),
            running: (ContainerState::ContainerRunning, "server".into()),
            shims: 1,
            sandbox_task: "RUNNING".into(),
            exited: (
                ContainerState::ContainerExited,
                7,
                vec!["oneshot-out".into()],
                vec!["oneshot-err".into()]
            ),
            same_ipc: true,
            pid1: "its own".into(),
            stopped: (ContainerState::ContainerExited, 137),
            listed_after: (Vec::new(), Vec::new()),
        }
    );
}

/// The same flow on a containerd whose configuration the harness wrote by hand, naming both
/// runtimes (an operator's own file rather than `rund install`'s edit), for a pod that shares
/// its PID namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_on_a_hand_written_containerd_config() {
    let test = "pod_on_a_hand_written_containerd_config";
    let options = Options {
        world: World::Fixture,
        ..Options::default()
    };
    let Some(cd) = start_for_test_with(test, options) else {
        return;
    };
    let outcomes = for_each_runtime(&cd, async |cd, cri, rt| {
        let o = pod_flow(cd, cri, rt, true).await;
        (o.exec, o.exited.2, o.pid1)
    })
    .await;
    assert_eq!(
        same_as_runc(&outcomes),
        &(
            ("out\n".to_string(), "err\n".to_string(), 3),
            vec!["sees-server".to_string(), "oneshot-out".to_string()],
            "pod init".to_string()
        )
    );
}

/// A host file's owner and group.
type Owner = (u32, u32);

/// What the fields a kubelet sets did, seen from inside the containers and through CRI.
#[derive(Debug, PartialEq)]
struct FieldsOutcome {
    /// The long-running container (user 1000:1000, supplemental groups, env, a working directory
    /// the image lacks, a read-only root, no_new_privs): its log lines.
    identity: Vec<String>,
    /// ExecSync in it: `id` (an exec takes the container's user).
    exec_identity: String,
    /// The file and directory the long-running container made on its read-write host volume:
    /// their owners on the host (the container's user, never the guest's word under rund).
    volume_owners: (Option<Owner>, Option<Owner>),
    /// Root with capabilities added and dropped: its CapEff, CapBnd and NoNewPrivs lines.
    capabilities: Vec<String>,
    /// A container from the image without `Env`, its command absolute: exit code and log lines.
    without_env: (i32, Vec<String>),
    /// A 48 MiB allocation by ExecSync under the 64 MiB limit, then after
    /// UpdateContainerResources lowered it to 32 MiB: the exit codes.
    allocation_before_and_after_update: (i32, i32),
    /// ContainerStats: CPU used, memory in use; ListContainerStats lists the container.
    stats: (bool, bool, bool),
    /// A container that exits, removed, then made again as attempt 1 (a kubelet's restart): the
    /// second one's attempt, state and exit code.
    restarted: (u32, ContainerState, i32),
    /// The running container after StopPodSandbox: state, exit code.
    stopped: (ContainerState, i32),
    /// What the CRI plugin still lists after RemovePodSandbox.
    listed_after: (Vec<String>, Vec<String>),
}

fn linux_config(
    resources: Option<LinuxContainerResources>,
    security: LinuxContainerSecurityContext,
) -> Option<LinuxContainerConfig> {
    Some(LinuxContainerConfig {
        resources,
        security_context: Some(security),
    })
}

fn memory_limit(mib: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        cpu_shares: 512,
        memory_limit_in_bytes: mib << 20,
        ..LinuxContainerResources::default()
    }
}

async fn log_of(log_dir: &std::path::Path, file: &str) -> Vec<String> {
    let log = std::fs::read_to_string(log_dir.join(file)).unwrap_or_default();
    log_lines(&log, "stdout")
        .into_iter()
        .chain(log_lines(&log, "stderr"))
        .map(str::to_string)
        .collect()
}

async fn fields_flow(cd: &Containerd, cri: &mut CriClient, rt: Runtime) -> FieldsOutcome {
    let name = cd.unique_id("fields", rt);
    let log_dir = cd.dir().join(format!("logs-{name}"));
    std::fs::create_dir_all(&log_dir).expect("mkdir log dir");
    let cgroup = PodCgroup::make(&name).unwrap_or_else(|e| panic!("{rt}: kubelet: {e}"));
    let pod = host_network_pod_config_in(&name, &name, &log_dir, &cgroup.parent);
    eprintln!("{rt}: RunPodSandbox in {}", cgroup.parent);
    let pod_id = cri
        .run_pod_sandbox(&pod, rt.name())
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let fail = |what: &str, e: CriError| -> ! { panic!("{rt}: {what}: {e}") };

    let mut main = container_config(
        "main",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "id; pwd; echo \"FOO=$FOO\"; grep NoNewPrivs /proc/self/status; \
             touch /written 2>/dev/null && echo root-writable || echo root-read-only; \
             echo mine > /vol/by-user; mkdir /vol/made; \
             exec sleep 1000",
        ],
        "main.log",
    );
    let volume = cd.dir().join(format!("volume-{name}"));
    std::fs::create_dir_all(&volume).expect("mkdir volume");
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    main.mounts = vec![Mount {
        container_path: "/vol".into(),
        host_path: volume.to_string_lossy().into_owned(),
        ..Mount::default()
    }];
    main.working_dir = "/srv/app".into();
    main.envs = vec![KeyValue {
        key: "FOO".into(),
        value: "bar".into(),
    }];
    main.linux = linux_config(
        Some(memory_limit(64)),
        LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: 1000 }),
            run_as_group: Some(Int64Value { value: 1000 }),
            supplemental_groups: vec![2000, 3000],
            readonly_rootfs: true,
            no_new_privs: true,
            ..LinuxContainerSecurityContext::default()
        },
    );
    let mut caps = container_config(
        "caps",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status",
        ],
        "caps.log",
    );
    caps.linux = linux_config(
        None,
        LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["NET_ADMIN".into(), "SYS_TIME".into()],
                drop_capabilities: vec!["CHOWN".into(), "KILL".into()],
                ..Capability::default()
            }),
            no_new_privs: true,
            ..LinuxContainerSecurityContext::default()
        },
    );
    let without_env = container_config(
        "noenv",
        BUSYBOX_NOENV_IMAGE,
        &["/bin/sh", "-c", "echo \"PATH=[$PATH]\"; /bin/pwd"],
        "noenv.log",
    );

    let mut ids = Vec::new();
    for config in [&main, &caps, &without_env] {
        eprintln!(
            "{rt}: CreateContainer {}",
            config.metadata.as_ref().map_or("", |m| &m.name)
        );
        let id = match cri.create_container(&pod_id, config, &pod).await {
            Ok(id) => id,
            Err(e) => fail("CreateContainer", e),
        };
        if let Err(e) = cri.start_container(&id).await {
            fail("StartContainer", e);
        }
        ids.push(id);
    }
    let (main_id, caps_id, noenv_id) = (&ids[0], &ids[1], &ids[2]);
    for id in [caps_id, noenv_id] {
        cri.wait_exited(id, COMMAND_TIMEOUT)
            .await
            .expect("ContainerStatus");
    }
    let noenv_status = cri
        .container_status(noenv_id)
        .await
        .expect("ContainerStatus");
    // The main container has printed its lines once it sleeps.
    let exec_client = cri.clone();
    let exec = |cmd: &'static [&'static str]| {
        let mut cri = exec_client.clone();
        let id = main_id.clone();
        async move {
            cri.exec_sync(&id, cmd, COMMAND_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("{rt}: ExecSync {cmd:?}: {e}"))
        }
    };
    let id_out = exec(&["id"]).await;
    let allocate: &'static [&'static str] =
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=48M", "count=1"];
    let before = exec(allocate).await.exit_code;
    if let Err(e) = cri
        .update_container_resources(main_id, &memory_limit(32))
        .await
    {
        fail("UpdateContainerResources", e);
    }
    let after = exec(allocate).await.exit_code;

    let stats = cri.container_stats(main_id).await.expect("ContainerStats");
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .is_some_and(|v| v.value > 0);
    let memory = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .is_some_and(|v| v.value > 0);
    let listed = cri
        .list_container_stats(&pod_id)
        .await
        .expect("ListContainerStats")
        .iter()
        .any(|s| s.attributes.as_ref().is_some_and(|a| &a.id == main_id));

    // A kubelet's restart of an exited container: remove attempt 0, create attempt 1.
    let mut once = container_config("once", BUSYBOX_IMAGE, &["sh", "-c", "exit 4"], "once.log");
    let first = cri
        .create_container(&pod_id, &once, &pod)
        .await
        .expect("CreateContainer");
    cri.start_container(&first).await.expect("StartContainer");
    cri.wait_exited(&first, COMMAND_TIMEOUT)
        .await
        .expect("ContainerStatus");
    cri.remove_container(&first).await.expect("RemoveContainer");
    once.metadata.as_mut().expect("metadata").attempt = 1;
    once.command = vec!["sh".into(), "-c".into(), "exit 5".into()];
    let second = cri
        .create_container(&pod_id, &once, &pod)
        .await
        .expect("CreateContainer");
    cri.start_container(&second).await.expect("StartContainer");
    let status = cri
        .wait_exited(&second, COMMAND_TIMEOUT)
        .await
        .expect("ContainerStatus");
    let restarted = (
        status.metadata.as_ref().map_or(u32::MAX, |m| m.attempt),
        status.state(),
        status.exit_code,
    );

    let identity = log_of(&log_dir, "main.log").await;
    let owner = |name: &str| {
        std::fs::metadata(volume.join(name))
            .ok()
            .map(|m| (m.uid(), m.gid()))
    };
    let volume_owners = (owner("by-user"), owner("made"));
    eprintln!("{rt}: StopPodSandbox with {main_id} running");
    cri.stop_pod_sandbox(&pod_id).await.expect("StopPodSandbox");
    let status = cri
        .container_status(main_id)
        .await
        .expect("ContainerStatus");
    let stopped = (status.state(), status.exit_code);
    cri.remove_pod_sandbox(&pod_id)
        .await
        .expect("RemovePodSandbox");
    let listed_after = (
        cri.list_pod_sandboxes().await.expect("ListPodSandbox"),
        cri.list_containers().await.expect("ListContainers"),
    );
    drop(cgroup);
    FieldsOutcome {
        identity,
        exec_identity: String::from_utf8_lossy(&id_out.stdout).trim().to_string(),
        volume_owners,
        capabilities: log_of(&log_dir, "caps.log").await,
        without_env: (noenv_status.exit_code, log_of(&log_dir, "noenv.log").await),
        allocation_before_and_after_update: (before, after),
        stats: (cpu, memory, listed),
        restarted,
        stopped,
        listed_after,
    }
}

/// A pod as a kubelet sends it: in its QoS class's pod cgroup, with the container fields a kubelet
/// sets (security context, working directory, env, resources and their update, stats, a restart
/// with a new attempt, StopPodSandbox with a container running), each compared with runc's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_pod_fields_behave_as_under_runc() {
    let Some(cd) = start_for_test("kubelet_pod_fields_behave_as_under_runc") else {
        return;
    };
    let outcomes = for_each_runtime(&cd, fields_flow).await;
    let runc = same_as_runc(&outcomes);
    // runc's own outcome, checked against what Kubernetes documents, so that a runc change
    // cannot make both agree on something wrong.
    assert_eq!(
        runc.identity,
        [
            "uid=1000 gid=1000 groups=1000,2000,3000",
            "/srv/app",
            "FOO=bar",
            "NoNewPrivs:\t1",
            "root-read-only"
        ]
    );
    assert_eq!(
        runc.exec_identity,
        "uid=1000 gid=1000 groups=1000,2000,3000"
    );
    assert_eq!(runc.volume_owners, (Some((1000, 1000)), Some((1000, 1000))));
    assert_eq!(runc.allocation_before_and_after_update, (0, 137));
    assert_eq!(runc.stats, (true, true, true));
    assert_eq!(runc.restarted, (1, ContainerState::ContainerExited, 5));
    assert_eq!(runc.stopped, (ContainerState::ContainerExited, 137));
    assert_eq!(runc.listed_after, (Vec::new(), Vec::new()));
}

/// Three containers in one pod, each outgrowing its 32 MiB limit: state, exit code and reason of
/// each.
async fn oom_flow(
    cd: &Containerd,
    cri: &mut CriClient,
    rt: Runtime,
) -> Vec<(ContainerState, i32, String)> {
    let name = cd.unique_id("oom", rt);
    let log_dir = cd.dir().join(format!("logs-{name}"));
    std::fs::create_dir_all(&log_dir).expect("mkdir log dir");
    let pod = host_network_pod_config(&name, &name, &log_dir);
    let pod_id = cri
        .run_pod_sandbox(&pod, rt.name())
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let mut kills = Vec::new();
    for attempt in 0..3 {
        let mut hog = container_config(
            &format!("hog{attempt}"),
            BUSYBOX_IMAGE,
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            &format!("hog{attempt}.log"),
        );
        hog.linux = linux_config(
            Some(memory_limit(32)),
            LinuxContainerSecurityContext::default(),
        );
        let id = cri
            .create_container(&pod_id, &hog, &pod)
            .await
            .unwrap_or_else(|e| panic!("{rt}: {e}"));
        cri.start_container(&id)
            .await
            .unwrap_or_else(|e| panic!("{rt}: {e}"));
        let status = cri.wait_exited(&id, COMMAND_TIMEOUT).await.expect("status");
        kills.push((status.state(), status.exit_code, status.reason));
    }
    cri.stop_pod_sandbox(&pod_id).await.expect("StopPodSandbox");
    cri.remove_pod_sandbox(&pod_id)
        .await
        .expect("RemovePodSandbox");
    kills
}

/// A container that outgrows its memory limit is reported as OOMKilled, every time (containerd
/// takes the reason from the TaskOOM event, which must come before TaskExit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_is_reported_as_one_every_time() {
    let Some(cd) = start_for_test("an_oom_kill_is_reported_as_one_every_time") else {
        return;
    };
    let outcomes = for_each_runtime(&cd, oom_flow).await;
    let killed = (
        ContainerState::ContainerExited,
        137,
        "OOMKilled".to_string(),
    );
    assert_eq!(
        same_as_runc(&outcomes),
        &vec![killed.clone(), killed.clone(), killed]
    );
}
