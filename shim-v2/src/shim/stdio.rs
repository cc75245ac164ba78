//! A process's stdio: containerd's FIFOs on the host side, the agent's stream RPCs on the other.
//!
//! Output is pulled from the agent (ReadStdout/ReadStderr block until data or end) and written to
//! the FIFO; back-pressure holds because the next read is asked only after the write. Input is
//! read from the FIFO in a blocking thread (opening a FIFO for reading waits for its writer) and
//! pushed with WriteStdin; its end becomes CloseStdin.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use agent_protocol::agent::{ProcessRequest, ReadStreamRequest, WriteStreamRequest};
use agent_protocol::{AgentClient, MAX_IO_CHUNK};
use log::{debug, warn};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

/// One chunk asked of the agent per read: well under the protocol's limit.
const READ_CHUNK: u32 = 256 * 1024;

fn no_timeout() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

/// What containerd gave for one process.
#[derive(Clone, Debug, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// The copy tasks of one process.
pub struct StdioPumps {
    outputs: Vec<JoinHandle<()>>,
}

impl StdioPumps {
    /// Starts copying for `container_id`/`exec_id` (empty for the container's own process).
    pub fn start(
        agent: Arc<AgentClient>,
        container_id: &str,
        exec_id: &str,
        paths: &StdioPaths,
    ) -> StdioPumps {
        let mut outputs = Vec::new();
        let mut streams = vec![(Stream::Stdout, &paths.stdout)];
        // With a terminal, stderr is the same pty: the agent has only stdout.
        if !paths.terminal {
            streams.push((Stream::Stderr, &paths.stderr));
        }
        for (stream, path) in streams {
            if path.is_empty() {
                continue;
            }
            outputs.push(tokio::spawn(copy_out(
                agent.clone(),
                container_id.to_owned(),
                exec_id.to_owned(),
                stream,
                PathBuf::from(path),
            )));
        }
        let (cid, eid) = (container_id.to_owned(), exec_id.to_owned());
        if paths.stdin.is_empty() {
            // No stdin: the process reads end-of-file at once, as under runc.
            tokio::spawn(async move { close_stdin(&agent, &cid, &eid).await });
        } else {
            let path = PathBuf::from(&paths.stdin);
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || copy_in(handle, agent, cid, eid, path));
        }
        StdioPumps { outputs }
    }

    /// Waits until every output has reached its end (the process and whatever inherited its
    /// output closed it), at most `limit`.
    pub async fn drained(&mut self, limit: std::time::Duration) {
        let all = futures_join(std::mem::take(&mut self.outputs));
        if tokio::time::timeout(limit, all).await.is_err() {
            debug!("output still open {limit:?} after the process ended (a child holds it)");
        }
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

async fn copy_out(
    agent: Arc<AgentClient>,
    container_id: String,
    exec_id: String,
    stream: Stream,
    path: PathBuf,
) {
    // Read-write: the open does not wait for containerd's reader, and a reader that comes and
    // goes does not turn our writes into EPIPE.
    let mut fifo = match tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(&path)
    {
        Ok(f) => f,
        Err(e) => {
            warn!("{container_id}/{exec_id}: opening {}: {e}", path.display());
            return;
        }
    };
    let mut req = ReadStreamRequest::new();
    req.container_id = container_id.clone();
    req.exec_id = exec_id.clone();
    req.len = READ_CHUNK.min(MAX_IO_CHUNK as u32);
    loop {
        let resp = match stream {
            Stream::Stdout => agent.read_stdout(no_timeout(), &req).await,
            Stream::Stderr => agent.read_stderr(no_timeout(), &req).await,
        };
        match resp {
            Ok(r) if r.eof => break,
            // The guest's answer: more than asked is a lie, and the stream ends with it (once
            // per stream, so the log holds one line for it).
            Ok(r) if r.data.len() > req.len as usize => {
                warn!(
                    "{container_id}/{exec_id}: the agent answered a {stream:?} read of {} bytes \
                     with {}; the stream ends here",
                    req.len,
                    r.data.len()
                );
                break;
            }
            Ok(r) => {
                if let Err(e) = fifo.write_all(&r.data).await {
                    warn!("{container_id}/{exec_id}: writing {}: {e}", path.display());
                    break;
                }
            }
            Err(e) => {
                debug!("{container_id}/{exec_id}: {stream:?} ends: {e}");
                break;
            }
        }
    }
}

async fn close_stdin(agent: &AgentClient, container_id: &str, exec_id: &str) {
    let mut req = ProcessRequest::new();
    req.container_id = container_id.to_owned();
    req.exec_id = exec_id.to_owned();
    if let Err(e) = agent.close_stdin(no_timeout(), &req).await {
        debug!("{container_id}/{exec_id}: closing stdin: {e}");
    }
}

fn copy_in(
    handle: tokio::runtime::Handle,
    agent: Arc<AgentClient>,
    container_id: String,
    exec_id: String,
    path: PathBuf,
) {
    let mut fifo = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            warn!("{container_id}/{exec_id}: opening {}: {e}", path.display());
            handle.block_on(close_stdin(&agent, &container_id, &exec_id));
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match fifo.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("{container_id}/{exec_id}: reading {}: {e}", path.display());
                break;
            }
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            let mut req = WriteStreamRequest::new();
            req.container_id = container_id.clone();
            req.exec_id = exec_id.clone();
            req.data = data.to_vec();
            match handle.block_on(agent.write_stdin(no_timeout(), &req)) {
                Ok(r) if r.len > 0 => data = &data[(r.len as usize).min(data.len())..],
                // Nothing taken: the process closed its stdin.
                Ok(_) => return,
                Err(e) => {
                    debug!("{container_id}/{exec_id}: stdin ends: {e}");
                    return;
                }
            }
        }
    }
    handle.block_on(close_stdin(&agent, &container_id, &exec_id));
}
