//! `rund`: the admin CLI. `rund install` puts rund on a host and prints (or writes) what
//! containerd and Kubernetes need; `rund check` says whether this host can run sandboxes;
//! `rund template` makes, lists and removes the host's sandbox templates.

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
    /// The host's sandbox templates (booted microVMs that sandboxes restore).
    #[command(subcommand)]
    Template(TemplateCommand),
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Make the template of a sandbox shape (default: a pod without limits), unless it exists.
    Create(TemplateCreateArgs),
    /// List the templates: key, shape, size on disk, age, restores, and whether still current.
    List(TemplateListArgs),
    /// Remove a template (sandboxes restored from it keep running).
    Remove(TemplateRemoveArgs),
}

#[derive(Args)]
struct TemplateCreateArgs {
    /// The configuration [default: $RUND_CONFIG, else /etc/rund/config.toml].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// vCPUs [default: guest.default_vcpus].
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Guest memory in MiB, overhead included [default: guest.default_memory_mib +
    /// guest.memory_overhead_mib, as a pod without limits gets].
    #[arg(long, value_name = "M")]
    memory_mib: Option<u32>,
    /// If another process is making this template, exit at once (status 0) instead of waiting
    /// for it.
    #[arg(long)]
    no_wait: bool,
    /// Make the template of every shape of `[template] keep_ready` instead of one.
    #[arg(long, conflicts_with_all = ["vcpus", "memory_mib"])]
    keep_ready: bool,
}

#[derive(Args)]
struct TemplateListArgs {
    /// The configuration [default: $RUND_CONFIG, else /etc/rund/config.toml].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TemplateRemoveArgs {
    /// The configuration [default: $RUND_CONFIG, else /etc/rund/config.toml].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The template's key (`rund template list`), or `all`.
    key: String,
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

fn load_config(path: Option<&std::path::Path>) -> Result<shim_v2::config::Config, String> {
    LoadedConfig::load(path, "/".as_ref())
        .map(|l| l.config)
        .map_err(|e| error_chain(&e))
}

fn run_template(command: TemplateCommand) -> Result<(), String> {
    use shim_v2::shim::sizing::VmSize;
    use shim_v2::shim::template;
    match command {
        TemplateCommand::Create(args) => {
            let config = std::sync::Arc::new(load_config(args.config.as_deref())?);
            let g = &config.guest;
            let sizes: Vec<VmSize> = if args.keep_ready {
                if config.template.keep_ready.is_empty() {
                    return Err(
                        "--keep-ready: the configuration's template.keep_ready is empty".into(),
                    );
                }
                config
                    .template
                    .keep_ready
                    .iter()
                    .copied()
                    .map(VmSize::from)
                    .collect()
            } else {
                let size = VmSize {
                    vcpus: args.vcpus.unwrap_or(g.default_vcpus),
                    memory_mib: args
                        .memory_mib
                        .unwrap_or(g.default_memory_mib + g.memory_overhead_mib),
                };
                if size.vcpus == 0 || size.vcpus > g.max_vcpus {
                    return Err(format!(
                        "--vcpus {}: must be between 1 and guest.max_vcpus ({})",
                        size.vcpus, g.max_vcpus
                    ));
                }
                if size.memory_mib < shim_v2::config::MIN_MEMORY_MIB {
                    return Err(format!(
                        "--memory-mib {}: below the {} MiB a guest needs",
                        size.memory_mib,
                        shim_v2::config::MIN_MEMORY_MIB
                    ));
                }
                vec![size]
            };
            vmm::host_check::check_host().map_err(|e| error_chain(&e))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| format!("starting a runtime: {e}"))?;
            let wait = !args.no_wait;
            for size in sizes {
                let config = config.clone();
                let made = runtime
                    .block_on(async move {
                        tokio::task::spawn_blocking(move || {
                            template::get_or_make(
                                &config,
                                size,
                                wait,
                                tokio::runtime::Handle::current(),
                            )
                        })
                        .await
                    })
                    .map_err(|e| format!("the template maker failed: {e}"))?
                    .map_err(|e| {
                        format!(
                            "{} vCPUs, {} MiB: {}",
                            size.vcpus,
                            size.memory_mib,
                            error_chain(&e)
                        )
                    })?;
                match made {
                    Some(t) => println!("{} {}", t.key, t.dir.display()),
                    None => println!(
                        "another process is making the template of {} vCPUs, {} MiB",
                        size.vcpus, size.memory_mib
                    ),
                }
            }
            Ok(())
        }
        TemplateCommand::List(args) => {
            let config = load_config(args.config.as_deref())?;
            let store = template::store(&config).map_err(|e| error_chain(&e))?;
            let all = store.list().map_err(|e| error_chain(&e))?;
            let current = |t: &templates::Template| {
                let size = shim_v2::shim::sizing::VmSize {
                    vcpus: t.info.inputs.vcpus,
                    memory_mib: t.info.inputs.mem_mib,
                };
                template::inputs(&config, size).is_ok_and(|i| i == t.info.inputs)
            };
            if args.json {
                let rows: Vec<_> = all
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "key": t.key.as_str(),
                            "vcpus": t.info.inputs.vcpus,
                            "memory_mib": t.info.inputs.mem_mib,
                            "size_on_disk": t.size_on_disk(),
                            "age_s": t.age().as_secs(),
                            "restores": t.restores(),
                            "current": current(t),
                            "dir": t.dir,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<16}  {:>5}  {:>7}  {:>9}  {:>8}  {:>8}  state",
                    "KEY", "VCPUS", "MEMORY", "ON DISK", "AGE", "RESTORES"
                );
                for t in &all {
                    println!(
                        "{:<16}  {:>5}  {:>5}Mi  {:>7}Ki  {:>7}s  {:>8}  {}",
                        t.key,
                        t.info.inputs.vcpus,
                        t.info.inputs.mem_mib,
                        t.size_on_disk() >> 10,
                        t.age().as_secs(),
                        t.restores(),
                        if current(t) {
                            "current"
                        } else {
                            "stale (inputs changed)"
                        }
                    );
                }
            }
            Ok(())
        }
        TemplateCommand::Remove(args) => {
            let config = load_config(args.config.as_deref())?;
            let store = template::store(&config).map_err(|e| error_chain(&e))?;
            let keys: Vec<templates::TemplateKey> = if args.key == "all" {
                store
                    .list()
                    .map_err(|e| error_chain(&e))?
                    .into_iter()
                    .map(|t| t.key)
                    .collect()
            } else {
                vec![templates::TemplateKey::parse(&args.key).ok_or_else(|| {
                    format!(
                        "{:?} is not a template key (16 hex digits; see `rund template list`)",
                        args.key
                    )
                })?]
            };
            for key in keys {
                if !store.remove(&key).map_err(|e| error_chain(&e))? {
                    return Err(format!("no template {key}"));
                }
                println!("removed {key}");
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A template's making is worth following (it boots a VM); elsewhere only what went wrong.
    let level = match cli.command {
        Command::Template(_) => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match cli.command {
        Command::Install(args) => run_install(args),
        Command::Check(args) => run_check(args),
        Command::Template(command) => match run_template(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rund template: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
