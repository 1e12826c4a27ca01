//! The runtime's error type: one variant per way an operation can fail, each message telling
//! the user what happened and, where there is one, what to do next.

use std::fmt;
use std::io;

use supermachine_protocol::ErrorKind;

use crate::snapshot::format::SnapshotError;

pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong on the host side.
#[derive(Debug, Clone)]
pub enum Error {
    /// The QEMU binary could not be found.
    QemuNotFound(String),
    /// The requested accelerator cannot work on this host.
    Accelerator(String),
    /// The guest image's files are missing or unknown.
    ImageNotFound(String),
    /// The VM (QEMU, the guest kernel or the agent) died, or the channel to it was closed.
    VmDied(String),
    /// The peer broke the protocol (garbage, oversized frame, window violation, …).
    Protocol(String),
    /// A guest-side operation failed (the agent answered with an error).
    Guest { kind: ErrorKind, message: String },
    /// A deadline passed.
    Timeout(String),
    /// Writing to a process whose stdin is closed or which has exited.
    BrokenPipe(String),
    /// The VM was released by its owner; no further calls are possible.
    Released,
    /// A host-side I/O failure (workdir, sockets, files).
    Io { context: String, kind: io::ErrorKind, message: String },
    /// The caller passed something unusable.
    InvalidArgument(String),
    /// A snapshot is corrupt, incomplete, or was taken on a different configuration; or
    /// taking/restoring one failed in QEMU.
    Snapshot(String),
}

impl Error {
    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, e: io::Error) -> Error {
        Error::Io { context: context.into(), kind: e.kind(), message: e.to_string() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::QemuNotFound(m)
            | Error::Accelerator(m)
            | Error::ImageNotFound(m)
            | Error::Timeout(m)
            | Error::BrokenPipe(m)
            | Error::InvalidArgument(m)
            | Error::Snapshot(m) => f.write_str(m),
            Error::VmDied(m) => write!(f, "VM died: {m}"),
            Error::Protocol(m) => write!(f, "protocol error, connection to the guest dropped: {m}"),
            Error::Guest { kind, message } => write!(f, "guest error ({}): {message}", kind_name(*kind)),
            Error::Released => f.write_str("the VM has been released"),
            Error::Io { context, message, .. } => write!(f, "{context}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// The snake_case wire name of a guest error kind.
pub fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "not_found",
        ErrorKind::PermissionDenied => "permission_denied",
        ErrorKind::InvalidArgument => "invalid_argument",
        ErrorKind::NoSuchProcess => "no_such_process",
        ErrorKind::Limit => "limit",
        ErrorKind::Io => "io",
        ErrorKind::Protocol => "protocol",
    }
}

impl From<SnapshotError> for Error {
    fn from(e: SnapshotError) -> Error {
        match e {
            SnapshotError::Io { ref path, .. } => Error::Io {
                context: format!("snapshot {}", path.display()),
                kind: std::io::ErrorKind::Other,
                message: e.to_string(),
            },
            SnapshotError::Corrupt { .. }
            | SnapshotError::Mismatch { .. }
            | SnapshotError::Exists { .. }
            | SnapshotError::CommandLine { .. } => Error::Snapshot(e.to_string()),
        }
    }
}
