//! The QMP side of taking and restoring snapshots: waiting for a migration to finish, and
//! quoting a path into an `exec:` migration URI.
//!
//! Invariant: a migration either completes or is reported as failed within
//! [`MIGRATE_TIMEOUT`]; QEMU's own failure text goes into the error.
//!
//! Errors: the crate's [`Error`]: `Snapshot` when QEMU reports a failed or
//! cancelled migration, `Timeout` past the deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::qmp::Qmp;

/// How long a snapshot's migration may take before we give up.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

/// `p` in single quotes for the shell QEMU runs an `exec:` URI with.
pub(super) fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Polls `query-migrate` until it completes.
pub(super) fn wait_migration(qmp: &mut Qmp, what: &str) -> Result<()> {
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    let mut delay = Duration::from_micros(500);
    loop {
        let v = qmp.execute("query-migrate", None)?;
        match v.get("status").and_then(|s| s.as_str()).unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let desc = v.get("error-desc").and_then(|d| d.as_str()).unwrap_or("no reason given");
                return Err(Error::Snapshot(format!("{what} failed in QEMU: {desc}")));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!("{what} did not finish within {} s", MIGRATE_TIMEOUT.as_secs())));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(2));
    }
}
