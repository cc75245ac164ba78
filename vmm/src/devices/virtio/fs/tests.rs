//! Device tests: raw FUSE messages, built from fuse-backend-rs's ABI structs, written into mock
//! guest memory and served through the device's queues, checked against the host directory.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{
    features, CachePolicy, Fs, FsConfig, FsError, FsState, GuestIds, FS_DEVICE_ID, TAG_LEN,
};
use crate::devices::virtio::test_utils::{activate, QueueDriver, N, R, W};
use crate::devices::virtio::{DeviceStateError, VirtioDevice};
use crate::memory::GuestRamMap;

/// Entries in each test queue.
const QSIZE: u16 = 16;
/// Queue layouts.
const HIPRIO: u64 = 0;
const REQ: u64 = 0x4000;
/// Request and reply buffers.
const IN: u64 = 0x10_0000;
const OUT: u64 = 0x40_0000;
const OUT_LEN: u32 = 0x20_0000;
const MEM_SIZE: u64 = 0x80_0000;
const FILE_LEN: usize = 300_001;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ seed)
        .collect()
}

fn obj<T: ByteValued>(v: T) -> Vec<u8> {
    v.as_slice().to_vec()
}

fn cz(s: &[u8]) -> Vec<u8> {
    [s, b"\0"].concat()
}

fn parse<T: ByteValued + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    let n = std::mem::size_of::<T>();
    assert!(b.len() >= n, "reply of {} bytes, {} expected", b.len(), n);
    v.as_mut_slice().copy_from_slice(&b[..n]);
    v
}

/// A reply: errno (positive, 0 = success) and the bytes after the out-header.
#[derive(Debug)]
struct Reply {
    errno: i32,
    body: Vec<u8>,
}

struct Harness {
    mem: GuestRamMap,
    hi: QueueDriver,
    rq: QueueDriver,
    dev: Fs,
    irq: EventFd,
    share: tempfile::TempDir,
    outside: tempfile::TempDir,
    unique: u64,
    /// The uid and gid the guest writes into each request's header.
    creds: (u32, u32),
}

struct Opts {
    read_only: bool,
    xattr: bool,
    ids: GuestIds,
    cache: CachePolicy,
    acked: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            read_only: true,
            xattr: false,
            ids: GuestIds::any(),
            cache: CachePolicy::Auto,
            acked: 0,
        }
    }
}

impl Harness {
    fn new(o: Opts) -> Harness {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host secret").unwrap();
        let share = tempfile::tempdir().unwrap();
        let s = share.path();
        std::fs::write(s.join("file.txt"), pattern(FILE_LEN, 0x5a)).unwrap();
        std::fs::create_dir_all(s.join("dir/sub")).unwrap();
        std::fs::write(s.join("dir/inner"), b"inner").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), s.join("link_abs")).unwrap();
        std::os::unix::fs::symlink(outside.path(), s.join("link_dir")).unwrap();
        let rel = Path::new("..").join(outside.path().file_name().unwrap());
        std::os::unix::fs::symlink(rel.join("secret"), s.join("link_rel")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../etc", s.join("dir/link_up")).unwrap();

        let mem = crate::memory::map_ram(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let hi = QueueDriver::new(&mem, HIPRIO, QSIZE);
        let rq = QueueDriver::new(&mem, REQ, QSIZE);
        let mut dev = Fs::new(FsConfig {
            tag: "rundfs".into(),
            shared_dir: s.to_path_buf(),
            read_only: o.read_only,
            cache: o.cache,
            xattr: o.xattr,
            ids: o.ids,
        })
        .unwrap();
        let irq = activate(&mut dev, &mem, &[&hi, &rq], o.acked);
        Harness {
            mem,
            hi,
            rq,
            dev,
            irq,
            share,
            outside,
            unique: 0,
            creds: (0, 0),
        }
    }

    fn rw() -> Harness {
        Harness::new(Opts {
            read_only: false,
            ..Default::default()
        })
    }

    fn put(&self, addr: u64, b: &[u8]) {
        self.mem.write_slice(b, GuestAddress(addr)).unwrap();
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A message: in-header (its `len` the true length unless `len` overrides it) and `args`.
    fn msg_len(&mut self, opcode: u32, nodeid: u64, args: &[u8], len: Option<u32>) -> Vec<u8> {
        self.unique += 1;
        let h = InHeader {
            len: len.unwrap_or((40 + args.len()) as u32),
            opcode,
            unique: self.unique,
            nodeid,
            uid: self.creds.0,
            gid: self.creds.1,
            pid: 1,
            padding: 0,
        };
        [h.as_slice(), args].concat()
    }

    fn msg(&mut self, op: Opcode, nodeid: u64, args: &[u8]) -> Vec<u8> {
        self.msg_len(op as u32, nodeid, args, None)
    }

    /// Pushes a chain on `q` (table index 0; the previous chain is always done), serves the
    /// queues once, and returns the used length; panics unless exactly one chain came back.
    fn run(&mut self, hiprio: bool, descs: &[(u64, u32, u16, u16)]) -> u32 {
        let d = if hiprio { &self.hi } else { &self.rq };
        let before = d.used_idx();
        d.push(descs, 0);
        self.dev.process_queues();
        let d = if hiprio { &self.hi } else { &self.rq };
        assert_eq!(d.used_idx(), before.wrapping_add(1), "one chain returned");
        let (id, len) = d.used_elem(before);
        assert_eq!(id, 0);
        len
    }

    /// A linear chain of (addr, len, flags).
    fn run_linear(&mut self, hiprio: bool, descs: &[(u64, u32, u16)]) -> u32 {
        self.run(hiprio, &QueueDriver::linked(descs, 0))
    }

    /// Sends `m` split into readable pieces of `ins` bytes (the rest in one more) and a reply
    /// area split into writable pieces of `outs` bytes (then the rest of OUT_LEN); returns the
    /// reply's bytes, reassembled.
    fn send_split(&mut self, m: &[u8], ins: &[u32], outs: &[u32]) -> Option<Reply> {
        let mut descs = Vec::new();
        let (mut at, mut addr) = (0usize, IN);
        for &n in ins.iter().chain(std::iter::once(&u32::MAX)) {
            let n = (n as usize).min(m.len() - at);
            if n == 0 && at == m.len() {
                break;
            }
            self.put(addr, &m[at..at + n]);
            descs.push((addr, n as u32, R));
            at += n;
            // Pieces land at scattered, odd guest addresses.
            addr += n as u64 + 0x1003;
        }
        let (mut left, mut addr) = (OUT_LEN, OUT);
        let mut out_pieces = Vec::new();
        for &n in outs.iter().chain(std::iter::once(&u32::MAX)) {
            let n = n.min(left);
            if n == 0 {
                break;
            }
            self.put(addr, &vec![0xee; n as usize]);
            descs.push((addr, n, W));
            out_pieces.push((addr, n));
            left -= n;
            addr += u64::from(n) + 0x801;
        }
        let used = self.run_linear(false, &descs);
        if used == 0 {
            return None;
        }
        let mut bytes = Vec::new();
        for (a, n) in out_pieces {
            bytes.extend(self.get(a, n as usize));
        }
        bytes.truncate(used as usize);
        let h: OutHeader = parse(&bytes);
        assert_eq!(h.len, used, "out-header length is the used length");
        let unique = u64::from_le_bytes(m[8..16].try_into().unwrap());
        assert_eq!(h.unique, unique, "reply to the request sent");
        assert!(h.error <= 0);
        Some(Reply {
            errno: -h.error,
            body: bytes[16..].to_vec(),
        })
    }

    fn send_msg(&mut self, m: &[u8]) -> Reply {
        self.send_split(m, &[], &[]).expect("a reply")
    }

    fn call(&mut self, op: Opcode, nodeid: u64, args: &[u8]) -> Reply {
        let m = self.msg(op, nodeid, args);
        self.send_msg(&m)
    }

    fn ok(&mut self, op: Opcode, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let r = self.call(op, nodeid, args);
        assert_eq!(r.errno, 0, "{op:?} on {nodeid} failed");
        r.body
    }

    fn init(&mut self) -> InitOut {
        self.init_with(
            FsOptions::ASYNC_READ
                | FsOptions::BIG_WRITES
                | FsOptions::DO_READDIRPLUS
                | FsOptions::MAX_PAGES
                | FsOptions::EXPORT_SUPPORT
                | FsOptions::WRITEBACK_CACHE,
        )
    }

    /// INIT with the guest kernel offering `flags`.
    fn init_with(&mut self, flags: FsOptions) -> InitOut {
        let args = obj(InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0x2_0000,
            flags: flags.bits() as u32,
        });
        parse(&self.ok(Opcode::Init, 0, &args))
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<EntryOut, i32> {
        let r = self.call(Opcode::Lookup, parent, &cz(name));
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(parse(&r.body))
    }

    fn getattr(&mut self, node: u64) -> Result<Attr, i32> {
        let r = self.call(Opcode::Getattr, node, &obj(GetattrIn::default()));
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(parse::<AttrOut>(&r.body).attr)
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let args = obj(OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        });
        let r = self.call(Opcode::Open, node, &args);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(parse::<OpenOut>(&r.body).fh)
    }

    fn read_msg(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Vec<u8> {
        let args = obj(ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        });
        self.msg(Opcode::Read, node, &args)
    }

    fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let m = self.read_msg(node, fh, offset, size);
        let r = self.send_msg(&m);
        if r.errno != 0 {
            return Err(r.errno);
        }
        Ok(r.body)
    }

    fn release(&mut self, node: u64, fh: u64, op: Opcode) {
        let args = obj(ReleaseIn {
            fh,
            ..Default::default()
        });
        self.ok(op, node, &args);
    }

    fn host(&self, rel: &str) -> PathBuf {
        self.share.path().join(rel)
    }

    fn ino(&self, rel: &str) -> u64 {
        std::fs::symlink_metadata(self.host(rel)).unwrap().ino()
    }

    /// A good request still gets its answer.
    fn still_serves(&mut self) {
        let a = self
            .getattr(ROOT_ID)
            .expect("GETATTR of the root still works");
        assert_eq!(a.ino, self.ino(""));
    }

    /// Every path under the share with its kind, mode, length and contents.
    fn tree(&self) -> Vec<(PathBuf, u32, u64, Vec<u8>)> {
        fn walk(p: &Path, out: &mut Vec<(PathBuf, u32, u64, Vec<u8>)>) {
            let mut names: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            for n in names {
                let m = std::fs::symlink_metadata(&n).unwrap();
                let data = if m.is_file() {
                    std::fs::read(&n).unwrap()
                } else {
                    vec![]
                };
                out.push((n.clone(), m.mode(), m.len(), data));
                if m.is_dir() {
                    walk(&n, out);
                }
            }
        }
        let mut v = Vec::new();
        walk(self.share.path(), &mut v);
        v
    }

    /// Host fds of this process that point into the share (other tests use other directories).
    fn fds_into_share(&self) -> Vec<(String, i32)> {
        let share = self.share.path().to_path_buf();
        let mut v = Vec::new();
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            if !target.starts_with(&share) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{name}")).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(-1);
            v.push((target.to_string_lossy().into_owned(), flags));
        }
        v
    }
}

/// Parses READDIR (plus = false) or READDIRPLUS replies: (name, ino, nodeid, the entry's host
/// ino); READDIR entries carry the host ino themselves.
fn dirents(mut b: &[u8], plus: bool) -> Vec<(Vec<u8>, u64, u64, u64)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let (nodeid, attr_ino, d, head) = if plus {
            let p: Direntplus = parse(b);
            (
                p.entry_out.nodeid,
                p.entry_out.attr.ino,
                p.dirent,
                std::mem::size_of::<Direntplus>(),
            )
        } else {
            let d = parse::<Dirent>(b);
            (0, d.ino, d, std::mem::size_of::<Dirent>())
        };
        let name = b[head..head + d.namelen as usize].to_vec();
        v.push((name, d.ino, nodeid, attr_ino));
        let step = (head + d.namelen as usize + 7) & !7;
        b = &b[step.min(b.len())..];
    }
    v
}

#[test]
fn init_lookup_getattr_statfs() {
    let mut h = Harness::new(Opts::default());
    let out = h.init();
    assert_eq!(
        (out.major, out.minor),
        (KERNEL_VERSION, KERNEL_MINOR_VERSION)
    );
    let flags = FsOptions::from_bits_truncate(u64::from(out.flags));
    assert!(flags.contains(FsOptions::DO_READDIRPLUS));
    // No NFS export support: the guest kernel never turns file handles into lookups.
    assert!(!flags.contains(FsOptions::EXPORT_SUPPORT));
    assert!(
        !flags.contains(FsOptions::WRITEBACK_CACHE),
        "read-only: no writeback"
    );
    assert!(h.mounted_after_init());

    let e = h.lookup(ROOT_ID, b"file.txt").unwrap();
    assert_ne!(e.nodeid, ROOT_ID);
    assert_eq!(e.attr.ino, h.ino("file.txt"));
    assert_eq!(e.attr.size, FILE_LEN as u64);
    assert_eq!(e.entry_valid, 1, "auto cache: one-second entries");
    let a = h.getattr(e.nodeid).unwrap();
    assert_eq!((a.ino, a.size), (e.attr.ino, FILE_LEN as u64));
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(h.getattr(ROOT_ID).unwrap().ino, h.ino(""));
    assert_eq!(h.lookup(ROOT_ID, b"missing").map(|_| ()), Err(libc::ENOENT));

    let st: StatfsOut = parse(&h.ok(Opcode::Statfs, ROOT_ID, &[]));
    let host = nix_statvfs(h.share.path());
    assert_eq!(st.st.blocks, host.f_blocks);
    assert_eq!(st.st.bsize as u64, host.f_bsize);
}

impl Harness {
    fn mounted_after_init(&self) -> bool {
        self.dev.mounted()
    }
}

fn nix_statvfs(p: &Path) -> libc::statvfs64 {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statvfs64>::zeroed();
    // SAFETY: `c` is a valid C string and `st` a writable statvfs64; the result is checked.
    let rc = unsafe { libc::statvfs64(c.as_ptr(), st.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: statvfs64 succeeded, so it filled `st`.
    unsafe { st.assume_init() }
}

#[test]
fn cache_policies_set_the_timeouts_and_direct_io() {
    for (cache, valid, direct) in [
        (CachePolicy::None, 0, true),
        (CachePolicy::Auto, 1, false),
        (CachePolicy::Always, 86_400, false),
    ] {
        let mut h = Harness::new(Opts {
            cache,
            ..Default::default()
        });
        h.init();
        let e = h.lookup(ROOT_ID, b"file.txt").unwrap();
        assert_eq!((e.entry_valid, e.attr_valid), (valid, valid), "{cache:?}");
        let r = h.call(Opcode::Open, e.nodeid, &obj(OpenIn::default()));
        let o: OpenOut = parse(&r.body);
        let flags = OpenOptions::from_bits_truncate(o.open_flags);
        assert_eq!(flags.contains(OpenOptions::DIRECT_IO), direct, "{cache:?}");
        assert_eq!(
            flags.contains(OpenOptions::KEEP_CACHE),
            cache == CachePolicy::Always
        );
    }
}

#[test]
fn reads_are_exact_across_odd_descriptor_splits() {
    let mut h = Harness::new(Opts::default());
    h.init();
    let file = std::fs::read(h.host("file.txt")).unwrap();
    let e = h.lookup(ROOT_ID, b"file.txt").unwrap();
    let fh = h.open(e.nodeid, libc::O_RDONLY).unwrap();
    // One descriptor each way.
    assert_eq!(h.read(e.nodeid, fh, 0, 4096).unwrap(), file[..4096]);
    // A read larger than any one descriptor, the request and the reply split at odd places.
    let (off, size) = (1234u64, 200_000u32);
    let m = h.read_msg(e.nodeid, fh, off, size);
    let r = h
        .send_split(&m, &[3, 50, 7], &[5, 4093, 65_536, 1, 99_999, 13])
        .unwrap();
    assert_eq!(r.errno, 0);
    assert_eq!(r.body.len(), size as usize);
    assert_eq!(
        fnv(&r.body),
        fnv(&file[off as usize..off as usize + size as usize])
    );
    assert_eq!(r.body, file[off as usize..][..size as usize]);
    // Past the end: short, then empty.
    let tail = h.read(e.nodeid, fh, FILE_LEN as u64 - 10, 4096).unwrap();
    assert_eq!(tail, file[FILE_LEN - 10..]);
    assert!(h
        .read(e.nodeid, fh, FILE_LEN as u64 + 5, 4096)
        .unwrap()
        .is_empty());
    // More than the reply room: an error, and the device goes on.
    let m = h.read_msg(e.nodeid, fh, 0, 1 << 20);
    let r = h.send_split(&m, &[], &[4096, 0]);
    assert!(
        r.is_none_or(|r| r.errno != 0),
        "an oversized read is refused"
    );
    h.release(e.nodeid, fh, Opcode::Release);
    // The handle is gone.
    assert_eq!(h.read(e.nodeid, fh, 0, 16), Err(libc::EBADF));
    h.still_serves();
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)
    })
}

/// What the guest kernel offers (Linux 6.12's virtio-fs, the options that matter here).
fn kernel_offer() -> FsOptions {
    FsOptions::ASYNC_READ
        | FsOptions::BIG_WRITES
        | FsOptions::DO_READDIRPLUS
        | FsOptions::READDIRPLUS_AUTO
        | FsOptions::MAX_PAGES
        | FsOptions::PARALLEL_DIROPS
        | FsOptions::ZERO_MESSAGE_OPEN
        | FsOptions::ZERO_MESSAGE_OPENDIR
}

#[test]
fn init_asks_for_large_asynchronous_requests() {
    for read_only in [true, false] {
        let mut h = Harness::new(Opts {
            read_only,
            ..Default::default()
        });
        let out = h.init_with(kernel_offer());
        let got =
            FsOptions::from_bits_truncate(u64::from(out.flags) | (u64::from(out.flags2) << 32));
        let want = FsOptions::ASYNC_READ | FsOptions::MAX_PAGES | FsOptions::PARALLEL_DIROPS;
        assert!(got.contains(want), "read-only={read_only}: {got:?}");
        assert_eq!(out.max_pages, 256, "1 MiB requests");
        assert_eq!(got.contains(FsOptions::BIG_WRITES), !read_only);
        // Opening on the host only goes with the guest caching everything.
        assert!(!got.intersects(FsOptions::ZERO_MESSAGE_OPEN | FsOptions::ZERO_MESSAGE_OPENDIR));
        let e = h.lookup(ROOT_ID, b"file.txt").unwrap();
        assert!(h.open(e.nodeid, libc::O_RDONLY).is_ok());
    }
}

#[test]
fn with_cache_always_files_are_read_without_opening_them() {
    let mut h = Harness::new(Opts {
        cache: CachePolicy::Always,
        ..Default::default()
    });
    let out = h.init_with(kernel_offer());
    let got = FsOptions::from_bits_truncate(u64::from(out.flags) | (u64::from(out.flags2) << 32));
    assert!(got.contains(FsOptions::ZERO_MESSAGE_OPEN | FsOptions::ZERO_MESSAGE_OPENDIR));
    let file = std::fs::read(h.host("file.txt")).unwrap();
    let e = h.lookup(ROOT_ID, b"file.txt").unwrap();
    // OPEN and FLUSH answer ENOSYS, after which the guest kernel sends neither again.
    assert_eq!(h.open(e.nodeid, libc::O_RDONLY), Err(libc::ENOSYS));
    let args = obj(FlushIn::default());
    assert_eq!(h.call(Opcode::Flush, e.nodeid, &args).errno, libc::ENOSYS);
    // READ names no handle (0): the server opens the inode read-only for it.
    assert_eq!(h.read(e.nodeid, 0, 7, 1000).unwrap(), file[7..1007]);
    // Directories likewise: READDIR without OPENDIR.
    let args = obj(ReadIn {
        size: 8192,
        ..Default::default()
    });
    let names: Vec<_> = dirents(&h.ok(Opcode::Readdir, ROOT_ID, &args), false)
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert!(names.contains(&b"file.txt".to_vec()), "{names:?}");
    // Read-only still holds without OPEN to refuse a writable open.
    let w = obj(WriteIn {
        size: 4,
        ..Default::default()
    });
    let m = [w, b"evil".to_vec()].concat();
    let m = h.msg(Opcode::Write, e.nodeid, &m);
    assert_eq!(h.send_msg(&m).errno, libc::EROFS);
    assert_eq!(std::fs::read(h.host("file.txt")).unwrap(), file);
    // Nothing outside the share opens either: a nodeid the guest never looked up is refused.
    assert!(h.read(e.nodeid + 1000, 0, 0, 16).is_err());
    h.still_serves();
}

#[test]
fn readdir_and_readdirplus_list_the_share() {
    let mut h = Harness::new(Opts::default());
    h.init();
    let mut host: Vec<Vec<u8>> = std::fs::read_dir(h.share.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    host.sort();
    for plus in [false, true] {
        let r = h.ok(Opcode::Opendir, ROOT_ID, &obj(OpenIn::default()));
        let fh = parse::<OpenOut>(&r).fh;
        let op = if plus {
            Opcode::Readdirplus
        } else {
            Opcode::Readdir
        };
        let args = obj(ReadIn {
            fh,
            size: 8192,
            ..Default::default()
        });
        let body = h.ok(op, ROOT_ID, &args);
        let ents = dirents(&body, plus);
        let mut names: Vec<_> = ents
            .iter()
            .map(|e| e.0.clone())
            .filter(|n| n != b"." && n != b"..")
            .collect();
        names.sort();
        assert_eq!(names, host, "plus={plus}");
        for (name, ino, nodeid, attr_ino) in &ents {
            if name == b"." || name == b".." {
                continue;
            }
            let rel = std::str::from_utf8(name).unwrap();
            // READDIR may carry the server's inode numbers; READDIRPLUS's entries carry the host's.
            assert_ne!(*ino, 0, "{rel}");
            if plus {
                assert_eq!(*attr_ino, h.ino(rel), "{rel}");
                assert_ne!(*nodeid, 0, "{rel} has a nodeid");
                assert_eq!(*ino, *attr_ino, "{rel}");
                let a = h.getattr(*nodeid).unwrap();
                assert_eq!(a.ino, h.ino(rel), "{rel}: its nodeid is live");
            }
        }
        h.release(ROOT_ID, fh, Opcode::Releasedir);
    }
}

#[test]
fn symlinks_are_text_and_never_followed() {
    let mut h = Harness::new(Opts::default());
    h.init();
    let secret_ino = std::fs::metadata(h.outside.path().join("secret"))
        .unwrap()
        .ino();
    let outside_ino = std::fs::metadata(h.outside.path()).unwrap().ino();
    for name in ["link_abs", "link_rel", "link_dir"] {
        let e = h.lookup(ROOT_ID, name.as_bytes()).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert_eq!(e.attr.ino, h.ino(name));
        assert!(e.attr.ino != secret_ino && e.attr.ino != outside_ino);
        let text = h.ok(Opcode::Readlink, e.nodeid, &[]);
        let host = std::fs::read_link(h.host(name)).unwrap();
        assert_eq!(
            text,
            host.as_os_str().as_bytes(),
            "{name}: READLINK is the link's text"
        );
        for flags in [libc::O_RDONLY, libc::O_RDONLY | libc::O_NOFOLLOW] {
            assert!(
                h.open(e.nodeid, flags).is_err(),
                "{name}: a symlink is never opened"
            );
        }
        assert!(
            h.call(Opcode::Opendir, e.nodeid, &obj(OpenIn::default()))
                .errno
                != 0
        );
        // Lookups through the link do not walk into its target.
        for child in [&b"secret"[..], b".", b".."] {
            match h.lookup(e.nodeid, child) {
                Err(_) => {}
                Ok(c) => panic!("{name}/{child:?} resolved to ino {}", c.attr.ino),
            }
        }
    }
    let dir = h.lookup(ROOT_ID, b"dir").unwrap();
    let up = h.lookup(dir.nodeid, b"link_up").unwrap();
    assert_eq!(
        h.ok(Opcode::Readlink, up.nodeid, &[]),
        b"../../../../../../../../etc"
    );
    assert_eq!(
        h.lookup(up.nodeid, b"passwd").map(|_| ()),
        Err(libc::ENOTDIR)
    );
}

#[test]
fn dot_dot_and_names_cannot_leave_the_share() {
    let mut h = Harness::new(Opts::default());
    h.init();
    let root_ino = h.ino("");
    let parent_ino = std::fs::metadata(h.share.path().parent().unwrap())
        .unwrap()
        .ino();
    // `..` at the root is the root, however often (the guest's export ops send these).
    for _ in 0..3 {
        let e = h.lookup(ROOT_ID, b"..").unwrap();
        assert_eq!((e.nodeid, e.attr.ino), (ROOT_ID, root_ino));
    }
    assert_eq!(h.lookup(ROOT_ID, b".").unwrap().nodeid, ROOT_ID);
    let dir = h.lookup(ROOT_ID, b"dir").unwrap();
    let sub = h.lookup(dir.nodeid, b"sub").unwrap();
    assert_eq!(h.lookup(sub.nodeid, b".").unwrap().nodeid, sub.nodeid);
    let mut node = sub.nodeid;
    for step in 0..5 {
        let e = h.lookup(node, b"..").unwrap();
        assert_ne!(e.attr.ino, parent_ino, "step {step} left the share");
        node = e.nodeid;
    }
    assert_eq!(node, ROOT_ID);
    // Names are single components: no `/`, no NUL inside, not empty.
    let outside = h.outside.path().file_name().unwrap().as_bytes().to_vec();
    let names: Vec<Vec<u8>> = vec![
        [b"../".as_slice(), &outside, b"/secret"].concat(),
        b"dir/inner".to_vec(),
        b"dir/../..".to_vec(),
        b"/".to_vec(),
        b"".to_vec(),
        b"file.txt\0junk".to_vec(),
        b"dir\0/../..".to_vec(),
    ];
    for n in names {
        assert_eq!(
            h.lookup(ROOT_ID, &n).map(|_| ()),
            Err(libc::EINVAL),
            "{n:?}"
        );
    }
    // A name without its NUL.
    let m = h.msg(Opcode::Lookup, ROOT_ID, b"file.txt");
    assert_eq!(h.send_msg(&m).errno, libc::EINVAL);
    // Nodeids the server never gave out.
    for bogus in [0, 2_000_000, u64::MAX] {
        assert!(h.lookup(bogus, b"file.txt").is_err(), "nodeid {bogus}");
        assert!(h.getattr(bogus).is_err(), "nodeid {bogus}");
    }
    h.still_serves();
}

#[test]
fn links_and_nodes_cannot_reach_outside_in_read_write_mode() {
    let mut h = Harness::rw();
    h.init();
    let before_outside = std::fs::read_dir(h.outside.path()).unwrap().count();
    // LINK takes an inode the guest already holds: an unknown one is refused.
    let args = [
        obj(LinkIn {
            oldnodeid: 0xdead_beef,
        }),
        cz(b"stolen"),
    ]
    .concat();
    assert_ne!(h.call(Opcode::Link, ROOT_ID, &args).errno, 0);
    let file = h.lookup(ROOT_ID, b"file.txt").unwrap();
    for bad in [&b"../stolen"[..], b"..", b".", b"a/b"] {
        let args = [
            obj(LinkIn {
                oldnodeid: file.nodeid,
            }),
            cz(bad),
        ]
        .concat();
        assert_eq!(
            h.call(Opcode::Link, ROOT_ID, &args).errno,
            libc::EINVAL,
            "{bad:?}"
        );
    }
    // A link inside works and is the same inode.
    let args = [
        obj(LinkIn {
            oldnodeid: file.nodeid,
        }),
        cz(b"hard"),
    ]
    .concat();
    let e: EntryOut = parse(&h.ok(Opcode::Link, ROOT_ID, &args));
    assert_eq!(e.attr.ino, h.ino("file.txt"));
    // Symlinks may say anything; they are still never followed.
    let args = [
        cz(b"evil"),
        cz(h.outside.path().join("secret").as_os_str().as_bytes()),
    ]
    .concat();
    let e: EntryOut = parse(&h.ok(Opcode::Symlink, ROOT_ID, &args));
    assert!(h.open(e.nodeid, libc::O_RDWR).is_err());
    assert!(h.open(e.nodeid, libc::O_RDONLY).is_err());
    // Device nodes are refused; a FIFO is made but never opened (it would block the VMM).
    let dev = obj(MknodIn {
        mode: libc::S_IFCHR | 0o666,
        rdev: libc::makedev(1, 3) as u32,
        ..Default::default()
    });
    assert_eq!(
        h.call(Opcode::Mknod, ROOT_ID, &[dev, cz(b"null")].concat())
            .errno,
        libc::EPERM
    );
    assert!(!h.host("null").exists());
    let fifo = obj(MknodIn {
        mode: libc::S_IFIFO | 0o666,
        ..Default::default()
    });
    let e: EntryOut = parse(&h.ok(Opcode::Mknod, ROOT_ID, &[fifo, cz(b"fifo")].concat()));
    assert!(h.open(e.nodeid, libc::O_RDONLY).is_err());
    // RENAME cannot move anything out, nor name `..`.
    let dir = h.lookup(ROOT_ID, b"dir").unwrap();
    for (old, new) in [
        (&b"file.txt"[..], &b"../x"[..]),
        (b"..", b"x"),
        (b"dir", b".."),
    ] {
        let args = [obj(RenameIn { newdir: dir.nodeid }), cz(old), cz(new)].concat();
        assert_eq!(
            h.call(Opcode::Rename, ROOT_ID, &args).errno,
            libc::EINVAL,
            "{old:?}->{new:?}"
        );
    }
    assert_eq!(
        std::fs::read_dir(h.outside.path()).unwrap().count(),
        before_outside
    );
    assert_eq!(
        std::fs::read(h.outside.path().join("secret")).unwrap(),
        b"host secret"
    );
}

#[test]
fn a_rename_race_never_resolves_outside_the_share() {
    let mut h = Harness::rw();
    h.init();
    let s = h.share.path().to_path_buf();
    std::fs::create_dir_all(s.join("d1/d2/d3")).unwrap();
    std::fs::create_dir_all(s.join("x/y")).unwrap();
    let inside: HashSet<u64> = ["", "d1", "d1/d2", "d1/d2/d3", "x", "x/y", "dir", "dir/sub"]
        .iter()
        .map(|p| h.ino(p))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mover = {
        let (stop, s) = (stop.clone(), s.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            // Bounded: the guest side stops it, or it gives up after many moves.
            while !stop.load(Ordering::Relaxed) && n < 2_000_000 {
                let (a, b) = if n % 2 == 0 {
                    (s.join("d1"), s.join("x/y/d1"))
                } else {
                    (s.join("x/y/d1"), s.join("d1"))
                };
                if std::fs::rename(&a, &b).is_ok() {
                    n += 1;
                }
            }
            n
        })
    };
    let x = h.lookup(ROOT_ID, b"x").unwrap();
    let y = h.lookup(x.nodeid, b"y").unwrap();
    let (mut walks, mut steps) = (0, 0);
    for i in 0..400 {
        let base = if i % 2 == 0 { ROOT_ID } else { y.nodeid };
        let Ok(d1) = h.lookup(base, b"d1") else {
            continue;
        };
        let Ok(d2) = h.lookup(d1.nodeid, b"d2") else {
            continue;
        };
        let Ok(d3) = h.lookup(d2.nodeid, b"d3") else {
            continue;
        };
        walks += 1;
        let mut node = d3.nodeid;
        for _ in 0..7 {
            match h.lookup(node, b"..") {
                Ok(e) => {
                    assert!(
                        inside.contains(&e.attr.ino),
                        "`..` walk reached ino {} outside",
                        e.attr.ino
                    );
                    node = e.nodeid;
                    steps += 1;
                }
                Err(_) => break,
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let moves = mover.join().unwrap();
    assert!(moves > 0, "the directories moved during the walks");
    assert!(
        walks > 10 && steps > 50,
        "walks {walks}, steps {steps}: the race was exercised"
    );
    // Host fds the server holds all point inside the share.
    assert!(!h.fds_into_share().is_empty());
    h.still_serves();
}

#[test]
fn xattrs_served_only_when_enabled() {
    for xattr in [true, false] {
        let mut h = Harness::new(Opts {
            xattr,
            ..Default::default()
        });
        h.init();
        let path = CString::new(h.host("file.txt").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C strings and a valid buffer; the result is checked.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"user.rund".as_ptr(),
                b"v1".as_ptr().cast(),
                2,
                0,
            )
        };
        assert_eq!(rc, 0, "host setxattr");
        let e = h.lookup(ROOT_ID, b"file.txt").unwrap();
        let get = |h: &mut Harness, size| {
            let args = [obj(GetxattrIn { size, padding: 0 }), cz(b"user.rund")].concat();
            h.call(Opcode::Getxattr, e.nodeid, &args)
        };
        let list = |h: &mut Harness, size| {
            h.call(
                Opcode::Listxattr,
                e.nodeid,
                &obj(GetxattrIn { size, padding: 0 }),
            )
        };
        if xattr {
            let r = get(&mut h, 0);
            assert_eq!((r.errno, parse::<GetxattrOut>(&r.body).size), (0, 2));
            assert_eq!(get(&mut h, 64).body, b"v1");
            let r = list(&mut h, 0);
            assert_eq!(r.errno, 0);
            let r = list(&mut h, 256);
            assert!(
                r.body.split(|&c| c == 0).any(|n| n == b"user.rund"),
                "{:?}",
                r.body
            );
            let args = [
                obj(GetxattrIn {
                    size: 64,
                    padding: 0,
                }),
                cz(b"user.none"),
            ]
            .concat();
            assert_eq!(
                h.call(Opcode::Getxattr, e.nodeid, &args).errno,
                libc::ENODATA
            );
        } else {
            assert_eq!(get(&mut h, 64).errno, libc::ENOSYS);
            assert_eq!(list(&mut h, 256).errno, libc::ENOSYS);
        }
    }
}

#[test]
fn forget_and_batch_forget_on_the_hiprio_queue() {
    let mut h = Harness::new(Opts::default());
    h.init();
    let a = h.lookup(ROOT_ID, b"file.txt").unwrap();
    assert_eq!(h.lookup(ROOT_ID, b"file.txt").unwrap().nodeid, a.nodeid);
    let forget = |h: &mut Harness, node, n| {
        let m = h.msg(Opcode::Forget, node, &obj(ForgetIn { nlookup: n }));
        h.put(IN, &m);
        h.run_linear(true, &[(IN, m.len() as u32, R)])
    };
    assert_eq!(forget(&mut h, a.nodeid, 1), 0, "FORGET takes no reply");
    assert!(h.getattr(a.nodeid).is_ok(), "one lookup left");
    forget(&mut h, a.nodeid, 1);
    assert_eq!(
        h.getattr(a.nodeid).map(|_| ()),
        Err(libc::EBADF),
        "forgotten"
    );
    // The root is never forgotten.
    forget(&mut h, ROOT_ID, 100);
    h.still_serves();
    let d = h.lookup(ROOT_ID, b"dir").unwrap();
    let f = h.lookup(ROOT_ID, b"file.txt").unwrap();
    let args = [
        obj(BatchForgetIn { count: 2, dummy: 0 }),
        obj(ForgetOne {
            nodeid: d.nodeid,
            nlookup: 1,
        }),
        obj(ForgetOne {
            nodeid: f.nodeid,
            nlookup: 1,
        }),
    ]
    .concat();
    let m = h.msg(Opcode::BatchForget, 0, &args);
    h.put(IN, &m);
    assert_eq!(h.run_linear(true, &[(IN, m.len() as u32, R)]), 0);
    assert!(h.getattr(d.nodeid).is_err() && h.getattr(f.nodeid).is_err());
    // A batch claiming more entries than it carries is dropped.
    let args = [
        obj(BatchForgetIn {
            count: 1000,
            dummy: 0,
        }),
        obj(ForgetOne::default()),
    ]
    .concat();
    let m = h.msg(Opcode::BatchForget, 0, &args);
    h.put(IN, &m);
    assert_eq!(h.run_linear(true, &[(IN, m.len() as u32, R)]), 0);
    h.still_serves();
}

#[test]
fn read_write_mode_creates_writes_renames_and_removes() {
    let mut h = Harness::rw();
    let out = h.init();
    let flags = FsOptions::from_bits_truncate(u64::from(out.flags));
    assert!(
        !flags.contains(FsOptions::WRITEBACK_CACHE),
        "writeback is never enabled"
    );
    let args = [
        obj(CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT) as u32,
            mode: libc::S_IFREG | 0o640,
            umask: 0,
            fuse_flags: 0,
        }),
        cz(b"new.txt"),
    ]
    .concat();
    let body = h.ok(Opcode::Create, ROOT_ID, &args);
    let e: EntryOut = parse(&body);
    let o: OpenOut = parse(&body[std::mem::size_of::<EntryOut>()..]);
    let data = pattern(10_007, 3);
    let args = [
        obj(WriteIn {
            fh: o.fh,
            offset: 0,
            size: data.len() as u32,
            ..Default::default()
        }),
        data.clone(),
    ]
    .concat();
    let m = h.msg(Opcode::Write, e.nodeid, &args);
    let r = h.send_split(&m, &[40, 41, 999], &[]).unwrap();
    assert_eq!(
        (r.errno, parse::<WriteOut>(&r.body).size),
        (0, data.len() as u32)
    );
    h.release(e.nodeid, o.fh, Opcode::Release);
    assert_eq!(std::fs::read(h.host("new.txt")).unwrap(), data);
    assert_eq!(
        std::fs::metadata(h.host("new.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );

    let args = [
        obj(MkdirIn {
            mode: 0o755,
            umask: 0,
        }),
        cz(b"nd"),
    ]
    .concat();
    let nd: EntryOut = parse(&h.ok(Opcode::Mkdir, ROOT_ID, &args));
    assert!(h.host("nd").is_dir());
    let args = [
        obj(RenameIn { newdir: nd.nodeid }),
        cz(b"new.txt"),
        cz(b"moved.txt"),
    ]
    .concat();
    h.ok(Opcode::Rename, ROOT_ID, &args);
    assert!(!h.host("new.txt").exists());
    assert_eq!(std::fs::read(h.host("nd/moved.txt")).unwrap(), data);
    h.ok(Opcode::Unlink, nd.nodeid, &cz(b"moved.txt"));
    assert!(!h.host("nd/moved.txt").exists());
    h.ok(Opcode::Rmdir, ROOT_ID, &cz(b"nd"));
    assert!(!h.host("nd").exists());
}

#[test]
fn read_only_refuses_every_mutation_and_opens_read_only() {
    let mut h = Harness::new(Opts {
        xattr: true,
        ..Default::default()
    });
    h.init();
    let before = h.tree();
    let f = h.lookup(ROOT_ID, b"file.txt").unwrap();
    let dir = h.lookup(ROOT_ID, b"dir").unwrap();
    let fh = h.open(f.nodeid, libc::O_RDONLY).unwrap();
    let setattr = obj(SetattrIn {
        valid: (SetattrValid::SIZE | SetattrValid::MODE).bits(),
        size: 0,
        mode: 0o777,
        ..Default::default()
    });
    let cases: Vec<(&str, Opcode, u64, Vec<u8>)> = vec![
        ("setattr", Opcode::Setattr, f.nodeid, setattr),
        (
            "symlink",
            Opcode::Symlink,
            ROOT_ID,
            [cz(b"s"), cz(b"file.txt")].concat(),
        ),
        (
            "mknod",
            Opcode::Mknod,
            ROOT_ID,
            [
                obj(MknodIn {
                    mode: libc::S_IFREG | 0o644,
                    ..Default::default()
                }),
                cz(b"n"),
            ]
            .concat(),
        ),
        (
            "mkdir",
            Opcode::Mkdir,
            ROOT_ID,
            [
                obj(MkdirIn {
                    mode: 0o755,
                    umask: 0,
                }),
                cz(b"m"),
            ]
            .concat(),
        ),
        ("unlink", Opcode::Unlink, ROOT_ID, cz(b"file.txt")),
        ("rmdir", Opcode::Rmdir, dir.nodeid, cz(b"sub")),
        (
            "rename",
            Opcode::Rename,
            ROOT_ID,
            [obj(RenameIn { newdir: ROOT_ID }), cz(b"file.txt"), cz(b"r")].concat(),
        ),
        (
            "rename2",
            Opcode::Rename2,
            ROOT_ID,
            [
                obj(Rename2In {
                    newdir: ROOT_ID,
                    flags: 0,
                    padding: 0,
                }),
                cz(b"file.txt"),
                cz(b"r"),
            ]
            .concat(),
        ),
        (
            "link",
            Opcode::Link,
            ROOT_ID,
            [
                obj(LinkIn {
                    oldnodeid: f.nodeid,
                }),
                cz(b"l"),
            ]
            .concat(),
        ),
        (
            "open wronly",
            Opcode::Open,
            f.nodeid,
            obj(OpenIn {
                flags: libc::O_WRONLY as u32,
                fuse_flags: 0,
            }),
        ),
        (
            "open rdwr",
            Opcode::Open,
            f.nodeid,
            obj(OpenIn {
                flags: libc::O_RDWR as u32,
                fuse_flags: 0,
            }),
        ),
        (
            "open trunc",
            Opcode::Open,
            f.nodeid,
            obj(OpenIn {
                flags: libc::O_TRUNC as u32,
                fuse_flags: 0,
            }),
        ),
        (
            "create",
            Opcode::Create,
            ROOT_ID,
            [
                obj(CreateIn {
                    flags: (libc::O_RDWR | libc::O_CREAT) as u32,
                    mode: libc::S_IFREG | 0o644,
                    ..Default::default()
                }),
                cz(b"c"),
            ]
            .concat(),
        ),
        (
            "write",
            Opcode::Write,
            f.nodeid,
            [
                obj(WriteIn {
                    fh,
                    size: 4,
                    ..Default::default()
                }),
                b"oops".to_vec(),
            ]
            .concat(),
        ),
        (
            "setxattr",
            Opcode::Setxattr,
            f.nodeid,
            [
                obj(SetxattrIn { size: 1, flags: 0 }),
                cz(b"user.x"),
                b"v".to_vec(),
            ]
            .concat(),
        ),
        ("removexattr", Opcode::Removexattr, f.nodeid, cz(b"user.x")),
        (
            "fallocate",
            Opcode::Fallocate,
            f.nodeid,
            obj(FallocateIn {
                fh,
                offset: 0,
                length: 1 << 20,
                mode: 0,
                padding: 0,
            }),
        ),
        (
            "copy_file_range",
            Opcode::CopyFileRange,
            f.nodeid,
            vec![0; 56],
        ),
        (
            "access w",
            Opcode::Access,
            f.nodeid,
            obj(AccessIn {
                mask: libc::W_OK as u32,
                padding: 0,
            }),
        ),
    ];
    for (name, op, node, args) in cases {
        assert_eq!(h.call(op, node, &args).errno, libc::EROFS, "{name}");
        assert_eq!(h.tree(), before, "{name}: the share is unchanged");
    }
    // Reading still works, and every host fd onto the file is read-only.
    assert_eq!(h.read(f.nodeid, fh, 0, 4).unwrap(), pattern(4, 0x5a));
    let file = h.host("file.txt").to_string_lossy().into_owned();
    let fds: Vec<_> = h
        .fds_into_share()
        .into_iter()
        .filter(|(p, fl)| *p == file && fl & libc::O_PATH == 0)
        .collect();
    assert!(!fds.is_empty(), "the open file has a host fd");
    for (_, fl) in fds {
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    }
    assert_eq!(
        h.call(
            Opcode::Access,
            f.nodeid,
            &obj(AccessIn {
                mask: libc::R_OK as u32,
                padding: 0
            })
        )
        .errno,
        0
    );
}

#[test]
fn malformed_chains_fail_alone() {
    let mut h = Harness::rw();
    h.init();
    let good = |h: &mut Harness| h.msg(Opcode::Getattr, ROOT_ID, &obj(GetattrIn::default()));
    // (name, chain) pairs that must be dropped with nothing written.
    let m = good(&mut h);
    h.put(IN, &m);
    let l = m.len() as u32;
    let end = MEM_SIZE;
    type Chain = Vec<(u64, u32, u16)>;
    let dropped: Vec<(&str, Chain)> = vec![
        ("zero-length header", vec![(IN, 0, R), (OUT, 4096, W)]),
        ("zero-length chain", vec![(IN, 0, R)]),
        (
            "header outside memory",
            vec![(end - 8, l, R), (OUT, 4096, W)],
        ),
        (
            "header far outside",
            vec![(u64::MAX - 10, l, R), (OUT, 4096, W)],
        ),
        ("reply outside memory", vec![(IN, l, R), (end - 4, 4096, W)]),
        ("header writable", vec![(IN, l, W), (OUT, 4096, W)]),
        ("reply readable", vec![(IN, l, R), (OUT, 4096, R)]),
        (
            "readable after writable",
            vec![(IN, 20, R), (OUT, 4096, W), (IN + 20, l - 20, R)],
        ),
        (
            "header shorter than its struct",
            vec![(IN, 39, R), (OUT, 4096, W)],
        ),
        (
            "reply shorter than an out-header",
            vec![(IN, l, R), (OUT, 15, W)],
        ),
    ];
    for (name, chain) in dropped {
        h.put(OUT, &[0xee; 16]);
        assert_eq!(h.run_linear(false, &chain), 0, "{name}: dropped");
        assert_eq!(h.get(OUT, 16), [0xee; 16], "{name}: nothing written");
        h.still_serves();
    }
    // A mutating request whose reply cannot be written is not run.
    let m = h.msg(
        Opcode::Mkdir,
        ROOT_ID,
        &[
            obj(MkdirIn {
                mode: 0o755,
                umask: 0,
            }),
            cz(b"ghost"),
        ]
        .concat(),
    );
    h.put(IN, &m);
    assert_eq!(
        h.run_linear(false, &[(IN, m.len() as u32, R), (OUT, 4096, R)]),
        0
    );
    assert!(!h.host("ghost").exists());
    // ... nor one with room for an error but not for its entry.
    let r = h.send_split(&m, &[], &[16, 0]).unwrap();
    assert_eq!(r.errno, libc::EINVAL);
    assert!(!h.host("ghost").exists());

    // A loop: two descriptors pointing at each other.
    let m = good(&mut h);
    h.put(IN, &m);
    assert_eq!(
        h.run(
            false,
            &[(IN, m.len() as u32, R | N, 1), (OUT, 4096, W | N, 0)]
        ),
        0,
        "loop"
    );
    h.still_serves();
    // A next index outside the table.
    assert_eq!(
        h.run(false, &[(IN, m.len() as u32, R | N, 200)]),
        0,
        "next outside"
    );
    h.still_serves();
    // More descriptors than the queue holds, through an indirect table.
    let table = 0x8_0000u64;
    let count = QSIZE + 4;
    for i in 0..count {
        let (a, l, f) = if i == 0 {
            (IN, m.len() as u32, R)
        } else {
            (OUT + 64 * u64::from(i), 64, W)
        };
        let f = if i + 1 < count { f | N } else { f };
        h.mem
            .write_obj(
                RawDescriptor::from(SplitDescriptor::new(a, l, f, i + 1)),
                GuestAddress(table + 16 * u64::from(i)),
            )
            .unwrap();
    }
    let ind = VRING_DESC_F_INDIRECT as u16;
    assert_eq!(
        h.run(false, &[(table, 16 * u32::from(count), ind, 0)]),
        0,
        "overlong"
    );
    h.still_serves();
    // The same indirect table, short enough, is served.
    h.mem
        .write_obj(
            RawDescriptor::from(SplitDescriptor::new(OUT, 4096, W, 0)),
            GuestAddress(table + 16),
        )
        .unwrap();
    let m = good(&mut h);
    h.put(IN, &m);
    h.mem
        .write_obj(
            RawDescriptor::from(SplitDescriptor::new(IN, m.len() as u32, R | N, 1)),
            GuestAddress(table),
        )
        .unwrap();
    assert_eq!(
        h.run(false, &[(table, 32, ind, 0)]),
        16 + std::mem::size_of::<AttrOut>() as u32
    );

    // Requests that get an error reply.
    let replied: Vec<(&str, Vec<u8>, i32)> = vec![
        ("opcode 0", h.msg_len(0, ROOT_ID, &[], None), libc::ENOSYS),
        (
            "opcode 7 (a gap)",
            h.msg_len(7, ROOT_ID, &[], None),
            libc::ENOSYS,
        ),
        (
            "opcode 19 (a gap)",
            h.msg_len(19, ROOT_ID, &[], None),
            libc::ENOSYS,
        ),
        ("opcode 50", h.msg_len(50, ROOT_ID, &[], None), libc::ENOSYS),
        (
            "opcode u32::MAX",
            h.msg_len(u32::MAX, ROOT_ID, &[0; 64], None),
            libc::ENOSYS,
        ),
        (
            "READ args short",
            h.msg(Opcode::Read, ROOT_ID, &[0; 20]),
            libc::EINVAL,
        ),
        (
            "GETATTR args missing",
            h.msg(Opcode::Getattr, ROOT_ID, &[]),
            libc::EINVAL,
        ),
        (
            "INIT args short",
            h.msg(Opcode::Init, 0, &[7, 0, 0, 0]),
            libc::EINVAL,
        ),
        (
            "len claims more",
            h.msg_len(Opcode::Lookup as u32, ROOT_ID, &cz(b"dir"), Some(40 + 1000)),
            libc::EINVAL,
        ),
        (
            "len below the header",
            h.msg_len(Opcode::Lookup as u32, ROOT_ID, &cz(b"dir"), Some(12)),
            libc::EINVAL,
        ),
        (
            "len cuts the name's NUL",
            h.msg_len(Opcode::Lookup as u32, ROOT_ID, &cz(b"dir"), Some(43)),
            libc::EINVAL,
        ),
        (
            "len hides a second name",
            h.msg_len(
                Opcode::Rename as u32,
                ROOT_ID,
                &[obj(RenameIn { newdir: 1 }), cz(b"dir"), cz(b"x")].concat(),
                Some(40 + 8 + 4),
            ),
            libc::EINVAL,
        ),
        (
            "name too long",
            h.msg(Opcode::Lookup, ROOT_ID, &cz(&[b'a'; 9000])),
            libc::ENAMETOOLONG,
        ),
    ];
    for (name, m, errno) in replied {
        let r = h
            .send_split(&m, &[], &[4096, 0])
            .unwrap_or_else(|| panic!("{name}: a reply"));
        assert_eq!((r.errno, r.body.len()), (errno, 0), "{name}");
        h.still_serves();
    }
    // A malformed FORGET takes no reply: dropped.
    let m = h.msg(Opcode::Forget, ROOT_ID, &[1, 2]);
    h.put(IN, &m);
    assert_eq!(h.run_linear(true, &[(IN, m.len() as u32, R)]), 0);
    h.still_serves();
    // A bogus available index stalls nothing.
    let before = h.rq.used_idx();
    h.rq.set_avail_idx(h.rq.avail_idx().wrapping_add(QSIZE + 5));
    h.dev.process_queues();
    assert_eq!(h.rq.used_idx(), before);
}

#[test]
fn one_interrupt_per_pass_and_event_idx() {
    let mut h = Harness::new(Opts {
        acked: features::EVENT_IDX,
        ..Default::default()
    });
    h.hi.set_used_event(0);
    h.rq.set_used_event(0);
    h.init();
    assert_eq!(h.irq.read().unwrap(), 1);
    // Two requests and a FORGET in one pass: one interrupt.
    let g = h.msg(Opcode::Getattr, ROOT_ID, &obj(GetattrIn::default()));
    h.put(IN, &g);
    h.rq.push(&[(IN, g.len() as u32, R | N, 1), (OUT, 4096, W, 0)], 0);
    h.rq.push(
        &[(IN, g.len() as u32, R | N, 3), (OUT + 8192, 4096, W, 0)],
        2,
    );
    let f = h.msg(Opcode::Forget, ROOT_ID, &obj(ForgetIn { nlookup: 1 }));
    h.put(IN + 4096, &f);
    h.hi.push(&[(IN + 4096, f.len() as u32, R, 0)], 0);
    h.hi.set_used_event(0);
    h.rq.set_used_event(1);
    h.dev.process_queues();
    assert_eq!((h.rq.used_idx(), h.hi.used_idx()), (3, 1));
    assert_eq!(h.irq.read().unwrap(), 1, "one interrupt for the pass");
    // The driver wants to hear only after entry 10: silence.
    h.rq.set_used_event(10);
    h.hi.set_used_event(10);
    h.rq.push(&[(IN, g.len() as u32, R | N, 1), (OUT, 4096, W, 0)], 0);
    h.dev.process_queues();
    assert_eq!(h.rq.used_idx(), 4);
    assert!(h.irq.read().is_err(), "suppressed by used_event");
}

#[test]
fn new_refuses_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let cfg = |tag: &str, p: &Path| FsConfig {
        tag: tag.into(),
        shared_dir: p.to_path_buf(),
        read_only: true,
        cache: CachePolicy::Always,
        xattr: false,
        ids: GuestIds::any(),
    };
    assert!(matches!(
        Fs::new(cfg("", dir.path())),
        Err(FsError::EmptyTag)
    ));
    let long = "t".repeat(TAG_LEN + 1);
    assert!(matches!(
        Fs::new(cfg(&long, dir.path())),
        Err(FsError::TagTooLong { len: 37, .. })
    ));
    assert!(matches!(
        Fs::new(cfg("a\0b", dir.path())),
        Err(FsError::TagNul(_))
    ));
    let missing = dir.path().join("missing");
    let e = Fs::new(cfg("t", &missing)).unwrap_err();
    assert!(
        matches!(e, FsError::SharedDir { .. }) && e.to_string().contains("missing"),
        "{e}"
    );
    assert!(matches!(
        Fs::new(cfg("t", &file)),
        Err(FsError::NotADirectory(_))
    ));
    let full = "t".repeat(TAG_LEN);
    let dev = Fs::new(cfg(&full, dir.path())).unwrap();
    assert_eq!(dev.device_type(), FS_DEVICE_ID);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    let mut c = [0u8; 40];
    dev.read_config(0, &mut c);
    assert_eq!(&c[..TAG_LEN], full.as_bytes());
    assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 1);
    let short = Fs::new(cfg("myfs", dir.path())).unwrap();
    let mut c = [0xffu8; 8];
    short.read_config(2, &mut c);
    assert_eq!(&c, b"fs\0\0\0\0\0\0");
    assert_eq!("always".parse::<CachePolicy>(), Ok(CachePolicy::Always));
    assert!("sometimes".parse::<CachePolicy>().is_err());
}

#[test]
fn state_round_trips_and_refuses_a_mounted_share() {
    let mut h = Harness::new(Opts {
        acked: features::EVENT_IDX,
        ..Default::default()
    });
    let saved = h.dev.save_state().expect("not mounted yet");
    let s: FsState = serde_json::from_value(saved.clone()).unwrap();
    assert_eq!(
        (s.tag.as_str(), s.read_only, s.cache, s.xattr),
        ("rundfs", true, CachePolicy::Auto, false)
    );
    assert_eq!(
        (s.acked_features, s.queues.len(), s.activated),
        (features::EVENT_IDX, 2, true)
    );
    h.init();
    let e = h.lookup(ROOT_ID, b"file.txt").unwrap();
    let _fh = h.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert!(matches!(h.dev.save_state(), Err(DeviceStateError::Busy(_))));
    // Restores check the device they go into.
    let mk = |tag: &str, ro: bool, cache| {
        Fs::new(FsConfig {
            tag: tag.into(),
            shared_dir: h.share.path().to_path_buf(),
            read_only: ro,
            cache,
            xattr: false,
            ids: GuestIds::any(),
        })
        .unwrap()
    };
    mk("rundfs", true, CachePolicy::Auto)
        .restore_state(&saved)
        .unwrap();
    for (tag, ro, cache) in [
        ("other", true, CachePolicy::Auto),
        ("rundfs", false, CachePolicy::Auto),
        ("rundfs", true, CachePolicy::Always),
    ] {
        assert!(
            matches!(
                mk(tag, ro, cache).restore_state(&saved),
                Err(DeviceStateError::Mismatch(_))
            ),
            "{tag} {ro} {cache:?}"
        );
    }
    assert!(matches!(
        mk("rundfs", true, CachePolicy::Auto).restore_state(&serde_json::json!({"tag": 1})),
        Err(DeviceStateError::Format(_))
    ));
    assert!(matches!(
        h.dev.restore_state(&saved),
        Err(DeviceStateError::Busy(_))
    ));
    // A reset closes every host fd the server held.
    assert!(!h.fds_into_share().is_empty());
    h.dev.reset();
    assert_eq!(h.fds_into_share(), vec![]);
    let s = h.dev.state();
    assert!(!s.activated && s.queues.is_empty() && s.acked_features == 0);
    assert!(h.dev.save_state().is_ok(), "unmounted after reset");
}

mod transport {
    //! The device behind the real virtio-mmio transport and event loop, as the VMM runs it.
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::{reg, MmioTransport};
    use crate::devices::virtio::test_utils::{bring_up, read_reg, run_until, write_reg};
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;

    #[test]
    fn served_through_mmio_and_the_event_loop_across_a_reset() {
        let share = tempfile::tempdir().unwrap();
        let data = pattern(70_001, 9);
        std::fs::write(share.path().join("f"), &data).unwrap();
        let mem = crate::memory::map_ram(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let dev = Arc::new(Mutex::new(
            Fs::new(FsConfig {
                tag: "layer0".into(),
                shared_dir: share.path().to_path_buf(),
                read_only: true,
                cache: CachePolicy::Always,
                xattr: false,
                ids: GuestIds::any(),
            })
            .unwrap(),
        ));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(dev.clone(), mem.clone(), irq.try_clone().unwrap()).unwrap();
        let mut em = EventManager::<Arc<Mutex<Fs>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        assert_eq!(read_reg(&mut t, reg::DEVICE_ID), FS_DEVICE_ID);
        let mut tag = [0u8; 8];
        t.read(reg::CONFIG, &mut tag);
        assert_eq!(&tag, b"layer0\0\0");

        let hi = QueueDriver::new(&mem, HIPRIO, QSIZE);
        let rq = QueueDriver::new(&mem, REQ, QSIZE);
        let mut unique = 0u64;
        let mut send = |op: Opcode, nodeid: u64, args: &[u8], out: u32| {
            unique += 1;
            let h = InHeader {
                len: (40 + args.len()) as u32,
                opcode: op as u32,
                unique,
                nodeid,
                ..Default::default()
            };
            let m = [h.as_slice(), args].concat();
            mem.write_slice(&m, GuestAddress(IN)).unwrap();
            rq.push(&[(IN, m.len() as u32, R | N, 1), (OUT, out, W, 0)], 0);
            unique
        };
        for round in 0..2 {
            bring_up(&mut t, &[&hi, &rq]);
            // The VMM thread registers the queue notifiers.
            let registered = || dev.lock().unwrap().common.is_registered();
            run_until(&mut em, registered, "registration");
            let mut replies = 0u16;
            let mut call = |em: &mut EventManager<_>, op, nodeid, args: &[u8], out| {
                let u = send(op, nodeid, args, out);
                // What KVM's ioeventfd does on a QueueNotify write of queue 1.
                t.queue_notifiers()[1].write(1).unwrap();
                replies += 1;
                run_until(em, || rq.used_idx() == replies, "a reply");
                let len = rq.used_elem(replies - 1).1 as usize;
                let mut b = vec![0u8; len];
                mem.read_slice(&mut b, GuestAddress(OUT)).unwrap();
                let oh: OutHeader = parse(&b);
                assert_eq!(
                    (oh.unique, oh.error, oh.len as usize),
                    (u, 0, len),
                    "round {round}: {op:?}"
                );
                b[16..].to_vec()
            };
            let init = obj(InitIn {
                major: KERNEL_VERSION,
                minor: KERNEL_MINOR_VERSION,
                max_readahead: 0,
                flags: 0,
            });
            call(&mut em, Opcode::Init, 0, &init, 4096);
            let e: EntryOut = parse(&call(&mut em, Opcode::Lookup, ROOT_ID, &cz(b"f"), 4096));
            let o: OpenOut = parse(&call(
                &mut em,
                Opcode::Open,
                e.nodeid,
                &obj(OpenIn::default()),
                4096,
            ));
            let read = obj(ReadIn {
                fh: o.fh,
                offset: 3,
                size: 65_536,
                ..Default::default()
            });
            let got = call(&mut em, Opcode::Read, e.nodeid, &read, 0x2_0000);
            assert_eq!(got, data[3..3 + 65_536], "round {round}");
            assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS) & 1, 1);
            assert!(irq.read().unwrap() >= 1);
            write_reg(&mut t, reg::INTERRUPT_ACK, 1);
            assert!(dev.lock().unwrap().mounted());
            // The driver resets the device; the VMM thread retires the notifiers, the server
            // and its host fds are gone.
            write_reg(&mut t, reg::STATUS, 0);
            run_until(
                &mut em,
                || !dev.lock().unwrap().common.has_retired(),
                "retirement",
            );
            assert!(!dev.lock().unwrap().state().activated);
            assert!(dev.lock().unwrap().save_state().is_ok());
            // A stale notification after the reset reaches nobody.
            t.queue_notifiers()[1].write(1).unwrap();
            em.run_with_timeout(10).unwrap();
            let _ = t.queue_notifiers()[1].read();
            hi.clear();
            rq.clear();
        }
    }
}

fn create_args(name: &[u8], mode: u32) -> Vec<u8> {
    [
        obj(CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT | libc::O_EXCL) as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        }),
        cz(name),
    ]
    .concat()
}

fn mkdir_args(name: &[u8], mode: u32) -> Vec<u8> {
    [obj(MkdirIn { mode, umask: 0 }), cz(name)].concat()
}

fn setattr_args(valid: SetattrValid, f: impl FnOnce(&mut SetattrIn)) -> Vec<u8> {
    let mut a = SetattrIn {
        valid: valid.bits(),
        ..Default::default()
    };
    f(&mut a);
    obj(a)
}

#[test]
fn files_are_made_and_owned_only_as_the_ids_the_host_allows() {
    let ids = GuestIds::none();
    ids.allow_process(1000, 1000, &[2000]).unwrap();
    let mut h = Harness::new(Opts {
        read_only: false,
        ids: ids.clone(),
        ..Default::default()
    });
    // A volume the pod's user may write to (host permissions still count).
    std::fs::set_permissions(h.share.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    h.init();
    let before = h.tree();
    // The guest says it is root: the pod never runs as root, so nothing is made.
    let fifo = [
        obj(MknodIn {
            mode: libc::S_IFIFO | 0o644,
            ..Default::default()
        }),
        cz(b"p"),
    ]
    .concat();
    for (what, op, args) in [
        ("create", Opcode::Create, create_args(b"r", 0o644)),
        ("mkdir", Opcode::Mkdir, mkdir_args(b"d", 0o755)),
        ("mknod", Opcode::Mknod, fifo),
        (
            "symlink",
            Opcode::Symlink,
            [cz(b"s"), cz(b"file.txt")].concat(),
        ),
    ] {
        assert_eq!(h.call(op, ROOT_ID, &args).errno, libc::EPERM, "{what}");
    }
    // An allowed uid with a group the pod does not have.
    h.creds = (1000, 0);
    assert_eq!(
        h.call(Opcode::Create, ROOT_ID, &create_args(b"r", 0o644))
            .errno,
        libc::EPERM
    );
    assert_eq!(h.tree(), before, "nothing was made");

    // The pod's own ids: made, and owned by them on the host.
    h.creds = (1000, 2000);
    let body = h.ok(Opcode::Create, ROOT_ID, &create_args(b"mine", 0o644));
    let e: EntryOut = parse(&body);
    let md = std::fs::metadata(h.host("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 2000));

    // A SETATTR gives a file only to an allowed owner and group.
    for (valid, uid, gid) in [
        (SetattrValid::UID, 0, 0),
        (SetattrValid::GID, 1000, 0),
        (SetattrValid::UID | SetattrValid::GID, 4242, 1000),
    ] {
        let args = setattr_args(valid, |a| {
            a.uid = uid;
            a.gid = gid;
        });
        assert_eq!(
            h.call(Opcode::Setattr, e.nodeid, &args).errno,
            libc::EPERM,
            "chown {uid}:{gid}"
        );
    }
    let md = std::fs::metadata(h.host("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 2000));
    let args = setattr_args(SetattrValid::GID, |a| a.gid = 1000);
    h.ok(Opcode::Setattr, e.nodeid, &args);
    assert_eq!(std::fs::metadata(h.host("mine")).unwrap().gid(), 1000);

    // Once one of the pod's processes runs as root, any id counts, as under runc.
    ids.allow_process(0, 0, &[]).unwrap();
    h.creds = (0, 0);
    h.ok(Opcode::Mkdir, ROOT_ID, &mkdir_args(b"rootdir", 0o755));
    let md = std::fs::metadata(h.host("rootdir")).unwrap();
    assert_eq!((md.uid(), md.gid()), (0, 0));
}

#[test]
fn no_set_id_file_is_made_and_writes_clear_the_bits_of_one_already_there() {
    let mut h = Harness::new(Opts {
        read_only: false,
        xattr: true,
        ..Default::default()
    });
    h.init();
    let before = h.tree();
    let suid_reg = [
        obj(MknodIn {
            mode: libc::S_IFREG | libc::S_ISUID | 0o755,
            ..Default::default()
        }),
        cz(b"n"),
    ]
    .concat();
    for (what, op, args) in [
        (
            "create setuid",
            Opcode::Create,
            create_args(b"u", libc::S_ISUID | 0o755),
        ),
        (
            "create setgid",
            Opcode::Create,
            create_args(b"g", libc::S_ISGID | 0o755),
        ),
        ("mknod setuid", Opcode::Mknod, suid_reg),
        (
            "mkdir setuid",
            Opcode::Mkdir,
            mkdir_args(b"d", libc::S_ISUID | 0o755),
        ),
    ] {
        assert_eq!(h.call(op, ROOT_ID, &args).errno, libc::EPERM, "{what}");
    }
    assert_eq!(h.tree(), before, "nothing was made");

    // chmod u+s or g+s of a file is refused; g+s of a directory (group inheritance) is not.
    let f = h.lookup(ROOT_ID, b"file.txt").unwrap();
    for bits in [libc::S_ISUID, libc::S_ISGID] {
        let args = setattr_args(SetattrValid::MODE, |a| {
            a.mode = libc::S_IFREG | bits | 0o755
        });
        assert_eq!(
            h.call(Opcode::Setattr, f.nodeid, &args).errno,
            libc::EPERM,
            "{bits:o}"
        );
    }
    let dir = h.lookup(ROOT_ID, b"dir").unwrap();
    let args = setattr_args(SetattrValid::MODE, |a| {
        a.mode = libc::S_IFDIR | libc::S_ISGID | 0o775
    });
    h.ok(Opcode::Setattr, dir.nodeid, &args);
    let mode = std::fs::metadata(h.host("dir")).unwrap().mode();
    assert_eq!(mode & 0o7777, libc::S_ISGID | 0o775);
    h.ok(
        Opcode::Mkdir,
        ROOT_ID,
        &mkdir_args(b"sgid", libc::S_ISGID | 0o755),
    );

    // No file capabilities, no trusted.* attributes.
    for name in [&b"security.capability"[..], b"trusted.overlay.opaque"] {
        let args = [
            obj(SetxattrIn { size: 1, flags: 0 }),
            cz(name),
            b"y".to_vec(),
        ]
        .concat();
        assert_eq!(
            h.call(Opcode::Setxattr, f.nodeid, &args).errno,
            libc::EPERM,
            "{name:?}"
        );
    }

    // Set-id files the host already had: a write, a truncation and a fallocate each clear
    // the bits, whatever KILLPRIV flags the guest sends (here none).
    let set_id = |h: &Harness, name: &str| {
        std::fs::write(h.host(name), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(h.host(name), std::fs::Permissions::from_mode(0o6755)).unwrap();
    };
    let bits = |h: &Harness, name: &str| std::fs::metadata(h.host(name)).unwrap().mode() & 0o7777;
    set_id(&h, "w");
    set_id(&h, "t");
    set_id(&h, "a");
    assert_eq!(bits(&h, "w"), 0o6755);
    let w = h.lookup(ROOT_ID, b"w").unwrap();
    let fh = h.open(w.nodeid, libc::O_RDWR).unwrap();
    let args = [
        obj(WriteIn {
            fh,
            offset: 0,
            size: 2,
            ..Default::default()
        }),
        b"#!".to_vec(),
    ]
    .concat();
    h.ok(Opcode::Write, w.nodeid, &args);
    h.release(w.nodeid, fh, Opcode::Release);
    assert_eq!(bits(&h, "w"), 0o755, "a write clears setuid and setgid");

    let t = h.lookup(ROOT_ID, b"t").unwrap();
    let args = setattr_args(SetattrValid::SIZE, |a| a.size = 0);
    h.ok(Opcode::Setattr, t.nodeid, &args);
    assert_eq!(bits(&h, "t"), 0o755, "a truncation clears them");

    let a = h.lookup(ROOT_ID, b"a").unwrap();
    let fh = h.open(a.nodeid, libc::O_RDWR).unwrap();
    let args = obj(FallocateIn {
        fh,
        offset: 0,
        length: 4096,
        mode: 0,
        padding: 0,
    });
    h.ok(Opcode::Fallocate, a.nodeid, &args);
    h.release(a.nodeid, fh, Opcode::Release);
    assert_eq!(bits(&h, "a"), 0o755, "a fallocate clears them");
}
