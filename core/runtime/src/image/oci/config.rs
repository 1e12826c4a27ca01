//! The image config blob (`application/vnd.oci.image.config.v1+json`): what the later image bake
//! needs from it. `Entrypoint`/`Cmd` are recorded only: nothing from the image runs on the host,
//! and the guest runs our agent as PID 1.
use std::fmt;

use serde::{Deserialize, Serialize};

/// Config blobs larger than this are refused (real ones are a few KiB to ~1 MiB of history).
pub const MAX_CONFIG_BYTES: usize = 16 << 20;

/// What the guest environment takes from the image.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` entries, in the image's order.
    pub env: Vec<String>,
    /// Absolute working directory, if the image sets one.
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, if the image sets one.
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub os: String,
    pub architecture: String,
    /// sha256 of each layer's uncompressed tar, in order.
    pub diff_ids: Vec<String>,
}

#[derive(Debug)]
pub enum ConfigError {
    /// The config blob is not the JSON an image config is.
    Invalid { detail: String },
    /// The config is larger than [`MAX_CONFIG_BYTES`].
    TooLarge { bytes: usize },
    /// The image is built for another platform than linux/amd64.
    WrongPlatform { os: String, architecture: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid { detail } => write!(
                f,
                "the image's config is not a valid OCI image config ({detail}); the image is \
                 damaged or not a container image (e.g. a Helm chart or WASM artifact)"
            ),
            ConfigError::TooLarge { bytes } => write!(
                f,
                "the image's config is {bytes} bytes, more than the {MAX_CONFIG_BYTES} accepted; \
                 this is not a normal container image"
            ),
            ConfigError::WrongPlatform { os, architecture } => write!(
                f,
                "the image is built for {os}/{architecture}, but guests run linux/amd64; use a \
                 tag or digest that has a linux/amd64 variant"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Parses a config blob; refuses a platform other than linux/amd64.
pub fn parse(bytes: &[u8]) -> Result<ImageConfig, ConfigError> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { bytes: bytes.len() });
    }
    let raw: Raw =
        serde_json::from_slice(bytes).map_err(|e| ConfigError::Invalid { detail: e.to_string() })?;
    if raw.os != "linux" || raw.architecture != "amd64" {
        return Err(ConfigError::WrongPlatform { os: raw.os, architecture: raw.architecture });
    }
    let c = raw.config.unwrap_or_default();
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(ImageConfig {
        env: c.env.unwrap_or_default(),
        working_dir: nonempty(c.working_dir),
        user: nonempty(c.user),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        os: raw.os,
        architecture: raw.architecture,
        diff_ids: raw.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_the_bake_uses() {
        let c = parse(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin","A=b=c"],
            "WorkingDir":"/app","User":"1000:1000","Entrypoint":["/e"],"Cmd":["python3"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#,
        )
        .unwrap();
        assert_eq!(c.env, ["PATH=/usr/bin", "A=b=c"]);
        assert_eq!(c.working_dir.as_deref(), Some("/app"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!((c.entrypoint, c.cmd), (vec!["/e".to_string()], vec!["python3".to_string()]));
        assert_eq!(c.diff_ids, ["sha256:00"]);
        let c = parse(br#"{"architecture":"amd64","os":"linux","config":{"WorkingDir":""}}"#).unwrap();
        assert_eq!(c.working_dir, None);
    }

    #[test]
    fn refuses_other_platforms_and_junk() {
        let e = parse(br#"{"architecture":"arm64","os":"linux"}"#).unwrap_err();
        assert!(e.to_string().contains("linux/arm64"), "{e}");
        assert!(matches!(parse(b"[1]"), Err(ConfigError::Invalid { .. })));
    }
}
