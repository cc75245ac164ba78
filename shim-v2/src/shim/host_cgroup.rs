//! The sandbox's cgroup on the host: taken from the pool (or made in the platform's parent), the
//! whole shim process (VMM and vCPU threads included) moved in, and on teardown moved back where
//! it came from so that the cgroup is empty when it is given back.

use std::path::{Path, PathBuf};

use cgroup_pool::{CgroupPool, CgroupVersion, LinuxResources, SandboxCgroup, SandboxId};
use log::{info, warn};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    #[error("sandbox id {0:?}: {1}")]
    Id(String, cgroup_pool::InvalidSandboxId),
    #[error("the cgroup pool: {0}")]
    Pool(#[from] cgroup_pool::PoolError),
    #[error("moving the shim into the sandbox's cgroup: {0}")]
    Attach(#[from] cgroup_pool::HandleError),
    #[error("reading /proc/self/cgroup: {0}")]
    Home(std::io::Error),
}

/// Where this process lived before it moved into the sandbox's cgroup: one directory per
/// hierarchy it will be moved back into.
#[derive(Debug)]
struct Home {
    dirs: Vec<PathBuf>,
}

impl Home {
    /// Reads `/proc/self/cgroup` and maps each line to the mount point of its hierarchy.
    fn of_this_process(pool: &CgroupPool) -> Result<Home, HostCgroupError> {
        let text = std::fs::read_to_string("/proc/self/cgroup").map_err(HostCgroupError::Home)?;
        let hierarchy = pool.hierarchy();
        let mut dirs = Vec::new();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                _ => continue,
            };
            let rel = path.trim_start_matches('/');
            let mount = match hierarchy.version {
                CgroupVersion::V2 if controllers.is_empty() => hierarchy.mounts.first(),
                CgroupVersion::V1 if !controllers.is_empty() => {
                    let names: Vec<&str> = controllers.split(',').collect();
                    hierarchy
                        .mounts
                        .iter()
                        .find(|m| m.controllers.iter().any(|c| names.contains(&c.as_str())))
                }
                _ => None,
            };
            if let Some(m) = mount {
                dirs.push(m.mount_point.join(rel));
            }
        }
        Ok(Home { dirs })
    }

    fn return_to(&self) {
        let pid = std::process::id().to_string();
        for dir in &self.dirs {
            if let Err(e) = std::fs::write(dir.join("cgroup.procs"), &pid) {
                warn!("moving the shim back to {}: {e}", dir.display());
            }
        }
    }
}

fn reconciled_something(r: &cgroup_pool::ReconcileReport) -> bool {
    !(r.reclaimed.is_empty() && r.recycled.is_empty() && r.removed_broken.is_empty())
}

/// The sandbox's host cgroup, held for the sandbox's life.
pub struct HostCgroup {
    pool: CgroupPool,
    id: SandboxId,
    cgroup: SandboxCgroup,
    home: Home,
}

/// The host limits of a sandbox: the pod's CPU limits as they are, its memory limit raised by
/// what the VMM itself needs besides guest RAM.
pub fn host_resources(pod: Option<&LinuxResources>, guest_memory_mib: u32) -> LinuxResources {
    let mut res = pod.cloned().unwrap_or_default();
    if let Some(mut mem) = *res.memory() {
        if mem.limit().is_some_and(|l| l > 0) {
            // Guest RAM plus the shim and VMM's own 64 MiB.
            let limit = (i64::from(guest_memory_mib) + 64) << 20;
            mem.set_limit(Some(limit));
            mem.set_swap(None);
            mem.set_reservation(None);
        }
        res.set_memory(Some(mem));
    }
    res.set_devices(None);
    res
}

impl HostCgroup {
    /// Takes the sandbox's cgroup and moves this process into it. `dictated_parent` is the
    /// platform's `cgroupsPath` (a CRI pod sandbox): the cgroup is then made there.
    pub fn acquire(
        config: &Config,
        sandbox_id: &str,
        dictated_parent: Option<&str>,
        resources: &LinuxResources,
    ) -> Result<HostCgroup, HostCgroupError> {
        let id = SandboxId::parse(sandbox_id)
            .map_err(|e| HostCgroupError::Id(sandbox_id.to_owned(), e))?;
        let run_dir = config.paths.run_dir.clone();
        let pool_config = cgroup_pool::PoolConfig {
            // One shim per sandbox: a refill thread per shim would race the others for nothing;
            // the pool is topped up after the sandbox has started (see `refill`).
            background_refill: false,
            // Filling happens after the sandbox runs (`refill`): a dry pool costs this start one
            // mkdir, not a whole fill.
            low_watermark: 0,
            ..config.pool_config()
        };
        let alive = |sid: &SandboxId| crate::shim::record::sandbox_alive(&run_dir, sid.as_str());
        let (pool, report) = CgroupPool::start(pool_config, &alive)?;
        if reconciled_something(&report) {
            info!("cgroup pool reconciled: {report:?}");
        }
        let home = Home::of_this_process(&pool)?;
        let cgroup = match dictated_parent {
            Some(parent) => pool.acquire_at(&id, parent, resources)?,
            None => pool.acquire(&id, resources)?,
        };
        let held = HostCgroup {
            pool,
            id,
            cgroup,
            home,
        };
        if let Err(e) = held.cgroup.attach_process(std::process::id()) {
            held.release();
            return Err(e.into());
        }
        Ok(held)
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.cgroup.paths()
    }

    /// The cgroup directories this process lived in before the sandbox's (containerd's): where
    /// work of the node's rather than the sandbox's goes (a template maker).
    pub fn home_dirs(&self) -> &[PathBuf] {
        &self.home.dirs
    }

    /// Tops the pool up again, off the start path.
    pub fn refill(&self) {
        if let Err(e) = self.pool.refill_now() {
            warn!("refilling the cgroup pool: {e}");
        }
    }

    /// Moves this process out and gives the cgroup back.
    pub fn release(self) {
        self.home.return_to();
        if let Err(e) = self.pool.release(&self.id) {
            warn!("releasing the cgroup of sandbox {}: {e}", self.id.as_str());
        }
    }
}

/// After a shim was killed: reclaims the cgroups of sandboxes whose shim is gone (the pool's
/// reconcile does exactly that, and never touches one with tasks or one rund did not make).
pub fn reclaim_dead(config: &Config, run_dir: &Path) -> Result<(), HostCgroupError> {
    let pool_config = cgroup_pool::PoolConfig {
        background_refill: false,
        low_watermark: 0,
        ..config.pool_config()
    };
    let alive = |sid: &SandboxId| crate::shim::record::sandbox_alive(run_dir, sid.as_str());
    let (_pool, report) = CgroupPool::start(pool_config, &alive)?;
    if reconciled_something(&report) {
        info!("cgroup pool reconciled after a dead shim: {report:?}");
    }
    Ok(())
}
