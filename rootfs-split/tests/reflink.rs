//! The writable image as a reflink copy on XFS (reflink=1, on a loop device) and the reflink
//! probe. Needs root and xfsprogs: prints why and passes without root, unless
//! RUND_REQUIRE_ROOT_TESTS=1.

mod common;

use std::process::Command;

use common::*;
use rootfs_split::{reflink_supported, CopyMethod, WritableLayer};

/// `filefrag -v`'s extent lines, each with its flags.
fn extents(path: &std::path::Path) -> Vec<String> {
    let out = run(Command::new("filefrag").arg("-v").arg(path));
    out.lines()
        .filter(|l| {
            let l = l.trim_start();
            l.split(':')
                .next()
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn sandbox_images_on_xfs_are_reflinks_sharing_every_extent() {
    if !require_root() {
        return;
    }
    let xfs = XfsLoop::new(600);
    assert!(reflink_supported(xfs.path()).unwrap());
    let fx = Fixture::new();
    let writable = WritableLayer::new(&xfs.path().join("writable"), 256).unwrap();
    let sandboxes = fx.sandboxes(&writable, 2);
    for s in &sandboxes {
        assert_eq!(s.copy_method(), CopyMethod::Reflink);
        let lines = extents(s.image_path());
        assert!(
            !lines.is_empty(),
            "no extents in {}",
            s.image_path().display()
        );
        for line in &lines {
            assert!(
                line.contains("shared"),
                "{}: unshared extent {line}",
                s.image_path().display()
            );
        }
    }
    // The base shares its data extents with the copies too (an unwritten extent, which reads as
    // zeros, has nothing to share: the copies have a hole there).
    let base = extents(&writable.base_image_path());
    assert!(
        base.iter()
            .all(|l| l.contains("shared") || l.contains("unwritten")),
        "{base:?}"
    );
    for s in sandboxes {
        s.destroy().unwrap();
    }
}

#[test]
fn reflink_probe_says_no_on_ext4_and_names_a_missing_directory() {
    if !require_root() {
        return;
    }
    // The work disk here is ext4; elsewhere it may not be, so only check when it is.
    let dir = tempfile::tempdir().unwrap();
    let fs_type = run(Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir.path()));
    if fs_type.trim() == "ext2/ext3" {
        assert!(!reflink_supported(dir.path()).unwrap());
    } else {
        eprintln!(
            "{} is {}: not checking the ext4 answer",
            dir.path().display(),
            fs_type.trim()
        );
    }
    let missing = dir.path().join("missing");
    let e = reflink_supported(&missing).unwrap_err().to_string();
    assert!(e.contains("missing") && e.contains("FICLONE"), "{e}");
}
