//! Which containerd is installed: `containerd --version`, parsed. rund needs containerd 1.6 or
//! later (the shim API v2 with task API v2, and the CRI plugin's config version 2).

use std::fmt;
use std::io;
use std::process::Command;

/// The oldest containerd rund works with.
pub const MINIMUM: Version = Version {
    major: 1,
    minor: 6,
    patch: 0,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerdVersionError {
    #[error("containerd is not installed (no `containerd` on PATH)")]
    NotInstalled,
    #[error("running `containerd --version`: {0}")]
    Run(#[source] io::Error),
    #[error("`containerd --version` failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("cannot read a version in `containerd --version`'s output {0:?}")]
    Unparsable(String),
}

/// The version in `containerd --version`'s output: `containerd <module> <version> <revision>`,
/// e.g. Debian's `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1` or
/// upstream's `containerd github.com/containerd/containerd v1.7.13 7c3aca7a...`.
pub fn parse_version_output(output: &str) -> Result<Version, ContainerdVersionError> {
    let unparsable = || ContainerdVersionError::Unparsable(output.trim().to_string());
    let line = output.lines().next().ok_or_else(unparsable)?;
    let mut fields = line.split_whitespace();
    if fields.next() != Some("containerd") {
        return Err(unparsable());
    }
    fields.nth(1).and_then(parse_version).ok_or_else(unparsable)
}

/// `1.6.20`, `v1.7.0`, `1.6.20~ds1`, `2.0.0-rc.1`, `1.7`: the leading numbers, whatever suffix
/// a packager added after them.
fn parse_version(text: &str) -> Option<Version> {
    let text = text.strip_prefix('v').unwrap_or(text);
    let numeric_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let mut parts = text[..numeric_end].split('.');
    let mut next = |required: bool| match parts.next() {
        Some(p) if !p.is_empty() => p.parse::<u32>().ok(),
        None if !required => Some(0),
        _ => None,
    };
    let major = next(true)?;
    let minor = next(true)?;
    let patch = next(false)?;
    if parts.next().is_some() {
        return None;
    }
    Some(Version {
        major,
        minor,
        patch,
    })
}

/// Runs `containerd --version` from PATH; returns the version and the output's first line.
pub fn installed_version() -> Result<(Version, String), ContainerdVersionError> {
    let output = match Command::new("containerd").arg("--version").output() {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ContainerdVersionError::NotInstalled)
        }
        Err(e) => return Err(ContainerdVersionError::Run(e)),
    };
    if !output.status.success() {
        return Err(ContainerdVersionError::Failed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version_output(&text)?;
    let first_line = text.lines().next().unwrap_or_default().trim().to_string();
    Ok((version, first_line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn real_outputs_parse() {
        let cases = [
            (
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n",
                v(1, 6, 20),
            ),
            (
                "containerd containerd.io 1.6.28 ae07eda36dd25f8a1b98dfbf587313b99c0190bb\n",
                v(1, 6, 28),
            ),
            (
                "containerd github.com/containerd/containerd v1.7.13 7c3aca7a610df76212171d200ca3811ff6096eb8\n",
                v(1, 7, 13),
            ),
            (
                "containerd github.com/containerd/containerd/v2 v2.0.0-rc.1 abcdef\n",
                v(2, 0, 0),
            ),
            ("containerd github.com/containerd/containerd 1.5 x\n", v(1, 5, 0)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_version_output(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn garbage_is_refused_with_the_output() {
        for text in [
            "",
            "runc version 1.1.5\n",
            "containerd\n",
            "containerd github.com/containerd/containerd\n",
            "containerd github.com/containerd/containerd dev abc\n",
            "containerd github.com/containerd/containerd 1.6.2.4 abc\n",
            "containerd github.com/containerd/containerd 99999999999.1 abc\n",
        ] {
            let e = parse_version_output(text).unwrap_err();
            assert!(
                matches!(e, ContainerdVersionError::Unparsable(_)),
                "{text}: {e}"
            );
            assert!(e.to_string().contains(text.trim()), "{e}");
        }
    }

    #[test]
    fn versions_order_by_number_not_text() {
        assert!(v(1, 10, 0) > v(1, 6, 20));
        assert!(v(1, 6, 0) >= MINIMUM);
        assert!(v(1, 5, 99) < MINIMUM);
        assert!(v(2, 0, 0) > MINIMUM);
        assert_eq!(MINIMUM.to_string(), "1.6.0");
    }
}
