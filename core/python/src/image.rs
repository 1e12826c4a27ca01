//! Bindings for `supermachine_runtime::image`: `ensure_image`, `list_images`, `remove_image`
//! and the `ImageError` exception (a `RuntimeError`).
use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use supermachine_runtime::image::{self, BuildOptions, ImagePaths, ImageInfo};

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
    d.set_item("rootfs", path_str(&i.rootfs))?;
    d.set_item("dir", path_str(&i.dir))?;
    d.set_item("size_bytes", i.size_bytes)?;
    d.set_item("created_unix", i.created_unix)?;
    d.set_item("python_version", &i.python_version)?;
    d.set_item("kernel", &i.kernel)?;
    Ok(d)
}

/// The agent shipped inside the Python package, if the package is importable.
fn packaged_agent(py: Python<'_>) -> Option<PathBuf> {
    let file: String = py.import("supermachine_kernel").ok()?.getattr("__file__").ok()?.extract().ok()?;
    Some(PathBuf::from(file).parent()?.join("guest").join("supermachine-agent"))
}

/// Finds or builds an image and returns its paths:
/// {name, hash, kernel, initrd, rootfs, python_version, kernel_release, modules, dir}, plus
/// `oci` {reference, manifest_digest, index_digest, config_digest, layers, env, working_dir,
/// user, entrypoint, cmd, pip_layers [{kind, key, pins}], guest {python, version, platforms,
/// site, installed}} for an image built from an OCI source. `kernel_layer` (None = yes for
/// OCI images), `packages` and `requirements` stack package layers on an OCI image.
#[pyfunction]
#[pyo3(signature = (r#ref=None, name=None, cache_dir=None, agent=None, progress=true,
                    require_agent=true, force=false, kernel_layer=None, packages=None,
                    requirements=None, cached_only=false))]
#[allow(clippy::too_many_arguments)]
fn ensure_image<'py>(
    py: Python<'py>,
    r#ref: Option<String>,
    name: Option<String>,
    cache_dir: Option<PathBuf>,
    agent: Option<PathBuf>,
    progress: bool,
    require_agent: bool,
    force: bool,
    kernel_layer: Option<bool>,
    packages: Option<Vec<String>>,
    requirements: Option<PathBuf>,
    cached_only: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = BuildOptions {
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
    Ok(())
}
