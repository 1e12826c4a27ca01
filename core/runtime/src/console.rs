//! The capped tails of a QEMU process's output streams: the guest's serial console (QEMU's
//! stdout, `-serial stdio`) and QEMU's own stderr.
//!
//! Both are written at a rate the guest controls (root in the guest can write `/dev/ttyS0` at
//! ~600 KB/s, and some device errors QEMU reports are guest-triggered), so neither goes to a
//! file: a reader thread per stream drains its pipe into a [`TailBuffer`] that keeps only the
//! last `cap` bytes and counts the rest. What diagnostics need (the last lines before a VM died,
//! QEMU's complaint) is the tail; host memory per VM stays at the two caps whatever the guest
//! writes. The thread ends at EOF, i.e. when QEMU exits, and the tail stays readable after.
//!
//! `TailBuffer` is pure (bytes in, text out) and unit-tested; [`OutputTail::follow`] is the only
//! I/O.
//!
//! Errors: the crate's [`Error`](crate::Error) (only starting the reader thread can fail).

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// How much of the serial console a VM keeps (the last bytes).
pub const CONSOLE_CAP: usize = 64 * 1024;
/// How much of QEMU's stderr a VM keeps (the last bytes).
pub const STDERR_CAP: usize = 16 * 1024;

/// The last `cap` bytes written, and how many were written in all.
#[derive(Debug)]
pub struct TailBuffer {
    cap: usize,
    kept: VecDeque<u8>,
    total: u64,
}

impl TailBuffer {
    pub fn new(cap: usize) -> TailBuffer {
        TailBuffer { cap, kept: VecDeque::with_capacity(cap.min(4096)), total: 0 }
    }

    /// Appends `data`, forgetting the oldest bytes beyond the cap.
    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.cap)..];
        let overflow = (self.kept.len() + data.len()).saturating_sub(self.cap);
        self.kept.drain(..overflow);
        self.kept.extend(data);
    }

    /// Bytes written in all (kept or not).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes kept now (at most the cap).
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// The last `max` bytes as text (invalid UTF-8 replaced, carriage returns dropped); when
    /// older bytes exist, it starts after the first line break, so no line is shown cut.
    pub fn tail(&self, max: usize) -> String {
        let start = self.kept.len().saturating_sub(max);
        let bytes: Vec<u8> = self.kept.range(start..).copied().collect();
        let text = String::from_utf8_lossy(&bytes).replace('\r', "");
        let truncated = start > 0 || self.total > self.kept.len() as u64;
        if truncated {
            if let Some(i) = text.find('\n') {
                return text[i + 1..].to_string();
            }
        }
        text
    }
}

/// A [`TailBuffer`] shared with the thread that fills it.
#[derive(Clone, Debug)]
pub struct OutputTail(Arc<Mutex<TailBuffer>>);

impl OutputTail {
    /// An empty tail keeping `cap` bytes (for a stream nobody follows).
    pub fn empty(cap: usize) -> OutputTail {
        OutputTail(Arc::new(Mutex::new(TailBuffer::new(cap))))
    }

    /// Starts a thread (named `name`) that reads `source` until EOF or an error into a new
    /// tail keeping `cap` bytes.
    pub fn follow(name: &str, mut source: impl Read + Send + 'static, cap: usize) -> Result<OutputTail> {
        let tail = OutputTail::empty(cap);
        let sink = tail.clone();
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    match source.read(&mut chunk) {
                        Ok(0) => return,
                        Ok(n) => sink.lock().push(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    }
                }
            })
            .map_err(|e| Error::io(format!("start the {name} reader thread"), e))?;
        Ok(tail)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TailBuffer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`TailBuffer::tail`].
    pub fn tail(&self, max: usize) -> String {
        self.lock().tail(max)
    }

    /// (bytes written in all, bytes kept).
    pub fn sizes(&self) -> (u64, usize) {
        let b = self.lock();
        (b.total(), b.kept())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_cap_bytes() {
        let mut b = TailBuffer::new(10);
        b.push(b"abc");
        assert_eq!((b.total(), b.kept(), b.tail(100).as_str()), (3, 3, "abc"));
        b.push(b"defghijkl");
        assert_eq!((b.total(), b.kept()), (12, 10));
        b.push(&[b'x'; 25]);
        assert_eq!((b.total(), b.kept()), (37, 10));
        b.push(b"0123");
        assert_eq!(b.kept, b"xxxxxx0123".iter().copied().collect::<VecDeque<u8>>());
        // a zero cap keeps nothing and still counts
        let mut z = TailBuffer::new(0);
        z.push(b"hello");
        assert_eq!((z.total(), z.kept(), z.tail(10).as_str()), (5, 0, ""));
    }

    #[test]
    fn tail_starts_at_a_line_and_is_text() {
        let mut b = TailBuffer::new(16);
        b.push(b"first line\r\nsecond\nthird\n");
        // older bytes were dropped: the cut first line is not shown
        assert_eq!(b.tail(100), "second\nthird\n");
        let mut c = TailBuffer::new(100);
        c.push(b"one\ntwo\n\xffthree");
        assert_eq!(c.tail(100), "one\ntwo\n\u{fffd}three");
        assert_eq!(c.tail(7), "\u{fffd}three");
    }

    #[test]
    fn follow_drains_a_stream_to_its_end() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        let total = data.len() as u64;
        let t = OutputTail::follow("test-tail", std::io::Cursor::new(data), 1000).unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while t.sizes().0 < total && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(t.sizes(), (total, 1000));
        assert!(t.tail(1000).ends_with("line 199999\n"), "{}", t.tail(100));
    }
}
