//! The byte channel to the host: the two read loops that install the channel as the
//! [`Writer`](crate::writer::Writer)'s sink and feed what they read to a [`Server`] — the
//! virtio-serial port (PID 1) and a unix socket (host test mode).
//!
//! virtio-serial semantics the port loop copes with: while the host is disconnected, reads
//! return EOF at once (we reset the decoder, close the gate and poll every 10 ms) and writes
//! block in the kernel until the host is back.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use crate::server::Server;
use crate::{debug, log};

/// Finds the virtio-serial port named `name` and returns its /dev path.
pub fn find_port(name: &str) -> Option<String> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in dir.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    None
}

/// PID 1 mode: open the agent port (retrying until it exists) and serve it forever.
pub fn serve_port(server: &mut Server) -> ! {
    let mut warned = false;
    let port: File = loop {
        if let Some(path) = find_port("agent") {
            match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => {
                    log!("serving on {path}");
                    break f;
                }
                Err(e) => log!("cannot open {path}: {e}"),
            }
        } else if !warned {
            log!("waiting for the virtio-serial port named \"agent\"");
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    match port.try_clone() {
        Ok(w) => server.writer().set_sink(Some(Box::new(w)), false),
        Err(e) => log!("cannot duplicate the port fd ({e}); replies will be lost"),
    }
    let mut reader = port;
    let mut buf = vec![0u8; 128 * 1024];
    let mut connected = true;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                if connected {
                    debug!("host disconnected");
                    server.on_disconnect();
                    connected = false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(n) => {
                connected = true;
                server.on_bytes(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log!("read from host failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Test mode: listen on a unix socket and serve one connection at a time, each one like a host
/// reconnecting to the same guest (the process table persists).
pub fn serve_unix(path: &Path, server: &mut Server) -> io::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    log!("listening on {}", path.display());
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let (conn, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        debug!("host connected");
        let writer_half = match conn.try_clone() {
            Ok(w) => w,
            Err(e) => {
                log!("cannot duplicate the connection: {e}");
                continue;
            }
        };
        server.writer().set_sink(Some(Box::new(writer_half)), true);
        serve_stream(&conn, server, &mut buf);
        // Unblock a sender stuck writing to a peer that is gone, then drop the sink.
        let _ = conn.shutdown(std::net::Shutdown::Both);
        server.on_disconnect();
        server.writer().set_sink(None, true);
        debug!("host disconnected");
    }
}

fn serve_stream(mut conn: &UnixStream, server: &mut Server, buf: &mut [u8]) {
    loop {
        match conn.read(buf) {
            Ok(0) => return,
            Ok(n) => server.on_bytes(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("read from host failed: {e}");
                return;
            }
        }
    }
}
