//! Crash recovery, run on start (and on demand) with the state directory locked exclusively, so no
//! acquire or release of another process is half done while it looks.
//!
//! Rules:
//! - only directories carrying rund's marker are considered; anything else under rund's parent is
//!   reported as foreign and never touched;
//! - a cgroup that has tasks is never touched (reported as busy), whatever its state says, and a
//!   free slot with tasks is quarantined: not handed out until a later reconcile finds it empty;
//! - a slot held by a sandbox that still exists (`is_alive`) is adopted; on v1 a half-done rename
//!   is finished (the directory names say who the holder is), and a missing record is rewritten;
//! - a slot held by a sandbox that no longer exists is reset and returned to the pool (renamed
//!   back on v1); a bypass cgroup of such a sandbox is removed;
//! - a released slot the refill had not recycled yet (v1: named `recycle-<slot>`; v2: a claim of
//!   nobody's) is reset and returned to the pool;
//! - a half-made or half-removed slot (present in some v1 hierarchies only) is removed;
//! - records and claims that point at nothing are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::cgroupfs;
use crate::hierarchy::{CgroupDir, CgroupDirs, CgroupVersion};
use crate::naming::{self, Marker};
use crate::pool::{PoolCore, PoolError};
use crate::sandbox_id::SandboxId;
use crate::state::{Placement, SandboxRecord};

/// What a reconcile found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Free slots kept in the pool (including the reclaimed ones).
    pub free_slots: usize,
    /// Live sandboxes whose cgroups were adopted.
    pub adopted: Vec<SandboxId>,
    /// Sandboxes gone whose cgroups were reset and returned to the pool, or removed (bypass).
    pub reclaimed: Vec<SandboxId>,
    /// Released slots found waiting to be recycled (or a v2 claim of nobody's), reset and
    /// returned to the pool.
    pub recycled: Vec<String>,
    /// Slots found half-made or half-removed, and removed.
    pub removed_broken: Vec<String>,
    /// Cgroups left alone because tasks remain in them.
    pub busy: Vec<PathBuf>,
    /// Directories under rund's parent without rund's marker: never touched.
    pub foreign: Vec<PathBuf>,
    /// Records or claims dropped because their cgroup no longer exists (or was unreadable).
    pub stale_records: Vec<String>,
}

pub(crate) fn reconcile(
    core: &PoolCore,
    is_alive: &dyn Fn(&SandboxId) -> bool,
) -> Result<ReconcileReport, PoolError> {
    let _lock = core.state.lock_exclusive()?;
    let mut report = ReconcileReport::default();
    let removed = core.state.remove_stale_temporaries()?;
    if removed > 0 {
        log::info!("cgroup-pool: removed {removed} temporary state files of a crashed writer");
    }
    let mut records = BTreeMap::new();
    for r in core.state.records()? {
        match r {
            Ok(r) => {
                records.insert(r.sandbox_id.clone(), r);
            }
            // An unreadable record cannot be acted on; keep it for a human and say so.
            Err(e) => log::warn!("cgroup-pool: reconcile skips {e}"),
        }
    }
    let mut seen = BTreeSet::new();
    let mut quarantine = BTreeSet::new();
    match core.hierarchy.version {
        CgroupVersion::V1 => slots_v1(
            core,
            is_alive,
            &records,
            &mut seen,
            &mut quarantine,
            &mut report,
        )?,
        CgroupVersion::V2 => slots_v2(
            core,
            is_alive,
            &records,
            &mut seen,
            &mut quarantine,
            &mut report,
        )?,
    }
    *core.quarantine.lock().unwrap_or_else(|p| p.into_inner()) = quarantine;
    for (id, record) in &records {
        if seen.contains(id) {
            continue;
        }
        match &record.placement {
            Placement::Pool { .. } => {
                core.state.remove_record(id)?;
                report.stale_records.push(id.to_string());
            }
            Placement::Dictated { .. } => bypass(core, is_alive, record, &mut report)?,
        }
    }
    log::info!("cgroup-pool: reconciled: {report:?}");
    Ok(report)
}

/// The marked children of rund's parent in one hierarchy; unmarked ones go to `foreign`.
fn marked_children(
    parent_dir: &Path,
    foreign: &mut Vec<PathBuf>,
) -> Result<Vec<(String, Marker)>, PoolError> {
    let mut out = Vec::new();
    for name in cgroupfs::child_dirs(parent_dir)? {
        let path = parent_dir.join(&name);
        match cgroupfs::read_marker(&path)? {
            Some(m) => out.push((name, m)),
            None => foreign.push(path),
        }
    }
    Ok(out)
}

fn has_tasks(dirs: &CgroupDirs) -> bool {
    // Unreadable task lists count as busy: never touch what cannot be checked.
    dirs.threads().map_or(true, |t| !t.is_empty())
}

fn slots_v1(
    core: &PoolCore,
    is_alive: &dyn Fn(&SandboxId) -> bool,
    records: &BTreeMap<SandboxId, SandboxRecord>,
    seen: &mut BTreeSet<SandboxId>,
    quarantine: &mut BTreeSet<String>,
    report: &mut ReconcileReport,
) -> Result<(), PoolError> {
    let mounts = &core.hierarchy.mounts;
    // slot -> the directory name it has in each hierarchy (None: missing there).
    let mut slots: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for (i, mount) in mounts.iter().enumerate() {
        let parent_dir = mount.mount_point.join(&core.parent.relative);
        for (name, marker) in marked_children(&parent_dir, &mut report.foreign)? {
            if let Marker::Slot(slot) = marker {
                slots
                    .entry(slot)
                    .or_insert_with(|| vec![None; mounts.len()])[i] = Some(name);
            }
        }
    }
    let present: BTreeSet<String> = slots.keys().cloned().collect();
    for (slot, names) in slots {
        let current = CgroupDirs {
            version: CgroupVersion::V1,
            dirs: mounts
                .iter()
                .zip(&names)
                .filter_map(|(m, n)| {
                    n.as_ref().map(|n| CgroupDir {
                        path: m.mount_point.join(&core.parent.relative).join(n),
                        controllers: m.controllers.clone(),
                    })
                })
                .collect(),
        };
        let parked = |n: &String| naming::slot_of_recycle_dir_name(n) == Some(slot.as_str());
        let recycling = names.iter().flatten().any(parked);
        let holders: BTreeSet<Option<SandboxId>> = names
            .iter()
            .flatten()
            .filter(|n| **n != slot && !parked(n))
            .map(|n| naming::sandbox_of_dir_name(n))
            .collect();
        if holders.len() > 1 || holders.contains(&None) {
            // Renamed to something rund never names a slot: not ours to fix.
            report
                .foreign
                .extend(current.paths().map(Path::to_path_buf));
            continue;
        }
        let mut holder = holders.into_iter().flatten().next();
        let mut recycling = recycling;
        // A pool claiming by file (`V1Claim::File`): a slot under its own name may be held, or
        // parked for recycling, as its claim file says.
        let mut claimed = false;
        if holder.is_none() && !recycling {
            match core.state.slot_holder(&slot)? {
                Some(Some(id)) => {
                    holder = Some(id);
                    claimed = true;
                }
                Some(None) => {
                    recycling = true;
                    claimed = true;
                }
                None => {}
            }
        }
        let complete = names.iter().all(Option::is_some);
        if let Some(id) = holder.as_ref().filter(|id| is_alive(id)) {
            seen.insert(id.clone());
            let held_name = if claimed {
                slot.clone()
            } else {
                naming::sandbox_dir_name(id)
            };
            let held = core.parent.child_dirs(&core.hierarchy, &held_name);
            for (i, name) in names.iter().enumerate() {
                if let Some(name) = name.as_ref().filter(|n| **n != held_name) {
                    let from = mounts[i].mount_point.join(&core.parent.relative).join(name);
                    cgroupfs::rename(&from, &held.dirs[i].path)?;
                }
            }
            if !complete {
                log::warn!("cgroup-pool: live sandbox {id} holds slot {slot}, which is missing in some hierarchies");
            }
            adopt(core, records, id, Placement::Pool { slot }, held)?;
            report.adopted.push(id.clone());
            continue;
        }
        if let Some(id) = &holder {
            seen.insert(id.clone());
        }
        if has_tasks(&current) {
            report.busy.extend(current.paths().map(Path::to_path_buf));
            quarantine.insert(slot);
            continue;
        }
        if !complete {
            for d in current.dirs.iter().rev() {
                cgroupfs::rmdir(&d.path)?;
            }
            if let Some(id) = &holder {
                core.state.remove_record(id)?;
            }
            if claimed {
                core.state.unclaim_slot(&slot)?;
            }
            report.removed_broken.push(slot);
            continue;
        }
        if holder.is_some() || recycling {
            core.setup.recycle(&current)?;
            // Rename back what was renamed, lead hierarchy last (it publishes the slot).
            let free = core.parent.child_dirs(&core.hierarchy, &slot);
            for i in (1..names.len()).chain(std::iter::once(0)) {
                if names[i].as_deref() != Some(slot.as_str()) {
                    cgroupfs::rename(&current.dirs[i].path, &free.dirs[i].path)?;
                }
            }
            match holder {
                Some(id) => {
                    core.state.remove_record(&id)?;
                    report.reclaimed.push(id);
                }
                None => report.recycled.push(slot.clone()),
            }
            if claimed {
                core.state.unclaim_slot(&slot)?;
            }
        }
        report.free_slots += 1;
    }
    for slot in core.state.claimed_slots()? {
        if !present.contains(&slot) {
            core.state.unclaim_slot(&slot)?;
            report.stale_records.push(format!("claim {slot}"));
        }
    }
    Ok(())
}

fn slots_v2(
    core: &PoolCore,
    is_alive: &dyn Fn(&SandboxId) -> bool,
    records: &BTreeMap<SandboxId, SandboxRecord>,
    seen: &mut BTreeSet<SandboxId>,
    quarantine: &mut BTreeSet<String>,
    report: &mut ReconcileReport,
) -> Result<(), PoolError> {
    let parent_dir = core.hierarchy.mounts[0]
        .mount_point
        .join(&core.parent.relative);
    let mut present = BTreeSet::new();
    for (name, marker) in marked_children(&parent_dir, &mut report.foreign)? {
        match marker {
            Marker::Slot(slot) if slot == name => {}
            Marker::Slot(_) => {
                report.foreign.push(parent_dir.join(&name));
                continue;
            }
            // A bypass cgroup the platform placed here is handled from its record.
            Marker::Bypass(_) | Marker::Parent => continue,
        }
        present.insert(name.clone());
        let dirs = core.parent.child_dirs(&core.hierarchy, &name);
        let holder = core.state.slot_holder(&name)?;
        if let Some(Some(id)) = holder
            .as_ref()
            .filter(|h| matches!(h, Some(id) if is_alive(id)))
        {
            seen.insert(id.clone());
            adopt(core, records, id, Placement::Pool { slot: name }, dirs)?;
            report.adopted.push(id.clone());
            continue;
        }
        if let Some(Some(id)) = &holder {
            seen.insert(id.clone());
        }
        if has_tasks(&dirs) {
            report.busy.push(dirs.dirs[0].path.clone());
            quarantine.insert(name);
            continue;
        }
        match holder {
            Some(Some(id)) => {
                core.setup.recycle(&dirs)?;
                core.state.remove_record(&id)?;
                core.state.unclaim_slot(&name)?;
                report.reclaimed.push(id);
            }
            // A released slot not recycled yet, an interrupted trim, or a claim that names
            // nobody.
            Some(None) => {
                core.setup.recycle(&dirs)?;
                core.state.unclaim_slot(&name)?;
                report.recycled.push(name.clone());
            }
            None => {}
        }
        report.free_slots += 1;
    }
    for slot in core.state.claimed_slots()? {
        if !present.contains(&slot) {
            core.state.unclaim_slot(&slot)?;
            report.stale_records.push(format!("claim {slot}"));
        }
    }
    Ok(())
}

/// Keeps a live sandbox's cgroup, rewriting its record if it is missing or differs.
fn adopt(
    core: &PoolCore,
    records: &BTreeMap<SandboxId, SandboxRecord>,
    id: &SandboxId,
    placement: Placement,
    dirs: CgroupDirs,
) -> Result<(), PoolError> {
    let record = SandboxRecord {
        sandbox_id: id.clone(),
        placement,
        dirs,
    };
    if records.get(id) != Some(&record) {
        core.state.replace_record(&record)?;
    }
    Ok(())
}

/// A bypass cgroup from a record: kept while its sandbox lives, removed (if empty and marked as
/// this sandbox's) once it is gone.
fn bypass(
    core: &PoolCore,
    is_alive: &dyn Fn(&SandboxId) -> bool,
    record: &SandboxRecord,
    report: &mut ReconcileReport,
) -> Result<(), PoolError> {
    let id = &record.sandbox_id;
    if is_alive(id) {
        report.adopted.push(id.clone());
        return Ok(());
    }
    let ours: Vec<&Path> = record
        .dirs
        .paths()
        .filter(
            |p| matches!(cgroupfs::read_marker(p), Ok(Some(Marker::Bypass(owner))) if &owner == id),
        )
        .collect();
    let existing = CgroupDirs {
        version: record.dirs.version,
        dirs: record
            .dirs
            .dirs
            .iter()
            .filter(|d| ours.contains(&d.path.as_path()))
            .cloned()
            .collect(),
    };
    if has_tasks(&existing) {
        report.busy.extend(existing.paths().map(Path::to_path_buf));
        return Ok(());
    }
    for d in existing.dirs.iter().rev() {
        cgroupfs::rmdir(&d.path)?;
    }
    core.state.remove_record(id)?;
    report.reclaimed.push(id.clone());
    Ok(())
}
