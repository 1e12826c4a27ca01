//! Taking snapshots of running VMs and restoring VMs from them (DESIGN.md §4).
//!
//! Template snapshot (a VM whose RAM is a shared file, i.e. every cold-booted VM):
//! agent `Pause` (the byte stream ends on a frame boundary) → QMP `stop` → `x-ignore-shared`
//! migration of the device state only (`exec:cat > state`, ~60 KB) → sparse copy of the RAM
//! file (zero pages stay holes) → commit (checksums, metadata.json, rename) → `cont` + agent
//! `Resume`: the VM goes on, untouched.
//!
//! Full snapshot (a restored VM, whose RAM is a private copy-on-write mapping): the migration
//! stream carries the RAM too; no memory file.
//!
//! Restore: the same command line with `-incoming defer` (and for templates
//! `mem-path=memory,share=off` — a private copy-on-write mapping, so the snapshot's memory file
//! is never modified and clones share its pages); over QMP `x-ignore-shared` (templates),
//! `migrate-incoming exec:cat state`, poll until completed, `cont`; then the host connects to
//! the agent, whose Welcome (after our Hello with the host clock and fresh entropy) is the
//! "restored" signal. Processes keep their ids: handles re-attach by id.
//!
//! Pitfalls handled: QEMU does not check that the restoring command line matches, so the
//! snapshot records a fingerprint of it (per-VM paths normalised) and restore refuses a
//! mismatch; snapshots are verified (checksums) once, not on every restore, because reading
//! the memory file would cost more than the restore itself: the verification is remembered
//! (per process, and across processes by a stamp of the files' inode/size/mtime in the
//! runtime dir), and any change to a file invalidates it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use supermachine_protocol::Control;

use crate::accel::{self, Accel};
use crate::error::{Error, Result};
use crate::mux::ReqKind;
use crate::qemu::{self, Incoming, QemuConfig, RamFile};
use crate::qmp::Qmp;
use crate::snapshot::format::{self as fmt};
use crate::snapshot::stream::{self, split_stream, PageSink};
use crate::snapshot::{MachineIdentity, PendingSnapshot, SnapshotError, SnapshotKind, SnapshotMeta};
use crate::vm::Vm;
use crate::workdir::WorkDir;

/// How long a snapshot's migration may take before we give up.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for a restored guest to answer (it is already booted: this is generous).
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

impl From<SnapshotError> for Error {
    fn from(e: SnapshotError) -> Error {
        match e {
            SnapshotError::Io { ref path, .. } => Error::Io {
                context: format!("snapshot {}", path.display()),
                kind: std::io::ErrorKind::Other,
                message: e.to_string(),
            },
            SnapshotError::Corrupt { .. } | SnapshotError::Mismatch { .. } | SnapshotError::Exists { .. } => {
                Error::Snapshot(e.to_string())
            }
        }
    }
}

/// Identity of an image file: its cache directory (named by the recipe/content hash), name,
/// size and modification time — cheap, and it changes whenever the file is rebuilt.
pub fn file_identity(p: &Path) -> String {
    let dir = p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match fs::metadata(p) {
        Ok(m) => format!("{dir}/{name} size={} mtime={}.{:09}", m.len(), m.mtime(), m.mtime_nsec()),
        Err(_) => format!("{dir}/{name} (missing)"),
    }
}

/// The command line with every per-VM path replaced, so two VMs of one shape compare equal.
pub fn normalised_args(config: &QemuConfig) -> Vec<String> {
    let mut c = config.clone();
    c.ram = RamFile { path: "RAM".into(), share: true };
    c.console_log = "CONSOLE".into();
    c.agent_sock = "AGENT".into();
    c.qmp_sock = "QMP".into();
    c.incoming = None;
    c.qemu = "QEMU".into();
    // The translation-buffer size only shapes QEMU's own memory, not the guest.
    c.tcg_tb_size_mib = None;
    c.args()
}

/// What a VM of this configuration is, for snapshot compatibility checks.
pub fn machine_identity(config: &QemuConfig) -> Result<MachineIdentity> {
    Ok(MachineIdentity {
        memory_mib: config.memory_mib,
        vcpus: config.vcpus,
        accel: config.accel.name().into(),
        qemu_version: qemu::qemu_version(&config.qemu)?,
        cmdline_fingerprint: fmt::fingerprint(&normalised_args(config)),
        kernel_hash: file_identity(&config.kernel),
        initrd_hash: config.initrd.as_deref().map(file_identity).unwrap_or_else(|| "none".into()),
        rootfs_hash: file_identity(&config.rootfs),
    })
}

/// Copies `src` to `dst` leaving every all-zero 4 KiB page a hole (guest RAM is mostly zero),
/// through the same [`MemoryFileSink`] as split snapshots. Returns the bytes of data written and
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
                for (i, page) in buf[..n].chunks(stream::PAGE_SIZE).enumerate() {
                    sink.page(off + (i * stream::PAGE_SIZE) as u64, page).map_err(|e| Error::io(ctx("write"), e))?;
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
struct MemoryFileSink {
    run_at: u64,
    run: Vec<u8>,
    hash: xxhash_rust::xxh3::Xxh3,
    /// Next offset the digest expects; None once pages came out of order (digest the file).
    next: Option<u64>,
    /// Bytes of non-zero pages handed to the writer.
    written: u64,
    to_writer: Option<std::sync::mpsc::SyncSender<(u64, Vec<u8>)>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

const SINK_RUN: usize = 1 << 20;

impl MemoryFileSink {
    fn new(file: fs::File) -> std::io::Result<MemoryFileSink> {
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
    fn finish(&mut self) -> std::io::Result<()> {
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

/// `SUPERMACHINE_SNAPSHOT_SPLIT=0` keeps RAM inside the migration stream (the slower "full"
/// snapshot: loading it copies every page), e.g. should a QEMU version's stream not split.
fn split_enabled() -> bool {
    !matches!(std::env::var("SUPERMACHINE_SNAPSHOT_SPLIT").as_deref().map(str::trim), Ok("0" | "no" | "off" | "false"))
}

/// Has QEMU send its migration stream to a unix socket we read, splitting it into `memory`
/// (main RAM, sparse, `ram_size` bytes) and `state` (everything else). The VM is stopped.
fn save_split(qmp: &mut Qmp, sock: &Path, state: &Path, memory: &Path, ram_size: u64) -> Result<fmt::FileDigest> {
    use std::io::{BufReader, BufWriter};
    use std::os::unix::net::{UnixListener, UnixStream};
    let _ = fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(|e| Error::io(format!("listen on {}", sock.display()), e))?;
    let mem = fs::OpenOptions::new().read(true).write(true).create_new(true).open(memory)
        .map_err(|e| Error::io(format!("create {}", memory.display()), e))?;
    mem.set_len(ram_size).map_err(|e| Error::io(format!("size {}", memory.display()), e))?;
    let state_file = fs::File::create(state).map_err(|e| Error::io(format!("create {}", state.display()), e))?;
    let reader = std::thread::Builder::new()
        .name("snapshot-split".into())
        .spawn(move || -> std::result::Result<Option<fmt::FileDigest>, String> {
            let (conn, _) = listener.accept().map_err(|e| format!("accepting QEMU's stream: {e}"))?;
            let mut sink = MemoryFileSink::new(mem).map_err(|e| format!("starting the memory file writer: {e}"))?;
            let input = BufReader::with_capacity(1 << 20, conn);
            let out = BufWriter::with_capacity(1 << 16, state_file);
            let split = split_stream(input, out, &mut sink, "mem").map_err(|e| e.to_string());
            let written = sink.finish().map_err(|e| format!("writing the memory file: {e}"));
            split?;
            written?;
            // Pages out of order (not seen from QEMU 7.2): digest the finished file instead.
            Ok(sink.next.map(|_| fmt::digest_from(&sink.hash, ram_size)))
        })
        .map_err(|e| Error::io("start the snapshot reader thread", e))?;
    let sent = (|| -> Result<()> {
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )?;
        qmp.execute("migrate", Some(json!({"uri": format!("unix:{}", sock.display())})))?;
        wait_migration(qmp, "saving the VM state")
    })();
    if sent.is_err() {
        // QEMU may never have connected: wake the reader so it can end.
        let _ = UnixStream::connect(sock);
    }
    let read = reader.join().unwrap_or_else(|_| Err("the snapshot reader thread panicked".into()));
    let _ = fs::remove_file(sock);
    sent?;
    match read.map_err(|e| Error::Snapshot(format!("splitting the VM state: {e}")))? {
        Some(digest) => Ok(digest),
        None => Ok(fmt::digest_file(memory)?),
    }
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Polls `query-migrate` until it completes.
fn wait_migration(qmp: &mut Qmp, what: &str) -> Result<()> {
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

    /// Refuses, with the same message a restore would give, a snapshot this host cannot
    /// restore: taken with another QEMU, accelerator, image files or command line. Cheap (no
    /// QEMU is started; its version is asked once per process).
    pub fn check_host(&self, qemu: Option<&Path>) -> Result<()> {
        let qemu_bin = match qemu {
            Some(q) => q.to_path_buf(),
            None => qemu::find_qemu()?,
        };
        let config = self.config(|name| Path::new("/unused").join(name), qemu_bin, accel::detect()?);
        Ok(fmt::check_identity(&self.dir, &self.meta.machine, &machine_identity(&config)?)?)
    }

    /// A QEMU configuration to restore this snapshot; `place` names a per-VM file.
    fn config(&self, place: impl Fn(&str) -> PathBuf, qemu_bin: PathBuf, accel: Accel) -> QemuConfig {
        let m = &self.meta;
        let ram = match m.kind {
            SnapshotKind::Template => RamFile { path: self.dir.join(fmt::MEMORY_FILE), share: false },
            SnapshotKind::Full => RamFile { path: place("ram"), share: true },
        };
        QemuConfig {
            qemu: qemu_bin,
            accel,
            memory_mib: m.machine.memory_mib,
            vcpus: m.machine.vcpus,
            kernel: m.kernel.clone(),
            initrd: if m.initrd.as_os_str().is_empty() { None } else { Some(m.initrd.clone()) },
            rootfs: m.rootfs.clone(),
            append_extra: m.labels.get("append").map(|a| a.split(' ').filter(|w| !w.is_empty()).map(String::from).collect()).unwrap_or_default(),
            tsc_khz: m.labels.get("tsc_khz").and_then(|t| t.parse().ok()),
            ram,
            console_log: place("console.log"),
            agent_sock: place("agent.sock"),
            qmp_sock: place("qmp.sock"),
            incoming: Some(Incoming::Defer),
            tcg_tb_size_mib: None,
        }
    }
}

/// Options for [`Vm::restore`].
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub timeout: Duration,
    pub qemu: Option<PathBuf>,
    /// TCG translation-buffer size for the clone (None: [`qemu::default_tb_size_mib`]).
    pub tcg_tb_size_mib: Option<u32>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { timeout: DEFAULT_RESTORE_TIMEOUT, qemu: None, tcg_tb_size_mib: None }
    }
}

impl Vm {
    /// Snapshots this VM into `dest` (a new directory) and lets it run on. Processes keep
    /// running and can be re-attached by id in every restore. Output the guest had already
    /// sent stays with this VM's handles.
    pub fn snapshot(&self, dest: &Path, labels: BTreeMap<String, String>) -> Result<Snapshot> {
        let proc_ = self.qemu_proc().ok_or_else(|| Error::InvalidArgument("only QEMU-backed VMs can be snapshotted".into()))?;
        if !self.is_alive() {
            return Err(self.conn().failure().unwrap_or(Error::Released));
        }
        let config = proc_.config.clone();
        let identity = machine_identity(&config)?;
        let mut kind = if config.ram.share { SnapshotKind::Template } else { SnapshotKind::Full };
        let mut memory_digest = None;
        let pending = PendingSnapshot::begin(dest)?;
        let split_sock = self.workdir().map(|w| w.join("migrate.sock"));

        // Quiesce the channel: after Paused the agent writes nothing until Resume.
        let conn = self.conn();
        conn.request(ReqKind::Pause, Some(Instant::now() + Duration::from_secs(30)), |req| Control::Pause { req })?;
        let mut qmp_guard = self.qmp()?;
        let qmp = qmp_guard.as_mut().expect("qmp connected");
        let result = (|| -> Result<()> {
            qmp.execute("stop", None)?;
            // The VM is stopped: no need for QEMU's default migration throttle (it made a
            // full snapshot of a 500 MiB guest take ~5 s).
            qmp.execute("migrate-set-parameters", Some(json!({"max-bandwidth": 1u64 << 40})))?;
            let state = pending.dir().join(fmt::STATE_FILE);
            let memory = pending.dir().join(fmt::MEMORY_FILE);
            if kind == SnapshotKind::Full && split_enabled() {
                // Private RAM: split QEMU's stream into a memory file + device state, so the
                // snapshot restores copy-on-write like a template (fast) instead of loading
                // every page. Anything unexpected falls back to keeping the stream whole.
                if let Some(sock) = &split_sock {
                    match save_split(qmp, sock, &state, &memory, u64::from(config.memory_mib) << 20) {
                        Ok(digest) => {
                            kind = SnapshotKind::Template;
                            memory_digest = Some(digest);
                            return Ok(());
                        }
                        Err(e) => {
                            eprintln!("supermachine: snapshot of {} keeps RAM in the stream ({e})", dest.display());
                            let _ = fs::remove_file(&state);
                            let _ = fs::remove_file(&memory);
                        }
                    }
                }
            }
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": kind == SnapshotKind::Template}]})),
            )?;
            qmp.execute("migrate", Some(json!({"uri": format!("exec:cat > {}", sh_quote(&state))})))?;
            wait_migration(qmp, "saving the VM state")?;
            if kind == SnapshotKind::Template {
                memory_digest = Some(copy_sparse(&config.ram.path, &memory)?.1);
            }
            Ok(())
        })();
        // Whatever happened, let the VM run on.
        let resumed = qmp.execute("cont", None).map(|_| ());
        drop(qmp_guard);
        let agent = conn.request(ReqKind::Resume, Some(Instant::now() + Duration::from_secs(30)), |req| Control::Resume { req });
        result?;
        resumed?;
        agent?;

        let mut all_labels = labels;
        all_labels.insert("boot_id".into(), self.welcome().boot_id.clone());
        all_labels.insert("append".into(), config.append_extra.join(" "));
        if let Some(t) = config.tsc_khz {
            all_labels.insert("tsc_khz".into(), t.to_string());
        }
        let meta = SnapshotMeta {
            format: String::new(),
            version: 0,
            kind,
            created_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            machine: identity,
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone().unwrap_or_default(),
            rootfs: config.rootfs.clone(),
            state: fmt::FileDigest { size: 0, xxh3_128: String::new() },
            memory: memory_digest,
            parent: self.snapshot_parent(),
            labels: all_labels,
        };
        let meta = pending.commit(meta)?;
        let dir = fs::canonicalize(dest).map_err(|e| Error::io(format!("resolve {}", dest.display()), e))?;
        let stamp = dir_stamp(&dir);
        let stamp_file = stamp_path(&dir);
        if let Some(parent) = stamp_file.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let _ = fs::write(&stamp_file, &stamp);
        verified_cache().lock().unwrap_or_else(|e| e.into_inner()).insert(dir.clone(), (stamp, meta.clone()));
        Ok(Snapshot { dir, meta })
    }

    /// Starts a VM from a snapshot and waits until its agent answers.
    pub fn restore(snap: &Snapshot, opts: &RestoreOptions) -> Result<Vm> {
        let qemu_bin = match &opts.qemu {
            Some(q) => q.clone(),
            None => qemu::find_qemu()?,
        };
        let accel = accel::detect()?;
        let workdir = WorkDir::create("vm")?;
        let mut config = snap.config(|name| workdir.join(name), qemu_bin, accel);
        config.tcg_tb_size_mib = opts.tcg_tb_size_mib.or_else(qemu::default_tb_size_mib);
        let here = machine_identity(&config)?;
        fmt::check_identity(&snap.dir, &snap.meta.machine, &here)?;
        let deadline = Instant::now() + opts.timeout;
        let template = snap.meta.kind == SnapshotKind::Template;
        let uri = format!("exec:cat {}", sh_quote(&snap.dir.join(fmt::STATE_FILE)));
        let feed = |qmp: &mut Qmp| -> Result<()> {
            // QEMU 7.2 has no -global for this capability: it must be set over QMP.
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": template}]})),
            )?;
            qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
            wait_migration(qmp, "loading the VM state")?;
            qmp.execute("cont", None)?;
            Ok(())
        };
        Vm::start(config, workdir, deadline, opts.timeout, Some(snap.dir.display().to_string()), Some(&feed))
    }
}

impl Vm {
    /// Freezes the guest: the agent stops writing (Pause), then QEMU stops the vCPUs. Nothing
    /// in the guest runs and QEMU uses no CPU until [`Vm::resume`]; the translated code QEMU
    /// already holds stays, so the guest resumes warm.
    pub fn pause(&self) -> Result<()> {
        self.qemu_proc().ok_or_else(|| Error::InvalidArgument("only QEMU-backed VMs can be paused".into()))?;
        if !self.is_alive() {
            return Err(self.conn().failure().unwrap_or(Error::Released));
        }
        self.conn().request(ReqKind::Pause, Some(Instant::now() + Duration::from_secs(30)), |req| Control::Pause { req })?;
        let mut qmp_guard = self.qmp()?;
        qmp_guard.as_mut().expect("qmp connected").execute("stop", None)?;
        Ok(())
    }

    /// Continues a paused guest and opens a new channel to its agent. The new Hello sets the
    /// guest clock to the host's, reseeds its RNG and bumps its generation, exactly as after a
    /// restore, so a guest paused for hours comes back with the right time and fresh entropy.
    pub fn resume(&self, timeout: Duration) -> Result<u64> {
        self.qemu_proc().ok_or_else(|| Error::InvalidArgument("only QEMU-backed VMs can be resumed".into()))?;
        {
            let mut qmp_guard = self.qmp()?;
            qmp_guard.as_mut().expect("qmp connected").execute("cont", None)?;
        }
        Ok(self.reconnect(timeout)?.generation)
    }

    /// Used as the `parent` of snapshots taken from this VM.
    fn snapshot_parent(&self) -> Option<String> {
        self.restored_from().map(|s| s.to_string())
    }
}

/// Pool items are VMs restored from one snapshot.
pub struct RestoreFactory {
    pub snapshot: Snapshot,
    pub options: RestoreOptions,
}

impl crate::pool::Factory for RestoreFactory {
    type Item = std::sync::Arc<Vm>;

    fn create(&self) -> std::result::Result<Self::Item, String> {
        Vm::restore(&self.snapshot, &self.options).map(std::sync::Arc::new).map_err(|e| e.to_string())
    }

    fn is_alive(&self, item: &Self::Item) -> bool {
        item.is_alive()
    }

    fn destroy(&self, item: Self::Item) {
        item.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn normalised_args_ignore_per_vm_paths() {
        let base = |w: &str| QemuConfig {
            qemu: format!("/{w}/qemu").into(),
            accel: Accel::Tcg,
            memory_mib: 256,
            vcpus: 1,
            kernel: "/img/k".into(),
            initrd: Some("/img/i".into()),
            rootfs: "/img/r".into(),
            append_extra: vec![],
            tsc_khz: Some(1),
            ram: RamFile { path: format!("/{w}/ram").into(), share: w == "a" },
            console_log: format!("/{w}/c").into(),
            agent_sock: format!("/{w}/s").into(),
            qmp_sock: format!("/{w}/q").into(),
            incoming: if w == "a" { None } else { Some(Incoming::Defer) },
            tcg_tb_size_mib: None,
        };
        assert_eq!(normalised_args(&base("a")), normalised_args(&base("b")));
        let mut c = base("b");
        c.memory_mib = 512;
        assert_ne!(normalised_args(&base("a")), normalised_args(&c));
    }
}
