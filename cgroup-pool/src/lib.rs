//! Pre-made cgroups handed to sandboxes without a mkdir on the start path.
//!
//! RunD (USENIX ATC'22) measured that making and configuring a cgroup per sandbox serialises on
//! the kernel's cgroup locks under concurrency; it keeps cgroups made ahead of time and hands one
//! out by renaming it. This crate does that for rund:
//!
//! - cgroup v1: a slot `pool-<pid>-<n>` exists under rund's parent in every controller hierarchy;
//!   [`CgroupPool::acquire`] renames it to `sandbox-<id>` (rename works within one parent on v1);
//! - cgroup v2 refuses rename (EPERM): the slot keeps its name, and the holder is recorded in the
//!   state directory (an O_EXCL claim file plus a per-sandbox record); a v1 pool can claim that
//!   way too ([`V1Claim::File`]), so that an acquire takes no cgroup lock;
//! - slots can be kept pre-limited with a default resource shape ([`PoolConfig::default_shape`]):
//!   an acquire with that shape writes no limit file; other limits are written only where the
//!   file does not already hold the value;
//! - either way the sandbox's OCI `LinuxResources` are applied, and [`SandboxCgroup`] attaches
//!   processes and threads; [`CgroupPool::release`] refuses while tasks remain, and the
//!   refill thread resets the limits, reclaims memory and returns the slot;
//! - a background refill keeps the pool between two watermarks; a dry pool makes a cgroup on the
//!   spot (counted); a platform-dictated parent (Kubernetes' `cgroupsPath`) gets a cgroup made
//!   there ([`CgroupPool::acquire_at`], counted as a bypass), its missing parents made and its
//!   controllers switched on as runc does ([`dictated`]);
//! - on start, [`reconcile`] adopts or reclaims what a crashed process left, and never touches a
//!   cgroup with tasks or one rund did not make (marked with a `trusted.` xattr).
//!
//! See docs/cgroup-pool.md for the design, the platform settings and the measurements.

pub mod cgroupfs;
pub mod config;
pub mod dictated;
pub mod handle;
pub mod hierarchy;
pub mod limits;
pub mod mountinfo;
pub mod naming;
pub mod parent;
pub mod pool;
pub mod reconcile;
mod refill;
pub mod resources;
pub mod sandbox_id;
pub mod slots;
pub mod state;

pub use config::{PoolConfig, Recycle, V1Claim};
pub use handle::{HandleError, SandboxCgroup};
pub use hierarchy::{CgroupVersion, Hierarchy};
pub use pool::{CgroupPool, PoolError, PoolStats};
pub use reconcile::ReconcileReport;
pub use resources::cpu_shares_to_weight;
pub use sandbox_id::{InvalidSandboxId, SandboxId};
pub use state::Placement;

/// Re-exported so callers pass the spec's value straight in.
pub use oci_spec::runtime::LinuxResources;
