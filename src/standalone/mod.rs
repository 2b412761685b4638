//! `flashcopy-csi standalone`: the agent, the CSI controller and the CSI node in one process on
//! one host, every endpoint a Unix socket under the data directory. The embedded default for the
//! README walk-through, the tests and csi-sanity.
//!
//! The controller reaches the agent over the agent socket like it would in a cluster (one node,
//! `--node-id`), and the node attaches the agent's NBD exports: nothing is short-circuited, so
//! what works here works with the parts in separate containers.

pub mod demo;

use crate::agent;
use crate::csi::node::NodeConfig;
use crate::csi::{self, Agents, ControllerService};
use crate::proto::csi::v1::controller_server::ControllerServer;
use crate::proto::csi::v1::group_controller_server::GroupControllerServer;
use crate::proto::csi::v1::identity_server::IdentityServer;
use crate::proto::csi::v1::node_server::NodeServer;
use crate::proto::csi::v1::snapshot_metadata_server::SnapshotMetadataServer;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

/// `flashcopy-csi standalone` settings.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Data directory: the agent's pool and metadata, the node's attach state, and the sockets
    /// csi.sock, agent.sock and nbd.sock.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The node name in volume ids and topology [default: this host's name].
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Walk through snapshots over this process's own CSI socket (two volumes, writes, a
    /// snapshot, a group snapshot, restores, each verified byte for byte), then stop.
    #[arg(long)]
    pub demo: bool,
}

/// Why standalone stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent failed.
    #[error("agent: {0}")]
    Agent(#[from] agent::Error),
    /// The CSI side failed.
    #[error("CSI: {0}")]
    Csi(#[from] csi::ServeError),
    /// The node service could not start.
    #[error("CSI node: {0}")]
    Node(String),
    /// The agent did not come up.
    #[error("the agent did not answer on {0} within 30 s")]
    AgentStart(PathBuf),
    /// Starting the runtime failed.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// The walk-through found something wrong.
    #[error("demo: {0}")]
    Demo(String),
}

impl Config {
    /// The CSI socket, DIR/csi.sock.
    pub fn csi_socket(&self) -> PathBuf {
        self.data_dir.join("csi.sock")
    }

    /// The node name: `--node-id`, else the host name, else "standalone".
    pub fn node(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| csi::ids::valid_node(h))
                .unwrap_or_else(|| "standalone".into())
        })
    }
}

/// Runs until SIGTERM or SIGINT.
pub fn main(cfg: Config) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("standalone")
        .build()
        .map_err(Error::Runtime)?;
    if !cfg.demo {
        return rt.block_on(run(cfg, agent::signalled()));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let socket = cfg.csi_socket();
    let nbd = cfg.data_dir.join("nbd.sock");
    rt.block_on(async move {
        let walk = tokio::spawn(async move {
            let r = demo::run(&socket, &nbd).await;
            let _ = tx.send(());
            r
        });
        run(cfg, async {
            tokio::select! {
                _ = rx => {}
                _ = agent::signalled() => {}
            }
        })
        .await?;
        match walk.await {
            Ok(r) => r.map_err(Error::Demo),
            Err(e) => Err(Error::Demo(e.to_string())),
        }
    })
}

/// Runs until `shutdown` completes: then the CSI server finishes its calls in flight, and the
/// agent shuts down gracefully (checkpoint, sockets removed).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let node = cfg.node();
    if !csi::ids::valid_node(&node) {
        return Err(Error::Node(format!(
            "--node-id {node:?} is not a valid node name"
        )));
    }
    let agent_cfg = agent::Config::new(&cfg.data_dir);
    let agent_sock = agent_cfg.agent_socket();
    let nbd_sock = agent_cfg.nbd_socket_path();
    let (stop_agent, agent_stopped) = watch::channel(false);
    let agent_task = tokio::spawn(agent::run(agent_cfg, async move {
        let mut rx = agent_stopped;
        let _ = rx.wait_for(|s| *s).await;
    }));
    let t0 = Instant::now();
    while tokio::net::UnixStream::connect(&agent_sock).await.is_err() {
        if agent_task.is_finished() {
            return match agent_task.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(Error::AgentStart(agent_sock)),
            };
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = stop_agent.send(true);
            return Err(Error::AgentStart(agent_sock));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let agent_url = format!("unix://{}", agent_sock.display());

    let result = serve_csi(&cfg, &node, &agent_url, shutdown).await;
    let _ = stop_agent.send(true);
    let agent_result = agent_task.await;
    result?;
    match agent_result {
        Ok(r) => r.map_err(Error::from),
        Err(e) => Err(Error::Node(format!("agent task: {e}"))),
    }
    .map(|()| {
        tracing::info!(nbd = %nbd_sock.display(), "standalone stopped");
    })
}

async fn serve_csi(
    cfg: &Config,
    node: &str,
    agent_url: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let agents =
        Agents::new(vec![(node.to_string(), agent_url.to_string())], None).map_err(Error::Node)?;
    let controller = ControllerService::new(agents, Duration::from_secs(5));
    let csi_sock = cfg.csi_socket();
    let node_svc = NodeConfig::new(
        format!("unix://{}", csi_sock.display()),
        node.to_string(),
        agent_url.to_string(),
        cfg.data_dir.join("node"),
    )
    .service()?;
    let listener = csi::bind_unix(&csi_sock)?;
    println!("flashcopy-csi standalone, node {node}");
    println!(
        "  CSI (Identity, Controller, GroupController, SnapshotMetadata, Node): unix://{}",
        csi_sock.display()
    );
    println!("  agent API:  {agent_url}   (flashcopy-csi fc --agent {agent_url} lsfcmap)");
    println!(
        "  NBD:        unix://{}   (export = volume id)",
        cfg.data_dir.join("nbd.sock").display()
    );
    println!("  stop with SIGTERM or Ctrl-C");
    let res = tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("csi", method = %req.uri().path()))
        .add_service(IdentityServer::new(csi::IdentityService::controller()))
        .add_service(ControllerServer::new(controller.clone()))
        .add_service(SnapshotMetadataServer::new(controller.clone()))
        .add_service(GroupControllerServer::new(controller))
        .add_service(NodeServer::new(node_svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&csi_sock);
    res.map_err(|e| Error::Csi(csi::ServeError::Serve(e)))
}
