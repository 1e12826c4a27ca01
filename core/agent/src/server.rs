//! Dispatch: carries out what the connection rules (`conn.rs`, pure) make of the host's byte
//! stream: each request becomes an action and a reply. Runs on the one reader thread; it never
//! waits for the writer's gate (see `writer.rs`), so it can always receive the next Hello or
//! Resume. Every action runs under `catch_unwind`: a bug in one request cannot stop the agent.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use supermachine_agent::conn::{Action, Conn};
use supermachine_protocol::{Control, ErrorKind, Frame, Kind, ProcessInfo, AGENT_FEATURES, MAX_PAYLOAD, PROTOCOL_VERSION};

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
    conn: Conn,
}

fn error(req: u64, (kind, message): Failure) -> Control {
    Control::Error { req, kind, message }
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
        Server { writer, procs, files, tcp, generation, conn: Conn::new() }
    }

    pub fn writer(&self) -> &Arc<Writer> {
        &self.writer
    }

    /// The host went away: forget partial input and hold all output until the next Hello.
    pub fn on_disconnect(&mut self) {
        self.conn.disconnect();
        self.writer.disconnected();
    }

    /// Bytes from the host.
    pub fn on_bytes(&mut self, bytes: &[u8]) {
        self.conn.push(bytes);
        while let Some(action) = self.conn.next_action() {
            if catch_unwind(AssertUnwindSafe(|| self.act(action))).is_err() {
                log!("internal error while handling a frame (see the panic above); carrying on");
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Hello { host_time_ns, entropy } => self.hello(host_time_ns, &entropy),
            Action::Request(msg) => self.on_request(msg),
            Action::Data(f) => self.on_data(f),
            Action::Reject(reply) => {
                if let Control::Error { message, .. } = &reply {
                    log!("{message}");
                }
                self.writer.reply(&reply);
            }
            Action::BadVersion(reply) => {
                if let Control::Error { message, .. } = &reply {
                    log!("{message}");
                }
                self.writer.reply_ungated(&reply);
                self.writer.disconnected();
            }
            Action::LostSync { why, reply } => {
                if let Some(why) = why {
                    log!("{why}; ignoring input until the next Hello");
                }
                if let Some(reply) = reply {
                    self.writer.reply(&reply);
                }
                self.writer.disconnected();
            }
            Action::Ignore(why) => debug!("{why}"),
        }
    }

    fn on_data(&mut self, f: Frame) {
        match f.kind {
            Kind::Stdin => self.procs.stdin(f.channel, f.payload),
            Kind::FileData => {
                if let Some(reply) = self.files.write_data(f.channel, &f.payload) {
                    self.writer.reply(&reply);
                }
            }
            Kind::TcpData => self.tcp.data(f.channel, f.payload),
            Kind::Control | Kind::Stdout | Kind::Stderr => debug!("{:?} frame from the host ignored", f.kind),
        }
    }

    /// A good Hello (the version was checked by `conn`): a new session.
    fn hello(&mut self, host_time_ns: u64, entropy: &[u8]) {
        let generation = self.generation.on_hello(host_time_ns, entropy);
        self.files.new_session();
        self.tcp.new_session();
        let (procs, boot_id) = (&self.procs, self.generation.boot_id.clone());
        self.writer.begin_session(|epoch| {
            procs.reset_windows(epoch);
            Control::Welcome { version: PROTOCOL_VERSION, boot_id, generation, processes: fit_processes(procs.list()), features: AGENT_FEATURES.iter().map(|f| f.to_string()).collect() }
        });
        self.procs.notify_hello();
        debug!("hello: generation {generation}");
    }

    /// A request of a welcomed session (`conn` rejects the messages only the agent sends).
    fn on_request(&mut self, msg: Control) {
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
