//! The initramfs: an uncompressed cpio "newc" archive, written here (no external cpio).
//!
//! Layout the agent relies on:
//! ```text
//! /init                  the static agent (0755)
//! /modules/<name>.ko     uncompressed kernel modules
//! /modules/order         one file name per line, in load order
//! /dev /proc /sys /mnt /mnt/lower /mnt/upper /mnt/root   empty directories
//! /dev/console           character device 5,1 (the kernel opens it for PID 1's stdio)
//! ```
//!
//! newc record: the ASCII magic `070701`, thirteen 8-digit hex fields (ino, mode, uid, gid, nlink,
//! mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the NUL-terminated
//! name padded to a multiple of 4 (counting the 110-byte header), then the data padded to 4. The
//! archive ends with an entry named `TRAILER!!!`. All mtimes are 0 so the same inputs give the
//! same bytes.
use std::io::{self, Write};

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFLNK: u32 = 0o120000;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Writes newc entries to `W`; call [`CpioWriter::finish`] to append the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, next_ino: 1 }
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data)
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[])
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Appends the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        let mut h = header(0, 0, 1, 0, 0, 0, TRAILER.len() + 1);
        h.extend_from_slice(TRAILER.as_bytes());
        h.push(0);
        pad4(&mut h);
        self.out.write_all(&h)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8])
        -> io::Result<()>
    {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') || name == TRAILER {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad name {path:?}")));
        }
        let size: u32 = data.len().try_into().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{path} is over 4 GiB"))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut h = header(ino, mode, nlink, size, rdev.0, rdev.1, name.len() + 1);
        h.extend_from_slice(name.as_bytes());
        h.push(0);
        pad4(&mut h);
        self.out.write_all(&h)?;
        self.out.write_all(data)?;
        let pad = (4 - data.len() % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn header(ino: u32, mode: u32, nlink: u32, size: u32, rmaj: u32, rmin: u32, namesize: usize)
    -> Vec<u8>
{
    let mut h = Vec::with_capacity(HEADER_LEN + namesize + 4);
    h.extend_from_slice(MAGIC);
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    for v in [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, namesize as u32, 0] {
        h.extend_from_slice(format!("{v:08x}").as_bytes());
    }
    h
}

fn pad4(v: &mut Vec<u8>) {
    while v.len() % 4 != 0 {
        v.push(0);
    }
}

/// One parsed entry (for tests and for `image` diagnostics).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer.
pub fn parse(mut buf: &[u8]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let total = buf.len();
    loop {
        if buf.len() < HEADER_LEN || &buf[..6] != MAGIC {
            return Err(format!("bad header at offset {}", total - buf.len()));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
            u32::from_str_radix(s, 16).map_err(|e| e.to_string())
        };
        let (mode, size, rmaj, rmin, namesize) =
            (field(1)?, field(6)? as usize, field(9)?, field(10)?, field(11)? as usize);
        let name_end = HEADER_LEN + namesize;
        let data_start = (name_end + 3) & !3;
        let data_end = data_start + size;
        if namesize == 0 || buf.len() < data_end {
            return Err("truncated entry".into());
        }
        let name = String::from_utf8_lossy(&buf[HEADER_LEN..name_end - 1]).into_owned();
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            mode,
            rdev: (rmaj, rmin),
            data: buf[data_start..data_end].to_vec(),
        });
        buf = &buf[((data_end + 3) & !3).min(buf.len())..];
    }
}

/// The directories every initramfs has (see the module note).
pub const DIRS: &[&str] = &["dev", "proc", "sys", "mnt", "mnt/lower", "mnt/upper", "mnt/root"];

/// Writes the initramfs: `/init` = `agent`, the modules (name, bytes) in load order.
pub fn write_initrd<W: Write>(out: W, agent: &[u8], modules: &[(String, Vec<u8>)])
    -> io::Result<W>
{
    let mut w = CpioWriter::new(out);
    for d in DIRS {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, agent)?;
    w.dir("modules", 0o755)?;
    let mut order = String::new();
    for (name, bytes) in modules {
        let file = format!("{name}.ko");
        w.file(&format!("modules/{file}"), 0o644, bytes)?;
        order.push_str(&file);
        order.push('\n');
    }
    w.file("modules/order", 0o644, order.as_bytes())?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mods = vec![
            ("virtio".to_string(), vec![1u8; 5]),
            ("virtio_blk".to_string(), vec![2u8; 8]),
        ];
        write_initrd(Vec::new(), b"#!agent\x00\x01\x02", &mods).unwrap()
    }

    #[test]
    fn round_trip_through_our_parser() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        for d in DIRS {
            assert!(names.contains(d), "{d} missing");
        }
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap().clone();
        assert_eq!(get("init").data, b"#!agent\x00\x01\x02");
        assert_eq!(get("init").mode, S_IFREG | 0o755);
        assert_eq!(get("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("modules/order").data, b"virtio.ko\nvirtio_blk.ko\n");
        assert_eq!(get("modules/virtio_blk.ko").data, vec![2u8; 8]);
        assert_eq!(sample(), bytes, "output is deterministic");
    }

    #[test]
    fn every_name_length_pads_correctly() {
        for len in 1..12 {
            let mut w = CpioWriter::new(Vec::new());
            let name = "x".repeat(len);
            for dlen in 0..6 {
                w.file(&format!("{name}{dlen}"), 0o644, &vec![7u8; dlen]).unwrap();
            }
            let bytes = w.finish().unwrap();
            let e = parse(&bytes).unwrap();
            assert_eq!(e.len(), 6);
            for (i, ent) in e.iter().enumerate() {
                assert_eq!(ent.data.len(), i);
            }
        }
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("/", 0o644, b"").is_err());
        assert!(w.file("TRAILER!!!", 0o644, b"").is_err());
    }

    /// The system `cpio` (GNU) must read our archive and list the same names.
    #[test]
    fn gnu_cpio_lists_it() {
        let Ok(cpio) = super::super::tools::which("cpio") else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        let bytes = sample();
        let mut child = Command::new(cpio)
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.lines().any(|l| l.starts_with("crw-------") && l.ends_with("dev/console")),
            "{listing}");
        assert!(listing.lines().any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init")));
        assert!(listing.contains("modules/order"));
        assert_eq!(listing.lines().count(), DIRS.len() + 6);
    }
}
