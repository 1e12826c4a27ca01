//! From a source's root manifest to verified blobs in the store: follows an index to its
//! linux/amd64 image, then fetches the config and every layer. The same walk serves registries
//! and local layouts through [`Fetch`].
use std::path::PathBuf;

use super::config::{self, ImageConfig, MAX_CONFIG_BYTES};
use super::manifest::{self, Descriptor, Manifest};
use super::store::{digest_of, Store, StoreError};
use super::OciError;
use crate::image::tools::Progress;

/// Where manifests and blobs come from.
pub trait Fetch {
    /// A name for messages (`docker.io/library/python:3.12-slim`, `oci:/x`).
    fn name(&self) -> String;
    /// The manifest or index the reference names, and its digest.
    fn root_manifest(&self) -> Result<(Vec<u8>, String), OciError>;
    /// The manifest `d` (its bytes are checked against `d.digest` by [`verified`]).
    fn manifest(&self, d: &Descriptor) -> Result<Vec<u8>, OciError>;
    /// Stores blob `d` (verified) and returns its path in the store.
    fn blob(&self, d: &Descriptor, store: &Store, what: &str) -> Result<PathBuf, OciError>;
}

/// One layer, verified and stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredLayer {
    pub digest: String,
    pub media_type: String,
    pub size: Option<u64>,
    pub path: PathBuf,
}

/// A pulled image: everything is in the store and verified.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// Digest of the linux/amd64 image manifest (the image's identity).
    pub manifest_digest: String,
    /// Digest of the index the reference named, when it named a multi-platform index.
    pub index_digest: Option<String>,
    pub config_digest: String,
    pub config: ImageConfig,
    pub layers: Vec<StoredLayer>,
}

/// Checks that `bytes` hash to `digest`.
pub fn verified(bytes: Vec<u8>, digest: &str, what: &str) -> Result<Vec<u8>, StoreError> {
    let actual = digest_of(&bytes);
    if actual != digest {
        return Err(StoreError::DigestMismatch { what: what.into(), expected: digest.into(), actual });
    }
    Ok(bytes)
}

/// Walks from the root manifest to the image and stores its config and layers (reported as
/// task `pull`, in bytes of the layers' descriptors).
pub fn pull(f: &dyn Fetch, store: &Store, progress: &Progress) -> Result<Pulled, OciError> {
    let name = f.name();
    let (mut bytes, mut digest) = f.root_manifest()?;
    let mut index_digest = None;
    for _ in 0..4 {
        match manifest::parse(&bytes, &format!("the manifest of {name}"))? {
            Manifest::Index { manifests } => {
                let d = manifest::pick_amd64(&manifests, &format!("the image index of {name}"))?;
                index_digest.get_or_insert(digest.clone());
                bytes = verified(f.manifest(d)?, &d.digest, &format!("the linux/amd64 manifest of {name}"))?;
                digest = d.digest.clone();
            }
            Manifest::Image { config, layers } => {
                let what = format!("the config of {name}");
                let cpath = f.blob(&config, store, &what)?;
                let cbytes = store.read_small(&cpath, MAX_CONFIG_BYTES)?;
                let config_parsed = config::parse(&cbytes)?;
                let mut stored = Vec::new();
                let n = layers.len();
                let total: u64 = layers.iter().filter_map(|l| l.size).sum();
                let mut done = 0;
                progress.advance("pull", 0, total, "bytes");
                for (i, l) in layers.iter().enumerate() {
                    let what = format!("layer {}/{n} ({}) of {name}", i + 1, short(&l.digest));
                    let cached = store.get(&l.digest)?.is_some();
                    progress.note(&format!(
                        "{} {what}{}",
                        if cached { "have" } else { "fetch" },
                        l.size.map(|s| format!(", {:.1} MB", s as f64 / 1e6)).unwrap_or_default()
                    ));
                    let path = f.blob(l, store, &what)?;
                    done += l.size.unwrap_or(0);
                    progress.advance("pull", done, total, "bytes");
                    stored.push(StoredLayer {
                        digest: l.digest.clone(),
                        media_type: l.media_type.clone(),
                        size: l.size,
                        path,
                    });
                }
                return Ok(Pulled {
                    manifest_digest: digest,
                    index_digest,
                    config_digest: config.digest,
                    config: config_parsed,
                    layers: stored,
                });
            }
        }
    }
    Err(manifest::ManifestError::TooDeep { what: name }.into())
}

/// `sha256:0123456789ab` (12 hex digits) for messages.
pub fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}
