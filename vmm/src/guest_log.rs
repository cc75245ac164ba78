//! Log lines a guest can cause, bounded: a driver that writes bad registers or bad rings in a
//! loop would otherwise write the host's log as fast as it can. The devices log what a guest did
//! wrong through [`guest_warn!`](crate::guest_warn) and [`guest_error!`](crate::guest_error):
//! at most [`LINES_PER_SECOND`] lines a second for the whole process (one VM per shim), then one
//! line saying how many were left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a second the guest may cause.
pub const LINES_PER_SECOND: u32 = 20;

const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    dropped: u64,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log it, after a line saying how many the last full window left out (if any).
    Log { dropped_before: u64 },
    /// Leave it out.
    Drop,
}

/// A budget of lines per second.
#[derive(Debug)]
pub struct LogBudget {
    per_window: u32,
    window: Mutex<Option<Window>>,
}

impl LogBudget {
    pub const fn new(per_window: u32) -> LogBudget {
        LogBudget {
            per_window,
            window: Mutex::new(None),
        }
    }

    /// Whether a line at `now` is logged.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let w = match w.as_mut() {
            Some(w) if now.saturating_duration_since(w.start) < WINDOW => w,
            _ => {
                let dropped = w.as_ref().map_or(0, |w| w.dropped);
                *w = Some(Window {
                    start: now,
                    logged: 1,
                    dropped: 0,
                });
                return Admit::Log {
                    dropped_before: dropped,
                };
            }
        };
        if w.logged < self.per_window {
            w.logged += 1;
            Admit::Log { dropped_before: 0 }
        } else {
            w.dropped += 1;
            Admit::Drop
        }
    }
}

/// The process's budget for lines a guest causes.
pub static GUEST_LOG: LogBudget = LogBudget::new(LINES_PER_SECOND);

/// Logs at `level` within the guest's budget.
#[doc(hidden)]
pub fn log_within_budget(level: log::Level, args: std::fmt::Arguments<'_>) {
    match GUEST_LOG.admit(Instant::now()) {
        Admit::Drop => {}
        Admit::Log { dropped_before } => {
            if dropped_before > 0 {
                log::warn!(
                    "{dropped_before} more lines the guest caused were left out of the log \
                     (at most {LINES_PER_SECOND} a second)"
                );
            }
            log::log!(level, "{args}");
        }
    }
}

/// `log::warn!` for what a guest did, within [`GUEST_LOG`]'s budget.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        $crate::guest_log::log_within_budget(log::Level::Warn, format_args!($($arg)+))
    };
}

/// `log::error!` for what a guest made fail, within [`GUEST_LOG`]'s budget.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {
        $crate::guest_log::log_within_budget(log::Level::Error, format_args!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_its_budget_then_says_how_much_it_left_out() {
        let budget = LogBudget::new(3);
        let t0 = Instant::now();
        let admitted: Vec<Admit> = (0..10_000).map(|_| budget.admit(t0)).collect();
        let logged = admitted.iter().filter(|a| **a != Admit::Drop).count();
        assert_eq!(logged, 3);
        assert_eq!(
            budget.admit(t0 + Duration::from_millis(1001)),
            Admit::Log {
                dropped_before: 9_997
            }
        );
        assert_eq!(
            budget.admit(t0 + Duration::from_millis(1002)),
            Admit::Log { dropped_before: 0 }
        );
        // A quiet guest: nothing dropped, nothing to say.
        assert_eq!(
            budget.admit(t0 + Duration::from_secs(60)),
            Admit::Log { dropped_before: 0 }
        );
    }
}
