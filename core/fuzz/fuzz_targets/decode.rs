//! Fuzzes what a peer can send: arbitrary bytes, split at an input-chosen point, through the
//! frame decoder, and every control payload through the message parser. Nothing may panic, no
//! frame may exceed the cap, and every decoded frame must re-encode to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supermachine_protocol::{Control, Decoder, Kind, HEADER_LEN, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let cut = (split as usize * bytes.len()) / 256;
    let mut d = Decoder::new();
    let mut consumed = 0usize;
    for part in [&bytes[..cut], &bytes[cut..]] {
        d.push(part);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() <= MAX_PAYLOAD);
                    let enc = f.encode().expect("a decoded frame re-encodes");
                    let orig = &bytes[consumed..consumed + HEADER_LEN + f.payload.len()];
                    // Byte 3 is reserved: the decoder ignores it and the encoder writes 0.
                    assert_eq!((&enc[..3], &enc[4..]), (&orig[..3], &orig[4..]));
                    consumed += enc.len();
                    if f.kind == Kind::Control {
                        if let Ok(m) = Control::from_bytes(&f.payload) {
                            // Whatever parses must serialise again.
                            let _ = Control::from_bytes(&m.to_bytes()).expect("round trip");
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
