//! Local image sources for air-gapped hosts: an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/<hex>`), the same packed in a tar file (OCI archive, and
//! `docker save` since Docker 25), and the older `docker save` format (`manifest.json` with
//! `<id>/layer.tar` files). Every blob is verified against its digest as it is copied into
//! the store, exactly as a registry download is; digests never become paths unchecked.
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::config::{self, MAX_CONFIG_BYTES};
use super::manifest::{Descriptor, MAX_MANIFEST_BYTES};
use super::pull::{verified, Fetch, Pulled, StoredLayer};
use super::store::{digest_of, sha256_hex, Store};
use super::OciError;

/// The annotation that names a tag in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug)]
pub enum LocalError {
    /// The directory is not an OCI image layout.
    NotLayout { path: PathBuf, detail: String },
    /// The tarball is neither an OCI archive nor `docker save` output.
    BadArchive { path: PathBuf, detail: String },
    /// No image in the source has the tag asked for.
    NoSuchTag { path: PathBuf, tag: String, available: Vec<String> },
    /// The source holds several images and no tag says which.
    Ambiguous { path: PathBuf, available: Vec<String> },
    /// A blob the manifest names is missing from the layout.
    MissingBlob { path: PathBuf, digest: String },
    /// Reading the source failed.
    Io { context: String, source: io::Error },
}

impl fmt::Display for LocalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
        match self {
            LocalError::NotLayout { path, detail } => write!(
                f,
                "{} is not an OCI image layout ({detail}); write one with `skopeo copy \
                 docker://IMAGE oci:DIR:TAG` or `docker save`",
                path.display()
            ),
            LocalError::BadArchive { path, detail } => write!(
                f,
                "{} is neither an OCI archive nor `docker save` output ({detail})",
                path.display()
            ),
            LocalError::NoSuchTag { path, tag, available } => write!(
                f,
                "{} has no image tagged {tag:?}; its tags: {}",
                path.display(),
                list(available)
            ),
            LocalError::Ambiguous { path, available } => write!(
                f,
                "{} holds several images; say which with a tag (`oci:{}:TAG`); its tags: {}",
                path.display(),
                path.display(),
                list(available)
            ),
            LocalError::MissingBlob { path, digest } => write!(
                f,
                "{} lacks blob {digest} that its manifest names; the layout is incomplete: \
                 export it again",
                path.display()
            ),
            LocalError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for LocalError {}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LocalError {
    let context = context.into();
    move |source| LocalError::Io { context, source }
}

/// An OCI image layout directory.
pub struct Layout {
    dir: PathBuf,
    tag: Option<String>,
    /// How the source is named in messages.
    shown: String,
}

impl Layout {
    pub fn open(dir: &Path, tag: Option<&str>, shown: &str) -> Result<Layout, LocalError> {
        let marker = dir.join("oci-layout");
        let text = fs::read_to_string(&marker).map_err(|e| LocalError::NotLayout {
            path: dir.into(),
            detail: format!("no readable oci-layout file: {e}"),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LocalError::NotLayout { path: dir.into(), detail: format!("oci-layout: {e}") })?;
        if v.get("imageLayoutVersion").and_then(|x| x.as_str()).is_none() {
            return Err(LocalError::NotLayout { path: dir.into(), detail: "oci-layout has no imageLayoutVersion".into() });
        }
        Ok(Layout { dir: dir.into(), tag: tag.map(String::from), shown: shown.into() })
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        let p = self.dir.join("blobs/sha256").join(sha256_hex(digest)?);
        if !p.is_file() {
            return Err(LocalError::MissingBlob { path: self.dir.clone(), digest: digest.into() }.into());
        }
        Ok(p)
    }

    fn read_capped(&self, p: &Path, max: usize) -> Result<Vec<u8>, OciError> {
        let mut v = Vec::new();
        File::open(p)
            .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut v))
            .map_err(io_err(format!("reading {}", p.display())))?;
        Ok(v)
    }
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

impl Fetch for Layout {
    fn name(&self) -> String {
        self.shown.clone()
    }

    fn root_manifest(&self) -> Result<(Vec<u8>, String), OciError> {
        let bytes = self.read_capped(&self.dir.join("index.json"), MAX_MANIFEST_BYTES)?;
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| LocalError::NotLayout { path: self.dir.clone(), detail: format!("index.json: {e}") })?;
        let tags: Vec<String> = index.manifests.iter().filter_map(|d| d.annotations.get(REF_NAME).cloned()).collect();
        let chosen = match &self.tag {
            Some(t) => index.manifests.iter().find(|d| d.annotations.get(REF_NAME) == Some(t)).ok_or_else(|| {
                LocalError::NoSuchTag { path: self.dir.clone(), tag: t.clone(), available: tags.clone() }
            })?,
            None if index.manifests.len() == 1 => &index.manifests[0],
            None => return Err(LocalError::Ambiguous { path: self.dir.clone(), available: tags }.into()),
        };
        let bytes = self.manifest(chosen)?;
        Ok((bytes, chosen.digest.clone()))
    }

    fn manifest(&self, d: &Descriptor) -> Result<Vec<u8>, OciError> {
        let bytes = self.read_capped(&self.blob_path(&d.digest)?, MAX_MANIFEST_BYTES)?;
        Ok(verified(bytes, &d.digest, &format!("manifest {} in {}", d.digest, self.shown))?)
    }

    fn blob(&self, d: &Descriptor, store: &Store, what: &str) -> Result<PathBuf, OciError> {
        if let Some(p) = store.get(&d.digest)? {
            return Ok(p);
        }
        let src = self.blob_path(&d.digest)?;
        let f = File::open(&src).map_err(io_err(format!("reading {}", src.display())))?;
        let _lock = store.lock(&d.digest)?;
        Ok(store.import(f, &d.digest, d.size, what)?)
    }
}

/// Unpacks the regular files and directories of the tarball `path` into `dest` (nothing else
/// is needed from an image archive; a path with `..` or an absolute one is refused).
pub fn extract_archive(path: &Path, dest: &Path) -> Result<(), LocalError> {
    let bad = |detail: String| LocalError::BadArchive { path: path.into(), detail };
    let f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut ar = tar::Archive::new(io::BufReader::new(f));
    for entry in ar.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let p = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let mut rel = PathBuf::new();
        for c in p.components() {
            match c {
                Component::Normal(n) => rel.push(n),
                Component::CurDir => {}
                _ => return Err(bad(format!("entry {} leaves the archive", p.display()))),
            }
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        let out = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&out).map_err(io_err(format!("creating {}", out.display())))?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = out.parent() {
                    fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
                }
                let _ = fs::remove_file(&out);
                let mut w = File::create(&out).map_err(io_err(format!("creating {}", out.display())))?;
                io::copy(&mut entry, &mut w).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => bad(format!("{} is truncated", rel.display())),
                    _ => LocalError::Io { context: format!("writing {}", out.display()), source: e },
                })?;
            }
            _ => {} // symlinks etc. are not part of either format's blobs
        }
    }
    Ok(())
}

/// One image in a `docker save` manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Stores the image of an unpacked `docker save` tarball (`dir` holds its `manifest.json`).
/// Its identity is the config digest (the image ID); layers are checked against the config's
/// `diff_ids` (the sha256 of each uncompressed `layer.tar`), or against their
/// `blobs/sha256/<hex>` file name.
pub fn pull_docker_save(dir: &Path, tag: Option<&str>, store: &Store, shown: &str) -> Result<Pulled, OciError> {
    let mpath = dir.join("manifest.json");
    let bytes = fs::read(&mpath).map_err(|e| LocalError::BadArchive {
        path: dir.into(),
        detail: format!("no oci-layout and no manifest.json: {e}"),
    })?;
    let entries: Vec<DockerEntry> = serde_json::from_slice(&bytes)
        .map_err(|e| LocalError::BadArchive { path: dir.into(), detail: format!("manifest.json: {e}") })?;
    let tags: Vec<String> = entries.iter().flat_map(|e| e.repo_tags.clone().unwrap_or_default()).collect();
    let entry = match tag {
        Some(t) => entries
            .iter()
            .find(|e| e.repo_tags.iter().flatten().any(|rt| rt == t || rt.rsplit_once(':').is_some_and(|(_, x)| x == t)))
            .ok_or_else(|| LocalError::NoSuchTag { path: dir.into(), tag: t.into(), available: tags.clone() })?,
        None if entries.len() == 1 => &entries[0],
        None => return Err(LocalError::Ambiguous { path: dir.into(), available: tags }.into()),
    };
    let inside = |rel: &str| -> Result<PathBuf, OciError> {
        let p = Path::new(rel);
        if p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(LocalError::BadArchive { path: dir.into(), detail: format!("path {rel:?} leaves the archive") }.into());
        }
        Ok(dir.join(p))
    };
    let named_digest = |rel: &str| rel.strip_prefix("blobs/sha256/").map(|h| format!("sha256:{h}"));
    let cpath = inside(&entry.config)?;
    let cbytes = {
        let mut v = Vec::new();
        File::open(&cpath)
            .and_then(|f| f.take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut v))
            .map_err(io_err(format!("reading {}", cpath.display())))?;
        v
    };
    let config_digest = match named_digest(&entry.config)
        .or_else(|| entry.config.strip_suffix(".json").map(|h| format!("sha256:{h}")))
    {
        Some(d) => {
            sha256_hex(&d)?;
            verified(cbytes.clone(), &d, &format!("the config of {shown}"))?;
            d
        }
        None => digest_of(&cbytes),
    };
    let config = config::parse(&cbytes)?;
    store.import(&cbytes[..], &config_digest, Some(cbytes.len() as u64), "config")?;
    if config.diff_ids.len() != entry.layers.len() {
        return Err(LocalError::BadArchive {
            path: dir.into(),
            detail: format!("{} layers but the config lists {} diff_ids", entry.layers.len(), config.diff_ids.len()),
        }
        .into());
    }
    let mut layers = Vec::new();
    let n = entry.layers.len();
    for (i, (rel, diff_id)) in entry.layers.iter().zip(&config.diff_ids).enumerate() {
        let digest = named_digest(rel).unwrap_or_else(|| diff_id.clone());
        let what = format!("layer {}/{n} of {shown}", i + 1);
        let path = match store.get(&digest)? {
            Some(p) => p,
            None => {
                let src = inside(rel)?;
                let f = File::open(&src).map_err(|_| LocalError::MissingBlob { path: dir.into(), digest: digest.clone() })?;
                let _lock = store.lock(&digest)?;
                store.import(f, &digest, None, &what)?
            }
        };
        layers.push(StoredLayer { digest, media_type: String::new(), size: None, path });
    }
    Ok(Pulled {
        manifest_digest: config_digest.clone(),
        index_digest: None,
        config_digest,
        config,
        layers,
    })
}
