//! Who is on the other end of a loopback TCP connection: the proxy of a kernel listens on the
//! host's 127.0.0.1, where every local user can connect, so it serves only connections opened
//! by its own user (the kernel's relay of the guest's channel). Linux keeps the owner of each
//! TCP socket in `/proc/net/tcp`; the parsing is pure, the read is one file per connection.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// `127.0.0.1:8080` as `/proc/net/tcp` writes it: `0100007F:1F90` (the address as the
/// kernel's u32 in host byte order, then the port).
fn proc_form(addr: SocketAddrV4) -> String {
    format!("{:08X}:{:04X}", u32::from_ne_bytes(addr.ip().octets()), addr.port())
}

/// The uid owning the socket whose local end is `local` and remote end `remote`, from the
/// text of `/proc/net/tcp`. Entries without a socket inode (TIME_WAIT leftovers of an earlier
/// connection on the same ports, listed with uid 0) are skipped.
pub fn owner_in(table: &str, local: SocketAddrV4, remote: SocketAddrV4) -> Option<u32> {
    let (l, r) = (proc_form(local), proc_form(remote));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[1] == l && f[2] == r && f[9] != "0" {
            f[7].parse().ok()
        } else {
            None
        }
    })
}

/// The uid of the process side that opened a connection from `client` to `server` on this
/// host's IPv4 loopback; None when it cannot be told (then the connection is not served).
pub fn loopback_client_uid(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let (SocketAddr::V4(c), SocketAddr::V4(s)) = (client, server) else {
        return None;
    };
    if !c.ip().is_loopback() || *s.ip() == Ipv4Addr::UNSPECIFIED {
        return None;
    }
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    owner_in(&table, c, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:9C40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:D431 0100007F:9C40 06 00000000:00000000 03:00000F2A 00000000     0        0 0 3 0000000000000000\n\
   2: 0100007F:D431 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1001        0 2 1 0 20 4 30 10 -1\n";

    #[test]
    fn finds_the_owner_of_the_client_end() {
        let server = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0x9C40);
        let client = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0xD431);
        assert_eq!(owner_in(TABLE, client, server), Some(1001));
        assert_eq!(owner_in(TABLE, server, client), None);
        assert_eq!(owner_in("", client, server), None);
    }

    #[test]
    fn a_real_connection_is_ours() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        let uid = unsafe { libc::geteuid() };
        assert_eq!(loopback_client_uid(peer, listener.local_addr().unwrap()), Some(uid));
    }
}
