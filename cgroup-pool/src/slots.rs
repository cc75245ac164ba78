//! Making, finding and removing free pool slots. This is the only place that mkdirs or rmdirs a
//! pool slot, and it runs off the acquire path (refill thread, or a dry pool's fallback).

use crate::cgroupfs::{self, CgroupFsError};
use crate::hierarchy::{CgroupDirs, CgroupVersion, Hierarchy};
use crate::limits::{self, copy_cpuset_from_parent, LimitsError, WriteCount};
use crate::naming::{self, Marker};
use crate::parent::Parent;
use crate::resources::Limits;
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
    #[error("cannot pre-limit pool slot: {0}")]
    Shape(#[from] LimitsError),
}

/// How the refill makes and recycles slots.
#[derive(Debug, Clone, Default)]
pub struct SlotSetup {
    /// The pool's default resource shape: written into every new or recycled slot, whose lead
    /// directory then carries the shape's key ([`crate::naming::SHAPE_XATTR`]).
    pub shape: Option<Limits>,
    /// v1: switch `cpuset.sched_load_balance` off in new slots (see
    /// [`limits::disable_load_balance`]); only when the root cpuset balances load.
    pub v1_no_load_balance: bool,
}

impl SlotSetup {
    /// Writes the default shape into a free slot's directories (only what differs) and marks
    /// the lead directory with its key. Without a shape nothing is done: the slot keeps the
    /// kernel's defaults.
    pub fn shape_slot(&self, dirs: &CgroupDirs) -> Result<WriteCount, LimitsError> {
        let Some(shape) = &self.shape else {
            return Ok(WriteCount::default());
        };
        let count = limits::apply_if_changed(dirs, shape)?;
        if let Some(lead) = dirs.dirs.first() {
            cgroupfs::set_shape(&lead.path, &shape.shape_key())?;
        }
        Ok(count)
    }

    /// Makes a released (empty) slot ready for its next holder: every limit back to the default
    /// shape or the kernel's default (only the files that differ are written), memory reclaimed,
    /// and the lead directory marked with the shape.
    pub fn recycle(&self, dirs: &CgroupDirs) -> Result<WriteCount, LimitsError> {
        let count = limits::reset_to(dirs, self.shape.as_ref())?;
        limits::scrub_for_reuse(dirs);
        if let (Some(shape), Some(lead)) = (&self.shape, dirs.dirs.first()) {
            cgroupfs::set_shape(&lead.path, &shape.shape_key())?;
        }
        Ok(count)
    }
}

/// Makes the slot `name` in every hierarchy, marked (and pre-limited with `setup`'s shape); on
/// any failure removes what it made.
///
/// The lead hierarchy's directory is made last and marked last, after the shape is in place, so
/// a slot is visible to [`scan_free`] (which looks for marked lead directories) only once it is
/// complete.
pub fn create(
    hierarchy: &Hierarchy,
    parent: &Parent,
    name: &str,
    setup: &SlotSetup,
) -> Result<(), SlotError> {
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
                if setup.v1_no_load_balance {
                    limits::disable_load_balance(&d.path)?;
                }
                copy_cpuset_from_parent(&d.path)?;
            }
            if i != 0 {
                cgroupfs::set_marker(&d.path, &Marker::Slot(name.to_string()))?;
            }
        }
        setup.shape_slot(&dirs)?;
        cgroupfs::set_marker(&dirs.dirs[0].path, &Marker::Slot(name.to_string()))?;
        Ok::<(), SlotError>(())
    })();
    if let Err(e) = result {
        for path in made.iter().rev() {
            let _ = cgroupfs::rmdir(path);
        }
        return Err(match e {
            SlotError::CgroupFs(source) => SlotError::Make {
                slot: name.to_string(),
                source,
            },
            e => e,
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

/// The free slots found on disk: marked `pool-*` directories in the lead hierarchy without a
/// claim file. What other processes made is found too.
pub fn scan_free(
    hierarchy: &Hierarchy,
    parent: &Parent,
    state: &StateDir,
) -> Result<Vec<String>, SlotError> {
    let lead = hierarchy.mounts[0].mount_point.join(&parent.relative);
    // Claim files: v2's, and v1's when the pool claims by file (none otherwise).
    let claimed = state.claimed_slots()?;
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
