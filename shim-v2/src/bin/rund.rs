//! `rund`: the admin CLI. `rund install` puts rund on a host and prints (or writes) what
//! containerd and Kubernetes need; `rund check` says whether this host can run sandboxes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use shim_v2::admin::check::{self, Report};
use shim_v2::admin::config_source::LoadedConfig;
use shim_v2::admin::containerd_config::DEFAULT_CONTAINERD_CONFIG;
use shim_v2::admin::install::{install, InstallOptions};
use shim_v2::admin::{error_chain, rooted};

#[derive(Parser)]
#[command(
    name = "rund",
    version,
    about = "rund's admin tool: install rund on a host, check that it can run sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the binaries, the guest kernel and the agent initramfs; print containerd's runtime
    /// entries and the Kubernetes RuntimeClass.
    Install(InstallArgs),
    /// Check whether this host can run sandboxes (exit status 1 when it cannot).
    Check(CheckArgs),
}

#[derive(Args)]
struct InstallArgs {
    /// Install below this directory instead of /.
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// The configuration to follow [default: $RUND_CONFIG, else <root>/etc/rund/config.toml].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The guest kernel to install (required unless one is installed).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The agent initramfs to install (required unless one is installed).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// The shim binary [default: containerd-shim-rund-v2 beside this rund].
    #[arg(long, value_name = "PATH")]
    shim: Option<PathBuf>,
    /// The rund binary [default: this one].
    #[arg(long, value_name = "PATH")]
    rund: Option<PathBuf>,
    /// Add the rund runtime to containerd's configuration, and runc's when the file relied on
    /// containerd's built-in one; checked with `containerd config dump` when containerd is on
    /// PATH [default PATH: <root>/etc/containerd/config.toml].
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    write_containerd_config: Option<Option<PathBuf>>,
    /// Replace a different `rund` runtime in containerd's configuration.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct CheckArgs {
    /// The configuration to check against [default: $RUND_CONFIG, else /etc/rund/config.toml].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// containerd's configuration, read as containerd reads it.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTAINERD_CONFIG)]
    containerd_config: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn run_install(args: InstallArgs) -> ExitCode {
    let containerd_config = args
        .write_containerd_config
        .map(|path| path.unwrap_or_else(|| rooted(&args.root, DEFAULT_CONTAINERD_CONFIG.as_ref())));
    let options = InstallOptions {
        root: args.root,
        config: args.config,
        kernel: args.kernel,
        initramfs: args.initramfs,
        shim: args.shim,
        rund: args.rund,
        containerd_config,
        force: args.force,
    };
    match install(&options) {
        Ok(report) => {
            for step in &report.steps {
                eprintln!("rund install: {step}");
            }
            println!(
                "# containerd: rund's runtime entry and runc's (config version 2, containerd \
                 1.6+); `--write-containerd-config` adds them to /etc/containerd/config.toml"
            );
            println!(
                "# A runtimes table replaces containerd's built-in runc, the default runtime: \
                 keep runc's entry unless the file defines runc."
            );
            print!("{}", report.containerd_snippet);
            println!("---");
            println!("# Kubernetes: the RuntimeClass (kubectl apply -f -)");
            print!("{}", report.runtime_class);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rund install: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run_check(args: CheckArgs) -> ExitCode {
    let report = match LoadedConfig::load(args.config.as_deref(), "/".as_ref()) {
        Ok(loaded) => {
            let mut report = check::run_checks(&loaded, &args.containerd_config);
            report.push(check::reflink_check(
                &loaded.config.writable_layer.dir,
                rootfs_split::reflink_supported,
            ));
            report
        }
        Err(e) => Report::config_error(&e),
    };
    if args.json {
        print!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Install(args) => run_install(args),
        Command::Check(args) => run_check(args),
    }
}
