//! The pool on cgroup v2 (real cgroups; needs root). The limit tests need a cgroup2 offering the
//! cpu, cpuset, memory and pids controllers (the testbed's pure cgroup2); the others also run on
//! a hybrid host's /sys/fs/cgroup/unified. Without what a test needs it prints SKIPPED and
//! returns, unless RUND_REQUIRE_CGROUP_V2=1, which makes that a failure.

mod common;

use cgroup_pool::naming::Marker;
use cgroup_pool::{cgroupfs, CgroupPool, CgroupVersion, Placement, PoolError};
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

fn pids10() -> cgroup_pool::LinuxResources {
    LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(10i64).build().unwrap())
        .build()
        .unwrap()
}

#[test]
fn v2_dictated_parents_are_made_like_runc() {
    if let Some(env) = env(&[]) {
        scenarios::dictated_parents_are_made(&env, &no_limits(), false);
    }
}

#[test]
fn v2_dictated_parents_are_made_with_limits() {
    if let Some(env) = env(&["pids"]) {
        scenarios::dictated_parents_are_made(&env, &pids10(), true);
    }
}

#[test]
fn v2_failed_dictated_acquire_leaves_nothing() {
    if let Some(env) = env(&["cpuset"]) {
        scenarios::failed_dictated_acquire_leaves_nothing(&env);
    }
}

#[test]
fn v2_concurrent_dictated_acquires_under_new_parents() {
    if let Some(env) = env(&[]) {
        scenarios::concurrent_dictated_under_new_parents(&env, &no_limits());
    }
    if let Some(env) = env(&["pids"]) {
        scenarios::concurrent_dictated_under_new_parents(&env, &pids10());
    }
}

/// A platform parent made without controllers (a plain mkdir, nothing in its
/// cgroup.subtree_control, nor in its child's): switched on from the root down, as runc does,
/// and the limits land.
#[test]
fn v2_dictated_parent_with_controllers_off_gets_them() {
    let Some(env) = env(ALL) else {
        return;
    };
    let (pool, _) = CgroupPool::start(env.config(), &common::is_alive_none).unwrap();
    let root = &env.mounts[0];
    let plat = env.sibling("plat");
    let pod = root.join(&plat).join("pod");
    std::fs::create_dir_all(&pod).unwrap();
    for d in [root.join(&plat), pod.clone()] {
        assert_eq!(read(&d.join("cgroup.subtree_control")), "");
    }
    let res = LinuxResourcesBuilder::default()
        .cpu(
            oci_spec::runtime::LinuxCpuBuilder::default()
                .shares(512u64)
                .build()
                .unwrap(),
        )
        .memory(
            oci_spec::runtime::LinuxMemoryBuilder::default()
                .limit(64i64 << 20)
                .build()
                .unwrap(),
        )
        .pids(LinuxPidsBuilder::default().limit(10i64).build().unwrap())
        .build()
        .unwrap();
    let sb = id("off-1");
    let cg = pool
        .acquire_at(&sb, &format!("/{plat}/pod/{sb}"), &res)
        .unwrap();
    for d in [root.join(&plat), pod.clone()] {
        let on = read(&d.join("cgroup.subtree_control"));
        for c in ALL {
            assert!(on.split_whitespace().any(|w| w == *c), "{c} in {on:?}");
        }
    }
    let leaf = pod.join(sb.as_str());
    assert_eq!(read(&leaf.join("pids.max")), "10");
    assert_eq!(read(&leaf.join("memory.max")), (64u64 << 20).to_string());
    assert_eq!(read(&leaf.join("cpu.weight")), "59");
    let mut child = Sleeper::spawn();
    cg.attach_process(child.pid()).unwrap();
    child.kill();
    pool.release(&sb).unwrap();
    assert!(!leaf.exists() && pod.is_dir());
    pool.drain().unwrap();
}

/// A dictated parent with a process of its own cannot switch controllers on for its children
/// (cgroup v2's no-internal-processes rule): an error naming its cgroup.subtree_control, the
/// dictated cgroup and a pid, nothing made. Without limits the sandbox still gets its cgroup
/// there (without controllers, as with runc), and a process can join it.
#[test]
fn v2_dictated_parent_with_a_process_is_a_clear_error() {
    let Some(env) = env(&["pids"]) else {
        return;
    };
    let (pool, _) = CgroupPool::start(env.config(), &common::is_alive_none).unwrap();
    let root = &env.mounts[0];
    let plat = env.sibling("busy");
    let busy = root.join(&plat);
    std::fs::create_dir(&busy).unwrap();
    let sleeper = Sleeper::spawn();
    std::fs::write(busy.join("cgroup.procs"), sleeper.pid().to_string()).unwrap();
    for path in [format!("/{plat}/sb-1"), format!("/{plat}/new/sb-1")] {
        let err = pool.acquire_at(&id("sb-1"), &path, &pids10()).unwrap_err();
        assert!(
            matches!(
                &err,
                PoolError::Dictated(cgroup_pool::dictated::DictatedError::Parent(
                    cgroup_pool::parent::ParentError::InternalProcesses { .. }
                ))
            ),
            "{err}"
        );
        let msg = err.to_string();
        for part in [
            busy.join("cgroup.subtree_control").display().to_string(),
            root.join(path.trim_start_matches('/'))
                .display()
                .to_string(),
            format!("pid {}", sleeper.pid()),
            "processes of its own".to_string(),
        ] {
            assert!(msg.contains(&part), "{part:?} in {msg}");
        }
        assert!(!busy.join("sb-1").exists() && !busy.join("new").exists());
        assert!(pool.find(&id("sb-1")).unwrap().is_none());
    }
    assert_eq!(read(&busy.join("cgroup.subtree_control")), "", "nothing on");
    assert_eq!(tasks_in(&busy), sleeper.pid().to_string());

    let cg = pool
        .acquire_at(&id("sb-2"), &format!("/{plat}/sb-2"), &no_limits())
        .unwrap();
    let mut child = Sleeper::spawn();
    cg.attach_process(child.pid()).unwrap();
    child.kill();
    pool.release(&id("sb-2")).unwrap();
    assert!(busy.is_dir(), "the platform's, not removed");
    pool.drain().unwrap();
}

/// A limit whose controller the cgroup2 root does not offer (on a hybrid host, where the v1
/// hierarchies hold the controllers) names the cgroup whose cgroup.controllers was read, not
/// rund's parent.
#[test]
fn v2_dictated_missing_controller_names_the_cgroup_read() {
    let Some(env) = env(&[]) else {
        return;
    };
    let root = env.mounts[0].clone();
    let offered = read(&root.join("cgroup.controllers"));
    let Some(absent) = ["pids", "memory", "cpu"]
        .into_iter()
        .find(|c| !offered.split_whitespace().any(|o| o == *c))
    else {
        eprintln!(
            "SKIPPED: the cgroup2 at {} offers every controller",
            root.display()
        );
        return;
    };
    let res = match absent {
        "pids" => pids10(),
        "memory" => LinuxResourcesBuilder::default()
            .memory(
                oci_spec::runtime::LinuxMemoryBuilder::default()
                    .limit(64i64 << 20)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap(),
        _ => LinuxResourcesBuilder::default()
            .cpu(
                oci_spec::runtime::LinuxCpuBuilder::default()
                    .shares(512u64)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap(),
    };
    let (pool, _) = CgroupPool::start(env.config(), &common::is_alive_none).unwrap();
    let plat = env.sibling("k8s.io");
    let err = pool
        .acquire_at(&id("sb"), &format!("/{plat}/sb"), &res)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{absent} controller"))
            && msg.contains(&format!("cgroup {} ", root.display()))
            && msg.contains(&root.join(&plat).join("sb").display().to_string()),
        "{msg}"
    );
    // rund's parent is not named (its name only appears as the start of the sibling's).
    let own = env.parent_dirs()[0].display().to_string();
    assert!(
        msg.match_indices(&own)
            .all(|(i, _)| msg[i + own.len()..].starts_with('-')),
        "{msg}"
    );
    assert!(!root.join(&plat).exists(), "nothing made");
    pool.drain().unwrap();
}
