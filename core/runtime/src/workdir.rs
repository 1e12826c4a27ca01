//! Per-VM working directories: sockets, console log, QEMU's stderr and (for cold boots) the
//! guest RAM file. They live under `$XDG_RUNTIME_DIR/supermachine`, else
//! `/dev/shm/supermachine-<uid>`, else `$TMPDIR/supermachine-<uid>` — RAM-backed where
//! possible, since the RAM file is guest memory.
//!
//! The base directory must be the user's own and private: in a shared `/dev/shm` another user
//! could otherwise create `supermachine-<uid>` first and meddle with the VMs' sockets and files.
//! One we own is made 0700; one we do not own (or a symlink) is refused with a message.
//!
//! A directory is removed when its [`WorkDir`] drops. An owner that was SIGKILLed cannot do
//! that, so each directory records its owner (pid + process start time) and every new
//! directory first sweeps away those whose owner is gone.
//!
//! A process that ends on purpose (its exit functions, a SIGTERM handler) may still have VMs
//! in flight on other threads: a restore half done, a release not yet run. Waiting for them
//! can outlast the patience of whoever ends the process (Jupyter SIGKILLs a kernel 5 s after
//! asking it to stop), so the process calls [`remove_all_at_exit`] instead: every directory it
//! still has is removed at once and no new one is made. Its QEMUs die with it (they are
//! spawned with a parent-death signal, `qemu.rs`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

const OWNER_FILE: &str = "owner";

/// A per-VM directory, removed on drop.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    keep: bool,
    live: &'static LiveDirs,
}

/// The work dirs of a process that are still in use, and whether the process is ending.
#[derive(Debug, Default)]
pub struct LiveDirs {
    state: Mutex<LiveState>,
}

#[derive(Debug, Default)]
struct LiveState {
    /// Each directory with the pid of the process that made it: a child forked from that
    /// process inherits this list, and must not remove its parent's directories when it exits.
    dirs: HashMap<PathBuf, u32>,
    ending: bool,
}

impl LiveDirs {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes every directory this process made that is still in use, and refuses new ones
    /// from now on; returns how many were removed.
    pub fn remove_all(&self) -> usize {
        let me = std::process::id();
        let mut state = self.lock();
        state.ending = true;
        let dirs: Vec<PathBuf> = state.dirs.drain().filter(|(_, pid)| *pid == me).map(|(d, _)| d).collect();
        for d in &dirs {
            let _ = fs::remove_dir_all(d);
        }
        dirs.len()
    }

    /// How many directories are in use.
    pub fn count(&self) -> usize {
        self.lock().dirs.len()
    }

    fn forget(&self, path: &Path) {
        self.lock().dirs.remove(path);
    }
}

/// This process's work dirs.
pub fn live_dirs() -> &'static LiveDirs {
    static LIVE: OnceLock<LiveDirs> = OnceLock::new();
    LIVE.get_or_init(LiveDirs::default)
}

/// The process is ending: removes the work dirs of every VM it still has (running, being
/// restored, or waiting for a release that will not come) and refuses new VMs. Returns how
/// many directories were removed. Idempotent.
pub fn remove_all_at_exit() -> usize {
    live_dirs().remove_all()
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// The directory all VM work dirs live in.
pub fn base_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        let p = PathBuf::from(x);
        if p.is_dir() {
            return p.join("supermachine");
        }
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.join(format!("supermachine-{}", uid()));
    }
    std::env::temp_dir().join(format!("supermachine-{}", uid()))
}

/// Start time (clock ticks since boot) of process `pid`, from /proc/PID/stat field 22.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn owner_line() -> String {
    let pid = std::process::id();
    format!("{pid} {}", start_time(pid).unwrap_or(0))
}

fn owner_alive(line: &str) -> bool {
    let mut it = line.split_whitespace();
    let (Some(pid), Some(start)) = (it.next().and_then(|p| p.parse::<u32>().ok()), it.next()) else {
        return false;
    };
    match start_time(pid) {
        Some(t) => t.to_string() == start,
        None => false,
    }
}

/// Checks that `base` is a directory (not a symlink) owned by this user, and makes it 0700.
fn make_private(base: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = fs::symlink_metadata(base).map_err(|e| Error::io(format!("inspect {}", base.display()), e))?;
    if !m.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "refusing to keep VM files in {}: it is not a directory (a symlink?); remove it or set \
             XDG_RUNTIME_DIR to a private directory",
            base.display()
        )));
    }
    if m.uid() != uid() {
        return Err(Error::InvalidArgument(format!(
            "refusing to keep VM files in {}: it belongs to uid {}, not to this user ({}); remove \
             it or set XDG_RUNTIME_DIR to a private directory",
            base.display(),
            m.uid(),
            uid()
        )));
    }
    if m.mode() & 0o077 != 0 {
        fs::set_permissions(base, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("make {} private", base.display()), e))?;
    }
    Ok(())
}

/// Removes work dirs whose owner process no longer exists.
pub fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        match fs::read_to_string(p.join(OWNER_FILE)) {
            Ok(line) if owner_alive(&line) => {}
            Ok(_) => {
                let _ = fs::remove_dir_all(&p);
            }
            // No owner file: either being created right now or foreign; leave it unless old.
            Err(_) => {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600);
                if old {
                    let _ = fs::remove_dir_all(&p);
                }
            }
        }
    }
}

impl WorkDir {
    /// Creates a fresh directory `<base>/<prefix>-XXXXXXXX`, after sweeping stale ones.
    pub fn create(prefix: &str) -> Result<WorkDir> {
        Self::create_in(&base_dir(), prefix)
    }

    pub fn create_in(base: &Path, prefix: &str) -> Result<WorkDir> {
        Self::create_listed(base, prefix, live_dirs())
    }

    /// Creates a directory in `base`, listed in `live` until it is removed.
    pub fn create_listed(base: &Path, prefix: &str, live: &'static LiveDirs) -> Result<WorkDir> {
        fs::create_dir_all(base).map_err(|e| Error::io(format!("create {}", base.display()), e))?;
        make_private(base)?;
        sweep_stale(base);
        for _ in 0..16 {
            let rand = crate::conn::entropy();
            let name = format!(
                "{prefix}-{}-{:02x}{:02x}{:02x}{:02x}",
                std::process::id(),
                rand[0],
                rand[1],
                rand[2],
                rand[3]
            );
            let path = base.join(name);
            // Listed before it exists, under the lock `remove_all` takes: a directory made
            // while the process ends is either refused here or removed there.
            let mut state = live.lock();
            if state.ending {
                let e = std::io::Error::other("this process is ending: it starts no new VM");
                return Err(Error::io(format!("create a VM work dir in {}", base.display()), e));
            }
            match fs::create_dir(&path) {
                Ok(()) => {
                    state.dirs.insert(path.clone(), std::process::id());
                    drop(state);
                    let dir = WorkDir { path, keep: false, live };
                    fs::write(dir.join(OWNER_FILE), owner_line())
                        .map_err(|e| Error::io(format!("write {}", dir.join(OWNER_FILE).display()), e))?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(format!("create {}", path.display()), e)),
            }
        }
        Err(Error::InvalidArgument(format!("could not create a unique work dir in {}", base.display())))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Keeps the directory on drop and at exit (debugging).
    pub fn keep(&mut self) {
        self.keep = true;
        self.live.forget(&self.path);
    }

    /// Removes the directory now (idempotent).
    pub fn remove(&self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
            self.live.forget(&self.path);
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_remove_and_sweep() {
        let base = std::env::temp_dir().join(format!("sm-workdir-test-{}", std::process::id()));
        let w = WorkDir::create_in(&base, "vm").unwrap();
        assert!(w.path().is_dir());
        assert!(owner_alive(&fs::read_to_string(w.join(OWNER_FILE)).unwrap()));
        // a dir owned by a dead process is swept by the next create
        let stale = base.join("vm-dead");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join(OWNER_FILE), "999999999 1").unwrap();
        let w2 = WorkDir::create_in(&base, "vm").unwrap();
        assert!(!stale.exists());
        assert!(w.path().is_dir(), "a live owner's dir is kept");
        let p = w.path().to_path_buf();
        drop(w);
        assert!(!p.exists());
        drop(w2);
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn remove_all_at_exit_removes_live_dirs_and_refuses_new_ones() {
        // A registry of its own: the process-wide one is shared with the other tests.
        let live: &'static LiveDirs = Box::leak(Box::default());
        let base = std::env::temp_dir().join(format!("sm-workdir-exit-{}", std::process::id()));
        let a = WorkDir::create_listed(&base, "vm", live).unwrap();
        let b = WorkDir::create_listed(&base, "vm", live).unwrap();
        let mut kept = WorkDir::create_listed(&base, "vm", live).unwrap();
        kept.keep();
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        drop(b);
        assert_eq!(live.count(), 1, "a removed dir is no longer listed");
        // A dir made by the process this one was forked from is not this process's to remove.
        let parents = WorkDir::create_listed(&base, "vm", live).unwrap();
        live.lock().dirs.insert(parents.path().to_path_buf(), std::process::id() + 1);
        // `a` is still held (a restore in flight on another thread, say): removed all the same.
        assert_eq!(live.remove_all(), 1);
        assert!(!pa.exists() && !pb.exists());
        assert!(parents.path().is_dir(), "a parent process's dir was removed");
        drop(parents);
        assert!(kept.path().is_dir(), "a dir kept for debugging stays");
        let err = WorkDir::create_listed(&base, "vm", live).unwrap_err().to_string();
        assert!(err.contains("process is ending"), "{err}");
        assert_eq!(live.remove_all(), 0, "idempotent");
        drop(a); // its late drop finds nothing to remove
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn base_dir_must_be_ours_and_private() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = std::env::temp_dir().join(format!("sm-workdir-private-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let base = root.join("base");
        fs::create_dir_all(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o777)).unwrap();
        let w = WorkDir::create_in(&base, "vm").unwrap();
        assert_eq!(fs::metadata(&base).unwrap().mode() & 0o777, 0o700, "made private");
        drop(w);
        // A symlink planted where the base should be is refused, not followed.
        let elsewhere = root.join("elsewhere");
        fs::create_dir_all(&elsewhere).unwrap();
        let link = root.join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let err = WorkDir::create_in(&link, "vm").unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        // Someone else's directory is refused (only root can make one here to test with).
        if uid() == 0 {
            let theirs = root.join("theirs");
            fs::create_dir_all(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(12345), None).unwrap();
            let err = WorkDir::create_in(&theirs, "vm").unwrap_err().to_string();
            assert!(err.contains("belongs to uid 12345"), "{err}");
        }
        fs::remove_dir_all(&root).unwrap();
    }
}
