//! TCP channels: byte streams between a TCP connection on the guest's loopback and the host,
//! carried as `TcpData` frames on a channel id the agent chooses. Both directions work the
//! same way, whoever opened the connection:
//!
//! * host → guest port: `TcpConnect{req, port}` connects to 127.0.0.1:port in the guest (in a
//!   thread: a full backlog must not stall the reader) → `TcpOpened{req, id}` | `Error{req}`;
//! * guest → host: `TcpListen{req, port}` binds 127.0.0.1:port in the guest (idempotent; the
//!   listener outlives host sessions, so a snapshot's agent still listens after a restore);
//!   every accepted connection is announced with `TcpAccepted{id, port}`. `TcpUnlisten` stops.
//!
//! Per channel two threads: the *reader* sends socket bytes under a credit window (`credit.rs`,
//! [`TCP_WINDOW`] bytes, refilled by the host's `TcpCredit`), then an empty frame at EOF; the
//! *writer* drains a queue of host bytes into the socket, answers each chunk with `TcpCredit`,
//! and half-closes the socket at the host's empty frame. So the reader thread of the
//! connection never blocks on a guest socket. A channel ends when both EOFs passed, or at a
//! reset (`TcpClose`, either side; a socket error here sends one). Channels belong to one host
//! session: a new Hello resets them all. Ids count up and skip ids in use.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use supermachine_protocol::{Control, ErrorKind, Kind, CHUNK, TCP_WINDOW};

use crate::credit::Window;
use crate::process::Failure;
use crate::sys::lock;
use crate::writer::Writer;
use crate::{debug, log};

/// Most channels open at once (guest memory and threads; the host has its own, lower cap).
pub const MAX_CHANNELS: usize = 1024;
/// Most ports listened on at once.
pub const MAX_LISTENERS: usize = 64;
/// A connect to a guest port that takes longer than this fails (a full backlog).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Inbound {
    chunks: VecDeque<Vec<u8>>,
    queued: usize,
    /// The host half-closed (empty TcpData).
    eof: bool,
    /// Reset by either side, or the session ended.
    closed: bool,
}

struct Chan {
    id: u32,
    sock: TcpStream,
    /// Credit for guest → host bytes.
    window: Window,
    epoch: u64,
    inq: Mutex<Inbound>,
    cv: Condvar,
    /// Directions finished normally (2 = the channel is done).
    halves: Mutex<u8>,
}

impl Chan {
    fn reset(&self) {
        lock(&self.inq).closed = true;
        self.cv.notify_all();
        self.window.cancel();
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

struct Listener {
    port: u16,
    sock: TcpListener,
}

#[derive(Default)]
struct Table {
    next_id: u32,
    chans: HashMap<u32, Arc<Chan>>,
    listeners: HashMap<u16, Arc<Listener>>,
}

/// The agent's TCP channels and listeners.
#[derive(Clone)]
pub struct Tcp {
    writer: Arc<Writer>,
    table: Arc<Mutex<Table>>,
}

fn thread(name: String, f: impl FnOnce() + Send + 'static) -> bool {
    match std::thread::Builder::new().name(name.clone()).stack_size(256 * 1024).spawn(f) {
        Ok(_) => true,
        Err(e) => {
            log!("cannot start thread {name}: {e}");
            false
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn port_failure(what: &str, port: u16, e: &io::Error) -> Failure {
    let kind = match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::AddrInUse => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    (kind, format!("{what} 127.0.0.1:{port} in the guest failed: {e}"))
}

impl Tcp {
    pub fn new(writer: Arc<Writer>) -> Tcp {
        Tcp { writer, table: Arc::new(Mutex::new(Table { next_id: 1, ..Table::default() })) }
    }

    /// Adds a connected socket as a channel of session `epoch`; None over the cap.
    fn register(&self, sock: TcpStream, epoch: u64) -> Option<Arc<Chan>> {
        let mut t = lock(&self.table);
        if t.chans.len() >= MAX_CHANNELS {
            return None;
        }
        let mut id = t.next_id;
        while id == 0 || t.chans.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        t.next_id = id.wrapping_add(1);
        let _ = sock.set_nodelay(true);
        let chan = Arc::new(Chan {
            id,
            sock,
            window: Window::with_size(epoch, TCP_WINDOW),
            epoch,
            inq: Mutex::new(Inbound::default()),
            cv: Condvar::new(),
            halves: Mutex::new(0),
        });
        t.chans.insert(id, chan.clone());
        Some(chan)
    }

    fn remove(&self, chan: &Arc<Chan>) {
        let mut t = lock(&self.table);
        if t.chans.get(&chan.id).is_some_and(|c| Arc::ptr_eq(c, chan)) {
            t.chans.remove(&chan.id);
        }
    }

    /// Resets a channel from this side: the host hears `TcpClose`.
    fn abort(&self, chan: &Arc<Chan>) {
        let was_open = !std::mem::replace(&mut lock(&chan.inq).closed, true);
        chan.reset();
        self.remove(chan);
        if was_open {
            self.writer.send_in_epoch(Kind::Control, 0, &Control::TcpClose { id: chan.id }.to_bytes(), chan.epoch);
        }
    }

    fn half_done(&self, chan: &Arc<Chan>) {
        let mut h = lock(&chan.halves);
        *h += 1;
        if *h >= 2 {
            drop(h);
            lock(&chan.inq).closed = true;
            chan.window.cancel();
            let _ = chan.sock.shutdown(Shutdown::Both);
            self.remove(chan);
        }
    }

    fn start(&self, chan: Arc<Chan>) {
        let (a, c) = (self.clone(), chan.clone());
        let ok = thread(format!("tcp-rd-{}", chan.id), move || a.reader(c));
        let (a, c) = (self.clone(), chan.clone());
        if !ok || !thread(format!("tcp-wr-{}", chan.id), move || a.sock_writer(c)) {
            self.abort(&chan);
        }
    }

    /// Guest socket → host, under the window.
    fn reader(&self, chan: Arc<Chan>) {
        let mut buf = vec![0u8; CHUNK];
        let mut sock = &chan.sock;
        loop {
            let Some(max) = chan.window.wait_available(CHUNK) else { return };
            match sock.read(&mut buf[..max]) {
                Ok(0) => break,
                Ok(n) => {
                    if !self.writer.send_in_epoch(Kind::TcpData, chan.id, &buf[..n], chan.epoch) {
                        return self.abort(&chan);
                    }
                    chan.window.consume(chan.epoch, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if !lock(&chan.inq).closed {
                        debug!("tcp channel {}: read failed: {e}", chan.id);
                    }
                    return self.abort(&chan);
                }
            }
        }
        if lock(&chan.inq).closed || !self.writer.send_in_epoch(Kind::TcpData, chan.id, &[], chan.epoch) {
            return self.abort(&chan);
        }
        self.half_done(&chan);
    }

    /// Host bytes → guest socket, acknowledged with credit.
    fn sock_writer(&self, chan: Arc<Chan>) {
        let mut sock = &chan.sock;
        loop {
            let next = {
                let mut q = lock(&chan.inq);
                loop {
                    if q.closed {
                        break None;
                    }
                    if let Some(c) = q.chunks.pop_front() {
                        q.queued -= c.len();
                        break Some(c);
                    }
                    if q.eof {
                        break None;
                    }
                    q = match chan.cv.wait_timeout(q, Duration::from_secs(1)) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                }
            };
            let Some(chunk) = next else { break };
            if let Err(e) = sock.write_all(&chunk) {
                debug!("tcp channel {}: write failed: {e}", chan.id);
                return self.abort(&chan);
            }
            let credit = Control::TcpCredit { id: chan.id, bytes: chunk.len() as u64 };
            if !self.writer.send_in_epoch(Kind::Control, 0, &credit.to_bytes(), chan.epoch) {
                return self.abort(&chan);
            }
        }
        if lock(&chan.inq).closed {
            return;
        }
        let _ = chan.sock.shutdown(Shutdown::Write);
        self.half_done(&chan);
    }

    /// `TcpConnect`: connects in a thread and answers from there.
    pub fn connect(&self, req: u64, port: u16, epoch: u64) {
        let me = self.clone();
        let started = thread(format!("tcp-connect-{port}"), move || {
            let send = |m: &Control| me.writer.send_in_epoch(Kind::Control, 0, &m.to_bytes(), epoch);
            let sock = match TcpStream::connect_timeout(&loopback(port), CONNECT_TIMEOUT) {
                Ok(s) => s,
                Err(e) => {
                    let (kind, message) = port_failure("connect to", port, &e);
                    send(&Control::Error { req, kind, message });
                    return;
                }
            };
            let Some(chan) = me.register(sock, epoch) else {
                let message = format!("too many TCP channels: {MAX_CHANNELS} are open in the guest; close some first");
                send(&Control::Error { req, kind: ErrorKind::Limit, message });
                return;
            };
            if send(&Control::TcpOpened { req, id: chan.id }) {
                me.start(chan);
            } else {
                chan.reset();
                me.remove(&chan);
            }
        });
        if !started {
            let message = "the agent cannot start a thread for the connection".to_string();
            self.writer.send_in_epoch(Kind::Control, 0, &Control::Error { req, kind: ErrorKind::Io, message }.to_bytes(), epoch);
        }
    }

    /// `TcpListen`: binds (unless already listening) and starts the accept thread.
    pub fn listen(&self, port: u16) -> Result<(), Failure> {
        if port == 0 {
            return Err((ErrorKind::InvalidArgument, "cannot listen on port 0: name the guest port".into()));
        }
        let mut t = lock(&self.table);
        if t.listeners.contains_key(&port) {
            return Ok(());
        }
        if t.listeners.len() >= MAX_LISTENERS {
            return Err((ErrorKind::Limit, format!("the guest listens on {MAX_LISTENERS} ports already; stop some first")));
        }
        let sock = TcpListener::bind(loopback(port)).map_err(|e| port_failure("listen on", port, &e))?;
        let l = Arc::new(Listener { port, sock });
        t.listeners.insert(port, l.clone());
        drop(t);
        let me = self.clone();
        if !thread(format!("tcp-accept-{port}"), move || me.accept_loop(l)) {
            self.unlisten(port);
            return Err((ErrorKind::Io, "the agent cannot start a thread for the listener".into()));
        }
        Ok(())
    }

    /// `TcpUnlisten`: closes the listener (open channels stay).
    pub fn unlisten(&self, port: u16) {
        if let Some(l) = lock(&self.table).listeners.remove(&port) {
            // Wakes the accept thread (accept() fails on a shut-down listening socket).
            // SAFETY: shutdown on a socket fd owned by `l`, alive for the call.
            unsafe { libc::shutdown(l.sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    fn is_listening(&self, l: &Arc<Listener>) -> bool {
        lock(&self.table).listeners.get(&l.port).is_some_and(|x| Arc::ptr_eq(x, l))
    }

    fn accept_loop(&self, l: Arc<Listener>) {
        loop {
            let accepted = l.sock.accept();
            if !self.is_listening(&l) {
                return;
            }
            let sock = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!("accept on guest port {} failed: {e}", l.port);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            // The epoch the host will know the channel in; if no host is connected, the
            // announcement waits for the next Hello and is then dropped (the socket closed).
            let epoch = self.writer.epoch();
            let Some(chan) = self.register(sock, epoch) else {
                log!("guest port {}: {MAX_CHANNELS} TCP channels are open; closing a new connection", l.port);
                continue;
            };
            let msg = Control::TcpAccepted { id: chan.id, port: l.port };
            if self.writer.send_in_epoch(Kind::Control, 0, &msg.to_bytes(), epoch) {
                self.start(chan);
            } else {
                chan.reset();
                self.remove(&chan);
            }
        }
    }

    /// A `TcpData` frame from the host (empty = its half-close).
    pub fn data(&self, id: u32, data: Vec<u8>) {
        let Some(chan) = lock(&self.table).chans.get(&id).cloned() else {
            debug!("tcp data for unknown channel {id} dropped");
            return;
        };
        let mut q = lock(&chan.inq);
        if q.eof || q.closed {
            debug!("tcp data for channel {id} after its end dropped");
        } else if data.is_empty() {
            q.eof = true;
        } else if q.queued + data.len() > 2 * TCP_WINDOW as usize {
            log!("tcp channel {id}: the host overran its window; {} bytes dropped", data.len());
        } else {
            q.queued += data.len();
            q.chunks.push_back(data);
        }
        chan.cv.notify_all();
    }

    /// `TcpCredit` from the host.
    pub fn credit(&self, id: u32, bytes: u64) {
        if let Some(chan) = lock(&self.table).chans.get(&id) {
            chan.window.add(bytes);
        }
    }

    /// `TcpClose` from the host: reset without an answer.
    pub fn close(&self, id: u32) {
        let chan = lock(&self.table).chans.remove(&id);
        if let Some(chan) = chan {
            chan.reset();
        }
    }

    /// A new host session: channels belong to the previous host. Listeners stay.
    pub fn new_session(&self) {
        let chans: Vec<_> = lock(&self.table).chans.drain().map(|(_, c)| c).collect();
        if !chans.is_empty() {
            debug!("resetting {} TCP channels of the previous host", chans.len());
        }
        for c in chans {
            c.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_is_idempotent_and_unlisten_frees_the_port() {
        let tcp = Tcp::new(Arc::new(Writer::new()));
        let probe = TcpListener::bind(loopback(0)).unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        tcp.listen(port).unwrap();
        tcp.listen(port).unwrap();
        assert!(TcpStream::connect(loopback(port)).is_ok(), "the agent listens");
        tcp.unlisten(port);
        std::thread::sleep(Duration::from_millis(100));
        assert!(TcpListener::bind(loopback(port)).is_ok(), "the port is free again");
        assert_eq!(tcp.listen(0).unwrap_err().0, ErrorKind::InvalidArgument);
    }

    #[test]
    fn host_data_is_bounded_and_unknown_ids_are_ignored() {
        let tcp = Tcp::new(Arc::new(Writer::new()));
        tcp.data(77, b"nobody".to_vec());
        tcp.credit(77, 5);
        tcp.close(77);
        let l = TcpListener::bind(loopback(0)).unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let chan = tcp.register(s, 1).unwrap();
        for _ in 0..40 {
            tcp.data(chan.id, vec![0; CHUNK]);
        }
        assert!(lock(&chan.inq).queued <= 2 * TCP_WINDOW as usize);
        tcp.data(chan.id, vec![]);
        tcp.data(chan.id, b"after eof".to_vec());
        assert!(lock(&chan.inq).eof);
        tcp.new_session();
        assert!(lock(&chan.inq).closed);
        assert!(lock(&tcp.table).chans.is_empty());
    }
}
