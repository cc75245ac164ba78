//! Making, finding and removing free pool slots. This is the only place that mkdirs or rmdirs a
//! pool slot, and it runs off the acquire path (refill thread, or a dry pool's fallback).

use crate::cgroupfs::{self, CgroupFsError};
use crate::hierarchy::{CgroupVersion, Hierarchy};
use crate::limits::copy_cpuset_from_parent;
use crate::naming::{self, Marker};
use crate::parent::Parent;
use crate::state::{StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot make pool slot {slot}: {source}")]
    Make {
        slot: String,
        #[source]
        source: CgroupFsError,
    },
    #[error(transparent)]
    CgroupFs(#[from] CgroupFsError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Makes the slot `name` in every hierarchy, marked; on any failure removes what it made.
///
/// The lead hierarchy's directory is made last and each directory is marked last, so a slot is
/// visible to [`scan_free`] (which looks for marked lead directories) only once it is complete.
pub fn create(hierarchy: &Hierarchy, parent: &Parent, name: &str) -> Result<(), SlotError> {
    let dirs = parent.child_dirs(hierarchy, name);
    let mut order: Vec<usize> = (1..dirs.dirs.len()).collect();
    order.push(0);
    let mut made = Vec::new();
    let result = (|| {
        for &i in &order {
            let d = &dirs.dirs[i];
            cgroupfs::mkdir(&d.path)?;
            made.push(d.path.clone());
            if hierarchy.version == CgroupVersion::V1 && d.controllers.iter().any(|c| c == "cpuset")
            {
                copy_cpuset_from_parent(&d.path)?;
            }
            cgroupfs::set_marker(&d.path, &Marker::Slot(name.to_string()))?;
        }
        Ok(())
    })();
    if let Err(source) = result {
        for path in made.iter().rev() {
            let _ = cgroupfs::rmdir(path);
        }
        return Err(SlotError::Make {
            slot: name.to_string(),
            source,
        });
    }
    Ok(())
}

/// Removes a free slot. The caller must own it: on v1 by holding its name (nobody renamed it
/// away: an rmdir of the lead directory that finds nothing means another process took it, and
/// `Ok(false)` is returned); on v2 by holding its claim.
pub fn remove(hierarchy: &Hierarchy, parent: &Parent, name: &str) -> Result<bool, SlotError> {
    let dirs = parent.child_dirs(hierarchy, name);
    for (i, d) in dirs.dirs.iter().enumerate() {
        match cgroupfs::rmdir(&d.path) {
            Ok(()) => {}
            Err(e) if i == 0 && cgroupfs::is_not_found(&e) => return Ok(false),
            Err(e) if cgroupfs::is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// The free slots found on disk: marked `pool-*` directories in the lead hierarchy, unclaimed
/// on v2. What other processes made is found too.
pub fn scan_free(
    hierarchy: &Hierarchy,
    parent: &Parent,
    state: &StateDir,
) -> Result<Vec<String>, SlotError> {
    let lead = hierarchy.mounts[0].mount_point.join(&parent.relative);
    let claimed = match hierarchy.version {
        CgroupVersion::V2 => state.claimed_slots()?,
        CgroupVersion::V1 => Vec::new(),
    };
    let mut free = Vec::new();
    for name in cgroupfs::child_dirs(&lead)? {
        if !naming::is_slot_name(&name) || claimed.contains(&name) {
            continue;
        }
        match cgroupfs::read_marker(&lead.join(&name)) {
            Ok(Some(Marker::Slot(slot))) if slot == name => free.push(name),
            Ok(_) => {}
            // Gone since the listing: taken or removed by another process.
            Err(e) if cgroupfs::is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(free)
}
