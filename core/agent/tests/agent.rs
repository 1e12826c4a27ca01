//! End-to-end tests of the real agent binary in `--listen-unix` mode: each test starts an
//! agent, talks to it with the tiny blocking client below, and checks what comes back.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use supermachine_protocol::{Control, Decoder, ErrorKind, ExitStatus, Frame, Kind, ReadLimits, TtySize, DEFAULT_OUTPUT_WINDOW, PROTOCOL_VERSION};

const WAIT: Duration = Duration::from_secs(20);

/// A running agent; killed when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Agent {
        Agent::start_with(name, false)
    }

    /// Starts the agent; with `ignoring_sigint` it inherits SIGINT ignored and blocked, as when
    /// it is started from a background shell.
    fn start_with(name: &str, ignoring_sigint: bool) -> Agent {
        let dir = std::env::temp_dir().join(format!("sm-agent-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_supermachine-agent"));
        cmd.arg("--listen-unix")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"));
        if ignoring_sigint {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec; signal/sigprocmask are async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::signal(libc::SIGINT, libc::SIG_IGN);
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGINT);
                    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start the agent");
        Agent { child, socket, dir }
    }

    fn connect(&self) -> Client {
        let start = Instant::now();
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    return Client { s, dec: Decoder::new(), queue: VecDeque::new(), next_req: 1 };
                }
                Err(_) if start.elapsed() < WAIT => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("cannot connect to the agent: {e}"),
            }
        }
    }

    /// Connects and says Hello; returns the client and the Welcome.
    fn session(&self) -> (Client, Control) {
        let mut c = self.connect();
        let w = c.hello();
        (c, w)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Minimal blocking client: send frames, read frames with a deadline.
struct Client {
    s: UnixStream,
    dec: Decoder,
    queue: VecDeque<Frame>,
    next_req: u64,
}

impl Client {
    fn req(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    fn send(&mut self, msg: &Control) {
        self.send_frame(Kind::Control, 0, &msg.to_bytes());
    }

    fn send_frame(&mut self, kind: Kind, channel: u32, payload: &[u8]) {
        let bytes = Frame::new(kind, channel, payload.to_vec()).encode().unwrap();
        self.s.write_all(&bytes).unwrap();
    }

    /// The next frame, or None if nothing arrives within `limit`.
    fn try_frame(&mut self, limit: Duration) -> Option<Frame> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 65536];
        loop {
            if let Some(f) = self.queue.pop_front() {
                return Some(f);
            }
            if let Some(f) = self.dec.next_frame().expect("agent sent a malformed frame") {
                return Some(f);
            }
            if Instant::now() >= deadline {
                return None;
            }
            match self.s.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn frame(&mut self) -> Frame {
        self.try_frame(WAIT).expect("timed out waiting for a frame")
    }

    /// Waits for a control message matching `pred`; other frames are kept for later.
    fn control(&mut self, pred: impl Fn(&Control) -> bool) -> Control {
        let mut skipped = VecDeque::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let f = self.try_frame(deadline.saturating_duration_since(Instant::now())).expect("timed out waiting for a control message");
            if f.kind == Kind::Control {
                let m = Control::from_bytes(&f.payload).unwrap();
                if pred(&m) {
                    skipped.extend(self.queue.drain(..));
                    self.queue = skipped;
                    return m;
                }
            }
            skipped.push_back(f);
        }
    }

    fn reply(&mut self, req: u64) -> Control {
        self.control(|m| m.req() == Some(req))
    }

    fn hello(&mut self) -> Control {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        self.send(&Control::Hello { version: PROTOCOL_VERSION, host_time_ns: now, entropy: vec![7; 32] });
        self.control(|m| matches!(m, Control::Welcome { .. }))
    }

    fn spawn_with(&mut self, argv: &[&str], tty: Option<TtySize>, timeout_ms: Option<u64>) -> Result<u32, Control> {
        let req = self.req();
        self.send(&Control::Spawn {
            req,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("GREETING".into(), "hello there".into())],
            cwd: None,
            user: None,
            tty,
            timeout_ms,
        });
        match self.reply(req) {
            Control::Spawned { id, .. } => Ok(id),
            other => Err(other),
        }
    }

    fn spawn(&mut self, argv: &[&str]) -> u32 {
        self.spawn_with(argv, None, None).unwrap_or_else(|e| panic!("spawn failed: {e:?}"))
    }

    /// Collects stdout and stderr of `id` until both EOFs and Exited; checks the ordering.
    fn collect(&mut self, id: u32) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (mut out_eof, mut err_eof) = (false, false);
        loop {
            let f = self.frame();
            match f.kind {
                Kind::Stdout if f.channel == id => {
                    assert!(!out_eof, "stdout data after EOF");
                    if f.payload.is_empty() { out_eof = true } else { out.extend(f.payload) }
                }
                Kind::Stderr if f.channel == id => {
                    assert!(!err_eof, "stderr data after EOF");
                    if f.payload.is_empty() { err_eof = true } else { err.extend(f.payload) }
                }
                Kind::Control => {
                    if let Control::Exited { id: i, status } = Control::from_bytes(&f.payload).unwrap() {
                        if i == id {
                            assert!(out_eof && err_eof, "Exited before both EOFs");
                            return (out, err, status);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn credit(&mut self, id: u32, bytes: u64) {
        self.send(&Control::Credit { id, bytes });
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exec_streams_and_exit_status() {
    let agent = Agent::start("exec");
    let (mut c, welcome) = agent.session();
    match welcome {
        Control::Welcome { version, boot_id, generation, processes, .. } => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(boot_id.len(), 32);
            assert_eq!(generation, 1);
            assert!(processes.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let id = c.spawn(&["sh", "-c", "echo hi; echo err >&2; echo \"$GREETING|$HOME|$PATH\"; exit 3"]);
    assert_eq!(id, 1, "ids start at 1");
    let (out, err, status) = c.collect(id);
    assert_eq!(text(&out), "hi\nhello there|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    assert_eq!(text(&err), "err\n");
    assert_eq!((status.exit_code, status.signal, status.timed_out), (3, None, false));
    assert!(status.peak_rss_kib > 0, "peak RSS is reported");
    let id2 = c.spawn(&["true"]);
    assert_eq!(id2, 2);
}

#[test]
fn env_and_cwd() {
    let agent = Agent::start("cwd");
    let (mut c, _) = agent.session();
    let req = c.req();
    c.send(&Control::Spawn { req, argv: vec!["sh".into(), "-c".into(), "pwd; echo $X".into()], env: vec![("X".into(), "y".into())], cwd: Some("/tmp".into()), user: None, tty: None, timeout_ms: None });
    let Control::Spawned { id, .. } = c.reply(req) else { panic!() };
    let (out, _, st) = c.collect(id);
    assert_eq!(text(&out), "/tmp\ny\n");
    assert_eq!(st.exit_code, 0);
}

#[test]
fn missing_program_and_bad_cwd_are_errors() {
    let agent = Agent::start("missing");
    let (mut c, _) = agent.session();
    match c.spawn_with(&["/no/such/program"], None, None) {
        Err(Control::Error { kind: ErrorKind::NotFound, message, .. }) => assert!(message.contains("/no/such/program"), "{message}"),
        other => panic!("{other:?}"),
    }
    match c.spawn_with(&["no-such-program-anywhere"], None, None) {
        Err(Control::Error { kind: ErrorKind::NotFound, .. }) => {}
        other => panic!("{other:?}"),
    }
    let req = c.req();
    c.send(&Control::Spawn { req, argv: vec!["true".into()], env: vec![], cwd: Some("/no/such/dir".into()), user: None, tty: None, timeout_ms: None });
    assert!(matches!(c.reply(req), Control::Error { kind: ErrorKind::NotFound, .. }));
    // The agent still works.
    let id = c.spawn(&["true"]);
    assert_eq!(c.collect(id).2.exit_code, 0);
}

#[test]
fn stdin_round_trip() {
    let agent = Agent::start("stdin");
    let (mut c, _) = agent.session();
    let id = c.spawn(&["cat"]);
    c.send_frame(Kind::Stdin, id, b"hello ");
    c.send_frame(Kind::Stdin, id, b"world");
    let mut acked = 0;
    while acked < 11 {
        if let Control::StdinAck { id: i, bytes } = c.control(|m| matches!(m, Control::StdinAck { .. })) {
            assert_eq!(i, id);
            acked += bytes;
        }
    }
    c.send_frame(Kind::Stdin, id, b"");
    let (out, err, st) = c.collect(id);
    assert_eq!(text(&out), "hello world");
    assert!(err.is_empty());
    assert_eq!(st.exit_code, 0);
}

#[test]
fn stdin_to_an_exited_process_is_dropped_and_acked() {
    let agent = Agent::start("epipe");
    let (mut c, _) = agent.session();
    let id = c.spawn(&["true"]);
    c.collect(id);
    c.send_frame(Kind::Stdin, id, &[b'x'; 1000]);
    // No ack is owed once the process is gone; the agent must simply survive.
    let req = c.req();
    c.send(&Control::Ping { req });
    assert_eq!(c.reply(req), Control::Pong { req });
}

#[test]
fn timeout_kills_the_process_group() {
    let agent = Agent::start("timeout");
    let (mut c, _) = agent.session();
    let t0 = Instant::now();
    let id = c.spawn_with(&["sh", "-c", "sleep 30 & sleep 30; echo never"], None, Some(300)).unwrap();
    let (out, _, st) = c.collect(id);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert!(out.is_empty());
    assert_eq!((st.exit_code, st.timed_out, st.signal), (-1, true, Some(9)));
}

#[test]
fn children_get_default_signal_handling_whatever_the_agent_inherited() {
    let agent = Agent::start_with("sigdfl", true);
    let (mut c, _) = agent.session();
    let id = c.spawn(&["sleep", "30"]);
    let req = c.req();
    c.send(&Control::Signal { req, id, signal: libc::SIGINT });
    assert_eq!(c.reply(req), Control::Ok { req });
    let t0 = Instant::now();
    let (_, _, st) = c.collect(id);
    assert!(t0.elapsed() < Duration::from_secs(10), "SIGINT was ignored: took {:?}", t0.elapsed());
    assert_eq!((st.exit_code, st.signal), (-1, Some(libc::SIGINT)));
}

#[test]
fn signal_and_forget() {
    let agent = Agent::start("signal");
    let (mut c, _) = agent.session();
    let id = c.spawn(&["sleep", "30"]);
    let req = c.req();
    c.send(&Control::Forget { req, id });
    assert!(matches!(c.reply(req), Control::Error { kind: ErrorKind::InvalidArgument, .. }), "cannot forget a running process");
    let req = c.req();
    c.send(&Control::Signal { req, id, signal: 2 });
    assert_eq!(c.reply(req), Control::Ok { req });
    let (_, _, st) = c.collect(id);
    assert_eq!((st.exit_code, st.signal, st.timed_out), (-1, Some(2), false));
    let req = c.req();
    c.send(&Control::Signal { req, id, signal: 2 });
    assert!(matches!(c.reply(req), Control::Error { kind: ErrorKind::NoSuchProcess, .. }));
    let req = c.req();
    c.send(&Control::ListProcesses { req });
    match c.reply(req) {
        Control::Processes { processes, .. } => {
            assert_eq!(processes.len(), 1);
            assert!(!processes[0].running);
            assert_eq!(processes[0].argv, vec!["sleep", "30"]);
        }
        other => panic!("{other:?}"),
    }
    let req = c.req();
    c.send(&Control::Forget { req, id });
    assert_eq!(c.reply(req), Control::Ok { req });
    let req = c.req();
    c.send(&Control::ListProcesses { req });
    assert!(matches!(c.reply(req), Control::Processes { processes, .. } if processes.is_empty()));
    let req = c.req();
    c.send(&Control::Signal { req, id: 99, signal: 15 });
    assert!(matches!(c.reply(req), Control::Error { kind: ErrorKind::NoSuchProcess, .. }));
}

#[test]
fn tty_and_resize() {
    let agent = Agent::start("tty");
    let (mut c, _) = agent.session();
    let size = TtySize { rows: 24, cols: 80 };
    let id = c.spawn_with(&["sh", "-c", "stty size; read x; stty size; echo \"$TERM\"; echo err >&2"], Some(size), None).unwrap();
    let mut out = Vec::new();
    while !text(&out).contains("24 80") {
        let f = c.frame();
        if f.kind == Kind::Stdout {
            out.extend(f.payload);
        }
    }
    let req = c.req();
    c.send(&Control::Resize { req, id, size: TtySize { rows: 50, cols: 132 } });
    let (mut rest, err, st) = {
        assert_eq!(c.reply(req), Control::Ok { req });
        c.send_frame(Kind::Stdin, id, b"go\n");
        // A tty has only one output stream: stderr is merged, and its EOF comes with stdout's.
        let mut rest = Vec::new();
        let status = loop {
            let f = c.frame();
            match f.kind {
                Kind::Stdout => rest.extend(f.payload),
                Kind::Stderr => panic!("no stderr frames on a tty"),
                Kind::Control => {
                    if let Control::Exited { status, .. } = Control::from_bytes(&f.payload).unwrap() {
                        break status;
                    }
                }
                _ => {}
            }
        };
        (rest, Vec::<u8>::new(), status)
    };
    out.append(&mut rest);
    let t = text(&out);
    assert!(t.contains("50 132"), "{t:?}");
    assert!(t.contains("xterm-256color"), "{t:?}");
    assert!(t.contains("err"), "{t:?}");
    assert!(err.is_empty());
    assert_eq!(st.exit_code, 0);
}

#[test]
fn file_round_trip_with_mode() {
    let agent = Agent::start("files");
    let (mut c, _) = agent.session();
    let path = agent.dir.join("sub-file.bin").to_string_lossy().into_owned();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let req = c.req();
    c.send(&Control::WriteFile { req, path: path.clone(), mode: 0o640 });
    for chunk in data.chunks(65536) {
        c.send_frame(Kind::FileData, req as u32, chunk);
    }
    c.send_frame(Kind::FileData, req as u32, b"");
    assert_eq!(c.reply(req), Control::Ok { req });

    let req = c.req();
    c.send(&Control::ReadFile { req, path: path.clone(), limits: None });
    assert_eq!(c.reply(req), Control::FileInfo { req, size: data.len() as u64, mode: 0o640 });
    let mut got = Vec::new();
    loop {
        let f = c.frame();
        if f.kind == Kind::FileData && f.channel == req as u32 {
            if f.payload.is_empty() {
                break;
            }
            got.extend(f.payload);
        }
    }
    assert_eq!(got, data);

    let req = c.req();
    c.send(&Control::ReadFile { req, path: "/no/such/file".into(), limits: None });
    assert!(matches!(c.reply(req), Control::Error { kind: ErrorKind::NotFound, .. }));
    let req = c.req();
    c.send(&Control::WriteFile { req, path: "/no/such/dir/file".into(), mode: 0o644 });
    c.send_frame(Kind::FileData, req as u32, b"abc");
    c.send_frame(Kind::FileData, req as u32, b"");
    assert!(matches!(c.reply(req), Control::Error { kind: ErrorKind::NotFound, .. }));
}

#[test]
fn output_waits_for_credit() {
    let agent = Agent::start("credit");
    let (mut c, _) = agent.session();
    let total = 10 * 1024 * 1024u64;
    let id = c.spawn(&["head", "-c", &total.to_string(), "/dev/zero"]);
    let mut got = 0u64;
    while got < DEFAULT_OUTPUT_WINDOW {
        let f = c.frame();
        if f.kind == Kind::Stdout {
            got += f.payload.len() as u64;
        }
    }
    assert!(c.try_frame(Duration::from_millis(500)).is_none(), "more than one window sent without credit");
    assert_eq!(got, DEFAULT_OUTPUT_WINDOW);
    c.credit(id, total);
    let (out, _, st) = c.collect(id);
    assert_eq!(got + out.len() as u64, total);
    assert_eq!(st.exit_code, 0);
}

#[test]
fn reconnect_reattaches_to_running_processes() {
    let agent = Agent::start("reconnect");
    let (mut c, _) = agent.session();
    let id = c.spawn(&["sh", "-c", "echo first; read line; echo \"second $line\""]);
    loop {
        let f = c.frame();
        if f.kind == Kind::Stdout {
            assert_eq!(text(&f.payload), "first\n");
            break;
        }
    }
    drop(c);
    let (mut c, welcome) = agent.session();
    match welcome {
        Control::Welcome { generation, processes, .. } => {
            assert_eq!(generation, 2);
            assert_eq!(processes.len(), 1);
            assert_eq!((processes[0].id, processes[0].running), (id, true));
        }
        other => panic!("{other:?}"),
    }
    c.send_frame(Kind::Stdin, id, b"x\n");
    let (out, _, st) = c.collect(id);
    assert_eq!(text(&out), "second x\n");
    assert_eq!(st.exit_code, 0);
    assert_eq!(std::fs::read_to_string(agent.dir.join("state/generation")).unwrap(), "2\n");
    let id2 = c.spawn(&["true"]);
    assert!(id2 > id, "ids stay unique across connections");
}

#[test]
fn pause_stops_output_until_the_next_hello() {
    let agent = Agent::start("pause");
    let (mut c, _) = agent.session();
    let id = c.spawn(&["sh", "-c", "i=0; while [ $i -lt 40 ]; do echo $i; i=$((i+1)); sleep 0.02; done"]);
    // Let some output flow.
    loop {
        let f = c.frame();
        if f.kind == Kind::Stdout {
            break;
        }
    }
    let req = c.req();
    c.send(&Control::Pause { req });
    let mut before = Vec::new();
    loop {
        let f = c.frame();
        match f.kind {
            Kind::Stdout => before.extend(f.payload),
            Kind::Control if Control::from_bytes(&f.payload).unwrap() == (Control::Paused { req }) => break,
            _ => {}
        }
    }
    // Nothing at all after Paused (the process keeps running and producing output).
    assert!(c.try_frame(Duration::from_millis(600)).is_none(), "frame after Paused");
    // Resume on the same connection lets it flow again...
    let req = c.req();
    c.send(&Control::Resume { req });
    assert_eq!(c.reply(req), Control::Ok { req });
    let f = c.frame();
    assert_eq!(f.kind, Kind::Stdout);
    // ...pause again, and a new connection's Hello ends the pause too.
    let req = c.req();
    c.send(&Control::Pause { req });
    c.control(|m| *m == Control::Paused { req });
    drop(c);
    let (mut c, _) = agent.session();
    let (out, _, st) = c.collect(id);
    assert!(text(&out).ends_with("39\n"), "{:?}", text(&out));
    assert_eq!(st.exit_code, 0);
}

#[test]
fn orphans_are_reaped() {
    let agent = Agent::start("reap");
    let (mut c, _) = agent.session();
    let id = c.spawn(&["sh", "-c", "sleep 0.2 >/dev/null 2>&1 & exit 0"]);
    c.collect(id);
    std::thread::sleep(Duration::from_millis(800));
    let pid = agent.child.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace() {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        assert!(!stat.contains(") Z "), "zombie child left: {stat}");
    }
    // All threads' children, too.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace() {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            assert!(!stat.contains(") Z "), "zombie child left: {stat}");
        }
    }
}

#[test]
fn garbage_and_bad_versions_do_not_kill_the_agent() {
    let agent = Agent::start("garbage");
    let mut c = agent.connect();
    c.send(&Control::Hello { version: PROTOCOL_VERSION + 1, host_time_ns: 0, entropy: vec![] });
    assert!(matches!(c.frame(), f if matches!(Control::from_bytes(&f.payload), Ok(Control::Error { kind: ErrorKind::Protocol, req: 0, .. }))));
    c.hello();
    // A well-framed but unknown message gets an error naming its req; the connection goes on.
    c.send_frame(Kind::Control, 0, br#"{"op":"frobnicate","req":77}"#);
    assert!(matches!(c.reply(77), Control::Error { kind: ErrorKind::Protocol, .. }));
    // Garbage bytes: one protocol error, then silence until a new Hello.
    c.s.write_all(b"this is not a frame at all").unwrap();
    assert!(matches!(c.control(|_| true), Control::Error { req: 0, kind: ErrorKind::Protocol, .. }));
    drop(c);
    let (mut c, _) = agent.session();
    let id = c.spawn(&["echo", "alive"]);
    assert_eq!(text(&c.collect(id).0), "alive\n");
}

#[test]
fn file_reads_wait_for_credit() {
    let agent = Agent::start("readcredit");
    let (mut c, _) = agent.session();
    let path = agent.dir.join("big");
    let size = DEFAULT_OUTPUT_WINDOW as usize + 1_500_000;
    std::fs::write(&path, vec![5u8; size]).unwrap();
    let req = c.req();
    c.send(&Control::ReadFile { req, path: path.to_string_lossy().into_owned(), limits: None });
    assert!(matches!(c.reply(req), Control::FileInfo { .. }));
    let mut got = 0usize;
    while (got as u64) < DEFAULT_OUTPUT_WINDOW {
        let f = c.frame();
        assert!(!(f.kind == Kind::FileData && f.payload.is_empty()), "ended without credit");
        got += f.payload.len();
    }
    assert!(c.try_frame(Duration::from_millis(500)).is_none(), "more than one window sent without credit");
    assert_eq!(got as u64, DEFAULT_OUTPUT_WINDOW);
    c.credit(req as u32, got as u64);
    loop {
        let f = c.frame();
        if f.kind == Kind::FileData {
            if f.payload.is_empty() {
                break;
            }
            got += f.payload.len();
        }
    }
    assert_eq!(got, size);
}

#[test]
fn closing_tty_stdin_sends_eof() {
    let agent = Agent::start("ttyeof");
    let (mut c, _) = agent.session();
    let id = c.spawn_with(&["cat"], Some(TtySize { rows: 24, cols: 80 }), None).unwrap();
    c.send_frame(Kind::Stdin, id, b"abc\n");
    c.send_frame(Kind::Stdin, id, b"");
    let status = loop {
        let f = c.frame();
        if let (Kind::Control, Ok(Control::Exited { status, .. })) = (f.kind, Control::from_bytes(&f.payload)) {
            break status;
        }
    };
    assert_eq!(status.exit_code, 0);
}

#[test]
fn a_second_hello_on_one_connection_starts_a_new_session() {
    let agent = Agent::start("rehello");
    let (mut c, _) = agent.session();
    let id = c.spawn(&["sleep", "30"]);
    match c.hello() {
        Control::Welcome { generation, processes, .. } => {
            assert_eq!(generation, 2);
            assert_eq!(processes[0].id, id);
        }
        other => panic!("{other:?}"),
    }
    let req = c.req();
    c.send(&Control::Signal { req, id, signal: 9 });
    assert_eq!(c.reply(req), Control::Ok { req });
    assert_eq!(c.collect(id).2.signal, Some(9));
}

#[test]
fn limited_reads_stop_at_the_cap_while_streaming() {
    // /proc files announce size 0 and then stream more: the cap holds while streaming too.
    let agent = Agent::start("readcap");
    let (mut c, _) = agent.session();
    let limits = Some(ReadLimits { max_bytes: Some(100), follow_symlinks: false });
    let req = c.req();
    c.send(&Control::ReadFile { req, path: "/proc/self/status".into(), limits });
    assert!(matches!(c.reply(req), Control::FileInfo { size: 0, .. }));
    let mut got = 0usize;
    loop {
        let f = c.frame();
        match f.kind {
            Kind::FileData => {
                assert!(!f.payload.is_empty(), "a file past the cap ended as if complete");
                got += f.payload.len();
            }
            Kind::Control => match Control::from_bytes(&f.payload).unwrap() {
                Control::Error { req: r, kind: ErrorKind::Limit, message } if r == req => {
                    assert!(message.contains("100-byte limit"), "{message}");
                    break;
                }
                other => panic!("{other:?}"),
            },
            _ => {}
        }
    }
    assert!(got <= 100, "{got} bytes crossed a 100-byte cap");
    // A file exactly at the cap is read whole.
    let path = agent.dir.join("exact");
    std::fs::write(&path, vec![7u8; 100]).unwrap();
    let req = c.req();
    c.send(&Control::ReadFile { req, path: path.to_string_lossy().into_owned(), limits });
    assert!(matches!(c.reply(req), Control::FileInfo { size: 100, .. }));
    let mut got = 0usize;
    loop {
        let f = c.frame();
        if f.kind == Kind::FileData {
            if f.payload.is_empty() {
                break;
            }
            got += f.payload.len();
        }
    }
    assert_eq!(got, 100);
}

#[test]
fn a_non_root_user_gets_no_capabilities_and_no_new_privs() {
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching users needs the agent to run as root");
        return;
    }
    let a = Agent::start("privs");
    let (mut c, _) = a.session();
    let script = "id -u; id -G; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status | tr -d '\\t'; pwd";
    let run = |c: &mut Client, user: &str, cwd: Option<&str>| {
        let req = c.req();
        c.send(&Control::Spawn {
            req,
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: cwd.map(String::from),
            user: Some(user.into()),
            tty: None,
            timeout_ms: None,
        });
        match c.reply(req) {
            Control::Spawned { id, .. } => {
                let (out, err, status) = c.collect(id);
                assert_eq!(status.exit_code, 0, "{}", text(&err));
                text(&out)
            }
            other => panic!("spawn as {user} failed: {other:?}"),
        }
    };
    let user = run(&mut c, "65534:65534", Some("/tmp"));
    let zero = "0000000000000000";
    assert_eq!(
        user.lines().collect::<Vec<_>>(),
        ["65534", "65534", &format!("CapInh:{zero}"), &format!("CapPrm:{zero}"), &format!("CapEff:{zero}"),
         &format!("CapBnd:{zero}"), &format!("CapAmb:{zero}"), "NoNewPrivs:1", "/tmp"],
        "{user}"
    );
    // A directory the user cannot enter fails the spawn, as that user.
    let dir = a.dir.join("private");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let req = c.req();
    c.send(&Control::Spawn { req, argv: vec!["true".into()], env: vec![], cwd: Some(dir.to_string_lossy().into()), user: Some("65534".into()), tty: None, timeout_ms: None });
    assert!(matches!(c.reply(req), Control::Error { kind: ErrorKind::PermissionDenied, .. }));
    // Root stays root.
    let root = run(&mut c, "0", None);
    assert!(root.starts_with("0\n") && root.contains("NoNewPrivs:0") && !root.contains(&format!("CapEff:{zero}")), "{root}");
}
