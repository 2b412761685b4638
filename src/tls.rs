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
//! - Files are re-read while running ([`ServerTls`], [`ClientTls`]): a rotation (a Kubernetes
//!   Secret updated in place) takes effect for new connections without a restart. A half-written
//!   or mismatched set is logged and the previous one kept, so a rotation never stops service.
//! - At most [`MAX_PENDING_HANDSHAKES`] handshakes run at once, and at most
//!   [`MAX_PENDING_PER_ADDRESS`] from one IP address: a flood of idle connections can neither
//!   exhaust the agent's memory or tasks nor crowd out other clients; the excess is closed at
//!   once.

use parking_lot::Mutex;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
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

/// Handshakes in progress at most; a connection beyond them is closed unanswered.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Handshakes in progress from one IP address at most (the controller needs one at a time).
pub const MAX_PENDING_PER_ADDRESS: usize = 8;

/// How often, at most, certificate files are looked at again for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

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

/// A fingerprint of the bytes of some files (None: one could not be read).
fn fingerprint(paths: &[&Path]) -> Option<u64> {
    let mut h = DefaultHasher::new();
    for p in paths {
        std::fs::read(p).ok()?.hash(&mut h);
    }
    Some(h.finish())
}

/// A value loaded from files and loaded again when their contents change: each check (at
/// most every [`RELOAD_CHECK`]) compares the files' fingerprint with the one of the set in use
/// and of the last set that failed to load, so a bad set is logged once and skipped.
#[derive(Debug)]
pub struct Reloading<T> {
    files: Vec<PathBuf>,
    /// What the log lines call the value ("TLS", "agent client TLS").
    what: &'static str,
    load: fn(&[PathBuf]) -> Result<T, TlsError>,
    state: Mutex<ReloadState<T>>,
}

#[derive(Debug)]
struct ReloadState<T> {
    value: T,
    in_use: u64,
    failed: Option<u64>,
    checked: Instant,
}

impl<T: Clone> Reloading<T> {
    fn new(
        files: Vec<PathBuf>,
        what: &'static str,
        load: fn(&[PathBuf]) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let value = load(&files)?;
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let state = ReloadState {
            value,
            in_use: fingerprint(&refs).unwrap_or(0),
            failed: None,
            checked: Instant::now(),
        };
        Ok(Self {
            files,
            what,
            load,
            state: Mutex::new(state),
        })
    }

    /// The value in use.
    pub fn current(&self) -> T {
        self.state.lock().value.clone()
    }

    /// Loads the files again if they changed; true when a new value is now in use. A set that
    /// does not load is logged and the previous value kept.
    pub fn refresh(&self) -> bool {
        let mut st = self.state.lock();
        if st.checked.elapsed() < RELOAD_CHECK {
            return false;
        }
        st.checked = Instant::now();
        let refs: Vec<&Path> = self.files.iter().map(PathBuf::as_path).collect();
        let Some(fp) = fingerprint(&refs) else {
            return false;
        };
        if fp == st.in_use || Some(fp) == st.failed {
            return false;
        }
        let names: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        match (self.load)(&self.files) {
            Ok(v) => {
                tracing::info!(files = %names.join(", "), "{} certificates reloaded", self.what);
                st.value = v;
                st.in_use = fp;
                st.failed = None;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "changed {} files do not load; still using the previous ones", self.what);
                st.failed = Some(fp);
                false
            }
        }
    }
}

/// The agent's server TLS, re-read when its files change.
pub type ServerTls = Reloading<Arc<ServerConfig>>;

impl ServerTls {
    /// Loads the files now (an error here stops the agent before it binds).
    pub fn load(cert: &Path, key: &Path, client_ca: &Path) -> Result<Arc<Self>, TlsError> {
        let files = vec![cert.into(), key.into(), client_ca.into()];
        Ok(Arc::new(Self::new(files, "TLS", |f| {
            server_config(&f[0], &f[1], &f[2])
        })?))
    }

    /// The configuration for the next handshake: the files' current contents when they changed
    /// and load, the previous configuration otherwise.
    pub fn for_handshake(&self) -> Arc<ServerConfig> {
        self.refresh();
        self.current()
    }
}

/// Accepts TCP connections and completes their TLS handshakes, yielding only the clients
/// that presented a valid certificate. Refusals are logged with the peer and the reason.
/// Stops accepting when `stop` turns true (or tonic drops the stream).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let pending = Arc::new(Pending::default());
    let mut shed = Shed::default();
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
            let Some(permit) = Pending::enter(&pending, peer.ip()) else {
                drop(tcp);
                shed.one(peer);
                continue;
            };
            let acceptor = TlsAcceptor::from(tls.for_handshake());
            let tx = tx.clone();
            tokio::spawn(async move {
                handshake(acceptor, tcp, peer, tx).await;
                drop(permit);
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Handshakes in progress, in all and per peer address.
#[derive(Default)]
struct Pending(Mutex<(usize, HashMap<IpAddr, usize>)>);

/// One handshake counted in [`Pending`] until dropped.
struct Permit(Arc<Pending>, IpAddr);

impl Pending {
    fn enter(this: &Arc<Self>, ip: IpAddr) -> Option<Permit> {
        let mut g = this.0.lock();
        let (total, by_ip) = &mut *g;
        let mine = by_ip.entry(ip).or_default();
        if *total >= MAX_PENDING_HANDSHAKES || *mine >= MAX_PENDING_PER_ADDRESS {
            if *mine == 0 {
                by_ip.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Permit(this.clone(), ip))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut g = self.0.0.lock();
        let (total, by_ip) = &mut *g;
        *total -= 1;
        if let Some(n) = by_ip.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.1);
            }
        }
    }
}

/// Connections closed because too many handshakes were pending: logged at most every 10 s,
/// with the count, so that a flood does not flood the log too.
#[derive(Default)]
struct Shed {
    count: u64,
    logged: Option<Instant>,
}

impl Shed {
    fn one(&mut self, peer: SocketAddr) {
        self.count += 1;
        if self
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                peer = %peer,
                closed = self.count,
                limit = MAX_PENDING_HANDSHAKES,
                per_address = MAX_PENDING_PER_ADDRESS,
                "closing connections: too many TLS handshakes pending"
            );
            self.logged = Some(Instant::now());
            self.count = 0;
        }
    }
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
        self.files()?
            .map(|(ca, cert, key)| client_config(&ca, &cert, &key))
            .transpose()
    }

    /// As [`Self::load`], re-reading the files when they change (long-running clients).
    pub fn reloading(&self) -> Result<Option<ClientTls>, TlsError> {
        let Some((ca, cert, key)) = self.files()? else {
            return Ok(None);
        };
        let files = vec![ca, cert, key];
        Ok(Some(Reloading::new(files, "agent client TLS", |f| {
            client_config(&f[0], &f[1], &f[2])
        })?))
    }

    fn files(&self) -> Result<Option<(PathBuf, PathBuf, PathBuf)>, TlsError> {
        match (
            &self.agent_tls_ca,
            &self.agent_tls_cert,
            &self.agent_tls_key,
        ) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca.clone(), cert.clone(), key.clone()))),
            _ => Err(TlsError::Usage(
                "--agent-tls-ca, --agent-tls-cert and --agent-tls-key go together".into(),
            )),
        }
    }
}

fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<ClientTlsConfig, TlsError> {
    // Parse now so that a bad file fails here, not at the first call.
    load_certs(ca)?;
    load_certs(cert)?;
    load_key(key)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .domain_name(AGENT_SERVER_NAME))
}

/// Client TLS whose files are re-read when they change: the CSI controller keeps channels to
/// agents for its lifetime, and a rotation must reach them without a restart (on `refresh`
/// returning true, channels made with the previous set are remade).
pub type ClientTls = Reloading<ClientTlsConfig>;

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
