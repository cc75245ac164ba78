//! Connecting to the agent.
//!
//! Three ways in, all giving an [`AgentClient`] (the generated typed client):
//! - [`connect_unix`]: a plain unix socket (the agent as a host process, `--listen unix:PATH`);
//! - [`connect_hybrid_vsock`]: Firecracker's hybrid vsock: the VMM's unix socket, a `CONNECT <port>\n`
//!   line answered by `OK <host port>\n`, then the stream is the guest port's;
//! - [`client_from_stream`]: a stream the caller already connected (and handshaked).
//!
//! Each must be called inside a tokio runtime: the client runs a background task.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// The typed client of the agent's service.
pub type AgentClient = crate::agent_ttrpc::AgentServiceClient;

/// The longest answer line to `CONNECT` the handshake reads.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Errors connecting to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("connecting to {path}")]
    Connect {
        /// The socket's path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hybrid vsock handshake failed on I/O.
    #[error("hybrid vsock handshake")]
    HandshakeIo(#[source] std::io::Error),
    /// The VMM answered the `CONNECT` line with something other than `OK <port>`.
    #[error("hybrid vsock handshake refused: {0:?}")]
    HandshakeRefused(String),
    /// The handshake did not finish in time.
    #[error("hybrid vsock handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
}

/// A client over a stream the caller connected (for example a unix socket after the hybrid vsock
/// handshake).
pub fn client_from_stream<S>(stream: S) -> AgentClient
where
    S: AsyncRead + AsyncWrite + Send + Sync + 'static,
{
    AgentClient::new(ttrpc::r#async::Client::new(
        ttrpc::asynchronous::transport::Socket::new(stream),
    ))
}

/// A client on the agent's unix socket at `path`.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<AgentClient, ClientError> {
    let path = path.as_ref();
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    Ok(client_from_stream(stream))
}

/// Does the hybrid vsock handshake on `stream`: writes `CONNECT <port>\n` and reads the `OK <n>\n`
/// answer byte by byte, so that nothing past the answer is consumed. Returns the host-side port number.
pub async fn hybrid_vsock_handshake<S>(stream: &mut S, port: u32) -> Result<u32, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(ClientError::HandshakeIo)?;
    let mut line = Vec::with_capacity(16);
    loop {
        let byte = stream.read_u8().await.map_err(ClientError::HandshakeIo)?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(ClientError::HandshakeRefused(
                String::from_utf8_lossy(&line).into_owned(),
            ));
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    line.strip_prefix("OK ")
        .and_then(|n| n.trim().parse().ok())
        .ok_or(ClientError::HandshakeRefused(line))
}

/// A client on the guest's vsock `port` through the VMM's hybrid vsock unix socket at `path`
/// (Firecracker's scheme). The handshake must finish within `timeout`.
pub async fn connect_hybrid_vsock(
    path: impl AsRef<Path>,
    port: u32,
    timeout: Duration,
) -> Result<AgentClient, ClientError> {
    let path = path.as_ref();
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    tokio::time::timeout(timeout, hybrid_vsock_handshake(&mut stream, port))
        .await
        .map_err(|_| ClientError::HandshakeTimeout(timeout))??;
    Ok(client_from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_reads_ok_line_and_nothing_more() {
        let (mut host, mut vmm) = tokio::io::duplex(256);
        let vmm_side = tokio::spawn(async move {
            let mut buf = [0u8; 13];
            vmm.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            vmm.write_all(b"OK 1073741824\nrest").await.unwrap();
            vmm
        });
        let port = hybrid_vsock_handshake(&mut host, 1024).await.unwrap();
        assert_eq!(port, 1_073_741_824);
        let _vmm = vmm_side.await.unwrap();
        let mut rest = [0u8; 4];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");
    }

    #[tokio::test]
    async fn handshake_refusal_is_an_error() {
        let (mut host, mut vmm) = tokio::io::duplex(256);
        tokio::spawn(async move {
            let mut buf = [0u8; 13];
            vmm.read_exact(&mut buf).await.unwrap();
            vmm.write_all(b"ERROR no listener\n").await.unwrap();
        });
        let err = hybrid_vsock_handshake(&mut host, 1024).await.unwrap_err();
        assert!(matches!(err, ClientError::HandshakeRefused(ref l) if l == "ERROR no listener"));
    }

    #[tokio::test]
    async fn handshake_bounds_the_answer() {
        let (mut host, mut vmm) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = [0u8; 13];
            vmm.read_exact(&mut buf).await.unwrap();
            vmm.write_all(&[b'x'; 1000]).await.unwrap();
        });
        assert!(hybrid_vsock_handshake(&mut host, 1024).await.is_err());
    }
}
