//! PID 1 setup, run once before serving: mount /dev, /proc, /sys; load the kernel modules
//! shipped in the initramfs (`/modules/order` lists the `.ko` files in load order); mount the
//! root image (`/dev/vda`, erofs read-only, ext4 as a fallback) under an overlay whose upper
//! layer is tmpfs; switch root into it; mount /run, /tmp, /dev/pts, /dev/shm; set the hostname
//! and bring up `lo`.
//!
//! Nothing here is fatal: every failure is logged and the agent goes on to serve, so the host
//! can still connect and report what went wrong (PID 1 must never exit).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sys::{cstr, cvt};
use crate::{debug, log};

/// How long to wait for the root disk to appear.
const ROOT_DISK_WAIT: Duration = Duration::from_secs(10);

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let (s, t, f, d) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    cvt(r).map(|_| ()).map_err(|e| io::Error::new(e.kind(), format!("mount {fstype} on {target}: {e}")))
}

fn move_mount(from: &str, to: &str) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid C strings; MS_MOVE ignores fstype and data.
    let r = unsafe { libc::mount(f.as_ptr(), t.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) };
    cvt(r).map(|_| ()).map_err(|e| io::Error::new(e.kind(), format!("move mount {from} to {to}: {e}")))
}

fn mkdir(path: &str, mode: u32) {
    let _ = std::fs::DirBuilder::new().recursive(true).mode(mode).create(path);
}

fn try_log(r: io::Result<()>) {
    if let Err(e) = r {
        log!("{e}");
    }
}

/// The whole PID 1 setup. Logs and carries on after any failure.
pub fn setup() {
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o022) };
    mkdir("/dev", 0o755);
    let dev = mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    console();
    try_log(dev);
    mkdir("/proc", 0o555);
    mkdir("/sys", 0o555);
    try_log(mount("proc", "/proc", "proc", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, ""));
    try_log(mount("sysfs", "/sys", "sysfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, ""));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "sm.debug" || w == "sm.debug=1") {
        crate::log::set_debug(true);
    }
    let t0 = Instant::now();
    load_modules(Path::new("/modules"));
    debug!("modules loaded in {:?}", t0.elapsed());
    match mount_root() {
        Ok(()) => debug!("switched to the root image"),
        Err(e) => log!("{e}; serving from the initramfs instead"),
    }
    runtime_mounts();
    let name = b"microvm";
    // SAFETY: the pointer and length describe a valid byte buffer.
    if let Err(e) = cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }) {
        log!("cannot set the hostname: {e}");
    }
    if let Err(e) = loopback_up() {
        log!("cannot bring up lo: {e}");
    }
}

/// Points stdin at /dev/null and stdout/stderr at the console.
fn console() {
    let open = |p: &str, write: bool| std::fs::OpenOptions::new().read(!write).write(write).open(p);
    if let Ok(null) = open("/dev/null", false) {
        // SAFETY: dup2 onto fd 0; both fds are valid.
        unsafe { libc::dup2(null.as_raw_fd(), 0) };
    }
    if let Ok(c) = open("/dev/console", true) {
        // SAFETY: dup2 onto fds 1 and 2; both fds are valid.
        unsafe {
            libc::dup2(c.as_raw_fd(), 1);
            libc::dup2(c.as_raw_fd(), 2);
        }
    }
}

/// The file names listed in a modules order file (blank lines and `#` comments skipped).
pub fn module_order(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
}

fn load_modules(dir: &Path) {
    let Ok(order) = std::fs::read_to_string(dir.join("order")) else {
        debug!("no {}/order; no modules to load", dir.display());
        return;
    };
    for name in module_order(&order) {
        let path = dir.join(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                log!("module {}: {e}", path.display());
                continue;
            }
        };
        // MODULE_INIT_COMPRESSED_FILE: let the kernel decompress .ko.xz/.ko.zst/.ko.gz.
        let flags: libc::c_int = if name.ends_with(".ko") { 0 } else { 4 };
        let params = c"";
        // SAFETY: finit_module reads the module from a valid fd and a valid C string.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), flags) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                log!("loading module {name} failed: {e}");
            }
        } else {
            debug!("loaded {name}");
        }
    }
}

fn wait_for(path: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn mount_root() -> io::Result<()> {
    if !wait_for("/dev/vda", ROOT_DISK_WAIT) {
        return Err(io::Error::new(io::ErrorKind::NotFound, "root disk /dev/vda did not appear within 10 s"));
    }
    for d in ["/mnt/lower", "/mnt/upper", "/mnt/root"] {
        mkdir(d, 0o755);
    }
    if let Err(e) = mount("/dev/vda", "/mnt/lower", "erofs", libc::MS_RDONLY, "") {
        debug!("{e}; trying ext4");
        mount("/dev/vda", "/mnt/lower", "ext4", libc::MS_RDONLY, "")?;
    }
    mount("tmpfs", "/mnt/upper", "tmpfs", 0, "mode=0755")?;
    mkdir("/mnt/upper/upper", 0o755);
    mkdir("/mnt/upper/work", 0o755);
    mount("overlay", "/mnt/root", "overlay", 0, "lowerdir=/mnt/lower,upperdir=/mnt/upper/upper,workdir=/mnt/upper/work")?;
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        mkdir(&format!("/mnt/root/{d}"), 0o755);
    }
    for d in ["/dev", "/proc", "/sys"] {
        move_mount(d, &format!("/mnt/root{d}"))?;
    }
    std::env::set_current_dir("/mnt/root")?;
    move_mount(".", "/")?;
    let dot = cstr(".")?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::chroot(dot.as_ptr()) })?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Mounts inside the final root.
fn runtime_mounts() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mkdir("/run", 0o755);
    try_log(mount("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"));
    mkdir("/tmp", 0o1777);
    try_log(mount("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"));
    mkdir("/dev/pts", 0o755);
    try_log(mount("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"));
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    mkdir("/dev/shm", 0o1777);
    try_log(mount("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"));
    for (link, target) in [("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"), ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2")] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
}

/// `ip link set lo up`, the only interface the guest has.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation; the fd is owned by `sock` below.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq at a valid pointer.
    unsafe {
        cvt(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr))?;
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        cvt(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr))?;
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_file_parsing() {
        let text = "virtio_ring.ko\n\n# comment\n  virtio.ko  \noverlay.ko.xz\n";
        assert_eq!(module_order(text), vec!["virtio_ring.ko", "virtio.ko", "overlay.ko.xz"]);
    }
}
