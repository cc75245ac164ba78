//! containerd's runtime v2 shim for rund (`io.containerd.rund.v2`): see `shim_v2::shim`.

use shim_v2::shim::{RundShim, RUNTIME_ID};

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // The shim has no child processes of its own to reap (the VMM runs in-process), and a
        // reaper would steal the exit status of the helpers it runs (mke2fs).
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<RundShim>(RUNTIME_ID, Some(config)).await;
}
