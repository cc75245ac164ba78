//! `rund-vmm`: boots a kernel in a microVM from the command line, or checks whether this host can.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use vmm::config::VirtioDeviceHandle;
use vmm::devices::virtio::block::Block;
use vmm::host_check::check_host;
use vmm::{SerialOutput, Vm, VmConfig, VmExit};

/// The command line a condensed rund guest kernel wants: serial console, reboot through the i8042,
/// reboot rather than hang on panic, no PCI probing.
const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

#[derive(Parser)]
#[command(
    name = "rund-vmm",
    version,
    about = "Boot a Linux kernel in a rund microVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host's KVM can run a Linux guest; exit 1 with the reason if it cannot.
    Check,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: a vmlinux ELF or a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs to hand the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u32,
    /// Where the serial console goes: `stdout`, `none`, or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// A virtio-blk disk backed by FILE; `,ro` makes it read-only. Repeatable: /dev/vda, vdb, ...
    #[arg(long = "blk", value_name = "FILE[,ro]")]
    blk: Vec<String>,
}

/// `FILE` or `FILE,ro` (a path that itself ends in ",ro" cannot be given).
fn block_device(spec: &str) -> Result<VirtioDeviceHandle, String> {
    let (path, ro) = match spec.strip_suffix(",ro") {
        Some(path) => (path, true),
        None => (spec, false),
    };
    let dev = Block::new(Path::new(path), ro).map_err(|e| error_chain(&e))?;
    Ok(Arc::new(Mutex::new(dev)))
}

fn serial_output(spec: &str) -> SerialOutput {
    match spec {
        "stdout" | "-" => SerialOutput::Stdout,
        "none" => SerialOutput::Sink,
        path => SerialOutput::File(path.into()),
    }
}

fn run(args: RunArgs) -> Result<VmExit, String> {
    let kernel = args.kernel.ok_or("--kernel is required")?;
    check_host().map_err(|e| e.to_string())?;
    let mut config = VmConfig::new(kernel);
    config.initrd = args.initrd;
    config.cmdline = args.cmdline;
    config.vcpus = args.vcpus;
    config.mem_mib = args.mem_mib;
    config.serial = serial_output(&args.serial);
    config.devices = args
        .blk
        .iter()
        .map(|spec| block_device(spec))
        .collect::<Result<_, _>>()?;
    let vm = Vm::new(config).map_err(|e| error_chain(&e))?;
    let handle = vm.start().map_err(|e| error_chain(&e))?;
    Ok(handle.wait())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => match check_host() {
            Ok(v) => {
                println!("ok: /dev/kvm can run Linux guests ({v:?})");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rund-vmm: {e}");
                ExitCode::FAILURE
            }
        },
        None => match run(cli.run) {
            Ok(exit @ (VmExit::GuestReset | VmExit::GuestPowerOff | VmExit::HostRequest)) => {
                eprintln!("rund-vmm: VM ended: {exit}");
                ExitCode::SUCCESS
            }
            Ok(exit) => {
                eprintln!("rund-vmm: VM ended: {exit}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("rund-vmm: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
