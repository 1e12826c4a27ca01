//! Pulling from a registry over the OCI distribution API with `oci-client` (blocking facade:
//! a current-thread tokio runtime per pull).
//!
//! Transport: always TLS (system roots plus any CA files in `$SUPERMACHINE_REGISTRY_CA`).
//! Plain HTTP only for loopback registries (`localhost`, 127.0.0.0/8, `::1`) and for those an
//! admin lists in `$SUPERMACHINE_INSECURE_REGISTRIES` (`host:port,host2`), and for them only
//! when TLS fails at the transport level (they are tried over TLS first, as Docker does). Auth: anonymous or
//! Basic credentials from Docker's config (see `credentials.rs`); `oci-client` turns them into
//! a bearer token when the registry asks for one (the token dance: the credentials go to the
//! token server the registry names, which grants a token for `repository:NAME:pull`), or sends
//! them as Basic. The token is asked for once when connecting, so a token server's refusal is
//! reported as such; when the registry later refuses a granted token, its claims (read, not
//! verified) tell an expired token from one that grants no pull access.
//!
//! Blobs stream into the store's partial file. An interrupted download keeps what arrived; the
//! next pull resumes it with a `Range` request (a registry that answers 200 instead of 206 sends
//! it whole again, and the partial file is restarted); a resumed blob that fails verification
//! is fetched once more from the start.
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use oci_client::client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use oci_client::{Client, Reference};

use super::credentials;
use super::manifest::{Descriptor, ACCEPTED, MAX_MANIFEST_BYTES};
use super::pull::{verified, Fetch};
use super::store::{io_err, Store, StoreError};
use super::OciError;
use crate::image::tools::Progress;

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Registries (`host` or `host:port`) reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Extra PEM CA certificate files to trust (e.g. a private registry's own CA).
    pub extra_ca: Vec<PathBuf>,
    /// The Docker config file with credentials (default: see `credentials::docker_config_path`).
    pub docker_config: Option<PathBuf>,
    /// Connect timeout (default 15 s).
    pub connect_timeout: Option<Duration>,
}

impl RegistryOptions {
    /// Options from the environment: `SUPERMACHINE_INSECURE_REGISTRIES` (comma-separated) and
    /// `SUPERMACHINE_REGISTRY_CA` (PEM files, ':'-separated).
    pub fn from_env() -> RegistryOptions {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        RegistryOptions {
            insecure: var("SUPERMACHINE_INSECURE_REGISTRIES")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            extra_ca: std::env::split_paths(&var("SUPERMACHINE_REGISTRY_CA"))
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
            docker_config: None,
            connect_timeout: None,
        }
    }
}

#[derive(Debug)]
pub enum RegistryError {
    /// The registry refused our credentials (or wants some and we have none).
    AuthRefused { registry: String, reference: String, had_credentials: bool, detail: String },
    /// The credentials are good but the token they got grants no pull access to the repository.
    NotAllowed { registry: String, reference: String, user: String },
    /// The registry refused the token its token server issued because it had expired.
    TokenExpired { registry: String, reference: String, seconds_ago: i64 },
    /// The repository or tag does not exist.
    UnknownTag { reference: String, detail: String },
    /// The registry cannot be reached (DNS, connection refused, timeout).
    Unreachable { registry: String, detail: String },
    /// The TLS handshake failed (e.g. an untrusted certificate).
    Tls { registry: String, detail: String },
    /// A download stopped part-way; what arrived is kept for the next pull.
    Interrupted { what: String, received: u64, detail: String },
    /// A CA file given to trust cannot be read.
    BadCa { path: PathBuf, detail: String },
    /// The registry answered something the distribution API does not allow.
    Protocol { registry: String, detail: String },
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::AuthRefused { registry, reference, had_credentials: true, detail } => write!(
                f,
                "{registry} refused the credentials for {reference} ({detail}); check the user \
                 and password (`docker login {registry}` writes them to ~/.docker/config.json) \
                 and that this user may pull the repository"
            ),
            RegistryError::AuthRefused { registry, reference, had_credentials: false, detail } => write!(
                f,
                "{registry} wants credentials to pull {reference} ({detail}); run `docker login \
                 {registry}` (or add auths.\"{registry}\".auth to ~/.docker/config.json; credential \
                 helpers are not used)"
            ),
            RegistryError::NotAllowed { registry, reference, user } => write!(
                f,
                "{registry} accepted the credentials of {user} but its token grants no pull \
                 access to {reference}; ask the registry's admin to let {user} pull it, or run \
                 `docker login {registry}` as a user who may"
            ),
            RegistryError::TokenExpired { registry, reference, seconds_ago } => write!(
                f,
                "{registry} refused the token its token server issued for {reference}: it \
                 expired {seconds_ago} s before it was used, by this host's clock; check the \
                 clock of this host (and of the token server), then build again"
            ),
            RegistryError::UnknownTag { reference, detail } => write!(
                f,
                "{reference} does not exist in its registry ({detail}); check the repository \
                 name and the tag (`skopeo list-tags docker://REPO` lists the tags)"
            ),
            RegistryError::Unreachable { registry, detail } => write!(
                f,
                "cannot reach registry {registry} ({detail}); check the name and port, the \
                 network and any proxy. For air-gapped hosts use a local source: `oci:DIR` or a \
                 `docker save` tarball"
            ),
            RegistryError::Tls { registry, detail } => write!(
                f,
                "TLS with {registry} failed ({detail}); if it uses a private CA, put the CA's \
                 PEM file in SUPERMACHINE_REGISTRY_CA; if it serves plain HTTP on a trusted \
                 network, list it in SUPERMACHINE_INSECURE_REGISTRIES"
            ),
            RegistryError::Interrupted { what, received, detail } => write!(
                f,
                "downloading {what} stopped after {received} bytes ({detail}); build again to \
                 resume the download"
            ),
            RegistryError::BadCa { path, detail } => {
                write!(f, "cannot read the CA certificate {} ({detail})", path.display())
            }
            RegistryError::Protocol { registry, detail } => {
                write!(f, "registry {registry} answered unexpectedly: {detail}")
            }
        }
    }
}

impl std::error::Error for RegistryError {}

/// Whether `registry` (`host[:port]`) is a loopback address or name.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map(|(h, _)| h).filter(|h| !h.contains(':')).unwrap_or(registry)
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A connection to one registry for one reference.
pub struct Registry {
    rt: tokio::runtime::Runtime,
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    /// The bearer token granted when connecting, if the registry uses tokens.
    token: Option<String>,
    /// Receives each blob's transfer as task `download` (bytes of that blob).
    progress: Option<Progress>,
}

impl Registry {
    pub fn connect(reference: &Reference, opts: &RegistryOptions) -> Result<Registry, OciError> {
        install_crypto_provider();
        let registry = reference.resolve_registry().to_string();
        let plain = is_loopback(&registry) || opts.insecure.iter().any(|i| i == &registry || i == reference.registry());
        let mut extra = Vec::new();
        for p in &opts.extra_ca {
            let data = fs::read(p).map_err(|e| RegistryError::BadCa { path: p.clone(), detail: e.to_string() })?;
            extra.push(Certificate { encoding: CertificateEncoding::Pem, data });
        }
        let make = |protocol: ClientProtocol| {
            let config = ClientConfig {
                protocol,
                extra_root_certificates: extra.clone(),
                connect_timeout: Some(opts.connect_timeout.unwrap_or(Duration::from_secs(15))),
                read_timeout: Some(Duration::from_secs(120)),
                ..Default::default()
            };
            Client::try_from(config)
                .map_err(|e| RegistryError::Protocol { registry: registry.clone(), detail: chain(&e) })
        };
        // Credentials are looked up under the name the user wrote, then the resolved one
        // (Docker Hub: `docker.io` → `index.docker.io`).
        let auth = match opts.docker_config.clone().or_else(credentials::docker_config_path) {
            Some(path) => match credentials::lookup(&path, reference.registry())? {
                RegistryAuth::Anonymous if reference.registry() != registry => credentials::lookup(&path, &registry)?,
                a => a,
            },
            None => RegistryAuth::Anonymous,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io { context: "starting the download runtime".into(), source: e })?;
        // A registry allowed plain HTTP is still tried over TLS first (as Docker does): a
        // loopback registry may well serve TLS. Only a failure at the transport level (no TLS
        // spoken there) switches to HTTP.
        let mut client = make(ClientProtocol::Https)?;
        let mut probe = rt.block_on(client.auth(reference, &auth, RegistryOperation::Pull));
        if plain {
            match probe {
                // It speaks TLS but we do not trust its certificate: say so, do not downgrade.
                Err(e @ OciDistributionError::RequestError(_)) if chain(&e).to_ascii_lowercase().contains("certificate") => {
                    return Err(RegistryError::Tls { registry, detail: chain(&e) }.into());
                }
                Err(OciDistributionError::RequestError(_)) => {
                    client = make(ClientProtocol::HttpsExcept(vec![registry.clone()]))?;
                    probe = rt.block_on(client.auth(reference, &auth, RegistryOperation::Pull));
                }
                _ => {}
            }
        }
        // Without this, oci-client drops a token server's refusal and pulls anonymously.
        let token = probe.map_err(|e| classify(e, reference, !matches!(auth, RegistryAuth::Anonymous)))?;
        Ok(Registry { rt, client, reference: reference.clone(), auth, token, progress: None })
    }

    /// Reports the bytes of every blob download to `progress` (task `download`).
    pub fn with_progress(mut self, progress: &Progress) -> Registry {
        self.progress = Some(progress.clone());
        self
    }

    fn error(&self, e: OciDistributionError) -> OciError {
        let err = classify(e, &self.reference, !matches!(self.auth, RegistryAuth::Anonymous));
        match (&err, self.token.as_deref()) {
            (OciError::Registry(RegistryError::AuthRefused { .. }), Some(token)) => {
                refused_token(token, &self.reference, &self.auth).map_or(err, Into::into)
            }
            _ => err,
        }
    }

    fn fetch_manifest(&self, reference: &Reference) -> Result<(Vec<u8>, String), OciError> {
        let (bytes, digest) = self
            .rt
            .block_on(self.client.pull_manifest_raw(reference, &self.auth, ACCEPTED))
            .map_err(|e| self.error(e))?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(super::manifest::ManifestError::TooLarge { what: reference.whole(), bytes: bytes.len() }.into());
        }
        let bytes = bytes.to_vec();
        let bytes = match reference.digest() {
            Some(d) => verified(bytes, d, &format!("the manifest of {}", reference.whole()))?,
            None => bytes,
        };
        Ok((bytes, digest))
    }

    /// Downloads `d` into `partial`, continuing after `have` bytes if the registry allows.
    fn download(&self, d: &Descriptor, partial: &Path, have: u64, what: &str) -> Result<(), OciError> {
        let desc = oci_client::manifest::OciDescriptor {
            digest: d.digest.clone(),
            media_type: d.media_type.clone(),
            size: d.size.unwrap_or(0) as i64,
            ..Default::default()
        };
        let mut received = have;
        self.rt.block_on(async {
            let resp = self
                .client
                .pull_blob_stream_partial(&self.reference, &desc, have, None)
                .await
                .map_err(|e| self.error(e))?;
            let (mut stream, append) = match resp {
                BlobResponse::Partial(s) => (s, true),
                BlobResponse::Full(s) => (s, false),
            };
            if !append {
                received = 0;
            }
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(partial)
                .map_err(io_err(format!("opening {}", partial.display())))?;
            // At most about a hundred reports per blob.
            let total = d.size.unwrap_or(0);
            let step = (total / 100).max(256 * 1024);
            let mut reported = received;
            let report = |n: u64| {
                if let Some(p) = &self.progress {
                    p.advance("download", n, total, "bytes");
                }
            };
            report(received);
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    // oci-client checks a whole blob's digest at its end: refuse it like commit().
                    Err(e) if e.get_ref().is_some_and(|i| i.is::<DigestError>()) => {
                        drop(f);
                        let _ = fs::remove_file(partial);
                        return Err(match d.size {
                            Some(s) if received < s => StoreError::Truncated { what: what.into(), expected: s, actual: received },
                            _ => StoreError::DigestMismatch { what: what.into(), expected: d.digest.clone(), actual: e.to_string() },
                        }
                        .into());
                    }
                    Err(e) => {
                        return Err(RegistryError::Interrupted { what: what.into(), received, detail: chain(&e) }.into())
                    }
                };
                f.write_all(&chunk).map_err(io_err(format!("writing {}", partial.display())))?;
                received += chunk.len() as u64;
                if d.size.is_some_and(|s| received > s) {
                    break; // commit() refuses it as too long
                }
                if received - reported >= step || received == total {
                    reported = received;
                    report(received);
                }
            }
            f.flush().map_err(io_err(format!("writing {}", partial.display())))?;
            Ok::<(), OciError>(())
        })
    }
}

impl Fetch for Registry {
    fn name(&self) -> String {
        self.reference.whole()
    }

    fn root_manifest(&self) -> Result<(Vec<u8>, String), OciError> {
        self.fetch_manifest(&self.reference)
    }

    fn manifest(&self, d: &Descriptor) -> Result<Vec<u8>, OciError> {
        let r = self.reference.clone_with_digest(d.digest.clone());
        Ok(self.fetch_manifest(&r)?.0)
    }

    fn blob(&self, d: &Descriptor, store: &Store, what: &str) -> Result<PathBuf, OciError> {
        if let Some(p) = store.get(&d.digest)? {
            return Ok(p);
        }
        let _lock = store.lock(&d.digest)?;
        if let Some(p) = store.get(&d.digest)? {
            return Ok(p);
        }
        let partial = store.partial_path(&d.digest)?;
        for attempt in 0..2 {
            let mut have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if d.size.is_some_and(|s| have > s) {
                let _ = fs::remove_file(&partial);
                have = 0;
            }
            if d.size != Some(have) || have == 0 {
                self.download(d, &partial, have, what)?;
            }
            match store.commit(&partial, &d.digest, d.size, what) {
                Ok(p) => return Ok(p),
                Err(StoreError::DigestMismatch { .. }) if have > 0 && attempt == 0 => {
                    eprintln!("[oci] resumed download of {what} did not verify; fetching it again whole");
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the second attempt returns")
    }
}

/// rustls needs one process-wide crypto provider. We build ring (seconds to compile; aws-lc-rs,
/// rustls's default, needs a long C build); ring lacks only post-quantum key exchange, which
/// rustls 0.23.48 flags as a deprecation.
#[allow(deprecated)]
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error and its sources, joined (reqwest's own message hides the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Why the registry refused a bearer token it wanted, from the token's own claims (a JWT's
/// `exp` and Docker's `access` list; read without verifying, only to explain): expired, or
/// granting the user no pull access. `None` for an opaque token or another cause.
fn refused_token(token: &str, r: &Reference, auth: &RegistryAuth) -> Option<RegistryError> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let registry = r.resolve_registry().to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    if let Some(exp) = claims.get("exp").and_then(|e| e.as_i64()).filter(|&exp| exp < now) {
        return Some(RegistryError::TokenExpired { registry, reference: r.whole(), seconds_ago: now - exp });
    }
    let RegistryAuth::Basic(user, _) = auth else {
        return None; // anonymous: AuthRefused already says to log in
    };
    let may_pull = claims.get("access")?.as_array()?.iter().any(|a| {
        a["type"] == "repository"
            && a["name"] == r.repository()
            && a["actions"].as_array().is_some_and(|v| v.iter().any(|x| x == "pull" || x == "*"))
    });
    (!may_pull).then(|| RegistryError::NotAllowed { registry, reference: r.whole(), user: user.clone() })
}

/// Turns an `oci-client` error into the user's situation.
fn classify(e: OciDistributionError, r: &Reference, had_credentials: bool) -> OciError {
    let registry = r.resolve_registry().to_string();
    let reference = r.whole();
    let detail = chain(&e);
    let auth = |detail: String| RegistryError::AuthRefused {
        registry: registry.clone(),
        reference: reference.clone(),
        had_credentials,
        detail,
    };
    let err = match &e {
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => auth(detail),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|x| &x.code).collect();
            if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                auth(detail)
            } else if codes.iter().any(|c| {
                matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound | OciErrorCode::BlobUnknown)
            }) {
                RegistryError::UnknownTag { reference, detail }
            } else {
                RegistryError::Protocol { registry, detail }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } | OciDistributionError::ImageManifestNotFoundError(_) => {
            RegistryError::UnknownTag { reference, detail }
        }
        OciDistributionError::ServerError { code: 401 | 403, .. } => auth(detail),
        OciDistributionError::DigestError(_) => {
            return StoreError::DigestMismatch {
                what: format!("a manifest of {reference}"),
                expected: r.digest().unwrap_or("(the registry's digest header)").into(),
                actual: detail,
            }
            .into()
        }
        OciDistributionError::RequestError(re) => {
            let lower = detail.to_ascii_lowercase();
            if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
                RegistryError::Tls { registry, detail }
            } else if re.is_connect() || re.is_timeout() || lower.contains("dns") {
                RegistryError::Unreachable { registry, detail }
            } else {
                RegistryError::Protocol { registry, detail }
            }
        }
        _ => RegistryError::Protocol { registry, detail },
    };
    err.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries() {
        for r in ["localhost:5000", "127.0.0.1:5000", "127.9.9.9", "[::1]:5000", "::1", "LOCALHOST"] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["registry:5000", "10.0.0.1:5000", "ghcr.io", "localhost.evil.com:5000", "[::2]:1"] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn a_refused_token_is_explained_by_its_claims() {
        let jwt = |claims: serde_json::Value| {
            let b = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            format!("{}.{}.sig", b(&serde_json::json!({"alg": "RS256"})), b(&claims))
        };
        let r: Reference = "reg.example/team/img:1".parse().unwrap();
        let user = RegistryAuth::Basic("ann".into(), "pw".into());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let pull = serde_json::json!([{"type": "repository", "name": "team/img", "actions": ["pull"]}]);
        let other = serde_json::json!([{"type": "repository", "name": "team/other", "actions": ["pull"]}]);

        let expired = jwt(serde_json::json!({"exp": now - 600, "access": pull}));
        assert!(matches!(refused_token(&expired, &r, &user), Some(RegistryError::TokenExpired { seconds_ago, .. }) if seconds_ago >= 600));
        let wrong_repo = jwt(serde_json::json!({"exp": now + 600, "access": other}));
        let e = refused_token(&wrong_repo, &r, &user).unwrap();
        assert!(matches!(&e, RegistryError::NotAllowed { user, .. } if user == "ann"), "{e}");
        assert!(e.to_string().contains("docker login reg.example"), "{e}");
        // Anonymous: the plain "log in" refusal stays; a token that grants pull, or an opaque
        // one, explains nothing.
        assert!(refused_token(&wrong_repo, &r, &RegistryAuth::Anonymous).is_none());
        assert!(refused_token(&jwt(serde_json::json!({"exp": now + 600, "access": pull})), &r, &user).is_none());
        assert!(refused_token("opaque-token", &r, &user).is_none());
    }

    #[test]
    fn options_from_env_lists() {
        std::env::set_var("SUPERMACHINE_INSECURE_REGISTRIES", " reg:5000, ,other ");
        let o = RegistryOptions::from_env();
        std::env::remove_var("SUPERMACHINE_INSECURE_REGISTRIES");
        assert_eq!(o.insecure, ["reg:5000", "other"]);
    }
}
