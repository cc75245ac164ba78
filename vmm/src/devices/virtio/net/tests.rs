//! The device over a real tap, in a network namespace of the test's own: the guest's side is
//! driven through its queues, the host's side is the kernel's network stack on the tap.
//!
//! Needs root and `/dev/net/tun`: prints why and passes without them, unless
//! RUND_REQUIRE_ROOT_TESTS=1 (CI).

use std::process::Command;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::device::{DataPath, MacAddr, Net, NetConfig};
use super::tap::Tap;
use super::{features, HDR_LEN};
use crate::devices::virtio::test_utils::{activate, QueueDriver, R, W};
use crate::devices::virtio::{DeviceStateError, VirtioDevice};
use crate::memory::GuestRamMap;

const GUEST_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);
const HOST_IP: [u8; 4] = [10, 9, 0, 1];
const GUEST_IP: [u8; 4] = [10, 9, 0, 2];
const RX_BASE: u64 = 0;
const TX_BASE: u64 = 0x4000;
const FRAME_AT: u64 = 0x8000;
/// Receive buffers: 16 of 32 bytes each, from here on.
const RX_BUFS: u64 = 0x1_0000;
const RX_BUF_LEN: u32 = 32;

fn privileged() -> bool {
    let reason = if !rustix::process::geteuid().is_root() {
        "not root"
    } else if !std::path::Path::new("/dev/net/tun").exists() {
        "no /dev/net/tun"
    } else {
        return true;
    };
    assert!(
        std::env::var("RUND_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
        "virtio-net tap tests: {reason}, and RUND_REQUIRE_ROOT_TESTS=1"
    );
    eprintln!("skipping a virtio-net tap test: {reason}");
    false
}

/// Runs `f` on a thread of its own in a fresh network namespace (taps made there, and the `ip`
/// commands it runs, stay there and vanish with it).
fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare changes only this thread's namespaces; no memory is involved.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A tap with the host's address, up, without IPv6 (whose router and neighbour solicitations
/// would land in the guest's queue beside the frames the test waits for).
fn host_tap() -> Tap {
    let tap = Tap::open("rt%d").unwrap();
    let name = tap.name().to_owned();
    assert!(name.starts_with("rt"), "{name}");
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&["addr", "add", "10.9.0.1/24", "dev", &name]);
    ip(&["link", "set", &name, "up"]);
    tap
}

fn config() -> NetConfig {
    NetConfig {
        mac: GUEST_MAC,
        mtu: 1500,
    }
}

/// An ARP request from the guest for the host's address, virtio-net header first.
fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC.0);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP);
    f
}

struct Guest {
    mem: GuestRamMap,
    rx: QueueDriver,
    tx: QueueDriver,
    /// The next used entry of the RX queue the test reads.
    rx_seen: u16,
}

impl Guest {
    fn new(dev: &mut Net, acked: u64) -> Guest {
        let mem = crate::memory::map_ram(&[(GuestAddress(0), 0x4_0000)]).unwrap();
        let rx = QueueDriver::new(&mem, RX_BASE, 16);
        let tx = QueueDriver::new(&mem, TX_BASE, 16);
        activate(dev, &mem, &[&rx, &tx], acked);
        Guest {
            mem,
            rx,
            tx,
            rx_seen: 0,
        }
    }

    fn post_rx_buffers(&self, n: u64, len: u32) {
        for i in 0..n {
            self.rx.add_chain(&[(RX_BUFS + i * 0x100, len, W)]);
        }
    }

    fn send(&self, frame: &[u8]) {
        self.mem.write_slice(frame, GuestAddress(FRAME_AT)).unwrap();
        self.tx.add_chain(&[(FRAME_AT, frame.len() as u32, R)]);
    }

    /// The next packet in the RX used ring (header first) and the buffers it took, if one is
    /// there.
    fn next_packet(&mut self) -> Option<(Vec<u8>, u16)> {
        if self.rx.used_idx() == self.rx_seen {
            return None;
        }
        let mut bytes = Vec::new();
        let read = |i: u16| {
            let (id, len) = self.rx.used_elem(i);
            let mut b = vec![0u8; len as usize];
            let addr = RX_BUFS + u64::from(id) * 0x100;
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        };
        bytes.extend(read(self.rx_seen));
        let count = u16::from_le_bytes([bytes[10], bytes[11]]);
        for i in 1..count {
            bytes.extend(read(self.rx_seen.wrapping_add(i)));
        }
        self.rx_seen = self.rx_seen.wrapping_add(count);
        Some((bytes, count))
    }
}

/// Serves the RX side until an ARP reply reaches the guest; returns it and its buffer count.
fn await_arp_reply(dev: &mut Net, g: &mut Guest) -> (Vec<u8>, u16) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        dev.process_rx();
        while let Some((p, count)) = g.next_packet() {
            if p[HDR_LEN + 12..HDR_LEN + 14] == [0x08, 0x06] {
                return (p, count);
            }
        }
        assert!(Instant::now() < deadline, "no ARP reply: {}", dev.report());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` on a device over a fresh host tap in a namespace of its own (skipped as
/// [`privileged`] says).
fn with_tap_device(f: impl FnOnce(&mut Net) + Send) {
    if !privileged() {
        return;
    }
    in_private_netns(|| {
        f(&mut Net::with_data_path(Some(host_tap()), config(), DataPath::UserSpace).unwrap())
    });
}

/// Serves the RX side until `done` holds; panics naming `what` after three seconds.
fn serve_rx_until(dev: &mut Net, what: &str, done: impl Fn(&Net) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !done(dev) {
        assert!(Instant::now() < deadline, "{what}: {}", dev.report());
        std::thread::sleep(Duration::from_millis(10));
        dev.process_rx();
    }
}

#[test]
fn the_host_kernel_answers_the_guest_through_the_tap() {
    with_tap_device(|dev| {
        let acked = features::MRG_RXBUF | features::EVENT_IDX | features::GUEST_CSUM;
        let mut g = Guest::new(dev, acked | features::GUEST_TSO4 | features::GUEST_TSO6);
        // No receive buffer yet: the reply is read and waits.
        g.send(&arp_request());
        dev.process_tx();
        assert_eq!(g.tx.used_idx(), 1, "the sent chain went back used");
        assert_eq!(dev.counters().tx_frames, 1);
        let deadline = Instant::now() + Duration::from_secs(3);
        while dev.rx_waiting() == 0 {
            assert!(
                Instant::now() < deadline,
                "nothing came back: {}",
                dev.report()
            );
            std::thread::sleep(Duration::from_millis(10));
            dev.process_rx();
        }
        assert_eq!(g.rx.used_idx(), 0);

        // 32-byte buffers: the 42-byte reply and its header take two, merged.
        g.post_rx_buffers(8, RX_BUF_LEN);
        let (reply, count) = await_arp_reply(dev, &mut g);
        assert_eq!(count, 2, "{reply:x?}");
        assert_eq!(reply.len(), HDR_LEN + 42);
        let arp = &reply[HDR_LEN..];
        assert_eq!(&arp[0..6], &GUEST_MAC.0, "sent to the guest's MAC");
        assert_eq!(&arp[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&arp[28..32], &HOST_IP, "from the host's address");
        assert!(dev.counters().rx_frames >= 1);
        assert!(dev.report().contains("tap rt"), "{}", dev.report());
    });
}

#[test]
fn without_merged_buffers_a_frame_needs_one_buffer_big_enough() {
    with_tap_device(|dev| {
        let mut g = Guest::new(dev, features::EVENT_IDX);
        // Too small for the reply: it is dropped and the buffer goes back empty.
        g.post_rx_buffers(1, RX_BUF_LEN);
        g.send(&arp_request());
        dev.process_tx();
        serve_rx_until(dev, "not dropped", |d| d.counters().rx_dropped > 0);
        assert_eq!(g.rx.used_idx(), 1);
        assert_eq!(g.rx.used_elem(0).1, 0);
        g.rx_seen = 1;
        // A buffer that holds it: one buffer, num_buffers 1.
        g.rx.add_chain(&[(RX_BUFS + 0x100, 128, W)]);
        g.send(&arp_request());
        dev.process_tx();
        let (reply, count) = await_arp_reply(dev, &mut g);
        assert_eq!((count, reply.len()), (1, HDR_LEN + 42));
    });
}

#[test]
fn hostile_chains_are_dropped_and_given_back() {
    with_tap_device(|dev| {
        let g = Guest::new(dev, features::MRG_RXBUF);
        // TX: too short for a header; device-writable; a frame larger than any.
        g.tx.add_chain(&[(FRAME_AT, 4, R)]);
        g.tx.add_chain(&[(FRAME_AT, 64, W)]);
        g.tx.add_chain(&[(0x1_0000, 0x1_0000, R), (0x2_0000, 0x1_0000, R)]);
        dev.process_tx();
        assert_eq!(g.tx.used_idx(), 3);
        assert_eq!(dev.counters().tx_dropped, 3);
        assert_eq!(dev.counters().tx_frames, 0);
        // RX: a read-only buffer; the reply that meets it is dropped, the buffer given back.
        g.rx.add_chain(&[(RX_BUFS, 256, R)]);
        g.send(&arp_request());
        dev.process_tx();
        serve_rx_until(dev, "not dropped", |d| d.counters().rx_dropped > 0);
        assert_eq!((g.rx.used_idx(), g.rx.used_elem(0).1), (1, 0));
    });
}

#[test]
fn without_a_tap_frames_sent_are_dropped() {
    let mut dev = Net::new(None, config()).unwrap();
    let g = Guest::new(&mut dev, 0);
    g.send(&arp_request());
    dev.process_tx();
    dev.process_rx();
    assert_eq!(g.tx.used_idx(), 1);
    assert_eq!(dev.counters().tx_dropped, 1);
    assert_eq!(g.rx.used_idx(), 0);
}

#[test]
fn config_space_and_bad_settings() {
    let dev = Net::new(None, config()).unwrap();
    let mut b = [0u8; 12];
    dev.read_config(0, &mut b);
    assert_eq!(&b[0..6], &GUEST_MAC.0);
    assert_eq!(u16::from_le_bytes([b[6], b[7]]), super::STATUS_LINK_UP);
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), 1);
    assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1500);
    let mut mtu = [0u8; 2];
    dev.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1500);
    for f in [
        features::MAC,
        features::MTU,
        features::STATUS,
        features::MRG_RXBUF,
    ] {
        assert_eq!(dev.features() & f, f);
    }

    let bad_mtu = NetConfig {
        mtu: 67,
        ..config()
    };
    assert_eq!(
        Net::new(None, bad_mtu).unwrap_err().to_string(),
        "MTU 67 is outside 68..=9000"
    );
    let multicast = NetConfig {
        mac: MacAddr([0x01, 0, 0x5e, 0, 0, 1]),
        ..config()
    };
    assert_eq!(
        Net::new(None, multicast).unwrap_err().to_string(),
        "MAC 01:00:5e:00:00:01 is a multicast address"
    );
    assert_eq!("02:00:00:00:00:02".parse::<MacAddr>(), Ok(GUEST_MAC));
    for bad in [
        "02:00:00:00:00",
        "02:00:00:00:00:02:03",
        "0g:00:00:00:00:02",
        "2:0:0:0:0:2",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
    }
}

#[test]
fn a_restore_keeps_the_mac_the_guest_saw_and_refuses_other_features() {
    let mut template = Net::new(None, config()).unwrap();
    let _g = Guest::new(&mut template, features::MRG_RXBUF | features::EVENT_IDX);
    let state = template.save_state().unwrap();
    assert_eq!(state["activated"], true);
    assert_eq!(state["queues"].as_array().map(Vec::len), Some(2));

    let other = NetConfig {
        mac: MacAddr([0x02, 0, 0, 0, 0, 0x99]),
        mtu: 9000,
    };
    let mut clone = Net::new(None, other).unwrap();
    clone.restore_state(&state).unwrap();
    assert_eq!(*clone.config(), config());

    let mut odd = state.clone();
    odd["avail_features"] = serde_json::json!(1);
    let err = Net::new(None, other)
        .unwrap()
        .restore_state(&odd)
        .unwrap_err();
    assert!(matches!(err, DeviceStateError::Mismatch(_)), "{err}");
    let mut bad_mtu = state.clone();
    bad_mtu["config"]["mtu"] = serde_json::json!(0);
    let err = Net::new(None, other)
        .unwrap()
        .restore_state(&bad_mtu)
        .unwrap_err();
    assert!(err.to_string().contains("MTU 0"), "{err}");
    // Into an active device: refused.
    let err = template.restore_state(&state).unwrap_err();
    assert!(matches!(err, DeviceStateError::Busy(_)), "{err}");
}
