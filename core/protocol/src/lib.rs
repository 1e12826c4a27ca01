//! The wire protocol between the host runtime and the in-guest agent: a frame codec
//! ([`frame`]) and the control messages ([`message`]). Pure code, no I/O, so both sides
//! share it and it can be fuzzed.

pub mod frame;
pub mod message;

pub use frame::{encode_into, Decoder, Frame, FrameError, Kind, CHUNK, HEADER_LEN, MAX_PAYLOAD};
pub use message::{
    Control, ErrorKind, ExitStatus, MessageError, ProcessInfo, ReadLimits, TtySize, AGENT_FEATURES,
    DEFAULT_OUTPUT_WINDOW, FEATURE_READ_LIMITS, FEATURE_TCP, MAX_PROCESSES, PROTOCOL_VERSION, STDIN_WINDOW,
    TCP_WINDOW,
};

/// Encodes a control message as one frame.
pub fn control_frame(msg: &Control) -> Result<Vec<u8>, FrameError> {
    Frame::new(Kind::Control, 0, msg.to_bytes()).encode()
}
