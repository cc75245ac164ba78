//! The `rund` admin binary, run as a user runs it: `rund install` into temporary roots, `rund
//! check` against configurations written here, and the reflink check line with a real FICLONE
//! probe on filesystems mounted here (those two need root and xfsprogs; set
//! RUND_REQUIRE_REFLINK_TESTS=1 to make their absence a failure). The tests that ask containerd
//! how it reads a configuration (`containerd config dump`, no daemon) need `containerd` on PATH:
//! without it they print why and pass, unless RUND_REQUIRE_ROOT_TESTS=1.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shim_v2::admin::check::{reflink_check, Status};
use shim_v2::admin::containerd_effective::Reader;
use shim_v2::config::Config;
use tempfile::TempDir;

const RUND: &str = env!("CARGO_BIN_EXE_rund");

/// The shim binary to install: the real one once this crate builds it, until then another real
/// executable (the install only copies it).
const SHIM: &str = match option_env!("CARGO_BIN_EXE_containerd-shim-rund-v2") {
    Some(path) => path,
    None => RUND,
};

/// A small real executable, for the tests about containerd's configuration.
const SMALL_BINARY: &str = "/bin/true";

const CRI: &str = "io.containerd.grpc.v1.cri";

/// Debian 12's stock /etc/containerd/config.toml (containerd 1.6.20~ds1-1+deb12u3).
const DEBIAN_STOCK: &str = include_str!("../testdata/debian-stock.toml");

fn rund(args: &[&str]) -> Output {
    Command::new(RUND)
        .args(args)
        .env_remove("RUND_CONFIG")
        .output()
        .expect("running rund")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A temporary install root and the guest files to install into it.
struct Fixture {
    dir: TempDir,
    kernel: PathBuf,
    initramfs: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let initramfs = dir.path().join("initramfs.cpio.gz");
        // Not bootable, but real files of a kernel-like size with distinct contents.
        fs::write(
            &kernel,
            (0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
        )
        .unwrap();
        fs::write(
            &initramfs,
            (0..70_000u32).map(|i| (i % 13) as u8).collect::<Vec<_>>(),
        )
        .unwrap();
        fs::create_dir(dir.path().join("root")).unwrap();
        Fixture {
            dir,
            kernel,
            initramfs,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn path(&self, installed: &str) -> PathBuf {
        self.root().join(installed.trim_start_matches('/'))
    }

    /// `rund install` into the root with the guest files, the given binaries and `extra` flags.
    fn install(&self, shim: &str, rund_binary: Option<&str>, extra: &[&str]) -> Output {
        let root = self.root();
        let mut args = vec![
            "install",
            "--root",
            root.to_str().unwrap(),
            "--kernel",
            self.kernel.to_str().unwrap(),
            "--initramfs",
            self.initramfs.to_str().unwrap(),
            "--shim",
            shim,
        ];
        if let Some(r) = rund_binary {
            args.extend(["--rund", r]);
        }
        args.extend(extra);
        rund(&args)
    }

    /// An install with small binaries and the containerd configuration at `config` (relative to
    /// the fixture's directory).
    fn install_containerd(&self, config: &str, force: bool) -> Output {
        let path = self.dir.path().join(config);
        let mut extra = vec!["--write-containerd-config", path.to_str().unwrap()];
        if force {
            extra.push("--force");
        }
        self.install(SMALL_BINARY, Some(SMALL_BINARY), &extra)
    }
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every file below `root` with what would change if it were rewritten (inode: an atomic
/// replace makes a new one) or edited.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, u64, u32, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = fs::symlink_metadata(&path).unwrap();
            if m.is_dir() {
                dirs.push(path);
            } else {
                out.insert(
                    path,
                    (m.ino(), m.len(), m.mode(), m.mtime(), m.mtime_nsec()),
                );
            }
        }
    }
    out
}

/// The rund entry in containerd's configuration text, as containerd reads it.
fn rund_entry(config: &str) -> toml::Table {
    let doc: toml::Table = toml::from_str(config).unwrap();
    doc["plugins"][CRI]["containerd"]["runtimes"]["rund"]
        .as_table()
        .unwrap_or_else(|| panic!("no rund entry in:\n{config}"))
        .clone()
}

fn assert_rund_entry(config: &str) {
    let entry = rund_entry(config);
    assert_eq!(
        entry["runtime_type"].as_str(),
        Some("io.containerd.rund.v2")
    );
    assert_eq!(
        entry["privileged_without_host_devices"].as_bool(),
        Some(true)
    );
}

#[test]
fn install_puts_everything_in_place_and_prints_the_entries() {
    let f = Fixture::new();
    let out = f.install(SHIM, None, &[]);
    assert_success(&out);

    for (installed, source, file_mode) in [
        (
            "/usr/local/bin/containerd-shim-rund-v2",
            Path::new(SHIM),
            0o755,
        ),
        ("/usr/local/bin/rund", Path::new(RUND), 0o755),
        ("/usr/share/rund/vmlinux", f.kernel.as_path(), 0o644),
        (
            "/usr/share/rund/rund-initramfs.cpio.gz",
            f.initramfs.as_path(),
            0o644,
        ),
    ] {
        let path = f.path(installed);
        assert!(
            fs::read(&path).unwrap() == fs::read(source).unwrap(),
            "{installed} differs from {}",
            source.display()
        );
        assert_eq!(mode(&path), file_mode, "{installed}");
    }
    let config = fs::read_to_string(f.path("/etc/rund/config.toml")).unwrap();
    assert!(config.starts_with('#'), "no header comment:\n{config}");
    assert_eq!(
        Config::parse(Path::new("config.toml"), &config).unwrap(),
        Config::default()
    );
    // No temporary file is left anywhere.
    for path in snapshot(&f.root()).keys() {
        assert!(
            !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".rund-install-"),
            "left behind: {}",
            path.display()
        );
    }
    // Nothing containerd-related was written without the flag.
    assert!(!f.path("/etc/containerd").exists());

    // stdout: containerd's entry (valid TOML), then the RuntimeClass.
    let stdout = text(&out.stdout);
    let (containerd, runtime_class) = stdout.split_once("\n---\n").expect(&stdout);
    assert_rund_entry(containerd);
    assert_eq!(
        toml::from_str::<toml::Table>(containerd).unwrap()["version"].as_integer(),
        Some(2)
    );
    for line in [
        "apiVersion: node.k8s.io/v1",
        "kind: RuntimeClass",
        "  name: rund",
        "handler: rund",
        "    memory: \"64Mi\"",
    ] {
        assert!(
            runtime_class.lines().any(|l| l == line),
            "no {line:?} in:\n{runtime_class}"
        );
    }
}

#[test]
fn install_twice_changes_nothing() {
    let f = Fixture::new();
    let flags = ["--write-containerd-config"];
    let first = f.install(SHIM, None, &flags);
    assert_success(&first);
    let before = snapshot(&f.root());
    assert_eq!(before.len(), 6, "{before:#?}");

    let second = f.install(SHIM, None, &flags);
    assert_success(&second);
    assert_eq!(snapshot(&f.root()), before);
    assert_eq!(second.stdout, first.stdout);
    let stderr = text(&second.stderr);
    assert!(!stderr.contains("installed "), "{stderr}");
    assert_eq!(stderr.matches("is up to date").count(), 4, "{stderr}");
    assert!(stderr.contains("config.toml exists: kept"), "{stderr}");
    assert!(stderr.contains("has the rund runtime already"), "{stderr}");

    // Without --kernel/--initramfs, the installed ones are kept.
    let root = f.root();
    let third = rund(&["install", "--root", root.to_str().unwrap(), "--shim", SHIM]);
    assert_success(&third);
    assert!(
        text(&third.stderr).contains("kept the installed guest kernel"),
        "{}",
        text(&third.stderr)
    );
    assert_eq!(snapshot(&f.root()), before);
}

#[test]
fn install_refuses_before_writing_anything() {
    let f = Fixture::new();
    let root = f.root();
    let out = rund(&["install", "--root", root.to_str().unwrap(), "--shim", SHIM]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--kernel")
            && stderr.contains(&f.path("/usr/share/rund/vmlinux").display().to_string()),
        "{stderr}"
    );
    assert!(snapshot(&root).is_empty(), "{:#?}", snapshot(&root));

    // The shim is looked for beside the running rund.
    let build = f.dir.path().join("build");
    fs::create_dir(&build).unwrap();
    let copied_rund = build.join("rund");
    fs::copy(RUND, &copied_rund).unwrap();
    let out = Command::new(&copied_rund)
        .args(["install", "--root", root.to_str().unwrap()])
        .args(["--kernel", f.kernel.to_str().unwrap()])
        .args(["--initramfs", f.initramfs.to_str().unwrap()])
        .env_remove("RUND_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&build.join("containerd-shim-rund-v2").display().to_string())
            && stderr.contains("--shim"),
        "{stderr}"
    );
    assert!(snapshot(&root).is_empty());
}

#[test]
fn containerd_config_is_made_when_missing_or_empty() {
    let f = Fixture::new();
    // No PATH: the default location below the root.
    let out = f.install(
        SMALL_BINARY,
        Some(SMALL_BINARY),
        &["--write-containerd-config"],
    );
    assert_success(&out);
    let made = fs::read_to_string(f.path("/etc/containerd/config.toml")).unwrap();
    assert!(made.starts_with("version = 2\n"), "{made}");
    assert_rund_entry(&made);
    assert!(
        text(&out.stderr).contains("restart containerd"),
        "{}",
        text(&out.stderr)
    );

    fs::write(f.dir.path().join("empty.toml"), "").unwrap();
    assert_success(&f.install_containerd("empty.toml", false));
    let edited = fs::read_to_string(f.dir.path().join("empty.toml")).unwrap();
    assert_eq!(edited, made);
}

#[test]
fn containerd_config_keeps_the_users_content() {
    let f = Fixture::new();
    let user = "\
# Site containerd configuration: do not lose this comment.
version = 2
oom_score = -999 # and this one

[grpc]
  address = \"/run/containerd/containerd.sock\"

[plugins.\"io.containerd.grpc.v1.cri\"]
  sandbox_image = \"registry.k8s.io/pause:3.6\"
  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]
    runtime_type = \"io.containerd.runc.v2\"
";
    let path = f.dir.path().join("user.toml");
    fs::write(&path, user).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    assert_success(&f.install_containerd("user.toml", false));
    let edited = fs::read_to_string(&path).unwrap();
    for line in user.lines() {
        assert!(edited.contains(line), "lost {line:?}:\n{edited}");
    }
    assert_rund_entry(&edited);
    let doc: toml::Table = toml::from_str(&edited).unwrap();
    assert_eq!(doc["oom_score"].as_integer(), Some(-999));
    assert_eq!(
        doc["plugins"][CRI]["sandbox_image"].as_str(),
        Some("registry.k8s.io/pause:3.6")
    );
    assert_eq!(mode(&path), 0o640);

    let before = fs::metadata(&path).unwrap().ino();
    assert_success(&f.install_containerd("user.toml", false));
    assert_eq!(fs::read_to_string(&path).unwrap(), edited);
    assert_eq!(fs::metadata(&path).unwrap().ino(), before, "rewritten");
}

#[test]
fn containerd_config_version_1_is_refused_and_nothing_is_installed() {
    let f = Fixture::new();
    for (name, user) in [
        (
            "v1.toml",
            "version = 1\n[plugins.cri]\n  sandbox_image = \"pause\"\n",
        ),
        (
            "unversioned.toml",
            "[plugins.cri.containerd]\n  snapshotter = \"overlayfs\"\n",
        ),
    ] {
        let path = f.dir.path().join(name);
        fs::write(&path, user).unwrap();
        let out = f.install_containerd(name, true);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(name) && stderr.contains("version 1"),
            "{stderr}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), user);
        assert!(
            snapshot(&f.root()).is_empty(),
            "installed despite the refusal"
        );
    }
}

#[test]
fn containerd_config_conflicting_rund_is_refused_then_forced() {
    let f = Fixture::new();
    let user = "\
version = 2
# our own rund, long ago
[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund]
  runtime_type = \"io.containerd.kata.v2\"
";
    let path = f.dir.path().join("conflict.toml");
    fs::write(&path, user).unwrap();
    let out = f.install_containerd("conflict.toml", false);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--force") && stderr.contains("io.containerd.kata.v2"),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), user);

    let out = f.install_containerd("conflict.toml", true);
    assert_success(&out);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("replaced the existing runtime rund")
            && stderr.contains("added runtime runc (the default runtime"),
        "{stderr}"
    );
    let edited = fs::read_to_string(&path).unwrap();
    assert_rund_entry(&edited);
    assert!(edited.contains("# our own rund, long ago"), "{edited}");
    assert!(!edited.contains("kata"), "{edited}");
    // Now it is rund's own entry: no --force needed any more.
    assert_success(&f.install_containerd("conflict.toml", false));
    assert_eq!(fs::read_to_string(&path).unwrap(), edited);
}

/// The `containerd` on PATH, or `None` after printing why the test is skipped.
/// RUND_REQUIRE_ROOT_TESTS=1 (CI, which installs containerd) makes its absence a failure.
fn containerd_or_skip() -> Option<PathBuf> {
    match Reader::detect() {
        Reader::Containerd(bin) => Some(bin),
        Reader::Rules => {
            let reason = "SKIPPED: no `containerd` on PATH";
            if std::env::var("RUND_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
                panic!("{reason}, and RUND_REQUIRE_ROOT_TESTS=1");
            }
            eprintln!("{reason}");
            None
        }
    }
}

/// `containerd --config CONFIG config dump`'s CRI runtimes (name and runtime_type) and default.
fn containerd_dump(containerd: &Path, config: &Path) -> (BTreeMap<String, String>, String) {
    let out = Command::new(containerd)
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert_success(&out);
    let dump: toml::Table = toml::from_str(&text(&out.stdout)).unwrap();
    let containerd = &dump["plugins"][CRI]["containerd"];
    let runtimes = containerd["runtimes"]
        .as_table()
        .unwrap()
        .iter()
        .map(|(name, entry)| {
            (
                name.clone(),
                entry["runtime_type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let default = containerd["default_runtime_name"]
        .as_str()
        .unwrap()
        .to_string();
    (runtimes, default)
}

/// The `containerd config` line of `rund check --containerd-config PATH`.
fn check_containerd_config(path: &Path, env_path: Option<&str>) -> String {
    let mut command = Command::new(RUND);
    command
        .args(["check", "--containerd-config"])
        .arg(path)
        .env_remove("RUND_CONFIG");
    if let Some(p) = env_path {
        command.env("PATH", p);
    }
    let out = command.output().unwrap();
    let stdout = text(&out.stdout);
    stdout
        .lines()
        .find(|l| l.contains(" containerd config: "))
        .unwrap_or_else(|| panic!("no containerd config line in:\n{stdout}"))
        .to_string()
}

#[test]
fn containerd_config_debian_stock_keeps_runc_and_a_second_install_changes_nothing() {
    let f = Fixture::new();
    let path = f.path("/etc/containerd/config.toml");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, DEBIAN_STOCK).unwrap();
    let stock = f.dir.path().join("stock.toml");
    fs::write(&stock, DEBIAN_STOCK).unwrap();
    let flags = ["--write-containerd-config"];

    let first = f.install(SMALL_BINARY, Some(SMALL_BINARY), &flags);
    assert_success(&first);
    let stderr = text(&first.stderr);
    let shown = path.display().to_string();
    for line in [
        format!("rund install: {shown}: added runtime rund"),
        format!(
            "rund install: {shown}: added runtime runc (containerd's built-in default, which a \
             runtimes table would otherwise replace)"
        ),
        "rund install: restart containerd to use its new configuration (systemctl restart \
         containerd)"
            .to_string(),
    ] {
        assert!(
            stderr.lines().any(|l| l == line),
            "no {line:?} in:\n{stderr}"
        );
    }
    let runtimes_line = format!(
        "rund install: {shown}: containerd will have CRI runtimes runc (io.containerd.runc.v2), \
         rund (io.containerd.rund.v2); default runc (read "
    );
    assert!(
        stderr.lines().any(|l| l.starts_with(&runtimes_line)),
        "no {runtimes_line:?} in:\n{stderr}"
    );
    let edited = fs::read_to_string(&path).unwrap();
    // The stock file first, untouched; the new tables after it.
    assert!(edited.starts_with(DEBIAN_STOCK), "{edited}");
    assert_rund_entry(&edited);
    let doc: toml::Table = toml::from_str(&edited).unwrap();
    assert_eq!(
        doc["plugins"][CRI]["containerd"]["runtimes"]["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );

    let inode = fs::metadata(&path).unwrap().ino();
    let second = f.install(SMALL_BINARY, Some(SMALL_BINARY), &flags);
    assert_success(&second);
    let stderr = text(&second.stderr);
    assert!(
        stderr.contains(&format!("{shown}: no change"))
            && !stderr.contains("added runtime")
            && !stderr.contains("restart containerd"),
        "{stderr}"
    );
    assert!(stderr.contains(&runtimes_line), "{stderr}");
    assert_eq!(fs::read(&path).unwrap(), edited.as_bytes());
    assert_eq!(fs::metadata(&path).unwrap().ino(), inode, "rewritten");

    // `rund check` reads both files the same way: the stock one lacks rund.
    let line = check_containerd_config(&stock, None);
    assert!(
        line.starts_with("FAIL containerd config: ")
            && line.contains("CRI runtimes runc (io.containerd.runc.v2); default runc")
            && line.ends_with("no rund runtime: run `rund install --write-containerd-config`"),
        "{line}"
    );
    let line = check_containerd_config(&path, None);
    assert_eq!(
        line.split(" (read ").next().unwrap(),
        format!(
            "ok   containerd config: {shown}: CRI runtimes runc (io.containerd.runc.v2), rund \
             (io.containerd.rund.v2); default runc"
        ),
        "{line}"
    );

    // containerd itself: both runtimes, runc the default.
    let Some(containerd) = containerd_or_skip() else {
        return;
    };
    assert!(
        line.contains(&format!(
            "(read with `{} config dump`)",
            containerd.display()
        )),
        "{line}"
    );
    let (runtimes, default) = containerd_dump(&containerd, &path);
    assert_eq!(default, "runc");
    assert_eq!(
        runtimes,
        BTreeMap::from([
            ("runc".to_string(), "io.containerd.runc.v2".to_string()),
            ("rund".to_string(), "io.containerd.rund.v2".to_string()),
        ])
    );
    // And what the stock file gave before: runc alone, kept.
    let (before, _) = containerd_dump(&containerd, &stock);
    assert_eq!(before.keys().collect::<Vec<_>>(), ["runc"]);
}

#[test]
fn containerd_config_without_containerd_is_checked_by_the_rules_and_says_so() {
    let f = Fixture::new();
    let empty_path = f.dir.path().join("no-binaries");
    fs::create_dir(&empty_path).unwrap();
    let config = f.dir.path().join("stock.toml");
    fs::write(&config, DEBIAN_STOCK).unwrap();
    let root = f.root();
    let out = Command::new(RUND)
        .args(["install", "--root", root.to_str().unwrap()])
        .args(["--kernel", f.kernel.to_str().unwrap()])
        .args(["--initramfs", f.initramfs.to_str().unwrap()])
        .args(["--shim", SMALL_BINARY, "--rund", SMALL_BINARY])
        .arg("--write-containerd-config")
        .arg(&config)
        .env("PATH", &empty_path)
        .env_remove("RUND_CONFIG")
        .output()
        .unwrap();
    assert_success(&out);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "containerd will have CRI runtimes runc (io.containerd.runc.v2), rund \
             (io.containerd.rund.v2); default runc (read by containerd's rules as rund knows \
             them: no containerd on PATH to ask)"
        ),
        "{stderr}"
    );
    let line = check_containerd_config(&config, empty_path.to_str());
    assert!(
        line.starts_with("ok   containerd config: ") && line.contains("no containerd on PATH"),
        "{line}"
    );
}

#[test]
fn containerd_config_that_is_broken_or_not_toml_is_refused_untouched() {
    let f = Fixture::new();
    for (name, user, expected) in [
        (
            "not-toml.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"\n",
            "not valid TOML",
        ),
        (
            "kata-default.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             default_runtime_name = \"kata\"\n",
            "`default_runtime_name = \"kata\"` names a runtime the file does not define",
        ),
    ] {
        let path = f.dir.path().join(name);
        fs::write(&path, user).unwrap();
        let out = f.install_containerd(name, false);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with(&format!("rund install: {}: ", path.display()))
                && stderr.contains(expected),
            "{stderr}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), user);
        assert!(
            snapshot(&f.root()).is_empty(),
            "installed despite the refusal"
        );
    }
    // Nothing beside them either (no temporary copy for containerd).
    let left: Vec<_> = fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `rund check --config PATH` where the configuration names a missing kernel and a present
/// initramfs.
fn config_with_missing_kernel(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let kernel = dir.join(format!("{name}-vmlinux"));
    let initramfs = dir.join("initramfs");
    fs::write(&initramfs, b"070701").unwrap();
    let config = dir.join(format!("{name}.toml"));
    fs::write(
        &config,
        format!(
            "[guest]\nkernel = {:?}\ninitramfs = {:?}\n",
            kernel.display().to_string(),
            initramfs.display().to_string()
        ),
    )
    .unwrap();
    (config, kernel)
}

#[test]
fn check_names_a_missing_kernel_and_fails() {
    let d = tempfile::tempdir().unwrap();
    let (config, kernel) = config_with_missing_kernel(d.path(), "c");
    let out = rund(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let kernel_line = stdout
        .lines()
        .find(|l| l.contains("guest kernel:"))
        .expect(&stdout);
    assert!(
        kernel_line.starts_with("FAIL ") && kernel_line.contains(&kernel.display().to_string()),
        "{stdout}"
    );
    let initramfs_line = stdout
        .lines()
        .find(|l| l.contains("guest initramfs:"))
        .expect(&stdout);
    assert!(initramfs_line.starts_with("ok "), "{stdout}");
    assert!(
        stdout
            .lines()
            .next()
            .unwrap()
            .contains(&config.display().to_string()),
        "{stdout}"
    );
}

#[test]
fn check_json_is_machine_readable() {
    let d = tempfile::tempdir().unwrap();
    let (config, kernel) = config_with_missing_kernel(d.path(), "j");
    let out = rund(&["check", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let checks = report["checks"].as_array().unwrap();
    let by_name = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "config",
            "kvm",
            "containerd",
            "containerd config",
            "shim",
            "cgroups",
            "cgroup parent",
            "guest kernel",
            "guest initramfs",
            "reflink"
        ]
    );
    for c in checks {
        assert!(
            ["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap()),
            "{c}"
        );
        assert!(!c["detail"].as_str().unwrap().is_empty(), "{c}");
    }
    let k = by_name("guest kernel");
    assert_eq!(k["status"], "fail");
    assert!(
        k["detail"]
            .as_str()
            .unwrap()
            .contains(&kernel.display().to_string()),
        "{k}"
    );
    assert_eq!(by_name("guest initramfs")["status"], "ok");
    // The KVM line is the VMM's own host check: FAIL with the reason on a PVM host.
    let kvm = by_name("kvm");
    let host = vmm::host_check::check_host();
    assert_eq!(kvm["status"] == "ok", host.is_ok(), "{kvm}");
    if let Err(e) = host {
        assert!(
            kvm["detail"].as_str().unwrap().contains(&e.to_string()),
            "{kvm}"
        );
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(kvm["detail"].as_str().unwrap().contains("PVM"), "{kvm}");
    }
}

#[test]
fn check_config_comes_from_the_flag_then_the_environment() {
    let d = tempfile::tempdir().unwrap();
    let (env_config, env_kernel) = config_with_missing_kernel(d.path(), "from-env");
    let (flag_config, flag_kernel) = config_with_missing_kernel(d.path(), "from-flag");
    let run = |args: &[&str]| {
        let out = Command::new(RUND)
            .args(args)
            .env("RUND_CONFIG", &env_config)
            .output()
            .unwrap();
        text(&out.stdout)
    };
    let stdout = run(&["check"]);
    assert!(
        stdout.contains(&env_kernel.display().to_string()),
        "{stdout}"
    );
    let stdout = run(&["check", "--config", flag_config.to_str().unwrap()]);
    assert!(
        stdout.contains(&flag_kernel.display().to_string()),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&env_kernel.display().to_string()),
        "{stdout}"
    );

    // A configuration that does not parse is one FAIL line naming the key.
    let bad = d.path().join("bad.toml");
    fs::write(&bad, "[guest]\ndefault_vcpus = 0\n").unwrap();
    let out = rund(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("FAIL config: ") && stdout.contains("guest.default_vcpus"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
}

#[test]
fn bad_flags_get_clap_errors() {
    for (args, expected) in [
        (&["install", "--bogus"][..], "unexpected argument '--bogus'"),
        (&["frobnicate"][..], "unrecognized subcommand 'frobnicate'"),
        (
            &["check", "--config"][..],
            "a value is required for '--config <PATH>'",
        ),
        (&[][..], "Usage: rund <COMMAND>"),
    ] {
        let out = rund(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

// The reflink line with a real probe: FICLONE between two files in the directory.

/// Whether `dir`'s filesystem clones file extents (FICLONE), as the copy of each sandbox's
/// writable layer would.
fn ficlone_probe(dir: &Path) -> std::io::Result<bool> {
    let mut src = tempfile::NamedTempFile::new_in(dir)?;
    src.write_all(&[0x5a; 64 * 1024])?;
    src.as_file().sync_all()?;
    let dst = tempfile::NamedTempFile::new_in(dir)?;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE reads none of
    // this process's memory (its argument is the source descriptor).
    let rc = unsafe {
        libc::ioctl(
            dst.as_file().as_raw_fd(),
            libc::FICLONE,
            src.as_file().as_raw_fd(),
        )
    };
    if rc == 0 {
        return Ok(fs::read(dst.path())? == vec![0x5a; 64 * 1024]);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => Ok(false),
        _ => Err(error),
    }
}

/// A filesystem mounted for a test, unmounted (and its loop device freed) on drop.
struct Mounted {
    dir: TempDir,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(self.dir.path()).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("cannot unmount {}", self.dir.path().display());
        }
    }
}

fn mount(args: &[&str]) -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("mount")
        .args(args)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount {args:?}: {}",
        text(&out.stderr)
    );
    Mounted { dir }
}

/// Why the reflink tests cannot run here, if they cannot.
fn reflink_tests_unavailable() -> Option<String> {
    if !is_root() {
        return Some("they need root (mount)".into());
    }
    if Command::new("mkfs.xfs").arg("-V").output().is_err() {
        return Some("mkfs.xfs (xfsprogs) is not installed".into());
    }
    None
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn reflink_line_with_a_real_probe() {
    if let Some(why) = reflink_tests_unavailable() {
        assert!(
            std::env::var_os("RUND_REQUIRE_REFLINK_TESTS").is_none(),
            "RUND_REQUIRE_REFLINK_TESTS is set but {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    // tmpfs has no reflink: a warning that says what happens instead.
    let tmpfs = mount(&["-t", "tmpfs", "-o", "size=4m", "tmpfs"]);
    let line = reflink_check(tmpfs.dir.path(), ficlone_probe);
    assert_eq!(line.status, Status::Warn, "{line:?}");
    assert!(line.detail.contains("sparse copy"), "{line:?}");

    // XFS made with reflink=1 has it, also for a writable-layer directory not made yet.
    let image_dir = tempfile::tempdir().unwrap();
    let image = image_dir.path().join("xfs.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(320 << 20)
        .unwrap();
    let out = Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.xfs: {}", text(&out.stderr));
    let xfs = mount(&["-o", "loop", image.to_str().unwrap()]);
    let line = reflink_check(xfs.dir.path(), ficlone_probe);
    assert_eq!(line.status, Status::Ok, "{line:?}");
    let line = reflink_check(&xfs.dir.path().join("var/lib/rund/writable"), ficlone_probe);
    assert_eq!(line.status, Status::Ok, "{line:?}");
    assert!(line.detail.contains("does not exist yet"), "{line:?}");
    // The probe leaves nothing behind.
    let left: Vec<_> = fs::read_dir(xfs.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
