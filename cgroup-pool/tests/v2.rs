//! The pool on cgroup v2 (real cgroups; needs root). The limit tests need a cgroup2 offering the
//! cpu, cpuset, memory and pids controllers (the testbed's pure cgroup2); the others also run on
//! a hybrid host's /sys/fs/cgroup/unified. Without what a test needs it prints SKIPPED and
//! returns, unless RUND_REQUIRE_CGROUP_V2=1, which makes that a failure.

mod common;

use cgroup_pool::naming::Marker;
use cgroup_pool::{cgroupfs, CgroupPool, CgroupVersion, Placement};
use common::scenarios::{self, exists_all, make_foreign, no_limits, tasks_in};
use common::{id, read, Sleeper, TestEnv};
use oci_spec::runtime::{LinuxPidsBuilder, LinuxResourcesBuilder};

const ALL: &[&str] = &["cpu", "cpuset", "memory", "pids"];

fn env(needed: &[&str]) -> Option<TestEnv> {
    common::v2_mount_with(needed).map(|m| TestEnv::new(CgroupVersion::V2, vec![m]))
}

#[test]
fn v2_acquire_release_with_limits_and_a_process() {
    if let Some(env) = env(ALL) {
        scenarios::acquire_release_with_limits(&env);
    }
}

#[test]
fn v2_hundred_concurrent_acquires() {
    if let Some(env) = env(&[]) {
        scenarios::hundred_concurrent_acquires(&env);
    }
}

#[test]
fn v2_dry_pool_falls_back() {
    if let Some(env) = env(&[]) {
        scenarios::dry_pool_falls_back(&env);
    }
}

#[test]
fn v2_dictated_parent_bypasses_the_pool() {
    if let Some(env) = env(&[]) {
        scenarios::dictated_parent_bypasses(&env, &no_limits(), false);
    }
}

#[test]
fn v2_dictated_parent_with_limits() {
    if let Some(env) = env(ALL) {
        // The kubelet enables controllers for its pod cgroups; do the same for the test's.
        let root = &env.mounts[0];
        std::fs::write(root.join("cgroup.subtree_control"), "+pids").unwrap();
        let res = LinuxResourcesBuilder::default()
            .pids(LinuxPidsBuilder::default().limit(10i64).build().unwrap())
            .build()
            .unwrap();
        let kube = env.sibling("kubepods");
        std::fs::create_dir(root.join(&kube)).unwrap();
        std::fs::write(root.join(&kube).join("cgroup.subtree_control"), "+pids").unwrap();
        std::fs::create_dir(root.join(&kube).join("pod-1234")).unwrap();
        std::fs::write(
            root.join(&kube).join("pod-1234/cgroup.subtree_control"),
            "+pids",
        )
        .unwrap();
        let (pool, _) = CgroupPool::start(env.config(), &common::is_alive_none).unwrap();
        let sb = id("kube-limits");
        let cg = pool
            .acquire_at(&sb, &format!("/{kube}/pod-1234/{sb}"), &res)
            .unwrap();
        assert_eq!(read(&cg.path_for("pids").unwrap().join("pids.max")), "10");
        assert_eq!(pool.stats().bypassed, 1);
        pool.release(&sb).unwrap();
        pool.drain().unwrap();
    }
}

#[test]
fn v2_bad_input_leaks_nothing() {
    if let Some(env) = env(&[]) {
        scenarios::bad_input_leaks_nothing(&env);
    }
}

/// A crash leaves: a live sandbox's slot, a dead sandbox's slot, a claim written without its
/// record (crash mid-acquire), a free slot with a task in it, and foreign directories.
#[test]
fn v2_reconcile_after_a_crash() {
    let Some(env) = env(&[]) else {
        return;
    };
    let mut config = env.config();
    config.low_watermark = 4;
    config.high_watermark = 4;
    let (pool, _) = CgroupPool::start(config.clone(), &common::is_alive_none).unwrap();
    pool.acquire(&id("live"), &no_limits()).unwrap();
    let dead = pool.acquire(&id("dead"), &no_limits()).unwrap();
    let Placement::Pool { slot: dead_slot } = dead.placement().clone() else {
        panic!()
    };
    let parent = env.parent_dirs()[0].clone();
    let claims = env.state_dir.join("claims");
    let mut free: Vec<String> = cgroupfs::child_dirs(&parent)
        .unwrap()
        .into_iter()
        .filter(|n| !claims.join(n).exists())
        .collect();
    assert!(free.len() >= 2, "{free:?}");
    let half_slot = free.pop().unwrap();
    let busy_slot = free.pop().unwrap();
    // Crash mid-acquire: the claim is written, the record is not.
    std::fs::write(claims.join(&half_slot), "half").unwrap();
    let sleeper = Sleeper::spawn();
    std::fs::write(
        parent.join(&busy_slot).join("cgroup.procs"),
        sleeper.pid().to_string(),
    )
    .unwrap();
    let foreign = make_foreign(&env, "foreign");
    let lookalike = make_foreign(&env, "pool-999-999");
    drop(pool);

    let alive = |s: &cgroup_pool::SandboxId| s.as_str() == "live";
    let (pool, report) = CgroupPool::start(config, &alive).unwrap();
    assert_eq!(report.adopted, vec![id("live")]);
    let mut reclaimed = report.reclaimed.clone();
    reclaimed.sort();
    assert_eq!(reclaimed, vec![id("dead"), id("half")], "{report:?}");
    assert_eq!(report.busy, vec![parent.join(&busy_slot)]);
    for f in foreign.iter().chain(&lookalike) {
        assert!(report.foreign.contains(f), "{report:?}");
    }
    assert!(!claims.join(&half_slot).exists());
    assert!(!claims.join(&dead_slot).exists());
    assert!(claims.join(pool_slot(&pool, "live")).exists());
    assert!(pool.find(&id("dead")).unwrap().is_none());
    assert_eq!(
        tasks_in(&parent.join(&busy_slot)),
        sleeper.pid().to_string()
    );
    assert_eq!(
        cgroupfs::read_marker(&parent.join(&busy_slot)).unwrap(),
        Some(Marker::Slot(busy_slot.clone()))
    );
    assert!(exists_all(&foreign) && exists_all(&lookalike));
    for i in 0..6 {
        let cg = pool
            .acquire(&id(&format!("after-{i}")), &no_limits())
            .unwrap();
        assert_ne!(
            cg.paths()[0],
            parent.join(&busy_slot),
            "the busy slot is not handed out"
        );
    }
    for i in 0..6 {
        pool.release(&id(&format!("after-{i}"))).unwrap();
    }
    pool.release(&id("live")).unwrap();
    drop(sleeper);
    pool.drain().unwrap();
}

fn pool_slot(pool: &CgroupPool, sb: &str) -> String {
    match pool.find(&id(sb)).unwrap().unwrap().placement() {
        Placement::Pool { slot } => slot.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn v2_prelimited_slot_is_handed_out_without_writes() {
    if let Some(env) = env(ALL) {
        scenarios::prelimited_slots(&env);
    }
}

#[test]
fn v2_unchanged_limits_are_not_written() {
    if let Some(env) = env(&["pids"]) {
        scenarios::unchanged_limits_are_not_written(&env);
    }
}

#[test]
fn v2_refill_thread_recycles_released_slots() {
    if let Some(env) = env(&["pids"]) {
        scenarios::refill_thread_recycles(&env);
    }
}

#[test]
fn v2_released_slot_with_tasks_is_never_recycled() {
    if let Some(env) = env(&["pids"]) {
        scenarios::busy_released_slot_is_not_recycled(&env);
    }
}

#[test]
fn v2_reconcile_claims_after_a_crash() {
    if let Some(env) = env(&["pids"]) {
        scenarios::reconcile_claim_files(&env);
    }
}
