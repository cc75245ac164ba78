//! Bad input that only rund can meet, through containerd: a microVM too small, a missing guest
//! kernel, a spec mount of a type the guest cannot take. Each time a clear error reaches `ctr`,
//! and nothing is left behind (the harness checks tasks, shims, mounts and rund's state). Needs
//! what tests/tests/containerd_ctr.rs needs; `RUND_REQUIRE_E2E_TESTS=1` makes a skip a failure.

use rund_tests::containerd::{start_for_test, Containerd, Runtime, BUSYBOX_IMAGE, CTR_NAMESPACE};

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

fn start(test: &str) -> Option<Containerd> {
    let cd = start_for_test(test)?;
    if !cd.runtimes().contains(&Runtime::Rund) {
        eprintln!("skipping {test}: rund is not among the runtimes under test");
        return None;
    }
    Some(cd)
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing() {
    let test = "bad_input_gets_a_clear_error_and_leaves_nothing";
    let Some(cd) = start(test) else {
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
    let setup = cd.rund().expect("rund's setup");
    let good = std::fs::read_to_string(&setup.config_path).unwrap();
    let missing = cd.dir().join("no-such-vmlinux");
    let bad = good.replace(
        &format!("kernel = {:?}", setup.config.kernel.to_string_lossy()),
        &format!("kernel = {:?}", missing.to_string_lossy()),
    );
    assert_ne!(bad, good, "{test}: the kernel line was not found in {good}");
    std::fs::write(&setup.config_path, bad).unwrap();
    let id = cd.unique_id("nokernel", Runtime::Rund);
    let (ok, err) = run_rund(&cd, &id, &[], &["true"]);
    std::fs::write(&setup.config_path, good).unwrap();
    assert!(!ok, "{test}: started without a kernel");
    assert!(
        err.contains("guest kernel") && err.contains(missing.to_str().unwrap()),
        "{test}: {err}"
    );
    let _ = cd.ctr(&["container", "delete", &id]);
    clean("missing kernel");

    // And a good container still runs afterwards.
    let id = cd.unique_id("after", Runtime::Rund);
    let (ok, err) = run_rund(&cd, &id, &[], &["echo", "still-fine"]);
    assert!(ok, "{test}: {err}");
    clean("a good container");
}
