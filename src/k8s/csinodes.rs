//! The nodes that run our node plugin, from the CSINode objects node-driver-registrar keeps (one
//! per node, listing the CSI drivers registered there with their node ids). The CSI controller,
//! which reaches agents through a template, learns from them which nodes its listings cover.

use crate::csi::Agents;
use k8s_openapi::api::storage::v1::CSINode;
use kube::Client;
use kube::api::{Api, ListParams};
use std::sync::Arc;
use std::time::Duration;

/// The node ids our driver registered, one per CSINode that names it.
pub async fn our_nodes(client: &Client) -> Result<Vec<String>, kube::Error> {
    let list = Api::<CSINode>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|n| {
            n.spec
                .drivers
                .into_iter()
                .find(|d| d.name == super::names::DRIVER)
                .map(|d| d.node_id)
        })
        .collect())
}

/// Refreshes `agents`' discovered nodes every `every`, forever; a failed list keeps the last.
pub async fn keep_discovering(client: Client, agents: Arc<Agents>, every: Duration) {
    loop {
        match our_nodes(&client).await {
            Ok(nodes) => {
                tracing::debug!(nodes = nodes.len(), "CSINodes read");
                agents.set_discovered(nodes);
            }
            Err(e) => tracing::warn!(error = %e, "listing CSINodes failed; keeping the last list"),
        }
        tokio::time::sleep(every).await;
    }
}
