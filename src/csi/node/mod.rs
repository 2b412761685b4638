//! The CSI node plugin (`flashcopy-csi csi node`): attaches the local agent's NBD export of a
//! volume as a block device, formats blank devices, mounts and bind-mounts.
//!
//! - [`attach`]: NBD export -> block device ([`attach::FuseLoop`]: nbdfuse + loop;
//!   [`kernel::KernelNbd`]: the kernel nbd driver).
//! - [`mount`]: blank-device probe, mkfs, mount, bind, unmount, mount table, statvfs, growth.
//! - [`error`]: node-side errors and the system-tool runner.
//! - [`service`]: the CSI Node service over these; [`node_main`] serves it with Identity.

pub mod attach;
pub mod error;
pub mod genl;
pub mod kernel;
pub mod mount;

pub use attach::{Attacher, Export, FuseLoop};
pub use error::{Error, Result};
pub use kernel::{KernelConfig, KernelNbd};

/// Picks the attacher for this host: the kernel nbd driver where its module is loaded (or
/// loads with `modprobe nbd`), nbdfuse + loop otherwise. State lives under `state_dir`.
pub fn default_attacher(
    state_dir: &std::path::Path,
    kernel: KernelConfig,
) -> Result<Box<dyn Attacher>> {
    if !kernel::available() && error::on_path("modprobe") {
        let _ = error::run("modprobe", &["nbd"]);
    }
    Ok(if kernel::available() {
        Box::new(KernelNbd::new(&state_dir.join("kernel-nbd"), kernel)?)
    } else {
        tracing::warn!(
            "no kernel nbd driver here: volumes attach through nbdfuse + loop, which do NOT \
             survive a restart of the agent or of this plugin (I/O fails until the volume is \
             staged again)"
        );
        Box::new(FuseLoop::new(&state_dir.join("fuse-loop"))?)
    })
}

pub mod service;

pub use service::NodeService;

use crate::csi::identity::IdentityService;
use crate::csi::{ServeError, bind_unix, endpoint_path};
use crate::proto::agent::v1::agent_client::AgentClient;
use crate::proto::csi::v1::identity_server::IdentityServer;
use crate::proto::csi::v1::node_server::NodeServer;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_stream::wrappers::UnixListenerStream;

/// `flashcopy-csi csi node` settings.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeConfig {
    /// Where to serve CSI: unix:///PATH (a stale socket there is replaced).
    #[arg(long, value_name = "unix:///PATH")]
    pub endpoint: String,
    /// This node's name (the Kubernetes node name): volume ids carry it, topology reports it.
    #[arg(long, value_name = "NAME")]
    pub node_id: String,
    /// The local agent's API.
    #[arg(
        long,
        value_name = "URL",
        default_value = "unix:///var/lib/flashcopy-csi/agent.sock"
    )]
    pub agent: String,
    /// Where attachments keep their state (nbdfuse mount points, device records).
    #[arg(long, value_name = "DIR", default_value = "/run/flashcopy-csi/node")]
    pub state_dir: PathBuf,
    /// Kernel nbd: connections per device, one per CPU up to this many.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub nbd_max_connections: usize,
    /// Kernel nbd: exactly this many connections per device (instead of one per CPU).
    #[arg(long, value_name = "N")]
    pub nbd_connections: Option<usize>,
    /// Kernel nbd: how long a device queues its I/O while its agent is away (restarts within
    /// this are a pause for the workload; past it the device fails I/O until the agent is back).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub nbd_dead_timeout: u64,
    /// Kernel nbd: how long a request may go unanswered before it is sent again on a new
    /// connection (also the longest a request caught in an agent crash waits).
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub nbd_io_timeout: u64,
}

impl NodeConfig {
    /// Settings with the kernel nbd defaults.
    pub fn new(endpoint: String, node_id: String, agent: String, state_dir: PathBuf) -> Self {
        let k = KernelConfig::default();
        Self {
            endpoint,
            node_id,
            agent,
            state_dir,
            nbd_max_connections: k.max_connections,
            nbd_connections: None,
            nbd_dead_timeout: k.dead_timeout.as_secs(),
            nbd_io_timeout: k.io_timeout.as_secs(),
        }
    }

    /// The kernel nbd settings of these flags.
    pub fn kernel(&self) -> KernelConfig {
        KernelConfig {
            max_connections: self.nbd_max_connections.max(1),
            connections: self.nbd_connections.map(|n| n.max(1)),
            dead_timeout: std::time::Duration::from_secs(self.nbd_dead_timeout),
            io_timeout: std::time::Duration::from_secs(self.nbd_io_timeout.max(1)),
        }
    }

    /// The service this configuration describes; broken attachments left by an earlier run
    /// are cleaned up first.
    pub fn service(&self) -> Result<NodeService, ServeError> {
        if !crate::csi::ids::valid_node(&self.node_id) {
            return Err(ServeError::Config(format!(
                "--node-id {:?} is not a node name",
                self.node_id
            )));
        }
        let attacher: Arc<dyn Attacher> = default_attacher(&self.state_dir, self.kernel())
            .map_err(|e| ServeError::Config(e.to_string()))?
            .into();
        let cleaned = attacher
            .recover()
            .map_err(|e| ServeError::Config(e.to_string()))?;
        tracing::info!(
            kind = attacher.kind(),
            cleaned = cleaned.len(),
            "attacher ready"
        );
        let channel = tonic::transport::Endpoint::from_shared(self.agent.clone())
            .map_err(|e| ServeError::Config(format!("--agent {}: {e}", self.agent)))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
        Ok(NodeService::new(
            self.node_id.clone(),
            AgentClient::new(channel),
            attacher,
        ))
    }
}

/// Serves Identity + Node of `svc` on `listener` until `shutdown` completes.
pub async fn serve_node(
    svc: NodeService,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("csi", method = %req.uri().path()))
        .add_service(IdentityServer::new(IdentityService::node()))
        .add_service(NodeServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// `flashcopy-csi csi node`: serves until SIGTERM or SIGINT, then removes its socket.
/// Attachments stay: the volumes' mounts outlive a restart of the plugin.
pub fn node_main(cfg: NodeConfig) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("csi-node")
        .build()
        .map_err(|source| ServeError::Io {
            what: "starting the runtime",
            path: PathBuf::new(),
            source,
        })?;
    rt.block_on(async {
        let path = endpoint_path(&cfg.endpoint)?;
        let svc = cfg.service()?;
        let listener = bind_unix(&path)?;
        tracing::info!(endpoint = %cfg.endpoint, node = %cfg.node_id, "CSI node serving");
        let res = serve_node(svc, listener, crate::agent::signalled()).await;
        let _ = std::fs::remove_file(&path);
        tracing::info!("CSI node stopped");
        res
    })
}
