//! Writing [`Limits`] into a cgroup's directories and putting the defaults back. The file writes
//! go through cgroups-rs's controllers (`CpuController`, `CpuSetController`, `MemController`,
//! `PidController`), each pointed at one directory; what they lack is written here by hand: the
//! v1 memory/memory+swap write order, copying cpuset.cpus/mems from the parent on v1, the v2
//! "empty cpuset means inherit" reset, and reclaiming a released cgroup's memory.

use std::path::{Path, PathBuf};

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuset::CpuSetController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::MaxValue;

use crate::cgroupfs::{self, CgroupFsError};
use crate::hierarchy::{CgroupDirs, CgroupVersion};
use crate::resources::Limits;

/// Defaults a fresh cgroup has, restored on release.
const DEFAULT_V1_SHARES: u64 = 1024;
const DEFAULT_V2_WEIGHT: u64 = 100;
const DEFAULT_CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("the {controller} controller is not available in this {version} cgroup ({path}); a sandbox asked for a {controller} limit")]
    MissingController {
        controller: &'static str,
        version: CgroupVersion,
        path: PathBuf,
    },
    #[error("cannot set {setting} in {path}: {source}")]
    Write {
        setting: &'static str,
        path: PathBuf,
        source: cgroups_rs::fs::error::Error,
    },
    #[error("{setting} needs {file}, which this kernel does not have (swap accounting off?)")]
    Unsupported {
        setting: &'static str,
        file: PathBuf,
    },
    #[error(transparent)]
    CgroupFs(#[from] CgroupFsError),
}

fn write_err<'a>(
    setting: &'static str,
    path: &'a Path,
) -> impl FnOnce(cgroups_rs::fs::error::Error) -> LimitsError + 'a {
    move |source| LimitsError::Write {
        setting,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `limits`. Every controller needed is checked first, so a missing one changes nothing.
pub fn apply(dirs: &CgroupDirs, limits: &Limits) -> Result<(), LimitsError> {
    let v2 = dirs.version == CgroupVersion::V2;
    for controller in limits.controllers() {
        if dirs.dir_for(controller).is_none() {
            return Err(LimitsError::MissingController {
                controller,
                version: dirs.version,
                path: dirs
                    .paths()
                    .next()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            });
        }
    }
    if let Some(dir) = dirs.dir_for("cpuset") {
        let c = CpuSetController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
        if let Some(cpus) = &limits.cpus {
            c.set_cpus(cpus).map_err(write_err("cpuset.cpus", dir))?;
        }
        if let Some(mems) = &limits.mems {
            c.set_mems(mems).map_err(write_err("cpuset.mems", dir))?;
        }
    }
    if let Some(dir) = dirs.dir_for("cpu") {
        let c = CpuController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
        if let Some(w) = limits.cpu_weight {
            c.set_shares(w)
                .map_err(write_err("cpu shares/weight", dir))?;
        }
        if limits.cpu_quota.is_some() || limits.cpu_period.is_some() {
            // v2: one write of "quota period" to cpu.max; v1: the two files.
            c.set_cfs_quota_and_period(limits.cpu_quota, limits.cpu_period)
                .map_err(write_err("cpu quota/period", dir))?;
        }
    }
    if let Some(dir) = dirs.dir_for("memory") {
        apply_memory(dir, v2, limits.memory, limits.swap)?;
    }
    if let (Some(dir), Some(pids)) = (dirs.dir_for("pids"), limits.pids) {
        let value = pids.map_or(MaxValue::Max, MaxValue::Value);
        PidController::new(dir.to_path_buf(), dir.to_path_buf(), v2)
            .set_pid_max(value)
            .map_err(write_err("pids.max", dir))?;
    }
    Ok(())
}

fn apply_memory(
    dir: &Path,
    v2: bool,
    memory: Option<i64>,
    swap: Option<i64>,
) -> Result<(), LimitsError> {
    let c = MemController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
    let swap_file = dir.join(if v2 {
        "memory.swap.max"
    } else {
        "memory.memsw.limit_in_bytes"
    });
    // Without swap accounting the file is absent; "no swap beyond memory" and "no limit" then
    // need no write, anything else cannot be honoured.
    let swap = match swap {
        Some(s) if !swap_file.exists() => {
            let harmless = s == -1 || (v2 && s == 0) || (!v2 && Some(s) == memory);
            if !harmless {
                return Err(LimitsError::Unsupported {
                    setting: "a memory+swap limit",
                    file: swap_file,
                });
            }
            None
        }
        other => other,
    };
    let set_limit = |m: i64| c.set_limit(m).map_err(write_err("memory limit", dir));
    let set_swap = |s: i64| c.set_memswap_limit(s).map_err(write_err("swap limit", dir));
    if v2 {
        if let Some(s) = swap {
            set_swap(s)?;
        }
        if let Some(m) = memory {
            set_limit(m)?;
        }
        return Ok(());
    }
    // v1 keeps memory.limit <= memory.memsw.limit at every step: raise memsw first when it
    // grows past the current memory limit, else lower/set the memory limit first.
    match (memory, swap) {
        (Some(m), Some(s)) => {
            let current = read_i64(&dir.join("memory.limit_in_bytes"))?;
            if s == -1 || current < s {
                set_swap(s)?;
                set_limit(m)?;
            } else {
                set_limit(m)?;
                set_swap(s)?;
            }
        }
        (Some(m), None) => set_limit(m)?,
        (None, Some(s)) => set_swap(s)?,
        (None, None) => {}
    }
    Ok(())
}

fn read_i64(path: &Path) -> Result<i64, CgroupFsError> {
    let text = cgroupfs::read_to_string(path)?;
    // Unlimited on v1 reads as a huge number near i64::MAX (page-rounded); saturate.
    Ok(text
        .trim()
        .parse::<i64>()
        .or_else(|_| {
            text.trim()
                .parse::<u64>()
                .map(|v| v.min(i64::MAX as u64) as i64)
        })
        .unwrap_or(i64::MAX))
}

/// Puts every limit rund sets back to the kernel's default for a new cgroup.
pub fn reset(dirs: &CgroupDirs) -> Result<(), LimitsError> {
    let v2 = dirs.version == CgroupVersion::V2;
    if let Some(dir) = dirs.dir_for("cpu") {
        let c = CpuController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
        let weight = if v2 {
            DEFAULT_V2_WEIGHT
        } else {
            DEFAULT_V1_SHARES
        };
        c.set_shares(weight)
            .map_err(write_err("cpu shares/weight", dir))?;
        c.set_cfs_quota_and_period(Some(-1), Some(DEFAULT_CFS_PERIOD_US))
            .map_err(write_err("cpu quota/period", dir))?;
    }
    if let Some(dir) = dirs.dir_for("cpuset") {
        if v2 {
            // An empty cpuset on v2 means "the parent's". A newline, not "": writing zero bytes
            // makes no write(2) at all, so the old value would stay.
            cgroupfs::write(&dir.join("cpuset.cpus"), "\n")?;
            cgroupfs::write(&dir.join("cpuset.mems"), "\n")?;
        } else {
            copy_cpuset_from_parent(dir)?;
        }
    }
    if let Some(dir) = dirs.dir_for("memory") {
        apply_memory(dir, v2, Some(-1), Some(-1))?;
    }
    if let Some(dir) = dirs.dir_for("pids") {
        PidController::new(dir.to_path_buf(), dir.to_path_buf(), v2)
            .set_pid_max(MaxValue::Max)
            .map_err(write_err("pids.max", dir))?;
    }
    Ok(())
}

/// A new v1 cpuset cgroup starts with empty cpus and mems and takes no task until they are set:
/// give it its parent's.
pub fn copy_cpuset_from_parent(dir: &Path) -> Result<(), CgroupFsError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let value = cgroupfs::read_to_string(&parent.join(file))?;
        cgroupfs::write(&dir.join(file), value.trim())?;
    }
    Ok(())
}

/// Best effort, before a released cgroup goes back to the pool: a memory cgroup keeps the page
/// cache its last holder charged to it, and the next sandbox would start with that usage counted
/// against its limit. v1: `memory.force_empty`; v2: `memory.reclaim` (Linux 5.19+) of the usage.
/// Also zeroes v1 `cpuacct.usage`. Failures are logged: the cgroup is still correct, only less
/// clean.
pub fn scrub_for_reuse(dirs: &CgroupDirs) {
    let v2 = dirs.version == CgroupVersion::V2;
    if let Some(dir) = dirs.dir_for("memory") {
        let result = if v2 {
            let reclaim = dir.join("memory.reclaim");
            match cgroupfs::read_to_string(&dir.join("memory.current")) {
                Ok(cur) if reclaim.exists() && cur.trim() != "0" => {
                    cgroupfs::write(&reclaim, cur.trim())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            cgroupfs::write(&dir.join("memory.force_empty"), "0")
        };
        if let Err(e) = result {
            // EAGAIN from memory.reclaim only means "not all of it".
            log::debug!("cgroup-pool: memory not fully reclaimed before reuse: {e}");
        }
    }
    if !v2 {
        if let Some(dir) = dirs.dir_for("cpuacct") {
            if let Err(e) = cgroupfs::write(&dir.join("cpuacct.usage"), "0") {
                log::debug!("cgroup-pool: cpuacct.usage not reset: {e}");
            }
        }
    }
}
