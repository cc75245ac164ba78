//! The pod's shared PID namespace, for pods that ask for `shareProcessNamespace`.
//!
//! Under the CRI a pod's sandbox ("pause") container never runs in the guest: the VM is the pod.
//! When a container's spec joins the pod's PID namespace (the shim writes
//! [`agent_protocol::POD_PID_NAMESPACE`] as its path), the agent makes that namespace on first
//! use, held by a tiny init of its own, as the pause process holds it under runc: PID 1 of the
//! namespace, which reaps the orphans of the pod's processes and ignores every signal. It lives
//! until the sandbox is destroyed or the agent ends: it waits on a pipe whose only write end the
//! agent keeps, so its end (and with it every process of the namespace, which the kernel kills
//! when a namespace's init exits) follows the agent's drop of that end, whatever kills the agent.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sched::CloneFlags;

use crate::reaper::{ExitWatch, Reaper};

/// The holder's stack: it runs a few system calls only.
const STACK_SIZE: usize = 64 * 1024;

/// The holder's name in `ps` inside the pod.
const HOLDER_NAME: &[u8] = b"rund-pod-init\0";

/// Errors making or joining the pod's PID namespace.
#[derive(Debug, thiserror::Error)]
pub enum PodPidError {
    /// The pipe that ties the holder to the agent could not be made.
    #[error("making the pod PID namespace's pipe")]
    Pipe(#[source] nix::Error),
    /// clone(CLONE_NEWPID) failed.
    #[error("creating the pod's PID namespace")]
    Clone(#[source] nix::Error),
    /// The holder exited: the namespace and every process in it are gone.
    #[error("the pod's PID namespace has ended (its init exited with status {0})")]
    Ended(i32),
}

/// The running holder.
struct Holder {
    pid: i32,
    exit: ExitWatch,
    /// The pipe's write end: dropping it ends the holder.
    _tie: OwnedFd,
}

/// The pod's PID namespace: none until a container asks to join it.
pub struct PodPidNamespace {
    reaper: Arc<Reaper>,
    holder: Mutex<Option<Holder>>,
}

impl PodPidNamespace {
    /// No namespace yet; the holder will be the agent's child, reaped by `reaper`.
    pub fn new(reaper: Arc<Reaper>) -> Self {
        Self {
            reaper,
            holder: Mutex::new(None),
        }
    }

    /// The path a container joins the namespace by, making the namespace first if there is none.
    pub fn path(&self) -> Result<PathBuf, PodPidError> {
        let mut holder = self.holder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = holder.as_ref() {
            if let Some(status) = *h.exit.borrow() {
                return Err(PodPidError::Ended(status));
            }
            return Ok(ns_path(h.pid));
        }
        let h = self.spawn()?;
        let path = ns_path(h.pid);
        *holder = Some(h);
        Ok(path)
    }

    /// Ends the namespace (and every process in it) if there is one; the next [`Self::path`] makes
    /// a new one.
    pub fn end(&self) {
        // Dropping the write end gives the holder its end of file.
        self.holder.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Whether a namespace is held now (for tests and logs).
    pub fn is_held(&self) -> bool {
        self.holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|h| h.exit.borrow().is_none())
    }

    fn spawn(&self) -> Result<Holder, PodPidError> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(PodPidError::Pipe)?;
        let read_fd = read.as_raw_fd();
        let mut stack = vec![0u8; STACK_SIZE];
        let mark = self.reaper.mark();
        // SAFETY: the child runs `holder_main`, which makes only async-signal-safe system calls
        // (no allocation, no lock: the parent is multi-threaded) on its own copy of `stack`, and
        // never returns into Rust code of the parent's.
        let pid = unsafe {
            nix::sched::clone(
                Box::new(move || holder_main(read_fd)),
                &mut stack,
                CloneFlags::CLONE_NEWPID,
                Some(libc::SIGCHLD),
            )
        }
        .map_err(PodPidError::Clone)?;
        drop(read);
        let pid = pid.as_raw();
        Ok(Holder {
            pid,
            exit: self.reaper.watch(pid, mark),
            _tie: write,
        })
    }
}

fn ns_path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/pid"))
}

/// PID 1 of the pod's namespace: children reaped by the kernel, every signal blocked, every
/// inherited descriptor closed but the pipe, and an exit at the pipe's end of file.
fn holder_main(tie: i32) -> isize {
    // SAFETY: plain system calls on values owned here; sigset_t is plain data that sigfillset
    // initializes; `buf` outlives the read.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, HOLDER_NAME.as_ptr());
        let mut ignore: libc::sigaction = std::mem::zeroed();
        ignore.sa_sigaction = libc::SIG_IGN;
        ignore.sa_flags = libc::SA_NOCLDWAIT;
        libc::sigaction(libc::SIGCHLD, &ignore, std::ptr::null_mut());
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        if tie != 3 {
            libc::dup2(tie, 3);
        }
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let mut buf = [0u8; 1];
        loop {
            let n = libc::read(3, buf.as_mut_ptr().cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                libc::_exit(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var_os("RUND_REQUIRE_AGENT_TESTS").is_none(),
            "RUND_REQUIRE_AGENT_TESTS is set: this test needs root"
        );
        eprintln!("skipped: needs root (a new PID namespace)");
        false
    }

    /// The pids (in ours) of the processes in namespace `path`.
    fn members(path: &std::path::Path) -> Vec<i32> {
        let Ok(target) = std::fs::read_link(path) else {
            return Vec::new();
        };
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| std::fs::read_link(ns_path(*pid)).ok().as_ref() == Some(&target))
            .collect()
    }

    fn status_field(pid: i32, field: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Root: one namespace per pod, its init PID 1 there, orphans reaped, and everything in it
    /// gone when it ends.
    #[tokio::test]
    async fn one_namespace_until_ended() {
        if !root() {
            return;
        }
        let reaper = Reaper::start().unwrap();
        let pods = PodPidNamespace::new(reaper.clone());
        assert!(!pods.is_held());
        let path = pods.path().unwrap();
        assert_eq!(pods.path().unwrap(), path, "one namespace per pod");
        assert!(pods.is_held());
        assert_ne!(
            std::fs::read_link(&path).unwrap(),
            std::fs::read_link("/proc/self/ns/pid").unwrap()
        );
        let holder = members(&path);
        assert_eq!(holder.len(), 1, "only the holder: {holder:?}");
        assert!(
            status_field(holder[0], "NSpid")
                .is_some_and(|v| v.split_whitespace().last() == Some("1")),
            "the holder is PID 1 of the pod"
        );
        // Once it has set itself up: its name, and no descriptor of ours but the tie and stdio.
        let name = || status_field(holder[0], "Name");
        until("the holder's name", || {
            name().as_deref() == Some("rund-pod-init")
        })
        .await;
        let fds = || {
            std::fs::read_dir(format!("/proc/{}/fd", holder[0]))
                .map(|d| d.count())
                .unwrap_or(usize::MAX)
        };
        until("the holder's descriptors closed", || fds() <= 4).await;

        // An orphan in the namespace is reaped by the holder, not left a zombie.
        let ns = path.display().to_string();
        // Children of this process are reaped by the reaper, which watches them.
        let mark = reaper.mark();
        let orphan = std::process::Command::new("nsenter")
            .args([&format!("--pid={ns}"), "--", "sh", "-c", "sleep 1 & exit 0"])
            .spawn()
            .unwrap()
            .id();
        let orphan = reaper.watch(orphan as i32, mark);
        let children = format!("/proc/{0}/task/{0}/children", holder[0]);
        until("the orphan's adoption", || {
            std::fs::read_to_string(&children).is_ok_and(|c| !c.trim().is_empty())
        })
        .await;
        until("nsenter's exit", || orphan.borrow().is_some()).await;
        until("the orphan's end, reaped", || {
            std::fs::read_to_string(&children).is_ok_and(|c| c.trim().is_empty())
        })
        .await;

        // A process in the namespace ends with it.
        let mark = reaper.mark();
        let joined = std::process::Command::new("nsenter")
            .args([&format!("--pid={ns}"), "--", "sleep", "600"])
            .spawn()
            .unwrap()
            .id();
        let exit = reaper.watch(joined as i32, mark);
        until("the joined process", || members(&path).len() == 2).await;
        pods.end();
        until("the namespace's end", || exit.borrow().is_some()).await;
        until("the holder's end", || members(&path).is_empty()).await;
        assert!(!pods.is_held());
        let again = pods.path().unwrap();
        assert!(pods.is_held());
        pods.end();
        assert!(!pods.is_held());
        drop(again);
    }
}
