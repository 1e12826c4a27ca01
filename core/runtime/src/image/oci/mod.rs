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
//!
//! Package layers (`../layers.rs`): with the kernel layer or a package list, the guest's Python
//! is detected from the unpacked files (`../guest.rs`, cached per manifest digest in
//! `oci/guest/`), the layers are resolved and installed by the host's pip (each cached on its
//! own), and hard-linked into the tree before `mkfs.erofs`. The rootfs key then also holds the
//! layers' keys, so the same image with another package list is another cache entry that
//! shares the pulled blobs and any unchanged layer. Such an entry also gets a name of its own
//! ([`image_name`]: `python-3.12-slim-<hash of the package list>`), so environments on one base
//! image never evict each other as older versions of one name.
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
use super::guest::{self, GuestPython};
use super::layers::{self, LayerRecord, PackageRequest};
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
    /// Rebuild the root filesystem even if it is cached (blobs stay cached); also re-resolves
    /// the package layers.
    pub force: bool,
    /// Add the kernel layer (what the guest REPL needs); the image must have python3.
    pub kernel_layer: bool,
    /// The user's packages, installed into a layer of their own.
    pub packages: PackageRequest,
    /// The host Python whose pip installs the layers (see `BuildOptions::host_python`).
    pub host_python: Option<PathBuf>,
    /// Receives progress events instead of stderr lines.
    pub sink: Option<super::ProgressSink>,
}

impl Default for OciBuildOptions {
    fn default() -> Self {
        OciBuildOptions {
            cache_dir: None,
            name: None,
            registry: RegistryOptions::from_env(),
            progress: true,
            force: false,
            kernel_layer: false,
            packages: PackageRequest::default(),
            host_python: None,
            sink: None,
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
    /// The guest's Python, when package layers were added.
    #[serde(default)]
    pub guest: Option<GuestPython>,
    /// The package layers stacked on the image, bottom first.
    #[serde(default)]
    pub pip_layers: Vec<LayerRecord>,
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
pub fn pull(source: &Source, root: &Path, opts: &RegistryOptions, progress: &Progress) -> Result<Pulled, OciError> {
    let store = Store::new(root);
    let shown = source.display();
    match source {
        Source::Registry(r) => {
            let reg = registry::Registry::connect(r, opts)?.with_progress(progress);
            pull::pull(&reg, &store, progress)
        }
        Source::Layout { dir, tag } => pull::pull(&local::Layout::open(dir, tag.as_deref(), &shown)?, &store, progress),
        Source::Archive { path, tag } => {
            let scratch = root.join("tmp").join(format!("oci-archive-{}", std::process::id()));
            let _ = cache::remove_tree(&scratch);
            cache::mkdirs(&scratch)?;
            let r = (|| {
                progress.note(&format!("unpack archive {}", path.display()));
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

/// Applies the pulled layers, bottom first, to the directory `dir` (reported as task `unpack`).
pub fn apply(pulled: &Pulled, dir: &Path, progress: &Progress) -> Result<Vec<LayerStats>, OciError> {
    let mut root = Root::new(dir)?;
    let n = pulled.layers.len();
    let mut stats = Vec::new();
    progress.advance("unpack", 0, n as u64, "layers");
    for (i, l) in pulled.layers.iter().enumerate() {
        let name = format!("{}/{n} ({})", i + 1, pull::short(&l.digest));
        stats.push(root.apply(&l.path, &l.media_type, &name)?);
        progress.advance("unpack", i as u64 + 1, n as u64, "layers");
    }
    Ok(stats)
}

/// The rootfs cache key of an image manifest.
fn rootfs_hash(manifest_digest: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("supermachine-oci-rootfs={OCI_BUILDER_VERSION}\n{manifest_digest}\n"));
    recipe::short_hex(&h.finalize())
}

/// The cache name of `source` built with `kernel_layer` and `packages`, when the caller gives
/// none: the reference's default name (`python-3.12-slim`), and with a package list that name
/// plus `-` and 8 hex digits of a hash of the request (`python-3.12-slim-3f9a0c1e`).
///
/// Why the package list is in the name: the versions of one name replace each other (a build
/// removes the name's other versions unused for a day, see `cache::prune_unused`; so does
/// `image prune`, and a kernelspec keeps only the newest version of the name it runs). Two
/// environments on one base image (kernelspecs `--image python:3.12-slim --packages attrs` and
/// `... --packages six`) are not versions of each other: with a name each, neither removes the
/// other whatever order they are used in, and `image list` and the prune rules see which
/// kernelspec runs which. The versions under one name are rebuilds of one environment (the tag
/// moved, the list resolved to newer pins, the requirements file was edited), which may replace
/// each other.
///
/// The request is hashed, not the resolved set, so a kernel start and `image list` name it
/// without pip: the packages sorted and deduplicated, the requirements file's absolute path
/// (not its contents: an edited file is a new version of the same environment), and whether
/// the kernel layer is on. Without packages the name is the plain one with or without the
/// kernel layer (kernelspecs always have it; a kernel-layer-less build is `Image.build`'s).
pub fn image_name(source: &Source, kernel_layer: bool, packages: &PackageRequest) -> String {
    let base = source.default_name();
    if packages.is_empty() {
        return base;
    }
    let mut h = Sha256::new();
    h.update(format!("supermachine-environment=1\nkernel_layer={kernel_layer}\n"));
    let specs: std::collections::BTreeSet<&str> = packages.packages.iter().map(|p| p.trim()).collect();
    for p in specs {
        h.update(format!("package={p}\n"));
    }
    if let Some(r) = &packages.requirements {
        let abs = std::path::absolute(r).unwrap_or_else(|_| r.clone());
        h.update(format!("requirements={}\n", abs.display()));
    }
    let hex = &recipe::short_hex(&h.finalize())[..8];
    // Names are at most 64 characters (`recipe::validate_name`).
    let base: String = base.chars().take(64 - 1 - hex.len()).collect();
    format!("{base}-{hex}")
}

/// Pulls `reference`, applies its layers and packs the read-only erofs root (cached by the
/// image's manifest digest: a second build of the same image only resolves the reference).
pub fn build(reference: &str, opts: &OciBuildOptions) -> Result<OciImage, OciError> {
    let source = reference::parse(reference)?;
    let root = cache::cache_root(opts.cache_dir.as_deref());
    let name = opts.name.clone().unwrap_or_else(|| image_name(&source, opts.kernel_layer, &opts.packages));
    recipe::validate_name(&name)?;
    let progress = Progress::new(format!("image {name}"), opts.progress).with_sink(opts.sink.clone());
    progress.note(&format!("pull {} ...", source.display()));
    let started = std::time::Instant::now();
    let pulled = match pull(&source, &root, &opts.registry, &progress) {
        Ok(p) => p,
        // Offline: the newest build of this reference with these layers serves (a registry's
        // tag may have moved since; the note says which digest is used).
        Err(e @ OciError::Registry(RegistryError::Unreachable { .. })) => {
            match find_built(reference, &OciBuildOptions { name: Some(name.clone()), ..opts.clone() }) {
                Ok(img) => {
                    progress.note(&format!("{e}; using the cached {}", img.record.manifest_digest));
                    return Ok(img);
                }
                Err(_) => return Err(e),
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
        guest: None,
        pip_layers: Vec::new(),
    };
    let mut record = record;
    let mut unpacked: Option<PathBuf> = None;
    let mut layer_trees = Vec::new();
    let mut layer_secs = 0.0;
    if opts.kernel_layer || !opts.packages.is_empty() {
        let started = std::time::Instant::now();
        let (g, tree) = guest_of(&pulled, &root, &name, &progress)?;
        unpacked = tree;
        let r = add_layers(&root, &name, &source.display(), g, opts, &progress, &mut record, &mut layer_trees);
        if let Err(e) = r {
            if let Some(t) = &unpacked {
                let _ = cache::remove_tree(t.parent().unwrap_or(t));
            }
            return Err(e);
        }
        layer_secs = started.elapsed().as_secs_f64();
    }
    let hash = match record.pip_layers.is_empty() {
        true => rootfs_hash(&pulled.manifest_digest),
        false => rootfs_hash(&format!("{}\n{}", pulled.manifest_digest, layers::keys(&record.pip_layers))),
    };
    let build_opts = BuildOptions {
        cache_dir: Some(root.clone()),
        name: Some(name.clone()),
        progress: opts.progress,
        force: opts.force,
        sink: opts.sink.clone(),
        ..Default::default()
    };
    let mut apply_err = None;
    let image = super::ensure_rootfs(&root, &name, &hash, &build_opts, &progress, false, |scratch, _log, t| {
        let tree = scratch.join("root");
        match unpacked.take() {
            Some(u) => {
                std::fs::rename(&u, &tree).map_err(ImageError::io("moving the unpacked image"))?;
                let _ = cache::remove_tree(u.parent().unwrap_or(&u));
            }
            None => {
                cache::mkdirs(&tree)?;
                let r = progress.step(&format!("apply {} layers", pulled.layers.len()), || {
                    apply(&pulled, &tree, &progress).map_err(|e| {
                        let msg = e.to_string();
                        apply_err = Some(e);
                        ImageError::BadRootDir { path: tree.clone(), detail: msg }
                    })
                });
                let (_, secs) = r?;
                t.push(("unpack".into(), secs));
            }
        }
        if !layer_trees.is_empty() {
            t.push(("pip layers".into(), layer_secs));
            let (_, secs) = progress.step(&format!("stack {} package layers", layer_trees.len()), || {
                layer_trees.iter().try_for_each(|l: &PathBuf| layers::stack(l, &tree))
            })?;
            t.push(("stack".into(), secs));
        }
        let py = match &record.guest {
            Some(g) => Some(g.full_version.clone().unwrap_or_else(|| g.version.clone())),
            None => guest::detect(&tree, &record.config.env)
                .map(|g| g.full_version.unwrap_or(g.version))
                .or_else(|| rootfs::guest_python_version(&tree)),
        };
        let src = format!("oci:{}@{}", source.display(), pulled.manifest_digest);
        let json = serde_json::json!({ "oci": &record });
        Ok((tree, py, src, Some(json)))
    });
    if let Some(u) = &unpacked {
        let _ = cache::remove_tree(u.parent().unwrap_or(u));
    }
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

/// The cached build of `reference` with the layers `opts` asks for, newest first, found
/// without a registry, pip or a build: the kernel layer must be there iff asked for, and the
/// package layer must hold what pip resolved for this package list (and requirements file
/// contents) when the image was built. A list never resolved, or a layer set never built, is
/// [`ImageError::NotBuilt`].
pub fn find_built(reference: &str, opts: &OciBuildOptions) -> Result<OciImage, OciError> {
    let source = reference::parse(reference)?;
    let root = cache::cache_root(opts.cache_dir.as_deref());
    let name = opts.name.clone().unwrap_or_else(|| image_name(&source, opts.kernel_layer, &opts.packages));
    let prefix = format!("oci:{}@", source.display());
    let p = &opts.packages;
    for c in cache::list(&root) {
        if c.manifest.name != name || !c.manifest.source.starts_with(&prefix) {
            continue;
        }
        let Some(img) = from_cached(&c) else { continue };
        let layer = |kind: &str| img.record.pip_layers.iter().find(|l| l.kind == kind);
        if opts.kernel_layer != layer("kernel").is_some() {
            continue;
        }
        let matches = match (layer("packages"), &img.record.guest) {
            (None, _) => p.is_empty(),
            (Some(_), _) if p.is_empty() => false,
            (Some(_), None) => false,
            (Some(packages), Some(g)) => {
                let kernel_pins = layer("kernel").map(|l| l.pins.clone()).unwrap_or_default();
                let pins = layers::cached_resolution(&root, g, &p.packages, p.requirements.as_deref(), &kernel_pins)?;
                pins.as_ref() == Some(&packages.pins)
            }
        };
        if matches {
            cache::touch_used(&img.dir);
            return Ok(img);
        }
    }
    let mut asked = Vec::new();
    if opts.kernel_layer {
        asked.push("the kernel layer".to_string());
    }
    if !p.packages.is_empty() {
        asked.push(format!("packages {}", p.packages.join(" ")));
    }
    if let Some(r) = &p.requirements {
        asked.push(format!("requirements {}", r.display()));
    }
    let with = if asked.is_empty() { String::new() } else { format!(" with {}", asked.join(", ")) };
    Err(ImageError::NotBuilt { image: source.display(), detail: format!("no cached build of it{with}") }.into())
}

/// The guest Python of a pulled image: from `oci/guest/<digest>.json`, else detected in a
/// fresh unpack of its layers (returned too, so the build does not unpack twice).
fn guest_of(pulled: &Pulled, root: &Path, name: &str, progress: &Progress)
    -> Result<(Option<GuestPython>, Option<PathBuf>), OciError>
{
    let dir = root.join("oci").join("guest");
    // Keyed by the builders too: a change in applying layers or in detection detects again.
    let file = dir.join(format!(
        "{}-v{}.{}.json",
        pulled.manifest_digest.replace(':', "-"),
        OCI_BUILDER_VERSION,
        layers::LAYER_BUILDER_VERSION
    ));
    if let Some(g) = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice::<Option<GuestPython>>(&b).ok()) {
        return Ok((g, None));
    }
    let scratch = root.join("tmp").join(format!("oci-guest-{name}-{}", std::process::id()));
    let _ = cache::remove_tree(&scratch);
    let tree = scratch.join("root");
    cache::mkdirs(&tree)?;
    let r = progress.step(&format!("apply {} layers", pulled.layers.len()), || {
        apply(pulled, &tree, progress).map_err(|e| ImageError::BadRootDir { path: tree.clone(), detail: e.to_string() })
    });
    if let Err(e) = r {
        let _ = cache::remove_tree(&scratch);
        return Err(e.into());
    }
    let g = guest::detect(&tree, &pulled.config.env);
    cache::mkdirs(&dir)?;
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&g).expect("serializes"))
        .and_then(|_| std::fs::rename(&tmp, &file))
        .map_err(ImageError::io("caching the guest's Python"))?;
    Ok((g, Some(tree)))
}

/// Resolves and installs the kernel layer and the user's package layer (each cached), records
/// them and pushes their trees to `trees`.
#[allow(clippy::too_many_arguments)]
fn add_layers(root: &Path, name: &str, image: &str, g: Option<GuestPython>, opts: &OciBuildOptions,
              progress: &Progress, record: &mut OciRecord, trees: &mut Vec<PathBuf>) -> Result<(), OciError> {
    let g = g.ok_or_else(|| ImageError::NoPython { image: image.to_string() })?;
    let log = cache::log_path(root, &format!("layers-{name}"));
    let pip = layers::Pip {
        root,
        python: rootfs::host_python(opts.host_python.as_deref()),
        log: &log,
        progress,
        image,
        force: opts.force,
    };
    let mut kernel_pins = Vec::new();
    if opts.kernel_layer {
        let specs: Vec<String> = layers::KERNEL_REQUIREMENTS.iter().map(|s| s.to_string()).collect();
        // The built-in image's tested versions where the guest allows them, else any.
        let pins = match pip.resolve(&g, &specs, None, &[], &layers::tested_pins()) {
            Err(ImageError::NoWheel { .. } | ImageError::PackageConflict { .. }) => {
                pip.resolve(&g, &specs, None, &[], &[])?
            }
            r => r?,
        };
        let (rec, tree) = pip.layer(&g, "kernel", &pins)?;
        kernel_pins = pins;
        record.pip_layers.push(rec);
        trees.push(tree);
    }
    if !opts.packages.is_empty() {
        let p = &opts.packages;
        let pins = pip.resolve(&g, &p.packages, p.requirements.as_deref(), &kernel_pins, &[])?;
        let (rec, tree) = pip.layer(&g, "packages", &pins)?;
        record.pip_layers.push(rec);
        trees.push(tree);
    }
    record.guest = Some(g);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(packages: &[&str], requirements: Option<&str>) -> PackageRequest {
        PackageRequest {
            packages: packages.iter().map(|p| p.to_string()).collect(),
            requirements: requirements.map(PathBuf::from),
        }
    }

    #[test]
    fn environments_on_one_base_image_have_names_of_their_own() {
        let slim = parse_reference("python:3.12-slim").unwrap();
        let plain = image_name(&slim, true, &request(&[], None));
        assert_eq!(plain, "python-3.12-slim");
        assert_eq!(image_name(&slim, false, &request(&[], None)), plain);
        let attrs = image_name(&slim, true, &request(&["attrs"], None));
        let six = image_name(&slim, true, &request(&["six"], None));
        let both = image_name(&slim, true, &request(&["six", "attrs"], None));
        for n in [&attrs, &six, &both] {
            assert!(n.starts_with("python-3.12-slim-") && n.len() == plain.len() + 9, "{n}");
            recipe::validate_name(n).unwrap();
        }
        assert!(attrs != six && attrs != both && six != both);
        // The request as a set: order, repeats and spaces do not make another environment.
        assert_eq!(image_name(&slim, true, &request(&[" attrs", "six", "attrs"], None)), both);
        assert_ne!(image_name(&slim, false, &request(&["attrs"], None)), attrs);
        let req = image_name(&slim, true, &request(&[], Some("/srv/a/requirements.txt")));
        assert_ne!(req, image_name(&slim, true, &request(&[], Some("/srv/b/requirements.txt"))));
        assert_ne!(req, plain);
        // Another tag of the same image is another name already.
        let other = parse_reference("python:3.11-slim").unwrap();
        assert_ne!(image_name(&other, true, &request(&["attrs"], None)), attrs);
    }

    #[test]
    fn a_long_reference_still_gives_a_valid_name() {
        let long = format!("ghcr.io/o/{}:t", "x".repeat(80));
        let n = image_name(&parse_reference(&long).unwrap(), true, &request(&["attrs"], None));
        assert_eq!(n.len(), 64);
        recipe::validate_name(&n).unwrap();
    }
}
