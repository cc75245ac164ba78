//! The one SIGCHLD reaper: every child's exit status goes through here, dispatched by pid.
//!
//! Nothing else in the agent may wait for children. libcontainer waits for its own intermediate
//! process but tolerates finding it already reaped (ECHILD), so reaping everything here steals no
//! status anyone needs. A process's exit may be reaped before its pid is known to the agent (an exec'd
//! `true` exits before the runtime library returns its pid): such statuses are kept as *unclaimed*,
//! stamped with a sequence number, and claimed by [`Reaper::watch`] only if they were reaped after
//! the caller's [`Reaper::mark`], so a recycled pid never inherits a stale status. As PID 1 (or as a
//! subreaper) the agent also reaps orphans; their statuses are simply kept a while and dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Unclaimed statuses kept at most; the oldest are dropped past this.
const MAX_UNCLAIMED: usize = 4096;

/// Errors starting the reaper.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// The SIGCHLD handler could not be installed.
    #[error("installing the SIGCHLD handler")]
    Signal(#[source] std::io::Error),
}

/// A process's exit status as runc reports it: the exit code, or 128 + the killing signal.
pub fn exit_status(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Receives a watched process's status: `None` while it runs.
pub type ExitWatch = watch::Receiver<Option<i32>>;

#[derive(Default)]
struct Table {
    /// Watched pids and where their status goes.
    watched: HashMap<i32, watch::Sender<Option<i32>>>,
    /// Statuses nobody watched yet: pid -> (sequence number when reaped, status).
    unclaimed: HashMap<i32, (u64, i32)>,
    /// Bumped on every reaped status.
    seq: u64,
}

/// The agent's child reaper.
#[derive(Default)]
pub struct Reaper {
    table: Mutex<Table>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD in a task of the current tokio runtime. Call it before creating any
    /// child.
    pub fn start() -> Result<Arc<Self>, ReaperError> {
        let reaper = Arc::new(Self::default());
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                task_reaper.reap_all();
                // A periodic sweep as well: signals coalesce, and a status reaped late only delays.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), sigchld.recv()).await;
            }
        });
        Ok(reaper)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves a consistent table (every update is one insert or
        // remove), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A mark to pass to [`Reaper::watch`]: take it before creating the process.
    pub fn mark(&self) -> u64 {
        self.table().seq
    }

    /// Watches `pid`, a process created after `mark` was taken.
    pub fn watch(&self, pid: i32, mark: u64) -> ExitWatch {
        let mut table = self.table();
        if let Some((seq, status)) = table.unclaimed.get(&pid).copied() {
            table.unclaimed.remove(&pid);
            if seq > mark {
                return watch::channel(Some(status)).1;
            }
        }
        let (tx, rx) = watch::channel(None);
        table.watched.insert(pid, tx);
        rx
    }

    /// Reaps every child that has exited, without blocking.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    let (Some(pid), Some(code)) = (status.pid(), exit_status(status)) else {
                        continue;
                    };
                    self.dispatch(pid.as_raw(), code);
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return,
            }
        }
    }

    fn dispatch(&self, pid: i32, status: i32) {
        let mut table = self.table();
        table.seq += 1;
        if let Some(tx) = table.watched.remove(&pid) {
            let _ = tx.send(Some(status));
            return;
        }
        if table.unclaimed.len() >= MAX_UNCLAIMED {
            if let Some(oldest) = table
                .unclaimed
                .iter()
                .min_by_key(|(_, (seq, _))| *seq)
                .map(|(pid, _)| *pid)
            {
                table.unclaimed.remove(&oldest);
            }
        }
        let seq = table.seq;
        table.unclaimed.insert(pid, (seq, status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_as_runc_reports_it() {
        let pid = Pid::from_raw(7);
        assert_eq!(exit_status(WaitStatus::Exited(pid, 0)), Some(0));
        assert_eq!(exit_status(WaitStatus::Exited(pid, 1)), Some(1));
        assert_eq!(
            exit_status(WaitStatus::Signaled(pid, nix::sys::signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn early_exit_is_claimed_after_the_mark_only() {
        let reaper = Reaper::default();
        let mark = reaper.mark();
        reaper.dispatch(100, 3);
        assert_eq!(*reaper.watch(100, mark).borrow(), Some(3));

        // A status reaped before the mark belongs to an earlier process with the same pid.
        reaper.dispatch(200, 9);
        let mark = reaper.mark();
        let rx = reaper.watch(200, mark);
        assert_eq!(*rx.borrow(), None);
        reaper.dispatch(200, 0);
        assert_eq!(*rx.borrow(), Some(0));
    }

    #[test]
    fn unclaimed_statuses_are_bounded() {
        let reaper = Reaper::default();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            reaper.dispatch(pid, 0);
        }
        assert_eq!(reaper.table().unclaimed.len(), MAX_UNCLAIMED);
        assert!(!reaper.table().unclaimed.contains_key(&0));
    }
}
