//! Event-loop glue: the device registers its control eventfd at start, its queue notifiers once
//! activated, and takes them out again after a reset. Only the VMM thread can change the event
//! loop, so activation and reset (which happen on a vCPU thread) just wake it through the control
//! eventfd.

use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Fs;

impl Fs {
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for fd in self.retired.drain(..) {
            if let Err(e) = ops.remove(Events::new(&fd, EventSet::IN)) {
                log::warn!("virtio-fs: cannot unregister a queue notifier: {e:?}");
            }
        }
        if self.active.is_some() && !self.registered {
            for (i, q) in self.queues.iter().enumerate() {
                let events = Events::with_data(&q.notify, i as u32, EventSet::IN);
                if let Err(e) = ops.add(events) {
                    log::error!("virtio-fs: cannot register queue {i}'s notifier: {e:?}");
                }
            }
            self.registered = true;
        }
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control, EventSet::IN)) {
            log::error!("virtio-fs: cannot register the control eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.control.as_raw_fd() {
            // Nonblocking; a failed read only means another wake-up already drained it.
            let _ = self.control.read();
            self.sync_registrations(ops);
            return;
        }
        if let Some(q) = self.queues.iter().find(|q| q.notify.as_raw_fd() == fd) {
            let _ = q.notify.read();
            self.process_queues();
            return;
        }
        // A notifier a reset retired, firing before the control event removed it: drain it
        // (the loop is level-triggered) and remove it now.
        if let Some(r) = self.retired.iter().find(|r| r.as_raw_fd() == fd) {
            let _ = r.read();
        }
        self.sync_registrations(ops);
    }
}
