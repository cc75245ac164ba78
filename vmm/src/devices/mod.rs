//! Devices the guest reaches through port I/O and MMIO: the buses, the legacy serial console and
//! keyboard controller, and virtio over MMIO.

pub mod bus;
pub mod legacy;
pub mod virtio;
