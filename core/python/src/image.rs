//! Bindings for `supermachine_runtime::image`: `ensure_image`, `list_images`, `remove_image`,
//! the housekeeping (`cache_inventory`, `prune_cache`, `image_name_for`) and the `ImageError`
//! exception (a `RuntimeError`).
use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::Arc;
use std::time::Duration;

use supermachine_runtime::image::housekeeping::{self, Entry, PruneOptions};
use supermachine_runtime::image::{self, BuildOptions, ImageInfo, ImagePaths, ProgressEvent, ProgressSink};

create_exception!(
    _core,
    ImageError,
    PyRuntimeError,
    "A guest image could not be found or built; the message says what to do."
);

create_exception!(
    _core,
    ImageNotBuiltError,
    ImageError,
    "ensure_image(cached_only=True) found no built image for the request; the message says which."
);

fn err(e: image::ImageError) -> PyErr {
    match e {
        image::ImageError::NotBuilt { .. } => ImageNotBuiltError::new_err(e.to_string()),
        e => ImageError::new_err(e.to_string()),
    }
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn paths_dict<'py>(py: Python<'py>, p: &ImagePaths) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &p.name)?;
    d.set_item("hash", &p.hash)?;
    d.set_item("kernel", path_str(&p.kernel))?;
    d.set_item("initrd", p.initrd.as_deref().map(path_str))?;
    d.set_item("rootfs", path_str(&p.rootfs))?;
    d.set_item("python_version", &p.python_version)?;
    d.set_item("kernel_release", &p.kernel_release)?;
    d.set_item("modules", &p.modules)?;
    d.set_item("dir", path_str(&p.dir))?;
    if let Some(o) = &p.oci {
        let od = PyDict::new(py);
        od.set_item("reference", &o.reference)?;
        od.set_item("manifest_digest", &o.manifest_digest)?;
        od.set_item("index_digest", &o.index_digest)?;
        od.set_item("config_digest", &o.config_digest)?;
        od.set_item("layers", &o.layers)?;
        od.set_item("env", &o.config.env)?;
        od.set_item("working_dir", &o.config.working_dir)?;
        od.set_item("user", &o.config.user)?;
        od.set_item("entrypoint", &o.config.entrypoint)?;
        od.set_item("cmd", &o.config.cmd)?;
        let layers = PyList::empty(py);
        for l in &o.pip_layers {
            let ld = PyDict::new(py);
            ld.set_item("kind", &l.kind)?;
            ld.set_item("key", &l.key)?;
            ld.set_item("pins", &l.pins)?;
            layers.append(ld)?;
        }
        od.set_item("pip_layers", layers)?;
        if let Some(g) = &o.guest {
            let gd = PyDict::new(py);
            gd.set_item("python", &g.path)?;
            gd.set_item("version", &g.version)?;
            gd.set_item("platforms", g.platforms())?;
            gd.set_item("site", format!("/{}", g.site))?;
            gd.set_item("installed", g.installed.clone())?;
            od.set_item("guest", gd)?;
        }
        d.set_item("oci", od)?;
    }
    Ok(d)
}

fn info_dict<'py>(py: Python<'py>, i: &ImageInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &i.name)?;
    d.set_item("hash", &i.hash)?;
    d.set_item("source", &i.source)?;
    d.set_item("reference", &i.reference)?;
    d.set_item("digest", &i.digest)?;
    d.set_item("rootfs", path_str(&i.rootfs))?;
    d.set_item("dir", path_str(&i.dir))?;
    d.set_item("size_bytes", i.size_bytes)?;
    d.set_item("created_unix", i.created_unix)?;
    d.set_item("last_used_unix", i.last_used_unix)?;
    d.set_item("python_version", &i.python_version)?;
    d.set_item("kernel", &i.kernel)?;
    Ok(d)
}

/// The agent shipped inside the Python package, if the package is importable.
fn packaged_agent(py: Python<'_>) -> Option<PathBuf> {
    let file: String = py.import("supermachine_kernel").ok()?.getattr("__file__").ok()?.extract().ok()?;
    Some(PathBuf::from(file).parent()?.join("guest").join("supermachine-agent"))
}

fn event_dict<'py>(py: Python<'py>, e: &ProgressEvent) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match e {
        ProgressEvent::Note { text } => {
            d.set_item("event", "note")?;
            d.set_item("text", text)?;
        }
        ProgressEvent::Start { step } => {
            d.set_item("event", "start")?;
            d.set_item("step", step)?;
        }
        ProgressEvent::End { step, secs, ok } => {
            d.set_item("event", "end")?;
            d.set_item("step", step)?;
            d.set_item("secs", secs)?;
            d.set_item("ok", ok)?;
        }
        ProgressEvent::Advance { task, done, total, unit } => {
            d.set_item("event", "advance")?;
            d.set_item("task", task)?;
            d.set_item("done", done)?;
            d.set_item("total", total)?;
            d.set_item("unit", unit)?;
        }
    }
    Ok(d)
}

/// `progress`: a bool (stderr lines or none) or a callable given each event as a dict.
fn progress_arg(progress: Option<&Bound<'_, PyAny>>) -> PyResult<(bool, Option<ProgressSink>)> {
    let Some(p) = progress else { return Ok((true, None)) };
    if p.is_callable() {
        let cb: PyObject = p.clone().unbind();
        let sink = ProgressSink(Arc::new(move |e: &ProgressEvent| {
            Python::with_gil(|py| {
                // A failing progress callback must not fail the build; Python sees it as unraisable.
                if let Err(err) = event_dict(py, e).and_then(|d| cb.call1(py, (d,))) {
                    err.write_unraisable(py, None);
                }
            })
        }));
        return Ok((true, Some(sink)));
    }
    Ok((p.is_truthy()?, None))
}

/// Finds or builds an image and returns its paths:
/// {name, hash, kernel, initrd, rootfs, python_version, kernel_release, modules, dir}, plus
/// `oci` {reference, manifest_digest, index_digest, config_digest, layers, env, working_dir,
/// user, entrypoint, cmd, pip_layers [{kind, key, pins}], guest {python, version, platforms,
/// site, installed}} for an image built from an OCI source. `kernel_layer` (None = yes for
/// OCI images), `packages` and `requirements` stack package layers on an OCI image.
/// `progress`: True (lines on stderr), False, or a callable given each progress event as a
/// dict: {event: note, text} | {event: start, step} | {event: end, step, secs, ok} |
/// {event: advance, task: pull|unpack, done, total, unit: bytes|layers}.
#[pyfunction]
#[pyo3(signature = (r#ref=None, name=None, cache_dir=None, agent=None, progress=None,
                    require_agent=true, force=false, kernel_layer=None, packages=None,
                    requirements=None, cached_only=false))]
#[allow(clippy::too_many_arguments)]
fn ensure_image<'py>(
    py: Python<'py>,
    r#ref: Option<String>,
    name: Option<String>,
    cache_dir: Option<PathBuf>,
    agent: Option<PathBuf>,
    progress: Option<Bound<'py, PyAny>>,
    require_agent: bool,
    force: bool,
    kernel_layer: Option<bool>,
    packages: Option<Vec<String>>,
    requirements: Option<PathBuf>,
    cached_only: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let (progress, sink) = progress_arg(progress.as_ref())?;
    let opts = BuildOptions {
        sink,
        cache_dir,
        name,
        agent,
        agent_candidates: packaged_agent(py).into_iter().collect(),
        require_agent,
        progress,
        force,
        cached_only,
        host_python: py
            .import("sys")
            .and_then(|sys| sys.getattr("executable"))
            .and_then(|e| e.extract::<String>())
            .ok()
            .filter(|e| !e.is_empty())
            .map(PathBuf::from),
        kernel_layer,
        packages: image::layers::PackageRequest { packages: packages.unwrap_or_default(), requirements },
    };
    let paths = py.allow_threads(|| image::ensure_image(r#ref.as_deref(), &opts)).map_err(err)?;
    paths_dict(py, &paths)
}

/// Every cached image: [{name, hash, source, rootfs, dir, size_bytes, created_unix,
/// python_version, kernel}], by name, newest first.
#[pyfunction]
#[pyo3(signature = (cache_dir=None))]
fn list_images(py: Python<'_>, cache_dir: Option<PathBuf>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    let infos = py.allow_threads(|| image::list_images(cache_dir.as_deref()));
    infos.iter().map(|i| info_dict(py, i)).collect()
}

/// Removes every cached version of image `name`; False if there was none.
#[pyfunction]
#[pyo3(signature = (name, cache_dir=None))]
fn remove_image(py: Python<'_>, name: String, cache_dir: Option<PathBuf>) -> PyResult<bool> {
    py.allow_threads(|| image::remove_image(cache_dir.as_deref(), &name)).map_err(err)
}

fn entry_dict<'py>(py: Python<'py>, e: &Entry) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("kind", e.kind.as_str())?;
    d.set_item("name", &e.name)?;
    d.set_item("path", path_str(&e.path))?;
    d.set_item("bytes", e.bytes)?;
    d.set_item("created_unix", e.created_unix)?;
    d.set_item("last_used_unix", e.last_used_unix)?;
    d.set_item("in_use", e.in_use)?;
    d.set_item("image", &e.image)?;
    d.set_item("reason", &e.reason)?;
    d.set_item("uses", e.uses().iter().map(|p| path_str(p)).collect::<Vec<_>>())?;
    Ok(d)
}

/// Everything in the cache: [{kind: image|snapshot|hint|blob|layer|resolve|kernel|initrd|
/// leftover, name, path, bytes, created_unix, last_used_unix, in_use, image, reason, uses}].
#[pyfunction]
#[pyo3(signature = (cache_dir=None, snapshots_dir=None))]
fn cache_inventory(py: Python<'_>, cache_dir: Option<PathBuf>, snapshots_dir: Option<PathBuf>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    let root = image::cache_root(cache_dir.as_deref());
    let entries = py.allow_threads(|| housekeeping::inventory(&root, snapshots_dir.as_deref()));
    entries.iter().map(|e| entry_dict(py, e)).collect()
}

/// Prunes the cache (see `core/runtime/src/image/housekeeping.rs`): `remove` these images
/// with their snapshots and what only they used; with `policy` also stale snapshots, older
/// versions, unreferenced blobs/layers, leftovers and old hints; `all` / `unused_days` also
/// images no kernelspec uses (`keep`: names kernelspecs use); `budget` bytes: least recently
/// used first. Never what a running VM uses, nor the entries at the paths in `protect`.
/// Returns {removed: [entry], in_use: [entry], total_bytes, freed_bytes, dry_run, notes}.
#[pyfunction]
#[pyo3(signature = (cache_dir=None, keep=None, remove=None, policy=false, all=false,
                    unused_days=None, budget=None, dry_run=false, snapshots_dir=None,
                    protect=None))]
#[allow(clippy::too_many_arguments)]
fn prune_cache<'py>(
    py: Python<'py>,
    cache_dir: Option<PathBuf>,
    keep: Option<Vec<String>>,
    remove: Option<Vec<String>>,
    policy: bool,
    all: bool,
    unused_days: Option<f64>,
    budget: Option<u64>,
    dry_run: bool,
    snapshots_dir: Option<PathBuf>,
    protect: Option<Vec<PathBuf>>,
) -> PyResult<Bound<'py, PyDict>> {
    let root = image::cache_root(cache_dir.as_deref());
    let opts = PruneOptions {
        keep: keep.unwrap_or_default(),
        remove: remove.unwrap_or_default(),
        policy,
        all,
        unused_for: unused_days.map(|d| Duration::from_secs_f64(d.max(0.0) * 86400.0)),
        budget,
        dry_run,
        snapshots_dir,
        protect: protect.unwrap_or_default(),
        agent_candidates: packaged_agent(py).into_iter().collect(),
    };
    let r = py.allow_threads(|| housekeeping::prune(&root, &opts)).map_err(err)?;
    let d = PyDict::new(py);
    let list = |v: &[Entry]| -> PyResult<Bound<'py, PyList>> {
        let l = PyList::empty(py);
        for e in v {
            l.append(entry_dict(py, e)?)?;
        }
        Ok(l)
    };
    d.set_item("removed", list(&r.removed)?)?;
    d.set_item("in_use", list(&r.in_use)?)?;
    d.set_item("total_bytes", r.total_bytes)?;
    d.set_item("freed_bytes", r.freed_bytes)?;
    d.set_item("dry_run", r.dry_run)?;
    d.set_item("notes", r.notes)?;
    Ok(d)
}

/// The cache name image reference `ref` builds to (None = the default image) with `packages`
/// and `requirements` (an OCI image's environment has a name of its own), without building;
/// None if it names no image.
#[pyfunction]
#[pyo3(signature = (r#ref=None, cache_dir=None, packages=None, requirements=None))]
fn image_name_for(r#ref: Option<String>, cache_dir: Option<PathBuf>, packages: Option<Vec<String>>,
                  requirements: Option<PathBuf>) -> Option<String> {
    let request = image::layers::PackageRequest { packages: packages.unwrap_or_default(), requirements };
    image::image_name_for(r#ref.as_deref(), cache_dir.as_deref(), &request)
}

/// Names of the built-in recipes, default first.
#[pyfunction]
fn image_recipes() -> Vec<(String, String)> {
    image::builtin_recipes().into_iter().map(|r| (r.name, r.description)).collect()
}

/// The cache root in effect (argument, SUPERMACHINE_CACHE_DIR, or the XDG cache directory).
#[pyfunction]
#[pyo3(signature = (cache_dir=None))]
fn image_cache_dir(cache_dir: Option<PathBuf>) -> String {
    path_str(&image::cache_root(cache_dir.as_deref()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ImageError", m.py().get_type::<ImageError>())?;
    m.add("ImageNotBuiltError", m.py().get_type::<ImageNotBuiltError>())?;
    m.add_function(wrap_pyfunction!(ensure_image, m)?)?;
    m.add_function(wrap_pyfunction!(list_images, m)?)?;
    m.add_function(wrap_pyfunction!(remove_image, m)?)?;
    m.add_function(wrap_pyfunction!(image_recipes, m)?)?;
    m.add_function(wrap_pyfunction!(image_cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(cache_inventory, m)?)?;
    m.add_function(wrap_pyfunction!(prune_cache, m)?)?;
    m.add_function(wrap_pyfunction!(image_name_for, m)?)?;
    Ok(())
}
