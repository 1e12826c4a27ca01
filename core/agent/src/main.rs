//! supermachine-agent: the guest side of the supermachine protocol.
//!
//! * As PID 1 inside the microVM it sets up the system (`init.rs`), then serves the host over
//!   the virtio-serial port named "agent" forever. It never exits: panics are caught per
//!   request, and the serve loop restarts if anything escapes.
//! * `supermachine-agent --listen-unix PATH` (not PID 1) serves the same protocol on a unix
//!   socket, one connection at a time, each like a host reconnecting after a restore (the
//!   process table persists). Host-side tests use it to run against the real agent without a VM.
//!
//! Module map: `writer` (the framed writer with the pause gate), `transport` (read loops on the
//! port or socket), `server` (dispatch), `process` + `reaper` (children), `credit` (output
//! windows), `files` (transfers), `generation` (what a Hello changes: clock, RNG, generation),
//! `tcp` (TCP channels: guest ports opened by the host, guest listeners forwarded to the host),
//! `init` (PID 1 setup), `sys` (raw syscalls), `log`.
//!
//! # What the host can rely on
//! * **Sessions.** Every connection starts with `Hello`; the first frame the agent writes after
//!   it is `Welcome` (anything before Hello is ignored, replies queued for a previous host are
//!   dropped). On a virtio port a frame that was half written when the host vanished may have
//!   its tail delivered on the next connection ahead of `Welcome`: a host should skip bytes up
//!   to the `Welcome` frame (or Pause before a planned disconnect, as snapshots do).
//! * **Processes** keep their agent-chosen ids (from 1, never reused while tracked) across
//!   connections. `Welcome.processes`/`Processes` list every tracked process until `Forget`;
//!   `running: false` means reaped, yet its remaining output, EOFs and `Exited` may still be
//!   on their way. When the table is full the oldest process whose `Exited` was sent is evicted
//!   before a spawn fails with `limit`.
//! * **Output and credit.** Each process has one window for stdout+stderr together, and each
//!   read transfer its own; both start at `DEFAULT_OUTPUT_WINDOW` bytes and are reset to it by
//!   every Hello (a new host has empty buffers). `Credit{id, bytes}` adds to the process `id`
//!   *and* to the read transfer on channel `id` if both exist (the tables are separate; an id
//!   in both gets the credit twice, so keep transfer reqs apart from process ids, or accept
//!   that overlap). EOF frames and control messages need no credit.
//! * **Order per process:** `Spawned` before any of its stdio; each stream ends with one empty
//!   frame; `Exited` after both EOFs (one for a tty) and after the process was reaped. A
//!   background child that keeps the pipes open delays both EOF and `Exited` (as with any
//!   pipe); the timeout kills the whole process group.
//! * **Stdin:** every chunk is acked with `StdinAck` once written or dropped (process gone);
//!   an empty Stdin frame closes stdin (on a tty it sends ^D, as a pty cannot be half-closed).
//! * **Files:** `WriteFile` gets exactly one reply, after its end frame, even if the open failed.
//!   `ReadFile` answers `FileInfo` (size is advisory: /proc files say 0) then data and an empty
//!   end frame, or `Error{req}` instead of the end frame if reading fails midway.
//! * **Pause:** after `Paused{req}` nothing is written until `Resume` (answered `Ok{req}`) or
//!   the next Hello; input is still processed while paused.
//! * **Errors:** a malformed frame gets one `Error{req: 0, kind: protocol}` and the agent then
//!   ignores input until a Hello (reconnect); a well-framed but invalid control message gets
//!   `Error{req, protocol}` and the session goes on; a version mismatch on Hello gets
//!   `Error{req: 0, protocol}` and no Welcome.

mod credit;
mod files;
mod generation;
mod init;
mod log;
mod process;
mod reaper;
mod server;
mod sys;
mod tcp;
mod transport;
mod user;
mod writer;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use process::Procs;
use generation::Generation;
use server::Server;
use writer::Writer;

const USAGE: &str = "usage: supermachine-agent --listen-unix PATH [--state-dir DIR] [--debug] [--die-with-parent]
  (as PID 1 in the microVM it takes no arguments)";

/// Where PID 1 writes its state files (see `generation.rs`).
const STATE_DIR: &str = "/run/supermachine";

struct Args {
    listen: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    debug: bool,
    die_with_parent: bool,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args { listen: None, state_dir: None, debug: false, die_with_parent: false };
    let mut it = args;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen-unix" => a.listen = Some(it.next().ok_or("--listen-unix needs a PATH")?.into()),
            "--state-dir" => a.state_dir = Some(it.next().ok_or("--state-dir needs a DIR")?.into()),
            "--debug" => a.debug = true,
            "--die-with-parent" => a.die_with_parent = true,
            "--version" => return Err(format!("supermachine-agent {} (protocol {})", env!("CARGO_PKG_VERSION"), supermachine_protocol::PROTOCOL_VERSION)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn build(touch_system: bool, state_dir: Option<PathBuf>) -> Server {
    let writer = Arc::new(Writer::new());
    let procs = Arc::new(Procs::new(writer.clone()));
    reaper::start(procs.clone());
    Server::new(writer, procs, Generation::new(touch_system, state_dir))
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        log!("panic in thread {}: {info}", thread.name().unwrap_or("?"));
    }));
    if std::process::id() == 1 {
        run_pid1();
    }
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let Some(path) = args.listen else {
        eprintln!("not running as PID 1, so a socket to serve is needed\n{USAGE}");
        std::process::exit(2);
    };
    log::set_debug(args.debug);
    if args.die_with_parent {
        // SAFETY: prctl with integer arguments only. Note: "parent" is the thread that spawned us.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    }
    // Adopt orphaned descendants like PID 1 does, so the reaper sees them too.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut server = build(false, args.state_dir);
    if let Err(e) = transport::serve_unix(&path, &mut server) {
        log!("cannot listen on {}: {e}", path.display());
        std::process::exit(1);
    }
}

fn run_pid1() -> ! {
    if let Err(e) = sys::set_non_dumpable() {
        log!("cannot make the agent non-dumpable: {e}");
    }
    let _ = catch_unwind(init::setup);
    log!("ready (protocol {})", supermachine_protocol::PROTOCOL_VERSION);
    let mut server = build(true, Some(PathBuf::from(STATE_DIR)));
    loop {
        let _ = catch_unwind(AssertUnwindSafe(|| transport::serve_port(&mut server)));
        log!("the serve loop stopped unexpectedly; restarting it");
        server.writer().set_sink(None, false);
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let a = parse_args(["--listen-unix", "/x", "--debug"].iter().map(|s| s.to_string())).unwrap();
        assert_eq!(a.listen, Some(PathBuf::from("/x")));
        assert!(a.debug);
        assert!(parse_args(["--bogus"].iter().map(|s| s.to_string())).is_err());
        assert!(parse_args(["--listen-unix"].iter().map(|s| s.to_string())).is_err());
    }
}
