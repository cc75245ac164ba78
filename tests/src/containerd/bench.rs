//! What `ci/bench-start` computes from its measurements: percentiles, and the split of rund's
//! sandbox start that the shim logs, one line per sandbox, into containerd's log:
//! `rund-start-split sandbox=<id> cgroup_ms=<f> rootfs_ms=<f> vm_ms=<f> agent_ms=<f>
//! container_ms=<f> total_ms=<f> answer_ms=<f> connect_ms=<f> answer_tries=<n> identity_ms=<f>
//! prepare_ms=<f> restore_ms=<f> net_ms=<f> net_guest_ms=<f> start=template|cold`.

use std::time::Duration;

/// The phases of a sandbox start, in order, as the shim names them.
pub const START_PHASES: &[&str] = &[
    "cgroup_ms",
    "rootfs_ms",
    "vm_ms",
    "agent_ms",
    "container_ms",
    "total_ms",
    "answer_ms",
    "connect_ms",
    "identity_ms",
    "prepare_ms",
    "net_ms",
    "net_guest_ms",
];

/// The marker that starts a split line.
pub const START_SPLIT_MARKER: &str = "rund-start-split";

/// One sandbox start, split into phases (milliseconds).
#[derive(Clone, Debug, PartialEq)]
pub struct StartSplit {
    pub sandbox: String,
    /// `(phase, ms)` for each `<phase>_ms=<f>` on the line, in the line's order.
    pub phases: Vec<(String, f64)>,
    /// `template` or `cold`, where the line says.
    pub start: Option<String>,
    /// Tries to get the agent's first answer, where the line says.
    pub answer_tries: Option<u32>,
}

impl StartSplit {
    /// Whether the sandbox was restored from a template. containerd copies each shim's log into
    /// its own in chunks, not lines, so another line may run straight on after the value.
    pub fn from_template(&self) -> bool {
        self.start
            .as_deref()
            .is_some_and(|s| s.starts_with("template"))
    }

    /// The milliseconds of `phase` (`vm_ms`), if the line had it.
    pub fn phase(&self, phase: &str) -> Option<f64> {
        self.phases
            .iter()
            .find_map(|(p, ms)| (p == phase).then_some(*ms))
    }
}

/// Parses the split in `line`, wherever the marker is on it (containerd copies the shim's log
/// lines as they are; a logger may have quoted the message).
pub fn parse_start_split(line: &str) -> Option<StartSplit> {
    let (_, rest) = line.split_once(START_SPLIT_MARKER)?;
    let mut sandbox = None;
    let mut start = None;
    let mut answer_tries = None;
    let mut phases = Vec::new();
    for word in rest.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let value = value.trim_matches(|c| c == '"' || c == '\\');
        if key == "sandbox" {
            sandbox = Some(value.to_string());
        } else if key == "start" {
            start = Some(value.to_string());
        } else if key == "answer_tries" {
            answer_tries = value.parse().ok();
        } else if key.ends_with("_ms") {
            phases.push((key.to_string(), value.parse().ok()?));
        }
    }
    Some(StartSplit {
        sandbox: sandbox?,
        phases,
        start,
        answer_tries,
    })
}

/// Every split in `log`.
pub fn start_splits(log: &str) -> Vec<StartSplit> {
    log.lines().filter_map(parse_start_split).collect()
}

/// The nearest-rank percentile `p` (0 < p <= 1) of `sorted` (ascending).
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The p50 and p99 of `samples`, in milliseconds.
pub fn p50_p99_ms(samples: &[Duration]) -> Option<(f64, f64)> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Some((
        ms(percentile(&sorted, 0.5)?),
        ms(percentile(&sorted, 0.99)?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_lines_are_parsed_raw_and_quoted() {
        let raw =
            "rund-start-split sandbox=abc cgroup_ms=0.4 rootfs_ms=1.5 vm_ms=20 agent_ms=900.25 \
                   container_ms=12 total_ms=934.15 answer_ms=800 answer_tries=3 restore_ms=0.0 \
                   start=cold";
        let s = parse_start_split(raw).unwrap();
        assert_eq!(s.sandbox, "abc");
        assert_eq!(s.phases.len(), 8);
        assert_eq!(s.answer_tries, Some(3));
        assert_eq!(s.start.as_deref(), Some("cold"));
        assert!(!s.from_template());
        assert_eq!(s.phase("agent_ms"), Some(900.25));
        assert_eq!(s.phase("disk_ms"), None);
        let quoted = "time=\"2026-11-23T03:48:47Z\" level=info msg=\"rund-start-split sandbox=abc \
                      cgroup_ms=0.4 total_ms=3.5\"";
        let q = parse_start_split(quoted).unwrap();
        assert_eq!(q.phase("total_ms"), Some(3.5));
        assert_eq!(q.start, None);
        let run_on = parse_start_split(
            "rund-start-split sandbox=a vm_ms=1 start=templatetime=\"2026-12-02T01:50:59Z\"",
        )
        .unwrap();
        assert!(run_on.from_template());
        assert_eq!(parse_start_split("no split here"), None);
        assert_eq!(parse_start_split("rund-start-split cgroup_ms=1"), None);
        assert_eq!(
            parse_start_split("rund-start-split sandbox=x vm_ms=fast"),
            None
        );
        assert_eq!(start_splits(&format!("a\n{raw}\nb\n{quoted}\n")).len(), 2);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=20).collect();
        assert_eq!(percentile(&v, 0.5), Some(10));
        assert_eq!(percentile(&v, 0.99), Some(20));
        assert_eq!(percentile(&[7u32], 0.5), Some(7));
        assert_eq!(percentile::<u32>(&[], 0.5), None);
        let d: Vec<Duration> = [3, 1, 2].map(Duration::from_millis).to_vec();
        assert_eq!(p50_p99_ms(&d), Some((2.0, 3.0)));
    }
}
