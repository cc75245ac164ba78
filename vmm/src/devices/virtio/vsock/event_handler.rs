//! Event-loop glue. Besides what [`VirtioCommon`](crate::devices::virtio::VirtioCommon) registers (the control eventfd, the queue
//! notifiers while active), the device registers its private epoll set (all host sockets, the
//! listener and the deadline timer) at start.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;
use crate::devices::virtio::QueueEvent;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
        let epoll = self.muxer.epoll_fd();
        if let Err(e) = ops.add(Events::new_raw(epoll, EventSet::IN)) {
            crate::guest_error!("virtio-vsock: cannot register its epoll set: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.muxer.epoll_fd() {
            self.process_backend();
            return;
        }
        match self.common.process(&events, ops) {
            // Newly activated (or restored): serve whatever is already in the queues.
            QueueEvent::Activated => self.process_backend(),
            QueueEvent::Notified(_) => self.process_queues(),
            QueueEvent::Handled => {}
        }
    }
}
