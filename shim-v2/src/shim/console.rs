//! The guest console's last bytes, kept in memory for every sandbox so that a guest that never
//! brings its agent up can be explained in the error containerd's client sees; with debug logging
//! the console also goes to a file, up to [`FILE_BYTES`] (the guest writes it, and `/run` is
//! memory).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// How much of the console is kept: enough for a panic's message and the lines before it.
const KEPT_BYTES: usize = 16 * 1024;

/// How much of the console the file takes; what comes after is in the tail only.
pub const FILE_BYTES: u64 = 8 << 20;

/// The file's last line once it is full.
const FILE_FULL: &[u8] = b"\n[rund: the console log is full; later output is not kept here]\n";

/// A handle on one guest console's tail; clones share it.
#[derive(Clone, Default)]
pub struct ConsoleTail {
    kept: Arc<Mutex<VecDeque<u8>>>,
}

impl ConsoleTail {
    pub fn new() -> ConsoleTail {
        ConsoleTail::default()
    }

    fn kept(&self) -> MutexGuard<'_, VecDeque<u8>> {
        // A writer that panicked mid-push leaves bytes, not a broken invariant.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The serial port's writer: into the tail, and into `file` (created or truncated) if given.
    pub fn writer(&self, file: Option<&Path>) -> io::Result<ConsoleWriter> {
        let file = file.map(File::create).transpose()?;
        Ok(ConsoleWriter {
            tail: self.clone(),
            file,
            file_left: FILE_BYTES,
        })
    }

    /// The last `lines` complete or partial lines, lossily decoded; empty when nothing was written.
    pub fn last_lines(&self, lines: usize) -> String {
        let bytes: Vec<u8> = self.kept().iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim_end_matches(['\r', '\n']);
        let mut tail: Vec<&str> = text
            .rsplit('\n')
            .take(lines)
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        tail.reverse();
        tail.join("\n")
    }
}

/// What the VMM's serial port writes to.
pub struct ConsoleWriter {
    tail: ConsoleTail,
    file: Option<File>,
    /// Bytes the file may still take.
    file_left: u64,
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        {
            let mut kept = self.tail.kept();
            let skip = buf.len().saturating_sub(KEPT_BYTES);
            kept.extend(&buf[skip..]);
            let excess = kept.len().saturating_sub(KEPT_BYTES);
            kept.drain(..excess);
        }
        if let Some(file) = self.file.as_mut() {
            let room = usize::try_from(self.file_left).unwrap_or(usize::MAX);
            let take = buf.len().min(room);
            file.write_all(&buf[..take])?;
            self.file_left -= take as u64;
            if take < buf.len() {
                file.write_all(FILE_FULL)?;
                self.file = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_and_bounds_its_memory() {
        let tail = ConsoleTail::new();
        let mut w = tail.writer(None).unwrap();
        assert_eq!(tail.last_lines(5), "");
        for i in 0..5000 {
            write!(w, "line {i}\r\n").unwrap();
        }
        assert_eq!(tail.last_lines(2), "line 4998\nline 4999");
        assert!(tail.kept().len() <= KEPT_BYTES);
        // One write larger than the whole tail keeps its end.
        w.write_all(&vec![b'x'; 3 * KEPT_BYTES]).unwrap();
        w.write_all(b"\npanic: init died").unwrap();
        assert_eq!(tail.kept().len(), KEPT_BYTES);
        assert!(tail.last_lines(1).ends_with("panic: init died"));
    }

    #[test]
    fn the_file_gets_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let tail = ConsoleTail::new();
        let mut w = tail.writer(Some(&path)).unwrap();
        let text = "a\n".repeat(KEPT_BYTES);
        w.write_all(text.as_bytes()).unwrap();
        w.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(tail.last_lines(3), "a\na\na");
    }

    #[test]
    fn the_file_stops_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let tail = ConsoleTail::new();
        let mut w = tail.writer(Some(&path)).unwrap();
        // A guest writing 3x the bound, in lines and in one large write.
        let chunk = vec![b'y'; 1 << 20];
        for _ in 0..3 * (FILE_BYTES >> 20) {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(b"\nthe end\n").unwrap();
        w.flush().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, FILE_BYTES + FILE_FULL.len() as u64);
        let text = std::fs::read(&path).unwrap();
        assert!(text.ends_with(FILE_FULL));
        // The tail still has the end.
        assert_eq!(tail.last_lines(1), "the end");
    }
}
