//! The container process's executable, found as runc finds it, and exec'd.
//!
//! libcontainer's default executor refuses a process whose environment has no `PATH` even when
//! `args[0]` is an absolute path (a pause image built FROM scratch has no `PATH`), and accepts only
//! the others-execute bit. runc (Go's `exec.LookPath`) runs an `args[0]` containing '/' as it is,
//! relative to the working directory as execve(2) would, and looks a bare name up in the process's
//! `PATH`. Both [`Executor`] steps run in the container's process after pivot_root, chdir, setuid and
//! the capability drop, so the execute check is the kernel's own for that user (`AT_EACCESS`):
//! `validate` before the start (its error is CreateContainer's or ExecProcess's), `exec` after it.

use crate::error_chain as chain;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::unistd::{faccessat, AccessFlags};
use oci_spec::runtime::Spec;

/// Why a process's executable cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The spec has no process or no args.
    #[error("the spec has no process.args")]
    NoArgs,
    /// An argument cannot be passed to execve(2).
    #[error("process.args[{0}] contains a NUL byte")]
    Nul(usize),
    /// A bare name is in no `PATH` directory.
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotFound(String),
    /// A bare name, and the process has no `PATH`.
    #[error(
        "exec: {0:?}: executable file not found in $PATH (the process's environment has no PATH)"
    )]
    NoPath(String),
    /// A bare name found through a relative `PATH` entry (Go's `ErrDot`: runc refuses it too).
    #[error(
        "exec: {name:?}: cannot run {path}, found relative to the current directory through $PATH"
    )]
    Relative {
        /// `args[0]`.
        name: String,
        /// Where it was found.
        path: PathBuf,
    },
    /// The file named cannot be executed.
    #[error("exec: {0:?}")]
    Unusable(PathBuf, #[source] io::Error),
}

/// The last `PATH=` of an environment, as the process would see it (later entries win).
pub fn path_of(env: &[String]) -> Option<&str> {
    env.iter().rev().find_map(|e| e.strip_prefix("PATH="))
}

/// Whether `path` can be executed by this process: Go's `findExecutable`, limited to regular
/// files as execve(2) is.
fn executable(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a regular file",
        ));
    }
    match faccessat(None, path, AccessFlags::X_OK, AtFlags::AT_EACCESS) {
        Ok(()) => Ok(()),
        // Not implemented, or refused by a seccomp profile: fall back to the mode bits, as Go does.
        Err(Errno::ENOSYS | Errno::EPERM) if meta.permissions().mode() & 0o111 != 0 => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// The file execve(2) is to run for `name` (`args[0]`), the way runc finds it: a name containing
/// '/' as it is, relative to `cwd`; a bare name in the directories of `path_env`, an empty entry
/// meaning the current directory.
pub fn look_path(name: &str, path_env: Option<&str>, cwd: &Path) -> Result<PathBuf, LookupError> {
    if name.contains('/') {
        let path = cwd.join(name);
        return match executable(&path) {
            Ok(()) => Ok(path),
            Err(e) => Err(LookupError::Unusable(PathBuf::from(name), e)),
        };
    }
    let Some(path_env) = path_env else {
        return Err(LookupError::NoPath(name.to_owned()));
    };
    // Go's filepath.SplitList: an empty PATH has no entries at all.
    if name.is_empty() || path_env.is_empty() {
        return Err(LookupError::NotFound(name.to_owned()));
    }
    for dir in path_env.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(name);
        if executable(&cwd.join(&candidate)).is_ok() {
            if candidate.is_relative() {
                return Err(LookupError::Relative {
                    name: name.to_owned(),
                    path: candidate,
                });
            }
            return Ok(candidate);
        }
    }
    Err(LookupError::NotFound(name.to_owned()))
}

/// The program and argv of the spec's process.
fn command(spec: &Spec) -> Result<(CString, Vec<CString>), LookupError> {
    let process = spec.process().as_ref().ok_or(LookupError::NoArgs)?;
    let args = process
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or(LookupError::NoArgs)?;
    let argv = args
        .iter()
        .enumerate()
        .map(|(i, a)| CString::new(a.as_bytes()).map_err(|_| LookupError::Nul(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let env = process.env().as_deref().unwrap_or_default();
    let program = look_path(&args[0], path_of(env), process.cwd())?;
    // Cannot fail: args[0] was checked above, and a PATH entry or a cwd with a NUL finds no file.
    let program = CString::new(program.as_os_str().as_bytes()).map_err(|_| LookupError::Nul(0))?;
    Ok((program, argv))
}

/// libcontainer's [`Executor`] that runs the process's executable the way runc does.
#[derive(Clone, Copy, Debug, Default)]
pub struct LookPathExecutor;

impl Executor for LookPathExecutor {
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        command(spec)
            .map(|_| ())
            .map_err(|e| ExecutorValidationError::ArgValidationError(chain(&e)))
    }

    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let (program, argv) = command(spec).map_err(|e| ExecutorError::Other(chain(&e)))?;
        let err = match nix::unistd::execv(&program, &argv) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        Err(ExecutorError::Other(format!(
            "exec {}: {err}",
            program.to_string_lossy()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_name_with_a_slash_is_run_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let sleep = file(dir.path(), "sleep", 0o755);
        let abs = sleep.to_str().unwrap();
        // No PATH needed (the pause image's case), nor is PATH searched.
        assert_eq!(look_path(abs, None, Path::new("/")).unwrap(), sleep);
        assert_eq!(
            look_path(abs, Some("/nonexistent"), Path::new("/")).unwrap(),
            sleep
        );
        // Relative to the working directory, as execve(2) resolves it.
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let rel = file(&dir.path().join("bin"), "tool", 0o700);
        assert_eq!(look_path("bin/tool", None, dir.path()).unwrap(), rel);
        assert_eq!(
            look_path("./bin/tool", None, dir.path()).unwrap(),
            dir.path().join("./bin/tool")
        );
        // Missing.
        let e = look_path("./missing", Some("/bin"), dir.path()).unwrap_err();
        assert!(
            matches!(&e, LookupError::Unusable(p, s) if p == Path::new("./missing") && s.kind() == io::ErrorKind::NotFound),
            "{e:?}"
        );
    }

    #[test]
    fn a_bare_name_is_looked_up_in_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        // Not executable in a: skipped; found in b.
        file(&a, "sh", 0o644);
        let found = file(&b, "sh", 0o755);
        let path = format!("/nonexistent:{}:{}", a.display(), b.display());
        assert_eq!(look_path("sh", Some(&path), Path::new("/")).unwrap(), found);
        // Any execute bit will do for root, the owner's for its owner.
        file(&a, "owner-only", 0o100);
        let path_a = a.display().to_string();
        assert!(look_path("owner-only", Some(&path_a), Path::new("/")).is_ok());
        // A directory of that name is not an executable.
        std::fs::create_dir(a.join("dir")).unwrap();
        assert!(matches!(
            look_path("dir", Some(&path_a), Path::new("/")),
            Err(LookupError::NotFound(n)) if n == "dir"
        ));
        // Found only through a relative entry (an empty one means "."): refused, as runc does.
        file(dir.path(), "local", 0o755);
        let e = look_path("local", Some(":/nonexistent"), dir.path()).unwrap_err();
        assert!(matches!(e, LookupError::Relative { .. }), "{e:?}");
    }

    #[test]
    fn a_bare_name_without_path_is_not_found() {
        let e = look_path("sleep", None, Path::new("/")).unwrap_err();
        assert!(matches!(e, LookupError::NoPath(_)));
        assert_eq!(
            e.to_string(),
            "exec: \"sleep\": executable file not found in $PATH (the process's environment has no PATH)"
        );
        let e = look_path("sleep", Some(""), Path::new("/")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "exec: \"sleep\": executable file not found in $PATH"
        );
    }

    #[test]
    fn a_file_that_cannot_be_executed_is_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let plain = file(dir.path(), "plain", 0o644);
        let e = look_path(plain.to_str().unwrap(), None, Path::new("/")).unwrap_err();
        match &e {
            LookupError::Unusable(p, s) => {
                assert_eq!(p, &plain);
                assert_eq!(s.raw_os_error(), Some(libc::EACCES));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            chain(&e).starts_with(&format!("exec: {plain:?}: Permission denied")),
            "{}",
            chain(&e)
        );
        let e = look_path(dir.path().to_str().unwrap(), None, Path::new("/")).unwrap_err();
        match &e {
            LookupError::Unusable(_, s) => assert_eq!(s.raw_os_error(), Some(libc::EISDIR)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_last_path_of_the_environment_counts() {
        let env = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(path_of(&env(&["HOME=/", "PATH=/a", "PATH=/b"])), Some("/b"));
        assert_eq!(path_of(&env(&["HOME=/", "PATHX=/a"])), None);
        assert_eq!(path_of(&env(&["PATH="])), Some(""));
    }

    #[test]
    fn the_spec_is_checked_before_the_start() {
        let spec = |args: serde_json::Value, env: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "process": {"args": args, "env": env, "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "root": {"path": "/"}
            }))
            .unwrap()
        };
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let sh = sh.to_str().unwrap();
        assert!(LookPathExecutor
            .validate(&spec(
                serde_json::json!([sh, "-c", "true"]),
                serde_json::json!([])
            ))
            .is_ok());
        let e = LookPathExecutor
            .validate(&spec(
                serde_json::json!(["sleep", "1"]),
                serde_json::json!(["HOME=/"]),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("no PATH"), "{e}");
        let e = LookPathExecutor
            .validate(&spec(
                serde_json::json!([sh, "a\u{0}b"]),
                serde_json::json!([]),
            ))
            .unwrap_err();
        assert_eq!(e.to_string(), "process.args[1] contains a NUL byte");
    }
}
