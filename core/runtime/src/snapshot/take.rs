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
//! Invariants: whatever happens, the VM is continued and its agent resumed; the snapshot
//! appears under `dest` only once committed whole ([`PendingSnapshot`]); processes keep their
//! ids, so every restore can re-attach them; output the guest had already sent stays with
//! this VM's handles.
//!
//! Errors: the crate's [`Error`].

use std::collections::BTreeMap;
use std::fs;
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
use crate::snapshot::migration_stream::split_stream;
use crate::snapshot::verified::{remember_verified, Snapshot};
use crate::snapshot::{PendingSnapshot, SnapshotKind, SnapshotMeta};
use crate::vm::Vm;

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
