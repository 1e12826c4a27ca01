//! A minimal synchronous QMP client (QEMU's JSON monitor): greeting, capabilities
//! negotiation, `execute` with events skipped. Used for stop/cont/migrate (snapshots) and quit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::conn::connect_retry;
use crate::error::{Error, Result};

/// Longest QMP line accepted (QEMU's replies are small; this caps a misbehaving peer).
const MAX_LINE: usize = 1 << 20;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until `deadline` while the socket is not ready) and negotiates.
    pub fn connect(path: &Path, deadline: Instant, alive: impl FnMut() -> Result<()>) -> Result<Qmp> {
        let stream = connect_retry(path, deadline, alive)?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let writer = stream.try_clone().map_err(|e| Error::io("clone the QMP socket", e))?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let greeting = qmp.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Protocol(format!("QMP greeting expected, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_value(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::io("read from QMP", e))?;
            if n == 0 {
                return Err(Error::VmDied("the QEMU monitor connection closed".into()));
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return serde_json::from_slice(&line).map_err(|e| Error::Protocol(format!("bad QMP line: {e}")));
        }
    }

    /// Runs a command and returns its `return` value; a QMP error becomes `Error::VmDied`-free
    /// `Error::InvalidArgument` with QEMU's description.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(|e| Error::io(format!("send QMP {command}"), e))?;
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(|d| d.as_str()).unwrap_or("unknown error");
                return Err(Error::InvalidArgument(format!("QEMU refused {command}: {desc}")));
            }
        }
    }
}

use std::io::Read as _;
