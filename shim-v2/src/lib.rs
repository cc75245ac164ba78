//! containerd-shim-rund-v2 (one shim and one microVM per pod, VMM in-process) and the rund admin CLI.
//!
//! See README.md beside this crate; the crate has no code yet.
