//! Sandboxes from templates through containerd, on the node as `rund install` leaves it (the
//! harness in tests/src/containerd.rs), rund alone (runc has no templates):
//! - one template restored by ten CRI pods running side by side (pods with a network namespace of
//!   their own on a CNI bridge): each guest has its own hostname, its own randomness (16 bytes of
//!   `/dev/urandom` unlike every other clone's), a wall clock within 1 s of the host's, only its
//!   own writable layer and shares, and its own network: the address the CNI gave its pod (as
//!   PodSandboxStatus reports it) on its NIC, and the bridge's gateway answers its ping;
//! - a kernel or initramfs that changed is not restored from the template of the old one: the
//!   sandbox cold-boots and the old template is replaced;
//! - a `kill -9` of a shim while it restores leaves nothing, and the template still serves;
//! - a template removed while sandboxes run from it: they go on, the next sandbox makes a new one;
//! - ten shims needing the same missing template at once make it once (`require`), and so do
//!   shims that each start a background maker (`auto`).
//!
//! Which start a sandbox had comes from the `rund-start-split` line its shim logs
//! (`start=template|cold`). Runs in the testbed (`ci/test`); needs what
//! tests/tests/containerd_ctr.rs needs.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_cri::v1::Mount;
use rund_tests::containerd::bench::{start_splits, StartSplit};
use rund_tests::containerd::cni::PodCni;
use rund_tests::containerd::{
    start_for_test, Containerd, Runtime, TemplateRow, BUSYBOX_IMAGE, COMMAND_TIMEOUT,
    CRI_NAMESPACE, CTR_NAMESPACE,
};
use rund_tests::cri::{container_config, pod_network_pod_config, CriClient};

const CLONES: usize = 10;
/// Cold starts at once in `auto` mode (each boots a VM: fewer than the clones).
const AUTO_AT_ONCE: usize = 4;
/// How long a background maker may take in the testbed (a cold boot to the agent, a snapshot).
const MAKER_TIMEOUT: Duration = Duration::from_secs(180);

fn start(test: &str) -> Option<Containerd> {
    let cd = start_for_test(test)?;
    if !cd.runtimes().contains(&Runtime::Rund) {
        eprintln!("skipping {test}: rund is not among the runtimes under test");
        return None;
    }
    Some(cd)
}

fn rund_ok(cd: &Containerd, args: &[&str]) -> String {
    let out = cd
        .rund_admin(args)
        .unwrap_or_else(|e| panic!("rund {}: {e}", args.join(" ")));
    assert!(
        out.success(),
        "rund {}: {}{}",
        args.join(" "),
        out.stdout,
        out.stderr
    );
    out.stdout
}

fn templates(cd: &Containerd) -> Vec<TemplateRow> {
    cd.templates().unwrap_or_else(|e| panic!("{e}"))
}

/// The start line of sandbox `id` in containerd's log, which may reach it a moment after the
/// start. Only for sandboxes started one at a time: containerd copies shims' logs into its own
/// in chunks, and lines of shims writing at once can run into each other.
fn split_of(cd: &Containerd, id: &str) -> StartSplit {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(cd.log_path()).expect("containerd's log");
        if let Some(split) = start_splits(&log).into_iter().find(|s| s.sandbox == id) {
            return split;
        }
        assert!(
            Instant::now() < deadline,
            "no rund-start-split line for {id}\n{}",
            cd.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// `ctr run --rm` of rund with `cmd`; returns (success, stdout, stderr).
fn ctr_run(cd: &Containerd, id: &str, cmd: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        Runtime::Rund.runtime_type(),
        BUSYBOX_IMAGE,
        id,
    ];
    args.extend(cmd);
    let out = cd.ctr(&args).unwrap_or_else(|e| panic!("{e}"));
    (out.success(), out.stdout, out.stderr)
}

/// A fresh template of the default shape, made the operator's way; returns it.
fn fresh_template(cd: &Containerd) -> TemplateRow {
    rund_ok(cd, &["template", "remove", "all"]);
    rund_ok(cd, &["template", "create"]);
    let rows = templates(cd);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].current, "{rows:?}");
    rows[0].clone()
}

/// What one clone saw of itself.
#[derive(Debug)]
struct CloneView {
    hostname: String,
    random: String,
    clock_s: u64,
    host_before_s: u64,
    host_after_s: u64,
    root: Vec<String>,
    volume: Vec<String>,
    /// The CNI's address for the pod (PodSandboxStatus), and the guest NIC's.
    pod_ip: String,
    address: String,
    pong: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clones_of_one_template_are_each_their_own() {
    let test = "ten_clones_of_one_template_are_each_their_own";
    // Before containerd starts: its CRI plugin reads the CNI configuration then.
    let Some(_cni) = rund_tests::containerd::node::allowed(test)
        .then(|| PodCni::install(test))
        .flatten()
    else {
        return;
    };
    let Some(cd) = start(test) else {
        return;
    };
    let template = fresh_template(&cd);
    let mut cri = CriClient::connect(cd.socket(), Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut pods = Vec::new();
    let mut views = Vec::new();
    for i in 0..CLONES {
        let name = cd.unique_id(&format!("clone{i}"), Runtime::Rund);
        let log_dir = cd.dir().join(format!("logs-{name}"));
        let volume = cd.dir().join(format!("volume-{i}"));
        for d in [&log_dir, &volume] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(volume.join(format!("only-{i}")), b"x").expect("volume file");
        let pod = pod_network_pod_config(&name, &name, &log_dir, &format!("clone-{i}"));
        eprintln!("RunPodSandbox clone-{i}");
        let pod_id = cri
            .run_pod_sandbox(&pod, Runtime::Rund.name())
            .await
            .unwrap_or_else(|e| panic!("{test}: clone {i}: {e}"));
        pods.push(pod_id.clone());
        let pod_ip = cri
            .pod_sandbox_status(&pod_id)
            .await
            .unwrap_or_else(|e| panic!("{test}: clone {i}: {e}"))
            .network
            .map(|n| n.ip)
            .unwrap_or_default();
        let mut c = container_config("main", BUSYBOX_IMAGE, &["sleep", "1000"], "main.log");
        c.mounts = vec![Mount {
            container_path: "/vol".into(),
            host_path: volume.to_string_lossy().into_owned(),
            ..Mount::default()
        }];
        let cid = cri
            .create_container(&pod_id, &c, &pod)
            .await
            .unwrap_or_else(|e| panic!("{test}: clone {i}: {e}"));
        cri.start_container(&cid)
            .await
            .unwrap_or_else(|e| panic!("{test}: clone {i}: {e}"));
        let script = format!(
            "hostname; od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'; echo; date +%s; \
             echo mine > /mine-{i}; ls / | tr '\\n' ' '; echo; ls /vol | tr '\\n' ' '; echo; \
             ip -o -4 addr show dev eth0 | awk '{{print $4}}'; \
             ping -c 1 -W 5 {gateway} >/dev/null && echo pong",
            gateway = PodCni::GATEWAY
        );
        let host_before_s = now_s();
        let exec = cri
            .exec_sync(&cid, &["sh", "-c", &script], COMMAND_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{test}: clone {i}: {e}"));
        let host_after_s = now_s();
        let out = String::from_utf8_lossy(&exec.stdout).into_owned();
        assert_eq!(
            exec.exit_code,
            0,
            "{test}: clone {i}: {out} {}",
            String::from_utf8_lossy(&exec.stderr)
        );
        let lines: Vec<&str> = out.lines().collect();
        let [hostname, random, clock, root, vol, address, pong] = lines[..] else {
            panic!("{test}: clone {i}: unexpected output {out:?}");
        };
        let words = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        views.push(CloneView {
            hostname: hostname.to_owned(),
            random: random.to_owned(),
            clock_s: clock.trim().parse().expect("date +%s"),
            host_before_s,
            host_after_s,
            root: words(root),
            volume: words(vol),
            pod_ip,
            address: address.to_owned(),
            pong: pong.to_owned(),
        });
    }
    for (i, v) in views.iter().enumerate() {
        eprintln!("clone {i}: {v:?}");
        assert_eq!(v.hostname, format!("clone-{i}"), "{test}: clone {i}");
        assert_eq!(v.random.len(), 32, "{test}: clone {i}: {v:?}");
        assert!(
            v.clock_s + 1 >= v.host_before_s && v.clock_s <= v.host_after_s + 1,
            "{test}: clone {i}'s clock is off: {v:?}"
        );
        // Its own marker in its writable layer, no earlier clone's (still running, theirs
        // written before it started).
        let markers: Vec<&String> = v.root.iter().filter(|n| n.starts_with("mine-")).collect();
        assert_eq!(markers, [&format!("mine-{i}")], "{test}: clone {i}");
        assert_eq!(v.volume, [format!("only-{i}")], "{test}: clone {i}");
        assert!(!v.pod_ip.is_empty(), "{test}: clone {i}: no pod IP: {v:?}");
        assert_eq!(v.address, format!("{}/24", v.pod_ip), "{test}: clone {i}");
        assert_eq!(v.pong, "pong", "{test}: clone {i}");
    }
    let addresses: HashSet<&str> = views.iter().map(|v| v.address.as_str()).collect();
    assert_eq!(addresses.len(), CLONES, "{test}: clones share an address");
    let distinct: HashSet<&str> = views.iter().map(|v| v.random.as_str()).collect();
    assert_eq!(distinct.len(), CLONES, "{test}: clones share randomness");
    // Every one of them restored it (a cold start would not have counted).
    let after = templates(&cd);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].key, template.key);
    assert_eq!(after[0].restores, CLONES as u64, "{after:?}");
    for pod in &pods {
        cri.stop_pod_sandbox(pod)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        cri.remove_pod_sandbox(pod)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    cd.wait_until_clean(CRI_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

/// Kills and removes a container started with `ctr run -d`.
fn remove_running(cd: &Containerd, id: &str) {
    cd.remove_container(id)
        .unwrap_or_else(|e| panic!("{id}: {e}"));
}

/// Points rund's configuration's `key` (`kernel`, `initramfs`) at a copy of its file: the same
/// bytes, another file, as an upgrade installs one.
fn replace_guest_file(cd: &Containerd, key: &str, configured: &Path) -> std::path::PathBuf {
    let copy = cd.dir().join(format!("new-{key}"));
    std::fs::copy(configured, &copy).expect("copy the guest file");
    let setup = cd.rund().expect("rund's setup");
    let text = std::fs::read_to_string(&setup.config_path).expect("rund's configuration");
    let mut doc: toml_edit::DocumentMut = text.parse().expect("rund's configuration");
    doc["guest"][key] = toml_edit::value(copy.to_string_lossy().into_owned());
    std::fs::write(&setup.config_path, doc.to_string()).expect("rund's configuration");
    copy
}

#[test]
fn a_changed_kernel_or_initramfs_is_not_restored_from_an_old_template() {
    let test = "a_changed_kernel_or_initramfs_is_not_restored_from_an_old_template";
    let Some(cd) = start(test) else {
        return;
    };
    let setup = cd.rund().expect("rund's setup").clone();
    let original = std::fs::read_to_string(&setup.config_path).unwrap();
    let mut previous = fresh_template(&cd);
    for (key, file) in [
        ("initramfs", &setup.config.initramfs),
        ("kernel", &setup.config.kernel),
    ] {
        replace_guest_file(&cd, key, file);
        let rows = templates(&cd);
        assert!(
            rows.iter().all(|r| !r.current),
            "{test}: {key}: a template still counts as current: {rows:?}"
        );
        let id = cd.unique_id(&format!("new{key}"), Runtime::Rund);
        let (ok, out, err) = ctr_run(&cd, &id, &["echo", "upgraded"]);
        assert!(ok && out.contains("upgraded"), "{test}: {key}: {out} {err}");
        let split = split_of(&cd, &id);
        assert!(!split.from_template(), "{test}: {key}: restored: {split:?}");
        // The cold start made its shape's template in the background; the old one went.
        assert!(cd.wait_for_template_makers(MAKER_TIMEOUT), "{test}: maker");
        let rows = templates(&cd);
        assert_eq!(rows.len(), 1, "{test}: {key}: {rows:?}");
        assert!(rows[0].current, "{test}: {key}: {rows:?}");
        assert_ne!(rows[0].key, previous.key, "{test}: {key}");
        let id = cd.unique_id(&format!("after{key}"), Runtime::Rund);
        let (ok, out, err) = ctr_run(&cd, &id, &["echo", "restored"]);
        assert!(ok && out.contains("restored"), "{test}: {key}: {out} {err}");
        assert!(split_of(&cd, &id).from_template(), "{test}: {key}");
        previous = rows[0].clone();
    }
    std::fs::write(&setup.config_path, original).unwrap();
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

/// Whether process `pid` maps a file under `dir`.
fn maps_file_under(pid: i32, dir: &Path) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .is_ok_and(|m| m.contains(dir.to_string_lossy().as_ref()))
}

#[test]
fn a_shim_killed_during_a_restore_leaves_nothing() {
    let test = "a_shim_killed_during_a_restore_leaves_nothing";
    let Some(cd) = start(test) else {
        return;
    };
    let template = fresh_template(&cd);
    let rund = cd.rund().expect("rund's setup").config.clone();
    let id = cd.unique_id("killed", Runtime::Rund);
    let mut ctr = cd.ctr_command();
    ctr.args([
        "run",
        "--rm",
        "--runtime",
        Runtime::Rund.runtime_type(),
        BUSYBOX_IMAGE,
        &id,
        "true",
    ]);
    let mut child = ctr.spawn().expect("ctr run");
    // The moment the shim has mapped the template's memory, it is restoring (or has just
    // restored and waits for the agent): the kill lands there.
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let shim = loop {
        let found = cd
            .shim_servers()
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.has_arg_pair("-id", &id) && maps_file_under(p.pid, &template.dir));
        if let Some(shim) = found {
            break shim;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: no shim mapped {}",
            template.dir.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = child.wait().expect("ctr run");
    assert!(!status.success(), "{test}: the container ran");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while cd.tasks(CTR_NAMESPACE).unwrap().iter().any(|t| t.id == id) {
        assert!(Instant::now() < deadline, "{test}: the task stays");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = cd.ctr(&["container", "delete", &id]);
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", cd.log_tail(40)));
    let sandbox_dir = rund.run_dir.join(&id);
    assert!(!sandbox_dir.exists(), "{test}: {sandbox_dir:?} remains");
    let image = rund
        .writable_layer_dir
        .join("sandboxes")
        .join(format!("{id}.ext4"));
    assert!(!image.exists(), "{test}: {image:?} remains");
    // The template is untouched and still serves.
    let rows = templates(&cd);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].key, template.key);
    let next = cd.unique_id("next", Runtime::Rund);
    let (ok, out, err) = ctr_run(&cd, &next, &["echo", "fine"]);
    assert!(ok && out.contains("fine"), "{test}: {out} {err}");
    assert!(split_of(&cd, &next).from_template(), "{test}");
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

#[test]
fn a_template_removed_while_in_use_keeps_its_sandboxes_and_is_made_again() {
    let test = "a_template_removed_while_in_use_keeps_its_sandboxes_and_is_made_again";
    let Some(cd) = start(test) else {
        return;
    };
    let template = fresh_template(&cd);
    let id = cd.unique_id("inuse", Runtime::Rund);
    let out = run_detached(&cd, &id);
    assert!(out.success(), "{test}: {}", out.stderr);
    assert!(split_of(&cd, &id).from_template(), "{test}");
    rund_ok(&cd, &["template", "remove", &template.key]);
    assert!(templates(&cd).is_empty(), "{test}");
    // The sandbox goes on: its memory is the removed file, still mapped.
    let exec = cd
        .ctr_ok(&["task", "exec", "--exec-id", "probe", &id, "echo", "alive"])
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(exec.contains("alive"), "{test}: {exec}");
    // The next sandbox finds none, cold-boots, and has the template made again.
    let next = cd.unique_id("next", Runtime::Rund);
    let (ok, out, err) = ctr_run(&cd, &next, &["echo", "cold"]);
    assert!(ok && out.contains("cold"), "{test}: {out} {err}");
    assert!(!split_of(&cd, &next).from_template(), "{test}");
    assert!(cd.wait_for_template_makers(MAKER_TIMEOUT), "{test}: maker");
    let rows = templates(&cd);
    assert_eq!(rows.len(), 1, "{test}: {rows:?}");
    assert_eq!(rows[0].key, template.key, "{test}: same inputs, same key");
    assert_eq!(rows[0].restores, 0, "{test}: {rows:?}");
    let exec = cd
        .ctr_ok(&["task", "exec", "--exec-id", "probe2", &id, "echo", "still"])
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(exec.contains("still"), "{test}: {exec}");
    remove_running(&cd, &id);
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

#[test]
fn shapes_kept_ready_are_made_by_a_start_and_by_rund() {
    let test = "shapes_kept_ready_are_made_by_a_start_and_by_rund";
    let Some(cd) = start(test) else {
        return;
    };
    // Another shape than the default pod's (rund's own figures: 1 vCPU, 256 + 64 MiB).
    const KEPT: (u64, u64) = (2, 192);
    let shapes = |rows: &[TemplateRow]| {
        let mut s: Vec<(u64, u64)> = rows.iter().map(|r| (r.vcpus, r.memory_mib)).collect();
        s.sort();
        s
    };
    rund_ok(&cd, &["template", "remove", "all"]);
    cd.set_template_keep_ready(&[(KEPT.0 as u32, KEPT.1 as u32)])
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    // A cold start makes its own shape's template and the kept one's, off its path.
    let id = cd.unique_id("keep", Runtime::Rund);
    let (ok, out, err) = ctr_run(&cd, &id, &["echo", "kept"]);
    assert!(ok && out.contains("kept"), "{test}: {out} {err}");
    assert!(!split_of(&cd, &id).from_template(), "{test}");
    assert!(cd.wait_for_template_makers(MAKER_TIMEOUT), "{test}: maker");
    let rows = templates(&cd);
    assert_eq!(rows.len(), 2, "{test}: {rows:?}");
    assert!(shapes(&rows).contains(&KEPT), "{test}: {rows:?}");
    assert!(rows.iter().all(|r| r.current), "{test}: {rows:?}");
    // A restore that finds the kept one there starts no maker.
    let log = std::fs::read_to_string(cd.log_path()).unwrap_or_default();
    let makers = log.matches("in the background (pid").count();
    let again = cd.unique_id("keep2", Runtime::Rund);
    let (ok, out, err) = ctr_run(&cd, &again, &["echo", "again"]);
    assert!(ok && out.contains("again"), "{test}: {out} {err}");
    assert!(split_of(&cd, &again).from_template(), "{test}");
    let log = std::fs::read_to_string(cd.log_path()).unwrap_or_default();
    assert_eq!(
        log.matches("in the background (pid").count(),
        makers,
        "{test}: a maker started with every template there"
    );
    // After a reboot (here: all removed), the operator's command makes the kept shapes alone.
    rund_ok(&cd, &["template", "remove", "all"]);
    let made = rund_ok(&cd, &["template", "create", "--keep-ready"]);
    assert_eq!(made.lines().count(), 1, "{test}: {made}");
    assert_eq!(shapes(&templates(&cd)), [KEPT], "{test}");
    // A bad shape is refused by name before anything is made.
    cd.set_template_keep_ready(&[(0, 192)])
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    let out = cd
        .rund_admin(&["template", "create", "--keep-ready"])
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(!out.success(), "{test}: {}", out.stdout);
    assert!(
        out.stderr
            .contains("template.keep_ready = { vcpus = 0, memory_mib = 192 }: vcpus must be"),
        "{test}: {}",
        out.stderr
    );
    cd.set_template_keep_ready(&[])
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

/// `ctr run -d` of rund with `sleep 1000`; [`remove_running`] removes it.
fn run_detached(cd: &Containerd, id: &str) -> rund_tests::containerd::CommandOutput {
    cd.ctr(&[
        "run",
        "-d",
        "--runtime",
        Runtime::Rund.runtime_type(),
        BUSYBOX_IMAGE,
        id,
        "sleep",
        "1000",
    ])
    .unwrap_or_else(|e| panic!("{id}: {e}"))
}

/// Starts `n` sleeping containers at once ([`run_detached`]); returns each one's (id, success,
/// stderr).
fn run_at_once(cd: &Containerd, scenario: &str, n: usize) -> Vec<(String, bool, String)> {
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..n)
            .map(|i| {
                let id = cd.unique_id(&format!("{scenario}{i}"), Runtime::Rund);
                s.spawn(move || {
                    let out = run_detached(cd, &id);
                    (id, out.success(), out.stderr)
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("a ctr thread"))
            .collect()
    })
}

/// How many times the shims' and makers' logs say a template was made.
fn made_count(cd: &Containerd, maker_log: &Path) -> usize {
    let logs = [
        std::fs::read_to_string(cd.log_path()).unwrap_or_default(),
        std::fs::read_to_string(maker_log).unwrap_or_default(),
    ];
    logs.iter()
        .map(|l| l.matches("made template ").count())
        .sum()
}

#[test]
fn shims_needing_a_missing_template_at_once_make_it_once() {
    let test = "shims_needing_a_missing_template_at_once_make_it_once";
    let Some(cd) = start(test) else {
        return;
    };
    let maker_log = cd
        .rund()
        .expect("rund's setup")
        .config
        .template_dir
        .join("maker.log");
    let _ = std::fs::remove_file(&maker_log);

    // `require`: ten shims wait for one maker, then all restore.
    rund_ok(&cd, &["template", "remove", "all"]);
    cd.set_template_mode("require").unwrap();
    let before = made_count(&cd, &maker_log);
    let runs = run_at_once(&cd, "require", CLONES);
    for (id, ok, err) in &runs {
        assert!(ok, "{test}: {id}: {err}");
    }
    // Each restored the one template. A second make could not have succeeded beside it: a
    // maker renames its template into place, and that fails once the key's directory exists.
    let rows = templates(&cd);
    assert_eq!(rows.len(), 1, "{test}: {rows:?}");
    assert_eq!(rows[0].restores, CLONES as u64, "{test}: {rows:?}");
    // The shims' lines may run into each other in containerd's log: at most one says so.
    let made = made_count(&cd, &maker_log) - before;
    assert!(made <= 1, "{test}: made {made} times");
    for (id, _, _) in &runs {
        remove_running(&cd, id);
    }
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));

    // `auto`: each cold start starts a maker; one makes it, the others see it being made.
    rund_ok(&cd, &["template", "remove", "all"]);
    cd.set_template_mode("auto").unwrap();
    let before = made_count(&cd, &maker_log);
    let runs = run_at_once(&cd, "auto", AUTO_AT_ONCE);
    for (id, ok, err) in &runs {
        assert!(ok, "{test}: {id}: {err}");
    }
    // None restored (there was nothing to restore), each started a maker, one made it: the
    // makers write their own log, line by line.
    assert!(cd.wait_for_template_makers(MAKER_TIMEOUT), "{test}: maker");
    let log = std::fs::read_to_string(&maker_log).unwrap_or_default();
    assert_eq!(
        made_count(&cd, &maker_log) - before,
        1,
        "{test}: auto: {log}"
    );
    // A maker says another is making it, or prints the template's key and directory: the one
    // that made it, and any that started after it was made (cold starts at once spread out
    // over more than a make on a slow testbed).
    let printed_key = log
        .lines()
        .filter(|l| {
            l.split_once(' ').is_some_and(|(key, dir)| {
                key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit()) && dir.ends_with(key)
            })
        })
        .count();
    assert_eq!(
        log.matches("another process is making the template of")
            .count()
            + printed_key,
        AUTO_AT_ONCE,
        "{test}: auto: a maker per cold start: {log}"
    );
    let rows = templates(&cd);
    assert_eq!(rows.len(), 1, "{test}: {rows:?}");
    assert_eq!(rows[0].restores, 0, "{test}: {rows:?}");
    for (id, _, _) in &runs {
        remove_running(&cd, id);
    }
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}
