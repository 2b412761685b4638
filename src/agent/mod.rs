//! The node agent (`flashcopy-csi agent`): one pool of volumes with FlashCopy mappings and
//! consistency groups, served as the agent gRPC API (`proto/agent/v1/agent.proto`) and, per
//! volume, as an NBD export named by the volume id.
//!
//! - The pool is a directory of sparse files (`DIR/volumes`) or, with `--device`, a list of raw
//!   block devices (one per volume, [`devices::DeviceBackend`]); metadata is in `DIR/meta`.
//! - The API is async (tokio + tonic on a Unix socket, and on TCP
//!   with mutual TLS when asked: [`crate::tls`]); every pool call runs on
//!   the blocking pool ([`service`]), and errors become statuses in one place ([`status`]).
//! - Background copy and cleaning run at each mapping's rate ([`workers`]); state changes are
//!   published as a server stream ([`events`]).
//! - An atomic group start pauses, drains and flushes I/O on every member source, switches and
//!   resumes ([`crate::volume::Pool::start_group`]); the pause is measured and reported.
//! - A copy that fails on a store stops its mapping (FLASHCOPY.md §2.3 `IoError`); the pool
//!   reports it and the agent publishes `CopyFailed` and the state changes.
//! - With `--metrics-listen`, the pool's counters are served for Prometheus ([`metrics`]).
//! - Shutdown (SIGTERM, SIGINT, or the future given to [`run`]): stop accepting, finish the
//!   calls in flight and the NBD requests received, stop the workers after their current
//!   slice, checkpoint the metadata, remove the sockets.

pub mod convert;
pub mod devices;
pub mod events;
pub mod metrics;
pub mod service;
pub mod status;
pub mod workers;

use crate::meta::MetaFiles;
use crate::nbd;
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_server::AgentServer;
use crate::volume::{Pool, PoolConfig, VolumeError};
use events::EventHub;
use service::{AgentService, Endpoints};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use workers::Workers;

/// How long a shutdown waits for clients to finish their calls and close their connections.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// `flashcopy-csi agent` settings.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Data directory: metadata in DIR/meta, volume files in DIR/volumes, sockets.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Put volumes on raw block devices (one device per volume) instead of sparse files.
    /// Repeat for each device; which volume owns which device is kept in DIR/devices.json.
    #[arg(long = "device", value_name = "PATH")]
    pub devices: Vec<PathBuf>,
    /// Agent API socket [default: DIR/agent.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// NBD socket [default: DIR/nbd.sock].
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,
    /// Also serve the agent API on this TCP address: mutual TLS with --tls-cert, --tls-key
    /// and --tls-client-ca, or plaintext only with --insecure-plaintext-tcp.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Server certificate chain (PEM) for --listen, for the DNS name flashcopy-agent.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM): clients on --listen must present a certificate signed by one of them.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve --listen without TLS or authentication: anyone who reaches the address can read,
    /// overwrite and delete every volume. For tests and isolated networks only.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    pub insecure_plaintext_tcp: bool,
    /// Also serve NBD on this TCP address. NBD over TCP has no TLS or authentication here:
    /// anyone who reaches the address reads and writes every export, so it needs
    /// --insecure-plaintext-nbd too. Node plugins use --nbd-socket.
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Option<SocketAddr>,
    /// Accept the risk of --nbd-listen (tests, benchmarks, isolated networks).
    #[arg(long, requires = "nbd_listen")]
    pub insecure_plaintext_nbd: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (and /healthz); off unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Thin-provisioning budget reported to the CSI controller (the sum of volume sizes it may
    /// place here) [default: the size of the data directory's file system].
    #[arg(long, value_name = "BYTES")]
    pub capacity: Option<u64>,
}

impl Config {
    /// Defaults for a data directory: sparse files, sockets in the directory, no TCP.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            devices: Vec::new(),
            socket: None,
            nbd_socket: None,
            listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            insecure_plaintext_tcp: false,
            nbd_listen: None,
            insecure_plaintext_nbd: false,
            metrics_listen: None,
            capacity: None,
        }
    }

    /// The agent API socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("agent.sock"))
    }

    /// The TLS settings of the TCP listener: None for no listener or an explicitly plaintext
    /// one; a listener without TLS and without `--insecure-plaintext-tcp` is refused.
    pub fn tcp_tls(&self) -> Result<Option<Arc<crate::tls::ServerTls>>, Error> {
        let files = (&self.tls_cert, &self.tls_key, &self.tls_client_ca);
        let any = files.0.is_some() || files.1.is_some() || files.2.is_some();
        if any && self.insecure_plaintext_tcp {
            return Err(Error::Config(
                "--insecure-plaintext-tcp conflicts with --tls-cert/--tls-key/--tls-client-ca"
                    .into(),
            ));
        }
        let Some(addr) = self.listen else {
            if any {
                tracing::warn!("TLS files given without --listen: nothing uses them");
            }
            return Ok(None);
        };
        match files {
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(crate::tls::ServerTls::load(cert, key, ca)?))
            }
            (None, None, None) if self.insecure_plaintext_tcp => {
                tracing::warn!(addr = %addr, "serving the agent API on TCP WITHOUT TLS or authentication (--insecure-plaintext-tcp): anyone who reaches this address controls every volume");
                Ok(None)
            }
            (None, None, None) => Err(Error::Config(format!(
                "--listen {addr} would serve the agent API on the network without authentication: \
                 give --tls-cert, --tls-key and --tls-client-ca (mutual TLS), or \
                 --insecure-plaintext-tcp to accept that risk"
            ))),
            _ => Err(Error::Config(
                "--tls-cert, --tls-key and --tls-client-ca go together".into(),
            )),
        }
    }

    /// Refuses an NBD TCP listener without the explicit flag (it has no authentication).
    pub fn check_nbd_tcp(&self) -> Result<(), Error> {
        match self.nbd_listen {
            Some(addr) if !self.insecure_plaintext_nbd => Err(Error::Config(format!(
                "--nbd-listen {addr} would let anyone who reaches it read and write every volume \
                 (NBD over TCP has no authentication here): add --insecure-plaintext-nbd to \
                 accept that risk, or use the NBD Unix socket"
            ))),
            Some(addr) => {
                tracing::warn!(addr = %addr, "serving NBD on TCP WITHOUT authentication (--insecure-plaintext-nbd): anyone who reaches this address reads and writes every export");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The NBD socket.
    pub fn nbd_socket_path(&self) -> PathBuf {
        self.nbd_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("nbd.sock"))
    }
}

/// Why the agent could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pool did not open.
    #[error("opening the pool in {dir}: {source}")]
    Pool {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        source: VolumeError,
    },
    /// The data directory or a socket could not be set up.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path or address.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command line does not make a safe configuration.
    #[error("{0}")]
    Config(String),
    /// The TLS files could not be used.
    #[error("agent API TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// Another process answers on the socket.
    #[error("{0} is in use by a running agent")]
    InUse(PathBuf),
    /// The gRPC server failed.
    #[error("agent API server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A background task failed.
    #[error("{0}")]
    Task(String),
}

fn io_err(
    what: &'static str,
    path: impl std::fmt::Display,
) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io {
        what,
        path: path.to_string(),
        source,
    }
}

/// Prepares a Unix socket path: a live listener there is an error, a stale file is removed.
fn clear_socket(path: &Path) -> Result<(), Error> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::InUse(path.to_path_buf()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "removed a stale socket");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing the stale socket", path.display())(e)),
    }
}

fn open_pool(cfg: &Config) -> Result<Pool, Error> {
    let dir = &cfg.data_dir;
    let pool_err = |source| Error::Pool {
        dir: dir.clone(),
        source,
    };
    if cfg.devices.is_empty() {
        return Pool::open_dir(dir, PoolConfig::default()).map_err(pool_err);
    }
    let files = MetaFiles::open_dir(&dir.join("meta")).map_err(|e| pool_err(e.into()))?;
    let backend = devices::DeviceBackend::open(&dir.join("devices.json"), cfg.devices.clone())
        .map_err(|e| pool_err(e.into()))?;
    Pool::open(files, Arc::new(backend), PoolConfig::default()).map_err(pool_err)
}

/// Runs the agent until `shutdown` completes, then shuts down gracefully (see the module docs).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    run_on(cfg, None, shutdown).await
}

/// As [`run`], on a pool the caller opened (tests: fault-injecting stores); `cfg.devices` is
/// ignored and the pool's metadata need not live in the data directory.
pub async fn run_with_pool(
    cfg: Config,
    pool: Pool,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    run_on(cfg, Some(pool), shutdown).await
}

async fn run_on(
    cfg: Config,
    pool: Option<Pool>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    // Before anything is bound: a bad or missing TLS setup must not leave a half-started agent.
    let tcp_tls = cfg.tcp_tls()?;
    cfg.check_nbd_tcp()?;
    let dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(io_err("creating the data directory", dir.display()))?;
    let (agent_path, nbd_path) = (cfg.agent_socket(), cfg.nbd_socket_path());
    clear_socket(&agent_path)?;
    clear_socket(&nbd_path)?;

    let pool = match pool {
        Some(pool) => pool,
        None => {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || open_pool(&cfg))
                .await
                .map_err(|e| Error::Task(e.to_string()))??
        }
    };
    let pool = Arc::new(pool);
    {
        let e = pool.engine();
        tracing::info!(
            dir = %dir.display(),
            volumes = e.volumes().count(),
            mappings = e.mappings().count(),
            groups = e.groups().count(),
            "pool open"
        );
    }

    let agent_listener = tokio::net::UnixListener::bind(&agent_path)
        .map_err(io_err("binding", agent_path.display()))?;
    let nbd_listener = std::os::unix::net::UnixListener::bind(&nbd_path)
        .map_err(io_err("binding", nbd_path.display()))?;
    let agent_tcp = match cfg.listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(io_err("binding", a))?,
        ),
        None => None,
    };
    let nbd_tcp = match cfg.nbd_listen {
        Some(a) => Some(std::net::TcpListener::bind(a).map_err(io_err("binding", a))?),
        None => None,
    };
    let metrics_tcp = match cfg.metrics_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(io_err("binding", a))?,
        ),
        None => None,
    };
    let addr = |l: Option<std::io::Result<SocketAddr>>| {
        l.and_then(Result::ok)
            .map_or(String::new(), |a| a.to_string())
    };
    let endpoints = Endpoints {
        data_dir: dir.display().to_string(),
        backend: if cfg.devices.is_empty() {
            "dir"
        } else {
            "devices"
        }
        .into(),
        agent_socket: agent_path.display().to_string(),
        nbd_socket: nbd_path.display().to_string(),
        agent_tcp: addr(agent_tcp.as_ref().map(|l| l.local_addr())),
        nbd_tcp: addr(nbd_tcp.as_ref().map(|l| l.local_addr())),
        capacity_bytes: match cfg.capacity {
            Some(c) => c,
            None => fs_size(&dir).map_err(io_err("measuring the file system of", dir.display()))?,
        },
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let events = Arc::new(EventHub::new());
    {
        // Copy failures happen on the data path and in workers, where no command reports them.
        let events = events.clone();
        let installed = pool.on_copy_failure(move |f| {
            events.publish(pb::event::Kind::CopyFailed(pb::CopyFailed {
                mapping: f.map.0,
                message: f.message.clone(),
            }));
            events.publish_all(&f.events);
        });
        if !installed {
            tracing::warn!("the pool already reports copy failures elsewhere; no events for them");
        }
    }
    let workers = Workers::new(pool.clone(), events.clone());
    let supervisor = tokio::spawn(workers.clone().run(stop_rx.clone()));
    let active_workers = workers.clone();
    let metrics_task = metrics_tcp.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "serving metrics at /metrics");
        }
        tokio::spawn(metrics::serve(
            l,
            pool.clone(),
            workers.clone(),
            stop_rx.clone(),
        ))
    });

    // NBD: blocking accept loops on their own threads.
    let nbd_stop = nbd::Shutdown::new();
    let exports: Arc<dyn nbd::Exports> = Arc::new(pool.clone());
    let mut nbd_threads = vec![spawn_nbd("nbd-unix", {
        let (exports, stop) = (exports.clone(), nbd_stop.clone());
        move || nbd::serve_unix(nbd_listener, exports, nbd::ServerConfig::default(), stop)
    })?];
    if let Some(l) = nbd_tcp {
        let (exports, stop) = (exports.clone(), nbd_stop.clone());
        nbd_threads.push(spawn_nbd("nbd-tcp", move || {
            nbd::serve_tcp(l, exports, nbd::ServerConfig::default(), stop)
        })?);
    }
    tracing::info!(
        agent = %endpoints.agent_socket,
        nbd = %endpoints.nbd_socket,
        agent_tcp = %endpoints.agent_tcp,
        nbd_tcp = %endpoints.nbd_tcp,
        agent_tcp_tls = tcp_tls.is_some(),
        "agent serving"
    );

    let svc = AgentService::new(pool.clone(), events, workers, endpoints, stop_rx.clone());
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = || {
        tonic::transport::Server::builder()
            .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
            .add_service(AgentServer::new(svc.clone()))
    };
    let unix = server().serve_with_incoming_shutdown(
        UnixListenerStream::new(agent_listener),
        stopped(stop_rx.clone()),
    );
    let tcp = async {
        match (agent_tcp, tcp_tls.clone()) {
            (Some(l), Some(tls)) => {
                server()
                    .serve_with_incoming_shutdown(
                        crate::tls::incoming(l, tls, stop_rx.clone()),
                        stopped(stop_rx.clone()),
                    )
                    .await
            }
            (Some(l), None) => {
                server()
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(l),
                        stopped(stop_rx.clone()),
                    )
                    .await
            }
            (None, _) => Ok(()),
        }
    };
    let serve = async { tokio::join!(unix, tcp) };
    tokio::pin!(serve);
    let (unix_res, tcp_res) = tokio::select! {
        r = &mut serve => {
            // A server failed on its own: stop everything else too.
            let _ = stop_tx.send(true);
            r
        }
        () = shutdown => {
            tracing::info!("shutting down: no new calls; finishing the calls in flight");
            let _ = stop_tx.send(true);
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut serve).await {
                Ok(r) => r,
                Err(_) => {
                    // A client that does not answer the server's goodbye must not hold the
                    // shutdown forever; pool calls already running still finish (they run on
                    // the blocking pool, and the checkpoint below waits for them).
                    tracing::warn!(grace_secs = SHUTDOWN_GRACE.as_secs(), "connections still open after the grace period; closing them");
                    (Ok(()), Ok(()))
                }
            }
        }
    };

    // Every call has finished. Stop NBD (it finishes what it has received), then the workers.
    nbd_stop.trigger();
    let mut failure = unix_res.err().or(tcp_res.err()).map(Error::from);
    for t in nbd_threads {
        match tokio::task::spawn_blocking(move || t.join()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "nbd server failed");
                failure.get_or_insert(Error::Io {
                    what: "serving NBD on",
                    path: nbd_path.display().to_string(),
                    source: e,
                });
            }
            _ => {
                failure.get_or_insert(Error::Task("the NBD server thread panicked".into()));
            }
        }
    }
    // A worker stops after its current slice; at the lowest rates the pool's rate limiter
    // may hold a slice for a few seconds (it pays for up to 1 MiB at a time).
    tracing::info!(
        workers = active_workers.active(),
        "waiting for copy workers to finish their slice"
    );
    let _ = supervisor.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let checkpoint = {
        let pool = pool.clone();
        tokio::task::spawn_blocking(move || pool.checkpoint()).await
    };
    match checkpoint {
        Ok(Ok(())) => tracing::info!("metadata checkpointed"),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "checkpoint at shutdown failed; the journal still holds every change");
            failure.get_or_insert(Error::Pool { dir, source: e });
        }
        Err(e) => {
            failure.get_or_insert(Error::Task(e.to_string()));
        }
    }
    for p in [&agent_path, &nbd_path] {
        if let Err(e) = std::fs::remove_file(p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "could not remove the socket");
        }
    }
    tracing::info!("agent stopped");
    failure.map_or(Ok(()), Err)
}

fn spawn_nbd(
    name: &str,
    f: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<()>>, Error> {
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let res = f();
            if let Err(e) = &res {
                // Reported again at shutdown; say it now, while the API still serves.
                tracing::error!(server = %label, error = %e, "NBD server stopped");
            }
            res
        })
        .map_err(io_err("starting the thread", name.to_string()))
}

/// Total size in bytes of the file system holding `path`.
#[allow(unsafe_code)]
fn fs_size(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call, and `st` is a
    // plain-data struct the kernel fills in; all-zero bytes are a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_blocks as u64).saturating_mul(st.f_frsize as u64))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signalled() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `flashcopy-csi agent`: runs on a multi-threaded runtime until SIGTERM or SIGINT.
pub fn main(cfg: Config) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agent")
        .build()
        .map_err(io_err("starting the runtime", "tokio"))?;
    rt.block_on(run(cfg, signalled()))
}
