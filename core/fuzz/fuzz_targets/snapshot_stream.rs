//! Fuzz target: the migration-stream splitter never panics on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io;
use supermachine_runtime::snapshot::migration_stream::{split_stream, PageSink};

struct Discard;

impl PageSink for Discard {
    fn page(&mut self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = split_stream(data, io::sink(), &mut Discard, "mem");
});
