//! The content-addressed blob store shared by every OCI image in the cache.
//!
//! ```text
//! <cache>/oci/blobs/sha256/<hex>         verified blobs (layers, configs, manifests)
//! <cache>/oci/partial/sha256-<hex>       a download or import in progress
//! <cache>/oci/locks/<hex>.lock            one downloader per blob
//! ```
//! A blob enters `blobs/` only by [`Store::commit`]: its size and sha256 are checked against
//! the descriptor and the file is renamed into place; on a mismatch the partial file is
//! deleted and nothing is stored. So a blob present under `blobs/` is always verified, and a
//! pull that was interrupted finds the finished blobs there and fetches only the rest (a
//! partial download is resumed by the registry module with a range request).
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

#[derive(Debug)]
pub enum StoreError {
    /// A descriptor's digest is not `sha256:<64 hex>`.
    BadDigest { digest: String },
    /// The blob's content does not hash to its digest.
    DigestMismatch { what: String, expected: String, actual: String },
    /// The blob is shorter than its descriptor says.
    Truncated { what: String, expected: u64, actual: u64 },
    /// The blob is longer than its descriptor says.
    TooLong { what: String, expected: u64 },
    /// A filesystem operation in the store failed (e.g. the disk is full).
    Io { context: String, source: io::Error },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::BadDigest { digest } => write!(
                f,
                "unsupported blob digest {digest:?}: only sha256 digests are accepted"
            ),
            StoreError::DigestMismatch { what, expected, actual } => write!(
                f,
                "{what} is corrupt: its content hashes to {actual}, not {expected}; nothing was \
                 cached. The source is damaged or was tampered with: fetch the image again from \
                 a trusted source"
            ),
            StoreError::Truncated { what, expected, actual } => write!(
                f,
                "{what} is truncated: {actual} of {expected} bytes; nothing was cached. Retry \
                 the pull (a registry download resumes), or re-export a local source"
            ),
            StoreError::TooLong { what, expected } => write!(
                f,
                "{what} is longer than the {expected} bytes its descriptor gives; nothing was \
                 cached. The source is damaged or was tampered with"
            ),
            StoreError::Io { context, source } => {
                write!(f, "{context}: {source}")?;
                if source.raw_os_error() == Some(libc::ENOSPC) {
                    write!(f, " (free disk space, or `supermachine-kernel image prune`, and retry)")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// The hex part of a `sha256:<64 lowercase hex>` digest (also keeps digests out of paths they
/// could escape from).
pub fn sha256_hex(digest: &str) -> Result<&str, StoreError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(hex)
    } else {
        Err(StoreError::BadDigest { digest: digest.to_string() })
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Held while one blob is downloaded.
pub struct BlobLock {
    _file: File,
}

/// The blob store under one cache root.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store of the cache at `cache_root` (created on first use).
    pub fn new(cache_root: &Path) -> Store {
        Store { root: cache_root.join("oci") }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    /// The verified blob `digest`, if the store has it.
    pub fn get(&self, digest: &str) -> Result<Option<PathBuf>, StoreError> {
        let p = self.blob_path(sha256_hex(digest)?);
        Ok(p.is_file().then_some(p))
    }

    /// Where a download of `digest` in progress is kept (its directory exists).
    pub fn partial_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let dir = self.root.join("partial");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        Ok(dir.join(format!("sha256-{}", sha256_hex(digest)?)))
    }

    /// Verifies the finished partial file `partial` against `digest` and `size` and moves it
    /// into the store; on any mismatch it is deleted and nothing is stored.
    pub fn commit(&self, partial: &Path, digest: &str, size: Option<u64>, what: &str)
        -> Result<PathBuf, StoreError>
    {
        let hex_name = sha256_hex(digest)?.to_string();
        let check = (|| {
            let len = fs::metadata(partial).map_err(io_err(format!("reading {}", partial.display())))?.len();
            match size {
                Some(s) if len < s => {
                    return Err(StoreError::Truncated { what: what.into(), expected: s, actual: len })
                }
                Some(s) if len > s => return Err(StoreError::TooLong { what: what.into(), expected: s }),
                _ => {}
            }
            let mut f = File::open(partial).map_err(io_err(format!("reading {}", partial.display())))?;
            let mut h = Sha256::new();
            io::copy(&mut f, &mut h).map_err(io_err(format!("reading {}", partial.display())))?;
            let actual = format!("sha256:{}", hex(&h.finalize()));
            if actual != digest {
                return Err(StoreError::DigestMismatch {
                    what: what.into(),
                    expected: digest.into(),
                    actual,
                });
            }
            f.sync_all().ok();
            Ok(())
        })();
        if let Err(e) = check {
            let _ = fs::remove_file(partial);
            return Err(e);
        }
        let dest = self.blob_path(&hex_name);
        let dir = dest.parent().expect("has parent");
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        fs::rename(partial, &dest).map_err(io_err(format!("storing blob {digest}")))?;
        Ok(dest)
    }

    /// Copies `reader` into the store as `digest` (verified as in [`Store::commit`]); reads at
    /// most one byte more than `size` so an overlong source is refused without reading it all.
    pub fn import(&self, reader: impl Read, digest: &str, size: Option<u64>, what: &str)
        -> Result<PathBuf, StoreError>
    {
        if let Some(p) = self.get(digest)? {
            return Ok(p);
        }
        let partial = self.partial_path(digest)?;
        let written = (|| {
            let mut f = File::create(&partial).map_err(io_err(format!("creating {}", partial.display())))?;
            let mut r: Box<dyn Read> = match size {
                Some(s) => Box::new(reader.take(s + 1)),
                None => Box::new(reader),
            };
            io::copy(&mut r, &mut f).map_err(io_err(format!("copying {what} into the store")))?;
            f.flush().map_err(io_err(format!("writing {}", partial.display())))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
        self.commit(&partial, digest, size, what)
    }

    /// An exclusive lock on downloading `digest` (two pulls sharing a layer take turns; the
    /// second then finds it stored). Released on drop, or by the kernel if the process dies.
    pub fn lock(&self, digest: &str) -> Result<BlobLock, StoreError> {
        use std::os::unix::io::AsRawFd;
        let dir = self.root.join("locks");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let path = dir.join(format!("{}.lock", sha256_hex(digest)?));
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(BlobLock { _file: f });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err(format!("locking {}", path.display()))(e));
            }
        }
    }

    /// Reads a small verified blob (manifest, config) whole, refusing more than `max` bytes.
    pub fn read_small(&self, path: &Path, max: usize) -> Result<Vec<u8>, StoreError> {
        let mut v = Vec::new();
        File::open(path)
            .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut v))
            .map_err(io_err(format!("reading {}", path.display())))?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smk-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_verified_blobs_enter() {
        let d = tmp("verify");
        let s = Store::new(&d);
        let digest = digest_of(b"hello");
        let p = s.import(&b"hello"[..], &digest, Some(5), "blob").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        assert_eq!(s.get(&digest).unwrap(), Some(p));
        let other = digest_of(b"other");
        let e = s.import(&b"tampered"[..], &other, None, "layer 1").unwrap_err();
        assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
        assert!(e.to_string().contains("layer 1 is corrupt"), "{e}");
        let e = s.import(&b"oth"[..], &other, Some(5), "layer 2").unwrap_err();
        assert!(matches!(e, StoreError::Truncated { expected: 5, actual: 3, .. }), "{e}");
        let e = s.import(&b"other-and-more"[..], &other, Some(5), "layer 3").unwrap_err();
        assert!(matches!(e, StoreError::TooLong { .. }), "{e}");
        assert_eq!(s.get(&other).unwrap(), None);
        assert_eq!(fs::read_dir(d.join("oci/partial")).unwrap().count(), 0, "partials removed");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn digests_cannot_name_paths() {
        let s = Store::new(Path::new("/nonexistent"));
        for bad in ["sha256:../../etc/passwd", "md5:abc", &format!("sha256:{}", "A".repeat(64))] {
            assert!(matches!(s.get(bad), Err(StoreError::BadDigest { .. })), "{bad}");
        }
    }
}
