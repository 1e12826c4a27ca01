//! Snapshots: the verified on-disk format ([`format`]). Taking and restoring them with QEMU
//! lives with the VM code; this module only owns what is on disk and whether it can be trusted.

pub mod format;

pub use format::{
    check_identity, digest_file, fingerprint, load, read_meta, verify_files, FileDigest, MachineIdentity,
    PendingSnapshot, SnapshotError, SnapshotKind, SnapshotMeta,
};
