//! A live sandbox's rootfs with real mounts: layers, volumes, bad input, remove, destroy. Needs
//! root: prints why and passes without it, unless RUND_REQUIRE_ROOT_TESTS=1.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use common::*;
use rootfs_split::{RootfsError, RootfsMount, SandboxRootfs, Share, SharePath, WritableLayer};

const EROFS: i32 = libc::EROFS;

fn expect_erofs(result: std::io::Result<impl Sized>, what: &Path) {
    match result {
        Ok(_) => panic!("writing {} succeeded", what.display()),
        Err(e) => assert_eq!(errno(&e), EROFS, "{}: {e}", what.display()),
    }
}

/// Writes through a read-only share path fail with EROFS: a new file, an existing file, mkdir.
fn assert_read_only(dir: &Path, existing: &str) {
    expect_erofs(fs::write(dir.join("new-file"), b"x"), &dir.join("new-file"));
    expect_erofs(
        fs::OpenOptions::new().write(true).open(dir.join(existing)),
        &dir.join(existing),
    );
    expect_erofs(fs::create_dir(dir.join("new-dir")), &dir.join("new-dir"));
}

#[test]
fn overlay_layers_one_to_three_are_read_only_in_the_share() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let state = fx.state_dir("sb");
    let sandbox_image;
    {
        let mut sandbox = TestSandbox::create(&state, "sb", &fx.writable());
        sandbox_image = sandbox.image_path().to_owned();
        assert!(sandbox_image.is_file());
        assert_only_shares_mounted(&sandbox);
        (0..3).for_each(|i| drop(fx.layer(i)));
        let before = snapshot(&fx.path("layers"));
        for n in 1..=3 {
            let container = format!("c{n}");
            let rootfs = sandbox.add_container(&container, &[fx.overlay(n)]).unwrap();
            let want: Vec<PathBuf> = (0..n)
                .map(|i| PathBuf::from(format!("{container}/layer-{i}")))
                .collect();
            assert_eq!(rootfs.lower_dirs, want, "top first");
            assert_eq!(rootfs.container_id, container);
            let share_ro = sandbox.share_dir(Share::ReadOnly);
            for (i, rel) in rootfs.lower_dirs.iter().enumerate() {
                let dir = share_ro.join(rel);
                assert_eq!(
                    fs::read_to_string(dir.join("common")).unwrap(),
                    format!("layer {i}")
                );
                assert_eq!(
                    fs::read_to_string(dir.join(format!("only-{i}"))).unwrap(),
                    i.to_string()
                );
                assert_read_only(&dir, "common");
                assert_read_only(&dir.join("etc"), "conf");
            }
        }
        // containerd's upperdir and workdir were not touched.
        assert_eq!(fs::read_dir(fx.path("upper")).unwrap().count(), 0);
        assert_eq!(snapshot(&fx.path("layers")), before, "layers changed");
        // Every mount is read-only and private.
        let all = mounts(sandbox.state_dir());
        assert_eq!(all.len(), 2 + 1 + 2 + 3);
        for m in &all {
            assert!(m.is_read_only(), "{m:?}");
            assert!(m.is_private(), "{m:?}");
        }
        // The shares' roots are read-only too: nothing can be created beside the mount points.
        for share in Share::ALL {
            expect_erofs(
                fs::create_dir(sandbox.share_dir(share).join("x")),
                &sandbox.share_dir(share),
            );
        }
        sandbox.destroy().unwrap();
    }
    assert_all_gone(&state, &sandbox_image);
    assert_eq!(
        fs::read_dir(fx.path("writable/sandboxes")).unwrap().count(),
        0
    );
    assert!(fx.path("layers/l0/common").is_file());
}

#[test]
fn bind_rootfs_is_one_read_only_layer() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let mut sandbox = TestSandbox::create(&fx.state_dir("sb"), "sb", &fx.writable());
    let layer = fx.layer(0);
    for (container, options) in [("view", ["rbind", "ro"]), ("native", ["rbind", "rw"])] {
        let mount = RootfsMount::new("bind", &layer, &options);
        let rootfs = sandbox.add_container(container, &[mount]).unwrap();
        assert_eq!(
            rootfs.lower_dirs,
            vec![PathBuf::from(format!("{container}/layer-0"))]
        );
        let dir = sandbox
            .share_dir(Share::ReadOnly)
            .join(&rootfs.lower_dirs[0]);
        assert_eq!(fs::read_to_string(dir.join("common")).unwrap(), "layer 0");
        assert_read_only(&dir, "common");
    }
    sandbox.destroy().unwrap();
}

#[test]
fn volumes_read_only_and_read_write_directories_and_files() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let state = fx.state_dir("sb");
    let mut sandbox = TestSandbox::create(&state, "sb", &fx.writable());
    let ro_dir = fx.volume_dir("ro-dir");
    let rw_dir = fx.volume_dir("rw-dir");
    let ro_file = fx.volume_file("ro-file");
    let rw_file = fx.volume_file("rw-file");

    let p = sandbox.add_volume("c1", &ro_dir, true).unwrap();
    assert_eq!(
        p,
        SharePath {
            share: Share::ReadOnly,
            path: "c1/volume-0".into()
        }
    );
    let shared = sandbox.share_dir(Share::ReadOnly).join(&p.path);
    assert_eq!(fs::read_to_string(shared.join("data")).unwrap(), "ro-dir");
    assert_read_only(&shared, "data");

    let p = sandbox.add_volume("c1", &rw_dir, false).unwrap();
    assert_eq!(
        p,
        SharePath {
            share: Share::ReadWrite,
            path: "c1/volume-1".into()
        }
    );
    let shared = sandbox.share_dir(Share::ReadWrite).join(&p.path);
    fs::write(shared.join("from-guest"), b"hello").unwrap();
    assert_eq!(fs::read(rw_dir.join("from-guest")).unwrap(), b"hello");

    let p = sandbox.add_volume("c1", &ro_file, true).unwrap();
    let shared = sandbox.share_dir(p.share).join(&p.path);
    assert_eq!(fs::read_to_string(&shared).unwrap(), "ro-file");
    expect_erofs(fs::OpenOptions::new().append(true).open(&shared), &shared);

    let p = sandbox.add_volume("c1", &rw_file, false).unwrap();
    assert_eq!(p.share, Share::ReadWrite);
    let shared = sandbox.share_dir(p.share).join(&p.path);
    fs::OpenOptions::new()
        .append(true)
        .open(&shared)
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert_eq!(fs::read_to_string(&rw_file).unwrap(), "rw-file+");

    // A container's rootfs and volumes together; volumes of another container number from 0.
    sandbox.add_container("c1", &[fx.overlay(2)]).unwrap();
    let p = sandbox.add_volume("c2", &rw_dir, false).unwrap();
    assert_eq!(p.path, PathBuf::from("c2/volume-0"));
    for m in mounts(&state) {
        assert!(m.is_private(), "{m:?}");
    }
    let image = sandbox.image_path().to_owned();
    sandbox.destroy().unwrap();
    assert_all_gone(&state, &image);
    // The volumes' sources keep their data.
    assert_eq!(fs::read(rw_dir.join("from-guest")).unwrap(), b"hello");
    assert_eq!(fs::read_to_string(&ro_file).unwrap(), "ro-file");
}

#[test]
fn read_only_volume_is_read_only_in_its_submounts_too() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let source = fx.volume_dir("with-submount");
    let sub = MountGuard::tmpfs(&source.join("sub"), None);
    fs::write(sub.0.join("inner"), b"inner").unwrap();
    let mut sandbox = TestSandbox::create(&fx.state_dir("sb"), "sb", &fx.writable());
    let p = sandbox.add_volume("c1", &source, true).unwrap();
    let shared = sandbox.share_dir(Share::ReadOnly).join(&p.path);
    assert_eq!(fs::read(shared.join("sub/inner")).unwrap(), b"inner");
    assert_read_only(&shared.join("sub"), "inner");
    // The same submount stays writable through a read-write volume.
    let p = sandbox.add_volume("c1", &source, false).unwrap();
    let shared = sandbox.share_dir(Share::ReadWrite).join(&p.path);
    fs::write(shared.join("sub/written"), b"w").unwrap();
    assert_eq!(fs::read(sub.0.join("written")).unwrap(), b"w");
    sandbox.destroy().unwrap();
    // The test's own submount is still there (only rund's copies went).
    assert_eq!(fs::read(sub.0.join("inner")).unwrap(), b"inner");
}

/// A state directory under a shared mount (as /run is under systemd): rund's mounts are still
/// private, so nothing propagates to the parent's peers.
#[test]
fn mounts_under_a_shared_parent_are_private() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let parent = MountGuard::tmpfs(&fx.path("shared-run"), Some("shared"));
    let state = parent.0.join("sb");
    let mut sandbox = TestSandbox::create(&state, "sb", &fx.writable());
    sandbox.add_container("c1", &[fx.overlay(2)]).unwrap();
    sandbox
        .add_volume("c1", &fx.volume_dir("v"), false)
        .unwrap();
    let all = mounts(&state);
    assert_eq!(all.len(), 5);
    for m in &all {
        assert!(m.is_private(), "{m:?}");
    }
    sandbox.destroy().unwrap();
    assert_nothing_mounted(&state);
    assert_eq!(mounts(&parent.0).len(), 1, "only the test's own tmpfs");
}

#[test]
fn bad_rootfs_mounts_are_refused_and_leave_nothing() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let mut sandbox = TestSandbox::create(&fx.state_dir("sb"), "sb", &fx.writable());
    let l0 = fx.layer(0).display().to_string();
    let missing = fx.path("layers/missing").display().to_string();
    let cases = vec![
        (vec![RootfsMount::new("erofs", "/x.img", &[])], "erofs"),
        (
            vec![RootfsMount::new("overlay", "overlay", &["upperdir=/u"])],
            "no lowerdir",
        ),
        (
            vec![RootfsMount::new("bind", "relative/dir", &["rbind"])],
            "relative/dir",
        ),
        (
            vec![RootfsMount::new(
                "overlay",
                "overlay",
                &[&format!("lowerdir={l0}:{missing}")],
            )],
            "missing",
        ),
        (
            vec![RootfsMount::new(
                "overlay",
                "overlay",
                &[&format!("lowerdir={l0}"), "metacopy=on"],
            )],
            "metacopy=on",
        ),
        (vec![], "no rootfs mount"),
    ];
    for (mounts_in, want) in cases {
        let e = sandbox.add_container("c1", &mounts_in).unwrap_err();
        assert!(matches!(e, RootfsError::Spec { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(want) && msg.contains("c1"),
            "{mounts_in:?}: {msg}"
        );
        assert_only_shares_mounted(&sandbox);
        assert!(!sandbox.share_dir(Share::ReadOnly).join("c1").exists());
    }
    for (container, source) in [
        ("c1", "relative"),
        ("c1", "/nonexistent/vol"),
        ("c1", "/dev/null"),
    ] {
        let e = sandbox
            .add_volume(container, Path::new(source), true)
            .unwrap_err();
        assert!(e.to_string().contains(source), "{e}");
        assert_only_shares_mounted(&sandbox);
    }
    let e = sandbox
        .add_container("../c1", &[fx.overlay(1)])
        .unwrap_err();
    assert!(matches!(e, RootfsError::Id(_)), "{e:?}");
    assert_only_shares_mounted(&sandbox);
    sandbox.destroy().unwrap();
}

/// A layer that passes every check but cannot be cloned (an unbindable mount): the layers
/// already mounted by the same call come off again, and its directories go.
#[test]
fn failure_in_the_middle_undoes_the_layers_already_mounted() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let unbindable = MountGuard::tmpfs(&fx.path("layers/unbindable"), Some("unbindable"));
    let mut sandbox = TestSandbox::create(&fx.state_dir("sb"), "sb", &fx.writable());
    let lowerdir = format!(
        "lowerdir={}:{}:{}",
        fx.layer(0).display(),
        fx.layer(1).display(),
        unbindable.0.display()
    );
    let e = sandbox
        .add_container(
            "c1",
            &[RootfsMount::new("overlay", "overlay", &[&lowerdir])],
        )
        .unwrap_err();
    assert!(matches!(e, RootfsError::Mount(_)), "{e:?}");
    assert!(e.to_string().contains("unbindable"), "{e}");
    assert_only_shares_mounted(&sandbox);
    assert!(!sandbox.share_dir(Share::ReadOnly).join("c1").exists());

    // The same for a volume, in a container that has a rootfs already: its directory stays.
    sandbox.add_container("c2", &[fx.overlay(1)]).unwrap();
    assert!(sandbox.add_volume("c2", &unbindable.0, true).is_err());
    assert!(sandbox.add_volume("c3", &unbindable.0, false).is_err());
    assert!(sandbox
        .share_dir(Share::ReadOnly)
        .join("c2/layer-0/common")
        .is_file());
    assert!(!sandbox
        .share_dir(Share::ReadOnly)
        .join("c2/volume-0")
        .exists());
    assert!(!sandbox.share_dir(Share::ReadWrite).join("c3").exists());
    assert_eq!(mounts(sandbox.state_dir()).len(), 3);
    // And the container still works afterwards.
    let p = sandbox.add_volume("c2", &fx.volume_dir("v"), true).unwrap();
    assert_eq!(p.path, PathBuf::from("c2/volume-0"));
    sandbox.destroy().unwrap();
}

#[test]
fn remove_container_undoes_only_that_container() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let mut sandbox = TestSandbox::create(&fx.state_dir("sb"), "sb", &fx.writable());
    sandbox.add_container("c1", &[fx.overlay(3)]).unwrap();
    sandbox
        .add_volume("c1", &fx.volume_dir("a"), false)
        .unwrap();
    sandbox
        .add_volume("c1", &fx.volume_file("f"), true)
        .unwrap();
    sandbox.add_container("c2", &[fx.overlay(1)]).unwrap();
    let e = sandbox.add_container("c2", &[fx.overlay(2)]).unwrap_err();
    assert!(matches!(e, RootfsError::ContainerExists(_)), "{e:?}");
    assert_eq!(mounts(sandbox.state_dir()).len(), 2 + 3 + 2 + 1);

    sandbox.remove_container("c1").unwrap();
    for share in Share::ALL {
        assert!(!sandbox.share_dir(share).join("c1").exists());
    }
    assert_eq!(mounts(sandbox.state_dir()).len(), 2 + 1);
    let c2 = sandbox.share_dir(Share::ReadOnly).join("c2/layer-0/common");
    assert_eq!(fs::read_to_string(c2).unwrap(), "layer 0");
    sandbox.remove_container("c1").unwrap();
    // c1 can come back.
    sandbox.add_container("c1", &[fx.overlay(1)]).unwrap();
    assert_eq!(fs::read_to_string(fx.path("volumes/a/data")).unwrap(), "a");
    sandbox.destroy().unwrap();
}

/// A second sandbox rootfs in the same state directory, or a cleanup while the first lives,
/// is refused.
#[test]
fn a_live_sandbox_cannot_be_made_twice_or_cleaned_up() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let state = fx.state_dir("sb");
    let sandbox = TestSandbox::create(&state, "sb", &fx.writable());
    let e = SandboxRootfs::create(&state, "sb", &fx.writable()).unwrap_err();
    assert!(matches!(e, RootfsError::InUse(_)), "{e:?}");
    let e = SandboxRootfs::cleanup(&state).unwrap_err();
    assert!(matches!(e, RootfsError::InUse(_)), "{e:?}");
    assert_eq!(mounts(&state).len(), 2);
    sandbox.destroy().unwrap();
    SandboxRootfs::cleanup(&state).unwrap();
}

/// An image left by an earlier sandbox of the same id makes create fail, and is not removed by
/// the failed create's rollback.
#[test]
fn an_existing_image_is_refused_and_kept() {
    if !require_root() {
        return;
    }
    let fx = Fixture::new();
    let writable = fx.writable();
    let image = writable.sandbox_image_path("sb");
    fs::write(&image, b"an earlier sandbox's").unwrap();
    let state = fx.state_dir("sb");
    let e = SandboxRootfs::create(&state, "sb", &writable).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(fs::read(&image).unwrap(), b"an earlier sandbox's");
    assert_nothing_mounted(&state);
    for name in ["share-ro", "share-rw", "rootfs.json"] {
        assert!(!state.join(name).exists(), "{name} is left");
    }
}

/// Eight shims starting at once (each with its own WritableLayer) make the base image once:
/// every sandbox's image carries the same filesystem UUID as the one base.
#[test]
fn base_image_is_made_once_by_eight_threads() {
    if !require_root() {
        return;
    }
    let fx = Arc::new(Fixture::new());
    let dir = fx.path("writable");
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (fx, dir, barrier) = (fx.clone(), dir.clone(), barrier.clone());
            std::thread::spawn(move || {
                let layer = WritableLayer::new(&dir, 32).unwrap();
                barrier.wait();
                SandboxRootfs::create(&fx.state_dir(&format!("s{i}")), &format!("sb-{i}"), &layer)
                    .unwrap()
            })
        })
        .collect();
    let sandboxes: Vec<TestSandbox> = threads
        .into_iter()
        .map(|t| TestSandbox::from(t.join().unwrap()))
        .collect();
    let base = dir.join("base-32M.ext4");
    let uuid = ext4_uuid(&base);
    for s in &sandboxes {
        assert_eq!(
            ext4_uuid(s.image_path()),
            uuid,
            "{}",
            s.image_path().display()
        );
    }
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [".base-32M.ext4.lock", "base-32M.ext4", "sandboxes"]);
    for s in sandboxes {
        s.destroy().unwrap();
    }
    assert_eq!(fs::read_dir(dir.join("sandboxes")).unwrap().count(), 0);
}
