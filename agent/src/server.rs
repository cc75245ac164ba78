//! Where the agent listens: `vsock:PORT` in the guest, `unix:PATH` for tests on a host.

use std::path::PathBuf;
use std::sync::Arc;

use agent_protocol::agent_ttrpc::create_agent_service;

use crate::rpc::Agent;

/// Errors of the listener.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address is not `unix:PATH` or `vsock:PORT`.
    #[error("invalid listen address {0:?} (unix:PATH or vsock:PORT)")]
    Address(String),
    /// The stale socket file could not be removed.
    #[error("removing the stale socket {0}")]
    Stale(PathBuf, #[source] std::io::Error),
    /// ttrpc failed to bind or serve.
    #[error("ttrpc server")]
    Ttrpc(#[source] ttrpc::Error),
}

/// A listen address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket path.
    Unix(PathBuf),
    /// A vsock port on any CID.
    Vsock(u32),
}

impl std::str::FromStr for Listen {
    type Err = ServerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ServerError::Address(s.to_owned()));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(port) = s.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Listen::Vsock)
                .map_err(|_| ServerError::Address(s.to_owned()));
        }
        Err(ServerError::Address(s.to_owned()))
    }
}

/// Starts serving `agent` on `listen`; the returned server runs until dropped or shut down.
pub async fn serve(
    agent: Arc<Agent>,
    listen: &Listen,
) -> Result<ttrpc::r#async::Server, ServerError> {
    let address = match listen {
        Listen::Unix(path) => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ServerError::Stale(path.clone(), e)),
            }
            format!("unix://{}", path.display())
        }
        Listen::Vsock(port) => format!("vsock://-1:{port}"),
    };
    let mut server = ttrpc::r#async::Server::new()
        .bind(&address)
        .map_err(ServerError::Ttrpc)?
        .register_service(create_agent_service(agent));
    server.start().await.map_err(ServerError::Ttrpc)?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "unix:/run/a.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/a.sock".into())
        );
        assert_eq!("vsock:1024".parse::<Listen>().unwrap(), Listen::Vsock(1024));
        for bad in ["unix:", "vsock:x", "tcp:1", "/run/a.sock"] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }
}
