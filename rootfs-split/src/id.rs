//! Sandbox, container and exec ids become single path components (`share-ro/<container>/`,
//! `sandboxes/<sandbox>.ext4`, `/run/rund/<sandbox>/`), and they arrive from containerd, from a
//! spec's annotations or from a record on disk, so each is checked before it is joined to a path.
//! The one rule for every crate on the host (the shim checks its ids with it too).

/// containerd's ids are at most 76 bytes; 128 leaves room and stays far below NAME_MAX.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} id {id:?} cannot name a file: {why}")]
pub struct InvalidId {
    /// `sandbox`, `container` or `exec`.
    pub what: &'static str,
    pub id: String,
    pub why: &'static str,
}

/// Accepts 1..=128 bytes of `[A-Za-z0-9_.-]` starting with a letter or digit: no `/`, no `.` or
/// `..`, nothing that needs escaping in mountinfo.
pub fn check_id(what: &'static str, id: &str) -> Result<(), InvalidId> {
    let why = match id.as_bytes() {
        [] => "it is empty",
        b if b.len() > MAX_ID_LEN => "it is longer than 128 bytes",
        b if !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')) =>
        {
            "only ASCII letters, digits, '_', '-' and '.' are allowed"
        }
        [first, ..] if !first.is_ascii_alphanumeric() => "it must start with a letter or digit",
        _ => return Ok(()),
    };
    Err(InvalidId {
        what,
        id: id.to_string(),
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_containerd_ids() {
        for id in ["a", "0f3c9a", "pod-1.web_2", &"b".repeat(MAX_ID_LEN)] {
            check_id("container", id).unwrap();
        }
    }

    #[test]
    fn refuses_path_tricks() {
        for (id, why) in [
            ("", "empty"),
            ("..", "start with"),
            (".", "start with"),
            ("-x", "start with"),
            ("a/b", "only ASCII"),
            ("a b", "only ASCII"),
            ("a\nb", "only ASCII"),
            ("caf\u{e9}", "only ASCII"),
        ] {
            let e = check_id("container", id).unwrap_err();
            assert!(e.to_string().contains(why), "{id:?}: {e}");
            assert!(e.to_string().starts_with("container id"), "{e}");
        }
        assert!(check_id("sandbox", &"c".repeat(MAX_ID_LEN + 1)).is_err());
    }
}
