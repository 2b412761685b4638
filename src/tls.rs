//! Mutual TLS for the agent API on TCP (`agent --listen`).
//!
//! - The agent presents a certificate for the fixed DNS name [`AGENT_SERVER_NAME`] and requires
//!   a client certificate signed by a CA in `--tls-client-ca` (a bundle: during a rotation it
//!   holds the old and the new CA). Clients verify the agent against that fixed name whatever
//!   address they dial, so certificates need not know node addresses.
//! - The handshake happens here, in front of tonic ([`incoming`]), so that every refused client
//!   is logged with its address and the reason; no key material is ever logged.
//! - Clients (`csi controller`, `fc`) take `--agent-tls-ca/--agent-tls-cert/--agent-tls-key`
//!   ([`ClientArgs`]) and use them for `https://` agent URLs.

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The DNS name in every agent's server certificate, verified by every client.
pub const AGENT_SERVER_NAME: &str = "flashcopy-agent";

/// A client that has not finished its handshake by then is dropped (and logged).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up. Messages name files, never their contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong (no contents).
        why: String,
    },
    /// The files do not make a valid configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Flags missing or in conflict.
    #[error("{0}")]
    Usage(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// The certificates in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            why: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            why: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    // The parser's error names the PEM section at most, never key bytes.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.into(),
        why: format!("no private key: {e}"),
    })
}

/// The agent's server side: its certificate chain and key, and the CA bundle that signs
/// client certificates. Clients without a certificate from one of those CAs are refused.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in load_certs(client_ca)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            path: client_ca.into(),
            why: format!("not a CA certificate: {e}"),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(format!("{} and {}: {e}", cert.display(), key.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and completes their TLS handshakes, yielding only the clients
/// that presented a valid certificate. Refusals are logged with the peer and the reason.
/// Stops accepting when `stop` turns true (or tonic drops the stream).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: wait rather than spin or stop serving.
                        tracing::warn!(error = %e, "accepting a TCP connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                // (The watch guard is not Send: drop it inside.)
                () = async { let _ = stop.wait_for(|s| *s).await; } => break,
                () = tx.closed() => break,
            };
            tokio::spawn(handshake(acceptor.clone(), tcp, peer, tx.clone()));
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            tracing::debug!(peer = %peer, "TLS client accepted");
            let _ = tx.send(Ok(stream)).await;
        }
        // rustls reasons: "peer sent no certificates", "invalid peer certificate: UnknownIssuer",
        // "... Expired ...", "received corrupt message" (plaintext). No key material in them.
        Ok(Err(e)) => {
            tracing::warn!(peer = %peer, reason = %e, "refused a client: TLS handshake failed")
        }
        Err(_) => tracing::warn!(
            peer = %peer,
            reason = "no TLS handshake in time",
            timeout_secs = HANDSHAKE_TIMEOUT.as_secs(),
            "refused a client: TLS handshake failed"
        ),
    }
}

/// Client flags for `https://` agents (same names in `csi controller` and `fc`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClientArgs {
    /// CA bundle (PEM) that signs agent certificates; https:// agents are verified against it
    /// under the name flashcopy-agent.
    #[arg(long, value_name = "FILE", global = true)]
    pub agent_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to https:// agents.
    #[arg(long, value_name = "FILE", global = true)]
    pub agent_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --agent-tls-cert.
    #[arg(long, value_name = "FILE", global = true)]
    pub agent_tls_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The client TLS settings, or None when no flag is given; all three or none.
    pub fn load(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        match (
            &self.agent_tls_ca,
            &self.agent_tls_cert,
            &self.agent_tls_key,
        ) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => {
                // Parse now so that a bad file fails at start, not at the first call.
                load_certs(ca)?;
                load_certs(cert)?;
                load_key(key)?;
                Ok(Some(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(read(ca)?))
                        .identity(Identity::from_pem(read(cert)?, read(key)?))
                        .domain_name(AGENT_SERVER_NAME),
                ))
            }
            _ => Err(TlsError::Usage(
                "--agent-tls-ca, --agent-tls-cert and --agent-tls-key go together".into(),
            )),
        }
    }
}

/// An endpoint for an agent URL: `https://` uses `tls` (which must be given), other schemes
/// connect as they are.
pub fn endpoint(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, String> {
    let ep = Endpoint::from_shared(url.to_string()).map_err(|e| format!("{url}: {e}"))?;
    if !url.starts_with("https://") {
        return Ok(ep);
    }
    let tls = tls.ok_or_else(|| {
        format!("{url}: https:// agents need --agent-tls-ca, --agent-tls-cert and --agent-tls-key")
    })?;
    ep.tls_config(tls.clone())
        .map_err(|e| format!("{url}: TLS: {e}"))
}
