//! What `containerd-shim-rund-v2 -v` prints besides the crate's version: the git commit the binary
//! is built from (`RUND_REVISION` if set, for a build outside a checkout; else `git rev-parse`;
//! else "unknown") and the compiler's version.
//!
//! The script reruns when the commit can have changed (git's HEAD, the branch it names, packed-refs),
//! not on every build: only files that exist are watched, since cargo reruns a script on every
//! build for a watched file that is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A command's trimmed standard output, if it succeeded and said something.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    output(Command::new("git").arg("-C").arg(dir).args(args))
}

/// A file of the repository's git directory (worktrees included), as a path from `dir`.
fn git_path(dir: &Path, name: &str) -> Option<PathBuf> {
    git(dir, &["rev-parse", "--git-path", name]).map(|p| dir.join(p))
}

fn git_revision(dir: &Path) -> Option<String> {
    let revision = git(dir, &["rev-parse", "--short", "HEAD"])?;
    let mut watched = vec![git_path(dir, "HEAD"), git_path(dir, "packed-refs")];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        // A branch packed in packed-refs has no file: its directory sees the file a commit makes.
        watched.push(git_path(dir, &branch).map(|file| match file.exists() {
            true => file,
            false => file.parent().map(Path::to_path_buf).unwrap_or(file),
        }));
    }
    for path in watched.into_iter().flatten().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Some(revision)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUND_REVISION");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let revision = std::env::var("RUND_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git_revision(&dir))
        .unwrap_or_else(|| "unknown".to_owned());
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let rust_version = output(Command::new(rustc).arg("--version"))
        .map(|v| v.trim_start_matches("rustc ").to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=RUND_REVISION={revision}");
    println!("cargo:rustc-env=RUND_RUST_VERSION={rust_version}");
}
