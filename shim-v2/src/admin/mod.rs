//! What the `rund` admin binary does: `rund install` puts rund on a host and tells containerd and
//! Kubernetes about it, `rund check` says whether the host can run sandboxes and why not. The
//! binary (`src/bin/rund.rs`) only parses flags and prints.

use std::path::{Component, Path, PathBuf};

pub mod atomic_file;
pub mod check;
pub mod config_source;
pub mod containerd_config;
pub mod containerd_effective;
pub mod containerd_version;
pub mod install;
pub mod runtime_class;

/// The runtime handler name in containerd's CRI configuration and in the RuntimeClass.
pub const HANDLER: &str = "rund";

/// containerd's name for the shim: `io.containerd.rund.v2` runs `containerd-shim-rund-v2`.
pub const RUNTIME_TYPE: &str = "io.containerd.rund.v2";

/// The shim binary containerd looks up on its PATH for [`RUNTIME_TYPE`].
pub const SHIM_BINARY: &str = "containerd-shim-rund-v2";

/// The admin binary.
pub const ADMIN_BINARY: &str = "rund";

/// Where both binaries go, below the install root.
pub const BIN_DIR: &str = "/usr/local/bin";

/// `path` (absolute, as named on the installed host) below `root`: `/usr/x` under `/tmp/r` is
/// `/tmp/r/usr/x`. `..` components are dropped, so the result never leaves `root`.
pub fn rooted(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for component in path.components() {
        if let Component::Normal(part) = component {
            out.push(part);
        }
    }
    out
}

pub use vmm::error_chain;

/// What the unit tests of the containerd modules share.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::PathBuf;

    use super::containerd_effective::Reader;

    /// Debian 12's stock /etc/containerd/config.toml (containerd 1.6.20~ds1-1+deb12u3).
    pub const DEBIAN_STOCK: &str = include_str!("../../testdata/debian-stock.toml");

    /// The containerd on PATH, or `None` after printing why the test is skipped.
    /// RUND_REQUIRE_ROOT_TESTS=1 (CI, which installs containerd) makes its absence a failure.
    pub fn containerd_or_skip() -> Option<PathBuf> {
        match Reader::detect() {
            Reader::Containerd(bin) => Some(bin),
            Reader::Rules => {
                let reason = "no `containerd` on PATH";
                if std::env::var("RUND_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
                    panic!("{reason}, and RUND_REQUIRE_ROOT_TESTS=1");
                }
                eprintln!("SKIPPED: {reason}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooted_stays_under_the_root() {
        let root = Path::new("/tmp/r");
        assert_eq!(
            rooted(root, Path::new("/usr/local/bin")),
            Path::new("/tmp/r/usr/local/bin")
        );
        assert_eq!(
            rooted(root, Path::new("/../etc/../x")),
            Path::new("/tmp/r/etc/x")
        );
        assert_eq!(
            rooted(Path::new("/"), Path::new("/etc/rund")),
            Path::new("/etc/rund")
        );
    }
}
