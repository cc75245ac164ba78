//! containerd's runtime entry for the handler `rund`, printed or written into containerd's
//! configuration with `toml_edit`, which keeps the user's comments, key order and other keys.
//!
//! containerd 1.6 reads config version 2, where the CRI plugin is
//! `plugins."io.containerd.grpc.v1.cri"` and a handler is a table under its
//! `containerd.runtimes`. containerd 2's version 3 moved the runtimes to
//! `plugins."io.containerd.cri.v1.runtime"`; the entry itself is the same. A version 1 file
//! (or one without `version` that has plugin tables, which containerd reads as version 1) names
//! plugins differently and is refused rather than guessed at.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table, TableLike, Value};

use crate::admin::atomic_file::{self, AtomicFileError};
use crate::admin::{HANDLER, RUNTIME_TYPE};

/// Where containerd reads its configuration.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// Pod annotations containerd passes into the sandbox's OCI spec: rund's own sizing annotations
/// (`io.rund.vcpus`, `io.rund.memory-mib`). containerd drops every other pod annotation.
pub const POD_ANNOTATIONS: &str = "io.rund.*";

const CRI_PLUGIN_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_RUNTIME_PLUGIN_V3: &str = "io.containerd.cri.v1.runtime";

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("not valid TOML: {0}")]
    Parse(#[from] toml_edit::TomlError),
    #[error("this is a version 1 containerd configuration ({0}); rund's runtime entry needs version 2 (containerd 1.6's `plugins.\"io.containerd.grpc.v1.cri\"` names): convert the file to version 2 first, or add the entry `rund install` prints by hand")]
    Version1(&'static str),
    #[error("`version = {0}`: rund knows containerd config versions 2 and 3")]
    UnsupportedVersion(String),
    #[error("`{0}` is not a [table] section (an inline table or a value): rund does not rewrite it; add the entry `rund install` prints by hand")]
    NotATable(String),
    #[error("a different `{HANDLER}` runtime is configured already ({0}); rerun with --force to replace it")]
    Conflict(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Edit { path: PathBuf, source: EditError },
    #[error(transparent)]
    Write(#[from] AtomicFileError),
}

/// What an edit does to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The file did not exist: made with `version = 2` and the entry.
    Created,
    /// The entry was added.
    Added,
    /// The same entry was there already.
    Unchanged,
    /// A different entry was replaced (`--force`).
    Replaced,
}

impl Change {
    pub fn describe(self) -> &'static str {
        match self {
            Change::Created => "created with the rund runtime",
            Change::Added => "added the rund runtime",
            Change::Unchanged => "has the rund runtime already",
            Change::Replaced => "replaced the existing rund runtime",
        }
    }
}

/// The entry rund wants: the shim, the annotations it reads, and no host devices in the
/// spec of a privileged container (they belong to the host, not to the guest).
fn rund_runtime() -> Table {
    let mut table = Table::new();
    table.insert("runtime_type", value(RUNTIME_TYPE));
    table.insert(
        "pod_annotations",
        value(Array::from_iter([POD_ANNOTATIONS])),
    );
    table.insert("privileged_without_host_devices", value(true));
    table
        .decor_mut()
        .set_prefix("\n# rund: every pod in its own microVM (written by `rund install`).\n");
    table
}

/// The configuration text printed by `rund install`: a whole version 2 file with the entry.
pub fn snippet() -> String {
    // An empty document has no version, no plugins and no conflict: this cannot fail.
    match edit(None, false) {
        Ok((text, _)) => text,
        Err(e) => unreachable!("editing an empty configuration failed: {e}"),
    }
}

/// Adds the rund entry to `current` (the file's text, `None` if it does not exist).
pub fn edit(current: Option<&str>, force: bool) -> Result<(String, Change), EditError> {
    let mut doc: DocumentMut = current.unwrap_or("").parse()?;
    let cri_plugin = cri_plugin_name(&mut doc)?;
    let mut table = doc.as_table_mut();
    let mut path = String::new();
    for key in ["plugins", cri_plugin, "containerd", "runtimes"] {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(&toml_edit::Key::new(key).display_repr());
        table = table
            .entry(key)
            .or_insert_with(|| {
                let mut t = Table::new();
                t.set_implicit(true);
                Item::Table(t)
            })
            .as_table_mut()
            .ok_or_else(|| EditError::NotATable(path.clone()))?;
    }
    let wanted = rund_runtime();
    let change = match table.get_mut(HANDLER) {
        None => {
            table.insert(HANDLER, Item::Table(wanted));
            if current.is_some() {
                Change::Added
            } else {
                Change::Created
            }
        }
        Some(existing) => match existing.as_table_like() {
            Some(t) if same_entries(t, &wanted) => Change::Unchanged,
            _ if !force => return Err(EditError::Conflict(describe_runtime(existing))),
            _ => {
                replace_keeping_place(existing, wanted);
                Change::Replaced
            }
        },
    };
    Ok((doc.to_string(), change))
}

/// The CRI plugin that holds runtimes in this file's version; a file without `version` and
/// without plugin tables gets `version = 2`.
fn cri_plugin_name(doc: &mut DocumentMut) -> Result<&'static str, EditError> {
    let Some(version) = doc.get("version") else {
        if doc.contains_key("plugins") {
            return Err(EditError::Version1(
                "no `version` key, which containerd reads as 1",
            ));
        }
        doc.insert("version", value(2));
        return Ok(CRI_PLUGIN_V2);
    };
    match version.as_integer() {
        Some(1) => Err(EditError::Version1("`version = 1`")),
        Some(2) => Ok(CRI_PLUGIN_V2),
        Some(3) => Ok(CRI_RUNTIME_PLUGIN_V3),
        _ => Err(EditError::UnsupportedVersion(
            version.to_string().trim().to_string(),
        )),
    }
}

fn describe_runtime(existing: &Item) -> String {
    match existing
        .as_table_like()
        .and_then(|t| t.get("runtime_type"))
        .and_then(Item::as_str)
    {
        Some(RUNTIME_TYPE) => format!("runtime_type {RUNTIME_TYPE:?} with other settings"),
        Some(other) => format!("runtime_type {other:?}"),
        None => "without runtime_type".to_string(),
    }
}

/// Replaces the entry but keeps its comments and place in the file.
fn replace_keeping_place(existing: &mut Item, mut wanted: Table) {
    if let Some(old) = existing.as_table() {
        *wanted.decor_mut() = old.decor().clone();
        wanted.set_position(old.position());
    }
    *existing = Item::Table(wanted);
}

/// The same keys with the same values, whatever the formatting and comments.
fn same_entries(existing: &dyn TableLike, wanted: &Table) -> bool {
    existing.len() == wanted.len()
        && wanted.iter().all(|(key, want)| {
            match (existing.get(key).and_then(Item::as_value), want.as_value()) {
                (Some(have), Some(want)) => same_value(have, want),
                _ => false,
            }
        })
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.value() == b.value(),
        (Value::Boolean(a), Value::Boolean(b)) => a.value() == b.value(),
        (Value::Integer(a), Value::Integer(b)) => a.value() == b.value(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| same_value(x, y))
        }
        _ => false,
    }
}

/// An edit of one file, worked out before anything is written so that `rund install` can
/// refuse before it installs anything.
#[derive(Debug)]
pub struct PlannedEdit {
    /// The file written: a symlinked configuration is edited where the link points.
    pub path: PathBuf,
    pub change: Change,
    text: String,
    mode: u32,
}

impl PlannedEdit {
    pub fn plan(path: &Path, force: bool) -> Result<PlannedEdit, ContainerdConfigError> {
        let read_error = |source| ContainerdConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let (target, current, mode) = match fs::canonicalize(path) {
            Ok(target) => {
                let text = fs::read_to_string(&target).map_err(read_error)?;
                let mode = fs::metadata(&target)
                    .map_err(read_error)?
                    .permissions()
                    .mode()
                    & 0o7777;
                (target, Some(text), mode)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (path.to_owned(), None, 0o644),
            Err(e) => return Err(read_error(e)),
        };
        let (text, change) =
            edit(current.as_deref(), force).map_err(|source| ContainerdConfigError::Edit {
                path: path.to_owned(),
                source,
            })?;
        Ok(PlannedEdit {
            path: target,
            change,
            text,
            mode,
        })
    }

    /// Writes the file (atomically, keeping its mode) unless nothing changes.
    pub fn apply(&self) -> Result<Change, ContainerdConfigError> {
        if self.change != Change::Unchanged {
            atomic_file::install_bytes(&self.path, self.text.as_bytes(), self.mode)?;
        }
        Ok(self.change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rund entry as containerd would read it.
    fn rund_entry(text: &str, plugin: &str) -> toml::Table {
        let doc: toml::Table = toml::from_str(text).unwrap();
        doc["plugins"][plugin]["containerd"]["runtimes"]["rund"]
            .as_table()
            .unwrap()
            .clone()
    }

    fn assert_rund_entry(text: &str, plugin: &str) {
        let entry = rund_entry(text, plugin);
        assert_eq!(
            entry["runtime_type"].as_str(),
            Some("io.containerd.rund.v2")
        );
        assert_eq!(
            entry["pod_annotations"].as_array().unwrap()[0].as_str(),
            Some("io.rund.*")
        );
        assert_eq!(
            entry["privileged_without_host_devices"].as_bool(),
            Some(true)
        );
    }

    #[test]
    fn a_missing_or_empty_file_gets_version_2_and_the_entry() {
        let (text, change) = edit(None, false).unwrap();
        assert_eq!(change, Change::Created);
        assert!(text.starts_with("version = 2\n"), "{text}");
        assert!(
            text.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund]\n"),
            "{text}"
        );
        // Only the entry's own header: the parents stay implicit.
        assert_eq!(text.matches('[').count(), 2, "{text}");
        assert_rund_entry(&text, CRI_PLUGIN_V2);
        assert_eq!(snippet(), text);

        let (empty, change) = edit(Some(""), false).unwrap();
        assert_eq!(change, Change::Added);
        assert_eq!(empty, text);
    }

    #[test]
    fn user_content_and_comments_are_kept_and_a_second_edit_changes_nothing() {
        let user = "\
# my containerd
version = 2
root = \"/var/lib/containerd\" # keep me

[grpc]
  address = \"/run/containerd/containerd.sock\"

# the runc handler
[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]
  runtime_type = \"io.containerd.runc.v2\"
  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]
    SystemdCgroup = true

[plugins.\"io.containerd.grpc.v1.cri\".cni]
  bin_dir = \"/opt/cni/bin\"
";
        let (text, change) = edit(Some(user), false).unwrap();
        assert_eq!(change, Change::Added);
        for line in user.lines() {
            assert!(text.contains(line), "lost {line:?}:\n{text}");
        }
        assert_rund_entry(&text, CRI_PLUGIN_V2);
        let doc: toml::Table = toml::from_str(&text).unwrap();
        let cri = &doc["plugins"][CRI_PLUGIN_V2];
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(true)
        );
        assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/opt/cni/bin"));
        let (again, change) = edit(Some(&text), false).unwrap();
        assert_eq!(change, Change::Unchanged);
        assert_eq!(again, text);
    }

    #[test]
    fn a_hand_written_identical_entry_is_unchanged() {
        let user =
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund]\n\
                    privileged_without_host_devices = true # why not\n\
                    runtime_type = 'io.containerd.rund.v2'\npod_annotations = [ \"io.rund.*\" ]\n";
        let (text, change) = edit(Some(user), false).unwrap();
        assert_eq!(change, Change::Unchanged);
        assert_eq!(text, user);
    }

    #[test]
    fn version_1_is_refused() {
        for user in [
            "version = 1\n",
            "[plugins.cri.containerd]\nsnapshotter = \"overlayfs\"\n",
        ] {
            let e = edit(Some(user), true).unwrap_err();
            assert!(matches!(e, EditError::Version1(_)), "{user}: {e}");
            assert!(e.to_string().contains("version 2"), "{e}");
        }
        // Without plugin tables a missing version is harmless to add.
        let (text, _) = edit(Some("root = \"/srv/containerd\"\n"), false).unwrap();
        assert!(
            text.starts_with("root = \"/srv/containerd\"\nversion = 2\n"),
            "{text}"
        );
        let e = edit(Some("version = \"2\"\n"), false).unwrap_err();
        assert!(matches!(e, EditError::UnsupportedVersion(_)), "{e}");
        let e = edit(Some("version = 2\nplugins = 3\n"), false).unwrap_err();
        assert!(e.to_string().contains("`plugins`"), "{e}");
        let e = edit(Some("version = 2\n[x\n"), false).unwrap_err();
        assert!(matches!(e, EditError::Parse(_)), "{e}");
    }

    #[test]
    fn version_3_uses_the_cri_runtime_plugin() {
        let (text, change) = edit(Some("version = 3\n"), false).unwrap();
        assert_eq!(change, Change::Added);
        assert_rund_entry(&text, CRI_RUNTIME_PLUGIN_V3);
    }

    #[test]
    fn a_different_entry_is_refused_then_replaced_with_force_in_place() {
        let user = "version = 2\n\n# kata, borrowed name\n\
                    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund]\n\
                    runtime_type = \"io.containerd.kata.v2\"\n\
                    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund.options]\n\
                    ConfigPath = \"/etc/kata.toml\"\n\n[metrics]\naddress = \"\"\n";
        let e = edit(Some(user), false).unwrap_err();
        assert!(matches!(e, EditError::Conflict(_)), "{e}");
        assert!(e.to_string().contains("io.containerd.kata.v2"), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");

        let (text, change) = edit(Some(user), true).unwrap();
        assert_eq!(change, Change::Replaced);
        assert_rund_entry(&text, CRI_PLUGIN_V2);
        assert!(
            !text.contains("kata.v2") && !text.contains("ConfigPath"),
            "{text}"
        );
        // Same place, same comment, the rest untouched.
        let comment = text.find("# kata, borrowed name").unwrap();
        let header = text.find("runtimes.rund]").unwrap();
        let metrics = text.find("[metrics]").unwrap();
        assert!(comment < header && header < metrics, "{text}");
        assert_eq!(edit(Some(&text), false).unwrap().1, Change::Unchanged);
    }

    #[test]
    fn an_extra_key_in_the_entry_is_a_difference() {
        let (mut text, _) = edit(None, false).unwrap();
        text.push_str("sandbox_mode = \"podsandbox\"\n");
        let e = edit(Some(&text), false).unwrap_err();
        assert!(matches!(e, EditError::Conflict(_)), "{e}");
        assert!(e.to_string().contains("with other settings"), "{e}");
    }

    #[test]
    fn planned_edit_writes_atomically_and_keeps_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("containerd/config.toml");
        let plan = PlannedEdit::plan(&path, false).unwrap();
        assert_eq!(plan.change, Change::Created);
        assert!(!path.exists(), "planning wrote");
        plan.apply().unwrap();
        assert_rund_entry(&fs::read_to_string(&path).unwrap(), CRI_PLUGIN_V2);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o644
        );

        let own = d.path().join("own.toml");
        fs::write(&own, "version = 2\n# mine\n").unwrap();
        fs::set_permissions(&own, fs::Permissions::from_mode(0o600)).unwrap();
        let link = d.path().join("link.toml");
        std::os::unix::fs::symlink(&own, &link).unwrap();
        assert_eq!(
            PlannedEdit::plan(&link, false).unwrap().apply().unwrap(),
            Change::Added
        );
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let text = fs::read_to_string(&own).unwrap();
        assert!(text.contains("# mine"), "{text}");
        assert_rund_entry(&text, CRI_PLUGIN_V2);
        assert_eq!(
            fs::metadata(&own).unwrap().permissions().mode() & 0o7777,
            0o600
        );
    }
}
