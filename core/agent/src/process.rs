//! Guest processes: the table of tracked processes, spawning (pipes or a pty, own session and
//! process group), and the per-process threads — one output pump per stream, a stdin writer,
//! and an optional timeout killer. Reaping lives in `reaper.rs`.
//!
//! Ordering guarantees to the host, per process `id`:
//! * `Spawned{id}` is sent before any stdio frame of `id` (threads start after the reply).
//! * Output is sent in chunks of at most [`CHUNK`] bytes and only while the process's credit
//!   window (shared by stdout and stderr) is open; an empty frame is that stream's EOF.
//! * `Exited{id}` is sent after the EOF of every output stream *and* after the reaper saw the
//!   process die — by the pump that sent the last EOF.
//! * Every chunk of stdin is acknowledged with `StdinAck` once written to the pipe (or dropped
//!   because the process is gone: the ack still comes, so the host's window never stalls).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use supermachine_protocol::{Control, ErrorKind, ExitStatus, Kind, ProcessInfo, TtySize, CHUNK, MAX_PROCESSES, STDIN_WINDOW};

use crate::credit::Window;
use crate::sys::{self, lock};
use crate::writer::Writer;
use crate::{debug, log};

/// Base environment of every spawned process (the request's env is applied on top).
pub const BASE_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
];

/// A process spawned with this variable set to a signal number gets that signal after every
/// Hello (a restore, a resume): it can learn at once that its clock, RNG and generation changed,
/// instead of at its next request (the kernel's REPL starts its warm-up then).
pub const NOTIFY_HELLO_ENV: &str = "SUPERMACHINE_NOTIFY_HELLO";

/// The signal a spawn request asks for with [`NOTIFY_HELLO_ENV`] (1..=64), if any.
pub fn notify_signal(env: &[(String, String)]) -> Option<i32> {
    let (_, v) = env.iter().rev().find(|(k, _)| k == NOTIFY_HELLO_ENV)?;
    v.trim().parse::<i32>().ok().filter(|s| (1..=64).contains(s))
}

/// Stdin bytes we queue at most per process (the host keeps at most STDIN_WINDOW unacked).
const MAX_STDIN_QUEUE: usize = 4 * STDIN_WINDOW as usize;

/// A failed request: the error kind and a message for the user.
pub type Failure = (ErrorKind, String);

/// What the host asked to run.
pub struct SpawnRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Run as this user (user.rs); None: as the agent (root).
    pub user: Option<String>,
    pub tty: Option<TtySize>,
    pub timeout_ms: Option<u64>,
}

#[derive(Default)]
struct State {
    /// Raw wait status and peak RSS (KiB), once reaped.
    exit: Option<(i32, u64)>,
    timed_out: bool,
    /// Output streams that have not sent their EOF yet.
    outputs_open: u8,
    exited_sent: bool,
    stdin: VecDeque<Vec<u8>>,
    stdin_queued: usize,
    stdin_closed: bool,
    forgotten: bool,
}

/// One tracked process.
pub struct Proc {
    pub id: u32,
    pub os_pid: i32,
    argv: Vec<String>,
    /// Signal to send after every Hello ([`NOTIFY_HELLO_ENV`]).
    notify: Option<i32>,
    /// The pty master, for resize (None for pipes).
    master: Option<OwnedFd>,
    window: Window,
    st: Mutex<State>,
    cv: Condvar,
}

impl Proc {
    fn info(&self) -> ProcessInfo {
        let running = lock(&self.st).exit.is_none();
        ProcessInfo { id: self.id, os_pid: self.os_pid as u32, argv: self.argv.clone(), running, tty: self.master.is_some() }
    }
}

/// The stdio handles of a fresh process, handed to [`Procs::start`].
pub enum Stdio3 {
    Pipes { stdin: File, stdout: File, stderr: File },
    Pty { reader: File, writer: File },
}

/// A spawned process whose threads have not started yet (so `Spawned` can go out first).
pub struct Started {
    pub proc: Arc<Proc>,
    io: Stdio3,
    timeout_ms: Option<u64>,
}

struct Table {
    next_id: u32,
    procs: BTreeMap<u32, Arc<Proc>>,
    by_pid: HashMap<i32, u32>,
    /// Spawns in flight: their child may exit before it is in `by_pid` (see `may_reap`).
    spawning: usize,
}

/// The process table, shared by the server, the per-process threads and the reaper.
pub struct Procs {
    table: Mutex<Table>,
    /// Signalled when a spawn finishes (the reaper waits on it).
    spawned: Condvar,
    writer: Arc<Writer>,
}

/// Maps an exec/spawn error to a protocol error.
fn spawn_failure(argv0: &str, e: &io::Error) -> Failure {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    let hint = if kind == ErrorKind::NotFound && !argv0.contains('/') { " (not found in PATH)" } else { "" };
    (kind, format!("cannot run {argv0:?}: {e}{hint}"))
}

/// Converts a raw wait status into the protocol's exit status.
pub fn exit_status(raw: i32, peak_rss_kib: u64, timed_out: bool) -> ExitStatus {
    let (exit_code, signal) = if libc::WIFEXITED(raw) {
        (libc::WEXITSTATUS(raw), None)
    } else if libc::WIFSIGNALED(raw) {
        (-1, Some(libc::WTERMSIG(raw)))
    } else {
        (-1, None)
    };
    let exit_code = if timed_out { -1 } else { exit_code };
    ExitStatus { exit_code, signal, timed_out, peak_rss_kib }
}

fn validate(req: &SpawnRequest) -> Result<(), Failure> {
    let bad = |m: String| Err((ErrorKind::InvalidArgument, m));
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return bad("argv is empty: give at least the program to run".into());
    }
    for (k, _) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return bad(format!("invalid environment variable name {k:?}"));
        }
    }
    if let Some(cwd) = &req.cwd {
        if !Path::new(cwd).is_dir() {
            return Err((ErrorKind::NotFound, format!("working directory {cwd:?} does not exist")));
        }
    }
    if let Some(t) = req.tty {
        if t.rows == 0 || t.cols == 0 {
            return bad(format!("tty size {}x{} is empty", t.rows, t.cols));
        }
    }
    Ok(())
}

impl Procs {
    pub fn new(writer: Arc<Writer>) -> Procs {
        Procs {
            table: Mutex::new(Table { next_id: 1, procs: BTreeMap::new(), by_pid: HashMap::new(), spawning: 0 }),
            spawned: Condvar::new(),
            writer,
        }
    }

    fn get(&self, id: u32) -> Option<Arc<Proc>> {
        lock(&self.table).procs.get(&id).cloned()
    }

    /// Frees a slot if the table is full by evicting the oldest process whose exit was reported.
    fn make_room(t: &mut Table) -> Result<(), Failure> {
        if t.procs.len() < MAX_PROCESSES {
            return Ok(());
        }
        let victim = t.procs.values().find(|p| lock(&p.st).exited_sent).map(|p| p.id);
        match victim {
            Some(id) => {
                if let Some(p) = t.procs.remove(&id) {
                    p.window.cancel();
                }
                Ok(())
            }
            None => Err((
                ErrorKind::Limit,
                format!("too many processes: {MAX_PROCESSES} are running or unreported; wait for some to exit"),
            )),
        }
    }

    /// Forks and execs a process. Exec failures (missing program, bad cwd) are errors here,
    /// not exit codes. Call [`Procs::start`] after replying `Spawned`.
    pub fn spawn(&self, req: SpawnRequest) -> Result<Started, Failure> {
        validate(&req)?;
        let ids = crate::user::for_request(req.user.as_deref())?;
        Self::make_room(&mut lock(&self.table))?;
        let argv0 = req.argv[0].clone();
        let notify = notify_signal(&req.env);
        let mut cmd = Command::new(&argv0);
        cmd.args(&req.argv[1..]).env_clear();
        for (k, v) in BASE_ENV {
            cmd.env(k, v);
        }
        if req.tty.is_some() {
            cmd.env("TERM", "xterm-256color");
        }
        if let Some(ids) = &ids {
            cmd.env("HOME", &ids.home);
        }
        for (k, v) in &req.env {
            cmd.env(k, v);
        }
        // As another user the child enters its working directory itself, after becoming that
        // user (below): a directory the user cannot enter fails the spawn.
        // Without a cwd, a non-root user starts in its home (as a login does) when it has one.
        let creds = ids.as_ref().map(|i| (i.uid, i.gid));
        let mut user_cwd = None;
        let home_cwd = ids.as_ref().filter(|i| i.uid != 0 && req.cwd.is_none() && Path::new(&i.home).is_dir()).map(|i| i.home.clone());
        if let Some(cwd) = req.cwd.as_ref().or(home_cwd.as_ref()) {
            if creds.is_some() {
                user_cwd = Some(sys::cstr(cwd).map_err(|e| (ErrorKind::InvalidArgument, format!("working directory: {e}")))?);
            } else {
                cmd.current_dir(cwd);
            }
        }
        let io_err = |e: io::Error| (ErrorKind::Io, format!("cannot set up stdio for {argv0:?}: {e}"));
        let mut master = None;
        if let Some(size) = req.tty {
            let (m, s) = sys::open_pty(size).map_err(io_err)?;
            cmd.stdin(Stdio::from(s.try_clone().map_err(io_err)?));
            cmd.stdout(Stdio::from(s.try_clone().map_err(io_err)?));
            cmd.stderr(Stdio::from(s));
            master = Some(m);
        } else {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let tty = req.tty.is_some();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setsid, ioctl, signal, sigprocmask, and those of
        // sys::become_user, chdir).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                // A child starts with default signal handling whatever the agent inherited
                // (e.g. SIGINT ignored when the agent was started from a background shell).
                for sig in 1..32 {
                    if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                        libc::signal(sig, libc::SIG_DFL);
                    }
                }
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                if let Some((uid, gid)) = creds {
                    sys::become_user(uid, gid)?;
                }
                if let Some(dir) = &user_cwd {
                    if libc::chdir(dir.as_ptr()) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        lock(&self.table).spawning += 1;
        let result = cmd.spawn();
        drop(cmd); // closes our copies of the pty slave
        let mut t = lock(&self.table);
        t.spawning -= 1;
        self.spawned.notify_all();
        let mut child = result.map_err(|e| spawn_failure(&argv0, &e))?;
        let os_pid = child.id() as i32;
        let io = match &master {
            Some(m) => Stdio3::Pty { reader: sys::dup_file(m).map_err(io_err)?, writer: sys::dup_file(m).map_err(io_err)? },
            None => match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(i), Some(o), Some(e)) => Stdio3::Pipes {
                    stdin: File::from(OwnedFd::from(i)),
                    stdout: File::from(OwnedFd::from(o)),
                    stderr: File::from(OwnedFd::from(e)),
                },
                _ => return Err((ErrorKind::Io, "internal error: child stdio missing".into())),
            },
        };
        // `child` is dropped without waiting: the reaper owns waiting.
        let mut id = t.next_id;
        while id == 0 || t.procs.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        t.next_id = id.wrapping_add(1);
        let outputs = if master.is_some() { 1 } else { 2 };
        let proc = Arc::new(Proc {
            id,
            os_pid,
            argv: req.argv,
            notify,
            master,
            window: Window::new(self.writer.epoch()),
            st: Mutex::new(State { outputs_open: outputs, ..State::default() }),
            cv: Condvar::new(),
        });
        t.procs.insert(id, proc.clone());
        t.by_pid.insert(os_pid, id);
        debug!("spawned id {id} pid {os_pid}: {argv0}");
        Ok(Started { proc, io, timeout_ms: req.timeout_ms })
    }

    /// Starts the threads of a spawned process.
    pub fn start(&self, s: Started) {
        let p = s.proc;
        let w = &self.writer;
        match s.io {
            Stdio3::Pipes { stdin, stdout, stderr } => {
                thread(format!("out-{}", p.id), { let (p, w) = (p.clone(), w.clone()); move || pump(p, w, Kind::Stdout, stdout) });
                thread(format!("err-{}", p.id), { let (p, w) = (p.clone(), w.clone()); move || pump(p, w, Kind::Stderr, stderr) });
                thread(format!("in-{}", p.id), { let (p, w) = (p.clone(), w.clone()); move || stdin_writer(p, w, stdin, false) });
            }
            Stdio3::Pty { reader, writer } => {
                thread(format!("out-{}", p.id), { let (p, w) = (p.clone(), w.clone()); move || pump(p, w, Kind::Stdout, reader) });
                thread(format!("in-{}", p.id), { let (p, w) = (p.clone(), w.clone()); move || stdin_writer(p, w, writer, true) });
            }
        }
        if let Some(ms) = s.timeout_ms {
            thread(format!("timeout-{}", p.id), move || timeout(p, Duration::from_millis(ms)));
        }
    }

    /// Bytes for a process's stdin; empty = close stdin. Unknown ids are ignored.
    pub fn stdin(&self, id: u32, data: Vec<u8>) {
        let Some(p) = self.get(id) else {
            debug!("stdin for unknown process {id} dropped");
            return;
        };
        let mut st = lock(&p.st);
        if st.stdin_closed {
            debug!("stdin for process {id} after close dropped");
        } else if data.is_empty() {
            st.stdin_closed = true;
        } else if st.stdin_queued + data.len() > MAX_STDIN_QUEUE {
            log!("stdin of process {id} overflows its queue (host ignores StdinAck?); {} bytes dropped", data.len());
        } else {
            st.stdin_queued += data.len();
            st.stdin.push_back(data);
        }
        p.cv.notify_all();
    }

    /// The host grants `bytes` more output on process `id` (false if there is no such process).
    pub fn credit(&self, id: u32, bytes: u64) -> bool {
        match self.get(id) {
            Some(p) => {
                p.window.add(bytes);
                true
            }
            None => false,
        }
    }

    /// A new host: every process gets a full output window in session `epoch`.
    pub fn reset_windows(&self, epoch: u64) {
        for p in lock(&self.table).procs.values() {
            p.window.reset(epoch);
        }
    }

    /// After a Hello: signals every running process that asked for it (best effort).
    pub fn notify_hello(&self) {
        for p in lock(&self.table).procs.values() {
            if let Some(sig) = p.notify {
                if lock(&p.st).exit.is_none() {
                    if let Err(e) = sys::signal_main_thread(p.os_pid, sig) {
                        debug!("cannot notify process {} of the hello: {e}", p.id);
                    }
                }
            }
        }
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        lock(&self.table).procs.values().map(|p| p.info()).collect()
    }

    pub fn signal(&self, id: u32, signal: i32) -> Result<(), Failure> {
        if !(0..=64).contains(&signal) {
            return Err((ErrorKind::InvalidArgument, format!("{signal} is not a signal number")));
        }
        let p = self.get(id).ok_or_else(|| no_such(id))?;
        if lock(&p.st).exit.is_some() {
            return Err((ErrorKind::NoSuchProcess, format!("process {id} has already exited")));
        }
        sys::kill_group(p.os_pid, signal).map_err(|e| (ErrorKind::NoSuchProcess, format!("cannot signal process {id}: {e}")))
    }

    pub fn resize(&self, id: u32, size: TtySize) -> Result<(), Failure> {
        let p = self.get(id).ok_or_else(|| no_such(id))?;
        let m = p.master.as_ref().ok_or_else(|| (ErrorKind::InvalidArgument, format!("process {id} has no tty")))?;
        sys::set_winsize(m.as_raw_fd(), size).map_err(|e| (ErrorKind::Io, format!("cannot resize the tty of process {id}: {e}")))
    }

    /// Frees the slot of an exited process.
    pub fn forget(&self, id: u32) -> Result<(), Failure> {
        let mut t = lock(&self.table);
        let p = t.procs.get(&id).ok_or_else(|| no_such(id))?.clone();
        let mut st = lock(&p.st);
        if st.exit.is_none() {
            return Err((ErrorKind::InvalidArgument, format!("process {id} is still running; signal it first")));
        }
        st.forgotten = true;
        drop(st);
        p.cv.notify_all();
        p.window.cancel();
        t.procs.remove(&id);
        Ok(())
    }

    /// Reaper: may the zombie `pid` be reaped now? Waits while a spawn is in flight and the pid
    /// is unknown (it may be that spawn's child: std waits for it itself if its exec failed).
    /// `false` = look again.
    pub fn may_reap(&self, pid: i32) -> bool {
        let t = lock(&self.table);
        if t.by_pid.contains_key(&pid) || t.spawning == 0 {
            return true;
        }
        let (t, _) = self.spawned.wait_timeout(t, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner());
        t.by_pid.contains_key(&pid) || t.spawning == 0
    }

    /// Reaper: no children right now; wait for a spawn (or a while).
    pub fn wait_for_children(&self) {
        let t = lock(&self.table);
        let _ = self.spawned.wait_timeout(t, Duration::from_secs(1));
    }

    /// Reaper: `pid` was reaped with this raw status and peak RSS.
    pub fn record_exit(&self, pid: i32, status: i32, maxrss_kib: u64) {
        let p = {
            let mut t = lock(&self.table);
            match t.by_pid.remove(&pid) {
                Some(id) => t.procs.get(&id).cloned(),
                None => None,
            }
        };
        match p {
            Some(p) => {
                debug!("process {} (pid {pid}) exited, status {status:#x}", p.id);
                lock(&p.st).exit = Some((status, maxrss_kib));
                p.cv.notify_all();
            }
            None => debug!("reaped untracked pid {pid}"),
        }
    }
}

fn no_such(id: u32) -> Failure {
    (ErrorKind::NoSuchProcess, format!("no process with id {id}"))
}

fn thread(name: String, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.clone()).stack_size(256 * 1024).spawn(f) {
        log!("cannot start thread {name}: {e}");
    }
}

fn wait<'a>(p: &'a Proc, st: std::sync::MutexGuard<'a, State>, d: Duration) -> std::sync::MutexGuard<'a, State> {
    match p.cv.wait_timeout(st, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}

/// Copies one output stream to the host under the credit window, then its EOF; the pump that
/// sends the last EOF also waits for the exit and sends `Exited`.
fn pump(p: Arc<Proc>, w: Arc<Writer>, kind: Kind, mut src: File) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Some(max) = p.window.wait_available(CHUNK) else { return };
        match src.read(&mut buf[..max]) {
            Ok(0) => break,
            Ok(n) => {
                let epoch = w.send(kind, p.id, &buf[..n]);
                p.window.consume(epoch, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A pty master reads EIO once every slave fd is closed: that is its EOF.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => {
                log!("reading output of process {} failed: {e}", p.id);
                break;
            }
        }
    }
    drop(src);
    w.send(kind, p.id, &[]);
    let mut st = lock(&p.st);
    st.outputs_open = st.outputs_open.saturating_sub(1);
    if st.outputs_open > 0 {
        return;
    }
    let (raw, rss) = loop {
        if let Some(e) = st.exit {
            break e;
        }
        if st.forgotten {
            return;
        }
        st = wait(&p, st, Duration::from_secs(1));
    };
    let status = exit_status(raw, rss, st.timed_out);
    drop(st);
    w.send_control(&Control::Exited { id: p.id, status });
    lock(&p.st).exited_sent = true;
}

/// Writes queued stdin to the process, acknowledging each chunk.
fn stdin_writer(p: Arc<Proc>, w: Arc<Writer>, mut sink: File, tty: bool) {
    let mut broken = false;
    loop {
        let chunk = {
            let mut st = lock(&p.st);
            loop {
                if let Some(c) = st.stdin.pop_front() {
                    st.stdin_queued -= c.len();
                    break Some(c);
                }
                if st.stdin_closed || st.exit.is_some() || st.forgotten {
                    break None;
                }
                st = wait(&p, st, Duration::from_secs(1));
            }
        };
        let Some(chunk) = chunk else { break };
        if !broken {
            if let Err(e) = sink.write_all(&chunk) {
                debug!("stdin of process {} is closed ({e}); dropping input", p.id);
                broken = true;
            }
        }
        w.send_control(&Control::StdinAck { id: p.id, bytes: chunk.len() as u64 });
    }
    if tty && !broken && lock(&p.st).stdin_closed {
        // A pty cannot be half-closed: send the terminal's EOF character instead.
        let _ = sink.write_all(&[0x04]);
    }
}

/// Kills the process group when the timeout expires first.
fn timeout(p: Arc<Proc>, after: Duration) {
    let deadline = Instant::now() + after;
    let mut st = lock(&p.st);
    loop {
        if st.exit.is_some() || st.forgotten {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        st = wait(&p, st, deadline - now);
    }
    st.timed_out = true;
    drop(st);
    debug!("process {} timed out after {after:?}", p.id);
    let _ = sys::kill_group(p.os_pid, libc::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_signal_is_read_from_the_environment() {
        let env = |v: &str| vec![("A".to_string(), "1".to_string()), (NOTIFY_HELLO_ENV.to_string(), v.to_string())];
        assert_eq!(notify_signal(&env("36")), Some(36));
        assert_eq!(notify_signal(&env(" 12 ")), Some(12));
        for bad in ["0", "65", "-1", "usr1", ""] {
            assert_eq!(notify_signal(&env(bad)), None, "{bad}");
        }
        assert_eq!(notify_signal(&[]), None);
    }

    #[test]
    fn exit_status_of_code_signal_and_timeout() {
        assert_eq!(exit_status(3 << 8, 10, false), ExitStatus { exit_code: 3, signal: None, timed_out: false, peak_rss_kib: 10 });
        assert_eq!(exit_status(9, 0, false), ExitStatus { exit_code: -1, signal: Some(9), timed_out: false, peak_rss_kib: 0 });
        assert_eq!(exit_status(9, 0, true), ExitStatus { exit_code: -1, signal: Some(9), timed_out: true, peak_rss_kib: 0 });
        assert_eq!(exit_status(0, 0, true).exit_code, -1);
    }

    #[test]
    fn requests_are_validated() {
        let req = |argv: &[&str], env: &[(&str, &str)], cwd: Option<&str>| SpawnRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            cwd: cwd.map(String::from),
            user: None,
            tty: None,
            timeout_ms: None,
        };
        assert_eq!(validate(&req(&[], &[], None)).unwrap_err().0, ErrorKind::InvalidArgument);
        assert_eq!(validate(&req(&["sh"], &[("A=B", "x")], None)).unwrap_err().0, ErrorKind::InvalidArgument);
        assert_eq!(validate(&req(&["sh"], &[], Some("/no/such/dir"))).unwrap_err().0, ErrorKind::NotFound);
        assert!(validate(&req(&["sh"], &[("A", "=x")], Some("/"))).is_ok());
    }

    #[test]
    fn spawn_failures_name_the_program() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        let (kind, msg) = spawn_failure("nope", &e);
        assert_eq!(kind, ErrorKind::NotFound);
        assert!(msg.contains("\"nope\"") && msg.contains("PATH"), "{msg}");
    }
}
