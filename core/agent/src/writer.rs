//! The one framed writer of the agent ([`Writer`]): every thread sends its frames to the host
//! through it, whatever the byte channel is (virtio-serial port or unix socket, installed by
//! `transport.rs` as a sink).
//!
//! Invariants:
//! * One frame is written whole under one mutex: frames never interleave.
//! * A *gate* holds every sender until the host has said Hello on this connection and while
//!   it is paused. After [`Writer::pause`] wrote `Paused`, nothing more is written until
//!   [`Writer::resume`] or the next [`Writer::begin_session`]; so a snapshot taken after the
//!   host saw `Paused` sees the stream end on a frame boundary.
//! * The reader thread never waits on the gate (it must stay free to receive Hello/Resume):
//!   its replies are queued while the gate is closed ([`Writer::reply`]), flushed in order by
//!   `resume`, and dropped by the next Hello (they answer the previous host).
//! * Each Hello starts a new *epoch*; senders learn the epoch their frame went out in, which
//!   is what credit windows are charged against (see `credit.rs`).
//!
//! Errors: nothing here fails towards its callers. A frame that cannot be encoded is logged
//! and not sent; a failed write drops the frame (port) or ends the sink (unix socket, whose
//! peer is gone).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use supermachine_protocol::{encode_into, Control, Kind, MAX_PAYLOAD};

use crate::sys::lock;
use crate::{debug, log};

/// Most replies kept while the gate is closed (a well-behaved host sends nothing while paused).
const MAX_PENDING: usize = 1024;

struct Out {
    sink: Option<Box<dyn Write + Send>>,
    /// Replies from the reader thread waiting for the gate to open.
    pending: VecDeque<Vec<u8>>,
    epoch: u64,
    /// Test mode: a failed write means the connection is gone (drop the sink).
    drop_sink_on_error: bool,
}

struct Gate {
    welcomed: bool,
    paused: bool,
}

/// The one framed writer of the agent. See the module docs for its invariants.
pub struct Writer {
    out: Mutex<Out>,
    gate: Mutex<Gate>,
    cv: Condvar,
}

fn encode(kind: Kind, channel: u32, payload: &[u8]) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(payload.len() + 12);
    match encode_into(&mut buf, kind, channel, payload) {
        Ok(()) => Some(buf),
        Err(e) => {
            log!("internal error, frame not sent: {e}");
            None
        }
    }
}

/// Encodes a control message, shrinking an oversized error message rather than failing.
pub fn control_bytes(msg: &Control) -> Option<Vec<u8>> {
    let mut payload = msg.to_bytes();
    if payload.len() > MAX_PAYLOAD {
        if let Control::Error { req, kind, message } = msg {
            let short: String = message.chars().take(4096).collect();
            payload = Control::Error { req: *req, kind: *kind, message: short }.to_bytes();
        }
    }
    encode(Kind::Control, 0, &payload)
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new()
    }
}

impl Writer {
    pub fn new() -> Writer {
        Writer {
            out: Mutex::new(Out { sink: None, pending: VecDeque::new(), epoch: 0, drop_sink_on_error: false }),
            gate: Mutex::new(Gate { welcomed: false, paused: false }),
            cv: Condvar::new(),
        }
    }

    /// Installs (or removes) the byte sink. `drop_on_error`: a write error ends the sink.
    pub fn set_sink(&self, sink: Option<Box<dyn Write + Send>>, drop_on_error: bool) {
        let mut out = lock(&self.out);
        out.sink = sink;
        out.drop_sink_on_error = drop_on_error;
        self.cv.notify_all();
    }

    fn is_open(&self, out: &Out) -> bool {
        let g = lock(&self.gate);
        g.welcomed && !g.paused && out.sink.is_some()
    }

    fn write_locked(out: &mut Out, bytes: &[u8]) {
        let Some(sink) = out.sink.as_mut() else { return };
        if let Err(e) = sink.write_all(bytes).and_then(|_| sink.flush()) {
            if out.drop_sink_on_error {
                debug!("connection lost while writing: {e}");
                out.sink = None;
            } else {
                log!("write to host failed, frame dropped: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Sends one frame from a worker thread, waiting for the gate. Returns the epoch the
    /// frame was written in.
    pub fn send(&self, kind: Kind, channel: u32, payload: &[u8]) -> u64 {
        let Some(bytes) = encode(kind, channel, payload) else { return 0 };
        self.send_bytes(&bytes, None).unwrap_or(0)
    }

    /// Like [`Writer::send`] but only within session `epoch`: if a new Hello came first, the
    /// frame is dropped and `false` returned.
    pub fn send_in_epoch(&self, kind: Kind, channel: u32, payload: &[u8], epoch: u64) -> bool {
        let Some(bytes) = encode(kind, channel, payload) else { return false };
        self.send_bytes(&bytes, Some(epoch)).is_some()
    }

    /// Sends a control message from a worker thread (waits for the gate).
    pub fn send_control(&self, msg: &Control) {
        if let Some(bytes) = control_bytes(msg) {
            self.send_bytes(&bytes, None);
        }
    }

    fn send_bytes(&self, bytes: &[u8], only_epoch: Option<u64>) -> Option<u64> {
        loop {
            {
                let mut out = lock(&self.out);
                if let Some(e) = only_epoch {
                    if out.epoch != e {
                        return None;
                    }
                }
                if self.is_open(&out) {
                    Self::write_locked(&mut out, bytes);
                    return Some(out.epoch);
                }
            }
            let g = lock(&self.gate);
            // Timed wait: a wakeup between releasing `out` and waiting here is not lost for long.
            let _ = self.cv.wait_timeout(g, Duration::from_millis(50));
        }
    }

    /// Sends a reply from the reader thread: written now if the gate is open, else queued.
    pub fn reply(&self, msg: &Control) {
        let Some(bytes) = control_bytes(msg) else { return };
        let mut out = lock(&self.out);
        if self.is_open(&out) {
            Self::write_locked(&mut out, &bytes);
        } else if out.pending.len() < MAX_PENDING {
            out.pending.push_back(bytes);
        } else {
            log!("reply dropped while the channel is paused: {msg:?}");
        }
    }

    /// Writes a reply even though the gate is closed (protocol errors before a valid Hello).
    pub fn reply_ungated(&self, msg: &Control) {
        if let Some(bytes) = control_bytes(msg) {
            let mut out = lock(&self.out);
            Self::write_locked(&mut out, &bytes);
        }
    }

    /// A host said Hello: start epoch+1, open the gate, and write `welcome(epoch)` as the first
    /// frame of the session. `welcome` runs with the writer locked (no sender can slip in), so it
    /// is also where per-session state (credit windows) is reset.
    pub fn begin_session(&self, welcome: impl FnOnce(u64) -> Control) -> u64 {
        let mut out = lock(&self.out);
        out.epoch += 1;
        let epoch = out.epoch;
        if !out.pending.is_empty() {
            debug!("dropping {} replies meant for the previous host", out.pending.len());
            out.pending.clear();
        }
        {
            let mut g = lock(&self.gate);
            g.welcomed = true;
            g.paused = false;
        }
        let msg = welcome(epoch);
        if let Some(bytes) = control_bytes(&msg) {
            Self::write_locked(&mut out, &bytes);
        }
        self.cv.notify_all();
        epoch
    }

    /// Writes `Paused{req}` as the last frame and closes the gate.
    pub fn pause(&self, req: u64) {
        let mut out = lock(&self.out);
        let bytes = control_bytes(&Control::Paused { req });
        let open = self.is_open(&out);
        lock(&self.gate).paused = true;
        if let Some(b) = bytes {
            if open {
                Self::write_locked(&mut out, &b);
            } else if out.pending.len() < MAX_PENDING {
                out.pending.push_back(b);
            }
        }
    }

    /// Reopens the gate after a pause: queued replies first, then `reply` (if any).
    pub fn resume(&self, reply: Option<&Control>) {
        let mut out = lock(&self.out);
        lock(&self.gate).paused = false;
        if let Some(msg) = reply {
            if let Some(b) = control_bytes(msg) {
                out.pending.push_back(b);
            }
        }
        if self.is_open(&out) {
            while let Some(b) = out.pending.pop_front() {
                Self::write_locked(&mut out, &b);
            }
        }
        self.cv.notify_all();
    }

    /// The host went away (EOF) or the stream lost sync: hold everything until the next Hello.
    pub fn disconnected(&self) {
        lock(&self.gate).welcomed = false;
    }

    /// Current epoch (session number).
    pub fn epoch(&self) -> u64 {
        lock(&self.out).epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Arc;
    use supermachine_protocol::Decoder;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn controls(buf: &Buf) -> Vec<Control> {
        let mut d = Decoder::new();
        d.push(&lock(&buf.0));
        let mut out = Vec::new();
        while let Ok(Some(f)) = d.next_frame() {
            if f.kind == Kind::Control {
                out.push(Control::from_bytes(&f.payload).unwrap());
            }
        }
        out
    }

    fn welcome(epoch: u64) -> Control {
        Control::Welcome { version: 1, boot_id: "b".into(), generation: epoch, processes: vec![], features: vec![] }
    }

    #[test]
    fn replies_wait_for_hello_and_are_dropped_by_it() {
        let w = Writer::new();
        let buf = Buf::default();
        w.set_sink(Some(Box::new(buf.clone())), false);
        w.reply(&Control::Pong { req: 1 });
        assert!(controls(&buf).is_empty());
        w.begin_session(welcome);
        w.reply(&Control::Pong { req: 2 });
        assert_eq!(controls(&buf), vec![welcome(1), Control::Pong { req: 2 }]);
    }

    #[test]
    fn pause_holds_senders_until_resume() {
        let w = Arc::new(Writer::new());
        let buf = Buf::default();
        w.set_sink(Some(Box::new(buf.clone())), false);
        w.begin_session(welcome);
        w.pause(5);
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.send_control(&Control::Pong { req: 6 }));
        w.reply(&Control::Pong { req: 7 });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(controls(&buf), vec![welcome(1), Control::Paused { req: 5 }]);
        w.resume(Some(&Control::Ok { req: 8 }));
        t.join().unwrap();
        let got = controls(&buf);
        assert_eq!(&got[2..4], &[Control::Pong { req: 7 }, Control::Ok { req: 8 }]);
        assert_eq!(got[4], Control::Pong { req: 6 });
    }

    #[test]
    fn frames_from_an_old_epoch_are_dropped() {
        let w = Writer::new();
        let buf = Buf::default();
        w.set_sink(Some(Box::new(buf.clone())), false);
        let e = w.begin_session(welcome);
        assert!(w.send_in_epoch(Kind::FileData, 3, b"x", e));
        w.begin_session(welcome);
        assert!(!w.send_in_epoch(Kind::FileData, 3, b"y", e));
    }
}
