//! TCP channels through the agent, seen from the host: byte streams between a TCP connection
//! on the guest's loopback and a host socket, both directions, flow-controlled by credit
//! windows ([`TCP_WINDOW`] each way). Pure state lives in [`table`] (part of the mux); this
//! module does the I/O.
//!
//! * Host → guest port ([`TcpChannel::connect`], used by exposed ports): `TcpConnect` →
//!   `TcpOpened{id}`; [`relay`] then copies between a host socket and the channel.
//! * Guest → host ([`forward_to_host`]): the agent listens on 127.0.0.1:guest_port in the guest
//!   (`TcpListen`); each connection it accepts is announced with `TcpAccepted`; the host
//!   connects it to 127.0.0.1:host_port (always the host's loopback, a port the host code
//!   chose: the guest never names a host destination) and relays. A connection for a port with
//!   no forward attached (e.g. after a restore, before the host attached again), or over the
//!   cap ([`table::MAX_INBOUND`] per VM), is refused with `TcpClose` and a log line.
//!
//! Threads: one *service* thread per connection, started at the first TCP use, sends the
//! refusals and starts the relays of accepted channels (the reader thread never writes); two
//! per relayed channel (host → guest, guest → host), so at most `2 × cap` plus the exposures'.
//! Only agents whose Welcome lists [`FEATURE_TCP`] are sent any of this.

pub mod table;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use supermachine_protocol::{Control, Kind, CHUNK, FEATURE_TCP};
#[cfg(doc)]
use supermachine_protocol::TCP_WINDOW;

use crate::conn::{Conn, Inner};
use crate::error::{Error, Result};
use crate::log_limit::log_limited;
use crate::mux::ReqKind;
use table::TcpRead;

/// A connect to the host port of a forward that takes longer than this fails.
const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest → host read waits before checking the idle rule and aborts.
const POLL: Duration = Duration::from_secs(1);
/// Default: seconds a channel may stay silent from the guest after the host side ended.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(120);

/// Fails unless the connected agent speaks TCP channels.
pub fn require(conn: &Conn) -> Result<()> {
    if conn.lock().has_feature(FEATURE_TCP) {
        return Ok(());
    }
    conn.failure().map_or(Ok(()), Err)?;
    Err(Error::InvalidArgument(
        "the guest agent has no TCP channels (an image or snapshot made before them); rebuild the image or re-bake the snapshot".into(),
    ))
}

/// One TCP channel. Dropping it resets the channel unless both directions ended.
pub struct TcpChannel {
    conn: Conn,
    id: u32,
}

impl TcpChannel {
    /// Connects to 127.0.0.1:`port` inside the guest.
    pub fn connect(conn: &Conn, port: u16, timeout: Duration) -> Result<TcpChannel> {
        require(conn)?;
        if port == 0 {
            return Err(Error::InvalidArgument("guest port 0: name the port to connect to".into()));
        }
        ensure_service(conn)?;
        let deadline = Instant::now() + timeout;
        match conn.request(ReqKind::TcpConnect, Some(deadline), |req| Control::TcpConnect { req, port }) {
            Ok(Control::TcpOpened { id, .. }) => Ok(TcpChannel { conn: conn.clone(), id }),
            Ok(other) => Err(Error::Protocol(format!("unexpected reply to a TCP connect: {other:?}"))),
            Err(Error::Timeout(_)) => Err(Error::Timeout(format!("the guest did not connect to its port {port} within {timeout:?}"))),
            Err(e) => Err(e),
        }
    }

    /// The channel id (the guest's).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends all of `data`, waiting while a window's worth is unacknowledged.
    pub fn write(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(CHUNK) {
            let len = chunk.len() as u64;
            self.conn.wait(None, |m| match m.tcp.reserve_send(self.id, len)? {
                true => Ok(Some(())),
                false => m.failure().map_or(Ok(None), |e| Err(e.clone())),
            })?;
            self.conn.send_frame(Kind::TcpData, self.id, chunk)?;
        }
        Ok(())
    }

    /// Half-closes towards the guest (its socket reads EOF). Idempotent.
    pub fn shutdown_write(&self) -> Result<()> {
        if self.conn.lock().tcp.shutdown_send(self.id) {
            self.conn.send_frame(Kind::TcpData, self.id, &[])?;
        }
        Ok(())
    }

    /// Up to `max` bytes from the guest; empty = the guest half-closed. `Error::Timeout` when
    /// nothing came within `timeout`; `Error::BrokenPipe` once the channel was reset.
    pub fn read(&self, max: usize, timeout: Option<Duration>) -> Result<Vec<u8>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let got = self.conn.wait(deadline, |m| match m.tcp.take(self.id, max.max(1))? {
            TcpRead::Pending => m.failure().map_or(Ok(None), |e| Err(e.clone())),
            r => Ok(Some(r)),
        })?;
        match got {
            TcpRead::Data { bytes, credit } => {
                if let Some(c) = credit {
                    let _ = self.conn.send_control(&Control::TcpCredit { id: self.id, bytes: c });
                }
                Ok(bytes)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Ends the channel: a reset for the guest unless both directions ended. Idempotent.
    pub fn close(&self) {
        let tell = self.conn.lock().tcp.finish(self.id);
        if tell {
            let _ = self.conn.send_control(&Control::TcpClose { id: self.id });
        }
        self.conn.inner.changed.notify_all();
    }
}

impl Drop for TcpChannel {
    fn drop(&mut self) {
        self.close();
    }
}

/// Counters and the end of one relay.
struct RelayState {
    done: Mutex<u8>,
    cv: Condvar,
    aborted: AtomicBool,
    /// Host side ended (EOF or error): when, as ms since `t0`, +1 (0 = not yet).
    host_done_ms: AtomicU64,
    host_failed: AtomicBool,
    up: AtomicU64,
    down: AtomicU64,
    t0: Instant,
}

/// A running relay between a host socket and a TCP channel.
#[derive(Clone)]
pub struct Relay {
    st: Arc<RelayState>,
    chan: Arc<TcpChannel>,
    stream: Arc<TcpStream>,
}

/// What a relay does when the host side has ended and the guest stays silent.
#[derive(Clone, Copy, Debug)]
pub struct RelayOptions {
    pub half_closed_idle: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions { half_closed_idle: HALF_CLOSED_IDLE }
    }
}

impl Relay {
    /// True once both directions ended and the channel is released.
    pub fn is_done(&self) -> bool {
        *self.st.done.lock().unwrap_or_else(|e| e.into_inner()) >= 2
    }

    /// Waits until the relay ended (true) or `timeout` passed (false).
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.st.done.lock().unwrap_or_else(|e| e.into_inner());
        while *g < 2 {
            match deadline {
                None => g = self.st.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    g = self.st.cv.wait_timeout(g, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
        true
    }

    /// Ends the connection at once, both sides.
    pub fn abort(&self) {
        self.st.aborted.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        self.chan.close();
    }

    /// Bytes relayed host → guest and guest → host so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.st.up.load(Ordering::Relaxed), self.st.down.load(Ordering::Relaxed))
    }

    fn finish_half(&self) {
        let mut g = self.st.done.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        if *g == 2 {
            self.chan.close();
            let _ = self.stream.shutdown(Shutdown::Both);
            self.st.cv.notify_all();
        }
    }

    fn host_ended(&self, failed: bool) {
        let ms = self.st.t0.elapsed().as_millis() as u64 + 1;
        let _ = self.st.host_done_ms.compare_exchange(0, ms, Ordering::SeqCst, Ordering::SeqCst);
        if failed {
            self.st.host_failed.store(true, Ordering::SeqCst);
        }
    }

    /// Host socket → guest.
    fn up(self) {
        let mut buf = vec![0u8; CHUNK];
        let mut s: &TcpStream = &self.stream;
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    self.host_ended(false);
                    let _ = self.chan.shutdown_write();
                    break;
                }
                Ok(n) => {
                    if self.chan.write(&buf[..n]).is_err() {
                        let _ = self.stream.shutdown(Shutdown::Both);
                        break;
                    }
                    self.st.up.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // A reset of the host client: reset the guest side too (wakes `down`).
                    self.host_ended(true);
                    self.chan.close();
                    break;
                }
            }
        }
        self.finish_half();
    }

    /// Guest → host socket.
    fn down(self, opts: RelayOptions) {
        let mut s: &TcpStream = &self.stream;
        let mut last = Instant::now();
        loop {
            match self.chan.read(CHUNK, Some(POLL)) {
                Ok(b) if b.is_empty() => {
                    let _ = self.stream.shutdown(Shutdown::Write);
                    break;
                }
                Ok(b) => {
                    last = Instant::now();
                    if s.write_all(&b).is_err() {
                        self.chan.close();
                        break;
                    }
                    self.st.down.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                Err(Error::Timeout(_)) => {
                    if self.st.aborted.load(Ordering::SeqCst) || self.st.host_failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let done_ms = self.st.host_done_ms.load(Ordering::SeqCst);
                    if done_ms > 0 {
                        let host_done = self.st.t0 + Duration::from_millis(done_ms - 1);
                        if Instant::now().saturating_duration_since(host_done.max(last)) > opts.half_closed_idle {
                            eprintln!(
                                "supermachine: TCP channel {}: the host side closed and the guest sent nothing for {:.0} s; closing it",
                                self.chan.id,
                                opts.half_closed_idle.as_secs_f64()
                            );
                            self.chan.close();
                            let _ = self.stream.shutdown(Shutdown::Both);
                            break;
                        }
                    }
                }
                Err(_) => {
                    let _ = self.stream.shutdown(Shutdown::Both);
                    break;
                }
            }
        }
        self.finish_half();
    }
}

/// Starts relaying between `stream` (a connected host socket) and `chan`.
pub fn relay(chan: TcpChannel, stream: TcpStream, opts: RelayOptions) -> Result<Relay> {
    let _ = stream.set_nodelay(true);
    let r = Relay {
        st: Arc::new(RelayState {
            done: Mutex::new(0),
            cv: Condvar::new(),
            aborted: AtomicBool::new(false),
            host_done_ms: AtomicU64::new(0),
            host_failed: AtomicBool::new(false),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            t0: Instant::now(),
        }),
        chan: Arc::new(chan),
        stream: Arc::new(stream),
    };
    let id = r.chan.id;
    let up = r.clone();
    std::thread::Builder::new()
        .name(format!("tcp-up-{id}"))
        .spawn(move || up.up())
        .map_err(|e| Error::io("start a TCP relay thread", e))?;
    let down = r.clone();
    if let Err(e) = std::thread::Builder::new().name(format!("tcp-down-{id}")).spawn(move || down.down(opts)) {
        r.abort();
        r.finish_half();
        return Err(Error::io("start a TCP relay thread", e));
    }
    Ok(r)
}

/// Listens on 127.0.0.1:`guest_port` in the guest and connects every connection accepted
/// there to 127.0.0.1:`host_port` on the host. Idempotent (re-attaches after a restore).
pub fn forward_to_host(conn: &Conn, guest_port: u16, host_port: u16) -> Result<()> {
    require(conn)?;
    if guest_port == 0 || host_port == 0 {
        return Err(Error::InvalidArgument("forward_to_host needs a guest port and a host port (1..65535)".into()));
    }
    ensure_service(conn)?;
    // The forward first: a connection accepted right after the listen must find it.
    let previous = {
        let mut m = conn.lock();
        let prev = m.tcp.forwards().into_iter().find(|(g, _)| *g == guest_port).map(|(_, h)| h);
        m.tcp.set_forward(guest_port, host_port);
        prev
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    if let Err(e) = conn.request(ReqKind::TcpListen, Some(deadline), |req| Control::TcpListen { req, port: guest_port }) {
        let mut m = conn.lock();
        match previous {
            Some(h) => m.tcp.set_forward(guest_port, h),
            None => {
                m.tcp.remove_forward(guest_port);
            }
        }
        return Err(e);
    }
    Ok(())
}

/// Stops a forward: the guest stops listening; connections in flight go on.
pub fn stop_forward(conn: &Conn, guest_port: u16) -> Result<()> {
    require(conn)?;
    conn.lock().tcp.remove_forward(guest_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    conn.request(ReqKind::TcpUnlisten, Some(deadline), |req| Control::TcpUnlisten { req, port: guest_port }).map(|_| ())
}

/// Starts the connection's TCP service thread if it is not running.
pub(crate) fn ensure_service(conn: &Conn) -> Result<()> {
    {
        let mut m = conn.lock();
        if m.tcp.service_started {
            return Ok(());
        }
        m.tcp.service_started = true;
    }
    let weak = Arc::downgrade(&conn.inner);
    std::thread::Builder::new().name("supermachine-tcp".into()).spawn(move || service(weak)).map(|_| ()).map_err(|e| {
        conn.lock().tcp.service_started = false;
        Error::io("start the TCP service thread", e)
    })
}

/// Sends refusals and connects accepted guest channels, until the connection is dropped.
fn service(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let conn = Conn { inner };
        let (refusals, accepted) = {
            let mut m = conn.lock();
            if !m.tcp.has_work() {
                let (g, _) = conn.inner.changed.wait_timeout(m, POLL).unwrap_or_else(|e| e.into_inner());
                m = g;
            }
            let r = m.tcp.take_refusals();
            let mut a = Vec::new();
            while let Some(x) = m.tcp.take_accepted() {
                a.push(x);
            }
            (r, a)
        };
        for id in refusals {
            let _ = conn.send_control(&Control::TcpClose { id });
        }
        for a in accepted {
            let chan = TcpChannel { conn: conn.clone(), id: a.id };
            let spawned = std::thread::Builder::new().name(format!("tcp-fwd-{}", a.id)).spawn(move || {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, a.host_port));
                match TcpStream::connect_timeout(&addr, HOST_CONNECT_TIMEOUT) {
                    Ok(s) => {
                        if let Err(e) = relay(chan, s, RelayOptions::default()) {
                            log_limited("tcp relay failed", || {
                                format!("guest port {} → host port {}: {e}", a.guest_port, a.host_port)
                            });
                        }
                    }
                    Err(e) => {
                        // The guest can retry at will: one line each would grow the log.
                        log_limited("tcp connect failed", || {
                            format!(
                                "guest port {} → 127.0.0.1:{} on the host: connect failed ({e}); closed the guest's connection",
                                a.guest_port, a.host_port
                            )
                        });
                        drop(chan);
                    }
                }
            });
            if let Err(e) = spawned {
                eprintln!("supermachine: cannot start a thread for a guest connection: {e}");
            }
        }
        drop(conn);
    }
}
