//! Python classes for TCP channels through the agent (`TcpRelay`) and the `Vm` methods behind
//! `Vm.forward_to_host`, `Vm.stop_forward` and `Vm.tcp_relay` (runtime `tcp` module). Thin:
//! argument checks, the GIL released around every blocking call.

use std::net::TcpStream;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use supermachine_runtime::tcp::{self, Relay, RelayOptions, TcpChannel};
use supermachine_runtime::Vm as RtVm;

use crate::errors::IntoPy;

fn port(p: u32, what: &str) -> PyResult<u16> {
    match u16::try_from(p) {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(PyValueError::new_err(format!("{what} must be in 1..65535, not {p}"))),
    }
}

fn secs(t: f64, what: &str) -> PyResult<Duration> {
    if !t.is_finite() || t < 0.0 {
        return Err(PyValueError::new_err(format!("{what} must be a finite number of seconds ≥ 0")));
    }
    Ok(Duration::from_secs_f64(t))
}

pub fn forward_to_host(py: Python<'_>, vm: &RtVm, guest_port: u32, host_port: u32) -> PyResult<()> {
    let (g, h) = (port(guest_port, "guest_port")?, port(host_port, "host_port")?);
    py.allow_threads(|| tcp::forward_to_host(vm.conn(), g, h)).py_err()
}

pub fn stop_forward(py: Python<'_>, vm: &RtVm, guest_port: u32) -> PyResult<()> {
    let g = port(guest_port, "guest_port")?;
    py.allow_threads(|| tcp::stop_forward(vm.conn(), g)).py_err()
}

/// Connects to `guest_port` in the guest and relays it with a duplicate of socket `fd`.
pub fn tcp_relay(py: Python<'_>, vm: &RtVm, guest_port: u32, fd: RawFd, half_closed_idle: f64, timeout: f64) -> PyResult<TcpRelay> {
    let g = port(guest_port, "guest_port")?;
    let idle = secs(half_closed_idle, "half_closed_idle")?;
    let timeout = secs(timeout, "timeout")?;
    if fd < 0 {
        return Err(PyValueError::new_err("sock must be a connected socket (its fileno() is negative: closed?)"));
    }
    // SAFETY: the caller passes the fd of a socket object it keeps alive for this call; we
    // only duplicate it, and the duplicate is owned by the relay from here on.
    let owned: OwnedFd = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .map_err(|e| PyValueError::new_err(format!("cannot use the socket: {e}")))?;
    let stream = TcpStream::from(owned);
    let _ = stream.set_nonblocking(false);
    let relay = py
        .allow_threads(|| {
            let chan = TcpChannel::connect(vm.conn(), g, timeout)?;
            tcp::relay(chan, stream, RelayOptions { half_closed_idle: idle })
        })
        .py_err()?;
    Ok(TcpRelay { inner: relay })
}

/// One host connection relayed to a guest port (from `Vm.tcp_relay`).
#[pyclass(frozen, module = "supermachine_kernel._core")]
pub struct TcpRelay {
    inner: Relay,
}

#[pymethods]
impl TcpRelay {
    /// Waits until both directions ended (True) or `timeout` seconds passed (False).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let t = timeout.map(|t| secs(t, "timeout")).transpose()?;
        let slice = Duration::from_millis(200);
        let deadline = t.map(|t| std::time::Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            let step = left.map_or(slice, |l| l.min(slice));
            if py.allow_threads(|| self.inner.wait(Some(step))) {
                return Ok(true);
            }
            if left.is_some_and(|l| l <= step) {
                return Ok(false);
            }
            py.check_signals()?;
        }
    }

    /// Ends the connection at once, both sides. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.allow_threads(|| self.inner.abort());
    }

    /// True once both directions ended.
    #[getter]
    fn done(&self) -> bool {
        self.inner.is_done()
    }

    /// Bytes relayed (host → guest, guest → host).
    #[getter]
    fn bytes(&self) -> (u64, u64) {
        self.inner.bytes()
    }

    fn __repr__(&self) -> String {
        let (up, down) = self.inner.bytes();
        format!("<TcpRelay {} up={up} down={down}>", if self.inner.is_done() { "done" } else { "open" })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TcpRelay>()?;
    m.add("TCP_WINDOW", supermachine_protocol::TCP_WINDOW)?;
    Ok(())
}
