//! Lines the host writes to its stderr (the kernel's log) about things a guest can repeat at
//! will, such as refused or failed TCP channels: at most [`BURST`] lines per cause in each
//! [`WINDOW`]; the next line let through says how many were left out. Without this a guest
//! could grow the kernel log by one line per connection attempt, without bound.
//!
//! [`LogLimit`] is pure (the caller passes the time); [`log_limited`] is the process-wide
//! instance that writes. Causes are `&'static str` names chosen by the code that logs, never
//! guest text, so the table stays small.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines per cause per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Per cause: when its window began, lines logged in it, lines left out since the last one.
#[derive(Debug, Default)]
pub struct LogLimit {
    causes: HashMap<&'static str, (Instant, u32, u64)>,
}

impl LogLimit {
    /// None: leave this line out. Some(n): log it; n lines of this cause were left out since
    /// the last one logged.
    pub fn allow(&mut self, cause: &'static str, now: Instant) -> Option<u64> {
        let e = self.causes.entry(cause).or_insert((now, 0, 0));
        if now.saturating_duration_since(e.0) >= WINDOW {
            e.0 = now;
            e.1 = 0;
        }
        if e.1 >= BURST {
            e.2 += 1;
            return None;
        }
        e.1 += 1;
        Some(std::mem::take(&mut e.2))
    }
}

/// Writes `line()` to stderr unless `cause` is over its budget (the line is then not even
/// formatted).
pub fn log_limited(cause: &'static str, line: impl FnOnce() -> String) {
    static LIMIT: OnceLock<Mutex<LogLimit>> = OnceLock::new();
    let allowed = LIMIT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .allow(cause, Instant::now());
    match allowed {
        Some(0) => eprintln!("supermachine: {}", line()),
        Some(n) => eprintln!("supermachine: {} ({n} more like it left out of this log)", line()),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_cause_per_window_then_a_count() {
        let mut l = LogLimit::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.allow("a", t0), Some(0));
        }
        assert_eq!(l.allow("a", t0), None);
        assert_eq!(l.allow("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(l.allow("b", t0), Some(0), "causes are counted apart");
        assert_eq!(l.allow("a", t0 + WINDOW), Some(2), "the next window says how many were left out");
        assert_eq!(l.allow("a", t0 + WINDOW), Some(0));
    }
}
