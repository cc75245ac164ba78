//! rund's guest agent: PID 1 of every sandbox microVM, serving the shim over ttrpc on vsock.
//!
//! One job per module:
//! - [`init`]: PID 1's mounts (proc, sys, dev, cgroups);
//! - [`reaper`]: the one SIGCHLD reaper, dispatching exit statuses by pid;
//! - [`server`]: where the agent listens (vsock, or a unix socket for tests on a host);
//! - [`rpc`]: the ttrpc service, checking requests and mapping errors to statuses;
//! - [`registry`]: containers and processes by id;
//! - [`container`]: the OCI runtime (youki's libcontainer) and the containers' cgroups;
//! - [`executor`]: finding and exec'ing a container process's executable as runc does;
//! - [`cwd`]: making a container's working directory inside its root before it is created;
//! - [`stdio`]: pipes and ptys with back-pressure;
//! - [`storage`]: storages, the overlay root, path checks;
//! - [`pod_pid`]: the pod's shared PID namespace and its init;
//! - [`identity`]: hostname, entropy and clock for a sandbox restored from a template.
//!
//! The protocol (messages, services, client) is the `agent-protocol` crate beside this one.

pub mod container;
pub mod cwd;
pub mod executor;
pub mod identity;
pub mod init;
pub mod network;
pub mod pod_pid;
pub mod reaper;
pub mod registry;
pub mod rpc;
pub mod server;
pub mod stdio;
pub mod storage;

/// An error and its sources on one line (`a: b: c`): what a status message or a log line carries.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
