//! Taking a snapshot of a running VM ([`Vm::snapshot`]); the VM runs on, untouched.
//!
//! Template snapshot (a VM whose RAM is a shared file, i.e. every cold-booted VM): agent
//! `Pause` (the byte stream ends on a frame boundary) → QMP `stop` → `x-ignore-shared`
//! migration of the device state only (`exec:cat > state`, ~60 KB) → sparse copy of the RAM
//! file (zero pages stay holes) → commit (checksums, metadata.json, rename) → `cont` + agent
//! `Resume`.
//!
//! A restored VM's RAM is a private copy-on-write mapping: QEMU's migration stream carries it,
//! and we split that stream on a unix socket into a memory file and the device state
//! ([`super::migration_stream`]), so the result restores like a template. Should splitting fail (or
//! `SUPERMACHINE_SNAPSHOT_SPLIT=0`), the stream is kept whole: a "full" snapshot, with no
//! memory file, whose restore loads every page.
//!
//! Incremental snapshot ([`Vm::snapshot_incremental`], of a VM restored from a template): the
//! same stream, but its main-RAM pages are compared with the template's memory file, which the
//! VM maps copy-on-write ([`super::delta`]); only those that differ stay in `state`, and the
//! metadata names the template as the `base`, which a hard link in the snapshot pins when
//! the filesystem allows.
//!
//! Invariants: whatever happens, the VM is continued and its agent resumed; the snapshot
//! appears under `dest` only once committed whole ([`PendingSnapshot`]); processes keep their
//! ids, so every restore can re-attach them; output the guest had already sent stays with
//! this VM's handles.
//!
//! Errors: the crate's [`Error`].

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, BufWriter};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use supermachine_protocol::Control;

use crate::error::{Error, Result};
use crate::mux::ReqKind;
use crate::qmp::Qmp;
use crate::snapshot::format as fmt;
use crate::snapshot::identity::machine_identity;
use crate::snapshot::memory::{copy_sparse, MemoryFileSink};
use crate::snapshot::qmp::{sh_quote, wait_migration};
use crate::snapshot::delta::{file_stamp, mapped_base, pin_base, BaseDelta};
use crate::snapshot::migration_stream::{split_stream, SplitStats};
use crate::snapshot::verified::{remember_verified, Snapshot};
use crate::snapshot::{PendingSnapshot, SnapshotKind, SnapshotMeta};
use crate::vm::Vm;

/// `SUPERMACHINE_SNAPSHOT_SPLIT=0` keeps RAM inside the migration stream (the slower "full"
/// snapshot: loading it copies every page), e.g. should a QEMU version's stream not split.
fn split_enabled() -> bool {
    !matches!(std::env::var("SUPERMACHINE_SNAPSHOT_SPLIT").as_deref().map(str::trim), Ok("0" | "no" | "off" | "false"))
}

/// Has QEMU send its migration stream to a unix socket `sock`, read by `read` on a thread
/// (with a buffered writer on `state`). The VM is stopped.
fn stream_state<T: Send + 'static>(
    qmp: &mut Qmp,
    sock: &Path,
    state: &Path,
    read: impl FnOnce(BufReader<UnixStream>, BufWriter<fs::File>) -> std::result::Result<T, String> + Send + 'static,
) -> Result<T> {
    let _ = fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(|e| Error::io(format!("listen on {}", sock.display()), e))?;
    let state_file = fs::File::create(state).map_err(|e| Error::io(format!("create {}", state.display()), e))?;
    let reader = std::thread::Builder::new()
        .name("snapshot-split".into())
        .spawn(move || -> std::result::Result<T, String> {
            let (conn, _) = listener.accept().map_err(|e| format!("accepting QEMU's stream: {e}"))?;
            read(BufReader::with_capacity(1 << 20, conn), BufWriter::with_capacity(1 << 16, state_file))
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
    read.map_err(|e| Error::Snapshot(format!("splitting the VM state: {e}")))
}

/// Splits QEMU's migration stream into `memory` (main RAM, sparse, `ram_size` bytes) and
/// `state` (everything else). The VM is stopped.
fn save_split(qmp: &mut Qmp, sock: &Path, state: &Path, memory: &Path, ram_size: u64) -> Result<fmt::FileDigest> {
    let mem = fs::OpenOptions::new().read(true).write(true).create_new(true).open(memory)
        .map_err(|e| Error::io(format!("create {}", memory.display()), e))?;
    mem.set_len(ram_size).map_err(|e| Error::io(format!("size {}", memory.display()), e))?;
    let digest = stream_state(qmp, sock, state, move |input, out| {
        let mut sink = MemoryFileSink::new(mem).map_err(|e| format!("starting the memory file writer: {e}"))?;
        let split = split_stream(input, out, &mut sink, "mem").map_err(|e| e.to_string());
        let written = sink.finish().map_err(|e| format!("writing the memory file: {e}"));
        split?;
        written?;
        // Pages out of order (not seen from QEMU 7.2): digest the finished file instead.
        Ok(sink.next.map(|_| fmt::digest_from(&sink.hash, ram_size)))
    })?;
    match digest {
        Some(digest) => Ok(digest),
        None => Ok(fmt::digest_file(memory)?),
    }
}

/// Writes into `state` QEMU's migration stream with only the main-RAM pages that differ from
/// `base`'s memory file (an incremental snapshot). The VM is stopped.
fn save_delta(qmp: &mut Qmp, sock: &Path, state: &Path, base: &fmt::BaseRef) -> Result<SplitStats> {
    let path = base.dir.join(fmt::MEMORY_FILE);
    let file = fs::File::open(&path).map_err(|e| Error::io(format!("open the base memory file {}", path.display()), e))?;
    let same = file.metadata().map(|m| file_stamp(&m) == base.memory_stamp).unwrap_or(false);
    if !same {
        return Err(Error::Snapshot(format!("no incremental snapshot: the base memory file {} changed", path.display())));
    }
    stream_state(qmp, sock, state, move |input, out| {
        let mut delta = BaseDelta::new(file).map_err(|e| format!("reading the base memory file: {e}"))?;
        split_stream(input, out, &mut delta, "mem").map_err(|e| e.to_string())
    })
}

impl Vm {
    /// Snapshots this VM into `dest` (a new directory) and lets it run on. Processes keep
    /// running and can be re-attached by id in every restore. Output the guest had already
    /// sent stays with this VM's handles.
    pub fn snapshot(&self, dest: &Path, labels: BTreeMap<String, String>) -> Result<Snapshot> {
        self.take(dest, labels, false)
    }

    /// Like [`Vm::snapshot`], but keeps only the RAM pages that differ from the template
    /// snapshot this VM was restored from (its base, which must stay in place for a restore).
    /// Fails, leaving the VM running, when there is no usable base: not restored from a
    /// template, or its memory file replaced since (the caller then takes a full snapshot).
    pub fn snapshot_incremental(&self, dest: &Path, labels: BTreeMap<String, String>) -> Result<Snapshot> {
        self.take(dest, labels, true)
    }

    fn take(&self, dest: &Path, labels: BTreeMap<String, String>, incremental: bool) -> Result<Snapshot> {
        let proc_ = self.qemu_proc().ok_or_else(|| Error::InvalidArgument("only QEMU-backed VMs can be snapshotted".into()))?;
        if !self.is_alive() {
            return Err(self.conn().failure().unwrap_or(Error::Released));
        }
        let config = proc_.config.clone();
        let identity = machine_identity(&config)?;
        let mut kind = if config.ram.share { SnapshotKind::Template } else { SnapshotKind::Full };
        let mut memory_digest = None;
        let mut base = match (incremental, self.qemu_pid()) {
            (false, _) => None,
            (true, Some(pid)) => Some(mapped_base(pid, &config.ram.path, config.ram.share)?),
            (true, None) => return Err(Error::Snapshot("no incremental snapshot: QEMU is not running".into())),
        };
        if base.is_some() && self.workdir().is_none() {
            return Err(Error::Snapshot("no incremental snapshot: the VM has no work dir".into()));
        }
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
            if let (Some(base), Some(sock)) = (&mut base, &split_sock) {
                save_delta(qmp, sock, &state, base)?;
                base.pinned = pin_base(pending.dir(), base);
                kind = SnapshotKind::Incremental;
                return Ok(());
            }
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
        if let Err(e) = result {
            drop(pending); // its partial files are gone before the free space is measured
            let ram_file = config.ram.share.then_some(config.ram.path.as_path());
            return Err(crate::snapshot::memory::explain_no_space(e, dest, config.memory_mib, ram_file));
        }
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
            base,
            labels: all_labels,
        };
        let meta = pending.commit(meta)?;
        let dir = fs::canonicalize(dest).map_err(|e| Error::io(format!("resolve {}", dest.display()), e))?;
        Ok(remember_verified(dir, meta))
    }

    /// Used as the `parent` of snapshots taken from this VM.
    fn snapshot_parent(&self) -> Option<String> {
        self.restored_from().map(|s| s.to_string())
    }
}
