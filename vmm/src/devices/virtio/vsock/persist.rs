//! The device's part of a snapshot.
//!
//! What comes back: the guest CID (the guest's own address, which it keeps across the restore) and
//! the features. What does not: host connections. Their unix streams belong to the process that
//! took the snapshot, and a template is restored into many processes, so after a restore of a
//! guest that had connections the VMM sends a transport reset
//! ([`Vsock::send_transport_reset`](super::Vsock::send_transport_reset)) and the guest drops them
//! while its listening sockets survive. A guest that had none (a template is quiesced) gets no
//! reset: it would race the first host connection and kill it. The socket path is not part of the
//! state either: every clone listens on its own.

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
    /// Connections the guest had as the device knew them (bridged, being set up, or owed an
    /// RST); `None` in a state written before the count was kept, which a restore treats as
    /// some.
    #[serde(default)]
    pub guest_connections: Option<u64>,
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
