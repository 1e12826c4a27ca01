//! Frame codec: turns bytes into frames and frames into bytes. Pure, no I/O.
//!
//! Wire layout of one frame (all integers little-endian):
//!
//! ```text
//!  0      2      3      4            8            12
//!  +------+------+------+------------+------------+-------------------+
//!  | "SM" | kind | rsvd | channel u32| length u32 | payload (length)  |
//!  +------+------+------+------------+------------+-------------------+
//! ```
//!
//! * `kind` says what the payload is (see [`Kind`]).
//! * `channel` multiplexes: a process id for stdio frames, a transfer id for file frames,
//!   0 for control frames.
//! * `length` is capped at [`MAX_PAYLOAD`]; a larger announced length is a protocol error
//!   detected from the header alone, before any payload is buffered.
//! * A data frame with an empty payload means end of stream (EOF on stdout/stderr,
//!   close of stdin, end of a file transfer).
//!
//! The decoder never panics and never buffers more than one frame: feed it arbitrary bytes.

use std::fmt;

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"SM";
/// Size of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Largest payload one frame may carry (control JSON or a data chunk).
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Size of data chunks the two sides send (well under [`MAX_PAYLOAD`]).
pub const CHUNK: usize = 64 * 1024;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A JSON-encoded [`crate::Control`] message.
    Control = 1,
    /// Bytes for a process's stdin (host → guest). Empty = close stdin.
    Stdin = 2,
    /// Bytes from a process's stdout (guest → host). Empty = EOF.
    Stdout = 3,
    /// Bytes from a process's stderr (guest → host). Empty = EOF.
    Stderr = 4,
    /// A chunk of a file transfer, either direction. Empty = end of file.
    FileData = 5,
    /// Bytes of a TCP channel, either direction. Empty = the sender's half-close (EOF).
    /// Only sent to an agent whose Welcome lists `FEATURE_TCP`.
    TcpData = 6,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Control,
            2 => Kind::Stdin,
            3 => Kind::Stdout,
            4 => Kind::Stderr,
            5 => Kind::FileData,
            6 => Kind::TcpData,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub channel: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: Kind, channel: u32, payload: Vec<u8>) -> Frame {
        Frame { kind, channel, payload }
    }

    /// Encodes this frame. Fails only if the payload is larger than [`MAX_PAYLOAD`].
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        encode_into(&mut out, self.kind, self.channel, &self.payload)?;
        Ok(out)
    }
}

/// Appends one encoded frame to `out`.
pub fn encode_into(out: &mut Vec<u8>, kind: Kind, channel: u32, payload: &[u8]) -> Result<(), FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { length: payload.len() as u64 });
    }
    out.extend_from_slice(&MAGIC);
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&channel.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Why a byte stream is not a valid frame sequence. Any of these ends the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The stream does not start with the frame magic: the peer is not speaking this protocol.
    BadMagic { found: [u8; 2] },
    /// The frame kind byte is not one this version knows.
    UnknownKind { kind: u8 },
    /// The frame announces a payload over the size cap.
    TooLarge { length: u64 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadMagic { found } => write!(
                f,
                "malformed frame from peer: expected magic \"SM\", got {:02x} {:02x} (the peer is not a supermachine agent or the stream is corrupt)",
                found[0], found[1]
            ),
            FrameError::UnknownKind { kind } => {
                write!(f, "malformed frame from peer: unknown frame kind {kind}")
            }
            FrameError::TooLarge { length } => write!(
                f,
                "oversized frame from peer: {length} bytes announced, the limit is {MAX_PAYLOAD}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Incremental decoder. Push bytes with [`Decoder::push`], take frames with [`Decoder::next_frame`].
///
/// After an error the decoder is poisoned: it returns the same error forever, because the
/// stream has lost frame sync. Call [`Decoder::reset`] when a new connection starts.
#[derive(Default, Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    error: Option<FrameError>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Forgets all buffered bytes and any error (a new connection begins).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.error = None;
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends received bytes. Frames are taken out with [`Decoder::next_frame`].
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed, or the error
    /// that poisons the stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        // Check what we can as early as we can, so garbage is rejected before it is buffered.
        if !avail.is_empty() && avail[0] != MAGIC[0] {
            return self.fail(FrameError::BadMagic { found: [avail[0], avail.get(1).copied().unwrap_or(0)] });
        }
        if avail.len() >= 2 && avail[1] != MAGIC[1] {
            return self.fail(FrameError::BadMagic { found: [avail[0], avail[1]] });
        }
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = match Kind::from_u8(avail[2]) {
            Some(k) => k,
            None => return self.fail(FrameError::UnknownKind { kind: avail[2] }),
        };
        let channel = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
        let length = u32::from_le_bytes([avail[8], avail[9], avail[10], avail[11]]) as usize;
        if length > MAX_PAYLOAD {
            return self.fail(FrameError::TooLarge { length: length as u64 });
        }
        if avail.len() < HEADER_LEN + length {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..HEADER_LEN + length].to_vec();
        self.start += HEADER_LEN + length;
        if self.start > 1 << 20 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(Frame { kind, channel, payload }))
    }

    fn fail(&mut self, e: FrameError) -> Result<Option<Frame>, FrameError> {
        self.error = Some(e.clone());
        self.buf.clear();
        self.start = 0;
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(bytes: &[u8], step: usize) -> Result<Vec<Frame>, FrameError> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(step.max(1)) {
            d.push(chunk);
            while let Some(f) = d.next_frame()? {
                out.push(f);
            }
        }
        assert_eq!(d.pending(), 0, "no trailing bytes expected");
        Ok(out)
    }

    #[test]
    fn round_trip_any_split() {
        let frames = vec![
            Frame::new(Kind::Control, 0, b"{\"op\":\"ping\",\"req\":1}".to_vec()),
            Frame::new(Kind::Stdout, 7, vec![0xff; 1000]),
            Frame::new(Kind::Stderr, 7, vec![]),
            Frame::new(Kind::FileData, 3, vec![1; MAX_PAYLOAD]),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(f.encode().unwrap());
        }
        for step in [1, 2, 3, 11, 12, 13, 4096, wire.len()] {
            assert_eq!(frames_of(&wire, step).unwrap(), frames, "split {step}");
        }
    }

    #[test]
    fn oversize_rejected_from_header_alone() {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(b"SM");
        hdr.push(Kind::Stdout as u8);
        hdr.push(0);
        hdr.extend_from_slice(&1u32.to_le_bytes());
        hdr.extend_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
        let mut d = Decoder::new();
        d.push(&hdr);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
        // poisoned until reset
        d.push(&Frame::new(Kind::Stdout, 1, vec![1]).encode().unwrap());
        assert!(d.next_frame().is_err());
        d.reset();
        d.push(&Frame::new(Kind::Stdout, 1, vec![1]).encode().unwrap());
        assert_eq!(d.next_frame().unwrap().unwrap().payload, vec![1]);
    }

    #[test]
    fn encode_refuses_oversize() {
        assert!(Frame::new(Kind::Stdin, 0, vec![0; MAX_PAYLOAD + 1]).encode().is_err());
    }

    #[test]
    fn garbage_is_rejected_at_first_byte() {
        let mut d = Decoder::new();
        d.push(b"hello world, I am not a frame");
        assert!(matches!(d.next_frame(), Err(FrameError::BadMagic { .. })));
        let mut d = Decoder::new();
        d.push(b"SX");
        assert!(matches!(d.next_frame(), Err(FrameError::BadMagic { .. })));
        let mut d = Decoder::new();
        d.push(b"SM\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(d.next_frame(), Err(FrameError::UnknownKind { kind: 9 }));
    }

    /// Deterministic pseudo-random bytes must never panic the decoder (the fuzz target
    /// in `core/fuzz` does the same with coverage guidance).
    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for round in 0..2000 {
            let len = (round * 7) % 300;
            let mut bytes = Vec::with_capacity(len + 2);
            if round % 2 == 0 {
                bytes.extend_from_slice(b"SM");
            }
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            let mut d = Decoder::new();
            d.push(&bytes);
            for _ in 0..10 {
                match d.next_frame() {
                    Ok(Some(f)) => assert!(f.payload.len() <= MAX_PAYLOAD),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
