//! The guest kernel: Debian's `linux-image-cloud-amd64`, fetched with the host's apt.
//!
//! The metapackage depends on one versioned package (`linux-image-6.1.0-NN-cloud-amd64`); we
//! `apt-get download` that, `dpkg-deb -x` it, and keep `boot/vmlinuz-*`, `boot/config-*` and the
//! modules in [`MODULES`] plus whatever they depend on (read from each module's `.modinfo`
//! `depends=` field, so no depmod is needed), uncompressed, in load order. Modules the kernel
//! builds in (`modules.builtin`) are skipped. Cached as `kernels/<release>_<version>/`.
//!
//! Facts for bookworm's 6.1 cloud kernel: VIRTIO_MMIO=m and VIRTIO_MMIO_CMDLINE_DEVICES is not
//! set, so QEMU's microvm needs `acpi=on` for the devices to appear; modules are not compressed
//! (MODULE_COMPRESS_NONE); CRYPTO_CRC32C is built in (libcrc32c needs it).
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cache::{self, Lock};
use super::error::{ImageError, Result};
use super::tools::{self, Progress};

pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The modules the guest needs, in load order (their dependencies are added before them).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "libcrc32c",
    "erofs",
    "overlay",
];

/// A cached guest kernel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kernel {
    /// Directory name under `kernels/`: `<release>_<version>`.
    pub id: String,
    /// `uname -r` of the guest, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// Debian package version, e.g. `6.1.192-2`.
    pub version: String,
    pub package: String,
    /// Module names in load order; files are `modules/<name>.ko`.
    pub modules: Vec<String>,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    pub fn module_path(&self, name: &str) -> PathBuf {
        self.dir.join("modules").join(format!("{name}.ko"))
    }
}

fn kernels_dir(root: &Path) -> PathBuf {
    root.join("kernels")
}

/// Loads the cached kernel `id`, if complete.
pub fn load(root: &Path, id: &str) -> Option<Kernel> {
    let dir = kernels_dir(root).join(id);
    let text = fs::read_to_string(dir.join("kernel.json")).ok()?;
    let mut k: Kernel = serde_json::from_str(&text).ok()?;
    k.dir = dir;
    (k.vmlinuz().is_file() && k.modules.iter().all(|m| k.module_path(m).is_file())).then_some(k)
}

/// Newest complete cached kernel (by directory mtime).
fn newest_cached(root: &Path) -> Option<Kernel> {
    let mut v: Vec<(std::time::SystemTime, Kernel)> = fs::read_dir(kernels_dir(root))
        .ok()?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let k = load(root, &e.file_name().to_string_lossy())?;
            Some((e.metadata().ok()?.modified().ok()?, k))
        })
        .collect();
    v.sort_by_key(|(t, _)| *t);
    v.pop().map(|(_, k)| k)
}

/// Returns the kernel `pinned` if cached; else, with `prefer_cached`, the newest cached one;
/// else the current Debian kernel (fetched if needed); else, when apt cannot answer, the newest
/// cached one.
pub fn ensure(root: &Path, pinned: Option<&str>, prefer_cached: bool, progress: &Progress)
    -> Result<Kernel>
{
    if let Some(k) = pinned.and_then(|id| load(root, id)) {
        return Ok(k);
    }
    if prefer_cached {
        if let Some(k) = newest_cached(root) {
            return Ok(k);
        }
    }
    let (package, version) = match progress.step("resolve guest kernel package", resolve_package) {
        Ok((pv, _)) => pv,
        Err(e) => {
            if let Some(k) = newest_cached(root) {
                progress.note(&format!("apt cannot resolve the kernel ({e}); using cached {}", k.id));
                return Ok(k);
            }
            return Err(e);
        }
    };
    let release = package.trim_start_matches("linux-image-").to_string();
    let id = format!("{release}_{}", version.replace([':', '/'], "_"));
    if let Some(k) = load(root, &id) {
        return Ok(k);
    }
    let _lock = Lock::acquire(root, &format!("kernel-{id}"), progress)?;
    if let Some(k) = load(root, &id) {
        return Ok(k);
    }
    let parent = kernels_dir(root);
    cache::mkdirs(&parent)?;
    cache::remove_stale(&parent, &format!(".tmp-{id}-"));
    let tmp = parent.join(format!(".tmp-{id}-{}", std::process::id()));
    cache::mkdirs(&tmp)?;
    let r = fetch_into(root, &tmp, &package, &version, &release, &id, progress);
    let k = match r {
        Ok(k) => k,
        Err(e) => {
            let _ = cache::remove_tree(&tmp);
            return Err(e);
        }
    };
    let final_ = parent.join(&id);
    cache::publish(&tmp, &final_)?;
    Ok(Kernel { dir: final_, ..k })
}

/// (versioned package, candidate version) behind the metapackage.
fn resolve_package() -> Result<(String, String)> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(ImageError::NotDebian { detail: "the guest kernel is amd64 only".into() });
    }
    let apt_cache = tools::which("apt-cache")
        .map_err(|_| ImageError::NotDebian { detail: "apt-cache is not installed".into() })?;
    let query = || -> std::result::Result<String, String> {
        let out = tools::run_capture(
            std::process::Command::new(&apt_cache).args(["depends", META_PACKAGE]),
            "apt-cache depends",
        )?;
        out.lines()
            .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
            .map(|p| p.trim().to_string())
            .find(|p| p.starts_with("linux-image-") && p != META_PACKAGE)
            .ok_or_else(|| format!("{META_PACKAGE} has no linux-image dependency"))
    };
    let package = match query() {
        Ok(p) => p,
        // A fresh machine may never have run `apt-get update`: do it once, then retry.
        // SAFETY: geteuid has no preconditions.
        Err(_) if unsafe { libc::geteuid() } == 0 && tools::which("apt-get").is_ok() => {
            let _ = tools::run_capture(
                std::process::Command::new(tools::which("apt-get")?).args(["update", "-qq"]),
                "apt-get update",
            );
            query().map_err(|detail| ImageError::NotDebian { detail })?
        }
        Err(detail) => {
            return Err(ImageError::NotDebian {
                detail: format!("{detail} (run `apt-get update` as root first?)"),
            })
        }
    };
    let show = tools::run_capture(
        std::process::Command::new(&apt_cache).args(["show", "--no-all-versions", &package]),
        "apt-cache show",
    )
    .map_err(|detail| ImageError::NotDebian { detail })?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| ImageError::NotDebian { detail: format!("no version for {package}") })?;
    Ok((package, version))
}

fn fetch_into(
    root: &Path,
    tmp: &Path,
    package: &str,
    version: &str,
    release: &str,
    id: &str,
    progress: &Progress,
) -> Result<Kernel> {
    let log = cache::log_path(root, "kernel");
    let _ = fs::write(&log, "");
    let dl = tmp.join("download");
    let x = tmp.join("extract");
    cache::mkdirs(&dl)?;
    progress.step(&format!("download {package} {version}"), || {
        tools::run_logged(
            tools::command("apt-get")?
                .current_dir(&dl)
                .args(["download", "-q", &format!("{package}={version}")]),
            "apt-get download",
            &log,
        )
    })?;
    let deb = fs::read_dir(&dl)
        .map_err(ImageError::io("reading download dir"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| ImageError::NotDebian { detail: format!("apt-get download gave no .deb for {package}") })?;
    progress.step("extract kernel package", || {
        tools::run_logged(
            tools::command("dpkg-deb")?.arg("-x").arg(&deb).arg(&x),
            "dpkg-deb -x",
            &log,
        )
    })?;
    let boot = x.join("boot");
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(ImageError::NotDebian { detail: format!("{package} has no boot/vmlinuz-{release}") });
    }
    fs::copy(&vmlinuz, tmp.join("vmlinuz")).map_err(ImageError::io("copying vmlinuz"))?;
    let _ = fs::copy(boot.join(format!("config-{release}")), tmp.join("config"));

    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| x.join(d).join(release))
        .find(|d| d.is_dir())
        .ok_or_else(|| ImageError::NotDebian { detail: format!("{package} has no modules dir") })?;
    let available = index_modules(&moddir)?;
    let builtin: HashSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(Path::new(l)))
        .collect();
    let order = load_order(MODULES, &available, &builtin, release)?;
    let out = tmp.join("modules");
    cache::mkdirs(&out)?;
    for name in &order {
        let bytes = read_module(&available[name])?;
        fs::write(out.join(format!("{name}.ko")), bytes)
            .map_err(ImageError::io(format!("writing module {name}")))?;
    }
    fs::write(out.join("order"), order.iter().map(|m| format!("{m}.ko\n")).collect::<String>())
        .map_err(ImageError::io("writing modules/order"))?;
    let k = Kernel {
        id: id.to_string(),
        release: release.to_string(),
        version: version.to_string(),
        package: package.to_string(),
        modules: order,
        dir: tmp.to_path_buf(),
    };
    fs::write(tmp.join("kernel.json"), serde_json::to_string_pretty(&k).expect("serializes"))
        .map_err(ImageError::io("writing kernel.json"))?;
    cache::remove_tree(&dl)?;
    cache::remove_tree(&x)?;
    Ok(k)
}

/// `virtio_pci.ko`, `crc32c-intel.ko.xz` → `virtio_pci`, `crc32c_intel`.
fn module_name(p: &Path) -> Option<String> {
    let f = p.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|s| f.strip_suffix(s))?;
    Some(stem.replace('-', "_"))
}

/// Module name → file, for every module file under `dir`.
fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut map = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(ImageError::io(format!("reading {}", d.display())))?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = module_name(&p) {
                map.insert(n, p);
            }
        }
    }
    Ok(map)
}

fn read_module(p: &Path) -> Result<Vec<u8>> {
    let name = p.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(p).map_err(ImageError::io(format!("reading {}", p.display())));
    };
    // Decompress on the host: finit_module of a compressed module needs kernel support.
    let out = tools::command(tool)?
        .arg("-dc")
        .arg(p)
        .output()
        .map_err(ImageError::io(format!("running {tool}")))?;
    if !out.status.success() {
        return Err(ImageError::Corrupt { path: p.into(), detail: format!("{tool} -dc failed") });
    }
    Ok(out.stdout)
}

/// Orders `wanted` plus their dependencies so each module comes after what it depends on.
fn load_order(
    wanted: &[&str],
    available: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    release: &str,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        available: &BTreeMap<String, PathBuf>,
        builtin: &HashSet<String>,
        release: &str,
        order: &mut Vec<String>,
        seen: &mut HashSet<String>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = available.get(name) else {
            if builtin.contains(name) {
                return Ok(());
            }
            return Err(ImageError::KernelModuleMissing {
                module: name.to_string(),
                kernel: release.to_string(),
            });
        };
        let bytes = read_module(path)?;
        for dep in modinfo(&bytes, "depends").iter().flat_map(|d| d.split(',')) {
            if !dep.is_empty() {
                visit(&dep.replace('-', "_"), available, builtin, release, order, seen)?;
            }
        }
        order.push(name.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for w in wanted {
        visit(w, available, builtin, release, &mut order, &mut seen)?;
    }
    Ok(order)
}

/// The values of `key` in an ELF64 module's `.modinfo` section (`key=value\0…`).
pub fn modinfo(elf: &[u8], key: &str) -> Vec<String> {
    let section = modinfo_section(elf).unwrap_or(&[]);
    let prefix = format!("{key}=");
    section
        .split(|b| *b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .filter_map(|s| s.strip_prefix(prefix.as_str()))
        .map(str::to_string)
        .collect()
}

fn modinfo_section(elf: &[u8]) -> Option<&[u8]> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| {
        elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    };
    // ELF64, little-endian.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3a)?;
    let shnum = u16_at(0x3c)?;
    let shstrndx = u16_at(0x3e)?;
    let sh = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab_off = u64_at(sh(shstrndx)? + 0x18)?;
    for i in 0..shnum {
        let base = sh(i)?;
        let name_off = u32::from_le_bytes(elf.get(base..base + 4)?.try_into().ok()?) as usize;
        let name = elf.get(strtab_off.checked_add(name_off)?..)?;
        let name = &name[..name.iter().position(|b| *b == 0)?];
        if name == b".modinfo" {
            let off = u64_at(base + 0x18)?;
            let size = u64_at(base + 0x20)?;
            return elf.get(off..off.checked_add(size)?);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_name(Path::new("a/virtio_pci.ko")).as_deref(), Some("virtio_pci"));
        assert_eq!(module_name(Path::new("crc32c-intel.ko.xz")).as_deref(), Some("crc32c_intel"));
        assert_eq!(module_name(Path::new("modules.dep")), None);
    }

    #[test]
    fn modinfo_of_a_host_module() {
        // Any module of the running host kernel will do; skip when there is none.
        let rel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let Ok(map) = index_modules(&Path::new("/lib/modules").join(rel.trim())) else { return };
        let Some((_, p)) = map.iter().find(|(_, p)| p.extension().is_some_and(|e| e == "ko")) else {
            return;
        };
        let bytes = fs::read(p).unwrap();
        assert!(!modinfo(&bytes, "name").is_empty() || !modinfo(&bytes, "vermagic").is_empty());
    }

    #[test]
    fn modinfo_rejects_garbage() {
        assert!(modinfo(b"not an elf", "depends").is_empty());
        assert!(modinfo(b"\x7fELF\x02\x01\x01\x00", "depends").is_empty());
    }

    #[test]
    fn missing_module_is_an_error_builtin_is_not() {
        let avail = BTreeMap::new();
        let builtin: HashSet<String> = ["virtio".to_string()].into();
        assert_eq!(load_order(&["virtio"], &avail, &builtin, "r").unwrap(), Vec::<String>::new());
        let e = load_order(&["erofs"], &avail, &builtin, "r").unwrap_err();
        assert!(matches!(e, ImageError::KernelModuleMissing { .. }));
    }
}
