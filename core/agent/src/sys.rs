//! Thin, checked wrappers over the few raw system calls the agent needs (everything else
//! goes through std). Each `unsafe` block states why it is sound.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use supermachine_protocol::TtySize;

/// Locks a mutex, ignoring poisoning: a panicked thread must not take the agent down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns a `-1` return into the current errno.
pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} contains a NUL byte")))
}

/// `kill(2)`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    cvt(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// Signals the main thread of process `pid` (`tgkill(pid, pid, sig)`): a process-directed
/// signal may land on any thread, and CPython runs its handlers only in the main thread, which
/// stays asleep if another thread took the signal.
pub fn signal_main_thread(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: tgkill has no memory effects.
    cvt(unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, sig) } as i32).map(|_| ())
}

/// Signals a whole process group, falling back to the single process if the group is gone.
pub fn kill_group(pid: i32, sig: i32) -> io::Result<()> {
    kill(-pid, sig).or_else(|_| kill(pid, sig))
}

/// Sets a terminal's window size.
pub fn set_winsize(fd: RawFd, size: TtySize) -> io::Result<()> {
    let ws = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

/// Opens a new pseudo-terminal pair (master, slave), both close-on-exec, without glibc's
/// openpty/grantpt (which may consult NSS for the tty group).
pub fn open_pty(size: TtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let path = cstr("/dev/ptmx")?;
    // SAFETY: path is a valid NUL-terminated string; the returned fd is owned below.
    let m = cvt(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: m is a freshly opened fd nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the valid pointer.
    cvt(unsafe { libc::ioctl(m, libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd.
    let s = unsafe { libc::ioctl(m, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    let slave = if s >= 0 {
        // SAFETY: s is a fresh fd we own.
        unsafe { OwnedFd::from_raw_fd(s) }
    } else {
        // Older kernels: look the slave up by number.
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one unsigned int to the valid pointer.
        cvt(unsafe { libc::ioctl(m, libc::TIOCGPTN, &mut n) })?;
        let p = cstr(&format!("/dev/pts/{n}"))?;
        // SAFETY: p is a valid C string; the fd is owned below.
        let s = cvt(unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
        // SAFETY: s is a fresh fd we own.
        unsafe { OwnedFd::from_raw_fd(s) }
    };
    set_winsize(master.as_raw_fd(), size)?;
    Ok((master, slave))
}

/// Duplicates an fd into a `File` (close-on-exec).
pub fn dup_file(fd: &OwnedFd) -> io::Result<File> {
    Ok(File::from(fd.try_clone()?))
}

/// Makes this process non-dumpable: no core dumps, and a process of another user (the guest's
/// unprivileged user) can neither ptrace it, nor take its fds with pidfd_getfd, nor open its
/// /proc files such as `mem`. Children get the flag back at their execve.
pub fn set_non_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map(|_| ())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// In a forked child before exec: become `uid`/`gid` with no supplementary groups. A non-root
/// `uid` also loses every capability for good (bounding set emptied, ambient and inheritable
/// sets cleared; the setresuid clears the permitted and effective ones) and gets
/// no_new_privs, so no setuid binary or file capability can give any back.
///
/// # Safety
/// Only async-signal-safe system calls: fit for `CommandExt::pre_exec`.
pub unsafe fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    cvt(libc::setgroups(0, std::ptr::null()))?;
    cvt(libc::setresgid(gid, gid, gid))?;
    if uid != 0 {
        for cap in 0..64 {
            // EINVAL past the kernel's last capability.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == -1 && *libc::__errno_location() != libc::EINVAL {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == -1
            && *libc::__errno_location() != libc::EINVAL
        {
            return Err(io::Error::last_os_error());
        }
    }
    cvt(libc::setresuid(uid, uid, uid))?;
    if uid != 0 {
        let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
        let data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
        cvt(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int)?;
        cvt(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

/// Runs `f` on this thread with the file-system ids of `ids` (uid, gid) when given: opens and
/// creates are checked as that user and create files it owns, and a symlink it planted leads
/// nowhere it could not write itself. setfsuid is per thread; root's ids come back after.
pub fn with_fs_ids<T>(ids: Option<(u32, u32)>, f: impl FnOnce() -> T) -> T {
    let Some((uid, gid)) = ids else { return f() };
    // SAFETY: setfsgid/setfsuid change only this thread's file-system ids.
    let (old_gid, old_uid) = unsafe { (libc::setfsgid(gid), libc::setfsuid(uid)) };
    let out = f();
    // SAFETY: as above, back to the previous ids.
    unsafe {
        libc::setfsuid(old_uid as libc::uid_t);
        libc::setfsgid(old_gid as libc::gid_t);
    }
    out
}

/// Fills `buf` from getrandom(2) without blocking (GRND_INSECURE: fine for ids, not keys).
pub fn random_bytes(buf: &mut [u8]) -> bool {
    const GRND_INSECURE: libc::c_uint = 0x0004;
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    let r = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), GRND_INSECURE) };
    if r == buf.len() as isize {
        return true;
    }
    // SAFETY: as above.
    let r = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    r == buf.len() as isize
}

/// Lowercase hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn pty_round_trip() {
        let (m, s) = open_pty(TtySize { rows: 30, cols: 100 }).unwrap();
        let mut slave = File::from(s);
        slave.write_all(b"x").unwrap();
        let mut master = dup_file(&m).unwrap();
        let mut b = [0u8; 8];
        let n = master.read(&mut b).unwrap();
        assert_eq!(&b[..n], b"x");
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize.
        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!((ws.ws_row, ws.ws_col), (30, 100));
    }

    #[test]
    fn hex_and_random() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        let mut a = [0u8; 16];
        assert!(random_bytes(&mut a));
    }
}
