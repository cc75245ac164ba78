//! A checked byte stream for device tests: the connecting side sends a header and `bytes` of a
//! pattern derived from a seed, then half-closes; the accepting side checks every byte and the
//! SHA-256 of the whole, replies with its digest and a shorter pattern of its own, then half-closes.
//! Both the guest probe (over vsock) and the host tests (over the VMM's unix sockets) speak it, so a
//! lost, reordered or corrupted byte anywhere on the path shows as a mismatch with its offset.

use std::io::{self, BufRead, BufReader, Read, Write};

use sha2::{Digest, Sha256};

/// Bytes the acceptor sends back after the connector's stream (tests the other direction and
/// the half-close from the acceptor's side).
pub const REPLY_BYTES: u64 = 1 << 20;

/// What went wrong on a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The socket failed.
    #[error("stream I/O")]
    Io(#[from] io::Error),
    /// The peer's header does not parse.
    #[error("bad stream header {0:?}")]
    Header(String),
    /// A byte differs from the pattern.
    #[error("byte {offset} is {got:#04x}, the pattern has {want:#04x}")]
    Mismatch {
        /// Offset in the stream.
        offset: u64,
        /// Byte received.
        got: u8,
        /// Byte expected.
        want: u8,
    },
    /// The stream ended early or ran long.
    #[error("received {got} bytes, expected {want}")]
    Length {
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        want: u64,
    },
    /// The digest the peer computed is not the one of what was sent.
    #[error("peer's SHA-256 {got} differs from the sent stream's {want}")]
    Digest {
        /// The peer's.
        got: String,
        /// Ours.
        want: String,
    },
}

/// A deterministic byte pattern (xorshift64*), cheap enough to check 100 MB in a slow guest.
#[derive(Clone)]
pub struct Pattern {
    state: u64,
    buf: [u8; 8],
    used: usize,
}

impl Pattern {
    /// The pattern of `seed`.
    pub fn new(seed: u64) -> Self {
        Pattern {
            // Odd and non-zero for xorshift, and distinct for distinct seeds.
            state: (seed << 1) | 1,
            buf: [0; 8],
            used: 8,
        }
    }

    /// Fills `out` with the next bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.buf = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *b = self.buf[self.used];
            self.used += 1;
        }
    }
}

/// Lower-case hex of a digest.
fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` of `seed`'s pattern; returns its SHA-256.
fn send_pattern(w: &mut impl Write, seed: u64, bytes: u64) -> io::Result<String> {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    Ok(hex(&h.finalize()))
}

/// Reads to EOF, checking every byte against `seed`'s pattern and the total length; returns the
/// SHA-256 of what arrived.
fn check_pattern(r: &mut impl Read, seed: u64, bytes: u64) -> Result<String, StreamError> {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut got: u64 = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if got + n as u64 > bytes {
            return Err(StreamError::Length {
                got: got + n as u64,
                want: bytes,
            });
        }
        p.fill(&mut want[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
            return Err(StreamError::Mismatch {
                offset: got + i as u64,
                got: buf[i],
                want: want[i],
            });
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
    if got != bytes {
        return Err(StreamError::Length { got, want: bytes });
    }
    Ok(hex(&h.finalize()))
}

/// The reply's seed, different from the request's so that an echo would not pass.
fn reply_seed(seed: u64) -> u64 {
    seed.rotate_left(17) ^ 0x5eed_5eed_5eed_5eed
}

/// The connecting side: sends the header and `bytes` of `seed`'s pattern, half-closes (through
/// `shutdown_write`), then checks the acceptor's digest and reply. Returns the stream's digest.
pub fn connector<S: Read + Write>(
    mut stream: S,
    shutdown_write: impl FnOnce(&S) -> io::Result<()>,
    seed: u64,
    bytes: u64,
) -> Result<String, StreamError> {
    writeln!(stream, "RUNDSTREAM {bytes} {seed}")?;
    let sent = send_pattern(&mut stream, seed, bytes)?;
    shutdown_write(&stream)?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let got = line.trim().to_string();
    if got != sent {
        return Err(StreamError::Digest { got, want: sent });
    }
    check_pattern(&mut r, reply_seed(seed), REPLY_BYTES)?;
    Ok(sent)
}

/// The accepting side: reads the header, checks the stream to its end, replies with the digest
/// and its own pattern, and half-closes. Returns (bytes received, digest).
pub fn acceptor<S: Read + Write>(
    stream: S,
    shutdown_write: impl FnOnce(&S) -> io::Result<()>,
) -> Result<(u64, String), StreamError> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (Some("RUNDSTREAM"), Some(bytes), Some(seed), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(StreamError::Header(line));
    };
    let (Ok(bytes), Ok(seed)) = (bytes.parse::<u64>(), seed.parse::<u64>()) else {
        return Err(StreamError::Header(line));
    };
    let digest = check_pattern(&mut r, seed, bytes)?;
    let mut stream = r.into_inner();
    writeln!(stream, "{digest}")?;
    send_pattern(&mut stream, reply_seed(seed), REPLY_BYTES)?;
    shutdown_write(&stream)?;
    Ok((bytes, digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_stream_passes_over_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || acceptor(b, |s| s.shutdown(Shutdown::Write)).unwrap());
        let digest = connector(a, |s| s.shutdown(Shutdown::Write), 7, 3_000_001).unwrap();
        assert_eq!(t.join().unwrap(), (3_000_001, digest));
    }

    /// A relay that flips one byte at `at`: the acceptor must name its offset.
    #[test]
    fn a_corrupted_byte_is_found() {
        let (mut a, relay_in) = UnixStream::pair().unwrap();
        let (relay_out, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || acceptor(b, |s| s.shutdown(Shutdown::Write)));
        let relay = std::thread::spawn(move || {
            let mut all = Vec::new();
            (&relay_in).read_to_end(&mut all).unwrap();
            let header = all.iter().position(|&c| c == b'\n').unwrap() + 1;
            all[header + 1000] ^= 0x40;
            (&relay_out).write_all(&all).unwrap();
            relay_out.shutdown(Shutdown::Write).unwrap();
        });
        writeln!(a, "RUNDSTREAM 5000 9").unwrap();
        send_pattern(&mut a, 9, 5000).unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        relay.join().unwrap();
        match t.join().unwrap() {
            Err(StreamError::Mismatch { offset: 1000, .. }) => {}
            other => panic!("expected a mismatch at 1000, got {other:?}"),
        }
    }

    #[test]
    fn short_streams_and_bad_headers_are_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        writeln!(a, "RUNDSTREAM 10 1").unwrap();
        send_pattern(&mut a, 1, 9).unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        assert!(matches!(
            acceptor(b, |s| s.shutdown(Shutdown::Write)),
            Err(StreamError::Length { got: 9, want: 10 })
        ));
        let (mut a, b) = UnixStream::pair().unwrap();
        writeln!(a, "HELLO 10 1").unwrap();
        assert!(matches!(
            acceptor(b, |s| s.shutdown(Shutdown::Write)),
            Err(StreamError::Header(_))
        ));
    }
}
