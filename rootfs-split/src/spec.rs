//! containerd's rootfs mounts (`containerd.types.Mount`) turned into the list of read-only lower
//! layers rund shares with the guest. Nothing is mounted here: every mount is checked first, so a
//! bad one fails before anything exists to undo.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// One rootfs mount as containerd hands it to the shim (its `target` is unused for a rootfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    /// containerd's `type`: `overlay` or `bind`.
    pub kind: String,
    pub source: PathBuf,
    pub options: Vec<String>,
}

impl RootfsMount {
    pub fn new(kind: &str, source: impl Into<PathBuf>, options: &[&str]) -> RootfsMount {
        RootfsMount {
            kind: kind.to_string(),
            source: source.into(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }
}

impl fmt::Display for RootfsMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mount of {} [{}]",
            self.kind,
            self.source.display(),
            self.options.join(",")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountSpecError {
    #[error("no rootfs mount given: rund needs one overlay or bind mount")]
    NoMount,
    #[error(
        "{count} rootfs mounts given ({mounts}): rund takes exactly one overlay or bind mount"
    )]
    SeveralMounts { count: usize, mounts: String },
    #[error("rootfs {mount}: type {kind:?} is not supported (rund takes overlay or bind)")]
    UnsupportedType { mount: String, kind: String },
    #[error("rootfs {mount}: no lowerdir option")]
    NoLowerdir { mount: String },
    #[error("rootfs {mount}: option {option:?} is not supported: {why}")]
    UnsupportedOption {
        mount: String,
        option: String,
        why: &'static str,
    },
    #[error("rootfs {mount}: lowerdir has an empty entry")]
    EmptyLayer { mount: String },
    #[error("rootfs {mount}: layer {path:?} is not an absolute path")]
    RelativeLayer { mount: String, path: PathBuf },
    #[error("rootfs {mount}: layer {path}: {source}")]
    LayerMissing {
        mount: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("rootfs {mount}: layer {path} is not a directory")]
    LayerNotDirectory { mount: String, path: PathBuf },
}

/// Overlay options that only tune how overlayfs stores its own bookkeeping; the guest's overlay
/// makes its own choices, so these can be dropped without changing what the container sees.
const OVERLAY_IGNORED: &[&str] = &["index=", "xino=", "nfs_export=", "uuid="];
const OVERLAY_IGNORED_FLAGS: &[&str] = &["userxattr", "volatile", "ro", "rw"];

/// Bind options whose host-side meaning does not reach the guest (propagation, nosuid/nodev:
/// the guest runs the files, not the host) or that rund always applies (`ro`: lowers are read-only;
/// `rw`: the writes go to the guest's ext4 layer instead).
const BIND_IGNORED_FLAGS: &[&str] = &[
    "bind", "rbind", "ro", "rw", "nosuid", "nodev", "private", "rprivate", "slave", "rslave",
    "shared", "rshared",
];

/// The lower layers of a container's rootfs, top first (overlay's `lowerdir` order), each an
/// existing absolute directory.
pub fn lower_layers(mounts: &[RootfsMount]) -> Result<Vec<PathBuf>, MountSpecError> {
    let mount = match mounts {
        [] => return Err(MountSpecError::NoMount),
        [one] => one,
        several => {
            return Err(MountSpecError::SeveralMounts {
                count: several.len(),
                mounts: several
                    .iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            })
        }
    };
    let layers = match mount.kind.as_str() {
        "overlay" => overlay_layers(mount)?,
        "bind" => bind_layer(mount)?,
        other => {
            return Err(MountSpecError::UnsupportedType {
                mount: mount.to_string(),
                kind: other.to_string(),
            })
        }
    };
    for path in &layers {
        check_layer_dir(mount, path)?;
    }
    Ok(layers)
}

fn unsupported(mount: &RootfsMount, option: &str, why: &'static str) -> MountSpecError {
    MountSpecError::UnsupportedOption {
        mount: mount.to_string(),
        option: option.to_string(),
        why,
    }
}

fn overlay_layers(mount: &RootfsMount) -> Result<Vec<PathBuf>, MountSpecError> {
    let mut lowerdir: Option<Vec<PathBuf>> = None;
    let mut appended: Vec<PathBuf> = Vec::new();
    for option in &mount.options {
        if let Some(list) = option.strip_prefix("lowerdir=") {
            if lowerdir.is_some() {
                return Err(unsupported(mount, option, "lowerdir is given twice"));
            }
            lowerdir = Some(split_lowerdir(list).map(PathBuf::from).collect());
        } else if let Some(one) = option.strip_prefix("lowerdir+=") {
            appended.push(PathBuf::from(one));
        } else if option.starts_with("upperdir=") || option.starts_with("workdir=") {
            // containerd's upper and work directories stay unused: the container's writes go to
            // the sandbox's ext4 device inside the guest.
        } else if OVERLAY_IGNORED.iter().any(|p| option.starts_with(p))
            || OVERLAY_IGNORED_FLAGS.contains(&option.as_str())
        {
        } else {
            return Err(unsupported(
                mount,
                option,
                "it changes what the layers contain or how they merge, and the guest's overlay does not apply it",
            ));
        }
    }
    let layers = match (lowerdir, appended.is_empty()) {
        (Some(_), false) => {
            return Err(unsupported(
                mount,
                "lowerdir+=",
                "overlayfs refuses lowerdir= and lowerdir+= together",
            ))
        }
        (Some(layers), true) => layers,
        (None, false) => appended,
        (None, true) => {
            return Err(MountSpecError::NoLowerdir {
                mount: mount.to_string(),
            })
        }
    };
    if layers.iter().any(|l| l.as_os_str().is_empty()) {
        return Err(MountSpecError::EmptyLayer {
            mount: mount.to_string(),
        });
    }
    Ok(layers)
}

/// Splits overlayfs's `lowerdir` at the `:` not escaped as `\:` (overlayfs's own escape), and
/// unescapes `\:` and `\\`.
fn split_lowerdir(list: &str) -> impl Iterator<Item = String> + '_ {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ':' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts.into_iter()
}

fn bind_layer(mount: &RootfsMount) -> Result<Vec<PathBuf>, MountSpecError> {
    if let Some(option) = mount
        .options
        .iter()
        .find(|o| !BIND_IGNORED_FLAGS.contains(&o.as_str()))
    {
        return Err(unsupported(
            mount,
            option,
            "rund shares a bind rootfs read-only as one layer and knows no other bind option",
        ));
    }
    Ok(vec![mount.source.clone()])
}

fn check_layer_dir(mount: &RootfsMount, path: &Path) -> Result<(), MountSpecError> {
    if !path.is_absolute() {
        return Err(MountSpecError::RelativeLayer {
            mount: mount.to_string(),
            path: path.to_owned(),
        });
    }
    let meta = std::fs::metadata(path).map_err(|source| MountSpecError::LayerMissing {
        mount: mount.to_string(),
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(MountSpecError::LayerNotDirectory {
            mount: mount.to_string(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(n: usize) -> (tempfile::TempDir, Vec<String>) {
        let tmp = tempfile::tempdir().unwrap();
        let paths = (0..n)
            .map(|i| {
                let p = tmp.path().join(format!("l{i}"));
                std::fs::create_dir(&p).unwrap();
                p.to_str().unwrap().to_string()
            })
            .collect();
        (tmp, paths)
    }

    fn overlay(options: &[&str]) -> RootfsMount {
        RootfsMount::new("overlay", "overlay", options)
    }

    #[test]
    fn overlay_with_one_to_three_layers_keeps_their_order() {
        for n in 1..=3 {
            let (_tmp, layers) = dirs(n);
            let lowerdir = format!("lowerdir={}", layers.join(":"));
            let m = overlay(&[
                "index=off",
                "workdir=/snap/9/work",
                "upperdir=/snap/9/fs",
                &lowerdir,
            ]);
            let got = lower_layers(&[m]).unwrap();
            let want: Vec<PathBuf> = layers.iter().map(PathBuf::from).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn lowerdir_plus_appends_top_first() {
        let (_tmp, layers) = dirs(2);
        let a = format!("lowerdir+={}", layers[0]);
        let b = format!("lowerdir+={}", layers[1]);
        let got = lower_layers(&[overlay(&[&a, &b])]).unwrap();
        assert_eq!(
            got,
            vec![PathBuf::from(&layers[0]), PathBuf::from(&layers[1])]
        );
        let both = format!("lowerdir={}", layers[1]);
        let e = lower_layers(&[overlay(&[&a, &both])]).unwrap_err();
        assert!(e.to_string().contains("together"), "{e}");
    }

    #[test]
    fn escaped_colons_stay_in_the_path() {
        let got: Vec<String> = split_lowerdir(r"/a\:b:/c\\d:/e").collect();
        assert_eq!(got, vec!["/a:b", r"/c\d", "/e"]);
    }

    #[test]
    fn bind_is_one_layer() {
        let (_tmp, layers) = dirs(1);
        let m = RootfsMount::new("bind", &layers[0], &["rbind", "ro"]);
        assert_eq!(lower_layers(&[m]).unwrap(), vec![PathBuf::from(&layers[0])]);
        let m = RootfsMount::new("bind", &layers[0], &["rbind", "rw"]);
        assert_eq!(lower_layers(&[m]).unwrap().len(), 1);
    }

    #[test]
    fn bad_mounts_are_named_in_the_error() {
        let (tmp, layers) = dirs(1);
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let good = format!("lowerdir={}", layers[0]);
        let missing = format!("lowerdir={}/nope", layers[0]);
        let not_dir = format!("lowerdir={}", file.display());
        let cases: Vec<(Vec<RootfsMount>, &str)> = vec![
            (vec![], "no rootfs mount"),
            (
                vec![overlay(&[&good]), overlay(&[&good])],
                "2 rootfs mounts",
            ),
            (
                vec![RootfsMount::new("erofs", "/x.img", &[])],
                "type \"erofs\"",
            ),
            (vec![overlay(&["upperdir=/u", "workdir=/w"])], "no lowerdir"),
            (vec![overlay(&["lowerdir=relative/dir"])], "not an absolute"),
            (vec![overlay(&["lowerdir=/a::/b"])], "empty entry"),
            (vec![overlay(&[&missing])], "nope"),
            (vec![overlay(&[&not_dir])], "not a directory"),
            (vec![overlay(&[&good, "metacopy=on"])], "metacopy=on"),
            (vec![overlay(&[&good, "redirect_dir=on"])], "redirect_dir"),
            (vec![overlay(&[&good, &good])], "twice"),
            (
                vec![RootfsMount::new("bind", &layers[0], &["rbind", "noexec"])],
                "noexec",
            ),
            (
                vec![RootfsMount::new("bind", "rel/dir", &["rbind"])],
                "not an absolute",
            ),
        ];
        for (mounts, want) in cases {
            let e = lower_layers(&mounts).unwrap_err().to_string();
            assert!(e.contains(want), "{mounts:?}: {e}");
            if let Some(m) = mounts.first() {
                assert!(e.contains(&m.kind), "the error names the mount: {e}");
            }
        }
    }
}
