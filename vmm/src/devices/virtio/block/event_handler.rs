//! Event-loop glue: the queue notifiers' registration is [`VirtioCommon`](crate::devices::virtio::VirtioCommon)'s business; a
//! notification, or a fresh activation, serves the queue.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Block;
use crate::devices::virtio::QueueEvent;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.common.process(&events, ops) != QueueEvent::Handled {
            self.process_queue();
        }
    }
}
