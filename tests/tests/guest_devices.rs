//! The three virtio devices under the real Linux drivers: one condensed-kernel guest with a
//! writable and a read-only virtio-blk disk, a read-only and a read-write virtio-fs share, and
//! vsock. The guest's init (busybox, mke2fs and the probe) checks each device and prints one
//! `RUND-CHECK <name> ok|FAIL` line per check; vsock streams run both ways at once, checked byte by
//! byte by both ends. Afterwards the host checks what the guest wrote reached its files, and that
//! nothing outside the shares was reached. Needs a KVM that runs Linux guests (the testbed).

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rund_tests::initramfs::{Initramfs, BUSYBOX, CHECK_INIT};
use rund_tests::{require_guest, stream, GuestKernel, MarkerConsole, GUEST_CMDLINE};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::fs::{CachePolicy, Fs, FsConfig, GuestIds};
use vmm::devices::virtio::vsock::Vsock;
use vmm::testing::ProcessFootprint;
use vmm::{SerialOutput, Vm, VmConfig, VmExit, VmHandle};

/// Guest port the probe listens on; the host connects there through the VMM's socket.
const GUEST_PORT: u32 = 5000;
/// Host port the guest connects to: the VMM forwards it to `<socket>_6000`.
const HOST_PORT: u32 = 6000;
/// Streams each way at once.
const STREAMS: usize = 2;
/// A secret the guest must never read: it sits beside the shares, not in them.
const SECRET: &str = "RUND-SECRET-OUTSIDE-THE-SHARE";
/// Small files in the read-only share (the benchmark reads 10,000; the nested testbed lists
/// about 500 a second, so the test keeps fewer).
const SMALL_FILES: usize = 2000;
/// Twice the slowest run seen in the testbed (about 6 min), below nextest's guest-test timeout so
/// that a hung guest is reported here, with its vCPUs and devices.
const TIMEOUT: Duration = Duration::from_secs(720);

/// Bytes per stream: 100 MB, as the devices issue asks; `RUND_VSOCK_TEST_BYTES` may lower it
/// for a quick local run.
fn stream_bytes() -> u64 {
    std::env::var("RUND_VSOCK_TEST_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000_000)
}

/// The checks the guest must report, each exactly once and `ok`.
const CHECKS: &[&str] = &[
    "blk-mkfs",
    "blk-write",
    "blk-remount-read",
    "blk-ro-flag",
    "blk-ro-write-refused",
    "blk-ro-mount-read",
    "fs-mount",
    "fs-checksums",
    "fs-small-files",
    "fs-ro-create-refused",
    "fs-ro-write-refused",
    "fs-ro-mkdir-refused",
    "fs-ro-remove-refused",
    "fs-ro-rename-refused",
    "fs-symlinks-stay-symlinks",
    "fs-abs-symlink-no-escape",
    "fs-rel-symlink-no-escape",
    "fs-dotdot-no-escape",
    "fs-dir-symlink-no-escape",
    "fs-grep-no-secret",
    "fs-handles-ro",
    "vol-mount",
    "vol-write",
    "vol-hardlink-inside",
    "vol-rename-race-no-escape",
    "fs-handles-rw",
    "vsock-out",
    "vsock-in",
];

fn init_script(bytes: u64) -> String {
    format!(
        r#"{CHECK_INIT}
refused() {{ ! "$@"; }}
nosecret() {{ ! "$@" 2>/dev/null | grep -q {SECRET}; }}

# virtio-blk: vda is writable and blank, vdb read-only with an ext4 the host made.
mkdir -p /mnt/rw /mnt/ro
check blk-mkfs /sbin/mke2fs -q -t ext4 -F /dev/vda
check blk-write sh -c 'mount -t ext4 /dev/vda /mnt/rw && dd if=/dev/urandom of=/mnt/rw/big bs=1M count=16 2>/dev/null && mkdir /mnt/rw/d && for i in $(seq 1 200); do echo "file $i" > /mnt/rw/d/$i; done && echo from-the-guest > /mnt/rw/hello && (cd /mnt/rw && sha256sum big d/* > /tmp/blk.sum) && umount /mnt/rw'
check blk-remount-read sh -c 'mount -t ext4 /dev/vda /mnt/rw && cd /mnt/rw && sha256sum -c -s /tmp/blk.sum && cd / && umount /mnt/rw'
check blk-ro-flag test "$(cat /sys/block/vdb/ro)" = 1
check blk-ro-write-refused refused dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct
check blk-ro-mount-read sh -c 'mount -t ext4 -o ro /dev/vdb /mnt/ro && grep -qx from-the-host /mnt/ro/hello && umount /mnt/ro'

# virtio-fs, read-only share (the image layers).
mkdir -p /mnt/share /mnt/vol
check fs-mount mount -t virtiofs share /mnt/share
check fs-checksums sh -c 'cd /mnt/share && sha256sum -c -s /expected.sha256'
check fs-small-files test "$(ls /mnt/share/small | wc -l)" = {SMALL_FILES}
check fs-ro-create-refused refused touch /mnt/share/new
check fs-ro-write-refused refused sh -c 'echo x >> /mnt/share/hello'
check fs-ro-mkdir-refused refused mkdir /mnt/share/newdir
check fs-ro-remove-refused refused rm /mnt/share/hello
check fs-ro-rename-refused refused mv /mnt/share/hello /mnt/share/moved
check fs-symlinks-stay-symlinks sh -c 'test -L /mnt/share/abs-link && test -L /mnt/share/rel-link && test -L /mnt/share/dir-link'
check fs-abs-symlink-no-escape nosecret cat /mnt/share/abs-link
check fs-rel-symlink-no-escape nosecret cat /mnt/share/rel-link
check fs-dotdot-no-escape nosecret cat /mnt/share/../outside/secret /mnt/share/sub/../../outside/secret
check fs-dir-symlink-no-escape nosecret cat /mnt/share/dir-link/secret
check fs-grep-no-secret sh -c '! grep -rqs {SECRET} /mnt/share/hello /mnt/share/sub /mnt/share/abs-link /mnt/share/rel-link /mnt/share/dir-link /mnt/share/small/1'
check fs-handles-ro /bin/rund-guest-probe fs-handles --dir /mnt/share --secret {SECRET}

# virtio-fs, read-write share (a volume).
check vol-mount mount -t virtiofs vol /mnt/vol
check vol-write sh -c 'echo from-the-guest > /mnt/vol/written && mkdir /mnt/vol/a && echo inside > /mnt/vol/a/f'
check vol-hardlink-inside sh -c 'ln /mnt/vol/written /mnt/vol/linked && grep -qx from-the-guest /mnt/vol/linked'
race() {{ i=0; while [ $i -lt 40 ]; do mv /mnt/vol/a /mnt/vol/b; mv /mnt/vol/b /mnt/vol/a; i=$((i+1)); done; }}
race & racer=$!
escaped=0; i=0
while [ $i -lt 40 ]; do
    for p in /mnt/vol/a/../../outside/secret /mnt/vol/b/../../outside/secret /mnt/vol/a/../../../outside/secret; do
        cat $p 2>/dev/null | grep -q {SECRET} && escaped=1
    done
    i=$((i+1))
done
wait $racer
check vol-rename-race-no-escape test $escaped = 0
check fs-handles-rw /bin/rund-guest-probe fs-handles --dir /mnt/vol --secret {SECRET}
umount /mnt/share /mnt/vol

# vsock: the host connects in while the guest connects out.
/bin/rund-guest-probe stream-serve --port {GUEST_PORT} --count {STREAMS} > /tmp/serve 2>&1 &
server=$!
while ! grep -q listening /tmp/serve; do sleep 0.1; done
echo RUND-VSOCK-READY
check vsock-out /bin/rund-guest-probe stream-connect --port {HOST_PORT} --count {STREAMS} --bytes {bytes}
cat /tmp/out
check vsock-in wait $server
cat /tmp/serve
sync
echo RUND-DEVICES-DONE
reboot -f
"#
    )
}

/// Host files the guest sees: the shares with their expected checksums, the outside secret, and
/// the disk images.
struct Fixture {
    dir: tempfile::TempDir,
    expected_sums: String,
}

impl Fixture {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-ec").arg(cmd).status().unwrap();
    assert!(st.success(), "host command failed: {cmd}");
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // The read-only share: a 24 MB file, nested files, small files, escaping symlinks.
    sh(&format!(
        "mkdir -p {d}/share/sub/deeper {d}/share/small {d}/outside {d}/vol
         echo {SECRET} > {d}/outside/secret
         echo from-the-host > {d}/share/hello
         head -c 24000000 /dev/urandom > {d}/share/big
         head -c 12345 /dev/urandom > {d}/share/sub/deeper/odd
         ln -s {d}/outside/secret {d}/share/abs-link
         ln -s ../outside/secret {d}/share/rel-link
         ln -s {d}/outside {d}/share/dir-link"
    ));
    for i in 1..=SMALL_FILES {
        std::fs::write(
            dir.path().join(format!("share/small/{i}")),
            format!("small-{i}\n"),
        )
        .unwrap();
    }
    let sums = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {d}/share && sha256sum hello big sub/deeper/odd small/1 small/{SMALL_FILES}"
        ))
        .output()
        .unwrap();
    assert!(sums.status.success());
    // Disks: a blank one for the guest to format, and a small ext4 the host fills.
    sh(&format!(
        "truncate -s 256M {d}/rw.img
         mkdir {d}/ro-content && echo from-the-host > {d}/ro-content/hello
         truncate -s 16M {d}/ro.img && mke2fs -q -t ext4 -d {d}/ro-content -F {d}/ro.img"
    ));
    Fixture {
        dir,
        expected_sums: String::from_utf8(sums.stdout).unwrap(),
    }
}

fn initramfs(f: &Fixture) -> PathBuf {
    let mut b = Initramfs::new(BUSYBOX.as_ref()).unwrap();
    b.init(&init_script(stream_bytes()));
    b.file(
        "expected.sha256",
        0o644,
        f.expected_sums.clone().into_bytes(),
    );
    let mke2fs = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mke2fs (e2fsprogs) is needed for the guest's ext4 check");
    b.program(mke2fs.as_ref(), "/sbin/mke2fs").unwrap();
    b.program(
        env!("CARGO_BIN_EXE_rund-guest-probe").as_ref(),
        "/bin/rund-guest-probe",
    )
    .unwrap();
    let out = f.path("initrd.cpio");
    b.write(&out).unwrap();
    out
}

/// Waits until the console shows `what`; gives up at `deadline` or as soon as the VM has ended.
fn wait_for(console: &MarkerConsole, what: &str, deadline: Instant, vm: &VmHandle) -> bool {
    while Instant::now() < deadline && vm.exit_reason().is_none() {
        if console.text().contains(what) {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    console.text().contains(what)
}

/// Host side of the guest-initiated streams: accepts `STREAMS` connections on `<socket>_PORT`.
fn serve_guest_streams(listener: UnixListener) -> thread::JoinHandle<Vec<Result<u64, String>>> {
    thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..STREAMS {
            match listener.accept() {
                Ok((s, _)) => workers.push(thread::spawn(move || {
                    stream::acceptor(s, |s| s.shutdown(Shutdown::Write))
                        .map(|(bytes, _)| bytes)
                        .map_err(|e| e.to_string())
                })),
                Err(e) => return vec![Err(format!("accept: {e}"))],
            }
        }
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    })
}

/// Host side of the host-initiated streams: CONNECT through the VMM's socket, then the stream.
fn connect_guest_stream(socket: &Path, seed: u64, bytes: u64) -> Result<String, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    writeln!(s, "CONNECT {GUEST_PORT}").map_err(|e| e.to_string())?;
    // Read the OK line byte by byte so that nothing of the stream is buffered away.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' && line.len() < 64 {
        std::io::Read::read_exact(&mut s, &mut byte).map_err(|e| format!("OK line: {e}"))?;
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if !line.starts_with("OK ") {
        return Err(format!("handshake answered {line:?}"));
    }
    stream::connector(s, |s| s.shutdown(Shutdown::Write), seed, bytes).map_err(|e| e.to_string())
}

#[test]
fn devices_serve_the_linux_drivers() {
    let test = "devices_serve_the_linux_drivers";
    let Some(kernel) = require_guest(test, GuestKernel::CondensedElf) else {
        return;
    };
    let f = fixture();
    let initrd = initramfs(&f);
    let bytes = stream_bytes();
    let socket = f.path("vsock.sock");
    // Before the listener: its fd goes with the thread that serves it.
    let before = ProcessFootprint::now().unwrap();
    let host_listener = UnixListener::bind(format!("{}_{HOST_PORT}", socket.display())).unwrap();

    let console = MarkerConsole::echoing();
    let mut config = VmConfig::new(&kernel);
    config.initrd = Some(initrd);
    config.cmdline = GUEST_CMDLINE.into();
    config.vcpus = 2;
    config.mem_mib = 512;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    let share = |tag: &str, dir: &str, read_only: bool| {
        Fs::new(FsConfig {
            tag: tag.into(),
            shared_dir: f.path(dir),
            read_only,
            // As the shim shares them: image layers never change under the guest (`always`,
            // where the guest opens no host file to read one), volumes may (`auto`).
            cache: if read_only {
                CachePolicy::Always
            } else {
                CachePolicy::Auto
            },
            xattr: false,
            ids: GuestIds::any(),
        })
        .unwrap()
    };
    config.devices = vec![
        Arc::new(Mutex::new(Block::new(&f.path("rw.img"), false).unwrap())),
        Arc::new(Mutex::new(Block::new(&f.path("ro.img"), true).unwrap())),
        Arc::new(Mutex::new(share("share", "share", true))),
        Arc::new(Mutex::new(share("vol", "vol", false))),
        Arc::new(Mutex::new(Vsock::new(3, &socket).unwrap())),
    ];
    let guest_streams = serve_guest_streams(host_listener);
    let start = Instant::now();
    let deadline = start + TIMEOUT;
    let handle = Vm::new(config).unwrap().start().unwrap();

    let ready = wait_for(&console, "RUND-VSOCK-READY", deadline, &handle);
    let mut host_streams = Vec::new();
    if ready {
        for i in 0..STREAMS as u64 {
            let socket = socket.clone();
            host_streams.push(thread::spawn(move || {
                connect_guest_stream(&socket, 100 + i, bytes)
            }));
        }
    }
    let host_results: Vec<_> = host_streams
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("panicked".into())))
        .collect();
    let vsock_done = Instant::now();
    // Devices (and the vsock socket file) are gone after this.
    let (exit, report) = rund_tests::wait_or_stop(handle, deadline);
    let text = console.text();
    assert!(
        ready,
        "{test}: the guest never got to its vsock step{report}"
    );
    assert_eq!(
        exit,
        Some(VmExit::GuestReset),
        "{test}: the guest did not finish{report}"
    );

    // Each check exactly once, each ok.
    rund_tests::assert_guest_checks(test, &text, CHECKS);

    // Both directions, every stream whole.
    for r in &host_results {
        assert!(r.is_ok(), "{test}: host-to-guest stream: {r:?}");
    }
    let guest_results = guest_streams.join().unwrap();
    assert_eq!(guest_results.len(), STREAMS);
    for r in &guest_results {
        assert_eq!(r.as_ref(), Ok(&bytes), "{test}: guest-to-host stream");
    }
    eprintln!(
        "{test}: {STREAMS}+{STREAMS} vsock streams of {bytes} bytes done {:?} after start",
        vsock_done - start
    );

    // What the guest wrote reached the host's files; the read-only ones did not change.
    let vol = f.path("vol");
    assert_eq!(
        std::fs::read_to_string(vol.join("written")).unwrap(),
        "from-the-guest\n"
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("a/f")).unwrap(),
        "inside\n"
    );
    let out = Command::new("debugfs")
        .args(["-R", "cat /hello"])
        .arg(f.path("rw.img"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-the-guest\n");
    assert!(!f.path("share/new").exists() && f.path("share/hello").exists());
    assert_eq!(
        std::fs::read_to_string(f.path("outside/secret")).unwrap(),
        format!("{SECRET}\n")
    );
    let after = ProcessFootprint::settled_to(&before).unwrap();
    assert_eq!(after, before, "{test}: the VM left something behind");
    assert!(!socket.exists(), "{test}: the vsock socket was left behind");
}
