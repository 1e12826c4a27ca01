//! Dispatch: turns the host's byte stream into frames and each frame into an action and a
//! reply. Runs on the one reader thread; it never waits for the writer's gate (see
//! `writer.rs`), so it can always receive the next Hello or Resume.
//!
//! Connection rules:
//! * Every connection starts with `Hello`; anything before it is ignored. A version mismatch
//!   gets `Error{req: 0, kind: protocol}` and the agent keeps waiting for a good Hello.
//! * A frame-level error (bad magic, unknown kind, oversized) means the stream lost sync: the
//!   agent replies `Error{req: 0, kind: protocol}` once, resets its decoder and ignores
//!   everything until the next Hello (in practice: the host reconnects).
//! * A well-framed control payload that is not a valid message gets `Error{req, protocol}`
//!   (req taken from the JSON when present, else 0) and the connection carries on.
//! * Every handler runs under `catch_unwind`: a bug in one request cannot stop the agent.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use supermachine_protocol::{Control, Decoder, ErrorKind, Frame, Kind, ProcessInfo, AGENT_FEATURES, MAX_PAYLOAD, PROTOCOL_VERSION};

use crate::files::Files;
use crate::generation::Generation;
use crate::process::{Failure, Procs, SpawnRequest};
use crate::tcp::Tcp;
use crate::writer::Writer;
use crate::{debug, log};

pub struct Server {
    writer: Arc<Writer>,
    procs: Arc<Procs>,
    files: Files,
    tcp: Tcp,
    generation: Generation,
    decoder: Decoder,
    /// A valid Hello was received on this connection.
    welcomed: bool,
    /// The stream lost sync (reported once; silent until the next Hello).
    desynced: bool,
}

fn error(req: u64, (kind, message): Failure) -> Control {
    Control::Error { req, kind, message }
}

/// The `req` of a control payload that did not parse as a message, if it has one.
fn req_of(payload: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(payload).ok().and_then(|v| v.get("req").and_then(|r| r.as_u64())).unwrap_or(0)
}

/// Keeps a process list within one frame: long argvs are shortened, then dropped.
pub fn fit_processes(mut list: Vec<ProcessInfo>) -> Vec<ProcessInfo> {
    let size = |l: &[ProcessInfo]| serde_json::to_vec(l).map(|v| v.len()).unwrap_or(usize::MAX);
    let budget = MAX_PAYLOAD - 4096;
    if size(&list) <= budget {
        return list;
    }
    for p in &mut list {
        p.argv.truncate(4);
        for a in &mut p.argv {
            if a.len() > 64 {
                *a = a.chars().take(64).collect();
            }
        }
    }
    if size(&list) > budget {
        for p in &mut list {
            p.argv.clear();
        }
    }
    if size(&list) > budget {
        // Still too many: running processes matter most.
        list.retain(|p| p.running);
        while size(&list) > budget {
            let keep = list.len() * 9 / 10;
            list.truncate(keep);
        }
    }
    list
}

impl Server {
    pub fn new(writer: Arc<Writer>, procs: Arc<Procs>, generation: Generation) -> Server {
        let files = Files::new(writer.clone());
        let tcp = Tcp::new(writer.clone());
        Server { writer, procs, files, tcp, generation, decoder: Decoder::new(), welcomed: false, desynced: false }
    }

    pub fn writer(&self) -> &Arc<Writer> {
        &self.writer
    }

    /// The host went away: forget partial input and hold all output until the next Hello.
    pub fn on_disconnect(&mut self) {
        self.decoder.reset();
        self.welcomed = false;
        self.desynced = false;
        self.writer.disconnected();
    }

    /// Bytes from the host.
    pub fn on_bytes(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    if catch_unwind(AssertUnwindSafe(|| self.on_frame(frame))).is_err() {
                        log!("internal error while handling a frame (see the panic above); carrying on");
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.lost_sync(&e.to_string());
                    self.decoder.reset();
                    return;
                }
            }
        }
    }

    fn lost_sync(&mut self, why: &str) {
        if !self.desynced {
            log!("{why}; ignoring input until the next Hello");
            if self.welcomed {
                self.writer.reply(&Control::Error { req: 0, kind: ErrorKind::Protocol, message: format!("agent: {why}; send Hello on a new connection") });
            }
        }
        self.desynced = true;
        self.welcomed = false;
        self.writer.disconnected();
    }

    fn on_frame(&mut self, f: Frame) {
        match f.kind {
            Kind::Control => match Control::from_bytes(&f.payload) {
                Ok(msg) => self.on_control(msg),
                Err(e) if self.welcomed => {
                    log!("{e}");
                    self.writer.reply(&Control::Error { req: req_of(&f.payload), kind: ErrorKind::Protocol, message: e.to_string() });
                }
                Err(e) => debug!("before Hello: {e}"),
            },
            _ if !self.welcomed => debug!("{:?} frame before Hello ignored", f.kind),
            Kind::Stdin => self.procs.stdin(f.channel, f.payload),
            Kind::FileData => {
                if let Some(reply) = self.files.write_data(f.channel, &f.payload) {
                    self.writer.reply(&reply);
                }
            }
            Kind::TcpData => self.tcp.data(f.channel, f.payload),
            Kind::Stdout | Kind::Stderr => debug!("{:?} frame from the host ignored", f.kind),
        }
    }

    fn hello(&mut self, version: u32, host_time_ns: u64, entropy: &[u8]) {
        if version != PROTOCOL_VERSION {
            let message = format!(
                "protocol version mismatch: the guest agent speaks version {PROTOCOL_VERSION}, the host {version}; rebuild the guest image with this runtime's agent"
            );
            log!("{message}");
            self.writer.reply_ungated(&Control::Error { req: 0, kind: ErrorKind::Protocol, message });
            self.welcomed = false;
            self.writer.disconnected();
            return;
        }
        let generation = self.generation.on_hello(host_time_ns, entropy);
        self.files.new_session();
        self.tcp.new_session();
        self.welcomed = true;
        self.desynced = false;
        let (procs, boot_id) = (&self.procs, self.generation.boot_id.clone());
        self.writer.begin_session(|epoch| {
            procs.reset_windows(epoch);
            Control::Welcome { version: PROTOCOL_VERSION, boot_id, generation, processes: fit_processes(procs.list()), features: AGENT_FEATURES.iter().map(|f| f.to_string()).collect() }
        });
        self.procs.notify_hello();
        debug!("hello: generation {generation}");
    }

    fn on_control(&mut self, msg: Control) {
        if let Control::Hello { version, host_time_ns, entropy } = &msg {
            return self.hello(*version, *host_time_ns, entropy);
        }
        if !self.welcomed {
            debug!("{msg:?} before Hello ignored");
            return;
        }
        let w = self.writer.clone();
        let done = |req: u64, r: Result<(), Failure>| match r {
            Ok(()) => w.reply(&Control::Ok { req }),
            Err(f) => w.reply(&error(req, f)),
        };
        match msg {
            Control::Spawn { req, argv, env, cwd, user, tty, timeout_ms } => {
                match self.procs.spawn(SpawnRequest { argv, env, cwd, user, tty, timeout_ms }) {
                    Ok(started) => {
                        w.reply(&Control::Spawned { req, id: started.proc.id, os_pid: started.proc.os_pid as u32 });
                        self.procs.start(started);
                    }
                    Err(f) => w.reply(&error(req, f)),
                }
            }
            Control::Signal { req, id, signal } => done(req, self.procs.signal(id, signal)),
            Control::Resize { req, id, size } => done(req, self.procs.resize(id, size)),
            Control::Forget { req, id } => done(req, self.procs.forget(id)),
            Control::Credit { id, bytes } => {
                // Process ids and read-transfer channels are separate tables; an id present in
                // both gets the credit in both (see the report in the crate docs).
                let p = self.procs.credit(id, bytes);
                let f = self.files.credit(id, bytes);
                if !p && !f {
                    debug!("credit for unknown channel {id} ignored");
                }
            }
            Control::WriteFile { req, path, mode } => {
                if let Some(reply) = self.files.start_write(req, path, mode) {
                    w.reply(&reply);
                }
            }
            Control::ReadFile { req, path, limits } => match self.files.start_read(req, &path, limits, w.epoch()) {
                Ok((info, pending)) => {
                    w.reply(&info);
                    self.files.stream(pending);
                }
                Err(f) => w.reply(&error(req, f)),
            },
            Control::TcpConnect { req, port } => self.tcp.connect(req, port, w.epoch()),
            Control::TcpListen { req, port } => done(req, self.tcp.listen(port)),
            Control::TcpUnlisten { req, port } => {
                self.tcp.unlisten(port);
                w.reply(&Control::Ok { req });
            }
            Control::TcpCredit { id, bytes } => self.tcp.credit(id, bytes),
            Control::TcpClose { id } => self.tcp.close(id),
            Control::ListProcesses { req } => w.reply(&Control::Processes { req, processes: fit_processes(self.procs.list()) }),
            Control::Pause { req } => w.pause(req),
            Control::Resume { req } => w.resume(Some(&Control::Ok { req })),
            Control::Ping { req } => w.reply(&Control::Pong { req }),
            other => {
                let req = other.req().unwrap_or(0);
                w.reply(&Control::Error { req, kind: ErrorKind::Protocol, message: format!("the agent does not accept {other:?} from the host") });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn req_is_recovered_from_bad_messages() {
        assert_eq!(req_of(br#"{"op":"frobnicate","req":17}"#), 17);
        assert_eq!(req_of(b"not json"), 0);
    }

    #[test]
    fn huge_process_lists_fit_in_a_frame() {
        let big = "x".repeat(300);
        let list: Vec<ProcessInfo> = (0..4096)
            .map(|i| ProcessInfo { id: i, os_pid: i, argv: vec![big.clone(); 3], running: true, tty: false })
            .collect();
        let fitted = fit_processes(list);
        assert_eq!(fitted.len(), 4096);
        let msg = Control::Welcome { version: 1, boot_id: "0".repeat(32), generation: 1, processes: fitted, features: vec![] };
        assert!(msg.to_bytes().len() <= MAX_PAYLOAD);
    }
}
