//! The test guests' initramfs: busybox and an init script, packed as a newc cpio.

use std::io::Cursor;
use std::path::Path;

use cpio::NewcBuilder;

const DIR: u32 = 0o040_755;
const EXEC: u32 = 0o100_755;
const CHAR_DEV: u32 = 0o020_600;

/// The init that prints the marker with the guest's CPU count and memory, then reboots.
pub const MARKER_INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo \"RUND-MARKER nproc=$(/bin/busybox nproc) $(/bin/busybox grep MemTotal /proc/meminfo)\"
/bin/busybox reboot -f
";

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Packs `busybox` and `init` (a script) into an initramfs at `out`.
pub fn write_busybox_initramfs(busybox: &Path, init: &str, out: &Path) -> std::io::Result<()> {
    let busybox = std::fs::read(busybox)?;
    let entry = |name: &str, mode: u32| NewcBuilder::new(name).mode(mode).nlink(1);
    let empty = || Cursor::new(Vec::new());
    let entries = vec![
        (entry("bin", DIR), empty()),
        (entry("dev", DIR), empty()),
        // The kernel opens /dev/console for init's stdio before anything is mounted.
        (
            entry("dev/console", CHAR_DEV).rdev_major(5).rdev_minor(1),
            empty(),
        ),
        (entry("proc", DIR), empty()),
        (entry("bin/busybox", EXEC), Cursor::new(busybox)),
        (entry("init", EXEC), Cursor::new(init.as_bytes().to_vec())),
    ];
    let file = std::fs::File::create(out)?;
    cpio::write_cpio(entries.into_iter(), std::io::BufWriter::new(file))?.into_inner()?;
    Ok(())
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
}
