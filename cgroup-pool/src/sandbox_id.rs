//! Sandbox ids: untrusted input that ends up in directory names under cgroupfs and rund's state
//! directory, so it is checked once here and carried as a type afterwards.

use std::fmt;

/// Longest id accepted. containerd ids are 64 hex digits (76 with a prefix); 128 leaves room while
/// keeping `sandbox-<id>` far below NAME_MAX (255).
pub const MAX_SANDBOX_ID_LEN: usize = 128;

/// Why a string is not a usable sandbox id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSandboxId {
    #[error("sandbox id is empty")]
    Empty,
    #[error("sandbox id is {len} bytes long; at most {MAX_SANDBOX_ID_LEN} are allowed")]
    TooLong { len: usize },
    #[error(
        "sandbox id {id:?} contains {bad:?} at byte {at}; only ASCII letters, digits, '_', '-' and '.' are allowed"
    )]
    BadCharacter { id: String, bad: char, at: usize },
    #[error(
        "sandbox id {id:?} must start with an ASCII letter or digit (no '.', '-' or '_' first)"
    )]
    BadFirstCharacter { id: String },
}

/// A validated sandbox id: 1..=128 bytes of `[A-Za-z0-9_.-]`, starting with a letter or digit.
///
/// That excludes `/`, `..`, `.`, NUL, whitespace and newlines, so the id is safe as one path
/// component in cgroupfs and in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// Checks `id` and wraps it.
    pub fn parse(id: &str) -> Result<SandboxId, InvalidSandboxId> {
        if id.is_empty() {
            return Err(InvalidSandboxId::Empty);
        }
        if id.len() > MAX_SANDBOX_ID_LEN {
            return Err(InvalidSandboxId::TooLong { len: id.len() });
        }
        if let Some((at, bad)) = id
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(InvalidSandboxId::BadCharacter {
                id: id.to_string(),
                bad,
                at,
            });
        }
        // The first byte is ASCII here: every character passed the check above.
        if !id.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(InvalidSandboxId::BadFirstCharacter { id: id.to_string() });
        }
        Ok(SandboxId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SandboxId {
    type Err = InvalidSandboxId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxId::parse(s)
    }
}

/// Serialised as the plain string; deserialising validates it again.
impl serde::Serialize for SandboxId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for SandboxId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        SandboxId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_container_style_ids() {
        for ok in [
            "a",
            "0f3c9a",
            "pod-1.web_2",
            &"a".repeat(MAX_SANDBOX_ID_LEN),
        ] {
            assert_eq!(SandboxId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_path_tricks_and_bad_bytes() {
        assert_eq!(SandboxId::parse(""), Err(InvalidSandboxId::Empty));
        assert!(matches!(
            SandboxId::parse(".."),
            Err(InvalidSandboxId::BadFirstCharacter { .. })
        ));
        assert!(matches!(
            SandboxId::parse(".hidden"),
            Err(InvalidSandboxId::BadFirstCharacter { .. })
        ));
        assert!(matches!(
            SandboxId::parse("a/b"),
            Err(InvalidSandboxId::BadCharacter {
                bad: '/',
                at: 1,
                ..
            })
        ));
        assert!(matches!(
            SandboxId::parse("a\nb"),
            Err(InvalidSandboxId::BadCharacter { bad: '\n', .. })
        ));
        assert!(matches!(
            SandboxId::parse("caf\u{e9}"),
            Err(InvalidSandboxId::BadCharacter { .. })
        ));
        assert_eq!(
            SandboxId::parse(&"a".repeat(MAX_SANDBOX_ID_LEN + 1)),
            Err(InvalidSandboxId::TooLong {
                len: MAX_SANDBOX_ID_LEN + 1
            })
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let msg = SandboxId::parse("x/../y").unwrap_err().to_string();
        assert!(msg.contains("'/'"), "{msg}");
    }
}
