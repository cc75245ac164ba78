//! The templates of a host, one directory each under the store's root:
//!
//! ```text
//! /run/rund/templates/            0700, root's
//!   <key>/                        a whole template (renamed into place once complete)
//!     memory, state               the snapshot (vmm::snapshot), 0600
//!     template.json               its inputs, when it was made, its size
//!     restores                    one byte appended per restore: the count is its length
//!   .<key>.lock                   flock'd by whoever makes <key>: shims needing it at once make it once
//!   .<key>.tmp*/                  a template being made (a maker that died leaves one; the next removes it)
//! ```
//!
//! Template files hold guest memory: the root and each template directory must be owned by this
//! process's user and closed to everyone else, and not be symlinks; the snapshot's own files are
//! checked by the VMM on every restore. A template is removed by renaming it out of the way first,
//! so that nobody finds half of one; sandboxes restored from it keep running on the mapped file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;

use crate::key::{TemplateInputs, TemplateKey};

/// Where a host keeps its templates (tmpfs: they are remade after a reboot).
pub const DEFAULT_ROOT: &str = "/run/rund/templates";
const INFO_FILE: &str = "template.json";
const RESTORES_FILE: &str = "restores";
/// The largest `template.json` read.
const MAX_INFO_BYTES: u64 = 1 << 20;

/// Errors of the template store.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file or directory operation failed.
    #[error("{path}: cannot {op}")]
    Io {
        /// What was tried.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A directory another user could have changed.
    #[error("{path}: refused: {what}")]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// Owner, mode or type.
        what: String,
    },
    /// A template's description is unreadable.
    #[error("{0}: not a template description")]
    Info(PathBuf, #[source] serde_json::Error),
    /// Making the template's snapshot failed.
    #[error("making template {key}")]
    Make {
        /// The template.
        key: TemplateKey,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Refuses a directory that is a symlink, not this user's, or open to others.
fn check_private_dir(path: &Path) -> Result<(), TemplateError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    let refuse = |what: String| TemplateError::Unsafe {
        path: path.to_owned(),
        what,
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(refuse("not a directory".into()));
    }
    if let Some(why) = vmm::snapshot::not_private(&meta, "0700") {
        return Err(refuse(why));
    }
    Ok(())
}

/// What `template.json` says.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateInfo {
    /// What it was made from.
    pub inputs: TemplateInputs,
    /// When it was made, in seconds since the epoch.
    pub created_unix_s: u64,
    /// Guest memory bytes its memory file holds (the rest is holes).
    pub memory_bytes: u64,
}

/// One complete template.
#[derive(Clone, Debug)]
pub struct Template {
    /// Its key.
    pub key: TemplateKey,
    /// Its directory: the snapshot to restore.
    pub dir: PathBuf,
    /// Its description.
    pub info: TemplateInfo,
}

impl Template {
    fn read(dir: &Path, key: TemplateKey) -> Result<Template, TemplateError> {
        check_private_dir(dir)?;
        let path = dir.join(INFO_FILE);
        let file = File::open(&path).map_err(io_err("open", &path))?;
        let info: TemplateInfo = serde_json::from_reader(io::Read::take(file, MAX_INFO_BYTES))
            .map_err(|e| TemplateError::Info(path.clone(), e))?;
        Ok(Template {
            key,
            dir: dir.to_owned(),
            info,
        })
    }

    /// Counts one restore.
    pub fn record_restore(&self) -> Result<(), TemplateError> {
        let path = self.dir.join(RESTORES_FILE);
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| f.write_all(b"."))
            .map_err(io_err("count a restore in", &path))
    }

    /// How many times it was restored.
    pub fn restores(&self) -> u64 {
        fs::metadata(self.dir.join(RESTORES_FILE)).map_or(0, |m| m.len())
    }

    /// Bytes its files take on disk (holes are free).
    pub fn size_on_disk(&self) -> u64 {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// How long ago it was made.
    pub fn age(&self) -> Duration {
        let made = UNIX_EPOCH + Duration::from_secs(self.info.created_unix_s);
        SystemTime::now().duration_since(made).unwrap_or_default()
    }
}

/// Undoes what a maker that died left outside its `.<key>.tmp*` directory (given that directory).
type LeftoverUndo = Arc<dyn Fn(&Path) + Send + Sync>;

/// The templates under one root directory.
#[derive(Clone)]
pub struct TemplateStore {
    root: PathBuf,
    undo_leftovers: Option<LeftoverUndo>,
}

impl std::fmt::Debug for TemplateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// An flock on a template's lock file, released on drop (and by the kernel if the holder dies).
struct MakeLock(#[allow(dead_code)] File);

/// The store's one lock helper: `path` (0600, made if missing, never through a symlink)
/// flock'd exclusively, waiting for it with `wait`, else `None` if another holds it. The file
/// holds the lock until dropped (and the kernel drops it if the holder dies). On error, what
/// failed (`open` or `lock`) and why.
pub(crate) fn lock_file(
    path: &Path,
    wait: bool,
) -> Result<Option<File>, (&'static str, io::Error)> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| ("open", e))?;
    let op = if wait {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    match rustix::fs::flock(&file, op) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) if !wait => Ok(None),
        Err(e) => Err(("lock", e.into())),
    }
}

impl TemplateStore {
    /// The store at `root`, made (0700) if missing; refused if another user could change it.
    pub fn open(root: impl Into<PathBuf>) -> Result<TemplateStore, TemplateError> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err("create", &root))?;
        check_private_dir(&root)?;
        Ok(TemplateStore {
            root,
            undo_leftovers: None,
        })
    }

    /// Has `undo` called on each directory a dead maker left, before it is removed: a maker may
    /// hold things outside it (its VM's mounts, files on another filesystem) and record them there.
    pub fn undo_leftovers_with(mut self, undo: impl Fn(&Path) + Send + Sync + 'static) -> Self {
        self.undo_leftovers = Some(Arc::new(undo));
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir_of(&self, key: &TemplateKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// The complete template for `inputs`, if there is one.
    pub fn find(&self, inputs: &TemplateInputs) -> Result<Option<Template>, TemplateError> {
        let key = inputs.key();
        let dir = self.dir_of(&key);
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("stat", &dir)(e)),
            Ok(_) => {}
        }
        let template = Template::read(&dir, key)?;
        // A key is a hash of the inputs; a description that disagrees is not this template.
        Ok((template.info.inputs == *inputs).then_some(template))
    }

    fn lock(&self, key: &TemplateKey, wait: bool) -> Result<Option<MakeLock>, TemplateError> {
        let path = self.root.join(format!(".{key}.lock"));
        lock_file(&path, wait)
            .map(|held| held.map(MakeLock))
            .map_err(|(op, e)| io_err(op, &path)(e))
    }

    /// The template for `inputs`: found, or made by `snapshot`, which writes a paused source VM's
    /// snapshot into the directory it is given and returns the guest memory bytes it wrote.
    /// Makers of one key at once make it once: the others wait (`wait`) and then find it, or get
    /// `None` at once (`!wait`: a caller that cold-boots meanwhile). Once made, templates of the
    /// same shape with other inputs (an older kernel, say) are removed.
    pub fn get_or_make(
        &self,
        inputs: &TemplateInputs,
        wait: bool,
        snapshot: impl FnOnce(&Path) -> Result<u64, Box<dyn std::error::Error + Send + Sync>>,
    ) -> Result<Option<Template>, TemplateError> {
        if let Some(t) = self.find(inputs)? {
            return Ok(Some(t));
        }
        let key = inputs.key();
        let Some(_lock) = self.lock(&key, wait)? else {
            return Ok(None);
        };
        if let Some(t) = self.find(inputs)? {
            return Ok(Some(t));
        }
        self.remove_temporaries(&key);
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{key}.tmp"))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(&self.root)
            .map_err(io_err("create a directory in", &self.root))?;
        let memory_bytes = snapshot(tmp.path()).map_err(|source| TemplateError::Make {
            key: key.clone(),
            source,
        })?;
        let info = TemplateInfo {
            inputs: inputs.clone(),
            created_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            memory_bytes,
        };
        let info_path = tmp.path().join(INFO_FILE);
        let text = serde_json::to_vec_pretty(&info)
            .map_err(|e| TemplateError::Info(info_path.clone(), e))?;
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&info_path)
            .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
            .map_err(io_err("write", &info_path))?;
        let dir = self.dir_of(&key);
        fs::rename(tmp.path(), &dir).map_err(io_err("rename a new template to", &dir))?;
        // Renamed: nothing left for the guard to remove.
        let _ = tmp.keep();
        log::info!("made template {key} in {}", dir.display());
        for stale in self.remove_stale(inputs)? {
            log::info!("removed template {stale}: its inputs changed");
        }
        Ok(Some(Template { key, dir, info }))
    }

    /// Directories a maker of `key` that died left (the caller holds the key's lock).
    fn remove_temporaries(&self, key: &TemplateKey) {
        let prefix = format!(".{key}.tmp");
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                log::info!(
                    "removing {}, left by a maker that died",
                    entry.path().display()
                );
                if let Some(undo) = &self.undo_leftovers {
                    undo(&entry.path());
                }
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    log::warn!("cannot remove {}: {e}", entry.path().display());
                }
            }
        }
    }

    /// Every complete template, by key. One whose description is unreadable is skipped and said.
    pub fn list(&self) -> Result<Vec<Template>, TemplateError> {
        let mut all = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let entry = entry.map_err(io_err("list", &self.root))?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(TemplateKey::parse) else {
                continue;
            };
            match Template::read(&entry.path(), key) {
                Ok(t) => all.push(t),
                Err(e) => log::warn!("skipping a template: {}", vmm::error_chain(&e)),
            }
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    /// Removes the template `key`; `false` if there is none. VMs restored from it keep running.
    pub fn remove(&self, key: &TemplateKey) -> Result<bool, TemplateError> {
        let dir = self.dir_of(key);
        let aside = self
            .root
            .join(format!(".{key}.removed-{}", std::process::id()));
        match fs::rename(&dir, &aside) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("rename out of the way", &dir)(e)),
            Ok(()) => {}
        }
        fs::remove_dir_all(&aside).map_err(io_err("remove", &aside))?;
        Ok(true)
    }

    /// Removes the templates of `current`'s shape that were made from other inputs.
    pub fn remove_stale(
        &self,
        current: &TemplateInputs,
    ) -> Result<Vec<TemplateKey>, TemplateError> {
        let key = current.key();
        let mut removed = Vec::new();
        for t in self.list()? {
            if t.key != key && t.info.inputs.same_shape(current) && self.remove(&t.key)? {
                removed.push(t.key);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::FileIdentity;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn inputs(kernel: &Path, mem_mib: u32) -> TemplateInputs {
        TemplateInputs {
            kernel: FileIdentity::of(kernel).unwrap(),
            initrd: None,
            cmdline: String::new(),
            vmm_build: vmm::snapshot::build_id().into(),
            vcpus: 1,
            mem_mib,
            devices: vec!["vsock".into()],
        }
    }

    /// Stands in for the VM's snapshot: the store moves directories and never reads the files.
    fn fake_snapshot(dir: &Path) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
        fs::write(dir.join("memory"), b"m")?;
        fs::write(dir.join("state"), b"s")?;
        Ok(1)
    }

    #[test]
    fn made_once_found_after_and_listed() {
        let root = tempfile::tempdir().unwrap();
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let store = TemplateStore::open(root.path().join("templates")).unwrap();
        let i = inputs(kernel.path(), 128);
        assert!(store.find(&i).unwrap().is_none());
        let t = store.get_or_make(&i, true, fake_snapshot).unwrap().unwrap();
        assert_eq!(t.key, i.key());
        assert_eq!(t.info.memory_bytes, 1);
        let again = store
            .get_or_make(&i, true, |_| panic!("made twice"))
            .unwrap()
            .unwrap();
        assert_eq!(again.dir, t.dir);
        t.record_restore().unwrap();
        t.record_restore().unwrap();
        assert_eq!(t.restores(), 2);
        assert!(t.size_on_disk() > 0);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].info, t.info);
        // Nothing but the template and its lock is left in the root.
        let names: Vec<String> = fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(store.remove(&t.key).unwrap());
        assert!(!store.remove(&t.key).unwrap());
        assert!(store.find(&i).unwrap().is_none());
    }

    #[test]
    fn makers_at_once_make_it_once_and_a_non_waiter_does_not_wait() {
        let root = tempfile::tempdir().unwrap();
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let store = TemplateStore::open(root.path().join("templates")).unwrap();
        let i = inputs(kernel.path(), 128);
        let made = Arc::new(AtomicUsize::new(0));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let slow = {
            let (store, i, made) = (store.clone(), i.clone(), made.clone());
            std::thread::spawn(move || {
                store
                    .get_or_make(&i, true, |dir| {
                        started_tx.send(()).unwrap();
                        made.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(300));
                        fake_snapshot(dir)
                    })
                    .unwrap()
            })
        };
        started_rx.recv().unwrap();
        // Being made: a caller that will not wait goes on without it.
        assert!(store
            .get_or_make(&i, false, |_| panic!("made by a non-waiter"))
            .unwrap()
            .is_none());
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let (store, i, made) = (store.clone(), i.clone(), made.clone());
                std::thread::spawn(move || {
                    store
                        .get_or_make(&i, true, |dir| {
                            made.fetch_add(1, Ordering::SeqCst);
                            fake_snapshot(dir)
                        })
                        .unwrap()
                        .unwrap()
                })
            })
            .collect();
        let first = slow.join().unwrap().unwrap();
        for w in waiters {
            assert_eq!(w.join().unwrap().key, first.key);
        }
        assert_eq!(made.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_make_leaves_nothing_and_says_why() {
        let root = tempfile::tempdir().unwrap();
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let store = TemplateStore::open(root.path().join("templates")).unwrap();
        let i = inputs(kernel.path(), 128);
        let e = store
            .get_or_make(&i, true, |_| Err("the agent never answered".into()))
            .unwrap_err();
        assert_eq!(
            vmm::error_chain(&e),
            format!("making template {}: the agent never answered", i.key())
        );
        assert!(store.find(&i).unwrap().is_none());
        let left: Vec<_> = fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| !n.to_string_lossy().ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_dead_makers_directory_is_undone_then_removed_by_the_next_maker() {
        let root = tempfile::tempdir().unwrap();
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let undone = Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = TemplateStore::open(root.path().join("templates"))
            .unwrap()
            .undo_leftovers_with({
                let undone = undone.clone();
                move |dir| {
                    // What the maker recorded is still there when the hook runs.
                    assert!(dir.join("work/record").exists());
                    undone.lock().unwrap().push(dir.to_owned());
                }
            });
        let i = inputs(kernel.path(), 128);
        let other = inputs(kernel.path(), 256);
        let dead = store.root().join(format!(".{}.tmpAbC123", i.key()));
        let not_ours = store.root().join(format!(".{}.tmpAbC123", other.key()));
        for d in [&dead, &not_ours] {
            fs::create_dir_all(d.join("work")).unwrap();
            fs::write(d.join("work/record"), b"r").unwrap();
        }
        store.get_or_make(&i, true, fake_snapshot).unwrap().unwrap();
        assert_eq!(*undone.lock().unwrap(), vec![dead.clone()]);
        assert!(!dead.exists());
        // Another key's maker may be alive: its directory is its own.
        assert!(not_ours.exists());
    }

    #[test]
    fn new_inputs_replace_the_stale_template_of_their_shape() {
        let root = tempfile::tempdir().unwrap();
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let store = TemplateStore::open(root.path().join("templates")).unwrap();
        let old = inputs(kernel.path(), 128);
        let other_shape = inputs(kernel.path(), 256);
        store.get_or_make(&old, true, fake_snapshot).unwrap();
        store
            .get_or_make(&other_shape, true, fake_snapshot)
            .unwrap();
        let mut new = old.clone();
        new.vmm_build = "ffffffffffffffff".into();
        assert!(
            store.find(&new).unwrap().is_none(),
            "an old template is not the new one's"
        );
        store.get_or_make(&new, true, fake_snapshot).unwrap();
        let keys: Vec<_> = store.list().unwrap().into_iter().map(|t| t.key).collect();
        let mut want = vec![new.key(), other_shape.key()];
        want.sort();
        assert_eq!(keys, want);
    }

    #[test]
    fn directories_others_could_change_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let open_dir = root.path().join("open");
        fs::create_dir(&open_dir).unwrap();
        fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o755)).unwrap();
        let e = TemplateStore::open(&open_dir).unwrap_err().to_string();
        assert!(
            e.ends_with("refused: mode 755 lets others in (0700 at most)"),
            "{e}"
        );
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&open_dir, &link).unwrap();
        let e = TemplateStore::open(&link).unwrap_err().to_string();
        assert!(e.ends_with("refused: a symbolic link"), "{e}");
        // A template directory opened up after it was made is refused at its next use.
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let store = TemplateStore::open(root.path().join("ok")).unwrap();
        let i = inputs(kernel.path(), 128);
        let t = store.get_or_make(&i, true, fake_snapshot).unwrap().unwrap();
        fs::set_permissions(&t.dir, fs::Permissions::from_mode(0o777)).unwrap();
        let e = store.find(&i).unwrap_err().to_string();
        assert!(e.contains("refused: mode 777"), "{e}");
    }
}
