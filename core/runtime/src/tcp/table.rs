//! The host's table of TCP channels of one connection: pure state, no I/O, a part of the
//! [`Mux`](crate::mux::Mux) (the reader thread feeds it under the mux lock; relays take bytes
//! out of it). `tcp/mod.rs` does the I/O.
//!
//! Bounds a hostile guest cannot lift:
//! * bytes buffered per channel ≤ [`TCP_WINDOW`]: the guest may send that much before the host
//!   credits what a relay consumed; more is a [`Violation`] (the connection ends);
//! * channels the guest opens (`TcpAccepted`) ≤ `max_inbound` at once, counted from the
//!   announcement; over the cap, or for a port with no forward attached, the channel is
//!   refused: queued for a `TcpClose` (the reader never writes) and logged (rate-limited:
//!   [`crate::log_limit`]). More than
//!   [`MAX_REFUSALS`] refusals waiting to be sent is a flood: a violation;
//! * frames for ids the host does not know (closed already, or never opened) are dropped: a
//!   reset from one side crosses data from the other, so they are not violations. Data after
//!   the guest's own EOF, an id announced twice, or credit for bytes never sent are.

use std::collections::{HashMap, VecDeque};

use supermachine_protocol::TCP_WINDOW;

use crate::error::Error;
use crate::mux::Violation;

/// Credit is granted back in batches of this many consumed bytes.
pub const TCP_CREDIT_BATCH: u64 = TCP_WINDOW / 4;
/// Default cap on guest-opened channels at once, per VM.
pub const MAX_INBOUND: usize = 64;
/// Most refused channels whose `TcpClose` is not sent yet.
pub const MAX_REFUSALS: usize = 4096;

/// Who opened a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The host (`TcpConnect` to a guest port).
    Host,
    /// The guest (a connection accepted on a forwarded guest port).
    Guest,
}

#[derive(Debug)]
struct Chan {
    origin: Origin,
    chunks: VecDeque<Vec<u8>>,
    front_off: usize,
    len: usize,
    /// Bytes the guest may still send.
    window: u64,
    /// Bytes consumed and not credited back yet.
    owed: u64,
    /// The guest half-closed.
    eof_in: bool,
    /// Bytes sent to the guest and not credited back.
    unacked: u64,
    /// The host half-closed.
    eof_out: bool,
    /// Reset (by the guest, or the connection was replaced).
    reset: Option<String>,
}

impl Chan {
    fn new(origin: Origin) -> Chan {
        Chan {
            origin,
            chunks: VecDeque::new(),
            front_off: 0,
            len: 0,
            window: TCP_WINDOW,
            owed: 0,
            eof_in: false,
            unacked: 0,
            eof_out: false,
            reset: None,
        }
    }
}

/// Result of [`TcpTable::take`].
#[derive(Debug, PartialEq, Eq)]
pub enum TcpRead {
    /// Bytes, plus a credit to send (if a batch is due).
    Data { bytes: Vec<u8>, credit: Option<u64> },
    /// The guest half-closed and everything was taken.
    Eof,
    /// Nothing yet.
    Pending,
}

/// A guest-opened channel waiting for the host to connect it to `host_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub id: u32,
    pub guest_port: u16,
    pub host_port: u16,
}

/// All TCP channels and forwards of one connection.
#[derive(Debug)]
pub struct TcpTable {
    chans: HashMap<u32, Chan>,
    /// Guest port → host loopback port.
    forwards: HashMap<u16, u16>,
    accepted: VecDeque<Accepted>,
    refusals: VecDeque<u32>,
    inbound: usize,
    max_inbound: usize,
    /// Guest channels refused so far (cap or no forward).
    pub refused_total: u64,
    /// Frames for unknown ids dropped so far.
    pub dropped_frames: u64,
    /// The connection's TCP service thread runs (tcp/mod.rs).
    pub service_started: bool,
}

impl Default for TcpTable {
    fn default() -> Self {
        TcpTable::new(MAX_INBOUND)
    }
}

impl TcpTable {
    pub fn new(max_inbound: usize) -> TcpTable {
        TcpTable {
            chans: HashMap::new(),
            forwards: HashMap::new(),
            accepted: VecDeque::new(),
            refusals: VecDeque::new(),
            inbound: 0,
            max_inbound,
            refused_total: 0,
            dropped_frames: 0,
            service_started: false,
        }
    }

    // ------------------------------------------------------------------ forwards

    pub fn set_forward(&mut self, guest_port: u16, host_port: u16) {
        self.forwards.insert(guest_port, host_port);
    }

    /// Removes a forward; channels it opened stay.
    pub fn remove_forward(&mut self, guest_port: u16) -> bool {
        self.forwards.remove(&guest_port).is_some()
    }

    pub fn forwards(&self) -> Vec<(u16, u16)> {
        let mut v: Vec<_> = self.forwards.iter().map(|(g, h)| (*g, *h)).collect();
        v.sort_unstable();
        v
    }

    // ------------------------------------------------------------------ from the guest

    fn refuse(&mut self, id: u32, why: &str) -> Result<(), Violation> {
        self.refused_total += 1;
        crate::log_limit::log_limited("tcp refused", || format!("refused a TCP connection from the guest: {why}"));
        if self.refusals.len() >= MAX_REFUSALS {
            return Err(Violation(format!(
                "the guest opened more than {MAX_REFUSALS} TCP channels that were refused and not closed yet (a flood)"
            )));
        }
        self.refusals.push_back(id);
        Ok(())
    }

    /// `TcpAccepted{id, port}`: a guest connection to a forwarded port.
    pub fn on_accepted(&mut self, id: u32, guest_port: u16) -> Result<(), Violation> {
        if self.chans.contains_key(&id) {
            return Err(Violation(format!("the guest announced TCP channel {id}, which is open already")));
        }
        let Some(&host_port) = self.forwards.get(&guest_port) else {
            return self.refuse(id, &format!("guest port {guest_port} is not forwarded to the host (call forward_to_host)"));
        };
        if self.inbound >= self.max_inbound {
            let why = format!("{} connections from the guest are open already (the cap per VM)", self.max_inbound);
            return self.refuse(id, &why);
        }
        self.inbound += 1;
        self.chans.insert(id, Chan::new(Origin::Guest));
        self.accepted.push_back(Accepted { id, guest_port, host_port });
        Ok(())
    }

    /// `TcpOpened{id}` answering the host's connect (the request was checked by the mux).
    pub fn on_opened(&mut self, id: u32) -> Result<(), Violation> {
        if self.chans.contains_key(&id) {
            return Err(Violation(format!("the guest opened TCP channel {id}, which is open already")));
        }
        self.chans.insert(id, Chan::new(Origin::Host));
        Ok(())
    }

    /// A channel opened for a connect nobody waits for any more: the guest hears `TcpClose`.
    pub fn abandon_opened(&mut self, id: u32) {
        if self.chans.remove(&id).is_some() {
            self.refusals.push_back(id);
        }
    }

    /// A `TcpData` frame (empty = the guest's half-close).
    pub fn on_data(&mut self, id: u32, data: Vec<u8>) -> Result<(), Violation> {
        let Some(c) = self.chans.get_mut(&id) else {
            self.dropped_frames += 1;
            return Ok(());
        };
        if c.reset.is_some() {
            return Ok(());
        }
        if c.eof_in {
            return Err(Violation(format!("TCP data on channel {id} after its end of stream")));
        }
        if data.is_empty() {
            c.eof_in = true;
            return Ok(());
        }
        let len = data.len() as u64;
        if len > c.window {
            return Err(Violation(format!(
                "TCP channel {id} sent {len} bytes with only {} bytes of window left (flow-control violation)",
                c.window
            )));
        }
        c.window -= len;
        c.len += data.len();
        c.chunks.push_back(data);
        Ok(())
    }

    /// `TcpCredit{id, bytes}`: the guest wrote that many of our bytes to its socket.
    pub fn on_credit(&mut self, id: u32, bytes: u64) -> Result<(), Violation> {
        let Some(c) = self.chans.get_mut(&id) else { return Ok(()) };
        if bytes > c.unacked {
            return Err(Violation(format!("TCP credit of {bytes} bytes on channel {id}, but only {} were sent", c.unacked)));
        }
        c.unacked -= bytes;
        Ok(())
    }

    /// `TcpClose{id}`: the guest reset the channel.
    pub fn on_close(&mut self, id: u32) {
        if let Some(c) = self.chans.get_mut(&id) {
            c.reset.get_or_insert_with(|| "the guest reset the connection".into());
        } else {
            self.dropped_frames += 1;
        }
    }

    /// The connection to the guest is being replaced: every channel is reset (the agent
    /// resets its side at the new Hello). Forwards stay.
    pub fn reconnect(&mut self) {
        for c in self.chans.values_mut() {
            c.reset.get_or_insert_with(|| "the channel to the guest was re-established".into());
        }
        // Announced channels no relay holds yet: nobody will finish them, so free them here.
        // (`finish` keeps `accepted` to guest channels still open, so each is one.)
        for a in std::mem::take(&mut self.accepted) {
            if self.chans.get(&a.id).is_some_and(|c| c.origin == Origin::Guest) {
                self.chans.remove(&a.id);
                self.inbound -= 1;
            }
        }
        self.refusals.clear();
    }

    // ------------------------------------------------------------------ host side

    /// The next guest channel to connect on the host.
    pub fn take_accepted(&mut self) -> Option<Accepted> {
        self.accepted.pop_front()
    }

    /// Refused channels to send `TcpClose` for.
    pub fn take_refusals(&mut self) -> Vec<u32> {
        self.refusals.drain(..).collect()
    }

    pub fn has_work(&self) -> bool {
        !self.accepted.is_empty() || !self.refusals.is_empty()
    }

    fn chan(&mut self, id: u32) -> Result<&mut Chan, Error> {
        self.chans.get_mut(&id).ok_or_else(|| Error::BrokenPipe(format!("TCP channel {id} is closed")))
    }

    /// Takes up to `max` bytes the guest sent on `id`.
    pub fn take(&mut self, id: u32, max: usize) -> Result<TcpRead, Error> {
        let c = self.chan(id)?;
        if c.len > 0 && max > 0 {
            let mut out = Vec::with_capacity(max.min(c.len));
            while out.len() < max {
                let Some(front) = c.chunks.front() else { break };
                let avail = &front[c.front_off..];
                let n = avail.len().min(max - out.len());
                out.extend_from_slice(&avail[..n]);
                c.front_off += n;
                if c.front_off == front.len() {
                    c.chunks.pop_front();
                    c.front_off = 0;
                }
            }
            c.len -= out.len();
            c.owed += out.len() as u64;
            let credit = if c.owed >= TCP_CREDIT_BATCH && !c.eof_in && c.reset.is_none() {
                let g = c.owed;
                c.owed = 0;
                c.window += g;
                Some(g)
            } else {
                None
            };
            return Ok(TcpRead::Data { bytes: out, credit });
        }
        if let Some(r) = &c.reset {
            return Err(Error::BrokenPipe(r.clone()));
        }
        if c.eof_in {
            return Ok(TcpRead::Eof);
        }
        Ok(TcpRead::Pending)
    }

    /// May `len` bytes go to the guest on `id` now? `Ok(false)`: wait for credit.
    pub fn reserve_send(&mut self, id: u32, len: u64) -> Result<bool, Error> {
        let c = self.chan(id)?;
        if let Some(r) = &c.reset {
            return Err(Error::BrokenPipe(r.clone()));
        }
        if c.eof_out {
            return Err(Error::BrokenPipe(format!("TCP channel {id} was half-closed by the host")));
        }
        if c.unacked > 0 && c.unacked + len > TCP_WINDOW {
            return Ok(false);
        }
        c.unacked += len;
        Ok(true)
    }

    /// Marks the host's half-close; false if there is nothing to send (done already, reset).
    pub fn shutdown_send(&mut self, id: u32) -> bool {
        match self.chans.get_mut(&id) {
            Some(c) if c.reset.is_none() && !c.eof_out => {
                c.eof_out = true;
                true
            }
            _ => false,
        }
    }

    /// Forgets channel `id`; true if the guest must be told with `TcpClose` (it did not end
    /// both ways, and the guest did not reset it).
    pub fn finish(&mut self, id: u32) -> bool {
        let Some(c) = self.chans.remove(&id) else { return false };
        if c.origin == Origin::Guest {
            self.inbound -= 1;
            // Finished before a relay took it: the guest may reuse the id (even for a channel
            // the host opens), so no stale announcement may stay behind.
            self.accepted.retain(|a| a.id != id);
        }
        c.reset.is_none() && !(c.eof_in && c.eof_out)
    }

    /// Channels open now.
    pub fn open_channels(&self) -> usize {
        self.chans.len()
    }

    /// Bytes buffered for the host on channel `id` (0 if unknown).
    pub fn buffered(&self, id: u32) -> usize {
        self.chans.get(&id).map_or(0, |c| c.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all(t: &mut TcpTable, id: u32) -> (Vec<u8>, u64) {
        let (mut v, mut credit) = (Vec::new(), 0);
        while let TcpRead::Data { bytes, credit: c } = t.take(id, 1 << 30).unwrap() {
            v.extend(bytes);
            credit += c.unwrap_or(0);
        }
        (v, credit)
    }

    #[test]
    fn accepted_channels_need_a_forward_and_respect_the_cap() {
        let mut t = TcpTable::new(2);
        t.on_accepted(1, 3128).unwrap();
        assert_eq!(t.take_refusals(), vec![1], "no forward: refused");
        t.set_forward(3128, 40000);
        t.on_accepted(2, 3128).unwrap();
        t.on_accepted(3, 3128).unwrap();
        t.on_accepted(4, 3128).unwrap();
        assert_eq!(t.take_refusals(), vec![4], "over the cap: refused");
        assert_eq!(t.take_accepted(), Some(Accepted { id: 2, guest_port: 3128, host_port: 40000 }));
        assert!(t.on_accepted(3, 3128).is_err(), "an id announced twice");
        // a finished channel frees its slot
        assert!(t.finish(2));
        t.on_accepted(5, 3128).unwrap();
        assert!(t.take_refusals().is_empty());
        assert_eq!(t.refused_total, 2);
    }

    #[test]
    fn a_flood_of_refused_channels_is_a_violation() {
        let mut t = TcpTable::new(1);
        for id in 0..MAX_REFUSALS as u32 {
            t.on_accepted(id, 1).unwrap();
        }
        assert!(t.on_accepted(u32::MAX, 1).is_err());
    }

    #[test]
    fn data_window_credit_and_eof() {
        let mut t = TcpTable::default();
        t.on_opened(7).unwrap();
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..TCP_WINDOW as usize / chunk.len() {
            t.on_data(7, chunk.clone()).unwrap();
        }
        let e = t.on_data(7, b"x".to_vec()).unwrap_err();
        assert!(e.0.contains("flow-control"), "{e:?}");
        let (got, credit) = take_all(&mut t, 7);
        assert_eq!(got.len() as u64, TCP_WINDOW);
        assert_eq!(credit, TCP_WINDOW, "everything consumed is credited back");
        t.on_data(7, chunk.clone()).unwrap();
        t.on_data(7, vec![]).unwrap();
        assert!(t.on_data(7, b"late".to_vec()).is_err(), "data after the guest's EOF");
        assert_eq!(take_all(&mut t, 7).0.len(), chunk.len());
        assert_eq!(t.take(7, 10).unwrap(), TcpRead::Eof);
    }

    #[test]
    fn send_window_and_credit_from_the_guest() {
        let mut t = TcpTable::default();
        t.on_opened(1).unwrap();
        assert!(t.reserve_send(1, TCP_WINDOW).unwrap());
        assert!(!t.reserve_send(1, 1).unwrap(), "window full: wait");
        assert!(t.on_credit(1, TCP_WINDOW + 1).is_err(), "credit for bytes never sent");
        t.on_credit(1, 10).unwrap();
        assert!(t.reserve_send(1, 10).unwrap());
        assert!(t.shutdown_send(1));
        assert!(!t.shutdown_send(1));
        assert!(matches!(t.reserve_send(1, 1), Err(Error::BrokenPipe(_))));
    }

    #[test]
    fn unknown_ids_are_dropped_and_resets_reach_the_reader() {
        let mut t = TcpTable::default();
        t.on_data(9, b"stray".to_vec()).unwrap();
        t.on_credit(9, 100).unwrap();
        t.on_close(9);
        assert_eq!(t.dropped_frames, 2);
        t.on_opened(2).unwrap();
        t.on_data(2, b"ab".to_vec()).unwrap();
        t.on_close(2);
        t.on_data(2, b"after reset".to_vec()).unwrap();
        assert!(matches!(t.take(2, 10).unwrap(), TcpRead::Data { .. }), "buffered bytes first");
        assert!(matches!(t.take(2, 10), Err(Error::BrokenPipe(_))));
        assert!(!t.finish(2), "the guest reset it: no close to send");
        assert!(matches!(t.take(2, 10), Err(Error::BrokenPipe(_))));
    }

    #[test]
    fn finish_says_when_the_guest_must_hear_a_close() {
        let mut t = TcpTable::default();
        t.on_opened(1).unwrap();
        t.on_data(1, vec![]).unwrap();
        assert!(t.shutdown_send(1));
        assert!(!t.finish(1), "both directions ended: nothing to say");
        t.on_opened(2).unwrap();
        assert!(t.finish(2), "still open: reset it");
        t.set_forward(80, 8080);
        t.on_accepted(3, 80).unwrap();
        assert_eq!(t.take_accepted().map(|a| a.id), Some(3), "a relay holds it");
        t.on_accepted(4, 80).unwrap();
        t.reconnect();
        assert!(t.take_accepted().is_none());
        assert!(matches!(t.take(4, 1), Err(Error::BrokenPipe(m)) if m.contains("closed")), "no relay held it: gone");
        assert!(matches!(t.take(3, 1), Err(Error::BrokenPipe(m)) if m.contains("re-established")));
        assert_eq!(t.forwards(), vec![(80, 8080)]);
    }

    #[test]
    fn reconnects_free_the_slots_of_channels_no_relay_took() {
        let mut t = TcpTable::new(2);
        t.set_forward(80, 8080);
        for round in 0..10u32 {
            t.on_accepted(2 * round, 80).unwrap();
            t.on_accepted(2 * round + 1, 80).unwrap();
            t.reconnect();
        }
        assert_eq!(t.open_channels(), 0);
        t.on_accepted(100, 80).unwrap();
        assert!(t.take_refusals().is_empty(), "the cap is not used up by abandoned announcements");
    }

    #[test]
    fn an_id_finished_before_it_was_taken_and_reused_by_the_host_survives_a_reconnect() {
        // Found by the tcp_channels fuzz target: a guest channel finished while still announced,
        // its id reused for a channel the host opened, then a reconnect: the stale announcement
        // removed the host's channel and took the guest-channel count below zero.
        let mut t = TcpTable::new(2);
        t.set_forward(80, 8080);
        t.on_accepted(1, 80).unwrap();
        t.finish(1);
        assert!(t.take_accepted().is_none(), "a finished channel is no longer announced");
        t.on_opened(1).unwrap();
        t.reconnect();
        assert_eq!(t.open_channels(), 1, "the host's channel stays until its relay finishes it");
        assert!(!t.finish(1), "it was reset by the reconnect");
        t.on_accepted(2, 80).unwrap();
        t.on_accepted(3, 80).unwrap();
        t.on_accepted(4, 80).unwrap();
        assert_eq!(t.take_refusals(), vec![4], "the cap still counts two guest channels");
    }
}
