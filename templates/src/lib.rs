//! MicroVM templates: a VM booted once to the point where its agent answers, then snapshotted,
//! which sandboxes restore instead of booting, their RAM mapped copy-on-write from the
//! template's memory file.
//!
//! - [`key`]: what a template is made from ([`TemplateInputs`]: kernel, initramfs, VMM build,
//!   shape, device layout) and the [`TemplateKey`] they hash to;
//! - [`store`]: the templates of a host under one directory (`/run/rund/templates`, tmpfs):
//!   find, make once under a lock, list, remove, and drop the stale;
//! - [`memory_fs`]: that directory as a tmpfs of its own, bounded, with huge pages.
//!
//! Booting the source VM and quiescing it (an agent that answered, no share mounted, no
//! connection open) is the caller's part: it knows the agent.

pub mod key;
pub mod memory_fs;
pub mod store;

pub use key::{FileIdentity, TemplateInputs, TemplateKey};
pub use store::{Template, TemplateError, TemplateInfo, TemplateStore};
