//! The pool: hands pre-made cgroups to sandboxes without a mkdir, takes them back, and falls back
//! to making one (dry pool) or to the platform's parent (dictated `cgroupsPath`, a bypass).
//!
//! Claims are atomic across processes (one shim per pod shares one pool): on v1 a slot is claimed
//! by renaming its directory in the lead hierarchy (kernfs refuses a rename onto an existing name
//! and a rename of a missing one, so exactly one claimant wins); on v2 by an O_EXCL claim file in
//! the state directory. The in-memory free list is only a hint of what is on disk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use oci_spec::runtime::LinuxResources;

use crate::cgroupfs::{self, CgroupFsError};
use crate::config::{self, ConfigError, PoolConfig, Recycle, V1Claim};
use crate::dictated::{self, DictatedError, MadeParents};
use crate::handle::{log_ignored, SandboxCgroup};
use crate::hierarchy::{CgroupDirs, CgroupVersion, Hierarchy, HierarchyError};
use crate::limits::{self, copy_cpuset_from_parent, LimitsError, WriteCount};
use crate::naming::{self, Marker};
use crate::parent::{self, Parent, ParentError};
use crate::reconcile::{self, ReconcileReport};
use crate::resources::{Limits, ResourceError};
use crate::sandbox_id::SandboxId;
use crate::slots::{self, SlotError, SlotSetup};
use crate::state::{Placement, SandboxRecord, StateDir, StateError, RECYCLE_HOLDER, TRIM_HOLDER};

/// How many released slots may wait for the refill thread. Past that the refill is not keeping up
/// (it is one thread among the sandboxes' threads) and `release` recycles its slot itself: the
/// releasing thread, not the next acquire, pays for the backlog.
const RECYCLE_BACKLOG: usize = 8;

/// How many stale free-list entries an acquire skips before giving up (each skip means another
/// process claimed that slot first).
const MAX_CLAIM_ATTEMPTS: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("bad cgroup pool setting: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Hierarchy(#[from] HierarchyError),
    #[error(transparent)]
    Parent(#[from] ParentError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("bad sandbox resources: {0}")]
    Resources(#[from] ResourceError),
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error(transparent)]
    CgroupFs(#[from] CgroupFsError),
    #[error("sandbox {0} already holds a cgroup")]
    AlreadyHeld(SandboxId),
    #[error("sandbox {0} holds no cgroup (no record in rund's state)")]
    NotHeld(SandboxId),
    #[error("sandbox {id}'s cgroup still has {count} task(s) (thread {example} among them); stop them before releasing it")]
    Busy {
        id: SandboxId,
        count: usize,
        example: u32,
    },
    #[error(transparent)]
    Dictated(#[from] DictatedError),
    #[error("cgroup {path} already exists; rund will not take over a cgroup it did not make")]
    DictatedExists { path: PathBuf },
    #[error("sandbox {id}'s cgroup is a {found} cgroup but this pool uses {pool}")]
    WrongVersion {
        id: SandboxId,
        found: CgroupVersion,
        pool: CgroupVersion,
    },
    #[error("gave up claiming a pool slot after {0} attempts: other processes kept taking them")]
    Contended(usize),
}

/// Counters since the pool started (this process only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Free slots this process knows of.
    pub free: usize,
    /// Acquires served from the pool (no mkdir).
    pub acquired_from_pool: u64,
    /// Acquires that found the pool dry and made a cgroup on the spot.
    pub fallback_created: u64,
    /// Acquires in a platform-dictated parent.
    pub bypassed: u64,
    pub released: u64,
    /// Slots made by the refill (fallbacks not counted).
    pub slots_created: u64,
    /// Slots removed by the refill because releases overfilled the pool.
    pub slots_trimmed: u64,
    /// Released slots waiting for the refill to recycle them (this process's).
    pub recycling: usize,
    /// Released slots reset and returned to the pool (inline or by the refill).
    pub recycled: u64,
    /// Acquires served by a slot already pre-limited with the asked shape: no limit file read
    /// or written.
    pub prelimited_hits: u64,
    /// Limit files acquires wrote, and left alone because they already held the value.
    pub limit_writes: u64,
    pub limit_writes_skipped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    acquired_from_pool: AtomicU64,
    fallback_created: AtomicU64,
    bypassed: AtomicU64,
    released: AtomicU64,
    slots_created: AtomicU64,
    slots_trimmed: AtomicU64,
    recycled: AtomicU64,
    prelimited_hits: AtomicU64,
    limit_writes: AtomicU64,
    limit_writes_skipped: AtomicU64,
}

/// What the pool shares with its refill thread.
#[derive(Debug)]
pub(crate) struct PoolCore {
    pub(crate) hierarchy: Hierarchy,
    pub(crate) parent: Parent,
    pub(crate) state: StateDir,
    pub(crate) config: PoolConfig,
    free: Mutex<Vec<String>>,
    /// Wakes the refill thread (paired with `free`).
    pub(crate) wake: Condvar,
    pub(crate) stopping: AtomicBool,
    seq: AtomicU64,
    counters: Counters,
    /// Slots the last reconcile found with tasks in them: never handed out until a later
    /// reconcile finds them empty.
    pub(crate) quarantine: Mutex<BTreeSet<String>>,
    /// How new and recycled slots are prepared (default shape, v1 load balancing).
    pub(crate) setup: SlotSetup,
    /// Released slots (v1: renamed `recycle-<slot>`; v2: claimed by [`RECYCLE_HOLDER`]) that
    /// this process still has to reset and return. Lock order: `free` before this.
    recycling: Mutex<Vec<String>>,
    /// Set by a release that queued a slot, cleared by the refill when it starts a pass (a slot
    /// queued again because tasks are in it waits for the next interval, not a busy loop).
    pub(crate) recycle_wanted: AtomicBool,
    /// rund's parent directory in each hierarchy (in `hierarchy.mounts` order), held open for
    /// renames of its children.
    parent_dirs: Vec<cgroupfs::ParentDir>,
}

/// How a slot is claimed: by renaming it (v1's default: kernfs renames atomically, and the held
/// cgroup is named after its sandbox) or by an `O_EXCL` claim file in the state directory (v2,
/// where rename is refused, and v1 with [`V1Claim::File`]: no cgroup lock taken on acquire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotClaim {
    Rename,
    File,
}

/// Where a dictated cgroup goes: `cgroup` and its `parent`, relative to each mount point, and the
/// v2 controllers its limits need.
struct Place<'a> {
    cgroup: &'a Path,
    parent: &'a Path,
    needed: Vec<&'static str>,
}

impl Place<'_> {
    fn prepare(&self, hierarchy: &Hierarchy, made: &mut MadeParents) -> Result<Parent, PoolError> {
        Ok(dictated::prepare(
            hierarchy,
            self.parent,
            self.cgroup,
            &self.needed,
            made,
        )?)
    }
}

/// How one recycle went.
enum Recycled {
    Done,
    /// Tasks are in it: left out of the pool, tried again later.
    Busy,
    /// No longer ours (a reconcile reclaimed it): dropped from the queue.
    Gone,
}

/// How a claim on one slot went.
enum Claim {
    Won(CgroupDirs),
    /// Someone else has it (or it is gone): try another.
    Lost,
    /// The sandbox already has a cgroup under its name.
    AlreadyHeld,
}

/// A pool of pre-made cgroups under rund's parent. Dropping it stops the refill thread; the
/// cgroups stay (a restarted process adopts them, see [`CgroupPool::reconcile`]).
#[derive(Debug)]
pub struct CgroupPool {
    core: Arc<PoolCore>,
    refill: Option<JoinHandle<()>>,
}

impl CgroupPool {
    /// Finds the hierarchy, makes rund's parent, reconciles what a previous process left (see
    /// [`CgroupPool::reconcile`]; `is_alive` says whether a sandbox still exists), fills the pool
    /// to its low watermark and starts the refill.
    pub fn start(
        config: PoolConfig,
        is_alive: &dyn Fn(&SandboxId) -> bool,
    ) -> Result<(CgroupPool, ReconcileReport), PoolError> {
        let relative = config.validate()?;
        let hierarchy = Hierarchy::resolve(config.version, config.mounts.as_deref())?;
        let parent = parent::prepare_owned(&hierarchy, &relative)?;
        let state = StateDir::open(&config.state_dir)?;
        let shape = match &config.default_shape {
            Some(res) => {
                let limits = Limits::from_oci(res, hierarchy.version)?;
                let dir = hierarchy.mounts[0].mount_point.join(&parent.relative);
                check_controllers(&hierarchy, &dir, &limits, &parent.child_controllers)?;
                Some(limits)
            }
            None => None,
        };
        let setup = SlotSetup {
            shape,
            v1_no_load_balance: v1_root_balances_load(&hierarchy),
        };
        let parent_dirs = parent
            .dirs(&hierarchy)
            .iter()
            .map(|d| cgroupfs::ParentDir::open(d))
            .collect::<Result<Vec<_>, _>>()?;
        let core = Arc::new(PoolCore {
            hierarchy,
            parent,
            state,
            free: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stopping: AtomicBool::new(false),
            // Slot names are pool-<pid>-<seq>. A held v1 slot is named sandbox-<id> but keeps
            // its slot name in its marker and gets it back on release, so a new name must not
            // repeat an old one even when a pid is reused: start the counter at the clock.
            seq: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64),
            ),
            counters: Counters::default(),
            quarantine: Mutex::new(BTreeSet::new()),
            setup,
            recycling: Mutex::new(Vec::new()),
            recycle_wanted: AtomicBool::new(false),
            parent_dirs,
            config,
        });
        let report = reconcile::reconcile(&core, is_alive)?;
        core.rescan()?;
        core.fill_to(core.config.low_watermark)?;
        let refill = if core.config.background_refill {
            let c = Arc::clone(&core);
            Some(
                std::thread::Builder::new()
                    .name("cgroup-pool-refill".into())
                    .spawn(move || crate::refill::run(c))
                    .map_err(|source| StateError::Dir {
                        path: PathBuf::from("(refill thread)"),
                        source,
                    })?,
            )
        } else {
            None
        };
        log::info!(
            "cgroup-pool: {} pool under {} ({} free)",
            core.hierarchy.version,
            core.parent.relative.display(),
            core.free_count()
        );
        Ok((CgroupPool { core, refill }, report))
    }

    pub fn version(&self) -> CgroupVersion {
        self.core.hierarchy.version
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.core.hierarchy
    }

    /// rund's parent directory in each hierarchy.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.core.parent.dirs(&self.core.hierarchy)
    }

    pub fn state_dir(&self) -> &Path {
        self.core.state.root()
    }

    pub fn stats(&self) -> PoolStats {
        let c = &self.core.counters;
        PoolStats {
            free: self.core.free_count(),
            acquired_from_pool: c.acquired_from_pool.load(Ordering::Relaxed),
            fallback_created: c.fallback_created.load(Ordering::Relaxed),
            bypassed: c.bypassed.load(Ordering::Relaxed),
            released: c.released.load(Ordering::Relaxed),
            slots_created: c.slots_created.load(Ordering::Relaxed),
            slots_trimmed: c.slots_trimmed.load(Ordering::Relaxed),
            recycling: self.core.lock_recycling().len(),
            recycled: c.recycled.load(Ordering::Relaxed),
            prelimited_hits: c.prelimited_hits.load(Ordering::Relaxed),
            limit_writes: c.limit_writes.load(Ordering::Relaxed),
            limit_writes_skipped: c.limit_writes_skipped.load(Ordering::Relaxed),
        }
    }

    /// Takes a pooled cgroup for `id` (no mkdir: a rename on v1, a claim file on v2), applies
    /// `resources`, and records the holder. A dry pool makes one (counted, logged).
    pub fn acquire(
        &self,
        id: &SandboxId,
        resources: &LinuxResources,
    ) -> Result<SandboxCgroup, PoolError> {
        self.core.acquire(id, resources)
    }

    /// Makes `id`'s cgroup at the platform's `cgroups_path` (cgroupfs form, e.g.
    /// `/kubepods/burstable/pod<uid>/<id>`) instead of taking one from the pool, so the pod's
    /// accounting and limits stay right. Missing parents (containerd's `/k8s.io` for a pod
    /// without a cgroup parent) are made, and on v2 the controllers switched on down to it, as
    /// runc does; they stay the platform's (see [`crate::dictated`]). Counted as a bypass and
    /// logged.
    pub fn acquire_at(
        &self,
        id: &SandboxId,
        cgroups_path: &str,
        resources: &LinuxResources,
    ) -> Result<SandboxCgroup, PoolError> {
        self.core.acquire_at(id, cgroups_path, resources)
    }

    /// Gives `id`'s cgroup back: refused while it has tasks. A pool slot is reset (limits back to
    /// the default shape or the kernel's defaults, memory reclaimed) and returns to the pool
    /// (renamed back on v1), by the refill thread unless [`PoolConfig::recycle`] says otherwise;
    /// `id` is free for a new acquire as soon as this returns. A bypass cgroup is removed.
    pub fn release(&self, id: &SandboxId) -> Result<(), PoolError> {
        self.core.release(id)
    }

    /// `id`'s cgroup, from rund's state.
    pub fn find(&self, id: &SandboxId) -> Result<Option<SandboxCgroup>, PoolError> {
        let record = self.core.state.read_record(id)?;
        Ok(record.map(SandboxCgroup::new))
    }

    /// Recycles the released slots waiting for it, then tops the pool up to its high watermark,
    /// now, in this thread.
    pub fn refill_now(&self) -> Result<(), PoolError> {
        self.core.recycle_pending()?;
        self.core.rescan()?;
        self.core.fill_to(self.core.config.high_watermark)
    }

    /// Runs the crash recovery again (it runs at start): see [`crate::reconcile`].
    pub fn reconcile(
        &self,
        is_alive: &dyn Fn(&SandboxId) -> bool,
    ) -> Result<ReconcileReport, PoolError> {
        let report = reconcile::reconcile(&self.core, is_alive)?;
        self.core.rescan()?;
        Ok(report)
    }

    /// Stops the refill and removes every free slot, then rund's parent directories if they are
    /// empty and rund made them. Held cgroups are left alone (their parent then stays).
    pub fn drain(mut self) -> Result<(), PoolError> {
        self.stop_refill();
        // Released slots still waiting are recycled first, so that they are removed too (one
        // with tasks in it stays, and so does the parent).
        if let Err(e) = self.core.recycle_pending() {
            log::warn!("cgroup-pool: drain could not recycle every released slot: {e}");
        }
        let _lock = self.core.state.lock_exclusive()?;
        let mut free = slots::scan_free(&self.core.hierarchy, &self.core.parent, &self.core.state)?;
        {
            let quarantine = self
                .core
                .quarantine
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            free.retain(|s| !quarantine.contains(s));
        }
        for slot in free {
            self.core.remove_slot(&slot)?;
        }
        self.core.lock_free().clear();
        if let Some(e) = parent::remove_owned(&self.core.hierarchy, &self.core.parent.relative)
            .into_iter()
            .next()
        {
            return Err(e.into());
        }
        Ok(())
    }

    fn stop_refill(&mut self) {
        self.core.stopping.store(true, Ordering::SeqCst);
        self.core.wake.notify_all();
        if let Some(handle) = self.refill.take() {
            if handle.join().is_err() {
                log::error!("cgroup-pool: the refill thread panicked");
            }
        }
    }
}

impl Drop for CgroupPool {
    fn drop(&mut self) {
        self.stop_refill();
    }
}

impl PoolCore {
    pub(crate) fn lock_free(&self) -> MutexGuard<'_, Vec<String>> {
        // A panic while holding this lock cannot leave the Vec inconsistent: keep going.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn free_count(&self) -> usize {
        self.lock_free().len()
    }

    /// Renames the directory of a child of rund's parent in hierarchy `i` (the `i`-th of a
    /// [`CgroupDirs`] made by [`Parent::child_dirs`]).
    fn rename_child(&self, i: usize, from: &Path, to: &Path) -> Result<(), CgroupFsError> {
        match self.parent_dirs.get(i) {
            Some(parent) => parent.rename(from, to),
            None => cgroupfs::rename(from, to),
        }
    }

    pub(crate) fn slot_claim(&self) -> SlotClaim {
        match (self.hierarchy.version, self.config.v1_claim) {
            (CgroupVersion::V1, V1Claim::Rename) => SlotClaim::Rename,
            _ => SlotClaim::File,
        }
    }

    pub(crate) fn lock_recycling(&self) -> MutexGuard<'_, Vec<String>> {
        self.recycling.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recycles every released slot waiting for it; one with tasks stays queued for the next
    /// round. On an error the slot stays queued too, and the error is returned.
    pub(crate) fn recycle_pending(&self) -> Result<(), PoolError> {
        let mut busy = Vec::new();
        let mut result = Ok(());
        loop {
            let Some(slot) = self.lock_recycling().pop() else {
                break;
            };
            let outcome = self
                .state
                .lock_shared()
                .map_err(PoolError::from)
                .and_then(|_lock| self.recycle_locked(&slot));
            match outcome {
                Ok(Recycled::Done) | Ok(Recycled::Gone) => {}
                Ok(Recycled::Busy) => busy.push(slot),
                Err(e) => {
                    busy.push(slot);
                    result = Err(e);
                    break;
                }
            }
        }
        self.lock_recycling().extend(busy);
        result
    }

    /// Resets one released slot and returns it to the pool. The caller holds the state lock.
    fn recycle_locked(&self, slot: &str) -> Result<Recycled, PoolError> {
        let dirs = match self.slot_claim() {
            SlotClaim::Rename => self
                .parent
                .child_dirs(&self.hierarchy, &naming::recycle_dir_name(slot)),
            SlotClaim::File => {
                if !matches!(self.state.slot_holder(slot)?, Some(None)) {
                    return Ok(Recycled::Gone);
                }
                self.parent.child_dirs(&self.hierarchy, slot)
            }
        };
        if !dirs.dirs[0].path.exists() {
            if self.slot_claim() == SlotClaim::File {
                self.state.unclaim_slot(slot)?;
            }
            return Ok(Recycled::Gone);
        }
        match dirs.threads() {
            Ok(t) if t.is_empty() => {}
            Ok(t) => {
                log::warn!(
                    "cgroup-pool: released slot {slot} has {} task(s) again (thread {} among them); not recycled while they remain",
                    t.len(),
                    t[0]
                );
                return Ok(Recycled::Busy);
            }
            Err(e) => {
                log::warn!("cgroup-pool: released slot {slot} not recycled: {e}");
                return Ok(Recycled::Busy);
            }
        }
        self.setup.recycle(&dirs)?;
        match self.slot_claim() {
            SlotClaim::Rename => self.unclaim(slot, &dirs)?,
            SlotClaim::File => self.state.unclaim_slot(slot)?,
        }
        self.counters.recycled.fetch_add(1, Ordering::Relaxed);
        self.push_free(slot.to_string());
        Ok(Recycled::Done)
    }

    /// A dry pool with released slots waiting: recycle one here rather than make a cgroup on the
    /// start path. The caller holds the state lock. `Ok(true)`: a slot joined the free list.
    fn recycle_one_now(&self) -> Result<bool, PoolError> {
        let mut busy = Vec::new();
        let mut done = false;
        while let Some(slot) = self.lock_recycling().pop() {
            match self.recycle_locked(&slot) {
                Ok(Recycled::Done) => {
                    done = true;
                    break;
                }
                Ok(Recycled::Gone) => {}
                Ok(Recycled::Busy) => busy.push(slot),
                Err(e) => {
                    busy.push(slot);
                    self.lock_recycling().extend(busy);
                    return Err(e);
                }
            }
        }
        self.lock_recycling().extend(busy);
        Ok(done)
    }

    /// Whether `release` leaves the reset to the refill.
    fn defer_recycle(&self) -> bool {
        match self.config.recycle {
            Recycle::Inline => false,
            Recycle::Refill => self.config.background_refill,
            Recycle::Deferred => true,
        }
    }

    fn next_slot_name(&self) -> String {
        naming::slot_name(std::process::id(), self.seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Makes a new slot. Names are unique per process, but a pid can be reused (or a process can
    /// start a second pool): a name already taken is skipped.
    fn make_slot(&self) -> Result<String, PoolError> {
        loop {
            let name = self.next_slot_name();
            match slots::create(&self.hierarchy, &self.parent, &name, &self.setup) {
                Ok(()) => return Ok(name),
                Err(SlotError::Make { source, .. })
                    if cgroupfs::is_already_exists(&source)
                        && matches!(source, CgroupFsError::Mkdir { .. }) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Replaces the free-list hint with what is on disk.
    pub(crate) fn rescan(&self) -> Result<(), PoolError> {
        let _lock = self.state.lock_shared()?;
        let mut on_disk = slots::scan_free(&self.hierarchy, &self.parent, &self.state)?;
        {
            let quarantine = self.quarantine.lock().unwrap_or_else(|p| p.into_inner());
            on_disk.retain(|s| !quarantine.contains(s));
        }
        *self.lock_free() = on_disk;
        Ok(())
    }

    /// Makes slots until `target` are free.
    pub(crate) fn fill_to(&self, target: usize) -> Result<(), PoolError> {
        while self.free_count() < target && !self.stopping.load(Ordering::Relaxed) {
            let _lock = self.state.lock_shared()?;
            let name = self.make_slot()?;
            self.counters.slots_created.fetch_add(1, Ordering::Relaxed);
            self.lock_free().push(name);
        }
        Ok(())
    }

    /// Removes free slots until at most `target` are free.
    pub(crate) fn trim_to(&self, target: usize) -> Result<(), PoolError> {
        loop {
            let slot = {
                let mut free = self.lock_free();
                if free.len() <= target {
                    return Ok(());
                }
                // The oldest entries first: the newest are the warmest to reuse.
                free.remove(0)
            };
            let _lock = self.state.lock_shared()?;
            if self.remove_slot(&slot)? {
                self.counters.slots_trimmed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Removes one free slot, owning it first (v1: the lead rmdir; v2: a claim).
    /// `Ok(false)`: another process had taken it.
    fn remove_slot(&self, slot: &str) -> Result<bool, PoolError> {
        match self.slot_claim() {
            SlotClaim::Rename => Ok(slots::remove(&self.hierarchy, &self.parent, slot)?),
            SlotClaim::File => {
                if !self.state.claim_slot(slot, TRIM_HOLDER)? {
                    return Ok(false);
                }
                let removed = slots::remove(&self.hierarchy, &self.parent, slot);
                self.state.unclaim_slot(slot)?;
                Ok(removed?)
            }
        }
    }

    /// Pops a free-slot hint; wakes the refill when the pool runs low.
    fn pop_free(&self) -> Option<String> {
        let mut free = self.lock_free();
        let slot = free.pop();
        if free.len() < self.config.low_watermark {
            self.wake.notify_one();
        }
        slot
    }

    fn push_free(&self, slot: String) {
        let mut free = self.lock_free();
        free.push(slot);
        if free.len() > self.config.high_watermark {
            self.wake.notify_one();
        }
    }

    /// The controllers a limit needs must exist before anything is claimed; `parent` (relative)
    /// is the cgroup whose children get `child_controllers` on v2.
    fn check_controllers(
        &self,
        limits: &Limits,
        parent: &Path,
        child_controllers: &[String],
    ) -> Result<(), PoolError> {
        let dir = self.hierarchy.mounts[0].mount_point.join(parent);
        check_controllers(&self.hierarchy, &dir, limits, child_controllers)
    }

    fn acquire(
        &self,
        id: &SandboxId,
        resources: &LinuxResources,
    ) -> Result<SandboxCgroup, PoolError> {
        let limits = Limits::from_oci(resources, self.hierarchy.version)?;
        self.check_controllers(
            &limits,
            &self.parent.relative,
            &self.parent.child_controllers,
        )?;
        log_ignored(id, &limits);
        let _lock = self.state.lock_shared()?;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let (slot, fallback) = match self.pop_free() {
                Some(slot) => (slot, false),
                None if self.recycle_one_now()? => continue,
                None => (self.make_fallback_slot()?, true),
            };
            let dirs = match self.claim(&slot, id)? {
                Claim::Won(dirs) => dirs,
                Claim::Lost => continue,
                Claim::AlreadyHeld => {
                    self.push_free(slot);
                    return Err(PoolError::AlreadyHeld(id.clone()));
                }
            };
            let record = SandboxRecord {
                sandbox_id: id.clone(),
                placement: Placement::Pool { slot: slot.clone() },
                dirs,
            };
            if let Err(e) = self.state.create_record(&record) {
                self.unclaim(&slot, &record.dirs)?;
                self.push_free(slot);
                return Err(match e {
                    StateError::AlreadyRecorded(id) => PoolError::AlreadyHeld(id),
                    e => e.into(),
                });
            }
            if let Err(e) = self.apply_to_claimed(&record.dirs, &limits) {
                // Put the slot back as it was; the limit error is what the caller needs to see.
                let _ = self.setup.recycle(&record.dirs);
                self.unclaim(&slot, &record.dirs)?;
                self.state.remove_record(id)?;
                self.push_free(slot);
                return Err(e);
            }
            if !fallback {
                self.counters
                    .acquired_from_pool
                    .fetch_add(1, Ordering::Relaxed);
            }
            return Ok(SandboxCgroup::new(record));
        }
        Err(PoolError::Contended(MAX_CLAIM_ATTEMPTS))
    }

    /// Brings a just-claimed slot to `limits`. A slot pre-limited with exactly these limits (its
    /// lead directory's shape key) needs nothing; a slot with another shape is reset first (the
    /// limits it carries that `limits` does not set go back to the defaults); then only the
    /// files that differ are written.
    fn apply_to_claimed(&self, dirs: &CgroupDirs, limits: &Limits) -> Result<(), PoolError> {
        let shape = cgroupfs::read_shape(&dirs.dirs[0].path)?;
        if shape.as_deref() == Some(limits.shape_key().as_str()) {
            self.counters
                .prelimited_hits
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let mut count = WriteCount::default();
        if shape.is_some() {
            count += limits::reset(dirs)?;
        }
        count += limits::apply_if_changed(dirs, limits)?;
        self.counters
            .limit_writes
            .fetch_add(count.written, Ordering::Relaxed);
        self.counters
            .limit_writes_skipped
            .fetch_add(count.skipped, Ordering::Relaxed);
        Ok(())
    }

    /// The pool is dry: make a slot on the start path (what the pool exists to avoid).
    fn make_fallback_slot(&self) -> Result<String, PoolError> {
        let name = self.make_slot()?;
        let n = self
            .counters
            .fallback_created
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        log::warn!(
            "cgroup-pool: pool dry, made cgroup {name} on the start path (fallback #{n}); raise the low watermark if this repeats"
        );
        self.wake.notify_one();
        Ok(name)
    }

    fn claim(&self, slot: &str, id: &SandboxId) -> Result<Claim, PoolError> {
        let dirs = self.parent.child_dirs(&self.hierarchy, slot);
        match self.slot_claim() {
            SlotClaim::Rename => {
                let target = naming::sandbox_dir_name(id);
                let renamed = dirs.renamed(&target);
                // The lead rename is the claim.
                if let Err(e) = self.rename_child(0, &dirs.dirs[0].path, &renamed.dirs[0].path) {
                    if cgroupfs::is_not_found(&e) {
                        return Ok(Claim::Lost);
                    }
                    if cgroupfs::is_already_exists(&e) {
                        return Ok(Claim::AlreadyHeld);
                    }
                    return Err(e.into());
                }
                for i in 1..dirs.dirs.len() {
                    if let Err(e) = self.rename_child(i, &dirs.dirs[i].path, &renamed.dirs[i].path)
                    {
                        // Undo in reverse, lead last (it publishes the slot as free again).
                        for j in (0..i).rev() {
                            let _ = self.rename_child(j, &renamed.dirs[j].path, &dirs.dirs[j].path);
                        }
                        return Err(e.into());
                    }
                }
                Ok(Claim::Won(renamed))
            }
            SlotClaim::File => {
                if !self.state.claim_slot(slot, id.as_str())? {
                    return Ok(Claim::Lost);
                }
                // A slot trimmed after our scan: its claim file is gone but so is the directory.
                if !dirs.dirs[0].path.exists() {
                    self.state.unclaim_slot(slot)?;
                    return Ok(Claim::Lost);
                }
                Ok(Claim::Won(dirs))
            }
        }
    }

    /// Returns a claimed slot to the free state: renames back on v1 (lead last), drops the claim
    /// on v2.
    pub(crate) fn unclaim(&self, slot: &str, held: &CgroupDirs) -> Result<(), PoolError> {
        match self.slot_claim() {
            SlotClaim::Rename => {
                let free = held.renamed(slot);
                for i in (1..held.dirs.len()).chain(std::iter::once(0)) {
                    self.rename_child(i, &held.dirs[i].path, &free.dirs[i].path)?;
                }
            }
            SlotClaim::File => self.state.unclaim_slot(slot)?,
        }
        Ok(())
    }

    fn acquire_at(
        &self,
        id: &SandboxId,
        cgroups_path: &str,
        resources: &LinuxResources,
    ) -> Result<SandboxCgroup, PoolError> {
        let relative = config::cgroup_relative_path(cgroups_path)?;
        let limits = Limits::from_oci(resources, self.hierarchy.version)?;
        let parent_rel = relative.parent().unwrap_or(Path::new("")).to_path_buf();
        if self.hierarchy.version == CgroupVersion::V1 {
            // On v1 the mounts alone say it: refuse before making anything.
            self.check_controllers(&limits, &parent_rel, &[])?;
        }
        log_ignored(id, &limits);
        let _lock = self.state.lock_shared()?;
        let mut made = MadeParents::default();
        let result = self.place_dictated(id, &relative, &parent_rel, &limits, &mut made);
        match result {
            Ok(cgroup) => {
                let n = self.counters.bypassed.fetch_add(1, Ordering::Relaxed) + 1;
                if !made.dirs().is_empty() {
                    log::info!(
                        "cgroup-pool: made the platform's parent cgroups {:?} for sandbox {id} (left in place on release, as runc does)",
                        made.dirs()
                    );
                }
                log::info!(
                    "cgroup-pool: sandbox {id} placed in the platform's cgroup {} (pool bypass #{n}); set rund's parent in the platform to use the pool",
                    relative.display()
                );
                Ok(cgroup)
            }
            Err(e) => {
                made.remove();
                Err(e)
            }
        }
    }

    /// Makes the dictated cgroup `relative` (its parents as runc would, in `made`), records it
    /// and applies `limits`. On an error the sandbox's cgroup and record are gone again; the
    /// caller takes back `made`.
    fn place_dictated(
        &self,
        id: &SandboxId,
        relative: &Path,
        parent_rel: &Path,
        limits: &Limits,
        made: &mut MadeParents,
    ) -> Result<SandboxCgroup, PoolError> {
        let place = Place {
            cgroup: relative,
            parent: parent_rel,
            needed: match self.hierarchy.version {
                CgroupVersion::V1 => Vec::new(),
                CgroupVersion::V2 => limits.controllers(),
            },
        };
        let parent = place.prepare(&self.hierarchy, made)?;
        if self.hierarchy.version == CgroupVersion::V2 {
            self.check_controllers(limits, parent_rel, &parent.child_controllers)?;
        }
        let dirs = self.hierarchy.dirs_of(relative, &parent.child_controllers);
        let record = SandboxRecord {
            sandbox_id: id.clone(),
            placement: Placement::Dictated {
                path: relative.to_path_buf(),
            },
            dirs,
        };
        self.state.create_record(&record).map_err(|e| match e {
            StateError::AlreadyRecorded(id) => PoolError::AlreadyHeld(id),
            e => e.into(),
        })?;
        let mut own = Vec::new();
        let result = self
            .make_dictated(id, &record.dirs, &place, made, &mut own)
            .and_then(|()| Ok(limits::apply(&record.dirs, limits)?));
        if let Err(e) = result {
            for dir in own.iter().rev() {
                if let Err(e) = cgroupfs::rmdir(dir) {
                    log::warn!("cgroup-pool: after a failed acquire: {e}");
                }
            }
            self.state.remove_record(id)?;
            return Err(e);
        }
        Ok(SandboxCgroup::new(record))
    }

    /// Makes the sandbox's own directories in the prepared parent (each one made goes in `own`),
    /// marked as its bypass cgroup.
    fn make_dictated(
        &self,
        id: &SandboxId,
        dirs: &CgroupDirs,
        place: &Place<'_>,
        made: &mut MadeParents,
        own: &mut Vec<PathBuf>,
    ) -> Result<(), PoolError> {
        for d in &dirs.dirs {
            let mut attempt = 1;
            loop {
                match cgroupfs::mkdir(&d.path) {
                    Ok(()) => {
                        own.push(d.path.clone());
                        break;
                    }
                    Err(e) if cgroupfs::is_already_exists(&e) => {
                        return Err(PoolError::DictatedExists {
                            path: d.path.clone(),
                        });
                    }
                    // The parent went since it was prepared (a failed acquire next door took
                    // back an empty ancestor it had made): make it again.
                    Err(e) if cgroupfs::is_not_found(&e) && attempt < dictated::MAX_ATTEMPTS => {
                        attempt += 1;
                        place.prepare(&self.hierarchy, made)?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            cgroupfs::set_marker(&d.path, &Marker::Bypass(id.clone()))?;
            if self.hierarchy.version == CgroupVersion::V1
                && d.controllers.iter().any(|c| c == "cpuset")
            {
                copy_cpuset_from_parent(&d.path)?;
            }
        }
        Ok(())
    }

    fn release(&self, id: &SandboxId) -> Result<(), PoolError> {
        let _lock = self.state.lock_shared()?;
        let record = self
            .state
            .read_record(id)?
            .ok_or_else(|| PoolError::NotHeld(id.clone()))?;
        if record.version() != self.hierarchy.version {
            return Err(PoolError::WrongVersion {
                id: id.clone(),
                found: record.version(),
                pool: self.hierarchy.version,
            });
        }
        let threads = record.dirs.threads()?;
        if let Some(&example) = threads.first() {
            return Err(PoolError::Busy {
                id: id.clone(),
                count: threads.len(),
                example,
            });
        }
        match &record.placement {
            Placement::Pool { slot }
                if self.defer_recycle()
                    && (self.config.recycle == Recycle::Deferred
                        || self.lock_recycling().len() < RECYCLE_BACKLOG) =>
            {
                // Out of the sandbox's name (and record) now, reset later by the refill. A crash
                // in between leaves a `recycle-` slot (v1) or a claim of nobody's (v2): reconcile
                // resets and frees it.
                match self.slot_claim() {
                    SlotClaim::Rename => {
                        let parked = record.dirs.renamed(&naming::recycle_dir_name(slot));
                        for i in (1..record.dirs.dirs.len()).chain(std::iter::once(0)) {
                            self.rename_child(i, &record.dirs.dirs[i].path, &parked.dirs[i].path)?;
                        }
                        self.state.remove_record(id)?;
                    }
                    SlotClaim::File => {
                        self.state.reassign_slot(slot, RECYCLE_HOLDER)?;
                        self.state.remove_record(id)?;
                    }
                }
                self.lock_recycling().push(slot.clone());
                self.recycle_wanted.store(true, Ordering::SeqCst);
                // Under the free-list lock, so the refill cannot miss it between its check and
                // its wait.
                let _free = self.lock_free();
                self.wake.notify_one();
            }
            Placement::Pool { slot } => {
                self.setup.recycle(&record.dirs)?;
                match self.slot_claim() {
                    // Rename back first, then drop the record: a crash in between leaves a
                    // free slot and a stale record, which reconcile removes.
                    SlotClaim::Rename => {
                        self.unclaim(slot, &record.dirs)?;
                        self.state.remove_record(id)?;
                    }
                    // Drop the record first, then the claim: a crash in between leaves a
                    // claim without record, which reconcile frees.
                    SlotClaim::File => {
                        self.state.remove_record(id)?;
                        self.unclaim(slot, &record.dirs)?;
                    }
                }
                self.counters.recycled.fetch_add(1, Ordering::Relaxed);
                self.push_free(slot.clone());
            }
            Placement::Dictated { .. } => {
                for d in record.dirs.dirs.iter().rev() {
                    match cgroupfs::rmdir(&d.path) {
                        Ok(()) => {}
                        Err(e) if cgroupfs::is_not_found(&e) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.state.remove_record(id)?;
            }
        }
        self.counters.released.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The controllers a limit needs must exist before anything is claimed. `parent_dir` is the
/// cgroup whose `cgroup.subtree_control` gave `child_controllers` (v2), named in the error.
fn check_controllers(
    hierarchy: &Hierarchy,
    parent_dir: &Path,
    limits: &Limits,
    child_controllers: &[String],
) -> Result<(), PoolError> {
    for controller in limits.controllers() {
        let available = match hierarchy.version {
            CgroupVersion::V1 => hierarchy
                .mounts
                .iter()
                .any(|m| m.controllers.iter().any(|c| c == controller)),
            CgroupVersion::V2 => child_controllers.iter().any(|c| c == controller),
        };
        if !available {
            return Err(LimitsError::MissingController {
                controller,
                version: hierarchy.version,
                path: parent_dir.to_path_buf(),
            }
            .into());
        }
    }
    Ok(())
}

/// v1: whether the root cpuset balances load over all CPUs (the usual case), which makes the
/// `cpuset.sched_load_balance` flag of the pool's slots irrelevant to the scheduler domains, so
/// they can switch it off (see [`limits::disable_load_balance`]). Unreadable: no.
fn v1_root_balances_load(hierarchy: &Hierarchy) -> bool {
    hierarchy.version == CgroupVersion::V1
        && hierarchy
            .mounts
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == "cpuset"))
            .and_then(|m| {
                cgroupfs::read_to_string(&m.mount_point.join("cpuset.sched_load_balance")).ok()
            })
            .is_some_and(|v| v.trim() == "1")
}
