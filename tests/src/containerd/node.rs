//! The node as a user sets it up: Debian's containerd with its stock configuration file, edited
//! only by `rund install --write-containerd-config`, and rund's configuration as `rund install`
//! writes it. The end-to-end tests run against this by default, so that they take the path a new
//! user takes (README, docs/kubernetes.md) instead of a world the harness made for itself.
//!
//! It changes the host: rund's binaries in /usr/local/bin, its guest files in /usr/share/rund,
//! /etc/rund/config.toml and containerd's /etc/containerd/config.toml. So it runs only where the
//! host is disposable: inside the testbed (`RUND_IN_TESTBED=1`: its root is a throw-away overlay)
//! or where [`INSTALL_ENV`]`=1` says so (a fresh CI machine with real virtualisation).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use super::config::RundConfig;
use super::{run_command, ContainerdError};

/// `1`: this host may be changed as `rund install` changes a node.
pub const INSTALL_ENV: &str = "RUND_E2E_INSTALL";
/// The admin binary under test; default: `rund` beside the shim under test.
pub const ADMIN_ENV: &str = "RUND_ADMIN_BINARY";
/// Where containerd reads its configuration on a node.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// Where the shim reads rund's configuration on a node.
pub const RUND_CONFIG: &str = shim_v2::config::DEFAULT_CONFIG_PATH;
/// The `PATH` systemd gives a service such as containerd's.
pub const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// containerd's own sandbox image when its configuration names none (containerd 1.6).
const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.6";

/// Serialises installs of the harnesses of one process (tests run in parallel threads).
static INSTALLING: Mutex<()> = Mutex::new(());

/// What `rund install` left on the node, as the tests need it.
#[derive(Clone, Debug)]
pub struct Node {
    /// The image containerd's CRI plugin starts every pod's sandbox container from, as its
    /// configuration says (`sandbox_image`): the harness imports its pause image under that name,
    /// as an air-gapped node's operator would.
    pub sandbox_image: String,
    /// rund's configuration as the shim reads it.
    pub rund_config: RundConfig,
    /// What `rund install` printed on stderr (what it did).
    pub install_log: String,
}

/// Why the node set-up may not run here (`None` when it may).
pub fn not_allowed() -> Option<String> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
    if set("RUND_IN_TESTBED") || set(INSTALL_ENV) {
        None
    } else {
        Some(format!(
            "the end-to-end tests install rund onto this host as a user would (/usr/local/bin, \
             /etc/rund, /etc/containerd/config.toml): they run in the testbed, or where \
             {INSTALL_ENV}=1 says the host is disposable"
        ))
    }
}

/// Whether test `test` may change the node (`/etc`, network namespaces): the testbed's throw-away
/// root, or a machine that says it is disposable; otherwise it is skipped (a reason printed), or
/// fails where the end-to-end tests are required.
pub fn allowed(test: &str) -> bool {
    match not_allowed() {
        None => true,
        Some(why) if super::e2e_required() => panic!("{test}: {why}"),
        Some(why) => {
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

/// The `rund` binary under test: [`ADMIN_ENV`], else beside `shim`.
pub fn admin_binary(shim: &Path) -> Result<PathBuf, String> {
    let path = std::env::var_os(ADMIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| shim.with_file_name("rund"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the rund admin binary {} does not exist (build it: cargo build -p shim-v2 --bins, or set {ADMIN_ENV})",
            path.display()
        ))
    }
}

/// Runs `rund install --kernel K --initramfs I --write-containerd-config` with the binaries
/// under test, the way docs/kubernetes.md tells a user to, and reads back what it installed.
pub fn install(shim: &Path, kernel: &Path, initramfs: &Path) -> Result<Node, ContainerdError> {
    let admin = admin_binary(shim).map_err(ContainerdError::Prerequisite)?;
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmd = Command::new(&admin);
    cmd.arg("install");
    // The user's command finds the shim beside `rund`; name it only when it is elsewhere.
    if admin.with_file_name(super::RUND_SHIM_NAME) != shim {
        cmd.arg("--shim").arg(shim);
    }
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .arg("--write-containerd-config")
        .env_remove("RUND_CONFIG")
        .env("PATH", SERVICE_PATH);
    let out = run_command(&mut cmd, Duration::from_secs(120))?;
    if !out.success() {
        return Err(ContainerdError::Failed {
            command: format!("{} install", admin.display()),
            code: out.code,
            stderr: out.stderr,
        });
    }
    let rund_config = read_rund_config()?;
    let sandbox_image = sandbox_image(Path::new(CONTAINERD_CONFIG))?;
    Ok(Node {
        sandbox_image,
        rund_config,
        install_log: out.stderr,
    })
}

/// rund's configuration as the shim will read it.
fn read_rund_config() -> Result<RundConfig, ContainerdError> {
    let path = Path::new(RUND_CONFIG);
    let config = shim_v2::config::Config::from_file(path)
        .map_err(|e| ContainerdError::Prerequisite(format!("rund's configuration: {e}")))?;
    Ok(RundConfig {
        kernel: config.guest.kernel,
        initramfs: config.guest.initramfs,
        writable_layer_dir: config.writable_layer.dir,
        run_dir: config.paths.run_dir,
        lib_dir: config.paths.lib_dir,
        template_dir: config.template.dir,
        cgroup_parent: config.cgroup_pool.parent,
    })
}

/// The CRI plugin's sandbox image, from `containerd config dump` (what containerd will use,
/// defaults filled in).
pub fn sandbox_image(containerd_config: &Path) -> Result<String, ContainerdError> {
    let mut cmd = Command::new("containerd");
    cmd.arg("--config")
        .arg(containerd_config)
        .args(["config", "dump"]);
    let out = run_command(&mut cmd, Duration::from_secs(60))?;
    if !out.success() {
        return Err(ContainerdError::Failed {
            command: format!(
                "containerd --config {} config dump",
                containerd_config.display()
            ),
            code: out.code,
            stderr: out.stderr,
        });
    }
    Ok(sandbox_image_of(&out.stdout)
        .unwrap_or(DEFAULT_SANDBOX_IMAGE)
        .to_string())
}

/// The sandbox image in a `config dump`: version 2 (containerd 1.6, 1.7) keeps it in the CRI
/// plugin, version 3 (containerd 2) among the images plugin's pinned images.
fn sandbox_image_of(dump: &str) -> Option<&str> {
    let start = dump
        .find("sandbox_image = \"")
        .map(|i| i + "sandbox_image = \"".len())
        .or_else(|| {
            let pinned = dump.find("[plugins.\"io.containerd.cri.v1.images\".pinned_images]")?;
            let rest = &dump[pinned..];
            rest.find("sandbox = \"")
                .map(|i| pinned + i + "sandbox = \"".len())
        })?;
    let len = dump[start..].find('"')?;
    Some(&dump[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_image_is_read_from_either_config_version() {
        let v2 = "  [plugins.\"io.containerd.grpc.v1.cri\"]\n    restrict_oom_score_adj = false\n    sandbox_image = \"registry.k8s.io/pause:3.6\"\n";
        assert_eq!(sandbox_image_of(v2), Some("registry.k8s.io/pause:3.6"));
        let v3 = "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"registry.k8s.io/pause:3.10\"\n";
        assert_eq!(sandbox_image_of(v3), Some("registry.k8s.io/pause:3.10"));
        assert_eq!(sandbox_image_of("version = 2\n"), None);
    }

    #[test]
    fn the_stock_config_names_containerds_default_pause_image() {
        if Command::new("containerd")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipping: containerd is not installed");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let stock = d.path().join("config.toml");
        std::fs::write(&stock, "version = 2\n").unwrap();
        assert_eq!(sandbox_image(&stock).unwrap(), DEFAULT_SANDBOX_IMAGE);
    }
}
