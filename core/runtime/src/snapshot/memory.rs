//! The snapshot's memory file: writing guest RAM into it sparsely and warming the page cache
//! with it.
//!
//! * [`copy_sparse`] copies a template VM's shared RAM file (reading only its data extents,
//!   `SEEK_DATA`/`SEEK_HOLE`).
//! * `MemoryFileSink` receives main-RAM pages split out of QEMU's migration stream (see
//!   [`super::migration_stream`]) or from [`copy_sparse`]; adjacent pages go out in one write on a writer
//!   thread.
//! * [`prefetch_memory`] pulls a memory file into the page cache ahead of a snapshot of a VM
//!   restored from it.
//! * [`explain_no_space`] turns the failure of a snapshot whose disk filled up (QEMU only says
//!   "Unable to write to command: Broken pipe") into a message saying where and how much.
//!
//! Invariants: every all-zero 4 KiB page stays a hole (guest RAM is mostly zero); the digest
//! computed on the way equals [`super::format::digest_file`] of the result, and when pages
//! arrive out of order the file itself is digested instead. The memory file of a snapshot is
//! never written after its commit: restores map it private copy-on-write.
//!
//! Errors: the crate's [`Error`] (`Io`, with what was being copied); the sink
//! speaks `std::io::Error` as [`PageSink`] requires.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::snapshot::format as fmt;
use crate::snapshot::migration_stream::{PageSink, PAGE_SIZE};

/// Copies `src` to `dst` leaving every all-zero 4 KiB page a hole (guest RAM is mostly zero),
/// through the same `MemoryFileSink` as split snapshots. Returns the bytes of data written and
/// the copy's digest (so committing the snapshot need not read the copy again).
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<(u64, fmt::FileDigest)> {
    use std::os::unix::io::AsRawFd;
    let ctx = |what: &str| format!("{what} while copying guest memory {} → {}", src.display(), dst.display());
    let f = fs::File::open(src).map_err(|e| Error::io(ctx("open"), e))?;
    let size = f.metadata().map_err(|e| Error::io(ctx("stat"), e))?.len();
    let out = fs::OpenOptions::new().write(true).create_new(true).open(dst).map_err(|e| Error::io(ctx("create"), e))?;
    out.set_len(size).map_err(|e| Error::io(ctx("size"), e))?;
    let mut sink = MemoryFileSink::new(out).map_err(|e| Error::io(ctx("start the writer"), e))?;
    let fd = f.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let copied = (|| -> Result<()> {
        while pos < size {
            // SAFETY: lseek on our open fd; errors are handled below.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: only a hole remains (EINVAL would mean no SEEK_DATA: tmpfs has it)
            }
            let start = data as u64;
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
            let end = if hole < 0 { size } else { (hole as u64).min(size) };
            let mut off = start;
            while off < end {
                let n = ((end - off) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], off).map_err(|e| Error::io(ctx("read"), e))?;
                for (i, page) in buf[..n].chunks(PAGE_SIZE).enumerate() {
                    sink.page(off + (i * PAGE_SIZE) as u64, page).map_err(|e| Error::io(ctx("write"), e))?;
                }
                off += n as u64;
            }
            pos = end;
        }
        Ok(())
    })();
    let finished = sink.finish().map_err(|e| Error::io(ctx("write"), e));
    copied?;
    finished?;
    let digest = match sink.next {
        Some(_) => fmt::digest_from(&sink.hash, size),
        None => fmt::digest_file(dst)?,
    };
    Ok((sink.written, digest))
}

/// Writes main-RAM pages from a split stream into a sparse memory file (zero pages stay
/// holes; adjacent pages go out in one write, on a writer thread so writing overlaps reading
/// the stream) and digests them as [`fmt::digest_file`] would.
pub(super) struct MemoryFileSink {
    run_at: u64,
    run: Vec<u8>,
    pub(super) hash: xxhash_rust::xxh3::Xxh3,
    /// Next offset the digest expects; None once pages came out of order (digest the file).
    pub(super) next: Option<u64>,
    /// Bytes of non-zero pages handed to the writer.
    written: u64,
    to_writer: Option<std::sync::mpsc::SyncSender<(u64, Vec<u8>)>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

const SINK_RUN: usize = 1 << 20;

impl MemoryFileSink {
    pub(super) fn new(file: fs::File) -> std::io::Result<MemoryFileSink> {
        let (to_writer, runs) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(8);
        let (give_back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        let writer = std::thread::Builder::new().name("snapshot-write".into()).spawn(move || {
            for (at, mut run) in runs {
                file.write_all_at(&run, at)?;
                run.clear();
                let _ = give_back.send(run);
            }
            Ok(())
        })?;
        Ok(MemoryFileSink {
            run_at: 0,
            run: Vec::with_capacity(SINK_RUN),
            hash: Default::default(),
            next: Some(0),
            written: 0,
            to_writer: Some(to_writer),
            spare,
            writer: Some(writer),
        })
    }

    fn flush_run(&mut self) -> std::io::Result<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        let fresh = self.spare.try_recv().unwrap_or_else(|_| Vec::with_capacity(SINK_RUN));
        let run = std::mem::replace(&mut self.run, fresh);
        let sent = self.to_writer.as_ref().map(|tx| tx.send((self.run_at, run)).is_ok()).unwrap_or(false);
        if sent {
            Ok(())
        } else {
            self.finish() // the writer stopped: report its error
                .and(Err(std::io::Error::other("the memory file writer stopped")))
        }
    }

    /// Writes what is pending and waits for the writer.
    pub(super) fn finish(&mut self) -> std::io::Result<()> {
        if !self.run.is_empty() && self.to_writer.is_some() {
            self.flush_run()?;
        }
        self.to_writer = None;
        match self.writer.take() {
            Some(w) => w.join().unwrap_or_else(|_| Err(std::io::Error::other("the memory file writer panicked"))),
            None => Ok(()),
        }
    }
}

impl PageSink for MemoryFileSink {
    fn page(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.next = match self.next {
            Some(n) if offset >= n => Some(offset + data.len() as u64),
            _ => None,
        };
        let zero = fmt::is_zero_page(data);
        if self.next.is_some() && !zero {
            fmt::mix_nonzero_page(&mut self.hash, offset, data);
        }
        if zero && self.next.is_some() {
            return Ok(()); // first visit of this page: the file already reads as zeros there
        }
        let adjacent = self.run_at + self.run.len() as u64 == offset;
        if !adjacent || self.run.len() + data.len() > SINK_RUN {
            self.flush_run()?;
        }
        if self.run.is_empty() {
            self.run_at = offset;
        }
        self.run.extend_from_slice(data);
        if !zero {
            self.written += data.len() as u64;
        }
        Ok(())
    }
}

/// Bytes free for an unprivileged user on the filesystem holding `dir`, and its mount point.
fn free_space(dir: &Path) -> Option<(u64, std::path::PathBuf)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we pass; `c` is a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let mut mount = fs::canonicalize(dir).ok()?;
    let dev = fs::metadata(&mount).ok()?.dev();
    while let Some(up) = mount.parent().filter(|p| fs::metadata(p).map(|m| m.dev() == dev).unwrap_or(false)) {
        mount = up.to_path_buf();
    }
    Some((st.f_bavail as u64 * st.f_frsize as u64, mount))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// `err`, from taking snapshot `dest` of a VM with `ram_mib` MiB of RAM, as a message saying
/// the disk is full, where, and how much the snapshot needs, when that is why it failed;
/// otherwise `err` unchanged. Call it once the partial snapshot is removed, so the free space
/// reported is what the user has. `ram_file`: the VM's shared RAM file (a cold-booted VM),
/// whose allocated size is what the memory file needs; without it (a restored VM, whose RAM
/// QEMU streams), the guest's RAM size bounds it.
pub fn explain_no_space(err: Error, dest: &Path, ram_mib: u32, ram_file: Option<&Path>) -> Error {
    let text = err.to_string();
    let enospc = matches!(&err, Error::Io { kind: std::io::ErrorKind::StorageFull, .. })
        || text.contains("No space left on device")
        || text.contains("os error 28");
    // QEMU's exec: migration reports only the broken pipe once `cat > state` died of ENOSPC.
    let write_failed = text.contains("Unable to write") || text.contains("Broken pipe");
    let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) else { return err };
    let Some((free, mount)) = free_space(dir) else { return err };
    let ram = u64::from(ram_mib) << 20;
    let state = 1u64 << 20; // the device state: ~60 KB, rounded up generously
    let (need, what) = match ram_file.and_then(|f| fs::metadata(f).ok()) {
        Some(m) => {
            let need = (m.blocks() * 512).min(ram) + state;
            (need, format!("about {}", mib(need)))
        }
        None => (ram + state, format!("up to {} (its {ram_mib} MiB of RAM, less the pages it never used, plus the device state)", mib(ram + state))),
    };
    if !(enospc || (write_failed && free < need)) {
        return err;
    }
    Error::Snapshot(format!(
        "no space left on the disk for snapshot {}: the filesystem holding {} (mounted at {}) has {} free, \
         and a snapshot of this VM needs {what}; free space there (delete old snapshots) or keep snapshots \
         on another disk",
        dest.display(),
        dir.display(),
        mount.display(),
        mib(free),
    ))
}

/// Has the page cache take in snapshot `dir`'s memory file, holes included, on a background
/// thread (once per file and process). A snapshot of a VM restored from that file reads every
/// page; each hole met uncached costs a page fault that allocates and zeroes a cache page
/// (~0.4 s for 700 MiB of holes in a 1 GiB guest, measured with perf). Populating a read-only
/// shared mapping does that work ahead, off the snapshot's path (fadvise WILLNEED is capped at
/// the readahead window). The pages are clean cache, reclaimable under memory pressure.
pub fn prefetch_memory(dir: &Path) {
    use std::os::unix::io::AsRawFd;
    static DONE: OnceLock<Mutex<std::collections::HashSet<(u64, u64, i64)>>> = OnceLock::new();
    let path = dir.join(fmt::MEMORY_FILE);
    let Ok(meta) = fs::metadata(&path) else { return };
    let key = (meta.dev(), meta.ino(), meta.mtime());
    if meta.len() == 0 || !DONE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner()).insert(key) {
        return;
    }
    let _ = std::thread::Builder::new().name("memory-prefetch".into()).spawn(move || {
        let Ok(f) = fs::File::open(&path) else { return };
        let len = meta.len() as usize;
        // SAFETY: a fresh read-only shared mapping of a file we opened, unmapped right away;
        // nothing reads through the pointer.
        unsafe {
            let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_POPULATE, f.as_raw_fd(), 0);
            if p != libc::MAP_FAILED {
                libc::munmap(p, len);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_is_explained_only_when_the_disk_is_the_cause() {
        let dir = std::env::temp_dir().join(format!("sm-nospace-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("snap");
        let full = Error::io("write", std::io::Error::from_raw_os_error(libc::ENOSPC));
        let e = explain_no_space(full, &dest, 256, None).to_string();
        assert!(e.contains("no space left on the disk") && e.contains(&dir.display().to_string()), "{e}");
        assert!(e.contains("up to 257.0 MiB") && e.contains("free"), "{e}");
        // a broken pipe with plenty of room (this VM's RAM is tiny) is not a full disk
        let e = explain_no_space(Error::Snapshot("Unable to write to command: Broken pipe".into()), &dest, 1, None);
        assert_eq!(e.to_string(), "Unable to write to command: Broken pipe");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sparse_copy_keeps_zero_pages_as_holes() {
        let dir = std::env::temp_dir().join(format!("sm-sparse-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        let f = fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 10], 4096 * 3 + 5).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 8 << 20).unwrap(); // explicit zeros: must become a hole
        f.write_all_at(&[2u8; 8192], 40 << 20).unwrap();
        drop(f);
        let dst = dir.join("dst");
        let (written, digest) = copy_sparse(&src, &dst).unwrap();
        assert_eq!(written, 4096 + 8192);
        assert_eq!(digest, fmt::digest_file(&dst).unwrap());
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        let blocks = fs::metadata(&dst).unwrap().blocks();
        assert!(blocks * 512 < 1 << 20, "destination is not sparse: {} bytes allocated", blocks * 512);
        assert_eq!(fmt::digest_file(&src).unwrap(), fmt::digest_file(&dst).unwrap());
        let _ = fs::remove_dir_all(&dir);
    }
}
