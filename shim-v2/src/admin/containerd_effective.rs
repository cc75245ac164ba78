//! How containerd will read a configuration file: the CRI runtimes it will have and the default
//! one. Two of containerd's rules make a small edit dangerous: a `runtimes` table in the file
//! replaces containerd's built-in map (which holds only `runc`) instead of adding to it, and the
//! CRI plugin refuses to load (every pod on the node fails) when `default_runtime_name` is not
//! among the runtimes.
//!
//! The authority is containerd itself: `containerd --config FILE config dump` prints the merged
//! configuration it would run with (its defaults, the file's imports, a version 1 file converted)
//! without a daemon and without privileges. Without a containerd binary, [`Reader::Rules`] applies
//! the two rules above to the file's own TOML (imports are not followed).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// containerd's built-in CRI runtime, also its default `default_runtime_name`.
pub const BUILTIN_RUNTIME: &str = "runc";
/// The built-in runtime's `runtime_type`.
pub const BUILTIN_RUNTIME_TYPE: &str = "io.containerd.runc.v2";

/// The plugin holding the CRI runtimes in config version 2 (containerd 1.x).
pub const CRI_PLUGIN_V2: &str = "io.containerd.grpc.v1.cri";
/// The plugin holding them in config version 3 (containerd 2.x).
pub const CRI_RUNTIME_PLUGIN_V3: &str = "io.containerd.cri.v1.runtime";

/// The binary asked, on PATH.
const CONTAINERD: &str = "containerd";

/// Temporary copies for containerd to read; no `.toml` suffix, so that an `imports` glob such as
/// `*.toml` in the same directory does not pick one up.
const TEMP_PREFIX: &str = ".rund-check-";

#[derive(Debug, thiserror::Error)]
pub enum EffectiveError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing a temporary copy in {dir} for containerd to read")]
    TempFile {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running `{containerd} config dump`")]
    Run {
        containerd: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("containerd cannot read it (`{containerd} config dump` failed, {status}): {stderr}")]
    DumpFailed {
        containerd: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("the output of `config dump` is not TOML")]
    DumpNotToml(#[source] toml::de::Error),
    #[error("not valid TOML")]
    NotToml(#[source] toml::de::Error),
    #[error("this is a version 1 containerd configuration ({0}): without a containerd binary to read it, rund reads versions 2 and 3 only")]
    Version1(&'static str),
    #[error("`version = {0}`: containerd knows config versions 1, 2 and 3")]
    UnsupportedVersion(String),
    #[error("`{key}` is not {expected}")]
    Shape { key: String, expected: &'static str },
    #[error("the file is config version {file}, which this containerd does not read (it reads up to version {containerd}, and would ignore the file's CRI runtimes): containerd 2 reads version 3")]
    NewerThanContainerd { file: i64, containerd: i64 },
}

/// The CRI runtimes containerd will have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriRuntimes {
    /// Each runtime's `runtime_type` by handler name; empty when its entry has none.
    pub runtimes: BTreeMap<String, String>,
    /// `default_runtime_name`: the runtime of a pod that names none.
    pub default: String,
}

impl CriRuntimes {
    /// containerd's own, in force when a file sets none: `runc`, the default.
    pub fn builtin() -> CriRuntimes {
        CriRuntimes {
            runtimes: BTreeMap::from([(
                BUILTIN_RUNTIME.to_string(),
                BUILTIN_RUNTIME_TYPE.to_string(),
            )]),
            default: BUILTIN_RUNTIME.to_string(),
        }
    }

    pub fn runtime_type(&self, name: &str) -> Option<&str> {
        self.runtimes.get(name).map(String::as_str)
    }

    /// Whether the CRI plugin loads: it refuses a default runtime it does not have.
    pub fn has_default(&self) -> bool {
        self.runtimes.contains_key(&self.default)
    }

    /// `runc (io.containerd.runc.v2), rund (io.containerd.rund.v2)`, or `none`.
    pub fn list(&self) -> String {
        if self.runtimes.is_empty() {
            return "none".to_string();
        }
        self.runtimes
            .iter()
            .map(|(name, runtime_type)| describe_runtime(name, runtime_type))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for CriRuntimes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CRI runtimes {}; default {}", self.list(), self.default)
    }
}

/// `runc (io.containerd.runc.v2)`, or `runc (no runtime_type)`.
pub fn describe_runtime(name: &str, runtime_type: &str) -> String {
    if runtime_type.is_empty() {
        format!("{name} (no runtime_type)")
    } else {
        format!("{name} ({runtime_type})")
    }
}

/// Who reads the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reader {
    /// This containerd binary, with `config dump`.
    Containerd(PathBuf),
    /// containerd's rules, applied by rund to the file's TOML.
    Rules,
}

impl fmt::Display for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reader::Containerd(bin) => write!(f, "read with `{} config dump`", bin.display()),
            Reader::Rules => write!(
                f,
                "read by containerd's rules as rund knows them: no containerd on PATH to ask"
            ),
        }
    }
}

impl Reader {
    /// containerd from PATH when there is one, else the rules.
    pub fn detect() -> Reader {
        find_on_path(CONTAINERD).map_or(Reader::Rules, Reader::Containerd)
    }

    /// How containerd reads the file at `path`. A missing file is read as an empty one, which is
    /// what containerd runs with when it has none: its defaults.
    pub fn read_file(&self, path: &Path) -> Result<CriRuntimes, EffectiveError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.read_text("", path),
            Err(source) => {
                return Err(EffectiveError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        match self {
            Reader::Containerd(bin) => dumped(bin, path, &text),
            Reader::Rules => from_config(&text),
        }
    }

    /// How containerd would read `text` if it were the file at `path`. containerd reads a
    /// temporary copy beside `path` (relative imports then resolve as they will), removed after.
    pub fn read_text(&self, text: &str, path: &Path) -> Result<CriRuntimes, EffectiveError> {
        let Reader::Containerd(bin) = self else {
            return from_config(text);
        };
        let dir = path
            .parent()
            .filter(|d| d.is_dir())
            .map_or_else(std::env::temp_dir, Path::to_path_buf);
        let temp_error = |source| EffectiveError::TempFile {
            dir: dir.clone(),
            source,
        };
        let mut copy = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&dir)
            .map_err(temp_error)?;
        copy.write_all(text.as_bytes())
            .and_then(|()| copy.flush())
            .map_err(temp_error)?;
        let result = dumped(bin, copy.path(), text);
        copy.close().map_err(temp_error)?;
        result
    }
}

/// The first executable `name` in PATH's directories.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `containerd --config CONFIG config dump`, read; `text` is CONFIG's contents.
fn dumped(containerd: &Path, config: &Path, text: &str) -> Result<CriRuntimes, EffectiveError> {
    let out = Command::new(containerd)
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .map_err(|source| EffectiveError::Run {
            containerd: containerd.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(EffectiveError::DumpFailed {
            containerd: containerd.to_owned(),
            status: out.status.to_string(),
            stderr: failure_text(&String::from_utf8_lossy(&out.stderr)),
        });
    }
    let (version, runtimes) = parse_dump(&String::from_utf8_lossy(&out.stdout))?;
    // containerd 1.x reads a version 3 file without complaint but as if it had no plugin
    // settings: the dump alone would hide why rund is missing.
    match declared_version(text) {
        Some(file) if file > version => Err(EffectiveError::NewerThanContainerd {
            file,
            containerd: version,
        }),
        _ => Ok(runtimes),
    }
}

/// containerd's error without its log lines (`time=... level=warning msg=...`), which warn about
/// things beside the point such as a deprecated version 1.
fn failure_text(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("time="))
        .collect();
    if errors.is_empty() {
        lines.join("; ")
    } else {
        errors.join("; ")
    }
}

/// The `version` a file declares, if it parses and has one.
fn declared_version(text: &str) -> Option<i64> {
    toml::from_str::<toml::Table>(text)
        .ok()?
        .get("version")?
        .as_integer()
}

/// The CRI runtimes in `containerd config dump` output (config version 2 or 3).
pub fn from_dump(dump: &str) -> Result<CriRuntimes, EffectiveError> {
    parse_dump(dump).map(|(_, runtimes)| runtimes)
}

fn parse_dump(dump: &str) -> Result<(i64, CriRuntimes), EffectiveError> {
    let doc: toml::Table = toml::from_str(dump).map_err(EffectiveError::DumpNotToml)?;
    let (version, plugin) = match doc.get("version").and_then(toml::Value::as_integer) {
        Some(2) => (2, CRI_PLUGIN_V2),
        Some(3) => (3, CRI_RUNTIME_PLUGIN_V3),
        _ => {
            return Err(EffectiveError::Shape {
                key: "version".to_string(),
                expected: "2 or 3 in containerd's dump",
            })
        }
    };
    Ok((version, cri_runtimes(&doc, plugin)?))
}

/// The CRI runtimes containerd will have with the configuration `text`, by containerd's rules.
pub fn from_config(text: &str) -> Result<CriRuntimes, EffectiveError> {
    let doc: toml::Table = toml::from_str(text).map_err(EffectiveError::NotToml)?;
    let plugin = match doc.get("version") {
        None if doc.contains_key("plugins") => {
            return Err(EffectiveError::Version1(
                "no `version` key, which containerd reads as 1",
            ))
        }
        None => return Ok(CriRuntimes::builtin()),
        Some(v) => match v.as_integer() {
            Some(1) => return Err(EffectiveError::Version1("`version = 1`")),
            Some(2) => CRI_PLUGIN_V2,
            Some(3) => CRI_RUNTIME_PLUGIN_V3,
            _ => return Err(EffectiveError::UnsupportedVersion(v.to_string())),
        },
    };
    cri_runtimes(&doc, plugin)
}

/// `plugins.<plugin>.containerd`'s runtimes and default: a `runtimes` table replaces the
/// built-in map, and each entry has only its own keys (none of the built-in runc's).
fn cri_runtimes(doc: &toml::Table, plugin: &str) -> Result<CriRuntimes, EffectiveError> {
    let mut key = String::new();
    let mut table = Some(doc);
    for part in ["plugins", plugin, "containerd"] {
        table = match table {
            Some(t) => sub_table(t, part, &mut key)?,
            None => None,
        };
    }
    let Some(containerd) = table else {
        return Ok(CriRuntimes::builtin());
    };
    let default = match containerd.get("default_runtime_name") {
        None => BUILTIN_RUNTIME.to_string(),
        Some(v) => v
            .as_str()
            .ok_or_else(|| shape(&key, "default_runtime_name", "a string"))?
            .to_string(),
    };
    let Some(listed) = sub_table(containerd, "runtimes", &mut key)? else {
        return Ok(CriRuntimes {
            default,
            ..CriRuntimes::builtin()
        });
    };
    let mut runtimes = BTreeMap::new();
    for (name, entry) in listed {
        let entry = entry
            .as_table()
            .ok_or_else(|| shape(&key, name, "a table"))?;
        let runtime_type = match entry.get("runtime_type") {
            None => "",
            Some(v) => v.as_str().ok_or_else(|| {
                shape(
                    &format!("{key}.{}", toml_key(name)),
                    "runtime_type",
                    "a string",
                )
            })?,
        };
        runtimes.insert(name.clone(), runtime_type.to_string());
    }
    Ok(CriRuntimes { runtimes, default })
}

/// `table[name]` as a table, `key` extended to name it.
fn sub_table<'a>(
    table: &'a toml::Table,
    name: &str,
    key: &mut String,
) -> Result<Option<&'a toml::Table>, EffectiveError> {
    let parent = key.clone();
    if !key.is_empty() {
        key.push('.');
    }
    key.push_str(&toml_key(name));
    match table.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_table()
            .map(Some)
            .ok_or_else(|| shape(&parent, name, "a table")),
    }
}

fn shape(parent: &str, name: &str, expected: &'static str) -> EffectiveError {
    let name = toml_key(name);
    EffectiveError::Shape {
        key: if parent.is_empty() {
            name
        } else {
            format!("{parent}.{name}")
        },
        expected,
    }
}

/// A key as TOML writes it: bare when it can be, else quoted.
fn toml_key(name: &str) -> String {
    toml_edit::Key::new(name).display_repr().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::fixtures::{containerd_or_skip, DEBIAN_STOCK};

    /// The stock file plus a rund table and nothing else: what `rund install` wrote before it
    /// knew that a runtimes table replaces the built-in one.
    const STOCK_WITH_ONLY_RUND: &str =
        include_str!("../../testdata/debian-stock-with-only-rund.toml");

    /// `containerd --config stock.toml config dump` of [`DEBIAN_STOCK`], containerd 1.6.20 on
    /// Debian 12, verbatim.
    const STOCK_DUMP: &str = include_str!("../../testdata/debian-stock.dump.toml");

    /// `containerd --config rundonly.toml config dump` of [`STOCK_WITH_ONLY_RUND`], containerd
    /// 1.6.20 on Debian 12, verbatim: runc is gone.
    const STOCK_WITH_ONLY_RUND_DUMP: &str =
        include_str!("../../testdata/debian-stock-with-only-rund.dump.toml");

    /// The part of a containerd 2 `config dump` (version 3) that holds the CRI runtimes, in its
    /// layout and quoting (containerd 2 writes single-quoted keys); hand-copied, no containerd 2
    /// here to capture a whole one.
    const V3_DUMP_EXCERPT: &str = "\
version = 3
root = '/var/lib/containerd'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false

    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'

      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
          sandboxer = 'podsandbox'

          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            SystemdCgroup = false

        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.rund]
          runtime_type = 'io.containerd.rund.v2'
";

    fn runtimes(pairs: &[(&str, &str)], default: &str) -> CriRuntimes {
        CriRuntimes {
            runtimes: pairs
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
            default: default.to_string(),
        }
    }

    #[test]
    fn the_real_dump_of_debians_stock_file_has_runc_only() {
        let read = from_dump(STOCK_DUMP).unwrap();
        assert_eq!(read, CriRuntimes::builtin());
        assert!(read.has_default());
        assert_eq!(
            read.to_string(),
            "CRI runtimes runc (io.containerd.runc.v2); default runc"
        );
    }

    #[test]
    fn the_real_dump_of_the_stock_file_with_only_rund_has_lost_runc() {
        let read = from_dump(STOCK_WITH_ONLY_RUND_DUMP).unwrap();
        assert_eq!(read, runtimes(&[("rund", "io.containerd.rund.v2")], "runc"));
        assert!(!read.has_default());
    }

    #[test]
    fn a_version_3_dump_is_read_at_the_cri_runtime_plugin() {
        let read = from_dump(V3_DUMP_EXCERPT).unwrap();
        assert_eq!(
            read,
            runtimes(
                &[
                    ("runc", "io.containerd.runc.v2"),
                    ("rund", "io.containerd.rund.v2")
                ],
                "runc"
            )
        );
        assert_eq!(
            read.list(),
            "runc (io.containerd.runc.v2), rund (io.containerd.rund.v2)"
        );
    }

    #[test]
    fn a_dump_that_is_not_one_is_an_error() {
        assert!(matches!(
            from_dump("[x").unwrap_err(),
            EffectiveError::DumpNotToml(_)
        ));
        let e = from_dump("root = '/var/lib/containerd'\n").unwrap_err();
        assert!(e.to_string().contains("`version`"), "{e}");
    }

    #[test]
    fn the_rules_agree_with_the_real_dumps() {
        assert_eq!(
            from_config(DEBIAN_STOCK).unwrap(),
            from_dump(STOCK_DUMP).unwrap()
        );
        assert_eq!(
            from_config(STOCK_WITH_ONLY_RUND).unwrap(),
            from_dump(STOCK_WITH_ONLY_RUND_DUMP).unwrap()
        );
    }

    #[test]
    fn by_the_rules_a_runtimes_table_replaces_the_builtin_map() {
        let v2 = |body: &str| format!("version = 2\n{body}");
        for (text, want) in [
            (String::new(), CriRuntimes::builtin()),
            ("root = '/srv'\n".to_string(), CriRuntimes::builtin()),
            (v2(""), CriRuntimes::builtin()),
            (
                v2("[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = 'native'\n"),
                CriRuntimes::builtin(),
            ),
            // An empty table empties the map.
            (
                v2("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes]\n"),
                runtimes(&[], "runc"),
            ),
            // An entry has only its own keys: runc's options alone give it no runtime_type.
            (
                v2(
                    "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
                    SystemdCgroup = true\n",
                ),
                runtimes(&[("runc", "")], "runc"),
            ),
            (
                v2("[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                    default_runtime_name = 'kata'\n"),
                runtimes(&[("runc", "io.containerd.runc.v2")], "kata"),
            ),
            (
                "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.rund]\n\
                 runtime_type = 'io.containerd.rund.v2'\n"
                    .to_string(),
                runtimes(&[("rund", "io.containerd.rund.v2")], "runc"),
            ),
            // A version 3 file's runtimes are not where version 2 keeps them.
            (
                "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund]\n"
                    .to_string(),
                CriRuntimes::builtin(),
            ),
        ] {
            assert_eq!(from_config(&text).unwrap(), want, "{text}");
        }
        assert!(!runtimes(&[], "runc").has_default());
        assert_eq!(runtimes(&[], "runc").list(), "none");
        assert_eq!(
            runtimes(&[("runc", "")], "runc").list(),
            "runc (no runtime_type)"
        );
    }

    #[test]
    fn the_rules_refuse_what_they_cannot_read() {
        for (text, want) in [
            ("version = 2\n[x\n", "not valid TOML"),
            ("version = 1\n", "version 1"),
            ("[plugins.cri]\n", "no `version`"),
            ("version = '2'\n", "`version = \"2\"`"),
            ("version = 2\nplugins = 1\n", "`plugins` is not a table"),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = 1\n",
                "`plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes` is not a table",
            ),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                 default_runtime_name = 1\n",
                "default_runtime_name` is not a string",
            ),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes]\n\
                 rund = 'x'\n",
                "runtimes.rund` is not a table",
            ),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rund]\n\
                 runtime_type = 2\n",
                "runtimes.rund.runtime_type` is not a string",
            ),
        ] {
            let e = from_config(text).unwrap_err();
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn readers_say_how_they_read() {
        assert_eq!(
            Reader::Containerd(PathBuf::from("/usr/bin/containerd")).to_string(),
            "read with `/usr/bin/containerd config dump`"
        );
        assert!(Reader::Rules.to_string().contains("no containerd on PATH"));
        assert_eq!(
            failure_text(
                "time=\"x\" level=warning msg=\"version 1 deprecated\"\n\
                 containerd: failed to load TOML: a: (1, 2): unexpected token\n"
            ),
            "containerd: failed to load TOML: a: (1, 2): unexpected token"
        );
    }

    #[test]
    fn the_rules_read_files_and_a_missing_one_as_containerds_defaults() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.toml");
        assert_eq!(
            Reader::Rules.read_file(&path).unwrap(),
            CriRuntimes::builtin()
        );
        fs::write(&path, STOCK_WITH_ONLY_RUND).unwrap();
        assert!(!Reader::Rules.read_file(&path).unwrap().has_default());
        let e = Reader::Rules.read_file(d.path()).unwrap_err();
        assert!(matches!(e, EffectiveError::Read { .. }), "{e}");
    }

    #[test]
    fn the_rules_agree_with_the_real_containerd() {
        let Some(bin) = containerd_or_skip() else {
            return;
        };
        let containerd = Reader::Containerd(bin);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.toml");
        for text in [
            "",
            DEBIAN_STOCK,
            STOCK_WITH_ONLY_RUND,
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes]\n",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
             SystemdCgroup = true\n",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             default_runtime_name = 'kata'\n",
            "version = 2\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]\n\
             runtime_type = 'io.containerd.kata.v2'\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
             runtime_type = 'io.containerd.runc.v2'\n",
        ] {
            assert_eq!(
                containerd.read_text(text, &path).unwrap(),
                from_config(text).unwrap(),
                "{text}"
            );
            fs::write(&path, text).unwrap();
            assert_eq!(
                containerd.read_file(&path).unwrap(),
                from_config(text).unwrap(),
                "{text}"
            );
        }
        // A version 1 file, which only containerd reads, converted.
        fs::write(
            &path,
            "version = 1\n[plugins.cri.containerd]\nsnapshotter = 'native'\n",
        )
        .unwrap();
        assert_eq!(containerd.read_file(&path).unwrap(), CriRuntimes::builtin());
    }

    #[test]
    fn the_real_containerd_reads_missing_and_broken_files_and_leaves_no_copy() {
        let Some(bin) = containerd_or_skip() else {
            return;
        };
        let containerd = Reader::Containerd(bin.clone());
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.toml");
        assert_eq!(containerd.read_file(&path).unwrap(), CriRuntimes::builtin());
        let e = containerd
            .read_text("version = 2\n[x\n", &path)
            .unwrap_err();
        assert!(matches!(e, EffectiveError::DumpFailed { .. }), "{e}");
        assert!(e.to_string().contains("failed to load TOML"), "{e}");
        assert!(!e.to_string().contains("level=warning"), "{e}");
        // Nothing left beside the file (no temporary copy), and no file made.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);

        // containerd 1.x reads a version 3 file as if it set nothing: said, not hidden.
        let empty = Command::new(&bin)
            .args(["--config", "/dev/null", "config", "dump"])
            .output()
            .unwrap();
        let (dump_version, _) = parse_dump(&String::from_utf8_lossy(&empty.stdout)).unwrap();
        let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.rund]\n\
                  runtime_type = 'io.containerd.rund.v2'\n";
        let read = containerd.read_text(v3, &path);
        if dump_version < 3 {
            let e = read.unwrap_err();
            assert!(
                matches!(e, EffectiveError::NewerThanContainerd { file: 3, .. }),
                "{e}"
            );
        } else {
            assert_eq!(read.unwrap(), from_config(v3).unwrap());
        }
    }
}
