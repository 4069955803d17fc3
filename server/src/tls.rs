//! TLS on the gRPC port (rustls with ring): the certificate and key are re-read from
//! their files while serving, so a renewed certificate needs no restart; with
//! `client_auth`, every client (other nodes included) must present a certificate signed
//! by the configured CA (mutual TLS).
//!
//! Invariants: handshakes run in their own tasks, bounded in time (3 s), in number
//! (1,024) and per client address (64, past which its new connections are closed at
//! once), so one slow or hostile host cannot hold up the accept loop for others; a new
//! certificate that does not load (unreadable, mismatched key, not PEM) is logged and
//! counted, and the one in service stays; ALPN offers only `h2` (gRPC).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{ConfigError, TlsConfig};
use crate::metrics::Metrics;
use crate::reload::Reload;

/// A handshake not done within this is dropped (a peer on loopback or a LAN needs
/// milliseconds).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes in progress at once; past it the accept loop waits.
const MAX_HANDSHAKES: usize = 1024;
/// Handshakes in progress from one IP address; past it its new connections are
/// closed at once, so one host cannot take every slot.
const MAX_HANDSHAKES_PER_IP: u32 = 64;

/// ring, which tonic's client side also uses. rustls deprecates it for lacking
/// post-quantum key exchange; aws-lc-rs has it but needs cmake and a long C build.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), reason: reason.into() }
}

/// The bytes of the certificate and key files, as last loaded.
type Loaded = (Vec<u8>, Vec<u8>);

/// Parses a certificate chain and its key (PEM), and checks that they match.
fn certified_key(cert_pem: &[u8], key_pem: &[u8], provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
    let signing = provider.key_provider.load_private_key(key).map_err(|e| format!("key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| format!("the key does not match the certificate: {e}"))?;
    Ok(certified)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

/// The server certificate, swapped in place when its files change.
#[derive(Debug)]
struct Reloading {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Loaded)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone())
    }
}

/// A node's (or scorer's) server-side TLS.
#[derive(Debug)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    certificate: Arc<Reloading>,
    reload_interval: Duration,
}

impl ServerTls {
    /// The server TLS of `config`, or `None` when it has no certificate. Blocking
    /// (reads the files).
    pub fn load(config: &TlsConfig) -> Result<Option<Arc<ServerTls>>, ConfigError> {
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Ok(None);
        };
        let provider = provider();
        let files = (
            read(cert_file).map_err(|e| invalid("tls.cert_file", e))?,
            read(key_file).map_err(|e| invalid("tls.key_file", e))?,
        );
        let key = certified_key(&files.0, &files.1, &provider).map_err(|e| invalid("tls.cert_file", e))?;
        let certificate = Arc::new(Reloading {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            current: RwLock::new((Arc::new(key), files)),
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("tls", e.to_string()))?;
        let builder = match (&config.ca_file, config.client_auth) {
            (Some(ca), true) => {
                let mut roots = rustls::RootCertStore::empty();
                let pem = read(ca).map_err(|e| invalid("tls.ca_file", e))?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| invalid("tls.ca_file", e.to_string()))?;
                    roots.add(cert).map_err(|e| invalid("tls.ca_file", e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(invalid("tls.ca_file", format!("{} holds no certificate", ca.display())));
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| invalid("tls.ca_file", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            (None, true) => {
                return Err(invalid("tls.client_auth", "needs tls.ca_file to verify clients against"));
            }
            (_, false) => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(certificate.clone());
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(ServerTls {
            config: Arc::new(server),
            certificate,
            reload_interval: Duration::from_millis(config.reload_interval_ms),
        })))
    }

    /// Re-reads the certificate and key; swaps them in if they changed and load.
    /// Blocking.
    pub fn reload_if_changed(&self) -> Reload {
        let c = &self.certificate;
        let files = match (read(&c.cert_file), read(&c.key_file)) {
            (Ok(cert), Ok(key)) => (cert, key),
            (Err(e), _) | (_, Err(e)) => return Reload::Refused(e),
        };
        if c.current.read().unwrap_or_else(|e| e.into_inner()).1 == files {
            return Reload::Unchanged;
        }
        match certified_key(&files.0, &files.1, &provider()) {
            Ok(key) => {
                *c.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(key), files);
                Reload::Loaded
            }
            // A half-written pair (the certificate replaced, the key not yet) lands
            // here too: the next check loads it once both are in place.
            Err(e) => Reload::Refused(e),
        }
    }

    /// How often the files are checked.
    pub fn reload_interval(&self) -> Duration {
        self.reload_interval
    }

    /// Accepts TCP connections on `listener` and yields them once their TLS handshake
    /// is done. Ends when the stream is dropped (the server stopped).
    pub fn incoming(
        &self,
        listener: TcpListener,
        metrics: Arc<Metrics>,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(self.config.clone());
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let per_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>> = Arc::default();
        tokio::spawn(async move {
            loop {
                // The server stopping (the stream dropped) ends the loop whatever it
                // waits for, and the listener closes with it.
                let permit = tokio::select! {
                    _ = tx.closed() => return,
                    p = handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                };
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors, usually: let some close.
                            tracing::warn!(error = %e, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                let ip = peer.ip();
                let admitted = {
                    let mut counts = per_ip.lock().unwrap_or_else(|e| e.into_inner());
                    let n = counts.entry(ip).or_insert(0);
                    *n += 1;
                    *n <= MAX_HANDSHAKES_PER_IP
                };
                let release = PerIp { counts: per_ip.clone(), ip };
                if !admitted {
                    metrics.tls_handshake_failed();
                    tracing::debug!(%peer, "too many TLS handshakes from this address; connection closed");
                    continue;
                }
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(release);
                    match handshake {
                        Ok(Ok(stream)) => {
                            drop(permit);
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => {
                            metrics.tls_handshake_failed();
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics.tls_handshake_failed();
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// Counts one handshake in progress from `ip` until dropped.
struct PerIp {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>>,
    ip: std::net::IpAddr,
}

impl Drop for PerIp {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The client side of a node's TLS: trust `ca_file`, present this node's own
/// certificate (for servers that ask, with `client_auth`). Blocking.
pub fn client_config(config: &TlsConfig) -> Result<Option<tonic::transport::ClientTlsConfig>, ConfigError> {
    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else { return Ok(None) };
    let Some(ca) = &config.ca_file else { return Ok(None) };
    feedgraph_proto::auth::client_tls(ca, Some((cert, key)))
        .map(Some)
        .map_err(|e| invalid("tls.ca_file", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_certificate_is_reloaded_when_its_files_change_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("node.crt"), dir.path().join("node.key"));
        let (c1, k1) = pair("one.test");
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let config =
            TlsConfig { cert_file: Some(cert.clone()), key_file: Some(key.clone()), ..TlsConfig::default() };
        let tls = ServerTls::load(&config).unwrap().unwrap();
        assert_eq!(tls.reload_if_changed(), Reload::Unchanged);
        let served = || tls.certificate.current.read().unwrap().0.cert[0].clone();
        let first = served();
        // A new certificate with the old key: refused, the old pair keeps serving.
        let (c2, k2) = pair("two.test");
        std::fs::write(&cert, &c2).unwrap();
        assert!(matches!(tls.reload_if_changed(), Reload::Refused(e) if e.contains("does not match")));
        assert_eq!(served(), first);
        // Its key too: loaded.
        std::fs::write(&key, &k2).unwrap();
        assert_eq!(tls.reload_if_changed(), Reload::Loaded);
        assert_ne!(served(), first);
        std::fs::write(&key, "not a key").unwrap();
        assert!(matches!(tls.reload_if_changed(), Reload::Refused(_)));
        // Bad files at start are configuration errors naming the field.
        let e = ServerTls::load(&config).unwrap_err().to_string();
        assert!(e.starts_with("`tls.cert_file`") && e.contains("key:"), "{e}");
        std::fs::write(&key, &k2).unwrap();
        let e = ServerTls::load(&TlsConfig { client_auth: true, ..config.clone() }).unwrap_err().to_string();
        assert!(e.starts_with("`tls.client_auth`"), "{e}");
        let not_a_ca = dir.path().join("empty.pem");
        std::fs::write(&not_a_ca, "").unwrap();
        let mutual = TlsConfig { client_auth: true, ca_file: Some(not_a_ca), ..config.clone() };
        let e = ServerTls::load(&mutual).unwrap_err().to_string();
        assert!(e.starts_with("`tls.ca_file`") && e.contains("no certificate"), "{e}");
        assert!(ServerTls::load(&config).unwrap().is_some());
    }
}
