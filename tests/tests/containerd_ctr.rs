//! `ctr run --runtime io.containerd.<runtime>.v2` end to end, through a private containerd: every
//! scenario runs with each runtime under test and its outcome is compared with runc's (see
//! `rund_tests::containerd` for the harness, the runtimes list and the prerequisites). After each
//! runtime's turn the harness checks that nothing is left: no task or container, no shim, no
//! container process, no mount under containerd's root or state, no rund sandbox state.
//! Runs in the testbed (`ci/test`); needs root, containerd, runc, umoci and busybox-static.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rund_tests::containerd::{
    same_as_runc, start_for_test, wait_with_deadline, CommandOutput, Containerd, Runtime,
    BUSYBOX_IMAGE, COMMAND_TIMEOUT, CTR_NAMESPACE, IMAGE_FILE, IMAGE_FILE_CONTENT,
};

/// Where a file written to a container's root shows on the host, per runtime. runc: in the
/// container's overlayfs snapshot (containerd's upperdir). rund: on the sandbox's own writable
/// block device (rootfs-split), never in containerd's upperdir.
fn write_lands_in_snapshot_upperdir(rt: Runtime) -> bool {
    match rt {
        Runtime::Runc => true,
        Runtime::Rund => false,
    }
}

/// `ctr run --rm --runtime <rt> [extra...] busybox <id> <cmd...>`.
fn run_args(rt: Runtime, id: &str, extra: &[&str], cmd: &[&str]) -> Vec<String> {
    let mut args = vec!["run", "--rm", "--runtime", rt.runtime_type()];
    args.extend(extra);
    args.extend([BUSYBOX_IMAGE, id]);
    args.extend(cmd);
    args.into_iter().map(String::from).collect()
}

fn ctr(cd: &Containerd, args: &[String]) -> CommandOutput {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eprintln!("$ ctr {}", args.join(" "));
    let out = cd.ctr(&args).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("  -> {:?}", out);
    out
}

fn ctr_ok(cd: &Containerd, args: &[&str]) -> String {
    eprintln!("$ ctr {}", args.join(" "));
    cd.ctr_ok(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `cmd` detached (`ctr run -d`) and returns once its task runs.
fn start_detached(cd: &Containerd, rt: Runtime, id: &str, cmd: &[&str]) {
    let mut args = vec![
        "run",
        "-d",
        "--runtime",
        rt.runtime_type(),
        BUSYBOX_IMAGE,
        id,
    ];
    args.extend(cmd);
    ctr_ok(cd, &args);
    wait_for_status(cd, id, "RUNNING");
}

/// The task's status as `ctr task ls` shows it.
fn task_status(cd: &Containerd, id: &str) -> Option<String> {
    cd.tasks(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .find(|t| t.id == id)
        .map(|t| t.status)
}

fn wait_for_status(cd: &Containerd, id: &str, status: &str) {
    if let Err(now) = wait_for_status_unless(cd, id, status, || false) {
        panic!("task {id} never reached {status} (now {now:?})");
    }
}

/// Waits until the task shows `status`, up to [`COMMAND_TIMEOUT`] and while `abandon` does not
/// hold; otherwise returns the status seen last.
fn wait_for_status_unless(
    cd: &Containerd,
    id: &str,
    status: &str,
    mut abandon: impl FnMut() -> bool,
) -> Result<(), Option<String>> {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let now = task_status(cd, id);
        if now.as_deref() == Some(status) {
            return Ok(());
        }
        if Instant::now() >= deadline || abandon() {
            return Err(now);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills a detached task, waits until it stopped, deletes it and its container.
fn remove_detached(cd: &Containerd, id: &str) {
    ctr_ok(cd, &["task", "kill", "-s", "SIGKILL", id]);
    wait_for_status(cd, id, "STOPPED");
    ctr_ok(cd, &["task", "delete", id]);
    ctr_ok(cd, &["container", "delete", id]);
}

/// `ctr task exec` of `cmd` in task `id`.
fn exec(cd: &Containerd, id: &str, exec_id: &str, cmd: &[&str]) -> CommandOutput {
    let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
    args.extend(cmd);
    ctr(cd, &args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

/// Reads `from` in a thread, sending what arrives.
fn stream_in_background(mut from: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        // Ends at EOF or an error (EIO on a pty master once the other side is closed).
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects from `rx` until `done` holds for what arrived so far, or panics after `timeout`.
fn collect_until(
    rx: &mpsc::Receiver<Vec<u8>>,
    got: &mut Vec<u8>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[u8]) -> bool,
) {
    if let Err(e) = try_collect_until(rx, got, timeout, done) {
        panic!(
            "waiting for {what}: {e}; got so far: {:?}",
            String::from_utf8_lossy(got)
        );
    }
}

/// Collects from `rx` until `done` holds for what arrived so far; fails when `rx` is closed or
/// after `timeout`.
fn try_collect_until(
    rx: &mpsc::Receiver<Vec<u8>>,
    got: &mut Vec<u8>,
    timeout: Duration,
    done: impl Fn(&[u8]) -> bool,
) -> Result<(), mpsc::RecvTimeoutError> {
    let deadline = Instant::now() + timeout;
    while !done(got) {
        let left = deadline.saturating_duration_since(Instant::now());
        got.extend(rx.recv_timeout(left)?);
    }
    Ok(())
}

/// Waits for a spawned ctr and returns its exit code.
fn wait_child(mut child: Child, what: &str) -> Option<i32> {
    match wait_with_deadline(&mut child, Instant::now() + COMMAND_TIMEOUT) {
        Ok(Some(status)) => status.code(),
        Ok(None) => panic!("{what}: still running after {COMMAND_TIMEOUT:?}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// An attached `ctr run --rm` (stdin /dev/null) whose stdout and stderr are read as they come,
/// so that a ctr that gives up early is reported at once, with what it said.
struct AttachedRun<'a> {
    cd: &'a Containerd,
    id: String,
    child: Child,
    stdout: mpsc::Receiver<Vec<u8>>,
    stderr: mpsc::Receiver<Vec<u8>>,
    got: Vec<u8>,
    said: Vec<u8>,
}

impl<'a> AttachedRun<'a> {
    fn spawn(cd: &'a Containerd, rt: Runtime, id: &str, cmd: &[&str]) -> Self {
        let args = run_args(rt, id, &[], cmd);
        eprintln!("$ ctr {} (attached)", args.join(" "));
        let mut child = cd
            .ctr_command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ctr");
        let stdout = stream_in_background(child.stdout.take().expect("stdout"));
        let stderr = stream_in_background(child.stderr.take().expect("stderr"));
        AttachedRun {
            cd,
            id: id.to_string(),
            child,
            stdout,
            stderr,
            got: Vec::new(),
            said: Vec::new(),
        }
    }

    /// What ctr wrote to stderr so far, and its exit status if it has exited.
    fn report(&mut self) -> String {
        while let Ok(chunk) = self.stderr.try_recv() {
            self.said.extend(chunk);
        }
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited with {status}"),
            Ok(None) => "still running".to_string(),
            Err(e) => format!("status unknown ({e})"),
        };
        format!(
            "ctr {status}; its stderr: {:?}",
            String::from_utf8_lossy(&self.said)
        )
    }

    fn collect_stdout_until(&mut self, text: &str) {
        let found = try_collect_until(&self.stdout, &mut self.got, COMMAND_TIMEOUT, |g| {
            String::from_utf8_lossy(g).contains(text)
        });
        if let Err(e) = found {
            // Closed: ctr exited; give it a moment so that its status is known.
            let _ = wait_with_deadline(&mut self.child, Instant::now() + Duration::from_secs(5));
            let report = self.report();
            panic!(
                "{}: waiting for {text:?} on stdout: {e}; got so far: {:?}; {report}",
                self.id,
                String::from_utf8_lossy(&self.got),
            );
        }
    }

    /// Waits until `ctr task ls` shows the task in `status`; fails at once if ctr exits first.
    fn wait_for_status(&mut self, status: &str) {
        let child = &mut self.child;
        let reached = wait_for_status_unless(self.cd, &self.id, status, || {
            !matches!(child.try_wait(), Ok(None))
        });
        if let Err(now) = reached {
            let report = self.report();
            panic!(
                "task {} never reached {status} (now {now:?}); {report}",
                self.id
            );
        }
    }

    /// Waits for ctr to exit; returns all of its stdout and its exit code.
    fn finish(mut self, what: &str) -> (String, Option<i32>) {
        let code = match wait_with_deadline(&mut self.child, Instant::now() + COMMAND_TIMEOUT) {
            Ok(Some(status)) => status.code(),
            Ok(None) => panic!(
                "{what}: still running after {COMMAND_TIMEOUT:?}; {}",
                self.report()
            ),
            Err(e) => panic!("{what}: {e}"),
        };
        while let Ok(chunk) = self.stdout.recv_timeout(Duration::from_secs(5)) {
            self.got.extend(chunk);
        }
        let said = self.report();
        if !self.said.is_empty() {
            eprintln!("{what}: {said}");
        }
        (String::from_utf8_lossy(&self.got).into_owned(), code)
    }
}

#[test]
fn output_and_exit_codes() {
    let Some(cd) = start_for_test("output_and_exit_codes") else {
        return;
    };
    // PID 1 of a PID namespace cannot be killed by a signal sent from inside it, so the
    // SIGKILL hits a child shell whose status (137) the container's shell passes on; a SIGKILL
    // from outside is `kill_with_sigterm_and_sigkill`'s case.
    let cases = [
        ("echo", "echo hello"),
        ("exit0", "exit 0"),
        ("exit1", "exit 1"),
        ("sigkill", "sh -c 'kill -KILL $$'; exit $?"),
    ];
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        cases
            .iter()
            .map(|(name, script)| {
                let id = cd.unique_id(name, rt);
                let out = ctr(&cd, &run_args(rt, &id, &[], &["sh", "-c", script]));
                (out.stdout, out.code)
            })
            .collect::<Vec<_>>()
    });
    let runc = same_as_runc(&outcomes);
    assert_eq!(
        runc,
        &vec![
            ("hello\n".to_string(), Some(0)),
            (String::new(), Some(0)),
            (String::new(), Some(1)),
            (String::new(), Some(137)),
        ]
    );
}

#[test]
fn stdin_is_piped_to_the_process() {
    let Some(cd) = start_for_test("stdin_is_piped_to_the_process") else {
        return;
    };
    let payload: String = (0..2000).map(|i| format!("line {i} of stdin\n")).collect();
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let id = cd.unique_id("stdin", rt);
        let mut child = cd
            .ctr_command()
            .args(run_args(rt, &id, &[], &["cat"]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ctr");
        let rx = stream_in_background(child.stdout.take().expect("stdout"));
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(payload.as_bytes()).expect("write stdin");
        // Closed only once everything came back: ctr forwards EOF (CloseIO) only when its task
        // exists by then, and `cat` echoing proves it does.
        let mut got = Vec::new();
        collect_until(&rx, &mut got, COMMAND_TIMEOUT, "cat's echo", |g| {
            g.len() >= payload.len()
        });
        drop(stdin);
        let code = wait_child(child, "ctr run with stdin");
        while let Ok(chunk) = rx.recv_timeout(Duration::from_secs(5)) {
            got.extend(chunk);
        }
        (String::from_utf8_lossy(&got) == payload, code)
    });
    assert_eq!(same_as_runc(&outcomes), &(true, Some(0)));
}

/// What `tty` and `stty size` printed in a container given a pty of 33 rows and 101 columns.
#[derive(Debug, PartialEq)]
struct TtyOutcome {
    is_pts: bool,
    size: String,
    code: Option<i32>,
}

#[test]
fn tty_is_a_pts_of_the_callers_size() {
    let Some(cd) = start_for_test("tty_is_a_pts_of_the_callers_size") else {
        return;
    };
    // ctr sizes the console after the task starts: wait (bounded) until the size is there.
    let script = "i=0; while [ \"$(stty size 2>/dev/null)\" != '33 101' ] && [ $i -lt 300 ]; \
                  do sleep 0.1; i=$((i+1)); done; tty; stty size; exit 3";
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let id = cd.unique_id("tty", rt);
        let size = nix::pty::Winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
        let slave = std::fs::File::from(pty.slave);
        let mut cmd = cd.ctr_command();
        cmd.args(run_args(rt, &id, &["-t"], &["sh", "-c", script]))
            .stdin(slave.try_clone().expect("dup"))
            .stdout(slave.try_clone().expect("dup"))
            .stderr(slave.try_clone().expect("dup"));
        // SAFETY: between fork and exec only async-signal-safe calls (setsid, ioctl) are made,
        // on the child's stdin, which is the pty by then.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                // A session of its own with the pty as controlling terminal, as in a terminal.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        eprintln!("$ ctr {:?} (on a pty)", cmd.get_args().collect::<Vec<_>>());
        let child = cmd.spawn().expect("spawn ctr");
        // Only the child may hold the slave: the master sees EOF (EIO) when it exits.
        drop(slave);
        let rx = stream_in_background(std::fs::File::from(pty.master));
        let code = wait_child(child, "ctr run -t");
        let mut got = Vec::new();
        while let Ok(chunk) = rx.recv_timeout(Duration::from_secs(5)) {
            got.extend(chunk);
        }
        let text = String::from_utf8_lossy(&got).replace(['\r', '\0'], "");
        eprintln!("  -> {text:?} {code:?}");
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        TtyOutcome {
            is_pts: lines.first().is_some_and(|l| l.starts_with("/dev/pts/")),
            size: lines.get(1).map_or(String::new(), |l| l.to_string()),
            code,
        }
    });
    assert_eq!(
        same_as_runc(&outcomes),
        &TtyOutcome {
            is_pts: true,
            size: "33 101".into(),
            code: Some(3)
        }
    );
}

#[test]
fn exec_in_a_running_task() {
    let Some(cd) = start_for_test("exec_in_a_running_task") else {
        return;
    };
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let id = cd.unique_id("exec", rt);
        start_detached(
            &cd,
            rt,
            &id,
            &["sh", "-c", "echo started > /tmp/mark; exec sleep 1000"],
        );
        let out = exec(
            &cd,
            &id,
            "e1",
            &["sh", "-c", "cat /tmp/mark; echo exec-err >&2; exit 3"],
        );
        let second = exec(&cd, &id, "e2", &["echo", "again"]);
        remove_detached(&cd, &id);
        (
            out.stdout,
            out.stderr.contains("exec-err"),
            out.code,
            second.stdout,
            second.code,
        )
    });
    assert_eq!(
        same_as_runc(&outcomes),
        &(
            "started\n".to_string(),
            true,
            Some(3),
            "again\n".to_string(),
            Some(0)
        )
    );
}

#[test]
fn kill_with_sigterm_and_sigkill() {
    let Some(cd) = start_for_test("kill_with_sigterm_and_sigkill") else {
        return;
    };
    // As PID 1 of its PID namespace, the process sees SIGTERM only through a handler: it
    // reports the signal and exits as a shell killed by it would (128 + 15).
    let term_script =
        "trap 'echo got-TERM; exit 143' TERM; echo ready; while :; do sleep 1 & wait $!; done";
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let term_id = cd.unique_id("sigterm", rt);
        let mut term = AttachedRun::spawn(&cd, rt, &term_id, &["sh", "-c", term_script]);
        term.collect_stdout_until("ready\n");
        ctr_ok(&cd, &["task", "kill", "-s", "SIGTERM", &term_id]);
        let (term_out, term_code) = term.finish("ctr run (SIGTERM)");

        let kill_id = cd.unique_id("sigkill", rt);
        let mut kill = AttachedRun::spawn(&cd, rt, &kill_id, &["sleep", "1000"]);
        kill.wait_for_status("RUNNING");
        ctr_ok(&cd, &["task", "kill", "-s", "SIGKILL", &kill_id]);
        let (_, kill_code) = kill.finish("ctr run (SIGKILL)");
        (term_out, term_code, kill_code)
    });
    assert_eq!(
        same_as_runc(&outcomes),
        &("ready\ngot-TERM\n".to_string(), Some(143), Some(137))
    );
}

#[test]
fn pause_and_resume() {
    let Some(cd) = start_for_test("pause_and_resume") else {
        return;
    };
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let id = cd.unique_id("pause", rt);
        start_detached(&cd, rt, &id, &["sleep", "1000"]);
        ctr_ok(&cd, &["task", "pause", &id]);
        let paused = task_status(&cd, &id);
        ctr_ok(&cd, &["task", "resume", &id]);
        let resumed = task_status(&cd, &id);
        let alive = exec(&cd, &id, "e1", &["echo", "alive"]);
        remove_detached(&cd, &id);
        (paused, resumed, alive.stdout, alive.code)
    });
    assert_eq!(
        same_as_runc(&outcomes),
        &(
            Some("PAUSED".to_string()),
            Some("RUNNING".to_string()),
            "alive\n".to_string(),
            Some(0)
        )
    );
}

/// The memory in use (bytes) and the CPU time (nanoseconds) in `ctr task metrics --format json`
/// output, for cgroup v1 (`memory.usage.usage`, `cpu.usage.total`) or v2 (`memory.usage`,
/// `cpu.usage_usec`) metrics.
fn memory_and_cpu(json: &serde_json::Value) -> (Option<u64>, Option<u64>) {
    let memory = json["memory"]["usage"]["usage"]
        .as_u64()
        .or_else(|| json["memory"]["usage"].as_u64());
    let cpu = json["cpu"]["usage"]["total"]
        .as_u64()
        .or_else(|| json["cpu"]["usage_usec"].as_u64().map(|us| us * 1000));
    (memory, cpu)
}

#[test]
fn metrics_report_memory_and_cpu() {
    let Some(cd) = start_for_test("metrics_report_memory_and_cpu") else {
        return;
    };
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let id = cd.unique_id("metrics", rt);
        // Some CPU time first, so that the figure cannot be zero.
        start_detached(
            &cd,
            rt,
            &id,
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; exec sleep 1000",
            ],
        );
        let table = ctr_ok(&cd, &["task", "metrics", &id]);
        let json = ctr_ok(&cd, &["task", "metrics", "--format", "json", &id]);
        remove_detached(&cd, &id);
        eprintln!("{rt} metrics:\n{table}");
        let parsed: serde_json::Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("{rt}: metrics are not JSON ({e}): {json}"));
        let (memory, cpu) = memory_and_cpu(&parsed);
        eprintln!("{rt}: memory {memory:?} bytes, cpu {cpu:?} ns");
        (
            table.contains("METRIC"),
            memory.is_some_and(|m| m > 0),
            cpu.is_some_and(|c| c > 0),
        )
    });
    assert_eq!(same_as_runc(&outcomes), &(true, true, true));
}

/// The `upperdir` and `lowerdir`s of a container's snapshot (`ctr snapshots mounts`).
fn snapshot_dirs(cd: &Containerd, key: &str) -> (PathBuf, Vec<PathBuf>) {
    let mount = ctr_ok(cd, &["snapshots", "mounts", "/unused", key]);
    let options = mount
        .split_whitespace()
        .skip_while(|w| *w != "-o")
        .nth(1)
        .unwrap_or_else(|| panic!("no options in {mount:?}"));
    let option = |name: &str| {
        options
            .split(',')
            .find_map(|o| o.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {options:?}"))
    };
    let upper = PathBuf::from(option("upperdir="));
    let lowers = option("lowerdir=").split(':').map(PathBuf::from).collect();
    (upper, lowers)
}

#[test]
fn writes_stay_out_of_the_image_layers() {
    let Some(cd) = start_for_test("writes_stay_out_of_the_image_layers") else {
        return;
    };
    let script = format!(
        "echo written-in-container > /written && echo changed > /{IMAGE_FILE} && exec sleep 1000"
    );
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let id = cd.unique_id("writes", rt);
        start_detached(&cd, rt, &id, &["sh", "-c", &script]);
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let seen = loop {
            let out = exec(
                &cd,
                &id,
                "read",
                &["cat", "/written", &format!("/{IMAGE_FILE}")],
            );
            if out.success() || Instant::now() >= deadline {
                break out.stdout;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let (upper, lowers) = snapshot_dirs(&cd, &id);
        let in_upper = upper.join("written").exists();
        let lowers_untouched = lowers.iter().all(|l| {
            !l.join("written").exists()
                && std::fs::read_to_string(l.join(IMAGE_FILE))
                    .map_or(true, |c| c == IMAGE_FILE_CONTENT)
        }) && lowers.iter().any(|l| l.join(IMAGE_FILE).exists());
        remove_detached(&cd, &id);
        assert_eq!(
            in_upper,
            write_lands_in_snapshot_upperdir(rt),
            "{rt}: is the write in containerd's upperdir {}?",
            upper.display()
        );
        (seen, lowers_untouched)
    });
    assert_eq!(
        same_as_runc(&outcomes),
        &("written-in-container\nchanged\n".to_string(), true)
    );
}

/// Runs `script` with a host directory holding `from-host` mounted on /v with `mode` (`rw` or
/// `ro`); returns ctr's output and the host directory.
fn run_with_volume(
    cd: &Containerd,
    rt: Runtime,
    scenario: &str,
    mode: &str,
    script: &str,
) -> (CommandOutput, PathBuf) {
    let id = cd.unique_id(scenario, rt);
    let dir = cd.dir().join(&id);
    std::fs::create_dir_all(&dir).expect("mkdir volume");
    std::fs::write(dir.join("from-host"), "host-data\n").expect("write volume file");
    let mount = format!(
        "type=bind,src={},dst=/v,options=rbind:{mode}",
        dir.display()
    );
    let out = ctr(
        cd,
        &run_args(rt, &id, &["--mount", &mount], &["sh", "-c", script]),
    );
    (out, dir)
}

#[test]
fn read_write_volume_reaches_the_host() {
    let Some(cd) = start_for_test("read_write_volume_reaches_the_host") else {
        return;
    };
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let script = "cat /v/from-host && echo from-container > /v/written";
        let (out, dir) = run_with_volume(&cd, rt, "rw-volume", "rw", script);
        let on_host = std::fs::read_to_string(dir.join("written")).ok();
        (out.stdout, out.code, on_host)
    });
    assert_eq!(
        same_as_runc(&outcomes),
        &(
            "host-data\n".to_string(),
            Some(0),
            Some("from-container\n".to_string())
        )
    );
}

#[test]
fn read_only_volume_refuses_writes() {
    let Some(cd) = start_for_test("read_only_volume_refuses_writes") else {
        return;
    };
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        let script = "cat /v/from-host; echo x > /v/written; echo status=$?";
        let (out, dir) = run_with_volume(&cd, rt, "ro-volume", "ro", script);
        (
            out.stdout,
            out.code,
            out.stderr.contains("Read-only file system"),
            dir.join("written").exists(),
        )
    });
    assert_eq!(
        same_as_runc(&outcomes),
        &("host-data\nstatus=1\n".to_string(), Some(0), true, false)
    );
}

/// A runtime spec (ctr's default) for `ctr run --config`: `true` in the image root, with one
/// namespace of the unknown type "bogus".
fn spec_with_bogus_namespace(cd: &Containerd) -> serde_json::Value {
    let text = ctr_ok(cd, &["oci", "spec"]);
    let mut spec: serde_json::Value = serde_json::from_str(&text).expect("ctr oci spec is JSON");
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    spec["root"] = serde_json::json!({"path": cd.image_rootfs(), "readonly": true});
    spec["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(serde_json::json!({"type": "bogus"}));
    spec
}

#[test]
fn malformed_spec_is_refused_and_leaves_nothing() {
    let Some(cd) = start_for_test("malformed_spec_is_refused_and_leaves_nothing") else {
        return;
    };
    let spec_path = cd.dir().join("bogus-namespace.json");
    std::fs::write(&spec_path, spec_with_bogus_namespace(&cd).to_string()).expect("write spec");
    let spec_arg = spec_path.to_string_lossy().into_owned();
    // for_each_runtime also checks that each failure left nothing behind.
    let outcomes = cd.for_each_runtime(CTR_NAMESPACE, |rt| {
        // The OCI spec requires an absolute cwd.
        let id = cd.unique_id("relative-cwd", rt);
        let cwd = ctr(
            &cd,
            &run_args(rt, &id, &["--cwd", "relative/dir"], &["pwd"]),
        );
        let id = cd.unique_id("bogus-namespace", rt);
        let ns = ctr(
            &cd,
            &[
                "run",
                "--rm",
                "--runtime",
                rt.runtime_type(),
                "--config",
                &spec_arg,
                &id,
            ]
            .map(String::from),
        );
        (
            cwd.success(),
            cwd.stderr.to_lowercase().contains("cwd"),
            ns.success(),
            ns.stderr.contains("bogus"),
        )
    });
    assert_eq!(same_as_runc(&outcomes), &(false, true, false, true));
}
