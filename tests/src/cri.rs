//! A CRI client for the end-to-end tests: Kubernetes' CRI (`runtime.v1`, the `k8s-cri` crate on
//! tonic) over containerd's unix socket, with the calls `crictl runp`, `create`, `start`, `exec`,
//! `stop`/`rm`, `inspectp` and `rmp` make, and builders for the pod and container
//! configurations those tests use (on the host network, or on the pod's own CNI network).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStats, ContainerStatsFilter,
    ContainerStatsRequest, ContainerStatus, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ExecSyncResponse, Image, ImageSpec, ImageStatusRequest,
    LinuxContainerResources, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListContainerStatsRequest, ListContainersRequest, ListPodSandboxRequest, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatus,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    UpdateContainerResourcesRequest, VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// Errors of the CRI client.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("the CRI service at {socket} did not answer Version within {waited:?}: {last}")]
    NotReady {
        socket: PathBuf,
        waited: Duration,
        last: String,
    },
    #[error("{call}: {status}")]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{call}: the answer has no {field}")]
    Missing {
        call: &'static str,
        field: &'static str,
    },
}

fn call_error(call: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |status| CriError::Call { call, status }
}

/// A CRI client on one connection to containerd.
#[derive(Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to `socket` and waits until the CRI plugin answers `Version` (it starts after
    /// containerd's own services), up to `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<CriClient, CriError> {
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let mut client = CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        };
        let start = Instant::now();
        loop {
            match client.runtime.version(VersionRequest::default()).await {
                Ok(_) => return Ok(client),
                Err(status) if start.elapsed() >= timeout => {
                    return Err(CriError::NotReady {
                        socket: socket.to_path_buf(),
                        waited: timeout,
                        last: status.to_string(),
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The runtime service, for calls this client has no helper for.
    pub fn runtime(&mut self) -> &mut RuntimeServiceClient<Channel> {
        &mut self.runtime
    }

    /// `ImageStatus`: the image, if the CRI plugin knows it (what `crictl create` asks before
    /// it would pull).
    pub async fn image_status(&mut self, image: &str) -> Result<Option<Image>, CriError> {
        let req = ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        Ok(self
            .images
            .image_status(req)
            .await
            .map_err(call_error("ImageStatus"))?
            .into_inner()
            .image)
    }

    /// `RunPodSandbox` with `handler` (`crictl runp --runtime`); returns the pod's id.
    pub async fn run_pod_sandbox(
        &mut self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> Result<String, CriError> {
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        Ok(self
            .runtime
            .run_pod_sandbox(req)
            .await
            .map_err(call_error("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id)
    }

    /// `CreateContainer` in a pod (`crictl create`); returns the container's id.
    pub async fn create_container(
        &mut self,
        pod_id: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        };
        Ok(self
            .runtime
            .create_container(req)
            .await
            .map_err(call_error("CreateContainer"))?
            .into_inner()
            .container_id)
    }

    /// `StartContainer` (`crictl start`).
    pub async fn start_container(&mut self, id: &str) -> Result<(), CriError> {
        let req = StartContainerRequest {
            container_id: id.into(),
        };
        self.runtime
            .start_container(req)
            .await
            .map_err(call_error("StartContainer"))?;
        Ok(())
    }

    /// `ExecSync` (`crictl exec` without `-i`/`-t`): stdout, stderr and exit code.
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecSyncResponse, CriError> {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout.as_secs() as i64,
        };
        Ok(self
            .runtime
            .exec_sync(req)
            .await
            .map_err(call_error("ExecSync"))?
            .into_inner())
    }

    /// `ContainerStatus` (`crictl inspect`).
    pub async fn container_status(&mut self, id: &str) -> Result<ContainerStatus, CriError> {
        let req = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        self.runtime
            .container_status(req)
            .await
            .map_err(call_error("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::Missing {
                call: "ContainerStatus",
                field: "status",
            })
    }

    /// `UpdateContainerResources` (`crictl update`; a kubelet's in-place resize).
    pub async fn update_container_resources(
        &mut self,
        id: &str,
        resources: &LinuxContainerResources,
    ) -> Result<(), CriError> {
        let req = UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(resources.clone()),
            ..UpdateContainerResourcesRequest::default()
        };
        self.runtime
            .update_container_resources(req)
            .await
            .map_err(call_error("UpdateContainerResources"))?;
        Ok(())
    }

    /// `ContainerStats` (`crictl stats ID`).
    pub async fn container_stats(&mut self, id: &str) -> Result<ContainerStats, CriError> {
        let req = ContainerStatsRequest {
            container_id: id.into(),
        };
        self.runtime
            .container_stats(req)
            .await
            .map_err(call_error("ContainerStats"))?
            .into_inner()
            .stats
            .ok_or(CriError::Missing {
                call: "ContainerStats",
                field: "stats",
            })
    }

    /// `ListContainerStats` of one pod's containers (what a kubelet's summary API asks).
    pub async fn list_container_stats(
        &mut self,
        pod_id: &str,
    ) -> Result<Vec<ContainerStats>, CriError> {
        let req = ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: pod_id.into(),
                ..ContainerStatsFilter::default()
            }),
        };
        Ok(self
            .runtime
            .list_container_stats(req)
            .await
            .map_err(call_error("ListContainerStats"))?
            .into_inner()
            .stats)
    }

    /// `StopContainer` with a grace period (`crictl stop`).
    pub async fn stop_container(&mut self, id: &str, timeout_secs: i64) -> Result<(), CriError> {
        let req = StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_secs,
        };
        self.runtime
            .stop_container(req)
            .await
            .map_err(call_error("StopContainer"))?;
        Ok(())
    }

    /// `RemoveContainer` (`crictl rm`; a kubelet's garbage collection of an exited attempt).
    pub async fn remove_container(&mut self, id: &str) -> Result<(), CriError> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
        };
        self.runtime
            .remove_container(req)
            .await
            .map_err(call_error("RemoveContainer"))?;
        Ok(())
    }

    /// `StopPodSandbox` (`crictl stopp`, the first half of `crictl rmp -f`).
    pub async fn stop_pod_sandbox(&mut self, pod_id: &str) -> Result<(), CriError> {
        let req = StopPodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.runtime
            .stop_pod_sandbox(req)
            .await
            .map_err(call_error("StopPodSandbox"))?;
        Ok(())
    }

    /// `PodSandboxStatus` (`crictl inspectp`): the pod's state and network.
    pub async fn pod_sandbox_status(&mut self, pod_id: &str) -> Result<PodSandboxStatus, CriError> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: false,
        };
        self.runtime
            .pod_sandbox_status(req)
            .await
            .map_err(call_error("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::Missing {
                call: "PodSandboxStatus",
                field: "status",
            })
    }

    /// `RemovePodSandbox` (`crictl rmp`).
    pub async fn remove_pod_sandbox(&mut self, pod_id: &str) -> Result<(), CriError> {
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.runtime
            .remove_pod_sandbox(req)
            .await
            .map_err(call_error("RemovePodSandbox"))?;
        Ok(())
    }

    /// The ids of every pod sandbox (`crictl pods -q`).
    pub async fn list_pod_sandboxes(&mut self) -> Result<Vec<String>, CriError> {
        Ok(self
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .map_err(call_error("ListPodSandbox"))?
            .into_inner()
            .items
            .into_iter()
            .map(|p| p.id)
            .collect())
    }

    /// The ids of every container (`crictl ps -a -q`).
    pub async fn list_containers(&mut self) -> Result<Vec<String>, CriError> {
        Ok(self
            .runtime
            .list_containers(ListContainersRequest::default())
            .await
            .map_err(call_error("ListContainers"))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect())
    }

    /// Polls `ContainerStatus` until the container has exited, up to `timeout`.
    pub async fn wait_exited(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> Result<ContainerStatus, CriError> {
        let start = Instant::now();
        loop {
            let status = self.container_status(id).await?;
            if status.state() == k8s_cri::v1::ContainerState::ContainerExited
                || start.elapsed() >= timeout
            {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..ImageSpec::default()
    }
}

/// A pod on the host network (`NamespaceOption.network = NODE`), with its own PID namespace per
/// container and a shared IPC namespace, as `crictl runp` sends for a minimal pod.json. No
/// hostname: runc refuses to set one without a private UTS namespace, which a host-network pod
/// does not get.
pub fn host_network_pod_config(name: &str, uid: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "rund-e2e".into(),
            attempt: 0,
        }),
        log_directory: log_dir.to_string_lossy().into_owned(),
        labels: HashMap::from([("rund-e2e".to_string(), name.to_string())]),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..NamespaceOption::default()
                }),
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        }),
        ..PodSandboxConfig::default()
    }
}

/// A pod on its own network (`NamespaceOption.network = POD`: containerd makes a network
/// namespace and runs the CNI plugin in it) with `hostname`, as a kubelet sends a pod of a
/// Deployment.
pub fn pod_network_pod_config(
    name: &str,
    uid: &str,
    log_dir: &Path,
    hostname: &str,
) -> PodSandboxConfig {
    let mut config = host_network_pod_config(name, uid, log_dir);
    config.hostname = hostname.into();
    if let Some(ns) = namespace_options_mut(&mut config) {
        ns.network = NamespaceMode::Pod as i32;
    }
    config
}

/// The pod's namespace options, to change one (the configs above all have them).
pub fn namespace_options_mut(pod: &mut PodSandboxConfig) -> Option<&mut NamespaceOption> {
    pod.linux
        .as_mut()?
        .security_context
        .as_mut()?
        .namespace_options
        .as_mut()
}

/// [`host_network_pod_config`] in the cgroup `parent` (a kubelet's `/kubepods/...` pod cgroup).
pub fn host_network_pod_config_in(
    name: &str,
    uid: &str,
    log_dir: &Path,
    parent: &str,
) -> PodSandboxConfig {
    let mut config = host_network_pod_config(name, uid, log_dir);
    if let Some(linux) = config.linux.as_mut() {
        linux.cgroup_parent = parent.into();
    }
    config
}

/// A container running `command` in `image`, logging to `log_path` (relative to the pod's
/// log directory).
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        ..ContainerConfig::default()
    }
}

/// Gives `config` the pod's namespace options, as a kubelet does for every container of a pod
/// (a container without them, as crictl sends one, joins the pod's PID namespace: POD is 0).
pub fn with_pod_namespaces(config: &mut ContainerConfig, pod: &PodSandboxConfig) {
    let options = pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|c| c.namespace_options.clone());
    let linux = config.linux.get_or_insert_with(Default::default);
    let context = linux.security_context.get_or_insert_with(Default::default);
    context.namespace_options = options;
}

/// The lines of a CRI container log (`<time> <stream> <tag> <text>`) written to `stream`
/// (`stdout` or `stderr`).
pub fn log_lines<'a>(log: &'a str, stream: &str) -> Vec<&'a str> {
    log.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let _time = parts.next()?;
            (parts.next()? == stream).then_some(())?;
            let _tag = parts.next()?;
            parts.next()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_config_is_on_the_host_network_without_hostname() {
        let c = host_network_pod_config("p", "u1", Path::new("/logs"));
        assert!(c.hostname.is_empty());
        let ns = c
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .unwrap();
        assert_eq!(ns.network(), NamespaceMode::Node);
        assert_eq!(ns.ipc(), NamespaceMode::Pod);
        assert_eq!(c.log_directory, "/logs");
    }

    #[test]
    fn cri_log_lines_are_split_by_stream() {
        let log = "2026-11-23T03:22:18.1Z stdout F hello world\n\
                   2026-11-23T03:22:18.2Z stderr F oops\n\
                   2026-11-23T03:22:18.3Z stdout P part\n";
        assert_eq!(log_lines(log, "stdout"), ["hello world", "part"]);
        assert_eq!(log_lines(log, "stderr"), ["oops"]);
    }
}
