//! Fuzzes the host's TCP channel state as a hostile guest drives it: arbitrary frames (raw
//! bytes through the decoder, and TcpAccepted / TcpData / TcpCredit / TcpClose / TcpOpened
//! built from the input) interleaved with what the host's relays do (take, send, half-close,
//! finish, drain refusals). Nothing may panic; a violation ends the run as it ends the
//! connection; the host never holds more channels than its cap plus the ones it opened, nor
//! more bytes per channel than the window.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supermachine_protocol::{Control, Decoder, Frame, Kind, PROTOCOL_VERSION, TCP_WINDOW};
use supermachine_runtime::mux::{Mux, ReqKind};
use supermachine_runtime::tcp::table::MAX_INBOUND;

fuzz_target!(|data: &[u8]| {
    let mut m = Mux::new();
    let welcome = Control::Welcome {
        version: PROTOCOL_VERSION,
        boot_id: "f".into(),
        generation: 1,
        processes: vec![],
        features: vec!["tcp".into()],
    };
    m.on_frame(Frame::new(Kind::Control, 0, welcome.to_bytes())).unwrap();
    m.tcp.set_forward(80, 8080);
    let mut host_opened = 0usize;
    let mut i = 0;
    while i + 3 <= data.len() {
        let (op, a, b) = (data[i], data[i + 1], data[i + 2]);
        i += 3;
        let id = u32::from(a % 32);
        let frame = match op % 12 {
            0 => Some(Frame::new(Kind::Control, 0, Control::TcpAccepted { id, port: if b & 1 == 0 { 80 } else { 81 } }.to_bytes())),
            1 => {
                let len = usize::from(b) * 1024;
                Some(Frame::new(Kind::TcpData, id, vec![7; len]))
            }
            2 => Some(Frame::new(Kind::Control, 0, Control::TcpCredit { id, bytes: u64::from(b) * 4096 }.to_bytes())),
            3 => Some(Frame::new(Kind::Control, 0, Control::TcpClose { id }.to_bytes())),
            4 => {
                let req = m.begin(ReqKind::TcpConnect).unwrap();
                Some(Frame::new(Kind::Control, 0, Control::TcpOpened { req, id }.to_bytes()))
            }
            5 => {
                // Raw bytes: whatever they decode to.
                let n = usize::from(b).min(data.len() - i);
                let mut d = Decoder::new();
                d.push(&data[i..i + n]);
                i += n;
                let mut dead = false;
                while let Ok(Some(f)) = d.next_frame() {
                    if m.on_frame(f).is_err() {
                        dead = true;
                        break;
                    }
                }
                if dead {
                    return;
                }
                None
            }
            6 => {
                let _ = m.tcp.take(id, usize::from(b) * 512);
                None
            }
            7 => {
                let _ = m.tcp.reserve_send(id, u64::from(b) * 8192);
                None
            }
            8 => {
                m.tcp.shutdown_send(id);
                None
            }
            9 => {
                m.tcp.finish(id);
                None
            }
            10 => {
                m.tcp.take_refusals();
                while m.tcp.take_accepted().is_some() {}
                None
            }
            _ => {
                m.reconnect();
                m.on_frame(Frame::new(Kind::Control, 0, welcome.to_bytes())).unwrap();
                None
            }
        };
        if let Some(f) = frame {
            let opened = op % 12 == 4;
            if m.on_frame(f).is_err() {
                return;
            }
            if opened {
                host_opened += 1;
            }
        }
        assert!(m.tcp.open_channels() <= MAX_INBOUND + host_opened);
        // Buffered bytes of every channel stay within the window.
        for id in 0..32 {
            assert!(m.tcp.buffered(id) as u64 <= TCP_WINDOW);
        }
    }
});
