//! Applying image layers (tar, gzip or zstd) to a build directory, as an overlay filesystem
//! would see them stacked.
//!
//! Per entry: whiteouts (`.wh.NAME` removes NAME of a lower layer, `.wh..wh..opq` empties its
//! directory of lower layers' entries), directories, regular files, symlinks and hard links
//! with their mode (incl. setuid/setgid/sticky), uid/gid (as given; needs root), PAX
//! `SCHILY.xattr.*` extended attributes and mtime. Device nodes and FIFOs are skipped (the
//! guest's /dev is devtmpfs) and counted in one log line per layer.
//!
//! Containment: nothing is ever written outside the build directory. Entry paths are taken
//! relative to it (a leading `/` is dropped); an entry with a `..` component is skipped. Every
//! parent component is looked up with lstat inside the root: a symlinked parent is resolved
//! *within* the root (an absolute target counts from the root, `..` stops at the root), as the
//! guest would see it, so a layer cannot reach the host through a symlink planted by a lower
//! layer or by itself. The final component is never followed: it is replaced. Symlinks are
//! stored as given (absolute ones are relative to the guest's root) and hard-link targets are
//! resolved the same way, so a link can only name a file inside the root.
use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Symlinks followed while resolving one path before giving up (as Linux's ELOOP).
const MAX_SYMLINK_HOPS: usize = 40;

#[derive(Debug)]
pub enum UnpackError {
    /// The layer's media type is not a tar layer we can apply.
    UnsupportedMediaType { layer: String, media_type: String },
    /// The layer stream ends early or its compression is corrupt.
    Truncated { layer: String, detail: String },
    /// The layer is not a valid tar archive.
    BadTar { layer: String, detail: String },
    /// A path in the layer resolves through too many symlinks, or through a file.
    BadPath { layer: String, path: String, detail: String },
    /// Writing to the build directory failed.
    Io { context: String, source: io::Error },
}

impl fmt::Display for UnpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnpackError::UnsupportedMediaType { layer, media_type } => write!(
                f,
                "layer {layer} has media type {media_type:?}, which is not a tar layer (plain, \
                 gzip or zstd); encrypted or foreign layers are not supported"
            ),
            UnpackError::Truncated { layer, detail } => write!(
                f,
                "layer {layer} is truncated or its compression is damaged ({detail}); the image \
                 was published broken or the blob is damaged: rebuild or re-push the image"
            ),
            UnpackError::BadTar { layer, detail } => write!(
                f,
                "layer {layer} is not a valid tar archive ({detail}); rebuild or re-push the image"
            ),
            UnpackError::BadPath { layer, path, detail } => {
                write!(f, "layer {layer}: cannot place {path:?}: {detail}")
            }
            UnpackError::Io { context, source } => {
                write!(f, "{context}: {source}")?;
                if source.raw_os_error() == Some(libc::ENOSPC) {
                    write!(f, " (free disk space and retry)")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for UnpackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UnpackError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> UnpackError {
    let context = context.into();
    move |source| UnpackError::Io { context, source }
}

/// What applying one layer did, for the log.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
    /// Entries with `..` components (never written).
    pub escapes_skipped: Vec<String>,
    /// Device nodes and FIFOs (never created).
    pub devices_skipped: Vec<String>,
    /// Extended attributes the build directory's filesystem refused.
    pub xattrs_failed: Vec<String>,
}

/// Layer media types we apply (the compression is taken from the stream's magic bytes).
pub fn is_layer_media_type(m: &str) -> bool {
    matches!(
        m,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | ""
    )
}

/// Opens a layer blob as a tar stream, decompressing gzip or zstd by their magic bytes.
fn open_layer(path: &Path, layer: &str) -> Result<Box<dyn Read>, UnpackError> {
    let mut f = BufReader::new(File::open(path).map_err(io_err(format!("opening layer {layer}")))?);
    let head = {
        use std::io::BufRead;
        f.fill_buf().map_err(io_err(format!("reading layer {layer}")))?.get(..4).map(<[u8]>::to_vec)
    };
    Ok(match head.as_deref() {
        Some([0x1f, 0x8b, ..]) => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => Box::new(
            zstd::stream::read::Decoder::with_buffer(f)
                .map_err(io_err(format!("opening zstd layer {layer}")))?,
        ),
        _ => Box::new(f),
    })
}

/// The build directory layers are applied to.
pub struct Root {
    dir: PathBuf,
    /// Paths (relative, resolved) written by the layer being applied: whiteouts and opaque
    /// markers only remove what lower layers put there.
    this_layer: HashSet<PathBuf>,
    /// Directories whose metadata is set once the layer is done (their children change mtime).
    dirs: Vec<(PathBuf, Meta)>,
    is_root: bool,
}

#[derive(Clone, Debug)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Outcome of resolving a parent path inside the root.
enum Parent {
    Dir(PathBuf),
    /// A component is a `..` or the path is empty: skip the entry.
    Skip,
}

impl Root {
    /// `dir` must exist; layers are applied in order with [`Root::apply`].
    pub fn new(dir: &Path) -> Result<Root, UnpackError> {
        let meta = fs::symlink_metadata(dir).map_err(io_err(format!("opening {}", dir.display())))?;
        if !meta.is_dir() {
            return Err(UnpackError::Io {
                context: format!("{} is not a directory", dir.display()),
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        // SAFETY: geteuid has no preconditions.
        let is_root = unsafe { libc::geteuid() } == 0;
        Ok(Root { dir: dir.to_path_buf(), this_layer: HashSet::new(), dirs: Vec::new(), is_root })
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.dir.join(rel)
    }

    /// Applies the layer blob at `path` (`layer` names it in messages).
    pub fn apply(&mut self, path: &Path, media_type: &str, layer: &str) -> Result<LayerStats, UnpackError> {
        if !is_layer_media_type(media_type) {
            return Err(UnpackError::UnsupportedMediaType {
                layer: layer.into(),
                media_type: media_type.into(),
            });
        }
        self.this_layer.clear();
        self.dirs.clear();
        let reader = open_layer(path, layer)?;
        let mut ar = tar::Archive::new(reader);
        let mut stats = LayerStats::default();
        let stream_err = |e: io::Error| match e.kind() {
            _ if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("unexpected EOF") => {
                UnpackError::Truncated { layer: layer.into(), detail: e.to_string() }
            }
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::Other => {
                UnpackError::BadTar { layer: layer.into(), detail: e.to_string() }
            }
            _ => UnpackError::Io { context: format!("reading layer {layer}"), source: e },
        };
        for entry in ar.entries().map_err(stream_err)? {
            let entry = entry.map_err(stream_err)?;
            stats.entries += 1;
            self.entry(entry, layer, &mut stats, &stream_err)?;
        }
        // Read what follows the end-of-archive blocks: a damaged gzip/zstd trailer (or a stream
        // cut inside it) shows up only here.
        io::copy(&mut ar.into_inner(), &mut io::sink()).map_err(stream_err)?;
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, meta) in &dirs {
            // A later entry of this layer may have replaced the directory, or one of its
            // parents, by a symlink: then the path could lead out of the root. Skip it.
            if self.is_real_dir_path(rel) {
                self.set_meta(rel, meta, false, &mut stats)?;
            }
        }
        if !stats.devices_skipped.is_empty() {
            log(&format!(
                "layer {layer}: skipped {} device node(s)/FIFO(s) (the guest's /dev is devtmpfs): {}",
                stats.devices_skipped.len(),
                sample(&stats.devices_skipped)
            ));
        }
        if !stats.escapes_skipped.is_empty() {
            log(&format!(
                "layer {layer}: skipped {} entr(y/ies) with '..' in their path (never written): {}",
                stats.escapes_skipped.len(),
                sample(&stats.escapes_skipped)
            ));
        }
        if !stats.xattrs_failed.is_empty() {
            log(&format!(
                "layer {layer}: the build directory's filesystem refused {} extended attribute(s): {}",
                stats.xattrs_failed.len(),
                sample(&stats.xattrs_failed)
            ));
        }
        Ok(stats)
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<R>,
        layer: &str,
        stats: &mut LayerStats,
        stream_err: &dyn Fn(io::Error) -> UnpackError,
    ) -> Result<(), UnpackError> {
        let raw = entry.path().map_err(stream_err)?.into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let Some((parent_parts, name)) = split(&raw) else {
            if raw.components().any(|c| c == Component::ParentDir) {
                stats.escapes_skipped.push(shown);
            }
            return Ok(()); // "./" or "/" itself: the root's own metadata is ours.
        };
        let parent = match self.resolve_dir(&parent_parts, true, layer, &shown)? {
            Parent::Dir(p) => p,
            Parent::Skip => return Ok(()),
        };
        let kind = entry.header().entry_type();
        let name_bytes = name.as_bytes();
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            stats.whiteouts += 1;
            if hidden == b".wh..opq" {
                self.opaque(&parent)?;
            } else if !matches!(hidden, b"" | b"." | b"..") {
                let target = parent.join(OsStr::from_bytes(hidden));
                if !self.this_layer.contains(&target) {
                    self.remove(&target)?;
                }
            }
            return Ok(());
        }
        let rel = parent.join(&name);
        let meta = Meta {
            mode: entry.header().mode().map_err(stream_err)? & 0o7777,
            uid: entry.header().uid().map_err(stream_err)?,
            gid: entry.header().gid().map_err(stream_err)?,
            mtime: entry.header().mtime().unwrap_or(0),
            xattrs: xattrs(&mut entry).map_err(stream_err)?,
        };
        let abs = self.abs(&rel);
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove(&rel)?;
                        mkdir(&abs)?;
                    }
                    Err(_) => mkdir(&abs)?,
                }
                self.dirs.push((rel.clone(), meta));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.remove(&rel)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&abs)
                    .map_err(io_err(format!("creating {}", abs.display())))?;
                io::copy(&mut entry, &mut f).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
                    | io::ErrorKind::Other => stream_err(e),
                    _ => UnpackError::Io { context: format!("writing {}", abs.display()), source: e },
                })?;
                drop(f);
                self.set_meta(&rel, &meta, false, stats)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(stream_err)?
                    .ok_or_else(|| UnpackError::BadTar { layer: layer.into(), detail: format!("symlink {shown} has no target") })?
                    .into_owned();
                self.remove(&rel)?;
                std::os::unix::fs::symlink(&target, &abs).map_err(io_err(format!("creating symlink {}", abs.display())))?;
                self.set_meta(&rel, &meta, true, stats)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(stream_err)?
                    .ok_or_else(|| UnpackError::BadTar { layer: layer.into(), detail: format!("hard link {shown} has no target") })?
                    .into_owned();
                let Some((tparts, tname)) = split(&target) else {
                    stats.escapes_skipped.push(format!("{shown} -> {}", target.display()));
                    return Ok(());
                };
                let tparent = match self.resolve_dir(&tparts, false, layer, &shown)? {
                    Parent::Dir(p) => p,
                    Parent::Skip => {
                        stats.escapes_skipped.push(format!("{shown} -> {}", target.display()));
                        return Ok(());
                    }
                };
                let tabs = self.abs(&tparent.join(&tname));
                match fs::symlink_metadata(&tabs) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(UnpackError::BadPath {
                            layer: layer.into(),
                            path: shown,
                            detail: format!("its hard-link target {} is missing or a directory", target.display()),
                        })
                    }
                }
                if tabs != abs {
                    self.remove(&rel)?;
                    // link(2) does not follow a symlink as its source.
                    fs::hard_link(&tabs, &abs).map_err(io_err(format!("linking {}", abs.display())))?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                stats.devices_skipped.push(shown);
                return Ok(());
            }
            // PAX/GNU headers are consumed by the tar crate; anything else is not a file.
            _ => return Ok(()),
        }
        self.this_layer.insert(rel);
        Ok(())
    }

    /// Resolves `parts` to a real directory inside the root (symlinks followed within the root),
    /// creating missing directories when `create`.
    fn resolve_dir(&self, parts: &[OsString], create: bool, layer: &str, shown: &str)
        -> Result<Parent, UnpackError>
    {
        let mut todo: std::collections::VecDeque<OsString> = parts.iter().cloned().collect();
        let mut at = PathBuf::new();
        let mut hops = 0;
        let bad = |detail: String| UnpackError::BadPath { layer: layer.into(), path: shown.into(), detail };
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                at.pop(); // within a symlink target only; entry paths with '..' never get here
                continue;
            }
            if c == "." || c.is_empty() {
                continue;
            }
            let next = at.join(&c);
            match fs::symlink_metadata(self.abs(&next)) {
                Ok(m) if m.is_dir() => at = next,
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(bad("too many levels of symbolic links".into()));
                    }
                    let target = fs::read_link(self.abs(&next)).map_err(io_err(format!("reading symlink {}", next.display())))?;
                    if target.is_absolute() {
                        at = PathBuf::new();
                    }
                    let comps: Vec<OsString> = target
                        .components()
                        .filter_map(|c| match c {
                            Component::Normal(n) => Some(n.to_os_string()),
                            Component::ParentDir => Some("..".into()),
                            _ => None,
                        })
                        .collect();
                    for c in comps.into_iter().rev() {
                        todo.push_front(c);
                    }
                }
                Ok(_) => {
                    return Err(bad(format!("/{} is not a directory", next.display())));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    mkdir(&self.abs(&next))?;
                    at = next;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Parent::Skip),
                Err(e) => return Err(io_err(format!("looking up {}", next.display()))(e)),
            }
        }
        Ok(Parent::Dir(at))
    }

    /// Whether every component of `rel` is a real directory (no symlink on the way).
    fn is_real_dir_path(&self, rel: &Path) -> bool {
        let mut at = self.dir.clone();
        rel.components().all(|c| {
            at.push(c);
            fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir())
        })
    }

    /// Removes `rel` (a file, symlink or whole directory) if it exists; never follows it.
    fn remove(&self, rel: &Path) -> Result<(), UnpackError> {
        let abs = self.abs(rel);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&abs),
            Ok(_) => fs::remove_file(&abs),
            Err(_) => Ok(()),
        }
        .map_err(io_err(format!("removing {}", abs.display())))
    }

    /// Empties directory `rel` of everything this layer did not write.
    fn opaque(&self, rel: &Path) -> Result<(), UnpackError> {
        let abs = self.abs(rel);
        let rd = fs::read_dir(&abs).map_err(io_err(format!("reading {}", abs.display())))?;
        for e in rd {
            let e = e.map_err(io_err(format!("reading {}", abs.display())))?;
            let child = rel.join(e.file_name());
            if !self.this_layer.contains(&child) {
                self.remove(&child)?;
            }
        }
        Ok(())
    }

    fn set_meta(&self, rel: &Path, m: &Meta, symlink: bool, stats: &mut LayerStats) -> Result<(), UnpackError> {
        let abs = self.abs(rel);
        let c = cpath(&abs)?;
        if self.is_root {
            std::os::unix::fs::lchown(&abs, Some(m.uid as u32), Some(m.gid as u32))
                .map_err(io_err(format!("setting the owner of {}", abs.display())))?;
        }
        if !symlink {
            // After chown, which clears setuid/setgid; through a descriptor opened without
            // following a symlink (chmod(2) would follow one).
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&abs)
                .and_then(|f| f.set_permissions(fs::Permissions::from_mode(m.mode)))
                .map_err(io_err(format!("setting the mode of {}", abs.display())))?;
            for (k, v) in &m.xattrs {
                let Ok(key) = CString::new(k.as_bytes()) else { continue };
                // SAFETY: c and key are NUL-terminated; v is a valid buffer of v.len() bytes;
                // lsetxattr does not follow a symlink.
                let r = unsafe { libc::lsetxattr(c.as_ptr(), key.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
                if r != 0 {
                    stats.xattrs_failed.push(format!("{} on /{}", k.to_string_lossy(), rel.display()));
                }
            }
        }
        let t = libc::timespec { tv_sec: m.mtime as libc::time_t, tv_nsec: 0 };
        let times = [t, t];
        // SAFETY: c is NUL-terminated, times points at two timespecs; AT_SYMLINK_NOFOLLOW
        // sets the link's own time.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        if r != 0 {
            return Err(io_err(format!("setting the mtime of {}", abs.display()))(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Splits an entry path into its parent components and final name; None for the root itself
/// or a path with a `..` component.
fn split(p: &Path) -> Option<(Vec<OsString>, OsString)> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_os_string()),
            Component::ParentDir => return None,
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let name = parts.pop()?;
    Some((parts, name))
}

fn xattrs<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Vec<(OsString, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                out.push((OsStr::from_bytes(name).to_os_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

fn mkdir(abs: &Path) -> Result<(), UnpackError> {
    fs::DirBuilder::new().mode(0o755).create(abs).map_err(io_err(format!("creating {}", abs.display())))
}

fn cpath(p: &Path) -> Result<CString, UnpackError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| UnpackError::Io {
        context: format!("{} contains a NUL byte", p.display()),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn sample(v: &[String]) -> String {
    let mut s = v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > 5 {
        s.push_str(", ...");
    }
    s
}

fn log(line: &str) {
    eprintln!("[oci] {line}");
}
