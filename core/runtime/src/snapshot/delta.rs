//! Incremental snapshots: a VM restored from a template snapshot maps the template's memory
//! file private copy-on-write, so its RAM is that file plus the pages the guest wrote. An
//! incremental snapshot keeps only the device state and the RAM pages that differ from the
//! base memory file, with a [`BaseRef`] naming the base; its restore maps the base file
//! copy-on-write again and loads those pages from the state (QEMU's incoming migration writes
//! only the pages present in the stream).
//!
//! * [`mapped_base`]: the base a running VM can be snapshotted against: the memory file its
//!   QEMU maps private, still the same file (device and inode, from `/proc/PID/maps`) under
//!   its snapshot directory, with that directory's recorded digest.
//! * [`BaseDelta`]: the [`PageSink`] that keeps a page in the state when it differs from the
//!   base file's page at the same offset (zero pages included: a page the guest cleared is
//!   kept as a zero record).
//! * [`pin_base`]: a hard link to the base's memory file inside the snapshot (same inode),
//!   so the snapshot survives its base being deleted or replaced (a notebook snapshot removed,
//!   the warm snapshot re-baked). Not possible across filesystems or, under
//!   `fs.protected_hardlinks`, for a file the user does not own (a host-wide store): then the
//!   base must stay in place.
//! * [`check_base`]: at restore, the base must still be there, verified, and the very file
//!   the snapshot was taken against (digest and stamp), else the pinned link with that stamp;
//!   otherwise the error says so and what to do.
//!
//! Invariant: the state of an incremental snapshot restores correctly only over the exact
//! base memory file recorded; every path to a restore goes through [`check_base`].
//!
//! Errors: the crate's [`Error`] (`Snapshot`, with a sentence naming the base and why).

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::snapshot::format::{self as fmt, BaseRef};
use crate::snapshot::migration_stream::{PageSink, PAGE_SIZE};
use crate::snapshot::verified::Snapshot;
use crate::snapshot::SnapshotKind;

/// Device, inode, size and mtime of a file: what changes when it is replaced or rewritten.
pub fn file_stamp(meta: &fs::Metadata) -> String {
    format!("{}:{}:{}:{}.{}", meta.dev(), meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec())
}

/// Linux's major/minor of a device number, as /proc/PID/maps prints them ("fd:01").
fn maps_device(dev: u64) -> String {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    format!("{major:02x}:{minor:02x}")
}

/// True when `maps` (the text of /proc/PID/maps) maps the file with device `dev` and inode
/// `ino` at path `path` (not a deleted file of that name).
fn maps_file(maps: &str, path: &Path, dev: u64, ino: u64) -> bool {
    let device = maps_device(dev);
    let path = path.to_string_lossy();
    maps.lines().any(|line| {
        let mut fields = line.splitn(6, ' ');
        let (_range, _perms, _offset) = (fields.next(), fields.next(), fields.next());
        let (Some(d), Some(i), Some(name)) = (fields.next(), fields.next(), fields.next()) else { return false };
        d == device && i.parse::<u64>().ok() == Some(ino) && name.trim_start() == path
    })
}

/// The base an incremental snapshot of the VM run by QEMU `qemu_pid` builds on: its RAM file
/// `ram_path`, mapped private (`share` false), which must be a template snapshot's memory
/// file that QEMU still maps (not replaced since the VM started). Errors say why not.
pub fn mapped_base(qemu_pid: u32, ram_path: &Path, share: bool) -> Result<BaseRef> {
    let why = |reason: String| Error::Snapshot(format!("no incremental snapshot: {reason}"));
    if share {
        return Err(why("the VM was not restored from a snapshot (its RAM is its own file)".into()));
    }
    let dir = ram_path.parent().filter(|_| ram_path.file_name().is_some_and(|n| n == fmt::MEMORY_FILE));
    let Some(dir) = dir else {
        return Err(why(format!("the VM's RAM file {} is not a snapshot's memory file", ram_path.display())));
    };
    let meta = fmt::read_meta(dir).map_err(|e| why(format!("its base snapshot cannot be read ({e})")))?;
    let memory = match (meta.kind, meta.memory) {
        (SnapshotKind::Template, Some(m)) => m,
        _ => return Err(why(format!("{} is not a template snapshot", dir.display()))),
    };
    let file = fs::metadata(ram_path).map_err(|e| why(format!("its base memory file {} is gone ({e})", ram_path.display())))?;
    if file.len() != memory.size {
        return Err(why(format!("the base memory file {} does not match its metadata", ram_path.display())));
    }
    let maps = fs::read_to_string(format!("/proc/{qemu_pid}/maps"))
        .map_err(|e| why(format!("QEMU's memory map cannot be read ({e})")))?;
    if !maps_file(&maps, ram_path, file.dev(), file.ino()) {
        return Err(why(format!("the base memory file {} was replaced since the VM started", ram_path.display())));
    }
    Ok(BaseRef { dir: dir.to_path_buf(), memory, memory_stamp: file_stamp(&file), pinned: false })
}

/// Links the base's memory file into the snapshot being written (`dir`), if the filesystem
/// allows; returns whether it did. The link must be the very file of `base` (its stamp).
pub fn pin_base(dir: &Path, base: &BaseRef) -> bool {
    let pin = dir.join(fmt::BASE_PIN_FILE);
    if fs::hard_link(base.dir.join(fmt::MEMORY_FILE), &pin).is_err() {
        return false;
    }
    if fs::metadata(&pin).map(|m| file_stamp(&m) == base.memory_stamp).unwrap_or(false) {
        return true;
    }
    let _ = fs::remove_file(&pin); // replaced between the check and the link
    false
}

/// Before a restore of incremental snapshot `dir`: the memory file to map copy-on-write under
/// its pages, the base's own if it is still there, verified and the file the snapshot was
/// taken against, else the pinned link to that file. Errors say what happened to the base.
pub fn check_base(dir: &Path, base: &BaseRef) -> Result<PathBuf> {
    let reason = match base_in_place(base) {
        Ok(memory) => return Ok(memory),
        Err(reason) => reason,
    };
    let pin = dir.join(fmt::BASE_PIN_FILE);
    if base.pinned && fs::metadata(&pin).map(|m| file_stamp(&m) == base.memory_stamp).unwrap_or(false) {
        eprintln!("supermachine: the base of {} {reason}; restoring over its pinned copy", dir.display());
        return Ok(pin);
    }
    Err(Error::Snapshot(format!(
        "incremental snapshot {} cannot be restored: its base snapshot {} {reason}; \
         the pages it shares with that base are lost, so take a new snapshot (or start afresh)",
        dir.display(),
        base.dir.display()
    )))
}

/// The base's memory file if the base is in place and unchanged, else why not.
fn base_in_place(base: &BaseRef) -> std::result::Result<PathBuf, String> {
    if !base.dir.is_dir() {
        return Err("is gone".into());
    }
    let snap = Snapshot::open(&base.dir).map_err(|e| format!("cannot be used ({e})"))?;
    if snap.meta.kind != SnapshotKind::Template || snap.meta.memory.as_ref() != Some(&base.memory) {
        return Err("was replaced by another snapshot".into());
    }
    let memory = snap.dir.join(fmt::MEMORY_FILE);
    let file = fs::metadata(&memory).map_err(|e| format!("lost its memory file ({e})"))?;
    if file_stamp(&file) != base.memory_stamp {
        return Err("has a memory file that was rewritten since".into());
    }
    Ok(memory)
}

/// Keeps (in the state) the pages that differ from the base memory file's.
pub struct BaseDelta {
    base: fs::File,
    size: u64,
    window_at: u64,
    window: Vec<u8>,
    /// Pages equal to the base's (left out).
    pub same: u64,
}

const WINDOW: usize = 1 << 20;

impl BaseDelta {
    pub fn new(base: fs::File) -> io::Result<BaseDelta> {
        let size = base.metadata()?.len();
        Ok(BaseDelta { base, size, window_at: u64::MAX, window: vec![0u8; WINDOW], same: 0 })
    }

    /// The base's page at `offset` (zeros past its end), read a window at a time: the
    /// stream's pages come in ascending order.
    fn base_page(&mut self, offset: u64) -> io::Result<&[u8]> {
        let at = offset - offset % WINDOW as u64;
        if at != self.window_at {
            self.window_at = u64::MAX;
            let want = (self.size.saturating_sub(at) as usize).min(WINDOW);
            self.window.fill(0);
            let mut got = 0;
            while got < want {
                match self.base.read_at(&mut self.window[got..want], at + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.window_at = at;
        }
        let i = (offset - at) as usize;
        Ok(&self.window[i..i + PAGE_SIZE])
    }
}

impl PageSink for BaseDelta {
    fn page(&mut self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        self.same += 1;
        Ok(())
    }

    fn keep(&mut self, offset: u64, data: &[u8]) -> io::Result<bool> {
        if offset % PAGE_SIZE as u64 != 0 || data.len() != PAGE_SIZE {
            return Ok(true); // not a whole aligned page: keep it as QEMU sent it
        }
        Ok(self.base_page(offset)? != data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sm-delta-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keeps_only_pages_that_differ_from_the_base() {
        let d = tmp("keep");
        let p = d.join("memory");
        let f = fs::File::create(&p).unwrap();
        f.set_len(3 << 20).unwrap(); // sparse: reads as zeros
        f.write_all_at(&[7u8; PAGE_SIZE], 5 * PAGE_SIZE as u64).unwrap();
        f.write_all_at(&[9u8; PAGE_SIZE], (2 << 20) + PAGE_SIZE as u64).unwrap();
        drop(f);
        let mut delta = BaseDelta::new(fs::File::open(&p).unwrap()).unwrap();
        let zero = [0u8; PAGE_SIZE];
        let seven = [7u8; PAGE_SIZE];
        // same as the base: a hole read as zeros, the written page
        assert!(!delta.keep(0, &zero).unwrap());
        assert!(!delta.keep(5 * PAGE_SIZE as u64, &seven).unwrap());
        // differs: a page written over a hole, a page cleared by the guest, one past a window
        assert!(delta.keep(PAGE_SIZE as u64, &seven).unwrap());
        assert!(delta.keep(5 * PAGE_SIZE as u64, &zero).unwrap());
        assert!(delta.keep((2 << 20) + PAGE_SIZE as u64, &zero).unwrap());
        assert!(!delta.keep((2 << 20) + PAGE_SIZE as u64, &[9u8; PAGE_SIZE]).unwrap());
        // going back to an earlier window reads it again
        assert!(!delta.keep(5 * PAGE_SIZE as u64, &seven).unwrap());
        // beyond the base's end the base reads as zeros
        assert!(!delta.keep(3 << 20, &zero).unwrap());
        assert!(delta.keep(3 << 20, &seven).unwrap());
        let _ = fs::remove_dir_all(&d);
    }

    /// A template snapshot with a 1 MiB memory file, committed under `dir`.
    fn template(dir: &Path, fill: u8) -> BaseRef {
        let p = fmt::PendingSnapshot::begin(dir).unwrap();
        fs::write(p.dir().join(fmt::STATE_FILE), b"state").unwrap();
        let mem = fs::File::create(p.dir().join(fmt::MEMORY_FILE)).unwrap();
        mem.set_len(1 << 20).unwrap();
        mem.write_all_at(&[fill; PAGE_SIZE], 0).unwrap();
        let meta = p
            .commit(fmt::SnapshotMeta {
                format: String::new(),
                version: 0,
                kind: SnapshotKind::Template,
                created_unix_ms: 1,
                machine: fmt::MachineIdentity {
                    memory_mib: 1,
                    vcpus: 1,
                    accel: "tcg".into(),
                    qemu_version: "7.2".into(),
                    cmdline_fingerprint: String::new(),
                    cmdline: vec![],
                    kernel_hash: String::new(),
                    initrd_hash: String::new(),
                    rootfs_hash: String::new(),
                },
                kernel: "/k".into(),
                initrd: "/i".into(),
                rootfs: "/r".into(),
                state: fmt::FileDigest { size: 0, xxh3_128: String::new() },
                memory: None,
                parent: None,
                base: None,
                labels: Default::default(),
            })
            .unwrap();
        let dir = fs::canonicalize(dir).unwrap();
        let stamp = file_stamp(&fs::metadata(dir.join(fmt::MEMORY_FILE)).unwrap());
        BaseRef { dir, memory: meta.memory.unwrap(), memory_stamp: stamp, pinned: false }
    }

    #[test]
    fn the_base_in_place_else_its_pin_else_a_clear_error() {
        let d = tmp("check");
        let mut base = template(&d.join("base"), 1);
        let inc = d.join("inc");
        fs::create_dir(&inc).unwrap();
        base.pinned = pin_base(&inc, &base);
        assert!(base.pinned, "same filesystem: the link is made");
        assert_eq!(check_base(&inc, &base).unwrap(), base.dir.join(fmt::MEMORY_FILE));
        // Replaced by another snapshot under the same name: the pin (same inode) serves.
        fs::rename(&base.dir, d.join("old")).unwrap();
        template(&d.join("base"), 2);
        assert_eq!(check_base(&inc, &base).unwrap(), inc.join(fmt::BASE_PIN_FILE));
        // Without the pin: the error names the base and what happened.
        fs::remove_file(inc.join(fmt::BASE_PIN_FILE)).unwrap();
        let e = check_base(&inc, &base).unwrap_err().to_string();
        assert!(e.contains("was replaced by another snapshot") && e.contains(&*base.dir.to_string_lossy()), "{e}");
        fs::remove_dir_all(&base.dir).unwrap();
        let e = check_base(&inc, &base).unwrap_err().to_string();
        assert!(e.contains("is gone"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn maps_lines_name_the_mapped_file() {
        let dev = (0xfd << 8) | 0x01; // 253:1
        let maps = "7f00-7f10 rw-p 00000000 fd:01 1234                       /cache/warm/memory\n\
                    7f20-7f30 r--p 00000000 fd:01 99 /cache/old/memory (deleted)\n";
        assert!(maps_file(maps, Path::new("/cache/warm/memory"), dev, 1234));
        assert!(!maps_file(maps, Path::new("/cache/warm/memory"), dev, 1235)); // replaced
        assert!(!maps_file(maps, Path::new("/cache/old/memory"), dev, 99)); // deleted
        assert!(!maps_file(maps, Path::new("/cache/warm/memory"), (8 << 8) | 1, 1234)); // other device
        assert_eq!(maps_device(0x51_0342), "103:542"); // major 0x103, minor 0x542
    }
}
