//! The on-disk cache: where it lives, locks, atomic publication, manifests, listing, removal.
//!
//! ```text
//! $SUPERMACHINE_CACHE_DIR | $XDG_CACHE_HOME/supermachine-kernel | ~/.cache/supermachine-kernel
//! ├── images/<name>/<recipe-hash>/{rootfs.erofs, manifest.json, build.log}
//! ├── kernels/<release>_<package-version>/{vmlinuz, config, kernel.json, modules/<m>.ko, modules/order}
//! ├── initramfs/<hash of agent + modules>/initrd.img
//! ├── logs/<what>.log         output of the last build's tools
//! ├── locks/<what>.lock       flock(2) files; a second builder waits for the first
//! └── tmp/                    build trees (removed after each build, stale ones at the next)
//! ```
//! Every entry is built under a `.tmp-*` name next to its final place and renamed into place in
//! one step, so an interrupted build never leaves a half entry behind; an entry exists iff its
//! final directory exists.
use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::{ImageError, Result};
use super::tools::Progress;

/// Bump when the manifest's meaning changes incompatibly.
pub const MANIFEST_FORMAT: u32 = 1;

/// The cache root: `explicit`, else `$SUPERMACHINE_CACHE_DIR`, else the XDG cache directory.
pub fn cache_root(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("SUPERMACHINE_CACHE_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("supermachine-kernel")
}

pub fn images_dir(root: &Path) -> PathBuf {
    root.join("images")
}

/// The build log of `what`, under `root/logs/` (kept after a failed build so the error can point
/// at it); truncated when a new build of the same thing starts.
pub fn log_path(root: &Path, what: &str) -> PathBuf {
    let dir = root.join("logs");
    let _ = fs::create_dir_all(&dir);
    dir.join(format!("{what}.log"))
}

pub fn mkdirs(p: &Path) -> Result<()> {
    fs::create_dir_all(p).map_err(ImageError::io(format!("creating {}", p.display())))
}

/// An exclusive flock(2) on `root/locks/<key>.lock`, released on drop (and by the kernel if the
/// process dies).
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn acquire(root: &Path, key: &str, progress: &Progress) -> Result<Lock> {
        let dir = root.join("locks");
        mkdirs(&dir)?;
        let path = dir.join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::io(format!("opening lock {}", path.display())))?;
        let fd = file.as_raw_fd();
        // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            progress.note(&format!("waiting for another build ({})", path.display()));
            loop {
                // SAFETY: as above; blocking variant.
                if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(ImageError::Io { context: format!("locking {}", path.display()), source: e });
                }
            }
        }
        Ok(Lock { _file: file })
    }
}

/// Builds hold this shared while they run; a prune sweep needs it exclusive ([`try_exclusive`]).
/// Best effort: None when the lock file cannot be opened (a read-only cache).
pub fn shared(root: &Path, key: &str) -> Option<Lock> {
    flock(root, key, libc::LOCK_SH)
}

/// The exclusive lock `key`, if nobody holds it (never waits).
pub fn try_exclusive(root: &Path, key: &str) -> Option<Lock> {
    flock(root, key, libc::LOCK_EX | libc::LOCK_NB)
}

fn flock(root: &Path, key: &str, op: libc::c_int) -> Option<Lock> {
    let dir = root.join("locks");
    fs::create_dir_all(&dir).ok()?;
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(format!("{key}.lock"))).ok()?;
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Some(Lock { _file: file });
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
        }
    }
}

/// Removes a build tree, first detaching anything still mounted inside it (a killed mmdebstrap
/// can leave /proc or /sys mounted in its chroot); refuses if a mount cannot be detached, so we
/// never delete through a mount into the host.
pub fn remove_tree(path: &Path) -> Result<()> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = mounts_under(&canon);
    for m in mounts.iter().rev() {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: c is a valid NUL-terminated path; MNT_DETACH only unlinks the mount.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    if let Some(m) = mounts_under(&canon).first() {
        return Err(ImageError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("{} is still mounted inside it; unmount it and retry", m.display()),
        });
    }
    let r = if fs::symlink_metadata(path).map(|m| m.is_dir()).unwrap_or(false) {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    r.map_err(ImageError::io(format!("removing {}", path.display())))
}

/// Mount points at or below `dir`, shallowest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| p.components().count());
    v
}

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes leftovers of interrupted builds named `<prefix>*` in `dir` (call with the lock held).
pub fn remove_stale(dir: &Path, prefix: &str) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = remove_tree(&e.path());
            }
        }
    }
}

/// Renames a finished temporary entry into place.
pub fn publish(tmp: &Path, final_: &Path) -> Result<()> {
    fs::rename(tmp, final_).map_err(ImageError::io(format!(
        "moving {} to {}",
        tmp.display(),
        final_.display()
    )))
}

/// Marks an image version as used now (`<dir>/last-used`'s mtime); errors are ignored (a
/// read-only cache still works, it only prunes less precisely).
pub fn touch_used(dir: &Path) {
    let _ = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("last-used"))
        .and_then(|f| f.set_modified(SystemTime::now()));
}

/// When a version was last used: `last-used`'s mtime, else its manifest's.
pub fn last_used(dir: &Path) -> Option<SystemTime> {
    fs::metadata(dir.join("last-used"))
        .or_else(|_| fs::metadata(dir.join("manifest.json")))
        .and_then(|m| m.modified())
        .ok()
}

/// Removes the versions in `name_dir` other than `keep` that were not used for `unused_for`.
///
/// The versions of one name are rebuilds of one thing (a recipe or directory that changed, an
/// OCI tag that moved, a package list that resolved to newer pins), so the newest replaces the
/// others once they are unused. Different things must therefore never share a name: an OCI
/// image with a package list is named after the list too (`oci::image_name`), so kernelspecs
/// on one base image with different packages never remove each other's image here (nor in
/// `image prune`, whose rules go by name as well).
pub fn prune_unused(name_dir: &Path, keep: &str, unused_for: std::time::Duration) {
    let Ok(rd) = fs::read_dir(name_dir) else { return };
    let now = SystemTime::now();
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n == keep || n.starts_with('.') {
            continue;
        }
        let stale = last_used(&e.path())
            .map(|t| now.duration_since(t).unwrap_or_default() >= unused_for)
            .unwrap_or(true);
        if stale {
            let _ = remove_tree(&e.path());
        }
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `manifest.json` of one image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub hash: String,
    /// `recipe:<name>` or `dir:<path>`.
    pub source: String,
    pub recipe: Option<serde_json::Value>,
    pub created_unix: u64,
    /// Guest Python version (e.g. "3.11.2"), if the image has python3.
    pub python_version: Option<String>,
    /// The kernel directory name under `kernels/` this image boots with.
    pub kernel: Option<String>,
    pub rootfs_bytes: u64,
    /// Build step → seconds.
    pub timings: Vec<(String, f64)>,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest> {
        let text =
            fs::read_to_string(path).map_err(ImageError::io(format!("reading {}", path.display())))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| ImageError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(ImageError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("manifest format {} (expected {MANIFEST_FORMAT})", m.format),
            });
        }
        Ok(m)
    }

    /// Writes atomically (temp file + rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("manifest serializes");
        fs::write(&tmp, text).map_err(ImageError::io(format!("writing {}", tmp.display())))?;
        publish(&tmp, path)
    }
}

/// One cached image as listed by [`list`].
#[derive(Clone, Debug)]
pub struct CachedImage {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    pub manifest: Manifest,
}

/// Every complete image in the cache, sorted by name then newest first.
pub fn list(root: &Path) -> Vec<CachedImage> {
    let mut out = Vec::new();
    let Ok(names) = fs::read_dir(images_dir(root)) else { return out };
    for n in names.flatten() {
        if n.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(hashes) = fs::read_dir(n.path()) else { continue };
        for h in hashes.flatten() {
            if h.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let dir = h.path();
            let rootfs = dir.join("rootfs.erofs");
            if let (Ok(manifest), true) = (Manifest::read(&dir.join("manifest.json")), rootfs.is_file()) {
                out.push(CachedImage { dir, rootfs, manifest });
            }
        }
    }
    out.sort_by(|a, b| {
        a.manifest
            .name
            .cmp(&b.manifest.name)
            .then(b.manifest.created_unix.cmp(&a.manifest.created_unix))
    });
    out
}

/// Names of the images in the cache.
pub fn names(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = list(root).into_iter().map(|c| c.manifest.name).collect();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smk-cache-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn fake_image(root: &Path, name: &str, hash: &str, created: u64) {
        let d = images_dir(root).join(name).join(hash);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("rootfs.erofs"), b"x").unwrap();
        Manifest {
            format: MANIFEST_FORMAT,
            name: name.into(),
            hash: hash.into(),
            source: "dir:/x".into(),
            recipe: None,
            created_unix: created,
            python_version: None,
            kernel: None,
            rootfs_bytes: 1,
            timings: vec![],
        }
        .write(&d.join("manifest.json"))
        .unwrap();
    }

    #[test]
    fn list_sorts_by_name_then_newest() {
        let root = tmp("list");
        fake_image(&root, "b", "1111", 5);
        fake_image(&root, "a", "2222", 5);
        fake_image(&root, "a", "3333", 9);
        fs::create_dir_all(images_dir(&root).join("a/.tmp-4444-1")).unwrap();
        let l = list(&root);
        let ids: Vec<_> = l.iter().map(|c| (c.manifest.name.as_str(), c.manifest.hash.as_str())).collect();
        assert_eq!(ids, [("a", "3333"), ("a", "2222"), ("b", "1111")]);
        assert_eq!(names(&root), ["a", "b"]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn lock_is_exclusive_across_handles() {
        let root = tmp("lock");
        let p = Progress::new("test", false);
        let l = Lock::acquire(&root, "k", &p).unwrap();
        let f = OpenOptions::new().write(true).open(root.join("locks/k.lock")).unwrap();
        // SAFETY: flock on our own descriptor.
        assert_ne!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        drop(l);
        let a = shared(&root, "c").unwrap();
        let b = shared(&root, "c").unwrap();
        assert!(try_exclusive(&root, "c").is_none());
        drop((a, b));
        assert!(try_exclusive(&root, "c").is_some());
        // SAFETY: as above.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn prune_keeps_recently_used_versions() {
        let root = tmp("prune");
        fake_image(&root, "a", "old", 1);
        fake_image(&root, "a", "recent", 2);
        fake_image(&root, "a", "new", 3);
        let dir = images_dir(&root).join("a");
        let day_ago = SystemTime::now() - std::time::Duration::from_secs(2 * 86400);
        for h in ["old", "recent"] {
            touch_used(&dir.join(h));
        }
        File::options().write(true).open(dir.join("old/last-used")).unwrap().set_modified(day_ago).unwrap();
        prune_unused(&dir, "new", std::time::Duration::from_secs(86400));
        let mut left: Vec<_> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        left.sort();
        assert_eq!(left, ["new", "recent"]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn cache_root_precedence() {
        assert_eq!(cache_root(Some(Path::new("/x"))), PathBuf::from("/x"));
    }

    #[test]
    fn mount_paths_unescape() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
