//! The names rund gives its cgroups and the marker that tells them from anyone else's.
//!
//! Under rund's parent, a free pool slot is a directory named `pool-<pid>-<seq>` (pid and a
//! counter of the process that made it, so that several shims can refill the same parent without
//! colliding). On cgroup v1 a held slot is renamed to `sandbox-<id>`; on v2 it keeps its slot name
//! and the holder is recorded in the state directory. Each directory rund makes carries the
//! extended attribute [`MARKER_XATTR`]: cgroupfs refuses regular files inside a cgroup directory
//! (EACCES/EPERM), but kernfs keeps `trusted.*` xattrs, which survive a rename. Its value says what
//! the directory is, so a directory without it is never touched.

use crate::sandbox_id::SandboxId;

/// The xattr on every cgroup directory rund made. `trusted.*` needs CAP_SYS_ADMIN to set or read,
/// so an unprivileged process cannot forge it.
pub const MARKER_XATTR: &str = "trusted.rund.cgroup-pool";

/// On a free slot's lead directory: the limits already written in it (a pre-limited slot), as
/// [`crate::resources::Limits::shape_key`]. Absent: the kernel's defaults. It describes the slot
/// only while it is free: every path that makes a slot free sets or removes it.
pub const SHAPE_XATTR: &str = "trusted.rund.cgroup-pool.limits";

const SLOT_PREFIX: &str = "pool-";
const RECYCLE_PREFIX: &str = "recycle-";
const SANDBOX_PREFIX: &str = "sandbox-";

/// What a marker says about its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// rund's parent directory itself (so `drain` only removes a parent rund made).
    Parent,
    /// A pool slot; the value is the slot's own name, kept across renames on v1.
    Slot(String),
    /// A cgroup made in a parent the platform dictated (pool bypass), for this sandbox.
    Bypass(SandboxId),
}

impl Marker {
    pub fn encode(&self) -> String {
        match self {
            Marker::Parent => "parent".to_string(),
            Marker::Slot(name) => format!("slot:{name}"),
            Marker::Bypass(id) => format!("bypass:{id}"),
        }
    }

    /// `None` for a value rund never writes: such a directory is treated as foreign.
    pub fn decode(value: &str) -> Option<Marker> {
        if value == "parent" {
            return Some(Marker::Parent);
        }
        if let Some(name) = value.strip_prefix("slot:") {
            return is_slot_name(name).then(|| Marker::Slot(name.to_string()));
        }
        if let Some(id) = value.strip_prefix("bypass:") {
            return SandboxId::parse(id).ok().map(Marker::Bypass);
        }
        None
    }
}

/// The name of a new slot: unique per (process, counter).
pub fn slot_name(pid: u32, seq: u64) -> String {
    format!("{SLOT_PREFIX}{pid}-{seq}")
}

pub fn is_slot_name(name: &str) -> bool {
    name.strip_prefix(SLOT_PREFIX).is_some_and(|rest| {
        let mut parts = rest.splitn(2, '-');
        let all_digits = |s: Option<&str>| {
            s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        };
        all_digits(parts.next()) && all_digits(parts.next())
    })
}

/// The name a released v1 slot carries until the refill has reset it (neither free nor held).
pub fn recycle_dir_name(slot: &str) -> String {
    format!("{RECYCLE_PREFIX}{slot}")
}

/// The slot a v1 directory name belongs to, if it is a slot waiting to be recycled.
pub fn slot_of_recycle_dir_name(name: &str) -> Option<&str> {
    name.strip_prefix(RECYCLE_PREFIX)
        .filter(|s| is_slot_name(s))
}

/// The name a held slot carries on cgroup v1.
pub fn sandbox_dir_name(id: &SandboxId) -> String {
    format!("{SANDBOX_PREFIX}{id}")
}

/// The sandbox a v1 directory name belongs to, if it is a held slot's name.
pub fn sandbox_of_dir_name(name: &str) -> Option<SandboxId> {
    name.strip_prefix(SANDBOX_PREFIX)
        .and_then(|id| SandboxId::parse(id).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_unknown_values_are_foreign() {
        let id = SandboxId::parse("abc").unwrap();
        for m in [
            Marker::Parent,
            Marker::Slot(slot_name(12, 3)),
            Marker::Bypass(id),
        ] {
            assert_eq!(Marker::decode(&m.encode()), Some(m));
        }
        assert_eq!(Marker::decode("slot:../x"), None);
        assert_eq!(Marker::decode("bypass:a/b"), None);
        assert_eq!(Marker::decode("something"), None);
    }

    #[test]
    fn slot_and_sandbox_names_are_disjoint() {
        assert!(is_slot_name("pool-1-2"));
        assert!(!is_slot_name("pool-1"));
        assert!(!is_slot_name("pool-a-2"));
        let id = SandboxId::parse("pool-1-2").unwrap();
        let dir = sandbox_dir_name(&id);
        assert!(!is_slot_name(&dir));
        assert_eq!(sandbox_of_dir_name(&dir), Some(id));
        assert_eq!(sandbox_of_dir_name("pool-1-2"), None);
        let r = recycle_dir_name("pool-1-2");
        assert!(!is_slot_name(&r));
        assert_eq!(sandbox_of_dir_name(&r), None);
        assert_eq!(slot_of_recycle_dir_name(&r), Some("pool-1-2"));
        assert_eq!(slot_of_recycle_dir_name("recycle-x"), None);
    }
}
