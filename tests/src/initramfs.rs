//! The test guests' initramfs: busybox and an init script, packed as a newc cpio.

use std::io::Cursor;
use std::path::Path;

use cpio::NewcBuilder;

const DIR: u32 = 0o040_755;
const EXEC: u32 = 0o100_755;
const CHAR_DEV: u32 = 0o020_600;
/// S_IFREG: cpio modes carry the file type.
const REGULAR: u32 = 0o100_000;

/// The init that prints the marker with the guest's CPU count and memory, then reboots.
pub const MARKER_INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo \"RUND-MARKER nproc=$(/bin/busybox nproc) $(/bin/busybox grep MemTotal /proc/meminfo)\"
/bin/busybox reboot -f
";

/// Where Debian's busybox-static puts its binary.
/// The start of a busybox init that checks things: the shell's applets, /proc, /sys, /dev and a
/// /tmp, and `check NAME CMD...`, which prints `RUND-CHECK NAME ok (at Ts)` or `RUND-CHECK NAME
/// FAIL: <output>` (read back with [`crate::assert_guest_checks`]).
pub const CHECK_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
check() { n=$1; shift; if "$@" >/tmp/out 2>&1; then echo "RUND-CHECK $n ok (at $(cut -d' ' -f1 /proc/uptime)s)"; else echo "RUND-CHECK $n FAIL: $(head -c 300 /tmp/out)"; fi; }"#;

pub const BUSYBOX: &str = "/bin/busybox";

/// Packs `busybox` and `init` (a script) into an initramfs at `out`.
pub fn write_busybox_initramfs(busybox: &Path, init: &str, out: &Path) -> std::io::Result<()> {
    let mut b = Initramfs::new(busybox)?;
    b.init(init);
    b.write(out)
}

struct Entry {
    path: String,
    mode: u32,
    /// A device node's (major, minor).
    rdev: Option<(u32, u32)>,
    contents: Vec<u8>,
}

/// An initramfs being put together: busybox, an init script, and host programs with exactly the
/// shared libraries they load (found with lddtree, at the same paths as on the host).
pub struct Initramfs {
    /// In the order they are packed.
    entries: Vec<Entry>,
    /// Guest paths already added (parents and shared libraries are added once).
    present: std::collections::HashSet<String>,
}

impl Initramfs {
    /// busybox at /bin/busybox, the directories the kernel and init need, and /dev/console.
    pub fn new(busybox: &Path) -> std::io::Result<Self> {
        let mut b = Initramfs {
            entries: Vec::new(),
            present: Default::default(),
        };
        for dir in ["bin", "dev", "proc", "sys", "mnt", "tmp"] {
            b.dir(dir);
        }
        // The kernel opens /dev/console for init's stdio before anything is mounted.
        b.entries.push(Entry {
            path: "dev/console".into(),
            mode: CHAR_DEV,
            rdev: Some((5, 1)),
            contents: Vec::new(),
        });
        b.push("bin/busybox", EXEC, std::fs::read(busybox)?);
        Ok(b)
    }

    fn push(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        if self.present.insert(path.to_string()) {
            self.entries.push(Entry {
                path: path.to_string(),
                mode,
                rdev: None,
                contents: data,
            });
        }
    }

    /// A directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            let p = at.clone();
            self.push(&p, DIR, Vec::new());
        }
    }

    /// A regular file with `contents` and permission bits `perm` at `path`.
    pub fn file(&mut self, path: &str, perm: u32, contents: Vec<u8>) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.push(path, REGULAR | (perm & 0o7777), contents);
    }

    /// The init script.
    pub fn init(&mut self, script: &str) {
        self.file("init", EXEC, script.as_bytes().to_vec());
    }

    /// The host program `host` at `guest_path`, without its debug information, with its ELF
    /// interpreter and every shared library it needs at the paths the host has them.
    pub fn program(&mut self, host: &Path, guest_path: &str) -> std::io::Result<()> {
        let tree = lddtree::DependencyAnalyzer::new("/".into())
            .analyze(host)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", host.display())))?;
        self.file(guest_path, EXEC, without_debug_info(host)?);
        if let Some(interp) = &tree.interpreter {
            self.file(interp, EXEC, std::fs::read(interp)?);
        }
        for lib in tree.libraries.values() {
            let Some(real) = &lib.realpath else {
                return Err(std::io::Error::other(format!(
                    "{}: shared library {} not found",
                    host.display(),
                    lib.name
                )));
            };
            // Packed under the path the loader searches, with the resolved file's contents.
            self.file(&lib.path.to_string_lossy(), EXEC, std::fs::read(real)?);
        }
        Ok(())
    }

    /// Writes the newc cpio to `out`.
    pub fn write(self, out: &Path) -> std::io::Result<()> {
        let entries = self.entries.into_iter().map(|e| {
            let mut b = NewcBuilder::new(&e.path).mode(e.mode).nlink(1);
            if let Some((major, minor)) = e.rdev {
                b = b.rdev_major(major).rdev_minor(minor);
            }
            (b, Cursor::new(e.contents))
        });
        let file = std::fs::File::create(out)?;
        cpio::write_cpio(entries, std::io::BufWriter::new(file))?.into_inner()?;
        Ok(())
    }
}

/// `program`'s contents with its debug sections stripped (`objcopy --strip-debug`, binutils).
/// A test build of the probe carries ~170 MB of its dependencies' debug information, which the
/// guest never reads and whose unpacking would not fit the guest's memory.
fn without_debug_info(program: &Path) -> std::io::Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let stripped = dir.path().join("stripped");
    let out = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(program)
        .arg(&stripped)
        .output()
        .map_err(|e| std::io::Error::other(format!("running objcopy (binutils): {e}")))?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "objcopy --strip-debug {}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::read(stripped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn initramfs_holds_init_and_busybox() {
        let dir = tempfile::tempdir().unwrap();
        let fake_busybox = dir.path().join("busybox");
        std::fs::write(&fake_busybox, b"\x7fELF-not-really").unwrap();
        let out = dir.path().join("initrd.cpio");
        write_busybox_initramfs(&fake_busybox, MARKER_INIT, &out).unwrap();
        let mut r = std::fs::File::open(&out).unwrap();
        let mut found = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(r).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let name = reader.entry().name().to_string();
            let mode = reader.entry().mode();
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            found.push((name, mode, data));
            r = reader.finish().unwrap();
        }
        let init = found.iter().find(|e| e.0 == "init").unwrap();
        assert_eq!(init.1, EXEC);
        assert!(init.2.starts_with(b"#!/bin/busybox sh\n"));
        assert_eq!(
            found.iter().find(|e| e.0 == "bin/busybox").unwrap().2,
            b"\x7fELF-not-really"
        );
        assert!(found
            .iter()
            .any(|e| e.0 == "dev/console" && e.1 == CHAR_DEV));
    }

    #[test]
    fn a_program_comes_with_its_loader_and_libraries() {
        let dir = tempfile::tempdir().unwrap();
        let fake_busybox = dir.path().join("busybox");
        std::fs::write(&fake_busybox, b"bb").unwrap();
        let mut b = Initramfs::new(&fake_busybox).unwrap();
        let me = std::env::current_exe().unwrap();
        b.program(&me, "/bin/probe").unwrap();
        let names: Vec<&str> = b.entries.iter().map(|e| e.path.as_str()).collect();
        assert!(names.contains(&"bin/probe"));
        // Packed without its debug information: smaller, and still an ELF file.
        let packed = &b
            .entries
            .iter()
            .find(|e| e.path == "bin/probe")
            .unwrap()
            .contents;
        assert!(packed.starts_with(b"\x7fELF"));
        let host_size = std::fs::metadata(&me).unwrap().len();
        assert!(
            (packed.len() as u64) < host_size,
            "{} bytes packed, {host_size} on the host",
            packed.len()
        );
        assert!(
            names.iter().any(|n| n.contains("ld-linux")),
            "no ELF interpreter in {names:?}"
        );
        assert!(
            names.iter().any(|n| n.contains("libc.so")),
            "no libc in {names:?}"
        );
        assert!(b
            .program(&fake_busybox, "/bin/x")
            .unwrap_err()
            .to_string()
            .contains("busybox"));
    }
}
