//! containerd's runtime v2 shim for rund (`io.containerd.rund.v2`): see `shim_v2::shim`.

use std::time::Duration;

use shim_v2::shim::{RundShim, RUNTIME_ID};

fn main() {
    let config = containerd_shim::Config {
        // The shim has no child processes of its own to reap (the VMM runs in-process), and a
        // reaper would steal the exit status of the helpers it runs (mke2fs).
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(containerd_shim::asynchronous::run::<RundShim>(
        RUNTIME_ID,
        Some(config),
    ));
    // A stdin copy may still sit in a blocking read of a FIFO nobody will write again: once the
    // server is done, do not wait for it (a runtime's drop would, forever).
    runtime.shutdown_timeout(Duration::from_millis(100));
}
