//! Cleanup from the record alone: after a process holding a sandbox was killed with SIGKILL,
//! with actions recorded as started but never finished, and with records that must be refused.
//! Needs root: prints why and passes without it, unless RUND_REQUIRE_ROOT_TESTS=1.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use rootfs_split::{RootfsError, SandboxRootfs, Share};

/// Set in the child process: the fixture directory to build the sandbox in.
const CHILD_DIR_ENV: &str = "RUND_ROOTFS_CRASH_CHILD_DIR";
const READY: &str = "rootfs-crash-child: ready";

/// The child half of `sigkill_then_cleanup_removes_everything`: builds a sandbox with layers and
/// volumes, says so, and waits to be killed.
#[test]
#[ignore = "run as a child process by sigkill_then_cleanup_removes_everything"]
fn crash_child() {
    let dir = std::env::var_os(CHILD_DIR_ENV).expect("only run by the parent test");
    let fx = Fixture {
        root: tempfile::TempDir::new_in(&dir).unwrap(),
    };
    let state = Path::new(&dir).join("state");
    let writable = rootfs_split::WritableLayer::new(&Path::new(&dir).join("writable"), 16).unwrap();
    let mut sandbox = SandboxRootfs::create(&state, "crashed", &writable).unwrap();
    sandbox.add_container("c1", &[fx.overlay(2)]).unwrap();
    sandbox
        .add_volume("c1", &fx.volume_dir("ro"), true)
        .unwrap();
    sandbox
        .add_volume("c1", &fx.volume_dir("rw"), false)
        .unwrap();
    sandbox
        .add_volume("c1", &fx.volume_file("file"), false)
        .unwrap();
    sandbox.add_container("c2", &[fx.overlay(1)]).unwrap();
    println!("{READY}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[test]
fn sigkill_then_cleanup_removes_everything() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .any(|l| l.is_ok_and(|l| l.contains(READY)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    if !ready {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        SandboxRootfs::cleanup(&state).ok();
        panic!("the child did not get ready: {err}");
    }
    // The killed process left its mounts (2 shares, 3 layers, 3 volumes), image and record.
    assert_eq!(mounts(&state).len(), 8, "{:#?}", mounts(&state));
    let image = dir.path().join("writable/sandboxes/crashed.ext4");
    assert!(image.is_file());
    assert!(state.join("rootfs.json").is_file());

    SandboxRootfs::cleanup(&state).unwrap();
    assert_all_gone(&state, &image);
    // Sources untouched: the read-write volume's data is still there.
    let fixture = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("volumes").is_dir())
        .unwrap();
    assert_eq!(
        fs::read_to_string(fixture.join("volumes/rw/data")).unwrap(),
        "rw"
    );
    assert_eq!(
        fs::read_to_string(fixture.join("layers/l1/common")).unwrap(),
        "layer 1"
    );
    // Idempotent.
    SandboxRootfs::cleanup(&state).unwrap();
    SandboxRootfs::cleanup(&dir.path().join("never-existed")).unwrap();
}

/// A record as a killed shim may leave it (the format docs/rootfs-split.md describes): actions
/// started but not finished, objects that exist without their mount, objects never made.
#[test]
fn cleanup_tolerates_actions_started_but_not_finished() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let writable = dir.path().join("writable");
    fs::create_dir_all(state.join("share-ro/c1/layer-0")).unwrap();
    fs::create_dir_all(writable.join("sandboxes")).unwrap();
    fs::write(writable.join("sandboxes/sb.ext4"), b"half a copy").unwrap();
    let record = format!(
        r#"{{"version": 1, "sandbox_id": "sb", "writable_dir": "{}", "entries": [
            {{"seq": 0, "progress": "done", "action": "share_dir", "share": "ro"}},
            {{"seq": 1, "progress": "started", "action": "share_dir", "share": "rw"}},
            {{"seq": 2, "progress": "started", "action": "image"}},
            {{"seq": 3, "progress": "done", "action": "container_dir", "share": "ro", "container": "c1"}},
            {{"seq": 4, "progress": "started", "action": "mount", "share": "ro", "container": "c1",
              "kind": "layer", "index": 0, "source": "/var/lib/containerd/l0"}},
            {{"seq": 5, "progress": "started", "action": "mount", "share": "ro", "container": "c1",
              "kind": "layer", "index": 1, "source": "/var/lib/containerd/l1"}}
        ]}}"#,
        writable.display()
    );
    fs::write(state.join("rootfs.json"), record).unwrap();
    SandboxRootfs::cleanup(&state).unwrap();
    assert_all_gone(&state, &writable.join("sandboxes/sb.ext4"));
    assert!(writable.join("sandboxes").is_dir());
    assert!(
        state.is_dir(),
        "the state directory itself is not rootfs-split's to remove"
    );
}

/// Records that would make cleanup touch something outside the state and writable-layer
/// directories are refused, and nothing is removed.
#[test]
fn cleanup_refuses_records_naming_paths_outside() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let victim = dir.path().join("victim");
    fs::create_dir_all(victim.join("sandboxes")).unwrap();
    fs::write(victim.join("sandboxes/sb.ext4"), b"keep").unwrap();
    fs::create_dir_all(state.join("share-ro")).unwrap();
    let entries_escaping = r#"{"seq": 0, "progress": "done", "action": "container_dir", "share": "ro", "container": "../../victim"}"#;
    let cases = [
        (
            format!("/{}", "tmp/../etc"),
            "[]".to_string(),
            "writable_dir",
        ),
        ("relative".to_string(), "[]".to_string(), "writable_dir"),
        (
            victim.display().to_string(),
            format!("[{entries_escaping}]"),
            "container id",
        ),
        (
            victim.display().to_string(),
            "[{\"seq\": 0, \"progress\": \"done\", \"action\": \"rm_rf\"}]".into(),
            "rm_rf",
        ),
    ];
    for (writable_dir, entries, why) in cases {
        let record = format!(
            r#"{{"version": 1, "sandbox_id": "sb", "writable_dir": "{writable_dir}", "entries": {entries}}}"#
        );
        fs::write(state.join("rootfs.json"), &record).unwrap();
        let e = SandboxRootfs::cleanup(&state).unwrap_err();
        assert!(matches!(e, RootfsError::Record(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(why) && msg.contains("rootfs.json"),
            "{record}: {msg}"
        );
        assert!(state.join("rootfs.json").is_file());
        assert!(state.join(Share::ReadOnly.dir_name()).is_dir());
        assert_eq!(fs::read(victim.join("sandboxes/sb.ext4")).unwrap(), b"keep");
    }
    let e = {
        let record =
            r#"{"version": 1, "sandbox_id": "../sb", "writable_dir": "/w", "entries": []}"#;
        fs::write(state.join("rootfs.json"), record).unwrap();
        SandboxRootfs::cleanup(&state).unwrap_err()
    };
    assert!(e.to_string().contains("sandbox id"), "{e}");
}

/// Without a record, mounts below the shares still come off; the directories stay, named.
#[test]
fn cleanup_without_a_record_unmounts_and_reports_leftovers() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let stray = MountGuard::tmpfs(&state.join("share-rw/c1/volume-0"), None);
    let e = SandboxRootfs::cleanup(&state).unwrap_err();
    assert!(matches!(e, RootfsError::Unrecorded { .. }), "{e:?}");
    assert!(e.to_string().contains("share-rw"), "{e}");
    assert_nothing_mounted(&state);
    assert!(stray.0.is_dir());
}
