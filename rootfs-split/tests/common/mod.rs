//! Helpers for the root tests: the skip rule, fixtures (layers, volumes, a writable-layer
//! directory), mountinfo checks, and guards that undo test mounts and loop devices even when a
//! test fails.
#![allow(dead_code)] // each test binary uses a part

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_split::mountinfo::{mounts_under, MountInfo};
use rootfs_split::{RootfsMount, SandboxRootfs, WritableLayer};

/// True when the test can run as root. Otherwise prints why and returns false, unless
/// `RUND_REQUIRE_ROOT_TESTS=1`, which makes the missing root a failure (CI).
pub fn require_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let reason = "SKIPPED: needs root (bind mounts, loop devices)";
    if std::env::var("RUND_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{reason}, and RUND_REQUIRE_ROOT_TESTS=1");
    }
    eprintln!("{reason}");
    false
}

/// A scratch tree: `layers/l<i>`, `volumes/`, `writable/`, `state/`.
pub struct Fixture {
    pub root: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        for d in ["layers", "volumes", "writable", "state"] {
            fs::create_dir(root.path().join(d)).unwrap();
        }
        Fixture { root }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.path("state").join(name)
    }

    pub fn writable(&self) -> WritableLayer {
        WritableLayer::new(&self.path("writable"), 16).unwrap()
    }

    /// Sandboxes `sb-<i>` in `state/s<i>`, `0..n`, sharing `writable`.
    pub fn sandboxes(&self, writable: &WritableLayer, n: usize) -> Vec<TestSandbox> {
        (0..n)
            .map(|i| {
                let state = self.state_dir(&format!("s{i}"));
                TestSandbox::create(&state, &format!("sb-{i}"), writable)
            })
            .collect()
    }

    /// Layer directory `l<i>` with `only-<i>`, a shared name `common` and a subdirectory.
    pub fn layer(&self, i: usize) -> PathBuf {
        let dir = self.path(&format!("layers/l{i}"));
        if !dir.exists() {
            fs::create_dir_all(dir.join("etc")).unwrap();
            fs::write(dir.join(format!("only-{i}")), format!("{i}")).unwrap();
            fs::write(dir.join("common"), format!("layer {i}")).unwrap();
            fs::write(dir.join("etc/conf"), format!("conf {i}")).unwrap();
        }
        dir
    }

    pub fn volume_dir(&self, name: &str) -> PathBuf {
        let dir = self.path(&format!("volumes/{name}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("data"), name).unwrap();
        dir
    }

    pub fn volume_file(&self, name: &str) -> PathBuf {
        let file = self.path(&format!("volumes/{name}"));
        fs::write(&file, name).unwrap();
        file
    }

    /// containerd's overlay mount for layers `0..n` (top first), with upper and work dirs.
    pub fn overlay(&self, n: usize) -> RootfsMount {
        let lowers: Vec<String> = (0..n)
            .map(|i| self.layer(i).display().to_string())
            .collect();
        let upper = self.path("upper");
        let work = self.path("work");
        fs::create_dir_all(&upper).unwrap();
        fs::create_dir_all(&work).unwrap();
        RootfsMount::new(
            "overlay",
            "overlay",
            &[
                "index=off",
                &format!("workdir={}", work.display()),
                &format!("upperdir={}", upper.display()),
                &format!("lowerdir={}", lowers.join(":")),
            ],
        )
    }
}

/// A sandbox that is cleaned up (from its record) if the test fails before destroying it, so
/// a failing test leaves no mount behind.
pub struct TestSandbox {
    inner: Option<SandboxRootfs>,
    state_dir: PathBuf,
}

impl TestSandbox {
    pub fn create(state_dir: &Path, sandbox_id: &str, writable: &WritableLayer) -> TestSandbox {
        TestSandbox::from(SandboxRootfs::create(state_dir, sandbox_id, writable).unwrap())
    }

    pub fn destroy(mut self) -> Result<(), rootfs_split::RootfsError> {
        self.inner.take().expect("destroyed once").destroy()
    }
}

impl From<SandboxRootfs> for TestSandbox {
    fn from(sandbox: SandboxRootfs) -> TestSandbox {
        TestSandbox {
            state_dir: sandbox.state_dir().to_owned(),
            inner: Some(sandbox),
        }
    }
}

impl std::ops::Deref for TestSandbox {
    type Target = SandboxRootfs;
    fn deref(&self) -> &SandboxRootfs {
        self.inner.as_ref().expect("not destroyed")
    }
}

impl std::ops::DerefMut for TestSandbox {
    fn deref_mut(&mut self) -> &mut SandboxRootfs {
        self.inner.as_mut().expect("not destroyed")
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        // The live value holds the state directory's lock: release it first.
        if self.inner.take().is_some() {
            if let Err(e) = SandboxRootfs::cleanup(&self.state_dir) {
                eprintln!("cleaning up after a failed test: {e}");
            }
        }
    }
}

/// Every file below `dir` with its contents, to show a tree unchanged.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                out.push((p.clone(), Vec::new()));
                stack.push(p);
            } else {
                out.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
    }
    out
}

pub fn mounts(dir: &Path) -> Vec<MountInfo> {
    mounts_under(&fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned())).unwrap()
}

pub fn assert_nothing_mounted(dir: &Path) {
    let left = mounts(dir);
    assert!(
        left.is_empty(),
        "still mounted below {}: {left:#?}",
        dir.display()
    );
}

/// After create and before any container: exactly the two shares' own bind mounts.
pub fn assert_only_shares_mounted(sandbox: &SandboxRootfs) {
    let points: Vec<PathBuf> = mounts(sandbox.state_dir())
        .into_iter()
        .map(|m| m.mount_point)
        .collect();
    let want = vec![
        sandbox.state_dir().join("share-ro"),
        sandbox.state_dir().join("share-rw"),
    ];
    assert_eq!(points, want);
}

/// After destroy or cleanup: no mount, no share directory, no record or lock, no image.
pub fn assert_all_gone(state_dir: &Path, image: &Path) {
    assert_nothing_mounted(state_dir);
    for name in [
        "share-ro",
        "share-rw",
        "rootfs.json",
        "rootfs.lock",
        ".rootfs.json.tmp",
    ] {
        let p = state_dir.join(name);
        assert!(p.symlink_metadata().is_err(), "{} is left", p.display());
    }
    assert!(!image.exists(), "{} is left", image.display());
}

/// The errno of a failed io call.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test's own mount, taken off (lazily if busy) when dropped.
pub struct MountGuard(pub PathBuf);

impl MountGuard {
    pub fn tmpfs(dir: &Path, propagation: Option<&str>) -> MountGuard {
        fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(dir));
        let guard = MountGuard(dir.to_owned());
        if let Some(p) = propagation {
            run(Command::new("mount").arg(format!("--make-{p}")).arg(dir));
        }
        guard
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        use rustix::mount::{unmount, UnmountFlags};
        if unmount(&self.0, UnmountFlags::empty()).is_err() {
            let _ = unmount(&self.0, UnmountFlags::DETACH);
        }
    }
}

/// A loop device, detached (`losetup -d`) when dropped.
pub struct LoopDevice(pub String);

impl LoopDevice {
    pub fn attach(image: &Path) -> LoopDevice {
        let out = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image));
        LoopDevice(out.trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// An XFS filesystem with reflink on a loop device, mounted; all undone on drop (fields drop in
/// order: unmount, detach the loop device, remove the image).
pub struct XfsLoop {
    pub mount: MountGuard,
    _device: LoopDevice,
    _dir: tempfile::TempDir,
}

impl XfsLoop {
    pub fn new(size_mib: u64) -> XfsLoop {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("xfs.img");
        fs::File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image));
        let device = LoopDevice::attach(&image);
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        run(Command::new("mount").arg(&device.0).arg(&mnt));
        XfsLoop {
            mount: MountGuard(mnt),
            _device: device,
            _dir: dir,
        }
    }

    pub fn path(&self) -> &Path {
        &self.mount.0
    }
}

/// ext4's filesystem UUID (superblock at 1024, s_uuid at 0x68).
pub fn ext4_uuid(image: &Path) -> [u8; 16] {
    use std::os::unix::fs::FileExt;
    let mut uuid = [0u8; 16];
    fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut uuid, 1024 + 0x68)
        .unwrap();
    uuid
}
