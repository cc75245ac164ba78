//! virtio-net under the Linux driver: a condensed-kernel guest whose NIC sits on a tap in a
//! network namespace of the test's own, with the host's address on the tap. The guest pings the
//! host (large pings too, fragmented both ways), then TCP streams run both ways with the
//! offloads the driver negotiated (checksums, TSO, merged receive buffers); the host counts and
//! checks every byte it receives and sends; once with the kernel's vhost-net moving the frames,
//! once with the VMM thread. Needs a KVM that runs Linux guests (the testbed), root for the
//! namespace and the tap, and `/dev/vhost-net` for the first.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rund_tests::initramfs::{Initramfs, BUSYBOX, CHECK_INIT};
use rund_tests::{require_guest, GuestKernel, MarkerConsole, GUEST_CMDLINE};
use vmm::devices::virtio::net::{DataPath, MacAddr, Net, NetConfig, Tap};
use vmm::{SerialOutput, Vm, VmConfig, VmExit};

const HOST_IP: &str = "10.9.0.1";
const GUEST_IP: &str = "10.9.0.2";
/// The guest reads this many bytes from the host, and sends as many.
const STREAM_BYTES: usize = 32 << 20;
const TO_GUEST_PORT: u16 = 7000;
const FROM_GUEST_PORT: u16 = 7001;
const TIMEOUT: Duration = Duration::from_secs(300);

const CHECKS: &[&str] = &[
    "net-link",
    "net-mac",
    "net-mtu",
    "net-ping",
    "net-ping-large",
    "net-stream-in",
    "net-stream-out",
];

fn init_script() -> String {
    format!(
        r#"{CHECK_INIT}
check net-link sh -c 'ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0'
check net-mac grep -qx 02:00:00:00:00:02 /sys/class/net/eth0/address
check net-mtu grep -qx 1500 /sys/class/net/eth0/mtu
check net-ping ping -c 3 -W 5 {HOST_IP}
check net-ping-large ping -c 2 -W 5 -s 8000 {HOST_IP}
check net-stream-in sh -c 'test "$(nc {HOST_IP} {TO_GUEST_PORT} | wc -c)" = {STREAM_BYTES}'
check net-stream-out sh -c 'head -c {STREAM_BYTES} /dev/zero | timeout 120 nc {HOST_IP} {FROM_GUEST_PORT}; true'
echo RUND-NET-DONE
reboot -f
"#
    )
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// Sends `STREAM_BYTES` of a pattern to the first connection; returns the bytes written.
fn serve_to_guest(l: TcpListener) -> thread::JoinHandle<Result<usize, String>> {
    thread::spawn(move || {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        let chunk: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        let mut sent = 0;
        while sent < STREAM_BYTES {
            let n = chunk.len().min(STREAM_BYTES - sent);
            s.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
            sent += n;
        }
        Ok(sent)
    })
}

/// Reads `STREAM_BYTES` of zeroes from the first connection, then closes it (which ends the
/// guest's nc); returns the bytes read, or what was wrong.
fn serve_from_guest(l: TcpListener) -> thread::JoinHandle<Result<usize, String>> {
    thread::spawn(move || {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < STREAM_BYTES {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                return Err(format!("a non-zero byte within bytes {got}..{}", got + n));
            }
            got += n;
        }
        Ok(got)
    })
}

#[test]
fn a_guest_reaches_the_host_through_vhost_net() {
    guest_reaches_host(
        "a_guest_reaches_the_host_through_vhost_net",
        DataPath::Vhost,
    );
}

#[test]
fn a_guest_reaches_the_host_through_the_vmm_thread() {
    guest_reaches_host(
        "a_guest_reaches_the_host_through_the_vmm_thread",
        DataPath::UserSpace,
    );
}

/// The guest's checks over a tap in a private namespace, frames moved by `path`.
fn guest_reaches_host(test: &str, path: DataPath) {
    let Some(kernel) = require_guest(test, GuestKernel::CondensedElf) else {
        return;
    };
    if path == DataPath::Vhost && !vmm::devices::virtio::net::vhost::available() {
        // The testbed's kernel has vhost-net: a guest test host without it is not one.
        assert!(
            !rund_tests::guest_tests_required(),
            "{test}: /dev/vhost-net cannot be opened (modprobe vhost_net)"
        );
        eprintln!("skipping {test}: /dev/vhost-net cannot be opened (modprobe vhost_net)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    let mut b = Initramfs::new(BUSYBOX.as_ref()).unwrap();
    b.init(&init_script());
    b.write(&initrd).unwrap();

    // The namespace is this thread's alone: the tap, the address and the listeners live there
    // and go with the namespace when the test ends.
    let (text, exit, report, to_guest, from_guest) = thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare changes only this thread's namespaces; no memory is involved.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
            let tap = Tap::open("rundtap0").unwrap();
            ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "rundtap0"]);
            ip(&["link", "set", "rundtap0", "up"]);
            ip(&["link", "set", "lo", "up"]);
            let to_guest = serve_to_guest(TcpListener::bind((HOST_IP, TO_GUEST_PORT)).unwrap());
            let from_guest =
                serve_from_guest(TcpListener::bind((HOST_IP, FROM_GUEST_PORT)).unwrap());

            let console = MarkerConsole::echoing();
            let mut config = VmConfig::new(&kernel);
            config.initrd = Some(initrd.clone());
            config.cmdline = GUEST_CMDLINE.into();
            config.mem_mib = 256;
            config.serial = SerialOutput::Writer(Box::new(console.clone()));
            let nic = NetConfig {
                mac: MacAddr([0x02, 0, 0, 0, 0, 0x02]),
                mtu: 1500,
            };
            let net = Arc::new(Mutex::new(
                Net::with_data_path(Some(tap), nic, path).unwrap(),
            ));
            config.devices = vec![net.clone()];
            let handle = Vm::new(config).unwrap().start().unwrap();
            let (exit, report) = rund_tests::wait_or_stop(handle, Instant::now() + TIMEOUT);
            // The listeners: unblock a thread that never saw its connection.
            for port in [TO_GUEST_PORT, FROM_GUEST_PORT] {
                let _ = std::net::TcpStream::connect((HOST_IP, port));
            }
            let to_guest = to_guest.join().unwrap();
            let from_guest = from_guest.join().unwrap();
            // Still the path asked for: vhost did not fall back to the VMM thread.
            assert_eq!(net.lock().unwrap().data_path(), path, "{test}");
            (console.text(), exit, report, to_guest, from_guest)
        })
        .join()
        .unwrap()
    });

    assert_eq!(
        exit,
        Some(VmExit::GuestReset),
        "{test}: the guest did not finish{report}"
    );
    rund_tests::assert_guest_checks(test, &text, CHECKS);
    assert_eq!(to_guest, Ok(STREAM_BYTES), "{test}: host to guest");
    assert_eq!(from_guest, Ok(STREAM_BYTES), "{test}: guest to host");
}
