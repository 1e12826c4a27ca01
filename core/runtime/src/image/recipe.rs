//! Recipes: what goes into a guest root filesystem, and the hash that keys its cache entry.
//!
//! A recipe is data only (Debian suite, Debian packages, pinned pip packages); `rootfs.rs` turns
//! it into a tree. The pip list is the *complete* pinned closure, installed with `--no-deps`, so
//! a build is reproducible and does not run pip's resolver. Changing anything here — or
//! [`ROOTFS_BUILDER_VERSION`] when the build steps change — changes the hash and so rebuilds.
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::{ImageError, Result};

/// Bump when `rootfs.rs` changes what it produces from the same recipe.
pub const ROOTFS_BUILDER_VERSION: u32 = 2;

/// The recipe used when no reference is given.
pub const DEFAULT_RECIPE: &str = "default";

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    /// Debian suite for mmdebstrap.
    pub suite: String,
    /// Debian packages (`mmdebstrap --include`), on top of `--variant=apt`.
    pub debs: Vec<String>,
    /// Guest Python `major.minor`; pip downloads wheels for it.
    pub python: String,
    /// `name==version` lines, the full dependency closure.
    pub pip: Vec<String>,
    /// Packages whose `tests` directories are dropped to save space.
    pub strip_tests: Vec<String>,
    /// Python snippets run in the finished tree (`chroot`, HOME=/root) to pre-build caches the
    /// guest would otherwise build on every cold start (e.g. matplotlib's font list).
    pub warm: Vec<String>,
}

/// The pinned scientific stack of the default image (manylinux wheels for CPython 3.11), and
/// pip, which `%pip install` runs when the kernel's policy opens the network.
const DEFAULT_PIP: &[&str] = &[
    "asttokens==3.0.2",
    "comm==0.2.3",
    "contourpy==1.3.3",
    "cycler==0.12.1",
    "executing==2.3.0",
    "fonttools==4.68.0",
    "ipython==9.18.1",
    "ipython-pygments-lexers==1.1.1",
    "ipywidgets==8.1.9",
    "jedi==0.20.1",
    "jupyterlab-widgets==3.0.17",
    "kiwisolver==1.5.1",
    "matplotlib==3.11.2",
    "matplotlib-inline==0.2.2",
    "numpy==2.4.6",
    "packaging==26.3",
    "pandas==3.1.1",
    "parso==0.8.7",
    "pexpect==4.9.0",
    "pillow==13.0.0",
    "pip==26.3",
    "prompt-toolkit==3.0.53",
    "psutil==7.2.2",
    "ptyprocess==0.7.0",
    "pure-eval==0.2.4",
    "pygments==2.21.0",
    "pyparsing==3.3.3",
    "python-dateutil==4.0.0",
    "stack-data==0.6.3",
    "tqdm==4.70.1",
    "traitlets==5.16.1",
    "typing-extensions==4.16.0",
    "tzdata==2026.6",
    "wcwidth==0.9.4",
    "widgetsnbextension==4.0.16",
];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The built-in recipes, default first.
pub fn builtin() -> Vec<Recipe> {
    vec![
        Recipe {
            name: DEFAULT_RECIPE.into(),
            description: "Debian bookworm, python3, IPython, numpy, pandas, matplotlib, \
                          ipywidgets 8, tqdm, pip"
                .into(),
            suite: "bookworm".into(),
            debs: strings(&["python3", "procps"]),
            python: "3.11".into(),
            pip: strings(DEFAULT_PIP),
            strip_tests: strings(&["numpy", "pandas", "matplotlib"]),
            warm: strings(&[
                "import matplotlib.font_manager",
                "from IPython.core.profiledir import ProfileDir; from IPython.paths import \
                 get_ipython_dir; ProfileDir.create_profile_dir_by_name(get_ipython_dir())",
            ]),
        },
        Recipe {
            name: "minimal".into(),
            description: "Debian bookworm and python3 only (quick tests)".into(),
            suite: "bookworm".into(),
            debs: strings(&["python3"]),
            python: "3.11".into(),
            pip: vec![],
            strip_tests: vec![],
            warm: vec![],
        },
    ]
}

pub fn builtin_names() -> Vec<String> {
    builtin().into_iter().map(|r| r.name).collect()
}

impl Recipe {
    /// 16 hex digits of SHA-256 over everything that shapes the root filesystem (not the name:
    /// two names for the same recipe share content, not cache entries).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("supermachine-rootfs-builder={ROOTFS_BUILDER_VERSION}\n"));
        h.update(format!("suite={}\n", self.suite));
        h.update(format!("debs={}\n", self.debs.join(",")));
        h.update(format!("python={}\n", self.python));
        h.update(format!("pip={}\n", self.pip.join(",")));
        h.update(format!("strip_tests={}\n", self.strip_tests.join(",")));
        for w in &self.warm {
            h.update(format!("warm={w}\n"));
        }
        short_hex(&h.finalize())
    }
}

pub fn short_hex(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What an image reference resolved to.
#[derive(Debug)]
pub enum Source {
    Recipe(Recipe),
    /// An existing root filesystem tree, packed as it is.
    Dir(PathBuf),
    /// A name found only in the cache (built earlier from a directory or a renamed recipe).
    Cached(String),
}

/// True when `reference` is meant as a filesystem path rather than a name.
pub fn looks_like_path(reference: &str) -> bool {
    reference.contains('/') || reference.starts_with('.') || reference.starts_with('~')
}

/// Resolves `reference` (None = the default recipe): a built-in recipe name, a directory path,
/// or the name of an image already in the cache (`cached` lists those names).
pub fn resolve(reference: Option<&str>, cached: &[String]) -> Result<Source> {
    let reference = reference.unwrap_or(DEFAULT_RECIPE);
    if let Some(r) = builtin().into_iter().find(|r| r.name == reference) {
        return Ok(Source::Recipe(r));
    }
    if looks_like_path(reference) || Path::new(reference).is_dir() {
        let path = expand_home(reference);
        if !path.is_dir() {
            return Err(ImageError::BadRootDir {
                path,
                detail: "no such directory".into(),
            });
        }
        let path = path.canonicalize().map_err(ImageError::io(format!("resolving {reference}")))?;
        if !path.join("bin").exists() && !path.join("usr").is_dir() {
            return Err(ImageError::BadRootDir {
                path,
                detail: "it has neither /usr nor /bin".into(),
            });
        }
        return Ok(Source::Dir(path));
    }
    if cached.iter().any(|c| c == reference) {
        return Ok(Source::Cached(reference.to_string()));
    }
    let mut known = builtin_names();
    for c in cached {
        if !known.contains(c) {
            known.push(c.clone());
        }
    }
    Err(ImageError::UnknownImage { name: reference.to_string(), known })
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// A name for an image built from a directory: the directory's own name.
pub fn dir_image_name(path: &Path) -> String {
    let base = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let clean: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' })
        .collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() { "rootfs".into() } else { clean }
}

/// Image names become directory names: keep them to a safe alphabet.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadRootDir {
            path: PathBuf::from(name),
            detail: "image names use letters, digits, '-', '_' and '.', up to 64 characters, \
                     not starting with '.'"
                .into(),
        })
    }
}

/// A fingerprint of a directory tree's metadata (paths, types, modes, owners, sizes, mtimes,
/// link targets): cheap, and it changes whenever a file is edited, added or removed.
pub fn dir_fingerprint(root: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    h.update(format!("supermachine-dir-image={ROOTFS_BUILDER_VERSION}\n"));
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(ImageError::io(format!("reading {}", dir.display())))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel_child = rel.join(e.file_name());
            let md = match e.path().symlink_metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            h.update(rel_child.as_os_str().as_encoded_bytes());
            h.update(format!(
                "\0{:o} {} {} {} {}.{}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.size(),
                md.mtime(),
                md.mtime_nsec()
            ));
            if md.file_type().is_symlink() {
                if let Ok(t) = std::fs::read_link(e.path()) {
                    h.update(t.as_os_str().as_encoded_bytes());
                }
            }
            h.update(b"\n");
            if md.is_dir() {
                stack.push(rel_child);
            }
        }
    }
    Ok(short_hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_first_and_names_are_unique() {
        let names = builtin_names();
        assert_eq!(names[0], DEFAULT_RECIPE);
        let mut dedup = names.clone();
        dedup.dedup();
        assert_eq!(names, dedup);
    }

    #[test]
    fn hash_changes_when_the_recipe_changes() {
        let r = builtin().remove(0);
        let h = r.hash();
        assert_eq!(h.len(), 16);
        assert_eq!(h, r.clone().hash(), "hash is deterministic");
        let mut renamed = r.clone();
        renamed.name = "other".into();
        assert_eq!(h, renamed.hash(), "the name is not content");
        let mut bumped = r.clone();
        bumped.pip[0] = "asttokens==3.0.3".into();
        assert_ne!(h, bumped.hash());
        let mut more = r.clone();
        more.debs.push("less".into());
        assert_ne!(h, more.hash());
        let mut suite = r;
        suite.suite = "trixie".into();
        assert_ne!(h, suite.hash());
    }

    #[test]
    fn pip_pins_are_exact() {
        for r in builtin() {
            for p in &r.pip {
                assert!(p.contains("=="), "{p} must be pinned");
            }
        }
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let e = resolve(Some("no-such-image"), &["mine".to_string()]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ImageError::UnknownImage { .. }));
        assert!(msg.contains("default") && msg.contains("minimal") && msg.contains("mine"), "{msg}");
    }

    #[test]
    fn resolve_kinds() {
        assert!(matches!(resolve(None, &[]).unwrap(), Source::Recipe(r) if r.name == "default"));
        assert!(matches!(resolve(Some("minimal"), &[]).unwrap(), Source::Recipe(_)));
        assert!(matches!(resolve(Some("mine"), &["mine".into()]).unwrap(), Source::Cached(_)));
        assert!(matches!(
            resolve(Some("/no/such/dir"), &[]).unwrap_err(),
            ImageError::BadRootDir { .. }
        ));
    }

    #[test]
    fn fingerprint_tracks_changes() {
        let d = std::env::temp_dir().join(format!("smk-fp-{}", std::process::id()));
        std::fs::create_dir_all(d.join("usr/bin")).unwrap();
        std::fs::write(d.join("usr/bin/a"), b"1").unwrap();
        let a = dir_fingerprint(&d).unwrap();
        assert_eq!(a, dir_fingerprint(&d).unwrap());
        std::fs::write(d.join("usr/bin/b"), b"2").unwrap();
        assert_ne!(a, dir_fingerprint(&d).unwrap());
        assert!(matches!(resolve(Some(d.to_str().unwrap()), &[]).unwrap(), Source::Dir(_)));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names() {
        assert!(validate_name("default").is_ok());
        assert!(validate_name("my-img_2.0").is_ok());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("").is_err());
        assert_eq!(dir_image_name(Path::new("/tmp/my root")), "my-root");
    }
}
