//! `rund check`: can this host run sandboxes, and if not, why. One line per check: `ok`, `warn`
//! (works, but worse than it could) or `FAIL` (a sandbox cannot start), with the reason.

use std::fmt::Display;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cgroup_pool::config::cgroup_relative_path;
use cgroup_pool::parent::V2_CONTROLLERS;
use cgroup_pool::{CgroupVersion, Hierarchy};
use serde::Serialize;
use vmm::host_check::{check_host, HardwareVirtualisation};

use crate::admin::config_source::LoadedConfig;
use crate::admin::containerd_effective::{
    describe_runtime, EffectiveError, Reader, BUILTIN_RUNTIME,
};
use crate::admin::containerd_version::{self, MINIMUM};
use crate::admin::{error_chain, BIN_DIR, HANDLER, RUNTIME_TYPE, SHIM_BINARY};
use crate::config::Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Sandboxes run, but something is worse than it could be.
    Warn,
    /// Sandboxes cannot run.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckLine {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

impl CheckLine {
    fn new(name: &str, status: Status, detail: impl Into<String>) -> CheckLine {
        CheckLine {
            name: name.to_string(),
            status,
            detail: detail.into(),
        }
    }
}

/// Every check's line; `ok` is false when any failed.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<CheckLine>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            ok: true,
            checks: Vec::new(),
        }
    }
}

impl Report {
    pub fn push(&mut self, line: CheckLine) {
        self.ok &= line.status != Status::Fail;
        self.checks.push(line);
    }

    /// The report of a configuration that cannot be read: nothing else can be checked.
    pub fn config_error(error: &dyn std::error::Error) -> Report {
        let mut report = Report::default();
        report.push(CheckLine::new("config", Status::Fail, error_chain(error)));
        report
    }

    /// One line per check: `ok   kvm: ...`.
    pub fn text(&self) -> String {
        self.checks
            .iter()
            .map(|c| format!("{:<4} {}: {}\n", c.status.label(), c.name, c.detail))
            .collect()
    }

    pub fn json(&self) -> String {
        // A struct of strings, bools and enums always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// Every check that needs only the configuration and containerd's (at `containerd_config`), in
/// order. The writable layer's reflink line ([`reflink_check`]) takes the probe of the crate that
/// makes the copies and is added by the caller.
pub fn run_checks(loaded: &LoadedConfig, containerd_config: &Path) -> Report {
    let config = &loaded.config;
    let mut report = Report::default();
    report.push(CheckLine::new("config", Status::Ok, loaded.describe()));
    report.push(kvm_check());
    report.push(containerd_check());
    report.push(containerd_config_check(
        containerd_config,
        &Reader::detect(),
    ));
    report.push(shim_check());
    for line in cgroup_checks(config) {
        report.push(line);
    }
    report.push(guest_file_check(
        "guest kernel",
        &config.guest.kernel,
        "--kernel",
    ));
    report.push(guest_file_check(
        "guest initramfs",
        &config.guest.initramfs,
        "--initramfs",
    ));
    report
}

fn kvm_check() -> CheckLine {
    match check_host() {
        Ok(v) => CheckLine::new(
            "kvm",
            Status::Ok,
            format!(
                "/dev/kvm can run a Linux guest ({})",
                match v {
                    HardwareVirtualisation::Vmx => "Intel VT-x",
                    HardwareVirtualisation::Svm => "AMD-V",
                }
            ),
        ),
        Err(e) => CheckLine::new("kvm", Status::Fail, error_chain(&e)),
    }
}

fn containerd_check() -> CheckLine {
    match containerd_version::installed_version() {
        Ok((version, line)) if version >= MINIMUM => {
            CheckLine::new("containerd", Status::Ok, format!("{version} ({line})"))
        }
        Ok((version, line)) => CheckLine::new(
            "containerd",
            Status::Fail,
            format!("{version} ({line}) is older than {MINIMUM}, the oldest rund works with"),
        ),
        Err(e) => CheckLine::new("containerd", Status::Fail, error_chain(&e)),
    }
}

/// The CRI runtimes containerd will run with, read from its configuration at `path` the way
/// containerd reads it (a missing file: containerd's defaults): the default runtime must be among
/// them, or the CRI plugin does not load, and so must rund.
pub fn containerd_config_check(path: &Path, reader: &Reader) -> CheckLine {
    let name = "containerd config";
    let runtimes = match reader.read_file(path) {
        Ok(runtimes) => runtimes,
        // That error names the file already.
        Err(e @ EffectiveError::Read { .. }) => {
            return CheckLine::new(name, Status::Fail, error_chain(&e))
        }
        Err(e) => {
            return CheckLine::new(
                name,
                Status::Fail,
                format!("{}: {}", path.display(), error_chain(&e)),
            )
        }
    };
    let missing = if path.exists() {
        ""
    } else {
        " does not exist, containerd's defaults"
    };
    let seen = format!("{}{missing}: {runtimes} ({reader})", path.display());
    let install = "run `rund install --write-containerd-config`";
    let mut problems = Vec::new();
    if !runtimes.has_default() {
        let fix = if runtimes.default == BUILTIN_RUNTIME {
            install.to_string()
        } else {
            format!(
                "define runtime {:?} or correct default_runtime_name",
                runtimes.default
            )
        };
        problems.push(format!(
            "the default runtime {} is not among them, so containerd's CRI plugin will not load \
             and no pod on this node starts: {fix}",
            runtimes.default
        ));
    }
    match runtimes.runtime_type(HANDLER) {
        Some(RUNTIME_TYPE) => {}
        None => problems.push(format!("no {HANDLER} runtime: {install}")),
        Some(other) => problems.push(format!(
            "runtime {} is not rund's {RUNTIME_TYPE}: {install} --force",
            describe_runtime(HANDLER, other)
        )),
    }
    if problems.is_empty() {
        CheckLine::new(name, Status::Ok, seen)
    } else {
        CheckLine::new(
            name,
            Status::Fail,
            format!("{seen}; {}", problems.join("; ")),
        )
    }
}

/// containerd runs `containerd-shim-rund-v2` from its PATH; `rund install` puts it in
/// /usr/local/bin, which a containerd service's PATH has.
fn shim_check() -> CheckLine {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = path_dirs
        .iter()
        .map(PathBuf::as_path)
        .chain([Path::new(BIN_DIR)])
        .map(|dir| dir.join(SHIM_BINARY))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    match found {
        Some(path) => CheckLine::new("shim", Status::Ok, path.display().to_string()),
        None => CheckLine::new(
            "shim",
            Status::Fail,
            format!("no executable {SHIM_BINARY} on PATH or in {BIN_DIR}: run `rund install`"),
        ),
    }
}

/// Which hierarchy the cgroup pool would use, and whether rund's parent can hold sandboxes.
fn cgroup_checks(config: &Config) -> [CheckLine; 2] {
    let pool = config.pool_config();
    let hierarchy = match Hierarchy::resolve(pool.version, pool.mounts.as_deref()) {
        Ok(h) => h,
        Err(e) => {
            return [
                CheckLine::new("cgroups", Status::Fail, error_chain(&e)),
                CheckLine::new(
                    "cgroup parent",
                    Status::Fail,
                    "no usable cgroup hierarchy to make it in",
                ),
            ]
        }
    };
    [
        hierarchy_line(&hierarchy),
        parent_check(&hierarchy, &config.cgroup_pool.parent),
    ]
}

fn hierarchy_line(hierarchy: &Hierarchy) -> CheckLine {
    let available: Vec<&str> = hierarchy
        .mounts
        .iter()
        .flat_map(|m| m.controllers.iter().map(String::as_str))
        .collect();
    let where_ = match hierarchy.version {
        CgroupVersion::V2 => format!(" at {}", hierarchy.mounts[0].mount_point.display()),
        CgroupVersion::V1 => format!(", {} controller hierarchies", hierarchy.mounts.len()),
    };
    let missing: Vec<&str> = V2_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !available.contains(c))
        .collect();
    let detail = format!(
        "{}{where_} (controllers: {})",
        hierarchy.version,
        available.join(" ")
    );
    if missing.is_empty() {
        CheckLine::new("cgroups", Status::Ok, detail)
    } else {
        CheckLine::new(
            "cgroups",
            Status::Warn,
            format!(
                "{detail}; missing {}: a sandbox's limits on those are not applied",
                missing.join(" ")
            ),
        )
    }
}

/// Makes a probe cgroup below rund's parent in every hierarchy and removes it again, together
/// with any part of the parent the probe had to make.
fn parent_check(hierarchy: &Hierarchy, parent: &str) -> CheckLine {
    let name = "cgroup parent";
    let relative = match cgroup_relative_path(parent) {
        Ok(r) => r,
        Err(e) => return CheckLine::new(name, Status::Fail, e.to_string()),
    };
    let probe = format!("rund-check-{}", std::process::id());
    let mut parent_existed = true;
    for mount in &hierarchy.mounts {
        match probe_cgroup(&mount.mount_point, &relative, &probe) {
            Ok(existed) => parent_existed &= existed,
            Err(e) => {
                return CheckLine::new(
                    name,
                    Status::Fail,
                    format!("rund's parent {parent:?} cannot hold sandbox cgroups: {e}"),
                )
            }
        }
    }
    CheckLine::new(
        name,
        Status::Ok,
        format!(
            "{parent:?}: made and removed a cgroup below it in {} hierarch{} ({})",
            hierarchy.mounts.len(),
            if hierarchy.mounts.len() == 1 {
                "y"
            } else {
                "ies"
            },
            if parent_existed {
                "it exists"
            } else {
                "it is made when the first shim starts"
            }
        ),
    )
}

/// Makes `<mount>/<relative>/<probe>`, then removes it and whatever part of `relative` it made.
/// Returns whether `relative` existed already.
fn probe_cgroup(mount: &Path, relative: &Path, probe: &str) -> Result<bool, String> {
    let mut made = Vec::new();
    let result = make_and_remove_probe(mount, relative, probe, &mut made);
    // Deepest first; a parent a starting shim began to fill meanwhile is not empty and stays.
    let mut cleanup_error = None;
    for dir in made.iter().rev() {
        if let Err(e) = fs::remove_dir(dir) {
            if !matches!(
                e.kind(),
                io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::ResourceBusy
            ) {
                cleanup_error.get_or_insert(format!("cannot remove {}: {e}", dir.display()));
            }
        }
    }
    result?;
    match cleanup_error {
        Some(e) => Err(e),
        None => Ok(made.is_empty()),
    }
}

fn make_and_remove_probe(
    mount: &Path,
    relative: &Path,
    probe: &str,
    made: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let mut dir = mount.to_path_buf();
    for component in relative.components() {
        dir.push(component);
        match fs::create_dir(&dir) {
            Ok(()) => made.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot make {}: {e}", dir.display())),
        }
    }
    let probe = dir.join(probe);
    fs::create_dir(&probe).map_err(|e| format!("cannot make {}: {e}", probe.display()))?;
    fs::remove_dir(&probe).map_err(|e| format!("cannot remove {}: {e}", probe.display()))
}

fn guest_file_check(name: &str, path: &Path, flag: &str) -> CheckLine {
    let fail = |detail: String| CheckLine::new(name, Status::Fail, detail);
    match File::open(path).and_then(|f| f.metadata()) {
        Ok(m) if !m.is_file() => fail(format!("{} is not a regular file", path.display())),
        Ok(m) if m.len() == 0 => fail(format!("{} is empty", path.display())),
        Ok(m) => CheckLine::new(
            name,
            Status::Ok,
            format!("{} ({} bytes)", path.display(), m.len()),
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fail(format!(
            "{} does not exist: install it with `rund install {flag} PATH`",
            path.display()
        )),
        Err(e) => fail(format!("{} cannot be read: {e}", path.display())),
    }
}

/// Whether the writable-layer directory `dir` can take reflink copies, by `probe` (the copying
/// crate's own probe). A directory not made yet is probed at its nearest existing ancestor, on
/// whose filesystem it will be made. No reflink is a warning: each sandbox then gets a sparse
/// copy, which works but costs a copy of the image's allocated blocks at every start.
pub fn reflink_check<E: Display>(
    dir: &Path,
    probe: impl FnOnce(&Path) -> Result<bool, E>,
) -> CheckLine {
    let name = "reflink";
    let probed = dir
        .ancestors()
        .find(|d| d.is_dir())
        .unwrap_or(Path::new("/"));
    let note = if probed == dir {
        String::new()
    } else {
        format!(
            " ({} does not exist yet: probed {}, where it will be made)",
            dir.display(),
            probed.display()
        )
    };
    match probe(probed) {
        Ok(true) => CheckLine::new(
            name,
            Status::Ok,
            format!("{}: reflink copies work{note}", dir.display()),
        ),
        Ok(false) => CheckLine::new(
            name,
            Status::Warn,
            format!(
                "{}: this filesystem has no reflink{note}; each sandbox's writable layer is a \
                 sparse copy instead (slower start): put writable_layer.dir on XFS \
                 (`mkfs.xfs -m reflink=1`) or btrfs",
                dir.display()
            ),
        ),
        Err(e) => CheckLine::new(
            name,
            Status::Warn,
            format!("{}: cannot probe reflink{note}: {e}", dir.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_fails_on_any_fail_but_not_on_a_warning() {
        let mut report = Report::default();
        report.push(CheckLine::new("a", Status::Ok, "fine"));
        report.push(CheckLine::new("b", Status::Warn, "meh"));
        assert!(report.ok);
        report.push(CheckLine::new("c", Status::Fail, "broken"));
        assert!(!report.ok);
        assert_eq!(report.text(), "ok   a: fine\nwarn b: meh\nFAIL c: broken\n");
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][1]["status"], "warn");
        assert_eq!(json["checks"][2]["detail"], "broken");
    }

    #[test]
    fn reflink_line_follows_the_probe_and_probes_an_existing_directory() {
        let d = tempfile::tempdir().unwrap();
        let line = reflink_check(d.path(), |p: &Path| {
            assert_eq!(p, d.path());
            Ok::<_, io::Error>(true)
        });
        assert_eq!(line.status, Status::Ok);
        let line = reflink_check(d.path(), |_: &Path| Ok::<_, io::Error>(false));
        assert_eq!(line.status, Status::Warn);
        assert!(line.detail.contains("sparse copy"), "{}", line.detail);
        let line = reflink_check(d.path(), |_: &Path| Err(io::Error::other("EIO from probe")));
        assert_eq!(line.status, Status::Warn);
        assert!(line.detail.contains("EIO from probe"), "{}", line.detail);

        let missing = d.path().join("not/yet");
        let line = reflink_check(&missing, |p: &Path| {
            assert_eq!(p, d.path());
            Ok::<_, io::Error>(true)
        });
        assert_eq!(line.status, Status::Ok);
        assert!(
            line.detail.contains("does not exist yet"),
            "{}",
            line.detail
        );
    }

    #[test]
    fn guest_files_must_be_non_empty_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("vmlinux");
        let line = guest_file_check("guest kernel", &missing, "--kernel");
        assert_eq!(line.status, Status::Fail);
        assert!(
            line.detail.contains(&missing.display().to_string())
                && line.detail.contains("--kernel"),
            "{}",
            line.detail
        );
        fs::write(&missing, b"").unwrap();
        assert_eq!(
            guest_file_check("k", &missing, "--kernel").status,
            Status::Fail
        );
        fs::write(&missing, b"\x7fELF").unwrap();
        let line = guest_file_check("k", &missing, "--kernel");
        assert_eq!(line.status, Status::Ok);
        assert!(line.detail.contains("4 bytes"), "{}", line.detail);
        assert_eq!(
            guest_file_check("k", d.path(), "--kernel").status,
            Status::Fail
        );
    }

    #[test]
    fn kvm_line_agrees_with_the_host_check() {
        let line = kvm_check();
        assert_eq!(line.status == Status::Ok, check_host().is_ok(), "{line:?}");
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            assert!(line.detail.contains("PVM"), "{}", line.detail);
        }
    }

    #[test]
    fn cgroup_probe_leaves_nothing_behind() {
        // A plain directory tree stands in for a cgroup mount: mkdir and rmdir behave the same.
        let d = tempfile::tempdir().unwrap();
        let relative = Path::new("a/b");
        assert!(!probe_cgroup(d.path(), relative, "probe").unwrap());
        assert!(!d.path().join("a").exists());
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        assert!(probe_cgroup(d.path(), relative, "probe").unwrap());
        assert!(d.path().join("a/b").is_dir());
        assert!(!d.path().join("a/b/probe").exists());
        // A parent that cannot be made is an error naming it.
        fs::write(d.path().join("file"), b"").unwrap();
        let e = probe_cgroup(d.path(), Path::new("file/x"), "probe").unwrap_err();
        assert!(e.contains("file/x"), "{e}");
    }

    #[test]
    fn containerd_config_line_needs_the_default_runtime_and_rund() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.toml");
        let rund = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund]\n\
                    runtime_type = \"io.containerd.rund.v2\"\n";
        let runc = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
                    runtime_type = \"io.containerd.runc.v2\"\n";
        let kata = "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                    default_runtime_name = \"kata\"\n";
        let line = |text: Option<&str>| {
            match text {
                Some(text) => fs::write(&path, text).unwrap(),
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
            containerd_config_check(&path, &Reader::Rules)
        };

        let missing = line(None);
        assert_eq!(missing.status, Status::Fail);
        for part in [
            "does not exist, containerd's defaults",
            "CRI runtimes runc (io.containerd.runc.v2); default runc",
            "no rund runtime: run `rund install --write-containerd-config`",
            "no containerd on PATH",
        ] {
            assert!(missing.detail.contains(part), "{part}: {}", missing.detail);
        }
        let stock = line(Some(crate::admin::fixtures::DEBIAN_STOCK));
        assert_eq!(stock.status, Status::Fail);
        assert!(stock.detail.contains("no rund runtime"), "{}", stock.detail);

        // The old install's result: rund only, runc gone.
        let rund_only = line(Some(&format!("version = 2\n{rund}")));
        assert_eq!(rund_only.status, Status::Fail);
        assert!(
            rund_only
                .detail
                .contains("the default runtime runc is not among them")
                && rund_only.detail.contains("CRI plugin will not load")
                && rund_only.detail.contains("--write-containerd-config")
                && !rund_only.detail.contains("no rund runtime"),
            "{}",
            rund_only.detail
        );
        let other_default = line(Some(&format!("version = 2\n{kata}{rund}{runc}")));
        assert_eq!(other_default.status, Status::Fail);
        assert!(
            other_default
                .detail
                .contains("define runtime \"kata\" or correct default_runtime_name"),
            "{}",
            other_default.detail
        );

        let installed = line(Some(&format!("version = 2\n{rund}{runc}")));
        assert_eq!(installed.status, Status::Ok, "{}", installed.detail);
        assert_eq!(
            installed.detail,
            format!(
                "{}: CRI runtimes runc (io.containerd.runc.v2), rund (io.containerd.rund.v2); \
                 default runc ({})",
                path.display(),
                Reader::Rules
            )
        );
        let kata_rund = line(Some(&format!(
            "version = 2\n{}",
            rund.replace("rund.v2", "kata.v2")
        )));
        assert!(kata_rund.detail.contains("--force"), "{}", kata_rund.detail);
        let unreadable = line(Some("version = 2\n[x\n"));
        assert_eq!(unreadable.status, Status::Fail);
        assert!(
            unreadable.detail.contains("not valid TOML"),
            "{}",
            unreadable.detail
        );
    }
}
