//! `containerd-shim-rund-v2`: containerd's runtime v2 shim, one process per pod, with the pod's
//! microVM inside it.
//!
//! - `start` (run by containerd for each new container): a container of a CRI pod joins the
//!   shim already serving its pod (same socket address, grouped by the pod's id); any other
//!   container gets a new shim, which starts a sandbox of its own.
//! - the server: the task service ([`service`]) over ttrpc.
//! - `delete` (run by containerd after a shim died): undoes what the dead shim's sandbox held,
//!   from its records under `/run/rund/<sandbox-id>/`.

pub mod agent_reports;
pub mod console;
pub mod host_cgroup;
pub mod pod_network;
pub mod process;
pub mod record;
pub mod sandbox;
pub mod service;
pub mod sizing;
pub mod spec;
pub mod stdio;
pub mod template;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Error as ShimError, Flags, StartOpts};
use log::{info, warn};
use oci_spec::runtime::Spec;
use rootfs_split::{check_id, InvalidId};

use crate::config::Config;
use service::{TaskService, CONTAINER_TYPE, SANDBOX_ID};

/// containerd's name for this runtime.
pub const RUNTIME_ID: &str = "io.containerd.rund.v2";

/// The status containerd records for a task whose shim was killed.
const KILLED_STATUS: u32 = 128 + 9;

pub struct RundShim {
    id: String,
    namespace: String,
    config: Result<Arc<Config>, String>,
    exit: Arc<ExitSignal>,
}

/// The pod a bundle's container belongs to: the CRI sandbox id for a pod's container, else the
/// container's own id (a sandbox of its own). Either becomes `/run/rund/<sandbox>/`, which
/// `delete` removes: both are checked as ids first (an annotation is the spec author's word).
pub fn sandbox_of(id: &str, bundle: &Path) -> Result<String, InvalidId> {
    check_id("container", id)?;
    let annotations = Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default();
    let sandbox = match (
        annotations.get(CONTAINER_TYPE).map(String::as_str),
        annotations.get(SANDBOX_ID),
    ) {
        (Some("container"), Some(pod)) => pod.clone(),
        _ => id.to_owned(),
    };
    check_id("sandbox", &sandbox)?;
    Ok(sandbox)
}

fn config_error(e: &str) -> ShimError {
    ShimError::FailedPreconditionError(format!("rund configuration: {e}"))
}

#[async_trait]
impl Shim for RundShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        let config = Config::load().map(Arc::new).map_err(|e| e.to_string());
        if let Ok(c) = &config {
            log::set_max_level(c.log_level.filter());
        }
        RundShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            config,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        self.config.as_ref().map_err(|e| config_error(e))?;
        let bundle = std::env::current_dir().map_err(|err| ShimError::IoError {
            context: "the bundle (current directory)".into(),
            err,
        })?;
        let grouping =
            sandbox_of(&opts.id, &bundle).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
        // The pod's shim already serves: this container joins it.
        let path = address.trim_start_matches("unix://");
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            containerd_shim::util::write_str_to_file("address", &address).await?;
            return Ok(address);
        }
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let config = self.config.as_ref().map_err(|e| config_error(e))?;
        let bundle = std::env::current_dir().map_err(|err| ShimError::IoError {
            context: "the bundle (current directory)".into(),
            err,
        })?;
        // A refused id cleans up nothing: its shim never started a sandbox.
        let cleaned = sandbox_of(&self.id, &bundle)
            .map_err(|e| e.to_string())
            .and_then(|sandbox| {
                sandbox::cleanup_dead(config, &sandbox).map(|done| (sandbox, done))
            });
        match cleaned {
            Ok((sandbox, true)) => info!(
                "{}/{}: cleaned up sandbox {sandbox} after its shim died",
                self.namespace, self.id
            ),
            Ok((sandbox, false)) => {
                info!("{}: sandbox {sandbox} is still served by its shim", self.id)
            }
            Err(e) => warn!("{}: cleaning up after its shim: {e}", self.id),
        }
        Ok(DeleteResponse {
            exit_status: KILLED_STATUS,
            exited_at: MessageField::some(process::now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let config = match &self.config {
            Ok(c) => c.clone(),
            Err(e) => {
                // `start` refused already; a server started by hand gets the defaults.
                warn!("rund configuration: {e}; using the defaults");
                Arc::new(Config::default())
            }
        };
        TaskService::new(config, &self.namespace, publisher, self.exit.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(annotations: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": annotations,
        });
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        dir
    }

    #[test]
    fn a_pods_container_is_grouped_by_its_pod() {
        let b = bundle(serde_json::json!({CONTAINER_TYPE: "container", SANDBOX_ID: "pod1"}));
        assert_eq!(sandbox_of("c1", b.path()).unwrap(), "pod1");
        let b = bundle(serde_json::json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}));
        assert_eq!(sandbox_of("pod1", b.path()).unwrap(), "pod1");
        let b = bundle(serde_json::json!({}));
        assert_eq!(sandbox_of("c2", b.path()).unwrap(), "c2");
    }

    #[test]
    fn an_annotation_or_id_that_is_a_path_is_refused() {
        for pod in ["/", "../..", "..", "a/b", "", "x\ny"] {
            let b = bundle(serde_json::json!({CONTAINER_TYPE: "container", SANDBOX_ID: pod}));
            let e = sandbox_of("c1", b.path()).unwrap_err().to_string();
            assert!(e.starts_with("sandbox id"), "{pod:?}: {e}");
        }
        let b = bundle(serde_json::json!({}));
        let e = sandbox_of("../c", b.path()).unwrap_err().to_string();
        assert!(e.starts_with("container id"), "{e}");
    }
}
