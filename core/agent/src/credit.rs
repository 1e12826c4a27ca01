//! Output credit windows: how many more bytes the agent may send on one stream (a process's
//! stdout+stderr, or a file read) before the host grants more with a credit message.
//!
//! Each window belongs to a connection *session* (the writer's epoch, bumped by every Hello).
//! A new host starts with empty buffers, so [`Window::reset`] gives every window
//! [`DEFAULT_OUTPUT_WINDOW`] again; bytes are charged with [`Window::consume`] only when the
//! frame that carried them went out in the window's current session, so a frame written to the
//! old host just before a reconnect is never charged to the new host's window.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use supermachine_protocol::DEFAULT_OUTPUT_WINDOW;

use crate::sys::lock;

/// Largest window we keep (credit beyond this is clipped; it only guards against overflow).
const MAX_WINDOW: u64 = 1 << 40;

#[derive(Debug)]
struct State {
    window: u64,
    /// What a reset grants.
    full: u64,
    epoch: u64,
    cancelled: bool,
}

/// One stream's credit window; blocking waits use the condvar.
#[derive(Debug)]
pub struct Window {
    st: Mutex<State>,
    cv: Condvar,
}

impl Window {
    pub fn new(epoch: u64) -> Window {
        Window::with_size(epoch, DEFAULT_OUTPUT_WINDOW)
    }

    /// A window of `size` bytes (a reset grants that again).
    pub fn with_size(epoch: u64, size: u64) -> Window {
        Window { st: Mutex::new(State { window: size, full: size, epoch, cancelled: false }), cv: Condvar::new() }
    }

    /// Blocks until at least one byte may be sent; returns how many (at most `max`), or
    /// `None` once the window was cancelled.
    pub fn wait_available(&self, max: usize) -> Option<usize> {
        let mut st = lock(&self.st);
        loop {
            if st.cancelled {
                return None;
            }
            if st.window > 0 {
                return Some(st.window.min(max as u64) as usize);
            }
            st = match self.cv.wait_timeout(st, Duration::from_secs(1)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Charges `n` bytes that were written in session `epoch`.
    pub fn consume(&self, epoch: u64, n: usize) {
        let mut st = lock(&self.st);
        if st.epoch == epoch {
            st.window = st.window.saturating_sub(n as u64);
        }
    }

    /// The host consumed `bytes` and lets us send that much more.
    pub fn add(&self, bytes: u64) {
        let mut st = lock(&self.st);
        st.window = st.window.saturating_add(bytes).min(MAX_WINDOW);
        self.cv.notify_all();
    }

    /// A new session (host) begins: full default window.
    pub fn reset(&self, epoch: u64) {
        let mut st = lock(&self.st);
        st.window = st.full;
        st.epoch = epoch;
        self.cv.notify_all();
    }

    /// Wakes and stops every waiter for good.
    pub fn cancel(&self) {
        lock(&self.st).cancelled = true;
        self.cv.notify_all();
    }

    #[cfg(test)]
    fn available(&self) -> u64 {
        lock(&self.st).window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_add_and_cap_to_chunk() {
        let w = Window::new(1);
        assert_eq!(w.wait_available(10), Some(10));
        w.consume(1, DEFAULT_OUTPUT_WINDOW as usize - 3);
        assert_eq!(w.wait_available(10), Some(3));
        w.consume(1, 3);
        assert_eq!(w.available(), 0);
        w.add(5);
        assert_eq!(w.wait_available(10), Some(5));
    }

    #[test]
    fn bytes_written_in_an_old_session_are_not_charged() {
        let w = Window::new(1);
        w.reset(2);
        w.consume(1, 1000);
        assert_eq!(w.available(), DEFAULT_OUTPUT_WINDOW);
        w.consume(2, 1000);
        assert_eq!(w.available(), DEFAULT_OUTPUT_WINDOW - 1000);
    }

    #[test]
    fn cancel_wakes_a_blocked_waiter() {
        let w = std::sync::Arc::new(Window::new(1));
        w.consume(1, DEFAULT_OUTPUT_WINDOW as usize);
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.wait_available(10));
        std::thread::sleep(Duration::from_millis(20));
        w.cancel();
        assert_eq!(t.join().unwrap(), None);
    }

    #[test]
    fn credit_is_clipped_not_overflowed() {
        let w = Window::new(1);
        w.add(u64::MAX);
        w.add(u64::MAX);
        assert_eq!(w.available(), MAX_WINDOW);
    }
}
