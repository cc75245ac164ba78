//! Host side of a sandbox's root filesystem: read-only layers over virtio-fs, a volatile writable ext4 layer over virtio-blk.
//!
//! See README.md beside this crate; the crate has no code yet.
