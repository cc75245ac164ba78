//! [`ShareFs`]: the filesystem the FUSE server calls, fuse-backend-rs's passthrough of one host
//! directory behind rund's own rules.
//!
//! Why a wrapper: the passthrough filesystem has no read-only mode, and its defences against a
//! hostile guest are spread over its methods (names with `/` refused in LOOKUP, `.` and `..`
//! refused where entries are created, `..` at the root turned into `.`, every open relative to an
//! inode's `O_PATH` fd with `O_NOFOLLOW`, only regular files and directories reopened). This layer
//! states the rules once, whatever the crate does:
//!
//! - read-only: every operation that could change the share returns `EROFS` before reaching the
//!   passthrough, and files are only ever opened `O_RDONLY` on the host;
//! - names: a name is one path component: never empty, never with `/` (nor NUL: the raw message
//!   is checked by [`guard`](super::guard) before the server turns it into a C string), and never
//!   `.` or `..` where an entry is made, removed or renamed;
//! - no device nodes: MKNOD of a character or block device is refused (`EPERM`), since the VMM
//!   runs as root and a device node in a host directory is a host-side hazard even if the
//!   passthrough never opens it (FIFOs and sockets stay: containers of one pod meet over them
//!   in a shared volume, and the host never opens them either);
//! - credentials are the host's: a request's uid and gid must be ones [`GuestIds`] allows
//!   before anything is created as them, and a SETATTR may only give a file to an allowed owner
//!   or group (`EPERM` otherwise);
//! - no set-id files: nothing is created or chmodded setuid, nor setgid unless it is a
//!   directory (group inheritance); and every write, truncation and fallocate runs without
//!   `CAP_FSETID`, so the kernel clears the bits of a set-id file already on the host whatever
//!   FUSE's KILLPRIV flags the guest sends; no file capabilities (`security.capability`) and no
//!   `trusted.*` attributes are set;
//! - what is not delegated (locks, ioctl, DAX mappings, bmap, poll) keeps the trait's `ENOSYS`.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use super::ids::GuestIds;

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

pub(super) fn eperm() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// `EPERM` for a mode that makes a set-id file: setuid always, setgid unless on a directory.
pub fn check_mode(mode: u32, is_dir: bool) -> io::Result<()> {
    if mode & libc::S_ISUID != 0 || (mode & libc::S_ISGID != 0 && !is_dir) {
        return Err(eperm());
    }
    Ok(())
}

/// `EPERM` for an extended attribute that grants privilege on the host: file capabilities, and
/// the `trusted.*` namespace only root reads (overlayfs's whiteouts and redirects live there).
pub fn check_xattr_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b == b"security.capability" || b.starts_with(b"trusted.") {
        return Err(eperm());
    }
    Ok(())
}

/// While held, this thread's effective capabilities lack `CAP_FSETID`, so the kernel clears
/// the setuid and setgid bits of a file the request writes or truncates, as it would for any
/// unprivileged writer (the VMM runs as root).
struct WithoutFsetid {
    restore: bool,
}

impl WithoutFsetid {
    fn new() -> io::Result<WithoutFsetid> {
        use caps::{CapSet, Capability};
        let had = caps::has_cap(None, CapSet::Effective, Capability::CAP_FSETID)
            .map_err(io::Error::other)?;
        if had {
            caps::drop(None, CapSet::Effective, Capability::CAP_FSETID)
                .map_err(io::Error::other)?;
        }
        Ok(WithoutFsetid { restore: had })
    }

    /// One only if `needed`: a request that can change no file's content keeps its capabilities
    /// (each drop and restore costs the request three `capget`/`capset` calls).
    fn when(needed: bool) -> io::Result<Option<WithoutFsetid>> {
        needed.then(WithoutFsetid::new).transpose()
    }
}

impl Drop for WithoutFsetid {
    fn drop(&mut self) {
        if self.restore {
            if let Err(e) = caps::raise(None, caps::CapSet::Effective, caps::Capability::CAP_FSETID)
            {
                crate::guest_error!("virtio-fs: restoring CAP_FSETID after a write: {e}");
            }
        }
    }
}

/// A name the guest may look up: one non-empty path component without `/`. `.` and `..` are
/// allowed here (the guest kernel's export operations look them up on nodeids; the passthrough
/// resolves `..` at the root to the root).
pub fn check_lookup_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b.contains(&b'/') {
        return Err(einval());
    }
    Ok(())
}

/// A name an entry is made, removed or renamed under: a lookup name that is not `.` or `..`.
pub fn check_entry_name(name: &CStr) -> io::Result<()> {
    check_lookup_name(name)?;
    match name.to_bytes() {
        b"." | b".." => Err(einval()),
        _ => Ok(()),
    }
}

/// Whether open flags ask for anything a read-only share cannot give.
pub fn open_flags_write(flags: u32) -> bool {
    // The flags are the guest's `int`; reinterpreting the bits is the point.
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
}

/// The passthrough filesystem behind rund's rules (see the module docs).
pub struct ShareFs {
    inner: PassthroughFs<()>,
    read_only: bool,
    ids: GuestIds,
}

impl ShareFs {
    /// Wraps `inner`; with `read_only` nothing the guest sends can change the share; files are
    /// made and owned only as `ids` allows.
    pub fn new(inner: PassthroughFs<()>, read_only: bool, ids: GuestIds) -> Self {
        ShareFs {
            inner,
            read_only,
            ids,
        }
    }

    /// Whether mutations are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// What a request that makes an entry must pass: a writable share, a name, allowed ids.
    fn may_create(&self, ctx: &Context, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_entry_name(name)?;
        self.ids.check(ctx.uid, ctx.gid)
    }

    fn is_dir(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> io::Result<bool> {
        let (st, _) = self.inner.getattr(ctx, inode, handle)?;
        Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
    }
}

impl FileSystem for ShareFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut want = self.inner.init(capable)?;
        // Each request costs the guest a VM exit or two, so fewer and larger ones: up to 1 MiB a
        // READ or WRITE (MAX_PAGES; the request queue has room for its descriptors), readahead
        // sent without waiting for the previous READ (ASYNC_READ), so that several requests reach
        // the device per notification, and lookups in one directory not serialised by the guest.
        want |= FsOptions::ASYNC_READ | FsOptions::MAX_PAGES | FsOptions::PARALLEL_DIROPS;
        if self.read_only {
            // Writeback caching only batches writes that would all fail.
            want.remove(FsOptions::WRITEBACK_CACHE);
        } else {
            want |= FsOptions::BIG_WRITES;
        }
        Ok(want)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        check_lookup_name(name)?;
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        if valid.contains(SetattrValid::MODE) && attr.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
        {
            check_mode(attr.st_mode, self.is_dir(ctx, inode, handle)?)?;
        }
        if (valid.contains(SetattrValid::UID) && !self.ids.allows_uid(attr.st_uid))
            || (valid.contains(SetattrValid::GID) && !self.ids.allows_gid(attr.st_gid))
        {
            return Err(eperm());
        }
        let _no_fsetid = WithoutFsetid::when(valid.contains(SetattrValid::SIZE))?;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.may_create(ctx, name)?;
        // The target is text the host never follows (every open is O_NOFOLLOW relative to an
        // inode fd), so it may name anything.
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.may_create(ctx, name)?;
        check_mode(mode, false)?;
        match mode & libc::S_IFMT {
            libc::S_IFCHR | libc::S_IFBLK => Err(eperm()),
            _ => self.inner.mknod(ctx, inode, name, mode, rdev, umask),
        }
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.may_create(ctx, name)?;
        check_mode(mode, true)?;
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_entry_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_entry_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_entry_name(oldname)?;
        check_entry_name(newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(newname)?;
        // `inode` must be one the guest already holds (the passthrough looks it up in its inode
        // table), so a link can only name something already inside the share.
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if self.read_only && open_flags_write(flags) {
            return Err(erofs());
        }
        let _no_fsetid = WithoutFsetid::when(flags as i32 & libc::O_TRUNC != 0)?;
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.may_create(ctx, name)?;
        check_mode(args.mode, false)?;
        // CREATE opens the file if it is there already, truncating it if asked.
        let _no_fsetid = WithoutFsetid::when(args.flags as i32 & libc::O_TRUNC != 0)?;
        self.inner.create(ctx, parent, name, args)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        let _no_fsetid = WithoutFsetid::new()?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        let _no_fsetid = WithoutFsetid::new()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_xattr_name(name)?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        if self.read_only && open_flags_write(flags) {
            return Err(erofs());
        }
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if self.read_only && mask & libc::W_OK as u32 != 0 {
            return Err(erofs());
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components() {
        let c = |s: &[u8]| CStr::from_bytes_with_nul(s).unwrap().to_owned();
        for bad in [&b"\0"[..], b"a/b\0", b"/\0", b"../x\0"] {
            assert!(check_lookup_name(&c(bad)).is_err(), "{bad:?}");
        }
        for good in [&b".\0"[..], b"..\0", b"a\0", b"...\0"] {
            assert!(check_lookup_name(&c(good)).is_ok(), "{good:?}");
        }
        assert!(check_entry_name(&c(b".\0")).is_err());
        assert!(check_entry_name(&c(b"..\0")).is_err());
        assert!(check_entry_name(&c(b"...\0")).is_ok());
    }

    #[test]
    fn write_flags_are_recognised() {
        for f in [libc::O_WRONLY, libc::O_RDWR, libc::O_TRUNC, libc::O_CREAT] {
            assert!(open_flags_write(f as u32), "{f:#x}");
        }
        for f in [libc::O_RDONLY, libc::O_DIRECTORY, libc::O_NOATIME] {
            assert!(!open_flags_write(f as u32), "{f:#x}");
        }
    }
}
