//! Snapshots of whole VMs: what is on disk, taking them from running VMs and restoring VMs
//! from them (DESIGN.md §4). One module per job:
//!
//! | module                 | owns                                                                      |
//! |------------------------|---------------------------------------------------------------------------|
//! | [`format`](mod@format) | the on-disk format: metadata, checksums, atomic commit, trust             |
//! | [`migration_stream`]   | splitting QEMU's migration stream into memory file + device state         |
//! | [`identity`]           | the machine identity a snapshot must match (command-line fingerprint)     |
//! | [`memory`]             | writing the sparse memory file; prefetching it into the page cache        |
//! | [`delta`]              | incremental snapshots: the base a VM maps, the pages that differ, checks  |
//! | [`verified`]           | [`Snapshot`]: a verified snapshot directory; verification remembered      |
//! | [`take`]               | [`Vm::snapshot`](crate::Vm::snapshot): pause, migrate out, commit, resume |
//! | [`restore`]            | [`Vm::restore`](crate::Vm::restore), the host check, the pool factory     |
//! | `qmp`                  | the QMP migration steps taking and restoring share                        |
//!
//! Dependencies run one way: `take`/`restore` → `delta`/`verified`/`memory`/`identity`/`qmp` →
//! `format`/`migration_stream`; nothing here is imported by [`crate::vm`].
//!
//! Template snapshot: a memory file (guest RAM, sparse) mapped private copy-on-write on
//! restore, plus the device state. Full snapshot: RAM inside the migration stream, no memory
//! file (restore loads every page); taken only when a restored VM's stream is not split.
//! Incremental snapshot: no memory file; the state carries the RAM pages that differ from the
//! template the VM was restored from (its `base`), which restore maps copy-on-write again.

pub mod delta;
pub mod format;
pub mod identity;
pub mod memory;
pub mod migration_stream;
mod qmp;
pub mod restore;
pub mod take;
pub mod verified;

pub use format::{
    check_identity, digest_file, BaseRef, digest_from, is_zero_page, mix_nonzero_page, mix_page, fingerprint, load, read_meta, verify_files, FileDigest, MachineIdentity,
    PendingSnapshot, SnapshotError, SnapshotKind, SnapshotMeta,
};
pub use restore::{RestoreFactory, RestoreOptions, DEFAULT_RESTORE_TIMEOUT};
pub use verified::{dir_stamp, Snapshot};
