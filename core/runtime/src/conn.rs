//! The host's connection to one guest agent: a unix socket (QEMU's chardev for the agent port,
//! or an agent in `--listen-unix` mode), one reader thread, and the multiplexer state.
//!
//! Threads and locks:
//! * The reader thread only reads: it decodes frames and applies them to the [`Mux`] under
//!   `state`, then wakes every waiter (`changed.notify_all`). It never writes, so a guest that
//!   blocks writing to us can never deadlock against a host blocked writing to it.
//! * Callers write frames under `writer` (one frame at a time, so frames never interleave) and
//!   wait on `changed` for replies, output, acks or exit reports.
//! * Any decode error, protocol violation, EOF or read error fails the mux with one typed
//!   reason and shuts the socket down; every waiter wakes up with that error. Nothing hangs
//!   and nothing panics on guest input.
//!
//! A connection can be replaced ([`Conn::reconnect`], after a snapshot restore): the mux keeps
//! its processes, and each reader thread carries a generation so a stale reader cannot fail
//! the new connection.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use supermachine_protocol::{encode_into, Control, Decoder, Kind, ProcessInfo, CHUNK, PROTOCOL_VERSION};

use crate::error::{Error, Result};
use crate::mux::{Mux, ReqKind};

/// A socket write that makes no progress for this long means the guest stopped reading.
const WRITE_STALL: Duration = Duration::from_secs(120);

/// Why a connection ended, handed to the death hook to turn into the user-facing error.
#[derive(Debug, Clone)]
pub enum Ending {
    /// The socket reached EOF or failed: the VM (or agent) is gone.
    Closed(String),
    /// The guest broke the protocol.
    Violation(String),
}

/// Turns an ending into the error every waiter sees (the VM layer adds QEMU's exit status and
/// the console tail).
pub type DeathHook = Box<dyn Fn(Ending) -> Error + Send + Sync>;

/// What the guest said when the connection was established.
#[derive(Clone, Debug)]
pub struct WelcomeInfo {
    pub boot_id: String,
    pub generation: u64,
    pub processes: Vec<ProcessInfo>,
}

pub(crate) struct Inner {
    pub(crate) state: Mutex<Mux>,
    pub(crate) changed: Condvar,
    writer: Mutex<Option<UnixStream>>,
    generation: Mutex<u64>,
    hook: Mutex<Option<DeathHook>>,
}

/// A live connection. Cheap to clone (shared).
#[derive(Clone)]
pub struct Conn {
    pub(crate) inner: Arc<Inner>,
}

/// Connects to a unix socket, retrying while it does not exist yet or nobody listens (QEMU
/// creates the socket file before it listens). `alive` is polled between tries: return an
/// error from it to stop early (e.g. QEMU exited).
pub fn connect_retry(
    path: &Path,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<UnixStream> {
    // Connecting is cheap and QEMU starts listening within tens of milliseconds: poll finely.
    let mut delay = Duration::from_micros(200);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                alive()?;
                if Instant::now() >= deadline {
                    return Err(Error::Timeout(format!(
                        "nothing listened on {} before the deadline ({e})",
                        path.display()
                    )));
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(2));
            }
            Err(e) => return Err(Error::io(format!("connect to {}", path.display()), e)),
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// 32 bytes from the host kernel's RNG.
pub fn entropy() -> Vec<u8> {
    let mut buf = vec![0u8; 32];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n <= 0 {
            // getrandom only fails on EINTR (retry) or absurd kernels; fall back to /dev/urandom.
            if std::io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                let _ = f.read_exact(&mut buf[filled..]);
            }
            break;
        }
        filled += n as usize;
    }
    buf
}

impl Conn {
    /// Starts a connection on `stream`: reader thread, Hello, and waits until `deadline` for
    /// the guest's Welcome.
    pub fn establish(stream: UnixStream, deadline: Instant, hook: Option<DeathHook>) -> Result<(Conn, WelcomeInfo)> {
        let conn = Conn::open(stream, hook)?;
        let welcome = conn.await_welcome(deadline)?;
        Ok((conn, welcome))
    }

    /// Starts a connection on `stream` (reader thread, Hello sent) without waiting for the
    /// Welcome: a restore connects while QEMU is still loading the state.
    pub fn open(stream: UnixStream, hook: Option<DeathHook>) -> Result<Conn> {
        let inner = Arc::new(Inner {
            state: Mutex::new(Mux::new()),
            changed: Condvar::new(),
            writer: Mutex::new(None),
            generation: Mutex::new(0),
            hook: Mutex::new(hook),
        });
        let conn = Conn { inner };
        let generation = conn.bump_generation();
        conn.start(stream, generation, false)?;
        Ok(conn)
    }

    /// Replaces the socket (e.g. after a snapshot restore): processes are kept and reconciled
    /// with the guest's report; outstanding requests are abandoned.
    pub fn reconnect(&self, stream: UnixStream, deadline: Instant) -> Result<WelcomeInfo> {
        // Bump first: the old reader, seeing its socket shut down, must find itself stale.
        let generation = self.bump_generation();
        self.shutdown_socket();
        self.lock().reconnect();
        self.start(stream, generation, true)?;
        self.await_welcome(deadline)
    }

    fn bump_generation(&self) -> u64 {
        let mut g = self.inner.generation.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        *g
    }

    /// Sets how endings are turned into errors.
    pub fn set_hook(&self, hook: DeathHook) {
        *self.inner.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    fn start(&self, stream: UnixStream, generation: u64, resync: bool) -> Result<()> {
        let read_half = stream.try_clone().map_err(|e| Error::io("clone the agent socket", e))?;
        let _ = stream.set_write_timeout(Some(WRITE_STALL));
        *self.inner.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        let inner = Arc::clone(&self.inner);
        std::thread::Builder::new()
            .name("supermachine-reader".into())
            .spawn(move || reader_loop(inner, read_half, generation, resync))
            .map_err(|e| Error::io("start the connection reader thread", e))?;

        self.send_control(&Control::Hello { version: PROTOCOL_VERSION, host_time_ns: now_ns(), entropy: entropy() })
    }

    /// Waits for the guest's Welcome to our Hello and adopts the processes it reports.
    pub fn await_welcome(&self, deadline: Instant) -> Result<WelcomeInfo> {
        let welcome = self.wait(Some(deadline), |m| {
            if let Some(e) = m.failure() {
                return Err(e.clone());
            }
            Ok(match m.welcome() {
                Some(Control::Welcome { boot_id, generation, processes, .. }) => Some(WelcomeInfo {
                    boot_id: boot_id.clone(),
                    generation: *generation,
                    processes: processes.clone(),
                }),
                _ => None,
            })
        });
        let welcome = match welcome {
            Ok(w) => w,
            Err(e) => {
                let e = match e {
                    Error::Timeout(_) => Error::Timeout("the guest agent did not answer the hello before the deadline".into()),
                    e => e,
                };
                self.close(e.clone());
                return Err(e);
            }
        };
        self.lock().reconcile(&welcome.processes);
        if self.lock().has_feature(supermachine_protocol::FEATURE_TCP) {
            // Refuses guest TCP channels nobody attached (e.g. a snapshot's agent listening).
            crate::tcp::ensure_service(self)?;
        }
        Ok(welcome)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Mux> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `f` yields a value, fails, or the deadline passes (→ `Error::Timeout`).
    /// `f` runs under the state lock, once at first and again after every change.
    pub(crate) fn wait<T>(
        &self,
        deadline: Option<Instant>,
        mut f: impl FnMut(&mut Mux) -> Result<Option<T>>,
    ) -> Result<T> {
        let mut guard = self.lock();
        loop {
            if let Some(v) = f(&mut guard)? {
                return Ok(v);
            }
            match deadline {
                None => guard = self.inner.changed.wait(guard).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::Timeout("timed out".into()));
                    }
                    guard = self.inner.changed.wait_timeout(guard, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
    }

    /// Writes one frame. A failed write fails the connection.
    pub(crate) fn send_frame(&self, kind: Kind, channel: u32, payload: &[u8]) -> Result<()> {
        let mut buf = Vec::with_capacity(payload.len() + supermachine_protocol::HEADER_LEN);
        encode_into(&mut buf, kind, channel, payload)
            .map_err(|e| Error::InvalidArgument(format!("cannot send: {e}")))?;
        let result = {
            let mut w = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
            match w.as_mut() {
                None => Err(io::Error::new(io::ErrorKind::NotConnected, "connection closed")),
                Some(s) => send_all(s, &buf),
            }
        };
        if let Err(e) = result {
            let reason = match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    format!("the guest stopped reading (a write made no progress for {} s)", WRITE_STALL.as_secs())
                }
                _ => format!("writing to the guest failed: {e}"),
            };
            self.end(Ending::Closed(reason), None);
            return Err(self.lock().failure().cloned().unwrap_or(Error::VmDied("connection closed".into())));
        }
        Ok(())
    }

    pub(crate) fn send_control(&self, msg: &Control) -> Result<()> {
        self.send_frame(Kind::Control, 0, &msg.to_bytes())
    }

    /// Sends a request built from a fresh request id and waits for its reply. A guest-side
    /// `Error` reply becomes `Error::Guest`.
    pub(crate) fn request(
        &self,
        kind: ReqKind,
        deadline: Option<Instant>,
        build: impl FnOnce(u64) -> Control,
    ) -> Result<Control> {
        let req = self.lock().begin(kind)?;
        if let Err(e) = self.send_control(&build(req)) {
            self.lock().abandon(req);
            return Err(e);
        }
        self.await_reply(req, deadline)
    }

    /// Waits for the reply to `req` (already sent).
    pub(crate) fn await_reply(&self, req: u64, deadline: Option<Instant>) -> Result<Control> {
        match self.wait(deadline, |m| m.take_reply(req)) {
            Ok(Control::Error { kind, message, .. }) => Err(Error::Guest { kind, message }),
            Ok(reply) => Ok(reply),
            Err(e) => {
                self.lock().abandon(req);
                Err(e)
            }
        }
    }

    /// Sends a request whose reply nobody waits for (e.g. Forget).
    pub(crate) fn fire(&self, kind: ReqKind, build: impl FnOnce(u64) -> Control) -> Result<()> {
        let req = self.lock().begin_detached(kind)?;
        self.send_control(&build(req))
    }

    /// Round trip to the agent.
    pub fn ping(&self, deadline: Option<Instant>) -> Result<()> {
        self.request(ReqKind::Ping, deadline, |req| Control::Ping { req }).map(|_| ())
    }

    /// Lists the guest's processes.
    pub fn list_processes(&self) -> Result<Vec<ProcessInfo>> {
        match self.request(ReqKind::ListProcesses, None, |req| Control::ListProcesses { req })? {
            Control::Processes { processes, .. } => Ok(processes),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Streams `data` as a file-data channel (used by write_file): CHUNK-sized frames, then
    /// the empty end frame.
    pub(crate) fn send_stream(&self, channel: u32, mut data: impl Read) -> Result<u64> {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read the data to upload", e)),
            };
            self.send_frame(Kind::FileData, channel, &buf[..n])?;
            total += n as u64;
        }
        self.send_frame(Kind::FileData, channel, &[])?;
        Ok(total)
    }

    /// Ends the connection with `ending` (first ending wins) and wakes everyone.
    fn end(&self, ending: Ending, generation: Option<u64>) {
        end_inner(&self.inner, ending, generation);
    }

    /// Closes the socket; the reader thread sees EOF and fails the mux with "closed".
    pub fn shutdown_socket(&self) {
        if let Some(s) = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Closes the connection for good: every waiter gets `err`.
    pub fn close(&self, err: Error) {
        self.lock().fail(err);
        self.shutdown_socket();
        self.inner.changed.notify_all();
    }

    /// The reason the connection ended, if it did.
    pub fn failure(&self) -> Option<Error> {
        self.lock().failure().cloned()
    }
}

/// `write_all` with MSG_NOSIGNAL: a peer that went away must be an error, never a SIGPIPE
/// that kills the host process.
fn send_all(s: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        // SAFETY: the fd is owned by `s`, alive for the call; buf is a valid readable slice.
        let n = unsafe { libc::send(s.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn end_inner(inner: &Arc<Inner>, ending: Ending, generation: Option<u64>) {
    if let Some(g) = generation {
        if *inner.generation.lock().unwrap_or_else(|e| e.into_inner()) != g {
            return; // a stale reader: a newer connection has replaced this one
        }
    }
    let already = inner.state.lock().unwrap_or_else(|e| e.into_inner()).failure().is_some();
    if !already {
        // The hook may block briefly (waiting for QEMU's exit status): call it unlocked.
        let err = match inner.hook.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(h) => h(ending),
            None => match ending {
                Ending::Closed(r) => Error::VmDied(r),
                Ending::Violation(r) => Error::Protocol(r),
            },
        };
        inner.state.lock().unwrap_or_else(|e| e.into_inner()).fail(err);
    }
    if let Some(s) = inner.writer.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    inner.changed.notify_all();
}

/// Most bytes skipped while looking for the Welcome on a reconnect.
const MAX_RESYNC: usize = 1 << 20;

/// Where the first complete Welcome frame starts in `buf`: `Ok(Some(offset))`, `Ok(None)` if
/// more bytes are needed. Used on reconnects, where the tail of a frame the guest was writing
/// when the previous host vanished may precede the Welcome (see the agent's host contract).
pub fn find_welcome(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + supermachine_protocol::HEADER_LEN <= buf.len() {
        let off = buf[i..].windows(4).position(|w| w == [b'S', b'M', Kind::Control as u8, 0])?;
        let at = i + off;
        let hdr = &buf[at..];
        if hdr.len() < supermachine_protocol::HEADER_LEN {
            return None;
        }
        let channel = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let len = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        if channel == 0 && len <= supermachine_protocol::MAX_PAYLOAD {
            let end = supermachine_protocol::HEADER_LEN + len;
            if hdr.len() < end {
                return None; // maybe the Welcome: wait for the rest
            }
            if matches!(Control::from_bytes(&hdr[supermachine_protocol::HEADER_LEN..end]), Ok(Control::Welcome { .. })) {
                return Some(at);
            }
        }
        i = at + 1;
    }
    None
}

fn reader_loop(inner: Arc<Inner>, mut sock: UnixStream, generation: u64, resync: bool) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 128 * 1024];
    // Before the Welcome of a reconnect, bytes are collected here and skipped up to it.
    let mut pre: Option<Vec<u8>> = resync.then(Vec::new);
    let ending = loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => break Ending::Closed("the connection to the guest agent closed".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Ending::Closed(format!("reading from the guest agent failed: {e}")),
        };
        if let Some(p) = pre.as_mut() {
            p.extend_from_slice(&buf[..n]);
            match find_welcome(p) {
                Some(at) => {
                    decoder.push(&p[at..]);
                    pre = None;
                }
                None if p.len() > MAX_RESYNC => {
                    break Ending::Violation(format!("no welcome in the first {} bytes after reconnecting", p.len()))
                }
                None => continue,
            }
        } else {
            decoder.push(&buf[..n]);
        }
        let mut violation = None;
        {
            let mut mux = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            if *inner.generation.lock().unwrap_or_else(|e| e.into_inner()) != generation {
                return; // replaced by a newer connection
            }
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        if let Err(v) = mux.on_frame(frame) {
                            violation = Some(v.0);
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        violation = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        inner.changed.notify_all();
        if let Some(v) = violation {
            break Ending::Violation(v);
        }
    };
    end_inner(&inner, ending, Some(generation));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use supermachine_protocol::{Frame, MAX_PAYLOAD};

    /// A fake guest on the other end of a socketpair: answers Hello with Welcome, then runs
    /// `script` with the raw stream.
    fn fake_guest(script: impl FnOnce(&mut UnixStream, &mut Decoder) + Send + 'static) -> UnixStream {
        let (host, mut guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut d = Decoder::new();
            let hello = read_control(&mut guest, &mut d);
            assert!(matches!(hello, Control::Hello { version: PROTOCOL_VERSION, ref entropy, .. } if entropy.len() == 32));
            write_control(
                &mut guest,
                &Control::Welcome { version: PROTOCOL_VERSION, boot_id: "fake".into(), generation: 1, processes: vec![], features: vec![] },
            );
            script(&mut guest, &mut d);
        });
        host
    }

    fn read_frame(s: &mut UnixStream, d: &mut Decoder) -> Option<Frame> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = d.next_frame().unwrap() {
                return Some(f);
            }
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
            d.push(&buf[..n]);
        }
    }

    fn read_control(s: &mut UnixStream, d: &mut Decoder) -> Control {
        let f = read_frame(s, d).expect("a frame");
        Control::from_bytes(&f.payload).unwrap()
    }

    fn write_control(s: &mut UnixStream, m: &Control) {
        s.write_all(&supermachine_protocol::control_frame(m).unwrap()).unwrap();
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn hello_welcome_and_ping() {
        let host = fake_guest(|g, d| loop {
            match read_frame(g, d) {
                Some(f) => {
                    if let Control::Ping { req } = Control::from_bytes(&f.payload).unwrap() {
                        write_control(g, &Control::Pong { req });
                    }
                }
                None => return,
            }
        });
        let (conn, w) = Conn::establish(host, deadline(), None).unwrap();
        assert_eq!(w.boot_id, "fake");
        for _ in 0..3 {
            conn.ping(Some(deadline())).unwrap();
        }
    }

    fn expect_dropped(script: impl FnOnce(&mut UnixStream, &mut Decoder) + Send + 'static, needle: &str) {
        let host = fake_guest(move |g, d| {
            let _ping = read_frame(g, d);
            script(g, d);
            // keep the socket open: the host must drop it on its own
            std::thread::sleep(Duration::from_secs(3));
        });
        let (conn, _) = Conn::establish(host, deadline(), None).unwrap();
        let t = Instant::now();
        let e = conn.ping(None).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
        assert!(matches!(e, Error::Protocol(_)), "{e:?}");
        assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        // later calls fail the same way at once
        assert!(conn.ping(None).is_err());
    }

    #[test]
    fn garbage_drops_the_connection() {
        expect_dropped(|g, _| g.write_all(b"\x00\x01garbage garbage").unwrap(), "magic");
    }

    #[test]
    fn random_bytes_drop_the_connection() {
        expect_dropped(
            |g, _| {
                let mut x: u32 = 12345;
                let bytes: Vec<u8> = (0..10000)
                    .map(|_| {
                        x = x.wrapping_mul(1103515245).wrapping_add(12345);
                        (x >> 16) as u8
                    })
                    .collect();
                g.write_all(&bytes).unwrap();
            },
            "malformed",
        );
    }

    #[test]
    fn oversized_frame_drops_the_connection() {
        expect_dropped(
            |g, _| {
                let mut hdr = b"SM\x03\x00\x01\x00\x00\x00".to_vec();
                hdr.extend_from_slice(&((MAX_PAYLOAD as u32) * 4).to_le_bytes());
                g.write_all(&hdr).unwrap();
            },
            "oversized",
        );
    }

    #[test]
    fn bad_json_drops_the_connection() {
        expect_dropped(
            |g, _| g.write_all(&Frame::new(Kind::Control, 0, b"{\"op\":\"launch_missiles\"}".to_vec()).encode().unwrap()).unwrap(),
            "malformed control message",
        );
    }

    #[test]
    fn unsolicited_output_drops_the_connection() {
        expect_dropped(
            |g, _| g.write_all(&Frame::new(Kind::Stdout, 77, b"boo".to_vec()).encode().unwrap()).unwrap(),
            "unknown process 77",
        );
    }

    #[test]
    fn welcome_is_found_behind_a_torn_frame() {
        let welcome = supermachine_protocol::control_frame(&Control::Welcome {
            version: PROTOCOL_VERSION,
            boot_id: "b".into(),
            generation: 2,
            processes: vec![],
            features: vec![],
        })
        .unwrap();
        let torn = Frame::new(Kind::Stdout, 1, vec![7; 500]).encode().unwrap();
        let mut wire = torn[300..].to_vec(); // the tail of a frame cut by the old connection
        wire.extend_from_slice(b"SM\x01\x00"); // a false start
        let at = wire.len();
        wire.extend_from_slice(&welcome);
        assert_eq!(find_welcome(&wire), Some(at));
        assert_eq!(find_welcome(&wire[..at + 20]), None, "incomplete welcome: wait");
        assert_eq!(find_welcome(&welcome), Some(0));
        let pong = supermachine_protocol::control_frame(&Control::Pong { req: 1 }).unwrap();
        assert_eq!(find_welcome(&pong), None);
    }

    #[test]
    fn reconnect_keeps_processes() {
        // first connection: spawn process 9; second: the guest reports it still running
        let script = |conn_no: u64| {
            move |g: &mut UnixStream, d: &mut Decoder| {
                if conn_no == 1 {
                    let f = read_frame(g, d).unwrap();
                    let req = Control::from_bytes(&f.payload).unwrap().req().unwrap();
                    write_control(g, &Control::Spawned { req, id: 9, os_pid: 99 });
                    g.write_all(&Frame::new(Kind::Stdout, 9, b"before".to_vec()).encode().unwrap()).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        };
        let (conn, _) = Conn::establish(fake_guest(script(1)), deadline(), None).unwrap();
        let child = crate::child::ExecChild::spawn(&conn, &crate::child::SpawnOptions { argv: vec!["x".into()], ..Default::default() }).unwrap();
        assert_eq!(child.read(crate::mux::Stream::Stdout, 100, Some(Duration::from_secs(5))).unwrap(), b"before");

        let (host, mut guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut d = Decoder::new();
            let _hello = read_control(&mut guest, &mut d);
            guest.write_all(b"ail of an old frame").unwrap();
            write_control(
                &mut guest,
                &Control::Welcome {
                    version: PROTOCOL_VERSION,
                    boot_id: "fake".into(),
                    generation: 2,
                    processes: vec![ProcessInfo { id: 9, os_pid: 99, argv: vec![], running: true, tty: false }],
                    features: vec![],
                },
            );
            guest.write_all(&Frame::new(Kind::Stdout, 9, b"after".to_vec()).encode().unwrap()).unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let w = conn.reconnect(host, deadline()).unwrap();
        assert_eq!(w.generation, 2);
        assert_eq!(child.read(crate::mux::Stream::Stdout, 100, Some(Duration::from_secs(5))).unwrap(), b"after");
        assert_eq!(child.poll().unwrap(), None);
    }

    #[test]
    fn eof_fails_waiters_with_vm_died() {
        let host = fake_guest(|g, d| {
            let _ = read_frame(g, d);
            let _ = g.shutdown(std::net::Shutdown::Both);
        });
        let (conn, _) = Conn::establish(host, deadline(), None).unwrap();
        let e = conn.ping(None).unwrap_err();
        assert!(matches!(e, Error::VmDied(_)), "{e:?}");
    }

    #[test]
    fn silent_guest_times_out_the_handshake() {
        let (host, _guest) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let e = Conn::establish(host, Instant::now() + Duration::from_millis(200), None).err().unwrap();
        assert!(matches!(e, Error::Timeout(_)), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn connect_retry_waits_for_listener() {
        let dir = std::env::temp_dir().join(format!("sm-conn-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("late.sock");
        let _ = std::fs::remove_file(&path);
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let l = UnixListener::bind(&p2).unwrap();
            let _ = l.accept();
        });
        connect_retry(&path, deadline(), || Ok(())).unwrap();
        t.join().unwrap();
        let e = connect_retry(&dir.join("never.sock"), Instant::now() + Duration::from_millis(50), || Ok(())).unwrap_err();
        assert!(matches!(e, Error::Timeout(_)));
        let e = connect_retry(&dir.join("never.sock"), deadline(), || Err(Error::VmDied("qemu exited".into()))).unwrap_err();
        assert!(matches!(e, Error::VmDied(_)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
