//! The state containerd sees of one process (a container's own or an exec'd one): created,
//! running or stopped with its exit status, and a way to wait for the end; and what containerd
//! was told of its container's OOM kills, which must reach it before the exit they caused.

use std::sync::Mutex;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use tokio::sync::watch;

use super::stdio::StdioPaths;

/// Where a process is in its life.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessStatus {
    Created,
    Running,
    Stopped {
        exit_status: u32,
        exited_at: Timestamp,
    },
}

pub struct Process {
    pub container_id: String,
    /// Empty for the container's own process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// An exec'd process's OCI `process` JSON, run at its start.
    pub process_json: Vec<u8>,
    status: Mutex<ProcessStatus>,
    exited: watch::Sender<bool>,
}

pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        process_json: Vec<u8>,
    ) -> Self {
        Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            process_json,
            status: Mutex::new(ProcessStatus::Created),
            exited: watch::channel(false).0,
        }
    }

    /// The id containerd's events name the process by: the exec id, or the container's.
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn status(&self) -> ProcessStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_running(&self) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if *s == ProcessStatus::Created {
            *s = ProcessStatus::Running;
        }
    }

    /// Records the end (once: a later call keeps the first status) and wakes the waiters.
    pub fn set_exited(&self, exit_status: u32) -> Timestamp {
        match self.end(exit_status) {
            Ok(at) | Err(at) => at,
        }
    }

    /// Records the end and wakes the waiters: `Ok` with its time for the call that recorded
    /// it, `Err` with the time recorded before for any later one.
    pub fn end(&self, exit_status: u32) -> Result<Timestamp, Timestamp> {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let ended = match &*s {
            ProcessStatus::Stopped { exited_at, .. } => Err(exited_at.clone()),
            _ => {
                let at = now();
                *s = ProcessStatus::Stopped {
                    exit_status,
                    exited_at: at.clone(),
                };
                Ok(at)
            }
        };
        drop(s);
        self.exited.send_replace(true);
        ended
    }

    /// The exit status and time, waiting for them.
    pub async fn wait(&self) -> (u32, MessageField<Timestamp>) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|done| *done).await;
        match self.status() {
            ProcessStatus::Stopped {
                exit_status,
                exited_at,
            } => (exit_status, MessageField::some(exited_at)),
            // Unreachable: the flag is raised only after the status is set.
            _ => (255, MessageField::none()),
        }
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.status(), ProcessStatus::Stopped { .. })
    }
}

/// An event [`OomReports`] asks to publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    /// TaskOOM of the container.
    Oom,
    /// TaskExit of the process.
    Exit,
}

/// The OOM kills of one container that containerd was told of.
///
/// containerd's CRI takes a container's `OOMKilled` reason from a TaskOOM that it handles before
/// the TaskExit. The agent's OOM stream is polled and may come late, so the agent also reports,
/// with each exit, the container's OOM-kill count read after the process was reaped; both carry
/// the cumulative count. The caller holds one lock over a container's reports and publishes what
/// they return, in that order, before it lets go.
#[derive(Debug, Default)]
pub struct OomReports {
    /// The highest count published.
    published: u64,
}

impl OomReports {
    /// A process of the container exited, the container having seen `oom_kills` OOM kills: a
    /// TaskOOM first if one of them was not published yet, then the TaskExit.
    pub fn exit(&mut self, oom_kills: u64) -> Vec<Publish> {
        if self.advance(oom_kills) {
            vec![Publish::Oom, Publish::Exit]
        } else {
            vec![Publish::Exit]
        }
    }

    /// An event of the agent's OOM stream, with the count so far: published unless an exit
    /// published that kill already. A count of 0 comes from an agent that does not count (one
    /// restored from an older template): its every event is new.
    pub fn event(&mut self, oom_kills: u64) -> Vec<Publish> {
        if oom_kills == 0 || self.advance(oom_kills) {
            vec![Publish::Oom]
        } else {
            Vec::new()
        }
    }

    fn advance(&mut self, oom_kills: u64) -> bool {
        if oom_kills > self.published {
            self.published = oom_kills;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oom_kill_is_published_before_the_exit_it_caused_and_once() {
        use Publish::{Exit, Oom};
        // The exit came first: it carries the kill, and the stream's late event is not new.
        let mut r = OomReports::default();
        assert_eq!(r.exit(1), [Oom, Exit]);
        assert_eq!(r.event(1), []);
        // The stream came first: the exit has nothing more to say.
        let mut r = OomReports::default();
        assert_eq!(r.event(1), [Oom]);
        assert_eq!(r.exit(1), [Exit]);
        // No kill, no TaskOOM; a later kill (an exec'd process's, a second one) is new again.
        let mut r = OomReports::default();
        assert_eq!(r.exit(0), [Exit]);
        assert_eq!(r.event(2), [Oom]);
        assert_eq!(r.exit(3), [Oom, Exit]);
        assert_eq!(r.event(2), []);
        assert_eq!(r.event(3), []);
        assert_eq!(r.exit(3), [Exit]);
        // An agent that does not count: its events pass, its exits carry nothing.
        let mut r = OomReports::default();
        assert_eq!(r.event(0), [Oom]);
        assert_eq!(r.event(0), [Oom]);
        assert_eq!(r.exit(0), [Exit]);
    }

    #[test]
    fn only_the_first_end_is_reported_as_recorded() {
        let p = Process::new("c1", "", StdioPaths::default(), Vec::new());
        let first = p.end(137).expect("the first end is recorded");
        assert_eq!(p.end(0), Err(first.clone()));
        assert_eq!(
            p.status(),
            ProcessStatus::Stopped {
                exit_status: 137,
                exited_at: first
            }
        );
    }

    #[tokio::test]
    async fn wait_returns_the_first_exit() {
        let p = std::sync::Arc::new(Process::new("c", "", StdioPaths::default(), Vec::new()));
        assert_eq!(p.status(), ProcessStatus::Created);
        p.set_running();
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        let at = p.set_exited(137);
        p.set_exited(0);
        let (status, when) = waiter.await.unwrap();
        assert_eq!(status, 137);
        assert_eq!(when.unwrap(), at);
        assert!(p.is_stopped());
        assert_eq!(p.event_id(), "c");
    }
}
