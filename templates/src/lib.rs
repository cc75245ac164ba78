//! MicroVM templates: boot once, snapshot, restore sandboxes with copy-on-write memory.
//!
//! See README.md beside this crate; the crate has no code yet.
