//! A VM: one QEMU process (or, for tests, an agent on a unix socket), its work dir, and the
//! connection to its agent. Operations: exec (collect), spawn (streaming), file transfer,
//! pause/resume, release.
//!
//! Cold boot: launch QEMU → connect to the agent port (retrying until QEMU listens) → Hello →
//! Welcome before the boot deadline. If QEMU exits or the guest never answers, the error
//! carries QEMU's exit status and the tail of the guest console (kept in memory, capped:
//! [`crate::console`]). Restoring from a snapshot (`snapshot/restore.rs`) goes through the
//! same `Vm::start`, with the state fed over QMP before the Welcome is awaited.
//!
//! Set `SUPERMACHINE_TRACE=1` to print the phases of every boot/restore with timings.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use supermachine_protocol::{Control, ErrorKind, ExitStatus, ReadLimits, FEATURE_READ_LIMITS};

use crate::accel::{self, Accel};
use crate::child::{ExecChild, SpawnOptions};
use crate::conn::{connect_retry, Conn, Ending, WelcomeInfo};
use crate::console::{OutputTail, CONSOLE_CAP, STDERR_CAP};
use crate::error::{Error, Result};
use crate::mux::{channel_of, FileChunk, ReqKind};
use crate::qemu::{self, QemuConfig, RamFile};
use crate::qmp::Qmp;
use crate::workdir::WorkDir;

/// Prints a phase timing to stderr when `SUPERMACHINE_TRACE` is set (for profiling boots
/// and restores).
pub(crate) fn trace(t0: Instant, what: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("SUPERMACHINE_TRACE").is_some_and(|v| !v.is_empty())) {
        eprintln!("[supermachine {:8.2} ms] {what}", t0.elapsed().as_secs_f64() * 1000.0);
    }
}

/// Default boot deadline: cold boot is ~4.4 s under TCG; leave room for a loaded host.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest files a VM boots from.
#[derive(Clone, Debug)]
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: PathBuf,
}

/// How to cold-boot a VM.
#[derive(Clone, Debug)]
pub struct BootOptions {
    pub files: GuestFiles,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Extra kernel command-line words.
    pub append: Vec<String>,
    pub boot_timeout: Duration,
    /// None: auto-detect (honouring SUPERMACHINE_ACCEL).
    pub accel: Option<Accel>,
    /// None: find QEMU (honouring SUPERMACHINE_QEMU).
    pub qemu: Option<PathBuf>,
    pub tcg_tb_size_mib: Option<u32>,
    /// Where to put the RAM file (default: the work dir).
    pub ram_path: Option<PathBuf>,
}

impl BootOptions {
    pub fn new(files: GuestFiles) -> BootOptions {
        BootOptions {
            files,
            memory_mib: 256,
            vcpus: 1,
            append: Vec::new(),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            accel: None,
            qemu: None,
            tcg_tb_size_mib: None,
            ram_path: None,
        }
    }
}

/// The result of a collect-mode exec.
#[derive(Clone, Debug)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// Options for [`Vm::exec`].
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    pub spawn: SpawnOptions,
    /// Files written (mode 0644) before the process starts.
    pub stage_files: Vec<(String, Vec<u8>)>,
    /// Bytes fed to stdin (then closed). None: stdin is closed at once.
    pub stdin: Option<Vec<u8>>,
}

/// The QEMU process behind a VM, shared with the connection's death hook.
pub(crate) struct QemuProc {
    child: Mutex<Option<Child>>,
    /// QEMU's exit status, once reaped.
    status: Mutex<Option<std::process::ExitStatus>>,
    pub(crate) config: QemuConfig,
    /// The last bytes of the guest's serial console and of QEMU's stderr.
    console: OutputTail,
    stderr: OutputTail,
    released: AtomicBool,
}

impl QemuProc {
    fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|c| c.id())
    }

    /// Reaps QEMU if it exited; returns its status.
    pub(crate) fn try_status(&self) -> Option<std::process::ExitStatus> {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if st.is_none() {
            if let Some(c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    *st = Some(s);
                }
            }
        }
        *st
    }

    /// Waits up to `within` for QEMU to exit.
    pub(crate) fn status_within(&self, within: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs QEMU and reaps it.
    pub(crate) fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = child.as_mut() {
            let _ = c.kill();
            if let Ok(s) = c.wait() {
                *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
            }
        }
    }

    /// "QEMU exited with …", the console tail and QEMU's own complaints.
    pub(crate) fn diagnosis(&self, status: Option<std::process::ExitStatus>) -> String {
        use std::os::unix::process::ExitStatusExt;
        let mut s = match status {
            Some(st) => match (st.code(), st.signal()) {
                (Some(c), _) => format!("QEMU exited with status {c}"),
                (_, Some(sig)) => format!("QEMU was killed by signal {sig}"),
                _ => format!("QEMU ended ({st})"),
            },
            None => "QEMU is still running".into(),
        };
        let qemu_err = self.stderr.tail(2000);
        if !qemu_err.trim().is_empty() {
            s.push_str(&format!("\nQEMU said:\n{}", qemu_err.trim_end()));
        }
        let console = self.console.tail(3000);
        if !console.trim().is_empty() {
            s.push_str(&format!("\nlast guest console lines:\n{}", console.trim_end()));
        } else {
            s.push_str("\n(the guest console is empty)");
        }
        s
    }
}

/// Feeds an incoming migration (a snapshot's state) to a QEMU started with `-incoming defer`.
pub(crate) type FeedState<'a> = dyn Fn(&mut Qmp) -> Result<()> + 'a;

/// A running VM (or an attached agent).
pub struct Vm {
    conn: Conn,
    qemu: Option<Arc<QemuProc>>,
    workdir: Mutex<Option<WorkDir>>,
    welcome: WelcomeInfo,
    released: AtomicBool,
    accel: Option<Accel>,
    /// The QEMU monitor, connected on first use (snapshots).
    qmp: Mutex<Option<Qmp>>,
    /// The snapshot this VM was restored from.
    restored_from: Option<String>,
    /// The socket of an attached agent (no QEMU).
    unix_path: Option<PathBuf>,
}

impl Vm {
    /// Cold-boots a VM and waits for its agent.
    pub fn boot(opts: &BootOptions) -> Result<Vm> {
        let files = [Some(("kernel", &opts.files.kernel)), opts.files.initrd.as_ref().map(|i| ("initrd", i)), Some(("root image", &opts.files.rootfs))];
        for (what, p) in files.into_iter().flatten() {
            if !p.is_file() {
                return Err(Error::ImageNotFound(format!(
                    "guest {what} {} does not exist; rebuild the image (supermachine-kernel image build)",
                    p.display()
                )));
            }
        }
        if opts.memory_mib < 64 || opts.vcpus == 0 {
            return Err(Error::InvalidArgument(format!(
                "memory_mib must be ≥ 64 and vcpus ≥ 1 (got {} MiB, {} vcpus)",
                opts.memory_mib, opts.vcpus
            )));
        }
        let qemu_bin = match &opts.qemu {
            Some(q) => q.clone(),
            None => qemu::find_qemu()?,
        };
        let accel = match opts.accel {
            Some(a) => a,
            None => accel::detect()?,
        };
        let workdir = WorkDir::create("vm")?;
        let config = QemuConfig {
            qemu: qemu_bin,
            accel,
            memory_mib: opts.memory_mib,
            vcpus: opts.vcpus,
            kernel: opts.files.kernel.clone(),
            initrd: opts.files.initrd.clone(),
            rootfs: opts.files.rootfs.clone(),
            append_extra: opts.append.clone(),
            tsc_khz: qemu::host_tsc_khz(),
            ram: RamFile { path: opts.ram_path.clone().unwrap_or_else(|| workdir.join("ram")), share: true },
            agent_sock: workdir.join("agent.sock"),
            qmp_sock: workdir.join("qmp.sock"),
            incoming: None,
            tcg_tb_size_mib: opts.tcg_tb_size_mib.or_else(qemu::default_tb_size_mib),
        };
        let deadline = Instant::now() + opts.boot_timeout;
        Self::start(config, workdir, deadline, opts.boot_timeout, None, None)
    }

    /// Launches QEMU with `config` and connects to its agent before `deadline`.
    pub(crate) fn start(
        config: QemuConfig,
        workdir: WorkDir,
        deadline: Instant,
        budget: Duration,
        restored_from: Option<String>,
        incoming: Option<&FeedState>,
    ) -> Result<Vm> {
        let accel = config.accel;
        let t0 = Instant::now();
        let proc_ = Self::launch(config)?;
        trace(t0, "QEMU spawned");
        let started = (|| {
            // An incoming migration (restore) is fed over QMP before the guest runs; the agent
            // connection (and our Hello) is opened first, so the guest finds it waiting.
            let mut conn = None;
            let qmp = match incoming {
                None => None,
                Some(feed) => {
                    let mut qmp = Qmp::connect(&proc_.config.qmp_sock, deadline, || match proc_.try_status() {
                        Some(st) => Err(Error::VmDied(format!("QEMU exited at start.\n{}", proc_.diagnosis(Some(st))))),
                        None => Ok(()),
                    })
                    .map_err(|e| match proc_.status_within(Duration::from_millis(500)) {
                        Some(st) => Error::VmDied(format!("QEMU exited while restoring.\n{}", proc_.diagnosis(Some(st)))),
                        None => e,
                    })?;
                    trace(t0, "QMP connected");
                    conn = Some(Self::open_agent(&proc_, deadline, budget)?);
                    trace(t0, "agent socket connected, hello sent");
                    feed(&mut qmp).map_err(|e| match proc_.status_within(Duration::from_millis(500)) {
                        Some(st) => Error::Snapshot(format!("restoring failed: {e}.\n{}", proc_.diagnosis(Some(st)))),
                        None => e,
                    })?;
                    trace(t0, "state loaded, guest running");
                    Some(qmp)
                }
            };
            let conn = match conn {
                Some(c) => c,
                None => Self::open_agent(&proc_, deadline, budget)?,
            };
            let welcome = Self::await_guest(&proc_, &conn, deadline, budget)?;
            trace(t0, "agent welcomed");
            Ok((conn, welcome, qmp))
        })();
        match started {
            Ok((conn, welcome, qmp)) => Ok(Vm {
                conn,
                qemu: Some(proc_),
                workdir: Mutex::new(Some(workdir)),
                welcome,
                released: AtomicBool::new(false),
                accel: Some(accel),
                qmp: Mutex::new(qmp),
                restored_from,
                unix_path: None,
            }),
            Err(e) => {
                proc_.released.store(true, Ordering::SeqCst);
                proc_.kill();
                Err(e)
            }
        }
    }

    pub(crate) fn qemu_proc(&self) -> Option<&Arc<QemuProc>> {
        self.qemu.as_ref()
    }

    /// The QEMU monitor, connected on first use.
    pub(crate) fn qmp(&self) -> Result<std::sync::MutexGuard<'_, Option<Qmp>>> {
        let mut g = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let proc_ = self.qemu.as_ref().ok_or_else(|| Error::InvalidArgument("no QEMU behind this VM".into()))?;
            let qmp = Qmp::connect(&proc_.config.qmp_sock, Instant::now() + Duration::from_secs(10), || {
                match proc_.try_status() {
                    Some(_) => Err(Error::VmDied("QEMU has exited".into())),
                    None => Ok(()),
                }
            })?;
            *g = Some(qmp);
        }
        Ok(g)
    }

    /// The snapshot this VM was restored from, if any.
    pub fn restored_from(&self) -> Option<&str> {
        self.restored_from.as_deref()
    }

    pub(crate) fn launch(config: QemuConfig) -> Result<Arc<QemuProc>> {
        let mut child = qemu::launch(&config)?;
        fn follow(name: &str, pipe: Option<impl Read + Send + 'static>, cap: usize) -> Result<OutputTail> {
            match pipe {
                Some(p) => OutputTail::follow(name, p, cap),
                None => Ok(OutputTail::empty(cap)),
            }
        }
        let tails = follow("qemu-console", child.stdout.take(), CONSOLE_CAP)
            .and_then(|c| Ok((c, follow("qemu-stderr", child.stderr.take(), STDERR_CAP)?)));
        let (console, stderr) = match tails {
            Ok(t) => t,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Arc::new(QemuProc {
            child: Mutex::new(Some(child)),
            status: Mutex::new(None),
            config,
            console,
            stderr,
            released: AtomicBool::new(false),
        }))
    }

    /// Connects to a launched QEMU's agent port and sends Hello (the Welcome is awaited with
    /// [`Vm::await_guest`]).
    pub(crate) fn open_agent(proc_: &Arc<QemuProc>, deadline: Instant, budget: Duration) -> Result<Conn> {
        let alive = || match proc_.try_status() {
            Some(st) => Err(Error::VmDied(format!("QEMU exited during boot.\n{}", proc_.diagnosis(Some(st))))),
            None => Ok(()),
        };
        let stream = match connect_retry(&proc_.config.agent_sock, deadline, alive) {
            Ok(s) => s,
            Err(Error::Timeout(_)) => {
                return Err(Error::Timeout(format!(
                    "QEMU did not open the agent socket within {:.0} s.\n{}",
                    budget.as_secs_f64(),
                    proc_.diagnosis(proc_.try_status())
                )))
            }
            Err(e) => return Err(e),
        };
        let hook_proc = Arc::clone(proc_);
        let hook: crate::conn::DeathHook = Box::new(move |ending| death_error(&hook_proc, ending));
        Conn::open(stream, Some(hook))
    }

    /// Waits for the guest agent's Welcome before `deadline`.
    pub(crate) fn await_guest(proc_: &QemuProc, conn: &Conn, deadline: Instant, budget: Duration) -> Result<WelcomeInfo> {
        match conn.await_welcome(deadline) {
            Ok(w) => Ok(w),
            Err(Error::Timeout(_)) => Err(Error::Timeout(format!(
                "the guest did not finish booting within {:.0} s (no answer from its agent); \
                 raise boot_timeout if the host is very slow.\n{}",
                budget.as_secs_f64(),
                proc_.diagnosis(proc_.try_status())
            ))),
            Err(e) => Err(e),
        }
    }

    /// Connects to an agent serving on a unix socket (`supermachine-agent --listen-unix PATH`),
    /// without QEMU. For tests.
    pub fn attach_unix(path: &Path, timeout: Duration) -> Result<Vm> {
        let deadline = Instant::now() + timeout;
        let stream = connect_retry(path, deadline, || Ok(()))?;
        let (conn, welcome) = Conn::establish(stream, deadline, None)?;
        Ok(Vm {
            conn,
            qemu: None,
            workdir: Mutex::new(None),
            welcome,
            released: AtomicBool::new(false),
            accel: None,
            qmp: Mutex::new(None),
            restored_from: None,
            unix_path: Some(path.to_path_buf()),
        })
    }

    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    pub fn welcome(&self) -> &WelcomeInfo {
        &self.welcome
    }

    /// What the agent on the current connection announced it understands (see
    /// `supermachine_protocol::AGENT_FEATURES`); empty for agents that predate the list.
    pub fn agent_features(&self) -> Vec<String> {
        self.conn.lock().features().to_vec()
    }

    pub fn accel(&self) -> Option<Accel> {
        self.accel
    }

    /// QEMU's pid (None for attached agents or after release).
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu.as_ref().and_then(|q| q.pid())
    }

    /// The last `max_bytes` of the guest's serial console, as text starting at a line (None
    /// for attached agents). Kept in memory, capped at [`CONSOLE_CAP`]; readable after QEMU exits.
    pub fn console_tail(&self, max_bytes: usize) -> Option<String> {
        self.qemu.as_ref().map(|q| q.console.tail(max_bytes))
    }

    /// (bytes the guest wrote to its serial console in all, bytes kept now); None for
    /// attached agents.
    pub fn console_sizes(&self) -> Option<(u64, usize)> {
        self.qemu.as_ref().map(|q| q.console.sizes())
    }

    /// The work dir (None for attached agents or after release).
    pub fn workdir(&self) -> Option<PathBuf> {
        self.workdir.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|w| w.path().to_path_buf())
    }

    fn check(&self) -> Result<()> {
        if self.released.load(Ordering::SeqCst) {
            return Err(Error::Released);
        }
        Ok(())
    }

    /// Starts a process (streaming mode).
    pub fn spawn(&self, opts: &SpawnOptions) -> Result<ExecChild> {
        self.check()?;
        ExecChild::spawn(&self.conn, opts)
    }

    /// Re-attaches to a guest process by id.
    pub fn attach_process(&self, id: u32) -> Result<ExecChild> {
        self.check()?;
        ExecChild::attach(&self.conn, id)
    }

    /// Runs a process to completion and collects its output.
    pub fn exec(&self, opts: &ExecOptions) -> Result<ExecResult> {
        self.check()?;
        for (path, data) in &opts.stage_files {
            self.write_file(path, &data[..], 0o644)?;
        }
        let child = ExecChild::spawn(&self.conn, &opts.spawn)?;
        let (stdout, stderr, status) = match &opts.stdin {
            None => {
                child.close_stdin()?;
                child.collect()?
            }
            Some(input) => std::thread::scope(|s| {
                let writer = s.spawn(|| {
                    // A process that exits without reading all of its input is not an error.
                    match child.write_stdin(input) {
                        Ok(()) | Err(Error::BrokenPipe(_)) => {}
                        Err(e) => return Err(e),
                    }
                    child.close_stdin()
                });
                let collected = child.collect();
                let wrote = writer.join().unwrap_or_else(|_| Err(Error::InvalidArgument("stdin writer panicked".into())));
                let collected = collected?;
                match wrote {
                    Ok(()) | Err(Error::BrokenPipe(_)) => Ok(collected),
                    Err(e) => Err(e),
                }
            })?,
        };
        Ok(ExecResult { stdout, stderr, status })
    }

    /// Writes a guest file from `data`, streamed in chunks.
    pub fn write_file(&self, path: &str, data: impl Read, mode: u32) -> Result<u64> {
        self.check()?;
        let conn = &self.conn;
        let req = conn.lock().begin(ReqKind::WriteFile)?;
        let sent = conn
            .send_control(&Control::WriteFile { req, path: path.to_string(), mode })
            .and_then(|()| conn.send_stream(channel_of(req), data));
        let n = match sent {
            Ok(n) => n,
            Err(e) => {
                conn.lock().abandon(req);
                return Err(e);
            }
        };
        conn.await_reply(req, None)?;
        Ok(n)
    }

    /// Uploads a host file to the guest.
    pub fn upload(&self, host_path: &Path, guest_path: &str, mode: Option<u32>) -> Result<u64> {
        use std::os::unix::fs::PermissionsExt;
        let f = fs::File::open(host_path).map_err(|e| Error::io(format!("open {}", host_path.display()), e))?;
        let mode = match mode {
            Some(m) => m,
            None => f.metadata().map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644),
        };
        self.write_file(guest_path, std::io::BufReader::with_capacity(1 << 20, f), mode)
    }

    /// Reads a guest file into `out`, streamed in chunks. Returns (bytes, mode).
    ///
    /// With `limits` (agents that list `read_limits` in their Welcome; older ones get an
    /// InvalidArgument error before anything is sent): regular files only, a final symlink
    /// refused unless allowed, and more than `max_bytes` an error. The cap is also held here:
    /// a guest that announces or sends more gets an error and at most `max_bytes` reach `out`.
    /// Past `deadline` the read is abandoned with a Timeout error.
    pub fn read_file_into(&self, path: &str, out: &mut dyn Write, limits: Option<ReadLimits>, deadline: Option<Instant>) -> Result<(u64, u32)> {
        self.check()?;
        let conn = &self.conn;
        if limits.is_some() && !conn.lock().has_feature(FEATURE_READ_LIMITS) {
            return Err(Error::InvalidArgument(format!(
                "cannot read {path:?} with a size cap or without following symlinks: this VM's guest agent predates \
                 limited reads; rebuild its snapshot (supermachine-kernel prepare) or read without limits"
            )));
        }
        let cap = limits.and_then(|l| l.max_bytes);
        let over = |what: &str| Error::Guest {
            kind: ErrorKind::Limit,
            message: format!("cannot read {path:?}: the guest {what} more than the {}-byte limit", cap.unwrap_or_default()),
        };
        let late = |e: Error| match e {
            Error::Timeout(_) => Error::Timeout(format!("the guest did not send {path:?} before the deadline")),
            e => e,
        };
        let reply = conn.request(ReqKind::ReadFile, deadline, |req| Control::ReadFile { req, path: path.to_string(), limits });
        let (req, size, mode) = match reply.map_err(late)? {
            Control::FileInfo { req, size, mode } => (req, size, mode),
            other => return Err(Error::Protocol(format!("unexpected reply to read_file: {other:?}"))),
        };
        if cap.is_some_and(|c| size > c) {
            conn.lock().abandon(req);
            return Err(over("announced"));
        }
        let mut total = 0u64;
        loop {
            let chunk = conn.wait(deadline, |m| match m.take_file(req)? {
                FileChunk::Pending => Ok(None),
                c => Ok(Some(c)),
            });
            match chunk {
                Ok(FileChunk::Data { bytes: d, credit }) => {
                    if cap.is_some_and(|c| total + d.len() as u64 > c) {
                        conn.lock().abandon(req);
                        return Err(over("sent"));
                    }
                    if let Some(c) = credit {
                        let _ = conn.send_control(&Control::Credit { id: channel_of(req), bytes: c });
                    }
                    total += d.len() as u64;
                    if let Err(e) = out.write_all(&d) {
                        conn.lock().abandon(req);
                        return Err(Error::io("write the downloaded data", e));
                    }
                }
                Ok(_) => return Ok((total, mode)),
                Err(e) => {
                    conn.lock().abandon(req);
                    return Err(late(e));
                }
            }
        }
    }

    /// Reads a whole guest file (`limits`, `deadline` as in [`Vm::read_file_into`]).
    pub fn read_file(&self, path: &str, limits: Option<ReadLimits>, deadline: Option<Instant>) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_file_into(path, &mut v, limits, deadline)?;
        Ok(v)
    }

    /// Downloads a guest file to a host path (written to a temporary name, then renamed;
    /// `limits`, `deadline` as in [`Vm::read_file_into`]).
    pub fn download(&self, guest_path: &str, host_path: &Path, limits: Option<ReadLimits>, deadline: Option<Instant>) -> Result<u64> {
        let tmp = host_path.with_file_name(format!(
            ".{}.part-{}",
            host_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let f = fs::File::create(&tmp).map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let r = self.read_file_into(guest_path, &mut w, limits, deadline).and_then(|(n, _)| {
            w.flush().map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
            fs::rename(&tmp, host_path).map_err(|e| Error::io(format!("rename to {}", host_path.display()), e))?;
            Ok(n)
        });
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    /// Drops the channel to the agent and opens a new one (Hello → Welcome): outstanding
    /// requests fail, processes and their unread output stay, and handles keep working. Bytes
    /// the guest was half-way through sending are skipped up to the new Welcome.
    pub fn reconnect(&self, timeout: Duration) -> Result<WelcomeInfo> {
        self.check()?;
        let deadline = Instant::now() + timeout;
        let stream = match (&self.qemu, &self.unix_path) {
            (Some(q), _) => {
                if let Some(st) = q.try_status() {
                    return Err(Error::VmDied(q.diagnosis(Some(st))));
                }
                connect_retry(&q.config.agent_sock, deadline, || Ok(()))?
            }
            (None, Some(p)) => connect_retry(p, deadline, || Ok(()))?,
            (None, None) => return Err(Error::InvalidArgument("nothing to reconnect to".into())),
        };
        self.conn.reconnect(stream, deadline)
    }

    /// Freezes the guest: the agent stops writing (Pause), then QEMU stops the vCPUs. Nothing
    /// in the guest runs and QEMU uses no CPU until [`Vm::resume`]; the translated code QEMU
    /// already holds stays, so the guest resumes warm.
    pub fn pause(&self) -> Result<()> {
        self.qemu_proc().ok_or_else(|| Error::InvalidArgument("only QEMU-backed VMs can be paused".into()))?;
        if !self.is_alive() {
            return Err(self.conn().failure().unwrap_or(Error::Released));
        }
        self.conn().request(ReqKind::Pause, Some(Instant::now() + Duration::from_secs(30)), |req| Control::Pause { req })?;
        let mut qmp_guard = self.qmp()?;
        qmp_guard.as_mut().expect("qmp connected").execute("stop", None)?;
        Ok(())
    }

    /// Continues a paused guest and opens a new channel to its agent. The new Hello sets the
    /// guest clock to the host's, reseeds its RNG and bumps its generation, exactly as after a
    /// restore, so a guest paused for hours comes back with the right time and fresh entropy.
    pub fn resume(&self, timeout: Duration) -> Result<u64> {
        self.qemu_proc().ok_or_else(|| Error::InvalidArgument("only QEMU-backed VMs can be resumed".into()))?;
        {
            let mut qmp_guard = self.qmp()?;
            qmp_guard.as_mut().expect("qmp connected").execute("cont", None)?;
        }
        Ok(self.reconnect(timeout)?.generation)
    }

    /// True until the VM died or was released (QEMU's exit is noticed at once, before the
    /// connection's reader has seen the socket close).
    pub fn is_alive(&self) -> bool {
        !self.released.load(Ordering::SeqCst)
            && self.conn.failure().is_none()
            && self.qemu.as_ref().is_none_or(|q| q.try_status().is_none())
    }

    /// Kills QEMU, closes the connection (every waiter gets "released") and removes the work
    /// dir. Idempotent.
    pub fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(q) = &self.qemu {
            q.released.store(true, Ordering::SeqCst);
        }
        self.conn.close(Error::Released);
        if let Some(q) = &self.qemu {
            q.kill();
        }
        if let Some(w) = self.workdir.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.remove();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.release();
    }
}

/// The error waiters see when the connection to a QEMU-backed guest ends.
fn death_error(proc_: &QemuProc, ending: Ending) -> Error {
    if proc_.released.load(Ordering::SeqCst) {
        return Error::Released;
    }
    match ending {
        Ending::Violation(reason) => {
            // A guest that breaks the protocol is not trusted further: stop it.
            proc_.kill();
            Error::Protocol(format!("{reason} (the VM was stopped)"))
        }
        Ending::Closed(reason) => {
            let status = proc_.status_within(Duration::from_secs(2));
            Error::VmDied(format!("{reason}.\n{}", proc_.diagnosis(status)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use supermachine_protocol::{control_frame, Decoder, Frame, Kind, PROTOCOL_VERSION};

    /// A fake agent on a unix socket: Welcome with `features`, then it answers every ReadFile
    /// with FileInfo{size: announced} and `body` as FileData (then the end frame, unless the
    /// body is "stall"), and counts the ReadFiles it saw.
    fn fake_agent(name: &str, features: &[&str], announced: u64, body: Vec<u8>) -> (PathBuf, Arc<Mutex<u32>>) {
        let dir = std::env::temp_dir().join(format!("sm-vm-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let reads = Arc::new(Mutex::new(0u32));
        let (seen, features): (_, Vec<String>) = (reads.clone(), features.iter().map(|f| f.to_string()).collect());
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut d = Decoder::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                d.push(&buf[..n]);
                while let Ok(Some(f)) = d.next_frame() {
                    if f.kind != Kind::Control {
                        continue;
                    }
                    let reply: Vec<u8> = match Control::from_bytes(&f.payload).unwrap() {
                        Control::Hello { .. } => control_frame(&Control::Welcome {
                            version: PROTOCOL_VERSION,
                            boot_id: "fake".into(),
                            generation: 1,
                            processes: vec![],
                            features: features.clone(),
                        })
                        .unwrap(),
                        Control::ReadFile { req, .. } => {
                            *seen.lock().unwrap() += 1;
                            let mut out = control_frame(&Control::FileInfo { req, size: announced, mode: 0o644 }).unwrap();
                            for c in body.chunks(1000) {
                                out.extend(Frame::new(Kind::FileData, req as u32, c.to_vec()).encode().unwrap());
                            }
                            if body != b"stall" {
                                out.extend(Frame::new(Kind::FileData, req as u32, vec![]).encode().unwrap());
                            }
                            out
                        }
                        _ => continue,
                    };
                    if s.write_all(&reply).is_err() {
                        return;
                    }
                }
            }
        });
        (sock, reads)
    }

    const CAP: Option<ReadLimits> = Some(ReadLimits { max_bytes: Some(10), follow_symlinks: false });

    #[test]
    fn limited_reads_are_not_sent_to_an_agent_without_the_feature() {
        let (sock, reads) = fake_agent("old", &[], 3, b"abc".to_vec());
        let vm = Vm::attach_unix(&sock, Duration::from_secs(10)).unwrap();
        assert!(vm.agent_features().is_empty());
        match vm.read_file("/x", CAP, None) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("supermachine-kernel prepare"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(vm.read_file("/x", None, None).unwrap(), b"abc", "the version-1 read still works");
        assert_eq!(*reads.lock().unwrap(), 1, "only the unlimited read reached the agent");
        vm.release();
    }

    #[test]
    fn the_host_holds_the_cap_against_an_agent_that_ignores_it() {
        // Announces 5 bytes and sends 50: the host stops at the cap.
        let (sock, _) = fake_agent("liar", &[FEATURE_READ_LIMITS], 5, vec![1u8; 50]);
        let vm = Vm::attach_unix(&sock, Duration::from_secs(10)).unwrap();
        let mut out = Vec::new();
        match vm.read_file_into("/x", &mut out, CAP, None) {
            Err(Error::Guest { kind: ErrorKind::Limit, message }) => assert!(message.contains("10-byte limit"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(out.len() <= 10, "{} bytes passed a 10-byte cap", out.len());
        vm.release();
        // Announces more than the cap: refused before any byte is written.
        let (sock, _) = fake_agent("big", &[FEATURE_READ_LIMITS], 11, vec![1u8; 11]);
        let vm = Vm::attach_unix(&sock, Duration::from_secs(10)).unwrap();
        let mut out = Vec::new();
        assert!(matches!(vm.read_file_into("/x", &mut out, CAP, None), Err(Error::Guest { kind: ErrorKind::Limit, .. })));
        assert!(out.is_empty());
        vm.release();
    }

    #[test]
    fn a_read_the_guest_never_finishes_ends_at_the_deadline() {
        let (sock, _) = fake_agent("stall", &[FEATURE_READ_LIMITS], 5, b"stall".to_vec());
        let vm = Vm::attach_unix(&sock, Duration::from_secs(10)).unwrap();
        let deadline = Some(Instant::now() + Duration::from_millis(300));
        match vm.read_file("/x", CAP, deadline) {
            Err(Error::Timeout(m)) => assert!(m.contains("\"/x\" before the deadline"), "{m}"),
            other => panic!("{other:?}"),
        }
        vm.release();
    }
}
