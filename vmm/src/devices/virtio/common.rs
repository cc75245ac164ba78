//! What every virtio device here keeps the same way, and how it serves a queue.
//!
//! [`VirtioCommon`] holds the features offered and accepted, and while the device is active the
//! queues the driver set up, guest memory and the interrupt; it keeps the queues' notification
//! eventfds registered with the VMM thread's event loop. Only that thread can change the loop,
//! but activation and reset happen on a vCPU thread (an MMIO write), so they only record what
//! changed and wake the VMM thread through a control eventfd; the VMM thread then adds the new
//! notifiers and removes the ones a reset retired. [`VirtioDevice`](super::VirtioDevice)'s
//! default methods are built on it.
//!
//! [`serve_queue`] is the loop each device runs over one queue: pop every available chain, hand
//! it to the device, return it used, with the disable/enable dance of notification suppression.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, DeviceQueue, DeviceStateError, Interrupt, QueueSnapshot};
use crate::memory::GuestRamMap;

/// An active device's guest-facing side: what the driver handed over at activation.
#[derive(Debug)]
pub struct ActiveQueues {
    /// Guest memory.
    pub mem: GuestRamMap,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The queues, in queue order, with their notifiers.
    pub queues: Vec<DeviceQueue>,
    device: &'static str,
}

impl ActiveQueues {
    /// Tells the driver that used rings moved.
    pub fn signal_used_ring(&self) {
        if let Err(e) = self.interrupt.signal_used_ring() {
            crate::guest_error!("{}: cannot signal the used ring: {e}", self.device);
        }
    }
}

/// What an event-loop event meant for a device's queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueEvent {
    /// The queue notifiers were just registered (activation or restore): serve whatever the queues
    /// already hold, since a notification sent before registration is not seen again (with
    /// EVENT_IDX, a chain made available before a snapshot would otherwise wait forever).
    Activated,
    /// The driver notified queue `.0`.
    Notified(usize),
    /// Registrations brought in line, or a retired notifier drained: nothing to serve.
    Handled,
}

/// A device's features, its queues between activation and reset, and their registration with
/// the event loop.
pub struct VirtioCommon {
    /// The device's name in log lines ("virtio-blk").
    device: &'static str,
    /// Each queue's maximum size; as many queues as entries.
    max_sizes: &'static [u16],
    avail_features: u64,
    acked_features: u64,
    /// Written by [`Self::activate`] and [`Self::reset`] so that the VMM thread, which alone can
    /// touch the event loop, (un)registers the queue notifiers.
    control: EventFd,
    active: Option<ActiveQueues>,
    /// Notifiers of queues a reset dropped, still registered until the VMM thread removes them.
    retired: Vec<EventFd>,
    /// Whether the active queues' notifiers are registered with the event loop.
    registered: bool,
    /// The queues are served outside the VMM thread (vhost): their notifiers are not
    /// registered, so a kick never wakes the VMM thread.
    external: bool,
}

impl std::fmt::Debug for VirtioCommon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioCommon")
            .field("device", &self.device)
            .field("acked_features", &self.acked_features)
            .field("active", &self.active.is_some())
            .field("registered", &self.registered)
            .field("retired", &self.retired.len())
            .finish()
    }
}

impl VirtioCommon {
    /// A device named `device` in log lines, offering `avail_features`, with as many queues as
    /// `max_sizes` has entries; not active.
    pub fn new(
        device: &'static str,
        max_sizes: &'static [u16],
        avail_features: u64,
    ) -> io::Result<VirtioCommon> {
        Ok(VirtioCommon {
            device,
            max_sizes,
            avail_features,
            acked_features: 0,
            control: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            active: None,
            retired: Vec::new(),
            registered: false,
            external: false,
        })
    }

    /// Each queue's maximum size.
    pub fn max_sizes(&self) -> &'static [u16] {
        self.max_sizes
    }

    /// The features offered.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// The features the driver accepted (none until it sets FEATURES_OK, and after a reset).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The driver accepted `features` (the transport keeps only offered bits).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// Whether the driver accepted every bit of `mask`.
    pub fn acked(&self, mask: u64) -> bool {
        self.acked_features & mask == mask
    }

    /// Refuses anything but one ready queue per maximum size (what the driver must hand over).
    pub fn check(&self, queues: &[DeviceQueue]) -> Result<(), ActivateError> {
        let count = self.max_sizes.len();
        if queues.len() != count {
            return Err(ActivateError::BadQueue(queues.len().min(count)));
        }
        match queues.iter().position(|q| !q.queue.ready()) {
            Some(i) => Err(ActivateError::BadQueue(i)),
            None => Ok(()),
        }
    }

    /// Starts serving `queues` (refused as [`Self::check`] does), with EVENT_IDX on if the driver
    /// accepted it. A device already active stops serving its old queues first.
    pub fn activate(
        &mut self,
        mem: GuestRamMap,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        self.check(&queues)?;
        self.deactivate();
        let event_idx = self.acked(1 << VIRTIO_RING_F_EVENT_IDX);
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        self.active = Some(ActiveQueues {
            mem,
            interrupt,
            queues,
            device: self.device,
        });
        self.wake_event_loop();
        Ok(())
    }

    /// Whether the next activation's queues are served outside the VMM thread (their notifiers
    /// then stay out of the event loop).
    pub fn set_queues_external(&mut self, external: bool) {
        self.external = external;
    }

    /// The driver reset the device: it stops serving, forgets the queues (their notifiers leave
    /// the event loop) and the accepted features.
    pub fn reset(&mut self) {
        self.deactivate();
        self.acked_features = 0;
    }

    fn deactivate(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        if self.registered {
            if !self.external {
                self.retired
                    .extend(active.queues.into_iter().map(|q| q.notify));
            }
            self.registered = false;
            self.wake_event_loop();
        }
    }

    /// Whether the driver activated the device (and did not reset it since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The active queues.
    pub fn active(&self) -> Option<&ActiveQueues> {
        self.active.as_ref()
    }

    /// The active queues, to serve them.
    pub fn active_mut(&mut self) -> Option<&mut ActiveQueues> {
        self.active.as_mut()
    }

    /// A device's own saved state, parsed, for a restore into this device (refused while it is
    /// active).
    pub fn saved_state<T: serde::de::DeserializeOwned>(
        &self,
        state: &serde_json::Value,
    ) -> Result<T, DeviceStateError> {
        let saved = serde_json::from_value(state.clone()).map_err(DeviceStateError::Format)?;
        self.ensure_inactive()?;
        Ok(saved)
    }

    /// Refuses a state restore into an active device.
    pub fn ensure_inactive(&self) -> Result<(), DeviceStateError> {
        match self.active {
            Some(_) => Err(DeviceStateError::Busy(format!(
                "{} is activated",
                self.device
            ))),
            None => Ok(()),
        }
    }

    /// The positions of the active queues (empty when not active).
    pub fn queue_states(&self) -> Vec<QueueSnapshot> {
        self.active.as_ref().map_or_else(Vec::new, |a| {
            a.queues
                .iter()
                .map(|q| QueueSnapshot::from(q.queue.state()))
                .collect()
        })
    }

    /// Whether the active queues' notifiers are in the event loop.
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// Whether notifiers a reset dropped still wait for the VMM thread to remove them.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// One line on what the device and its queues are doing, for a report on a stuck guest:
    /// the interrupt status, and per queue the driver's indices (avail, used_event) next to the
    /// device's (next_avail, next_used, avail_event) as guest memory holds them now.
    pub fn report(&self) -> String {
        let Some(active) = &self.active else {
            return format!("{}: not active", self.device);
        };
        let mem = &active.mem;
        let mut line = format!(
            "{}: interrupt status {:#x}",
            self.device,
            active.interrupt.status()
        );
        for (i, q) in active.queues.iter().enumerate() {
            let q = &q.queue;
            let size = u64::from(q.size());
            let avail = q.avail_idx(mem, Ordering::Acquire).map(|w| w.0);
            let used = q.used_idx(mem, Ordering::Acquire).map(|w| w.0);
            // virtio 1.2, 2.7.10: used_event ends the available ring, avail_event the used ring.
            let word = |ring: u64, offset: u64| {
                GuestAddress(ring)
                    .checked_add(offset)
                    .and_then(|a| mem.read_obj::<u16>(a).ok())
            };
            let used_event = word(q.avail_ring(), 4 + 2 * size);
            let avail_event = word(q.used_ring(), 4 + 8 * size);
            let show = |v: Option<u16>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            line.push_str(&format!(
                "; queue {i}: avail {} next_avail {} | used {} next_used {} | used_event {} avail_event {}",
                show(avail.ok()),
                q.next_avail(),
                show(used.ok()),
                q.next_used(),
                show(used_event),
                show(avail_event),
            ));
        }
        line
    }

    /// The control eventfd joins the event loop (from the device's `MutEventSubscriber::init`).
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control, EventSet::IN)) {
            crate::guest_error!(
                "{}: cannot register the control eventfd: {e:?}",
                self.device
            );
        }
    }

    /// Handles an event of the control eventfd or of a queue notifier (from the device's
    /// `MutEventSubscriber::process`, for every fd but the device's own others).
    pub fn process(&mut self, events: &Events, ops: &mut EventOps) -> QueueEvent {
        let fd = events.fd();
        if fd == self.control.as_raw_fd() {
            // Nonblocking; a failed read only means another wake-up already drained it.
            let _ = self.control.read();
            return if self.sync_registrations(ops) {
                QueueEvent::Activated
            } else {
                QueueEvent::Handled
            };
        }
        let queues = self.active.as_ref().map_or(&[][..], |a| &a.queues[..]);
        if let Some(i) = queues.iter().position(|q| q.notify.as_raw_fd() == fd) {
            let _ = queues[i].notify.read();
            return QueueEvent::Notified(i);
        }
        // A notifier a reset retired, firing before the control event removed it: drain it
        // (the loop is level-triggered) and remove it now.
        if let Some(r) = self.retired.iter().find(|r| r.as_raw_fd() == fd) {
            let _ = r.read();
        }
        self.sync_registrations(ops);
        QueueEvent::Handled
    }

    /// Brings the registrations in line; returns whether the queue notifiers were just added.
    fn sync_registrations(&mut self, ops: &mut EventOps) -> bool {
        for fd in self.retired.drain(..) {
            if let Err(e) = ops.remove(Events::new(&fd, EventSet::IN)) {
                crate::guest_warn!("{}: cannot unregister a queue notifier: {e:?}", self.device);
            }
        }
        let Some(active) = self.active.as_ref().filter(|_| !self.registered) else {
            return false;
        };
        for (i, q) in active.queues.iter().enumerate().filter(|_| !self.external) {
            let events = Events::with_data(&q.notify, i as u32, EventSet::IN);
            if let Err(e) = ops.add(events) {
                crate::guest_error!(
                    "{}: cannot register queue {i}'s notifier: {e:?}",
                    self.device
                );
            }
        }
        self.registered = true;
        true
    }

    fn wake_event_loop(&self) {
        if let Err(e) = self.control.write(1) {
            crate::guest_error!("{}: cannot wake the event loop: {e}", self.device);
        }
    }
}

/// Runs `serve` on each available chain of `q` until the queue is empty, with notification
/// suppression turned off while serving and back on at the end. `serve` gets the chain and the
/// queue size and returns `Some(len)` to return the chain used with `len` bytes written, or `None`
/// to put it back and stop; `want_more` is asked before each chain. `what` names the queue in log
/// lines. Returns whether any chain was used.
pub fn serve_queue(
    q: &mut Queue,
    mem: &GuestRamMap,
    what: &str,
    mut want_more: impl FnMut() -> bool,
    mut serve: impl FnMut(DescriptorChain<&GuestRamMap>, u16) -> Option<u32>,
) -> bool {
    let mut used = false;
    let mut idle_rounds = 0;
    loop {
        if let Err(e) = q.disable_notification(mem) {
            crate::guest_warn!("{what}: cannot disable notifications: {e}");
            break;
        }
        let mut progressed = false;
        let mut stopped = false;
        while want_more() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let size = q.size();
            match serve(chain, size) {
                Some(len) => {
                    progressed = true;
                    match q.add_used(mem, head, len) {
                        Ok(()) => used = true,
                        Err(e) => crate::guest_warn!("{what}: cannot return chain {head}: {e}"),
                    }
                }
                None => {
                    q.go_to_previous_position();
                    stopped = true;
                    break;
                }
            }
        }
        // Stopped with nothing more wanted: notifications stay off until the device wants the
        // queue again (an RX queue without data to deliver need not hear of new buffers).
        if stopped || !want_more() {
            break;
        }
        match q.enable_notification(mem) {
            Ok(false) => break,
            Ok(true) => {
                // More chains arrived, or the available index is more than a queue ahead of us,
                // which the queue refuses to pop: a second round without progress tells the two
                // apart without spinning forever on a hostile index.
                idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
                if idle_rounds > 1 {
                    crate::guest_warn!("{what}: available ring index is invalid; queue stalled");
                    break;
                }
            }
            Err(e) => {
                crate::guest_warn!("{what}: cannot enable notifications: {e}");
                break;
            }
        }
    }
    used
}

/// Whether the driver wants an interrupt for `q` after chains were used (with EVENT_IDX it names
/// the used index it wants to hear about; without, it always does).
pub fn needs_interrupt(q: &mut Queue, mem: &GuestRamMap, used: bool) -> bool {
    used && q.needs_notification(mem).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::QueueDriver;
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::sync::Mutex;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

    /// A device that only records what its queue events meant.
    struct Recorder {
        common: VirtioCommon,
        seen: Vec<QueueEvent>,
    }

    impl MutEventSubscriber for Recorder {
        fn init(&mut self, ops: &mut EventOps) {
            self.common.init(ops);
        }
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            let e = self.common.process(&events, ops);
            self.seen.push(e);
        }
    }

    fn queue(d: &QueueDriver) -> (DeviceQueue, EventFd) {
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = notify.try_clone().unwrap();
        let q = DeviceQueue {
            queue: d.queue(),
            notify,
        };
        (q, kick)
    }

    #[test]
    fn report_shows_both_sides_indices_and_the_interrupt() {
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let d = QueueDriver::new(&mem, 0, 16);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut common = VirtioCommon::new("test", &[16], EVENT_IDX).unwrap();
        assert_eq!(common.report(), "test: not active");
        common.set_acked_features(EVENT_IDX);
        let (q, _kick) = queue(&d);
        common.activate(mem.clone(), irq.clone(), vec![q]).unwrap();
        d.add_chain(&[(0x8000, 16, 0)]);
        d.add_chain(&[(0x8100, 16, 0)]);
        d.set_used_event(7);
        let active = common.active_mut().unwrap();
        let head = active.queues[0].queue.pop_descriptor_chain(&mem).unwrap();
        active.queues[0]
            .queue
            .add_used(&mem, head.head_index(), 0)
            .unwrap();
        active.queues[0].queue.enable_notification(&mem).unwrap();
        irq.signal_used_ring().unwrap();
        assert_eq!(
            common.report(),
            "test: interrupt status 0x1; queue 0: avail 2 next_avail 1 | used 1 next_used 1 | \
             used_event 7 avail_event 1"
        );
    }

    #[test]
    fn activation_registers_the_notifiers_and_reset_retires_them() {
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let d = QueueDriver::new(&mem, 0, 16);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let rec = Arc::new(Mutex::new(Recorder {
            common: VirtioCommon::new("test", &[16], EVENT_IDX).unwrap(),
            seen: Vec::new(),
        }));
        let mut em = EventManager::<Arc<Mutex<Recorder>>>::new().unwrap();
        em.add_subscriber(rec.clone());
        let mut r = rec.lock().unwrap();
        // One ready queue, no more, no less.
        let refused = |r: &mut Recorder, qs| r.common.activate(mem.clone(), irq.clone(), qs);
        assert!(matches!(
            refused(&mut r, vec![]),
            Err(ActivateError::BadQueue(0))
        ));
        let (mut unready, _) = queue(&d);
        unready.queue.set_ready(false);
        assert!(matches!(
            refused(&mut r, vec![unready]),
            Err(ActivateError::BadQueue(0))
        ));
        let two = vec![queue(&d).0, queue(&d).0];
        assert!(matches!(
            refused(&mut r, two),
            Err(ActivateError::BadQueue(1))
        ));
        assert!(!r.common.is_active());

        r.common.set_acked_features(EVENT_IDX);
        let (q, kick) = queue(&d);
        r.common
            .activate(mem.clone(), irq.clone(), vec![q])
            .unwrap();
        assert!(r.common.queue_states()[0].event_idx_enabled);
        assert!(matches!(
            r.common.ensure_inactive(),
            Err(DeviceStateError::Busy(_))
        ));
        assert!(!r.common.is_registered(), "only the VMM thread registers");
        drop(r);
        em.run_with_timeout(100).unwrap();
        let r = rec.lock().unwrap();
        assert_eq!(r.seen, [QueueEvent::Activated]);
        assert!(r.common.is_registered());
        drop(r);
        kick.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(
            rec.lock().unwrap().seen.last(),
            Some(&QueueEvent::Notified(0))
        );

        // A reset forgets the queues and the features; a notification after it reaches nobody,
        // and the VMM thread takes the notifier out.
        let mut r = rec.lock().unwrap();
        r.common.reset();
        assert!(!r.common.is_active() && r.common.acked_features() == 0);
        assert!(r.common.queue_states().is_empty() && r.common.has_retired());
        r.common.ensure_inactive().unwrap();
        r.seen.clear();
        drop(r);
        kick.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        em.run_with_timeout(10).unwrap();
        let r = rec.lock().unwrap();
        assert!(!r.common.has_retired() && !r.common.is_registered());
        assert!(
            !r.seen.iter().any(|e| matches!(e, QueueEvent::Notified(_))),
            "{:?}",
            r.seen
        );
    }
}
