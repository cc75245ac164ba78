//! The OCI `LinuxResources` a sandbox asks for, checked and turned into the values each cgroup
//! version takes, before anything is touched. Hand-written: cgroups-rs's OCI mapping (`FsManager`,
//! feature `oci`) only works on cgroups found through `/proc/self/cgroup` at `/sys/fs/cgroup`, and
//! it would also apply the container device list, which belongs to the guest, not to the VMM.
//!
//! Applied: cpu shares (v2: weight), quota and period, cpuset cpus and mems, memory limit and
//! memory+swap limit, pids limit. Ignored, with a log line: devices (enforced in the guest; the
//! VMM needs /dev/kvm and its own devices), memory reservation, kernel memory, swappiness, OOM
//! killer, block I/O, hugepages, network, rdma, unified, cpu idle and burst.

use oci_spec::runtime::LinuxResources;

use crate::hierarchy::CgroupVersion;

/// The cpu.shares range the kernel accepts on v1.
pub const MIN_CPU_SHARES: u64 = 2;
pub const MAX_CPU_SHARES: u64 = 262_144;
/// The CFS period range the kernel accepts (1 ms to 1 s), in microseconds.
pub const MIN_CFS_PERIOD_US: u64 = 1_000;
pub const MAX_CFS_PERIOD_US: u64 = 1_000_000;
/// The smallest CFS quota the kernel accepts, in microseconds.
pub const MIN_CFS_QUOTA_US: i64 = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("cpu shares {0} is outside {MIN_CPU_SHARES}..={MAX_CPU_SHARES}")]
    CpuShares(u64),
    #[error(
        "cpu quota {0} µs is invalid: it must be -1 (no limit) or at least {MIN_CFS_QUOTA_US}"
    )]
    CpuQuota(i64),
    #[error("cpu period {0} µs is outside {MIN_CFS_PERIOD_US}..={MAX_CFS_PERIOD_US}")]
    CpuPeriod(u64),
    #[error("cpuset {field} {value:?} is not a list of numbers and ranges such as \"0-3,6\"")]
    CpuList { field: &'static str, value: String },
    #[error(
        "realtime cpu scheduling (realtimeRuntime/realtimePeriod) is not supported for a sandbox"
    )]
    Realtime,
    #[error("memory limit {0} is invalid: it must be -1 (no limit) or a positive number of bytes")]
    MemoryLimit(i64),
    #[error("memory+swap limit {swap} is invalid: it must be -1 (no limit) or at least the memory limit {limit}")]
    MemorySwap { swap: i64, limit: i64 },
    #[error("a memory+swap limit ({0}) needs a memory limit on cgroup v2 (swap is limited on its own there)")]
    SwapWithoutLimit(i64),
}

/// What to write, per controller, for one cgroup version. `None` leaves a setting alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// v1 `cpu.shares`, or v2 `cpu.weight` (already converted).
    pub cpu_weight: Option<u64>,
    /// CFS quota (-1: none) and period, µs.
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpus: Option<String>,
    pub mems: Option<String>,
    /// Bytes, -1 for no limit.
    pub memory: Option<i64>,
    /// v1: memory+swap (`memory.memsw.limit_in_bytes`); v2: swap alone (`memory.swap.max`).
    /// -1 for no limit.
    pub swap: Option<i64>,
    /// `None` leaves it; `Some(None)` is "max".
    pub pids: Option<Option<i64>>,
    /// OCI fields this crate does not apply, for the log.
    pub ignored: Vec<&'static str>,
}

impl Limits {
    pub fn from_oci(res: &LinuxResources, version: CgroupVersion) -> Result<Limits, ResourceError> {
        let mut l = Limits::default();
        if let Some(cpu) = res.cpu() {
            if cpu.realtime_runtime().is_some_and(|v| v != 0)
                || cpu.realtime_period().is_some_and(|v| v != 0)
            {
                return Err(ResourceError::Realtime);
            }
            // 0 means "unset" in OCI.
            if let Some(shares) = cpu.shares().filter(|s| *s != 0) {
                if !(MIN_CPU_SHARES..=MAX_CPU_SHARES).contains(&shares) {
                    return Err(ResourceError::CpuShares(shares));
                }
                l.cpu_weight = Some(match version {
                    CgroupVersion::V1 => shares,
                    CgroupVersion::V2 => cpu_shares_to_weight(shares),
                });
            }
            if let Some(quota) = cpu.quota().filter(|q| *q != 0) {
                if quota != -1 && quota < MIN_CFS_QUOTA_US {
                    return Err(ResourceError::CpuQuota(quota));
                }
                l.cpu_quota = Some(quota);
            }
            if let Some(period) = cpu.period().filter(|p| *p != 0) {
                if !(MIN_CFS_PERIOD_US..=MAX_CFS_PERIOD_US).contains(&period) {
                    return Err(ResourceError::CpuPeriod(period));
                }
                l.cpu_period = Some(period);
            }
            l.cpus = cpu_list("cpus", cpu.cpus())?;
            l.mems = cpu_list("mems", cpu.mems())?;
            if cpu.idle().is_some() {
                l.ignored.push("cpu.idle");
            }
            if cpu.burst().is_some() {
                l.ignored.push("cpu.burst");
            }
        }
        if let Some(mem) = res.memory() {
            let limit = mem.limit().filter(|v| *v != 0);
            if let Some(limit) = limit {
                if limit != -1 && limit < 1 {
                    return Err(ResourceError::MemoryLimit(limit));
                }
                l.memory = Some(limit);
            }
            if let Some(swap) = mem.swap().filter(|v| *v != 0) {
                let lim = limit.unwrap_or(-1);
                if swap != -1 && (swap < 1 || (lim != -1 && swap < lim)) {
                    return Err(ResourceError::MemorySwap { swap, limit: lim });
                }
                l.swap = Some(match version {
                    CgroupVersion::V1 => swap,
                    // OCI's swap is memory+swap; v2 limits swap alone (as runc converts it).
                    CgroupVersion::V2 if swap == -1 => -1,
                    CgroupVersion::V2 => match limit {
                        Some(lim) if lim > 0 => swap - lim,
                        _ => return Err(ResourceError::SwapWithoutLimit(swap)),
                    },
                });
            }
            if mem.reservation().is_some() {
                l.ignored.push("memory.reservation");
            }
            if mem.kernel().is_some() || mem.kernel_tcp().is_some() {
                l.ignored.push("memory.kernel");
            }
            if mem.swappiness().is_some() {
                l.ignored.push("memory.swappiness");
            }
            if mem.disable_oom_killer().is_some() {
                l.ignored.push("memory.disableOOMKiller");
            }
        }
        if let Some(pids) = res.pids() {
            l.pids = Some((pids.limit() > 0).then_some(pids.limit()));
        }
        if res.devices().as_ref().is_some_and(|d| !d.is_empty()) {
            l.ignored.push("devices");
        }
        if res.block_io().is_some() {
            l.ignored.push("blockIO");
        }
        if res
            .hugepage_limits()
            .as_ref()
            .is_some_and(|h| !h.is_empty())
        {
            l.ignored.push("hugepageLimits");
        }
        if res.network().is_some() {
            l.ignored.push("network");
        }
        if res.rdma().is_some() {
            l.ignored.push("rdma");
        }
        if res.unified().as_ref().is_some_and(|u| !u.is_empty()) {
            l.ignored.push("unified");
        }
        Ok(l)
    }

    /// A canonical text of the values these limits write (not the ignored fields): two limits
    /// with the same key leave the same files. Stored on pre-limited free slots
    /// ([`crate::naming::SHAPE_XATTR`]).
    pub fn shape_key(&self) -> String {
        fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
        }
        let pids = match self.pids {
            None => "-".to_string(),
            Some(None) => "max".to_string(),
            Some(Some(n)) => n.to_string(),
        };
        format!(
            "v1;w={};q={};p={};c={};m={};mem={};sw={};pids={}",
            opt(&self.cpu_weight),
            opt(&self.cpu_quota),
            opt(&self.cpu_period),
            opt(&self.cpus),
            opt(&self.mems),
            opt(&self.memory),
            opt(&self.swap),
            pids
        )
    }

    /// The controllers these limits write to.
    pub fn controllers(&self) -> Vec<&'static str> {
        let mut c = Vec::new();
        if self.cpu_weight.is_some() || self.cpu_quota.is_some() || self.cpu_period.is_some() {
            c.push("cpu");
        }
        if self.cpus.is_some() || self.mems.is_some() {
            c.push("cpuset");
        }
        if self.memory.is_some() || self.swap.is_some() {
            c.push("memory");
        }
        if self.pids.is_some() {
            c.push("pids");
        }
        c
    }
}

/// cpu.shares (v1, 2..=262144, default 1024) to cpu.weight (v2, 1..=10000, default 100), the way
/// runc (>= 1.3.2, opencontainers/cgroups) and crun (>= 1.23) map it: a quadratic in log2(shares)
/// through the three points min->min, 1024->100 and max->max:
/// `weight = ceil(10^((l² + 125·l) / 612 − 7/34))`, `l = log2(shares)`.
/// (Older runc used the linear `1 + (shares − 2) · 9999 / 262142`, which maps 1024 to 39.)
pub fn cpu_shares_to_weight(shares: u64) -> u64 {
    if shares <= MIN_CPU_SHARES {
        return 1;
    }
    if shares >= MAX_CPU_SHARES {
        return 10_000;
    }
    let l = (shares as f64).log2();
    let exponent = (l * l + 125.0 * l) / 612.0 - 7.0 / 34.0;
    // The fit is exact at 1024 -> 100, but float rounding can land a hair above an integer;
    // round that noise away before the ceiling so 1024 gives 100, not 101.
    let value = 10f64.powf(exponent);
    let rounded = (value * 1e9).round() / 1e9;
    rounded.ceil() as u64
}

fn cpu_list(field: &'static str, value: &Option<String>) -> Result<Option<String>, ResourceError> {
    let Some(value) = value.as_ref().map(|v| v.trim()) else {
        return Ok(None);
    };
    // Empty means "unset" (as runc treats it).
    if value.is_empty() {
        return Ok(None);
    }
    let bad = || ResourceError::CpuList {
        field,
        value: value.to_string(),
    };
    for part in value.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let lo: u32 = lo.parse().map_err(|_| bad())?;
        let hi: u32 = hi.parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
    }
    Ok(Some(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
    };

    #[test]
    fn shares_to_weight_matches_runc_and_crun() {
        assert_eq!(cpu_shares_to_weight(2), 1);
        assert_eq!(cpu_shares_to_weight(1024), 100);
        assert_eq!(cpu_shares_to_weight(262_144), 10_000);
        // The formula evaluated independently (python3, same expression).
        assert_eq!(cpu_shares_to_weight(512), 59);
        assert_eq!(cpu_shares_to_weight(2048), 174);
        let mut last = 0;
        for s in [2, 3, 10, 100, 512, 1024, 4096, 65536, 262_143] {
            let w = cpu_shares_to_weight(s);
            assert!(w >= last && (1..=10_000).contains(&w));
            last = w;
        }
    }

    fn res(
        cpu: Option<oci_spec::runtime::LinuxCpu>,
        mem: Option<(i64, Option<i64>)>,
    ) -> LinuxResources {
        let mut b = LinuxResourcesBuilder::default();
        if let Some(cpu) = cpu {
            b = b.cpu(cpu);
        }
        if let Some((limit, swap)) = mem {
            let mut m = LinuxMemoryBuilder::default().limit(limit);
            if let Some(s) = swap {
                m = m.swap(s);
            }
            b = b.memory(m.build().unwrap());
        }
        b.build().unwrap()
    }

    #[test]
    fn v1_and_v2_values() {
        let cpu = LinuxCpuBuilder::default()
            .shares(512u64)
            .quota(50_000i64)
            .period(100_000u64)
            .cpus("0")
            .build()
            .unwrap();
        let r = res(Some(cpu), Some((64 << 20, Some(96 << 20))));
        let v1 = Limits::from_oci(&r, CgroupVersion::V1).unwrap();
        assert_eq!(v1.cpu_weight, Some(512));
        assert_eq!(v1.swap, Some(96 << 20));
        let v2 = Limits::from_oci(&r, CgroupVersion::V2).unwrap();
        assert_eq!(v2.cpu_weight, Some(59));
        assert_eq!(v2.swap, Some(32 << 20), "v2 limits swap alone");
        assert_eq!(v2.controllers(), vec!["cpu", "cpuset", "memory"]);
        let pids = LinuxResourcesBuilder::default()
            .pids(LinuxPidsBuilder::default().limit(0i64).build().unwrap())
            .build()
            .unwrap();
        assert_eq!(
            Limits::from_oci(&pids, CgroupVersion::V1).unwrap().pids,
            Some(None)
        );
    }

    #[test]
    fn shape_keys_tell_limits_apart_and_ignore_ignored_fields() {
        let a = Limits {
            cpu_weight: Some(512),
            pids: Some(Some(64)),
            ..Limits::default()
        };
        let mut b = a.clone();
        b.ignored.push("devices");
        assert_eq!(a.shape_key(), b.shape_key());
        b.pids = Some(None);
        assert_ne!(a.shape_key(), b.shape_key());
        assert_ne!(Limits::default().shape_key(), a.shape_key());
    }

    #[test]
    fn bad_values_are_refused_with_the_value_named() {
        let quota = LinuxCpuBuilder::default().quota(10i64).build().unwrap();
        let err = Limits::from_oci(&res(Some(quota), None), CgroupVersion::V1).unwrap_err();
        assert_eq!(err, ResourceError::CpuQuota(10));
        let cpus = LinuxCpuBuilder::default().cpus("0-x").build().unwrap();
        let err = Limits::from_oci(&res(Some(cpus), None), CgroupVersion::V1).unwrap_err();
        assert!(err.to_string().contains("\"0-x\""), "{err}");
        let shares = LinuxCpuBuilder::default()
            .shares(1u64 << 20)
            .build()
            .unwrap();
        assert!(Limits::from_oci(&res(Some(shares), None), CgroupVersion::V2).is_err());
        let err =
            Limits::from_oci(&res(None, Some((100, Some(50)))), CgroupVersion::V1).unwrap_err();
        assert_eq!(
            err,
            ResourceError::MemorySwap {
                swap: 50,
                limit: 100
            }
        );
        let err = Limits::from_oci(&res(None, Some((-1, Some(50 << 20)))), CgroupVersion::V2)
            .unwrap_err();
        assert_eq!(err, ResourceError::SwapWithoutLimit(50 << 20));
    }
}
