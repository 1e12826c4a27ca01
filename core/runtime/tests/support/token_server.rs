//! A minimal token server for a `docker-registry` configured with `auth: token:`, on
//! 127.0.0.1 over plain HTTP: `GET /token?service=S&scope=repository:NAME:ACTIONS` with
//! optional Basic credentials answers `{"token": JWT}`, an RS256 JWT signed with a test key
//! whose self-signed certificate is the registry's `rootcertbundle` (sent in the `x5c` header).
//!
//! Policy: repositories under `public/` may be pulled by anyone; the pusher (`smk`) may pull
//! and push everything; any other listed user gets a valid token that grants nothing outside
//! `public/`. Wrong credentials get 401. With `set_expired(true)` tokens are issued already
//! expired (an hour ago, beyond the registry's leeway). Every request is recorded.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::json;

pub const TOKEN_SERVICE: &str = "smk-registry";
pub const TOKEN_ISSUER: &str = "smk-token-issuer";
/// The user allowed to push (and pull) every repository.
pub const PUSHER: (&str, &str) = ("smk", "s3cret");

/// One token request as the server saw it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The Basic user, if credentials were sent and accepted.
    pub user: Option<String>,
    pub scopes: Vec<String>,
    pub status: u16,
}

struct State {
    users: HashMap<String, String>,
    key: ring::rsa::KeyPair,
    cert_der: Vec<u8>,
    expired: AtomicBool,
    requests: Mutex<Vec<TokenRequest>>,
}

pub struct TokenServer {
    pub realm: String,
    /// The signing key's certificate (PEM), for the registry's `rootcertbundle`.
    pub cert: PathBuf,
    state: Arc<State>,
}

impl TokenServer {
    /// Starts the server with the pusher and `users` (user, password) as known accounts;
    /// key material goes to `dir`.
    pub fn start(dir: &Path, users: &[(&str, &str)]) -> TokenServer {
        super::require("openssl", "openssl");
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "token.key", "-out", "token.pem",
              "-days", "2", "-subj", "/CN=smk token issuer"]);
        run(&["pkcs8", "-topk8", "-nocrypt", "-in", "token.key", "-outform", "DER", "-out", "token.pk8"]);
        run(&["x509", "-in", "token.pem", "-outform", "DER", "-out", "token.der"]);
        let key = ring::rsa::KeyPair::from_pkcs8(&std::fs::read(dir.join("token.pk8")).unwrap()).unwrap();
        let state = Arc::new(State {
            users: [PUSHER].iter().chain(users).map(|(u, p)| (u.to_string(), p.to_string())).collect(),
            key,
            cert_der: std::fs::read(dir.join("token.der")).unwrap(),
            expired: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(&s, conn));
            }
        });
        TokenServer { realm, cert: dir.join("token.pem"), state }
    }

    /// The registry's `auth:` section that sends clients here.
    pub fn registry_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            self.cert.display()
        )
    }

    pub fn set_expired(&self, on: bool) {
        self.state.expired.store(on, Ordering::SeqCst);
    }

    /// The requests so far, and forgets them.
    pub fn take_requests(&self) -> Vec<TokenRequest> {
        std::mem::take(&mut self.state.requests.lock().unwrap())
    }
}

fn serve(s: &State, mut conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let (status, body) = answer(s, &target, authorization.as_deref());
    let reason = if status == 200 { "OK" } else { "Unauthorized" };
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn answer(s: &State, target: &str, authorization: Option<&str>) -> (u16, String) {
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let scopes: Vec<String> = params.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.clone()).collect();
    let basic = authorization
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|t| t.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())));
    let user = match basic {
        Some((u, p)) if s.users.get(&u) == Some(&p) => Some(u),
        Some(_) => {
            s.requests.lock().unwrap().push(TokenRequest { user: None, scopes, status: 401 });
            return (401, json!({"details": "invalid username or password"}).to_string());
        }
        None => None,
    };
    let access: Vec<_> = scopes
        .iter()
        .flat_map(|sc| sc.split(' '))
        .filter_map(|sc| {
            let (kind, rest) = sc.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|a| match user.as_deref() {
                    Some(u) if u == PUSHER.0 => true,
                    _ => *a == "pull" && name.starts_with("public/"),
                })
                .collect();
            (!granted.is_empty()).then(|| json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    s.requests.lock().unwrap().push(TokenRequest { user: user.clone(), scopes, status: 200 });
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (iat, exp) = match s.expired.load(Ordering::SeqCst) {
        true => (now - 7200, now - 3600),
        false => (now - 5, now + 300),
    };
    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [STANDARD.encode(&s.cert_der)]});
    let claims = json!({
        "iss": TOKEN_ISSUER, "sub": user.unwrap_or_default(), "aud": TOKEN_SERVICE,
        "iat": iat, "nbf": iat, "exp": exp, "jti": format!("{now}-{}", rand_u64()), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0u8; s.key.public().modulus_len()];
    s.key
        .sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), signing_input.as_bytes(), &mut sig)
        .unwrap();
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig));
    (200, json!({"token": token, "access_token": token, "expires_in": exp - now}).to_string())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u64::from_le_bytes(b)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
