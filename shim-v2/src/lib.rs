//! `containerd-shim-rund-v2` and the `rund` admin CLI: one shim process per pod, with the pod's
//! microVM running inside it. This library holds what both binaries share.

pub mod admin;
pub mod config;
pub mod shim;
