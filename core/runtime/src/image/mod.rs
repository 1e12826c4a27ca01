//! Guest images: everything a VM boots from, built from Debian packages and cached.
//!
//! An image is three files, each cached on its own key (layout in `cache.rs`):
//! ```text
//! kernel   kernels/<release>_<version>/vmlinuz       Debian linux-image-cloud-amd64   kernel.rs
//! initrd   initramfs/<hash>/initrd.img               /init = static agent + modules  initramfs.rs
//! rootfs   images/<name>/<recipe-hash>/rootfs.erofs  mmdebstrap + pip, read-only      rootfs.rs
//! ```
//! [`ensure_image`] resolves a reference (a built-in recipe name from `recipe.rs`, a directory
//! holding a root filesystem tree, or the name of an image already cached) and returns the
//! paths, building what is missing. Keys: the rootfs by a hash of its recipe (or of the
//! directory's metadata), the kernel by its Debian package version (resolved once per rootfs
//! build and then pinned in the image's manifest, so snapshots keep booting the same kernel),
//! the initrd by a hash of its contents (agent + modules).
//!
//! Invariants: an entry is complete iff its final directory exists (built under `.tmp-*`,
//! renamed into place); one builder per entry at a time (flock; others wait, then reuse);
//! building a new version of a named image removes that name's older versions not used for a
//! day (not at once: two installed versions of this package sharing one cache would otherwise
//! rebuild over each other), so one name is one environment: an OCI image with packages is
//! named after its package list too (`oci::image_name`). Progress is one
//! line per step on stderr with its duration; tools' output goes to `logs/`.
//!
//! Guest boot needs (for the VM runtime): `-M microvm,acpi=on` (virtio-mmio devices are only
//! described by ACPI for this kernel) and the root image as a virtio-blk disk (`/dev/vda`,
//! erofs, read-only). The agent as `/init` loads `/modules/order` and mounts it.
mod cache;
mod error;
pub mod guest;
pub mod housekeeping;
mod initramfs;
mod kernel;
pub mod layers;
pub mod oci;
mod recipe;
mod rootfs;
mod tools;

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use cache::{cache_root, CachedImage, Manifest};
pub use error::{ImageError, Result};
pub use initramfs::{parse as parse_cpio, write_initrd, CpioWriter};
pub use kernel::{Kernel, MODULES};
pub use recipe::{builtin as builtin_recipes, Recipe, DEFAULT_RECIPE};
pub use tools::{Event as ProgressEvent, Sink as ProgressSink};
use tools::Progress;

/// How to find or build an image.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Cache root (default: [`cache_root`]`(None)`).
    pub cache_dir: Option<PathBuf>,
    /// The image's name (default: the recipe's name, or the directory's name).
    pub name: Option<String>,
    /// The static agent binary to use as `/init`; see [`find_agent`] for the default.
    pub agent: Option<PathBuf>,
    /// Further places to look for the agent (e.g. next to the Python package).
    pub agent_candidates: Vec<PathBuf>,
    /// When false, a missing agent is not an error: the image comes without an initrd.
    pub require_agent: bool,
    /// Print progress lines on stderr.
    pub progress: bool,
    /// Rebuild the root filesystem even if it is cached.
    pub force: bool,
    /// Never pull, resolve or build: return the image the cache holds for this request, else
    /// [`ImageError::NotBuilt`] (a kernel start must not wait minutes for a pull).
    pub cached_only: bool,
    /// The host Python whose pip fetches the guest's wheels (default: `python3` on PATH;
    /// `$SUPERMACHINE_HOST_PYTHON` overrides both).
    pub host_python: Option<PathBuf>,
    /// Stack the kernel layer (IPython, comm, matplotlib-inline, ipywidgets for the guest's
    /// Python) on an OCI image. None = yes for OCI images; the built-in ones have it already.
    pub kernel_layer: Option<bool>,
    /// Packages installed into a layer of their own (OCI images only).
    pub packages: layers::PackageRequest,
    /// Receives progress events instead of stderr lines (when `progress` is true).
    pub sink: Option<ProgressSink>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            cache_dir: None,
            name: None,
            agent: None,
            agent_candidates: Vec::new(),
            require_agent: true,
            progress: true,
            force: false,
            cached_only: false,
            host_python: None,
            kernel_layer: None,
            packages: layers::PackageRequest::default(),
            sink: None,
        }
    }
}

/// Everything needed to boot an image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePaths {
    pub name: String,
    /// The rootfs cache key (recipe hash or directory fingerprint).
    pub hash: String,
    pub kernel: PathBuf,
    /// Absent only when `require_agent` was false and no agent was found.
    pub initrd: Option<PathBuf>,
    pub rootfs: PathBuf,
    /// e.g. "3.11.2"; None if the image has no python3.
    pub python_version: Option<String>,
    /// Guest `uname -r`.
    pub kernel_release: String,
    /// Modules in the initrd, in load order.
    pub modules: Vec<String>,
    /// The image's cache directory (manifest.json, build.log).
    pub dir: PathBuf,
    /// For an image built from an OCI source: its digests and config (Env, WorkingDir, User,
    /// Entrypoint/Cmd), for the bake to apply.
    pub oci: Option<oci::OciRecord>,
}

/// Other versions of a rebuilt image are removed once unused for this long.
pub const PRUNE_UNUSED_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Finds or builds the image `reference` (None = the default recipe).
pub fn ensure_image(reference: Option<&str>, opts: &BuildOptions) -> Result<ImagePaths> {
    let root = cache_root(opts.cache_dir.as_deref());
    // Held while this build runs: a prune leaves the blobs and trees of a build in flight alone.
    let _building = cache::shared(&root, "cache");
    let cached_names = cache::names(&root);
    // An OCI reference (`python:3.12-slim`, `oci:DIR:TAG`, a `docker save` tarball) is pulled
    // and packed first; it then boots like any cached image, with our kernel and initrd.
    let oci_image = match reference {
        Some(r) if !recipe::builtin_names().iter().any(|n| n == r)
            && !cached_names.iter().any(|n| n == r)
            && oci::looks_like_oci(r) =>
        {
            let oci_opts = oci::OciBuildOptions {
                cache_dir: Some(root.clone()),
                name: opts.name.clone(),
                progress: opts.progress,
                force: opts.force,
                kernel_layer: opts.kernel_layer.unwrap_or(true),
                packages: opts.packages.clone(),
                host_python: opts.host_python.clone(),
                sink: opts.sink.clone(),
                ..Default::default()
            };
            let found = match opts.cached_only {
                true => oci::find_built(r, &oci_opts),
                false => oci::build(r, &oci_opts),
            };
            Some(found.map_err(|e| match e {
                oci::OciError::Image(e) => e,
                e => ImageError::Oci(Box::new(e)),
            })?)
        }
        _ => None,
    };
    let source = match &oci_image {
        Some(img) => recipe::Source::Cached(img.name.clone()),
        None => recipe::resolve(reference, &cached_names)?,
    };
    if oci_image.is_none() && (!opts.packages.is_empty() || opts.kernel_layer == Some(true)) {
        return Err(ImageError::LayersNeedOci { image: reference.unwrap_or(DEFAULT_RECIPE).to_string() });
    }
    let (name, source) = match source {
        recipe::Source::Cached(n) if oci_image.is_some() => {
            let img = oci_image.expect("checked");
            let manifest = Manifest::read(&img.dir.join("manifest.json"))?;
            (n, Build::Existing(CachedImage { dir: img.dir, rootfs: img.rootfs, manifest }))
        }
        recipe::Source::Recipe(r) => (opts.name.clone().unwrap_or_else(|| r.name.clone()), Build::Recipe(r)),
        recipe::Source::Dir(p) => {
            (opts.name.clone().unwrap_or_else(|| recipe::dir_image_name(&p)), Build::Dir(p))
        }
        recipe::Source::Cached(n) => {
            let newest = cache::list(&root).into_iter().find(|c| c.manifest.name == n);
            let newest = newest.expect("resolve() saw it in the cache");
            // An image built from a directory follows that directory while it exists.
            match newest.manifest.source.strip_prefix("dir:").map(PathBuf::from) {
                Some(p) if p.is_dir() => (n, Build::Dir(p)),
                _ => (n, Build::Existing(newest)),
            }
        }
    };
    recipe::validate_name(&name)?;
    let progress = Progress::new(format!("image {name}"), opts.progress).with_sink(opts.sink.clone());
    let image = match source {
        Build::Existing(c) => c,
        Build::Recipe(r) => {
            let hash = r.hash();
            ensure_rootfs(&root, &name, &hash, opts, &progress, true, |s, log, t| {
                let scratch = rootfs::Scratch {
                    dir: s.to_path_buf(),
                    log: log.to_path_buf(),
                    host_python: opts.host_python.clone(),
                };
                let py = rootfs::build_tree(&r, &scratch, &progress, t)?;
                let src = format!("recipe:{}", r.name);
                Ok((s.join("root"), py, src, Some(serde_json::to_value(&r).expect("serializes"))))
            })?
        }
        Build::Dir(p) => {
            let hash = recipe::dir_fingerprint(&p)?;
            ensure_rootfs(&root, &name, &hash, opts, &progress, true, |_, _, _| {
                let py = rootfs::guest_python_version(&p);
                Ok((p.clone(), py, format!("dir:{}", p.display()), None))
            })?
        }
    };
    cache::touch_used(&image.dir);
    let mut manifest = image.manifest.clone();
    let kernel = match manifest.kernel.as_deref().and_then(|id| kernel::load(&root, id)) {
        Some(k) => k,
        None if opts.cached_only => {
            return Err(ImageError::NotBuilt { image: name, detail: "its guest kernel is not cached".into() })
        }
        None => {
            let k = kernel::ensure(&root, None, true, &progress)?;
            manifest.kernel = Some(k.id.clone());
            manifest.write(&image.dir.join("manifest.json"))?;
            k
        }
    };
    let initrd = match find_agent(opts) {
        Ok(agent) => Some(ensure_initrd(&root, &agent, &kernel, &progress)?),
        Err(_) if !opts.require_agent => {
            progress.note("no guest agent binary found: image built without an initrd");
            None
        }
        Err(e) => return Err(e),
    };
    Ok(ImagePaths {
        name: manifest.name.clone(),
        hash: manifest.hash.clone(),
        kernel: kernel.vmlinuz(),
        initrd,
        rootfs: image.rootfs.clone(),
        python_version: manifest.python_version.clone(),
        kernel_release: kernel.release.clone(),
        modules: kernel.modules.clone(),
        dir: image.dir.clone(),
        oci: oci::record_of(&manifest),
    })
}

enum Build {
    Recipe(Recipe),
    Dir(PathBuf),
    Existing(CachedImage),
}

/// What a tree builder returns: (tree to pack, python version, manifest source, recipe json).
type Tree = (PathBuf, Option<String>, String, Option<serde_json::Value>);

/// Returns the cached `images/<name>/<hash>`, or builds it with `make_tree(scratch, log,
/// timings)` and packs the tree into erofs. With `pin_kernel` false the manifest names no
/// kernel yet: [`ensure_image`] pins one the first time the image is used.
fn ensure_rootfs(
    root: &Path,
    name: &str,
    hash: &str,
    opts: &BuildOptions,
    progress: &Progress,
    pin_kernel: bool,
    make_tree: impl FnOnce(&Path, &Path, &mut rootfs::Timings) -> Result<Tree>,
) -> Result<CachedImage> {
    let parent = cache::images_dir(root).join(name);
    let final_ = parent.join(hash);
    let complete = |d: &Path| -> Option<CachedImage> {
        let manifest = Manifest::read(&d.join("manifest.json")).ok()?;
        let rootfs = d.join("rootfs.erofs");
        rootfs.is_file().then(|| CachedImage { dir: d.to_path_buf(), rootfs, manifest })
    };
    if !opts.force || opts.cached_only {
        if let Some(c) = complete(&final_) {
            return Ok(c);
        }
    }
    if opts.cached_only {
        return Err(ImageError::NotBuilt { image: name.to_string(), detail: format!("no root filesystem {hash}") });
    }
    let _lock = cache::Lock::acquire(root, &format!("image-{name}"), progress)?;
    if !opts.force {
        if let Some(c) = complete(&final_) {
            return Ok(c);
        }
    }
    cache::mkdirs(&parent)?;
    cache::remove_stale(&parent, ".tmp-");
    cache::remove_stale(&parent, ".trash-");
    let scratch_parent = root.join("tmp");
    cache::mkdirs(&scratch_parent)?;
    cache::remove_stale(&scratch_parent, &format!("build-{name}-"));
    let pid = std::process::id();
    let scratch = scratch_parent.join(format!("build-{name}-{pid}"));
    let tmp = parent.join(format!(".tmp-{hash}-{pid}"));
    cache::mkdirs(&scratch)?;
    cache::mkdirs(&tmp)?;
    let log = cache::log_path(root, &format!("image-{name}"));
    let _ = fs::write(&log, "");
    progress.note(&format!("building rootfs {hash} (log: {})", log.display()));
    let result = (|| {
        let mut timings = rootfs::Timings::new();
        let started = std::time::Instant::now();
        let (tree, python_version, source, recipe_json) = make_tree(&scratch, &log, &mut timings)?;
        let out = tmp.join("rootfs.erofs");
        let (_, secs) =
            progress.step("mkfs.erofs", || rootfs::mkfs_erofs(&tree, &out, &log))?;
        timings.push(("mkfs.erofs".into(), secs));
        cache::remove_tree(&scratch)?;
        // A recipe build picks up the current Debian kernel; packing a directory does not ask apt.
        let kernel = match pin_kernel {
            true => Some(kernel::ensure(root, None, recipe_json.is_none(), progress)?),
            false => None,
        };
        timings.push(("total".into(), started.elapsed().as_secs_f64()));
        let rootfs_bytes = fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        progress.note(&format!(
            "rootfs {:.0} MB, python {}, kernel {}",
            rootfs_bytes as f64 / 1e6,
            python_version.as_deref().unwrap_or("none"),
            kernel.as_ref().map_or("(chosen at first use)", |k| k.release.as_str())
        ));
        let manifest = Manifest {
            format: cache::MANIFEST_FORMAT,
            name: name.to_string(),
            hash: hash.to_string(),
            source,
            recipe: recipe_json,
            created_unix: cache::now_unix(),
            python_version,
            kernel: kernel.map(|k| k.id),
            rootfs_bytes,
            timings,
        };
        manifest.write(&tmp.join("manifest.json"))?;
        let _ = fs::copy(&log, tmp.join("build.log"));
        Ok(manifest)
    })();
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = cache::remove_tree(&scratch);
            let _ = cache::remove_tree(&tmp);
            return Err(e);
        }
    };
    if final_.exists() {
        let trash = parent.join(format!(".trash-{hash}-{pid}"));
        cache::publish(&final_, &trash)?;
        cache::remove_tree(&trash)?;
    }
    cache::publish(&tmp, &final_)?;
    cache::touch_used(&final_);
    cache::prune_unused(&parent, hash, PRUNE_UNUSED_AFTER);
    Ok(CachedImage { rootfs: final_.join("rootfs.erofs"), dir: final_, manifest })
}

/// The agent binary: `opts.agent`, else `$SUPERMACHINE_AGENT`, else the first existing of
/// `opts.agent_candidates`, else this workspace's static release build.
pub fn find_agent(opts: &BuildOptions) -> Result<PathBuf> {
    let explicit = opts.agent.clone().or_else(|| {
        std::env::var_os("SUPERMACHINE_AGENT").filter(|v| !v.is_empty()).map(PathBuf::from)
    });
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p) } else { Err(ImageError::AgentNotFound { searched: vec![p] }) };
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target");
    let mut searched = opts.agent_candidates.clone();
    searched.push(workspace.join("x86_64-unknown-linux-gnu/release/supermachine-agent"));
    searched
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(ImageError::AgentNotFound { searched })
}

/// The `initramfs/<key>` of this agent and kernel, and the kernel's modules (name, bytes).
pub fn initrd_key(agent_bytes: &[u8], kernel: &Kernel) -> Result<(String, Vec<(String, Vec<u8>)>)> {
    let mut modules = Vec::new();
    let mut h = Sha256::new();
    h.update(b"supermachine-initramfs=1\n");
    h.update(agent_bytes);
    for m in &kernel.modules {
        let bytes = fs::read(kernel.module_path(m)).map_err(ImageError::io(format!("reading module {m}")))?;
        h.update(m.as_bytes());
        h.update(&bytes);
        modules.push((m.clone(), bytes));
    }
    Ok((recipe::short_hex(&h.finalize()), modules))
}

/// Returns `initramfs/<hash>/initrd.img` for this agent and kernel, building it if needed.
pub fn ensure_initrd(root: &Path, agent: &Path, kernel: &Kernel, progress: &Progress) -> Result<PathBuf> {
    let agent_bytes =
        fs::read(agent).map_err(ImageError::io(format!("reading agent {}", agent.display())))?;
    let (key, modules) = initrd_key(&agent_bytes, kernel)?;
    let parent = root.join("initramfs");
    let final_ = parent.join(&key);
    let img = final_.join("initrd.img");
    if img.is_file() {
        return Ok(img);
    }
    let _lock = cache::Lock::acquire(root, &format!("initrd-{key}"), progress)?;
    if img.is_file() {
        return Ok(img);
    }
    cache::mkdirs(&parent)?;
    cache::remove_stale(&parent, &format!(".tmp-{key}-"));
    let tmp = parent.join(format!(".tmp-{key}-{}", std::process::id()));
    cache::mkdirs(&tmp)?;
    progress.step("write initramfs", || {
        let f = fs::File::create(tmp.join("initrd.img")).map_err(ImageError::io("creating initrd"))?;
        let w = write_initrd(std::io::BufWriter::new(f), &agent_bytes, &modules)
            .map_err(ImageError::io("writing initrd"))?;
        w.into_inner().map_err(|e| ImageError::io("flushing initrd")(e.into_error()))?
            .sync_all()
            .map_err(ImageError::io("syncing initrd"))
    })?;
    cache::publish(&tmp, &final_)?;
    Ok(img)
}

/// One row of [`list_images`].
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub name: String,
    pub hash: String,
    pub source: String,
    /// What it was built from: the OCI reference, the recipe name or the directory.
    pub reference: String,
    /// The OCI manifest digest (`sha256:...`), else `recipe:<hash>`.
    pub digest: String,
    pub rootfs: PathBuf,
    pub dir: PathBuf,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub last_used_unix: u64,
    pub python_version: Option<String>,
    pub kernel: Option<String>,
}

/// Every complete image in the cache (name order, newest first within a name).
pub fn list_images(cache_dir: Option<&Path>) -> Vec<ImageInfo> {
    cache::list(&cache_root(cache_dir))
        .into_iter()
        .map(|c| {
            let (reference, digest) = housekeeping::reference_and_digest(&c.manifest);
            ImageInfo {
                size_bytes: housekeeping::disk_usage(&c.dir),
                last_used_unix: cache::last_used(&c.dir).map(|t| {
                    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
                }).unwrap_or(c.manifest.created_unix),
                name: c.manifest.name,
                hash: c.manifest.hash,
                source: c.manifest.source,
                reference,
                digest,
                rootfs: c.rootfs,
                dir: c.dir,
                created_unix: c.manifest.created_unix,
                python_version: c.manifest.python_version,
                kernel: c.manifest.kernel,
            }
        })
        .collect()
}

/// The cache name an image reference builds to (as [`ensure_image`] names it, with the default
/// kernel layer and `packages`), without building anything: a recipe's or cached image's name,
/// an OCI reference's default name (`python:3.12-slim` → `python-3.12-slim`; with packages
/// `python-3.12-slim-<hash>`, see [`oci::image_name`]), a directory's name. None if it names
/// nothing.
pub fn image_name_for(reference: Option<&str>, cache_dir: Option<&Path>, packages: &layers::PackageRequest)
    -> Option<String>
{
    let cached = cache::names(&cache_root(cache_dir));
    let r = reference.unwrap_or(DEFAULT_RECIPE);
    if !recipe::builtin_names().iter().any(|n| n == r) && !cached.iter().any(|n| n == r) && oci::looks_like_oci(r) {
        return oci::parse_reference(r).ok().map(|s| oci::image_name(&s, true, packages));
    }
    match recipe::resolve(Some(r), &cached).ok()? {
        recipe::Source::Recipe(rec) => Some(rec.name),
        recipe::Source::Dir(p) => Some(recipe::dir_image_name(&p)),
        recipe::Source::Cached(n) => Some(n),
    }
}

/// Removes every cached version of image `name`, its warm snapshots and what only they used
/// (see [`housekeeping`]); false if there was no such image. Versions a running VM uses stay.
pub fn remove_image(cache_dir: Option<&Path>, name: &str) -> Result<bool> {
    recipe::validate_name(name)?;
    let root = cache_root(cache_dir);
    let opts = housekeeping::PruneOptions { remove: vec![name.to_string()], ..Default::default() };
    let report = housekeeping::prune(&root, &opts)?;
    Ok(report.removed.iter().chain(&report.in_use).any(|e| e.kind == housekeeping::Kind::Image))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smk-image-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn unknown_image_is_a_typed_error() {
        let root = tmp("unknown");
        let opts = BuildOptions { cache_dir: Some(root.clone()), progress: false, ..Default::default() };
        let e = ensure_image(Some("nope"), &opts).unwrap_err();
        assert!(matches!(e, ImageError::UnknownImage { .. }), "{e}");
        assert!(e.to_string().contains("default, minimal"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn explicit_agent_must_exist() {
        let opts = BuildOptions { agent: Some("/no/such/agent".into()), ..Default::default() };
        assert!(matches!(find_agent(&opts), Err(ImageError::AgentNotFound { .. })));
        let opts = BuildOptions { agent: Some("/bin/sh".into()), ..Default::default() };
        assert_eq!(find_agent(&opts).unwrap(), PathBuf::from("/bin/sh"));
    }

    #[test]
    fn initrd_is_cached_by_content() {
        let root = tmp("initrd");
        let kdir = root.join("k");
        fs::create_dir_all(kdir.join("modules")).unwrap();
        fs::write(kdir.join("modules/virtio.ko"), b"mod").unwrap();
        let k = Kernel {
            id: "k".into(),
            release: "r".into(),
            version: "v".into(),
            package: "p".into(),
            modules: vec!["virtio".into()],
            dir: kdir,
        };
        let agent = root.join("agent");
        fs::write(&agent, b"agent-1").unwrap();
        let p = Progress::new("t", false);
        let a = ensure_initrd(&root, &agent, &k, &p).unwrap();
        assert_eq!(a, ensure_initrd(&root, &agent, &k, &p).unwrap());
        let entries = parse_cpio(&fs::read(&a).unwrap()).unwrap();
        assert!(entries.iter().any(|e| e.name == "init" && e.data == b"agent-1"));
        assert!(entries.iter().any(|e| e.name == "modules/order" && e.data == b"virtio.ko\n"));
        fs::write(&agent, b"agent-2").unwrap();
        assert_ne!(a, ensure_initrd(&root, &agent, &k, &p).unwrap());
        fs::remove_dir_all(&root).unwrap();
    }
}
