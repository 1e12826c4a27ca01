//! Guest root filesystems from OCI images: `Image.build(ref="python:3.12-slim")`.
//!
//! ```text
//! reference.rs   "python:3.12-slim", "oci:DIR:TAG", "docker-archive:FILE" → Source
//! registry.rs    distribution API via oci-client (TLS; plain HTTP for loopback/insecure)
//! credentials.rs ~/.docker/config.json auths
//! local.rs       OCI layout dir, OCI archive, docker save tarball
//! manifest.rs    manifest / index documents, linux/amd64 choice
//! pull.rs        index → manifest → config + layers, into the store
//! store.rs       <cache>/oci/blobs/sha256/<hex>: verified blobs shared by all images
//! config.rs      Env, WorkingDir, User, Entrypoint/Cmd (recorded, never run on the host)
//! unpack.rs      layers → build directory (whiteouts, links, modes, owners, xattrs), contained
//! ```
//! [`build`] = pull (every blob verified before it enters the store) → apply the layers in a
//! scratch directory → `mkfs.erofs` through the image cache (`images/<name>/<hash>/`, hash of
//! the linux/amd64 manifest digest), so an OCI image is listed, booted and removed like any
//! other image. Its manifest's `source` is `oci:<reference>@<digest>` and its `recipe` field
//! holds `{"oci": {...}}` with the [`ImageConfig`] for the later bake. The guest kernel,
//! initramfs and agent stay ours; the kernel is pinned the first time the image boots.
mod config;
mod credentials;
mod local;
mod manifest;
mod pull;
mod reference;
mod registry;
mod store;
mod unpack;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use config::{ConfigError, ImageConfig};
pub use credentials::CredentialsError;
pub use local::LocalError;
pub use manifest::ManifestError;
pub use pull::{Pulled, StoredLayer};
pub use reference::{looks_like_oci, parse as parse_reference, ReferenceError, Source};
pub use registry::{is_loopback, RegistryError, RegistryOptions};
pub use store::{digest_of, Store, StoreError};
pub use unpack::{LayerStats, Root, UnpackError};

use super::error::ImageError;
use super::tools::Progress;
use super::{cache, recipe, rootfs, BuildOptions};

/// Bump when applying layers changes what the same image produces.
pub const OCI_BUILDER_VERSION: u32 = 1;

/// Every way building an image from an OCI source can fail; each module's error says what to do.
#[derive(Debug)]
pub enum OciError {
    Reference(ReferenceError),
    Credentials(CredentialsError),
    Registry(RegistryError),
    Store(StoreError),
    Manifest(ManifestError),
    Config(ConfigError),
    Local(LocalError),
    Unpack(UnpackError),
    /// Packing or caching the root filesystem failed.
    Image(ImageError),
}

impl fmt::Display for OciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OciError::Reference(e) => e.fmt(f),
            OciError::Credentials(e) => e.fmt(f),
            OciError::Registry(e) => e.fmt(f),
            OciError::Store(e) => e.fmt(f),
            OciError::Manifest(e) => e.fmt(f),
            OciError::Config(e) => e.fmt(f),
            OciError::Local(e) => e.fmt(f),
            OciError::Unpack(e) => e.fmt(f),
            OciError::Image(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for OciError {}

macro_rules! from_errors {
    ($($t:ident => $v:ident),*) => {$(
        impl From<$t> for OciError {
            fn from(e: $t) -> OciError { OciError::$v(e) }
        }
    )*};
}
from_errors!(ReferenceError => Reference, CredentialsError => Credentials, RegistryError => Registry,
    StoreError => Store, ManifestError => Manifest, ConfigError => Config, LocalError => Local,
    UnpackError => Unpack, ImageError => Image);

/// How to build an image from an OCI source.
#[derive(Clone, Debug)]
pub struct OciBuildOptions {
    /// Cache root (default: `cache_root(None)`).
    pub cache_dir: Option<PathBuf>,
    /// The image's name (default: from the reference, e.g. `python-3.12-slim`).
    pub name: Option<String>,
    pub registry: RegistryOptions,
    /// Print progress lines on stderr.
    pub progress: bool,
    /// Rebuild the root filesystem even if it is cached (blobs stay cached).
    pub force: bool,
}

impl Default for OciBuildOptions {
    fn default() -> Self {
        OciBuildOptions {
            cache_dir: None,
            name: None,
            registry: RegistryOptions::from_env(),
            progress: true,
            force: false,
        }
    }
}

/// What the image cache records about an OCI image (`manifest.json`'s `recipe.oci`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OciRecord {
    pub reference: String,
    pub manifest_digest: String,
    pub index_digest: Option<String>,
    pub config_digest: String,
    pub layers: Vec<String>,
    pub config: ImageConfig,
}

/// A built OCI image.
#[derive(Clone, Debug)]
pub struct OciImage {
    pub name: String,
    /// The rootfs cache key.
    pub hash: String,
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    pub python_version: Option<String>,
    pub record: OciRecord,
}

/// Fetches the image `source` into the blob store of cache `root` (nothing is unpacked).
pub fn pull(source: &Source, root: &Path, opts: &RegistryOptions, progress: &dyn Fn(&str)) -> Result<Pulled, OciError> {
    let store = Store::new(root);
    let shown = source.display();
    match source {
        Source::Registry(r) => {
            let reg = registry::Registry::connect(r, opts)?;
            pull::pull(&reg, &store, progress)
        }
        Source::Layout { dir, tag } => pull::pull(&local::Layout::open(dir, tag.as_deref(), &shown)?, &store, progress),
        Source::Archive { path, tag } => {
            let scratch = root.join("tmp").join(format!("oci-archive-{}", std::process::id()));
            let _ = cache::remove_tree(&scratch);
            cache::mkdirs(&scratch)?;
            let r = (|| {
                progress(&format!("unpack archive {}", path.display()));
                local::extract_archive(path, &scratch)?;
                if scratch.join("oci-layout").is_file() {
                    pull::pull(&local::Layout::open(&scratch, tag.as_deref(), &shown)?, &store, progress)
                } else {
                    local::pull_docker_save(&scratch, tag.as_deref(), &store, &shown)
                }
            })();
            let _ = cache::remove_tree(&scratch);
            r
        }
    }
}

/// Applies the pulled layers, bottom first, to the directory `dir`.
pub fn apply(pulled: &Pulled, dir: &Path) -> Result<Vec<LayerStats>, OciError> {
    let mut root = Root::new(dir)?;
    let n = pulled.layers.len();
    let mut stats = Vec::new();
    for (i, l) in pulled.layers.iter().enumerate() {
        let name = format!("{}/{n} ({})", i + 1, pull::short(&l.digest));
        stats.push(root.apply(&l.path, &l.media_type, &name)?);
    }
    Ok(stats)
}

/// The rootfs cache key of an image manifest.
fn rootfs_hash(manifest_digest: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("supermachine-oci-rootfs={OCI_BUILDER_VERSION}\n{manifest_digest}\n"));
    recipe::short_hex(&h.finalize())
}

/// Pulls `reference`, applies its layers and packs the read-only erofs root (cached by the
/// image's manifest digest: a second build of the same image only resolves the reference).
pub fn build(reference: &str, opts: &OciBuildOptions) -> Result<OciImage, OciError> {
    let source = reference::parse(reference)?;
    let root = cache::cache_root(opts.cache_dir.as_deref());
    let name = opts.name.clone().unwrap_or_else(|| source.default_name());
    recipe::validate_name(&name)?;
    let progress = Progress::new(format!("image {name}"), opts.progress);
    progress.note(&format!("pull {} ...", source.display()));
    let started = std::time::Instant::now();
    let pulled = match pull(&source, &root, &opts.registry, &|line| progress.note(line)) {
        Ok(p) => p,
        // Offline: the newest image built from this reference serves (a registry's tag may
        // have moved since; the note says which digest is used).
        Err(e @ OciError::Registry(RegistryError::Unreachable { .. })) => {
            let prefix = format!("oci:{}@", source.display());
            let cached = cache::list(&root).into_iter().find(|c| c.manifest.source.starts_with(&prefix));
            match cached.and_then(|c| from_cached(&c)) {
                Some(img) => {
                    progress.note(&format!("{e}; using the cached {}", img.record.manifest_digest));
                    cache::touch_used(&img.dir);
                    return Ok(img);
                }
                None => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    progress.note(&format!(
        "pull {} ... {:.1} s ({})",
        source.display(),
        started.elapsed().as_secs_f64(),
        pull::short(&pulled.manifest_digest)
    ));
    let record = OciRecord {
        reference: source.display(),
        manifest_digest: pulled.manifest_digest.clone(),
        index_digest: pulled.index_digest.clone(),
        config_digest: pulled.config_digest.clone(),
        layers: pulled.layers.iter().map(|l| l.digest.clone()).collect(),
        config: pulled.config.clone(),
    };
    let hash = rootfs_hash(&pulled.manifest_digest);
    let build_opts = BuildOptions {
        cache_dir: Some(root.clone()),
        name: Some(name.clone()),
        progress: opts.progress,
        force: opts.force,
        ..Default::default()
    };
    let mut apply_err = None;
    let image = super::ensure_rootfs(&root, &name, &hash, &build_opts, &progress, false, |scratch, _log, t| {
        let tree = scratch.join("root");
        cache::mkdirs(&tree)?;
        let r = progress.step(&format!("apply {} layers", pulled.layers.len()), || {
            apply(&pulled, &tree).map_err(|e| {
                let msg = e.to_string();
                apply_err = Some(e);
                ImageError::BadRootDir { path: tree.clone(), detail: msg }
            })
        });
        let (_, secs) = r?;
        t.push(("unpack".into(), secs));
        let py = rootfs::guest_python_version(&tree);
        let src = format!("oci:{}@{}", source.display(), pulled.manifest_digest);
        let json = serde_json::json!({ "oci": &record });
        Ok((tree, py, src, Some(json)))
    });
    let image = match (image, apply_err) {
        (Ok(i), _) => i,
        (Err(_), Some(e)) => return Err(e),
        (Err(e), None) => return Err(e.into()),
    };
    cache::touch_used(&image.dir);
    Ok(from_cached(&image).unwrap_or(OciImage {
        name,
        hash,
        dir: image.dir.clone(),
        rootfs: image.rootfs.clone(),
        python_version: image.manifest.python_version.clone(),
        record,
    }))
}

/// The OCI record of an image's manifest (None if it was not built from an OCI source).
pub fn record_of(m: &cache::Manifest) -> Option<OciRecord> {
    serde_json::from_value(m.recipe.as_ref()?.get("oci")?.clone()).ok()
}

/// The OCI image a cache entry holds (None if it was not built from an OCI source).
fn from_cached(c: &cache::CachedImage) -> Option<OciImage> {
    let record = record_of(&c.manifest)?;
    Some(OciImage {
        name: c.manifest.name.clone(),
        hash: c.manifest.hash.clone(),
        dir: c.dir.clone(),
        rootfs: c.rootfs.clone(),
        python_version: c.manifest.python_version.clone(),
        record,
    })
}
