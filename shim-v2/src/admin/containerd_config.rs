//! containerd's runtime entry for the handler `rund`, printed or written into containerd's
//! configuration with `toml_edit`, which keeps the user's comments, key order and other keys.
//!
//! containerd 1.6 reads config version 2, where the CRI plugin is
//! `plugins."io.containerd.grpc.v1.cri"` and a handler is a table under its
//! `containerd.runtimes`. containerd 2's version 3 moved the runtimes to
//! `plugins."io.containerd.cri.v1.runtime"`; the entry itself is the same. A version 1 file
//! (or one without `version` that has plugin tables, which containerd reads as version 1) names
//! plugins differently and is refused rather than guessed at.
//!
//! A `runtimes` table in the file replaces containerd's built-in runtimes (only `runc`) instead
//! of adding to them, and the CRI plugin does not load without its default runtime. So when the
//! file relied on the built-in runc, the edit writes runc's entry beside rund's; and before
//! anything is written, the edited text is read the way containerd will read it
//! ([`containerd_effective`](crate::admin::containerd_effective)): it must keep every runtime
//! the node had and add rund.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table, TableLike, Value};

use crate::admin::atomic_file::{self, AtomicFileError};
use crate::admin::containerd_effective::{
    describe_runtime, CriRuntimes, EffectiveError, Reader, BUILTIN_RUNTIME, BUILTIN_RUNTIME_TYPE,
    CRI_PLUGIN_V2, CRI_RUNTIME_PLUGIN_V3,
};
use crate::admin::{HANDLER, RUNTIME_TYPE};

/// Where containerd reads its configuration.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// Pod annotations containerd passes into the sandbox's OCI spec: rund's own sizing annotations
/// (`io.rund.vcpus`, `io.rund.memory-mib`). containerd drops every other pod annotation.
pub const POD_ANNOTATIONS: &str = "io.rund.*";

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("not valid TOML")]
    Parse(#[source] toml_edit::TomlError),
    #[error("this is a version 1 containerd configuration ({0}); rund's runtime entry needs version 2 (containerd 1.6's `plugins.\"io.containerd.grpc.v1.cri\"` names): convert the file to version 2 first, or add the entry `rund install` prints by hand")]
    Version1(&'static str),
    #[error("`version = {0}`: rund knows containerd config versions 2 and 3")]
    UnsupportedVersion(String),
    #[error("`{0}` is not a [table] section (an inline table or a value): rund does not rewrite it; add the entry `rund install` prints by hand")]
    NotATable(String),
    #[error("`{0}` is not a string")]
    NotAString(String),
    #[error("a different `{HANDLER}` runtime is configured already ({0}); rerun with --force to replace it")]
    Conflict(String),
    #[error("`default_runtime_name = {name:?}` names a runtime the file does not define (it defines {defined}) and containerd has no built-in runtime of that name: containerd's CRI plugin does not load with this file as it is; define runtime {name:?} or correct default_runtime_name first")]
    MissingDefault { name: String, defined: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}")]
    Edit {
        path: PathBuf,
        #[source]
        source: EditError,
    },
    #[error("{path}, as containerd reads it now")]
    ReadCurrent {
        path: PathBuf,
        #[source]
        source: Box<EffectiveError>,
    },
    #[error("{path}, as containerd would read it after the edit")]
    ReadEdited {
        path: PathBuf,
        #[source]
        source: Box<EffectiveError>,
    },
    #[error("{path}: refused (the file is left as it is): after the edit containerd would {problems} ({reader})")]
    WouldBreak {
        path: PathBuf,
        problems: String,
        reader: Reader,
    },
    #[error(transparent)]
    Write(#[from] AtomicFileError),
}

/// One thing an edit changes in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The file did not exist: made with `version = 2`.
    Created,
    /// A file with neither `version` nor plugin tables got `version = 2`.
    AddedVersion,
    /// rund's runtime was added.
    AddedRund,
    /// A different `rund` runtime was replaced (`--force`).
    ReplacedRund,
    /// runc's entry was written out: the file had no runtimes table, so it relied on containerd's
    /// built-in one, which the table holding rund replaces.
    AddedBuiltin,
    /// runc's entry was written into a runtimes table that lacked it although runc is the default
    /// runtime: containerd's CRI plugin did not load (an older `rund install` left files so).
    RestoredDefault,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Created => write!(f, "created the file (config version 2)"),
            Change::AddedVersion => write!(
                f,
                "added `version = 2` (containerd reads a file without one as version 1)"
            ),
            Change::AddedRund => write!(f, "added runtime {HANDLER}"),
            Change::ReplacedRund => write!(f, "replaced the existing runtime {HANDLER} (--force)"),
            Change::AddedBuiltin => write!(
                f,
                "added runtime {BUILTIN_RUNTIME} (containerd's built-in default, which a \
                 runtimes table would otherwise replace)"
            ),
            Change::RestoredDefault => write!(
                f,
                "added runtime {BUILTIN_RUNTIME} (the default runtime, missing from the file's \
                 runtimes table: containerd's CRI plugin did not load without it)"
            ),
        }
    }
}

/// The edited text and what changed; with no changes, the text is the file's, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edited {
    pub text: String,
    pub changes: Vec<Change>,
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

/// containerd's built-in runc, as containerd's own defaults have it.
fn builtin_runtime() -> Table {
    let mut table = Table::new();
    table.insert("runtime_type", value(BUILTIN_RUNTIME_TYPE));
    table.decor_mut().set_prefix(
        "\n# runc: containerd's built-in default runtime, written out by `rund install`: a runtimes\n\
         # table replaces containerd's built-in runtimes instead of adding to them.\n",
    );
    table
}

/// The configuration text printed by `rund install`: a whole version 2 file with the entries.
pub fn snippet() -> String {
    // An empty document has no version, no plugins and no conflict: this cannot fail.
    match edit(None, false) {
        Ok(edited) => edited.text,
        Err(e) => unreachable!("editing an empty configuration failed: {e}"),
    }
}

/// Adds the rund entry to `current` (the file's text, `None` if it does not exist), and runc's
/// when the file needs it, as new tables after everything in the file.
pub fn edit(current: Option<&str>, force: bool) -> Result<Edited, EditError> {
    let original = current.unwrap_or("");
    let mut doc: DocumentMut = original.parse().map_err(EditError::Parse)?;
    let mut changes = Vec::new();
    if current.is_none() {
        changes.push(Change::Created);
    }
    let (cri_plugin, added_version) = cri_plugin_name(&mut doc)?;
    if added_version && current.is_some() {
        changes.push(Change::AddedVersion);
    }
    // A table without a position is rendered after the table visited before it (the CRI
    // plugin's, in the middle of Debian's file): number the new ones after the last.
    let mut next_position = last_position(doc.as_table()) + 1;
    let mut at_the_end = |mut table: Table| {
        table.set_position(Some(next_position));
        next_position += 1;
        Item::Table(table)
    };

    let mut path = String::new();
    let mut containerd = doc.as_table_mut();
    for key in ["plugins", cri_plugin, "containerd"] {
        containerd = child_table(containerd, key, &mut path)?;
    }
    let default = match containerd.get("default_runtime_name") {
        None => BUILTIN_RUNTIME.to_string(),
        Some(item) => item
            .as_str()
            .ok_or_else(|| EditError::NotAString(format!("{path}.default_runtime_name")))?
            .to_string(),
    };
    let had_runtimes = containerd.contains_key("runtimes");
    let runtimes = child_table(containerd, "runtimes", &mut path)?;
    let defined: Vec<String> = runtimes.iter().map(|(name, _)| name.to_string()).collect();

    let wanted = rund_runtime();
    match runtimes.get_mut(HANDLER) {
        None => {
            runtimes.insert(HANDLER, at_the_end(wanted));
            changes.push(Change::AddedRund);
        }
        Some(existing) => match existing.as_table_like() {
            Some(t) if same_entries(t, &wanted) => {}
            _ if !force => return Err(EditError::Conflict(describe_existing(existing))),
            _ => {
                replace_keeping_place(existing, wanted);
                changes.push(Change::ReplacedRund);
            }
        },
    }
    if !runtimes.contains_key(BUILTIN_RUNTIME) {
        if !had_runtimes {
            runtimes.insert(BUILTIN_RUNTIME, at_the_end(builtin_runtime()));
            changes.push(Change::AddedBuiltin);
        } else if default == BUILTIN_RUNTIME {
            runtimes.insert(BUILTIN_RUNTIME, at_the_end(builtin_runtime()));
            changes.push(Change::RestoredDefault);
        }
    }
    if !runtimes.contains_key(&default) {
        return Err(EditError::MissingDefault {
            name: default,
            defined: if defined.is_empty() {
                "no runtimes".to_string()
            } else {
                format!("only {}", defined.join(", "))
            },
        });
    }
    let text = if changes.is_empty() {
        original.to_string()
    } else {
        doc.to_string()
    };
    Ok(Edited { text, changes })
}

/// `table[key]` as a [table] section, made (implicit: no header of its own) when missing; `path`
/// is extended to name it.
fn child_table<'a>(
    table: &'a mut Table,
    key: &str,
    path: &mut String,
) -> Result<&'a mut Table, EditError> {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(&toml_edit::Key::new(key).display_repr());
    table
        .entry(key)
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_mut()
        .ok_or_else(|| EditError::NotATable(path.clone()))
}

/// The highest position of any table in the document (0 for none).
fn last_position(table: &Table) -> isize {
    let mut last = table.position().unwrap_or(0);
    for (_, item) in table.iter() {
        let nested = match item {
            Item::Table(t) => last_position(t),
            Item::ArrayOfTables(a) => a.iter().map(last_position).max().unwrap_or(0),
            _ => 0,
        };
        last = last.max(nested);
    }
    last
}

/// The CRI plugin that holds runtimes in this file's version, and whether `version = 2` was
/// added (a file without `version` and without plugin tables gets it).
fn cri_plugin_name(doc: &mut DocumentMut) -> Result<(&'static str, bool), EditError> {
    let Some(version) = doc.get("version") else {
        if doc.contains_key("plugins") {
            return Err(EditError::Version1(
                "no `version` key, which containerd reads as 1",
            ));
        }
        doc.insert("version", value(2));
        return Ok((CRI_PLUGIN_V2, true));
    };
    match version.as_integer() {
        Some(1) => Err(EditError::Version1("`version = 1`")),
        Some(2) => Ok((CRI_PLUGIN_V2, false)),
        Some(3) => Ok((CRI_RUNTIME_PLUGIN_V3, false)),
        _ => Err(EditError::UnsupportedVersion(
            version.to_string().trim().to_string(),
        )),
    }
}

fn describe_existing(existing: &Item) -> String {
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

/// What containerd would lose or lack after an edit, `before` and `after` as it reads the file:
/// rund must be there as rund's shim, every other runtime as it was, and the default among them.
pub fn problems(before: &CriRuntimes, after: &CriRuntimes) -> Vec<String> {
    let mut problems = Vec::new();
    match after.runtime_type(HANDLER) {
        Some(RUNTIME_TYPE) => {}
        None => problems.push(format!("not have runtime {HANDLER}")),
        Some(other) => problems.push(format!(
            "have runtime {} instead of {}",
            describe_runtime(HANDLER, other),
            describe_runtime(HANDLER, RUNTIME_TYPE)
        )),
    }
    // rund itself is the runtime the edit sets (replaced with --force).
    for (name, runtime_type) in before.runtimes.iter().filter(|(n, _)| *n != HANDLER) {
        match after.runtime_type(name) {
            Some(t) if t == runtime_type => {}
            None => problems.push(format!(
                "lose runtime {}",
                describe_runtime(name, runtime_type)
            )),
            Some(t) => problems.push(format!(
                "have runtime {} instead of {}",
                describe_runtime(name, t),
                describe_runtime(name, runtime_type)
            )),
        }
    }
    if !after.has_default() {
        problems.push(format!(
            "not have its default runtime {} (the CRI plugin would not load)",
            after.default
        ));
    }
    problems
}

/// An edit of one file, worked out and checked before anything is written so that
/// `rund install` can refuse before it installs anything.
#[derive(Debug)]
pub struct PlannedEdit {
    /// The file written: a symlinked configuration is edited where the link points.
    pub path: PathBuf,
    /// What the edit changes; empty when the file has everything already.
    pub changes: Vec<Change>,
    /// The CRI runtimes containerd will have with the file as edited.
    pub after: CriRuntimes,
    /// How `after` was found.
    pub reader: Reader,
    text: String,
    mode: u32,
}

impl PlannedEdit {
    pub fn plan(
        path: &Path,
        force: bool,
        reader: Reader,
    ) -> Result<PlannedEdit, ContainerdConfigError> {
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
        let edited =
            edit(current.as_deref(), force).map_err(|source| ContainerdConfigError::Edit {
                path: path.to_owned(),
                source,
            })?;
        let before =
            reader
                .read_file(&target)
                .map_err(|source| ContainerdConfigError::ReadCurrent {
                    path: path.to_owned(),
                    source: Box::new(source),
                })?;
        let after = if edited.changes.is_empty() {
            before.clone()
        } else {
            reader.read_text(&edited.text, &target).map_err(|source| {
                ContainerdConfigError::ReadEdited {
                    path: path.to_owned(),
                    source: Box::new(source),
                }
            })?
        };
        let problems = problems(&before, &after);
        if !problems.is_empty() {
            return Err(ContainerdConfigError::WouldBreak {
                path: path.to_owned(),
                problems: problems.join("; "),
                reader,
            });
        }
        Ok(PlannedEdit {
            path: target,
            changes: edited.changes,
            after,
            reader,
            text: edited.text,
            mode,
        })
    }

    /// Writes the file (atomically, keeping its mode) unless nothing changes.
    pub fn apply(&self) -> Result<(), ContainerdConfigError> {
        if !self.changes.is_empty() {
            atomic_file::install_bytes(&self.path, self.text.as_bytes(), self.mode)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::containerd_effective;
    use crate::admin::fixtures::{containerd_or_skip, DEBIAN_STOCK};

    /// The runtimes containerd would have with `text`, by its rules.
    fn read(text: &str) -> CriRuntimes {
        containerd_effective::from_config(text).unwrap()
    }

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

    /// runc and rund, runc the default: what a node has after the install.
    fn both() -> CriRuntimes {
        let mut want = CriRuntimes::builtin();
        want.runtimes
            .insert("rund".to_string(), "io.containerd.rund.v2".to_string());
        want
    }

    /// A second edit of an edited text changes nothing, byte for byte.
    fn assert_idempotent(text: &str) {
        let again = edit(Some(text), false).unwrap();
        assert_eq!(again.changes, []);
        assert_eq!(again.text, text);
    }

    const RUNTIMES: &str = "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes";

    #[test]
    fn a_missing_file_gets_version_2_rund_and_runc() {
        let edited = edit(None, false).unwrap();
        assert_eq!(
            edited.changes,
            [Change::Created, Change::AddedRund, Change::AddedBuiltin]
        );
        assert_eq!(
            edited.text,
            format!(
                "version = 2\n\
                 \n\
                 # rund: every pod in its own microVM (written by `rund install`).\n\
                 [{RUNTIMES}.rund]\n\
                 runtime_type = \"io.containerd.rund.v2\"\n\
                 pod_annotations = [\"io.rund.*\"]\n\
                 privileged_without_host_devices = true\n\
                 \n\
                 # runc: containerd's built-in default runtime, written out by `rund install`: a runtimes\n\
                 # table replaces containerd's built-in runtimes instead of adding to them.\n\
                 [{RUNTIMES}.runc]\n\
                 runtime_type = \"io.containerd.runc.v2\"\n"
            )
        );
        assert_rund_entry(&edited.text, CRI_PLUGIN_V2);
        assert_eq!(read(&edited.text), both());
        assert_eq!(snippet(), edited.text);
        assert_idempotent(&edited.text);

        let empty = edit(Some(""), false).unwrap();
        assert_eq!(
            empty.changes,
            [
                Change::AddedVersion,
                Change::AddedRund,
                Change::AddedBuiltin
            ]
        );
        assert_eq!(empty.text, edited.text);
    }

    #[test]
    fn debians_stock_file_keeps_runc_and_gets_the_tables_at_its_end() {
        // The stock file relies on the built-in runc: a table with only rund would lose it.
        assert_eq!(read(DEBIAN_STOCK), CriRuntimes::builtin());
        let edited = edit(Some(DEBIAN_STOCK), false).unwrap();
        assert_eq!(edited.changes, [Change::AddedRund, Change::AddedBuiltin]);
        assert_eq!(read(&edited.text), both());
        assert_rund_entry(&edited.text, CRI_PLUGIN_V2);
        // Everything the file had comes first, unchanged; then rund's table, then runc's.
        let added = edited
            .text
            .strip_prefix(DEBIAN_STOCK)
            .unwrap_or_else(|| panic!("not appended:\n{}", edited.text));
        let rund = added.find(".runtimes.rund]").unwrap();
        let runc = added.find(".runtimes.runc]").unwrap();
        assert!(rund < runc, "{added}");
        assert!(added.starts_with("\n# rund: "), "{added}");
        assert_idempotent(&edited.text);
    }

    #[test]
    fn a_file_naming_runc_gets_rund_only_and_keeps_the_users_content() {
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
        let edited = edit(Some(user), false).unwrap();
        assert_eq!(edited.changes, [Change::AddedRund]);
        assert!(edited.text.starts_with(user), "{}", edited.text);
        assert_eq!(edited.text.matches("runtimes.runc]").count(), 1);
        assert_rund_entry(&edited.text, CRI_PLUGIN_V2);
        let doc: toml::Table = toml::from_str(&edited.text).unwrap();
        let cri = &doc["plugins"][CRI_PLUGIN_V2];
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(true)
        );
        assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/opt/cni/bin"));
        assert_eq!(read(&edited.text), both());
        assert_idempotent(&edited.text);
    }

    #[test]
    fn a_file_naming_both_is_unchanged_byte_for_byte() {
        let user = format!(
            "version = 2\n\
             [{RUNTIMES}.runc]\n  runtime_type = 'io.containerd.runc.v2'\n\
             [{RUNTIMES}.rund]\n\
             privileged_without_host_devices = true # why not\n\
             runtime_type = 'io.containerd.rund.v2'\npod_annotations = [ \"io.rund.*\" ]\n"
        );
        let edited = edit(Some(&user), false).unwrap();
        assert_eq!(edited.changes, []);
        assert_eq!(edited.text, user);
    }

    #[test]
    fn a_file_naming_only_rund_gets_runc_back() {
        // What `rund install` wrote before: runc lost, the CRI plugin not loading.
        let broken = format!(
            "{DEBIAN_STOCK}\n[{RUNTIMES}.rund]\nruntime_type = \"io.containerd.rund.v2\"\n\
             pod_annotations = [\"io.rund.*\"]\nprivileged_without_host_devices = true\n"
        );
        assert!(!read(&broken).has_default(), "{broken}");
        let edited = edit(Some(&broken), false).unwrap();
        assert_eq!(edited.changes, [Change::RestoredDefault]);
        assert!(edited.text.starts_with(broken.as_str()), "{}", edited.text);
        assert_eq!(read(&edited.text), both());
        assert!(
            Change::RestoredDefault
                .to_string()
                .contains("CRI plugin did not load"),
            "{}",
            Change::RestoredDefault
        );
        assert_idempotent(&edited.text);
    }

    #[test]
    fn a_default_naming_nothing_defined_is_refused() {
        let containerd = "[plugins.\"io.containerd.grpc.v1.cri\".containerd]";
        for (user, defined) in [
            (
                format!("version = 2\n{containerd}\ndefault_runtime_name = \"kata\"\n"),
                "no runtimes",
            ),
            (
                format!(
                    "version = 2\n{containerd}\ndefault_runtime_name = \"kata\"\n\
                     [{RUNTIMES}.crun]\nruntime_type = \"io.containerd.runc.v2\"\n"
                ),
                "only crun",
            ),
        ] {
            let e = edit(Some(&user), false).unwrap_err();
            assert!(matches!(e, EditError::MissingDefault { .. }), "{e}");
            let message = e.to_string();
            assert!(
                message.contains("\"kata\"")
                    && message.contains(defined)
                    && message.contains("does not load"),
                "{message}"
            );
        }
        let e = edit(
            Some(&format!(
                "version = 2\n{containerd}\ndefault_runtime_name = 1\n"
            )),
            false,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("default_runtime_name` is not a string"),
            "{e}"
        );
    }

    #[test]
    fn a_default_the_file_defines_is_kept_without_runc() {
        // The node has no runc: none is added.
        let user = format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             default_runtime_name = \"crun\"\n\
             [{RUNTIMES}.crun]\nruntime_type = \"io.containerd.runc.v2\"\n"
        );
        let edited = edit(Some(&user), false).unwrap();
        assert_eq!(edited.changes, [Change::AddedRund]);
        let after = read(&edited.text);
        assert_eq!(after.default, "crun");
        assert_eq!(after.runtimes.keys().collect::<Vec<_>>(), ["crun", "rund"]);
        // A default of rund, defined by the edit itself, is fine; runc is kept.
        let user = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                    default_runtime_name = \"rund\"\n";
        let edited = edit(Some(user), false).unwrap();
        assert_eq!(edited.changes, [Change::AddedRund, Change::AddedBuiltin]);
        assert!(read(&edited.text).has_default());
    }

    #[test]
    fn version_3_uses_the_cri_runtime_plugin_and_keeps_runc() {
        let edited = edit(Some("version = 3\n"), false).unwrap();
        assert_eq!(edited.changes, [Change::AddedRund, Change::AddedBuiltin]);
        assert_rund_entry(&edited.text, CRI_RUNTIME_PLUGIN_V3);
        assert_eq!(read(&edited.text), both());
        assert!(!edited.text.contains(CRI_PLUGIN_V2), "{}", edited.text);
        assert_idempotent(&edited.text);

        let user = "version = 3\n\
                    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n\
                    runtime_type = 'io.containerd.runc.v2'\n\
                    [plugins.'io.containerd.cri.v1.images']\nsnapshotter = 'overlayfs'\n";
        let edited = edit(Some(user), false).unwrap();
        assert_eq!(edited.changes, [Change::AddedRund]);
        assert!(edited.text.starts_with(user), "{}", edited.text);
        assert_eq!(read(&edited.text), both());
    }

    #[test]
    fn dotted_keys_in_the_cri_table_are_kept() {
        let user = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n\
                    containerd.snapshotter = \"overlayfs\"\n\
                    [plugins.\"io.containerd.internal.v1.opt\"]\npath = \"/opt\"\n";
        let edited = edit(Some(user), false).unwrap();
        assert!(edited.text.starts_with(user), "{}", edited.text);
        let doc: toml::Table = toml::from_str(&edited.text).unwrap();
        assert_eq!(
            doc["plugins"][CRI_PLUGIN_V2]["containerd"]["snapshotter"].as_str(),
            Some("overlayfs")
        );
        assert_eq!(read(&edited.text), both());
        assert_idempotent(&edited.text);
    }

    #[test]
    fn version_1_and_not_toml_are_refused() {
        for user in [
            "version = 1\n",
            "[plugins.cri.containerd]\nsnapshotter = \"overlayfs\"\n",
        ] {
            let e = edit(Some(user), true).unwrap_err();
            assert!(matches!(e, EditError::Version1(_)), "{user}: {e}");
            assert!(e.to_string().contains("version 2"), "{e}");
        }
        // Without plugin tables a missing version is harmless to add.
        let edited = edit(Some("root = \"/srv/containerd\"\n"), false).unwrap();
        assert!(
            edited
                .text
                .starts_with("root = \"/srv/containerd\"\nversion = 2\n"),
            "{}",
            edited.text
        );
        assert_eq!(edited.changes[0], Change::AddedVersion);
        let e = edit(Some("version = \"2\"\n"), false).unwrap_err();
        assert!(matches!(e, EditError::UnsupportedVersion(_)), "{e}");
        let e = edit(Some("version = 2\nplugins = 3\n"), false).unwrap_err();
        assert!(e.to_string().contains("`plugins`"), "{e}");
        for not_toml in ["version = 2\n[x\n", "<configuration/>\n", "version = = 2\n"] {
            let e = edit(Some(not_toml), false).unwrap_err();
            assert!(matches!(e, EditError::Parse(_)), "{e}");
            assert_eq!(e.to_string(), "not valid TOML");
        }
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

        let edited = edit(Some(user), true).unwrap();
        assert_eq!(
            edited.changes,
            [Change::ReplacedRund, Change::RestoredDefault]
        );
        let text = &edited.text;
        assert_rund_entry(text, CRI_PLUGIN_V2);
        assert!(
            !text.contains("kata.v2") && !text.contains("ConfigPath"),
            "{text}"
        );
        // Same place, same comment, the rest untouched; runc's new table at the end.
        let comment = text.find("# kata, borrowed name").unwrap();
        let header = text.find("runtimes.rund]").unwrap();
        let metrics = text.find("[metrics]").unwrap();
        let runc = text.find("runtimes.runc]").unwrap();
        assert!(
            comment < header && header < metrics && metrics < runc,
            "{text}"
        );
        assert_idempotent(text);
    }

    #[test]
    fn an_extra_key_in_the_entry_is_a_difference() {
        let user = format!(
            "version = 2\n[{RUNTIMES}.rund]\nruntime_type = \"io.containerd.rund.v2\"\n\
             pod_annotations = [\"io.rund.*\"]\nprivileged_without_host_devices = true\n\
             sandbox_mode = \"podsandbox\"\n[{RUNTIMES}.runc]\nruntime_type = \"io.containerd.runc.v2\"\n"
        );
        let e = edit(Some(&user), false).unwrap_err();
        assert!(matches!(e, EditError::Conflict(_)), "{e}");
        assert!(e.to_string().contains("with other settings"), "{e}");
    }

    #[test]
    fn problems_name_what_containerd_would_lose() {
        let runtimes = |pairs: &[(&str, &str)], default: &str| CriRuntimes {
            runtimes: pairs
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
            default: default.to_string(),
        };
        assert_eq!(
            problems(&CriRuntimes::builtin(), &both()),
            Vec::<String>::new()
        );
        // The bug: a table with rund only.
        assert_eq!(
            problems(
                &CriRuntimes::builtin(),
                &runtimes(&[("rund", "io.containerd.rund.v2")], "runc")
            ),
            [
                "lose runtime runc (io.containerd.runc.v2)",
                "not have its default runtime runc (the CRI plugin would not load)"
            ]
        );
        assert_eq!(
            problems(&CriRuntimes::builtin(), &CriRuntimes::builtin()),
            ["not have runtime rund"]
        );
        assert_eq!(
            problems(
                &runtimes(&[("kata", "io.containerd.kata.v2")], "kata"),
                &runtimes(&[("kata", ""), ("rund", "io.containerd.kata.v2")], "kata")
            ),
            [
                "have runtime rund (io.containerd.kata.v2) instead of rund (io.containerd.rund.v2)",
                "have runtime kata (no runtime_type) instead of kata (io.containerd.kata.v2)"
            ]
        );
        // A rund replaced with --force is not a loss.
        assert_eq!(
            problems(
                &runtimes(&[("rund", "io.containerd.kata.v2")], "rund"),
                &runtimes(&[("rund", "io.containerd.rund.v2")], "rund")
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn planned_edit_writes_atomically_and_keeps_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("containerd/config.toml");
        let plan = PlannedEdit::plan(&path, false, Reader::Rules).unwrap();
        assert_eq!(plan.changes[0], Change::Created);
        assert_eq!(plan.after, both());
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
        let plan = PlannedEdit::plan(&link, false, Reader::Rules).unwrap();
        assert_eq!(plan.changes, [Change::AddedRund, Change::AddedBuiltin]);
        plan.apply().unwrap();
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
        assert_eq!(
            PlannedEdit::plan(&link, false, Reader::Rules)
                .unwrap()
                .changes,
            []
        );
    }

    #[test]
    fn planned_edits_that_are_refused_leave_the_file_as_it_was() {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("not-toml.toml", "version = 2\n[plugins\n"),
            (
                "broken.toml",
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                 default_runtime_name = \"kata\"\n",
            ),
            ("v1.toml", "version = 1\n"),
        ] {
            let path = d.path().join(name);
            fs::write(&path, text).unwrap();
            let e = PlannedEdit::plan(&path, true, Reader::Rules).unwrap_err();
            let message = crate::admin::error_chain(&e);
            assert!(
                message.starts_with(&path.display().to_string()),
                "{message}"
            );
            assert_eq!(fs::read_to_string(&path).unwrap(), text);
        }
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 3);
    }

    #[test]
    fn planned_edit_of_debians_stock_file_read_by_the_real_containerd() {
        let Some(bin) = containerd_or_skip() else {
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.toml");
        fs::write(&path, DEBIAN_STOCK).unwrap();
        let containerd = Reader::Containerd(bin);
        let plan = PlannedEdit::plan(&path, false, containerd.clone()).unwrap();
        assert_eq!(plan.reader, containerd);
        assert_eq!(plan.after, both());
        assert_eq!(plan.changes, [Change::AddedRund, Change::AddedBuiltin]);
        // Only the file itself: the temporary copy containerd read is gone.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        plan.apply().unwrap();
        let plan = PlannedEdit::plan(&path, false, containerd).unwrap();
        assert_eq!(plan.changes, []);
        assert_eq!(plan.after, both());
    }

    #[test]
    fn an_import_that_replaces_the_cri_plugin_is_caught_by_the_real_containerd() {
        let Some(bin) = containerd_or_skip() else {
            return;
        };
        // containerd replaces a whole plugin section with an imported file's: rund's table in the
        // main file would never be seen. Only containerd's own reading knows.
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.toml");
        let user = "version = 2\nimports = [\"cri.toml\"]\n";
        fs::write(&path, user).unwrap();
        fs::write(
            d.path().join("cri.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"native\"\n",
        )
        .unwrap();
        let e = PlannedEdit::plan(&path, false, Reader::Containerd(bin)).unwrap_err();
        let message = e.to_string();
        assert!(
            matches!(e, ContainerdConfigError::WouldBreak { .. })
                && message.contains("not have runtime rund")
                && message.contains("config dump"),
            "{message}"
        );
        // By the rules alone (imports not followed) the same edit looks fine.
        assert!(PlannedEdit::plan(&path, false, Reader::Rules).is_ok());
        assert_eq!(fs::read_to_string(&path).unwrap(), user);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
    }
}
