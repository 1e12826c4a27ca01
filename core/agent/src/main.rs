//! supermachine-agent: the guest side of the supermachine protocol.
//!
//! * As PID 1 inside the microVM it sets up the system (`init.rs`), then serves the host over
//!   the virtio-serial port named "agent" forever. It never exits: panics are caught per
//!   request, and the serve loop restarts if anything escapes.
//! * `supermachine-agent --listen-unix PATH` (not PID 1) serves the same protocol on a unix
//!   socket, one connection at a time, each like a host reconnecting after a restore (the
//!   process table persists). Host-side tests use it to run against the real agent without a VM.
//!
//! Module map: `transport` (framed writer with the pause gate, read loops), `server` (dispatch),
//! `process` + `reaper` (children), `credit` (output windows), `files` (transfers),
//! `restore` (clock, RNG, generation), `init` (PID 1 setup), `sys` (raw syscalls), `log`.

mod credit;
mod files;
mod init;
mod log;
mod process;
mod reaper;
mod restore;
mod server;
mod sys;
mod transport;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use process::Procs;
use restore::Restore;
use server::Server;
use transport::Writer;

const USAGE: &str = "usage: supermachine-agent --listen-unix PATH [--state-dir DIR] [--debug]
  (as PID 1 in the microVM it takes no arguments)";

/// Where PID 1 writes its state files (see `restore.rs`).
const STATE_DIR: &str = "/run/supermachine";

struct Args {
    listen: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    debug: bool,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args { listen: None, state_dir: None, debug: false };
    let mut it = args;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen-unix" => a.listen = Some(it.next().ok_or("--listen-unix needs a PATH")?.into()),
            "--state-dir" => a.state_dir = Some(it.next().ok_or("--state-dir needs a DIR")?.into()),
            "--debug" => a.debug = true,
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
    Server::new(writer, procs, Restore::new(touch_system, state_dir))
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
