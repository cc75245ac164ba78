//! The device's part of a snapshot.
//!
//! What comes back: the guest CID (the guest's own address, which it keeps across the restore) and
//! the features. What does not: host connections. Their unix streams belong to the process that
//! took the snapshot, and a template is restored into many processes, so after a restore the VMM
//! sends a transport reset ([`Vsock::send_transport_reset`](super::Vsock::send_transport_reset))
//! and the guest drops its connections while its listening sockets survive. The socket path is not
//! part of the state either: every clone listens on its own.

use crate::devices::virtio::{DeviceStateError, QueueSnapshot};

/// The vsock device's state as read out.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// The guest CID (configuration space).
    pub guest_cid: u64,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the driver activated the device.
    pub activated: bool,
    /// The live queues (empty unless activated); the transport restores them.
    pub queues: Vec<QueueSnapshot>,
}

impl VsockState {
    /// Refuses a state saved from a device with another CID or other features.
    pub fn check_fits(&self, guest_cid: u64, avail_features: u64) -> Result<(), DeviceStateError> {
        if self.guest_cid != guest_cid {
            return Err(DeviceStateError::Mismatch(format!(
                "virtio-vsock had guest CID {}, this device has {guest_cid}",
                self.guest_cid
            )));
        }
        if self.avail_features != avail_features {
            return Err(DeviceStateError::Mismatch(format!(
                "virtio-vsock offered features {:#x}, this device offers {avail_features:#x}",
                self.avail_features
            )));
        }
        Ok(())
    }
}
