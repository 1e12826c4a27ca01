//! Fuzz target: `allow_network` parsing and the per-connection check never panic, and the check
//! never lets a name reach an always-refused address, nor a literal an address no address
//! entry contains. Input: entries, one a line; the last line is `host port address`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use supermachine_runtime::net::policy::{refused_range, Policy, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines: Vec<&str> = text.lines().collect();
    let Some(last) = lines.pop() else { return };
    let Ok(policy) = Policy::parse(&lines) else { return };
    let mut words = last.split(' ');
    let (Some(host), Some(port), Some(addr)) = (words.next(), words.next(), words.next()) else { return };
    let (Ok(port), Ok(addr)) = (port.parse::<u16>(), addr.parse::<IpAddr>()) else { return };
    let _ = policy.may_allow(host, port);
    if policy.check(host, port, addr).is_ok() {
        let listed = policy.rules.iter().any(|r| {
            r.port.is_none_or(|p| p == port)
                && matches!(&r.target, Target::Net(n) if n.contains(&supermachine_runtime::net::policy::canonical(addr)))
        });
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok();
        assert!(listed || (!literal && refused_range(addr).is_none()), "{host} {port} {addr} allowed by {policy:?}");
    }
});
