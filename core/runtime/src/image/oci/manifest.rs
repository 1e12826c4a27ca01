//! Image manifests and indexes (OCI and Docker v2 schema 2), as found in a registry or a local
//! layout, and the choice of linux/amd64 from a multi-platform index.
use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// Manifests and indexes larger than this are refused (real ones are a few KiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// The media types accepted when asking a registry for a manifest.
pub const ACCEPTED: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// A content descriptor: what a manifest says about one blob.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A parsed manifest document.
#[derive(Clone, Debug, PartialEq)]
pub enum Manifest {
    Image { config: Descriptor, layers: Vec<Descriptor> },
    Index { manifests: Vec<Descriptor> },
}

#[derive(Debug)]
pub enum ManifestError {
    /// The document is not a manifest or index we understand.
    Invalid { what: String, detail: String },
    /// The document is larger than [`MAX_MANIFEST_BYTES`].
    TooLarge { what: String, bytes: usize },
    /// A multi-platform index has no linux/amd64 image.
    NoAmd64 { what: String, available: Vec<String> },
    /// Indexes nest deeper than we follow.
    TooDeep { what: String },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::Invalid { what, detail } => write!(
                f,
                "{what} is not an image manifest or index ({detail}); it may be another kind of \
                 artifact (e.g. a Helm chart), or a schema 1 manifest: re-push it as an OCI or \
                 Docker v2 image"
            ),
            ManifestError::TooLarge { what, bytes } => {
                write!(f, "{what} is {bytes} bytes, more than the {MAX_MANIFEST_BYTES} accepted for a manifest")
            }
            ManifestError::NoAmd64 { what, available } => write!(
                f,
                "{what} has no linux/amd64 image (it has: {}); guests run linux/amd64, so use an \
                 image published for it",
                if available.is_empty() { "no platforms listed".to_string() } else { available.join(", ") }
            ),
            ManifestError::TooDeep { what } => write!(f, "{what}: image indexes nest too deeply"),
        }
    }
}

impl std::error::Error for ManifestError {}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Parses a manifest or index document.
pub fn parse(bytes: &[u8], what: &str) -> Result<Manifest, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge { what: what.into(), bytes: bytes.len() });
    }
    let invalid = |detail: String| ManifestError::Invalid { what: what.into(), detail };
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    if raw.schema_version != Some(2) {
        return Err(invalid(format!("schemaVersion {:?}, expected 2", raw.schema_version)));
    }
    match (raw.manifests, raw.config, raw.layers) {
        (Some(manifests), _, _) => Ok(Manifest::Index { manifests }),
        (None, Some(config), layers) => {
            if let Some(m) = &raw.media_type {
                if m.contains("index") || m.contains("list") {
                    return Err(invalid(format!("media type {m} without manifests")));
                }
            }
            Ok(Manifest::Image { config, layers: layers.unwrap_or_default() })
        }
        _ => Err(invalid("neither `manifests` nor `config`".into())),
    }
}

/// The linux/amd64 entry of an index (the first one; a `v1`-`v4` variant is accepted).
pub fn pick_amd64<'a>(manifests: &'a [Descriptor], what: &str) -> Result<&'a Descriptor, ManifestError> {
    manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
        .ok_or_else(|| ManifestError::NoAmd64 {
            what: what.into(),
            available: manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: char) -> String {
        format!("sha256:{}", n.to_string().repeat(64))
    }

    #[test]
    fn image_and_index() {
        let img = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"c","digest":"{}","size":3}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":9}}]}}"#,
            d('a'),
            d('b')
        );
        let Manifest::Image { config, layers } = parse(img.as_bytes(), "m").unwrap() else { panic!() };
        assert_eq!((config.digest, config.size), (d('a'), Some(3)));
        assert_eq!(layers.len(), 1);
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"mediaType":"m","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"m","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d('c'),
            d('e')
        );
        let Manifest::Index { manifests } = parse(idx.as_bytes(), "i").unwrap() else { panic!() };
        assert_eq!(pick_amd64(&manifests, "i").unwrap().digest, d('e'));
        let e = pick_amd64(&manifests[..1], "idx").unwrap_err();
        assert!(e.to_string().contains("linux/arm64/v8"), "{e}");
        assert!(matches!(parse(br#"{"schemaVersion":1}"#, "x"), Err(ManifestError::Invalid { .. })));
    }
}
