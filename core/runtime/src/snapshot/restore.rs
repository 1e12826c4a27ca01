//! Restoring a VM from a snapshot ([`Vm::restore`]), the check that this host can
//! ([`Snapshot::check_host`]), and the pool factory of restored VMs ([`RestoreFactory`]).
//!
//! Restore: the snapshot's command line with `-incoming defer` (and for templates
//! `mem-path=memory,share=off`: a private copy-on-write mapping, so the snapshot's memory
//! file is never modified and clones share its pages); over QMP `x-ignore-shared`
//! (templates), `migrate-incoming exec:cat state`, poll until completed, `cont`; then the
//! host connects to the agent, whose Welcome (after our Hello with the host clock and fresh
//! entropy) is the "restored" signal. Processes keep their ids: handles re-attach by id.
//! This goes through the same `Vm::start` as a cold boot.
//!
//! Incremental snapshots restore like templates over their base's memory file, once
//! [`delta::check_base`] found that base in place and unchanged (or the snapshot's pinned
//! link to it).
//!
//! Invariant: QEMU does not check that the restoring command line matches the saving one, so
//! restore refuses a snapshot whose recorded machine identity differs from this VM's
//! ([`super::identity`]) before QEMU is started.
//!
//! Errors: the crate's [`Error`](crate::Error).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::accel::{self, Accel};
use crate::error::Result;
use crate::qemu::{self, Incoming, QemuConfig, RamFile};
use crate::qmp::Qmp;
use crate::snapshot::delta;
use crate::snapshot::format as fmt;
use crate::snapshot::identity::machine_identity;
use crate::snapshot::qmp::{sh_quote, wait_migration};
use crate::snapshot::verified::Snapshot;
use crate::snapshot::SnapshotKind;
use crate::vm::Vm;
use crate::workdir::WorkDir;

/// Deadline for a restored guest to answer (it is already booted: this is generous).
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

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

impl Snapshot {
    /// Refuses, with the same message a restore would give, a snapshot this host cannot
    /// restore: taken with another QEMU, accelerator, image files or command line. Cheap (no
    /// QEMU is started; its version is asked once per process).
    pub fn check_host(&self, qemu: Option<&Path>) -> Result<()> {
        let qemu_bin = match qemu {
            Some(q) => q.to_path_buf(),
            None => qemu::find_qemu()?,
        };
        let base_memory = self.check_base()?;
        let config = self.config(|name| Path::new("/unused").join(name), qemu_bin, accel::detect()?, base_memory);
        Ok(fmt::check_identity(&self.dir, &self.meta.machine, &machine_identity(&config)?)?)
    }

    /// For an incremental snapshot: the base memory file to map, its base's if that is still
    /// there and unchanged, else the pinned link ([`delta::check_base`]); None for the others.
    fn check_base(&self) -> Result<Option<PathBuf>> {
        match (&self.meta.kind, &self.meta.base) {
            (SnapshotKind::Incremental, Some(base)) => delta::check_base(&self.dir, base).map(Some),
            _ => Ok(None),
        }
    }

    /// A QEMU configuration to restore this snapshot; `place` names a per-VM file.
    /// `base_memory`: an incremental snapshot's base memory file ([`Snapshot::check_base`]).
    fn config(&self, place: impl Fn(&str) -> PathBuf, qemu_bin: PathBuf, accel: Accel, base_memory: Option<PathBuf>) -> QemuConfig {
        let m = &self.meta;
        let ram = match (m.kind, base_memory) {
            (SnapshotKind::Template, _) => RamFile { path: self.dir.join(fmt::MEMORY_FILE), share: false },
            (SnapshotKind::Incremental, Some(memory)) => RamFile { path: memory, share: false },
            (SnapshotKind::Full | SnapshotKind::Incremental, _) => RamFile { path: place("ram"), share: true },
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
            agent_sock: place("agent.sock"),
            qmp_sock: place("qmp.sock"),
            incoming: Some(Incoming::Defer),
            tcg_tb_size_mib: None,
        }
    }
}

impl Vm {
    /// Starts a VM from a snapshot and waits until its agent answers.
    pub fn restore(snap: &Snapshot, opts: &RestoreOptions) -> Result<Vm> {
        let qemu_bin = match &opts.qemu {
            Some(q) => q.clone(),
            None => qemu::find_qemu()?,
        };
        let accel = accel::detect()?;
        let base_memory = snap.check_base()?;
        let workdir = WorkDir::create("vm")?;
        let mut config = snap.config(|name| workdir.join(name), qemu_bin, accel, base_memory);
        config.tcg_tb_size_mib = opts.tcg_tb_size_mib.or_else(qemu::default_tb_size_mib);
        let here = machine_identity(&config)?;
        fmt::check_identity(&snap.dir, &snap.meta.machine, &here)?;
        let deadline = Instant::now() + opts.timeout;
        // Incremental: the base's pages are mapped; the stream writes only those that differ.
        let template = matches!(snap.meta.kind, SnapshotKind::Template | SnapshotKind::Incremental);
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
