//! Kubernetes' CRI end to end through a private containerd: the calls `crictl runp`, `create`,
//! `start`, `exec`, `inspect`, `stopp` and `rmp` make, with the runtime handler of each runtime
//! under test, compared with runc's (see `rund_tests::containerd` for the harness and
//! `rund_tests::cri` for the client). A host-network pod holds two containers: one runs until the
//! pod stops and serves ExecSync, the other exits by itself with a code and a log. Afterwards
//! nothing may be left: no pod or container listed, no task, shim, container process or mount.
//! Runs in the testbed (`ci/test`); needs root, containerd, runc, umoci and busybox-static.

use std::time::Duration;

use k8s_cri::v1::ContainerState;
use rund_tests::containerd::{
    same_as_runc, start_for_test, Containerd, Runtime, BUSYBOX_IMAGE, COMMAND_TIMEOUT,
    CRI_NAMESPACE,
};
use rund_tests::cri::{container_config, host_network_pod_config, log_lines, CriClient};

/// What one pod's life looked like through CRI.
#[derive(Debug, PartialEq)]
struct PodOutcome {
    /// ExecSync in the first container: stdout, stderr, exit code.
    exec: (String, String, i32),
    /// The first container's state and name while the pod runs.
    running: (ContainerState, String),
    /// Shims serving the pod (one per pod, whatever the number of containers).
    shims: usize,
    /// The second container, which exits by itself: state, exit code, stdout and stderr lines
    /// of its CRI log (the IPC namespace line left out).
    exited: (ContainerState, i32, Vec<String>, Vec<String>),
    /// Whether both containers are in the pod's IPC namespace.
    same_ipc: bool,
    /// The first container after StopPodSandbox: state, exit code.
    stopped: (ContainerState, i32),
    /// Pods and containers the CRI plugin still lists after RemovePodSandbox.
    listed_after: (Vec<String>, Vec<String>),
}

async fn pod_flow(cd: &Containerd, cri: &mut CriClient, rt: Runtime) -> PodOutcome {
    let name = cd.unique_id("pod", rt);
    let log_dir = cd.dir().join(format!("logs-{name}"));
    std::fs::create_dir_all(&log_dir).expect("mkdir log dir");
    let pod = host_network_pod_config(&name, &name, &log_dir);

    eprintln!("{rt}: RunPodSandbox");
    let pod_id = cri
        .run_pod_sandbox(&pod, rt.name())
        .await
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    let server = container_config(
        "server",
        BUSYBOX_IMAGE,
        &["sh", "-c", "echo server-started; exec sleep 1000"],
        "server.log",
    );
    let oneshot = container_config(
        "oneshot",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "echo oneshot-out; readlink /proc/self/ns/ipc; echo oneshot-err >&2; exit 7",
        ],
        "oneshot.log",
    );
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
        exited,
        same_ipc,
        stopped,
        listed_after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_with_two_containers_as_crictl_drives_it() {
    let Some(cd) = start_for_test("pod_with_two_containers_as_crictl_drives_it") else {
        return;
    };
    let mut cri = CriClient::connect(cd.socket(), Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut outcomes = Vec::new();
    for &rt in cd.runtimes() {
        eprintln!("== {rt}");
        let outcome = pod_flow(&cd, &mut cri, rt).await;
        eprintln!("{rt}: {outcome:?}");
        outcomes.push((rt, outcome));
        if let Err(e) = cd.wait_until_clean(CRI_NAMESPACE) {
            panic!("{rt}: {e}");
        }
    }
    assert_eq!(
        same_as_runc(&outcomes),
        &PodOutcome {
            exec: ("out\n".into(), "err\n".into(), 3),
            running: (ContainerState::ContainerRunning, "server".into()),
            shims: 1,
            exited: (
                ContainerState::ContainerExited,
                7,
                vec!["oneshot-out".into()],
                vec!["oneshot-err".into()]
            ),
            same_ipc: true,
            stopped: (ContainerState::ContainerExited, 137),
            listed_after: (Vec::new(), Vec::new()),
        }
    );
}
