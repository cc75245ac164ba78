//! A fresh identity for a sandbox restored from a template: hostname, entropy and wall clock.
//!
//! Clones of one template share the kernel's RNG state; before user code runs again the agent credits
//! fresh host randomness to the entropy pool (RNDADDENTROPY) and forces a CRNG reseed
//! (RNDRESEEDCRNG), so that no two clones draw the same random numbers (Firecracker's
//! `random-for-clones.md`). The clock jumped too: it is set from the host's.

use std::os::fd::AsRawFd;

/// The most seed bytes one request may carry.
pub const MAX_SEED: usize = 4096;

// linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()),
    libc::c_int
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Errors setting the identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The seed is larger than [`MAX_SEED`].
    #[error("random seed of {0} bytes exceeds {MAX_SEED}")]
    SeedTooLarge(usize),
    /// The hostname is not acceptable.
    #[error("invalid hostname {0:?}")]
    Hostname(String),
    /// sethostname(2) failed.
    #[error("setting the hostname")]
    SetHostname(#[source] nix::Error),
    /// /dev/random could not be opened.
    #[error("opening /dev/random")]
    OpenRandom(#[source] std::io::Error),
    /// RNDADDENTROPY failed.
    #[error("crediting entropy (RNDADDENTROPY)")]
    AddEntropy(#[source] nix::Error),
    /// RNDRESEEDCRNG failed.
    #[error("reseeding the CRNG (RNDRESEEDCRNG)")]
    Reseed(#[source] nix::Error),
    /// The clock value is out of range.
    #[error("invalid clock {0}s {1}ns")]
    Clock(i64, u32),
    /// clock_settime(2) failed.
    #[error("setting the wall clock")]
    SetClock(#[source] nix::Error),
}

/// The `struct rand_pool_info` RNDADDENTROPY takes: entropy bits, byte count, then the bytes, as
/// native-endian ints.
pub fn rand_pool_info(seed: &[u8]) -> Vec<libc::c_int> {
    let words = seed.len().div_ceil(4);
    let mut buf = Vec::with_capacity(2 + words);
    // Every seed byte counts as 8 bits of entropy: the host drew them from its own CRNG.
    buf.push((seed.len() * 8) as libc::c_int);
    buf.push(seed.len() as libc::c_int);
    for chunk in seed.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        buf.push(libc::c_int::from_ne_bytes(word));
    }
    buf
}

/// Checks a hostname: 1 to 64 bytes of letters, digits, '-' and '.'.
pub fn validate_hostname(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Hostname(name.to_owned()))
    }
}

/// Sets the hostname.
pub fn set_hostname(name: &str) -> Result<(), IdentityError> {
    validate_hostname(name)?;
    nix::unistd::sethostname(name).map_err(IdentityError::SetHostname)
}

/// Credits `seed` to the entropy pool and reseeds the CRNG.
pub fn reseed(seed: &[u8]) -> Result<(), IdentityError> {
    if seed.len() > MAX_SEED {
        return Err(IdentityError::SeedTooLarge(seed.len()));
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(IdentityError::OpenRandom)?;
    let info = rand_pool_info(seed);
    // SAFETY: `info` is a complete rand_pool_info (header plus buf_size bytes of data) that lives
    // across the call; the kernel only reads it.
    unsafe { rnd_add_entropy(random.as_raw_fd(), info.as_ptr()) }
        .map_err(IdentityError::AddEntropy)?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    unsafe { rnd_reseed_crng(random.as_raw_fd()) }.map_err(IdentityError::Reseed)?;
    Ok(())
}

/// Sets CLOCK_REALTIME.
pub fn set_clock(sec: i64, nsec: u32) -> Result<(), IdentityError> {
    if sec < 0 || nsec >= 1_000_000_000 {
        return Err(IdentityError::Clock(sec, nsec));
    }
    let ts = nix::sys::time::TimeSpec::new(sec, i64::from(nsec));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(IdentityError::SetClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_layout() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(info[0], 40);
        assert_eq!(info[1], 5);
        assert_eq!(info[2], i32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(info[3], i32::from_ne_bytes([5, 0, 0, 0]));
        assert_eq!(info.len(), 4);
    }

    #[test]
    fn hostnames() {
        assert!(validate_hostname("sandbox-1.local").is_ok());
        assert!(validate_hostname("").is_err());
        assert!(validate_hostname("a/b").is_err());
        assert!(validate_hostname(&"a".repeat(65)).is_err());
    }

    #[test]
    fn bounds() {
        assert!(matches!(
            reseed(&vec![0; MAX_SEED + 1]),
            Err(IdentityError::SeedTooLarge(_))
        ));
        assert!(set_clock(-1, 0).is_err());
        assert!(set_clock(0, 1_000_000_000).is_err());
    }

    #[test]
    fn reseed_as_root() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: reseeding needs root");
            return;
        }
        reseed(&[0x5a; 64]).unwrap();
    }
}
