//! Control messages: the JSON payloads of `Kind::Control` frames, both directions. Pure, no I/O.
//!
//! Conversation shape (host = H, guest agent = G):
//!
//! ```text
//! H: Hello{version, host_time_ns, entropy}        every (re)connection starts with this
//! G: Welcome{version, boot_id, generation, processes}
//! H: Spawn{req, argv, env, cwd, user, tty, timeout_ms}   G: Spawned{req, id, os_pid} | Error{req, ..}
//!    stdio then flows as Stdin/Stdout/Stderr frames on channel `id`;
//!    G: Exited{id, ..} after both output streams sent their EOF frame.
//! H: Credit{id, bytes}    lets the guest send `bytes` more output bytes on channel id
//! G: StdinAck{id, bytes}  tells the host how much stdin reached the process
//! H: WriteFile{req, path, mode}  + FileData frames on channel req, empty = end → G: Ok{req}
//! H: ReadFile{req, path, limits?}  → G: FileInfo{req, size, mode} + FileData frames on channel req
//!    (with `limits`: regular files only, opened without blocking and, unless allowed, without
//!    following a final symlink; at most `max_bytes` cross, else Error{req, kind: limit}. Sent
//!    only to an agent whose Welcome lists [`FEATURE_READ_LIMITS`]: older agents ignore it.)
//! H: Pause{req} → G: Paused{req}: the guest sends nothing more until the next Hello/Resume
//!    (used before a snapshot so the byte stream ends on a frame boundary).
//! TCP channels (only when Welcome.features lists [`FEATURE_TCP`]; see `tcp` below):
//! H: TcpConnect{req, port}  → G: TcpOpened{req, id} | Error{req}   (host → guest port)
//! H: TcpListen{req, port}   → G: Ok{req} | Error{req}; then G: TcpAccepted{id, port} per
//!    connection accepted on guest 127.0.0.1:port (guest → host); H: TcpUnlisten{req, port}
//!    TcpData frames on channel `id` both ways (empty = that direction's EOF);
//!    TcpCredit{id, bytes} both ways (the receiver consumed `bytes`); TcpClose{id} both ways (reset).
//! ```
//!
//! Every host request carries a `req` id chosen by the host; every reply names it.
//! Process ids (`id`) are chosen by the guest and stay valid across snapshot/restore, so a
//! host that reconnects after a restore re-attaches to running processes by id.

use serde::{Deserialize, Serialize};

/// Version of this protocol. Host and agent refuse to talk across versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// What this agent understands beyond version 1, announced in [`Control::Welcome`]'s `features`
/// (agents baked before a feature existed send none: the host must not rely on it then).
pub const AGENT_FEATURES: &[&str] = &[FEATURE_READ_LIMITS, FEATURE_TCP, FEATURE_GUEST_USER];
/// `ReadFile.limits` is honoured (see [`ReadLimits`]).
pub const FEATURE_READ_LIMITS: &str = "read_limits";
/// The guest's default user (`/etc/supermachine/guest-user`, written by guest root) applies to
/// requests that name no user: spawns, and file reads and writes (with its file-system ids).
/// A non-root user's processes have no capabilities and no_new_privs; the agent is not dumpable.
pub const FEATURE_GUEST_USER: &str = "guest_user";

/// Default output window (bytes the guest may send per process before the host grants more).
pub const DEFAULT_OUTPUT_WINDOW: u64 = 4 * 1024 * 1024;
/// Most stdin bytes the host keeps unacknowledged per process.
pub const STDIN_WINDOW: u64 = 1024 * 1024;
/// Most processes the agent will track at once.
pub const MAX_PROCESSES: usize = 4096;

/// `Welcome.features` entry of an agent that speaks the TCP channel messages and
/// `Kind::TcpData` frames. A host must not send either to an agent without it (an old agent
/// treats the unknown frame kind as a lost sync).
pub const FEATURE_TCP: &str = "tcp";
/// Bytes a TCP channel's sender may have in flight, each direction, before the receiver
/// grants more with `TcpCredit` (the receiver's buffer per channel is bounded by it).
pub const TCP_WINDOW: u64 = 1024 * 1024;

/// Pseudo-terminal size.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// State of one guest process as reported in [`Control::Welcome`] and [`Control::Exited`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    pub id: u32,
    pub os_pid: u32,
    pub argv: Vec<String>,
    pub running: bool,
    pub tty: bool,
}

/// Exit report of a process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or -1 when killed by a signal or a timeout.
    pub exit_code: i32,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// True when the agent killed it because its timeout expired.
    pub timed_out: bool,
    /// Peak resident set size of the process (KiB), from wait4's rusage.
    pub peak_rss_kib: u64,
}

/// Limits on one file read. A read with limits takes regular files only (a FIFO, socket,
/// device or directory is an error, never a blocking open or an endless stream).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadLimits {
    /// More bytes than this: an error, and at most this many bytes are sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// False: a symlink as the final path component is an error (O_NOFOLLOW).
    #[serde(default)]
    pub follow_symlinks: bool,
}

/// Machine-readable class of a guest-side failure.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    InvalidArgument,
    NoSuchProcess,
    Limit,
    Io,
    Protocol,
}

/// A control message. Tagged by `op` in JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    // ---- host → guest ----
    Hello {
        version: u32,
        /// Host wall clock, nanoseconds since the Unix epoch: the guest sets its clock to it.
        host_time_ns: u64,
        /// Fresh host entropy mixed into the guest kernel RNG.
        entropy: Vec<u8>,
    },
    Spawn {
        req: u64,
        argv: Vec<String>,
        /// Extra environment on top of the agent's base environment.
        env: Vec<(String, String)>,
        cwd: Option<String>,
        /// Run as this user: `uid[:gid]` or `name[:group]` (names from the guest's
        /// /etc/passwd and /etc/group), as an OCI image config's `User`. None: the guest's
        /// default user if it has one ([`FEATURE_GUEST_USER`]), else the agent's (root).
        #[serde(default)]
        user: Option<String>,
        tty: Option<TtySize>,
        timeout_ms: Option<u64>,
    },
    Signal {
        req: u64,
        id: u32,
        signal: i32,
    },
    Resize {
        req: u64,
        id: u32,
        size: TtySize,
    },
    Credit {
        id: u32,
        bytes: u64,
    },
    WriteFile {
        req: u64,
        path: String,
        mode: u32,
    },
    ReadFile {
        req: u64,
        path: String,
        /// None: the version-1 read (follows symlinks, any openable file, no cap).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limits: Option<ReadLimits>,
    },
    /// Lists processes (running and exited-but-unreported).
    ListProcesses {
        req: u64,
    },
    /// Stop sending anything until `Resume` or a new `Hello`.
    Pause {
        req: u64,
    },
    Resume {
        req: u64,
    },
    Ping {
        req: u64,
    },
    /// Forget an exited process (frees its slot).
    Forget {
        req: u64,
        id: u32,
    },
    /// Open a TCP connection to 127.0.0.1:`port` inside the guest (→ `TcpOpened` | `Error`).
    TcpConnect {
        req: u64,
        port: u16,
    },
    /// Listen on 127.0.0.1:`port` inside the guest; every accepted connection is announced
    /// with `TcpAccepted`. Idempotent: already listening is `Ok`.
    TcpListen {
        req: u64,
        port: u16,
    },
    /// Stop listening on `port` (open channels stay). Not listening is `Ok` too.
    TcpUnlisten {
        req: u64,
        port: u16,
    },

    // ---- either direction ----
    /// The sender consumed `bytes` of channel `id`'s data: the peer may send that much more.
    TcpCredit {
        id: u32,
        bytes: u64,
    },
    /// Reset: the sender dropped channel `id` (both directions). No reply; the id is free.
    TcpClose {
        id: u32,
    },

    // ---- guest → host ----
    Welcome {
        version: u32,
        /// Random id chosen at guest boot; the same in every restore of one snapshot lineage.
        boot_id: String,
        /// How many Hellos this guest has seen (bumped on every reconnect, e.g. each restore).
        generation: u64,
        processes: Vec<ProcessInfo>,
        /// [`AGENT_FEATURES`] of this agent; absent from agents that predate the list.
        #[serde(default)]
        features: Vec<String>,
    },
    Spawned {
        req: u64,
        id: u32,
        os_pid: u32,
    },
    Exited {
        id: u32,
        status: ExitStatus,
    },
    StdinAck {
        id: u32,
        bytes: u64,
    },
    FileInfo {
        req: u64,
        size: u64,
        mode: u32,
    },
    Processes {
        req: u64,
        processes: Vec<ProcessInfo>,
    },
    /// Reply to `TcpConnect`: the channel id (chosen by the guest) for its TcpData frames.
    TcpOpened {
        req: u64,
        id: u32,
    },
    /// A connection accepted on a port the host asked the guest to listen on (`TcpListen`).
    TcpAccepted {
        id: u32,
        port: u16,
    },
    Paused {
        req: u64,
    },
    Ok {
        req: u64,
    },
    Pong {
        req: u64,
    },
    Error {
        req: u64,
        kind: ErrorKind,
        message: String,
    },
}

/// The deepest nesting of arrays and objects a control payload may have: serde_json's default
/// recursion limit, which this crate keeps (no `unbounded_depth`).
pub const MAX_JSON_DEPTH: usize = 128;

/// Why a control payload could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageError(pub String);

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed control message from peer: {}", self.0)
    }
}

impl std::error::Error for MessageError {}

impl Control {
    /// Encodes to JSON bytes (always under the frame cap for sane inputs; callers check).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("control messages always serialise")
    }

    /// Decodes a control payload. Never panics on hostile input; nesting deeper than
    /// [`MAX_JSON_DEPTH`] is refused by serde_json's recursion limit, and said so.
    pub fn from_bytes(bytes: &[u8]) -> Result<Control, MessageError> {
        serde_json::from_slice(bytes).map_err(|e| {
            let text = e.to_string();
            if text.starts_with("recursion limit exceeded") {
                MessageError(format!("invalid frame: nested deeper than {MAX_JSON_DEPTH} levels ({text})"))
            } else {
                MessageError(text)
            }
        })
    }

    /// The request id this message answers or carries, if any.
    pub fn req(&self) -> Option<u64> {
        use Control::*;
        match self {
            Spawn { req, .. } | Signal { req, .. } | Resize { req, .. } | WriteFile { req, .. }
            | ReadFile { req, .. } | ListProcesses { req } | Pause { req } | Resume { req }
            | Ping { req } | Forget { req, .. } | TcpConnect { req, .. } | TcpListen { req, .. }
            | TcpUnlisten { req, .. } | TcpOpened { req, .. } | Spawned { req, .. } | FileInfo { req, .. }
            | Processes { req, .. } | Paused { req } | Ok { req } | Pong { req }
            | Error { req, .. } => Some(*req),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_past_the_bound_is_an_invalid_frame_naming_it() {
        let deep = |n: usize| format!(r#"{{"op":"ping","req":1,"x":{}1{}}}"#, "[".repeat(n), "]".repeat(n));
        // Unknown fields are ignored, so nesting just under the bound still decodes.
        assert!(Control::from_bytes(deep(MAX_JSON_DEPTH - 2).as_bytes()).is_ok());
        for n in [MAX_JSON_DEPTH, 100_000] {
            let e = Control::from_bytes(deep(n).as_bytes()).unwrap_err().to_string();
            assert!(e.contains(&format!("invalid frame: nested deeper than {MAX_JSON_DEPTH} levels")), "{e}");
        }
    }

    #[test]
    fn json_round_trip() {
        let msgs = vec![
            Control::Hello { version: 1, host_time_ns: 5, entropy: vec![1, 2, 3] },
            Control::Spawn {
                req: 9,
                argv: vec!["python3".into(), "-c".into(), "print(1)".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                user: Some("1000:100".into()),
                tty: Some(TtySize { rows: 24, cols: 80 }),
                timeout_ms: Some(1000),
            },
            Control::Exited {
                id: 3,
                status: ExitStatus { exit_code: -1, signal: Some(9), timed_out: true, peak_rss_kib: 1234 },
            },
            Control::Error { req: 4, kind: ErrorKind::NotFound, message: "no such file".into() },
            Control::ReadFile { req: 5, path: "/a".into(), limits: Some(ReadLimits { max_bytes: Some(10), follow_symlinks: false }) },
            Control::Welcome { version: 1, boot_id: "b".into(), generation: 2, processes: vec![], features: vec!["read_limits".into()] },
        ];
        for m in msgs {
            let b = m.to_bytes();
            assert_eq!(Control::from_bytes(&b).unwrap(), m);
        }
    }

    #[test]
    fn welcome_without_features_is_an_old_agent() {
        let old = br#"{"op":"welcome","version":1,"boot_id":"b","generation":1,"processes":[]}"#;
        match Control::from_bytes(old).unwrap() {
            Control::Welcome { features, .. } => assert!(features.is_empty()),
            other => panic!("{other:?}"),
        }
        let m = Control::Welcome { version: 1, boot_id: "b".into(), generation: 1, processes: vec![], features: vec![FEATURE_TCP.into()] };
        assert_eq!(Control::from_bytes(&m.to_bytes()).unwrap(), m);
    }

    #[test]
    fn tcp_messages_round_trip_and_carry_req() {
        for m in [
            Control::TcpConnect { req: 3, port: 8050 },
            Control::TcpListen { req: 4, port: 3128 },
            Control::TcpUnlisten { req: 5, port: 3128 },
            Control::TcpOpened { req: 6, id: 9 },
            Control::TcpAccepted { id: 10, port: 3128 },
            Control::TcpCredit { id: 10, bytes: 65536 },
            Control::TcpClose { id: 10 },
        ] {
            assert_eq!(Control::from_bytes(&m.to_bytes()).unwrap(), m);
        }
        assert_eq!(Control::TcpOpened { req: 6, id: 9 }.req(), Some(6));
        assert_eq!(Control::TcpAccepted { id: 1, port: 2 }.req(), None);
        assert!(Control::from_bytes(br#"{"op":"tcp_connect","req":1,"port":70000}"#).is_err());
    }

    #[test]
    fn wire_shape_is_tagged_by_op() {
        let v: serde_json::Value = serde_json::from_slice(&Control::Ping { req: 7 }.to_bytes()).unwrap();
        assert_eq!(v["op"], "ping");
        assert_eq!(v["req"], 7);
    }

    #[test]
    fn version_one_peers_interoperate() {
        // A plain read is the version-1 wire shape (an old agent parses it the same way).
        let v: serde_json::Value = serde_json::from_slice(&Control::ReadFile { req: 1, path: "/a".into(), limits: None }.to_bytes()).unwrap();
        assert_eq!(v, serde_json::json!({"op": "read_file", "req": 1, "path": "/a"}));
        // An old agent's Welcome has no features.
        let old = br#"{"op":"welcome","version":1,"boot_id":"b","generation":1,"processes":[]}"#;
        match Control::from_bytes(old).unwrap() {
            Control::Welcome { features, .. } => assert!(features.is_empty()),
            other => panic!("{other:?}"),
        }
        let limited = br#"{"op":"read_file","req":1,"path":"/a","limits":{}}"#;
        match Control::from_bytes(limited).unwrap() {
            Control::ReadFile { limits: Some(l), .. } => assert_eq!(l, ReadLimits { max_bytes: None, follow_symlinks: false }),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_payloads_are_errors_not_panics() {
        for bad in [&b""[..], b"{", b"null", b"{\"op\":\"nope\"}", b"{\"op\":\"spawned\",\"req\":-1}", &[0xff, 0xfe][..]] {
            assert!(Control::from_bytes(bad).is_err());
        }
    }
}
