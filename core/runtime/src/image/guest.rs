//! The guest's Python, read from an image's files (nothing from the image runs on the host).
//!
//! ```text
//! python3   first `python3` on the image's PATH (its config Env, else the usual one), symlinks
//!           resolved inside the root; version from the resolved name (`python3.12`) or from
//!           the stdlib directory `<prefix>/lib/python3.X/os.py`
//! libc      `ld-musl-x86_64.so.1` → musl (version from apk's database), else the highest
//!           `GLIBC_2.N` symbol version in `libc.so.6` → manylinux_2_N … tags
//! site dir  Debian's `/usr/local/lib/python3.X/dist-packages` when the interpreter is Debian's
//!           (`/usr/lib/python3/dist-packages` exists), else `<prefix>/lib/python3.X/site-packages`
//! installed every `*.dist-info` / `*.egg-info` on the interpreter's default paths, so the
//!           layers never install over a version the image already has
//! ```
//! Paths inside the image are resolved with [`resolve_in_root`]: an absolute symlink means the
//! image's root, never the host's.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// PATH when the image config sets none (the agent's default too).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The guest's C library, which decides the wheel platform tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Libc {
    Glibc { major: u32, minor: u32 },
    Musl { major: u32, minor: u32 },
}

/// What pip needs to know to install for the guest, and where the files go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestPython {
    /// The interpreter as found on PATH, e.g. `/usr/local/bin/python3`.
    pub path: String,
    /// `major.minor`, e.g. `3.12`.
    pub version: String,
    /// The full version when the image records it (dpkg status, `PYTHON_VERSION`).
    pub full_version: Option<String>,
    pub libc: Libc,
    /// Where added packages go, relative to the root (no leading `/`).
    pub site: String,
    /// Normalized distribution name → version, for every distribution the image already has.
    pub installed: BTreeMap<String, String>,
}

impl GuestPython {
    /// pip `--platform` tags the guest accepts, most specific first.
    pub fn platforms(&self) -> Vec<String> {
        match self.libc {
            Libc::Glibc { major: 2, minor } => {
                // PEP 600 tags start at glibc 2.17; older ones only have the legacy aliases.
                let mut v: Vec<String> = match minor >= 17 {
                    true => (17..=minor).rev().map(|m| format!("manylinux_2_{m}_x86_64")).collect(),
                    false => Vec::new(),
                };
                let legacy = [(17, "manylinux2014_x86_64"), (12, "manylinux2010_x86_64"), (5, "manylinux1_x86_64")];
                v.extend(legacy.iter().filter(|(m, _)| minor >= *m).map(|(_, t)| t.to_string()));
                v
            }
            Libc::Glibc { .. } => vec![],
            Libc::Musl { major, minor } => {
                (1..=minor.max(1)).rev().map(|m| format!("musllinux_{major}_{m}_x86_64")).collect()
            }
        }
    }

    /// "Python 3.12 (manylinux_2_36_x86_64)": how error messages name the guest.
    pub fn describe(&self) -> String {
        let p = self.platforms();
        format!("Python {} ({})", self.version, p.first().map_or("no known wheel platform", |s| s.as_str()))
    }
}

/// PEP 503 name normalization: lower case, runs of `-_.` become `-`.
pub fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut sep = false;
    for c in name.chars() {
        if "-_.".contains(c) {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Resolves the absolute guest path `path` inside `root`, following symlinks as the guest would
/// (an absolute target restarts at `root`, `..` never leaves it). Returns the guest path.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> =
        Path::new(path).components().rev().filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        }).collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&part);
        let md = fs::symlink_metadata(root.join(&next)).ok()?;
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(root.join(&next)).ok()?;
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(s) => todo.push(s.to_os_string()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        } else {
            cur = next;
        }
    }
    Some(Path::new("/").join(cur))
}

fn host(root: &Path, guest: &Path) -> PathBuf {
    root.join(guest.strip_prefix("/").unwrap_or(guest))
}

/// Detects the guest Python of the tree `root` whose config environment is `env`
/// (`KEY=value` entries). None if no `python3` is on its PATH.
pub fn detect(root: &Path, env: &[String]) -> Option<GuestPython> {
    let path_var = env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    let (found, resolved) = path_var.split(':').filter(|d| d.starts_with('/')).find_map(|d| {
        let p = format!("{}/python3", d.trim_end_matches('/'));
        let r = resolve_in_root(root, &p)?;
        fs::metadata(host(root, &r)).ok()?.is_file().then_some((p, r))
    })?;
    let bin_dir = resolved.parent()?.to_path_buf();
    let prefix = bin_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let name = resolved.file_name()?.to_str()?.to_string();
    let from_name = name.strip_prefix("python").filter(|v| v.starts_with("3.") && v[2..].chars().all(|c| c.is_ascii_digit()));
    let version = match from_name {
        Some(v) => v.to_string(),
        None => stdlib_versions(root, &prefix).pop()?,
    };
    let libc = detect_libc(root)?;
    let debian = root.join("usr/lib/python3/dist-packages").is_dir() && prefix == Path::new("/usr");
    let site = if debian {
        format!("usr/local/lib/python{version}/dist-packages")
    } else {
        let p = prefix.join(format!("lib/python{version}/site-packages"));
        p.strip_prefix("/").unwrap_or(&p).to_string_lossy().into_owned()
    };
    let full_version = dpkg_python_version(root, &version).or_else(|| {
        env.iter()
            .find_map(|e| e.strip_prefix("PYTHON_VERSION="))
            .filter(|v| v.starts_with(&format!("{version}.")))
            .map(str::to_string)
    });
    let mut installed = BTreeMap::new();
    let dirs = [
        "/usr/lib/python3/dist-packages".to_string(),
        format!("/usr/lib/python{version}/site-packages"),
        format!("/usr/lib/python{version}/dist-packages"),
        format!("/usr/local/lib/python{version}/dist-packages"),
        format!("/usr/local/lib/python{version}/site-packages"),
        prefix.join(format!("lib/python{version}/site-packages")).to_string_lossy().into_owned(),
    ];
    for d in dirs {
        if let Some(r) = resolve_in_root(root, &d) {
            read_dists(&host(root, &r), &mut installed);
        }
    }
    Some(GuestPython { path: found, version, full_version, libc, site, installed })
}

/// `3.X` for every `<prefix>/lib/python3.X/os.py`, oldest first.
fn stdlib_versions(root: &Path, prefix: &Path) -> Vec<String> {
    let Some(lib) = resolve_in_root(root, &prefix.join("lib").to_string_lossy()) else { return vec![] };
    let mut v: Vec<(u32, String)> = fs::read_dir(host(root, &lib))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let minor: u32 = n.strip_prefix("python3.")?.parse().ok()?;
            e.path().join("os.py").is_file().then(|| (minor, format!("3.{minor}")))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).collect()
}

fn dpkg_python_version(root: &Path, minor: &str) -> Option<String> {
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).ok()?;
    let want = format!("Package: python{minor}\n");
    let stanza = status.split("\n\n").find(|s| s.starts_with(&want))?;
    let v = stanza.lines().find_map(|l| l.strip_prefix("Version: "))?;
    Some(v.split(['-', '+', '~']).next().unwrap_or(v).to_string())
}

const LIBC_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

fn detect_libc(root: &Path) -> Option<Libc> {
    for d in LIBC_DIRS {
        if let Some(r) = resolve_in_root(root, &format!("{d}/ld-musl-x86_64.so.1")) {
            if host(root, &r).is_file() {
                let (major, minor) = apk_musl_version(root).unwrap_or((1, 2));
                return Some(Libc::Musl { major, minor });
            }
        }
    }
    for d in LIBC_DIRS {
        let Some(r) = resolve_in_root(root, &format!("{d}/libc.so.6")) else { continue };
        let Ok(bytes) = fs::read(host(root, &r)) else { continue };
        if let Some(minor) = max_glibc_symbol(&bytes) {
            return Some(Libc::Glibc { major: 2, minor });
        }
    }
    None
}

/// The highest `GLIBC_2.N` version string in a libc binary.
fn max_glibc_symbol(bytes: &[u8]) -> Option<u32> {
    let pat = b"GLIBC_2.";
    let mut best = None;
    let mut i = 0;
    while let Some(pos) = bytes[i..].windows(pat.len()).position(|w| w == pat) {
        let start = i + pos + pat.len();
        let digits: String =
            bytes[start..].iter().take_while(|b| b.is_ascii_digit()).map(|b| *b as char).collect();
        if let Ok(n) = digits.parse::<u32>() {
            best = best.max(Some(n));
        }
        i = start;
    }
    best
}

fn apk_musl_version(root: &Path) -> Option<(u32, u32)> {
    let db = fs::read_to_string(root.join("lib/apk/db/installed")).ok()?;
    let stanza = db.split("\n\n").find(|s| s.lines().any(|l| l == "P:musl"))?;
    let v = stanza.lines().find_map(|l| l.strip_prefix("V:"))?;
    let mut it = v.split(['.', '-']).map(|s| s.parse::<u32>());
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// Adds `name → version` for each `*.dist-info` / `*.egg-info` in `dir`.
fn read_dists(dir: &Path, out: &mut BTreeMap<String, String>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = n.strip_suffix(".dist-info").or_else(|| n.strip_suffix(".egg-info")) else { continue };
        let Some((name, rest)) = stem.split_once('-') else { continue };
        let version = rest.split('-').next().unwrap_or(rest);
        if !name.is_empty() && !version.is_empty() {
            out.entry(normalize(name)).or_insert_with(|| version.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smk-guest-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn libc(root: &Path, dir: &str, glibc_minor: u32) {
        fs::create_dir_all(root.join(dir)).unwrap();
        let body = format!("\0GLIBC_2.2.5\0GLIBC_2.{glibc_minor}\0GLIBC_PRIVATE\0GLIBC_2.9\0");
        fs::write(root.join(dir).join("libc.so.6"), body).unwrap();
    }

    #[test]
    fn debian_python_on_merged_usr() {
        let r = tmp("debian");
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::create_dir_all(r.join("usr/lib/python3/dist-packages/six-1.16.0.egg-info")).unwrap();
        fs::create_dir_all(r.join("usr/lib/python3/dist-packages/Foo_Bar-2.0.dist-info")).unwrap();
        symlink("usr/bin", r.join("bin")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        fs::write(r.join("usr/bin/python3.11"), b"elf").unwrap();
        symlink("python3.11", r.join("usr/bin/python3")).unwrap();
        libc(&r, "usr/lib/x86_64-linux-gnu", 36);
        let g = detect(&r, &[]).unwrap();
        assert_eq!(g.path, "/usr/bin/python3");
        assert_eq!(g.version, "3.11");
        assert_eq!(g.libc, Libc::Glibc { major: 2, minor: 36 });
        assert_eq!(g.site, "usr/local/lib/python3.11/dist-packages");
        assert_eq!(g.installed.get("six").map(String::as_str), Some("1.16.0"));
        assert_eq!(g.installed.get("foo-bar").map(String::as_str), Some("2.0"));
        let p = g.platforms();
        assert_eq!(p[0], "manylinux_2_36_x86_64");
        assert!(p.contains(&"manylinux2014_x86_64".into()) && p.contains(&"manylinux_2_17_x86_64".into()));
        assert!(g.describe().contains("Python 3.11"));
        let old = GuestPython { libc: Libc::Glibc { major: 2, minor: 12 }, ..g.clone() };
        assert_eq!(old.platforms(), ["manylinux2010_x86_64", "manylinux1_x86_64"]);
        fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn python_slim_layout_from_config_path() {
        let r = tmp("slim");
        fs::create_dir_all(r.join("usr/local/bin")).unwrap();
        fs::create_dir_all(r.join("usr/local/lib/python3.12/site-packages/pip-24.0.dist-info")).unwrap();
        fs::write(r.join("usr/local/lib/python3.12/os.py"), b"").unwrap();
        fs::write(r.join("usr/local/bin/python3.12"), b"elf").unwrap();
        // An absolute link: resolved inside the image, not on the host.
        symlink("/usr/local/bin/python3.12", r.join("usr/local/bin/python3")).unwrap();
        libc(&r, "lib/x86_64-linux-gnu", 36);
        let env = ["PATH=/usr/local/bin:/usr/bin".to_string(), "PYTHON_VERSION=3.12.7".to_string()];
        let g = detect(&r, &env).unwrap();
        assert_eq!((g.path.as_str(), g.version.as_str()), ("/usr/local/bin/python3", "3.12"));
        assert_eq!(g.full_version.as_deref(), Some("3.12.7"));
        assert_eq!(g.site, "usr/local/lib/python3.12/site-packages");
        assert_eq!(g.installed.get("pip").map(String::as_str), Some("24.0"));
        // A python3 that is not a versioned link: the stdlib directory tells the version.
        fs::remove_file(r.join("usr/local/bin/python3")).unwrap();
        fs::rename(r.join("usr/local/bin/python3.12"), r.join("usr/local/bin/python3")).unwrap();
        assert_eq!(detect(&r, &env).unwrap().version, "3.12");
        fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn musl_and_no_python() {
        let r = tmp("musl");
        fs::create_dir_all(r.join("lib/apk/db")).unwrap();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::write(r.join("lib/ld-musl-x86_64.so.1"), b"").unwrap();
        fs::write(r.join("lib/apk/db/installed"), "P:busybox\nV:1.36\n\nP:musl\nV:1.2.5-r0\n").unwrap();
        assert_eq!(detect(&r, &[]), None, "no python3 on PATH");
        fs::write(r.join("usr/bin/python3.12"), b"elf").unwrap();
        symlink("python3.12", r.join("usr/bin/python3")).unwrap();
        let g = detect(&r, &["PATH=/bin:/usr/bin".into()]).unwrap();
        assert_eq!(g.libc, Libc::Musl { major: 1, minor: 2 });
        assert_eq!(g.platforms(), ["musllinux_1_2_x86_64", "musllinux_1_1_x86_64"]);
        assert_eq!(g.site, "usr/lib/python3.12/site-packages");
        fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let r = tmp("resolve");
        fs::create_dir_all(r.join("a")).unwrap();
        symlink("../../../../etc", r.join("a/up")).unwrap();
        assert_eq!(resolve_in_root(&r, "/a/up/passwd"), None, "the root has no /etc");
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/passwd"), b"").unwrap();
        assert_eq!(resolve_in_root(&r, "/a/up/passwd"), Some(PathBuf::from("/etc/passwd")));
        symlink("loop", r.join("loop")).unwrap();
        assert_eq!(resolve_in_root(&r, "/loop/x"), None);
        assert_eq!(normalize("Foo__Bar.baz"), "foo-bar-baz");
        fs::remove_dir_all(&r).unwrap();
    }
}
