//! Splitting a QEMU migration stream into guest RAM and device state.
//!
//! A VM restored copy-on-write from a snapshot has private (anonymous) RAM, so QEMU can only
//! save it with its RAM inside the migration stream, and loading such a stream copies every
//! page back in (seconds). [`split_stream`] reads that stream once, hands every page of the
//! guest's main RAM block to a [`PageSink`] (which writes the sparse memory file), and writes
//! everything else unchanged: the result is the same pair a template snapshot has (memory file
//! + device state without main-RAM pages), restorable by mapping the memory file
//! copy-on-write in ~100 ms.
//!
//! For an incremental snapshot the sink keeps, instead, the records of the pages that differ
//! from the base memory file in the device-state output ([`PageSink::keep`]): loading that
//! state into a QEMU that maps the base file copy-on-write writes exactly those pages.
//!
//! Only the RAM section is parsed; device sections follow it and are copied byte for byte.
//! The source must have run with `x-ignore-shared` (so the stream carries each block's
//! address, which the loader then checks against nothing, since main RAM is not shared) and
//! must not use XBZRLE, compression, multifd or postcopy: anything else is refused with
//! [`StreamError::Unsupported`] and the caller falls back to keeping the stream whole.
//! No I/O of its own: generic over `Read`/`Write`, so it is unit-tested and fuzzed in memory.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};

const MAGIC: u32 = 0x5145_564d; // "QEVM"
const VERSION: u32 = 3;

const SEC_EOF: u8 = 0x00;
const SEC_START: u8 = 0x01;
const SEC_PART: u8 = 0x02;
const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const FOOTER: u8 = 0x7e;

const F_ZERO: u64 = 0x02;
const F_MEM_SIZE: u64 = 0x04;
const F_PAGE: u64 = 0x08;
const F_EOS: u64 = 0x10;
const F_CONTINUE: u64 = 0x20;
/// Flags live below the page size in a record's first 8 bytes.
const FLAG_MASK: u64 = 0xfff;

/// Guest page size in the stream (x86: 4 KiB).
pub const PAGE_SIZE: usize = 4096;

/// Receives the pages of the split-off RAM block, in stream order.
pub trait PageSink {
    /// `data` is one page at byte `offset` of the block; all-zero pages are passed too.
    fn page(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Asked first for every page of the block: true keeps the page's record in the
    /// device-state output (and [`PageSink::page`] is not called for it). Default: none kept.
    fn keep(&mut self, _offset: u64, _data: &[u8]) -> io::Result<bool> {
        Ok(false)
    }
}

/// What went wrong, with the byte offset into the stream where it was noticed.
#[derive(Debug)]
pub enum StreamError {
    Io(io::Error),
    /// Not a well-formed QEMU migration stream.
    Malformed { at: u64, why: String },
    /// Well-formed, but uses a feature this splitter does not handle.
    Unsupported { at: u64, why: String },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Io(e) => write!(f, "reading or writing the migration stream failed: {e}"),
            StreamError::Malformed { at, why } => write!(f, "malformed migration stream at byte {at}: {why}"),
            StreamError::Unsupported { at, why } => {
                write!(f, "migration stream at byte {at} uses an unsupported feature: {why}")
            }
        }
    }
}

impl std::error::Error for StreamError {}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        StreamError::Io(e)
    }
}

/// Counts of what [`split_stream`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitStats {
    /// Pages of the split-off block handed to the sink (zero ones included).
    pub pages: u64,
    /// Pages of that block the sink kept in the device-state output instead.
    pub kept: u64,
    /// Bytes written to the device-state output.
    pub state_bytes: u64,
    /// Bytes read from the input.
    pub stream_bytes: u64,
}

/// Reads with one byte of look-ahead and counts what it consumed.
struct Input<R> {
    inner: R,
    peeked: Option<u8>,
    pos: u64,
}

impl<R: Read> Input<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut from = 0;
        if let Some(b) = self.peeked.take() {
            buf[0] = b;
            from = 1;
        }
        self.inner.read_exact(&mut buf[from..]).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StreamError::Malformed { at: self.pos, why: "the stream ends in the middle of a record".into() }
            } else {
                StreamError::Io(e)
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, StreamError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }
    fn be32(&mut self) -> Result<u32, StreamError> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn be64(&mut self) -> Result<u64, StreamError> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    /// The next byte without consuming it; None at the end of the stream.
    fn peek(&mut self) -> Result<Option<u8>, StreamError> {
        if self.peeked.is_none() {
            let mut b = [0u8; 1];
            loop {
                match self.inner.read(&mut b) {
                    Ok(0) => return Ok(None),
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            self.peeked = Some(b[0]);
        }
        Ok(self.peeked)
    }
    fn malformed<T>(&self, why: impl Into<String>) -> Result<T, StreamError> {
        Err(StreamError::Malformed { at: self.pos, why: why.into() })
    }
    fn unsupported<T>(&self, why: impl Into<String>) -> Result<T, StreamError> {
        Err(StreamError::Unsupported { at: self.pos, why: why.into() })
    }
}

/// Counts bytes written.
struct Output<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Output<W> {
    fn put(&mut self, b: &[u8]) -> Result<(), StreamError> {
        self.inner.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }
    fn u8(&mut self, v: u8) -> Result<(), StreamError> {
        self.put(&[v])
    }
    fn be32(&mut self, v: u32) -> Result<(), StreamError> {
        self.put(&v.to_be_bytes())
    }
    fn be64(&mut self, v: u64) -> Result<(), StreamError> {
        self.put(&v.to_be_bytes())
    }
}

struct Splitter<'a, R, W, S> {
    inp: Input<R>,
    out: Output<W>,
    sink: &'a mut S,
    target: &'a str,
    /// Capabilities named in the configuration section.
    ignore_shared: bool,
    /// RAM blocks announced by the setup record: id → length in bytes.
    blocks: HashMap<String, u64>,
    ram_section: Option<u32>,
    ram_done: bool,
    /// Last block named in the input / in the output (records may say "same block as before").
    in_block: Option<String>,
    out_block: Option<String>,
    pages: u64,
    kept: u64,
    page: Vec<u8>,
}

/// Splits migration stream `input`: pages of RAM block `target` (e.g. "mem") go to `sink`,
/// everything else is written to `state`, which then loads (with `x-ignore-shared` set) into
/// a QEMU whose `target` RAM already holds those pages.
pub fn split_stream<R: Read, W: Write, S: PageSink>(
    input: R,
    state: W,
    sink: &mut S,
    target: &str,
) -> Result<SplitStats, StreamError> {
    let mut s = Splitter {
        inp: Input { inner: input, peeked: None, pos: 0 },
        out: Output { inner: state, written: 0 },
        sink,
        target,
        ignore_shared: false,
        blocks: HashMap::new(),
        ram_section: None,
        ram_done: false,
        in_block: None,
        out_block: None,
        pages: 0,
        kept: 0,
        page: vec![0u8; PAGE_SIZE],
    };
    s.run()?;
    s.out.inner.flush()?;
    Ok(SplitStats { pages: s.pages, kept: s.kept, state_bytes: s.out.written, stream_bytes: s.inp.pos })
}

impl<R: Read, W: Write, S: PageSink> Splitter<'_, R, W, S> {
    fn run(&mut self) -> Result<(), StreamError> {
        let magic = self.inp.be32()?;
        if magic != MAGIC {
            return self.inp.malformed(format!("bad magic {magic:#010x} (expected QEVM)"));
        }
        let version = self.inp.be32()?;
        if version != VERSION {
            return self.inp.unsupported(format!("stream version {version} (expected {VERSION})"));
        }
        self.out.be32(magic)?;
        self.out.be32(version)?;
        loop {
            let Some(kind) = self.inp.peek()? else {
                return self.inp.malformed("the stream ends before its end-of-file marker");
            };
            match kind {
                CONFIGURATION => self.configuration()?,
                SEC_START => self.start()?,
                SEC_PART | SEC_END => self.part_or_end()?,
                SEC_FULL | SEC_EOF => {
                    if self.ram_section.is_none() || !self.ram_done {
                        return self.inp.unsupported("device state before the RAM section completed");
                    }
                    // Device sections and the trailer: copied unchanged.
                    self.copy_rest()?;
                    return Ok(());
                }
                other => return self.inp.unsupported(format!("section type {other:#04x}")),
            }
        }
    }

    fn copy_rest(&mut self) -> Result<(), StreamError> {
        if let Some(b) = self.inp.peeked.take() {
            self.inp.pos += 1;
            self.out.u8(b)?;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match self.inp.inner.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.inp.pos += n as u64;
            self.out.put(&buf[..n])?;
        }
    }

    /// Copies `n` bytes from input to output.
    fn pass(&mut self, n: usize) -> Result<Vec<u8>, StreamError> {
        let mut v = vec![0u8; n];
        self.inp.exact(&mut v)?;
        self.out.put(&v)?;
        Ok(v)
    }
    fn pass_u8(&mut self) -> Result<u8, StreamError> {
        let v = self.inp.u8()?;
        self.out.u8(v)?;
        Ok(v)
    }
    fn pass_be32(&mut self) -> Result<u32, StreamError> {
        let v = self.inp.be32()?;
        self.out.be32(v)?;
        Ok(v)
    }
    fn pass_be64(&mut self) -> Result<u64, StreamError> {
        let v = self.inp.be64()?;
        self.out.be64(v)?;
        Ok(v)
    }
    fn pass_str8(&mut self) -> Result<String, StreamError> {
        let n = self.pass_u8()? as usize;
        let b = self.pass(n)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// The configuration section: machine name, then optional subsections we know.
    fn configuration(&mut self) -> Result<(), StreamError> {
        self.pass_u8()?;
        let len = self.pass_be32()? as usize;
        if len > 256 {
            return self.inp.malformed(format!("machine name of {len} bytes"));
        }
        self.pass(len)?;
        while self.inp.peek()? == Some(SUBSECTION) {
            self.pass_u8()?;
            let name = self.pass_str8()?;
            let _version = self.pass_be32()?;
            match name.as_str() {
                "configuration/capabilities" => {
                    let count = self.pass_be32()?;
                    if count > 64 {
                        return self.inp.malformed(format!("{count} capabilities"));
                    }
                    for _ in 0..count {
                        let cap = self.pass_str8()?;
                        if cap == "x-ignore-shared" {
                            self.ignore_shared = true;
                        }
                    }
                }
                "configuration/target-page-bits" => {
                    let bits = self.pass_be32()?;
                    if 1usize << bits.min(63) != PAGE_SIZE {
                        return self.inp.unsupported(format!("target page of 2^{bits} bytes"));
                    }
                }
                "configuration/uuid" => {
                    self.pass(16)?;
                }
                other => return self.inp.unsupported(format!("configuration subsection {other:?}")),
            }
        }
        Ok(())
    }

    /// A section footer, when the stream has them.
    fn footer(&mut self, section: u32) -> Result<(), StreamError> {
        if self.inp.peek()? == Some(FOOTER) {
            self.pass_u8()?;
            let id = self.pass_be32()?;
            if id != section {
                return self.inp.malformed(format!("footer of section {id} closes section {section}"));
            }
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(), StreamError> {
        self.pass_u8()?;
        let section = self.pass_be32()?;
        let idstr = self.pass_str8()?;
        let _instance = self.pass_be32()?;
        let version = self.pass_be32()?;
        if idstr != "ram" {
            return self.inp.unsupported(format!("iterative section {idstr:?} besides RAM"));
        }
        if self.ram_section.is_some() {
            return self.inp.malformed("a second RAM section");
        }
        if version != 4 {
            return self.inp.unsupported(format!("RAM section version {version}"));
        }
        if !self.ignore_shared {
            return self.inp.unsupported("the source did not run with x-ignore-shared");
        }
        self.ram_section = Some(section);
        // Setup record: total size | MEM_SIZE, then (id, length, address) per block.
        let head = self.pass_be64()?;
        if head & FLAG_MASK != F_MEM_SIZE {
            return self.inp.malformed(format!("RAM setup record with flags {:#x}", head & FLAG_MASK));
        }
        let mut left = head & !FLAG_MASK;
        while left > 0 {
            let id = self.pass_str8()?;
            let len = self.pass_be64()?;
            let _addr = self.pass_be64()?;
            if len == 0 || len > left {
                return self.inp.malformed(format!("RAM block {id:?} of {len} bytes with {left} announced"));
            }
            left -= len;
            self.blocks.insert(id, len);
        }
        if !self.blocks.contains_key(self.target) {
            return self.inp.unsupported(format!("no RAM block named {:?} in the stream", self.target));
        }
        self.records()?;
        self.footer(section)
    }

    fn part_or_end(&mut self) -> Result<(), StreamError> {
        let kind = self.pass_u8()?;
        let section = self.pass_be32()?;
        if Some(section) != self.ram_section || self.ram_done {
            return self.inp.unsupported(format!("section {section} is not the open RAM section"));
        }
        self.records()?;
        if kind == SEC_END {
            self.ram_done = true;
        }
        self.footer(section)
    }

    /// RAM records up to and including end-of-section.
    fn records(&mut self) -> Result<(), StreamError> {
        loop {
            let head = self.inp.be64()?;
            let flags = head & FLAG_MASK;
            let offset = head & !FLAG_MASK;
            if flags == F_EOS {
                self.out.be64(head)?;
                return Ok(());
            }
            if flags & !(F_ZERO | F_PAGE | F_CONTINUE) != 0 {
                return self.inp.unsupported(format!("RAM record flags {flags:#x}"));
            }
            let block = if flags & F_CONTINUE != 0 {
                match &self.in_block {
                    Some(b) => b.clone(),
                    None => return self.inp.malformed("a RAM record continues a block before any was named"),
                }
            } else {
                let n = self.inp.u8()? as usize;
                let mut b = vec![0u8; n];
                self.inp.exact(&mut b)?;
                let id = String::from_utf8_lossy(&b).into_owned();
                self.in_block = Some(id.clone());
                id
            };
            let Some(&len) = self.blocks.get(&block) else {
                return self.inp.malformed(format!("page of unknown RAM block {block:?}"));
            };
            if offset.checked_add(PAGE_SIZE as u64).map_or(true, |end| end > len) {
                return self.inp.malformed(format!("page at {offset:#x} beyond RAM block {block:?} of {len:#x} bytes"));
            }
            let kind = flags & (F_ZERO | F_PAGE);
            if kind != F_ZERO && kind != F_PAGE {
                return self.inp.malformed(format!("RAM record flags {flags:#x}"));
            }
            if kind == F_ZERO {
                let fill = self.inp.u8()?;
                self.page.fill(fill);
            } else {
                let mut page = std::mem::take(&mut self.page);
                let r = self.inp.exact(&mut page);
                self.page = page;
                r?;
            }
            if block == self.target {
                if self.sink.keep(offset, &self.page)? {
                    self.kept += 1;
                } else {
                    self.sink.page(offset, &self.page)?;
                    self.pages += 1;
                    continue;
                }
            }
            // Another block (firmware, ACPI tables) or a kept page: keep the record, naming
            // its block again whenever the previous record in *our* output was of another.
            let same = self.out_block.as_deref() == Some(block.as_str());
            self.out.be64(offset | kind | if same { F_CONTINUE } else { 0 })?;
            if !same {
                self.out.u8(block.len() as u8)?;
                self.out.put(block.as_bytes())?;
                self.out_block = Some(block);
            }
            if kind == F_ZERO {
                self.out.u8(self.page[0])?;
            } else {
                let page = std::mem::take(&mut self.page);
                let r = self.out.put(&page);
                self.page = page;
                r?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects pages in memory.
    #[derive(Default)]
    struct Pages(Vec<(u64, Vec<u8>)>);
    impl PageSink for Pages {
        fn page(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.push((offset, data.to_vec()));
            Ok(())
        }
    }

    /// Builds streams the way QEMU 7.2 lays them out.
    struct B(Vec<u8>);
    impl B {
        fn new() -> B {
            let mut b = B(vec![]);
            b.be32(MAGIC).be32(VERSION);
            b
        }
        fn u8(&mut self, v: u8) -> &mut B {
            self.0.push(v);
            self
        }
        fn be32(&mut self, v: u32) -> &mut B {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn be64(&mut self, v: u64) -> &mut B {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn s8(&mut self, s: &str) -> &mut B {
            self.u8(s.len() as u8);
            self.0.extend(s.as_bytes());
            self
        }
        fn config(&mut self, caps: &[&str]) -> &mut B {
            self.u8(CONFIGURATION).be32(7);
            self.0.extend(b"microvm");
            if !caps.is_empty() {
                self.u8(SUBSECTION).s8("configuration/capabilities").be32(1).be32(caps.len() as u32);
                for c in caps {
                    self.s8(c);
                }
            }
            self
        }
        fn ram_start(&mut self, blocks: &[(&str, u64)]) -> &mut B {
            self.u8(SEC_START).be32(2).s8("ram").be32(0).be32(4);
            let total: u64 = blocks.iter().map(|b| b.1).sum();
            self.be64(total | F_MEM_SIZE);
            for (id, len) in blocks {
                self.s8(id).be64(*len).be64(0);
            }
            self.be64(F_EOS).u8(FOOTER).be32(2)
        }
        fn page(&mut self, block: Option<&str>, offset: u64, fill: u8) -> &mut B {
            match block {
                Some(id) => {
                    self.be64(offset | F_PAGE);
                    self.s8(id);
                }
                None => {
                    self.be64(offset | F_PAGE | F_CONTINUE);
                }
            }
            self.0.extend(std::iter::repeat(fill).take(PAGE_SIZE));
            self
        }
        fn zero(&mut self, block: Option<&str>, offset: u64) -> &mut B {
            match block {
                Some(id) => {
                    self.be64(offset | F_ZERO);
                    self.s8(id);
                }
                None => {
                    self.be64(offset | F_ZERO | F_CONTINUE);
                }
            }
            self.u8(0)
        }
        fn devices(&mut self) -> &mut B {
            self.u8(SEC_FULL).be32(3).s8("timer").be32(0).be32(2);
            self.0.extend([1, 2, 3, 4, 5]);
            self.u8(FOOTER).be32(3).u8(SEC_EOF)
        }
    }

    fn split(stream: &[u8]) -> Result<(Vec<u8>, Pages), StreamError> {
        let mut out = vec![];
        let mut pages = Pages::default();
        split_stream(stream, &mut out, &mut pages, "mem")?;
        Ok((out, pages))
    }

    fn two_block_stream() -> Vec<u8> {
        let mut b = B::new();
        b.config(&["x-ignore-shared"]).ram_start(&[("mem", 16 * 4096), ("pc.bios", 2 * 4096)]);
        b.u8(SEC_PART).be32(2);
        b.page(Some("mem"), 0, 0xaa).zero(None, 4096).page(None, 2 * 4096, 0xbb);
        b.page(Some("pc.bios"), 0, 0x11).page(Some("mem"), 5 * 4096, 0xcc).page(Some("pc.bios"), 4096, 0x22);
        b.be64(F_EOS).u8(FOOTER).be32(2);
        b.u8(SEC_END).be32(2).zero(Some("mem"), 6 * 4096).be64(F_EOS).u8(FOOTER).be32(2);
        b.devices();
        b.0.extend(b"trailer");
        b.0
    }

    #[test]
    fn main_ram_goes_to_the_sink_and_the_rest_is_kept() {
        let (state, pages) = split(&two_block_stream()).unwrap();
        let got: Vec<(u64, u8)> = pages.0.iter().map(|(o, d)| (*o, d[0])).collect();
        assert_eq!(got, vec![(0, 0xaa), (4096, 0), (8192, 0xbb), (5 * 4096, 0xcc), (6 * 4096, 0)]);
        assert!(pages.0.iter().all(|(_, d)| d.len() == PAGE_SIZE && d.iter().all(|b| *b == d[0])));

        // The state is the same stream with only the main-RAM records removed; the firmware
        // records name their block again because the records between them were dropped.
        let mut want = B::new();
        want.config(&["x-ignore-shared"]).ram_start(&[("mem", 16 * 4096), ("pc.bios", 2 * 4096)]);
        want.u8(SEC_PART).be32(2).page(Some("pc.bios"), 0, 0x11).page(None, 4096, 0x22);
        want.be64(F_EOS).u8(FOOTER).be32(2);
        want.u8(SEC_END).be32(2).be64(F_EOS).u8(FOOTER).be32(2);
        want.devices();
        want.0.extend(b"trailer");
        assert_eq!(state, want.0);
    }

    #[test]
    fn splitting_the_split_state_finds_no_more_pages() {
        let (state, _) = split(&two_block_stream()).unwrap();
        let (again, pages) = split(&state).unwrap();
        assert!(pages.0.is_empty());
        assert_eq!(again, state);
    }

    #[test]
    fn stats_count_bytes_and_pages() {
        let stream = two_block_stream();
        let mut out = vec![];
        let mut pages = Pages::default();
        let st = split_stream(&stream[..], &mut out, &mut pages, "mem").unwrap();
        assert_eq!(st, SplitStats { pages: 5, kept: 0, state_bytes: out.len() as u64, stream_bytes: stream.len() as u64 });
    }

    /// Keeps the main-RAM pages whose first byte is not `same` (as an incremental snapshot
    /// keeps the pages that differ from its base).
    struct KeepUnless(u8, Pages);
    impl PageSink for KeepUnless {
        fn page(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.1.page(offset, data)
        }
        fn keep(&mut self, _offset: u64, data: &[u8]) -> io::Result<bool> {
            Ok(data[0] != self.0)
        }
    }

    #[test]
    fn kept_pages_stay_in_the_state_and_split_out_again() {
        let stream = two_block_stream();
        let mut out = vec![];
        let mut sink = KeepUnless(0xaa, Pages::default());
        let st = split_stream(&stream[..], &mut out, &mut sink, "mem").unwrap();
        // 0xaa at 0 is "the same as the base"; the rest (zero records included) are kept.
        assert_eq!((st.pages, st.kept), (1, 4));
        assert_eq!(sink.1 .0.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![0]);
        // The state is a well-formed stream carrying exactly the kept pages, in order.
        let (again, pages) = split(&out).unwrap();
        let got: Vec<(u64, u8)> = pages.0.iter().map(|(o, d)| (*o, d[0])).collect();
        assert_eq!(got, vec![(4096, 0), (8192, 0xbb), (5 * 4096, 0xcc), (6 * 4096, 0)]);
        assert_eq!(again, split(&stream).unwrap().0, "without the kept pages it is the plain split");
    }

    fn err(stream: &[u8]) -> StreamError {
        split(stream).err().expect("must fail")
    }

    #[test]
    fn refuses_a_source_without_ignore_shared() {
        let mut b = B::new();
        b.config(&[]).ram_start(&[("mem", 4096)]);
        assert!(matches!(err(&b.0), StreamError::Unsupported { .. }), "{}", err(&b.0));
    }

    #[test]
    fn refuses_compressed_or_xbzrle_pages() {
        let mut b = B::new();
        b.config(&["x-ignore-shared"]).ram_start(&[("mem", 4 * 4096)]);
        b.u8(SEC_PART).be32(2).be64(0x40 | 4096).s8("mem");
        let e = err(&b.0);
        assert!(matches!(e, StreamError::Unsupported { .. }) && e.to_string().contains("0x40"), "{e}");
    }

    #[test]
    fn refuses_bad_magic_truncation_and_out_of_range_pages() {
        assert!(matches!(err(b"NOPE\0\0\0\x03"), StreamError::Malformed { .. }));
        let full = two_block_stream();
        for cut in [3usize, 9, 40, 120, 300, 5000] {
            let e = err(&full[..cut]);
            assert!(matches!(e, StreamError::Malformed { .. } | StreamError::Unsupported { .. }), "cut {cut}: {e}");
        }
        let mut b = B::new();
        b.config(&["x-ignore-shared"]).ram_start(&[("mem", 2 * 4096)]);
        b.u8(SEC_PART).be32(2).page(Some("mem"), 2 * 4096, 1);
        let e = err(&b.0);
        assert!(e.to_string().contains("beyond RAM block"), "{e}");
        let mut b = B::new();
        b.config(&["x-ignore-shared"]).ram_start(&[("mem", 2 * 4096)]);
        b.u8(SEC_PART).be32(2).page(None, 0, 1);
        assert!(err(&b.0).to_string().contains("before any was named"));
        let mut b = B::new();
        b.config(&["x-ignore-shared"]).ram_start(&[("other", 2 * 4096)]);
        assert!(err(&b.0).to_string().contains("no RAM block named \"mem\""));
    }

    #[test]
    fn refuses_device_state_before_ram_is_complete() {
        let mut b = B::new();
        b.config(&["x-ignore-shared"]).ram_start(&[("mem", 4096)]).devices();
        assert!(matches!(err(&b.0), StreamError::Unsupported { .. }));
    }

    #[test]
    fn random_bytes_never_panic() {
        let base = two_block_stream();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let mut s = base.clone();
            for _ in 0..(1 + round % 8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % s.len();
                s[i] = (x >> 32) as u8;
            }
            let _ = split(&s);
            let _ = split_stream(&s[..], &mut vec![], &mut KeepUnless(0xaa, Pages::default()), "mem");
        }
    }
}
