//! The two configuration files the harness writes: containerd's `config.toml` (version 2) for a
//! private daemon, and the rund configuration the shim under test reads through `RUND_CONFIG`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::Runtime;

/// A TOML basic string holding `path`.
fn toml_path(path: &Path) -> String {
    toml_string(&path.to_string_lossy())
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                // Writing into a String cannot fail.
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where a private containerd keeps everything, and what its CRI plugin is told.
#[derive(Clone, Debug)]
pub struct ContainerdConfig {
    /// containerd's `root` (content store, snapshots, metadata).
    pub root: PathBuf,
    /// containerd's `state` (bundles, fifos, the CRI plugin's sandbox state).
    pub state: PathBuf,
    /// The gRPC socket (`ctr --address`, CRI); the ttrpc socket is beside it.
    pub socket: PathBuf,
    /// containerd's plugin directory (`opt`), kept private.
    pub opt: PathBuf,
    /// The CRI plugin's CNI directories: left empty, pods use the host network.
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// runc's state directory for CRI containers.
    pub runc_root: PathBuf,
    /// The image the CRI plugin starts every pod's sandbox container from.
    pub sandbox_image: String,
    /// Whether the btrfs snapshotter is on (its root must be a btrfs mount before containerd starts).
    pub btrfs_snapshotter: bool,
}

/// The btrfs snapshotter's plugin id, also the name of its directory under containerd's root.
pub const BTRFS_SNAPSHOTTER: &str = "io.containerd.snapshotter.v1.btrfs";

/// Plugins that cannot work here or reach out to the network: snapshotters needing their own
/// filesystems or daemons, and OpenTelemetry tracing.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    BTRFS_SNAPSHOTTER,
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];

impl ContainerdConfig {
    /// containerd's `config.toml`: version 2, private paths, the CRI plugin with the `runc` and
    /// `rund` runtimes (handlers of the same names), the locally built pause image, the overlayfs
    /// snapshotter, no TCP or TLS streaming and no CNI configuration.
    pub fn render(&self) -> String {
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        let disabled = DISABLED_PLUGINS
            .iter()
            .filter(|p| !(self.btrfs_snapshotter && **p == BTRFS_SNAPSHOTTER))
            .map(|p| toml_string(p))
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line("version = 2".into());
        line(format!("root = {}", toml_path(&self.root)));
        line(format!("state = {}", toml_path(&self.state)));
        line(format!("disabled_plugins = [{disabled}]"));
        line("[grpc]".into());
        line(format!("  address = {}", toml_path(&self.socket)));
        line("[ttrpc]".into());
        line(format!(
            "  address = {}",
            toml_path(&self.socket.with_extension("sock.ttrpc"))
        ));
        line("[debug]".into());
        line("  level = \"info\"".into());
        line("[metrics]".into());
        line("  address = \"\"".into());
        line("[plugins.\"io.containerd.internal.v1.opt\"]".into());
        line(format!("  path = {}", toml_path(&self.opt)));
        line(format!("[{cri}]"));
        line(format!(
            "  sandbox_image = {}",
            toml_string(&self.sandbox_image)
        ));
        line("  disable_tcp_service = true".into());
        line("  enable_tls_streaming = false".into());
        line("  stream_server_address = \"127.0.0.1\"".into());
        line("  stream_server_port = \"0\"".into());
        // The pause container asks for oom_score_adj -998, which a test run in a restricted
        // session (or a CI container) may not grant: cap it at containerd's own.
        line("  restrict_oom_score_adj = true".into());
        line(format!("[{cri}.containerd]"));
        line("  snapshotter = \"overlayfs\"".into());
        line(format!(
            "  default_runtime_name = {}",
            toml_string(Runtime::Runc.name())
        ));
        for rt in [Runtime::Runc, Runtime::Rund] {
            line(format!("[{cri}.containerd.runtimes.{}]", rt.name()));
            line(format!(
                "  runtime_type = {}",
                toml_string(rt.runtime_type())
            ));
            if rt == Runtime::Runc {
                line(format!("[{cri}.containerd.runtimes.runc.options]"));
                line(format!("  Root = {}", toml_path(&self.runc_root)));
            }
        }
        line(format!("[{cri}.cni]"));
        line(format!("  bin_dir = {}", toml_path(&self.cni_bin_dir)));
        line(format!("  conf_dir = {}", toml_path(&self.cni_conf_dir)));
        s
    }
}

/// The rund configuration for the shim under test (keys of `shim-v2/src/config.rs`).
#[derive(Clone, Debug)]
pub struct RundConfig {
    /// The condensed guest kernel.
    pub kernel: PathBuf,
    /// The agent's initramfs.
    pub initramfs: PathBuf,
    /// The pre-formatted writable-layer image and the sandboxes' copies.
    pub writable_layer_dir: PathBuf,
    /// Per-sandbox state (`<run_dir>/<sandbox-id>/`).
    pub run_dir: PathBuf,
    /// Long-lived state.
    pub lib_dir: PathBuf,
    /// The template store.
    pub template_dir: PathBuf,
    /// rund's parent cgroup, private to this harness.
    pub cgroup_parent: String,
}

impl RundConfig {
    pub fn render(&self) -> String {
        format!(
            "log_level = \"info\"\n\
             [guest]\nkernel = {}\ninitramfs = {}\n\
             [writable_layer]\ndir = {}\n\
             [paths]\nrun_dir = {}\nlib_dir = {}\n\
             [template]\ndir = {}\n\
             [cgroup_pool]\nparent = {}\n",
            toml_path(&self.kernel),
            toml_path(&self.initramfs),
            toml_path(&self.writable_layer_dir),
            toml_path(&self.run_dir),
            toml_path(&self.lib_dir),
            toml_path(&self.template_dir),
            toml_string(&self.cgroup_parent),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(toml_string("x\ny"), "\"x\\u000ay\"");
    }

    #[test]
    fn containerd_config_names_both_runtimes_and_the_pause_image() {
        let c = ContainerdConfig {
            root: "/d/root".into(),
            state: "/d/state".into(),
            socket: "/d/containerd.sock".into(),
            opt: "/d/opt".into(),
            cni_conf_dir: "/d/cni/conf".into(),
            cni_bin_dir: "/d/cni/bin".into(),
            runc_root: "/d/runc".into(),
            sandbox_image: "rund.test/e2e:pause".into(),
            btrfs_snapshotter: false,
        };
        let text = c.render();
        assert!(text.contains(&format!("\"{BTRFS_SNAPSHOTTER}\"")));
        let with_btrfs = ContainerdConfig {
            btrfs_snapshotter: true,
            ..c.clone()
        }
        .render();
        assert!(!with_btrfs.contains(BTRFS_SNAPSHOTTER), "{with_btrfs}");
        assert!(text.starts_with("version = 2\n"));
        assert!(text.contains("root = \"/d/root\"\n"));
        assert!(text.contains("  address = \"/d/containerd.sock.ttrpc\"\n"));
        assert!(text.contains("  sandbox_image = \"rund.test/e2e:pause\"\n"));
        assert!(text.contains(
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund]\n  runtime_type = \"io.containerd.rund.v2\"\n"
        ));
        assert!(text.contains("  runtime_type = \"io.containerd.runc.v2\"\n"));
    }

    #[test]
    fn rund_config_sets_the_paths() {
        let c = RundConfig {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initrd".into(),
            writable_layer_dir: "/d/rw".into(),
            run_dir: "/d/run".into(),
            lib_dir: "/d/lib".into(),
            template_dir: "/d/templates".into(),
            cgroup_parent: "rund-e2e".into(),
        };
        // The shim's own parser reads it back: the keys and their types are the shim's.
        let parsed = shim_v2::config::Config::parse(Path::new("rund.toml"), &c.render())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.guest.kernel, c.kernel);
        assert_eq!(parsed.guest.initramfs, c.initramfs);
        assert_eq!(parsed.writable_layer.dir, c.writable_layer_dir);
        assert_eq!(parsed.paths.run_dir, c.run_dir);
        assert_eq!(parsed.paths.lib_dir, c.lib_dir);
        assert_eq!(parsed.template.dir, c.template_dir);
        assert_eq!(parsed.cgroup_pool.parent, "rund-e2e");
    }
}
