//! A read-only or missing hierarchy gives a clear error and leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cgroup_pool::hierarchy::HierarchyError;
use cgroup_pool::{CgroupPool, CgroupVersion, PoolError};
use common::TestEnv;

/// A mount point made for the test; unmounted and removed on drop.
struct TempMount(PathBuf);

impl TempMount {
    fn new(tag: &str) -> TempMount {
        let p = std::env::temp_dir().join(format!("rund-cgroup-ro-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempMount(p)
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn run(cmd: &[&str]) {
    let status = Command::new(cmd[0]).args(&cmd[1..]).status().unwrap();
    assert!(status.success(), "{cmd:?}");
}

fn assert_read_only(env: &TestEnv, mount: &Path) {
    let err = CgroupPool::start(env.config(), &common::is_alive_none).unwrap_err();
    assert!(
        matches!(&err, PoolError::Hierarchy(HierarchyError::ReadOnly { path }) if path == mount),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("read-only") && msg.contains(&mount.display().to_string()),
        "{msg}"
    );
    assert!(!mount.join(&env.parent).exists());
    assert!(!env.state_dir.exists(), "nothing written before the check");
}

#[test]
fn read_only_v1_hierarchy_is_a_clear_error() {
    let Some(mounts) = common::v1_mounts_with(&["pids"]) else {
        return;
    };
    let pids = mounts.iter().find(|m| m.ends_with("pids")).unwrap();
    let ro = TempMount::new("v1");
    run(&[
        "mount",
        "--bind",
        pids.to_str().unwrap(),
        ro.0.to_str().unwrap(),
    ]);
    run(&["mount", "-o", "remount,bind,ro", ro.0.to_str().unwrap()]);
    let env = TestEnv::new(CgroupVersion::V1, vec![ro.0.clone()]);
    assert_read_only(&env, &ro.0);
}

#[test]
fn read_only_v2_hierarchy_is_a_clear_error() {
    if common::v2_mount_with(&[]).is_none() {
        return;
    }
    let ro = TempMount::new("v2");
    run(&[
        "mount",
        "-t",
        "cgroup2",
        "-o",
        "ro",
        "none",
        ro.0.to_str().unwrap(),
    ]);
    let env = TestEnv::new(CgroupVersion::V2, vec![ro.0.clone()]);
    assert_read_only(&env, &ro.0);
}

#[test]
fn missing_hierarchy_is_a_clear_error() {
    for version in [CgroupVersion::V1, CgroupVersion::V2] {
        let env = TestEnv::new(version, vec![PathBuf::from("/nonexistent/cgroup/cpu")]);
        let err = CgroupPool::start(env.config(), &common::is_alive_none).unwrap_err();
        assert!(
            matches!(err, PoolError::Hierarchy(HierarchyError::Missing { .. })),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("/nonexistent/cgroup/cpu does not exist"),
            "{err}"
        );
    }
    // A directory that exists but is no cgroup mount.
    let env = TestEnv::new(CgroupVersion::V1, vec![std::env::temp_dir()]);
    let err = CgroupPool::start(env.config(), &common::is_alive_none).unwrap_err();
    assert!(
        err.to_string()
            .contains("is not a cgroup or cgroup2 mount point"),
        "{err}"
    );
}
