//! Who may call what: the role each RPC needs, bearer tokens, and the credentials and
//! channel every client of this workspace (nodes, CLI, load tool, tests) sends them
//! with (a token, and TLS settings for a server with TLS).
//!
//! Roles are ordered: `read` (feeds, pins, follows) < `write` (graph writes, signals)
//! < `admin` (admin, replication, the shard and scorer services between nodes). A
//! token of a role may call whatever needs that role or a lower one. The mapping is
//! part of the contract, so it lives next to the `.proto` files; a test checks that
//! every method of the descriptor set has an explicit entry.

use std::fmt;
use std::sync::Arc;

use std::path::Path;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// What a token may do. Ordered: a higher role includes the lower ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Read, Role::Write, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What calling a gRPC path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No token: health checks, so that probes and load balancers need no secret.
    Open,
    /// A token of this role or a higher one.
    Needs(Role),
    /// A path this contract does not know. Servers treat it as `Needs(Admin)`: what
    /// nobody listed, nobody but an operator reaches.
    Unknown,
}

/// The access a gRPC path (`/package.Service/Method`) needs.
pub fn access(path: &str) -> Access {
    use Role::{Admin, Read, Write};
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Access::Unknown;
    };
    let role = match (service, method) {
        ("grpc.health.v1.Health", "Check" | "Watch") => return Access::Open,
        // v1alpha is not served; listed so that a `read` client (grpcurl tries both)
        // gets UNIMPLEMENTED, not PERMISSION_DENIED.
        (
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ) => Read,
        ("feedgraph.v1.FeedService", "GetFollowingFeed" | "GetHomeFeed") => Read,
        ("feedgraph.v1.GraphService", "GetPin" | "GetFollows") => Read,
        ("feedgraph.v1.GraphService", "Write" | "UpsertSignals") => Write,
        (
            "feedgraph.internal.v1.AdminService",
            "ListReplicas" | "TransitionReplica" | "CreateCheckpoint" | "FenceReplica",
        ) => Admin,
        ("feedgraph.internal.v1.ReplicationService", "GetUpdates" | "StreamCheckpoint") => Admin,
        ("feedgraph.internal.v1.ScorerService", "ScoreBatch" | "ListModels") => Admin,
        (
            "feedgraph.internal.v1.ShardService",
            "CandidateQuery" | "CandidateQueries" | "ApplyWrites" | "GetFollows" | "GetPin"
            | "GetBoardOwners" | "EngagedTopics",
        ) => Admin,
        _ => return Access::Unknown,
    };
    Access::Needs(role)
}

/// A bearer token. Its `Debug` and `Display` never show it, so it cannot reach a log
/// or `--check-config` by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

/// Why a string cannot be a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a token must be at least {MIN_TOKEN_LEN} characters long (this one has {0})")]
    TooShort(usize),
    #[error("a token may hold only visible ASCII characters (no spaces or control characters)")]
    NotVisibleAscii,
    #[error("a token may not contain `,` or start with `#` (token lists use them)")]
    ListSyntax,
}

/// Shortest token accepted: guessing one must be hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

impl Secret {
    /// A token: visible ASCII (it travels in an HTTP header), at least
    /// [`MIN_TOKEN_LEN`] characters.
    pub fn new(token: &str) -> Result<Self, TokenError> {
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotVisibleAscii);
        }
        // Token lists split on commas and skip `#` lines: such a token could be sent
        // but never configured.
        if token.contains(',') || token.starts_with('#') {
            return Err(TokenError::ListSyntax);
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort(token.len()));
        }
        Ok(Self(token.into()))
    }

    /// The token itself, for comparing or sending; never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Several tokens, one per line or separated by commas (blank lines and lines
    /// starting with `#` are skipped), as a token file or an environment variable
    /// holds them.
    pub fn parse_list(text: &str) -> Result<Vec<Secret>, TokenError> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Adds `authorization: Bearer <token>` to every request of a client; without a
/// token it sends none (a server without tokens configured).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// No token.
    pub fn none() -> Self {
        Self(None)
    }

    pub fn new(token: Option<&Secret>) -> Self {
        // A `Secret` is visible ASCII, which is always a valid header value.
        Self(token.and_then(|t| format!("Bearer {}", t.expose()).parse().ok()))
    }

    /// From a string given by a user (`--token`, `FEEDGRAPH_TOKEN`); empty is none.
    pub fn from_user(token: Option<&str>) -> Result<Self, TokenError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Self::none()),
            Some(t) => Ok(Self::new(Some(&Secret::new(t)?))),
        }
    }

    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(<redacted>)" } else { "Bearer(none)" })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel whose requests carry a bearer token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// What a client of this workspace presents to a server: a bearer token and, for a
/// server with TLS, the roots it trusts (and its own certificate, for mutual TLS).
/// `Debug` shows neither the token nor the private key.
#[derive(Clone, Default)]
pub struct Credentials {
    pub bearer: Bearer,
    pub tls: Option<ClientTlsConfig>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer", &self.bearer)
            .field("tls", &if self.tls.is_some() { "<configured>" } else { "none" })
            .finish()
    }
}

/// Why no endpoint could be made for an address.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("`{0}` is an http:// address, but this client uses TLS: tokens must not travel in clear text")]
    PlaintextWithTls(String),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

impl Credentials {
    /// No token, plaintext.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn new(bearer: Bearer, tls: Option<ClientTlsConfig>) -> Self {
        Self { bearer, tls }
    }

    /// `host:port` (or a URL, kept as it is) → the URL to dial: `https://` with TLS.
    pub fn url(&self, addr: &str) -> String {
        if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_owned()
        } else if self.tls.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    }

    /// The endpoint of `addr`, with TLS when configured (the server's name is the
    /// address's host: its certificate must name that host or IP address). An
    /// explicit `http://` address with TLS configured is refused: tonic would dial it
    /// in plaintext, token and all.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, EndpointError> {
        let url = self.url(addr);
        if self.tls.is_some() && url.starts_with("http://") {
            return Err(EndpointError::PlaintextWithTls(addr.to_owned()));
        }
        let endpoint = Endpoint::from_shared(url)?;
        Ok(match &self.tls {
            Some(tls) => endpoint.tls_config(tls.clone())?,
            None => endpoint,
        })
    }

    /// `channel` with this bearer on every request.
    pub fn authorize(&self, channel: Channel) -> AuthChannel {
        with_bearer(channel, self.bearer.clone())
    }
}

/// A client TLS configuration from PEM files: the CA that signs the servers'
/// certificates and, for mutual TLS, this client's certificate chain and key. A CA
/// file without a certificate is an error (tonic would skip what it cannot parse, and
/// every handshake would fail later).
pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> std::io::Result<ClientTlsConfig> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", p.display())))
    };
    let ca_pem = read(ca)?;
    if !String::from_utf8_lossy(&ca_pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds no PEM certificate", ca.display()),
        ));
    }
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// `channel` with `bearer` on every request.
pub fn with_bearer(channel: Channel, bearer: Bearer) -> AuthChannel {
    InterceptedService::new(channel, bearer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_method_of_the_contract_has_an_explicit_access() {
        let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    let expected = match file.package() {
                        // Between nodes and operators: admin, whatever the method.
                        "feedgraph.internal.v1" => Role::Admin,
                        "feedgraph.v1" => match method.name() {
                            "Write" | "UpsertSignals" => Role::Write,
                            "GetFollowingFeed" | "GetHomeFeed" | "GetPin" | "GetFollows" => Role::Read,
                            other => {
                                panic!("{other}: a new public method; decide its role here and in access")
                            }
                        },
                        other => panic!("package {other}: decide its roles"),
                    };
                    assert_eq!(access(&path), Access::Needs(expected), "{path}");
                    methods += 1;
                }
            }
        }
        assert!(methods >= 21, "only {methods} methods in the descriptor set");
    }

    #[test]
    fn roles_of_the_public_and_internal_services() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(access("/feedgraph.v1.FeedService/GetHomeFeed"), Access::Needs(Role::Read));
        assert_eq!(access("/feedgraph.v1.GraphService/GetPin"), Access::Needs(Role::Read));
        assert_eq!(access("/feedgraph.v1.GraphService/Write"), Access::Needs(Role::Write));
        assert_eq!(access("/feedgraph.v1.GraphService/UpsertSignals"), Access::Needs(Role::Write));
        assert_eq!(access("/feedgraph.internal.v1.ShardService/GetPin"), Access::Needs(Role::Admin));
        assert_eq!(access("/feedgraph.internal.v1.ScorerService/ScoreBatch"), Access::Needs(Role::Admin));
        for odd in ["", "/", "x", "/feedgraph.v1.FeedService", "/feedgraph.v1.FeedService/Nope", "//"] {
            assert_eq!(access(odd), Access::Unknown, "{odd:?}");
        }
        assert!(Role::Read < Role::Write && Role::Write < Role::Admin);
    }

    #[test]
    fn tokens_are_validated_and_never_printed() {
        assert_eq!(Secret::new("short"), Err(TokenError::TooShort(5)));
        assert_eq!(Secret::new("has a space in the middle"), Err(TokenError::NotVisibleAscii));
        assert_eq!(Secret::new("nön-ascii-token-xxxxxxxx"), Err(TokenError::NotVisibleAscii));
        assert_eq!(Secret::new("comma,in-the-token-xxxxxx"), Err(TokenError::ListSyntax));
        assert_eq!(Secret::new("#looks-like-a-comment-xxx"), Err(TokenError::ListSyntax));
        let s = Secret::new("0123456789abcdef-secret").unwrap();
        assert!(!format!("{s:?}").contains("secret"));
        let b = Bearer::new(Some(&s));
        assert!(!format!("{b:?}").contains("secret"));
        let list = Secret::parse_list(
            "# rotation\n0123456789abcdef-one\n\n0123456789abcdef-two, 0123456789abcdef-three\n",
        )
        .unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[2].expose(), "0123456789abcdef-three");
        assert!(Bearer::from_user(Some("  ")).unwrap().0.is_none());
        assert!(Bearer::from_user(Some("tiny")).is_err());
    }

    #[test]
    fn the_bearer_sets_the_authorization_header() {
        let mut b = Bearer::new(Some(&Secret::new("0123456789abcdef-secret").unwrap()));
        let r = b.call(tonic::Request::new(())).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer 0123456789abcdef-secret");
        let r = Bearer::none().call(tonic::Request::new(())).unwrap();
        assert!(r.metadata().get("authorization").is_none());
    }
}
