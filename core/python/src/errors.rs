//! Every Python exception `_core` raises, in one place, and the mapping from runtime errors.
//!
//! Hierarchy: `VmError(RuntimeError)` is the base of everything VM-related; `VmDiedError`,
//! `ProtocolError`, `GuestError` (with `.kind`), `AcceleratorError`, `QemuNotFoundError`,
//! `VmReleasedError`, `SnapshotError`, `PoolError` derive from it. `ImageNotFoundError` derives from `LookupError`. Timeouts
//! raise the builtin `TimeoutError`, writes to a closed stdin `BrokenPipeError`, bad arguments
//! `ValueError`, host I/O failures `OSError`.

use pyo3::create_exception;
use pyo3::exceptions::{PyBrokenPipeError, PyLookupError, PyOSError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

use supermachine_runtime::error::{kind_name, Error};

create_exception!(supermachine_kernel._core, VmError, PyRuntimeError, "Base class of every microVM error.");
create_exception!(supermachine_kernel._core, VmDiedError, VmError, "The VM (QEMU, the guest kernel or the agent) died or its channel closed.");
create_exception!(supermachine_kernel._core, ProtocolError, VmError, "The guest broke the wire protocol; the connection was dropped.");
create_exception!(supermachine_kernel._core, GuestError, VmError, "A guest-side operation failed; `.kind` says how (e.g. 'not_found').");
create_exception!(supermachine_kernel._core, AcceleratorError, VmError, "The requested accelerator (SUPERMACHINE_ACCEL) cannot work here.");
create_exception!(supermachine_kernel._core, QemuNotFoundError, VmError, "qemu-system-x86_64 is missing.");
create_exception!(supermachine_kernel._core, VmReleasedError, VmError, "The VM was released; no further calls are possible.");
create_exception!(supermachine_kernel._core, SnapshotError, VmError, "A snapshot is corrupt, incomplete or from another configuration, or taking/restoring it failed.");
create_exception!(supermachine_kernel._core, PoolError, VmError, "The VM pool could not hand out a VM (timeout, shut down, or restores failing).");
create_exception!(supermachine_kernel._core, ImageNotFoundError, PyLookupError, "The guest image is unknown or its files are missing.");

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("VmError", py.get_type::<VmError>())?;
    m.add("VmDiedError", py.get_type::<VmDiedError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("GuestError", py.get_type::<GuestError>())?;
    m.add("AcceleratorError", py.get_type::<AcceleratorError>())?;
    m.add("QemuNotFoundError", py.get_type::<QemuNotFoundError>())?;
    m.add("VmReleasedError", py.get_type::<VmReleasedError>())?;
    m.add("ImageNotFoundError", py.get_type::<ImageNotFoundError>())?;
    m.add("SnapshotError", py.get_type::<SnapshotError>())?;
    m.add("PoolError", py.get_type::<PoolError>())?;
    Ok(())
}

/// Converts a runtime error into the Python exception a user can act on.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::QemuNotFound(_) => QemuNotFoundError::new_err(msg),
        Error::Accelerator(_) => AcceleratorError::new_err(msg),
        Error::ImageNotFound(_) => ImageNotFoundError::new_err(msg),
        Error::VmDied(_) => VmDiedError::new_err(msg),
        Error::Protocol(_) => ProtocolError::new_err(msg),
        Error::Guest { kind, .. } => {
            let err = GuestError::new_err(msg);
            Python::with_gil(|py| {
                let _ = err.value(py).setattr("kind", kind_name(kind));
            });
            err
        }
        Error::Timeout(_) => PyTimeoutError::new_err(msg),
        Error::BrokenPipe(_) => PyBrokenPipeError::new_err(msg),
        Error::Released => VmReleasedError::new_err(msg),
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::Snapshot(_) => SnapshotError::new_err(msg),
    }
}

/// `Result` adapter: `r.map_err(to_py)` shorthand.
pub trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
