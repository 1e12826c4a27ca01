//! Test helpers for the OCI tests: layer tarballs written entry by entry (raw names, so a test
//! can write the `../` and absolute paths a hostile image would), OCI layout directories, and
//! a real registry (Debian's `docker-registry`) on 127.0.0.1, optionally with TLS and htpasswd
//! or bearer tokens from the test token server (`token_server.rs`).
#![allow(dead_code)]
mod token_server;
pub use token_server::*;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect::<String>())
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("smk-oci-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A layer tarball built entry by entry.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

fn header(name: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    let bytes = name.as_bytes();
    assert!(bytes.len() < 100, "short names only: {name}");
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder { b: tar::Builder::new(Vec::new()) }
    }

    fn push(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.push(header(name, tar::EntryType::Directory, mode, 0), b"")
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.push(header(name, tar::EntryType::Regular, 0o644, data.len() as u64), data)
    }

    /// A file with full metadata and optional PAX xattrs.
    #[allow(clippy::too_many_arguments)]
    pub fn file_meta(&mut self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64, mtime: u64,
                     xattrs: &[(&str, &[u8])]) -> &mut Self {
        if !xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
            self.b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        }
        let mut h = header(name, tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        self.push(h, data)
    }

    fn link(&mut self, name: &str, target: &str, kind: tar::EntryType) -> &mut Self {
        let mut h = header(name, kind, 0o777, 0);
        let t = target.as_bytes();
        assert!(t.len() < 100);
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
        self.push(h, b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.link(name, target, tar::EntryType::Symlink)
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.link(name, target, tar::EntryType::Link)
    }

    pub fn chardev(&mut self, name: &str) -> &mut Self {
        let mut h = header(name, tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        self.push(h, b"")
    }

    pub fn fifo(&mut self, name: &str) -> &mut Self {
        self.push(header(name, tar::EntryType::Fifo, 0o644, 0), b"")
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

pub fn zstd(b: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(b, 1).unwrap()
}

pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An OCI image layout directory written blob by blob.
pub struct Layout {
    pub dir: PathBuf,
    entries: Vec<Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir: dir.to_path_buf(), entries: Vec::new() }
    }

    pub fn blob(&self, bytes: &[u8], media_type: &str) -> Value {
        let d = sha256(bytes);
        std::fs::write(self.blob_path(&d), bytes).unwrap();
        json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }

    /// Writes config + layers + manifest for `arch`; returns the manifest's descriptor.
    pub fn image(&self, arch: &str, layers: &[(Vec<u8>, &str)], config: Value) -> Value {
        let layer_descs: Vec<Value> = layers.iter().map(|(b, m)| self.blob(b, m)).collect();
        let mut cfg = json!({
            "architecture": arch, "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(b, _)| sha256(&uncompressed(b))).collect::<Vec<_>>()},
        });
        cfg["created"] = json!("2026-01-01T00:00:00Z");
        let cfg_desc = self.blob(cfg.to_string().as_bytes(), "application/vnd.oci.image.config.v1+json");
        let manifest = json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg_desc, "layers": layer_descs});
        let mut d = self.blob(manifest.to_string().as_bytes(), MANIFEST);
        d["platform"] = json!({"architecture": arch, "os": "linux"});
        d
    }

    /// Writes an index over `manifests`; returns its descriptor.
    pub fn index(&self, manifests: &[Value]) -> Value {
        let idx = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests});
        self.blob(idx.to_string().as_bytes(), INDEX)
    }

    /// Lists `desc` in index.json under `tag`.
    pub fn tag(&mut self, desc: &Value, tag: &str) -> &mut Self {
        let mut d = desc.clone();
        d.as_object_mut().unwrap().remove("platform");
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.entries.push(d);
        let index = json!({"schemaVersion": 2, "manifests": self.entries});
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
        self
    }
}

fn uncompressed(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    if b.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(b).read_to_end(&mut out).unwrap_or_default();
    } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        out = zstd::stream::decode_all(b).unwrap_or_default();
    } else {
        out = b.to_vec();
    }
    out
}

/// Fails the test with how to install a missing host tool (setup installs them).
pub fn require(tool: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()))
        .unwrap_or_default();
    found.unwrap_or_else(|| {
        panic!("`{tool}` is missing: these tests need Debian package {package} (tools/setup-host.sh installs it; or `apt-get install {package}`)")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// TLS material for a registry on 127.0.0.1: a CA and a server certificate it signed.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_tls(dir: &Path) -> Tls {
    require("openssl", "openssl");
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=smk test CA"]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"]);
    Tls { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") }
}

/// How the test registry authenticates clients.
pub enum Auth<'a> {
    None,
    /// htpasswd with this one user.
    Htpasswd(&'a str, &'a str),
    /// Bearer tokens from this token server (the pusher pushes).
    Token(&'a TokenServer),
}

/// A `docker-registry` serving on 127.0.0.1 until dropped.
pub struct Registry {
    pub addr: String,
    child: Child,
    dir: TempDir,
    pub tls: Option<Tls>,
    pub creds: Option<(String, String)>,
}

impl Registry {
    pub fn start(tls: bool, auth: Option<(&str, &str)>) -> Registry {
        Registry::start_with(tls, auth.map_or(Auth::None, |(u, p)| Auth::Htpasswd(u, p)))
    }

    pub fn start_with(tls: bool, auth: Auth) -> Registry {
        let bin = require("docker-registry", "docker-registry");
        let dir = TempDir::new("registry");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        let tls = tls.then(|| make_tls(dir.path()));
        if let Some(t) = &tls {
            yaml += &format!("  tls:\n    certificate: {}\n    key: {}\n", t.cert.display(), t.key.display());
        }
        let creds = match auth {
            Auth::None => None,
            Auth::Htpasswd(u, p) => {
                require("htpasswd", "apache2-utils");
                let out = Command::new("htpasswd").args(["-Bbn", u, p]).output().unwrap();
                assert!(out.status.success());
                std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
                yaml += &format!("auth:\n  htpasswd:\n    realm: smk-test\n    path: {}\n", dir.path().join("htpasswd").display());
                Some((u.to_string(), p.to_string()))
            }
            Auth::Token(server) => {
                yaml += &server.registry_yaml();
                Some((PUSHER.0.to_string(), PUSHER.1.to_string()))
            }
        };
        std::fs::write(dir.path().join("config.yml"), yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let r = Registry { addr, child, dir, tls, creds };
        let t = Instant::now();
        while TcpStream::connect(&r.addr).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "registry did not start: {}", r.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// Where the registry keeps blob `digest` on disk (for tests that damage it).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes `oci:<layout>:<tag>` as `<addr>/<name>:<tag>` with skopeo (all platforms).
    pub fn push(&self, layout: &Path, tag: &str, name: &str) {
        let skopeo = require("skopeo", "skopeo");
        let mut c = Command::new(skopeo);
        c.args(["--insecure-policy", "copy", "--quiet", "--all", "--preserve-digests"]);
        if let Some(t) = &self.tls {
            c.arg(format!("--dest-cert-dir={}", t.ca.parent().unwrap().join("certs").display()));
            let certs = t.ca.parent().unwrap().join("certs");
            std::fs::create_dir_all(&certs).unwrap();
            std::fs::copy(&t.ca, certs.join("ca.crt")).unwrap();
        } else {
            c.arg("--dest-tls-verify=false");
        }
        if let Some((u, p)) = &self.creds {
            c.arg(format!("--dest-creds={u}:{p}"));
        }
        c.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{}/{name}:{tag}", self.addr));
        let out = c.output().unwrap();
        assert!(out.status.success(), "skopeo push: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log());
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The layers of the multi-layer test image: a base, then a layer that deletes and replaces
/// (whiteouts, an opaque directory), then one with hostile paths (escapes, device nodes).
pub fn sample_layers(outside: &Path) -> Vec<(Vec<u8>, &'static str)> {
    let base = LayerBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/os-release", b"ID=test\n")
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .file_meta("usr/bin/python3", b"#!fake python\n", 0o755, 0, 0, 1_500_000_000, &[])
        .dir("opt/", 0o755)
        .dir("opt/app/", 0o750)
        .file("opt/app/old1", b"1")
        .file("opt/app/old2", b"2")
        .dir("var/", 0o755)
        .file("var/gone", b"x")
        .dir("var/cache/", 0o755)
        .file("var/cache/c", b"c")
        .symlink("bin", "usr/bin")
        .finish();
    let middle = LayerBuilder::new()
        .file("opt/app/new", b"fresh")     // before the opaque marker, same layer: kept
        .file("opt/app/.wh..wh..opq", b"")
        .file("var/.wh.gone", b"")
        .file("var/.wh.cache", b"")
        .file("bin/from-link", b"via the bin symlink")
        .file_meta("usr/bin/su", b"suid", 0o4755, 1234, 5678, 1_234_567_890, &[("user.smk", b"hello")])
        .hardlink("usr/bin/su-link", "usr/bin/su")
        .symlink("usr/bin/python", "python3")
        .finish();
    let out = outside.display().to_string();
    let hostile = LayerBuilder::new()
        .file("../escape-dotdot", b"no")
        .file("etc/../../escape-nested", b"no")
        .file("/abs-file", b"contained")
        .symlink("evil", &out)
        .file("evil/pwned", b"no")
        .symlink("up", "../../../..")
        .file("up/up-file", b"contained")
        .hardlink("hl-out", "../../etc/passwd")
        .chardev("dev-null")
        .fifo("a-fifo")
        .finish();
    vec![(gzip(&base), GZIP), (zstd(&middle), ZSTD), (hostile, TAR)]
}
