//! Logging: short lines prefixed `supermachine-agent:` on stderr, which is /dev/console when
//! the agent runs as PID 1. Never panics (a failed log write is ignored). `sm.debug` on the
//! kernel command line (or `--debug` in test mode) enables the verbose [`debug!`] lines.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one line. Used by the macros; the whole line goes out in a single write.
pub fn line(args: std::fmt::Arguments<'_>) {
    let text = format!("supermachine-agent: {args}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Logs a line always.
#[macro_export]
macro_rules! log {
    ($($t:tt)*) => { $crate::log::line(format_args!($($t)*)) };
}

/// Logs a line only when debug logging is on.
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => {
        if $crate::log::debug_enabled() { $crate::log::line(format_args!($($t)*)) }
    };
}
