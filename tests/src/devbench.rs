//! Device micro-benchmarks that run the same code natively and in a guest, so that the two
//! figures differ only by the path under them: stream throughput and round trips over any
//! socket, sequential reads of one file and of a tree of small files, and O_DIRECT sequential and
//! random 4 KiB I/O on a file or block device. Used by `ci/bench-devices` (through
//! `rund-guest-probe` in the guest and the `devices` bench on the host).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// One transfer unit: large enough that per-call costs do not dominate.
const CHUNK: usize = 1 << 20;
/// The block of random I/O.
pub const RANDOM_BLOCK: usize = 4096;

/// A figure and its unit, printed as `RUND-BENCH <name> <value> <unit>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Its unit (MB/s, us, IOPS, files/s).
    pub unit: &'static str,
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RUND-BENCH {} {:.2} {}",
            self.name, self.value, self.unit
        )
    }
}

impl Figure {
    /// Parses a line printed by `Display`.
    pub fn parse(line: &str) -> Option<Figure> {
        let mut w = line.trim().strip_prefix("RUND-BENCH ")?.split_whitespace();
        let name = w.next()?.to_string();
        let value = w.next()?.parse().ok()?;
        let unit = match w.next()? {
            "MB/s" => "MB/s",
            "us" => "us",
            "IOPS" => "IOPS",
            "files/s" => "files/s",
            _ => return None,
        };
        Some(Figure { name, value, unit })
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// The serving side of the stream benchmarks: one command line, then the transfer.
/// `SINK` reads to EOF and answers `ok <bytes>`; `SOURCE <n>` sends n bytes and closes;
/// `ECHO` echoes until EOF.
pub fn serve<S: Read + Write>(stream: S) -> io::Result<()> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    serve_request(&line, r)
}

/// [`serve`] once its command `line` was read from `r`.
pub fn serve_request<S: Read + Write>(line: &str, mut r: BufReader<S>) -> io::Result<()> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("SINK"), None) => {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match r.read(&mut buf)? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            writeln!(r.get_mut(), "ok {total}")
        }
        (Some("SOURCE"), Some(n)) => {
            let n: u64 = n
                .parse()
                .map_err(|_| io::Error::other(format!("bad SOURCE count {n:?}")))?;
            let buf = vec![0x5au8; CHUNK];
            let mut left = n;
            let s = r.get_mut();
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..k])?;
                left -= k as u64;
            }
            s.flush()
        }
        (Some("ECHO"), None) => {
            let mut buf = [0u8; 64];
            loop {
                match r.read(&mut buf)? {
                    0 => return Ok(()),
                    n => r.get_mut().write_all(&buf[..n])?,
                }
            }
        }
        _ => Err(io::Error::other(format!("unknown bench command {line:?}"))),
    }
}

/// Sends `bytes` to a `SINK` server and waits for its count: the send throughput.
pub fn send_throughput<S: Read + Write>(
    mut stream: S,
    shutdown_write: impl FnOnce(&S) -> io::Result<()>,
    bytes: u64,
) -> io::Result<f64> {
    stream.write_all(b"SINK\n")?;
    let buf = vec![0xa5u8; CHUNK];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        stream.write_all(&buf[..k])?;
        left -= k as u64;
    }
    shutdown_write(&stream)?;
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line)?;
    let elapsed = start.elapsed();
    if line.trim() != format!("ok {bytes}") {
        return Err(io::Error::other(format!(
            "sink answered {line:?} for {bytes} bytes"
        )));
    }
    Ok(mb_per_s(bytes, elapsed))
}

/// Has a `SOURCE` server send `bytes`: the receive throughput.
pub fn receive_throughput<S: Read + Write>(mut stream: S, bytes: u64) -> io::Result<f64> {
    let start = Instant::now();
    writeln!(stream, "SOURCE {bytes}")?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    let elapsed = start.elapsed();
    if total != bytes {
        return Err(io::Error::other(format!(
            "source sent {total} bytes of {bytes}"
        )));
    }
    Ok(mb_per_s(bytes, elapsed))
}

/// Median round trip of a 1-byte message to an `ECHO` server, in microseconds.
pub fn round_trip_us<S: Read + Write>(mut stream: S, rounds: usize) -> io::Result<f64> {
    stream.write_all(b"ECHO\n")?;
    let mut times = Vec::with_capacity(rounds);
    let mut b = [0u8; 1];
    for i in 0..rounds {
        let start = Instant::now();
        stream.write_all(&[i as u8])?;
        stream.read_exact(&mut b)?;
        times.push(start.elapsed());
        if b[0] != i as u8 {
            return Err(io::Error::other("echo returned another byte"));
        }
    }
    times.sort();
    Ok(times
        .get(times.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6))
}

/// Reads `path` to its end in 1 MiB reads: MB/s.
pub fn read_file(path: &Path) -> io::Result<f64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    Ok(mb_per_s(total, start.elapsed()))
}

/// Opens, reads and closes every regular file directly in `dir`: files per second.
pub fn read_tree(dir: &Path) -> io::Result<f64> {
    let start = Instant::now();
    let mut files = 0u64;
    let mut buf = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            buf.clear();
            File::open(entry.path())?.read_to_end(&mut buf)?;
            files += 1;
        }
    }
    Ok(files as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// A page-aligned buffer, as O_DIRECT needs.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len, 4096).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (len is a multiple of 4096 chosen by us).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::other("out of memory"));
        }
        Ok(AlignedBuf { ptr, len })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = std::alloc::Layout::from_size_align(self.len, 4096) {
            // SAFETY: allocated in `new` with this very layout.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
        }
    }
}

fn open_direct(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// O_DIRECT sequential I/O of `bytes` in 1 MiB blocks from offset 0: MB/s.
pub fn sequential_direct(path: &Path, bytes: u64, write: bool) -> io::Result<f64> {
    let f = open_direct(path, write)?;
    let mut buf = AlignedBuf::new(CHUNK)?;
    buf.as_mut().fill(0x3c);
    let start = Instant::now();
    let mut off = 0u64;
    while off < bytes {
        if write {
            f.write_all_at(buf.as_mut(), off)?;
        } else {
            f.read_exact_at(buf.as_mut(), off)?;
        }
        off += CHUNK as u64;
    }
    if write {
        f.sync_all()?;
    }
    Ok(mb_per_s(off, start.elapsed()))
}

/// O_DIRECT random 4 KiB reads over the first `span` bytes, one at a time: IOPS.
pub fn random_reads_direct(path: &Path, span: u64, ops: u64) -> io::Result<f64> {
    let f = open_direct(path, false)?;
    let mut buf = AlignedBuf::new(RANDOM_BLOCK)?;
    let blocks = (span / RANDOM_BLOCK as u64).max(1);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let start = Instant::now();
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.read_exact_at(buf.as_mut(), (x % blocks) * RANDOM_BLOCK as u64)?;
    }
    Ok(ops as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;

    fn served() -> UnixStream {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || serve(b));
        a
    }

    #[test]
    fn stream_benchmarks_move_what_they_say() {
        assert!(
            send_throughput(served(), |s| s.shutdown(Shutdown::Write), 5_000_000).unwrap() > 0.0
        );
        assert!(receive_throughput(served(), 3_000_001).unwrap() > 0.0);
        assert!(round_trip_us(served(), 100).unwrap() > 0.0);
        let mut s = served();
        s.write_all(b"FLY\n").unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "an unknown command gets nothing");
    }

    #[test]
    fn file_benchmarks_read_everything() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 3 << 20]).unwrap();
        std::fs::write(dir.path().join("b"), b"b").unwrap();
        assert!(read_file(&dir.path().join("a")).unwrap() > 0.0);
        assert!(read_tree(dir.path()).unwrap() > 0.0);
        assert!(read_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn figures_round_trip_through_text() {
        let f = Figure {
            name: "vsock-send".into(),
            value: 123.456,
            unit: "MB/s",
        };
        let back = Figure::parse(&f.to_string()).unwrap();
        assert_eq!(back.name, "vsock-send");
        assert!((back.value - 123.46).abs() < 1e-9);
        assert_eq!(Figure::parse("RUND-BENCH x 1 parsecs"), None);
    }
}
