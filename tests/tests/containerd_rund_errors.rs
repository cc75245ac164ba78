//! Bad input that only rund can meet, through containerd: a microVM too small, a missing guest
//! kernel, a guest that stops before its agent answers (a junk initramfs), one that never answers
//! (its kernel panics and waits), a spec mount of a type
//! the guest cannot take, a rootfs of a type rund cannot split (the btrfs snapshotter's). Each
//! time a clear error reaches `ctr`, and nothing is left behind (the harness checks tasks, shims,
//! mounts and rund's state). Needs what tests/tests/containerd_ctr.rs needs;
//! `RUND_REQUIRE_E2E_TESTS=1` makes a skip a failure.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rund_tests::containerd::{
    start_for_test_with, Containerd, Options, Runtime, BUSYBOX_IMAGE, CTR_NAMESPACE,
};

/// `ctr run --rm` with rund; returns (success, stderr).
fn run_rund(cd: &Containerd, id: &str, extra: &[&str], cmd: &[&str]) -> (bool, String) {
    let mut args = vec!["run", "--rm", "--runtime", Runtime::Rund.runtime_type()];
    args.extend(extra);
    args.extend([BUSYBOX_IMAGE, id]);
    args.extend(cmd);
    eprintln!("$ ctr {}", args.join(" "));
    let out = cd.ctr(&args).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("  -> {out:?}");
    (out.success(), out.stderr)
}

/// Runs a `true` container with rund's configuration changed by `edit` (the shim reads its
/// configuration at each start), then restores it; the start must fail: returns its error, the
/// container deleted.
fn run_with_config(cd: &Containerd, scenario: &str, edit: impl Fn(&str) -> String) -> String {
    let setup = cd.rund().expect("rund's setup");
    let good = std::fs::read_to_string(&setup.config_path).unwrap();
    let bad = edit(&good);
    assert_ne!(bad, good, "{scenario}: the edit changed nothing in {good}");
    std::fs::write(&setup.config_path, bad).unwrap();
    let id = cd.unique_id(scenario, Runtime::Rund);
    let (ok, err) = run_rund(cd, &id, &[], &["true"]);
    std::fs::write(&setup.config_path, good).unwrap();
    assert!(!ok, "{scenario}: started");
    let _ = cd.ctr(&["container", "delete", &id]);
    err
}

/// [`run_with_config`] with the configuration naming `file` instead of `configured` for `key`.
fn run_with_guest_file(
    cd: &Containerd,
    scenario: &str,
    key: &str,
    configured: &Path,
    file: &Path,
) -> String {
    let line = |p: &Path| format!("{key} = {:?}", p.to_string_lossy());
    run_with_config(cd, scenario, |good| {
        good.replace(&line(configured), &line(file))
    })
}

fn start(test: &str, options: Options) -> Option<Containerd> {
    let cd = start_for_test_with(test, options)?;
    if !cd.runtimes().contains(&Runtime::Rund) {
        eprintln!("skipping {test}: rund is not among the runtimes under test");
        return None;
    }
    Some(cd)
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing() {
    let test = "bad_input_gets_a_clear_error_and_leaves_nothing";
    let Some(cd) = start(test, Options::default()) else {
        return;
    };
    let clean = |what: &str| {
        cd.wait_until_clean(CTR_NAMESPACE)
            .unwrap_or_else(|e| panic!("{test}: {what}: {e}"));
    };

    // A guest smaller than a kernel and the agent need.
    let id = cd.unique_id("tiny", Runtime::Rund);
    let (ok, err) = run_rund(
        &cd,
        &id,
        &["--annotation", "io.rund.memory-mib=32"],
        &["true"],
    );
    assert!(!ok, "{test}: a 32 MiB guest started");
    assert!(
        err.contains("32 MiB") && err.contains("below"),
        "{test}: {err}"
    );
    let _ = cd.ctr(&["container", "delete", &id]);
    clean("memory too small");

    // A guest sized above the container's own memory limit: an annotation chooses within the
    // pod's limits, never above them (the host cgroup's limit follows the guest).
    let id = cd.unique_id("lift", Runtime::Rund);
    let (ok, err) = run_rund(
        &cd,
        &id,
        &[
            "--memory-limit",
            "134217728",
            "--annotation",
            "io.rund.memory-mib=4096",
        ],
        &["true"],
    );
    assert!(!ok, "{test}: a 4 GiB guest started for a 128 MiB container");
    assert!(
        err.contains("io.rund.memory-mib=4096")
            && err.contains("above the pod's memory limit (128 MiB)"),
        "{test}: {err}"
    );
    let _ = cd.ctr(&["container", "delete", &id]);
    clean("memory above the limit");

    // A root container on a read-write volume: files are made, but none setuid (the guest's
    // kernel could forge the request; rund refuses the bit on every share), and a write clears
    // the bit of a setuid file the host already had there.
    let id = cd.unique_id("setuid", Runtime::Rund);
    let volume = cd.dir().join(&id);
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("had"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(volume.join("had"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let mount = format!("type=bind,src={},dst=/v,options=rbind:rw", volume.display());
    let script = "echo x > /v/made; chmod 4755 /v/made; echo chmod=$?; echo y >> /v/had";
    let (ok, err) = {
        let mut args = vec!["run", "--rm", "--runtime", Runtime::Rund.runtime_type()];
        args.extend(["--mount", &mount, BUSYBOX_IMAGE, &id, "sh", "-c", script]);
        eprintln!("$ ctr {}", args.join(" "));
        let out = cd.ctr(&args).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("  -> {out:?}");
        assert!(out.stdout.contains("chmod=1"), "{test}: {out:?}");
        (out.success(), out.stderr)
    };
    assert!(ok, "{test}: {err}");
    let mode = |name: &str| std::fs::metadata(volume.join(name)).unwrap().mode() & 0o7777;
    assert_eq!(mode("made") & 0o6000, 0, "{test}: a setuid file was made");
    assert_eq!(
        mode("had"),
        0o755,
        "{test}: the host's setuid bit survived a write"
    );
    clean("setuid on a volume");

    // A pod's container whose sandbox id is a path: a shim that took it would make, and at
    // `delete` remove, `<run_dir>/../<victim>`. Refused; the victim keeps its file.
    let setup = cd.rund().expect("rund's setup");
    let victim_name = format!("rund-errors-victim-{}", std::process::id());
    let victim = setup.config.run_dir.parent().unwrap().join(&victim_name);
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("data"), b"precious").unwrap();
    let id = cd.unique_id("idpath", Runtime::Rund);
    let pod = format!("io.kubernetes.cri.sandbox-id=../{victim_name}");
    let (ok, err) = run_rund(
        &cd,
        &id,
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            &pod,
        ],
        &["true"],
    );
    assert!(!ok, "{test}: a container of pod ../{victim_name} started");
    assert!(
        err.contains("sandbox id") && err.contains("cannot name a file"),
        "{test}: {err}"
    );
    let _ = cd.ctr(&["container", "delete", &id]);
    clean("a sandbox id that is a path");
    assert!(
        victim.join("data").exists(),
        "{test}: {} was removed",
        victim.display()
    );
    std::fs::remove_dir_all(&victim).unwrap();

    // A spec mount of a type the guest cannot mount.
    let id = cd.unique_id("nfs", Runtime::Rund);
    let (ok, err) = run_rund(
        &cd,
        &id,
        &[
            "--mount",
            "type=nfs,src=server:/export,dst=/data,options=rw",
        ],
        &["true"],
    );
    assert!(!ok, "{test}: an nfs mount was accepted");
    assert!(
        err.contains("nfs") && err.contains("/data"),
        "{test}: {err}"
    );
    let _ = cd.ctr(&["container", "delete", &id]);
    clean("unsupported mount type");

    // The configured guest kernel is missing (the shim reads its configuration at each start).
    let missing = cd.dir().join("no-such-vmlinux");
    let err = run_with_guest_file(&cd, "nokernel", "kernel", &setup.config.kernel, &missing);
    assert!(
        err.contains("guest kernel") && err.contains(missing.to_str().unwrap()),
        "{test}: {err}"
    );
    clean("missing kernel");

    // An initramfs that is not one: the guest kernel panics, and the shim says so at once, with
    // the console's end, instead of waiting out the agent's timeout.
    let junk = cd.dir().join("junk-initramfs");
    std::fs::write(&junk, vec![0x5au8; 64 * 1024]).unwrap();
    let err = run_with_guest_file(
        &cd,
        "junkinitrd",
        "initramfs",
        &setup.config.initramfs,
        &junk,
    );
    assert!(
        err.contains("the guest stopped before its agent answered") && err.contains("Kernel panic"),
        "{test}: {err}"
    );
    clean("junk initramfs");

    // A guest that never answers: its kernel finds no init and, told `panic=0`, waits forever
    // instead of rebooting. The agent's timeout says where the vCPUs are, what the devices
    // hold, and how the console ends. 20 s: the nested guest may still be unpacking its
    // initramfs at 5 s, before it panics.
    let err = run_with_config(&cd, "noanswer", |good| {
        let mut doc: toml_edit::DocumentMut = good.parse().expect("rund's configuration");
        doc["guest"]["agent_timeout_secs"] = toml_edit::value(20);
        doc["guest"]["extra_cmdline"] = toml_edit::value("rdinit=/nonexistent panic=0");
        doc.to_string()
    });
    for part in [
        "the agent did not answer within 20s of the VM's start; the microVM runs; its vCPUs:\nvCPU 0: ",
        "\nvirtio devices:\n",
        "\nvirtio-vsock: ",
        "; the guest console ends with:\n",
        "Kernel panic",
    ] {
        assert!(err.contains(part), "{test}: no {part:?} in {err}");
    }
    clean("a guest that never answers");

    // And a good container still runs afterwards.
    let id = cd.unique_id("after", Runtime::Rund);
    let (ok, err) = run_rund(&cd, &id, &[], &["echo", "still-fine"]);
    assert!(ok, "{test}: {err}");
    clean("a good container");
}

#[test]
fn rootfs_of_an_unsupported_type_gets_a_clear_error_and_leaves_nothing() {
    let test = "rootfs_of_an_unsupported_type_gets_a_clear_error_and_leaves_nothing";
    let options = Options {
        btrfs_snapshotter: true,
        ..Options::default()
    };
    let Some(cd) = start(test, options) else {
        return;
    };
    // The snapshotter works: runc runs from its subvolume.
    let id = cd.unique_id("btrfs", Runtime::Runc);
    let out = cd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "btrfs",
            BUSYBOX_IMAGE,
            &id,
            "echo",
            "on-btrfs",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.success() && out.stdout.contains("on-btrfs"),
        "{test}: runc on btrfs: {out:?}"
    );
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: runc on btrfs: {e}"));

    // rund splits overlay and bind rootfs mounts only: a btrfs subvolume is refused by name.
    let id = cd.unique_id("btrfs", Runtime::Rund);
    let (ok, err) = run_rund(&cd, &id, &["--snapshotter", "btrfs"], &["true"]);
    assert!(!ok, "{test}: a btrfs rootfs was accepted");
    assert!(
        err.contains("\"btrfs\" is not supported") && err.contains("overlay or bind"),
        "{test}: {err}"
    );
    let _ = cd.ctr(&["container", "delete", &id]);
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: after the btrfs rootfs: {e}"));
}
