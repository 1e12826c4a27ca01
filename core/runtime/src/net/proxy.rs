//! The host egress proxy of one kernel: an HTTP proxy on 127.0.0.1 that lets a connection out
//! only when the kernel's [`Policy`] allows it.
//!
//! Requests (one per client connection):
//! * `CONNECT host:port` (TLS and any other TCP): checked, connected, answered `200`, then the
//!   bytes are relayed both ways;
//! * `GET http://host[:port]/path` (plain HTTP, absolute URI): checked, connected, the head is
//!   sent on in origin form with `Connection: close` (proxy headers dropped), then relayed.
//!   Whatever the client sends afterwards on that connection goes to the same checked address.
//!
//! The check (see [`Policy::check`]): the host resolves the name itself ([`Resolver`],
//! injectable for tests), checks every address it got and connects only to an address it
//! checked, so a name that resolves to an allowed address now and to 127.0.0.1 a second later
//! (DNS rebinding) cannot reach the host's loopback: there is no second resolution.
//!
//! Refusals are HTTP responses with a plain-text body that says what to do: 403 (policy, the
//! body is the [`Refusal`] message, which is also the reason phrase, so a client that shows
//! only the status line, e.g. `Tunnel connection failed: 403 ...`, shows it), 503 (the
//! connection cap), 400/405/431 (bad requests), 408 (no complete request head within
//! `head_timeout`), 502 (name unknown, connect failed). The 403 and 503 messages are also kept
//! (the last [`MAX_REFUSALS_KEPT`], each at most [`MAX_REFUSAL_LEN`] bytes) until the kernel
//! takes them ([`Proxy::take_refusals`]) to show them in the cell that caused them.
//!
//! Caps per proxy (= per kernel): at most `max_connections` client connections at once (those
//! over it get 503 and are closed); all relayed bytes, both directions together, go through one
//! token bucket of `bandwidth` bytes/s (burst a tenth of a second, at least 4 KiB); a relay
//! with no byte moving either way for `idle_timeout` is closed, and so is a head that has not
//! arrived within `head_timeout`.
//!
//! Only connections opened by the proxy's own user are served ([`super::peer`]): another
//! local user cannot use a kernel's egress through its port on the shared 127.0.0.1.
//!
//! Blocking I/O, a thread per direction of each connection: connections are capped, and a
//! kernel's guest makes few.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::policy::{Policy, Refusal};

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Refusal messages kept until [`Proxy::take_refusals`] (older ones are dropped).
pub const MAX_REFUSALS_KEPT: usize = 32;
/// Longest refusal message kept or sent as a reason phrase (the host name comes from the guest).
pub const MAX_REFUSAL_LEN: usize = 512;
/// How often a blocked relay read wakes to check the idle timeout and the proxy's close.
const TICK: Duration = Duration::from_millis(200);

/// Turns a name into addresses. The proxy connects only to addresses it got from here.
pub trait Resolver: Send + Sync {
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<IpAddr>>;
}

/// The host's resolver (`getaddrinfo`).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<IpAddr>> {
        Ok((host, port).to_socket_addrs()?.map(|a| a.ip()).collect())
    }
}

/// A fixed table of names (lowercase) to addresses; any other name is unknown. For tests.
pub struct StaticResolver(pub HashMap<String, Vec<IpAddr>>);

impl Resolver for StaticResolver {
    fn resolve(&self, host: &str, _port: u16) -> io::Result<Vec<IpAddr>> {
        self.0
            .get(&host.trim_end_matches('.').to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| io::Error::new(ErrorKind::NotFound, format!("unknown name {host}")))
    }
}

/// How one proxy behaves.
pub struct ProxyConfig {
    pub policy: Policy,
    pub max_connections: usize,
    /// Bytes per second over all connections and both directions; None = no cap.
    pub bandwidth: Option<u64>,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub resolver: Arc<dyn Resolver>,
    /// Tests only: connect to the mapped address instead of the checked one, so that a test
    /// resolver can hand out ordinary (not always-refused) addresses while the servers the test
    /// started listen on loopback. Empty in production.
    pub test_route: HashMap<IpAddr, IpAddr>,
}

impl ProxyConfig {
    /// The defaults: 64 connections, no bandwidth cap, 10 s for the head and for connecting,
    /// 5 minutes idle, the system resolver.
    pub fn new(policy: Policy) -> ProxyConfig {
        ProxyConfig {
            policy,
            max_connections: 64,
            bandwidth: None,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            resolver: Arc::new(SystemResolver),
            test_route: HashMap::new(),
        }
    }
}

/// A token bucket shared by every relay of one proxy.
struct Bucket {
    rate: f64,
    capacity: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let capacity = (rate / 10.0).max(4096.0);
        Bucket { rate, capacity, state: Mutex::new((capacity, Instant::now())) }
    }

    /// Largest single take (reads are cut to this).
    fn chunk(&self) -> usize {
        self.capacity as usize
    }

    /// Waits until `n` bytes (at most [`chunk`](Self::chunk)) may pass, then takes them.
    fn take(&self, n: usize, closed: &AtomicBool) {
        let n = n as f64;
        loop {
            let wait = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(self.capacity);
                st.1 = now;
                if st.0 >= n {
                    st.0 -= n;
                    return;
                }
                (n - st.0) / self.rate
            };
            if closed.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(Duration::from_secs_f64(wait).min(TICK));
        }
    }
}

struct Shared {
    config: ProxyConfig,
    bucket: Option<Bucket>,
    active: AtomicUsize,
    closed: AtomicBool,
    next_id: AtomicU64,
    /// Every open stream (client and upstream), so `close` can cut them.
    streams: Mutex<HashMap<u64, Vec<TcpStream>>>,
    /// 403 and 503 messages not taken yet, oldest first, and how many were dropped.
    refusals: Mutex<(VecDeque<String>, usize)>,
    /// Where it listens, and the only user whose connections it serves (its own).
    addr: SocketAddr,
    owner: u32,
}

impl Shared {
    /// Whether `client` was opened by this proxy's own user.
    fn serves(&self, client: &TcpStream) -> bool {
        client.peer_addr().ok().and_then(|peer| super::peer::loopback_client_uid(peer, self.addr)) == Some(self.owner)
    }

    fn record_refusal(&self, msg: &str) {
        let mut r = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        if r.0.len() >= MAX_REFUSALS_KEPT {
            r.0.pop_front();
            r.1 += 1;
        }
        r.0.push_back(msg.to_string());
    }
}

/// A running proxy; dropping it closes it.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1:`port` (0 = any free port).
    pub fn start(port: u16, config: ProxyConfig) -> io::Result<Proxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let addr = listener.local_addr()?;
        let bucket = config.bandwidth.map(Bucket::new);
        let shared = Arc::new(Shared {
            config,
            bucket,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            streams: Mutex::new(HashMap::new()),
            refusals: Mutex::new((VecDeque::new(), 0)),
            addr,
            // SAFETY: geteuid has no preconditions and cannot fail.
            owner: unsafe { libc::geteuid() },
        });
        let sh = Arc::clone(&shared);
        let accept = thread::Builder::new().name("net-proxy-accept".into()).spawn(move || accept_loop(listener, sh))?;
        Ok(Proxy { addr, shared, accept: Some(accept) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Client connections open now.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// The 403 and 503 messages since the last call, oldest first, and how many older ones
    /// were dropped (more than [`MAX_REFUSALS_KEPT`] came in between).
    pub fn take_refusals(&self) -> (Vec<String>, usize) {
        let mut r = self.shared.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let taken = (r.0.drain(..).collect(), r.1);
        r.1 = 0;
        taken
    }

    /// Stops accepting and cuts every open connection. Idempotent.
    pub fn close(&mut self) {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let streams = std::mem::take(&mut *self.shared.streams.lock().unwrap_or_else(|e| e.into_inner()));
        for s in streams.values().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.close();
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    for conn in listener.incoming() {
        if sh.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else {
            // Out of descriptors or the like: do not spin.
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        if !sh.serves(&client) {
            // Another local user (the port is on the shared loopback): not this kernel's guest.
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let active = sh.active.fetch_add(1, Ordering::SeqCst);
        let guard = Active(Arc::clone(&sh));
        if active >= sh.config.max_connections {
            let msg = format!(
                "this kernel already has {} network connections open, its limit; close some and retry \
                 (an admin can raise it with c.MicroVMKernel.network_max_connections)",
                sh.config.max_connections
            );
            // Not counted from here on: the client may read the 503 and look at the count.
            drop(guard);
            let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
            sh.record_refusal(&msg);
            respond(&client, 503, "Service Unavailable", &msg);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let sh2 = Arc::clone(&sh);
        let spawned = thread::Builder::new().name("net-proxy-conn".into()).spawn(move || {
            let _guard = guard;
            handle(client, &sh2);
        });
        if spawned.is_err() {
            // The guard moved into the closure was dropped with it: the count is right.
            continue;
        }
    }
}

/// Counts one client connection while alive.
struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn respond(mut stream: &TcpStream, code: u16, reason: &str, body: &str) {
    let body = format!("{body}\n");
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body.as_bytes()));
    let _ = stream.flush();
}

/// A failed request: the status, its reason phrase and the body.
struct Reject(u16, &'static str, String);

/// `msg` made safe for a reason phrase and for the kernel's log: printable ASCII only (the
/// host name in it comes from the guest), at most [`MAX_REFUSAL_LEN`] bytes.
fn plain(msg: &str) -> String {
    let mut out: String = msg.chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect();
    if out.len() > MAX_REFUSAL_LEN {
        out.truncate(MAX_REFUSAL_LEN - 3);
        out.push_str("...");
    }
    out
}

fn bad(msg: impl Into<String>) -> Reject {
    Reject(400, "Bad Request", msg.into())
}

/// What the client asked for.
struct Request {
    connect: bool,
    host: String,
    port: u16,
    /// For plain HTTP: the head to send upstream (origin form, proxy headers dropped).
    upstream_head: Vec<u8>,
    /// Bytes the client sent after the head.
    rest: Vec<u8>,
}

/// Splits `host:port` / `[v6]:port` (port required unless `default_port`).
fn split_authority(auth: &str, default_port: Option<u16>) -> Result<(String, u16), Reject> {
    let bad_auth = || bad(format!("bad host:port {auth:?}"));
    let (host, port) = if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad_auth)?;
        h.parse::<std::net::Ipv6Addr>().map_err(|_| bad_auth())?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
            None => (auth.to_string(), None),
            _ => return Err(bad_auth()),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad_auth)?,
        None => default_port.ok_or_else(bad_auth)?,
    };
    if host.is_empty() {
        return Err(bad_auth());
    }
    Ok((host, port))
}

/// Reads and parses the request head.
fn read_request(client: &mut TcpStream, sh: &Shared) -> Result<Request, Reject> {
    let deadline = Instant::now() + sh.config.head_timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => return build_request(&req, &buf[len..]),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Reject(431, "Request Header Fields Too Large", format!("more than {MAX_HEADERS} headers")))
            }
            Err(e) => return Err(bad(format!("not an HTTP request ({e}); this is the kernel's network proxy"))),
        }
        if buf.len() >= MAX_HEAD {
            return Err(Reject(431, "Request Header Fields Too Large", format!("request head over {MAX_HEAD} bytes")));
        }
        let timeout = || Reject(408, "Request Timeout", "no complete request head in time".into());
        // One deadline for the whole head: a client trickling a byte at a time gets no more.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout());
        }
        let _ = client.set_read_timeout(Some(left));
        match client.read(&mut chunk) {
            Ok(0) => return Err(bad("connection closed before the request head ended")),
            // Bounded: MAX_HEAD plus one chunk at most, then 431 above.
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Err(timeout()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(e.to_string())),
        }
    }
}

fn build_request(req: &httparse::Request<'_, '_>, rest: &[u8]) -> Result<Request, Reject> {
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    if method == "CONNECT" {
        let (host, port) = split_authority(target, None)?;
        return Ok(Request { connect: true, host, port, upstream_head: Vec::new(), rest: rest.to_vec() });
    }
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(bad("for https:// use CONNECT (set HTTPS_PROXY to this proxy)"));
    }
    let Some(after) = lower.starts_with("http://").then(|| &target[7..]) else {
        return Err(Reject(
            405,
            "Method Not Allowed",
            "this is the kernel's network proxy: send CONNECT host:port or a request with an absolute http:// URI".into(),
        ));
    };
    let (authority, path) = match after.find(['/', '?']) {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    if authority.contains('@') {
        return Err(bad("user:password@ in the URI is not supported"));
    }
    let (host, port) = split_authority(authority, Some(80))?;
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
    let mut head = format!("{method} {path} HTTP/1.{}\r\n", req.version.unwrap_or(1)).into_bytes();
    let mut has_host = false;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if matches!(name.as_str(), "proxy-connection" | "proxy-authorization" | "connection" | "keep-alive") {
            continue;
        }
        has_host |= name == "host";
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    if !has_host {
        head.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Request { connect: false, host, port, upstream_head: head, rest: rest.to_vec() })
}

/// Resolves, checks every address, connects to the first allowed one that answers.
fn open_upstream(req: &Request, sh: &Shared) -> Result<TcpStream, Reject> {
    let policy = &sh.config.policy;
    let refused = |r: Refusal| Reject(403, "Forbidden", r.to_string());
    if !policy.may_allow(&req.host, req.port) {
        let addr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        return Err(refused(policy.check(&req.host, req.port, addr).err().unwrap_or(Refusal {
            host: req.host.clone(),
            port: req.port,
            address: None,
        })));
    }
    let addrs = match req.host.parse::<IpAddr>() {
        Ok(a) => vec![a],
        Err(_) => sh.config.resolver.resolve(&req.host, req.port).map_err(|e| {
            Reject(502, "Bad Gateway", format!("cannot resolve {}: {e}", req.host))
        })?,
    };
    let mut first_refusal = None;
    let mut allowed = Vec::new();
    for a in addrs {
        match policy.check(&req.host, req.port, a) {
            Ok(()) => allowed.push(a),
            Err(r) => {
                first_refusal.get_or_insert(r);
            }
        }
    }
    if allowed.is_empty() {
        return Err(match first_refusal {
            Some(r) => refused(r),
            None => Reject(502, "Bad Gateway", format!("{} has no address", req.host)),
        });
    }
    let mut last_err = None;
    for a in allowed {
        let a = sh.config.test_route.get(&a).copied().unwrap_or(a);
        match TcpStream::connect_timeout(&SocketAddr::new(a, req.port), sh.config.connect_timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last_err = Some(e),
        }
    }
    let e = last_err.map(|e| e.to_string()).unwrap_or_default();
    Err(Reject(502, "Bad Gateway", format!("cannot connect to {}:{}: {e}", req.host, req.port)))
}

fn handle(mut client: TcpStream, sh: &Arc<Shared>) {
    let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
    register(sh, id, &client);
    let _ = client.set_write_timeout(Some(sh.config.idle_timeout));
    let result = read_request(&mut client, sh).and_then(|req| open_upstream(&req, sh).map(|up| (req, up)));
    match result {
        Err(Reject(403, _, body)) => {
            let msg = plain(&body);
            sh.record_refusal(&msg);
            respond(&client, 403, &msg, &msg)
        }
        Err(Reject(code, reason, body)) => respond(&client, code, reason, &body),
        Ok((req, mut upstream)) => {
            register(sh, id, &upstream);
            let _ = upstream.set_nodelay(true);
            let _ = client.set_nodelay(true);
            let started = if req.connect {
                client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            } else {
                upstream.write_all(&req.upstream_head)
            };
            if started.is_ok() && (req.rest.is_empty() || upstream.write_all(&req.rest).is_ok()) {
                relay(client.try_clone(), upstream, sh);
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    sh.streams.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
}

fn register(sh: &Shared, id: u64, s: &TcpStream) {
    if let Ok(c) = s.try_clone() {
        sh.streams.lock().unwrap_or_else(|e| e.into_inner()).entry(id).or_default().push(c);
    }
    if sh.closed.load(Ordering::SeqCst) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Copies both ways until both sides have finished or the relay is idle too long.
fn relay(client: io::Result<TcpStream>, upstream: TcpStream, sh: &Arc<Shared>) {
    let (Ok(client), Ok(up2)) = (client, upstream.try_clone()) else { return };
    let Ok(client2) = client.try_clone() else { return };
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (sh2, last2) = (Arc::clone(sh), Arc::clone(&last));
    let back = thread::Builder::new()
        .name("net-proxy-relay".into())
        .spawn(move || pump(up2, client2, &sh2, start, &last2));
    pump(client, upstream, sh, start, &last);
    if let Ok(h) = back {
        let _ = h.join();
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, sh: &Shared, start: Instant, last: &AtomicU64) {
    let _ = from.set_read_timeout(Some(TICK));
    let _ = to.set_write_timeout(Some(sh.config.idle_timeout));
    let size = sh.bucket.as_ref().map_or(64 * 1024, |b| b.chunk().min(64 * 1024));
    let mut buf = vec![0u8; size];
    let idle_ms = sh.config.idle_timeout.as_millis() as u64;
    let cut = |from: &TcpStream, to: &TcpStream| {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    };
    loop {
        if sh.closed.load(Ordering::Relaxed) {
            return cut(&from, &to);
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if let Some(b) = &sh.bucket {
                    b.take(n, &sh.closed);
                }
                if to.write_all(&buf[..n]).is_err() {
                    return cut(&from, &to);
                }
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                let now = start.elapsed().as_millis() as u64;
                if now.saturating_sub(last.load(Ordering::Relaxed)) >= idle_ms {
                    return cut(&from, &to);
                }
            }
            Err(_) => return cut(&from, &to),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms() {
        assert_eq!(split_authority("a.test:443", None).ok().unwrap(), ("a.test".into(), 443));
        assert_eq!(split_authority("[::1]:80", None).ok().unwrap(), ("::1".into(), 80));
        assert_eq!(split_authority("a.test", Some(80)).ok().unwrap(), ("a.test".into(), 80));
        for bad in ["a.test", "a.test:0", "a.test:99999", ":80", "[::1", "[nope]:80", "::1:80", "a:b:c"] {
            assert!(split_authority(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn bucket_takes_at_most_its_rate() {
        let b = Bucket::new(100_000);
        let closed = AtomicBool::new(false);
        let t = Instant::now();
        for _ in 0..30 {
            b.take(b.chunk(), &closed);
        }
        // 30 chunks of 10 000 bytes at 100 kB/s, the first chunk free: at least 2.9 s ideally.
        assert!(t.elapsed() >= Duration::from_millis(1450), "{:?}", t.elapsed());
    }

    /// Answers an allowed address the first time and the host's loopback afterwards (a DNS
    /// rebinding server), counting the questions.
    struct Rebinding(AtomicUsize);

    impl Resolver for Rebinding {
        fn resolve(&self, _host: &str, _port: u16) -> io::Result<Vec<IpAddr>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Ok(vec![if n == 0 { "198.51.100.9".parse().unwrap() } else { IpAddr::V4(Ipv4Addr::LOCALHOST) }])
        }
    }

    #[test]
    fn resolves_once_and_connects_to_the_checked_address() {
        // An echo server on loopback stands for 198.51.100.9 (test_route).
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = server.local_addr().unwrap().port();
        thread::spawn(move || {
            for c in server.incoming().flatten() {
                thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let _ = io::copy(&mut &c, &mut w);
                });
            }
        });
        let resolver = Arc::new(Rebinding(AtomicUsize::new(0)));
        let mut config = ProxyConfig::new(Policy::parse(&["rebind.test"]).unwrap());
        config.resolver = resolver.clone();
        config.test_route.insert("198.51.100.9".parse().unwrap(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let proxy = Proxy::start(0, config).unwrap();
        let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The tunnel's first bytes in the same packet as the head are relayed too.
        c.write_all(format!("CONNECT rebind.test:{port} HTTP/1.1\r\n\r\nearly").as_bytes()).unwrap();
        let want = b"HTTP/1.1 200 Connection established\r\n\r\nearly";
        let mut got = vec![0u8; want.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
        assert_eq!(resolver.0.load(Ordering::SeqCst), 1);
        // A second connection gets the rebound answer (loopback) and is refused.
        let mut c2 = TcpStream::connect(proxy.local_addr()).unwrap();
        c2.write_all(format!("CONNECT rebind.test:{port} HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
        let mut resp = String::new();
        c2.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 403 network access to rebind.test:"), "{resp}");
        assert!(resp.contains("it resolves to 127.0.0.1, the host's loopback"), "{resp}");
        let (kept, dropped) = proxy.take_refusals();
        assert_eq!((kept.len(), dropped), (1, 0), "{kept:?}");
        assert!(kept[0].contains("it resolves to 127.0.0.1"), "{kept:?}");
        assert_eq!(proxy.take_refusals(), (vec![], 0));
    }

    #[test]
    fn refusal_messages_are_plain_and_bounded() {
        assert_eq!(plain("a\r\nb\u{e9}"), "a??b?");
        let long = plain(&"x".repeat(2000));
        assert!(long.len() == MAX_REFUSAL_LEN && long.ends_with("..."), "{}", long.len());
    }

    #[test]
    fn refusals_are_kept_up_to_the_cap() {
        let proxy = Proxy::start(0, ProxyConfig::new(Policy::default())).unwrap();
        for i in 0..(MAX_REFUSALS_KEPT + 5) {
            let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
            c.write_all(format!("CONNECT h{i}.test:443 HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
            let mut resp = String::new();
            c.read_to_string(&mut resp).unwrap();
            assert!(resp.starts_with(&format!("HTTP/1.1 403 network access to h{i}.test:443 ")), "{resp}");
        }
        let (kept, dropped) = proxy.take_refusals();
        assert_eq!((kept.len(), dropped), (MAX_REFUSALS_KEPT, 5));
        assert!(kept[0].contains("h5.test:443"), "{kept:?}");
    }
}
