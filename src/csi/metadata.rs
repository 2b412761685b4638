//! CSI SnapshotMetadata (changed-block tracking, KEP-3314): `GetMetadataAllocated` and
//! `GetMetadataDelta`, served by the controller plugin on its own socket next to Controller,
//! answered by the agent that holds the snapshots (`GetAllocatedExtents`, `GetDeltaExtents`).
//!
//! Extents are `VARIABLE_LENGTH`: FlashCopy knows changes per grain (64 or 256 KiB), and runs of
//! adjacent grains come merged into one extent, so a sequential change of 1 GiB is one tuple
//! instead of 4096 fixed blocks. Every extent starts on a grain; the last one of an image that
//! ends inside a grain ends at the image's end. `starting_offset` selects the grain that holds
//! it (the first extent may begin up to one grain before it); `max_results` caps the tuples per
//! message (0: the agent's page of 1024). Secrets are accepted and never logged (the spans
//! carry only the snapshot ids).
//!
//! Errors: an empty id or a negative offset or max_results INVALID_ARGUMENT; an id that names
//! no snapshot NOT_FOUND; snapshots of different volumes, or a base that is not older than the
//! target, INVALID_ARGUMENT; a snapshot that is not a readable point in time (not cut yet,
//! stopped) FAILED_PRECONDITION; `starting_offset` at or past the end of the image OUT_OF_RANGE.
//! A client that stops reading: the forwarder holds two messages, then the agent's stream is
//! dropped, which ends the agent's scan.

use super::controller::ControllerService;
use super::ids::{self, Kind, NodeObj};
use super::status::CsiError;
use crate::proto::agent::v1 as pb;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::snapshot_metadata_server::SnapshotMetadata;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// A cut, readable snapshot: where it lives and its mapping.
struct Snap {
    o: NodeObj,
    m: pb::Mapping,
}

/// An agent status of a changed-block listing: its own codes for the listing's rules carry
/// over (they name the request's fault), others as everywhere else.
fn agent_status(node: &str, s: Status) -> Status {
    match s.code() {
        Code::NotFound | Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            Status::new(s.code(), format!("agent of node {node}: {}", s.message()))
        }
        _ => CsiError::agent(node, s).into(),
    }
}

fn checked(field: &'static str, v: i64) -> Result<u64, CsiError> {
    u64::try_from(v).map_err(|_| CsiError::Invalid(format!("{field} is negative ({v})")))
}

impl ControllerService {
    async fn cut_snapshot(&self, field: &'static str, id: &str) -> Result<Snap, CsiError> {
        let missing = || CsiError::NotFound(format!("snapshot {id} does not exist"));
        let o = ids::required(field, Kind::Snapshot, id)?.ok_or_else(missing)?;
        if !self.agents.knows(&o.node) {
            return Err(missing());
        }
        let m = self.snapshot_mapping_of(&o).await?.ok_or_else(missing)?;
        if !super::controller::ready(&m) {
            return Err(CsiError::FailedPrecondition(format!(
                "snapshot {id} is not a readable point in time (mapping {} is {:?})",
                m.name,
                m.state()
            )));
        }
        Ok(Snap { o, m })
    }
}

/// Forwards agent pages as CSI responses until either side ends.
fn forward<T: Send + 'static>(
    node: String,
    mut from: Streaming<pb::ExtentPage>,
    make: fn(i64, Vec<csi::BlockMetadata>) -> T,
) -> Stream<T> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                n = from.message() => n,
                // The client went away: dropping `from` cancels the agent's stream.
                _ = tx.closed() => break,
            };
            let msg = match next {
                Ok(Some(p)) => Ok(make(
                    p.volume_size_bytes as i64,
                    p.extents
                        .into_iter()
                        .map(|e| csi::BlockMetadata {
                            byte_offset: e.offset as i64,
                            size_bytes: e.length as i64,
                        })
                        .collect(),
                )),
                Ok(None) => break,
                Err(s) => Err(agent_status(&node, s)),
            };
            let end = msg.is_err();
            if tx.send(msg).await.is_err() || end {
                break;
            }
        }
        tracing::debug!(node = %node, "snapshot metadata stream ended");
    });
    ReceiverStream::new(rx)
}

const VARIABLE: i32 = csi::BlockMetadataType::VariableLength as i32;

#[tonic::async_trait]
impl SnapshotMetadata for ControllerService {
    type GetMetadataAllocatedStream = Stream<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Stream<csi::GetMetadataDeltaResponse>;

    #[tracing::instrument(skip_all, fields(snapshot = %req.get_ref().snapshot_id))]
    async fn get_metadata_allocated(
        &self,
        req: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = req.into_inner();
        let s = self.cut_snapshot("snapshot_id", &r.snapshot_id).await?;
        let offset = checked("starting_offset", r.starting_offset)?;
        let page = checked("max_results", r.max_results.into())? as u32;
        let mut c = self.client(&s.o.node)?;
        let from = c
            .get_allocated_extents(pb::GetAllocatedExtentsRequest {
                mapping: s.m.id.to_string(),
                starting_offset: offset,
                page_size: page,
            })
            .await
            .map_err(|e| agent_status(&s.o.node, e))?
            .into_inner();
        Ok(Response::new(forward(s.o.node, from, |cap, ext| {
            csi::GetMetadataAllocatedResponse {
                block_metadata_type: VARIABLE,
                volume_capacity_bytes: cap,
                block_metadata: ext,
            }
        })))
    }

    #[tracing::instrument(skip_all, fields(base = %req.get_ref().base_snapshot_id, target = %req.get_ref().target_snapshot_id))]
    async fn get_metadata_delta(
        &self,
        req: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = req.into_inner();
        let base = self
            .cut_snapshot("base_snapshot_id", &r.base_snapshot_id)
            .await?;
        let target = self
            .cut_snapshot("target_snapshot_id", &r.target_snapshot_id)
            .await?;
        if base.o.node != target.o.node || base.m.source_id != target.m.source_id {
            return Err(CsiError::Invalid(format!(
                "snapshots {} and {} are of different volumes ({} and {})",
                r.base_snapshot_id,
                r.target_snapshot_id,
                ids::volume_id(&base.o.node, base.m.source_id),
                ids::volume_id(&target.o.node, target.m.source_id)
            ))
            .into());
        }
        if (base.m.start_time, base.m.id) >= (target.m.start_time, target.m.id) {
            return Err(CsiError::Invalid(format!(
                "base snapshot {} is not older than target snapshot {}",
                r.base_snapshot_id, r.target_snapshot_id
            ))
            .into());
        }
        let offset = checked("starting_offset", r.starting_offset)?;
        let page = checked("max_results", r.max_results.into())? as u32;
        let mut c = self.client(&base.o.node)?;
        let from = c
            .get_delta_extents(pb::GetDeltaExtentsRequest {
                base_mapping: base.m.id.to_string(),
                target_mapping: target.m.id.to_string(),
                starting_offset: offset,
                page_size: page,
            })
            .await
            .map_err(|e| agent_status(&base.o.node, e))?
            .into_inner();
        Ok(Response::new(forward(target.o.node, from, |cap, ext| {
            csi::GetMetadataDeltaResponse {
                block_metadata_type: VARIABLE,
                volume_capacity_bytes: cap,
                block_metadata: ext,
            }
        })))
    }
}
