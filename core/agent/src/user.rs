//! Guest users: the user a process runs as, given like an OCI image config's `User`
//! (`uid`, `uid:gid`, `name`, `name:group`), resolved against the guest's own /etc/passwd and
//! /etc/group. They are read as plain files: the agent is static and must not reach glibc's
//! NSS. As container runtimes do, a numeric uid without a passwd entry runs with gid 0 and
//! HOME=/; supplementary groups are dropped.
//!
//! The guest's default user: when `/etc/supermachine/guest-user` exists (written by root when
//! the kernel provisions its image, so it lives in every snapshot), a request that names no
//! user runs as that user: spawns (process.rs) and the host's file reads and writes (files.rs,
//! with the user's file-system ids). A request that names a user, root included, gets it.
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use supermachine_protocol::ErrorKind;

use crate::process::Failure;
use crate::sys::lock;

/// Who a process runs as, and its home directory (its default `HOME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Holds the guest's default user spec (one line, like a Spawn's `user`); root-owned.
pub const DEFAULT_USER_FILE: &str = "/etc/supermachine/guest-user";

/// Who a request runs as: the user it names, else the guest's default user, else None (the
/// agent itself, root). A default-user file that cannot be read or resolved fails the request
/// rather than running it as root.
pub fn for_request(spec: Option<&str>) -> Result<Option<Ids>, Failure> {
    if let Some(spec) = spec {
        return resolve(spec).map(Some);
    }
    // Every host file transfer asks: the answer is kept while the three files it comes from
    // are unchanged (three stats instead of three reads; ~0.6 ms per file under TCG).
    static CACHE: Mutex<Option<(Stamp, Option<Ids>)>> = Mutex::new(None);
    let stamp = stamp();
    if let Some((s, ids)) = lock(&CACHE).as_ref() {
        if *s == stamp {
            return Ok(ids.clone());
        }
    }
    let ids = match fs::read_to_string(DEFAULT_USER_FILE) {
        Ok(text) => resolve(text.trim()).map(Some).map_err(|(kind, m)| {
            (kind, format!("the guest's default user ({DEFAULT_USER_FILE}): {m}"))
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err((ErrorKind::Io, format!("cannot read the guest's default user {DEFAULT_USER_FILE}: {e}"))),
    };
    *lock(&CACHE) = Some((stamp, ids.clone()));
    Ok(ids)
}

/// (device, inode, size, mtime, ctime) of the default-user file, /etc/passwd and /etc/group
/// (zeros for a missing one).
type Stamp = [(u64, u64, u64, i64, i64, i64, i64); 3];

fn stamp() -> Stamp {
    [DEFAULT_USER_FILE, "/etc/passwd", "/etc/group"].map(|p| match fs::metadata(p) {
        Ok(m) => (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()),
        Err(_) => (0, 0, 0, 0, 0, 0, 0),
    })
}

/// Resolves `spec` against the guest's /etc/passwd and /etc/group.
pub fn resolve(spec: &str) -> Result<Ids, Failure> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_in(spec, &passwd, &group)
}

/// `name:x:uid:gid:gecos:home:shell` lines as (name, uid, gid, home).
fn passwd_entries(passwd: &str) -> impl Iterator<Item = (&str, u32, u32, &str)> {
    passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 6 {
            return None;
        }
        Some((f[0], f[2].parse().ok()?, f[3].parse().ok()?, f[5]))
    })
}

fn group_id(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok()).flatten()
    })
}

/// [`resolve`] over the given file contents.
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<Ids, Failure> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || grp.is_some_and(str::is_empty) {
        return Err((ErrorKind::InvalidArgument, format!("user {spec:?}: give uid[:gid] or name[:group]")));
    }
    let numeric = user.parse::<u32>().ok();
    let entry = passwd_entries(passwd).find(|e| match numeric {
        Some(uid) => e.1 == uid,
        None => e.0 == user,
    });
    let (uid, mut gid, home) = match (numeric, entry) {
        (_, Some((_, uid, gid, home))) => (uid, gid, if home.is_empty() { "/" } else { home }.to_string()),
        (Some(uid), None) => (uid, 0, "/".to_string()),
        (None, None) => {
            return Err((
                ErrorKind::NotFound,
                format!("user {user:?} is not in the guest's /etc/passwd; give a numeric uid instead"),
            ))
        }
    };
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_id(group, g).ok_or_else(|| {
                (ErrorKind::NotFound, format!("group {g:?} is not in the guest's /etc/group; give a numeric gid instead"))
            })?,
        };
    }
    Ok(Ids { uid, gid, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\njovyan:x:1000:100::/home/jovyan:/bin/sh\nbroken\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:\nstaff:x:50:jovyan\n";

    fn ids(spec: &str) -> Result<Ids, Failure> {
        resolve_in(spec, PASSWD, GROUP)
    }

    #[test]
    fn names_and_numbers_resolve_through_passwd_and_group() {
        assert_eq!(ids("jovyan").unwrap(), Ids { uid: 1000, gid: 100, home: "/home/jovyan".into() });
        assert_eq!(ids("1000").unwrap(), Ids { uid: 1000, gid: 100, home: "/home/jovyan".into() });
        assert_eq!(ids("jovyan:staff").unwrap().gid, 50);
        assert_eq!(ids("1000:7").unwrap().gid, 7);
        assert_eq!(ids("0").unwrap(), Ids { uid: 0, gid: 0, home: "/root".into() });
    }

    #[test]
    fn a_uid_without_an_entry_gets_gid_0_and_home_slash() {
        assert_eq!(ids("4242").unwrap(), Ids { uid: 4242, gid: 0, home: "/".into() });
        assert_eq!(ids("4242:4242").unwrap().gid, 4242);
    }

    #[test]
    fn unknown_names_and_empty_parts_are_refused() {
        assert_eq!(ids("nobody-here").unwrap_err().0, ErrorKind::NotFound);
        assert_eq!(ids("jovyan:nogroup").unwrap_err().0, ErrorKind::NotFound);
        assert_eq!(ids("").unwrap_err().0, ErrorKind::InvalidArgument);
        assert_eq!(ids("1000:").unwrap_err().0, ErrorKind::InvalidArgument);
    }
}
