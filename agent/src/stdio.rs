//! A process's stdio as the agent holds it: three pipes, or a pty master.
//!
//! Reads return what is there (up to a bound) or EOF; writes wait while the pipe or the pty is full, so
//! a fast shim cannot make the agent buffer without bound (back-pressure). The child ends are handed
//! to the runtime library and closed here once it has passed them on.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::pipe;
use tokio::sync::Mutex;

/// Errors of stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A pipe could not be made.
    #[error("creating a pipe")]
    Pipe(#[source] nix::Error),
    /// A descriptor could not be registered with the event loop.
    #[error("registering a stdio descriptor")]
    Register(#[source] std::io::Error),
    /// Reading or writing failed.
    #[error("stdio I/O")]
    Io(#[source] std::io::Error),
    /// Stdin was closed already (or the process has a tty and this is stderr).
    #[error("the stream is closed")]
    Closed,
    /// The process has no tty.
    #[error("the process has no tty")]
    NoTty,
    /// The pty master did not arrive on the console socket.
    #[error("receiving the pty master on the console socket")]
    Console(#[source] std::io::Error),
    /// The window size could not be set.
    #[error("setting the tty window size")]
    Resize(#[source] nix::Error),
}

/// The child's ends, for the runtime library.
pub struct ChildPipes {
    /// The child's stdin (read end).
    pub stdin: OwnedFd,
    /// The child's stdout (write end).
    pub stdout: OwnedFd,
    /// The child's stderr (write end).
    pub stderr: OwnedFd,
}

/// The agent's side of a process's stdio.
pub enum Stdio {
    /// Plain pipes.
    Pipes {
        /// Stdin's write end; `None` once closed.
        stdin: Mutex<Option<pipe::Sender>>,
        /// Stdout's read end.
        stdout: Mutex<pipe::Receiver>,
        /// Stderr's read end.
        stderr: Mutex<pipe::Receiver>,
    },
    /// A pty: stdout and stdin are the master; stderr is merged into stdout.
    Tty {
        /// The pty master, non-blocking.
        master: AsyncFd<OwnedFd>,
        /// Serializes readers.
        read_lock: Mutex<()>,
        /// Serializes writers; `false` once stdin is "closed" (EOT sent).
        write_lock: Mutex<bool>,
    },
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd), StdioError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(StdioError::Pipe)
}

impl Stdio {
    /// Makes three pipes: the agent's ends and the child's.
    pub fn pipes() -> Result<(Self, ChildPipes), StdioError> {
        let (in_r, in_w) = pipe_pair()?;
        let (out_r, out_w) = pipe_pair()?;
        let (err_r, err_w) = pipe_pair()?;
        let stdio = Stdio::Pipes {
            stdin: Mutex::new(Some(
                pipe::Sender::from_owned_fd(in_w).map_err(StdioError::Register)?,
            )),
            stdout: Mutex::new(pipe::Receiver::from_owned_fd(out_r).map_err(StdioError::Register)?),
            stderr: Mutex::new(pipe::Receiver::from_owned_fd(err_r).map_err(StdioError::Register)?),
        };
        Ok((
            stdio,
            ChildPipes {
                stdin: in_r,
                stdout: out_w,
                stderr: err_w,
            },
        ))
    }

    /// Wraps a pty master received on a console socket.
    pub fn tty(master: OwnedFd) -> Result<Self, StdioError> {
        set_nonblocking(master.as_raw_fd()).map_err(StdioError::Resize)?;
        Ok(Stdio::Tty {
            // SAFETY: the AsyncFd owns `master` (an OwnedFd), so the descriptor stays open and the same
            // for the AsyncFd's whole life.
            master: unsafe { AsyncFd::register(master) }
                .map_err(|e| StdioError::Register(e.into()))?,
            read_lock: Mutex::new(()),
            write_lock: Mutex::new(true),
        })
    }

    /// Reads at most `max` bytes of stdout; empty means EOF.
    pub async fn read_stdout(&self, max: usize) -> Result<Vec<u8>, StdioError> {
        match self {
            Stdio::Pipes { stdout, .. } => read_pipe(&mut *stdout.lock().await, max).await,
            Stdio::Tty {
                master, read_lock, ..
            } => {
                let _guard = read_lock.lock().await;
                read_master(master, max).await
            }
        }
    }

    /// Reads at most `max` bytes of stderr; empty means EOF (always, with a tty).
    pub async fn read_stderr(&self, max: usize) -> Result<Vec<u8>, StdioError> {
        match self {
            Stdio::Pipes { stderr, .. } => read_pipe(&mut *stderr.lock().await, max).await,
            Stdio::Tty { .. } => Ok(Vec::new()),
        }
    }

    /// Writes all of `data` to stdin, waiting while the pipe or pty is full.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize, StdioError> {
        match self {
            Stdio::Pipes { stdin, .. } => {
                let mut stdin = stdin.lock().await;
                let sender = stdin.as_mut().ok_or(StdioError::Closed)?;
                sender.write_all(data).await.map_err(StdioError::Io)?;
                Ok(data.len())
            }
            Stdio::Tty {
                master, write_lock, ..
            } => {
                let open = write_lock.lock().await;
                if !*open {
                    return Err(StdioError::Closed);
                }
                write_master(master, data).await?;
                Ok(data.len())
            }
        }
    }

    /// Closes stdin: the child reads EOF (with a tty: an EOT character, as a terminal would send).
    pub async fn close_stdin(&self) -> Result<(), StdioError> {
        match self {
            Stdio::Pipes { stdin, .. } => {
                stdin.lock().await.take();
                Ok(())
            }
            Stdio::Tty {
                master, write_lock, ..
            } => {
                let mut open = write_lock.lock().await;
                if *open {
                    write_master(master, &[4]).await?;
                    *open = false;
                }
                Ok(())
            }
        }
    }

    /// Sets the tty's window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        let Stdio::Tty { master, .. } = self else {
            return Err(StdioError::NoTty);
        };
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call; the fd
        // is the pty master this struct owns.
        let rc = unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(StdioError::Resize(nix::Error::last()));
        }
        Ok(())
    }
}

async fn read_pipe(rx: &mut pipe::Receiver, max: usize) -> Result<Vec<u8>, StdioError> {
    let mut buf = vec![0u8; max.max(1)];
    let n = rx.read(&mut buf).await.map_err(StdioError::Io)?;
    buf.truncate(n);
    Ok(buf)
}

async fn read_master(master: &AsyncFd<OwnedFd>, max: usize) -> Result<Vec<u8>, StdioError> {
    let mut buf = vec![0u8; max.max(1)];
    loop {
        let mut guard = master.readable().await.map_err(StdioError::Io)?;
        match guard.try_io(|fd| {
            std::fs::File::from(fd.get_ref().try_clone()?)
                .read(&mut buf)
                .map(|n| (n, ()))
        }) {
            Ok(Ok((n, ()))) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // EIO: every slave end is closed: the terminal's EOF.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(Vec::new()),
            Ok(Err(e)) => return Err(StdioError::Io(e)),
            Err(_would_block) => continue,
        }
    }
}

async fn write_master(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> Result<(), StdioError> {
    while !data.is_empty() {
        let mut guard = master
            .ready(Interest::WRITABLE)
            .await
            .map_err(StdioError::Io)?;
        match guard.try_io(|fd| std::fs::File::from(fd.get_ref().try_clone()?).write(data)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(StdioError::Io(e)),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> Result<(), nix::Error> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Receives one descriptor (the pty master) from the first connection to `listener`.
pub fn receive_console(listener: &UnixListener) -> Result<OwnedFd, StdioError> {
    let (stream, _) = listener.accept().map_err(StdioError::Console)?;
    let mut name = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| StdioError::Console(e.into()))?;
    for cmsg in msg.cmsgs().map_err(|e| StdioError::Console(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut owned: Vec<OwnedFd> = fds
                .into_iter()
                // SAFETY: SCM_RIGHTS just installed these descriptors in this process; nothing else
                // owns them.
                .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
                .collect();
            if let Some(master) = owned.pop() {
                return Ok(master);
            }
        }
    }
    Err(StdioError::Console(std::io::Error::other(
        "no descriptor in the console socket message",
    )))
}

/// A console socket at `path` and a thread receiving the pty master on it.
pub fn console_socket(
    path: &Path,
) -> Result<std::thread::JoinHandle<Result<OwnedFd, StdioError>>, StdioError> {
    let listener = UnixListener::bind(path).map_err(StdioError::Console)?;
    Ok(std::thread::spawn(move || receive_console(&listener)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipes_carry_data_and_eof() {
        let (stdio, child) = Stdio::pipes().unwrap();
        // Play the child: copy stdin to stdout on a thread.
        let copier = std::thread::spawn(move || {
            let mut input = std::fs::File::from(child.stdin);
            let mut output = std::fs::File::from(child.stdout);
            drop(child.stderr);
            std::io::copy(&mut input, &mut output).unwrap();
        });
        assert_eq!(stdio.write_stdin(b"hello").await.unwrap(), 5);
        stdio.close_stdin().await.unwrap();
        assert!(matches!(
            stdio.write_stdin(b"x").await,
            Err(StdioError::Closed)
        ));
        let mut out = Vec::new();
        loop {
            let chunk = stdio.read_stdout(3).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 3);
            out.extend(chunk);
        }
        assert_eq!(out, b"hello");
        assert!(stdio.read_stderr(10).await.unwrap().is_empty());
        copier.join().unwrap();
    }

    #[tokio::test]
    async fn stdin_waits_while_the_pipe_is_full() {
        let (stdio, child) = Stdio::pipes().unwrap();
        // Nobody reads: a write bigger than the pipe buffer must wait, not fail or buffer.
        let big = vec![0u8; 1 << 20];
        let write = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            stdio.write_stdin(&big),
        )
        .await;
        assert!(write.is_err(), "the write should still be waiting");
        drop(child);
    }

    #[test]
    fn resize_needs_a_tty() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let (stdio, _child) = Stdio::pipes().unwrap();
        assert!(matches!(stdio.resize(24, 80), Err(StdioError::NoTty)));
    }

    #[tokio::test]
    async fn pty_round_trip_and_resize() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let stdio = Stdio::tty(pty.master).unwrap();
        stdio.resize(33, 101).unwrap();
        let mut size: libc::winsize = zero_winsize();
        // SAFETY: TIOCGWINSZ writes one `winsize` into `size`, valid for the call.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(rc, 0);
        assert_eq!((size.ws_row, size.ws_col), (33, 101));
        let mut slave = std::fs::File::from(pty.slave);
        slave.write_all(b"out").unwrap();
        let got = stdio.read_stdout(100).await.unwrap();
        assert_eq!(got, b"out");
        drop(slave);
        assert!(stdio.read_stdout(100).await.unwrap().is_empty());
    }

    fn zero_winsize() -> libc::winsize {
        libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}
