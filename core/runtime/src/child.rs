//! A process running in the guest, seen from the host: stdin with flow control, stdout/stderr
//! reads with credit, signals, tty resize, exit status. Handles stay valid across a reconnect
//! (snapshot restore), because process ids are the guest's.

use std::time::{Duration, Instant};

use supermachine_protocol::{Control, ExitStatus, Kind, TtySize, CHUNK};

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::mux::{Output, ReqKind, StdinSlot, Stream};

/// How to start a guest process.
#[derive(Clone, Debug, Default)]
pub struct SpawnOptions {
    pub argv: Vec<String>,
    /// Extra environment on top of the agent's base environment.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Run as this user (`uid[:gid]` or `name[:group]`); None: as root.
    pub user: Option<String>,
    pub tty: Option<TtySize>,
    /// The agent kills the process after this long (exit_code -1, timed_out true).
    pub timeout_ms: Option<u64>,
}

/// A spawned guest process.
pub struct ExecChild {
    conn: Conn,
    id: u32,
    os_pid: u32,
}

impl ExecChild {
    /// Starts a process. Its stdin stays open until [`ExecChild::close_stdin`].
    pub fn spawn(conn: &Conn, opts: &SpawnOptions) -> Result<ExecChild> {
        if opts.argv.is_empty() {
            return Err(Error::InvalidArgument("argv must name a program".into()));
        }
        let reply = conn.request(ReqKind::Spawn, None, |req| Control::Spawn {
            req,
            argv: opts.argv.clone(),
            env: opts.env.clone(),
            cwd: opts.cwd.clone(),
            user: opts.user.clone(),
            tty: opts.tty,
            timeout_ms: opts.timeout_ms,
        })?;
        match reply {
            Control::Spawned { id, os_pid, .. } => {
                conn.lock().set_tty(id, opts.tty.is_some());
                Ok(ExecChild { conn: conn.clone(), id, os_pid })
            }
            other => Err(Error::Protocol(format!("unexpected reply to spawn: {other:?}"))),
        }
    }

    /// A handle to a process that already exists in the guest (re-attach after a restore).
    pub fn attach(conn: &Conn, id: u32) -> Result<ExecChild> {
        let os_pid = conn
            .lock()
            .proc(id)
            .map(|p| p.os_pid)
            .ok_or_else(|| Error::InvalidArgument(format!("the guest has no process {id}")))?;
        Ok(ExecChild { conn: conn.clone(), id, os_pid })
    }

    /// The guest's id for this process (stable across snapshot/restore).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The process's pid inside the guest.
    pub fn os_pid(&self) -> u32 {
        self.os_pid
    }

    /// Writes all of `data` to the process's stdin, blocking while more than the stdin window
    /// is unacknowledged.
    pub fn write_stdin(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(CHUNK) {
            let len = chunk.len() as u64;
            self.conn.wait(None, |m| match m.stdin_reserve(self.id, len)? {
                StdinSlot::Go => Ok(Some(())),
                StdinSlot::Wait => Ok(None),
            })?;
            self.conn.send_frame(Kind::Stdin, self.id, chunk)?;
        }
        Ok(())
    }

    /// Closes stdin (the process reads EOF). Idempotent; a no-op once the process exited.
    pub fn close_stdin(&self) -> Result<()> {
        if self.conn.lock().stdin_close(self.id)? {
            self.conn.send_frame(Kind::Stdin, self.id, &[])?;
        }
        Ok(())
    }

    /// Reads up to `max` bytes from `stream`: empty means end of stream. With a timeout,
    /// `Error::Timeout` if no byte arrived in time.
    pub fn read(&self, stream: Stream, max: usize, timeout: Option<Duration>) -> Result<Vec<u8>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let max = max.max(1);
        let out = self.conn.wait(deadline, |m| match m.take_output(self.id, stream, max)? {
            Output::Pending => Ok(None),
            o => Ok(Some(o)),
        });
        match out {
            Ok(Output::Data { bytes, credit }) => {
                if let Some(c) = credit {
                    self.grant(c);
                }
                Ok(bytes)
            }
            Ok(_) => Ok(Vec::new()),
            Err(Error::Timeout(_)) => Err(Error::Timeout(format!(
                "no {} from process {} within {:.3} s",
                if stream == Stream::Stdout { "stdout" } else { "stderr" },
                self.id,
                timeout.unwrap_or_default().as_secs_f64()
            ))),
            Err(e) => Err(e),
        }
    }

    /// Grants the guest `bytes` more output window. Failure is ignored: the connection is
    /// then dead and every caller learns it from its own wait.
    fn grant(&self, bytes: u64) {
        let _ = self.conn.send_control(&Control::Credit { id: self.id, bytes });
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.conn.request(ReqKind::Signal, None, |req| Control::Signal { req, id: self.id, signal }).map(|_| ())
    }

    /// Resizes the process's terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.conn
            .request(ReqKind::Resize, None, |req| Control::Resize { req, id: self.id, size: TtySize { rows, cols } })
            .map(|_| ())
    }

    /// Waits for the exit report. Output not yet read stays buffered (it is bounded by the
    /// output window, so a process writing more than that blocks until it is read).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<ExitStatus> {
        let deadline = timeout.map(|t| Instant::now() + t);
        match self.conn.wait(deadline, |m| m.exit_status(self.id)) {
            Err(Error::Timeout(_)) => Err(Error::Timeout(format!(
                "process {} did not exit within {:.3} s",
                self.id,
                timeout.unwrap_or_default().as_secs_f64()
            ))),
            r => r,
        }
    }

    /// The exit status if the process has exited.
    pub fn poll(&self) -> Result<Option<ExitStatus>> {
        self.conn.lock().exit_status(self.id)
    }

    /// Reads both streams to their end and waits for the exit (collect mode).
    pub fn collect(&self) -> Result<(Vec<u8>, Vec<u8>, ExitStatus)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (mut out_eof, mut err_eof) = (false, false);
        while !(out_eof && err_eof) {
            let mut credits = 0u64;
            self.conn.wait(None, |m| {
                let mut progress = false;
                for (stream, buf, eof) in [(Stream::Stdout, &mut out, &mut out_eof), (Stream::Stderr, &mut err, &mut err_eof)] {
                    while !*eof {
                        match m.take_output(self.id, stream, usize::MAX)? {
                            Output::Data { bytes, credit } => {
                                buf.extend_from_slice(&bytes);
                                credits += credit.unwrap_or(0);
                                progress = true;
                            }
                            Output::Eof => {
                                *eof = true;
                                progress = true;
                            }
                            Output::Pending => break,
                        }
                    }
                }
                Ok(progress.then_some(()))
            })?;
            if credits > 0 {
                self.grant(credits);
            }
        }
        let status = self.wait(None)?;
        Ok((out, err, status))
    }
}

impl Drop for ExecChild {
    /// An exited process is forgotten on both sides (frees the agent's slot); a running one is
    /// left alone (it may be re-attached by id).
    fn drop(&mut self) {
        let exited = matches!(self.conn.lock().exit_status(self.id), Ok(Some(_)));
        if exited {
            self.conn.lock().remove_proc(self.id);
            let id = self.id;
            let _ = self.conn.fire(ReqKind::Forget, |req| Control::Forget { req, id });
        }
    }
}
