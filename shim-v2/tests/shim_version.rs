//! `containerd-shim-rund-v2 -v` as containerd's shims answer it: the version, the revision and the
//! compiler, exit 0, with no environment at all (containerd's would name TTRPC_ADDRESS).

use std::process::Command;

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-rund-v2");

#[test]
fn version_flags_print_the_version_with_no_environment() {
    for flag in ["-v", "-version", "--version"] {
        let out = Command::new(SHIM).arg(flag).env_clear().output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{flag}: {:?}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 4, "{flag}: {stdout}");
        assert_eq!(lines[0], "containerd-shim-rund-v2:");
        assert_eq!(
            lines[1],
            format!("  Version:  {}", env!("CARGO_PKG_VERSION"))
        );
        let revision = lines[2].strip_prefix("  Revision: ").unwrap_or_default();
        assert!(
            !revision.is_empty() && !revision.contains(char::is_whitespace),
            "{flag}: {stdout}"
        );
        assert!(
            lines[3].starts_with("  Rust version: 1."),
            "{flag}: {stdout}"
        );
        assert!(out.stderr.is_empty(), "{flag}");
    }
}
