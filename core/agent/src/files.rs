//! File transfers. Writes arrive as `WriteFile{req}` + FileData frames on channel `req` (empty =
//! end) and are written synchronously by the reader thread (the root is tmpfs-backed, so this
//! is a memory copy); exactly one reply, `Ok` or `Error`, follows the end frame, even when the
//! failure happened at open. Reads are streamed by a thread: `FileInfo`, FileData chunks under
//! a credit window, then an empty end frame — or `Error{req}` if reading fails midway.
//! Transfers belong to one host session: a new Hello drops unfinished writes and stops reads.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::{Arc, Mutex};

use supermachine_protocol::{Control, ErrorKind, Kind, CHUNK};

use crate::credit::Window;
use crate::process::Failure;
use crate::sys::lock;
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
    pub fn start_write(&mut self, req: u64, path: String, mode: u32) -> Option<Control> {
        let mode = mode & 0o7777;
        let opened = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&path);
        let (file, error) = match opened {
            Ok(f) => match f.set_permissions(Permissions::from_mode(mode)) {
                Ok(()) => (Some(f), None),
                Err(e) => (None, Some(io_failure("chmod", &path, &e))),
            },
            Err(e) => (None, Some(io_failure("create", &path, &e))),
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
    /// calls [`Files::stream`].
    pub fn start_read(&mut self, req: u64, path: &str, epoch: u64) -> Result<(Control, PendingRead), Failure> {
        let file = File::open(path).map_err(|e| io_failure("open", path, &e))?;
        let meta = file.metadata().map_err(|e| io_failure("stat", path, &e))?;
        if meta.is_dir() {
            return Err((ErrorKind::InvalidArgument, format!("cannot read {path:?}: it is a directory")));
        }
        let channel = req as u32;
        let window = Arc::new(Window::new(epoch));
        if let Some(old) = lock(&self.reads).insert(channel, window.clone()) {
            old.cancel();
        }
        let info = Control::FileInfo { req, size: meta.len(), mode: meta.mode() & 0o7777 };
        Ok((info, PendingRead { channel, req, file, window, epoch }))
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

fn stream_file(w: &Writer, r: &PendingRead) {
    let mut buf = vec![0u8; CHUNK];
    let mut file = &r.file;
    loop {
        let Some(max) = r.window.wait_available(CHUNK) else { return };
        match file.read(&mut buf[..max]) {
            Ok(0) => break,
            Ok(n) => {
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
        assert_eq!(f.start_read(1, "/", 1).err().unwrap().0, ErrorKind::InvalidArgument);
        assert_eq!(f.start_read(1, "/no/such/file", 1).err().unwrap().0, ErrorKind::NotFound);
    }
}
