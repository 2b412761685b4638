//! CSI Controller service: validate, take the per-object guard, call the agent of the node
//! the id names, answer in CSI terms. No state of its own (ARCHITECTURE.md decision 1).
//!
//! - A volume is an agent volume named `v.NAME` / `v-HASH` ([`super::ids`]).
//! - A snapshot is a FlashCopy mapping from the volume to a new target volume, both named
//!   `s.NAME`, copy rate 0 unless the class asks otherwise, started at once (`startfcmap -prep`):
//!   the target is the point-in-time image from that instant.
//! - A clone or restore is a new volume plus a mapping from the source (the volume, or the
//!   snapshot's target) with background copy at the class's `copyRate` (default 50) and
//!   autodelete: readable at once through the cascade, independent once copied.
//! - Deleting a volume that snapshots or clones still read through renames it `x-ID`: it leaves
//!   every CSI listing, keeps its capacity, and goes when its last dependant does.
//!
//! The service is split by concern: volumes (create, delete, expand, list, validate),
//! snapshots (create, delete, list, get, and how a snapshot is retired) and capacity; this
//! file holds the routing, the shared lookups, paging and the tonic trait, which only
//! unwraps requests and hands them to those.

use super::guards::{Guards, Held};
use super::ids::{self, Kind, NodeObj};
use super::params::Params;
use super::status::CsiError;
use super::{Agents, TOPOLOGY_KEY};

mod capacity;
mod snapshots;
mod volumes;

use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_client::AgentClient;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::controller_server::Controller;
pub use snapshots::is_cut;
pub(super) use snapshots::ready;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use volumes::topology_nodes;
pub use volumes::{check_capabilities, choose_size};

/// Size of a volume created with no capacity range.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// How long a delete waits for cleaning (older snapshots taking over grains) before it answers
/// ABORTED for the CO to retry.
pub const CLEANING_WAIT: Duration = Duration::from_secs(20);
/// Default background copy rate of clones and restores (IBM's default).
pub const DEFAULT_CLONE_COPY_RATE: u32 = 50;

/// The Controller and GroupController services over a set of agents.
#[derive(Clone, Debug)]
pub struct ControllerService {
    pub(super) agents: Arc<Agents>,
    pub(super) guards: Guards,
    pub(super) freeze_timeout: Duration,
}

type RpcResult<T> = Result<Response<T>, Status>;

pub(super) type Client = AgentClient<Channel>;

/// The CSI topology segment of `node`.
pub fn topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.to_string())]),
    }
}

pub(super) fn not_found_is_none<T>(
    node: &str,
    r: Result<Response<T>, Status>,
) -> Result<Option<T>, CsiError> {
    match r {
        Ok(v) => Ok(Some(v.into_inner())),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(CsiError::agent(node, s)),
    }
}

impl ControllerService {
    /// A controller routing to `agents`; cross-node group snapshots hold I/O at most
    /// `freeze_timeout` before they abort.
    pub fn new(agents: Agents, freeze_timeout: Duration) -> Self {
        Self {
            agents: Arc::new(agents),
            guards: Guards::default(),
            freeze_timeout,
        }
    }

    /// The routing table to the agents (shared: discovery adds nodes to it).
    pub fn agents(&self) -> Arc<Agents> {
        self.agents.clone()
    }

    /// The in-flight guards (a caller holding a key makes calls on that object ABORTED).
    pub fn guards(&self) -> &Guards {
        &self.guards
    }

    pub(super) fn client(&self, node: &str) -> Result<Client, CsiError> {
        self.agents.client(node)
    }

    pub(super) fn guard(&self, keys: impl IntoIterator<Item = String>) -> Result<Held, CsiError> {
        self.guards.take(keys)
    }

    pub(super) async fn find_volume(
        &self,
        node: &str,
        r: String,
    ) -> Result<Option<pb::Volume>, CsiError> {
        let mut c = self.client(node)?;
        not_found_is_none(node, c.get_volume(pb::GetVolumeRequest { volume: r }).await)
    }

    /// Undoes a half-made mapping named `name` (a create that failed after the mapping was
    /// made): force-stops and deletes it; best effort, the caller reports the first failure.
    pub(super) async fn undo_mapping(&self, node: &str, name: String) {
        let (Ok(Some(m)), Ok(mut c)) = (self.find_mapping(node, name).await, self.client(node))
        else {
            return;
        };
        let mapping = m.id.to_string();
        let _ = c
            .stop_mapping(pb::StopMappingRequest {
                mapping: mapping.clone(),
                force: true,
                split: false,
            })
            .await;
        let _ = c
            .delete_mapping(pb::DeleteMappingRequest {
                mapping,
                force: true,
            })
            .await;
    }

    pub(super) async fn find_mapping(
        &self,
        node: &str,
        r: String,
    ) -> Result<Option<pb::Mapping>, CsiError> {
        let mut c = self.client(node)?;
        not_found_is_none(
            node,
            c.get_mapping(pb::GetMappingRequest { mapping: r }).await,
        )
    }
}

pub(super) fn rpc(
    t: csi::controller_service_capability::rpc::Type,
) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(
            csi::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

pub(super) fn vol_key(id: &str) -> String {
    format!("volume {id}")
}

pub(super) fn max_entries(n: i32) -> Result<usize, CsiError> {
    if n < 0 {
        return Err(CsiError::Invalid(format!(
            "max_entries must not be negative, got {n}"
        )));
    }
    Ok(if n == 0 { usize::MAX } else { n as usize })
}

/// One page of `items` sorted by key, after `start` (a key); the next token is the last key.
pub(super) fn page<T>(
    mut items: Vec<(NodeObj, T)>,
    start: Option<NodeObj>,
    max: usize,
) -> (Vec<(NodeObj, T)>, Option<NodeObj>) {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let from = match start {
        Some(s) => items.partition_point(|(k, _)| *k <= s),
        None => 0,
    };
    let rest: Vec<_> = items.into_iter().skip(from).collect();
    let more = rest.len() > max;
    let page: Vec<_> = rest.into_iter().take(max).collect();
    let next = if more {
        page.last().map(|(k, _)| k.clone())
    } else {
        None
    };
    (page, next)
}

pub(super) fn token(kind: Kind, s: &str) -> Result<Option<NodeObj>, CsiError> {
    if s.is_empty() {
        return Ok(None);
    }
    ids::parse(kind, s).map(Some).ok_or_else(|| {
        CsiError::Aborted(format!(
            "starting_token {s:?} is not a token this plugin gave out"
        ))
    })
}

#[tonic::async_trait]
impl Controller for ControllerService {
    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> RpcResult<csi::CreateVolumeResponse> {
        let volume = self.create_volume_inner(req.into_inner()).await?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> RpcResult<csi::DeleteVolumeResponse> {
        self.delete_volume_inner(req.into_inner()).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> RpcResult<csi::ControllerPublishVolumeResponse> {
        Err(CsiError::Unimplemented("ControllerPublishVolume").into())
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> RpcResult<csi::ControllerUnpublishVolumeResponse> {
        Err(CsiError::Unimplemented("ControllerUnpublishVolume").into())
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> RpcResult<csi::ValidateVolumeCapabilitiesResponse> {
        Ok(Response::new(
            self.validate_volume_capabilities_inner(req.into_inner())
                .await?,
        ))
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> RpcResult<csi::ListVolumesResponse> {
        Ok(Response::new(
            self.list_volumes_inner(req.into_inner()).await?,
        ))
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> RpcResult<csi::GetCapacityResponse> {
        Ok(Response::new(
            self.get_capacity_inner(req.into_inner()).await?,
        ))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> RpcResult<csi::ControllerGetCapabilitiesResponse> {
        use csi::controller_service_capability::rpc::Type as T;
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: [
                T::CreateDeleteVolume,
                T::ListVolumes,
                T::GetCapacity,
                T::CreateDeleteSnapshot,
                T::ListSnapshots,
                T::CloneVolume,
                T::ExpandVolume,
                T::GetVolume,
                T::VolumeCondition,
                T::GetSnapshot,
                T::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name, source = %req.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> RpcResult<csi::CreateSnapshotResponse> {
        let s = self.create_snapshot_inner(req.into_inner()).await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(s),
        }))
    }

    #[tracing::instrument(skip_all, fields(snapshot = %req.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> RpcResult<csi::DeleteSnapshotResponse> {
        self.delete_snapshot_inner(req.into_inner()).await?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> RpcResult<csi::ListSnapshotsResponse> {
        Ok(Response::new(
            self.list_snapshots_inner(req.into_inner()).await?,
        ))
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> RpcResult<csi::GetSnapshotResponse> {
        Ok(Response::new(
            self.get_snapshot_inner(req.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> RpcResult<csi::ControllerExpandVolumeResponse> {
        Ok(Response::new(
            self.expand_volume_inner(req.into_inner()).await?,
        ))
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> RpcResult<csi::ControllerGetVolumeResponse> {
        Ok(Response::new(
            self.get_volume_inner(req.into_inner()).await?,
        ))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> RpcResult<csi::ControllerModifyVolumeResponse> {
        Err(CsiError::Unimplemented("ControllerModifyVolume").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_resume_after_the_token() {
        let o = |n: &str, id| NodeObj { node: n.into(), id };
        let items = vec![(o("b", 1), 'c'), (o("a", 2), 'b'), (o("a", 1), 'a')];
        let (p, next) = page(items.clone(), None, 2);
        assert_eq!(p.iter().map(|x| x.1).collect::<String>(), "ab");
        assert_eq!(next, Some(o("a", 2)));
        let (p, next) = page(items.clone(), next, 2);
        assert_eq!(p.iter().map(|x| x.1).collect::<String>(), "c");
        assert_eq!(next, None);
        // A token whose object is gone still resumes at the right place.
        let (p, _) = page(vec![(o("b", 1), 'c')], Some(o("a", 2)), 5);
        assert_eq!(p.len(), 1);
    }
}
