//! The pool on cgroup v1 (real cgroups; needs root). Skipped with a message on a host without v1
//! controller hierarchies, unless RUND_REQUIRE_CGROUP_V1=1.

mod common;

use cgroup_pool::naming::{self, Marker};
use cgroup_pool::{cgroupfs, CgroupPool, CgroupVersion, Placement};
use common::scenarios::{self, exists_all, make_foreign, no_limits, tasks_in};
use common::{id, read, Sleeper, TestEnv};
use oci_spec::runtime::{LinuxPidsBuilder, LinuxResourcesBuilder};

fn env(needed: &[&str]) -> Option<TestEnv> {
    common::v1_mounts_with(needed).map(|m| TestEnv::new(CgroupVersion::V1, m))
}

#[test]
fn v1_acquire_release_with_limits_and_a_process() {
    if let Some(env) = env(&["cpu", "cpuset", "memory", "pids"]) {
        scenarios::acquire_release_with_limits(&env);
    }
}

#[test]
fn v1_hundred_concurrent_acquires() {
    if let Some(env) = env(&[]) {
        scenarios::hundred_concurrent_acquires(&env);
    }
}

#[test]
fn v1_dry_pool_falls_back() {
    if let Some(env) = env(&[]) {
        scenarios::dry_pool_falls_back(&env);
    }
}

#[test]
fn v1_dictated_parent_bypasses_the_pool() {
    if let Some(env) = env(&["pids"]) {
        let res = LinuxResourcesBuilder::default()
            .pids(LinuxPidsBuilder::default().limit(10i64).build().unwrap())
            .build()
            .unwrap();
        scenarios::dictated_parent_bypasses(&env, &res, true);
    }
}

#[test]
fn v1_bad_input_leaks_nothing() {
    if let Some(env) = env(&[]) {
        scenarios::bad_input_leaks_nothing(&env);
    }
}

/// A crash leaves: a live sandbox's cgroup, a dead sandbox's cgroup (with a limit), a slot renamed
/// in the lead hierarchy only (crash mid-acquire), a free slot with a task in it, and foreign
/// directories. A new process adopts, reclaims, finishes or undoes renames, and touches neither
/// the busy slot nor the foreign directories.
#[test]
fn v1_reconcile_after_a_crash() {
    let Some(env) = env(&["pids"]) else {
        return;
    };
    let mut config = env.config();
    config.low_watermark = 4;
    config.high_watermark = 4;
    let (pool, _) = CgroupPool::start(config.clone(), &common::is_alive_none).unwrap();
    pool.acquire(&id("live"), &no_limits()).unwrap();
    let pids7 = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(7i64).build().unwrap())
        .build()
        .unwrap();
    let dead = pool.acquire(&id("dead"), &pids7).unwrap();
    let Placement::Pool { slot: dead_slot } = dead.placement().clone() else {
        panic!()
    };
    let parents = env.parent_dirs();
    let lead = pool.hierarchy().mounts[0].mount_point.join(&env.parent);
    let mut free: Vec<String> = cgroupfs::child_dirs(&lead)
        .unwrap()
        .into_iter()
        .filter(|n| naming::is_slot_name(n))
        .collect();
    assert!(free.len() >= 2, "{free:?}");
    let half_slot = free.pop().unwrap();
    let busy_slot = free.pop().unwrap();
    // Crash mid-acquire: only the lead hierarchy renamed.
    cgroupfs::rename(&lead.join(&half_slot), &lead.join("sandbox-half")).unwrap();
    // A task in a free slot.
    let sleeper = Sleeper::spawn();
    for p in &parents {
        std::fs::write(
            p.join(&busy_slot).join("cgroup.procs"),
            sleeper.pid().to_string(),
        )
        .unwrap();
    }
    let foreign = make_foreign(&env, "foreign");
    let lookalike = make_foreign(&env, "pool-999-999");
    drop(pool); // the "crash": nothing is cleaned up

    let alive = |s: &cgroup_pool::SandboxId| s.as_str() == "live";
    let (pool, report) = CgroupPool::start(config, &alive).unwrap();
    assert_eq!(report.adopted, vec![id("live")]);
    let mut reclaimed = report.reclaimed.clone();
    reclaimed.sort();
    assert_eq!(reclaimed, vec![id("dead"), id("half")], "{report:?}");
    let busy: Vec<_> = parents.iter().map(|p| p.join(&busy_slot)).collect();
    for b in &busy {
        assert!(report.busy.contains(b), "{report:?}");
    }
    for f in foreign.iter().chain(&lookalike) {
        assert!(report.foreign.contains(f), "{report:?}");
    }

    // The half-renamed slot is whole again under its slot name; the dead sandbox's slot is back
    // and reset.
    let half_dirs: Vec<_> = parents.iter().map(|p| p.join(&half_slot)).collect();
    assert!(exists_all(&half_dirs));
    assert!(!lead.join("sandbox-half").exists());
    assert!(!lead.join("sandbox-dead").exists());
    let pids_mount = pool
        .hierarchy()
        .mounts
        .iter()
        .find(|m| m.controllers.iter().any(|c| c == "pids"))
        .unwrap();
    assert_eq!(
        read(
            &pids_mount
                .mount_point
                .join(&env.parent)
                .join(&dead_slot)
                .join("pids.max")
        ),
        "max"
    );
    assert!(pool.find(&id("dead")).unwrap().is_none());
    // Untouched: the task is still in the busy slot, the foreign directories have no marker.
    for b in &busy {
        assert_eq!(tasks_in(b), sleeper.pid().to_string());
        assert_eq!(
            cgroupfs::read_marker(b).unwrap(),
            Some(Marker::Slot(busy_slot.clone()))
        );
    }
    assert!(exists_all(&foreign) && exists_all(&lookalike));
    // The busy slot is not handed out.
    let mut taken = Vec::new();
    for i in 0..6 {
        let cg = pool
            .acquire(&id(&format!("after-{i}")), &no_limits())
            .unwrap();
        if let Placement::Pool { slot } = cg.placement() {
            assert_ne!(slot, &busy_slot);
        }
        taken.push(cg);
    }
    for cg in taken {
        pool.release(cg.sandbox_id()).unwrap();
    }
    pool.release(&id("live")).unwrap();
    drop(sleeper);
    pool.drain().unwrap();
}

#[test]
fn v1_prelimited_slot_is_handed_out_without_writes() {
    if let Some(env) = env(&["cpu", "cpuset", "memory", "pids"]) {
        scenarios::prelimited_slots(&env);
    }
}

#[test]
fn v1_unchanged_limits_are_not_written() {
    if let Some(env) = env(&["pids"]) {
        scenarios::unchanged_limits_are_not_written(&env);
    }
}

#[test]
fn v1_refill_thread_recycles_released_slots() {
    if let Some(env) = env(&["pids"]) {
        scenarios::refill_thread_recycles(&env);
    }
}

#[test]
fn v1_released_slot_with_tasks_is_never_recycled() {
    if let Some(env) = env(&["pids"]) {
        scenarios::busy_released_slot_is_not_recycled(&env);
    }
}

/// The same pool claiming v1 slots by file (`V1Claim::File`): no rename on acquire.
fn env_file_claims(needed: &[&str]) -> Option<TestEnv> {
    env(needed).map(|mut e| {
        e.v1_claim = cgroup_pool::V1Claim::File;
        e
    })
}

#[test]
fn v1_file_claims_acquire_release_with_limits_and_a_process() {
    if let Some(env) = env_file_claims(&["cpu", "cpuset", "memory", "pids"]) {
        scenarios::acquire_release_with_limits(&env);
    }
}

#[test]
fn v1_file_claims_hundred_concurrent_acquires() {
    if let Some(env) = env_file_claims(&[]) {
        scenarios::hundred_concurrent_acquires(&env);
    }
}

#[test]
fn v1_file_claims_prelimited_slot_is_handed_out_without_writes() {
    if let Some(env) = env_file_claims(&["cpu", "cpuset", "memory", "pids"]) {
        scenarios::prelimited_slots(&env);
    }
}

#[test]
fn v1_file_claims_refill_thread_recycles_released_slots() {
    if let Some(env) = env_file_claims(&["pids"]) {
        scenarios::refill_thread_recycles(&env);
    }
}

#[test]
fn v1_file_claims_released_slot_with_tasks_is_never_recycled() {
    if let Some(env) = env_file_claims(&["pids"]) {
        scenarios::busy_released_slot_is_not_recycled(&env);
    }
}

#[test]
fn v1_file_claims_dry_pool_and_bad_input() {
    if let Some(env) = env_file_claims(&[]) {
        scenarios::dry_pool_falls_back(&env);
    }
    if let Some(env) = env_file_claims(&[]) {
        scenarios::bad_input_leaks_nothing(&env);
    }
}

#[test]
fn v1_file_claims_reconcile_after_a_crash() {
    if let Some(env) = env_file_claims(&["pids"]) {
        scenarios::reconcile_claim_files(&env);
    }
}

fn pids10() -> cgroup_pool::LinuxResources {
    LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(10i64).build().unwrap())
        .build()
        .unwrap()
}

#[test]
fn v1_dictated_parents_are_made_like_runc() {
    if let Some(env) = env(&["cpuset", "pids"]) {
        scenarios::dictated_parents_are_made(&env, &pids10(), true);
    }
}

#[test]
fn v1_failed_dictated_acquire_leaves_nothing() {
    if let Some(env) = env(&["cpuset"]) {
        scenarios::failed_dictated_acquire_leaves_nothing(&env);
    }
}

#[test]
fn v1_concurrent_dictated_acquires_under_new_parents() {
    if let Some(env) = env(&["pids"]) {
        scenarios::concurrent_dictated_under_new_parents(&env, &pids10());
    }
}

/// A platform parent that exists but whose cpuset was never filled (made by a plain mkdir):
/// filled from its parent, as runc does, or no task could join the sandbox's cgroup below it.
#[test]
fn v1_dictated_parent_with_an_empty_cpuset_is_filled() {
    let Some(env) = env(&["cpuset"]) else {
        return;
    };
    let (pool, _) = CgroupPool::start(env.config(), &common::is_alive_none).unwrap();
    let cpuset_mount = env.mounts.iter().find(|m| m.ends_with("cpuset")).unwrap();
    let plat = env.sibling("bare");
    for mount in &env.mounts {
        std::fs::create_dir(mount.join(&plat)).unwrap();
    }
    assert_eq!(read(&cpuset_mount.join(&plat).join("cpuset.cpus")), "");
    let sb = id("bare-1");
    let cg = pool
        .acquire_at(&sb, &format!("/{plat}/{sb}"), &no_limits())
        .unwrap();
    for file in ["cpuset.cpus", "cpuset.mems"] {
        assert_eq!(
            read(&cpuset_mount.join(&plat).join(file)),
            read(&cpuset_mount.join(file))
        );
    }
    let mut child = Sleeper::spawn();
    cg.attach_process(child.pid()).unwrap();
    child.kill();
    pool.release(&sb).unwrap();
    assert_eq!(
        cgroupfs::read_marker(&cpuset_mount.join(&plat)).unwrap(),
        None,
        "still the platform's"
    );
    pool.drain().unwrap();
}
