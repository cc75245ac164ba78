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
        if !v2 {
            assert!(
                p.ends_with(format!("sandbox-{sb}")),
                "renamed on v1: {}",
                p.display()
            );
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

/// A platform-dictated parent: the cgroup is made there (bypass, counted), with its limits, and
/// removed on release. A missing parent and a systemd-style path are clear errors.
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
    }

    let err = pool
        .acquire_at(&id("x"), &format!("/{kube}/no-such-pod/x"), &no_limits())
        .unwrap_err();
    assert!(
        matches!(err, PoolError::DictatedParentMissing { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("no-such-pod"), "{err}");
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
