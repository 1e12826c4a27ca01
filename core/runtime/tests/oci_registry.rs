//! Pulling from a real registry (Debian's `docker-registry`) started on 127.0.0.1, with images
//! the tests build and push themselves with `skopeo`: plain HTTP on loopback, then TLS with a
//! test CA and htpasswd auth, then TLS with bearer tokens from a token server the test runs
//! (`support/token_server.rs`). The registry binary, skopeo and htpasswd are required (setup
//! installs them): a missing one fails the test with the package to install.
mod support;

use std::fs;
use std::path::Path;

use base64::Engine;
use serde_json::json;
use supermachine_runtime::image::oci::{self, OciBuildOptions, OciError, RegistryError, RegistryOptions, StoreError};
use supermachine_runtime::image::{ProgressEvent, ProgressSink};
use support::*;

fn opts(cache: &Path, registry: RegistryOptions) -> OciBuildOptions {
    OciBuildOptions { cache_dir: Some(cache.to_path_buf()), progress: false, registry, ..Default::default() }
}

/// Registry options that see no credentials of the host's user.
fn no_creds(t: &TempDir) -> RegistryOptions {
    RegistryOptions { docker_config: Some(t.path().join("no-docker-config.json")), ..Default::default() }
}

fn layout_with_index(t: &TempDir) -> Layout {
    let outside = t.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let mut l = Layout::new(&t.path().join("layout"));
    let amd = l.image("amd64", &sample_layers(&outside), json!({"Env": ["FROM=registry"], "WorkingDir": "/opt/app"}));
    let arm = l.image("arm64", &[(gzip(&LayerBuilder::new().file("arm", b"arm").finish()), GZIP)], json!({}));
    let idx = l.index(&[arm, amd]);
    l.tag(&idx, "multi");
    l
}

#[test]
fn plain_loopback_registry_pull_resume_and_bad_input() {
    let t = TempDir::new("reg");
    let reg = Registry::start(false, None);
    let layout = layout_with_index(&t);
    reg.push(&layout.dir, "multi", "smk/sample");
    let reference = format!("{}/smk/sample:multi", reg.addr);
    let cache = t.path().join("cache");

    // Multi-platform index → the amd64 image, applied and packed.
    let img = oci::build(&reference, &opts(&cache, no_creds(&t))).unwrap_or_else(|e| panic!("{e}\n{}", reg.log()));
    assert_eq!(img.name, "sample-multi");
    assert!(img.record.index_digest.is_some());
    assert_eq!(img.record.config.env, ["FROM=registry"]);
    assert_eq!(img.record.layers.len(), 3);
    assert!(img.rootfs.metadata().unwrap().len() > 0);

    // Progress events (what the CLI draws as bars): each blob's download in bytes up to its
    // size, the pull up to the layers' total, the unpack layer by layer.
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = events.clone();
    let sink = ProgressSink(std::sync::Arc::new(move |e: &ProgressEvent| seen.lock().unwrap().push(e.clone())));
    let watched = OciBuildOptions { progress: true, sink: Some(sink), ..opts(&t.path().join("watched"), no_creds(&t)) };
    oci::build(&reference, &watched).unwrap();
    let events = events.lock().unwrap();
    let last = |task: &str| {
        events.iter().rev().find_map(|e| match e {
            ProgressEvent::Advance { task: t, done, total, .. } if t == task => Some((*done, *total)),
            _ => None,
        })
    };
    let downloads = events.iter().filter(|e| matches!(e, ProgressEvent::Advance { task, done, total, .. } if task == "download" && done == total)).count();
    assert_eq!(downloads, 4, "{events:?}"); // the config and three layers
    let (done, total) = last("pull").unwrap();
    assert!(total > 0 && done == total, "{events:?}");
    assert_eq!(last("unpack"), Some((3, 3)));
    assert!(events.iter().any(|e| matches!(e, ProgressEvent::End { step, ok: true, .. } if step == "mkfs.erofs")));
    drop(events);

    // Verified blobs are not fetched again: with a layer gone from the registry, a forced
    // rebuild still succeeds from the store.
    let first = img.record.layers[0].clone();
    let kept = fs::read(reg.blob_data(&first)).unwrap();
    fs::remove_file(reg.blob_data(&first)).unwrap();
    let again = oci::build(&reference, &OciBuildOptions { force: true, ..opts(&cache, no_creds(&t)) }).unwrap();
    assert_eq!(again.record.manifest_digest, img.record.manifest_digest);
    fs::write(reg.blob_data(&first), &kept).unwrap();

    // An interrupted download resumes from its partial file (a correct prefix is completed);
    // a partial file that does not verify is fetched again whole.
    for (i, prefix) in [kept[..kept.len() / 2].to_vec(), vec![0u8; kept.len() / 2]].into_iter().enumerate() {
        let c = t.path().join(format!("resume{i}"));
        let hex = first.trim_start_matches("sha256:");
        fs::create_dir_all(c.join("oci/partial")).unwrap();
        fs::write(c.join(format!("oci/partial/sha256-{hex}")), &prefix).unwrap();
        oci::build(&reference, &opts(&c, no_creds(&t))).unwrap_or_else(|e| panic!("resume {i}: {e}"));
        assert_eq!(fs::read(c.join("oci/blobs/sha256").join(hex)).unwrap(), kept);
    }

    // Unknown tag, unknown repository.
    for bad in [format!("{}/smk/sample:nope", reg.addr), format!("{}/smk/absent:multi", reg.addr)] {
        let e = oci::build(&bad, &opts(&cache, no_creds(&t))).unwrap_err();
        assert!(matches!(e, OciError::Registry(RegistryError::UnknownTag { .. })), "{bad}: {e}");
        assert!(e.to_string().contains("check the repository name and the tag"), "{e}");
    }

    // A blob the registry serves damaged (same size, one byte flipped), or cut short: refused,
    // nothing stored.
    let mut damaged = kept.clone();
    damaged[kept.len() / 3] ^= 0x55;
    fs::write(reg.blob_data(&first), &damaged).unwrap();
    let c = t.path().join("damaged");
    let e = oci::build(&reference, &opts(&c, no_creds(&t))).unwrap_err();
    assert!(matches!(e, OciError::Store(StoreError::DigestMismatch { .. })), "{e}");
    assert!(!c.join("oci/blobs/sha256").join(first.trim_start_matches("sha256:")).exists());
    fs::write(reg.blob_data(&first), &kept[..kept.len() / 2]).unwrap();
    let e = oci::build(&reference, &opts(&c, no_creds(&t))).unwrap_err();
    assert!(matches!(e, OciError::Store(StoreError::Truncated { .. }) | OciError::Registry(RegistryError::Interrupted { .. })), "{e}");
    assert!(!c.join("oci/blobs/sha256").join(first.trim_start_matches("sha256:")).exists());
    assert!(supermachine_runtime::image::list_images(Some(&c)).is_empty());

    // Offline (registry gone), the image built earlier from this reference is used.
    drop(reg);
    let offline = oci::build(&reference, &opts(&cache, no_creds(&t))).unwrap_or_else(|e| panic!("offline: {e}"));
    assert_eq!(offline.record.manifest_digest, img.record.manifest_digest);
    assert_eq!(offline.rootfs, img.rootfs);
    let e = oci::build(&reference, &opts(&c, no_creds(&t))).unwrap_err();
    assert!(matches!(e, OciError::Registry(RegistryError::Unreachable { .. })), "{e}");
}

#[test]
fn unreachable_registry() {
    let t = TempDir::new("unreach");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = oci::build(&format!("127.0.0.1:{port}/x/y:z"), &opts(&t.path().join("c"), no_creds(&t))).unwrap_err();
    assert!(matches!(e, OciError::Registry(RegistryError::Unreachable { .. })), "{e}");
    assert!(e.to_string().contains("cannot reach registry"), "{e}");
}

fn docker_config(t: &TempDir, registry: &str, user: &str, pass: &str) -> std::path::PathBuf {
    let p = t.path().join(format!("docker-config-{user}-{pass}.json"));
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    fs::write(&p, json!({"auths": {registry: {"auth": auth}}}).to_string()).unwrap();
    p
}

#[test]
fn tls_registry_with_htpasswd_auth() {
    let t = TempDir::new("tls");
    let reg = Registry::start(true, Some(("smk", "s3cret")));
    let layout = layout_with_index(&t);
    reg.push(&layout.dir, "multi", "private/img");
    let reference = format!("{}/private/img:multi", reg.addr);
    let with = |config: Option<std::path::PathBuf>, ca: bool| RegistryOptions {
        docker_config: Some(config.unwrap_or_else(|| t.path().join("none.json"))),
        extra_ca: if ca { vec![reg.tls.as_ref().unwrap().ca.clone()] } else { vec![] },
        ..Default::default()
    };
    let good = docker_config(&t, &reg.addr, "smk", "s3cret");

    let img = oci::build(&reference, &opts(&t.path().join("c1"), with(Some(good.clone()), true)))
        .unwrap_or_else(|e| panic!("{e}\n{}", reg.log()));
    assert_eq!(img.record.config.working_dir.as_deref(), Some("/opt/app"));

    // The certificate is not trusted without the CA: a TLS error naming the fix, no downgrade.
    let e = oci::build(&reference, &opts(&t.path().join("c2"), with(Some(good.clone()), false))).unwrap_err();
    assert!(matches!(e, OciError::Registry(RegistryError::Tls { .. })), "{e}");
    assert!(e.to_string().contains("SUPERMACHINE_REGISTRY_CA"), "{e}");

    // Wrong password, and no credentials at all.
    let bad = docker_config(&t, &reg.addr, "smk", "wrong");
    let e = oci::build(&reference, &opts(&t.path().join("c3"), with(Some(bad), true))).unwrap_err();
    assert!(
        matches!(e, OciError::Registry(RegistryError::AuthRefused { had_credentials: true, .. })),
        "{e}"
    );
    let e = oci::build(&reference, &opts(&t.path().join("c4"), with(None, true))).unwrap_err();
    assert!(
        matches!(e, OciError::Registry(RegistryError::AuthRefused { had_credentials: false, .. })),
        "{e}"
    );
    assert!(e.to_string().contains("docker login"), "{e}");
}

#[test]
fn tls_registry_with_bearer_tokens() {
    let t = TempDir::new("token");
    let tokens = TokenServer::start(t.path(), &[("guest", "guest-pw")]);
    let reg = Registry::start_with(true, Auth::Token(&tokens));
    let layout = layout_with_index(&t);
    reg.push(&layout.dir, "multi", "public/img");
    reg.push(&layout.dir, "multi", "private/img");
    tokens.take_requests();
    let with = |config: Option<std::path::PathBuf>| RegistryOptions {
        docker_config: Some(config.unwrap_or_else(|| t.path().join("none.json"))),
        extra_ca: vec![reg.tls.as_ref().unwrap().ca.clone()],
        ..Default::default()
    };
    let build = |reference: &str, cache: &str, config: Option<std::path::PathBuf>| {
        oci::build(reference, &opts(&t.path().join(cache), with(config)))
    };
    let public = format!("{}/public/img:multi", reg.addr);
    let private = format!("{}/private/img:multi", reg.addr);

    // Anonymous pull of a public repository: a token for its pull scope, no credentials sent.
    let img = build(&public, "c1", None).unwrap_or_else(|e| panic!("{e}\n{}", reg.log()));
    assert_eq!(img.record.layers.len(), 3);
    let seen = tokens.take_requests();
    assert!(!seen.is_empty(), "no token was asked for");
    for r in &seen {
        assert_eq!((r.user.as_deref(), r.status, r.scopes.as_slice()), (None, 200, ["repository:public/img:pull".to_string()].as_slice()));
    }

    // Credentials from the Docker config go to the token server, which grants the private pull.
    let good = docker_config(&t, &reg.addr, "smk", "s3cret");
    let img = build(&private, "c2", Some(good)).unwrap_or_else(|e| panic!("{e}\n{}", reg.log()));
    assert_eq!(img.record.config.working_dir.as_deref(), Some("/opt/app"));
    let seen = tokens.take_requests();
    assert!(!seen.is_empty() && seen.iter().all(|r| r.user.as_deref() == Some("smk") && r.status == 200), "{seen:?}");

    // Anonymous on the private repository: the token grants nothing, the registry wants a login.
    let e = build(&private, "c3", None).unwrap_err();
    assert!(matches!(e, OciError::Registry(RegistryError::AuthRefused { had_credentials: false, .. })), "{e}");
    assert!(e.to_string().contains(&format!("docker login {}", reg.addr)), "{e}");
    assert!(tokens.take_requests().iter().all(|r| r.user.is_none() && r.status == 200));

    // Wrong password: the token server's refusal, naming the registry and how to log in.
    let bad = docker_config(&t, &reg.addr, "smk", "wrong");
    let e = build(&private, "c4", Some(bad)).unwrap_err();
    assert!(matches!(e, OciError::Registry(RegistryError::AuthRefused { had_credentials: true, .. })), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&reg.addr) && msg.contains(&format!("docker login {}", reg.addr)), "{msg}");
    assert!(msg.contains("invalid username or password"), "the token server's reason is lost: {msg}");
    assert_eq!(tokens.take_requests().iter().map(|r| r.status).collect::<Vec<_>>(), [401]);

    // A known user whose token does not cover the repository (insufficient scope).
    let guest = docker_config(&t, &reg.addr, "guest", "guest-pw");
    let e = build(&private, "c5", Some(guest)).unwrap_err();
    assert!(matches!(e, OciError::Registry(RegistryError::NotAllowed { .. })), "{e}");
    assert!(e.to_string().contains("guest") && e.to_string().contains(&private), "{e}");

    // Tokens issued already expired: refused by the registry, reported as a clock problem.
    tokens.set_expired(true);
    let e = build(&public, "c6", None).unwrap_err();
    tokens.set_expired(false);
    assert!(matches!(e, OciError::Registry(RegistryError::TokenExpired { .. })), "{e}");
    assert!(e.to_string().contains("clock"), "{e}");

    // Nothing was stored by the refused pulls.
    for c in ["c3", "c4", "c5", "c6"] {
        assert!(supermachine_runtime::image::list_images(Some(&t.path().join(c))).is_empty(), "{c}");
    }
}
