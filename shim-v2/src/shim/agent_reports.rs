//! The agent's reports, checked: everything the agent sends is written by the guest, so the shim
//! holds it against what it knows itself before acting on it or passing it to containerd.
//!
//! - [`ReportPace`]: how often the shim asks for (and so acts on) a stream of reports, such as OOM
//!   events: a guest answering as fast as it can must not make the shim spin or flood containerd.
//! - [`OnceLog`]: one log line per kind of lie and sandbox, not one per report.
//! - [`checked_stats`]: a container's statistics bounded by the guest's size and age.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent_protocol::agent::StatsContainerResponse;
use log::warn;

use super::sizing::VmSize;

/// Reports served at once before pacing starts.
pub const REPORT_BURST: u32 = 16;
/// Once the burst is spent, one report per this long.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// Paces a stream of reports: [`REPORT_BURST`] at once, then one per [`REPORT_INTERVAL`];
/// the burst comes back when the stream is quiet (a token bucket, kept as the time the next
/// report would be due if every report waited its interval).
#[derive(Debug)]
pub struct ReportPace {
    /// How far ahead of `now` the due time may run before a report waits.
    tolerance: Duration,
    interval: Duration,
    /// None before the first report.
    due: Option<Instant>,
}

impl ReportPace {
    pub fn new(burst: u32, interval: Duration) -> ReportPace {
        ReportPace {
            tolerance: interval * burst.saturating_sub(1),
            interval,
            due: None,
        }
    }

    /// How long to wait, at `now`, before taking the next report (and takes it).
    pub fn wait_before_next(&mut self, now: Instant) -> Duration {
        let due = self.due.map_or(now, |d| d.max(now));
        self.due = Some(due + self.interval);
        due.saturating_duration_since(now)
            .saturating_sub(self.tolerance)
    }
}

/// Kinds of lie, logged once each per [`OnceLog`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Lie {
    /// An OOM event for a container the pod does not have.
    UnknownContainer = 1,
    /// Statistics beyond the guest's size or age.
    ImpossibleStats = 2,
}

/// Remembers which [`Lie`]s were logged already.
#[derive(Debug, Default)]
pub struct OnceLog(AtomicU32);

impl OnceLog {
    /// Whether `lie` is logged now: true the first time only.
    pub fn first(&self, lie: Lie) -> bool {
        let bit = lie as u32;
        self.0.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }

    /// Logs `what` at warn level the first time `lie` is told, with a note that later ones
    /// are not logged.
    pub fn warn(&self, sandbox: &str, lie: Lie, what: impl FnOnce() -> String) {
        if self.first(lie) {
            warn!(
                "sandbox {sandbox}: the agent {}; ignored (said once: later such reports are not logged)",
                what()
            );
        }
    }
}

/// `s` with each figure bounded by what the guest can have: memory by its RAM, CPU time by its
/// vCPUs over `age` (the sandbox's time since it started), user and system time by the total;
/// and what was out of bounds, for the log.
pub fn checked_stats(
    mut s: StatsContainerResponse,
    size: VmSize,
    age: Duration,
) -> (StatsContainerResponse, Vec<String>) {
    let mut wrong = Vec::new();
    let ram = u64::from(size.memory_mib) << 20;
    for (name, v) in [
        ("memory usage", &mut s.memory_usage),
        ("peak memory usage", &mut s.memory_max_usage),
    ] {
        if *v > ram {
            wrong.push(format!("{name} {} above the guest's {} bytes", *v, ram));
            *v = ram;
        }
    }
    // A second of slack: the agent's clock and the shim's need not start together.
    let cpu_max = u64::try_from((age + Duration::from_secs(1)).as_nanos() * u128::from(size.vcpus))
        .unwrap_or(u64::MAX);
    if s.cpu_usage_ns > cpu_max {
        wrong.push(format!(
            "CPU time {} ns above {} vCPUs for {age:?}",
            s.cpu_usage_ns, size.vcpus
        ));
        s.cpu_usage_ns = cpu_max;
    }
    for (name, v) in [
        ("user CPU time", &mut s.cpu_user_ns),
        ("system CPU time", &mut s.cpu_system_ns),
    ] {
        if *v > s.cpu_usage_ns {
            wrong.push(format!("{name} {} ns above the total", *v));
            *v = s.cpu_usage_ns;
        }
    }
    (s, wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_paced_after_its_burst_and_a_quiet_stream_gets_it_back() {
        let t0 = Instant::now();
        let mut p = ReportPace::new(3, Duration::from_millis(100));
        for _ in 0..3 {
            assert_eq!(p.wait_before_next(t0), Duration::ZERO);
        }
        // Spent: each next one waits an interval more than the one before, at the same instant.
        assert_eq!(p.wait_before_next(t0), Duration::from_millis(100));
        assert_eq!(p.wait_before_next(t0), Duration::from_millis(200));
        // A guest answering at once for 10 s gets about 100 reports through, not thousands.
        let mut p = ReportPace::new(3, Duration::from_millis(100));
        let (mut now, mut taken) = (t0, 0);
        while now < t0 + Duration::from_secs(10) {
            now += p.wait_before_next(now);
            taken += 1;
        }
        assert!((100..=104).contains(&taken), "{taken}");
        // Quiet for a while: the whole burst again, and no more.
        let later = now + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(p.wait_before_next(later), Duration::ZERO);
        }
        assert_eq!(p.wait_before_next(later), Duration::from_millis(100));
    }

    #[test]
    fn each_lie_is_logged_once() {
        let log = OnceLog::default();
        assert!(log.first(Lie::UnknownContainer));
        assert!(!log.first(Lie::UnknownContainer));
        assert!(log.first(Lie::ImpossibleStats));
        assert!(!log.first(Lie::ImpossibleStats));
        assert!(!log.first(Lie::UnknownContainer));
    }

    #[test]
    fn stats_beyond_the_guest_are_bounded_by_it() {
        let size = VmSize {
            vcpus: 2,
            memory_mib: 256,
        };
        let honest = StatsContainerResponse {
            cpu_usage_ns: 3_000_000_000,
            cpu_user_ns: 2_000_000_000,
            cpu_system_ns: 1_000_000_000,
            memory_usage: 100 << 20,
            memory_max_usage: 120 << 20,
            ..Default::default()
        };
        let (s, wrong) = checked_stats(honest.clone(), size, Duration::from_secs(10));
        assert_eq!((s, wrong), (honest, Vec::<String>::new()));

        let lying = StatsContainerResponse {
            cpu_usage_ns: u64::MAX,
            cpu_user_ns: u64::MAX,
            cpu_system_ns: 5,
            memory_usage: 1 << 40,
            memory_max_usage: u64::MAX,
            ..Default::default()
        };
        let (s, wrong) = checked_stats(lying, size, Duration::from_secs(10));
        assert_eq!(s.memory_usage, 256 << 20);
        assert_eq!(s.memory_max_usage, 256 << 20);
        assert_eq!(
            s.cpu_usage_ns, 22_000_000_000,
            "2 vCPUs for 10 s and a second's slack"
        );
        assert_eq!((s.cpu_user_ns, s.cpu_system_ns), (22_000_000_000, 5));
        assert_eq!(wrong.len(), 4, "{wrong:?}");
        assert!(
            wrong[0].starts_with("memory usage 1099511627776 above"),
            "{wrong:?}"
        );
    }
}
