//! `rund install`: the two binaries into `/usr/local/bin`, the guest kernel and the agent's
//! initramfs where the configuration names them, a default `/etc/rund/config.toml` when there is
//! none, and optionally rund's runtime entry in containerd's configuration; all below an install
//! root (`/` on a real host, a temporary directory in tests).
//!
//! Every source and the containerd edit are checked before anything is written (the edit the way
//! containerd will read it: see [`PlannedEdit`]), so a refusal leaves the host as it was. Each
//! file is put in place atomically and left alone when it already holds the same bytes: running
//! the install twice changes nothing the second time.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::admin::atomic_file::{self, AtomicFileError, Outcome};
use crate::admin::config_source::LoadedConfig;
use crate::admin::containerd_config::{self, Change, ContainerdConfigError, PlannedEdit};
use crate::admin::containerd_effective::{CriRuntimes, Reader};
use crate::admin::{rooted, runtime_class, ADMIN_BINARY, BIN_DIR, SHIM_BINARY};
use crate::config::{Config, ConfigError};

const BINARY_MODE: u32 = 0o755;
const DATA_MODE: u32 = 0o644;

const CONFIG_HEADER: &str = "\
# rund's configuration, read by containerd-shim-rund-v2 at each sandbox start and by
# `rund check` (RUND_CONFIG names another file). Every key is optional: a key left out takes
# its compiled-in default. `rund install` wrote the defaults of its version below.
";

#[derive(Debug, Default, Clone)]
pub struct InstallOptions {
    /// Install below this directory instead of `/`.
    pub root: PathBuf,
    /// The configuration to follow (`--config`); else `RUND_CONFIG`, else
    /// `<root>/etc/rund/config.toml`.
    pub config: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    /// The shim binary; default: beside the running `rund`.
    pub shim: Option<PathBuf>,
    /// The `rund` binary; default: the running one.
    pub rund: Option<PathBuf>,
    /// Edit this containerd configuration.
    pub containerd_config: Option<PathBuf>,
    /// Replace a different `rund` runtime in the containerd configuration.
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("finding the running rund binary")]
    CurrentExe(#[source] io::Error),
    #[error("{what} {path} is not a file: pass {flag} PATH")]
    MissingSource {
        what: &'static str,
        path: PathBuf,
        flag: &'static str,
    },
    #[error("no {what} is installed at {dest}: pass {flag} PATH to install one")]
    MissingGuestFile {
        what: &'static str,
        dest: PathBuf,
        flag: &'static str,
    },
    #[error("serialising the default configuration")]
    DefaultConfig(#[source] toml::ser::Error),
    #[error(transparent)]
    Containerd(#[from] ContainerdConfigError),
    #[error(transparent)]
    Write(#[from] AtomicFileError),
}

/// One thing the install did (or found done).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Copied {
        from: PathBuf,
        to: PathBuf,
    },
    UpToDate(PathBuf),
    KeptGuestFile {
        what: &'static str,
        path: PathBuf,
    },
    WroteDefaultConfig(PathBuf),
    KeptConfig(PathBuf),
    /// One change to containerd's configuration.
    Containerd {
        path: PathBuf,
        change: Change,
    },
    /// containerd's configuration has rund and needs nothing else.
    ContainerdUnchanged(PathBuf),
    /// The CRI runtimes containerd will have with the configuration, and how that was found.
    ContainerdRuntimes {
        path: PathBuf,
        runtimes: CriRuntimes,
        reader: Reader,
    },
    /// containerd reads its configuration at start only.
    RestartContainerd,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Copied { from, to } => {
                write!(f, "installed {} (from {})", to.display(), from.display())
            }
            Step::UpToDate(path) => write!(f, "{} is up to date", path.display()),
            Step::KeptGuestFile { what, path } => {
                write!(f, "{}: kept the installed {what}", path.display())
            }
            Step::WroteDefaultConfig(path) => {
                write!(f, "wrote the default configuration to {}", path.display())
            }
            Step::KeptConfig(path) => write!(f, "{} exists: kept", path.display()),
            Step::Containerd { path, change } => write!(f, "{}: {change}", path.display()),
            Step::ContainerdUnchanged(path) => write!(
                f,
                "{}: no change: it has the rund runtime already",
                path.display()
            ),
            Step::ContainerdRuntimes {
                path,
                runtimes,
                reader,
            } => write!(
                f,
                "{}: containerd will have {runtimes} ({reader})",
                path.display()
            ),
            Step::RestartContainerd => write!(
                f,
                "restart containerd to use its new configuration (systemctl restart containerd)"
            ),
        }
    }
}

#[derive(Debug)]
pub struct InstallReport {
    pub steps: Vec<Step>,
    /// containerd's runtime entries (config version 2: rund's and the built-in runc's), for a
    /// configuration edited by hand.
    pub containerd_snippet: String,
    /// The Kubernetes RuntimeClass.
    pub runtime_class: String,
}

/// A file to copy into place.
struct Copy {
    from: PathBuf,
    to: PathBuf,
    mode: u32,
}

pub fn install(options: &InstallOptions) -> Result<InstallReport, InstallError> {
    let root = options.root.as_path();
    let loaded = LoadedConfig::load(options.config.as_deref(), root)?;
    let config = &loaded.config;

    let mut copies = binary_copies(options)?;
    let mut steps = Vec::new();
    for (what, installed_at, given, flag) in [
        (
            "guest kernel",
            &config.guest.kernel,
            &options.kernel,
            "--kernel",
        ),
        (
            "agent initramfs",
            &config.guest.initramfs,
            &options.initramfs,
            "--initramfs",
        ),
    ] {
        let dest = rooted(root, installed_at);
        match given {
            Some(from) => {
                require_file(from, what, flag)?;
                copies.push(Copy {
                    from: from.clone(),
                    to: dest,
                    mode: DATA_MODE,
                });
            }
            None if dest.is_file() => steps.push(Step::KeptGuestFile { what, path: dest }),
            None => {
                return Err(InstallError::MissingGuestFile { what, dest, flag });
            }
        }
    }
    let containerd_edit = options
        .containerd_config
        .as_deref()
        .map(|path| PlannedEdit::plan(path, options.force, Reader::detect()))
        .transpose()?;
    let default_config = default_config_text().map_err(InstallError::DefaultConfig)?;

    // Everything is checked: from here on, only writes.
    for copy in copies {
        steps.push(
            match atomic_file::install_copy(&copy.from, &copy.to, copy.mode)? {
                Outcome::Written => Step::Copied {
                    from: copy.from,
                    to: copy.to,
                },
                Outcome::Unchanged => Step::UpToDate(copy.to),
            },
        );
    }
    if !loaded.named {
        steps.push(
            if atomic_file::create_new(&loaded.path, default_config.as_bytes(), DATA_MODE)? {
                Step::WroteDefaultConfig(loaded.path.clone())
            } else {
                Step::KeptConfig(loaded.path.clone())
            },
        );
    }
    if let Some(edit) = containerd_edit {
        edit.apply()?;
        if edit.changes.is_empty() {
            steps.push(Step::ContainerdUnchanged(edit.path.clone()));
        }
        for &change in &edit.changes {
            steps.push(Step::Containerd {
                path: edit.path.clone(),
                change,
            });
        }
        let restart = !edit.changes.is_empty();
        steps.push(Step::ContainerdRuntimes {
            path: edit.path,
            runtimes: edit.after,
            reader: edit.reader,
        });
        if restart {
            steps.push(Step::RestartContainerd);
        }
    }
    Ok(InstallReport {
        steps,
        containerd_snippet: containerd_config::snippet(),
        runtime_class: runtime_class::manifest(config),
    })
}

/// The shim and `rund`, from the flags or from beside the running `rund`.
fn binary_copies(options: &InstallOptions) -> Result<Vec<Copy>, InstallError> {
    let running = || std::env::current_exe().map_err(InstallError::CurrentExe);
    let rund = match &options.rund {
        Some(path) => path.clone(),
        None => running()?,
    };
    let shim = match &options.shim {
        Some(path) => path.clone(),
        None => running()?.with_file_name(SHIM_BINARY),
    };
    require_file(&shim, "the shim binary", "--shim")?;
    require_file(&rund, "the rund binary", "--rund")?;
    let bin_dir = rooted(&options.root, Path::new(BIN_DIR));
    Ok(vec![
        Copy {
            from: shim,
            to: bin_dir.join(SHIM_BINARY),
            mode: BINARY_MODE,
        },
        Copy {
            from: rund,
            to: bin_dir.join(ADMIN_BINARY),
            mode: BINARY_MODE,
        },
    ])
}

fn require_file(path: &Path, what: &'static str, flag: &'static str) -> Result<(), InstallError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(InstallError::MissingSource {
            what,
            path: path.to_owned(),
            flag,
        })
    }
}

/// `Config::default()` as TOML under a header comment.
pub fn default_config_text() -> Result<String, toml::ser::Error> {
    Ok(format!(
        "{CONFIG_HEADER}\n{}",
        toml::to_string(&Config::default())?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_back_to_the_defaults() {
        let text = default_config_text().unwrap();
        assert!(text.starts_with("# rund's configuration"), "{text}");
        assert_eq!(
            Config::parse(Path::new("config.toml"), &text).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn steps_say_what_happened() {
        let path = PathBuf::from("/etc/containerd/config.toml");
        let step = Step::Containerd {
            path: path.clone(),
            change: Change::AddedBuiltin,
        };
        assert_eq!(
            step.to_string(),
            "/etc/containerd/config.toml: added runtime runc (containerd's built-in default, \
             which a runtimes table would otherwise replace)"
        );
        let step = Step::ContainerdRuntimes {
            path: path.clone(),
            runtimes: CriRuntimes::builtin(),
            reader: Reader::Containerd(PathBuf::from("/usr/bin/containerd")),
        };
        assert_eq!(
            step.to_string(),
            "/etc/containerd/config.toml: containerd will have CRI runtimes runc \
             (io.containerd.runc.v2); default runc (read with `/usr/bin/containerd config dump`)"
        );
        assert!(Step::ContainerdUnchanged(path)
            .to_string()
            .contains("no change"));
        assert!(Step::RestartContainerd
            .to_string()
            .contains("systemctl restart containerd"));
    }
}
