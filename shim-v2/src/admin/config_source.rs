//! Which configuration file `rund` reads: `--config PATH`, else the file `RUND_CONFIG` names, else
//! `/etc/rund/config.toml` below the install root. As for the shim ([`Config::load`]), a missing
//! default file means the compiled-in defaults, and a missing file someone named is an error.

use std::path::{Path, PathBuf};

use crate::admin::rooted;
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

/// The environment variable the shim reads too.
pub const CONFIG_ENV: &str = "RUND_CONFIG";

/// A configuration and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: Config,
    pub path: PathBuf,
    /// False when `path` is the default location and absent: the defaults are in force.
    pub found: bool,
    /// Named by `--config` or `RUND_CONFIG` rather than the default location.
    pub named: bool,
}

impl LoadedConfig {
    /// Reads the configuration `explicit` (from `--config`) or `RUND_CONFIG` names, else the
    /// default file below `root`.
    pub fn load(explicit: Option<&Path>, root: &Path) -> Result<LoadedConfig, ConfigError> {
        let named = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
        if let Some(path) = named {
            return Ok(LoadedConfig {
                config: Config::from_file(&path)?,
                path,
                found: true,
                named: true,
            });
        }
        let path = rooted(root, Path::new(DEFAULT_CONFIG_PATH));
        match Config::from_file(&path) {
            Ok(config) => Ok(LoadedConfig {
                config,
                path,
                found: true,
                named: false,
            }),
            Err(ConfigError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(LoadedConfig {
                    config: Config::default(),
                    path,
                    found: false,
                    named: false,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// One line for a report: which file, or that the defaults are in force.
    pub fn describe(&self) -> String {
        if self.found {
            format!("{}", self.path.display())
        } else {
            format!("{} is absent: compiled-in defaults", self.path.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RUND_CONFIG is process-wide and not set by the test runner; tests/rund_cli.rs covers it
    // through the binary.

    #[test]
    fn an_explicit_file_wins_and_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.toml");
        std::fs::write(&path, "[guest]\ndefault_vcpus = 2\n").unwrap();
        let loaded = LoadedConfig::load(Some(&path), Path::new("/nonexistent-root")).unwrap();
        assert_eq!(loaded.config.guest.default_vcpus, 2);
        assert!(loaded.found && loaded.named);
        let missing = d.path().join("missing.toml");
        let e = LoadedConfig::load(Some(&missing), d.path()).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }

    #[test]
    fn default_file_below_the_root_or_the_defaults() {
        let d = tempfile::tempdir().unwrap();
        let loaded = LoadedConfig::load(None, d.path()).unwrap();
        assert!(!loaded.found);
        assert_eq!(loaded.path, d.path().join("etc/rund/config.toml"));
        assert_eq!(loaded.config, Config::default());
        assert!(loaded.describe().contains("defaults"));
        std::fs::create_dir_all(d.path().join("etc/rund")).unwrap();
        std::fs::write(
            d.path().join("etc/rund/config.toml"),
            "log_level = \"debug\"\n",
        )
        .unwrap();
        let loaded = LoadedConfig::load(None, d.path()).unwrap();
        assert!(loaded.found && !loaded.named);
        assert_eq!(loaded.config.log_level, crate::config::LogLevel::Debug);
    }
}
