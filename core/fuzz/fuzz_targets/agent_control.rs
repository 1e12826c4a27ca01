//! Fuzzes the agent's side of the control channel: its connection rules (`core/agent/src/conn.rs`)
//! as a host's byte stream drives them. The input is a list of steps: raw bytes, good and bad
//! Hellos, control frames around arbitrary payloads, data frames, disconnects. Nothing may
//! panic, and the rules must hold against a model of the session (with a second decoder
//! pairing each action with its frame): one action per frame, no request, data or reply
//! outside a session, lost sync reported once per session, a request is never a message only
//! the agent sends, every reply is an `Error` naming the payload's `req`, every request is
//! its frame's payload and re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supermachine_agent::conn::{agent_only, req_of, Action, Conn};
use supermachine_protocol::{Control, Decoder, ErrorKind, Frame, Kind, PROTOCOL_VERSION};

fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    Frame::new(kind, 3, payload.to_vec()).encode().expect("payloads here are under the cap")
}

fuzz_target!(|data: &[u8]| {
    let mut conn = Conn::new();
    let mut mirror = Decoder::new();
    // The model: in a session; lost sync already reported since the last Hello or disconnect.
    let (mut welcomed, mut desynced) = (false, false);
    let mut i = 0;
    while i < data.len() {
        let op = data[i];
        let len = data.get(i + 1).map_or(0, |&n| usize::from(n)).min(data.len().saturating_sub(i + 2));
        let body = &data[(i + 2).min(data.len())..(i + 2 + len).min(data.len())];
        i += 2 + len;
        let bytes = match op % 8 {
            0 => body.to_vec(),
            1 => frame(Kind::Control, &Control::Hello { version: PROTOCOL_VERSION, host_time_ns: 1, entropy: body.to_vec() }.to_bytes()),
            2 => frame(Kind::Control, &Control::Hello { version: PROTOCOL_VERSION + 1 + u32::from(op >> 3), host_time_ns: 1, entropy: vec![] }.to_bytes()),
            3 | 4 => frame(Kind::Control, body),
            5 => frame([Kind::Stdin, Kind::Stdout, Kind::Stderr, Kind::FileData, Kind::TcpData][usize::from(op >> 3) % 5], body),
            6 => {
                conn.disconnect();
                mirror.reset();
                (welcomed, desynced) = (false, false);
                assert!(!conn.welcomed());
                continue;
            }
            _ => {
                // A valid request, built from the body, so sessions see real traffic.
                let req = u64::from(op >> 3);
                let text = String::from_utf8_lossy(body).into_owned();
                let msg = match body.first().copied().unwrap_or(0) % 6 {
                    0 => Control::Ping { req },
                    1 => Control::Spawn { req, argv: vec![text], env: vec![], cwd: None, user: None, tty: None, timeout_ms: None },
                    2 => Control::ReadFile { req, path: text, limits: None },
                    3 => Control::Pong { req },
                    4 => Control::Welcome { version: 1, boot_id: text, generation: req, processes: vec![], features: vec![] },
                    _ => Control::Credit { id: u32::from(op), bytes: req },
                };
                frame(Kind::Control, &msg.to_bytes())
            }
        };
        conn.push(&bytes);
        mirror.push(&bytes);
        while let Some(action) = conn.next_action() {
            let frame = match mirror.next_frame() {
                Ok(Some(f)) => Some(f),
                Ok(None) => panic!("an action without a frame: {action:?}"),
                Err(_) => {
                    mirror.reset();
                    None
                }
            };
            assert_eq!(frame.is_none(), matches!(action, Action::LostSync { .. }), "{action:?} for {frame:?}");
            match action {
                Action::Hello { .. } => (welcomed, desynced) = (true, false),
                Action::Request(msg) => {
                    assert!(welcomed, "request outside a session: {msg:?}");
                    assert!(agent_only(&msg).is_none() && !matches!(msg, Control::Hello { .. }), "{msg:?}");
                    assert_eq!(Control::from_bytes(&msg.to_bytes()).as_ref(), Ok(&msg));
                    assert_eq!(Control::from_bytes(&frame.unwrap().payload).as_ref(), Ok(&msg));
                }
                Action::Data(f) => {
                    assert!(welcomed, "data outside a session");
                    assert!(matches!(f.kind, Kind::Stdin | Kind::FileData | Kind::TcpData), "{:?}", f.kind);
                    assert_eq!(Some(f), frame);
                }
                Action::Reject(reply) => {
                    assert!(welcomed, "reply outside a session: {reply:?}");
                    let Control::Error { req, kind: ErrorKind::Protocol, .. } = reply else { panic!("{reply:?}") };
                    let payload = frame.unwrap().payload;
                    let expected = match Control::from_bytes(&payload) {
                        Ok(m) => m.req().unwrap_or(0),
                        Err(_) => req_of(&payload),
                    };
                    assert_eq!(req, expected);
                }
                Action::BadVersion(reply) => {
                    assert!(matches!(reply, Control::Error { req: 0, kind: ErrorKind::Protocol, .. }), "{reply:?}");
                    welcomed = false;
                }
                Action::LostSync { why, reply } => {
                    assert_eq!(why.is_some(), !desynced);
                    assert_eq!(reply.is_some(), !desynced && welcomed);
                    if let Some(r) = reply {
                        assert!(matches!(r, Control::Error { req: 0, kind: ErrorKind::Protocol, .. }), "{r:?}");
                    }
                    (welcomed, desynced) = (false, true);
                }
                Action::Ignore(_) => {}
            }
            assert_eq!(conn.welcomed(), welcomed);
        }
        assert!(matches!(mirror.next_frame(), Ok(None)), "a frame without an action");
    }
});
