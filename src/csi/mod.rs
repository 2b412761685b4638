//! The CSI plugin (`flashcopy-csi csi controller|node`): thin adapters over the agent API.
//!
//! - [`identity`]: plugin name `flashcopy.csi.io`, capabilities, probe.
//! - [`controller`]: volumes, snapshots, clones and restores, capacity, listings.
//! - [`group`]: group snapshots as consistency groups, atomic across nodes (two-phase freeze).
//! - [`metadata`]: SnapshotMetadata (changed-block tracking) from the agents' bitmaps.
//! - [`ids`]: ids that name node + agent object; CSI names as agent names.
//! - [`agents`]: which agent serves which node. [`guards`]: ABORTED for concurrent calls.
//! - [`status`]: every error to a gRPC status in one place. [`params`]: class parameters.
//! - [`node`]: the node plugin: attach the NBD export, format, mount, bind-mount.

pub mod agents;
pub mod controller;
pub mod group;
pub mod guards;
pub mod identity;
pub mod ids;
pub mod metadata;
pub mod node;
pub mod params;
pub mod status;

pub use agents::Agents;
pub use controller::ControllerService;
pub use identity::IdentityService;

use crate::proto::csi::v1::controller_server::ControllerServer;
use crate::proto::csi::v1::group_controller_server::GroupControllerServer;
use crate::proto::csi::v1::identity_server::IdentityServer;
use crate::proto::csi::v1::snapshot_metadata_server::SnapshotMetadataServer;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_stream::wrappers::UnixListenerStream;

/// The CSI driver name.
pub const DRIVER_NAME: &str = "flashcopy.csi.io";
/// The topology key whose value is the node name.
pub const TOPOLOGY_KEY: &str = "topology.flashcopy.csi.io/node";

/// `flashcopy-csi csi controller` settings.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerConfig {
    /// Where to serve CSI: unix:///PATH (a stale socket there is replaced).
    #[arg(long, value_name = "unix:///PATH")]
    pub endpoint: String,
    /// The agent of a node: NODE=URL (unix:///PATH, https://HOST:PORT or http://HOST:PORT). Repeat per node;
    /// these nodes are the ones listings, capacity and placement cover.
    #[arg(long = "agent", value_name = "NODE=URL", value_parser = agents::parse_agent_arg)]
    pub agents: Vec<(String, String)>,
    /// The agent of any other node: a URL in which {node} stands for the node name.
    #[arg(long, value_name = "URL")]
    pub agent_template: Option<String>,
    /// How long a group snapshot across nodes may hold I/O before it aborts.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub freeze_timeout_ms: u64,
    /// Also cover, in listings, every node whose CSINode object names this driver (read from
    /// the Kubernetes API every 30 s; needs `--agent-template`).
    #[arg(long, requires = "agent_template")]
    pub nodes_from_csinodes: bool,
    /// Client certificate and agent CA for https:// agents.
    #[command(flatten)]
    pub agent_tls: crate::tls::ClientArgs,
}

/// Why a CSI server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint is not unix:///PATH.
    #[error("endpoint {0:?}: expected unix:///PATH")]
    Endpoint(String),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Another process serves the socket.
    #[error("{0} is in use by a running server")]
    InUse(PathBuf),
    /// Socket setup failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("CSI server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The socket path of a `unix:///PATH` (or `unix:PATH`) endpoint.
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .filter(|p| p.starts_with('/'))
        .ok_or_else(|| ServeError::Endpoint(endpoint.into()))?;
    Ok(PathBuf::from(p))
}

/// Binds a CSI Unix socket: a live server there is an error, a stale file is replaced, the
/// socket is made mode 0660 (kubelet and the sidecars run as root or share the group).
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let io = |what, source| ServeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServeError::InUse(path.to_path_buf()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing the stale socket", e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|e| io("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| io("setting the mode of", e))?;
    Ok(l)
}

impl ControllerConfig {
    /// The controller service this configuration describes.
    pub fn service(&self) -> Result<ControllerService, ServeError> {
        let tls = self
            .agent_tls
            .reloading()
            .map_err(|e| ServeError::Config(e.to_string()))?;
        let https = self
            .agents
            .iter()
            .map(|(_, u)| u)
            .chain(&self.agent_template);
        if tls.is_none() && https.into_iter().any(|u| u.starts_with("https://")) {
            return Err(ServeError::Config(
                "https:// agents need --agent-tls-ca, --agent-tls-cert and --agent-tls-key".into(),
            ));
        }
        let agents = Agents::new(self.agents.clone(), self.agent_template.clone())
            .map_err(ServeError::Config)?
            .with_tls(tls);
        Ok(ControllerService::new(
            agents,
            Duration::from_millis(self.freeze_timeout_ms),
        ))
    }
}

/// Serves Identity + Controller + GroupController + SnapshotMetadata of `svc` on `listener` until `shutdown`
/// completes (calls in flight finish first). Other processes (`standalone`) mount the same
/// services next to their own with [`ControllerService`] and [`IdentityService`].
pub async fn serve_controller(
    svc: ControllerService,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("csi", method = %req.uri().path()))
        .add_service(IdentityServer::new(IdentityService::controller()))
        .add_service(ControllerServer::new(svc.clone()))
        .add_service(SnapshotMetadataServer::new(svc.clone()))
        .add_service(GroupControllerServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// `flashcopy-csi csi controller`: serves until SIGTERM or SIGINT, then removes its socket.
pub fn controller_main(cfg: ControllerConfig) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("csi-controller")
        .build()
        .map_err(|source| ServeError::Io {
            what: "starting the runtime",
            path: PathBuf::new(),
            source,
        })?;
    rt.block_on(async {
        let path = endpoint_path(&cfg.endpoint)?;
        let svc = cfg.service()?;
        #[cfg(not(feature = "kubernetes"))]
        if cfg.nodes_from_csinodes {
            return Err(ServeError::Config(
                "--nodes-from-csinodes: built without the kubernetes feature".into(),
            ));
        }
        #[cfg(feature = "kubernetes")]
        if cfg.nodes_from_csinodes {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| ServeError::Config(format!("--nodes-from-csinodes: {e}")))?;
            tokio::spawn(crate::k8s::csinodes::keep_discovering(
                client,
                svc.agents(),
                Duration::from_secs(30),
            ));
        }
        let listener = bind_unix(&path)?;
        tracing::info!(endpoint = %cfg.endpoint, agents = cfg.agents.len(), "CSI controller serving");
        let res = serve_controller(svc, listener, crate::agent::signalled()).await;
        let _ = std::fs::remove_file(&path);
        tracing::info!("CSI controller stopped");
        res
    })
}
