//! Event-loop glue. Besides what [`VirtioCommon`](crate::devices::virtio::VirtioCommon) registers
//! (the control eventfd, the queue notifiers while active), the device registers its tap,
//! edge-triggered: a frame that waits for buffers must not wake the loop again and again, and
//! [`Net::process_rx`] reads the tap until it is empty or the buffers run out, so a new edge
//! comes with each new frame after that.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::os::unix::io::AsRawFd;

use super::device::Net;
use super::{RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::QueueEvent;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        if let Some(tap) = self.tap() {
            let events = Events::new_raw(tap.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED);
            if let Err(e) = ops.add(events) {
                log::error!("virtio-net: cannot register tap {}: {e:?}", tap.name());
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.tap().is_some_and(|t| t.as_raw_fd() == events.fd()) {
            self.process_rx();
            return;
        }
        match self.common.process(&events, ops) {
            QueueEvent::Activated => {
                self.process_tx();
                self.process_rx();
            }
            QueueEvent::Notified(RX_QUEUE) => self.process_rx(),
            QueueEvent::Notified(TX_QUEUE) => self.process_tx(),
            QueueEvent::Notified(_) | QueueEvent::Handled => {}
        }
    }
}
