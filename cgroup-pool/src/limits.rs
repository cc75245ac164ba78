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

/// How many limit files an apply or reset wrote, and how many it left alone because they
/// already held the value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCount {
    pub written: u64,
    pub skipped: u64,
}

impl std::ops::AddAssign for WriteCount {
    fn add_assign(&mut self, other: WriteCount) {
        self.written += other.written;
        self.skipped += other.skipped;
    }
}

/// Writes one setting, or with `if_changed` first reads it and leaves it when `matches` says
/// the file already holds the value (a read is cheaper than a write that takes the cgroup locks
/// and, for a v1 cpuset, may rebuild the scheduler domains).
struct Writer {
    if_changed: bool,
    count: WriteCount,
}

impl Writer {
    fn set<E>(
        &mut self,
        file: &Path,
        matches: impl FnOnce(&str) -> bool,
        write: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        if self.if_changed {
            // An unreadable file is written (the write reports the real problem, if any).
            if let Ok(current) = cgroupfs::read_to_string(file) {
                if matches(current.trim()) {
                    self.count.skipped += 1;
                    return Ok(());
                }
            }
        }
        write()?;
        self.count.written += 1;
        Ok(())
    }
}

/// What `-1` ("no limit") reads back as: v1 prints a page-rounded number near `i64::MAX`, v2
/// prints `max`.
fn limit_matches(current: &str, wanted: i64) -> bool {
    if wanted == -1 {
        return current == "max"
            || current
                .parse::<u64>()
                .is_ok_and(|v| v >= UNLIMITED_READS_AT_LEAST);
    }
    current.parse::<i64>().is_ok_and(|v| v == wanted)
}

/// v1's unlimited memory reads as `PAGE_COUNTER_MAX * PAGE_SIZE` (9223372036854771712 with 4 KiB
/// pages); anything this large is "no limit" in practice.
const UNLIMITED_READS_AT_LEAST: u64 = 1 << 62;

/// Writes `limits`, every file (what a runtime without the pool does on a fresh cgroup). Every
/// controller needed is checked first, so a missing one changes nothing.
pub fn apply(dirs: &CgroupDirs, limits: &Limits) -> Result<(), LimitsError> {
    apply_with(dirs, limits, false).map(|_| ())
}

/// Writes the settings of `limits` whose files do not already hold the value; the rest is left
/// alone (a pre-limited or recycled slot mostly needs nothing).
pub fn apply_if_changed(dirs: &CgroupDirs, limits: &Limits) -> Result<WriteCount, LimitsError> {
    apply_with(dirs, limits, true)
}

fn apply_with(
    dirs: &CgroupDirs,
    limits: &Limits,
    if_changed: bool,
) -> Result<WriteCount, LimitsError> {
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
    let mut w = Writer {
        if_changed,
        count: WriteCount::default(),
    };
    if let Some(dir) = dirs.dir_for("cpuset") {
        let c = CpuSetController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
        if let Some(cpus) = &limits.cpus {
            w.set(
                &dir.join("cpuset.cpus"),
                |cur| cur == cpus,
                || c.set_cpus(cpus).map_err(write_err("cpuset.cpus", dir)),
            )?;
        }
        if let Some(mems) = &limits.mems {
            w.set(
                &dir.join("cpuset.mems"),
                |cur| cur == mems,
                || c.set_mems(mems).map_err(write_err("cpuset.mems", dir)),
            )?;
        }
    }
    if let Some(dir) = dirs.dir_for("cpu") {
        let c = CpuController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
        if let Some(weight) = limits.cpu_weight {
            w.set(
                &dir.join(if v2 { "cpu.weight" } else { "cpu.shares" }),
                |cur| cur == weight.to_string(),
                || {
                    c.set_shares(weight)
                        .map_err(write_err("cpu shares/weight", dir))
                },
            )?;
        }
        set_quota_and_period(&mut w, &c, dir, v2, limits.cpu_quota, limits.cpu_period)?;
    }
    if let Some(dir) = dirs.dir_for("memory") {
        apply_memory(&mut w, dir, v2, limits.memory, limits.swap)?;
    }
    if let (Some(dir), Some(pids)) = (dirs.dir_for("pids"), limits.pids) {
        let value = pids.map_or(MaxValue::Max, MaxValue::Value);
        w.set(
            &dir.join("pids.max"),
            |cur| cur == value.to_string(),
            || {
                PidController::new(dir.to_path_buf(), dir.to_path_buf(), v2)
                    .set_pid_max(value)
                    .map_err(write_err("pids.max", dir))
            },
        )?;
    }
    Ok(w.count)
}

/// CFS quota and period: two files on v1, one `cpu.max` ("quota period", quota `max` for none)
/// on v2.
fn set_quota_and_period(
    w: &mut Writer,
    c: &CpuController,
    dir: &Path,
    v2: bool,
    quota: Option<i64>,
    period: Option<u64>,
) -> Result<(), LimitsError> {
    if quota.is_none() && period.is_none() {
        return Ok(());
    }
    let err = write_err("cpu quota/period", dir);
    if v2 {
        let quota_text = quota.map(|q| {
            if q > 0 {
                q.to_string()
            } else {
                "max".to_string()
            }
        });
        return w.set(
            &dir.join("cpu.max"),
            |cur| {
                let mut parts = cur.split_whitespace();
                let (q, p) = (parts.next(), parts.next());
                quota_text.as_deref().is_none_or(|want| q == Some(want))
                    && period.is_none_or(|want| p == Some(want.to_string().as_str()))
            },
            || c.set_cfs_quota_and_period(quota, period).map_err(err),
        );
    }
    if let Some(q) = quota {
        w.set(
            &dir.join("cpu.cfs_quota_us"),
            |cur| cur.parse::<i64>().is_ok_and(|v| v == q || (q < 0 && v < 0)),
            || {
                c.set_cfs_quota_and_period(Some(q), None)
                    .map_err(write_err("cpu quota/period", dir))
            },
        )?;
    }
    if let Some(p) = period {
        w.set(
            &dir.join("cpu.cfs_period_us"),
            |cur| cur == p.to_string(),
            || {
                c.set_cfs_quota_and_period(None, Some(p))
                    .map_err(write_err("cpu quota/period", dir))
            },
        )?;
    }
    Ok(())
}

fn apply_memory(
    w: &mut Writer,
    dir: &Path,
    v2: bool,
    memory: Option<i64>,
    swap: Option<i64>,
) -> Result<(), LimitsError> {
    let c = MemController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
    let limit_file = dir.join(if v2 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    });
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
    let set_limit = |w: &mut Writer, m: i64| {
        w.set(
            &limit_file,
            |cur| limit_matches(cur, m),
            || c.set_limit(m).map_err(write_err("memory limit", dir)),
        )
    };
    let set_swap = |w: &mut Writer, s: i64| {
        w.set(
            &swap_file,
            |cur| limit_matches(cur, s),
            || c.set_memswap_limit(s).map_err(write_err("swap limit", dir)),
        )
    };
    if v2 {
        if let Some(s) = swap {
            set_swap(w, s)?;
        }
        if let Some(m) = memory {
            set_limit(w, m)?;
        }
        return Ok(());
    }
    // v1 keeps memory.limit <= memory.memsw.limit at every step: raise memsw first when it
    // grows past the current memory limit, else lower/set the memory limit first. (A skipped
    // write leaves a value that already satisfies the order.)
    match (memory, swap) {
        (Some(m), Some(s)) => {
            let current = read_i64(&limit_file)?;
            if s == -1 || current < s {
                set_swap(w, s)?;
                set_limit(w, m)?;
            } else {
                set_limit(w, m)?;
                set_swap(w, s)?;
            }
        }
        (Some(m), None) => set_limit(w, m)?,
        (None, Some(s)) => set_swap(w, s)?,
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

/// Puts every limit rund sets back to the kernel's default for a new cgroup, writing only the
/// files that differ, and first forgets any pre-limited shape the slot was marked with.
pub fn reset(dirs: &CgroupDirs) -> Result<WriteCount, LimitsError> {
    reset_to(dirs, None)
}

/// Like [`reset`], but where `shape` sets a value, that value instead of the default: a slot
/// released with the pool's default shape still in place needs no write at all. Does not mark
/// the slot with the shape (the caller does, once everything is written).
pub fn reset_to(dirs: &CgroupDirs, shape: Option<&Limits>) -> Result<WriteCount, LimitsError> {
    if let Some(lead) = dirs.dirs.first() {
        cgroupfs::remove_shape(&lead.path)?;
    }
    let none = Limits::default();
    let shape = shape.unwrap_or(&none);
    let v2 = dirs.version == CgroupVersion::V2;
    let mut w = Writer {
        if_changed: true,
        count: WriteCount::default(),
    };
    if let Some(dir) = dirs.dir_for("cpu") {
        let c = CpuController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
        let weight = shape.cpu_weight.unwrap_or(if v2 {
            DEFAULT_V2_WEIGHT
        } else {
            DEFAULT_V1_SHARES
        });
        w.set(
            &dir.join(if v2 { "cpu.weight" } else { "cpu.shares" }),
            |cur| cur == weight.to_string(),
            || {
                c.set_shares(weight)
                    .map_err(write_err("cpu shares/weight", dir))
            },
        )?;
        let quota = shape.cpu_quota.unwrap_or(-1);
        let period = shape.cpu_period.unwrap_or(DEFAULT_CFS_PERIOD_US);
        set_quota_and_period(&mut w, &c, dir, v2, Some(quota), Some(period))?;
    }
    if let Some(dir) = dirs.dir_for("cpuset") {
        for (file, wanted) in [("cpuset.cpus", &shape.cpus), ("cpuset.mems", &shape.mems)] {
            let path = dir.join(file);
            if let Some(value) = wanted {
                w.set(&path, |cur| cur == value, || cgroupfs::write(&path, value))?;
            } else if v2 {
                // An empty cpuset on v2 means "the parent's". A newline, not "": writing zero
                // bytes makes no write(2) at all, so the old value would stay.
                w.set(&path, str::is_empty, || cgroupfs::write(&path, "\n"))?;
            } else {
                let Some(parent) = dir.parent() else { continue };
                let value = cgroupfs::read_to_string(&parent.join(file))?;
                let value = value.trim();
                w.set(&path, |cur| cur == value, || cgroupfs::write(&path, value))?;
            }
        }
    }
    if let Some(dir) = dirs.dir_for("memory") {
        let memory = shape.memory.unwrap_or(-1);
        apply_memory(
            &mut w,
            dir,
            v2,
            Some(memory),
            Some(shape.swap.unwrap_or(-1)),
        )?;
    }
    if let Some(dir) = dirs.dir_for("pids") {
        let value = shape.pids.flatten().map_or(MaxValue::Max, MaxValue::Value);
        w.set(
            &dir.join("pids.max"),
            |cur| cur == value.to_string(),
            || {
                PidController::new(dir.to_path_buf(), dir.to_path_buf(), v2)
                    .set_pid_max(value)
                    .map_err(write_err("pids.max", dir))
            },
        )?;
    }
    Ok(w.count)
}

/// v1: a cpuset whose `cpuset.sched_load_balance` is 1 rebuilds the scheduler domains on every
/// change of its `cpuset.cpus` (on a fresh slot, and on each acquire and reset that changes
/// them). When the root cpuset balances load, the kernel makes one domain of all CPUs and the
/// flag of a cgroup below it changes nothing but that cost, so pool slots switch it off, before
/// their cpus are set (a change of the flag on an empty cpuset rebuilds nothing).
pub fn disable_load_balance(dir: &Path) -> Result<(), CgroupFsError> {
    cgroupfs::write(&dir.join("cpuset.sched_load_balance"), "0")
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

/// runc's way with a v1 cpuset on the way to a cgroup: each of cpus and mems left empty gets the
/// parent's (a cpuset without them takes no task, and neither can its children); one already
/// set is kept. Top-down, so the parent has been filled first.
pub fn fill_cpuset_if_empty(dir: &Path) -> Result<(), CgroupFsError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = cgroupfs::read_to_string(&dir.join(file))?;
        if own.trim().is_empty() {
            let value = cgroupfs::read_to_string(&parent.join(file))?;
            cgroupfs::write(&dir.join(file), value.trim())?;
        }
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
