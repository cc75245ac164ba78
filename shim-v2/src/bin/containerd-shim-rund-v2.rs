//! containerd's runtime v2 shim for rund (`io.containerd.rund.v2`): see `shim_v2::shim`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use shim_v2::shim::{RundShim, RUNTIME_ID};

/// What `-v` prints, as containerd's shims print it (`containerd-shim-runc-v2 -v`).
fn version() -> String {
    format!(
        "containerd-shim-rund-v2:\n  Version:  {}\n  Revision: {}\n  Rust version: {}\n",
        env!("CARGO_PKG_VERSION"),
        env!("RUND_REVISION"),
        env!("RUND_RUST_VERSION"),
    )
}

fn main() -> ExitCode {
    // `-v`, `-version` (or `--v`, `--version`: Go's flags), before anything else: the shim
    // crate's `run` wants containerd's environment first.
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if containerd_shim::parse(&args).is_ok_and(|flags| flags.version) {
        let mut stdout = std::io::stdout().lock();
        return match stdout
            .write_all(version().as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
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
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(containerd_shim::asynchronous::run::<RundShim>(
        RUNTIME_ID,
        Some(config),
    ));
    // A stdin copy may still sit in a blocking read of a FIFO nobody will write again: once the
    // server is done, do not wait for it (a runtime's drop would, forever).
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::SUCCESS
}
