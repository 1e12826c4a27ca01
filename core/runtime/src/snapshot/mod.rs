//! Snapshots: the verified on-disk format ([`format`]). Taking and restoring them with QEMU
//! lives with the VM code; this module owns what is on disk and whether it can be trusted, and
//! the pure splitting of QEMU's migration stream into memory file + device state ([`stream`]).

pub mod format;
pub mod stream;

pub use format::{
    check_identity, digest_file, digest_from, is_zero_page, mix_nonzero_page, mix_page, fingerprint, load, read_meta, verify_files, FileDigest, MachineIdentity,
    PendingSnapshot, SnapshotError, SnapshotKind, SnapshotMeta,
};
