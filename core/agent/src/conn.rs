//! The agent's connection rules as a pure state machine: bytes from the host in, [`Action`]s
//! out. It owns the frame decoder and the session state (welcomed, lost sync); `server.rs`
//! carries the actions out. No I/O, so `core/fuzz` (target `agent_control`) drives it with
//! arbitrary bytes.
//!
//! The rules:
//! * Every connection starts with `Hello`; anything before it is ignored. A version mismatch
//!   is refused ([`Action::BadVersion`]) and the agent keeps waiting for a good Hello.
//! * A frame-level error (bad magic, unknown kind, oversized) means the stream lost sync: it is
//!   reported once ([`Action::LostSync`], with a reply only inside a session), the decoder is
//!   reset and everything until the next Hello is ignored (in practice: the host reconnects).
//! * A well-framed control payload that is not a valid message, or a message only the agent
//!   sends, is rejected with `Error{req, protocol}` (req taken from the JSON when present, else
//!   0) and the session carries on.

use supermachine_protocol::{Control, Decoder, ErrorKind, Frame, Kind, PROTOCOL_VERSION};

/// What the server does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// A Hello in this agent's protocol version: a new session begins.
    Hello { host_time_ns: u64, entropy: Vec<u8> },
    /// A host request of a welcomed session (never a message only the agent sends, nor Hello).
    Request(Control),
    /// A `Stdin`, `FileData` or `TcpData` frame of a welcomed session.
    Data(Frame),
    /// Reply with this error; the session goes on.
    Reject(Control),
    /// A Hello in another protocol version: reply with this error without waiting for the
    /// writer's gate, and hold output until a good Hello.
    BadVersion(Control),
    /// The stream lost sync. `why` is set the first time (to log), `reply` when that happened
    /// inside a session. Output is held until the next Hello.
    LostSync { why: Option<String>, reply: Option<Control> },
    /// Nothing to do; why, for the debug log.
    Ignore(String),
}

/// One connection's state.
pub struct Conn {
    decoder: Decoder,
    /// A valid Hello was received on this connection.
    welcomed: bool,
    /// The stream lost sync (reported once; silent until the next Hello).
    desynced: bool,
}

impl Default for Conn {
    fn default() -> Self {
        Conn::new()
    }
}

/// The `req` and `op` of a control payload that did not parse as a message, if it has them.
pub fn req_of(payload: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(payload).ok().and_then(|v| v.get("req").and_then(|r| r.as_u64())).unwrap_or(0)
}

/// True for the messages only the agent sends: the host sending one is a protocol error.
pub fn agent_only(msg: &Control) -> Option<&'static str> {
    use Control::*;
    Some(match msg {
        Welcome { .. } => "welcome",
        Spawned { .. } => "spawned",
        Exited { .. } => "exited",
        StdinAck { .. } => "stdin_ack",
        FileInfo { .. } => "file_info",
        Processes { .. } => "processes",
        TcpOpened { .. } => "tcp_opened",
        TcpAccepted { .. } => "tcp_accepted",
        Paused { .. } => "paused",
        Ok { .. } => "ok",
        Pong { .. } => "pong",
        Error { .. } => "error",
        _ => return None,
    })
}

impl Conn {
    pub fn new() -> Conn {
        Conn { decoder: Decoder::new(), welcomed: false, desynced: false }
    }

    /// A Hello was accepted and no lost sync or bad Hello came after it.
    pub fn welcomed(&self) -> bool {
        self.welcomed
    }

    /// The host went away: forget partial input; the next connection starts with Hello.
    pub fn disconnect(&mut self) {
        self.decoder.reset();
        self.welcomed = false;
        self.desynced = false;
    }

    /// Bytes from the host; take the actions with [`Conn::next_action`].
    pub fn push(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
    }

    /// The next action, or None until more bytes arrive.
    pub fn next_action(&mut self) -> Option<Action> {
        match self.decoder.next_frame() {
            Ok(Some(frame)) => Some(self.on_frame(frame)),
            Ok(None) => None,
            Err(e) => {
                self.decoder.reset();
                let first = !self.desynced;
                let why = e.to_string();
                let reply = (first && self.welcomed).then(|| Control::Error {
                    req: 0,
                    kind: ErrorKind::Protocol,
                    message: format!("agent: {why}; send Hello on a new connection"),
                });
                self.desynced = true;
                self.welcomed = false;
                Some(Action::LostSync { why: first.then_some(why), reply })
            }
        }
    }

    fn on_frame(&mut self, f: Frame) -> Action {
        if f.kind != Kind::Control {
            return match f.kind {
                _ if !self.welcomed => Action::Ignore(format!("{:?} frame before Hello ignored", f.kind)),
                Kind::Stdout | Kind::Stderr => Action::Ignore(format!("{:?} frame from the host ignored", f.kind)),
                _ => Action::Data(f),
            };
        }
        let msg = match Control::from_bytes(&f.payload) {
            Ok(msg) => msg,
            Err(e) if self.welcomed => {
                return Action::Reject(Control::Error { req: req_of(&f.payload), kind: ErrorKind::Protocol, message: e.to_string() })
            }
            Err(e) => return Action::Ignore(format!("before Hello: {e}")),
        };
        if let Control::Hello { version, host_time_ns, entropy } = msg {
            if version != PROTOCOL_VERSION {
                self.welcomed = false;
                return Action::BadVersion(Control::Error {
                    req: 0,
                    kind: ErrorKind::Protocol,
                    message: format!(
                        "protocol version mismatch: the guest agent speaks version {PROTOCOL_VERSION}, the host {version}; rebuild the guest image with this runtime's agent"
                    ),
                });
            }
            self.welcomed = true;
            self.desynced = false;
            return Action::Hello { host_time_ns, entropy };
        }
        if !self.welcomed {
            return Action::Ignore(format!("{} before Hello ignored", agent_only(&msg).unwrap_or("a request")));
        }
        match agent_only(&msg) {
            Some(op) => Action::Reject(Control::Error {
                req: msg.req().unwrap_or(0),
                kind: ErrorKind::Protocol,
                message: format!("the agent does not accept '{op}' from the host"),
            }),
            None => Action::Request(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(msg: &Control) -> Vec<u8> {
        Frame::new(Kind::Control, 0, msg.to_bytes()).encode().unwrap()
    }

    fn actions(conn: &mut Conn, bytes: &[u8]) -> Vec<Action> {
        conn.push(bytes);
        std::iter::from_fn(|| conn.next_action()).collect()
    }

    fn hello(version: u32) -> Vec<u8> {
        control(&Control::Hello { version, host_time_ns: 1, entropy: vec![2] })
    }

    #[test]
    fn req_is_recovered_from_bad_messages() {
        assert_eq!(req_of(br#"{"op":"frobnicate","req":17}"#), 17);
        assert_eq!(req_of(b"not json"), 0);
    }

    #[test]
    fn nothing_before_hello_is_served() {
        let mut c = Conn::new();
        let mut bytes = control(&Control::Ping { req: 1 });
        bytes.extend(Frame::new(Kind::Stdin, 3, b"x".to_vec()).encode().unwrap());
        bytes.extend(Frame::new(Kind::Control, 0, b"{nonsense".to_vec()).encode().unwrap());
        let got = actions(&mut c, &bytes);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|a| matches!(a, Action::Ignore(_))), "{got:?}");
        assert!(!c.welcomed());
    }

    #[test]
    fn a_session_serves_requests_and_rejects_agent_messages() {
        let mut c = Conn::new();
        let mut bytes = hello(PROTOCOL_VERSION);
        bytes.extend(control(&Control::Ping { req: 1 }));
        bytes.extend(control(&Control::Pong { req: 2 }));
        bytes.extend(Frame::new(Kind::Control, 0, br#"{"op":"frobnicate","req":17}"#.to_vec()).encode().unwrap());
        bytes.extend(Frame::new(Kind::Stdout, 3, b"x".to_vec()).encode().unwrap());
        bytes.extend(Frame::new(Kind::Stdin, 3, b"x".to_vec()).encode().unwrap());
        let got = actions(&mut c, &bytes);
        assert_eq!(got[0], Action::Hello { host_time_ns: 1, entropy: vec![2] });
        assert_eq!(got[1], Action::Request(Control::Ping { req: 1 }));
        assert!(matches!(&got[2], Action::Reject(Control::Error { req: 2, message, .. }) if message.contains("'pong'")), "{got:?}");
        assert!(matches!(&got[3], Action::Reject(Control::Error { req: 17, .. })), "{got:?}");
        assert!(matches!(&got[4], Action::Ignore(_)));
        assert_eq!(got[5], Action::Data(Frame::new(Kind::Stdin, 3, b"x".to_vec())));
    }

    #[test]
    fn a_bad_version_is_refused_and_a_good_hello_still_accepted() {
        let mut c = Conn::new();
        let mut bytes = hello(PROTOCOL_VERSION + 1);
        bytes.extend(control(&Control::Ping { req: 1 }));
        bytes.extend(hello(PROTOCOL_VERSION));
        let got = actions(&mut c, &bytes);
        assert!(matches!(&got[0], Action::BadVersion(Control::Error { message, .. }) if message.contains("version mismatch")));
        assert!(matches!(&got[1], Action::Ignore(_)));
        assert!(matches!(&got[2], Action::Hello { .. }));
        assert!(c.welcomed());
    }

    #[test]
    fn lost_sync_is_reported_once_until_the_next_hello() {
        let mut c = Conn::new();
        let got = actions(&mut c, &hello(PROTOCOL_VERSION));
        assert!(matches!(&got[..], [Action::Hello { .. }]));
        let got = actions(&mut c, b"XXXXXXXXXXXXXXXX");
        assert!(matches!(&got[..], [Action::LostSync { why: Some(_), reply: Some(Control::Error { req: 0, .. }) }]), "{got:?}");
        let mut bytes = b"YYYYYYYYYYYYYYYY".to_vec();
        let got = actions(&mut c, &bytes);
        assert_eq!(got, vec![Action::LostSync { why: None, reply: None }]);
        bytes = control(&Control::Ping { req: 1 });
        bytes.extend(hello(PROTOCOL_VERSION));
        bytes.extend(control(&Control::Ping { req: 2 }));
        let got = actions(&mut c, &bytes);
        assert!(matches!(&got[0], Action::Ignore(_)));
        assert!(matches!(&got[1], Action::Hello { .. }));
        assert_eq!(got[2], Action::Request(Control::Ping { req: 2 }));
    }
}
