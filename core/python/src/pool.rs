//! `_core.Pool`: VMs restored from one snapshot, handed out FIFO-fair (runtime `pool.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use supermachine_runtime::pool::{Pool as RtPool, PoolConfig, PoolError as RtPoolError};
use supermachine_runtime::snapshot::RestoreFactory;
use supermachine_runtime::{RestoreOptions, Snapshot};

use crate::errors::{IntoPy, PoolError};
use crate::vm::Vm;

fn pool_err(e: RtPoolError) -> PyErr {
    match e {
        RtPoolError::Timeout { .. } => pyo3::exceptions::PyTimeoutError::new_err(e.to_string()),
        RtPoolError::Config(_) => pyo3::exceptions::PyValueError::new_err(e.to_string()),
        _ => PoolError::new_err(e.to_string()),
    }
}

/// A pool of VMs restored from one snapshot.
#[pyclass(frozen, module = "supermachine_kernel._core")]
pub struct Pool {
    inner: RtPool<RestoreFactory>,
}

#[pymethods]
impl Pool {
    /// `acquire_timeout_ms=0` waits forever; `idle_timeout_ms=None` keeps idle VMs. `seed` VMs
    /// (e.g. the one that baked the snapshot) are handed out first.
    #[new]
    #[pyo3(signature = (snapshot, min=1, max=4, acquire_timeout_ms=0, idle_timeout_ms=None, restore_on_release=true, seed=None, restore_timeout=30.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        snapshot: PathBuf,
        min: usize,
        max: usize,
        acquire_timeout_ms: u64,
        idle_timeout_ms: Option<u64>,
        restore_on_release: bool,
        seed: Option<Vec<PyRef<'_, Vm>>>,
        restore_timeout: f64,
    ) -> PyResult<Pool> {
        let snap = py.allow_threads(|| Snapshot::open(&snapshot)).py_err()?;
        let factory = RestoreFactory {
            snapshot: snap,
            options: RestoreOptions { timeout: Duration::from_secs_f64(restore_timeout.max(0.1)), ..Default::default() },
        };
        let cfg = PoolConfig {
            min,
            max,
            acquire_timeout: (acquire_timeout_ms > 0).then(|| Duration::from_millis(acquire_timeout_ms)),
            idle_timeout: idle_timeout_ms.map(Duration::from_millis),
            recycle_on_release: restore_on_release,
        };
        let seed: Vec<Arc<_>> = seed.unwrap_or_default().iter().map(|v| Arc::clone(&v.inner)).collect();
        let inner = RtPool::new(factory, cfg, seed).map_err(pool_err)?;
        Ok(Pool { inner })
    }

    /// Takes a VM, waiting (FIFO) while all are in use.
    fn acquire(&self, py: Python<'_>) -> PyResult<Vm> {
        let vm = py.allow_threads(|| self.inner.acquire()).map_err(pool_err)?;
        Ok(Vm { inner: vm })
    }

    /// Gives a VM back (with restore_on_release it is destroyed and replaced by a fresh
    /// restore in the background).
    fn release(&self, py: Python<'_>, vm: PyRef<'_, Vm>) {
        let item = Arc::clone(&vm.inner);
        py.allow_threads(|| self.inner.release(item))
    }

    /// Destroys a VM instead of returning it (e.g. it misbehaved).
    fn discard(&self, py: Python<'_>, vm: PyRef<'_, Vm>) {
        let item = Arc::clone(&vm.inner);
        py.allow_threads(|| self.inner.discard(item))
    }

    /// Counters: alive, in_use, idle, creating, waiting, min, max, plus recent latencies.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("alive", s.alive)?;
        d.set_item("in_use", s.in_use)?;
        d.set_item("idle", s.idle)?;
        d.set_item("creating", s.creating)?;
        d.set_item("waiting", s.waiting)?;
        d.set_item("min", s.min)?;
        d.set_item("max", s.max)?;
        d.set_item("recent_acquire_ms", s.recent_acquire_ms)?;
        d.set_item("recent_create_ms", s.recent_create_ms)?;
        Ok(d)
    }

    /// Releases every idle VM and refuses further acquires; VMs in use are destroyed when
    /// they come back.
    fn shutdown(&self, py: Python<'_>) {
        py.allow_threads(|| self.inner.shutdown())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Pool>()?;
    Ok(())
}
