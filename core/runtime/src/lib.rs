//! Host runtime library: QEMU supervision ([`qemu`], [`accel`], [`qmp`], its capped output
//! tails [`console`]), the connection to the guest agent ([`conn`] over the pure multiplexer
//! [`mux`]), VMs and their processes ([`vm`], [`child`]), snapshots ([`snapshot`]: on disk,
//! taking, restoring), the VM pool ([`pool`]) and the guest's network egress policy and proxy
//! ([`net`]), TCP channels through the agent ([`tcp`]); [`log_limit`] bounds the log lines a
//! guest can cause.
pub mod accel;
pub mod child;
pub mod conn;
pub mod console;
pub mod error;
pub mod image;
pub mod log_limit;
pub mod mux;
pub mod net;
pub mod pool;
pub mod qemu;
pub mod qmp;
pub mod snapshot;
pub mod tcp;
pub mod vm;
pub mod workdir;

pub use child::{ExecChild, SpawnOptions};
pub use error::{Error, Result};
pub use snapshot::{RestoreOptions, Snapshot};
pub use vm::{BootOptions, ExecOptions, ExecResult, GuestFiles, Vm};
