//! The on-disk snapshot format: a directory written atomically and verified on load.
//!
//! ```text
//! <snapshot>/
//!   metadata.json   format name + version, memory/vcpus/accelerator, QEMU version,
//!                   command-line fingerprint, image file hashes, file sizes and checksums,
//!                   kind (template | full | incremental), parent, base (incremental
//!                   only), free-form labels
//!   memory          guest RAM (sparse file; `template` snapshots only)
//!   state           QEMU device state (the migration stream; for `incremental`, also the
//!                   RAM pages that differ from the base snapshot's memory file)
//!   base-memory     `incremental` only, when the filesystem allows: a hard link to the
//!                   base's memory file, so deleting or replacing the base loses nothing
//! ```
//!
//! Writing: the caller fills a [`PendingSnapshot`] (a temporary sibling directory), then
//! [`PendingSnapshot::commit`] checksums the files, writes `metadata.json`, makes every file
//! read-only (0444) and renames the directory into place. An interrupted write leaves only a
//! `.tmp-*` directory, never a half snapshot under the final name.
//!
//! Stored snapshots are immutable in practice: nothing here opens a committed snapshot's file
//! for writing, and their read-only mode makes an in-place write by another tool of a user
//! other than root fail (restores map `memory` private copy-on-write, so a rewrite in place
//! would change what running guests see). The directory stays writable by its owner so that
//! deleting a snapshot keeps working; root, or an owner who chmods first, can still write.
//!
//! Loading: [`load`] refuses, with a message naming the problem, anything that would restore
//! into a hang or a silently broken guest: a newer/older format, missing or truncated files,
//! checksum mismatches, a different command-line fingerprint, accelerator, QEMU version or
//! image. Checksums use xxh3-128 over the file's non-zero 4 KiB pages and their offsets, read
//! from data extents only (holes skipped): verifying a sparse 256 MiB memory file that holds
//! 60 MiB of data reads only those 60 MiB, and a copy that filled the holes still verifies.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

pub const FORMAT_NAME: &str = "supermachine-snapshot";
pub const FORMAT_VERSION: u32 = 1;
pub const METADATA_FILE: &str = "metadata.json";
pub const MEMORY_FILE: &str = "memory";
pub const STATE_FILE: &str = "state";
/// An incremental snapshot's hard link to its base's memory file (when the filesystem allows).
pub const BASE_PIN_FILE: &str = "base-memory";
/// metadata.json larger than this is refused unread.
const MAX_METADATA_BYTES: u64 = 1 << 20;

/// How guest RAM is stored.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// RAM lives in `memory` (mapped copy-on-write on restore), `state` holds devices only.
    Template,
    /// RAM is inside the migration stream in `state`; there is no `memory` file.
    Full,
    /// RAM is the `base` snapshot's memory file (mapped copy-on-write on restore) with the
    /// pages that differ from it, which `state` carries; there is no `memory` file.
    Incremental,
}

/// The template snapshot an incremental snapshot's RAM builds on, as it was when the
/// incremental one was taken; restore refuses a base that is gone or changed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseRef {
    /// The base snapshot's directory (absolute).
    pub dir: PathBuf,
    /// The base's memory-file digest, as its metadata recorded it.
    pub memory: FileDigest,
    /// Device, inode, size and mtime of the base's memory file (the file the VM mapped).
    pub memory_stamp: String,
    /// `base-memory` in the snapshot is a hard link to that file.
    #[serde(default)]
    pub pinned: bool,
}

/// Hash and size of one file of the snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    pub xxh3_128: String,
}

/// What the snapshot was taken from; must match at restore.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineIdentity {
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: String,
    pub qemu_version: String,
    /// sha256 of the QEMU arguments that shape the guest (paths of per-VM files normalised).
    pub cmdline_fingerprint: String,
    /// Those arguments themselves, so a fingerprint mismatch can name the option (and the
    /// metadata field) that differs. Absent from snapshots of older versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmdline: Vec<String>,
    /// Content hashes of the image files (as recorded by the image cache).
    pub kernel_hash: String,
    pub initrd_hash: String,
    pub rootfs_hash: String,
}

/// Contents of metadata.json.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub format: String,
    pub version: u32,
    pub kind: SnapshotKind,
    pub created_unix_ms: u64,
    pub machine: MachineIdentity,
    /// Absolute paths of the image files this snapshot runs on.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub state: FileDigest,
    pub memory: Option<FileDigest>,
    /// Name or path of the snapshot this one was taken from, if any (lineage).
    pub parent: Option<String>,
    /// What an `incremental` snapshot's RAM builds on (None for the other kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
    /// Free-form facts (image name, warmup tag, guest boot id, …).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Why a snapshot cannot be written or used.
#[derive(Debug)]
pub enum SnapshotError {
    /// Filesystem failure while reading or writing the snapshot.
    Io { path: PathBuf, source: io::Error },
    /// The directory is not a snapshot or is damaged.
    Corrupt { path: PathBuf, reason: String },
    /// The snapshot is fine but was taken on a different machine configuration.
    Mismatch { path: PathBuf, what: &'static str, snapshot: String, here: String },
    /// The destination exists already.
    Exists { path: PathBuf },
    /// The QEMU command line a restore would use differs from the one the snapshot was taken
    /// with, in `option` (whose value comes from metadata.json's `field`).
    CommandLine { path: PathBuf, option: String, field: &'static str, snapshot: String, here: String },
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Io { path, source } => write!(f, "snapshot I/O error at {}: {source}", path.display()),
            SnapshotError::Corrupt { path, reason } => write!(
                f,
                "snapshot {} is corrupt or incomplete: {reason}; delete it and take the snapshot again",
                path.display()
            ),
            SnapshotError::Mismatch { path, what, snapshot, here } => write!(
                f,
                "snapshot {} cannot be restored here: it was taken with {what} {snapshot}, this host uses {here}; \
                 restore it with the same configuration or rebuild it",
                path.display()
            ),
            SnapshotError::Exists { path } => {
                write!(f, "a snapshot already exists at {}; choose another name or delete it first", path.display())
            }
            SnapshotError::CommandLine { path, option, field, snapshot, here } => write!(
                f,
                "snapshot {} cannot be restored: it was taken with QEMU option {option} {snapshot}, and restoring it \
                 would use {option} {here}, from metadata.json's {field}; if metadata.json was edited, put the \
                 original value back, else take the snapshot again with this version",
                path.display()
            ),
        }
    }
}

impl std::error::Error for SnapshotError {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

/// Makes a snapshot file read-only (0444); a file the snapshot does not have is skipped.
fn make_read_only(path: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::PermissionsExt;
    match fs::set_permissions(path, fs::Permissions::from_mode(0o444)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(io_err(path)),
    }
}

/// The option a difference at `args[i]` belongs to, and the metadata.json field its value
/// comes from.
fn option_at(args: &[String], i: usize) -> (String, &'static str) {
    let (option, value) = match args[i].starts_with('-') {
        true => (args[i].as_str(), args.get(i + 1).map(String::as_str).unwrap_or("")),
        false => (if i > 0 { args[i - 1].as_str() } else { "" }, args[i].as_str()),
    };
    let field = match option {
        "-m" => "machine.memory_mib",
        "-object" if value.starts_with("memory-backend") => "machine.memory_mib",
        "-smp" => "machine.vcpus",
        "-kernel" => "kernel",
        "-initrd" => "initrd",
        "-drive" => "rootfs",
        "-append" => "labels.append (or labels.tsc_khz)",
        "-accel" | "-cpu" => "machine.accel",
        _ => "the runtime's QEMU configuration (no single field)",
    };
    (option.to_string(), field)
}

/// The first option in which `here` differs from `snap`, when `snap` is the command line that
/// hashes to `fingerprint` (so the recorded arguments were not edited themselves).
fn command_line_difference(dir: &Path, snap: &[String], fingerprint_: &str, here: &[String]) -> Option<SnapshotError> {
    if snap.is_empty() || fingerprint(snap) != fingerprint_ {
        return None;
    }
    let i = (0..snap.len().max(here.len())).find(|&i| snap.get(i) != here.get(i))?;
    let (option, field) = option_at(if i < snap.len() { snap } else { here }, i);
    let value = |args: &[String]| {
        let at = if args.get(i).is_some_and(|a| a.starts_with('-')) { i + 1 } else { i };
        args.get(at).cloned().unwrap_or_else(|| "(nothing)".into())
    };
    Some(SnapshotError::CommandLine { path: dir.to_path_buf(), option, field, snapshot: value(snap), here: value(here) })
}

/// sha256 of the arguments, joined with NUL. Callers normalise per-VM paths first.
pub fn fingerprint(args: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for a in args {
        h.update(a.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// xxh3-128 over the data extents of a file (holes skipped, extent offsets mixed in).
pub fn digest_file(path: &Path) -> Result<FileDigest, SnapshotError> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let fd = f.as_raw_fd();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; returns -1 on error, handled below.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            if e.raw_os_error() == Some(libc::EINVAL) {
                // filesystem without SEEK_DATA support: treat the whole file as data
                return digest_dense(path, &mut f, size);
            }
            return Err(io_err(path)(e));
        }
        let start = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { (hole as u64).min(size) };
        f.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            f.read_exact(&mut buf[..n]).map_err(io_err(path))?;
            hash_nonzero_pages(&mut h, off, &buf[..n]);
            off += n as u64;
        }
        pos = end;
    }
    Ok(FileDigest { size, xxh3_128: format!("{:032x}", h.digest128()) })
}

const PAGE: usize = 4096;

/// Mixes every non-zero page of `data` (which starts at file offset `at`) into `h`.
/// Zero pages are skipped, so a hole and explicit zeros hash the same.
fn hash_nonzero_pages(h: &mut Xxh3, at: u64, data: &[u8]) {
    let first_boundary = ((PAGE as u64 - at % PAGE as u64) % PAGE as u64) as usize;
    let mut i = 0usize;
    let mut next = if first_boundary == 0 { PAGE.min(data.len()) } else { first_boundary.min(data.len()) };
    while i < data.len() {
        let page = &data[i..next];
        mix_page(h, at + i as u64, page);
        i = next;
        next = (next + PAGE).min(data.len());
    }
}

/// True when every byte of `data` is zero. Word-wise without an early exit per byte, so the
/// compiler vectorises it: a byte loop here was 30% of a snapshot's CPU time (perf).
pub fn is_zero_page(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8-byte chunk"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

/// Mixes one page at byte `offset` into a memory-file digest (zero pages count as holes).
/// Pages must come in ascending offset order for the result to equal [`digest_file`]'s.
pub fn mix_page(h: &mut Xxh3, offset: u64, page: &[u8]) {
    if !is_zero_page(page) {
        mix_nonzero_page(h, offset, page);
    }
}

/// [`mix_page`] for a page the caller already knows is not all zeros.
pub fn mix_nonzero_page(h: &mut Xxh3, offset: u64, page: &[u8]) {
    h.update(&offset.to_le_bytes());
    h.update(page);
}

/// A memory-file digest computed while the file is written (see [`mix_page`]).
pub fn digest_from(h: &Xxh3, size: u64) -> FileDigest {
    FileDigest { size, xxh3_128: format!("{:032x}", h.digest128()) }
}

fn digest_dense(path: &Path, f: &mut fs::File, size: u64) -> Result<FileDigest, SnapshotError> {
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let mut off = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hash_nonzero_pages(&mut h, off, &buf[..n]);
        off += n as u64;
    }
    Ok(FileDigest { size, xxh3_128: format!("{:032x}", h.digest128()) })
}

/// A snapshot being written: files go into [`PendingSnapshot::dir`], then `commit`.
pub struct PendingSnapshot {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl PendingSnapshot {
    /// Creates a temporary directory beside `dest`. Fails if `dest` exists.
    pub fn begin(dest: &Path) -> Result<PendingSnapshot, SnapshotError> {
        if dest.exists() {
            return Err(SnapshotError::Exists { path: dest.to_path_buf() });
        }
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "snapshot".into());
        let mut rnd = [0u8; 6];
        getrandom_fill(&mut rnd);
        let tag: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = parent.join(format!(".{name}.tmp-{tag}"));
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        Ok(PendingSnapshot { tmp, dest: dest.to_path_buf(), committed: false })
    }

    /// Where to write `memory` and `state`.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Checksums the files, writes metadata.json and renames into place.
    /// `meta.state` is filled in here (pass a placeholder); so is `meta.memory` unless the
    /// caller computed it while writing the file (pass `Some` to skip re-reading it).
    /// The memory file is flushed to disk in the background: a crash before that completes
    /// leaves a snapshot whose checksum no longer matches, which loading reports.
    pub fn commit(mut self, mut meta: SnapshotMeta) -> Result<SnapshotMeta, SnapshotError> {
        meta.format = FORMAT_NAME.into();
        meta.version = FORMAT_VERSION;
        meta.state = digest_file(&self.tmp.join(STATE_FILE))?;
        meta.memory = match meta.kind {
            SnapshotKind::Template => match meta.memory.take() {
                Some(known) => Some(known),
                None => Some(digest_file(&self.tmp.join(MEMORY_FILE))?),
            },
            SnapshotKind::Full | SnapshotKind::Incremental => None,
        };
        let meta_path = self.tmp.join(METADATA_FILE);
        let json = serde_json::to_vec_pretty(&meta).expect("metadata serialises");
        let mut f = fs::File::create(&meta_path).map_err(io_err(&meta_path))?;
        f.write_all(&json).map_err(io_err(&meta_path))?;
        // No fsync: it cost up to ~1 s per snapshot (hundreds of MiB), and on ext4 a forced
        // journal commit waits for the data of every file being written back, so a background
        // fsync of one snapshot stalled the next one's file creation. Writeback of the data is
        // started at once after the rename (sync_file_range, which waits for nothing); the
        // journal commits within seconds. A crash before that leaves a snapshot whose checksums
        // no longer match, which loading reports as corrupt (the per-boot verification stamps
        // live in a tmpfs, so nothing unverified is trusted after a reboot).
        let mut to_sync = vec![f];
        for name in [MEMORY_FILE, STATE_FILE] {
            if let Ok(f) = fs::File::open(self.tmp.join(name)) {
                to_sync.push(f);
            }
        }
        for name in [METADATA_FILE, MEMORY_FILE, STATE_FILE] {
            make_read_only(&self.tmp.join(name))?;
        }
        if self.dest.exists() {
            return Err(SnapshotError::Exists { path: self.dest.clone() });
        }
        fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        std::thread::spawn(move || {
            for f in to_sync {
                // SAFETY: starts writeback of a file we own; no memory is passed.
                unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            }
        });
        self.committed = true;
        Ok(meta)
    }
}

impl Drop for PendingSnapshot {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn getrandom_fill(buf: &mut [u8]) {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n != buf.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (t >> (i * 8)) as u8 ^ std::process::id() as u8;
        }
    }
}

/// Reads metadata.json without verifying the data files (cheap; for listings).
pub fn read_meta(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let meta_path = dir.join(METADATA_FILE);
    if !dir.is_dir() {
        return Err(corrupt(dir, "not a directory (expected a snapshot directory with metadata.json)"));
    }
    let f = fs::File::open(&meta_path).map_err(|_| corrupt(dir, "metadata.json is missing"))?;
    let len = f.metadata().map_err(io_err(&meta_path))?.len();
    if len > MAX_METADATA_BYTES {
        return Err(corrupt(dir, format!("metadata.json is {len} bytes, more than any real snapshot writes")));
    }
    let mut bytes = Vec::new();
    f.take(MAX_METADATA_BYTES).read_to_end(&mut bytes).map_err(io_err(&meta_path))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(dir, format!("metadata.json is not valid JSON ({e})")))?;
    if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
        return Err(corrupt(dir, "metadata.json is not a supermachine snapshot description"));
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != FORMAT_VERSION as u64 {
        return Err(SnapshotError::Mismatch {
            path: dir.to_path_buf(),
            what: "snapshot format version",
            snapshot: version.to_string(),
            here: FORMAT_VERSION.to_string(),
        });
    }
    serde_json::from_value(value).map_err(|e| corrupt(dir, format!("metadata.json is incomplete ({e})")))
}

/// Checks that the data files are present and match their recorded checksums.
pub fn verify_files(dir: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let check = |name: &str, want: &FileDigest| -> Result<(), SnapshotError> {
        let p = dir.join(name);
        let size = match fs::metadata(&p) {
            Ok(m) => m.len(),
            Err(_) => return Err(corrupt(dir, format!("the {name} file is missing"))),
        };
        if size != want.size {
            return Err(corrupt(dir, format!("the {name} file is {size} bytes, metadata says {}", want.size)));
        }
        let got = digest_file(&p)?;
        if got.xxh3_128 != want.xxh3_128 {
            return Err(corrupt(dir, format!("the {name} file's checksum does not match (it was modified or damaged)")));
        }
        Ok(())
    };
    check(STATE_FILE, &meta.state)?;
    match (meta.kind, &meta.memory) {
        (SnapshotKind::Template, Some(m)) => check(MEMORY_FILE, m)?,
        (SnapshotKind::Template, None) => return Err(corrupt(dir, "template snapshot without a memory checksum")),
        (SnapshotKind::Full, _) => {}
        (SnapshotKind::Incremental, _) if meta.base.is_none() => {
            return Err(corrupt(dir, "incremental snapshot without the base it builds on"))
        }
        (SnapshotKind::Incremental, _) => {}
    }
    Ok(())
}

/// Refuses a snapshot taken with a different machine identity than `here`.
pub fn check_identity(dir: &Path, snap: &MachineIdentity, here: &MachineIdentity) -> Result<(), SnapshotError> {
    let pairs: [(&'static str, String, String); 8] = [
        ("accelerator", snap.accel.clone(), here.accel.clone()),
        ("QEMU version", snap.qemu_version.clone(), here.qemu_version.clone()),
        ("memory (MiB)", snap.memory_mib.to_string(), here.memory_mib.to_string()),
        ("vCPUs", snap.vcpus.to_string(), here.vcpus.to_string()),
        ("guest kernel", snap.kernel_hash.clone(), here.kernel_hash.clone()),
        ("initramfs", snap.initrd_hash.clone(), here.initrd_hash.clone()),
        ("root image", snap.rootfs_hash.clone(), here.rootfs_hash.clone()),
        ("QEMU command line fingerprint", snap.cmdline_fingerprint.clone(), here.cmdline_fingerprint.clone()),
    ];
    for (what, s, h) in pairs {
        if s != h {
            if what == "QEMU command line fingerprint" {
                if let Some(e) = command_line_difference(dir, &snap.cmdline, &snap.cmdline_fingerprint, &here.cmdline) {
                    return Err(e);
                }
            }
            return Err(SnapshotError::Mismatch { path: dir.to_path_buf(), what, snapshot: s, here: h });
        }
    }
    Ok(())
}

/// Reads and fully verifies a snapshot directory.
pub fn load(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let meta = read_meta(dir)?;
    verify_files(dir, &meta)?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let mut rnd = [0u8; 6];
        getrandom_fill(&mut rnd);
        let d = std::env::temp_dir().join(format!("sm-snapfmt-{tag}-{}", rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn identity() -> MachineIdentity {
        MachineIdentity {
            memory_mib: 256,
            vcpus: 1,
            accel: "tcg".into(),
            qemu_version: "7.2.22".into(),
            cmdline_fingerprint: fingerprint(&["-M".into(), "microvm".into()]),
            cmdline: vec![],
            kernel_hash: "k".into(),
            initrd_hash: "i".into(),
            rootfs_hash: "r".into(),
        }
    }

    fn meta(kind: SnapshotKind) -> SnapshotMeta {
        SnapshotMeta {
            format: String::new(),
            version: 0,
            kind,
            created_unix_ms: 1,
            machine: identity(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            rootfs: "/r".into(),
            state: FileDigest { size: 0, xxh3_128: String::new() },
            memory: None,
            parent: None,
            base: None,
            labels: Default::default(),
        }
    }

    /// Undoes a committed file's read-only mode (for tests that damage a snapshot as non-root).
    fn writable(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    }

    fn write_template(dest: &Path) -> SnapshotMeta {
        let p = PendingSnapshot::begin(dest).unwrap();
        fs::write(p.dir().join(STATE_FILE), b"device state bytes").unwrap();
        let mem = fs::File::create(p.dir().join(MEMORY_FILE)).unwrap();
        mem.set_len(64 << 20).unwrap(); // sparse
        use std::os::unix::fs::FileExt;
        mem.write_all_at(b"guest page", 8 << 20).unwrap();
        p.commit(meta(SnapshotKind::Template)).unwrap()
    }

    #[test]
    fn zero_pages_are_recognised_anywhere() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p) && is_zero_page(&p[..100]) && is_zero_page(&[]));
        for at in [0usize, 7, 63, 64, 2049, 4095] {
            p[at] = 1;
            assert!(!is_zero_page(&p), "{at}");
            p[at] = 0;
        }
        assert!(!is_zero_page(&[0, 0, 3]));
    }

    #[test]
    fn write_then_load_round_trips() {
        let root = tmpdir("rt");
        let dest = root.join("snap");
        let written = write_template(&dest);
        let loaded = load(&dest).unwrap();
        assert_eq!(written, loaded);
        assert_eq!(loaded.memory.as_ref().unwrap().size, 64 << 20);
        // no temporary directory is left behind
        let names: Vec<_> = fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("snap")]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn existing_destination_is_refused() {
        let root = tmpdir("exists");
        let dest = root.join("snap");
        write_template(&dest);
        assert!(matches!(PendingSnapshot::begin(&dest), Err(SnapshotError::Exists { .. })));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn abandoned_write_leaves_nothing() {
        let root = tmpdir("abandon");
        {
            let p = PendingSnapshot::begin(&root.join("snap")).unwrap();
            fs::write(p.dir().join(STATE_FILE), b"x").unwrap();
        }
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn corruption_is_detected() {
        let root = tmpdir("corrupt");
        let dest = root.join("snap");
        write_template(&dest);
        // flip a byte in the memory file's data
        use std::os::unix::fs::FileExt;
        writable(&dest.join(MEMORY_FILE));
        let mem = fs::OpenOptions::new().write(true).open(dest.join(MEMORY_FILE)).unwrap();
        mem.write_all_at(b"X", 8 << 20).unwrap();
        let e = load(&dest).unwrap_err().to_string();
        assert!(e.contains("memory file's checksum"), "{e}");
        // truncated state
        write_template(&root.join("snap2"));
        writable(&root.join("snap2").join(STATE_FILE));
        fs::write(root.join("snap2").join(STATE_FILE), b"short").unwrap();
        let e = load(&root.join("snap2")).unwrap_err().to_string();
        assert!(e.contains("state file is 5 bytes"), "{e}");
        // garbage metadata
        write_template(&root.join("snap3"));
        writable(&root.join("snap3").join(METADATA_FILE));
        fs::write(root.join("snap3").join(METADATA_FILE), b"\x00garbage").unwrap();
        assert!(load(&root.join("snap3")).unwrap_err().to_string().contains("not valid JSON"));
        // missing dir
        assert!(load(&root.join("nope")).unwrap_err().to_string().contains("not a directory"));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn incremental_needs_its_base_and_no_memory_file() {
        let root = tmpdir("incr");
        let p = PendingSnapshot::begin(&root.join("inc")).unwrap();
        fs::write(p.dir().join(STATE_FILE), b"device state and kept pages").unwrap();
        let mut m = meta(SnapshotKind::Incremental);
        m.base = Some(BaseRef {
            dir: "/base".into(),
            memory: FileDigest { size: 1 << 20, xxh3_128: "0".repeat(32) },
            memory_stamp: "1:2:3:4.5".into(),
            pinned: false,
        });
        let written = p.commit(m).unwrap();
        assert_eq!(written.memory, None);
        assert_eq!(load(&root.join("inc")).unwrap(), written);
        // The same metadata without its base is refused.
        let path = root.join("inc").join(METADATA_FILE);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("base");
        fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = load(&root.join("inc")).unwrap_err().to_string();
        assert!(e.contains("without the base"), "{e}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn future_format_version_is_a_mismatch() {
        let root = tmpdir("ver");
        let dest = root.join("snap");
        write_template(&dest);
        let p = dest.join(METADATA_FILE);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        v["version"] = 99.into();
        writable(&p);
        fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = load(&dest).unwrap_err().to_string();
        assert!(e.contains("format version 99"), "{e}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn identity_mismatch_names_the_difference() {
        let snap = identity();
        let mut here = identity();
        assert!(check_identity(Path::new("/s"), &snap, &here).is_ok());
        here.cmdline_fingerprint = fingerprint(&["-M".into(), "q35".into()]);
        let e = check_identity(Path::new("/s"), &snap, &here).unwrap_err().to_string();
        assert!(e.contains("command line fingerprint"), "{e}");
        let mut here = identity();
        here.accel = "kvm".into();
        assert!(check_identity(Path::new("/s"), &snap, &here).unwrap_err().to_string().contains("accelerator tcg"));
    }

    #[test]
    fn committed_files_are_read_only_and_deletable() {
        use std::os::unix::fs::PermissionsExt;
        let root = tmpdir("ro");
        let dest = root.join("snap");
        write_template(&dest);
        for name in [METADATA_FILE, MEMORY_FILE, STATE_FILE] {
            assert_eq!(fs::metadata(dest.join(name)).unwrap().permissions().mode() & 0o777, 0o444, "{name}");
        }
        fs::remove_dir_all(&dest).unwrap();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn command_line_mismatch_names_the_option_and_field() {
        let args = |m: &str| -> Vec<String> {
            ["-M", "microvm", "-m", m, "-smp", "1", "-object", &format!("memory-backend-file,id=mem,size={m}")]
                .iter().map(|s| s.to_string()).collect()
        };
        let mut snap = identity();
        snap.cmdline = args("256M");
        snap.cmdline_fingerprint = fingerprint(&snap.cmdline);
        let mut here = snap.clone();
        here.cmdline = args("512M");
        here.cmdline_fingerprint = fingerprint(&here.cmdline);
        let e = check_identity(Path::new("/s"), &snap, &here).unwrap_err().to_string();
        assert!(e.contains("option -m 256M") && e.contains("-m 512M") && e.contains("machine.memory_mib"), "{e}");
        // recorded arguments that do not hash to the fingerprint are not trusted to explain it
        snap.cmdline[3] = "512M".into();
        let e = check_identity(Path::new("/s"), &snap, &here).unwrap_err().to_string();
        assert!(e.contains("command line fingerprint"), "{e}");
    }

    #[test]
    fn sparse_digest_matches_dense_content_changes() {
        let root = tmpdir("digest");
        let a = root.join("a");
        let f = fs::File::create(&a).unwrap();
        f.set_len(1 << 20).unwrap();
        let d1 = digest_file(&a).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"z", 4096).unwrap();
        let d2 = digest_file(&a).unwrap();
        assert_ne!(d1, d2);
        assert_eq!(d2, digest_file(&a).unwrap());
        // a dense copy (holes written out as zeros) has the same digest
        let b = root.join("b");
        fs::write(&b, fs::read(&a).unwrap()).unwrap();
        assert_eq!(digest_file(&b).unwrap(), d2);
        fs::remove_dir_all(root).unwrap();
    }
}
