//! Where the filesystem has no reflink, each sandbox image is a sparse copy of the base (holes
//! kept) and the fallback is logged once per process. One test in its own binary: "once per
//! process" is the property. Needs root (the shares are bind mounts): prints why and passes
//! without it, unless RUND_REQUIRE_ROOT_TESTS=1.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use rootfs_split::{reflink_supported, CopyMethod, WritableLayer};

static FALLBACK_WARNINGS: AtomicUsize = AtomicUsize::new(0);

struct CountingLogger;

impl log::Log for CountingLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let text = record.args().to_string();
        if record.level() == log::Level::Warn && text.contains("sparse copies") {
            FALLBACK_WARNINGS.fetch_add(1, Ordering::SeqCst);
        }
        eprintln!("{}: {text}", record.level());
    }
    fn flush(&self) {}
}

/// A directory without reflink: /tmp here (ext4); /dev/shm (tmpfs) where /tmp has reflink.
fn no_reflink_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    if !reflink_supported(tmp.path()).unwrap() {
        return tmp;
    }
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    assert!(
        !reflink_supported(shm.path()).unwrap(),
        "no filesystem without reflink found"
    );
    shm
}

#[test]
fn sparse_copies_keep_holes_and_the_fallback_is_logged_once() {
    if !require_root() {
        return;
    }
    log::set_logger(&CountingLogger).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let dir = no_reflink_dir();
    let fx = Fixture::new();
    let writable = WritableLayer::new(dir.path(), 128).unwrap();
    let sandboxes = fx.sandboxes(&writable, 3);
    let base_path = writable.base_image_path();
    let base = fs::read(&base_path).unwrap();
    let base_meta = fs::metadata(&base_path).unwrap();
    for s in &sandboxes {
        assert_eq!(s.copy_method(), CopyMethod::SparseCopy);
        let meta = fs::metadata(s.image_path()).unwrap();
        assert_eq!(meta.len(), 128 << 20);
        // Holes kept: no more blocks than the base (which is mostly holes itself).
        assert!(
            meta.blocks() <= base_meta.blocks(),
            "{} > {}",
            meta.blocks(),
            base_meta.blocks()
        );
        assert!(meta.blocks() * 512 < (8 << 20), "{} blocks", meta.blocks());
        assert!(
            fs::read(s.image_path()).unwrap() == base,
            "{} differs from the base",
            s.image_path().display()
        );
    }
    assert_eq!(FALLBACK_WARNINGS.load(Ordering::SeqCst), 1);
    let images: Vec<PathBuf> = sandboxes
        .iter()
        .map(|s| s.image_path().to_owned())
        .collect();
    for s in sandboxes {
        s.destroy().unwrap();
    }
    assert!(images.iter().all(|p| !p.exists()));
}
