//! Host side of a sandbox's root filesystem: read-only layers over virtio-fs, a volatile writable
//! ext4 layer over virtio-blk.
//!
//! The shim makes one [`WritableLayer`] per process (from `writable_layer.dir` and `.size_mib`)
//! and one [`SandboxRootfs`] per sandbox, under `/run/rund/<sandbox-id>/`:
//! - [`SandboxRootfs::create`]: the two virtio-fs share directories (`share-ro`, `share-rw`) and the
//!   sandbox's writable image, a reflink copy of a pre-formatted ext4 image;
//! - [`SandboxRootfs::add_container`]: a container's image layers, bind-mounted read-only into
//!   `share-ro`; the guest overlays them under an upper directory on the ext4 device;
//! - [`SandboxRootfs::add_volume`]: OCI bind mounts, into `share-ro` or `share-rw`;
//! - [`SandboxRootfs::remove_container`], [`SandboxRootfs::destroy`]: undo;
//! - [`SandboxRootfs::cleanup`]: undo from the on-disk record alone, after the shim was killed.
//!
//! Needs root and Linux 5.12 (`mount_setattr`). See docs/rootfs-split.md.

mod bind;
mod copy;
mod id;
mod image;
pub mod mountinfo;
mod record;
mod sandbox;
mod spec;
mod undo;

pub use bind::MountError;
pub use copy::CopyMethod;
pub use id::{check_id, InvalidId, MAX_ID_LEN};
pub use image::{
    reflink_supported, BaseImage, ImageError, WritableLayer, MIN_SIZE_MIB, SANDBOXES_DIR,
};
pub use record::{RecordError, Share, RECORD_FILE};
pub use sandbox::{ContainerRootfs, RootfsError, SandboxRootfs, SharePath};
pub use spec::{lower_layers, MountSpecError, RootfsMount};
pub use undo::UndoError;
