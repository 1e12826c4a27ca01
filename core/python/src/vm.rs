//! Python classes for VMs and their processes: `Vm`, `ExecChild`, `ExitStatus`, `ExecResult`.
//! Thin: argument conversion, the GIL released around every blocking call, errors mapped in
//! `errors.rs`. Long waits are sliced so Ctrl-C (KeyboardInterrupt) still works.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};

use supermachine_protocol::{ReadLimits, TtySize};
use supermachine_runtime::accel::Accel;
use supermachine_runtime::error::Error;
use supermachine_runtime::mux::Stream;
use supermachine_runtime::vm::{BootOptions, ExecOptions, GuestFiles};
use supermachine_runtime::{ExecChild as RtChild, RestoreOptions, Snapshot, SpawnOptions, Vm as RtVm};

use crate::errors::{to_py, IntoPy};

/// Slice of a blocking wait between checks for Python signals.
const SLICE: Duration = Duration::from_millis(200);

/// Runs a wait with the GIL released, in slices, checking for KeyboardInterrupt between them.
/// `f(Some(d))` must wait at most `d` and return `Error::Timeout` when nothing happened.
fn sliced<T: Send>(
    py: Python<'_>,
    timeout: Option<f64>,
    f: impl Fn(Option<Duration>) -> Result<T, Error> + Sync,
) -> PyResult<T> {
    let deadline = match timeout {
        Some(t) if t < 0.0 || !t.is_finite() => return Err(PyValueError::new_err("timeout must be a finite number ≥ 0")),
        Some(t) => Some(Instant::now() + Duration::from_secs_f64(t)),
        None => None,
    };
    loop {
        let slice = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
            None => SLICE,
        };
        match py.allow_threads(|| f(Some(slice))) {
            Err(Error::Timeout(m)) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    // Report the caller's timeout, not the slice.
                    let total = timeout.unwrap_or(0.0);
                    let m = m.replace(&format!("{:.3} s", slice.as_secs_f64()), &format!("{total:.3} s"));
                    return Err(to_py(Error::Timeout(m)));
                }
                py.check_signals()?;
            }
            r => return r.py_err(),
        }
    }
}

fn env_pairs(env: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    if let Some(d) = env {
        for (k, v) in d.iter() {
            out.push((k.extract::<String>()?, v.extract::<String>()?));
        }
    }
    Ok(out)
}

/// `tty=False | True | (rows, cols)`.
fn tty_size(tty: Option<&Bound<'_, PyAny>>) -> PyResult<Option<TtySize>> {
    let Some(t) = tty else { return Ok(None) };
    if t.is_none() {
        return Ok(None);
    }
    if let Ok(b) = t.extract::<bool>() {
        return Ok(b.then_some(TtySize { rows: 24, cols: 80 }));
    }
    if let Ok(tuple) = t.downcast::<PyTuple>() {
        if let Ok((rows, cols)) = tuple.extract::<(u16, u16)>() {
            return Ok(Some(TtySize { rows, cols }));
        }
    }
    Err(PyValueError::new_err("tty must be False, True or a (rows, cols) tuple"))
}

fn data_bytes(data: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = data.downcast::<PyString>() {
        return Ok(s.to_cow()?.as_bytes().to_vec());
    }
    if let Ok(b) = data.downcast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    data.extract::<Vec<u8>>()
        .map_err(|_| PyValueError::new_err("data must be bytes, bytearray, memoryview or str (for a host file use upload())"))
}

/// How a guest process ended.
#[pyclass(frozen, eq, module = "supermachine_kernel._core")]
#[derive(Clone, PartialEq)]
pub struct ExitStatus {
    /// Exit code, or -1 when killed by a signal or a timeout.
    #[pyo3(get)]
    exit_code: i32,
    /// The signal that ended it, if any.
    #[pyo3(get)]
    signal: Option<i32>,
    /// True when the agent killed it because its timeout expired.
    #[pyo3(get)]
    timed_out: bool,
    /// Peak resident set size (KiB).
    #[pyo3(get)]
    peak_rss_kib: u64,
}

impl From<supermachine_protocol::ExitStatus> for ExitStatus {
    fn from(s: supermachine_protocol::ExitStatus) -> Self {
        ExitStatus { exit_code: s.exit_code, signal: s.signal, timed_out: s.timed_out, peak_rss_kib: s.peak_rss_kib }
    }
}

#[pymethods]
impl ExitStatus {
    fn __repr__(&self) -> String {
        format!(
            "ExitStatus(exit_code={}, signal={}, timed_out={}, peak_rss_kib={})",
            self.exit_code,
            self.signal.map_or("None".into(), |s| s.to_string()),
            if self.timed_out { "True" } else { "False" },
            self.peak_rss_kib
        )
    }
}

/// The result of `Vm.exec`.
#[pyclass(frozen, module = "supermachine_kernel._core")]
pub struct ExecResult {
    stdout: Py<PyBytes>,
    stderr: Py<PyBytes>,
    status: ExitStatus,
}

#[pymethods]
impl ExecResult {
    #[getter]
    fn stdout(&self, py: Python<'_>) -> Py<PyBytes> {
        self.stdout.clone_ref(py)
    }
    #[getter]
    fn stderr(&self, py: Python<'_>) -> Py<PyBytes> {
        self.stderr.clone_ref(py)
    }
    #[getter]
    fn exit_code(&self) -> i32 {
        self.status.exit_code
    }
    #[getter]
    fn signal(&self) -> Option<i32> {
        self.status.signal
    }
    #[getter]
    fn timed_out(&self) -> bool {
        self.status.timed_out
    }
    #[getter]
    fn peak_rss_kib(&self) -> u64 {
        self.status.peak_rss_kib
    }
    #[getter]
    fn status(&self) -> ExitStatus {
        self.status.clone()
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        let show = |b: &Py<PyBytes>| {
            let bytes = b.bind(py).as_bytes();
            let s = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]).into_owned();
            format!("{s:?}{}", if bytes.len() > 60 { "…" } else { "" })
        };
        format!(
            "ExecResult(exit_code={}, timed_out={}, stdout={}, stderr={})",
            self.status.exit_code,
            if self.status.timed_out { "True" } else { "False" },
            show(&self.stdout),
            show(&self.stderr)
        )
    }
}

/// A process running in the guest (from `Vm.spawn`).
#[pyclass(frozen, module = "supermachine_kernel._core")]
pub struct ExecChild {
    inner: RtChild,
}

#[pymethods]
impl ExecChild {
    /// The guest's id for this process (stable across snapshot/restore).
    #[getter]
    fn id(&self) -> u32 {
        self.inner.id()
    }

    /// The process's pid inside the guest.
    #[getter]
    fn os_pid(&self) -> u32 {
        self.inner.os_pid()
    }

    /// Writes all of `data` to stdin; blocks under flow control.
    fn write_stdin(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = data_bytes(data)?;
        py.allow_threads(|| self.inner.write_stdin(&bytes)).py_err()
    }

    /// Closes stdin (the process reads EOF). Idempotent.
    fn close_stdin(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.inner.close_stdin()).py_err()
    }

    /// Up to `max_bytes` of stdout; b"" at EOF; TimeoutError if `timeout` seconds pass first.
    #[pyo3(signature = (max_bytes=65536, timeout=None))]
    fn read_stdout(&self, py: Python<'_>, max_bytes: usize, timeout: Option<f64>) -> PyResult<Py<PyBytes>> {
        let v = sliced(py, timeout, |t| self.inner.read(Stream::Stdout, max_bytes, t))?;
        Ok(PyBytes::new(py, &v).unbind())
    }

    /// Up to `max_bytes` of stderr; b"" at EOF; TimeoutError if `timeout` seconds pass first.
    #[pyo3(signature = (max_bytes=65536, timeout=None))]
    fn read_stderr(&self, py: Python<'_>, max_bytes: usize, timeout: Option<f64>) -> PyResult<Py<PyBytes>> {
        let v = sliced(py, timeout, |t| self.inner.read(Stream::Stderr, max_bytes, t))?;
        Ok(PyBytes::new(py, &v).unbind())
    }

    /// Sends a signal (e.g. `signal.SIGINT`) to the process.
    fn signal(&self, py: Python<'_>, signum: i32) -> PyResult<()> {
        py.allow_threads(|| self.inner.signal(signum)).py_err()
    }

    /// Resizes the process's terminal (tty processes only).
    fn resize(&self, py: Python<'_>, rows: u16, cols: u16) -> PyResult<()> {
        py.allow_threads(|| self.inner.resize(rows, cols)).py_err()
    }

    /// Waits for the exit; TimeoutError if `timeout` seconds pass first.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<ExitStatus> {
        sliced(py, timeout, |t| self.inner.wait(t)).map(ExitStatus::from)
    }

    /// The exit status if the process has exited, else None.
    fn poll(&self) -> PyResult<Option<ExitStatus>> {
        self.inner.poll().py_err().map(|s| s.map(ExitStatus::from))
    }

    fn __repr__(&self) -> String {
        format!("<ExecChild id={} os_pid={}>", self.inner.id(), self.inner.os_pid())
    }
}

/// A microVM (or an agent attached over a unix socket).
#[pyclass(frozen, module = "supermachine_kernel._core")]
pub struct Vm {
    pub(crate) inner: Arc<RtVm>,
}

#[pymethods]
impl Vm {
    /// Cold-boots a VM from guest files and waits for its agent.
    #[staticmethod]
    #[pyo3(signature = (kernel, initrd, rootfs, memory_mib=256, vcpus=1, boot_timeout=60.0, append=None, accel=None))]
    #[allow(clippy::too_many_arguments)]
    fn boot(
        py: Python<'_>,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        rootfs: PathBuf,
        memory_mib: u32,
        vcpus: u32,
        boot_timeout: f64,
        append: Option<Vec<String>>,
        accel: Option<String>,
    ) -> PyResult<Vm> {
        let mut opts = BootOptions::new(GuestFiles { kernel, initrd, rootfs });
        opts.memory_mib = memory_mib;
        opts.vcpus = vcpus;
        opts.boot_timeout = Duration::from_secs_f64(boot_timeout.max(0.1));
        opts.append = append.unwrap_or_default();
        opts.accel = match accel.as_deref() {
            None => None,
            Some(a) => Some(
                supermachine_runtime::accel::choose(Some(a), &supermachine_runtime::accel::HostCaps::probe())
                    .py_err()?,
            ),
        };
        let vm = py.allow_threads(|| RtVm::boot(&opts)).py_err()?;
        Ok(Vm { inner: Arc::new(vm) })
    }

    /// Connects to `supermachine-agent --listen-unix PATH` (no QEMU). For tests.
    #[staticmethod]
    #[pyo3(signature = (path, timeout=10.0))]
    fn attach_unix(py: Python<'_>, path: PathBuf, timeout: f64) -> PyResult<Vm> {
        let vm = py.allow_threads(|| RtVm::attach_unix(&path, Duration::from_secs_f64(timeout.max(0.0)))).py_err()?;
        Ok(Vm { inner: Arc::new(vm) })
    }

    /// Runs a process to completion and returns its output and exit status.
    #[pyo3(signature = (argv, stage_files=None, env=None, cwd=None, timeout_ms=None, tty=None, stdin=None, user=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        stage_files: Option<&Bound<'_, PyDict>>,
        env: Option<&Bound<'_, PyDict>>,
        cwd: Option<String>,
        timeout_ms: Option<u64>,
        tty: Option<&Bound<'_, PyAny>>,
        stdin: Option<&Bound<'_, PyAny>>,
        user: Option<String>,
    ) -> PyResult<ExecResult> {
        let mut staged = Vec::new();
        if let Some(d) = stage_files {
            for (k, v) in d.iter() {
                staged.push((k.extract::<String>()?, data_bytes(&v)?));
            }
        }
        let opts = ExecOptions {
            spawn: SpawnOptions { argv, env: env_pairs(env)?, cwd, user, tty: tty_size(tty)?, timeout_ms },
            stage_files: staged,
            stdin: stdin.filter(|s| !s.is_none()).map(data_bytes).transpose()?,
        };
        let r = py.allow_threads(|| self.inner.exec(&opts)).py_err()?;
        Ok(ExecResult {
            stdout: PyBytes::new(py, &r.stdout).unbind(),
            stderr: PyBytes::new(py, &r.stderr).unbind(),
            status: r.status.into(),
        })
    }

    /// Starts a process and returns its handle (streaming mode).
    #[pyo3(signature = (argv, env=None, cwd=None, timeout_ms=None, tty=None, user=None))]
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Option<&Bound<'_, PyDict>>,
        cwd: Option<String>,
        timeout_ms: Option<u64>,
        tty: Option<&Bound<'_, PyAny>>,
        user: Option<String>,
    ) -> PyResult<ExecChild> {
        let opts = SpawnOptions { argv, env: env_pairs(env)?, cwd, user, tty: tty_size(tty)?, timeout_ms };
        let child = py.allow_threads(|| self.inner.spawn(&opts)).py_err()?;
        Ok(ExecChild { inner: child })
    }

    /// A handle to an existing guest process by id (e.g. after a restore).
    fn attach_process(&self, id: u32) -> PyResult<ExecChild> {
        Ok(ExecChild { inner: self.inner.attach_process(id).py_err()? })
    }

    /// Writes a guest file (streamed). `data`: bytes-like or str (UTF-8).
    #[pyo3(signature = (path, data, mode=0o644))]
    fn write_file(&self, py: Python<'_>, path: String, data: &Bound<'_, PyAny>, mode: u32) -> PyResult<()> {
        let bytes = data_bytes(data)?;
        py.allow_threads(|| self.inner.write_file(&path, &bytes[..], mode)).py_err().map(|_| ())
    }

    /// Copies a host file into the guest (streamed). `mode` defaults to the host file's mode.
    #[pyo3(signature = (host_path, guest_path, mode=None))]
    fn upload(&self, py: Python<'_>, host_path: PathBuf, guest_path: String, mode: Option<u32>) -> PyResult<u64> {
        py.allow_threads(|| self.inner.upload(&host_path, &guest_path, mode)).py_err()
    }

    /// Reads a whole guest file. `max_bytes` / `follow_symlinks=False`: a limited read (regular
    /// files only; see `Vm.download`).
    #[pyo3(signature = (path, max_bytes=None, follow_symlinks=true, timeout=None))]
    fn read_file(&self, py: Python<'_>, path: String, max_bytes: Option<u64>, follow_symlinks: bool, timeout: Option<f64>) -> PyResult<Py<PyBytes>> {
        let limits = read_limits(max_bytes, follow_symlinks);
        let deadline = deadline_in(timeout);
        let v = py.allow_threads(|| self.inner.read_file(&path, limits, deadline)).py_err()?;
        Ok(PyBytes::new(py, &v).unbind())
    }

    /// Copies a guest file to a host path (streamed; written atomically). With `max_bytes` or
    /// `follow_symlinks=False` the read is limited: regular files only (a FIFO, device or
    /// socket is a GuestError, never a hang), a final symlink refused unless followed, more
    /// than `max_bytes` a GuestError of kind "limit" (nothing is written). Limited reads need
    /// an agent that lists "read_limits" in `agent_features` (else ValueError). Past
    /// `timeout` seconds the read is abandoned (TimeoutError).
    #[pyo3(signature = (guest_path, host_path, max_bytes=None, follow_symlinks=true, timeout=None))]
    fn download(&self, py: Python<'_>, guest_path: String, host_path: PathBuf, max_bytes: Option<u64>, follow_symlinks: bool, timeout: Option<f64>) -> PyResult<u64> {
        let limits = read_limits(max_bytes, follow_symlinks);
        let deadline = deadline_in(timeout);
        py.allow_threads(|| self.inner.download(&guest_path, &host_path, limits, deadline)).py_err()
    }

    /// Like `download`, into open file descriptor `fd` (written from its offset; not closed,
    /// not truncated: on an error part of the file may be there). Returns the bytes written.
    #[pyo3(signature = (guest_path, fd, max_bytes=None, follow_symlinks=true, timeout=None))]
    fn download_fd(&self, py: Python<'_>, guest_path: String, fd: i32, max_bytes: Option<u64>, follow_symlinks: bool, timeout: Option<f64>) -> PyResult<u64> {
        use std::io::Write;
        use std::os::fd::{BorrowedFd, OwnedFd};
        if fd < 0 {
            return Err(PyValueError::new_err(format!("fd must be an open file descriptor, got {fd}")));
        }
        // SAFETY: the caller passes an fd it keeps open for this call; it is only duplicated here.
        let owned: OwnedFd = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        let limits = read_limits(max_bytes, follow_symlinks);
        let deadline = deadline_in(timeout);
        py.allow_threads(|| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::from(owned));
            let (n, _) = self.inner.read_file_into(&guest_path, &mut w, limits, deadline)?;
            w.flush().map_err(|e| Error::io("write the downloaded data", e))?;
            Ok::<u64, Error>(n)
        })
        .py_err()
    }

    /// What the guest agent announced it understands ("read_limits", ...); empty for agents
    /// baked before the list existed.
    #[getter]
    fn agent_features(&self) -> Vec<String> {
        self.inner.agent_features()
    }

    /// Round trip to the agent.
    #[pyo3(signature = (timeout=None))]
    fn ping(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        py.allow_threads(|| self.inner.conn().ping(deadline)).py_err()
    }

    /// Processes the guest agent tracks: list of dicts (id, os_pid, argv, running, tty).
    fn processes<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let list = py.allow_threads(|| self.inner.conn().list_processes()).py_err()?;
        list.into_iter()
            .map(|p| {
                let d = PyDict::new(py);
                d.set_item("id", p.id)?;
                d.set_item("os_pid", p.os_pid)?;
                d.set_item("argv", p.argv)?;
                d.set_item("running", p.running)?;
                d.set_item("tty", p.tty)?;
                Ok(d)
            })
            .collect()
    }

    /// Snapshots the running VM into `dest` (a new directory) and lets it run on. Returns
    /// the snapshot's metadata (with "path").
    #[pyo3(signature = (dest, labels=None))]
    fn snapshot<'py>(
        &self,
        py: Python<'py>,
        dest: PathBuf,
        labels: Option<std::collections::BTreeMap<String, String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let snap = py.allow_threads(|| self.inner.snapshot(&dest, labels.unwrap_or_default())).py_err()?;
        snapshot_dict(py, &snap)
    }

    /// Like `snapshot`, but keeps only the RAM pages that differ from the template snapshot
    /// this VM was restored from (which must stay in place to restore it). Raises
    /// SnapshotError, the VM running on, when there is no usable base (take a full one then).
    #[pyo3(signature = (dest, labels=None))]
    fn snapshot_incremental<'py>(
        &self,
        py: Python<'py>,
        dest: PathBuf,
        labels: Option<std::collections::BTreeMap<String, String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let snap = py.allow_threads(|| self.inner.snapshot_incremental(&dest, labels.unwrap_or_default())).py_err()?;
        snapshot_dict(py, &snap)
    }

    /// Starts a VM from a snapshot directory (verified once per process).
    #[staticmethod]
    #[pyo3(signature = (snapshot, timeout=30.0))]
    fn restore(py: Python<'_>, snapshot: PathBuf, timeout: f64) -> PyResult<Vm> {
        let vm = py
            .allow_threads(|| {
                let snap = Snapshot::open(&snapshot)?;
                let opts = RestoreOptions { timeout: Duration::from_secs_f64(timeout.max(0.1)), ..Default::default() };
                RtVm::restore(&snap, &opts)
            })
            .py_err()?;
        Ok(Vm { inner: Arc::new(vm) })
    }

    /// Drops the channel to the agent and opens a new one; processes, their unread output and
    /// every handle survive. Returns the guest's generation (Hellos seen).
    #[pyo3(signature = (timeout=30.0))]
    fn reconnect(&self, py: Python<'_>, timeout: f64) -> PyResult<u64> {
        py.allow_threads(|| self.inner.reconnect(Duration::from_secs_f64(timeout.max(0.1))))
            .py_err()
            .map(|w| w.generation)
    }

    /// Freezes the guest (agent quiet, vCPUs stopped): it uses no CPU until `resume`.
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.inner.pause()).py_err()
    }

    /// Continues a paused guest with a new agent channel (clock set, RNG reseeded, generation
    /// bumped as after a restore). Returns the new generation.
    #[pyo3(signature = (timeout=30.0))]
    fn resume(&self, py: Python<'_>, timeout: f64) -> PyResult<u64> {
        py.allow_threads(|| self.inner.resume(Duration::from_secs_f64(timeout.max(0.1)))).py_err()
    }

    /// The snapshot this VM was restored from (None for cold boots).
    #[getter]
    fn restored_from(&self) -> Option<String> {
        self.inner.restored_from().map(String::from)
    }

    /// The agent listens on 127.0.0.1:guest_port in the guest; each connection becomes a
    /// channel the host connects to 127.0.0.1:host_port. Idempotent (re-attaches).
    fn forward_to_host(&self, py: Python<'_>, guest_port: u32, host_port: u32) -> PyResult<()> {
        crate::tcp::forward_to_host(py, &self.inner, guest_port, host_port)
    }

    /// Stops a forward (connections in flight go on).
    fn stop_forward(&self, py: Python<'_>, guest_port: u32) -> PyResult<()> {
        crate::tcp::stop_forward(py, &self.inner, guest_port)
    }

    /// Connects to 127.0.0.1:guest_port in the guest and relays it with socket `fd`.
    #[pyo3(signature = (guest_port, fd, half_closed_idle=120.0, timeout=30.0))]
    fn tcp_relay(&self, py: Python<'_>, guest_port: u32, fd: i32, half_closed_idle: f64, timeout: f64) -> PyResult<crate::tcp::TcpRelay> {
        crate::tcp::tcp_relay(py, &self.inner, guest_port, fd, half_closed_idle, timeout)
    }

    /// Kills QEMU and removes the work dir. Idempotent.
    fn release(&self, py: Python<'_>) {
        py.allow_threads(|| self.inner.release())
    }

    /// True until the VM died or was released.
    #[getter]
    fn alive(&self) -> bool {
        self.inner.is_alive()
    }

    /// QEMU's pid (None for attached agents and after release).
    #[getter]
    fn qemu_pid(&self) -> Option<u32> {
        self.inner.qemu_pid()
    }

    /// The last `max_bytes` of the guest's serial console (the host keeps at most 64 KiB in
    /// memory; None for attached agents).
    #[pyo3(signature = (max_bytes = 65536))]
    fn console_tail(&self, max_bytes: usize) -> Option<String> {
        self.inner.console_tail(max_bytes)
    }

    /// (bytes the guest wrote to its serial console in all, bytes the host keeps); None for
    /// attached agents.
    fn console_sizes(&self) -> Option<(u64, usize)> {
        self.inner.console_sizes()
    }

    /// The per-VM work dir (None for attached agents and after release).
    #[getter]
    fn workdir(&self) -> Option<PathBuf> {
        self.inner.workdir()
    }

    /// "kvm" or "tcg" (None for attached agents).
    #[getter]
    fn accel(&self) -> Option<&'static str> {
        self.inner.accel().map(Accel::name)
    }

    /// The guest's boot id (random per cold boot, shared by restores of one snapshot).
    #[getter]
    fn boot_id(&self) -> String {
        self.inner.welcome().boot_id.clone()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> bool {
        self.release(py);
        false
    }

    fn __repr__(&self) -> String {
        match (self.inner.qemu_pid(), self.inner.is_alive()) {
            (Some(pid), true) => format!("<Vm qemu_pid={pid}>"),
            (None, true) => "<Vm attached>".into(),
            _ => "<Vm released>".into(),
        }
    }
}

/// A snapshot's metadata as a dict (plus "path").
fn snapshot_dict<'py>(py: Python<'py>, snap: &Snapshot) -> PyResult<Bound<'py, PyAny>> {
    let mut v = serde_json::to_value(&snap.meta).map_err(|e| PyValueError::new_err(e.to_string()))?;
    v["path"] = serde_json::Value::String(snap.dir.display().to_string());
    let text = serde_json::to_string(&v).map_err(|e| PyValueError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Opens and verifies a snapshot directory; returns its metadata (with "path"). With
/// `check_host`, also refuses one this host cannot restore (other QEMU, accelerator, image
/// files or command line), with the message a restore would give.
#[pyfunction]
#[pyo3(signature = (path, check_host=false))]
pub fn snapshot_info(py: Python<'_>, path: PathBuf, check_host: bool) -> PyResult<Bound<'_, PyAny>> {
    let snap = py
        .allow_threads(|| {
            let snap = Snapshot::open(&path)?;
            if check_host {
                snap.check_host(None)?;
            }
            Ok::<_, supermachine_runtime::Error>(snap)
        })
        .py_err()?;
    snapshot_dict(py, &snap)
}

/// What changes when any file of snapshot `path` is rewritten or damaged (the runtime's own
/// stamp for trusting an earlier verification); cheap: three stats.
#[pyfunction]
pub fn snapshot_files_stamp(path: PathBuf) -> String {
    supermachine_runtime::snapshot::dir_stamp(&path)
}

/// Starts reading snapshot `path`'s memory file into the page cache in the background (holes
/// too), so a later snapshot of a VM restored from it does not fault them in one by one.
#[pyfunction]
pub fn prefetch_snapshot_memory(path: PathBuf) {
    supermachine_runtime::snapshot::memory::prefetch_memory(&path);
}

/// The process is ending: removes the work dirs of every VM it still has (whatever their
/// state) and refuses new VMs; returns how many were removed (workdir.rs).
#[pyfunction]
pub fn remove_work_dirs_at_exit() -> usize {
    supermachine_runtime::workdir::remove_all_at_exit()
}

/// Host accelerator that would be used now ("kvm" or "tcg"), honouring SUPERMACHINE_ACCEL.
#[pyfunction]
pub fn detect_accel() -> PyResult<&'static str> {
    supermachine_runtime::accel::detect().py_err().map(Accel::name)
}

/// Path of the QEMU binary that would be used, honouring SUPERMACHINE_QEMU.
#[pyfunction]
pub fn find_qemu() -> PyResult<PathBuf> {
    supermachine_runtime::qemu::find_qemu().py_err()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Vm>()?;
    m.add_class::<ExecChild>()?;
    m.add_class::<ExitStatus>()?;
    m.add_class::<ExecResult>()?;
    m.add_function(wrap_pyfunction!(detect_accel, m)?)?;
    m.add_function(wrap_pyfunction!(find_qemu, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot_info, m)?)?;
    m.add_function(wrap_pyfunction!(prefetch_snapshot_memory, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot_files_stamp, m)?)?;
    m.add_function(wrap_pyfunction!(remove_work_dirs_at_exit, m)?)?;
    Ok(())
}

/// The protocol's read limits for the Python keywords (None: the unlimited version-1 read).
fn read_limits(max_bytes: Option<u64>, follow_symlinks: bool) -> Option<ReadLimits> {
    (max_bytes.is_some() || !follow_symlinks).then_some(ReadLimits { max_bytes, follow_symlinks })
}

/// `timeout` seconds from now (None: no deadline).
fn deadline_in(timeout: Option<f64>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.clamp(0.0, 1e9)))
}
