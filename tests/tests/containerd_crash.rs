//! `kill -9` of a rund shim while its container runs: containerd runs the shim's `delete`, and
//! afterwards the task is gone and nothing of the sandbox remains on the host: no mount, cgroup,
//! process, socket or file (the writable image, the state directory). rund keeps no loop devices.
//! Needs root, containerd, the testbed's KVM and the built shim (see the harness in
//! tests/src/containerd.rs); `RUND_REQUIRE_E2E_TESTS=1` makes a skip a failure.

use std::path::{Path, PathBuf};

use rund_tests::containerd::{start_for_test, Runtime, BUSYBOX_IMAGE, CTR_NAMESPACE};

/// The cgroup directories a process is in, from /proc/<pid>/cgroup (cgroup v2 and v1 lines).
fn cgroup_dirs(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let rel = path.trim_start_matches('/');
            Some(if controllers.is_empty() {
                Path::new("/sys/fs/cgroup").join(rel)
            } else {
                let first = controllers.split(',').next()?;
                Path::new("/sys/fs/cgroup").join(first).join(rel)
            })
        })
        .collect()
}

fn mounts_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn killed_shim_leaves_nothing_behind() {
    let test = "killed_shim_leaves_nothing_behind";
    let Some(cd) = start_for_test(test) else {
        return;
    };
    if !cd.runtimes().contains(&Runtime::Rund) {
        eprintln!("skipping {test}: rund is not among the runtimes under test");
        return;
    }
    let rund = cd.rund().expect("rund's setup").config.clone();
    let id = cd.unique_id("crash", Runtime::Rund);
    cd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        Runtime::Rund.runtime_type(),
        BUSYBOX_IMAGE,
        &id,
        "sleep",
        "1000",
    ])
    .unwrap_or_else(|e| panic!("{test}: {e}"));

    let sandbox_dir = rund.run_dir.join(&id);
    let image = rund
        .writable_layer_dir
        .join("sandboxes")
        .join(format!("{id}.ext4"));
    let shim = cd
        .shim_servers()
        .unwrap()
        .into_iter()
        .find(|p| p.has_arg_pair("-id", &id))
        .unwrap_or_else(|| panic!("{test}: no shim serves {id}"));
    // What the sandbox holds while it runs: the proof that the checks below can fail.
    assert!(
        sandbox_dir.join("vsock").exists(),
        "{test}: no vsock socket"
    );
    assert!(
        image.is_file(),
        "{test}: no writable image {}",
        image.display()
    );
    assert!(
        !mounts_mentioning(sandbox_dir.to_str().unwrap()).is_empty(),
        "{test}: no share mounts"
    );
    let cgroups = cgroup_dirs(shim.pid);
    assert!(
        cgroups
            .iter()
            .any(|c| c.to_string_lossy().contains(&rund.cgroup_parent)),
        "{test}: the shim is not in a cgroup under {}: {cgroups:?}",
        rund.cgroup_parent
    );

    // containerd notices the dead shim, runs its `delete` and forgets the task.
    cd.kill_shim(CTR_NAMESPACE, &id)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    cd.ctr_ok(&["container", "delete", &id]).unwrap();
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", cd.log_tail(40)));

    assert!(
        !sandbox_dir.exists(),
        "{test}: {} remains",
        sandbox_dir.display()
    );
    assert!(!image.exists(), "{test}: {} remains", image.display());
    let left = mounts_mentioning(sandbox_dir.to_str().unwrap());
    assert!(left.is_empty(), "{test}: mounts remain: {left:?}");
    assert!(
        !Path::new(&format!("/proc/{}", shim.pid)).exists(),
        "{test}: the shim still runs"
    );
    for dir in &cgroups {
        // The sandbox's cgroup went back to the pool (or away): no task and no record of it.
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            assert!(
                procs.trim().is_empty(),
                "{test}: {} holds {procs}",
                dir.display()
            );
        }
    }
    let record = rund
        .run_dir
        .join("cgroup-pool/sandboxes")
        .join(format!("{id}.json"));
    assert!(!record.exists(), "{test}: the pool still records {id}");
    let loops = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(
        !loops.contains(&id),
        "{test}: a loop device remains: {loops}"
    );
}
