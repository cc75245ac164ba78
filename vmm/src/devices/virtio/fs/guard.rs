//! Checks a descriptor chain and the raw FUSE message in it before fuse-backend-rs's server sees
//! it. Everything here is guest-written and hostile.
//!
//! Why not leave it to the server: the server turns a name into a C string at its first NUL (so
//! `"a\0b"` is served as `"a"`), reads argument structs with no error reply when they are short
//! (the request then vanishes without an answer), trusts the length the guest puts in the header
//! for the size of names, runs an operation even when the chain has no room for its reply (an OPEN
//! whose reply cannot be written leaks a host fd until reset), and formats an unknown opcode by
//! transmuting it into its `Opcode` enum when trace logging is on (undefined behaviour for the
//! gaps in the enum: 0, 7, 19). Here each of those gets an error reply, or the chain is dropped
//! when no reply can be written.
//!
//! The chain's shape is checked first: every descriptor inside guest memory, device-readable ones
//! before device-writable ones, and a chain that ends (a loop, a next index outside the table and
//! a chain longer than the queue all leave a last descriptor that still has NEXT, since the queue
//! crate stops walking after `queue_size` descriptors), and no longer than the queue (an indirect
//! table is bounded by the queue crate only by its own length).

use std::io::Read;
use std::mem::size_of;
use std::ops::Deref;

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, BatchForgetIn, CreateIn, EntryOut, FallocateIn, FlushIn, ForgetIn, FsyncIn,
    GetattrIn, GetxattrIn, InHeader, InitIn, InterruptIn, LinkIn, LseekIn, MkdirIn, MknodIn,
    Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, Rename2In, RenameIn, SetattrIn,
    SetxattrIn, WriteIn,
};
use fuse_backend_rs::transport::Reader;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use crate::memory::GuestRamMap;

/// Longest name part the guard reads: two names of `PATH_MAX` bytes with their NULs (SYMLINK).
const MAX_NAMES_LEN: usize = 2 * (libc::PATH_MAX as usize + 1);

/// Why a chain was dropped without a reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    /// The chain does not end: a loop, a next index outside the table, or more descriptors than
    /// the queue holds.
    #[error("descriptor chain does not end within {0} descriptors")]
    Unterminated(u16),
    /// A descriptor outside guest memory.
    #[error("descriptor at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// More descriptors than the queue holds (possible through an indirect table, which the
    /// queue crate bounds only by the table's own length).
    #[error("descriptor chain longer than the queue ({0} entries)")]
    TooLong(u16),
    /// A device-readable descriptor after a device-writable one.
    #[error("readable descriptor after a writable one")]
    Direction,
    /// Fewer readable bytes than a FUSE in-header.
    #[error("{0} readable bytes, shorter than the FUSE header")]
    NoHeader(usize),
    /// The chain cannot hold the reply header.
    #[error("{0} writable bytes, no room for a reply")]
    NoReplyRoom(usize),
    /// A request that gets no reply (FORGET, INTERRUPT...) was malformed.
    #[error("malformed request that takes no reply (opcode {0})")]
    NoReplyMalformed(u32),
    /// The queue crate's reader refused the chain.
    #[error("descriptor chain unreadable: {0}")]
    Chain(String),
}

/// What to do with a chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the server: the message is `opcode`.
    Serve {
        /// The FUSE opcode.
        opcode: u32,
    },
    /// Answer `-errno` for request `unique` without serving it.
    Reply {
        /// The request's ID.
        unique: u64,
        /// Positive errno.
        errno: i32,
    },
    /// Return the chain with nothing written.
    Drop(GuardError),
}

/// How the names after an opcode's argument struct are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Names {
    /// Nothing checked here.
    None,
    /// One path component, NUL-terminated.
    Component,
    /// One xattr name (may hold `/`), NUL-terminated.
    Xattr,
    /// Two path components (RENAME, RENAME2).
    TwoComponents,
    /// A path component, then free text (SYMLINK: name, target).
    ComponentThenText,
}

/// An opcode's rules.
struct Rule {
    /// Bytes of the argument struct after the in-header.
    arg: usize,
    names: Names,
    /// Changes the share: refused in read-only mode.
    mutating: bool,
    /// Whether the server writes a reply.
    replies: bool,
    /// Writable bytes the successful reply needs (when an operation allocates host resources,
    /// running it without room for its reply would leak them).
    reply_room: usize,
}

const HDR: usize = size_of::<OutHeader>();

fn rule(opcode: u32) -> Option<Rule> {
    let r = |arg, names, mutating, reply_room| Rule {
        arg,
        names,
        mutating,
        replies: true,
        reply_room,
    };
    let entry = HDR + size_of::<EntryOut>();
    let open = HDR + size_of::<OpenOut>();
    let op = |o: Opcode| o as u32;
    Some(match opcode {
        x if x == op(Opcode::Lookup) => r(0, Names::Component, false, entry),
        x if x == op(Opcode::Forget) => Rule {
            replies: false,
            ..r(size_of::<ForgetIn>(), Names::None, false, 0)
        },
        x if x == op(Opcode::BatchForget) => Rule {
            replies: false,
            ..r(size_of::<BatchForgetIn>(), Names::None, false, 0)
        },
        x if x == op(Opcode::Interrupt) => Rule {
            replies: false,
            ..r(size_of::<InterruptIn>(), Names::None, false, 0)
        },
        x if x == op(Opcode::Destroy) || x == op(Opcode::NotifyReply) => Rule {
            replies: false,
            ..r(0, Names::None, false, 0)
        },
        x if x == op(Opcode::Getattr) => r(size_of::<GetattrIn>(), Names::None, false, HDR),
        x if x == op(Opcode::Setattr) => r(size_of::<SetattrIn>(), Names::None, true, HDR),
        x if x == op(Opcode::Readlink) || x == op(Opcode::Statfs) => r(0, Names::None, false, HDR),
        x if x == op(Opcode::Symlink) => r(0, Names::ComponentThenText, true, entry),
        x if x == op(Opcode::Mknod) => r(size_of::<MknodIn>(), Names::Component, true, entry),
        x if x == op(Opcode::Mkdir) => r(size_of::<MkdirIn>(), Names::Component, true, entry),
        x if x == op(Opcode::Unlink) || x == op(Opcode::Rmdir) => r(0, Names::Component, true, HDR),
        x if x == op(Opcode::Rename) => r(size_of::<RenameIn>(), Names::TwoComponents, true, HDR),
        x if x == op(Opcode::Rename2) => r(size_of::<Rename2In>(), Names::TwoComponents, true, HDR),
        x if x == op(Opcode::Link) => r(size_of::<LinkIn>(), Names::Component, true, entry),
        x if x == op(Opcode::Open) || x == op(Opcode::Opendir) => {
            r(size_of::<OpenIn>(), Names::None, false, open)
        }
        x if x == op(Opcode::Create) => r(
            size_of::<CreateIn>(),
            Names::Component,
            true,
            entry + size_of::<OpenOut>(),
        ),
        x if x == op(Opcode::Read) || x == op(Opcode::Readdir) || x == op(Opcode::Readdirplus) => {
            r(size_of::<ReadIn>(), Names::None, false, HDR)
        }
        x if x == op(Opcode::Write) => r(size_of::<WriteIn>(), Names::None, true, HDR),
        x if x == op(Opcode::Release) || x == op(Opcode::Releasedir) => {
            r(size_of::<ReleaseIn>(), Names::None, false, HDR)
        }
        x if x == op(Opcode::Fsync) || x == op(Opcode::Fsyncdir) => {
            r(size_of::<FsyncIn>(), Names::None, false, HDR)
        }
        x if x == op(Opcode::Setxattr) => r(size_of::<SetxattrIn>(), Names::None, true, HDR),
        x if x == op(Opcode::Getxattr) => r(size_of::<GetxattrIn>(), Names::Xattr, false, HDR),
        x if x == op(Opcode::Listxattr) => r(size_of::<GetxattrIn>(), Names::None, false, HDR),
        x if x == op(Opcode::Removexattr) => r(0, Names::Xattr, true, HDR),
        x if x == op(Opcode::Flush) => r(size_of::<FlushIn>(), Names::None, false, HDR),
        x if x == op(Opcode::Init) => r(size_of::<InitIn>(), Names::None, false, HDR),
        x if x == op(Opcode::Access) => r(size_of::<AccessIn>(), Names::None, false, HDR),
        x if x == op(Opcode::Fallocate) => r(size_of::<FallocateIn>(), Names::None, true, HDR),
        x if x == op(Opcode::Lseek) => r(size_of::<LseekIn>(), Names::None, false, HDR),
        x if x == op(Opcode::CopyFileRange) => r(0, Names::None, true, HDR),
        // Served with ENOSYS or EINVAL by the server (no locks, ioctl, poll, bmap, DAX).
        x if x == op(Opcode::Getlk)
            || x == op(Opcode::Setlk)
            || x == op(Opcode::Setlkw)
            || x == op(Opcode::Bmap)
            || x == op(Opcode::Ioctl)
            || x == op(Opcode::Poll)
            || x == op(Opcode::SetupMapping)
            || x == op(Opcode::RemoveMapping) =>
        {
            r(0, Names::None, false, HDR)
        }
        _ => return None,
    })
}

/// The chain's readable and writable byte counts, once its shape is checked.
fn check_shape<M>(
    mem: &GuestRamMap,
    chain: DescriptorChain<M>,
    queue_size: u16,
) -> Result<(usize, usize), GuardError>
where
    M: Deref<Target = GuestRamMap>,
{
    let (mut readable, mut writable) = (0usize, 0usize);
    let mut last_has_next = false;
    for (i, d) in chain.enumerate() {
        if i >= usize::from(queue_size) {
            return Err(GuardError::TooLong(queue_size));
        }
        last_has_next = d.has_next();
        let len = d.len() as usize;
        if !mem.check_range(d.addr(), len) || mem.find_region(d.addr()).is_none() {
            return Err(GuardError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        if d.is_write_only() {
            writable = writable.saturating_add(len);
        } else if writable > 0 {
            return Err(GuardError::Direction);
        } else {
            readable = readable.saturating_add(len);
        }
    }
    if last_has_next {
        return Err(GuardError::Unterminated(queue_size));
    }
    Ok((readable, writable))
}

/// Counts NULs in `b` and checks the last byte is one.
fn nul_count_ending(b: &[u8]) -> Option<usize> {
    if b.last() != Some(&0) {
        return None;
    }
    Some(b.iter().filter(|&&c| c == 0).count())
}

fn is_component(name: &[u8]) -> bool {
    !name.is_empty() && !name.contains(&b'/')
}

/// Checks the names part of a message; `Err(errno)` when it is malformed.
fn check_names(names: Names, b: &[u8]) -> Result<(), i32> {
    let first = b.split(|&c| c == 0).next().unwrap_or(&[]);
    let ok = match names {
        Names::None => true,
        Names::Component => nul_count_ending(b) == Some(1) && is_component(first),
        Names::Xattr => nul_count_ending(b) == Some(1) && !first.is_empty(),
        Names::TwoComponents => {
            let mut it = b.split(|&c| c == 0);
            let (a, c) = (it.next().unwrap_or(&[]), it.next().unwrap_or(&[]));
            nul_count_ending(b) == Some(2) && is_component(a) && is_component(c)
        }
        Names::ComponentThenText => nul_count_ending(b) == Some(2) && is_component(first),
    };
    if ok {
        Ok(())
    } else {
        Err(libc::EINVAL)
    }
}

/// Decides what to do with `chain` (a clone: the chain itself goes to the server), popped from a
/// queue of `queue_size` entries.
pub fn check<M>(
    mem: &GuestRamMap,
    chain: DescriptorChain<M>,
    queue_size: u16,
    read_only: bool,
) -> Verdict
where
    M: Deref<Target = GuestRamMap> + Clone,
{
    let (readable, writable) = match check_shape(mem, chain.clone(), queue_size) {
        Ok(v) => v,
        Err(e) => return Verdict::Drop(e),
    };
    if readable < size_of::<InHeader>() {
        return Verdict::Drop(GuardError::NoHeader(readable));
    }
    let mut r = match Reader::from_descriptor_chain(mem, chain) {
        Ok(r) => r,
        Err(e) => return Verdict::Drop(GuardError::Chain(e.to_string())),
    };
    let h: InHeader = match r.read_obj() {
        Ok(h) => h,
        Err(e) => return Verdict::Drop(GuardError::Chain(e.to_string())),
    };
    let rule = rule(h.opcode);
    let replies = rule.as_ref().is_none_or(|r| r.replies);
    if replies && writable < HDR {
        return Verdict::Drop(GuardError::NoReplyRoom(writable));
    }
    let refuse = |errno| {
        if replies {
            Verdict::Reply {
                unique: h.unique,
                errno,
            }
        } else {
            Verdict::Drop(GuardError::NoReplyMalformed(h.opcode))
        }
    };
    let Some(rule) = rule else {
        return refuse(libc::ENOSYS);
    };
    // The header's length covers the header, the arguments and the names; it must not claim
    // more than the chain holds.
    let len = h.len as usize;
    let Some(body) = len.checked_sub(size_of::<InHeader>()) else {
        return refuse(libc::EINVAL);
    };
    if len > readable || body < rule.arg {
        return refuse(libc::EINVAL);
    }
    if writable < rule.reply_room {
        return refuse(libc::EINVAL);
    }
    if read_only && rule.mutating {
        return refuse(libc::EROFS);
    }
    if rule.names != Names::None {
        let names_len = body - rule.arg;
        if names_len > MAX_NAMES_LEN {
            return refuse(libc::ENAMETOOLONG);
        }
        let mut buf = vec![0u8; body];
        if r.read_exact(&mut buf).is_err() {
            return refuse(libc::EINVAL);
        }
        if let Err(errno) = check_names(rule.names, &buf[rule.arg..]) {
            return refuse(errno);
        }
    }
    Verdict::Serve { opcode: h.opcode }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_byte_by_byte() {
        let c = Names::Component;
        assert_eq!(check_names(c, b"abc\0"), Ok(()));
        for bad in [&b"a\0b\0"[..], b"a/b\0", b"\0", b"abc", b"a\0\0", b""] {
            assert_eq!(check_names(c, bad), Err(libc::EINVAL), "{bad:?}");
        }
        assert_eq!(check_names(Names::Xattr, b"user.a/b\0"), Ok(()));
        assert_eq!(check_names(Names::Xattr, b"user\0a\0"), Err(libc::EINVAL));
        let two = Names::TwoComponents;
        assert_eq!(check_names(two, b"a\0b\0"), Ok(()));
        for bad in [&b"a\0b"[..], b"a\0b/c\0", b"a\0b\0c\0", b"\0b\0", b"a\0\0"] {
            assert_eq!(check_names(two, bad), Err(libc::EINVAL), "{bad:?}");
        }
        let sym = Names::ComponentThenText;
        assert_eq!(check_names(sym, b"l\0/etc/passwd\0"), Ok(()));
        assert_eq!(check_names(sym, b"a/l\0x\0"), Err(libc::EINVAL));
    }

    #[test]
    fn every_opcode_the_crate_knows_has_a_rule_and_gaps_have_none() {
        for op in 1..Opcode::MaxOpcode as u32 {
            let gap = op == 7 || op == 19;
            assert_eq!(rule(op).is_none(), gap, "opcode {op}");
        }
        for op in [0, 50, 51, 52, u32::MAX, 436_207_616] {
            assert!(rule(op).is_none(), "opcode {op}");
        }
    }
}
