//! `rund-vmm`: boots a kernel in a microVM from the command line, or checks whether this host can.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmm::config::VirtioDeviceHandle;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::fs::{CachePolicy, Fs, FsConfig, GuestIds};
use vmm::devices::virtio::net::{MacAddr, Net, NetConfig, Tap};
use vmm::devices::virtio::vsock::Vsock;
use vmm::host_check::check_host;
use vmm::{error_chain, SerialOutput, Vm, VmConfig, VmExit};

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
    /// A virtio-fs share of DIR, mounted in the guest with `mount -t virtiofs TAG DIR`; `ro`
    /// refuses writes, `cache=` sets the guest's caching (default auto), `xattr` serves extended
    /// attributes. Repeatable.
    #[arg(
        long = "fs",
        value_name = "DIR,tag=TAG[,ro][,cache=none|auto|always][,xattr]"
    )]
    fs: Vec<String>,
    /// A vsock device: the host reaches guest port P by connecting to PATH and writing
    /// `CONNECT P`; the guest reaches host port P at the unix socket PATH_P. CID defaults to 3.
    #[arg(long = "vsock", value_name = "PATH[,cid=N]")]
    vsock: Option<String>,
    /// A virtio-net NIC on tap TAP (made if missing, in this process's network namespace), with
    /// MAC (default 02:00:00:00:00:02) and MTU (default 1500). Repeatable: eth0, eth1, ...
    #[arg(long = "net", value_name = "TAP[,mac=MAC][,mtu=N]")]
    net: Vec<String>,
    /// Stop a guest still running after SECS seconds, and say where its vCPUs and devices were
    /// (exit 1). Without it the guest runs until it ends.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
}

/// What `--fs` asks for.
#[derive(Debug, PartialEq)]
struct FsSpec {
    dir: PathBuf,
    tag: String,
    read_only: bool,
    cache: CachePolicy,
    xattr: bool,
}

/// `DIR,tag=TAG[,ro][,cache=none|auto|always][,xattr]`.
fn parse_fs(spec: &str) -> Result<FsSpec, String> {
    let mut parts = spec.split(',');
    let dir = parts
        .next()
        .filter(|d| !d.is_empty())
        .ok_or_else(|| format!("--fs {spec:?}: the shared directory comes first (DIR,tag=TAG)"))?;
    let mut fs = FsSpec {
        dir: dir.into(),
        tag: String::new(),
        read_only: false,
        cache: CachePolicy::Auto,
        xattr: false,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("tag", tag)) => fs.tag = tag.to_string(),
            Some(("cache", policy)) => {
                fs.cache = policy.parse().map_err(|e| format!("--fs {spec:?}: {e}"))?
            }
            None if opt == "ro" => fs.read_only = true,
            None if opt == "xattr" => fs.xattr = true,
            _ => return Err(format!("--fs {spec:?}: unknown option {opt:?}")),
        }
    }
    if fs.tag.is_empty() {
        return Err(format!("--fs {spec:?}: tag=TAG is required"));
    }
    Ok(fs)
}

fn fs_device(spec: &str) -> Result<VirtioDeviceHandle, String> {
    let s = parse_fs(spec)?;
    let dev = Fs::new(FsConfig {
        tag: s.tag,
        shared_dir: s.dir,
        read_only: s.read_only,
        cache: s.cache,
        xattr: s.xattr,
        // The user runs this guest by hand: its ids are trusted as virtiofsd trusts its guest's.
        ids: GuestIds::any(),
    })
    .map_err(|e| format!("--fs {spec:?}: {}", error_chain(&e)))?;
    Ok(Arc::new(Mutex::new(dev)))
}

/// The guest CID when `--vsock` names none: the first one free for guests (0-2 are reserved).
const DEFAULT_GUEST_CID: u64 = 3;

/// `PATH[,cid=N]`.
fn parse_vsock(spec: &str) -> Result<(PathBuf, u64), String> {
    let (path, cid) = match spec.rsplit_once(",cid=") {
        Some((path, cid)) => (
            path,
            cid.parse::<u64>()
                .map_err(|_| format!("--vsock {spec:?}: cid={cid} is not a number"))?,
        ),
        None => (spec, DEFAULT_GUEST_CID),
    };
    if path.is_empty() {
        return Err(format!("--vsock {spec:?}: the socket path is missing"));
    }
    Ok((path.into(), cid))
}

fn vsock_device(spec: &str) -> Result<VirtioDeviceHandle, String> {
    let (path, cid) = parse_vsock(spec)?;
    let dev =
        Vsock::new(cid, &path).map_err(|e| format!("--vsock {spec:?}: {}", error_chain(&e)))?;
    Ok(Arc::new(Mutex::new(dev)))
}

/// `--net`'s MAC when none is given: locally administered, unicast.
const DEFAULT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);

/// `TAP[,mac=MAC][,mtu=N]`.
fn parse_net(spec: &str) -> Result<(String, NetConfig), String> {
    let mut parts = spec.split(',');
    let tap = parts
        .next()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("--net {spec:?}: the tap's name comes first"))?;
    let mut config = NetConfig {
        mac: DEFAULT_MAC,
        mtu: 1500,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", mac)) => {
                config.mac = mac.parse().map_err(|e| format!("--net {spec:?}: {e}"))?
            }
            Some(("mtu", mtu)) => {
                config.mtu = mtu
                    .parse()
                    .map_err(|_| format!("--net {spec:?}: mtu={mtu} is not a number"))?
            }
            _ => return Err(format!("--net {spec:?}: unknown option {opt:?}")),
        }
    }
    Ok((tap.to_owned(), config))
}

fn net_device(spec: &str) -> Result<VirtioDeviceHandle, String> {
    let (tap, config) = parse_net(spec)?;
    let tap = Tap::open(&tap).map_err(|e| format!("--net {spec:?}: {}", error_chain(&e)))?;
    let dev =
        Net::new(Some(tap), config).map_err(|e| format!("--net {spec:?}: {}", error_chain(&e)))?;
    Ok(Arc::new(Mutex::new(dev)))
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
    // Slots in this order: disks (vda, vdb, ...), shares, vsock, then NICs.
    let blk = args.blk.iter().map(|spec| block_device(spec));
    let fs = args.fs.iter().map(|spec| fs_device(spec));
    let vsock = args.vsock.iter().map(|spec| vsock_device(spec));
    let net = args.net.iter().map(|spec| net_device(spec));
    config.devices = blk
        .chain(fs)
        .chain(vsock)
        .chain(net)
        .collect::<Result<_, _>>()?;
    let vm = Vm::new(config).map_err(|e| error_chain(&e))?;
    let mut handle = vm.start().map_err(|e| error_chain(&e))?;
    let Some(secs) = args.timeout else {
        return Ok(handle.wait());
    };
    if let Some(exit) = handle.wait_timeout(Duration::from_secs(secs)) {
        return Ok(exit);
    }
    let report = handle.report();
    handle.shutdown();
    handle.wait();
    Err(format!(
        "the guest still ran after {secs} s (stopped); its {report}"
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_specs_parse() {
        assert_eq!(
            parse_fs("/srv/share,tag=layers,ro,cache=none,xattr").unwrap(),
            FsSpec {
                dir: "/srv/share".into(),
                tag: "layers".into(),
                read_only: true,
                cache: CachePolicy::None,
                xattr: true,
            }
        );
        let plain = parse_fs("d,tag=t").unwrap();
        assert!(!plain.read_only && !plain.xattr && plain.cache == CachePolicy::Auto);
        for (bad, says) in [
            ("", "shared directory"),
            (",tag=t", "shared directory"),
            ("d", "tag=TAG is required"),
            ("d,tag=", "tag=TAG is required"),
            (
                "d,tag=t,cache=sometimes",
                "\"sometimes\": expected none, auto or always",
            ),
            ("d,tag=t,rw", "unknown option \"rw\""),
        ] {
            let e = parse_fs(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn vsock_specs_parse() {
        assert_eq!(
            parse_vsock("/run/v.sock").unwrap(),
            (PathBuf::from("/run/v.sock"), DEFAULT_GUEST_CID)
        );
        assert_eq!(
            parse_vsock("/run/v.sock,cid=42").unwrap(),
            (PathBuf::from("/run/v.sock"), 42)
        );
        assert!(parse_vsock("/run/v.sock,cid=x")
            .unwrap_err()
            .contains("cid=x"));
        assert!(parse_vsock(",cid=4")
            .unwrap_err()
            .contains("path is missing"));
    }

    #[test]
    fn net_specs_parse() {
        let (tap, c) = parse_net("tap0").unwrap();
        assert_eq!((tap.as_str(), c.mac, c.mtu), ("tap0", DEFAULT_MAC, 1500));
        let (_, c) = parse_net("tap1,mac=02:aa:bb:cc:dd:ee,mtu=9000").unwrap();
        assert_eq!(c.mac, MacAddr([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        assert_eq!(c.mtu, 9000);
        assert!(parse_net(",mtu=1500").unwrap_err().contains("tap's name"));
        assert!(parse_net("tap0,mtu=big").unwrap_err().contains("mtu=big"));
        assert!(parse_net("tap0,mac=zz").unwrap_err().contains("zz"));
        assert!(parse_net("tap0,bridge=br0")
            .unwrap_err()
            .contains("bridge=br0"));
        let bad_name = net_device("no/slash").err().unwrap();
        assert!(
            bad_name.contains("not a valid interface name"),
            "{bad_name}"
        );
    }
}
