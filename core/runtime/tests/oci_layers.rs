//! OCI layer application and local image sources, without a registry: layers built here
//! entry by entry (whiteouts, opaque dirs, links, modes, xattrs, hostile paths), OCI layout
//! directories, OCI archives and `docker save` tarballs, and the erofs build from them.
mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::json;
use supermachine_runtime::image::oci::{self, OciBuildOptions, OciError, Root, StoreError, UnpackError};
use support::*;

fn apply_all(layers: &[(Vec<u8>, &str)], root: &Path, scratch: &Path) -> Vec<oci::LayerStats> {
    let mut r = Root::new(root).unwrap();
    layers
        .iter()
        .enumerate()
        .map(|(i, (bytes, media))| {
            let p = scratch.join(format!("layer{i}"));
            fs::write(&p, bytes).unwrap();
            r.apply(&p, media, &format!("{i}")).unwrap()
        })
        .collect()
}

#[test]
fn layers_stack_with_whiteouts_opaque_dirs_links_and_metadata() {
    let t = TempDir::new("stack");
    let (root, outside) = (t.path().join("root"), t.path().join("outside"));
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let stats = apply_all(&sample_layers(&outside), &root, t.path());
    // Whiteouts and the opaque directory remove what lower layers had, not this layer's files.
    assert!(!root.join("var/gone").exists() && !root.join("var/cache").exists());
    let mut app: Vec<_> = fs::read_dir(root.join("opt/app")).unwrap().map(|e| e.unwrap().file_name()).collect();
    app.sort();
    assert_eq!(app, ["new"]);
    assert_eq!(fs::metadata(root.join("opt/app")).unwrap().mode() & 0o7777, 0o750);
    assert_eq!(stats[1].whiteouts, 3);
    // A file written through a symlinked parent lands where the symlink points, inside the root.
    assert_eq!(fs::read(root.join("usr/bin/from-link")).unwrap(), b"via the bin symlink");
    assert_eq!(fs::read_link(root.join("bin")).unwrap(), Path::new("usr/bin"));
    // Modes (setuid), owners, mtime, xattrs, hard links, relative symlinks.
    let su = fs::symlink_metadata(root.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!((su.uid(), su.gid()), (1234, 5678));
    }
    assert_eq!(su.mtime(), 1_234_567_890);
    assert_eq!(fs::symlink_metadata(root.join("usr/bin/su-link")).unwrap().ino(), su.ino());
    assert_eq!(fs::symlink_metadata(root.join("usr/bin/python3")).unwrap().mtime(), 1_500_000_000);
    assert_eq!(fs::read_link(root.join("usr/bin/python")).unwrap(), Path::new("python3"));
    let mut buf = [0u8; 16];
    let c = std::ffi::CString::new(root.join("usr/bin/su").to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of buf.len() bytes.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), c"user.smk".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if stats[1].xattrs_failed.is_empty() {
        assert_eq!(&buf[..n as usize], b"hello");
    }
}

#[test]
fn hostile_paths_never_leave_the_build_directory() {
    let t = TempDir::new("escape");
    let (root, outside) = (t.path().join("sandbox/root"), t.path().join("outside"));
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let stats = apply_all(&sample_layers(&outside), &root, t.path());
    let hostile = &stats[2];
    // Nothing was written next to or above the root, nor through the absolute symlink.
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "wrote through a symlink to the host");
    assert_eq!(fs::read_dir(t.path().join("sandbox")).unwrap().count(), 1, "wrote beside the root");
    assert!(!t.path().join("escape-dotdot").exists() && !t.path().join("escape-nested").exists());
    // `..` entries are skipped; absolute paths and symlinked parents resolve inside the root.
    assert_eq!(hostile.escapes_skipped.len(), 3, "{:?}", hostile.escapes_skipped);
    assert_eq!(fs::read(root.join("abs-file")).unwrap(), b"contained");
    assert_eq!(fs::read(root.join("up-file")).unwrap(), b"contained");
    let outside_str = outside.display().to_string();
    assert_eq!(fs::read_link(root.join("evil")).unwrap().display().to_string(), outside_str);
    assert_eq!(fs::read(root.join(outside_str.trim_start_matches('/')).join("pwned")).unwrap(), b"no");
    // Device nodes and FIFOs are not created.
    assert_eq!(hostile.devices_skipped, ["dev-null", "a-fifo"]);
    assert!(fs::symlink_metadata(root.join("dev-null")).is_err());
}

#[test]
fn a_directory_replaced_by_a_symlink_in_the_same_layer_is_not_followed() {
    let t = TempDir::new("swap");
    let (root, outside) = (t.path().join("root"), t.path().join("outside"));
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(outside.join("b")).unwrap();
    fs::set_permissions(outside.join("b"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let before = fs::metadata(outside.join("b")).unwrap();
    // `a/` and `a/b/` get their metadata at the end of the layer; by then `a` is a symlink
    // to a host directory that has a `b`.
    let layer = LayerBuilder::new()
        .dir("a/", 0o755)
        .dir("a/b/", 0o777)
        .symlink("a", &outside.display().to_string())
        .finish();
    apply_all(&[(layer, TAR)], &root, t.path());
    let after = fs::metadata(outside.join("b")).unwrap();
    assert_eq!(after.mode(), before.mode(), "host directory's mode changed");
    assert_eq!(after.mtime(), before.mtime(), "host directory's mtime changed");
    assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    assert!(fs::symlink_metadata(root.join("a")).unwrap().file_type().is_symlink());
}

#[test]
fn truncated_and_foreign_layers_are_errors() {
    let t = TempDir::new("trunc");
    let root = t.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let big: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let tar = LayerBuilder::new().file("big", &big).finish();
    let mut r = Root::new(&root).unwrap();
    for (name, bytes) in [("gz", gzip(&tar)), ("zst", zstd(&tar)), ("tar", tar.clone())] {
        let cut = &bytes[..bytes.len() / 2];
        let p = t.path().join(name);
        fs::write(&p, cut).unwrap();
        let e = r.apply(&p, GZIP, name).unwrap_err();
        assert!(matches!(e, UnpackError::Truncated { .. }), "{name}: {e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    let p = t.path().join("ok");
    fs::write(&p, &tar).unwrap();
    let e = r.apply(&p, "application/vnd.oci.image.layer.v1.tar+encrypted", "enc").unwrap_err();
    assert!(matches!(e, UnpackError::UnsupportedMediaType { .. }), "{e}");
}

fn opts(cache: &Path) -> OciBuildOptions {
    OciBuildOptions { cache_dir: Some(cache.to_path_buf()), progress: false, ..Default::default() }
}

/// A layout with the sample image for amd64 and a different one for arm64, under one index.
fn multi_platform_layout(dir: &Path, outside: &Path) -> Layout {
    let mut l = Layout::new(dir);
    let amd = l.image(
        "amd64",
        &sample_layers(outside),
        json!({"Env": ["PATH=/usr/bin", "LANG=C.UTF-8"], "WorkingDir": "/opt/app", "User": "1000:100", "Cmd": ["python3"]}),
    );
    let arm = l.image("arm64", &[(gzip(&LayerBuilder::new().file("arm", b"arm").finish()), GZIP)], json!({}));
    let idx = l.index(&[arm, amd.clone()]);
    l.tag(&idx, "multi").tag(&amd, "single");
    l
}

fn extract(erofs: &Path, to: &Path) {
    let out = std::process::Command::new(support::require("fsck.erofs", "erofs-utils"))
        .arg(format!("--extract={}", to.display()))
        .arg(erofs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn layout_index_builds_the_amd64_erofs_and_records_the_config() {
    let t = TempDir::new("layout");
    let outside = t.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    multi_platform_layout(&t.path().join("layout"), &outside);
    let cache = t.path().join("cache");
    let img = oci::build(&format!("oci:{}:multi", t.path().join("layout").display()), &opts(&cache)).unwrap();
    assert_eq!(img.name, "layout-multi");
    assert!(img.record.index_digest.is_some());
    let c = &img.record.config;
    assert_eq!((c.working_dir.as_deref(), c.user.as_deref()), (Some("/opt/app"), Some("1000:100")));
    assert_eq!(c.env, ["PATH=/usr/bin", "LANG=C.UTF-8"]);
    assert_eq!(c.cmd, ["python3"]);
    let x = t.path().join("x");
    extract(&img.rootfs, &x);
    assert_eq!(fs::read(x.join("usr/bin/from-link")).unwrap(), b"via the bin symlink");
    assert!(!x.join("arm").exists(), "the arm64 image was applied");
    assert!(!x.join("var/gone").exists());
    // The image is in the cache's listing, and its blobs in the shared store.
    let listed = supermachine_runtime::image::list_images(Some(&cache));
    assert!(listed.iter().any(|i| i.name == "layout-multi" && i.source.starts_with("oci:")), "{listed:?}");
    // A second build of the same image (another tag naming the same manifest) reuses the store;
    // the same tag again is a cache hit on the rootfs.
    let again = oci::build(&format!("oci:{}:multi", t.path().join("layout").display()), &opts(&cache)).unwrap();
    assert_eq!((again.hash, again.record), (img.hash.clone(), img.record.clone()));
    let single = oci::build(&format!("oci:{}:single", t.path().join("layout").display()), &opts(&cache)).unwrap();
    assert_eq!(single.record.manifest_digest, img.record.manifest_digest);
    let e = oci::build(&format!("oci:{}:nope", t.path().join("layout").display()), &opts(&cache)).unwrap_err();
    assert!(e.to_string().contains("multi") && e.to_string().contains("single"), "{e}");
}

#[test]
fn tampered_blob_is_refused_and_nothing_cached() {
    let t = TempDir::new("tamper");
    let outside = t.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let l = multi_platform_layout(&t.path().join("layout"), &outside);
    // Flip one byte of the amd64 image's first layer.
    let layer = sample_layers(&outside).remove(0).0;
    let p = l.blob_path(&sha256(&layer));
    let mut bytes = fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&p, &bytes).unwrap();
    let cache = t.path().join("cache");
    let e = oci::build(&format!("oci:{}:multi", l.dir.display()), &opts(&cache)).unwrap_err();
    assert!(matches!(e, OciError::Store(StoreError::DigestMismatch { .. })), "{e}");
    assert!(e.to_string().contains("nothing was cached"), "{e}");
    assert!(!cache.join("oci/blobs/sha256").join(sha256(&layer).trim_start_matches("sha256:")).exists());
    assert_eq!(fs::read_dir(cache.join("oci/partial")).unwrap().count(), 0);
    assert!(supermachine_runtime::image::list_images(Some(&cache)).is_empty());
    // A blob cut short is reported as truncated, also without caching it.
    fs::write(&p, &layer[..layer.len() / 3]).unwrap();
    let e = oci::build(&format!("oci:{}:multi", l.dir.display()), &opts(&cache)).unwrap_err();
    assert!(matches!(e, OciError::Store(StoreError::Truncated { .. })), "{e}");
}

fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

#[test]
fn oci_archive_and_docker_save_tarballs() {
    let t = TempDir::new("archive");
    let outside = t.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let layout = multi_platform_layout(&t.path().join("layout"), &outside);
    let cache = t.path().join("cache");
    let archive = t.path().join("img.tar");
    tar_dir(&layout.dir, &archive);
    let a = oci::build(&format!("oci-archive:{}:single", archive.display()), &opts(&cache)).unwrap();
    // docker save (classic): manifest.json, <id>.json config, <n>/layer.tar uncompressed.
    let ds = t.path().join("ds");
    fs::create_dir_all(&ds).unwrap();
    let layers: Vec<Vec<u8>> = vec![
        LayerBuilder::new().dir("etc/", 0o755).file("etc/hello", b"hi").finish(),
        LayerBuilder::new().file("etc/.wh.hello", b"").file("etc/bye", b"bye").finish(),
    ];
    let cfg = json!({"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha256(l)).collect::<Vec<_>>()}})
        .to_string();
    let cfg_name = format!("{}.json", sha256(cfg.as_bytes()).trim_start_matches("sha256:"));
    fs::write(ds.join(&cfg_name), &cfg).unwrap();
    let mut paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        fs::create_dir_all(ds.join(format!("l{i}"))).unwrap();
        fs::write(ds.join(format!("l{i}/layer.tar")), l).unwrap();
        paths.push(format!("l{i}/layer.tar"));
    }
    fs::write(ds.join("manifest.json"), json!([{"Config": cfg_name, "RepoTags": ["mine:v1"], "Layers": paths}]).to_string()).unwrap();
    let ds_tar = t.path().join("saved.tar");
    tar_dir(&ds, &ds_tar);
    let d = oci::build(&format!("docker-archive:{}:mine:v1", ds_tar.display()), &opts(&cache)).unwrap();
    assert_eq!(d.record.config.env, ["A=1"]);
    let x = t.path().join("x");
    extract(&d.rootfs, &x);
    assert_eq!(fs::read(x.join("etc/bye")).unwrap(), b"bye");
    assert!(!x.join("etc/hello").exists());
    assert_ne!(a.hash, d.hash);
    // A tampered layer.tar no longer matches its diff_id.
    fs::write(ds.join("l1/layer.tar"), LayerBuilder::new().file("etc/evil", b"x").finish()).unwrap();
    tar_dir(&ds, &ds_tar);
    let e = oci::build(&format!("docker-archive:{}", ds_tar.display()), &opts(&t.path().join("cache2"))).unwrap_err();
    assert!(matches!(e, OciError::Store(StoreError::DigestMismatch { .. })), "{e}");
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; MNT_DETACH only detaches the mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn disk_full_during_a_pull_leaves_no_image_and_no_blob() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("disk_full test needs root to mount a small tmpfs; not run");
        return;
    }
    let t = TempDir::new("full");
    let l = Layout::new(&t.path().join("layout"));
    // 2 MB that do not compress, into a 512 KiB filesystem.
    let mut noise = Vec::with_capacity(2 << 20);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    while noise.len() < 2 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let layer = gzip(&LayerBuilder::new().file("noise", &noise).finish());
    let m = l.image("amd64", &[(layer.clone(), GZIP)], json!({}));
    let mut l = l;
    l.tag(&m, "v1");
    let cache = t.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    let src = std::ffi::CString::new("tmpfs").unwrap();
    let dst = std::ffi::CString::new(cache.to_str().unwrap()).unwrap();
    let data = std::ffi::CString::new("size=512k").unwrap();
    // SAFETY: valid NUL-terminated strings; a fresh tmpfs on our own temp directory.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), src.as_ptr(), 0, data.as_ptr().cast()) };
    assert_eq!(r, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    let _m = Mount(cache.clone());
    let e = oci::build(&format!("oci:{}:v1", l.dir.display()), &opts(&cache)).unwrap_err();
    assert!(matches!(e, OciError::Store(StoreError::Io { .. })), "{e}");
    assert!(e.to_string().contains("free disk space"), "{e}");
    assert!(supermachine_runtime::image::list_images(Some(&cache)).is_empty());
    assert!(!cache.join("oci/blobs/sha256").join(sha256(&layer).trim_start_matches("sha256:")).exists());
    assert_eq!(fs::read_dir(cache.join("oci/partial")).unwrap().count(), 0, "partial file left behind");
}
