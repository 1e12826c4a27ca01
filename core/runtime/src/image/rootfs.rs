//! The root filesystem: a recipe (or a given directory) → `rootfs.erofs`.
//!
//! Steps for a recipe, in a scratch directory under the cache's `tmp/`:
//! 1. `mmdebstrap --variant=apt --include=<debs> <suite>` into `root/` (docs, man pages and
//!    translations excluded via dpkg path-excludes), and *at the same time* the host's pip
//!    installs the pinned wheels for the guest's Python into `site/` (`--target`, `--platform
//!    manylinux…`, `--only-binary=:all:`, `--no-deps`): pip inside the chroot would have neither
//!    the host's certificates nor its index settings.
//! 2. `site/` moves to `root/usr/local/lib/python3.X/dist-packages`; test suites of the big
//!    packages are dropped; console scripts go to `/usr/local/bin` with a guest shebang.
//! 3. `chroot root python3 -m compileall --invalidation-mode unchecked-hash`: the image is
//!    read-only, so bytecode must be there already (the guest would otherwise compile into its
//!    tmpfs on every cold start, and compiling under TCG is slow).
//! 4. `mkfs.erofs` uncompressed (`--preserve-mtime`, so Debian's timestamp-checked .pyc stay
//!    valid): guest reads then cost no decompression, which under TCG is 14–22× slower than on
//!    the host; it is ~2× bigger than lz4hc but builds in a fraction of the time.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{ImageError, Result};
use super::recipe::Recipe;
use super::tools::{self, Progress};

/// Where the pieces of one build live.
pub struct Scratch {
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The Python whose pip downloads the guest's wheels (see [`host_python`]).
    pub host_python: Option<PathBuf>,
}

impl Scratch {
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    fn site(&self) -> PathBuf {
        self.dir.join("site")
    }
}

/// dpkg path filters: nothing under these is unpacked (copyright files are kept).
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/lintian/*",
];

/// The manylinux platform tags the guest's glibc (bookworm: 2.36) accepts, newest first.
fn platforms() -> Vec<String> {
    let mut v: Vec<String> = (17..=36).rev().map(|m| format!("manylinux_2_{m}_x86_64")).collect();
    v.extend(["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"].map(String::from));
    v
}

/// Records (step name, seconds) for the manifest.
pub type Timings = Vec<(String, f64)>;

/// Builds the tree for `recipe` in `scratch.root()`; returns the guest Python version.
pub fn build_tree(recipe: &Recipe, s: &Scratch, progress: &Progress, t: &mut Timings)
    -> Result<Option<String>>
{
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::NeedRoot { step: "building a Debian root filesystem".into() });
    }
    tools::which("mmdebstrap")?;
    tools::which("chroot")?;
    let python = host_python(s.host_python.as_deref());
    if !recipe.pip.is_empty() {
        tools::which(&python)?;
    }
    let (debs, pip) = std::thread::scope(|scope| {
        let pip = (!recipe.pip.is_empty()).then(|| {
            scope.spawn(|| {
                progress.step(&format!("pip install {} pinned wheels", recipe.pip.len()), || {
                    pip_install(recipe, &python, s)
                })
            })
        });
        let debs = progress.step(
            &format!("mmdebstrap {} ({})", recipe.suite, recipe.debs.join(", ")),
            || mmdebstrap(recipe, s),
        );
        (debs, pip.map(|h| h.join().expect("pip thread panicked")))
    });
    t.push(("mmdebstrap".into(), debs?.1));
    if let Some(pip) = pip {
        t.push(("pip".into(), pip?.1));
    }
    let root = s.root();
    let py_dir = format!("usr/lib/python{}", recipe.python);
    if !root.join(&py_dir).is_dir() {
        return Err(ImageError::StepFailed {
            step: "checking the guest Python".into(),
            status: format!("/{py_dir} is missing"),
            log: s.log.clone(),
            tail: format!(
                "the recipe targets Python {} but suite {} installed another version",
                recipe.python, recipe.suite
            ),
        });
    }
    if !recipe.pip.is_empty() {
        let (_, secs) = progress.step("place packages, compile bytecode", || {
            place_site(recipe, s)?;
            compile(recipe, s)
        })?;
        t.push(("compileall".into(), secs));
    }
    if !recipe.warm.is_empty() {
        let (_, secs) = progress.step("pre-build guest caches", || warm(recipe, s))?;
        t.push(("warm".into(), secs));
    }
    cleanup(&root);
    Ok(guest_python_version(&root))
}

/// The host Python whose pip downloads the guest's wheels: `$SUPERMACHINE_HOST_PYTHON`, else
/// the caller's choice (the bindings pass the running interpreter, which in a venv always has
/// pip), else `python3` on PATH.
pub(super) fn host_python(given: Option<&Path>) -> String {
    std::env::var("SUPERMACHINE_HOST_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| given.map(|p| p.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "python3".into())
}

fn mmdebstrap(recipe: &Recipe, s: &Scratch) -> Result<()> {
    let mut c = tools::command("mmdebstrap")?;
    c.args(["--mode=root", "--variant=apt", "--format=directory"]);
    if !recipe.debs.is_empty() {
        c.arg(format!("--include={}", recipe.debs.join(",")));
    }
    for d in DPKG_EXCLUDES {
        c.arg(format!("--dpkgopt={d}"));
    }
    // A scratch tree needs no fsync per unpacked file (~20% faster here); no translations.
    c.arg("--dpkgopt=force-unsafe-io").arg("--aptopt=Acquire::Languages \"none\"");
    c.arg(&recipe.suite).arg(s.root());
    tools::run_logged(&mut c, "mmdebstrap", &s.log)
}

fn pip_install(recipe: &Recipe, python: &str, s: &Scratch) -> Result<()> {
    let reqs = s.dir.join("requirements.txt");
    fs::write(&reqs, recipe.pip.join("\n") + "\n").map_err(ImageError::io("writing requirements"))?;
    let mut c = Command::new(tools::which(python)?);
    c.args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input"])
        .arg("--target")
        .arg(s.site())
        .args(["--python-version", &recipe.python, "--implementation", "cp"]);
    for p in platforms() {
        c.args(["--platform", &p]);
    }
    c.args([
        "--only-binary=:all:",
        "--no-deps",
        "--no-compile",
        "--no-warn-conflicts",
        "--no-warn-script-location",
        "--progress-bar=off",
        "-r",
    ])
    .arg(&reqs)
    .env("PIP_ROOT_USER_ACTION", "ignore")
    .env_remove("PIP_REQUIRE_VIRTUALENV")
    .env_remove("PYTHONPATH");
    let start = fs::metadata(&s.log).map(|m| m.len()).unwrap_or(0);
    tools::run_logged(&mut c, "pip install", &s.log).map_err(|e| {
        let text = fs::read(&s.log).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default());
        if text.contains("No module named pip") {
            ImageError::MissingTool { tool: format!("{python} -m pip"), package: "python3-pip".into() }
        } else {
            e
        }
    })
}

fn site_packages(recipe: &Recipe) -> String {
    format!("usr/local/lib/python{}/dist-packages", recipe.python)
}

/// Moves the console scripts pip wrote to `bin` (if any) into `dest`, each Python script's
/// shebang replaced by `#!<interpreter>` (pip wrote the host's), mode 0755; `bin` is removed.
pub(crate) fn place_scripts(bin: &Path, dest: &Path, interpreter: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !bin.is_dir() {
        return Ok(());
    }
    super::cache::mkdirs(dest)?;
    for e in fs::read_dir(bin).map_err(ImageError::io("reading scripts"))?.flatten() {
        let data = fs::read(e.path()).map_err(ImageError::io("reading a script"))?;
        let data = match data.strip_prefix(b"#!") {
            Some(rest) if rest.windows(6).take(200).any(|w| w == b"python") => {
                let nl = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
                [format!("#!{interpreter}").as_bytes(), &rest[nl..]].concat()
            }
            _ => data,
        };
        let to = dest.join(e.file_name());
        fs::write(&to, data).map_err(ImageError::io("writing a script"))?;
        let _ = fs::set_permissions(&to, fs::Permissions::from_mode(0o755));
    }
    fs::remove_dir_all(bin).map_err(ImageError::io("removing scripts dir"))
}

fn place_site(recipe: &Recipe, s: &Scratch) -> Result<()> {
    let site = s.site();
    let root = s.root();
    // Console scripts: /usr/local/bin, with the guest interpreter in the shebang.
    place_scripts(&site.join("bin"), &root.join("usr/local/bin"), "/usr/bin/python3")?;
    // Jupyter front-end assets (share/jupyter/...) are of no use inside the guest.
    let _ = fs::remove_dir_all(site.join("share"));
    for pkg in &recipe.strip_tests {
        remove_dirs_named(&site.join(pkg), "tests");
    }
    let dest = root.join(site_packages(recipe));
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(ImageError::io("clearing dist-packages"))?;
    }
    fs::create_dir_all(dest.parent().expect("has parent")).map_err(ImageError::io("creating site dir"))?;
    fs::rename(&site, &dest).map_err(ImageError::io("moving packages into the root"))
}

fn remove_dirs_named(dir: &Path, name: &str) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if e.file_name() == name {
                let _ = fs::remove_dir_all(&p);
            } else {
                remove_dirs_named(&p, name);
            }
        }
    }
}

fn compile(recipe: &Recipe, s: &Scratch) -> Result<()> {
    let mut c = tools::command("chroot")?;
    c.arg(s.root())
        .arg("/usr/bin/python3")
        .args(["-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash"])
        .arg(format!("/{}", site_packages(recipe)))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME");
    // compileall exits 1 when some file fails to compile (e.g. a template written in a newer
    // Python syntax); that file is then simply compiled at import, so only a crash is fatal.
    match tools::run_logged(&mut c, "compileall", &s.log) {
        Err(ImageError::StepFailed { status, .. }) if status.contains("exit status: 1") => Ok(()),
        r => r,
    }
}

fn warm(recipe: &Recipe, s: &Scratch) -> Result<()> {
    for snippet in &recipe.warm {
        let mut c = tools::command("chroot")?;
        c.arg(s.root())
            .args(["/usr/bin/python3", "-c", snippet])
            .current_dir("/")
            .env_clear()
            .env("HOME", "/root")
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LC_ALL", "C.UTF-8");
        tools::run_logged(&mut c, &format!("pre-build step `{snippet}`"), &s.log)?;
    }
    Ok(())
}

/// Removes what a read-only guest has no use for, and what the build copied from the host
/// (mmdebstrap leaves the host's hostname and resolv.conf in the tree; the guest has no network
/// and must not learn about the host).
fn cleanup(root: &Path) {
    let etc = root.join("etc");
    let _ = fs::remove_file(etc.join("resolv.conf"));
    let _ = fs::write(etc.join("hostname"), "microvm\n");
    let _ = fs::write(
        etc.join("hosts"),
        "127.0.0.1\tlocalhost microvm\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    for d in ["var/lib/apt/lists", "var/cache/apt", "var/cache/debconf", "var/log", "tmp"] {
        if let Ok(rd) = fs::read_dir(root.join(d)) {
            for e in rd.flatten() {
                let p = e.path();
                if p.file_name().is_some_and(|n| n == "lock" || n == "partial") && d.starts_with("var/lib/apt") {
                    continue;
                }
                let _ = if p.is_dir() && !p.is_symlink() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            }
        }
    }
}

/// The guest's Python version: dpkg's record of `python3.X` (e.g. `3.11.2`), else the name
/// `/usr/bin/python3` points to (e.g. `3.11`).
pub fn guest_python_version(root: &Path) -> Option<String> {
    let link = fs::read_link(root.join("usr/bin/python3")).ok()?;
    let minor = link.file_name()?.to_str()?.strip_prefix("python")?.to_string();
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap_or_default();
    let want = format!("Package: python{minor}\n");
    let full = status
        .split("\n\n")
        .find(|stanza| stanza.starts_with(&want))
        .and_then(|st| st.lines().find_map(|l| l.strip_prefix("Version: ")))
        .map(|v| v.split(['-', '+', '~']).next().unwrap_or(v).to_string());
    Some(full.unwrap_or(minor))
}

/// Packs `tree` into the erofs image `out`.
pub fn mkfs_erofs(tree: &Path, out: &Path, log: &Path) -> Result<()> {
    let mut c = tools::command("mkfs.erofs")?;
    c.args(["--quiet", "--preserve-mtime"]).arg(out).arg(tree);
    tools::run_logged(&mut c, "mkfs.erofs", log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_get_the_guest_interpreter_and_the_bin_dir_goes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("smk-scripts-{}", std::process::id()));
        let (bin, dest) = (dir.join("site/bin"), dir.join("root/usr/local/bin"));
        fs::create_dir_all(&bin).unwrap();
        fs::write(bin.join("tool"), b"#!/host/venv/bin/python3.11\nimport sys\n").unwrap();
        fs::write(bin.join("plain.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        place_scripts(&bin, &dest, "/usr/local/bin/python3.12").unwrap();
        assert_eq!(fs::read(dest.join("tool")).unwrap(), b"#!/usr/local/bin/python3.12\nimport sys\n");
        assert_eq!(fs::read(dest.join("plain.sh")).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(fs::metadata(dest.join("tool")).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(!bin.exists());
        place_scripts(&bin, &dest, "/x").unwrap(); // no bin dir: nothing to do
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn platforms_cover_bookworm_glibc_and_legacy_tags() {
        let p = platforms();
        assert_eq!(p[0], "manylinux_2_36_x86_64");
        assert!(p.contains(&"manylinux2014_x86_64".to_string()));
        assert!(p.contains(&"manylinux_2_17_x86_64".to_string()));
    }

    #[test]
    fn python_version_from_dpkg_status() {
        let d = std::env::temp_dir().join(format!("smk-pyver-{}", std::process::id()));
        fs::create_dir_all(d.join("usr/bin")).unwrap();
        fs::create_dir_all(d.join("var/lib/dpkg")).unwrap();
        std::os::unix::fs::symlink("python3.11", d.join("usr/bin/python3")).unwrap();
        assert_eq!(guest_python_version(&d).as_deref(), Some("3.11"));
        fs::write(
            d.join("var/lib/dpkg/status"),
            "Package: python3\nVersion: 3.11.2-1+b1\n\nPackage: python3.11\nStatus: x\nVersion: 3.11.2-6+deb12u6\n",
        )
        .unwrap();
        assert_eq!(guest_python_version(&d).as_deref(), Some("3.11.2"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn remove_tests_dirs_only() {
        let d = std::env::temp_dir().join(format!("smk-strip-{}", std::process::id()));
        fs::create_dir_all(d.join("pkg/core/tests")).unwrap();
        fs::create_dir_all(d.join("pkg/testing")).unwrap();
        fs::write(d.join("pkg/core/tests/t.py"), "").unwrap();
        remove_dirs_named(&d, "tests");
        assert!(!d.join("pkg/core/tests").exists());
        assert!(d.join("pkg/testing").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
