//! `/etc/rund/config.toml`: every key is optional and has a compiled-in default, so a host
//! without the file runs with the defaults below.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the configuration is read from unless `RUND_CONFIG` names another file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rund/config.toml";

/// Memory below which a guest kernel and the agent cannot start.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The most memory one microVM takes (guest RAM is one mapping of the shim's).
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: {key} = {value}: {why}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub guest: GuestConfig,
    pub writable_layer: WritableLayerConfig,
    pub cgroup_pool: CgroupPoolConfig,
    pub template: TemplateConfig,
    pub paths: PathsConfig,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: LogLevel,
}

/// The microVM every sandbox gets.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestConfig {
    /// The condensed guest kernel (vmlinux ELF or bzImage).
    pub kernel: PathBuf,
    /// The agent's initramfs (`agent/pack-initramfs`).
    pub initramfs: PathBuf,
    /// Appended to the kernel command line rund builds.
    pub extra_cmdline: String,
    /// vCPUs of a sandbox whose pod asks for no CPU limit.
    pub default_vcpus: u32,
    /// Upper bound on vCPUs, whatever a pod asks.
    pub max_vcpus: u32,
    /// Guest memory of a sandbox whose pod asks for no memory limit.
    pub default_memory_mib: u32,
    /// Added to a pod's memory limit: the guest kernel and the agent need room too.
    pub memory_overhead_mib: u32,
    /// Upper bound on a guest's memory, overhead included, whatever a pod asks: what
    /// `io.rund.memory-mib` may choose for a pod without a memory limit.
    pub max_memory_mib: u32,
    /// How long the agent may take to answer after the VM starts.
    pub agent_timeout_secs: u64,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel: PathBuf::from("/usr/share/rund/vmlinux"),
            initramfs: PathBuf::from("/usr/share/rund/rund-initramfs.cpio.gz"),
            extra_cmdline: String::new(),
            default_vcpus: 1,
            max_vcpus: 8,
            default_memory_mib: 256,
            memory_overhead_mib: 64,
            max_memory_mib: MAX_MEMORY_MIB,
            agent_timeout_secs: 120,
        }
    }
}

/// The volatile writable layer: one ext4 image per sandbox, a reflink copy of a pre-formatted one.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WritableLayerConfig {
    /// Holds the pre-formatted image and the sandboxes' copies; reflink needs XFS (reflink=1)
    /// or btrfs here, elsewhere each copy is a sparse copy.
    pub dir: PathBuf,
    /// Size of each sandbox's writable layer.
    pub size_mib: u64,
}

impl Default for WritableLayerConfig {
    fn default() -> Self {
        WritableLayerConfig {
            dir: PathBuf::from("/var/lib/rund/writable"),
            size_mib: 1024,
        }
    }
}

/// The cgroup pool (crate `cgroup-pool`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupPoolConfig {
    /// Hand out pre-made cgroups; off: every sandbox's cgroup is made on the spot.
    pub enabled: bool,
    /// rund's parent cgroup, relative to each hierarchy's root.
    pub parent: String,
    pub low_watermark: usize,
    pub high_watermark: usize,
}

impl Default for CgroupPoolConfig {
    fn default() -> Self {
        CgroupPoolConfig {
            enabled: true,
            parent: "rund".into(),
            low_watermark: 8,
            high_watermark: 32,
        }
    }
}

/// Whether sandboxes start from templates (docs/templates.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateMode {
    /// Restore the sandbox's shape's template if there is one; else cold-boot, and make the
    /// template after the sandbox started.
    #[default]
    Auto,
    /// Every sandbox restores a template; a missing one is made first (and waited for).
    Require,
    /// Every sandbox cold-boots.
    Off,
}

/// Templates.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateConfig {
    /// `auto`, `require` or `off`.
    pub mode: TemplateMode,
    /// Where templates live (tmpfs: they hold guest memory and are remade after a reboot).
    pub dir: PathBuf,
    /// Shapes whose templates are kept ready besides those sandboxes ask for: a sandbox start
    /// (unless `mode` is `off`) starts a maker for each one missing, off its path, and
    /// `rund template create --keep-ready` makes them all (after a reboot, say).
    pub keep_ready: Vec<TemplateShape>,
    /// The bound, in MiB, of the store's own tmpfs, which rund mounts on `dir` (huge pages: a
    /// clone's guest then faults its memory in 2 MiB at a time) unless `dir` is a mount point
    /// already or holds templates; 0: no mount, `dir` as it is.
    pub store_mib: u64,
    /// Map the template's pages into a restoring sandbox's page tables while its restore is
    /// prepared, not as its guest first touches them: nothing is copied and holes stay holes,
    /// but each clone's RSS counts every template page. Measured in the nested testbed: the
    /// first vsock connection to the agent ~55 ms sooner (173 against 118 ms).
    pub map_ahead: bool,
}

/// A sandbox's shape, as a template is made for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateShape {
    pub vcpus: u32,
    /// The whole guest's memory (as `rund template create --memory-mib`: overhead included).
    pub memory_mib: u32,
}

/// At most this many shapes are kept ready: each template holds guest memory on tmpfs.
pub const MAX_KEEP_READY: usize = 16;

impl Default for TemplateConfig {
    fn default() -> Self {
        TemplateConfig {
            mode: TemplateMode::default(),
            dir: PathBuf::from(templates::store::DEFAULT_ROOT),
            keep_ready: Vec::new(),
            store_mib: 4096,
            map_ahead: true,
        }
    }
}

/// Where rund keeps things on a host.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PathsConfig {
    /// Per-sandbox state: `<run_dir>/<sandbox-id>/` (mounts, image, sockets, records).
    pub run_dir: PathBuf,
    /// Templates and other long-lived state.
    pub lib_dir: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            run_dir: PathBuf::from("/run/rund"),
            lib_dir: PathBuf::from("/var/lib/rund"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl Config {
    /// The file `RUND_CONFIG` names, else [`DEFAULT_CONFIG_PATH`]; a missing default file means
    /// the defaults, a missing file named by `RUND_CONFIG` is an error.
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os("RUND_CONFIG") {
            Some(p) => Config::from_file(Path::new(&p)),
            None => match Config::from_file(Path::new(DEFAULT_CONFIG_PATH)) {
                Err(ConfigError::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Ok(Config::default())
                }
                other => other,
            },
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, value: String, why| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            value,
            why,
        };
        let g = &self.guest;
        if g.default_vcpus == 0 || g.default_vcpus > g.max_vcpus {
            return Err(invalid(
                "guest.default_vcpus",
                g.default_vcpus.to_string(),
                "must be between 1 and guest.max_vcpus",
            ));
        }
        if g.max_vcpus == 0 || g.max_vcpus > 254 {
            return Err(invalid(
                "guest.max_vcpus",
                g.max_vcpus.to_string(),
                "must be between 1 and 254",
            ));
        }
        if g.default_memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "guest.default_memory_mib",
                g.default_memory_mib.to_string(),
                "below the 64 MiB a guest needs",
            ));
        }
        if g.max_memory_mib < g.default_memory_mib.saturating_add(g.memory_overhead_mib)
            || g.max_memory_mib > MAX_MEMORY_MIB
        {
            return Err(invalid(
                "guest.max_memory_mib",
                g.max_memory_mib.to_string(),
                "must be between guest.default_memory_mib + guest.memory_overhead_mib and 65536",
            ));
        }
        if g.agent_timeout_secs == 0 {
            return Err(invalid(
                "guest.agent_timeout_secs",
                "0".into(),
                "must be at least 1",
            ));
        }
        for (key, p) in [
            ("guest.kernel", &g.kernel),
            ("guest.initramfs", &g.initramfs),
            ("writable_layer.dir", &self.writable_layer.dir),
            ("paths.run_dir", &self.paths.run_dir),
            ("paths.lib_dir", &self.paths.lib_dir),
            ("template.dir", &self.template.dir),
        ] {
            if !p.is_absolute() {
                return Err(invalid(key, p.display().to_string(), "must be absolute"));
            }
        }
        if self.writable_layer.size_mib < 16 {
            return Err(invalid(
                "writable_layer.size_mib",
                self.writable_layer.size_mib.to_string(),
                "ext4 needs at least 16 MiB",
            ));
        }
        let shapes = &self.template.keep_ready;
        if shapes.len() > MAX_KEEP_READY {
            return Err(invalid(
                "template.keep_ready",
                format!("{} shapes", shapes.len()),
                "at most 16 shapes",
            ));
        }
        for shape in shapes {
            let value = || {
                format!(
                    "{{ vcpus = {}, memory_mib = {} }}",
                    shape.vcpus, shape.memory_mib
                )
            };
            if shape.vcpus == 0 || shape.vcpus > g.max_vcpus {
                return Err(invalid(
                    "template.keep_ready",
                    value(),
                    "vcpus must be between 1 and guest.max_vcpus",
                ));
            }
            if shape.memory_mib < MIN_MEMORY_MIB {
                return Err(invalid(
                    "template.keep_ready",
                    value(),
                    "memory_mib is below the 64 MiB a guest needs",
                ));
            }
            if shape.memory_mib > g.max_memory_mib {
                return Err(invalid(
                    "template.keep_ready",
                    value(),
                    "memory_mib is above guest.max_memory_mib",
                ));
            }
        }
        let pool = &self.cgroup_pool;
        if pool.low_watermark > pool.high_watermark {
            return Err(invalid(
                "cgroup_pool.low_watermark",
                pool.low_watermark.to_string(),
                "above cgroup_pool.high_watermark",
            ));
        }
        cgroup_pool::config::cgroup_relative_path(&pool.parent).map_err(|_| {
            invalid(
                "cgroup_pool.parent",
                pool.parent.clone(),
                "not a relative cgroup path",
            )
        })?;
        Ok(())
    }

    /// The pool's settings: rund's parent and watermarks, state beside the sandboxes'.
    pub fn pool_config(&self) -> cgroup_pool::PoolConfig {
        cgroup_pool::PoolConfig {
            parent: self.cgroup_pool.parent.clone(),
            state_dir: self.paths.run_dir.join("cgroup-pool"),
            low_watermark: self.cgroup_pool.low_watermark,
            high_watermark: self.cgroup_pool.high_watermark,
            ..cgroup_pool::PoolConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("config.toml"), text)
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn keys_override_defaults() {
        let c = parse(
            "log_level = \"debug\"\n[guest]\ndefault_vcpus = 2\nmemory_overhead_mib = 32\n\
             [writable_layer]\ndir = \"/srv/rund\"\nsize_mib = 512\n",
        )
        .unwrap();
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.guest.default_vcpus, 2);
        assert_eq!(c.guest.memory_overhead_mib, 32);
        assert_eq!(c.guest.kernel, GuestConfig::default().kernel);
        assert_eq!(c.writable_layer.dir, PathBuf::from("/srv/rund"));
        assert_eq!(c.writable_layer.size_mib, 512);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[guest]\ndefault_vcpus = 0\n", "guest.default_vcpus"),
            (
                "[guest]\ndefault_memory_mib = 16\n",
                "guest.default_memory_mib",
            ),
            ("[guest]\nkernel = \"vmlinux\"\n", "guest.kernel"),
            ("[guest]\nmax_memory_mib = 300\n", "guest.max_memory_mib"),
            ("[guest]\nmax_memory_mib = 70000\n", "guest.max_memory_mib"),
            (
                "[guest]\nmax_memory_mib = 512\n[template]\nkeep_ready = [{ vcpus = 1, memory_mib = 1024 }]\n",
                "template.keep_ready",
            ),
            (
                "[writable_layer]\nsize_mib = 1\n",
                "writable_layer.size_mib",
            ),
            (
                "[cgroup_pool]\nlow_watermark = 9\nhigh_watermark = 2\n",
                "cgroup_pool.low_watermark",
            ),
            ("[cgroup_pool]\nparent = \"a:b\"\n", "cgroup_pool.parent"),
            ("[template]\ndir = \"templates\"\n", "template.dir"),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused() {
        let e = parse("[guest]\nkernal = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("kernal"), "{e}");
        let e = parse("[guest]\ndefault_vcpus = \"two\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_vcpus"), "{e}");
        let e = parse("log_level = \"loud\"\n").unwrap_err().to_string();
        assert!(e.contains("loud"), "{e}");
        let e = parse("[template]\nmode = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes") && e.contains("auto"), "{e}");
    }

    #[test]
    fn shapes_to_keep_ready_parse_and_bad_ones_are_named() {
        let c = parse(
            "[template]\nkeep_ready = [{ vcpus = 1, memory_mib = 320 }, \
             { vcpus = 2, memory_mib = 576 }]\n",
        )
        .unwrap();
        assert_eq!(
            c.template.keep_ready,
            [
                TemplateShape {
                    vcpus: 1,
                    memory_mib: 320
                },
                TemplateShape {
                    vcpus: 2,
                    memory_mib: 576
                }
            ]
        );
        assert!(Config::default().template.keep_ready.is_empty());
        assert_eq!(Config::default().template.store_mib, 4096);
        assert_eq!(
            parse("[template]\nstore_mib = 0\n")
                .unwrap()
                .template
                .store_mib,
            0
        );
        for (text, message) in [
            (
                "[{ vcpus = 0, memory_mib = 320 }]",
                "template.keep_ready = { vcpus = 0, memory_mib = 320 }: vcpus must be between 1 \
                 and guest.max_vcpus",
            ),
            (
                "[{ vcpus = 1, memory_mib = 32 }]",
                "template.keep_ready = { vcpus = 1, memory_mib = 32 }: memory_mib is below the \
                 64 MiB a guest needs",
            ),
        ] {
            let e = parse(&format!("[template]\nkeep_ready = {text}\n")).unwrap_err();
            assert_eq!(e.to_string(), format!("config.toml: {message}"));
        }
        let many = vec!["{ vcpus = 1, memory_mib = 128 }"; 17].join(", ");
        let e = parse(&format!("[template]\nkeep_ready = [{many}]\n")).unwrap_err();
        assert!(
            e.to_string().ends_with("17 shapes: at most 16 shapes"),
            "{e}"
        );
        let e = parse("[template]\nkeep_ready = [{ vcpus = 1 }]\n").unwrap_err();
        assert!(e.to_string().contains("memory_mib"), "{e}");
    }

    #[test]
    fn template_modes_parse() {
        for (text, mode) in [
            ("auto", TemplateMode::Auto),
            ("require", TemplateMode::Require),
            ("off", TemplateMode::Off),
        ] {
            let c = parse(&format!("[template]\nmode = \"{text}\"\n")).unwrap();
            assert_eq!(c.template.mode, mode);
        }
        assert_eq!(
            Config::default().template.dir,
            PathBuf::from("/run/rund/templates")
        );
        assert_eq!(parse("").unwrap().template.mode, TemplateMode::Auto);
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string(&Config::default()).unwrap();
        assert_eq!(parse(&text).unwrap(), Config::default());
    }
}
