//! Command line (clap derive). `main.rs` parses and dispatches; the work lives in the library.

use clap::{Parser, Subcommand};

/// flashcopy-csi: IBM FlashCopy-style snapshots for Kubernetes volumes on any Linux node.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: the pool's volumes as NBD exports and the agent API on Unix sockets
    /// (DIR/agent.sock, DIR/nbd.sock), background copy and cleaning; stops on SIGTERM/SIGINT.
    Agent(crate::agent::Config),
    /// FlashCopy administration over the agent API, with IBM verbs (mkfcmap, lsfcmap,
    /// startfcconsistgrp, ...).
    Fc(crate::fc::Args),
    /// The CSI plugin.
    #[command(subcommand)]
    Csi(CsiCommand),
    /// Agent, CSI controller and CSI node in one process on one host: CSI on DIR/csi.sock,
    /// the agent API on DIR/agent.sock, NBD on DIR/nbd.sock; runs until SIGTERM (`--demo`:
    /// walks through snapshots over its own CSI socket, then stops).
    Standalone(crate::standalone::Config),
    /// Run the snapshot controller: VolumeSnapshot(Content) and VolumeGroupSnapshot(Content)
    /// over our CSI controller socket, leader-elected.
    #[cfg(feature = "kubernetes")]
    SnapshotController(crate::k8s::run::Config),
    /// Mirror a node agent's mappings and consistency groups into FlashCopyMapping /
    /// FlashCopyConsistencyGroup objects (`kubectl get fcmap`), until SIGTERM.
    #[cfg(feature = "kubernetes")]
    KubeSync(crate::k8s::sync::SyncConfig),
    /// The install's mutual-TLS certificates as Secrets (the controller pod's init container).
    #[cfg(feature = "kubernetes")]
    #[command(subcommand)]
    Certs(crate::k8s::certs::CertsCommand),
    /// Print our CustomResourceDefinitions (FlashCopyMapping, FlashCopyConsistencyGroup) as YAML.
    #[cfg(feature = "kubernetes")]
    Crd,
}

/// `flashcopy-csi csi ...`.
#[derive(Debug, Subcommand)]
pub enum CsiCommand {
    /// Serve CSI Identity, Controller and GroupController on a Unix socket, routing each call
    /// to the agent of the volume's node; stops on SIGTERM/SIGINT.
    Controller(crate::csi::ControllerConfig),
    /// Serve CSI Identity and Node on a Unix socket: attach the local agent's NBD exports,
    /// format blank devices, mount and bind-mount; stops on SIGTERM/SIGINT.
    Node(crate::csi::node::NodeConfig),
}
