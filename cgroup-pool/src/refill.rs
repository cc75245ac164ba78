//! The background refill: recycles released slots (reset, memory reclaimed, renamed back) and
//! keeps the free slots between the low and the high watermark, off the acquire path. Woken when
//! a release hands it a slot, when an acquire takes the pool below the low watermark or a release
//! takes it above the high one, and every `refill_interval` anyway (other processes share the
//! pool).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::pool::PoolCore;

pub(crate) fn run(core: Arc<PoolCore>) {
    let low = core.config.low_watermark;
    let high = core.config.high_watermark;
    loop {
        {
            let free = core.lock_free();
            let (_free, _timeout) = core
                .wake
                .wait_timeout_while(free, core.config.refill_interval, |free| {
                    !core.stopping.load(Ordering::SeqCst)
                        && free.len() >= low
                        && free.len() <= high
                        && !core.recycle_wanted.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|p| p.into_inner());
        }
        if core.stopping.load(Ordering::SeqCst) {
            return;
        }
        core.recycle_wanted.store(false, Ordering::SeqCst);
        // Recycling first: a recycled slot is cheaper than a new one, and it may make a mkdir
        // unnecessary.
        let result = core
            .recycle_pending()
            .and_then(|()| core.rescan())
            .and_then(|()| {
                if core.free_count() < low {
                    core.fill_to(high)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| core.trim_to(high));
        if let Err(e) = result {
            log::warn!(
                "cgroup-pool: refill failed (retrying in {:?}): {e}",
                core.config.refill_interval
            );
            // Back off: sleep a whole interval unless asked to stop.
            let free = core.lock_free();
            let _ = core
                .wake
                .wait_timeout_while(free, core.config.refill_interval, |_| {
                    !core.stopping.load(Ordering::SeqCst)
                });
        }
    }
}
