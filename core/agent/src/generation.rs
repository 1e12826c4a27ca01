//! What a Hello changes in the guest: after a snapshot restore the guest's wall clock is
//! frozen at snapshot time and every clone shares one kernel RNG state, so each Hello sets the
//! clock from the host, mixes host entropy into the kernel RNG and forces a reseed, and bumps
//! the *generation* that guest programs can watch to reseed their own RNGs.
//!
//! State files (in `/run/supermachine` as PID 1), each written atomically (tmp + rename), with
//! `generation` written last so a watcher that sees it change finds the others current:
//! * `boot_id` — random hex id chosen at first boot (the same in every clone of a snapshot)
//! * `host_time_ns` — the host clock sent with the latest Hello
//! * `generation` — decimal count of Hellos seen (1 after the first connection)

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::sys::{self, cvt};
use crate::{debug, log};

/// `_IOW('R', 0x03, int[2])` from linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)` from linux/random.h.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Most entropy bytes we pass on from one Hello.
const MAX_ENTROPY: usize = 4096;

/// The guest's identity across clones (`boot_id`) and its count of Hellos (`generation`),
/// kept in the state files.
pub struct Generation {
    /// Clock and RNG are only touched as PID 1 (never on a developer's host in test mode).
    touch_system: bool,
    state_dir: Option<PathBuf>,
    pub boot_id: String,
    pub generation: u64,
}

impl Generation {
    pub fn new(touch_system: bool, state_dir: Option<PathBuf>) -> Generation {
        let mut id = [0u8; 16];
        if !sys::random_bytes(&mut id) {
            // Not secret, only unique: fall back to time and pid.
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            id[..16].copy_from_slice(&(t ^ (std::process::id() as u128) << 64).to_le_bytes());
        }
        let r = Generation { touch_system, state_dir, boot_id: sys::hex(&id), generation: 0 };
        r.write_file("boot_id", &r.boot_id);
        r
    }

    /// Applies a Hello; returns the new generation.
    pub fn on_hello(&mut self, host_time_ns: u64, entropy: &[u8]) -> u64 {
        if self.touch_system {
            if host_time_ns > 0 {
                if let Err(e) = set_clock(host_time_ns) {
                    log!("cannot set the clock: {e}");
                }
            }
            if let Err(e) = add_entropy(entropy) {
                log!("cannot add host entropy to the kernel RNG: {e}");
            }
        }
        self.generation += 1;
        self.write_file("host_time_ns", &host_time_ns.to_string());
        self.write_file("generation", &self.generation.to_string());
        self.generation
    }

    fn write_file(&self, name: &str, value: &str) {
        let Some(dir) = &self.state_dir else { return };
        if let Err(e) = write_atomic(dir, name, &format!("{value}\n")) {
            debug!("cannot write {}/{name}: {e}", dir.display());
        }
    }
}

/// Writes `dir/name` via a temporary file and a rename (creating `dir`).
pub fn write_atomic(dir: &Path, name: &str, contents: &str) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(contents.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))
}

fn set_clock(ns: u64) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as libc::c_long };
    // SAFETY: clock_settime reads one timespec from the valid pointer.
    cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` as bytes.
fn rand_pool_info(entropy: &[u8]) -> Vec<u8> {
    let bytes = &entropy[..entropy.len().min(MAX_ENTROPY)];
    let mut v = Vec::with_capacity(8 + bytes.len() + 3);
    v.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    v.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    v.extend_from_slice(bytes);
    v.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    v
}

fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    let f = File::open("/dev/urandom")?;
    if !entropy.is_empty() {
        // u32-aligned storage for the kernel struct.
        let bytes = rand_pool_info(entropy);
        let mut words = vec![0u32; bytes.len() / 4];
        for (w, c) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        // SAFETY: the buffer holds a complete rand_pool_info (header + buf_size bytes).
        cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, words.as_ptr()) })?;
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_layout() {
        let v = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(v.len(), 16);
        assert_eq!(i32::from_ne_bytes(v[0..4].try_into().unwrap()), 40);
        assert_eq!(i32::from_ne_bytes(v[4..8].try_into().unwrap()), 5);
        assert_eq!(&v[8..13], &[1, 2, 3, 4, 5]);
        assert_eq!(rand_pool_info(&vec![0; 10_000]).len(), 8 + MAX_ENTROPY);
    }

    #[test]
    fn hello_bumps_generation_and_writes_state() {
        let d = std::env::temp_dir().join(format!("sm-agent-restore-{}", std::process::id()));
        let mut r = Generation::new(false, Some(d.clone()));
        assert_eq!(r.boot_id.len(), 32);
        assert_eq!(r.on_hello(42, &[1]), 1);
        assert_eq!(r.on_hello(43, &[]), 2);
        assert_eq!(std::fs::read_to_string(d.join("generation")).unwrap(), "2\n");
        assert_eq!(std::fs::read_to_string(d.join("host_time_ns")).unwrap(), "43\n");
        assert_eq!(std::fs::read_to_string(d.join("boot_id")).unwrap().trim(), r.boot_id);
        let _ = std::fs::remove_dir_all(d);
    }
}
