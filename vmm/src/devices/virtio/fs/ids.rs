//! [`GuestIds`]: the host ids a guest's FUSE requests may act as on a share.
//!
//! Every FUSE request carries the uid and gid of the guest process that made it, and the
//! passthrough creates files as them on the host (and chowns to whatever SETATTR names). The
//! guest kernel writes those fields: one that lies would own files as any host user on a
//! read-write share. So the host decides which ids count: those the pod's own processes run as,
//! told by whoever starts them (the shim, from each container's and exec's OCI user), or any id
//! once one of them runs as root, since root in a container without a user namespace acts as
//! any user on its volumes under runc too.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, RwLock};

use super::filesystem::eperm;

/// The most distinct uids (and, apart, gids) a pod's processes may name; a spec's supplementary
/// groups are the pod author's list, so even this set has a bound.
pub const MAX_IDS: usize = 4096;

#[derive(Debug, Default)]
struct Allowed {
    any: bool,
    uids: BTreeSet<u32>,
    gids: BTreeSet<u32>,
}

/// Which ids a guest may act as: shared by a sandbox's shares and its owner, who widens it as
/// processes start.
#[derive(Clone, Debug)]
pub struct GuestIds(Arc<RwLock<Allowed>>);

/// Why a process's ids were not added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a process names {count} distinct {what}s in all; a sandbox's shares take at most {MAX_IDS}"
)]
pub struct TooManyIds {
    /// `uid` or `gid`.
    pub what: &'static str,
    /// How many there would have been.
    pub count: usize,
}

impl GuestIds {
    /// Every id counts, as virtiofsd without id mapping trusts its guest: for a guest the
    /// host's user runs by hand (`rund-vmm`) or a test.
    pub fn any() -> GuestIds {
        GuestIds(Arc::new(RwLock::new(Allowed {
            any: true,
            ..Allowed::default()
        })))
    }

    /// No id counts until a process is allowed: a sandbox before its first container.
    pub fn none() -> GuestIds {
        GuestIds(Arc::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Allowed> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the ids of a process running as `uid`:`gid` with supplementary `groups`; a
    /// process running as root makes every id count.
    pub fn allow_process(&self, uid: u32, gid: u32, groups: &[u32]) -> Result<(), TooManyIds> {
        let mut a = self.0.write().unwrap_or_else(|e| e.into_inner());
        if a.any {
            return Ok(());
        }
        if uid == 0 {
            a.any = true;
            a.uids.clear();
            a.gids.clear();
            return Ok(());
        }
        let new_gids: BTreeSet<u32> = std::iter::once(gid)
            .chain(groups.iter().copied())
            .filter(|g| !a.gids.contains(g))
            .collect();
        let uids = a.uids.len() + usize::from(!a.uids.contains(&uid));
        if uids > MAX_IDS {
            return Err(TooManyIds {
                what: "uid",
                count: uids,
            });
        }
        let gids = a.gids.len() + new_gids.len();
        if gids > MAX_IDS {
            return Err(TooManyIds {
                what: "gid",
                count: gids,
            });
        }
        a.uids.insert(uid);
        a.gids.extend(new_gids);
        Ok(())
    }

    /// Whether the guest may make or own files as `uid`.
    pub fn allows_uid(&self, uid: u32) -> bool {
        let a = self.read();
        a.any || a.uids.contains(&uid)
    }

    /// Whether the guest may make or own files as group `gid`.
    pub fn allows_gid(&self, gid: u32) -> bool {
        let a = self.read();
        a.any || a.gids.contains(&gid)
    }

    /// `EPERM` unless a request made as `uid`:`gid` may create a file.
    pub fn check(&self, uid: u32, gid: u32) -> io::Result<()> {
        if self.allows_uid(uid) && self.allows_gid(gid) {
            Ok(())
        } else {
            Err(eperm())
        }
    }
}

/// Two handles are equal when they are the same policy (one sandbox's shares share one).
impl PartialEq for GuestIds {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for GuestIds {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pods_ids_count_until_one_runs_as_root() {
        let ids = GuestIds::none();
        assert!(!ids.allows_uid(0) && !ids.allows_gid(0));
        assert_eq!(
            ids.check(1000, 1000).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );

        ids.allow_process(1000, 1000, &[10, 20]).unwrap();
        let same = ids.clone();
        assert!(same.allows_uid(1000) && same.allows_gid(20) && same.allows_gid(1000));
        same.check(1000, 10).unwrap();
        assert!(!same.allows_uid(0), "a guest claiming root is not root");
        assert!(!same.allows_uid(1001) && !same.allows_gid(30));
        assert!(same.check(0, 0).is_err() && same.check(1000, 0).is_err());

        ids.allow_process(0, 0, &[]).unwrap();
        assert!(same.allows_uid(0) && same.allows_uid(4242) && same.allows_gid(7));
        assert_eq!(same, ids);
        assert_ne!(same, GuestIds::any());
        assert!(GuestIds::any().allows_uid(0));
    }

    #[test]
    fn a_spec_cannot_grow_the_set_without_bound() {
        let ids = GuestIds::none();
        let groups: Vec<u32> = (1..MAX_IDS as u32).collect();
        ids.allow_process(5000, 5000, &groups).unwrap();
        let e = ids.allow_process(5000, 5000, &[90_000]).unwrap_err();
        assert_eq!(
            e,
            TooManyIds {
                what: "gid",
                count: MAX_IDS + 1
            }
        );
        assert!(!ids.allows_gid(90_000), "a refused process adds nothing");
        for uid in 6000..6000 + MAX_IDS as u32 - 1 {
            ids.allow_process(uid, 5000, &[]).unwrap();
        }
        assert_eq!(ids.allow_process(1, 5000, &[]).unwrap_err().what, "uid");
        assert!(!ids.allows_uid(1));
    }
}
