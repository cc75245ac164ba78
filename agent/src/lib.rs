//! rund's guest agent: PID 1 of every sandbox microVM, serving the shim over ttrpc on vsock.
//!
//! See README.md beside this crate; the crate has no code yet.
