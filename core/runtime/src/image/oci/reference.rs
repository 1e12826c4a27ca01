//! Image sources: what a user may write as `Image.build(ref=...)` and where it leads.
//!
//! ```text
//! python:3.12-slim                     registry (Docker Hub: docker.io/library/python)
//! ghcr.io/owner/img:tag                registry
//! registry:5000/x@sha256:<64 hex>      registry, pinned by manifest digest
//! oci:DIR[:TAG]                        OCI image layout directory (air-gapped hosts)
//! oci-archive:FILE[:TAG]               OCI layout packed in a tar file
//! docker-archive:FILE[:NAME:TAG]       `docker save` tarball
//! ```
//! An existing directory holding `oci-layout` or an existing `*.tar` file is taken as a local
//! source too, without a prefix. Registry references are parsed (and normalised) by
//! `oci-client`.
use std::fmt;
use std::path::{Path, PathBuf};

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Registry(oci_client::Reference),
    /// An OCI image layout directory; `tag` selects an `org.opencontainers.image.ref.name`.
    Layout { dir: PathBuf, tag: Option<String> },
    /// A tarball: an OCI layout packed with tar, or `docker save` output.
    Archive { path: PathBuf, tag: Option<String> },
}

#[derive(Debug)]
pub enum ReferenceError {
    /// The reference is empty.
    Empty,
    /// The reference is not a valid image reference.
    Invalid { reference: String, detail: String },
    /// A local source path does not exist.
    NoSuchPath { path: PathBuf },
}

impl fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReferenceError::Empty => write!(
                f,
                "empty image reference: give one like `python:3.12-slim`, \
                 `ghcr.io/owner/img:tag` or `oci:/path/to/layout`"
            ),
            ReferenceError::Invalid { reference, detail } => write!(
                f,
                "{reference:?} is not an image reference ({detail}); write it as \
                 [registry[:port]/]repository[:tag][@sha256:digest], e.g. `python:3.12-slim`"
            ),
            ReferenceError::NoSuchPath { path } => write!(
                f,
                "{} does not exist: a local image source is an OCI layout directory or a \
                 `docker save` / OCI archive tarball",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ReferenceError {}

impl Source {
    /// A short text for logs and manifests (`docker.io/library/python:3.12-slim`, `oci:/x:tag`).
    pub fn display(&self) -> String {
        match self {
            Source::Registry(r) => r.whole(),
            Source::Layout { dir, tag } => with_tag(&format!("oci:{}", dir.display()), tag),
            Source::Archive { path, tag } => with_tag(&format!("archive:{}", path.display()), tag),
        }
    }

    /// A default image name: the repository's last component and the tag (`python-3.12-slim`).
    pub fn default_name(&self) -> String {
        let (base, tag) = match self {
            Source::Registry(r) => (
                r.repository().rsplit('/').next().unwrap_or("image").to_string(),
                r.tag().map(str::to_string),
            ),
            Source::Layout { dir: p, tag } | Source::Archive { path: p, tag } => (
                p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                tag.clone(),
            ),
        };
        let raw = match tag {
            Some(t) if t != "latest" => format!("{base}-{t}"),
            _ => base,
        };
        let clean: String = raw
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' })
            .collect();
        let clean = clean.trim_start_matches('.').chars().take(64).collect::<String>();
        if clean.is_empty() { "image".into() } else { clean }
    }
}

fn with_tag(s: &str, tag: &Option<String>) -> String {
    match tag {
        Some(t) => format!("{s}:{t}"),
        None => s.to_string(),
    }
}

/// Splits `PATH[:TAG]`: the path is the shortest prefix before a ':' that exists (a tag may
/// hold ':' itself, as in `docker-archive:FILE:name:tag`).
fn split_tag(s: &str) -> (PathBuf, Option<String>) {
    if Path::new(s).exists() {
        return (PathBuf::from(s), None);
    }
    for (i, _) in s.match_indices(':') {
        if Path::new(&s[..i]).exists() && i + 1 < s.len() {
            return (PathBuf::from(&s[..i]), Some(s[i + 1..].to_string()));
        }
    }
    (PathBuf::from(s), None)
}

/// Whether `reference` names an OCI image (and not a root filesystem directory or an image
/// name): a local-source prefix, a directory holding `oci-layout`, an existing file, or a
/// registry reference with a tag, a digest or a registry host (`ghcr.io/x`, `localhost:5000/x`).
pub fn looks_like_oci(reference: &str) -> bool {
    let r = reference.trim();
    if ["oci:", "oci-archive:", "docker-archive:"].iter().any(|p| r.starts_with(p)) {
        return true;
    }
    let p = Path::new(r);
    if p.is_dir() {
        return p.join("oci-layout").is_file();
    }
    if p.is_file() {
        return true;
    }
    if r.starts_with(['.', '/', '~']) {
        return false;
    }
    let first = r.split('/').next().unwrap_or("");
    let registry_host = r.contains('/') && (first.contains(['.', ':']) || first == "localhost");
    (r.contains([':', '@']) || registry_host) && r.parse::<oci_client::Reference>().is_ok()
}

/// Parses a user's image reference.
pub fn parse(reference: &str) -> Result<Source, ReferenceError> {
    let r = reference.trim();
    if r.is_empty() {
        return Err(ReferenceError::Empty);
    }
    let local = |path: PathBuf, tag, dir: bool| {
        if !path.exists() {
            return Err(ReferenceError::NoSuchPath { path });
        }
        Ok(if dir { Source::Layout { dir: path, tag } } else { Source::Archive { path, tag } })
    };
    if let Some(rest) = r.strip_prefix("oci:") {
        let (p, t) = split_tag(rest);
        return local(p, t, true);
    }
    for prefix in ["oci-archive:", "docker-archive:"] {
        if let Some(rest) = r.strip_prefix(prefix) {
            let (p, t) = split_tag(rest);
            return local(p, t, false);
        }
    }
    let p = Path::new(r);
    if p.is_dir() && p.join("oci-layout").is_file() {
        return Ok(Source::Layout { dir: p.to_path_buf(), tag: None });
    }
    if p.is_file() {
        return Ok(Source::Archive { path: p.to_path_buf(), tag: None });
    }
    r.parse::<oci_client::Reference>()
        .map(Source::Registry)
        .map_err(|e| ReferenceError::Invalid { reference: r.to_string(), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_references_are_normalised() {
        let Source::Registry(r) = parse("python:3.12-slim").unwrap() else { panic!() };
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/python");
        assert_eq!(r.tag(), Some("3.12-slim"));
        let d = format!("sha256:{}", "a".repeat(64));
        let Source::Registry(r) = parse(&format!("registry:5000/x@{d}")).unwrap() else { panic!() };
        assert_eq!(r.registry(), "registry:5000");
        assert_eq!(r.digest(), Some(d.as_str()));
        let Source::Registry(r) = parse("ghcr.io/owner/img:tag").unwrap() else { panic!() };
        assert_eq!((r.registry(), r.repository()), ("ghcr.io", "owner/img"));
        assert_eq!(Source::Registry(r).default_name(), "img-tag");
    }

    #[test]
    fn bad_references_say_how_to_write_one() {
        assert!(matches!(parse("  "), Err(ReferenceError::Empty)));
        let e = parse("UPPER/Case:tag").unwrap_err();
        assert!(e.to_string().contains("python:3.12-slim"), "{e}");
        assert!(matches!(parse("oci:/no/such/dir:v1"), Err(ReferenceError::NoSuchPath { .. })));
    }

    #[test]
    fn oci_references_are_told_from_names_and_paths() {
        for r in ["python:3.12-slim", "ghcr.io/owner/img", "localhost:5000/x", "docker-archive:/x"] {
            assert!(looks_like_oci(r), "{r}");
        }
        let digest = format!("repo@sha256:{}", "a".repeat(64));
        assert!(looks_like_oci(&digest));
        for r in ["default", "minimal", "some/dir", "./rootfs", "/no/such/dir", "~/root"] {
            assert!(!looks_like_oci(r), "{r}");
        }
    }

    #[test]
    fn local_sources() {
        let d = std::env::temp_dir().join(format!("smk-ref-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("oci-layout"), "{}").unwrap();
        let s = parse(&format!("oci:{}:v1", d.display())).unwrap();
        assert_eq!(s, Source::Layout { dir: d.clone(), tag: Some("v1".into()) });
        assert_eq!(parse(d.to_str().unwrap()).unwrap(), Source::Layout { dir: d.clone(), tag: None });
        let f = d.join("img.tar");
        std::fs::write(&f, "").unwrap();
        assert_eq!(parse(f.to_str().unwrap()).unwrap(), Source::Archive { path: f.clone(), tag: None });
        let s = parse(&format!("docker-archive:{}:name:tag", f.display())).unwrap();
        assert!(matches!(s, Source::Archive { .. }));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
