//! The test scenarios, run once on cgroup v1 (tests/v1.rs) and once on cgroup v2 (tests/v2.rs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use cgroup_pool::naming::Marker;
use cgroup_pool::{
    cgroupfs, CgroupPool, CgroupVersion, LinuxResources, Placement, PoolError, SandboxCgroup,
};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
};

use super::{id, is_alive_none, proc_cgroup, read, Sleeper, TestEnv};

pub fn no_limits() -> LinuxResources {
    LinuxResources::default()
}

fn limits(with_swap: bool) -> LinuxResources {
    let mut mem = LinuxMemoryBuilder::default().limit(64i64 << 20);
    if with_swap {
        mem = mem.swap(96i64 << 20);
    }
    LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .shares(512u64)
                .quota(50_000i64)
                .period(100_000u64)
                .cpus("0")
                .mems("0")
                .build()
                .unwrap(),
        )
        .memory(mem.build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(64i64).build().unwrap())
        .build()
        .unwrap()
}

fn dir(cg: &SandboxCgroup, controller: &str) -> PathBuf {
    cg.path_for(controller)
        .unwrap_or_else(|| panic!("no {controller} directory in {:?}", cg.paths()))
        .to_path_buf()
}

/// Acquire with limits, see them in the files, attach a real process, refuse release while it
/// runs, release after, and see the defaults back.
pub fn acquire_release_with_limits(env: &TestEnv) {
    let (pool, _) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    let free_before = pool.stats().free;
    assert_eq!(free_before, 2, "filled to the low watermark at start");
    let v2 = env.version == CgroupVersion::V2;
    let probe = pool.parent_dirs()[0].clone();
    let swap_file = if v2 {
        "memory.swap.max"
    } else {
        "memory.memsw.limit_in_bytes"
    };
    // Swap accounting may be off: then only a limit without extra swap can be asked for.
    let mem_dir_of_parent = if v2 {
        probe.clone()
    } else {
        env.mounts
            .iter()
            .find(|m| m.ends_with("memory"))
            .unwrap()
            .join(&env.parent)
    };
    let with_swap = !v2 && mem_dir_of_parent.join(swap_file).exists()
        || v2
            && std::fs::read_dir(&probe)
                .unwrap()
                .flatten()
                .any(|e| e.path().join(swap_file).exists());
    let sb = id("limits-1");
    let cg = pool.acquire(&sb, &limits(with_swap)).unwrap();
    assert_eq!(pool.stats().acquired_from_pool, 1);
    assert_eq!(pool.stats().fallback_created, 0);

    // It is a pre-made slot, not a new directory: its marker names the slot it was made as.
    let Placement::Pool { slot } = cg.placement().clone() else {
        panic!("not a pool cgroup: {:?}", cg.placement())
    };
    for p in cg.paths() {
        assert_eq!(
            cgroupfs::read_marker(&p).unwrap(),
            Some(Marker::Slot(slot.clone()))
        );
        if env.renames() {
            assert!(
                p.ends_with(format!("sandbox-{sb}")),
                "renamed on v1: {}",
                p.display()
            );
        } else {
            assert!(p.ends_with(&slot), "kept its slot name: {}", p.display());
        }
    }

    if v2 {
        let d = dir(&cg, "cpu");
        assert_eq!(read(&d.join("cpu.weight")), "59", "shares 512 -> weight 59");
        assert_eq!(read(&d.join("cpu.max")), "50000 100000");
        assert_eq!(read(&d.join("cpuset.cpus")), "0");
        assert_eq!(read(&d.join("memory.max")), (64u64 << 20).to_string());
        if d.join("memory.swap.max").exists() {
            assert_eq!(read(&d.join("memory.swap.max")), (32u64 << 20).to_string());
        }
        assert_eq!(read(&d.join("pids.max")), "64");
    } else {
        assert_eq!(read(&dir(&cg, "cpu").join("cpu.shares")), "512");
        assert_eq!(read(&dir(&cg, "cpu").join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&dir(&cg, "cpu").join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&dir(&cg, "cpuset").join("cpuset.cpus")), "0");
        let m = dir(&cg, "memory");
        assert_eq!(
            read(&m.join("memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        if with_swap {
            assert_eq!(read(&m.join(swap_file)), (96u64 << 20).to_string());
        }
        assert_eq!(read(&dir(&cg, "pids").join("pids.max")), "64");
    }

    // The state says who holds it, for another process to find.
    let found = SandboxCgroup::lookup(&env.state_dir, &sb).unwrap().unwrap();
    assert_eq!(found.paths(), cg.paths());

    // A real process in it.
    let mut child = Sleeper::spawn();
    cg.attach_process(child.pid()).unwrap();
    let in_cgroup = proc_cgroup(child.pid());
    let rel = env
        .mounts
        .iter()
        .find_map(|m| cg.paths()[0].strip_prefix(m).ok().map(Path::to_path_buf))
        .unwrap();
    assert!(
        in_cgroup.contains(&format!("/{}\n", rel.display())),
        "{in_cgroup}"
    );
    assert_eq!(cg.threads().unwrap(), vec![child.pid()]);
    if v2 {
        // A lone thread cannot join a v2 domain cgroup; the error says why.
        let err = cg
            .attach_thread(std::process::id())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cgroup v2 moves whole processes"), "{err}");
    }

    let err = pool.release(&sb).unwrap_err();
    assert!(
        matches!(err, PoolError::Busy { count: 1, .. }),
        "release must refuse while a task remains: {err}"
    );
    assert!(err.to_string().contains(&child.pid().to_string()), "{err}");

    child.kill();
    pool.release(&sb).unwrap();
    assert_eq!(pool.stats().released, 1);
    assert_eq!(pool.stats().free, free_before);
    assert!(SandboxCgroup::lookup(&env.state_dir, &sb)
        .unwrap()
        .is_none());
    assert!(matches!(pool.release(&sb), Err(PoolError::NotHeld(_))));

    // Back under the slot's name with the defaults.
    let back: Vec<PathBuf> = env.parent_dirs().iter().map(|p| p.join(&slot)).collect();
    for p in &back {
        assert!(p.is_dir(), "{} is back in the pool", p.display());
    }
    let in_mount = |c: &str| -> PathBuf {
        if v2 {
            back[0].clone()
        } else {
            back.iter()
                .find(|p| p.parent().unwrap().parent().unwrap().ends_with(c))
                .unwrap()
                .clone()
        }
    };
    if v2 {
        assert_eq!(read(&back[0].join("cpu.weight")), "100");
        assert_eq!(read(&back[0].join("cpu.max")), "max 100000");
        assert_eq!(read(&back[0].join("memory.max")), "max");
        assert_eq!(read(&back[0].join("pids.max")), "max");
        assert_eq!(read(&back[0].join("cpuset.cpus")), "");
    } else {
        assert_eq!(read(&in_mount("cpu").join("cpu.shares")), "1024");
        assert_eq!(read(&in_mount("cpu").join("cpu.cfs_quota_us")), "-1");
        assert_eq!(read(&in_mount("pids").join("pids.max")), "max");
        let parent_cpus = read(&in_mount("cpuset").parent().unwrap().join("cpuset.cpus"));
        assert_eq!(read(&in_mount("cpuset").join("cpuset.cpus")), parent_cpus);
        let limit: u64 = read(&in_mount("memory").join("memory.limit_in_bytes"))
            .parse()
            .unwrap();
        assert!(limit > 1 << 60, "memory unlimited again: {limit}");
    }
    pool.drain().unwrap();
    for p in env.parent_dirs() {
        assert!(!p.exists(), "drain removed {}", p.display());
    }
}

/// 100 threads acquire at once: every one gets its own cgroup, none is lost on release.
pub fn hundred_concurrent_acquires(env: &TestEnv) {
    let mut config = env.config();
    config.low_watermark = 100;
    config.high_watermark = 100;
    let (pool, _) = CgroupPool::start(config, &is_alive_none).unwrap();
    let pool = Arc::new(pool);
    let barrier = Arc::new(Barrier::new(100));
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let pool = Arc::clone(&pool);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                pool.acquire(&id(&format!("many-{i}")), &no_limits())
            })
        })
        .collect();
    let cgroups: Vec<SandboxCgroup> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let paths: BTreeSet<PathBuf> = cgroups.iter().flat_map(|c| c.paths()).collect();
    assert_eq!(
        paths.len(),
        100 * env.mounts.len(),
        "no cgroup handed out twice"
    );
    let slots: BTreeSet<String> = cgroups
        .iter()
        .map(|c| match c.placement() {
            Placement::Pool { slot } => slot.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(slots.len(), 100);
    for p in &paths {
        assert!(p.is_dir(), "{}", p.display());
    }
    let s = pool.stats();
    assert_eq!(s.acquired_from_pool + s.fallback_created, 100);
    assert_eq!(s.acquired_from_pool, 100, "the pool was full: {s:?}");
    for c in &cgroups {
        pool.release(c.sandbox_id()).unwrap();
    }
    assert_eq!(pool.stats().free, 100, "every slot came back");
    // And on disk: 100 free slots, nothing else.
    for parent in env.parent_dirs() {
        assert_eq!(cgroupfs::child_dirs(&parent).unwrap().len(), 100);
    }
    let Ok(pool) = Arc::try_unwrap(pool) else {
        panic!("pool still shared")
    };
    pool.drain().unwrap();
}

/// A dry pool makes a cgroup on the spot, counted; the cgroup then joins the pool.
pub fn dry_pool_falls_back(env: &TestEnv) {
    let mut config = env.config();
    config.low_watermark = 0;
    config.high_watermark = 0;
    let (pool, _) = CgroupPool::start(config, &is_alive_none).unwrap();
    assert_eq!(pool.stats().free, 0);
    let sb = id("dry-1");
    let cg = pool.acquire(&sb, &no_limits()).unwrap();
    let s = pool.stats();
    assert_eq!((s.fallback_created, s.acquired_from_pool), (1, 0));
    let mut child = Sleeper::spawn();
    cg.attach_process(child.pid()).unwrap();
    child.kill();
    pool.release(&sb).unwrap();
    assert_eq!(pool.stats().free, 1, "the fallback cgroup joined the pool");
    pool.acquire(&id("dry-2"), &no_limits()).unwrap();
    let s = pool.stats();
    assert_eq!((s.fallback_created, s.acquired_from_pool), (1, 1));
    pool.release(&id("dry-2")).unwrap();
    pool.drain().unwrap();
}

/// A platform-dictated parent (the kubelet's pod cgroup, made beforehand): the cgroup is made
/// there (bypass, counted), with its limits, and removed on release; the pod cgroup stays. A
/// systemd-style path is a clear error. (Missing parents: [`dictated_parents_are_made`].)
pub fn dictated_parent_bypasses(env: &TestEnv, resources: &LinuxResources, pids_limit: bool) {
    let (pool, _) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    // What the kubelet would have made: a pod cgroup under a QoS cgroup.
    let kube = env.sibling("kubepods");
    for mount in &env.mounts {
        for rel in [kube.clone(), format!("{kube}/pod-1234")] {
            let d = mount.join(&rel);
            std::fs::create_dir(&d).unwrap();
            if d.join("cpuset.cpus").exists() && env.version == CgroupVersion::V1 {
                cgroup_pool::limits::copy_cpuset_from_parent(&d).unwrap();
            }
        }
    }
    let sb = id("kube-sb");
    let path = format!("/{kube}/pod-1234/{sb}");
    let free_before = pool.stats().free;
    let cg = pool.acquire_at(&sb, &path, resources).unwrap();
    assert!(cg.is_bypass());
    assert_eq!(pool.stats().bypassed, 1);
    assert_eq!(pool.stats().free, free_before, "the pool was not used");
    let expected: BTreeSet<PathBuf> = env
        .mounts
        .iter()
        .map(|m| m.join(path.trim_start_matches('/')))
        .collect();
    assert_eq!(cg.paths().into_iter().collect::<BTreeSet<_>>(), expected);
    for p in cg.paths() {
        assert_eq!(
            cgroupfs::read_marker(&p).unwrap(),
            Some(Marker::Bypass(sb.clone()))
        );
    }
    if pids_limit {
        assert_eq!(read(&dir(&cg, "pids").join("pids.max")), "10");
    }
    let mut child = Sleeper::spawn();
    cg.attach_process(child.pid()).unwrap();
    assert!(proc_cgroup(child.pid()).contains(&format!("/pod-1234/{sb}\n")));
    assert!(matches!(pool.release(&sb), Err(PoolError::Busy { .. })));
    child.kill();
    pool.release(&sb).unwrap();
    for p in cg.paths() {
        assert!(!p.exists(), "{} removed on release", p.display());
        assert!(p.parent().unwrap().is_dir(), "the pod cgroup stays");
    }

    let err = pool
        .acquire_at(&id("x"), "kubepods.slice:cri-containerd:x", &no_limits())
        .unwrap_err();
    assert!(err.to_string().contains("systemd"), "{err}");
    pool.drain().unwrap();
}

/// Bad input changes nothing: bad resources and a duplicate sandbox are refused before or
/// without leaking a slot or a record.
pub fn bad_input_leaks_nothing(env: &TestEnv) {
    let (pool, _) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    let free = pool.stats().free;
    let bad = LinuxResourcesBuilder::default()
        .cpu(LinuxCpuBuilder::default().quota(5i64).build().unwrap())
        .build()
        .unwrap();
    let err = pool.acquire(&id("bad"), &bad).unwrap_err();
    assert!(err.to_string().contains("cpu quota 5"), "{err}");
    assert_eq!(pool.stats().free, free);
    assert!(pool.find(&id("bad")).unwrap().is_none());

    pool.acquire(&id("dup"), &no_limits()).unwrap();
    let err = pool.acquire(&id("dup"), &no_limits()).unwrap_err();
    assert!(matches!(err, PoolError::AlreadyHeld(_)), "{err}");
    assert_eq!(
        pool.stats().free,
        free - 1,
        "the refused acquire gave its slot back"
    );
    pool.release(&id("dup")).unwrap();
    assert_eq!(pool.stats().free, free);
    pool.drain().unwrap();
}

/// Makes a marker-less directory under rund's parent in every hierarchy.
pub fn make_foreign(env: &TestEnv, name: &str) -> Vec<PathBuf> {
    env.parent_dirs()
        .iter()
        .map(|p| {
            let d = p.join(name);
            std::fs::create_dir(&d).unwrap();
            if env.version == CgroupVersion::V1 && d.join("cpuset.cpus").exists() {
                cgroup_pool::limits::copy_cpuset_from_parent(&d).unwrap();
            }
            d
        })
        .collect()
}

pub fn exists_all(paths: &[PathBuf]) -> bool {
    paths.iter().all(|p| p.is_dir())
}

pub fn tasks_in(p: &Path) -> String {
    read(&p.join("cgroup.procs"))
}

/// The directory of `name` (a slot or a parked `recycle-` slot) where `controller` acts.
fn child_dir(env: &TestEnv, name: &str, controller: &str) -> PathBuf {
    if env.version == CgroupVersion::V2 {
        return env.mounts[0].join(&env.parent).join(name);
    }
    env.mounts
        .iter()
        .find(|m| m.ends_with(controller))
        .unwrap_or_else(|| panic!("no {controller} mount in {:?}", env.mounts))
        .join(&env.parent)
        .join(name)
}

/// The files of `limits(false)` (the shape of the tests below), in the directories `dir` names.
fn assert_shape_files(env: &TestEnv, dir: &dyn Fn(&str) -> PathBuf) {
    if env.version == CgroupVersion::V2 {
        let d = dir("cpu");
        assert_eq!(read(&d.join("cpu.weight")), "59");
        assert_eq!(read(&d.join("cpu.max")), "50000 100000");
        assert_eq!(read(&d.join("cpuset.cpus")), "0");
        assert_eq!(read(&d.join("memory.max")), (64u64 << 20).to_string());
        assert_eq!(read(&d.join("pids.max")), "64");
    } else {
        assert_eq!(read(&dir("cpu").join("cpu.shares")), "512");
        assert_eq!(read(&dir("cpu").join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&dir("cpuset").join("cpuset.cpus")), "0");
        assert_eq!(
            read(&dir("memory").join("memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        assert_eq!(read(&dir("pids").join("pids.max")), "64");
    }
}

/// cpu and memory at the kernel's defaults (pids is checked by the callers).
fn assert_cpu_memory_defaults(env: &TestEnv, dir: &dyn Fn(&str) -> PathBuf) {
    if env.version == CgroupVersion::V2 {
        let d = dir("cpu");
        assert_eq!(read(&d.join("cpu.weight")), "100");
        assert_eq!(read(&d.join("cpu.max")), "max 100000");
        assert_eq!(read(&d.join("memory.max")), "max");
        assert_eq!(read(&d.join("cpuset.cpus")), "");
    } else {
        assert_eq!(read(&dir("cpu").join("cpu.shares")), "1024");
        assert_eq!(read(&dir("cpu").join("cpu.cfs_quota_us")), "-1");
        let limit: u64 = read(&dir("memory").join("memory.limit_in_bytes"))
            .parse()
            .unwrap();
        assert!(limit > 1 << 60, "memory unlimited: {limit}");
        let cpuset = dir("cpuset");
        let parent_cpus = read(&cpuset.parent().unwrap().join("cpuset.cpus"));
        assert_eq!(read(&cpuset.join("cpuset.cpus")), parent_cpus);
    }
}

fn free_slots_on_disk(env: &TestEnv) -> Vec<String> {
    let lead = env.mounts[0].join(&env.parent);
    cgroupfs::child_dirs(&lead)
        .unwrap()
        .into_iter()
        .filter(|n| cgroup_pool::naming::is_slot_name(n))
        .collect()
}

fn slot_of(cg: &SandboxCgroup) -> String {
    match cg.placement() {
        Placement::Pool { slot } => slot.clone(),
        other => panic!("not a pool cgroup: {other:?}"),
    }
}

/// A pool with a default shape keeps its free slots pre-limited (the files already hold the
/// shape, the lead directory says so), hands one out for that shape without reading or writing a
/// limit file, gives another shape its own limits (and the defaults for what it does not set),
/// and recycles released slots back to the shape.
pub fn prelimited_slots(env: &TestEnv) {
    let mut config = env.config();
    config.default_shape = Some(limits(false));
    let (pool, _) = CgroupPool::start(config, &is_alive_none).unwrap();
    let free = free_slots_on_disk(env);
    assert_eq!(free.len(), 2, "{free:?}");
    let key = cgroup_pool::resources::Limits::from_oci(&limits(false), env.version)
        .unwrap()
        .shape_key();
    for slot in &free {
        assert_shape_files(env, &|c| child_dir(env, slot, c));
        let lead = pool.hierarchy().mounts[0]
            .mount_point
            .join(&env.parent)
            .join(slot);
        assert_eq!(cgroupfs::read_shape(&lead).unwrap(), Some(key.clone()));
    }

    let cg = pool.acquire(&id("shaped"), &limits(false)).unwrap();
    let s = pool.stats();
    assert_eq!(s.prelimited_hits, 1, "{s:?}");
    assert_eq!((s.limit_writes, s.limit_writes_skipped), (0, 0), "{s:?}");
    assert_shape_files(env, &|c| dir(&cg, c));

    // Another shape: pids only. The shape's other limits go back to the defaults.
    let pids10 = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(10i64).build().unwrap())
        .build()
        .unwrap();
    let other = pool.acquire(&id("other"), &pids10).unwrap();
    let s = pool.stats();
    assert_eq!(s.prelimited_hits, 1, "{s:?}");
    assert!(s.limit_writes >= 1, "{s:?}");
    assert_eq!(read(&dir(&other, "pids").join("pids.max")), "10");
    assert_cpu_memory_defaults(env, &|c| dir(&other, c));

    // Released (recycled inline: no refill thread here), both come back pre-limited.
    let slots = [slot_of(&cg), slot_of(&other)];
    pool.release(&id("shaped")).unwrap();
    pool.release(&id("other")).unwrap();
    assert_eq!(pool.stats().recycled, 2);
    for slot in &slots {
        assert_shape_files(env, &|c| child_dir(env, slot, c));
        let lead = pool.hierarchy().mounts[0]
            .mount_point
            .join(&env.parent)
            .join(slot);
        assert_eq!(cgroupfs::read_shape(&lead).unwrap(), Some(key.clone()));
    }
    pool.drain().unwrap();
}

/// A limit already in place is not written again: an acquire writes what differs from the
/// slot's defaults, and applying the same limits again writes nothing.
pub fn unchanged_limits_are_not_written(env: &TestEnv) {
    let (pool, _) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    let pids64 = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(64i64).build().unwrap())
        .build()
        .unwrap();
    let cg = pool.acquire(&id("skip"), &pids64).unwrap();
    let s = pool.stats();
    assert_eq!((s.limit_writes, s.limit_writes_skipped), (1, 0), "{s:?}");
    let l = cgroup_pool::resources::Limits::from_oci(&pids64, env.version).unwrap();
    let again = cgroup_pool::limits::apply_if_changed(cg.dirs(), &l).unwrap();
    assert_eq!((again.written, again.skipped), (0, 1));
    // "max" (the default) is in place on a fresh slot too: skipped.
    let max = cgroup_pool::resources::Limits {
        pids: Some(None),
        ..Default::default()
    };
    let fresh = pool.acquire(&id("skip-2"), &no_limits()).unwrap();
    let count = cgroup_pool::limits::apply_if_changed(fresh.dirs(), &max).unwrap();
    assert_eq!((count.written, count.skipped), (0, 1));
    assert_eq!(read(&dir(&cg, "pids").join("pids.max")), "64");
    // Reset writes only what differs from the defaults: pids.max here.
    let reset = cgroup_pool::limits::reset(cg.dirs()).unwrap();
    assert_eq!(reset.written, 1, "{reset:?}");
    assert_eq!(read(&dir(&cg, "pids").join("pids.max")), "max");
    pool.release(&id("skip")).unwrap();
    pool.release(&id("skip-2")).unwrap();
    pool.drain().unwrap();
}

/// With the refill thread running, `release` returns at once (the sandbox id is free again
/// right away) and the thread resets the slot and returns it: nothing is left parked, no record
/// or claim stays, and drain leaves nothing behind.
pub fn refill_thread_recycles(env: &TestEnv) {
    let mut config = env.config();
    config.background_refill = true;
    config.refill_interval = std::time::Duration::from_secs(30);
    let pids7 = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(7i64).build().unwrap())
        .build()
        .unwrap();
    let (pool, _) = CgroupPool::start(config, &is_alive_none).unwrap();
    let cg = pool.acquire(&id("cycle"), &pids7).unwrap();
    let first = slot_of(&cg);
    pool.release(&id("cycle")).unwrap();
    // The id is free at once, whether or not the refill got to the slot yet.
    let again = pool.acquire(&id("cycle"), &pids7).unwrap();
    pool.release(again.sandbox_id()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = pool.stats();
        if s.recycled == 2 && s.recycling == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not recycled: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Back under its slot name with the defaults, unless the refill thread trimmed it (it keeps
    // at most the high watermark, and may do so between any two reads here); nothing parked,
    // recorded or claimed.
    let pids_max = child_dir(env, &first, "pids").join("pids.max");
    match std::fs::read_to_string(&pids_max) {
        Ok(value) => assert_eq!(value.trim(), "max", "{}", pids_max.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                pool.stats().slots_trimmed > 0,
                "{first} gone: {:?}",
                pool.stats()
            )
        }
        Err(e) => panic!("read {}: {e}", pids_max.display()),
    }
    for parent in env.parent_dirs() {
        for name in cgroupfs::child_dirs(&parent).unwrap() {
            assert!(
                cgroup_pool::naming::is_slot_name(&name),
                "left behind: {}",
                parent.join(name).display()
            );
        }
    }
    assert_eq!(
        std::fs::read_dir(env.state_dir.join("claims"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(env.state_dir.join("sandboxes"))
            .unwrap()
            .count(),
        0
    );
    pool.drain().unwrap();
    for p in env.parent_dirs() {
        assert!(!p.exists(), "drain removed {}", p.display());
    }
}

/// A released slot with a task in it (someone moved one in after the release) is never reset or
/// handed out; once the task is gone the refill recycles it. A crash with a released slot not
/// yet recycled leaves it to the next start's reconcile, which resets and frees it.
pub fn busy_released_slot_is_not_recycled(env: &TestEnv) {
    let mut config = env.config();
    config.recycle = cgroup_pool::Recycle::Deferred;
    let pids7 = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(7i64).build().unwrap())
        .build()
        .unwrap();
    let (pool, _) = CgroupPool::start(config.clone(), &is_alive_none).unwrap();
    let cg = pool.acquire(&id("busy"), &pids7).unwrap();
    let slot = slot_of(&cg);
    pool.release(&id("busy")).unwrap();
    assert_eq!(pool.stats().recycling, 1);
    let parked_name = if env.renames() {
        cgroup_pool::naming::recycle_dir_name(&slot)
    } else {
        slot.clone()
    };
    let parked: Vec<PathBuf> = env
        .parent_dirs()
        .iter()
        .map(|p| p.join(&parked_name))
        .collect();
    assert!(exists_all(&parked));
    let sleeper = Sleeper::spawn();
    for p in &parked {
        std::fs::write(p.join("cgroup.procs"), sleeper.pid().to_string()).unwrap();
    }
    pool.refill_now().unwrap();
    let s = pool.stats();
    assert_eq!((s.recycling, s.recycled), (1, 0), "{s:?}");
    for p in &parked {
        assert_eq!(tasks_in(p), sleeper.pid().to_string());
    }
    assert_eq!(
        read(&child_dir(env, &parked_name, "pids").join("pids.max")),
        "7"
    );
    if env.renames() {
        assert!(!free_slots_on_disk(env).contains(&slot));
    } else {
        assert!(env.state_dir.join("claims").join(&slot).exists());
    }
    drop(sleeper);
    pool.refill_now().unwrap();
    let s = pool.stats();
    assert_eq!((s.recycling, s.recycled), (0, 1), "{s:?}");
    assert!(free_slots_on_disk(env).contains(&slot));
    assert_eq!(read(&child_dir(env, &slot, "pids").join("pids.max")), "max");

    // A "crash" with a released slot still parked: the next start resets and frees it.
    let cg = pool.acquire(&id("crash"), &pids7).unwrap();
    let slot = slot_of(&cg);
    pool.release(&id("crash")).unwrap();
    drop(pool);
    let (pool, report) = CgroupPool::start(config, &is_alive_none).unwrap();
    assert_eq!(report.recycled, vec![slot.clone()], "{report:?}");
    assert!(free_slots_on_disk(env).contains(&slot));
    assert_eq!(read(&child_dir(env, &slot, "pids").join("pids.max")), "max");
    assert_eq!(
        std::fs::read_dir(env.state_dir.join("claims"))
            .unwrap()
            .count(),
        0
    );
    pool.drain().unwrap();
}

/// A pool claiming by file (v2, or v1 with `V1Claim::File`) after a crash: a live sandbox's slot
/// is adopted (its record rewritten), a dead one's is reset and freed, a parked released one is
/// recycled; the slots keep their names throughout.
pub fn reconcile_claim_files(env: &TestEnv) {
    let mut config = env.config();
    config.recycle = cgroup_pool::Recycle::Deferred;
    let pids7 = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(7i64).build().unwrap())
        .build()
        .unwrap();
    let (pool, _) = CgroupPool::start(config.clone(), &is_alive_none).unwrap();
    let live = pool.acquire(&id("live"), &pids7).unwrap();
    let dead = pool.acquire(&id("dead"), &pids7).unwrap();
    let parked = pool.acquire(&id("parked"), &pids7).unwrap();
    pool.release(&id("parked")).unwrap();
    let (live_slot, dead_slot, parked_slot) = (slot_of(&live), slot_of(&dead), slot_of(&parked));
    // Lose the live sandbox's record too: reconcile rewrites it from the claim.
    std::fs::remove_file(env.state_dir.join("sandboxes/live.json")).unwrap();
    drop(pool); // the "crash"

    let alive = |s: &cgroup_pool::SandboxId| s.as_str() == "live";
    let (pool, report) = CgroupPool::start(config, &alive).unwrap();
    assert_eq!(report.adopted, vec![id("live")], "{report:?}");
    assert_eq!(report.reclaimed, vec![id("dead")], "{report:?}");
    assert_eq!(report.recycled, vec![parked_slot.clone()], "{report:?}");
    let found = pool.find(&id("live")).unwrap().unwrap();
    assert_eq!(found.paths(), live.paths());
    assert_eq!(read(&dir(&found, "pids").join("pids.max")), "7");
    let free = free_slots_on_disk(env);
    for slot in [&dead_slot, &parked_slot] {
        assert!(free.contains(slot), "{slot} free again: {free:?}");
        assert_eq!(read(&child_dir(env, slot, "pids").join("pids.max")), "max");
    }
    assert!(pool.find(&id("dead")).unwrap().is_none());
    let claims: Vec<String> = std::fs::read_dir(env.state_dir.join("claims"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        claims,
        vec![live_slot],
        "only the live sandbox's claim is left"
    );
    pool.release(&id("live")).unwrap();
    pool.refill_now().unwrap();
    pool.drain().unwrap();
    for p in env.parent_dirs() {
        assert!(!p.exists(), "drain removed {}", p.display());
    }
}

/// The mount point of `dir`'s hierarchy among the test's mounts.
fn mount_of<'a>(env: &'a TestEnv, dir: &Path) -> &'a Path {
    env.mounts
        .iter()
        .find(|m| dir.starts_with(m))
        .unwrap_or_else(|| panic!("{} is in none of {:?}", dir.display(), env.mounts))
}

/// containerd without a pod cgroup parent dictates `/k8s.io/<id>`, and nothing has made
/// `/k8s.io`: the missing parents are made as runc makes them (in every hierarchy; v1 cpusets
/// filled from their parents; unmarked: the platform's), the sandbox's cgroup works (a process
/// joins it, the limits are in), release removes it and leaves the parents. After a killed
/// shim, reconcile removes the sandbox's cgroup and leaves the parents too, and so does drain.
pub fn dictated_parents_are_made(env: &TestEnv, resources: &LinuxResources, pids_limit: bool) {
    let (pool, _) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    let k8s = env.sibling("k8s.io");
    let made = [k8s.clone(), format!("{k8s}/a"), format!("{k8s}/a/b")];
    for mount in &env.mounts {
        assert!(!mount.join(&k8s).exists());
    }
    for (sb, path) in [
        (id("made-1"), format!("/{k8s}/made-1")),
        (id("made-2"), format!("/{k8s}/a/b/made-2")),
    ] {
        let cg = pool.acquire_at(&sb, &path, resources).unwrap();
        assert!(cg.is_bypass());
        let expected: BTreeSet<PathBuf> = env
            .mounts
            .iter()
            .map(|m| m.join(path.trim_start_matches('/')))
            .collect();
        assert_eq!(cg.paths().into_iter().collect::<BTreeSet<_>>(), expected);
        for p in cg.paths() {
            assert_eq!(
                cgroupfs::read_marker(&p).unwrap(),
                Some(Marker::Bypass(sb.clone()))
            );
        }
        if pids_limit {
            assert_eq!(read(&dir(&cg, "pids").join("pids.max")), "10");
        }
        let mut child = Sleeper::spawn();
        cg.attach_process(child.pid()).unwrap();
        assert!(
            proc_cgroup(child.pid()).contains(&format!(":{path}\n")),
            "{}",
            proc_cgroup(child.pid())
        );
        child.kill();
        pool.release(&sb).unwrap();
        for p in cg.paths() {
            assert!(!p.exists(), "{} removed on release", p.display());
            assert!(p.parent().unwrap().is_dir(), "its parent stays");
        }
    }
    assert_eq!(pool.stats().bypassed, 2);
    let assert_platforms = |rels: &[String]| {
        for mount in &env.mounts {
            for rel in rels {
                let d = mount.join(rel);
                assert!(d.is_dir(), "{} stays", d.display());
                assert_eq!(cgroupfs::read_marker(&d).unwrap(), None, "not rund's");
                if env.version == CgroupVersion::V1 && d.join("cpuset.cpus").exists() {
                    let root = mount_of(env, &d);
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        assert_eq!(read(&d.join(file)), read(&root.join(file)), "{file}");
                    }
                }
            }
        }
    };
    assert_platforms(&made);

    // A shim killed while holding it: the next shim's reconcile (what `delete` runs) removes the
    // sandbox's cgroup, not the parents it made.
    let crashed = id("made-3");
    let cg = pool
        .acquire_at(&crashed, &format!("/{k8s}/pod-3/made-3"), resources)
        .unwrap();
    drop(pool);
    let (pool, report) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    assert_eq!(report.reclaimed, vec![crashed.clone()], "{report:?}");
    for p in cg.paths() {
        assert!(!p.exists(), "{} reclaimed", p.display());
    }
    assert!(pool.find(&crashed).unwrap().is_none());
    let with_pod = [made.as_slice(), &[format!("{k8s}/pod-3")]].concat();
    assert_platforms(&with_pod);
    pool.drain().unwrap();
    assert_platforms(&with_pod);
}

/// An acquire that fails after making parents (a cpuset no CPU of this machine has) takes back
/// the parents it made, its cgroup and its record; a parent that existed stays.
pub fn failed_dictated_acquire_leaves_nothing(env: &TestEnv) {
    let (pool, _) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    let bad = LinuxResourcesBuilder::default()
        .cpu(LinuxCpuBuilder::default().cpus("4095").build().unwrap())
        .build()
        .unwrap();
    let plat = env.sibling("gone");
    let sb = id("fails");
    let path = format!("/{plat}/pod/fails");
    let err = pool.acquire_at(&sb, &path, &bad).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cpuset.cpus") && msg.contains(path.trim_start_matches('/')),
        "{msg}"
    );
    for mount in &env.mounts {
        assert!(!mount.join(&plat).exists(), "{} taken back", plat);
    }
    assert!(pool.find(&sb).unwrap().is_none());
    // The same under a parent that exists: only what the acquire made goes.
    for mount in &env.mounts {
        let d = mount.join(&plat);
        std::fs::create_dir(&d).unwrap();
        if env.version == CgroupVersion::V1 && d.join("cpuset.cpus").exists() {
            cgroup_pool::limits::copy_cpuset_from_parent(&d).unwrap();
        }
    }
    pool.acquire_at(&sb, &path, &bad).unwrap_err();
    for mount in &env.mounts {
        assert!(mount.join(&plat).is_dir(), "the platform's parent stays");
        assert!(!mount.join(&plat).join("pod").exists());
    }
    // And the same sandbox fits there once it asks for something possible.
    pool.acquire_at(&sb, &path, &no_limits()).unwrap();
    pool.release(&sb).unwrap();
    pool.drain().unwrap();
}

/// Two shims (two pools on one state directory) make `/<new>/mid/a<n>` and `/<new>/mid/b<n>` at
/// the same moment, `<new>` and `mid` made by neither yet: both succeed (the loser of each
/// mkdir finds the directory made), round after round.
pub fn concurrent_dictated_under_new_parents(env: &TestEnv, resources: &LinuxResources) {
    let (a, _) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    let (b, _) = CgroupPool::start(env.config(), &is_alive_none).unwrap();
    for round in 0..20 {
        let plat = env.sibling(&format!("race{round}"));
        let barrier = Barrier::new(2);
        let run = |pool: &CgroupPool, who: &str| {
            let sb = id(&format!("{who}{round}"));
            barrier.wait();
            pool.acquire_at(&sb, &format!("/{plat}/mid/{sb}"), resources)
                .map(|cg| (sb, cg))
        };
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| run(&a, "a"));
            let tb = s.spawn(|| run(&b, "b"));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let (sa, ca) = ra.unwrap_or_else(|e| panic!("round {round}, a: {e}"));
        let (sb, cb) = rb.unwrap_or_else(|e| panic!("round {round}, b: {e}"));
        for p in ca.paths().iter().chain(&cb.paths()) {
            assert!(p.is_dir(), "{}", p.display());
        }
        a.release(&sa).unwrap();
        b.release(&sb).unwrap();
        for mount in &env.mounts {
            assert!(mount.join(&plat).join("mid").is_dir());
        }
    }
    drop(b);
    a.drain().unwrap();
}
