//! Authentication by role, in one place for every gRPC service a process serves: a
//! tower layer in front of all routes checks the bearer token against the role the
//! method needs ([`feedgraph_proto::auth::access`]) before any handler runs.
//!
//! Invariants: tokens are kept only as SHA-256 digests and compared in constant time,
//! every configured digest each time, so neither the comparison nor the token count
//! tells an attacker how close a guess was; a token never reaches a log, a metric, an
//! error message or `--check-config`; a method nobody listed needs `admin`; with no
//! tokens configured (the embedded demo, a standalone node) every method is open, and a
//! cluster refuses to start that way unless told `insecure`.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use feedgraph_proto::auth::{Access, Bearer, Role, Secret};
use futures_util::future::{Either, Ready, ready};
use sha2::{Digest as _, Sha256};
use tonic::body::Body;

use crate::config::{AuthConfig, ConfigError};
use crate::metrics::Metrics;
use crate::reload::Reload;

/// Tokens given to a process other than through files (the environment), by role.
/// `Debug` shows `Secret(<redacted>)` for each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoleTokens {
    pub read: Vec<Secret>,
    pub write: Vec<Secret>,
    pub admin: Vec<Secret>,
}

impl RoleTokens {
    /// From `FEEDGRAPH_READ_TOKENS`, `FEEDGRAPH_WRITE_TOKENS` and
    /// `FEEDGRAPH_ADMIN_TOKENS` (comma- or newline-separated), as read by `main`.
    pub fn from_env_values(
        read: Option<&str>,
        write: Option<&str>,
        admin: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let parse = |var: &str, v: Option<&str>| {
            Secret::parse_list(v.unwrap_or_default())
                .map_err(|e| ConfigError::Invalid { field: var.into(), reason: e.to_string() })
        };
        Ok(Self {
            read: parse("FEEDGRAPH_READ_TOKENS", read)?,
            write: parse("FEEDGRAPH_WRITE_TOKENS", write)?,
            admin: parse("FEEDGRAPH_ADMIN_TOKENS", admin)?,
        })
    }

    fn of(&self, role: Role) -> &[Secret] {
        match role {
            Role::Read => &self.read,
            Role::Write => &self.write,
            Role::Admin => &self.admin,
        }
    }
}

type Digest = [u8; 32];

fn digest(token: &[u8]) -> Digest {
    Sha256::digest(token).into()
}

/// Equal digests, in time independent of where they differ.
fn same_digest(a: &Digest, b: &Digest) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The tokens a process accepts, and the one it sends to other nodes.
#[derive(Clone, Default, PartialEq)]
pub struct Keyring {
    /// (digest of a token, its role).
    digests: Vec<(Digest, Role)>,
    /// The first admin token: what this node's calls to other nodes carry.
    node: Option<Secret>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("tokens", &self.digests.len()).finish()
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token, not a bearer token, or a token nobody configured.
    Unauthenticated { needs: Role, missing: bool },
    /// A valid token of a role below the one the method needs.
    PermissionDenied { needs: Role, has: Role },
}

/// "a `read` token", "an `admin` token".
fn a_token(role: Role) -> String {
    let article = if role == Role::Admin { "an" } else { "a" };
    format!("{article} `{role}` token")
}

impl Refusal {
    pub fn status(self, path: &str) -> tonic::Status {
        match self {
            Refusal::Unauthenticated { needs, missing: true } => tonic::Status::unauthenticated(format!(
                "{path} needs {}: send `authorization: Bearer <token>` (the feedgraph CLI and feedgraph-load take --token or FEEDGRAPH_TOKEN)",
                a_token(needs)
            )),
            Refusal::Unauthenticated { needs, missing: false } => tonic::Status::unauthenticated(format!(
                "{path} needs {}; this one is not valid",
                a_token(needs)
            )),
            Refusal::PermissionDenied { needs, has } => tonic::Status::permission_denied(format!(
                "{path} needs {}; this is {}",
                a_token(needs),
                a_token(has)
            )),
        }
    }

    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Refusal::Unauthenticated { needs, .. } => ("unauthenticated", needs.as_str()),
            Refusal::PermissionDenied { needs, .. } => ("permission_denied", needs.as_str()),
        }
    }
}

impl Keyring {
    /// No tokens: every method open.
    pub fn open() -> Self {
        Self::default()
    }

    /// Reads the configured token files and adds the environment's tokens. A token in
    /// two roles, an empty file or, with any token at all, no admin token is an error.
    /// Blocking (small files, at start-up).
    pub fn load(config: &AuthConfig) -> Result<Self, ConfigError> {
        let mut tokens: Vec<(Secret, Role)> = Vec::new();
        for role in Role::ALL {
            let (field, file) = match role {
                Role::Read => ("auth.read_tokens_file", &config.read_tokens_file),
                Role::Write => ("auth.write_tokens_file", &config.write_tokens_file),
                Role::Admin => ("auth.admin_tokens_file", &config.admin_tokens_file),
            };
            if let Some(path) = file {
                let from_file = read_token_file(field, path)?;
                tokens.extend(from_file.into_iter().map(|t| (t, role)));
            }
            tokens.extend(config.env_tokens.of(role).iter().map(|t| (t.clone(), role)));
        }
        let mut digests: Vec<(Digest, Role)> = Vec::with_capacity(tokens.len());
        for (token, role) in &tokens {
            let d = digest(token.expose().as_bytes());
            match digests.iter().find(|(e, _)| *e == d) {
                Some((_, r)) if r != role => {
                    return Err(invalid(
                        "auth",
                        format!("a token is configured for both `{r}` and `{role}`; give each role its own"),
                    ));
                }
                Some(_) => {}
                None => digests.push((d, *role)),
            }
        }
        let node = tokens.iter().find(|(_, r)| *r == Role::Admin).map(|(t, _)| t.clone());
        if !digests.is_empty() && node.is_none() {
            return Err(invalid(
                "auth.admin_tokens_file",
                "tokens are configured but no admin token: admin RPCs and this node's calls to other nodes need one (or FEEDGRAPH_ADMIN_TOKENS)",
            ));
        }
        Ok(Self { digests, node })
    }

    /// Whether any token is configured (otherwise every method is open).
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// What this node's own calls to other nodes and to a standalone scorer carry.
    pub fn node_bearer(&self) -> Bearer {
        Bearer::new(self.node.as_ref())
    }

    /// The role of a presented token, comparing it with every configured one.
    fn role_of(&self, token: &[u8]) -> Option<Role> {
        let d = digest(token);
        self.digests
            .iter()
            .fold(None, |found, (e, role)| if same_digest(e, &d) { Some(*role) } else { found })
    }

    /// Whether a request for `path` with this `authorization` header may proceed.
    pub fn check(&self, path: &str, authorization: Option<&http::HeaderValue>) -> Result<(), Refusal> {
        let needs = match feedgraph_proto::auth::access(path) {
            Access::Open => return Ok(()),
            Access::Needs(role) => role,
            Access::Unknown => Role::Admin,
        };
        if !self.enabled() {
            return Ok(());
        }
        let Some(value) = authorization else {
            return Err(Refusal::Unauthenticated { needs, missing: true });
        };
        let token = value.as_bytes();
        let token = match token.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &token[7..],
            _ => return Err(Refusal::Unauthenticated { needs, missing: true }),
        };
        match self.role_of(token.trim_ascii()) {
            None => Err(Refusal::Unauthenticated { needs, missing: false }),
            Some(has) if has < needs => Err(Refusal::PermissionDenied { needs, has }),
            Some(_) => Ok(()),
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), reason: reason.into() }
}

fn read_token_file(field: &str, path: &Path) -> Result<Vec<Secret>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    let tokens = Secret::parse_list(&text).map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    if tokens.is_empty() {
        return Err(invalid(field, format!("{} holds no token", path.display())));
    }
    warn_if_others_can_read(path);
    Ok(tokens)
}

#[cfg(unix)]
fn warn_if_others_can_read(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", m.permissions().mode() & 0o777),
            "a token file is readable by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_others_can_read(_: &Path) {}

/// The accepted tokens of a running process: the token files are read again every
/// `reload_interval_ms`, so tokens are added and revoked without restart. A reload
/// that fails (a file gone, emptied or holding a bad token) keeps the tokens in force:
/// a mistake never opens the service. The token a node sends stays the one it
/// started with.
#[derive(Debug)]
pub struct Tokens {
    current: std::sync::RwLock<Arc<Keyring>>,
    config: AuthConfig,
}

impl Tokens {
    pub fn new(keyring: Keyring, config: AuthConfig) -> Arc<Self> {
        Arc::new(Self { current: std::sync::RwLock::new(Arc::new(keyring)), config })
    }

    /// The tokens in force.
    pub fn current(&self) -> Arc<Keyring> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How often the token files are read again; `None` without token files.
    pub fn reload_interval(&self) -> Option<std::time::Duration> {
        let c = &self.config;
        (c.read_tokens_file.is_some() || c.write_tokens_file.is_some() || c.admin_tokens_file.is_some())
            .then(|| std::time::Duration::from_millis(c.reload_interval_ms))
    }

    /// Reads the token files again and swaps the tokens in if they changed. Blocking.
    pub fn reload(&self) -> Reload {
        let fresh = match Keyring::load(&self.config) {
            Ok(k) => k,
            Err(e) => return Reload::Refused(e.to_string()),
        };
        if *self.current() == fresh {
            return Reload::Unchanged;
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Reload::Loaded
    }
}

/// The layer every gRPC server of this crate is built with.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Arc<Tokens>,
    metrics: Arc<Metrics>,
}

impl AuthLayer {
    pub fn new(tokens: Arc<Tokens>, metrics: Arc<Metrics>) -> Self {
        Self { tokens, metrics }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated { inner, tokens: self.tokens.clone(), metrics: self.metrics.clone() }
    }
}

/// A gRPC service behind [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct Authenticated<S> {
    inner: S,
    tokens: Arc<Tokens>,
    metrics: Arc<Metrics>,
}

impl<S> tower_service::Service<http::Request<Body>> for Authenticated<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let checked = {
            let keyring = self.tokens.current.read().unwrap_or_else(|e| e.into_inner());
            keyring.check(path, request.headers().get(http::header::AUTHORIZATION))
        };
        match checked {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(refusal) => {
                let (code, needs) = refusal.labels();
                self.metrics.auth_rejected(code, needs);
                tracing::debug!(path, code, "request refused");
                Either::Left(ready(Ok(refusal.status(path).into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s).unwrap()
    }

    fn keyring() -> Keyring {
        let config = AuthConfig {
            env_tokens: RoleTokens {
                read: vec![secret("read-token-0123456789")],
                write: vec![secret("write-token-0123456789")],
                admin: vec![secret("admin-token-0123456789"), secret("admin-token-rotated-0123")],
            },
            ..AuthConfig::default()
        };
        Keyring::load(&config).unwrap()
    }

    fn header(v: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(v).unwrap()
    }

    const FEED: &str = "/feedgraph.v1.FeedService/GetFollowingFeed";
    const WRITE: &str = "/feedgraph.v1.GraphService/Write";
    const SHARD: &str = "/feedgraph.internal.v1.ShardService/CandidateQuery";

    #[test]
    fn roles_include_the_lower_ones() {
        let k = keyring();
        let read = header("Bearer read-token-0123456789");
        let write = header("Bearer write-token-0123456789");
        let admin = header("bearer admin-token-rotated-0123");
        assert_eq!(k.check(FEED, Some(&read)), Ok(()));
        assert_eq!(
            k.check(WRITE, Some(&read)),
            Err(Refusal::PermissionDenied { needs: Role::Write, has: Role::Read })
        );
        assert_eq!(k.check(WRITE, Some(&write)), Ok(()));
        assert_eq!(
            k.check(SHARD, Some(&write)),
            Err(Refusal::PermissionDenied { needs: Role::Admin, has: Role::Write })
        );
        for path in [FEED, WRITE, SHARD, "/some.Unknown/Method"] {
            assert_eq!(k.check(path, Some(&admin)), Ok(()), "{path}");
        }
        assert_eq!(
            k.check("/some.Unknown/Method", Some(&write)),
            Err(Refusal::PermissionDenied { needs: Role::Admin, has: Role::Write })
        );
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let k = keyring();
        let missing = Err(Refusal::Unauthenticated { needs: Role::Read, missing: true });
        assert_eq!(k.check(FEED, None), missing);
        assert_eq!(k.check(FEED, Some(&header("read-token-0123456789"))), missing);
        assert_eq!(k.check(FEED, Some(&header("Basic read-token-0123456789"))), missing);
        assert_eq!(k.check(FEED, Some(&header("Bearer"))), missing);
        let wrong = Err(Refusal::Unauthenticated { needs: Role::Read, missing: false });
        assert_eq!(k.check(FEED, Some(&header("Bearer read-token-012345678"))), wrong);
        assert_eq!(k.check(FEED, Some(&header("Bearer read-token-0123456789x"))), wrong);
        assert_eq!(k.check(FEED, Some(&header("Bearer "))), wrong);
        // Health needs no token, with or without tokens configured.
        assert_eq!(k.check("/grpc.health.v1.Health/Check", None), Ok(()));
        // No tokens: open.
        assert_eq!(Keyring::open().check(SHARD, None), Ok(()));
        let status = Refusal::Unauthenticated { needs: Role::Read, missing: false }.status(FEED);
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(!status.message().contains("0123456789"));
    }

    #[test]
    fn the_node_sends_its_first_admin_token_and_never_prints_one() {
        let k = keyring();
        assert!(k.enabled());
        assert!(k.node_bearer().is_some());
        assert!(!format!("{k:?}").contains("token-"));
        assert!(!Keyring::open().node_bearer().is_some());
    }

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        let dup = AuthConfig {
            env_tokens: RoleTokens {
                read: vec![secret("same-token-0123456789")],
                admin: vec![secret("same-token-0123456789")],
                ..RoleTokens::default()
            },
            ..AuthConfig::default()
        };
        assert!(Keyring::load(&dup).unwrap_err().to_string().contains("both"));
        let no_admin = AuthConfig {
            env_tokens: RoleTokens { read: vec![secret("read-token-0123456789")], ..RoleTokens::default() },
            ..AuthConfig::default()
        };
        assert!(Keyring::load(&no_admin).unwrap_err().to_string().contains("admin"));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nothing yet\n").unwrap();
        let cfg = AuthConfig { admin_tokens_file: Some(empty), ..AuthConfig::default() };
        assert!(Keyring::load(&cfg).unwrap_err().to_string().contains("holds no token"));
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let cfg = AuthConfig { admin_tokens_file: Some(short), ..AuthConfig::default() };
        let e = Keyring::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("at least") && !e.contains("abc"), "{e}");
        let good = dir.path().join("admin");
        std::fs::write(&good, "admin-from-file-0123456789\n").unwrap();
        let cfg = AuthConfig { admin_tokens_file: Some(good), ..AuthConfig::default() };
        let k = Keyring::load(&cfg).unwrap();
        assert_eq!(k.check(SHARD, Some(&header("Bearer admin-from-file-0123456789"))), Ok(()));
    }
}
