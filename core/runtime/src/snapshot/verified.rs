//! [`Snapshot`]: a snapshot directory that was verified and can be restored, and the memory
//! of which directories were verified.
//!
//! Snapshots are verified (checksums of every file, [`super::format::load`]) once, not on
//! every restore, because reading the memory file would cost more than the restore itself.
//! The verification is remembered per process, and across processes by a stamp of the
//! files' inode/size/mtime ([`dir_stamp`]) kept in the runtime dir.
//!
//! Invariant: any write to a snapshot's files changes its stamp, so a remembered
//! verification never covers files changed after it.
//!
//! Errors: the crate's [`Error`] (`Snapshot` for a missing directory, and what
//! [`super::SnapshotError`] converts to).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::snapshot::format as fmt;
use crate::snapshot::SnapshotMeta;

/// A snapshot directory, verified (once per process and path+mtime) and ready to restore.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub meta: SnapshotMeta,
}

fn verified_cache() -> &'static Mutex<HashMap<PathBuf, (String, SnapshotMeta)>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, (String, SnapshotMeta)>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// What changes when any file of snapshot `dir` is rewritten or damaged: inode, size and
/// mtime of its metadata, state and memory files.
pub fn dir_stamp(dir: &Path) -> String {
    let s = |name: &str| {
        fs::metadata(dir.join(name)).map(|m| format!("{}:{}:{}.{}", m.ino(), m.len(), m.mtime(), m.mtime_nsec())).unwrap_or_default()
    };
    format!("{}|{}|{}", s(fmt::METADATA_FILE), s(fmt::STATE_FILE), s(fmt::MEMORY_FILE))
}

/// Where the verification stamp of snapshot `dir` is kept (per user, in the runtime dir).
fn stamp_path(dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let h: String = Sha256::digest(dir.as_os_str().as_encoded_bytes()).iter().take(16).map(|b| format!("{b:02x}")).collect();
    crate::workdir::base_dir().join("verified").join(h)
}

impl Snapshot {
    /// Reads and verifies a snapshot (checksums of every file). Verification is remembered
    /// for this process while the files are unchanged, so repeated opens are cheap.
    pub fn open(dir: &Path) -> Result<Snapshot> {
        let dir = fs::canonicalize(dir).map_err(|_| {
            Error::Snapshot(format!("snapshot {} does not exist", dir.display()))
        })?;
        let stamp = dir_stamp(&dir);
        if let Some((s, meta)) = verified_cache().lock().unwrap_or_else(|e| e.into_inner()).get(&dir) {
            if *s == stamp {
                return Ok(Snapshot { dir, meta: meta.clone() });
            }
        }
        // A stamp left by an earlier full verification (same files: inode, size, mtime) lets
        // us trust the checksums without reading the memory file again. Any write to a file
        // changes its stamp, so damage after verification is still caught.
        let stamp_file = stamp_path(&dir);
        let meta = match fs::read_to_string(&stamp_file) {
            Ok(s) if s == stamp => fmt::read_meta(&dir)?,
            _ => {
                let meta = fmt::load(&dir)?;
                if let Some(parent) = stamp_file.parent() {
                    let _ = fs::create_dir_all(parent);
                }
                let _ = fs::write(&stamp_file, &stamp);
                meta
            }
        };
        verified_cache().lock().unwrap_or_else(|e| e.into_inner()).insert(dir.clone(), (stamp, meta.clone()));
        Ok(Snapshot { dir, meta })
    }

}

/// Remembers `meta` as the verified metadata of snapshot `dir` (one this process just wrote
/// and committed, so its checksums are known good) and returns it as a [`Snapshot`].
pub(super) fn remember_verified(dir: PathBuf, meta: SnapshotMeta) -> Snapshot {
    let stamp = dir_stamp(&dir);
    let stamp_file = stamp_path(&dir);
    if let Some(parent) = stamp_file.parent() {
        let _ = fs::create_dir_all(parent);
    }
    let _ = fs::write(&stamp_file, &stamp);
    verified_cache().lock().unwrap_or_else(|e| e.into_inner()).insert(dir.clone(), (stamp, meta.clone()));
    Snapshot { dir, meta }
}
