//! File transfers. Writes arrive as `WriteFile{req}` + FileData frames on channel `req` (empty =
//! end) and are written synchronously by the reader thread (the root is tmpfs-backed, so this
//! is a memory copy); exactly one reply, `Ok` or `Error`, follows the end frame, even when the
//! failure happened at open. Reads are streamed by a thread: `FileInfo`, FileData chunks under
//! a credit window, then an empty end frame — or `Error{req}` if reading fails midway.
//! Transfers belong to one host session: a new Hello drops unfinished writes and stops reads.
//!
//! A read with `ReadLimits` is for paths a hostile guest program may have swapped: it opens
//! with `O_NONBLOCK | O_NOCTTY` (and `O_NOFOLLOW` unless symlinks are allowed), so a FIFO or a
//! device never blocks the opening (server) thread; fstat must then say "regular file", else
//! nothing is streamed. Past `max_bytes` — announced or grown while streamed — the read ends
//! with `Error{kind: limit}` and at most `max_bytes` bytes were sent.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::{Arc, Mutex};

use supermachine_protocol::{Control, ErrorKind, Kind, ReadLimits, CHUNK};

use crate::credit::Window;
use crate::process::Failure;
use crate::sys::{self, lock};
use crate::writer::Writer;
use crate::{debug, log};

struct WriteXfer {
    req: u64,
    path: String,
    mode: u32,
    file: Option<File>,
    error: Option<Failure>,
}

/// Maps an I/O error on `path` to a protocol error with an actionable message.
pub fn io_failure(what: &str, path: &str, e: &io::Error) -> Failure {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    let hint = if kind == ErrorKind::NotFound && what == "create" { " (does its directory exist?)" } else { "" };
    (kind, format!("cannot {what} {path:?}: {e}{hint}"))
}

/// An opened file ready to stream; see [`Files::start_read`].
pub struct PendingRead {
    channel: u32,
    req: u64,
    file: File,
    window: Arc<Window>,
    epoch: u64,
    /// Most bytes this read may send (from `ReadLimits::max_bytes`).
    max_bytes: Option<u64>,
}

/// Both transfer tables. Channels are `req as u32`.
pub struct Files {
    writes: HashMap<u32, WriteXfer>,
    reads: Arc<Mutex<HashMap<u32, Arc<Window>>>>,
    writer: Arc<Writer>,
}

impl Files {
    pub fn new(writer: Arc<Writer>) -> Files {
        Files { writes: HashMap::new(), reads: Arc::new(Mutex::new(HashMap::new())), writer }
    }

    /// Starts a write transfer. A reply may be due at once only if the channel was busy.
    /// With a guest default user (user.rs) the file is opened, created and chmod-ed with that
    /// user's file-system ids: it owns what it gets, and a symlink it planted cannot make the
    /// agent write anywhere that user could not.
    pub fn start_write(&mut self, req: u64, path: String, mode: u32) -> Option<Control> {
        let mode = mode & 0o7777;
        let (file, error) = match crate::user::for_request(None) {
            Err(f) => (None, Some(f)),
            Ok(ids) => sys::with_fs_ids(ids.map(|i| (i.uid, i.gid)), || {
                let opened = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&path);
                match opened {
                    Ok(f) => match f.set_permissions(Permissions::from_mode(mode)) {
                        Ok(()) => (Some(f), None),
                        Err(e) => (None, Some(io_failure("chmod", &path, &e))),
                    },
                    Err(e) => (None, Some(io_failure("create", &path, &e))),
                }
            }),
        };
        let old = self.writes.insert(req as u32, WriteXfer { req, path, mode, file, error });
        old.map(|o| Control::Error {
            req: o.req,
            kind: ErrorKind::Protocol,
            message: format!("write of {:?} abandoned: transfer channel {} was reused before its end frame", o.path, req as u32),
        })
    }

    /// A FileData frame from the host. Returns the reply once the end frame arrived.
    pub fn write_data(&mut self, channel: u32, data: &[u8]) -> Option<Control> {
        let Some(x) = self.writes.get_mut(&channel) else {
            debug!("file data for unknown transfer {channel} dropped");
            return None;
        };
        if data.is_empty() {
            let x = self.writes.remove(&channel)?;
            debug!("wrote {:?} (mode {:o})", x.path, x.mode);
            return Some(match x.error {
                Some((kind, message)) => Control::Error { req: x.req, kind, message },
                None => Control::Ok { req: x.req },
            });
        }
        if let Some(f) = x.file.as_mut() {
            if let Err(e) = f.write_all(data) {
                x.error = Some(io_failure("write", &x.path, &e));
                x.file = None;
            }
        }
        None
    }

    /// Opens a file for reading; the caller replies with the returned `FileInfo` and then
    /// calls [`Files::stream`]. With `limits`, see the module doc. With a guest default user
    /// the file is opened as that user (see `start_write`).
    pub fn start_read(&mut self, req: u64, path: &str, limits: Option<ReadLimits>, epoch: u64) -> Result<(Control, PendingRead), Failure> {
        let ids = crate::user::for_request(None)?.map(|i| (i.uid, i.gid));
        let file = sys::with_fs_ids(ids, || match limits {
            None => File::open(path).map_err(|e| io_failure("open", path, &e)),
            Some(l) => open_checked(path, l),
        })?;
        let meta = file.metadata().map_err(|e| io_failure("stat", path, &e))?;
        if meta.is_dir() {
            return Err((ErrorKind::InvalidArgument, format!("cannot read {path:?}: it is a directory")));
        }
        let max_bytes = limits.and_then(|l| l.max_bytes);
        if limits.is_some() && !meta.file_type().is_file() {
            return Err((ErrorKind::InvalidArgument, format!("cannot read {path:?}: it is a {}, not a regular file", special_kind(&meta))));
        }
        if let Some(max) = max_bytes.filter(|&m| meta.len() > m) {
            return Err(over_limit(path, max));
        }
        let channel = req as u32;
        let window = Arc::new(Window::new(epoch));
        if let Some(old) = lock(&self.reads).insert(channel, window.clone()) {
            old.cancel();
        }
        let info = Control::FileInfo { req, size: meta.len(), mode: meta.mode() & 0o7777 };
        Ok((info, PendingRead { channel, req, file, window, epoch, max_bytes }))
    }

    /// Streams an opened file in a thread.
    pub fn stream(&self, r: PendingRead) {
        let (w, reads) = (self.writer.clone(), self.reads.clone());
        let spawned = std::thread::Builder::new().name(format!("read-{}", r.channel)).stack_size(256 * 1024).spawn(move || {
            stream_file(&w, &r);
            let mut t = lock(&reads);
            if t.get(&r.channel).is_some_and(|x| Arc::ptr_eq(x, &r.window)) {
                t.remove(&r.channel);
            }
        });
        if let Err(e) = spawned {
            log!("cannot start a file read thread: {e}");
        }
    }

    /// Credit for a read transfer (false if there is none on `channel`).
    pub fn credit(&self, channel: u32, bytes: u64) -> bool {
        match lock(&self.reads).get(&channel) {
            Some(w) => {
                w.add(bytes);
                true
            }
            None => false,
        }
    }

    /// A new host session: unfinished transfers belong to the previous host.
    pub fn new_session(&mut self) {
        if !self.writes.is_empty() {
            log!("dropping {} unfinished file writes of the previous host", self.writes.len());
            self.writes.clear();
        }
        for (_, w) in lock(&self.reads).drain() {
            w.cancel();
        }
    }
}

/// Opens `path` for a limited read without blocking (see the module doc).
fn open_checked(path: &str, limits: ReadLimits) -> Result<File, Failure> {
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if !limits.follow_symlinks {
        flags |= libc::O_NOFOLLOW;
    }
    OpenOptions::new().read(true).custom_flags(flags).open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) if !limits.follow_symlinks => {
            (ErrorKind::InvalidArgument, format!("cannot read {path:?}: it is a symlink (not followed)"))
        }
        Some(libc::ENXIO) => (ErrorKind::InvalidArgument, format!("cannot read {path:?}: it is a socket or a device, not a regular file")),
        _ => io_failure("open", path, &e),
    })
}

fn special_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() || t.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

fn over_limit(path: &str, max: u64) -> Failure {
    (ErrorKind::Limit, format!("cannot read {path:?}: it is larger than the {max}-byte limit"))
}

fn stream_file(w: &Writer, r: &PendingRead) {
    let mut buf = vec![0u8; CHUNK];
    let mut file = &r.file;
    let mut sent = 0u64;
    loop {
        let Some(mut max) = r.window.wait_available(CHUNK) else { return };
        if let Some(cap) = r.max_bytes {
            // One byte past the cap is read (never sent) to tell "exactly at the cap" from "more".
            max = max.min(usize::try_from(cap - sent).unwrap_or(usize::MAX).saturating_add(1));
        }
        match file.read(&mut buf[..max]) {
            Ok(0) => break,
            Ok(n) if r.max_bytes.is_some_and(|cap| sent + n as u64 > cap) => {
                let (kind, message) = over_limit("the file", r.max_bytes.unwrap_or_default());
                let message = format!("{message} (it grew while it was read)");
                w.send_in_epoch(Kind::Control, 0, &Control::Error { req: r.req, kind, message }.to_bytes(), r.epoch);
                return;
            }
            Ok(n) => {
                sent += n as u64;
                if !w.send_in_epoch(Kind::FileData, r.channel, &buf[..n], r.epoch) {
                    return;
                }
                r.window.consume(r.epoch, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let message = format!("reading failed midway: {e}");
                let msg = Control::Error { req: r.req, kind: ErrorKind::Io, message };
                w.send_in_epoch(Kind::Control, 0, &msg.to_bytes(), r.epoch);
                return;
            }
        }
    }
    w.send_in_epoch(Kind::FileData, r.channel, &[], r.epoch);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sm-agent-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_sets_exact_mode_and_replies_after_end() {
        let d = tmpdir("mode");
        let p = d.join("f").to_string_lossy().into_owned();
        let mut f = Files::new(Arc::new(Writer::new()));
        assert!(f.start_write(7, p.clone(), 0o741).is_none());
        assert!(f.write_data(7, b"abc").is_none());
        assert!(f.write_data(7, b"def").is_none());
        assert_eq!(f.write_data(7, b""), Some(Control::Ok { req: 7 }));
        assert_eq!(std::fs::read(&p).unwrap(), b"abcdef");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o741);
    }

    #[test]
    fn open_failure_is_reported_after_the_end_frame() {
        let mut f = Files::new(Arc::new(Writer::new()));
        assert!(f.start_write(3, "/no/such/dir/f".into(), 0o644).is_none());
        assert!(f.write_data(3, b"data").is_none());
        match f.write_data(3, b"") {
            Some(Control::Error { req: 3, kind: ErrorKind::NotFound, message }) => assert!(message.contains("/no/such/dir/f")),
            other => panic!("{other:?}"),
        }
        assert!(f.write_data(3, b"").is_none(), "transfer is gone after its end");
    }

    #[test]
    fn reading_a_directory_or_missing_file_fails() {
        let mut f = Files::new(Arc::new(Writer::new()));
        assert_eq!(f.start_read(1, "/", None, 1).err().unwrap().0, ErrorKind::InvalidArgument);
        assert_eq!(f.start_read(1, "/no/such/file", None, 1).err().unwrap().0, ErrorKind::NotFound);
    }

    const STRICT: Option<ReadLimits> = Some(ReadLimits { max_bytes: Some(4), follow_symlinks: false });

    #[test]
    fn limited_reads_refuse_special_files_and_symlinks_without_blocking() {
        let d = tmpdir("special");
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        std::fs::write(d.join("small"), b"1234").unwrap();
        std::os::unix::fs::symlink(d.join("small"), d.join("link")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("zero")).unwrap();
        let mut f = Files::new(Arc::new(Writer::new()));
        let p = |n: &str| d.join(n).to_string_lossy().into_owned();
        let (kind, msg) = f.start_read(1, &p("fifo"), STRICT, 1).err().unwrap();
        assert_eq!(kind, ErrorKind::InvalidArgument);
        assert!(msg.contains("FIFO"), "{msg}");
        for link in ["link", "zero"] {
            let (kind, msg) = f.start_read(1, &p(link), STRICT, 1).err().unwrap();
            assert_eq!(kind, ErrorKind::InvalidArgument);
            assert!(msg.contains("symlink"), "{msg}");
        }
        let follow = Some(ReadLimits { max_bytes: None, follow_symlinks: true });
        let (_, msg) = f.start_read(1, &p("zero"), follow, 1).err().unwrap();
        assert!(msg.contains("device"), "{msg}");
        assert!(f.start_read(1, &p("link"), follow, 1).is_ok());
        assert!(f.start_read(2, "/dev/null", None, 1).is_ok(), "no limits: the version-1 read");
    }

    #[test]
    fn limited_reads_refuse_files_past_the_cap() {
        let d = tmpdir("cap");
        std::fs::write(d.join("four"), b"1234").unwrap();
        std::fs::write(d.join("five"), b"12345").unwrap();
        let mut f = Files::new(Arc::new(Writer::new()));
        let p = |n: &str| d.join(n).to_string_lossy().into_owned();
        assert!(f.start_read(1, &p("four"), STRICT, 1).is_ok());
        let (kind, msg) = f.start_read(2, &p("five"), STRICT, 1).err().unwrap();
        assert_eq!(kind, ErrorKind::Limit);
        assert!(msg.contains("4-byte limit"), "{msg}");
    }
}
