//! Registry credentials from Docker's client configuration (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`): `auths.<registry>.auth` = base64("user:password"), as written by
//! `docker login`. Keys may be a bare host (`ghcr.io`, `127.0.0.1:5000`) or a URL
//! (`https://index.docker.io/v1/` for Docker Hub). Credential helpers (`credsStore`,
//! `credHelpers`) and `identitytoken` are not used: such a registry is pulled anonymously, and a
//! refused pull says to put a plain `auth` entry there.
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::secrets::RegistryAuth;

#[derive(Debug)]
pub enum CredentialsError {
    /// The Docker config file exists but cannot be read or parsed.
    Unreadable { path: PathBuf, detail: String },
    /// An `auth` entry is not base64 of `user:password`.
    BadEntry { path: PathBuf, registry: String },
}

impl fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialsError::Unreadable { path, detail } => write!(
                f,
                "cannot read registry credentials from {} ({detail}); fix or remove the file \
                 (or point DOCKER_CONFIG at another directory)",
                path.display()
            ),
            CredentialsError::BadEntry { path, registry } => write!(
                f,
                "the credentials for {registry} in {} are not base64 of `user:password`; run \
                 `docker login {registry}` again or fix auths.{registry}.auth",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CredentialsError {}

/// The Docker client config file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The registry's key forms in `auths` (Docker Hub is stored under its v1 URL).
fn keys_for(registry: &str) -> Vec<String> {
    let mut v = vec![registry.to_string(), format!("https://{registry}"), format!("http://{registry}")];
    if matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
        v.extend(["https://index.docker.io/v1/", "index.docker.io", "docker.io"].map(String::from));
    }
    v
}

/// The credentials for `registry` in the config file at `path` (anonymous if none).
pub fn lookup(path: &Path, registry: &str) -> Result<RegistryAuth, CredentialsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(CredentialsError::Unreadable { path: path.into(), detail: e.to_string() }),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CredentialsError::Unreadable { path: path.into(), detail: e.to_string() })?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let entry = keys_for(registry).into_iter().find_map(|k| {
        auths.get(&k).or_else(|| auths.get(k.trim_end_matches('/')))
    });
    let Some(auth) = entry.and_then(|e| e.get("auth")).and_then(|a| a.as_str()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let bad = || CredentialsError::BadEntry { path: path.into(), registry: registry.into() };
    let raw = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (user, pass) = text.split_once(':').ok_or_else(bad)?;
    Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_entries() {
        let d = std::env::temp_dir().join(format!("smk-creds-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("config.json");
        assert_eq!(lookup(&p, "x").unwrap(), RegistryAuth::Anonymous);
        let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &p,
            serde_json::json!({"auths": {
                "127.0.0.1:5000": {"auth": b("u:p:w")},
                "https://index.docker.io/v1/": {"auth": b("hub:secret")},
                "bad.example": {"auth": "!!"},
            }})
            .to_string(),
        )
        .unwrap();
        assert_eq!(lookup(&p, "127.0.0.1:5000").unwrap(), RegistryAuth::Basic("u".into(), "p:w".into()));
        assert_eq!(lookup(&p, "docker.io").unwrap(), RegistryAuth::Basic("hub".into(), "secret".into()));
        assert_eq!(lookup(&p, "ghcr.io").unwrap(), RegistryAuth::Anonymous);
        let e = lookup(&p, "bad.example").unwrap_err();
        assert!(e.to_string().contains("docker login bad.example"), "{e}");
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(lookup(&p, "x"), Err(CredentialsError::Unreadable { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
