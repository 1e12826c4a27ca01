//! The host-side multiplexer: pure state, no I/O. The connection's reader thread feeds it every
//! frame from the guest ([`Mux::on_frame`]); callers take replies, process output, exit
//! statuses and file data out of it. `conn.rs` wraps it in a mutex + condvar and does the I/O.
//!
//! Invariants (each violation by the guest is a [`Violation`] and ends the connection):
//! * every reply names a request the host has outstanding, and has the right type for it;
//! * stdout/stderr frames name a known process, arrive before its EOF, and never exceed the
//!   process's output window (`DEFAULT_OUTPUT_WINDOW` plus every credit granted);
//! * a StdinAck never acknowledges more than was sent;
//! * file data names a read transfer that has started (FileInfo), stops at its end frame,
//!   and never exceeds the transfer's window (same credit scheme as output);
//! * only guest → host message types arrive.
//!
//! Flow control: host memory per process is bounded by the output window. Consumers take
//! bytes out with [`Mux::take_output`], which returns the credit to grant back once a quarter
//! of the window has been consumed (so the guest always has ≥ ¾ window free when the host
//! buffer is empty: no stall). Stdin: the host keeps at most `STDIN_WINDOW` bytes unacked.

use std::collections::{HashMap, VecDeque};

use supermachine_protocol::{
    Control, ExitStatus, Frame, Kind, ProcessInfo, DEFAULT_OUTPUT_WINDOW, PROTOCOL_VERSION, STDIN_WINDOW,
};

use crate::error::Error;
use crate::tcp::table::TcpTable;

/// Credit is granted back in batches of this many consumed bytes.
pub const CREDIT_BATCH: u64 = DEFAULT_OUTPUT_WINDOW / 4;

/// The first request id (see [`Mux::begin`]).
pub const FIRST_REQ: u64 = 1 << 31;

/// A protocol violation by the guest: the reason the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// What a request expects as its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqKind {
    Spawn,
    Signal,
    Resize,
    WriteFile,
    ReadFile,
    ListProcesses,
    Pause,
    Resume,
    Ping,
    Forget,
    TcpConnect,
    TcpListen,
    TcpUnlisten,
}

impl ReqKind {
    fn accepts(self, reply: &Control) -> bool {
        matches!(
            (self, reply),
            (_, Control::Error { .. })
                | (ReqKind::Spawn, Control::Spawned { .. })
                | (ReqKind::ReadFile, Control::FileInfo { .. })
                | (ReqKind::ListProcesses, Control::Processes { .. })
                | (ReqKind::Pause, Control::Paused { .. })
                | (ReqKind::Ping, Control::Pong { .. })
                | (ReqKind::TcpConnect, Control::TcpOpened { .. })
                | (
                    ReqKind::Signal
                        | ReqKind::Resize
                        | ReqKind::WriteFile
                        | ReqKind::Resume
                        | ReqKind::Forget
                        | ReqKind::TcpListen
                        | ReqKind::TcpUnlisten,
                    Control::Ok { .. }
                )
        )
    }
}

struct Request {
    kind: ReqKind,
    reply: Option<Control>,
    /// The caller gave up (timeout) or never wanted the reply: drop it on arrival.
    detached: bool,
}

/// Which output stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Default)]
struct OutBuf {
    chunks: VecDeque<Vec<u8>>,
    /// Offset into the front chunk already handed out.
    front_off: usize,
    len: usize,
    eof: bool,
}

impl OutBuf {
    fn take(&mut self, max: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(max.min(self.len));
        while out.len() < max {
            let Some(front) = self.chunks.front() else { break };
            let avail = &front[self.front_off..];
            let n = avail.len().min(max - out.len());
            out.extend_from_slice(&avail[..n]);
            self.front_off += n;
            if self.front_off == front.len() {
                self.chunks.pop_front();
                self.front_off = 0;
            }
        }
        self.len -= out.len();
        out
    }
}

/// Host-side state of one guest process.
pub struct Proc {
    pub os_pid: u32,
    pub tty: bool,
    stdout: OutBuf,
    stderr: OutBuf,
    /// Output bytes the guest may still send before it needs more credit.
    window: u64,
    /// Bytes consumed by the host but not yet credited back.
    owed: u64,
    /// Stdin bytes sent and not yet acknowledged.
    stdin_unacked: u64,
    stdin_closed: bool,
    exit: Option<ExitStatus>,
}

impl Proc {
    fn new(os_pid: u32, tty: bool) -> Proc {
        Proc {
            os_pid,
            tty,
            stdout: OutBuf::default(),
            stderr: OutBuf::default(),
            window: DEFAULT_OUTPUT_WINDOW,
            owed: 0,
            stdin_unacked: 0,
            stdin_closed: false,
            exit: None,
        }
    }
    fn buf(&mut self, s: Stream) -> &mut OutBuf {
        match s {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }
}

/// A guest → host file transfer (read_file / download). Flow-controlled like process output:
/// the agent sends at most the window, the host credits the channel as it consumes.
struct Transfer {
    size: u64,
    mode: u32,
    received: u64,
    window: u64,
    owed: u64,
    chunks: VecDeque<Vec<u8>>,
    done: bool,
    error: Option<Error>,
    /// The reader gave up: further data is dropped until the end frame.
    discard: bool,
}

/// Result of [`Mux::take_output`].
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Bytes, plus a credit to send to the guest (if a batch is due).
    Data { bytes: Vec<u8>, credit: Option<u64> },
    /// The stream has ended and everything was taken.
    Eof,
    /// Nothing yet: wait.
    Pending,
}

/// Result of [`Mux::take_file`].
#[derive(Debug, PartialEq, Eq)]
pub enum FileChunk {
    /// Bytes, plus a credit to send on the transfer's channel (if a batch is due).
    Data { bytes: Vec<u8>, credit: Option<u64> },
    End,
    Pending,
}

/// Result of [`Mux::stdin_reserve`].
#[derive(Debug, PartialEq, Eq)]
pub enum StdinSlot {
    /// Send now: the bytes are counted as unacked.
    Go,
    /// The window is full: wait for an ack.
    Wait,
}

/// The whole multiplexer state of one connection.
pub struct Mux {
    next_req: u64,
    requests: HashMap<u64, Request>,
    procs: HashMap<u32, Proc>,
    transfers: HashMap<u32, Transfer>,
    /// TCP channels and forwards (tcp/table.rs).
    pub tcp: TcpTable,
    welcome: Option<Control>,
    failure: Option<Error>,
}

impl Default for Mux {
    fn default() -> Self {
        Mux::new()
    }
}

fn name_of(msg: &Control) -> String {
    serde_json::to_value(msg)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

impl Mux {
    pub fn new() -> Mux {
        Mux {
            next_req: FIRST_REQ,
            requests: HashMap::new(),
            procs: HashMap::new(),
            transfers: HashMap::new(),
            tcp: TcpTable::default(),
            welcome: None,
            failure: None,
        }
    }

    // ------------------------------------------------------------------ failure

    /// Marks the connection dead. The first reason wins; every waiter then gets it.
    pub fn fail(&mut self, e: Error) {
        if self.failure.is_none() {
            self.failure = Some(e);
        }
    }

    pub fn failure(&self) -> Option<&Error> {
        self.failure.as_ref()
    }

    fn check(&self) -> Result<(), Error> {
        match &self.failure {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// A new connection to the same guest begins (snapshot restore, re-attach): outstanding
    /// requests and transfers are abandoned, output windows reset, processes are kept and
    /// reconciled with the guest's Welcome later by [`Mux::reconcile`].
    pub fn reconnect(&mut self) {
        self.failure = None;
        self.welcome = None;
        self.requests.clear();
        self.transfers.clear();
        self.tcp.reconnect();
        for p in self.procs.values_mut() {
            p.window = DEFAULT_OUTPUT_WINDOW;
            p.owed = 0;
            p.stdin_unacked = 0;
        }
    }

    // ------------------------------------------------------------------ incoming

    /// Applies one frame from the guest.
    pub fn on_frame(&mut self, frame: Frame) -> Result<(), Violation> {
        match frame.kind {
            Kind::Control => {
                let msg = Control::from_bytes(&frame.payload).map_err(|e| Violation(e.to_string()))?;
                self.on_control(msg)
            }
            Kind::Stdout => self.on_output(frame.channel, Stream::Stdout, frame.payload),
            Kind::Stderr => self.on_output(frame.channel, Stream::Stderr, frame.payload),
            Kind::FileData => self.on_file_data(frame.channel, frame.payload),
            Kind::TcpData => self.tcp.on_data(frame.channel, frame.payload),
            Kind::Stdin => Err(Violation("the guest sent a stdin frame (host → guest only)".into())),
        }
    }

    fn on_control(&mut self, msg: Control) -> Result<(), Violation> {
        match msg {
            Control::Welcome { version, .. } => {
                if self.welcome.is_some() {
                    return Err(Violation("a second welcome on one connection".into()));
                }
                if version != PROTOCOL_VERSION {
                    return Err(Violation(format!(
                        "the guest agent speaks protocol version {version}, this host speaks {PROTOCOL_VERSION}: rebuild the guest image"
                    )));
                }
                self.welcome = Some(msg);
                Ok(())
            }
            Control::Exited { id, status } => {
                let p = self.procs.get_mut(&id).ok_or_else(|| Violation(format!("exit report for unknown process {id}")))?;
                if p.exit.is_some() {
                    return Err(Violation(format!("a second exit report for process {id}")));
                }
                p.exit = Some(status);
                p.stdout.eof = true;
                p.stderr.eof = true;
                Ok(())
            }
            Control::StdinAck { id, bytes } => {
                // Acks for stdin the agent dropped may arrive after the host forgot the process
                // (exited, handle dropped): harmless, so ignored.
                let Some(p) = self.procs.get_mut(&id) else { return Ok(()) };
                if bytes > p.stdin_unacked {
                    return Err(Violation(format!(
                        "stdin ack of {bytes} bytes for process {id}, but only {} were sent",
                        p.stdin_unacked
                    )));
                }
                p.stdin_unacked -= bytes;
                Ok(())
            }
            Control::Spawned { req, id, os_pid } => {
                self.expect_reply(req, ReqKind::Spawn)?;
                if self.procs.get(&id).is_some_and(|p| p.exit.is_none()) {
                    return Err(Violation(format!("spawned reports process id {id}, which is still running")));
                }
                self.procs.insert(id, Proc::new(os_pid, false));
                self.store_reply(req, Control::Spawned { req, id, os_pid });
                Ok(())
            }
            Control::FileInfo { req, size, mode } => {
                self.expect_reply(req, ReqKind::ReadFile)?;
                let chan = channel_of(req);
                self.transfers.insert(
                    chan,
                    Transfer {
                        size,
                        mode,
                        received: 0,
                        window: DEFAULT_OUTPUT_WINDOW,
                        owed: 0,
                        chunks: VecDeque::new(),
                        done: false,
                        error: None,
                        discard: false,
                    },
                );
                self.store_reply(req, Control::FileInfo { req, size, mode });
                Ok(())
            }
            Control::TcpOpened { req, id } => {
                self.expect_reply(req, ReqKind::TcpConnect)?;
                self.tcp.on_opened(id)?;
                if self.requests.get(&req).is_some_and(|r| r.detached) {
                    // Nobody waits for it: the guest must hear that the channel is dropped.
                    self.tcp.abandon_opened(id);
                }
                self.store_reply(req, Control::TcpOpened { req, id });
                Ok(())
            }
            Control::TcpAccepted { id, port } => self.tcp.on_accepted(id, port),
            Control::TcpCredit { id, bytes } => self.tcp.on_credit(id, bytes),
            Control::TcpClose { id } => {
                self.tcp.on_close(id);
                Ok(())
            }
            Control::Error { req: 0, message, .. } => {
                // The agent's way of saying it could not understand us (or our version).
                Err(Violation(format!("the guest agent reported a protocol error: {message}")))
            }
            Control::Error { req, kind, message } => {
                // A read may fail after it started streaming: fail the transfer.
                if let Some(t) = self.transfers.get_mut(&channel_of(req)) {
                    if !t.done && t.error.is_none() {
                        t.error = Some(Error::Guest { kind, message });
                        return Ok(());
                    }
                }
                let msg = Control::Error { req, kind, message };
                let r = self.requests.get(&req).map(|r| r.kind);
                match r {
                    Some(k) => {
                        self.expect_reply(req, k)?;
                        self.store_reply(req, msg);
                        Ok(())
                    }
                    None => Err(Violation(format!("error reply for unknown request {req}"))),
                }
            }
            reply @ (Control::Processes { .. } | Control::Paused { .. } | Control::Ok { .. } | Control::Pong { .. }) => {
                let req = reply.req().unwrap_or(0);
                let kind = self
                    .requests
                    .get(&req)
                    .map(|r| r.kind)
                    .ok_or_else(|| Violation(format!("unsolicited {} reply for request {req}", name_of(&reply))))?;
                if !kind.accepts(&reply) {
                    return Err(Violation(format!("{} reply to a {kind:?} request", name_of(&reply))));
                }
                self.store_reply(req, reply);
                Ok(())
            }
            other => Err(Violation(format!("unexpected {} message from the guest (host → guest only)", name_of(&other)))),
        }
    }

    /// Checks that `req` is outstanding with the given kind (it is a reply the host awaits).
    fn expect_reply(&self, req: u64, kind: ReqKind) -> Result<(), Violation> {
        match self.requests.get(&req) {
            None => Err(Violation(format!("reply for unknown request {req}"))),
            Some(r) if r.reply.is_some() => Err(Violation(format!("a second reply for request {req}"))),
            Some(r) if r.kind != kind => Err(Violation(format!("reply of the wrong type for {:?} request {req}", r.kind))),
            Some(_) => Ok(()),
        }
    }

    fn store_reply(&mut self, req: u64, msg: Control) {
        if let Some(r) = self.requests.get_mut(&req) {
            if r.detached {
                self.requests.remove(&req);
            } else {
                r.reply = Some(msg);
            }
        }
    }

    fn on_output(&mut self, id: u32, stream: Stream, data: Vec<u8>) -> Result<(), Violation> {
        let p = self.procs.get_mut(&id).ok_or_else(|| Violation(format!("output for unknown process {id}")))?;
        let len = data.len() as u64;
        if p.exit.is_some() || p.buf(stream).eof {
            return Err(Violation(format!("{stream:?} data for process {id} after its end of stream")));
        }
        if len > p.window {
            return Err(Violation(format!(
                "process {id} sent {len} output bytes with only {} bytes of window left (flow-control violation)",
                p.window
            )));
        }
        p.window -= len;
        let b = p.buf(stream);
        if data.is_empty() {
            b.eof = true;
        } else {
            b.len += data.len();
            b.chunks.push_back(data);
        }
        Ok(())
    }

    fn on_file_data(&mut self, chan: u32, data: Vec<u8>) -> Result<(), Violation> {
        let t = self
            .transfers
            .get_mut(&chan)
            .ok_or_else(|| Violation(format!("file data on channel {chan}, which no read transfer uses")))?;
        if t.done {
            return Err(Violation(format!("file data on channel {chan} after its end")));
        }
        if data.is_empty() {
            t.done = true;
            if t.discard {
                self.transfers.remove(&chan);
            }
            return Ok(());
        }
        let len = data.len() as u64;
        if len > t.window {
            return Err(Violation(format!(
                "file transfer {chan} sent {len} bytes with only {} bytes of window left (flow-control violation)",
                t.window
            )));
        }
        t.window -= len;
        // The announced size is a hint (files in /proc announce 0 and then stream their
        // contents); host memory is bounded by the window, not by it.
        t.received += len;
        if !t.discard {
            t.chunks.push_back(data);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ requests

    /// Registers a request and returns its id.
    pub fn begin(&mut self, kind: ReqKind) -> Result<u64, Error> {
        self.check()?;
        let req = self.next_req;
        // Request ids double as transfer channel ids (u32). They live in the upper half of the
        // u32 range, so a read transfer's channel never equals a guest process id (small
        // integers chosen by the agent): a Credit{id} is then never ambiguous.
        self.next_req = if self.next_req >= u32::MAX as u64 { FIRST_REQ } else { self.next_req + 1 };
        self.requests.insert(req, Request { kind, reply: None, detached: false });
        Ok(req)
    }

    /// Registers a request whose reply nobody waits for.
    pub fn begin_detached(&mut self, kind: ReqKind) -> Result<u64, Error> {
        let req = self.begin(kind)?;
        if let Some(r) = self.requests.get_mut(&req) {
            r.detached = true;
        }
        Ok(req)
    }

    /// The reply to `req`, if it came. `Err` if the connection died first.
    pub fn take_reply(&mut self, req: u64) -> Result<Option<Control>, Error> {
        match self.requests.get_mut(&req) {
            Some(r) => {
                if let Some(reply) = r.reply.take() {
                    self.requests.remove(&req);
                    return Ok(Some(reply));
                }
            }
            None => {
                self.check()?;
                // Only a reconnect forgets outstanding requests.
                return Err(Error::VmDied(
                    "the channel to the guest was re-established while this call waited; its outcome is unknown".into(),
                ));
            }
        }
        self.check()?;
        Ok(None)
    }

    /// The caller stopped waiting for `req`.
    pub fn abandon(&mut self, req: u64) {
        if let Some(r) = self.requests.get_mut(&req) {
            if r.reply.is_some() {
                self.requests.remove(&req);
            } else {
                r.detached = true;
            }
        }
        // An unfinished read keeps a tombstone that swallows the rest of its data, so frames
        // already in flight are not mistaken for a protocol violation.
        let chan = channel_of(req);
        match self.transfers.get_mut(&chan) {
            Some(t) if !t.done => {
                t.discard = true;
                t.chunks.clear();
            }
            _ => {
                self.transfers.remove(&chan);
            }
        }
    }

    pub fn welcome(&self) -> Option<&Control> {
        self.welcome.as_ref()
    }

    /// The features the agent of this connection announced (none before its Welcome, and
    /// none from agents that predate the list).
    pub fn features(&self) -> &[String] {
        match &self.welcome {
            Some(Control::Welcome { features, .. }) => features,
            _ => &[],
        }
    }

    pub fn has_feature(&self, name: &str) -> bool {
        self.features().iter().any(|f| f == name)
    }

    /// Adopts the processes a (re)connected guest reports: known ones are kept (with their
    /// buffered output), new ones are added, ones the guest no longer has are marked gone.
    pub fn reconcile(&mut self, processes: &[ProcessInfo]) {
        for info in processes {
            let p = self.procs.entry(info.id).or_insert_with(|| Proc::new(info.os_pid, info.tty));
            p.os_pid = info.os_pid;
            p.tty = info.tty;
        }
        for (id, p) in self.procs.iter_mut() {
            if p.exit.is_none() && !processes.iter().any(|i| i.id == *id) {
                p.exit = Some(ExitStatus { exit_code: -1, signal: None, timed_out: false, peak_rss_kib: 0 });
                p.stdout.eof = true;
                p.stderr.eof = true;
            }
        }
    }

    // ------------------------------------------------------------------ processes

    pub fn proc(&self, id: u32) -> Option<&Proc> {
        self.procs.get(&id)
    }

    pub fn set_tty(&mut self, id: u32, tty: bool) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.tty = tty;
        }
    }

    /// Takes up to `max` bytes of `stream`. Buffered bytes are handed out even after the
    /// connection died; after that, an unfinished stream reports the failure.
    pub fn take_output(&mut self, id: u32, stream: Stream, max: usize) -> Result<Output, Error> {
        let failure = self.failure.clone();
        let p = self
            .procs
            .get_mut(&id)
            .ok_or_else(|| Error::InvalidArgument(format!("no process {id} on this VM")))?;
        let b = p.buf(stream);
        if b.len > 0 && max > 0 {
            let bytes = b.take(max);
            p.owed += bytes.len() as u64;
            let credit = if p.owed >= CREDIT_BATCH && failure.is_none() {
                let c = p.owed;
                p.owed = 0;
                p.window += c;
                Some(c)
            } else {
                None
            };
            return Ok(Output::Data { bytes, credit });
        }
        if b.eof {
            return Ok(Output::Eof);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(Output::Pending),
        }
    }

    /// Bytes buffered for `stream` (0 for unknown processes).
    pub fn buffered(&self, id: u32, stream: Stream) -> usize {
        self.procs.get(&id).map_or(0, |p| match stream {
            Stream::Stdout => p.stdout.len,
            Stream::Stderr => p.stderr.len,
        })
    }

    /// Asks to send `len` stdin bytes to process `id`.
    pub fn stdin_reserve(&mut self, id: u32, len: u64) -> Result<StdinSlot, Error> {
        self.check()?;
        let p = self
            .procs
            .get_mut(&id)
            .ok_or_else(|| Error::InvalidArgument(format!("no process {id} on this VM")))?;
        if p.stdin_closed {
            return Err(Error::BrokenPipe(format!("stdin of process {id} is closed")));
        }
        if p.exit.is_some() {
            return Err(Error::BrokenPipe(format!("process {id} has exited; its stdin is gone")));
        }
        // One frame may always go when nothing is in flight, whatever its size.
        if p.stdin_unacked > 0 && p.stdin_unacked + len > STDIN_WINDOW {
            return Ok(StdinSlot::Wait);
        }
        p.stdin_unacked += len;
        Ok(StdinSlot::Go)
    }

    /// Marks stdin closed; returns false if it already was (nothing to send).
    pub fn stdin_close(&mut self, id: u32) -> Result<bool, Error> {
        let failure = self.failure.clone();
        let p = self
            .procs
            .get_mut(&id)
            .ok_or_else(|| Error::InvalidArgument(format!("no process {id} on this VM")))?;
        if p.stdin_closed || p.exit.is_some() {
            p.stdin_closed = true;
            return Ok(false);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        p.stdin_closed = true;
        Ok(true)
    }

    /// The process's exit status, once reported. After a connection failure an unfinished
    /// process reports the failure.
    pub fn exit_status(&self, id: u32) -> Result<Option<ExitStatus>, Error> {
        let p = self.procs.get(&id).ok_or_else(|| Error::InvalidArgument(format!("no process {id} on this VM")))?;
        if let Some(s) = &p.exit {
            return Ok(Some(s.clone()));
        }
        self.check()?;
        Ok(None)
    }

    /// Drops all host state of an exited process (after `Forget`).
    pub fn remove_proc(&mut self, id: u32) {
        self.procs.remove(&id);
    }

    // ------------------------------------------------------------------ transfers

    /// Takes the next chunk of read transfer `req`.
    pub fn take_file(&mut self, req: u64) -> Result<FileChunk, Error> {
        let chan = channel_of(req);
        let failed = self.failure.is_some();
        let Some(t) = self.transfers.get_mut(&chan) else {
            self.check()?;
            return Err(Error::InvalidArgument(format!("no read transfer {req}")));
        };
        if let Some(bytes) = t.chunks.pop_front() {
            t.owed += bytes.len() as u64;
            let credit = if t.owed >= CREDIT_BATCH && !t.done && !failed {
                let c = t.owed;
                t.owed = 0;
                t.window += c;
                Some(c)
            } else {
                None
            };
            return Ok(FileChunk::Data { bytes, credit });
        }
        if let Some(e) = t.error.take() {
            self.transfers.remove(&chan);
            return Err(e);
        }
        if t.done {
            self.transfers.remove(&chan);
            return Ok(FileChunk::End);
        }
        self.check()?;
        Ok(FileChunk::Pending)
    }

    /// Size and mode announced for read transfer `req`.
    pub fn file_info(&self, req: u64) -> Option<(u64, u32)> {
        self.transfers.get(&channel_of(req)).map(|t| (t.size, t.mode))
    }
}

/// The frame channel a request's file data travels on.
pub fn channel_of(req: u64) -> u32 {
    req as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermachine_protocol::ErrorKind;

    fn ctl(m: Control) -> Frame {
        Frame::new(Kind::Control, 0, m.to_bytes())
    }
    fn out(id: u32, data: &[u8]) -> Frame {
        Frame::new(Kind::Stdout, id, data.to_vec())
    }
    fn err(id: u32, data: &[u8]) -> Frame {
        Frame::new(Kind::Stderr, id, data.to_vec())
    }
    fn status(code: i32) -> ExitStatus {
        ExitStatus { exit_code: code, signal: None, timed_out: false, peak_rss_kib: 100 }
    }

    /// A mux with a welcomed connection and one spawned process `id`.
    fn with_proc(id: u32) -> Mux {
        let mut m = Mux::new();
        m.on_frame(ctl(Control::Welcome { version: PROTOCOL_VERSION, boot_id: "b".into(), generation: 1, processes: vec![], features: vec![] }))
            .unwrap();
        let req = m.begin(ReqKind::Spawn).unwrap();
        m.on_frame(ctl(Control::Spawned { req, id, os_pid: 42 })).unwrap();
        assert!(matches!(m.take_reply(req).unwrap(), Some(Control::Spawned { id: i, .. }) if i == id));
        m
    }

    fn take_all(m: &mut Mux, id: u32, s: Stream) -> Vec<u8> {
        let mut v = Vec::new();
        while let Output::Data { bytes, .. } = m.take_output(id, s, 1 << 30).unwrap() {
            v.extend(bytes);
        }
        v
    }

    #[test]
    fn reply_routing() {
        let mut m = Mux::new();
        let a = m.begin(ReqKind::Ping).unwrap();
        let b = m.begin(ReqKind::Signal).unwrap();
        assert_eq!(m.take_reply(a).unwrap(), None);
        m.on_frame(ctl(Control::Ok { req: b })).unwrap();
        m.on_frame(ctl(Control::Pong { req: a })).unwrap();
        assert_eq!(m.take_reply(a).unwrap(), Some(Control::Pong { req: a }));
        assert_eq!(m.take_reply(b).unwrap(), Some(Control::Ok { req: b }));
        // an error reply is accepted for any request
        let c = m.begin(ReqKind::Spawn).unwrap();
        m.on_frame(ctl(Control::Error { req: c, kind: ErrorKind::NotFound, message: "nope".into() })).unwrap();
        assert!(matches!(m.take_reply(c).unwrap(), Some(Control::Error { .. })));
    }

    #[test]
    fn unsolicited_and_mistyped_replies_are_violations() {
        let mut m = Mux::new();
        assert!(m.on_frame(ctl(Control::Ok { req: 99 })).is_err());
        let mut m = Mux::new();
        let a = m.begin(ReqKind::Ping).unwrap();
        let e = m.on_frame(ctl(Control::Ok { req: a })).unwrap_err();
        assert!(e.0.contains("Ping"), "{e:?}");
        let mut m = Mux::new();
        assert!(m.on_frame(ctl(Control::Spawned { req: 5, id: 1, os_pid: 1 })).is_err());
        let mut m = Mux::new();
        let e = m.on_frame(ctl(Control::Ping { req: 1 })).unwrap_err();
        assert!(e.0.contains("ping"), "{e:?}");
        let mut m = Mux::new();
        assert!(m.on_frame(Frame::new(Kind::Control, 0, b"{\"op\":\"bogus\"}".to_vec())).is_err());
        let e = Mux::new()
            .on_frame(ctl(Control::Error { req: 0, kind: ErrorKind::Protocol, message: "version 9 unsupported".into() }))
            .unwrap_err();
        assert!(e.0.contains("version 9 unsupported"), "{e:?}");
        assert!(m.on_frame(Frame::new(Kind::Stdin, 1, b"x".to_vec())).is_err());
        let mut m = Mux::new();
        m.on_frame(ctl(Control::Welcome { version: PROTOCOL_VERSION + 1, boot_id: "b".into(), generation: 1, processes: vec![], features: vec![] }))
            .unwrap_err();
    }

    #[test]
    fn detached_replies_are_dropped() {
        let mut m = Mux::new();
        let a = m.begin_detached(ReqKind::Forget).unwrap();
        m.on_frame(ctl(Control::Ok { req: a })).unwrap();
        assert!(m.requests.is_empty());
        let b = m.begin(ReqKind::Ping).unwrap();
        m.abandon(b);
        m.on_frame(ctl(Control::Pong { req: b })).unwrap();
        assert!(m.requests.is_empty());
        // but a reply to a finished request is a violation
        assert!(m.on_frame(ctl(Control::Pong { req: b })).is_err());
    }

    #[test]
    fn output_buffers_and_eof() {
        let mut m = with_proc(3);
        m.on_frame(out(3, b"hello ")).unwrap();
        m.on_frame(err(3, b"oops")).unwrap();
        m.on_frame(out(3, b"world")).unwrap();
        assert_eq!(m.buffered(3, Stream::Stdout), 11);
        assert_eq!(
            m.take_output(3, Stream::Stdout, 4).unwrap(),
            Output::Data { bytes: b"hell".to_vec(), credit: None }
        );
        assert_eq!(take_all(&mut m, 3, Stream::Stdout), b"o world");
        assert_eq!(m.take_output(3, Stream::Stdout, 10).unwrap(), Output::Pending);
        m.on_frame(out(3, b"")).unwrap();
        assert_eq!(m.take_output(3, Stream::Stdout, 10).unwrap(), Output::Eof);
        // data after EOF is a violation
        assert!(m.on_frame(out(3, b"late")).is_err());
        m.on_frame(err(3, b"")).unwrap();
        assert_eq!(m.exit_status(3).unwrap(), None);
        m.on_frame(ctl(Control::Exited { id: 3, status: status(7) })).unwrap();
        assert_eq!(m.exit_status(3).unwrap().unwrap().exit_code, 7);
        assert_eq!(take_all(&mut m, 3, Stream::Stderr), b"oops");
        assert!(m.on_frame(ctl(Control::Exited { id: 3, status: status(7) })).is_err());
        assert!(m.on_frame(out(4, b"who")).is_err());
    }

    #[test]
    fn window_is_enforced_and_credit_batched() {
        let mut m = with_proc(1);
        let chunk = vec![0u8; 64 * 1024];
        let frames = DEFAULT_OUTPUT_WINDOW as usize / chunk.len();
        for _ in 0..frames {
            m.on_frame(out(1, &chunk)).unwrap();
        }
        // the window is exhausted: one more byte is a violation
        let e = m.on_frame(out(1, b"x")).unwrap_err();
        assert!(e.0.contains("flow-control"), "{e:?}");

        let mut m = with_proc(1);
        for _ in 0..frames {
            m.on_frame(out(1, &chunk)).unwrap();
        }
        let mut credited = 0;
        let mut taken = 0;
        while let Output::Data { bytes, credit } = m.take_output(1, Stream::Stdout, 64 * 1024).unwrap() {
            taken += bytes.len() as u64;
            if let Some(c) = credit {
                assert_eq!(c, CREDIT_BATCH);
                credited += c;
            }
        }
        assert_eq!(taken, DEFAULT_OUTPUT_WINDOW);
        assert_eq!(credited, DEFAULT_OUTPUT_WINDOW);
        // credit reopened the window
        for _ in 0..frames {
            m.on_frame(out(1, &chunk)).unwrap();
        }
    }

    #[test]
    fn stdin_window_and_acks() {
        let mut m = with_proc(2);
        let half = STDIN_WINDOW / 2;
        assert_eq!(m.stdin_reserve(2, half).unwrap(), StdinSlot::Go);
        assert_eq!(m.stdin_reserve(2, half).unwrap(), StdinSlot::Go);
        assert_eq!(m.stdin_reserve(2, 1).unwrap(), StdinSlot::Wait);
        m.on_frame(ctl(Control::StdinAck { id: 2, bytes: half })).unwrap();
        assert_eq!(m.stdin_reserve(2, 1).unwrap(), StdinSlot::Go);
        // over-ack is a violation
        assert!(m.on_frame(ctl(Control::StdinAck { id: 2, bytes: STDIN_WINDOW })).is_err());
        assert!(m.stdin_close(2).unwrap());
        assert!(!m.stdin_close(2).unwrap());
        assert!(matches!(m.stdin_reserve(2, 1), Err(Error::BrokenPipe(_))));
        // late acks for a forgotten process are ignored
        m.remove_proc(2);
        m.on_frame(ctl(Control::StdinAck { id: 2, bytes: 10 })).unwrap();
    }

    #[test]
    fn exited_process_refuses_stdin() {
        let mut m = with_proc(2);
        m.on_frame(ctl(Control::Exited { id: 2, status: status(0) })).unwrap();
        assert!(matches!(m.stdin_reserve(2, 1), Err(Error::BrokenPipe(_))));
    }

    #[test]
    fn file_transfer() {
        let mut m = Mux::new();
        let req = m.begin(ReqKind::ReadFile).unwrap();
        let chan = channel_of(req);
        // data before FileInfo is unsolicited
        assert!(Mux::new().on_frame(Frame::new(Kind::FileData, chan, b"x".to_vec())).is_err());
        m.on_frame(ctl(Control::FileInfo { req, size: 5, mode: 0o600 })).unwrap();
        assert!(matches!(m.take_reply(req).unwrap(), Some(Control::FileInfo { size: 5, .. })));
        assert_eq!(m.take_file(req).unwrap(), FileChunk::Pending);
        m.on_frame(Frame::new(Kind::FileData, chan, b"abc".to_vec())).unwrap();
        m.on_frame(Frame::new(Kind::FileData, chan, b"de".to_vec())).unwrap();
        m.on_frame(Frame::new(Kind::FileData, chan, vec![])).unwrap();
        assert_eq!(m.take_file(req).unwrap(), FileChunk::Data { bytes: b"abc".to_vec(), credit: None });
        assert_eq!(m.take_file(req).unwrap(), FileChunk::Data { bytes: b"de".to_vec(), credit: None });
        assert_eq!(m.take_file(req).unwrap(), FileChunk::End);

        // the size is a hint: /proc files announce 0 bytes and still have contents
        let mut m = Mux::new();
        let req = m.begin(ReqKind::ReadFile).unwrap();
        m.on_frame(ctl(Control::FileInfo { req, size: 0, mode: 0o444 })).unwrap();
        m.on_frame(Frame::new(Kind::FileData, channel_of(req), b"abc".to_vec())).unwrap();
        m.on_frame(Frame::new(Kind::FileData, channel_of(req), vec![])).unwrap();
        assert!(matches!(m.take_file(req).unwrap(), FileChunk::Data { .. }));
        assert_eq!(m.take_file(req).unwrap(), FileChunk::End);
        // but data after the end frame is a violation
        assert!(m.on_frame(Frame::new(Kind::FileData, channel_of(req), b"x".to_vec())).is_err());
    }

    #[test]
    fn file_window_is_enforced_and_credited() {
        let mut m = Mux::new();
        let req = m.begin(ReqKind::ReadFile).unwrap();
        let chan = channel_of(req);
        m.on_frame(ctl(Control::FileInfo { req, size: 1 << 30, mode: 0o600 })).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..DEFAULT_OUTPUT_WINDOW as usize / chunk.len() {
            m.on_frame(Frame::new(Kind::FileData, chan, chunk.clone())).unwrap();
        }
        let mut credited = 0;
        while let FileChunk::Data { credit, .. } = m.take_file(req).unwrap() {
            credited += credit.unwrap_or(0);
        }
        assert_eq!(credited, DEFAULT_OUTPUT_WINDOW);
        for _ in 0..DEFAULT_OUTPUT_WINDOW as usize / chunk.len() {
            m.on_frame(Frame::new(Kind::FileData, chan, chunk.clone())).unwrap();
        }
        let e = m.on_frame(Frame::new(Kind::FileData, chan, b"x".to_vec())).unwrap_err();
        assert!(e.0.contains("flow-control"), "{e:?}");
    }

    #[test]
    fn abandoned_read_swallows_in_flight_data() {
        let mut m = Mux::new();
        let req = m.begin(ReqKind::ReadFile).unwrap();
        let chan = channel_of(req);
        m.on_frame(ctl(Control::FileInfo { req, size: 10, mode: 0o600 })).unwrap();
        m.take_reply(req).unwrap();
        m.on_frame(Frame::new(Kind::FileData, chan, b"ab".to_vec())).unwrap();
        m.abandon(req);
        m.on_frame(Frame::new(Kind::FileData, chan, b"cd".to_vec())).unwrap();
        m.on_frame(Frame::new(Kind::FileData, chan, vec![])).unwrap();
        assert!(m.transfers.is_empty());
        assert!(m.on_frame(Frame::new(Kind::FileData, chan, b"x".to_vec())).is_err());
    }

    #[test]
    fn read_error_mid_stream_fails_the_transfer() {
        let mut m = Mux::new();
        let req = m.begin(ReqKind::ReadFile).unwrap();
        m.on_frame(ctl(Control::FileInfo { req, size: 10, mode: 0o600 })).unwrap();
        m.take_reply(req).unwrap();
        m.on_frame(Frame::new(Kind::FileData, channel_of(req), b"ab".to_vec())).unwrap();
        m.on_frame(ctl(Control::Error { req, kind: ErrorKind::Io, message: "EIO".into() })).unwrap();
        assert_eq!(m.take_file(req).unwrap(), FileChunk::Data { bytes: b"ab".to_vec(), credit: None });
        assert!(matches!(m.take_file(req), Err(Error::Guest { kind: ErrorKind::Io, .. })));
    }

    #[test]
    fn failure_reaches_every_waiter_but_keeps_finished_data() {
        let mut m = with_proc(1);
        let ping = m.begin(ReqKind::Ping).unwrap();
        m.on_frame(out(1, b"partial")).unwrap();
        m.fail(Error::VmDied("qemu exited with status 1".into()));
        m.fail(Error::Protocol("second reason is ignored".into()));
        assert!(matches!(m.take_reply(ping), Err(Error::VmDied(_))));
        assert!(matches!(m.begin(ReqKind::Ping), Err(Error::VmDied(_))));
        // buffered output is still handed out, then the failure
        assert!(matches!(m.take_output(1, Stream::Stdout, 100).unwrap(), Output::Data { .. }));
        assert!(matches!(m.take_output(1, Stream::Stdout, 100), Err(Error::VmDied(_))));
        assert!(matches!(m.exit_status(1), Err(Error::VmDied(_))));
        assert!(matches!(m.stdin_reserve(1, 1), Err(Error::VmDied(_))));
    }

    #[test]
    fn reconnect_keeps_processes_and_reconciles() {
        let mut m = with_proc(1);
        let req = m.begin(ReqKind::Spawn).unwrap();
        m.on_frame(ctl(Control::Spawned { req, id: 2, os_pid: 43 })).unwrap();
        m.on_frame(out(1, b"kept")).unwrap();
        let waiting = m.begin(ReqKind::Ping).unwrap();
        m.fail(Error::VmDied("channel dropped".into()));
        m.reconnect();
        assert!(matches!(m.take_reply(waiting), Err(Error::VmDied(_))), "abandoned requests fail, never hang");
        let info = |id, os_pid| ProcessInfo { id, os_pid, argv: vec![], running: true, tty: false };
        m.on_frame(ctl(Control::Welcome { version: PROTOCOL_VERSION, boot_id: "b".into(), generation: 2, processes: vec![info(1, 42), info(5, 50)], features: vec![] }))
            .unwrap();
        m.reconcile(&[info(1, 42), info(5, 50)]);
        assert_eq!(take_all(&mut m, 1, Stream::Stdout), b"kept");
        assert_eq!(m.exit_status(1).unwrap(), None);
        assert_eq!(m.exit_status(2).unwrap().unwrap().exit_code, -1);
        assert_eq!(m.proc(5).unwrap().os_pid, 50);
    }
}
