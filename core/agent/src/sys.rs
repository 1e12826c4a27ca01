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
