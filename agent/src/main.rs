//! `rund-agent`: the guest's PID 1, or a host process for tests (`--listen unix:PATH`).

use std::path::PathBuf;
use std::process::ExitCode;

use agent::error_chain as chain;
use agent::reaper::Reaper;
use agent::rpc::Agent;

use agent::server::{self, Listen};
use agent_protocol::AGENT_VSOCK_PORT;
use clap::Parser;

/// rund's guest agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Where to serve: `vsock:PORT` or `unix:PATH`. Default: vsock port 1024 as PID 1, else
    /// unix:/run/rund-agent/agent.sock.
    #[arg(long)]
    listen: Option<Listen>,
    /// Where the agent keeps container state, bundles and storage mounts.
    #[arg(long, default_value = agent_protocol::GUEST_STATE_DIR)]
    state_dir: PathBuf,
    /// As PID 1: mount cgroup v1 hierarchies (one per controller) instead of cgroup2.
    #[arg(long)]
    cgroup_v1: bool,
}

fn log(message: &str) {
    eprintln!("rund-agent: {message}");
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let args = match Args::try_parse() {
        Ok(args) => args,
        // As PID 1, the kernel passes what it did not understand on its command line: carry on with
        // the defaults rather than panic the kernel.
        Err(e) if pid1 => {
            log(&format!("ignoring arguments: {e}"));
            Args::parse_from(["rund-agent"])
        }
        Err(e) => e.exit(),
    };
    let result = run(args, pid1);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            log(&message);
            if pid1 {
                // PID 1 must not exit (the kernel would panic): reboot, which rund's VMM (i8042 reset
                // with `reboot=k`) treats as the VM's end.
                nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).ok();
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, pid1: bool) -> Result<(), String> {
    if pid1 {
        agent::init::leave_initramfs().map_err(|e| chain(&e))?;
        agent::init::setup(args.cgroup_v1).map_err(|e| chain(&e))?;
    } else {
        // Orphans of container processes come back to the agent, as they would to PID 1.
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(format!(
                "becoming a subreaper: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let listen = args.listen.unwrap_or_else(|| {
        if pid1 {
            Listen::Vsock(AGENT_VSOCK_PORT)
        } else {
            Listen::Unix(args.state_dir.join("agent.sock"))
        }
    });
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("creating {}: {e}", args.state_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime.block_on(async move {
        let reaper = Reaper::start().map_err(|e| chain(&e))?;
        let agent = Agent::new(&args.state_dir, reaper).map_err(|e| chain(&e))?;
        agent.spawn_oom_watcher();
        if pid1 {
            // Two containers of a pod meet on localhost; the VM's namespace is the pod's.
            let lo = match agent::network::Network::connect() {
                Ok(net) => net.loopback_up().await,
                Err(e) => Err(e),
            };
            lo.map_err(|e| chain(&e))?;
        }
        let mut server = server::serve(agent, &listen).await.map_err(|e| chain(&e))?;
        log(&format!("serving on {listen:?}"));
        wait_for_stop(pid1).await;
        let _ = server.shutdown().await;
        Ok(())
    })
}

/// As PID 1 the agent serves until the VM ends; on a host, until SIGTERM or SIGINT.
async fn wait_for_stop(pid1: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    if pid1 {
        std::future::pending::<()>().await;
    }
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
