//! Cache housekeeping: what the cache holds, what uses what, and removing what nothing uses
//! (`supermachine-kernel image list | rm | prune`, and the size budget).
//!
//! ```text
//! kind      where                                uses
//! image     images/<name>/<hash>/                its blobs, guest cache, pip layers, kernel
//! snapshot  snapshots/<name>-<m>m-<c>c-<key>/    the image, kernel and initramfs it was baked on
//! hint      launch-hints/<key>.json              the snapshot it names
//! blob      oci/blobs/sha256/<hex>, oci/guest/<digest>-v*.json
//! layer     layers/pip/<key>/
//! resolve   layers/resolve/<key>.json            (a pip resolution, kept 30 days)
//! kernel    kernels/<id>/                        initrd  initramfs/<key>/
//! leftover  tmp/*, oci/partial/*, .tmp-*/.trash-* entries of interrupted builds and bakes
//! ```
//! Rules, in order:
//! - In use: a file under an entry is open or mapped by a running process (QEMU keeps the root
//!   image open and a snapshot's memory file mapped for the VM's whole life; seen in
//!   /proc/<pid>/{fd,maps}). An entry in use, and everything it uses, is never removed.
//! - Roots are images and snapshots. An image goes when asked (`remove`), when it is an older
//!   version of its name unused for a day, or (not if a kernelspec uses it: `keep`) with `all`
//!   or when unused for `unused_for`. A snapshot goes with its image, when it is stale (the
//!   host could not restore it: another QEMU, command line, image, kernel or initramfs file)
//!   or unused for `unused_for`.
//! - Everything else goes when every entry that used it goes, or (`prune`, not `rm`) when
//!   nothing uses it; the newest kernel and initramfs always stay (a build needs them).
//! - Budget: while the cache is larger, the least recently used image or snapshot goes (never
//!   one in use, nor an image a kernelspec uses), with what only it used.
//!
//! Last used: `<dir>/last-used`'s mtime (touched by every `ensure_image` and snapshot use),
//! else its creation. Builds hold `locks/cache.lock` shared; removing unreferenced blobs,
//! layers and leftovers needs it exclusive (not waited for: while a build runs its fresh blobs
//! are referenced by no image yet, so they are left alone and the report says so).
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::cache::{self, Manifest};
use super::error::Result;
use super::oci;
use super::PRUNE_UNUSED_AFTER;

/// Launch hints and pip resolutions older than this go at every prune.
pub const SMALL_FILES_MAX_AGE: Duration = Duration::from_secs(30 * 86400);
/// A leftover of an interrupted snapshot bake is only removed once this old (bakes do not
/// take the cache lock).
const LEFTOVER_GRACE: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Image,
    Snapshot,
    Hint,
    Blob,
    Layer,
    Resolve,
    Kernel,
    Initrd,
    Leftover,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Snapshot => "snapshot",
            Kind::Hint => "hint",
            Kind::Blob => "blob",
            Kind::Layer => "layer",
            Kind::Resolve => "resolve",
            Kind::Kernel => "kernel",
            Kind::Initrd => "initrd",
            Kind::Leftover => "leftover",
        }
    }
}

/// One thing in the cache.
#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    /// image: `name/hash`; snapshot, hint, layer, kernel, initrd: its file name; blob: digest.
    pub name: String,
    pub path: PathBuf,
    /// Disk usage (allocated blocks: a sparse memory file counts for what it holds).
    pub bytes: u64,
    pub created_unix: u64,
    pub last_used_unix: u64,
    /// A running process has a file of it open or mapped.
    pub in_use: bool,
    /// Why it is removed (filled by [`plan`]).
    pub reason: String,
    /// For a snapshot: the image name it was baked from (its `image` label).
    pub image: Option<String>,
    uses: Vec<PathBuf>,
}

/// What to prune.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    /// Image names some kernelspec uses: their newest version stays (except when in `remove`).
    pub keep: Vec<String>,
    /// Remove these images (every version), their snapshots and what only they used; nothing
    /// else is pruned unless `policy` is set.
    pub remove: Vec<String>,
    /// Apply the prune rules (stale snapshots, old versions, unreferenced blobs and layers,
    /// leftovers, old hints).
    pub policy: bool,
    /// Also remove every image no kernelspec uses.
    pub all: bool,
    /// Also remove images (no kernelspec uses) and snapshots unused this long.
    pub unused_for: Option<Duration>,
    /// Then evict least recently used images and snapshots until the cache is this small.
    pub budget: Option<u64>,
    /// Only report what would go.
    pub dry_run: bool,
    /// Where warm snapshots are (default `<cache>/snapshots`).
    pub snapshots_dir: Option<PathBuf>,
    /// Entries (image or snapshot directories) kept like those in use, with what they use: what
    /// a build just made, when the budget is applied after it.
    pub protect: Vec<PathBuf>,
    /// Where to look for the current guest agent (see `find_agent`): a snapshot whose
    /// initramfs holds another agent is stale.
    pub agent_candidates: Vec<PathBuf>,
}

/// What a prune removed (or would remove).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub removed: Vec<Entry>,
    /// Entries that would have gone but are in use by a running process.
    pub in_use: Vec<Entry>,
    /// Bytes in the cache before.
    pub total_bytes: u64,
    pub freed_bytes: u64,
    pub dry_run: bool,
    /// Things the user should know (skipped sweeps, a budget that could not be met).
    pub notes: Vec<String>,
}

/// Every entry of the cache at `root`, with what it uses and whether it is in use.
pub fn inventory(root: &Path, snapshots_dir: Option<&Path>) -> Vec<Entry> {
    let open = open_files();
    let mut out = Vec::new();
    images(root, &mut out);
    let snaps = snapshots_dir.map(Path::to_path_buf).unwrap_or_else(|| root.join("snapshots"));
    snapshots(&snaps, &mut out);
    files_in(&root.join("launch-hints"), Kind::Hint, &mut out, |p| {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(p).ok()?).ok()?;
        Some(vec![PathBuf::from(v.get("snapshot")?.as_str()?)])
    });
    files_in(&root.join("oci/blobs/sha256"), Kind::Blob, &mut out, |_| Some(vec![]));
    for e in out.iter_mut().filter(|e| e.kind == Kind::Blob) {
        e.name = format!("sha256:{}", e.name);
    }
    files_in(&root.join("oci/guest"), Kind::Blob, &mut out, |_| Some(vec![]));
    files_in(&root.join("layers/pip"), Kind::Layer, &mut out, |_| Some(vec![]));
    files_in(&root.join("layers/resolve"), Kind::Resolve, &mut out, |_| Some(vec![]));
    files_in(&root.join("kernels"), Kind::Kernel, &mut out, |_| Some(vec![]));
    files_in(&root.join("initramfs"), Kind::Initrd, &mut out, |_| Some(vec![]));
    leftovers(root, &snaps, &mut out);
    for e in &mut out {
        let dir = canonical(&e.path);
        e.in_use = open.iter().any(|p| p.starts_with(&dir));
    }
    out
}

impl Entry {
    /// The paths of what it uses (files or entry directories).
    pub fn uses(&self) -> &[PathBuf] {
        &self.uses
    }
}

fn canonical(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A real directory (not a symlink: a cache may borrow another's `kernels/`, and pruning must
/// never reach through it).
fn real_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).map(|m| m.is_dir()).unwrap_or(false)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn mtime(p: &Path) -> Option<u64> {
    fs::symlink_metadata(p).and_then(|m| m.modified()).ok().map(unix)
}

/// Disk usage of `p` (a file or a tree), not following symlinks.
pub fn disk_usage(p: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(p) else { return 0 };
    let mut n = m.blocks() * 512;
    if m.is_dir() {
        if let Ok(rd) = fs::read_dir(p) {
            n += rd.flatten().map(|e| disk_usage(&e.path())).sum::<u64>();
        }
    }
    n
}

fn entry(kind: Kind, name: String, path: PathBuf, created: u64, uses: Vec<PathBuf>) -> Entry {
    let last_used = mtime(&path.join("last-used")).unwrap_or(created);
    Entry {
        kind,
        name,
        bytes: disk_usage(&path),
        created_unix: created,
        last_used_unix: last_used,
        in_use: false,
        reason: String::new(),
        image: None,
        uses,
        path,
    }
}

fn images(root: &Path, out: &mut Vec<Entry>) {
    if !real_dir(&cache::images_dir(root)) {
        return;
    }
    for c in cache::list(root) {
        let mut uses = Vec::new();
        if let Some(r) = oci::record_of(&c.manifest) {
            let digests = [Some(&r.manifest_digest), r.index_digest.as_ref(), Some(&r.config_digest)];
            for d in digests.into_iter().flatten().chain(r.layers.iter()) {
                if let Some(hex) = d.strip_prefix("sha256:") {
                    uses.push(root.join("oci/blobs/sha256").join(hex));
                }
            }
            let guest_prefix = r.manifest_digest.replace(':', "-");
            if let Ok(rd) = fs::read_dir(root.join("oci/guest")) {
                for g in rd.flatten() {
                    if g.file_name().to_string_lossy().starts_with(&guest_prefix) {
                        uses.push(g.path());
                    }
                }
            }
            uses.extend(r.pip_layers.iter().map(|l| root.join("layers/pip").join(&l.key)));
        }
        if let Some(k) = &c.manifest.kernel {
            uses.push(root.join("kernels").join(k));
        }
        let name = format!("{}/{}", c.manifest.name, c.manifest.hash);
        let mut e = entry(Kind::Image, name, c.dir.clone(), c.manifest.created_unix, uses);
        e.image = Some(c.manifest.name.clone());
        out.push(e);
    }
}

fn snapshots(dir: &Path, out: &mut Vec<Entry>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for d in rd.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let path = d.path();
        if name.starts_with('.') || !path.join("metadata.json").is_file() {
            continue;
        }
        let meta: Option<serde_json::Value> =
            fs::read(path.join("metadata.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let get = |k: &str| meta.as_ref().and_then(|m| m.get(k)?.as_str().map(PathBuf::from));
        // A snapshot uses the directories of the files it boots from.
        let uses: Vec<PathBuf> = ["rootfs", "kernel", "initrd"]
            .iter()
            .filter_map(|k| get(k)?.parent().map(Path::to_path_buf))
            .collect();
        let created = meta
            .as_ref()
            .and_then(|m| m.get("created_unix_ms")?.as_u64())
            .map(|ms| ms / 1000)
            .or_else(|| mtime(&path))
            .unwrap_or(0);
        let mut e = entry(Kind::Snapshot, name, path, created, uses);
        e.image = meta.as_ref().and_then(|m| m.pointer("/labels/image")?.as_str().map(String::from));
        out.push(e);
    }
}

/// One entry per file or directory in `dir` (not `.`-prefixed, which are leftovers);
/// `uses_of` gives what it uses (None: skip it).
fn files_in(dir: &Path, kind: Kind, out: &mut Vec<Entry>, uses_of: impl Fn(&Path) -> Option<Vec<PathBuf>>) {
    if !real_dir(dir) {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for f in rd.flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        let path = f.path();
        if name.starts_with('.') {
            continue;
        }
        let uses = uses_of(&path).unwrap_or_default();
        let created = mtime(&path).unwrap_or(0);
        let name = name.strip_suffix(".json").unwrap_or(&name).to_string();
        out.push(entry(kind, name, path, created, uses));
    }
}

fn leftovers(root: &Path, snaps: &Path, out: &mut Vec<Entry>) {
    let mut add = |p: PathBuf| {
        let created = mtime(&p).unwrap_or(0);
        let name = p.strip_prefix(root).unwrap_or(&p).display().to_string();
        out.push(entry(Kind::Leftover, name, p, created, vec![]));
    };
    for dir in [root.join("tmp"), root.join("oci/partial")] {
        if real_dir(&dir) {
            fs::read_dir(&dir).into_iter().flatten().flatten().for_each(|e| add(e.path()));
        }
    }
    let dotted = |dir: &Path| -> Vec<PathBuf> {
        if !real_dir(dir) {
            return vec![];
        }
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(".tmp-") || n.starts_with(".trash-") || (n.starts_with('.') && n.contains(".tmp-"))
            })
            .map(|e| e.path())
            .collect()
    };
    let mut dirs = vec![root.join("layers/pip"), root.join("initramfs"), root.join("kernels"), snaps.to_path_buf()];
    if let Ok(rd) = fs::read_dir(cache::images_dir(root)) {
        dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| real_dir(p)));
    }
    dirs.push(cache::images_dir(root));
    for d in dirs {
        dotted(&d).into_iter().for_each(&mut add);
    }
}

/// Every path a running process of this user has open or mapped (/proc/<pid>/fd, maps).
fn open_files() -> Vec<PathBuf> {
    let mut out = HashSet::new();
    let Ok(procs) = fs::read_dir("/proc") else { return vec![] };
    for p in procs.flatten() {
        let pid = p.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(fds) = fs::read_dir(p.path().join("fd")) {
            for fd in fds.flatten() {
                if let Ok(t) = fs::read_link(fd.path()) {
                    if t.is_absolute() {
                        out.insert(t);
                    }
                }
            }
        }
        if let Ok(maps) = fs::read_to_string(p.path().join("maps")) {
            for line in maps.lines() {
                // address perms offset dev inode path
                if let Some(path) = line.splitn(6, char::is_whitespace).nth(5).map(str::trim_start) {
                    if path.starts_with('/') {
                        out.insert(PathBuf::from(path.trim_end_matches(" (deleted)")));
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// The initramfs key the current agent gets with the kernel in `kernel_dir` (None: no agent
/// found, or not a cached kernel).
fn current_initrd(root: &Path, kernel_dir: &Path, agent: Option<&[u8]>) -> Option<String> {
    let id = kernel_dir.file_name()?.to_string_lossy().into_owned();
    let k = super::kernel::load(root, &id)?;
    super::initrd_key(agent?, &k).ok().map(|(key, _)| key)
}

/// Why snapshot `dir` could not (or should no longer) be restored on this host, if so: a
/// file it boots from is gone or changed, it was taken with another QEMU or command line
/// (None if this host has no QEMU to ask), or its initramfs holds an older agent than
/// `current_initrd` (the key the current agent gets with the snapshot's kernel).
pub fn stale_reason(dir: &Path, current_initrd: &dyn Fn(&Path) -> Option<String>) -> Option<String> {
    let meta = match crate::snapshot::format::read_meta(dir) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    for f in [&meta.rootfs, &meta.kernel].into_iter().chain((!meta.initrd.as_os_str().is_empty()).then_some(&meta.initrd)) {
        if !f.is_file() {
            return Some(format!("{} no longer exists", f.display()));
        }
    }
    if let (Some(kdir), Some(idir)) = (meta.kernel.parent(), meta.initrd.parent()) {
        let have = idir.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(want) = current_initrd(kdir) {
            if have.as_deref() != Some(want.as_str()) {
                return Some(format!("baked with an older guest agent (initramfs {}, now {want})", have.unwrap_or_default()));
            }
        }
    }
    let qemu = crate::qemu::find_qemu().ok()?;
    let snap = crate::snapshot::verified::Snapshot { dir: dir.to_path_buf(), meta };
    snap.check_host(Some(&qemu)).err().map(|e| e.to_string())
}

/// What `opts` removes from the cache at `root`, given its `inventory`; `stale` says why a
/// snapshot is stale (see [`stale_reason`]); `sweep`: unreferenced blobs, layers and build
/// leftovers may go (no build runs). Returns the removed entries' indices with their reasons.
pub fn plan(
    entries: &[Entry],
    opts: &PruneOptions,
    now: u64,
    sweep: bool,
    stale: &dyn Fn(&Entry) -> Option<String>,
) -> (Vec<(usize, String)>, Vec<usize>) {
    let n = entries.len();
    let index: HashMap<PathBuf, usize> =
        entries.iter().enumerate().map(|(i, e)| (canonical(&e.path), i)).collect();
    let uses: Vec<Vec<usize>> = entries
        .iter()
        .map(|e| e.uses.iter().filter_map(|p| index.get(&canonical(p)).copied()).collect())
        .collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, u) in uses.iter().enumerate() {
        for &j in u {
            users[j].push(i);
        }
    }
    // In use, and everything an entry in use uses.
    let mut protected = vec![false; n];
    let asked: HashSet<PathBuf> = opts.protect.iter().map(|p| canonical(p)).collect();
    let mut stack: Vec<usize> =
        (0..n).filter(|&i| entries[i].in_use || asked.contains(&canonical(&entries[i].path))).collect();
    while let Some(i) = stack.pop() {
        if !std::mem::replace(&mut protected[i], true) {
            stack.extend(uses[i].iter().copied());
        }
    }
    let old = |e: &Entry, d: Duration| now.saturating_sub(e.last_used_unix) >= d.as_secs();
    let image_name = |e: &Entry| e.image.clone().unwrap_or_default();
    // The newest version of each image name.
    let mut newest: HashMap<String, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.kind == Kind::Image) {
        let cur = newest.entry(image_name(e)).or_insert(i);
        if entries[*cur].created_unix < e.created_unix {
            *cur = i;
        }
    }
    let kept_by_spec = |i: usize| {
        let e = &entries[i];
        opts.keep.contains(&image_name(e)) && newest.get(&image_name(e)) == Some(&i)
    };
    // Roots the rules remove (before the budget).
    let mut root_reason: Vec<Option<String>> = vec![None; n];
    for (i, e) in entries.iter().enumerate() {
        root_reason[i] = match e.kind {
            Kind::Image if opts.remove.contains(&image_name(e)) => Some("removed".into()),
            Kind::Image if !opts.policy || kept_by_spec(i) => None,
            Kind::Image if opts.all => Some("no kernelspec uses it".into()),
            Kind::Image if opts.unused_for.is_some_and(|d| old(e, d)) => {
                Some(format!("unused for {} days", now.saturating_sub(e.last_used_unix) / 86400))
            }
            Kind::Image if newest.get(&image_name(e)) != Some(&i) && old(e, PRUNE_UNUSED_AFTER) => {
                Some("an older version, unused for a day".into())
            }
            Kind::Snapshot if opts.policy => stale(e).map(|r| format!("stale: {r}")).or_else(|| {
                opts.unused_for
                    .filter(|d| old(e, *d))
                    .map(|_| format!("unused for {} days", now.saturating_sub(e.last_used_unix) / 86400))
            }),
            _ => None,
        };
    }
    let decide = |roots: &[Option<String>]| -> Vec<Option<String>> {
        let mut gone: Vec<Option<String>> = vec![None; n];
        for i in 0..n {
            if !protected[i] {
                gone[i] = roots[i].clone();
            }
        }
        // Dependents first (a snapshot of a removed image, a hint of a removed snapshot), then
        // what only removed entries used; a few passes reach the fixpoint of this shallow graph.
        for _ in 0..4 {
            for i in 0..n {
                let e = &entries[i];
                if protected[i] || gone[i].is_some() {
                    continue;
                }
                let lost = uses[i].iter().find(|&&j| gone[j].is_some());
                gone[i] = match (e.kind, lost) {
                    (Kind::Snapshot | Kind::Hint, Some(&j)) => {
                        Some(format!("its {} {} is removed", entries[j].kind.as_str(), entries[j].name))
                    }
                    (Kind::Hint, None) if opts.policy => {
                        let missing = uses[i].is_empty() && e.uses.iter().any(|p| !p.exists());
                        let aged = old(e, SMALL_FILES_MAX_AGE);
                        (missing || aged).then(|| {
                            if missing { "its snapshot no longer exists" } else { "older than 30 days" }.into()
                        })
                    }
                    (Kind::Blob | Kind::Layer | Kind::Kernel | Kind::Initrd, _) => {
                        let had = !users[i].is_empty();
                        let all_gone = users[i].iter().all(|&u| gone[u].is_some());
                        let newest_of_kind = matches!(e.kind, Kind::Kernel | Kind::Initrd)
                            && entries.iter().filter(|o| o.kind == e.kind).all(|o| o.created_unix <= e.created_unix);
                        if had && all_gone && !newest_of_kind {
                            Some("only removed entries used it".into())
                        } else if !had && opts.policy && sweep && !newest_of_kind {
                            Some("nothing uses it".into())
                        } else {
                            None
                        }
                    }
                    (Kind::Resolve, _) if opts.policy && old(e, SMALL_FILES_MAX_AGE) => {
                        Some("older than 30 days".into())
                    }
                    (Kind::Leftover, _) if opts.policy && (sweep || old(e, LEFTOVER_GRACE)) => {
                        Some("left by an interrupted build".into())
                    }
                    _ => None,
                };
            }
        }
        gone
    };
    let mut roots = root_reason;
    let mut gone = decide(&roots);
    if let Some(budget) = opts.budget {
        let size = |g: &[Option<String>]| -> u64 {
            (0..n).filter(|&i| g[i].is_none()).map(|i| entries[i].bytes).sum()
        };
        let mut candidates: Vec<usize> = (0..n)
            .filter(|&i| matches!(entries[i].kind, Kind::Image | Kind::Snapshot))
            .filter(|&i| !protected[i] && gone[i].is_none() && !kept_by_spec(i))
            .collect();
        candidates.sort_by_key(|&i| (entries[i].last_used_unix, entries[i].created_unix));
        for i in candidates {
            if size(&gone) <= budget {
                break;
            }
            if gone[i].is_some() {
                continue;
            }
            roots[i] = Some(format!("over the cache budget, least recently used"));
            gone = decide(&roots);
        }
    }
    let removed: Vec<(usize, String)> = (0..n).filter_map(|i| gone[i].clone().map(|r| (i, r))).collect();
    // Entries in use that the rules (or the user) would have removed.
    let held: Vec<usize> = (0..n).filter(|&i| protected[i] && roots[i].is_some()).collect();
    (removed, held)
}

/// Prunes the cache at `root` (see the module comment); removes nothing with `dry_run`.
pub fn prune(root: &Path, opts: &PruneOptions) -> Result<Report> {
    // Without waiting: a running build keeps its fresh blobs and scratch trees.
    let sweep_lock = cache::try_exclusive(root, "cache");
    let entries = inventory(root, opts.snapshots_dir.as_deref());
    let build = super::BuildOptions { agent_candidates: opts.agent_candidates.clone(), ..Default::default() };
    let agent = super::find_agent(&build).ok().and_then(|p| fs::read(p).ok());
    let keys = std::sync::Mutex::new(HashMap::<PathBuf, Option<String>>::new());
    let current = |kdir: &Path| -> Option<String> {
        let mut keys = keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.entry(kdir.to_path_buf()).or_insert_with(|| current_initrd(root, kdir, agent.as_deref())).clone()
    };
    let (removed, held) =
        plan(&entries, opts, cache::now_unix(), sweep_lock.is_some(), &|e| stale_reason(&e.path, &current));
    let mut report = Report {
        total_bytes: entries.iter().map(|e| e.bytes).sum(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    if sweep_lock.is_none() && opts.policy {
        report.notes.push(
            "a build is running: blobs, layers and build trees nothing uses yet were left alone; \
             prune again once it is done"
                .into(),
        );
    }
    for (i, reason) in removed {
        let mut e = entries[i].clone();
        e.reason = reason;
        report.freed_bytes += e.bytes;
        report.removed.push(e);
    }
    report.in_use = held.into_iter().map(|i| entries[i].clone()).collect();
    if let Some(budget) = opts.budget {
        let left = report.total_bytes.saturating_sub(report.freed_bytes);
        if left > budget {
            report.notes.push(format!(
                "the cache stays at {:.1} MB, over the budget of {:.1} MB: what is left is in use \
                 by a running VM, run by a kernelspec (`supermachine-kernel image rm NAME` \
                 removes one), or the newest guest kernel and initramfs every build needs",
                left as f64 / 1e6,
                budget as f64 / 1e6
            ));
        }
    }
    // Dependents before what they use; a snapshot before its image.
    report.removed.sort_by_key(|e| (order(e.kind), e.path.clone()));
    if !opts.dry_run {
        for e in &report.removed {
            remove_entry(root, e)?;
        }
    }
    Ok(report)
}

fn order(k: Kind) -> u8 {
    match k {
        Kind::Hint => 0,
        Kind::Snapshot => 1,
        Kind::Image => 2,
        _ => 3,
    }
}

fn remove_entry(root: &Path, e: &Entry) -> Result<()> {
    let Some(parent) = e.path.parent() else { return Ok(()) };
    if !e.path.exists() && fs::symlink_metadata(&e.path).is_err() {
        return Ok(());
    }
    // Renamed first, so nothing half-deleted is ever found under its name.
    let file = e.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let trash = match e.kind {
        Kind::Leftover => e.path.clone(),
        _ => parent.join(format!(".trash-{file}-{}", std::process::id())),
    };
    if trash != e.path {
        cache::publish(&e.path, &trash)?;
    }
    cache::remove_tree(&trash)?;
    // An image name whose last version went leaves no empty directory behind.
    if e.kind == Kind::Image && parent.starts_with(cache::images_dir(root)) {
        let _ = fs::remove_dir(parent);
    }
    Ok(())
}

/// `manifest.json`'s view of an image for `image list`: its reference and digest.
pub fn reference_and_digest(m: &Manifest) -> (String, String) {
    match oci::record_of(m) {
        Some(r) => (r.reference, r.manifest_digest),
        None => {
            let reference = m.source.strip_prefix("recipe:").or_else(|| m.source.strip_prefix("dir:"));
            (reference.unwrap_or(&m.source).to_string(), format!("recipe:{}", m.hash))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: Kind, name: &str, last_used: u64, uses: &[&str]) -> Entry {
        Entry {
            kind,
            name: name.into(),
            path: PathBuf::from(format!("/c/{name}")),
            bytes: 100,
            created_unix: last_used,
            last_used_unix: last_used,
            in_use: false,
            reason: String::new(),
            image: (kind == Kind::Image).then(|| name.split('/').next().unwrap().to_string()),
            uses: uses.iter().map(|u| PathBuf::from(format!("/c/{u}"))).collect(),
        }
    }

    fn names(entries: &[Entry], r: &[(usize, String)]) -> Vec<String> {
        let mut v: Vec<String> = r.iter().map(|(i, _)| entries[*i].name.clone()).collect();
        v.sort();
        v
    }

    const NOW: u64 = 100 * 86400;

    fn cache() -> Vec<Entry> {
        vec![
            e(Kind::Image, "a/1", NOW - 10, &["b1", "b2", "l1"]),
            e(Kind::Image, "b/1", NOW - 2 * 86400, &["b2", "b3"]),
            e(Kind::Snapshot, "s-a", NOW - 10, &["a/1"]),
            e(Kind::Snapshot, "s-b", NOW - 3 * 86400, &["b/1"]),
            e(Kind::Snapshot, "s-old-qemu", NOW - 10, &["a/1"]),
            e(Kind::Hint, "h-b", NOW - 10, &["s-b"]),
            e(Kind::Blob, "b1", NOW, &[]),
            e(Kind::Blob, "b2", NOW, &[]),
            e(Kind::Blob, "b3", NOW, &[]),
            e(Kind::Blob, "orphan", NOW, &[]),
            e(Kind::Layer, "l1", NOW, &[]),
        ]
    }

    fn stale(e: &Entry) -> Option<String> {
        (e.name == "s-old-qemu").then(|| "QEMU version".into())
    }

    #[test]
    fn prune_removes_stale_and_unreferenced_keeps_referenced() {
        let c = cache();
        let opts = PruneOptions { policy: true, ..Default::default() };
        let (r, held) = plan(&c, &opts, NOW, true, &stale);
        assert_eq!(names(&c, &r), ["orphan", "s-old-qemu"]);
        assert!(held.is_empty());
        // While a build runs, unreferenced blobs stay.
        let (r, _) = plan(&c, &opts, NOW, false, &stale);
        assert_eq!(names(&c, &r), ["s-old-qemu"]);
    }

    #[test]
    fn rm_takes_snapshots_hints_and_what_only_it_used() {
        let c = cache();
        let opts = PruneOptions { remove: vec!["b".into()], ..Default::default() };
        let (r, _) = plan(&c, &opts, NOW, true, &stale);
        // b2 is shared with a; the orphan and the stale snapshot are not rm's business.
        assert_eq!(names(&c, &r), ["b/1", "b3", "h-b", "s-b"]);
    }

    #[test]
    fn all_and_unused_for_spare_kernelspec_images() {
        let c = cache();
        let opts = PruneOptions { policy: true, all: true, keep: vec!["a".into()], ..Default::default() };
        let (r, _) = plan(&c, &opts, NOW, true, &stale);
        assert_eq!(names(&c, &r), ["b/1", "b3", "h-b", "orphan", "s-b", "s-old-qemu"]);
        let opts = PruneOptions {
            policy: true,
            unused_for: Some(Duration::from_secs(2 * 86400)),
            ..Default::default()
        };
        let (r, _) = plan(&c, &opts, NOW, true, &|_| None);
        assert_eq!(names(&c, &r), ["b/1", "b3", "h-b", "orphan", "s-b"]);
    }

    #[test]
    fn budget_evicts_least_recently_used_first_and_never_in_use() {
        let mut c = cache();
        // 11 entries of 100 bytes; a budget of 900 needs two gone: b's snapshot (oldest) and
        // its hint, which goes with it.
        let opts = PruneOptions { budget: Some(900), ..Default::default() };
        let (r, _) = plan(&c, &opts, NOW, true, &|_| None);
        assert_eq!(names(&c, &r), ["h-b", "s-b"]);
        // 700: then image b (next least recent) with its only blob.
        let opts = PruneOptions { budget: Some(700), ..Default::default() };
        let (r, _) = plan(&c, &opts, NOW, true, &|_| None);
        assert_eq!(names(&c, &r), ["b/1", "b3", "h-b", "s-b"]);
        // b's snapshot in use: it and its image stay; a's snapshots go instead.
        c[3].in_use = true;
        let (r, held) = plan(&c, &opts, NOW, true, &|_| None);
        assert!(!names(&c, &r).contains(&"s-b".to_string()));
        assert!(!names(&c, &r).contains(&"b/1".to_string()));
        assert!(names(&c, &r).contains(&"s-a".to_string()));
        assert!(held.is_empty());
    }

    #[test]
    fn protected_entries_stay_like_those_in_use() {
        let c = cache();
        let opts = PruneOptions { budget: Some(700), protect: vec![PathBuf::from("/c/s-b")], ..Default::default() };
        let (r, _) = plan(&c, &opts, NOW, true, &|_| None);
        let gone = names(&c, &r);
        assert!(!gone.contains(&"s-b".to_string()) && !gone.contains(&"b/1".to_string()), "{gone:?}");
        assert!(gone.contains(&"a/1".to_string()));
    }

    #[test]
    fn an_in_use_snapshot_survives_even_stale() {
        let mut c = cache();
        c[4].in_use = true;
        let opts = PruneOptions { policy: true, all: true, ..Default::default() };
        let (r, held) = plan(&c, &opts, NOW, true, &stale);
        let gone = names(&c, &r);
        assert!(!gone.contains(&"s-old-qemu".to_string()));
        // Its image stays with it, and what the image uses.
        assert!(!gone.contains(&"a/1".to_string()) && !gone.contains(&"b1".to_string()));
        assert_eq!(held.iter().map(|&i| c[i].name.as_str()).collect::<Vec<_>>(), ["a/1", "s-old-qemu"]);
    }

    #[test]
    fn disk_usage_counts_allocated_blocks() {
        let d = std::env::temp_dir().join(format!("smk-hk-du-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("a"), vec![1u8; 10000]).unwrap();
        let f = fs::File::create(d.join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        let n = disk_usage(&d);
        assert!(n >= 10000 && n < 1 << 20, "{n}");
        fs::remove_dir_all(&d).unwrap();
    }
}
