//! The reaper: one thread that reaps every child — tracked processes and, as PID 1 (or a
//! subreaper in test mode), orphans reparented to us — and records exit status and peak RSS.
//!
//! It peeks with `waitid(WNOWAIT)` before reaping, so a child that dies before `spawn` has put
//! it in the table stays a zombie (its pid cannot be reused) until it is known — no race, no
//! guessing. Nothing else in the agent waits for children.

use std::sync::Arc;
use std::time::Duration;

use crate::log;
use crate::process::Procs;

pub fn start(procs: Arc<Procs>) {
    let r = std::thread::Builder::new().name("reaper".into()).spawn(move || run(&procs));
    if let Err(e) = r {
        log!("cannot start the reaper thread: {e}");
    }
}

fn run(procs: &Procs) {
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t into the valid pointer.
        let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == -1 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ECHILD) => procs.wait_for_children(),
                Some(libc::EINTR) => {}
                _ => {
                    log!("waitid failed: {}", std::io::Error::last_os_error());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            continue;
        }
        // SAFETY: waitid succeeded with WEXITED, so the union holds the child fields.
        let pid = unsafe { info.si_pid() };
        if pid <= 0 || !procs.may_reap(pid) {
            continue;
        }
        let mut status = 0;
        // SAFETY: rusage is plain data; zeroed is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 writes the status and one rusage into valid pointers.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            procs.record_exit(pid, status, ru.ru_maxrss.max(0) as u64);
        }
    }
}
