//! The host side's opening line: `CONNECT <port>\n`, read from a freshly accepted unix stream.
//!
//! The line is bounded ([`MAX_LINE`] bytes); anything else (no newline within the bound, another
//! verb, a port that is not a decimal u32, end of stream) closes the stream. Bytes after the newline
//! are the start of the host's data and are kept, so none is lost when a client does not wait for
//! `OK` before writing.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;

/// Longest accepted line, newline included (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_LINE: usize = 32;

/// Why a handshake failed; the stream is closed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No newline within [`MAX_LINE`] bytes.
    #[error("CONNECT line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not `CONNECT <port>`.
    #[error("not a CONNECT line: {0:?}")]
    Garbage(String),
    /// The client closed before finishing the line.
    #[error("stream closed before the CONNECT line ended")]
    Eof,
    /// Reading failed.
    #[error("reading the CONNECT line failed: {0}")]
    Io(io::ErrorKind),
}

/// A host stream whose CONNECT line is being read.
#[derive(Debug)]
pub struct Handshake {
    /// The accepted stream (nonblocking).
    pub stream: UnixStream,
    buf: Vec<u8>,
}

/// A complete line: the guest port asked for, and any bytes that followed the newline.
#[derive(Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The guest port.
    pub port: u32,
    /// Host data already read past the line.
    pub early_data: Vec<u8>,
}

impl Handshake {
    /// Starts reading `stream`'s line.
    pub fn new(stream: UnixStream) -> Handshake {
        Handshake {
            stream,
            buf: Vec::with_capacity(MAX_LINE),
        }
    }

    /// Reads what is available; `Ok(None)` until the line is complete.
    pub fn poll(&mut self) -> Result<Option<ConnectRequest>, HandshakeError> {
        loop {
            let mut chunk = [0u8; MAX_LINE];
            let room = MAX_LINE - self.buf.len();
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if let Some(req) = parse(&self.buf)? {
                        return Ok(Some(req));
                    }
                    if self.buf.len() >= MAX_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(HandshakeError::Io(e.kind())),
            }
        }
    }
}

/// Parses `buf` if it holds a whole line.
pub fn parse(buf: &[u8]) -> Result<Option<ConnectRequest>, HandshakeError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = &buf[..nl];
    let garbage = || HandshakeError::Garbage(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| garbage())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let mut words = text.split(' ');
    let (Some("CONNECT"), Some(port), None) = (words.next(), words.next(), words.next()) else {
        return Err(garbage());
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(garbage());
    }
    let port: u32 = port.parse().map_err(|_| garbage())?;
    Ok(Some(ConnectRequest {
        port,
        early_data: buf[nl + 1..].to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(
            parse(b"CONNECT 52\n").unwrap(),
            Some(ConnectRequest {
                port: 52,
                early_data: vec![]
            })
        );
        assert_eq!(
            parse(b"CONNECT 1024\r\nhi").unwrap(),
            Some(ConnectRequest {
                port: 1024,
                early_data: b"hi".to_vec()
            })
        );
        assert_eq!(parse(b"CONNECT 52").unwrap(), None);
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT \n",
            b"CONNECT +5\n",
            b"CONNECT -5\n",
            b"CONNECT 4294967296\n",
            b"connect 5\n",
            b"CONNECT 5 6\n",
            b"CONNECT  5\n",
            b"\xff\xfe\n",
            b"\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HandshakeError::Garbage(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse(b"CONNECT 4294967295\n").unwrap().unwrap().port,
            u32::MAX
        );
    }
}
