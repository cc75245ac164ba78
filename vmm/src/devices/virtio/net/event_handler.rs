//! Event-loop glue. Besides what [`VirtioCommon`](crate::devices::virtio::VirtioCommon) registers
//! (the control eventfd, the queue notifiers while active and served here), the device registers
//! vhost's call eventfds on the vhost path, or else its tap, edge-triggered: a frame that waits for buffers must not wake the loop again and again, and
//! [`Net::process_rx`] reads the tap until it is empty or the buffers run out, so a new edge
//! comes with each new frame after that.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::os::unix::io::AsRawFd;

use super::device::{DataPath, Net};
use super::{RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::QueueEvent;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        // With vhost the kernel reads the tap; the VMM thread only hears vhost's calls.
        if self.data_path() == DataPath::Vhost {
            for call in self.calls() {
                if let Err(e) = ops.add(Events::new(call, EventSet::IN)) {
                    crate::guest_error!("virtio-net: cannot register a vhost call eventfd: {e:?}");
                }
            }
        } else {
            self.register_tap(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if let Some(call) = self.calls().iter().find(|c| c.as_raw_fd() == events.fd()) {
            let _ = call.read();
            // vhost moved a used ring: on MMIO the driver wants the status bit first.
            if let Some(active) = self.common.active() {
                active.signal_used_ring();
            }
            return;
        }
        if self.tap().is_some_and(|t| t.as_raw_fd() == events.fd()) {
            self.process_rx();
            return;
        }
        match self.common.process(&events, ops) {
            QueueEvent::Activated if self.on_vhost() => {}
            QueueEvent::Activated => {
                // vhost failed at this activation: the tap is the VMM thread's after all.
                self.register_tap(ops);
                self.process_tx();
                self.process_rx();
            }
            QueueEvent::Notified(RX_QUEUE) => self.process_rx(),
            QueueEvent::Notified(TX_QUEUE) => self.process_tx(),
            QueueEvent::Notified(_) | QueueEvent::Handled => {}
        }
    }
}

impl Net {
    /// The tap joins the event loop, once.
    fn register_tap(&mut self, ops: &mut EventOps) {
        if self.tap_registered {
            return;
        }
        if let Some(tap) = self.tap() {
            let events = Events::new_raw(tap.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED);
            match ops.add(events) {
                Ok(()) => self.tap_registered = true,
                Err(e) => {
                    crate::guest_error!("virtio-net: cannot register tap {}: {e:?}", tap.name())
                }
            }
        }
    }
}
