//! A tap device as virtio-net's host side: opened by name with `IFF_VNET_HDR`, so every frame
//! read or written carries the same 12-byte header the guest's driver uses, and nonblocking, so
//! the VMM thread never waits on it.
//!
//! `TUNSETIFF` makes the tap in the network namespace of the calling thread: a caller that wants
//! it in a pod's namespace opens it from a thread that entered that namespace.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::HDR_LEN;

/// The clone device every tap is made through.
const TUN_PATH: &str = "/dev/net/tun";

/// Errors opening or setting up a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A name the kernel would refuse or that could name something else.
    #[error("tap name {0:?} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)")]
    BadName(String),
    /// `/dev/net/tun`.
    #[error("cannot open {TUN_PATH}")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF`.
    #[error("cannot make tap {name:?}")]
    Create {
        /// The name asked for.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// `TUNSETVNETHDRSZ`.
    #[error("tap {0:?}: cannot set the virtio-net header size")]
    HeaderSize(String, #[source] io::Error),
    /// `TUNSETOFFLOAD`.
    #[error("tap {name:?}: cannot set offloads {flags:#x}")]
    Offload {
        /// The tap.
        name: String,
        /// `TUN_F_*` flags.
        flags: u32,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
}

/// An open tap (the interface lives as long as this fd, unless it was made persistent).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether the kernel takes `name` as an interface name (`dev_valid_name`), bytes only.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

fn ifreq_for(name: &str, flags: libc::c_short) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name and a union of integers and addresses); all zeroes
    // is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &b) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = b as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    req
}

impl Tap {
    /// Opens the tap `name` (made if missing; a kernel-numbered one for a name such as
    /// `tap%d`), in the calling thread's network namespace.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        let mut req = ifreq_for(name, flags);
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on this stack for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::Create {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel wrote back the name it chose (for `%d` patterns), NUL-terminated.
        let chosen: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&chosen).into_owned(),
        };
        let size: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives on this stack for the call.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(TapError::HeaderSize(
                tap.name.clone(),
                io::Error::last_os_error(),
            ));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The tap's file, for vhost-net's backend.
    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloads frames read from the tap may use (`TUN_F_*`): what the guest's driver
    /// accepted. With 0 the kernel hands over only whole, checksummed frames.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is touched.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (header first) into `buf`; `WouldBlock` when none is waiting. A frame
    /// longer than `buf` is cut short by the kernel.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_refuse_are_refused_first() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "sixteen-bytes-xx",
            "nul\0",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
            match Tap::open(bad) {
                Err(TapError::BadName(n)) => assert_eq!(n, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        for good in ["tap0", "tap%d", "fifteen-bytes-x", "eth0.1"] {
            assert!(valid_name(good), "{good:?}");
        }
    }
}
