//! The pool's settings, and the checks on cgroup paths that come from configuration or from a
//! platform (a dictated `cgroupsPath`).

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::LinuxResources;

use crate::hierarchy::CgroupVersion;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cgroup path {path:?} is empty")]
    EmptyPath { path: String },
    #[error("cgroup path {path:?} looks like a systemd cgroup path (slice:prefix:name); rund's cgroup pool takes cgroupfs paths such as /kubepods/burstable/pod<uid>/<id>")]
    SystemdPath { path: String },
    #[error("cgroup path {path:?} has a bad component {component:?}: components must be non-empty, not '.' or '..', and use only ASCII letters, digits, '_', '-', '.', '@'")]
    BadComponent { path: String, component: String },
    #[error("low watermark {low} is above high watermark {high}")]
    Watermarks { low: usize, high: usize },
    #[error("high watermark {0} is above the limit {MAX_WATERMARK}")]
    WatermarkTooHigh(usize),
}

/// An upper bound on pool size, so a typo cannot make the refill create a million cgroups.
pub const MAX_WATERMARK: usize = 10_000;

/// Who resets a released slot (limits back, memory reclaimed) and returns it to the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recycle {
    /// The refill thread, so that neither `release` nor the acquires wait behind teardown work;
    /// `release` itself when there is no refill thread (`background_refill: false`).
    #[default]
    Refill,
    /// `release` itself, before it returns.
    Inline,
    /// Only the refill: the background thread, or [`crate::CgroupPool::refill_now`] when the
    /// caller drives the refill itself (without a thread, released slots wait for that call).
    Deferred,
}

/// How a v1 pool claims a slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum V1Claim {
    /// Rename it to `sandbox-<id>` in every hierarchy (the held cgroup carries the sandbox's
    /// name). Each rename takes the kernel's global `cgroup_mutex`.
    #[default]
    Rename,
    /// As on v2: an `O_EXCL` claim file in the state directory; the cgroup keeps its slot name
    /// (the record says whose it is). An acquire of a pre-limited slot then takes no cgroup lock.
    File,
}

/// How to build a [`crate::CgroupPool`]. Every field has a default (see [`PoolConfig::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// rund's parent cgroup, relative to each hierarchy's mount point (default `rund`). A
    /// platform gets pooled cgroups only if it lets rund place sandboxes here (docs/cgroup-pool.md).
    pub parent: String,
    /// Where held cgroups are recorded (default `/run/rund/cgroup-pool`).
    pub state_dir: PathBuf,
    /// Force cgroup v1 or v2; `None` detects (v2 when a cgroup2 is mounted at /sys/fs/cgroup).
    pub version: Option<CgroupVersion>,
    /// Use exactly these mount points instead of every cgroup mount of the chosen version.
    pub mounts: Option<Vec<PathBuf>>,
    /// The refill tops the pool up to `high_watermark` when fewer than `low_watermark` are free,
    /// and trims it back to `high_watermark` when releases overfill it.
    pub low_watermark: usize,
    pub high_watermark: usize,
    /// How often the background refill looks at the pool even when nobody wakes it.
    pub refill_interval: Duration,
    /// Run the background refill thread (default true). Without it the pool is filled once at
    /// start and by [`crate::CgroupPool::refill_now`].
    pub background_refill: bool,
    /// The common sandbox size: slots are kept with these limits already written, so an
    /// acquire asking for exactly these writes no limit file (v1: a rename only; v2: a claim
    /// only). Other shapes still get their writes. `None` (default): free slots keep the
    /// kernel's defaults.
    pub default_shape: Option<LinuxResources>,
    /// Who recycles released slots (default: the refill thread).
    pub recycle: Recycle,
    /// v1 only: how a slot is claimed (default: by rename).
    pub v1_claim: V1Claim,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            parent: "rund".to_string(),
            state_dir: PathBuf::from("/run/rund/cgroup-pool"),
            version: None,
            mounts: None,
            low_watermark: 8,
            high_watermark: 32,
            refill_interval: Duration::from_secs(2),
            background_refill: true,
            default_shape: None,
            recycle: Recycle::Refill,
            v1_claim: V1Claim::Rename,
        }
    }
}

impl PoolConfig {
    /// Checks the settings; returns the parent as a relative path.
    pub fn validate(&self) -> Result<PathBuf, ConfigError> {
        if self.low_watermark > self.high_watermark {
            return Err(ConfigError::Watermarks {
                low: self.low_watermark,
                high: self.high_watermark,
            });
        }
        if self.high_watermark > MAX_WATERMARK {
            return Err(ConfigError::WatermarkTooHigh(self.high_watermark));
        }
        cgroup_relative_path(&self.parent)
    }
}

/// Checks a cgroupfs path (`/a/b/c` or `a/b/c`) and returns it relative to the mount point.
pub fn cgroup_relative_path(path: &str) -> Result<PathBuf, ConfigError> {
    if path.contains(':') {
        return Err(ConfigError::SystemdPath {
            path: path.to_string(),
        });
    }
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        return Err(ConfigError::EmptyPath {
            path: path.to_string(),
        });
    }
    let bad = |component: &str| ConfigError::BadComponent {
        path: path.to_string(),
        component: component.to_string(),
    };
    let mut out = PathBuf::new();
    for raw in trimmed.split('/') {
        let ok_chars = raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'));
        if raw.is_empty() || raw == "." || raw == ".." || !ok_chars {
            return Err(bad(raw));
        }
        out.push(raw);
    }
    // Belt and braces: nothing but normal components can have survived.
    debug_assert!(Path::new(&out)
        .components()
        .all(|c| matches!(c, Component::Normal(_))));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_style_paths_pass_and_tricks_fail() {
        assert_eq!(
            cgroup_relative_path("/kubepods/burstable/pod1-2/abc").unwrap(),
            PathBuf::from("kubepods/burstable/pod1-2/abc")
        );
        assert!(matches!(
            cgroup_relative_path("kubepods.slice:cri-containerd:abc"),
            Err(ConfigError::SystemdPath { .. })
        ));
        for bad in ["/", "", "a/../b", "a//b", "a/./b", "a/b c"] {
            assert!(cgroup_relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn watermarks_are_checked() {
        let c = PoolConfig {
            low_watermark: 5,
            high_watermark: 4,
            ..PoolConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::Watermarks { low: 5, high: 4 })
        );
        assert_eq!(
            PoolConfig::default().validate().unwrap(),
            PathBuf::from("rund")
        );
    }
}
