//! rund's guest agent API, shared by the agent (server) and the shim (client).
//!
//! - [`agent`]: the protobuf messages of `proto/agent.proto` (generated at build time).
//! - [`agent_ttrpc`]: the ttrpc service trait the agent implements and the typed client.
//! - [`client`]: connecting a client: to a unix socket, over Firecracker's hybrid vsock, or on a
//!   stream the caller already connected.

#[allow(missing_docs, clippy::all, clippy::pedantic, unused_qualifications)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/generated.rs"));
}

pub use generated::{agent, agent_ttrpc};

pub mod client;

/// The attribute the service trait is declared with: implement it with `#[agent_protocol::async_trait]`.
pub use async_trait::async_trait;

pub use client::{AgentClient, ClientError};

/// A [`agent::Storage`] for CreateSandbox or CreateContainer: mount `source` with `driver`
/// (`virtiofs`, `block`, `bind`) and filesystem `fstype` at the guest's storage `name`.
pub fn storage(
    driver: &str,
    source: &str,
    fstype: &str,
    name: &str,
    options: &[&str],
) -> agent::Storage {
    let mut s = agent::Storage::new();
    s.driver = driver.into();
    s.source = source.into();
    s.fstype = fstype.into();
    s.name = name.into();
    s.options = options.iter().map(|o| o.to_string()).collect();
    s
}

/// The vsock port the agent listens on when it runs as the guest's PID 1.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The agent's state directory when it runs as the guest's PID 1 (its `--state-dir` default).
pub const GUEST_STATE_DIR: &str = "/run/rund-agent";

/// Where the agent mounts storage `<name>` in the guest: `<GUEST_STORAGE_DIR>/<name>`. A spec's bind
/// mount of a shared volume names its source under it.
pub const GUEST_STORAGE_DIR: &str = "/run/rund-agent/storage";

/// The path a container spec names as its PID namespace to join the pod's shared one (a pod that
/// asks for `shareProcessNamespace`): the agent makes that namespace on first use and puts its real
/// path in. No other namespace path is accepted in a spec.
pub const POD_PID_NAMESPACE: &str = "/run/rund-agent/pod/ns/pid";

/// The API version [`agent::VersionResponse::protocol_version`] reports; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest ttrpc message (header excluded) either side accepts; larger ones are refused with an error
/// and the connection keeps serving.
pub const MAX_MESSAGE_SIZE: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;

/// The most bytes one ReadStdout/ReadStderr returns or one WriteStdin takes: well under
/// [`MAX_MESSAGE_SIZE`], so that a stream chunk always fits a message.
pub const MAX_IO_CHUNK: usize = 1 << 20;
