//! Python package layers stacked on an image's root: the kernel layer (what the guest REPL needs
//! for the full experience) and the user's package list, each installed with the *host's* pip
//! for the guest's Python and libc (see `guest.rs`), and cached on its own.
//!
//! ```text
//! resolve   pip install --dry-run --report  (guest python/platform, --only-binary=:all:,
//!           -c: every version the image already has, and the kernel layer's pins)
//!           → the exact set to add; cached in layers/resolve/<key>.json, key = every input
//! install   pip install --no-deps --target <site> name==version … → layers/pip/<key>/tree/
//!           key = the resolved set + guest Python/platform/site: equal sets share one layer
//! stack     the layer trees are hard-linked into the image's unpacked root before mkfs.erofs
//! ```
//! Why one erofs and not a disk per layer: the agent mounts one root disk as the overlay's lower
//! layer; merging on the host costs one `mkfs.erofs` (seconds) per distinct combination and
//! needs nothing new in the guest. The layers themselves are cached, so a changed package list
//! re-resolves and re-installs only that layer.
//!
//! Never overriding the image: what the image has is a constraint of the resolve and left out
//! of the layer; a request that needs another version is refused with pip's reason.
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cache;
use super::error::{ImageError, Result};
use super::guest::{normalize, resolve_in_root, GuestPython};
use super::recipe::{self, short_hex};
use super::rootfs;
use super::tools::{self, Progress};

/// Bump when a layer built from the same inputs would differ.
pub const LAYER_BUILDER_VERSION: u32 = 1;

/// What the guest REPL needs for the full experience (their dependencies come with them), and
/// pip for `%pip install` when the kernel's policy opens the network.
pub const KERNEL_REQUIREMENTS: &[&str] = &["ipython", "comm", "matplotlib-inline", "ipywidgets", "pip"];

/// The user's package list (`Image.build(packages=..., requirements=...)`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackageRequest {
    /// Requirement specifiers, e.g. `scikit-learn==1.6.1`.
    pub packages: Vec<String>,
    /// A requirements file on the host.
    pub requirements: Option<PathBuf>,
}

impl PackageRequest {
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty() && self.requirements.is_none()
    }
}

/// One layer of a built image, as its manifest records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// `kernel` or `packages`.
    pub kind: String,
    pub key: String,
    /// `name==version`, sorted.
    pub pins: Vec<String>,
}

/// How layers are resolved and installed.
pub struct Pip<'a> {
    pub root: &'a Path,
    /// The host interpreter whose pip runs.
    pub python: String,
    pub log: &'a Path,
    pub progress: &'a Progress,
    /// The image's name, for error messages.
    pub image: &'a str,
    /// Resolve again even if a resolution is cached.
    pub force: bool,
}

/// The cache key of a resolution (every input of it) and the constraints it passes to pip.
fn resolution_key(guest: &GuestPython, specs: &[String], requirements: Option<&Path>, also: &[String],
                  extra_constraints: &[String]) -> Result<(String, Vec<String>)> {
    let req_text = match requirements {
        Some(p) => Some(fs::read_to_string(p).map_err(|e| ImageError::BadRequirements {
            path: p.to_path_buf(),
            detail: e.to_string(),
        })?),
        None => None,
    };
    let mut constraints: Vec<String> = guest
        .installed
        .iter()
        .filter(|(_, v)| pep440ish(v))
        .map(|(n, v)| format!("{n}=={v}"))
        .collect();
    constraints.extend(also.iter().cloned());
    let fixed: BTreeSet<String> = constraints.iter().filter_map(|c| c.split_once("==")).map(|(n, _)| normalize(n)).collect();
    constraints.extend(extra_constraints.iter().filter(|c| {
        c.split_once("==").is_some_and(|(n, _)| !fixed.contains(&normalize(n)))
    }).cloned());
    constraints.sort();
    let mut h = Sha256::new();
    h.update(format!("supermachine-resolve={LAYER_BUILDER_VERSION}\npython={}\n", guest.version));
    h.update(format!("platforms={}\nspecs={}\n", guest.platforms().join(","), specs.join("\n")));
    h.update(format!("requirements={}\nconstraints={}\n", req_text.as_deref().unwrap_or("-"), constraints.join(",")));
    Ok((short_hex(&h.finalize()), constraints))
}

fn cached_pins(file: &Path) -> Option<Vec<String>> {
    fs::read(file).ok().and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
}

/// What [`Pip::resolve`] returned before for the same inputs, if it ran (pip is not run): a
/// kernel start uses it to find the image built for a package list without resolving again.
pub fn cached_resolution(root: &Path, guest: &GuestPython, specs: &[String], requirements: Option<&Path>,
                         also: &[String]) -> Result<Option<Vec<String>>> {
    let (key, _) = resolution_key(guest, specs, requirements, also, &[])?;
    Ok(cached_pins(&layers_dir(root).join("resolve").join(format!("{key}.json"))))
}

fn layers_dir(root: &Path) -> PathBuf {
    root.join("layers")
}

impl Pip<'_> {
    fn pip(&self, guest: &GuestPython) -> Result<Command> {
        let mut c = Command::new(tools::which(&self.python)?);
        c.args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar=off"])
            .args(["--python-version", &guest.version, "--implementation", "cp", "--only-binary=:all:"])
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .env_remove("PIP_REQUIRE_VIRTUALENV")
            .env_remove("PYTHONPATH");
        for p in guest.platforms() {
            c.args(["--platform", &p]);
        }
        Ok(c)
    }

    /// Runs pip, turning its refusals into errors that name the package and the guest.
    fn run(&self, c: &mut Command, step: &str, guest: &GuestPython) -> Result<()> {
        let start = fs::metadata(self.log).map(|m| m.len()).unwrap_or(0);
        let r = tools::run_logged(c, step, self.log);
        let Err(e) = r else { return Ok(()) };
        let text = fs::read(self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default()).into_owned();
        if text.contains("No module named pip") {
            return Err(ImageError::MissingTool { tool: format!("{} -m pip", self.python), package: "python3-pip".into() });
        }
        Err(classify(&text, self.image, guest).unwrap_or(e))
    }

    /// The exact set (`name==version`, sorted) that `specs` + `requirements` add to an image
    /// whose distributions are `guest.installed`, beside the pins `also` (another layer's).
    pub fn resolve(&self, guest: &GuestPython, specs: &[String], requirements: Option<&Path>,
                   also: &[String], extra_constraints: &[String]) -> Result<Vec<String>> {
        let (key, constraints) = resolution_key(guest, specs, requirements, also, extra_constraints)?;
        let dir = layers_dir(self.root).join("resolve");
        let cached = dir.join(format!("{key}.json"));
        if !self.force {
            if let Some(pins) = cached_pins(&cached) {
                return Ok(pins);
            }
        }
        cache::mkdirs(&dir)?;
        let scratch = dir.join(format!(".tmp-{key}-{}", std::process::id()));
        cache::mkdirs(&scratch)?;
        let result = (|| {
            let cons = scratch.join("constraints.txt");
            fs::write(&cons, constraints.join("\n") + "\n").map_err(ImageError::io("writing constraints"))?;
            let report = scratch.join("report.json");
            let mut c = self.pip(guest)?;
            c.args(["--dry-run", "--report"]).arg(&report)
                .arg("--target").arg(scratch.join("target"))
                .arg("-c").arg(&cons);
            if let Some(p) = requirements {
                c.arg("-r").arg(p);
            }
            c.args(specs);
            let what = specs.join(" ");
            let what = match requirements {
                Some(p) => format!("{what} -r {}", p.display()).trim().to_string(),
                None => what,
            };
            self.progress.step(&format!("resolve {what} for {}", guest.describe()), || {
                self.run(&mut c, "resolving packages (pip --dry-run)", guest)
            })?;
            let bytes = fs::read(&report).map_err(ImageError::io("reading pip's report"))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
                path: report.clone(),
                detail: format!("pip's report is not JSON: {e}"),
            })?;
            let skip: BTreeSet<String> = guest.installed.keys().cloned()
                .chain(also.iter().filter_map(|p| p.split_once("==")).map(|(n, _)| normalize(n)))
                .collect();
            let mut pins: Vec<String> = v["install"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| {
                    let name = i["metadata"]["name"].as_str()?;
                    let version = i["metadata"]["version"].as_str()?;
                    (!skip.contains(&normalize(name))).then(|| format!("{}=={version}", normalize(name)))
                })
                .collect();
            pins.sort();
            Ok(pins)
        })();
        let _ = cache::remove_tree(&scratch);
        let pins = result?;
        let tmp = dir.join(format!(".tmp-{key}-{}.json", std::process::id()));
        fs::write(&tmp, serde_json::to_vec(&pins).expect("serializes")).map_err(ImageError::io("caching a resolution"))?;
        fs::rename(&tmp, &cached).map_err(ImageError::io("caching a resolution"))?;
        Ok(pins)
    }

    /// The cached layer holding exactly `pins` for `guest` (installed now if missing):
    /// its record and the tree to stack (paths relative to the guest's root).
    pub fn layer(&self, guest: &GuestPython, kind: &str, pins: &[String]) -> Result<(LayerRecord, PathBuf)> {
        let mut h = Sha256::new();
        h.update(format!("supermachine-pip-layer={LAYER_BUILDER_VERSION}\npython={}\n", guest.version));
        h.update(format!("platforms={}\nsite={}\nshebang={}\n", guest.platforms().join(","), guest.site, guest.path));
        h.update(format!("pins={}\n", pins.join(",")));
        let key = short_hex(&h.finalize());
        let record = LayerRecord { kind: kind.into(), key: key.clone(), pins: pins.to_vec() };
        let parent = layers_dir(self.root).join("pip");
        let final_ = parent.join(&key);
        let tree = final_.join("tree");
        if tree.is_dir() {
            cache::touch_used(&final_);
            return Ok((record, tree));
        }
        let _lock = cache::Lock::acquire(self.root, &format!("layer-{key}"), self.progress)?;
        if tree.is_dir() {
            return Ok((record, tree));
        }
        cache::mkdirs(&parent)?;
        cache::remove_stale(&parent, &format!(".tmp-{key}-"));
        let tmp = parent.join(format!(".tmp-{key}-{}", std::process::id()));
        cache::mkdirs(&tmp)?;
        let r = self.progress.step(&format!("pip install {kind} layer ({} packages) for {}", pins.len(), guest.describe()), || {
            self.install(guest, pins, &tmp)
        });
        if let Err(e) = r {
            let _ = cache::remove_tree(&tmp);
            return Err(e);
        }
        fs::write(tmp.join("layer.json"), serde_json::to_vec_pretty(&record).expect("serializes"))
            .map_err(ImageError::io("writing layer.json"))?;
        cache::publish(&tmp, &final_)?;
        cache::touch_used(&final_);
        Ok((record, tree))
    }

    fn install(&self, guest: &GuestPython, pins: &[String], dir: &Path) -> Result<()> {
        let site = dir.join("site");
        if !pins.is_empty() {
            let mut c = self.pip(guest)?;
            c.args(["--no-deps", "--no-compile", "--no-warn-conflicts", "--no-warn-script-location", "--quiet"])
                .arg("--target").arg(&site)
                .args(pins);
            self.run(&mut c, "pip install", guest)?;
        }
        cache::mkdirs(&site)?;
        let tree = dir.join("tree");
        // Console scripts go to /usr/local/bin with the guest interpreter in the shebang;
        // front-end assets (share/jupyter) are of no use in the guest.
        rootfs::place_scripts(&site.join("bin"), &tree.join("usr/local/bin"), &guest.path)?;
        let _ = fs::remove_dir_all(site.join("share"));
        let dest = tree.join(&guest.site);
        cache::mkdirs(dest.parent().expect("site has a parent"))?;
        fs::rename(&site, &dest).map_err(ImageError::io("placing the layer's packages"))?;
        self.compile(guest, &tree, &dest);
        Ok(())
    }

    /// Bytecode for a read-only root (else the guest compiles into its tmpfs on every cold
    /// start, slowly under TCG), written by the host's interpreter when it is the guest's
    /// version (bytecode depends only on that). Otherwise the guest compiles at import.
    fn compile(&self, guest: &GuestPython, tree: &Path, site: &Path) {
        let Ok(path) = tools::which(&self.python) else { return };
        let same = Command::new(&path)
            .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == guest.version)
            .unwrap_or(false);
        if !same {
            self.progress.note(&format!("no bytecode: the host's Python is not {}", guest.version));
            return;
        }
        let mut c = Command::new(path);
        c.args(["-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash", "-s"])
            .arg(tree)
            .args(["-p", "/"])
            .arg(site)
            .env_remove("PYTHONPATH");
        // Exit 1 = some file did not compile (e.g. newer syntax in a template): it compiles at import.
        let _ = tools::run_logged(&mut c, "compileall", self.log);
    }
}

/// A version pip accepts in a `==` constraint (Debian's odd ones are left out).
fn pep440ish(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_digit()) && v.chars().all(|c| c.is_ascii_alphanumeric() || "._+!".contains(c))
}

/// pip's refusals, as errors that say what to do.
fn classify(text: &str, image: &str, guest: &GuestPython) -> Option<ImageError> {
    let network = ["NewConnectionError", "Max retries exceeded", "ProxyError", "SSLError", "Temporary failure"];
    if network.iter().any(|m| text.contains(m)) {
        return None;
    }
    if let Some(l) = text.lines().find(|l| l.contains("No matching distribution found for ")) {
        let package = l.split("No matching distribution found for ").nth(1).unwrap_or("").trim().to_string();
        return Some(ImageError::NoWheel { package, guest: guest.describe(), image: image.into() });
    }
    if text.contains("ResolutionImpossible") || text.contains("conflicting dependencies") {
        let detail: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("The conflict is caused by"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        let detail = if detail.is_empty() {
            text.lines().find(|l| l.contains("Cannot install")).unwrap_or("").trim().to_string()
        } else {
            detail.join("; ")
        };
        let detail = detail.trim_end_matches('.').to_string();
        return Some(ImageError::PackageConflict { image: image.into(), detail });
    }
    None
}

/// Hard-links (or copies) every file of `layer` into the unpacked image `root`. Directories
/// that are symlinks in the image are followed inside the root, never out of it.
pub fn stack(layer: &Path, root: &Path) -> Result<()> {
    fn walk(src: &Path, root: &Path, guest: &Path) -> Result<()> {
        let resolved = resolve_in_root(root, &guest.to_string_lossy());
        let dest = match resolved {
            Some(r) => root.join(r.strip_prefix("/").unwrap_or(&r)),
            None => {
                // Missing: create it inside its (resolved) parent.
                let parent = guest.parent().unwrap_or(Path::new("/"));
                let p = resolve_in_root(root, &parent.to_string_lossy()).ok_or_else(|| ImageError::BadRootDir {
                    path: guest.to_path_buf(),
                    detail: "a directory on the way is a dangling symlink in the image".into(),
                })?;
                let d = root.join(p.strip_prefix("/").unwrap_or(&p)).join(guest.file_name().unwrap_or_default());
                fs::create_dir(&d).map_err(ImageError::io(format!("creating {}", guest.display())))?;
                d
            }
        };
        if !dest.is_dir() {
            return Err(ImageError::BadRootDir {
                path: guest.to_path_buf(),
                detail: "the image has a file where the package layer needs a directory".into(),
            });
        }
        for e in fs::read_dir(src).map_err(ImageError::io(format!("reading {}", src.display())))?.flatten() {
            let ft = e.file_type().map_err(ImageError::io("reading a layer entry"))?;
            let name = e.file_name();
            if ft.is_dir() {
                walk(&e.path(), root, &guest.join(&name))?;
                continue;
            }
            let to = dest.join(&name);
            if let Ok(md) = fs::symlink_metadata(&to) {
                if md.is_dir() {
                    cache::remove_tree(&to)?;
                } else {
                    fs::remove_file(&to).map_err(ImageError::io(format!("replacing {}", to.display())))?;
                }
            }
            if ft.is_symlink() {
                let t = fs::read_link(e.path()).map_err(ImageError::io("reading a layer link"))?;
                std::os::unix::fs::symlink(t, &to).map_err(ImageError::io("linking"))?;
            } else if fs::hard_link(e.path(), &to).is_err() {
                fs::copy(e.path(), &to).map_err(ImageError::io(format!("copying into {}", to.display())))?;
            }
        }
        Ok(())
    }
    walk(layer, root, Path::new("/"))
}

/// The pins of the built-in image's stack, offered to the kernel layer's resolve as
/// constraints (the versions the guest REPL is tested with).
pub fn tested_pins() -> Vec<String> {
    recipe::builtin().into_iter().next().map(|r| r.pip).unwrap_or_default()
}

/// The layer key part of an image hash.
pub fn keys(layers: &[LayerRecord]) -> String {
    layers.iter().map(|l| format!("{}={}", l.kind, l.key)).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::guest::Libc;
    use std::collections::BTreeMap;

    fn guest() -> GuestPython {
        GuestPython {
            path: "/usr/bin/python3".into(),
            version: "3.11".into(),
            full_version: None,
            libc: Libc::Glibc { major: 2, minor: 36 },
            site: "usr/local/lib/python3.11/dist-packages".into(),
            installed: BTreeMap::new(),
        }
    }

    #[test]
    fn pip_refusals_name_the_package_and_the_guest() {
        let g = guest();
        let e = classify("ERROR: Could not find a version that satisfies the requirement docopt (from versions: none)\n\
                          ERROR: No matching distribution found for docopt\n", "img", &g).unwrap();
        let msg = e.to_string();
        assert!(msg.contains("docopt") && msg.contains("Python 3.11") && msg.contains("manylinux_2_36_x86_64") && msg.contains("img"), "{msg}");
        let e = classify("ERROR: Cannot install six==1.17.0 because these package versions have conflicting dependencies.\n\n\
                          The conflict is caused by:\n    The user requested six==1.17.0\n    The user requested (constraint) six==1.16.0\n\n\
                          ERROR: ResolutionImpossible: for help visit", "img", &g).unwrap();
        let msg = e.to_string();
        assert!(matches!(e, ImageError::PackageConflict { .. }));
        assert!(msg.contains("six==1.16.0") && msg.contains("img"), "{msg}");
        assert!(classify("WARNING: Retrying ... NewConnectionError\nNo matching distribution found for x", "i", &g).is_none());
    }

    #[test]
    fn stack_links_files_and_stays_in_the_root() {
        let d = std::env::temp_dir().join(format!("smk-stack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let (layer, root) = (d.join("layer"), d.join("root"));
        fs::create_dir_all(layer.join("usr/local/lib/py/pkg")).unwrap();
        fs::write(layer.join("usr/local/lib/py/pkg/__init__.py"), b"x = 1\n").unwrap();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        // The image's /usr/local is an absolute link: it means the image's /usr/lib.
        std::os::unix::fs::symlink("/usr/lib", root.join("usr/local")).unwrap();
        stack(&layer, &root).unwrap();
        assert_eq!(fs::read(root.join("usr/lib/lib/py/pkg/__init__.py")).unwrap(), b"x = 1\n");
        // A link to a host directory is resolved inside the root: nothing lands on the host.
        let outside = d.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::remove_file(root.join("usr/local")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("usr/local")).unwrap();
        assert!(stack(&layer, &root).is_err());
        assert!(fs::read_dir(&outside).unwrap().next().is_none());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pep440_filter() {
        assert!(pep440ish("1.16.0") && pep440ish("2.0.post1") && pep440ish("1!2.0"));
        assert!(!pep440ish("0.0.0-debian") && !pep440ish("unknown"));
    }
}
