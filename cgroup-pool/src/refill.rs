//! The background refill: keeps the free slots between the low and the high watermark, off the
//! acquire path. Woken when an acquire takes the pool below the low watermark or a release takes it
//! above the high one, and every `refill_interval` anyway (other processes share the pool).

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
                    !core.stopping.load(Ordering::SeqCst) && free.len() >= low && free.len() <= high
                })
                .unwrap_or_else(|p| p.into_inner());
        }
        if core.stopping.load(Ordering::SeqCst) {
            return;
        }
        let result = core
            .rescan()
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
