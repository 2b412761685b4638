//! The tonic implementation of `flashcopy.agent.v1.Agent`: resolve the references a request
//! carries, run the pool call on the blocking pool, publish its events, wake the copy workers,
//! answer with the object's new view. Errors become statuses in [`super::status`] only.

use super::convert;
use super::events::EventHub;
use super::status::AgentError;
use super::workers::Workers;
use crate::engine::GroupId;
use crate::engine::{MappingChange, MappingSpec};
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_server::Agent;
use crate::volume::{FrozenGroup, Pool, StartReport};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Pause windows of starts (FLASHCOPY.md §4.2): how long host I/O was held.
#[derive(Debug, Default)]
pub struct PauseStats {
    starts: AtomicU64,
    last_us: AtomicU64,
    max_us: AtomicU64,
    total_us: AtomicU64,
}

impl PauseStats {
    fn record(&self, report: &StartReport) -> u64 {
        let us = report.pause.as_micros() as u64;
        self.starts.fetch_add(1, Ordering::Relaxed);
        self.last_us.store(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        self.total_us.fetch_add(us, Ordering::Relaxed);
        us
    }
}

/// Where the agent serves, for `GetAgentInfo`.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// Data directory.
    pub data_dir: String,
    /// "dir" or "devices".
    pub backend: String,
    /// Agent API socket.
    pub agent_socket: String,
    /// NBD socket.
    pub nbd_socket: String,
    /// Agent API TCP address, if any.
    pub agent_tcp: String,
    /// NBD TCP address, if any.
    pub nbd_tcp: String,
    /// Thin-provisioning budget of the pool in bytes.
    pub capacity_bytes: u64,
}

/// The agent API over one pool.
#[derive(Clone, Debug)]
pub struct AgentService {
    pool: Arc<Pool>,
    events: Arc<EventHub>,
    workers: Arc<Workers>,
    pauses: Arc<PauseStats>,
    endpoints: Arc<Endpoints>,
    shutdown: watch::Receiver<bool>,
    frozen: Arc<parking_lot::Mutex<HashMap<String, (GroupId, FrozenGroup)>>>,
    freezes: Arc<AtomicU64>,
}

type RpcResult<T> = Result<Response<T>, Status>;

/// Extents per page of a changed-block listing when the client names none, and at most.
const DEFAULT_PAGE: usize = 1024;
const MAX_PAGE: usize = 65_536;

impl AgentService {
    /// A service over `pool`; event streams end when `shutdown` turns true.
    pub fn new(
        pool: Arc<Pool>,
        events: Arc<EventHub>,
        workers: Arc<Workers>,
        endpoints: Endpoints,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            pool,
            events,
            workers,
            pauses: Arc::default(),
            endpoints: Arc::new(endpoints),
            shutdown,
            frozen: Arc::default(),
            freezes: Arc::default(),
        }
    }

    /// Runs `f` with the pool on the blocking pool, inside the request's span.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> Result<T, AgentError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&pool)))
            .await
            .map_err(|e| AgentError::Internal(format!("request task failed: {e}")))?
            .map_err(Status::from)
    }

    /// Streams the pages of an extent scan. The channel holds two pages, and the scan stops at
    /// the first page the client does not take (it went away) or at shutdown, so a client that
    /// stops reading holds one blocking thread only until it disconnects, and memory of two
    /// pages and one chunk.
    fn stream_extents(
        &self,
        mut scan: crate::volume::ExtentScan,
        page_size: u32,
    ) -> ReceiverStream<Result<pb::ExtentPage, Status>> {
        let page = match page_size {
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let (tx, rx) = mpsc::channel(2);
        let pool = self.pool.clone();
        let shutdown = self.shutdown.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _s = span.enter();
            let mut first = true;
            loop {
                let msg = match pool.next_extents(&mut scan, page) {
                    Ok(ext) if ext.is_empty() && !first => return,
                    Ok(ext) => Ok(pb::ExtentPage {
                        volume_size_bytes: scan.capacity,
                        grain_bytes: scan.grain,
                        extents: ext
                            .into_iter()
                            .map(|r| pb::Extent {
                                offset: r.start,
                                length: r.end - r.start,
                            })
                            .collect(),
                    }),
                    Err(e) => Err(Status::from(AgentError::from(e))),
                };
                first = false;
                // A listing cut short by a shutdown must not look complete.
                let msg = if *shutdown.borrow() {
                    Err(Status::from(AgentError::ShuttingDown))
                } else {
                    msg
                };
                let end = msg.is_err();
                if tx.blocking_send(msg).is_err() || end {
                    tracing::debug!("extent stream ended");
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// After a command: publish what it did and let the workers look for new work.
    /// Runs a pool command that changes state: in a blocking task, then publishes the events it
    /// reported and wakes the copy workers, then replies with what it returned.
    async fn command<T, F>(&self, f: F) -> RpcResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> Result<(T, Vec<crate::engine::Event>), AgentError> + Send + 'static,
    {
        let (t, events) = self.blocking(f).await?;
        self.changed(&events);
        ok(t)
    }

    fn changed(&self, events: &[crate::engine::Event]) {
        self.events.publish_all(events);
        self.workers.wake();
    }

    fn started(&self, report: &StartReport, mapping: Option<u64>, group: Option<u64>) -> u64 {
        let pause_micros = self.pauses.record(report);
        self.changed(&report.events);
        self.events.publish(pb::event::Kind::Started(pb::Started {
            mapping,
            group,
            pause_micros,
        }));
        pause_micros
    }
}

fn ok<T>(t: T) -> RpcResult<T> {
    Ok(Response::new(t))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn get_agent_info(
        &self,
        _: Request<pb::GetAgentInfoRequest>,
    ) -> RpcResult<pb::AgentInfo> {
        let (volumes, mappings, groups, rounds, provisioned) = self
            .blocking(|pool| {
                let e = pool.engine();
                Ok((
                    e.volumes().count() as u32,
                    e.mappings().count() as u32,
                    e.groups().count() as u32,
                    pool.commit_rounds(),
                    e.volumes().map(|v| v.size).sum::<u64>(),
                ))
            })
            .await?;
        let s = &self.pool.stats;
        let p = &self.pauses;
        let ep = &self.endpoints;
        ok(pb::AgentInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            data_dir: ep.data_dir.clone(),
            backend: ep.backend.clone(),
            agent_socket: ep.agent_socket.clone(),
            nbd_socket: ep.nbd_socket.clone(),
            agent_tcp: ep.agent_tcp.clone(),
            nbd_tcp: ep.nbd_tcp.clone(),
            volumes,
            mappings,
            groups,
            cow_grains: s.cow_grains.load(Ordering::Relaxed),
            background_grains: s.background_grains.load(Ordering::Relaxed),
            clean_grains: s.clean_grains.load(Ordering::Relaxed),
            commit_rounds: rounds,
            starts: p.starts.load(Ordering::Relaxed),
            last_pause_micros: p.last_us.load(Ordering::Relaxed),
            max_pause_micros: p.max_us.load(Ordering::Relaxed),
            total_pause_micros: p.total_us.load(Ordering::Relaxed),
            active_workers: self.workers.active() as u32,
            capacity_bytes: ep.capacity_bytes,
            provisioned_bytes: provisioned,
        })
    }

    // ---- volumes ----

    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> RpcResult<pb::Volume> {
        let r = req.into_inner();
        let v = self
            .blocking(move |pool| {
                let id = pool.create_volume_from(&r.name, r.size_bytes, &r.origin)?;
                tracing::info!(volume = %id, name = %r.name, size = r.size_bytes, "volume created");
                let e = pool.engine();
                let v = e
                    .volume(id)
                    .ok_or(crate::engine::EngineError::NoSuchVolume(id))?;
                Ok(convert::volume(&e, v, &pool.stats))
            })
            .await?;
        ok(v)
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> RpcResult<pb::DeleteVolumeResponse> {
        let r = req.into_inner();
        self.blocking(move |pool| {
            let id = convert::volume_ref(&pool.engine(), &r.volume)?;
            pool.delete_volume(id)?;
            tracing::info!(volume = %id, "volume deleted");
            Ok(())
        })
        .await?;
        ok(pb::DeleteVolumeResponse {})
    }

    async fn resize_volume(&self, req: Request<pb::ResizeVolumeRequest>) -> RpcResult<pb::Volume> {
        let r = req.into_inner();
        let v = self
            .blocking(move |pool| {
                let id = convert::volume_ref(&pool.engine(), &r.volume)?;
                pool.resize_volume(id, r.size_bytes)?;
                tracing::info!(volume = %id, size = r.size_bytes, "volume resized");
                let e = pool.engine();
                let v = e
                    .volume(id)
                    .ok_or(crate::engine::EngineError::NoSuchVolume(id))?;
                Ok(convert::volume(&e, v, &pool.stats))
            })
            .await?;
        ok(v)
    }

    async fn rename_volume(&self, req: Request<pb::RenameVolumeRequest>) -> RpcResult<pb::Volume> {
        let r = req.into_inner();
        let v = self
            .blocking(move |pool| {
                let id = convert::volume_ref(&pool.engine(), &r.volume)?;
                pool.rename_volume(id, &r.name)?;
                tracing::info!(volume = %id, name = %r.name, "volume renamed");
                let e = pool.engine();
                let v = e
                    .volume(id)
                    .ok_or(crate::engine::EngineError::NoSuchVolume(id))?;
                Ok(convert::volume(&e, v, &pool.stats))
            })
            .await?;
        ok(v)
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> RpcResult<pb::Volume> {
        let r = req.into_inner();
        let v = self
            .blocking(move |pool| {
                let e = pool.engine();
                let id = convert::volume_ref(&e, &r.volume)?;
                let v = e
                    .volume(id)
                    .ok_or(crate::engine::EngineError::NoSuchVolume(id))?;
                Ok(convert::volume(&e, v, &pool.stats))
            })
            .await?;
        ok(v)
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> RpcResult<pb::ListVolumesResponse> {
        let volumes = self
            .blocking(|pool| {
                let e = pool.engine();
                Ok(e.volumes()
                    .map(|v| convert::volume(&e, v, &pool.stats))
                    .collect())
            })
            .await?;
        ok(pb::ListVolumesResponse { volumes })
    }

    // ---- mappings ----

    async fn create_mapping(
        &self,
        req: Request<pb::CreateMappingRequest>,
    ) -> RpcResult<pb::Mapping> {
        let r = req.into_inner();
        let m = self
            .blocking(move |pool| {
                let spec = {
                    let e = pool.engine();
                    let mut spec = MappingSpec::new(
                        convert::volume_ref(&e, &r.source)?,
                        convert::volume_ref(&e, &r.target)?,
                    );
                    spec.name = r.name;
                    if let Some(v) = r.copy_rate {
                        spec.copy_rate = convert::rate("copy rate", v)?;
                    }
                    if let Some(v) = r.clean_rate {
                        spec.clean_rate = convert::rate("clean rate", v)?;
                    }
                    spec.grain = r.grain_kib.map(convert::grain).transpose()?;
                    spec.incremental = r.incremental;
                    spec.autodelete = r.autodelete;
                    spec.group = r
                        .group
                        .as_deref()
                        .map(|g| convert::group_ref(&e, g))
                        .transpose()?;
                    spec
                };
                let id = pool.create_mapping(spec)?;
                tracing::info!(mapping = %id, "mapping created");
                convert::mapping_by_id(&pool.engine(), id)
            })
            .await?;
        self.events.publish(pb::event::Kind::Created(pb::Created {
            mapping: Some(m.id),
            group: None,
        }));
        ok(m)
    }

    async fn prepare_mapping(
        &self,
        req: Request<pb::PrepareMappingRequest>,
    ) -> RpcResult<pb::Mapping> {
        let r = req.into_inner();
        self.command(move |pool| {
            let id = convert::mapping_ref(&pool.engine(), &r.mapping)?;
            let ev = pool.prepare_mapping(id, r.restore)?;
            Ok((convert::mapping_by_id(&pool.engine(), id)?, ev))
        })
        .await
    }

    async fn start_mapping(
        &self,
        req: Request<pb::StartMappingRequest>,
    ) -> RpcResult<pb::StartMappingResponse> {
        let r = req.into_inner();
        let (id, report) = self
            .blocking(move |pool| {
                let id = convert::mapping_ref(&pool.engine(), &r.mapping)?;
                Ok((id, pool.start_mapping(id, r.prep, r.restore)?))
            })
            .await?;
        let pause_micros = self.started(&report, Some(id.0), None);
        let mapping = self
            .blocking(move |pool| convert::mapping_by_id(&pool.engine(), id))
            .await
            .ok();
        ok(pb::StartMappingResponse {
            mapping,
            pause_micros,
        })
    }

    async fn stop_mapping(
        &self,
        req: Request<pb::StopMappingRequest>,
    ) -> RpcResult<pb::StopMappingResponse> {
        let r = req.into_inner();
        self.command(move |pool| {
            let id = convert::mapping_ref(&pool.engine(), &r.mapping)?;
            let ev = pool.stop_mapping(id, r.force, r.split)?;
            tracing::info!(mapping = %id, force = r.force, split = r.split, "mapping stopped");
            let mapping = convert::mapping_by_id(&pool.engine(), id).ok();
            Ok((pb::StopMappingResponse { mapping }, ev))
        })
        .await
    }

    async fn delete_mapping(
        &self,
        req: Request<pb::DeleteMappingRequest>,
    ) -> RpcResult<pb::DeleteMappingResponse> {
        let r = req.into_inner();
        self.command(move |pool| {
            let id = convert::mapping_ref(&pool.engine(), &r.mapping)?;
            Ok((
                pb::DeleteMappingResponse {},
                pool.delete_mapping(id, r.force)?,
            ))
        })
        .await
    }

    async fn modify_mapping(
        &self,
        req: Request<pb::ModifyMappingRequest>,
    ) -> RpcResult<pb::Mapping> {
        let r = req.into_inner();
        self.command(move |pool| {
            let id = convert::mapping_ref(&pool.engine(), &r.mapping)?;
            let change = MappingChange {
                name: r.name,
                copy_rate: r
                    .copy_rate
                    .map(|v| convert::rate("copy rate", v))
                    .transpose()?,
                clean_rate: r
                    .clean_rate
                    .map(|v| convert::rate("clean rate", v))
                    .transpose()?,
                autodelete: r.autodelete,
                group: None,
            };
            if change == MappingChange::default() {
                return Err(AgentError::InvalidArgument(
                    "nothing to change: give a name, copy rate, clean rate or autodelete".into(),
                ));
            }
            let ev = pool.modify_mapping(id, change)?;
            tracing::info!(mapping = %id, "mapping modified");
            Ok((convert::mapping_by_id(&pool.engine(), id)?, ev))
        })
        .await
    }

    async fn get_mapping(&self, req: Request<pb::GetMappingRequest>) -> RpcResult<pb::Mapping> {
        let r = req.into_inner();
        let m = self
            .blocking(move |pool| {
                let e = pool.engine();
                let id = convert::mapping_ref(&e, &r.mapping)?;
                convert::mapping_by_id(&e, id)
            })
            .await?;
        ok(m)
    }

    async fn list_mappings(
        &self,
        req: Request<pb::ListMappingsRequest>,
    ) -> RpcResult<pb::ListMappingsResponse> {
        let r = req.into_inner();
        let mappings = self
            .blocking(move |pool| {
                let e = pool.engine();
                let group = r
                    .group
                    .as_deref()
                    .map(|g| convert::group_ref(&e, g))
                    .transpose()?;
                Ok(e.mappings()
                    .filter(|m| group.is_none() || m.group == group)
                    .map(|m| convert::mapping(&e, m))
                    .collect())
            })
            .await?;
        ok(pb::ListMappingsResponse { mappings })
    }

    // ---- consistency groups ----

    async fn create_group(&self, req: Request<pb::CreateGroupRequest>) -> RpcResult<pb::Group> {
        let r = req.into_inner();
        let g = self
            .blocking(move |pool| {
                let id = pool.create_group(r.name.as_deref(), r.autodelete)?;
                tracing::info!(group = %id, "consistency group created");
                convert::group(&pool.engine(), id)
            })
            .await?;
        self.events.publish(pb::event::Kind::Created(pb::Created {
            mapping: None,
            group: Some(g.id),
        }));
        ok(g)
    }

    async fn add_to_group(&self, req: Request<pb::AddToGroupRequest>) -> RpcResult<pb::Mapping> {
        let r = req.into_inner();
        self.command(move |pool| {
            let (map, group) = {
                let e = pool.engine();
                (
                    convert::mapping_ref(&e, &r.mapping)?,
                    convert::group_ref(&e, &r.group)?,
                )
            };
            let ev = pool.modify_mapping(
                map,
                MappingChange {
                    group: Some(Some(group)),
                    ..Default::default()
                },
            )?;
            tracing::info!(mapping = %map, group = %group, "mapping joined group");
            Ok((convert::mapping_by_id(&pool.engine(), map)?, ev))
        })
        .await
    }

    async fn remove_from_group(
        &self,
        req: Request<pb::RemoveFromGroupRequest>,
    ) -> RpcResult<pb::Mapping> {
        let r = req.into_inner();
        self.command(move |pool| {
            let map = convert::mapping_ref(&pool.engine(), &r.mapping)?;
            let ev = pool.modify_mapping(
                map,
                MappingChange {
                    group: Some(None),
                    ..Default::default()
                },
            )?;
            tracing::info!(mapping = %map, "mapping left its group");
            Ok((convert::mapping_by_id(&pool.engine(), map)?, ev))
        })
        .await
    }

    async fn prepare_group(&self, req: Request<pb::PrepareGroupRequest>) -> RpcResult<pb::Group> {
        let r = req.into_inner();
        self.command(move |pool| {
            let id = convert::group_ref(&pool.engine(), &r.group)?;
            let ev = pool.prepare_group(id, r.restore)?;
            Ok((convert::group(&pool.engine(), id)?, ev))
        })
        .await
    }

    async fn start_group(
        &self,
        req: Request<pb::StartGroupRequest>,
    ) -> RpcResult<pb::StartGroupResponse> {
        let r = req.into_inner();
        let (id, report) = self
            .blocking(move |pool| {
                let id = convert::group_ref(&pool.engine(), &r.group)?;
                Ok((id, pool.start_group(id, r.prep, r.restore)?))
            })
            .await?;
        let pause_micros = self.started(&report, None, Some(id.0));
        tracing::info!(group = %id, pause_us = pause_micros, "consistency group started");
        let group = self
            .blocking(move |pool| convert::group(&pool.engine(), id))
            .await
            .ok();
        ok(pb::StartGroupResponse {
            group,
            pause_micros,
        })
    }

    async fn freeze_group(
        &self,
        req: Request<pb::FreezeGroupRequest>,
    ) -> RpcResult<pb::FreezeGroupResponse> {
        let r = req.into_inner();
        if !(1..=60_000).contains(&r.timeout_ms) {
            return Err(AgentError::InvalidArgument(format!(
                "timeout_ms {} is outside 1-60000",
                r.timeout_ms
            ))
            .into());
        }
        let hold = std::time::Duration::from_millis(u64::from(r.timeout_ms));
        let id = self
            .blocking(move |pool| convert::group_ref(&pool.engine(), &r.group))
            .await?;
        let pool = self.pool.clone();
        // Waits for in-flight I/O to drain and the sources to flush.
        let frozen = tokio::task::spawn_blocking(move || pool.freeze_group(id, hold))
            .await
            .map_err(|e| AgentError::Internal(format!("freeze task failed: {e}")))?
            .map_err(AgentError::from)?;
        let n = self.freezes.fetch_add(1, Ordering::Relaxed);
        let token = format!("freeze-{}-{n}", id.0);
        let mut map = self.frozen.lock();
        // Forget freezes that ended on their own (expired).
        map.retain(|_, (_, f)| !f.is_over());
        map.insert(token.clone(), (id, frozen));
        ok(pb::FreezeGroupResponse { token })
    }

    async fn commit_group_start(
        &self,
        req: Request<pb::CommitGroupStartRequest>,
    ) -> RpcResult<pb::StartGroupResponse> {
        let r = req.into_inner();
        let (id, frozen) = self
            .frozen
            .lock()
            .remove(&r.token)
            .ok_or_else(|| AgentError::Pool(crate::volume::VolumeError::FreezeOver))?;
        let report = tokio::task::spawn_blocking(move || frozen.commit())
            .await
            .map_err(|e| AgentError::Internal(format!("commit task failed: {e}")))?
            .map_err(AgentError::from)?;
        let pause_micros = self.started(&report, None, Some(id.0));
        let group = self
            .blocking(move |pool| convert::group(&pool.engine(), id))
            .await
            .ok();
        ok(pb::StartGroupResponse {
            group,
            pause_micros,
        })
    }

    async fn thaw_group(
        &self,
        req: Request<pb::ThawGroupRequest>,
    ) -> RpcResult<pb::ThawGroupResponse> {
        let r = req.into_inner();
        let f = self.frozen.lock().remove(&r.token);
        let thawed = f.as_ref().is_some_and(|(_, f)| !f.is_over());
        // Dropping the handle resumes I/O.
        drop(f);
        ok(pb::ThawGroupResponse { thawed })
    }

    async fn stop_group(&self, req: Request<pb::StopGroupRequest>) -> RpcResult<pb::Group> {
        let r = req.into_inner();
        self.command(move |pool| {
                let id = convert::group_ref(&pool.engine(), &r.group)?;
                let ev = pool.stop_group(id, r.force, r.split)?;
                tracing::info!(group = %id, force = r.force, split = r.split, "consistency group stopped");
                Ok((convert::group(&pool.engine(), id)?, ev))
            })
            .await
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> RpcResult<pb::DeleteGroupResponse> {
        let r = req.into_inner();
        self.command(move |pool| {
            let id = convert::group_ref(&pool.engine(), &r.group)?;
            let ev = pool.delete_group(id, r.force)?;
            tracing::info!(group = %id, "consistency group deleted");
            Ok((pb::DeleteGroupResponse {}, ev))
        })
        .await
    }

    async fn get_group(&self, req: Request<pb::GetGroupRequest>) -> RpcResult<pb::Group> {
        let r = req.into_inner();
        let g = self
            .blocking(move |pool| {
                let e = pool.engine();
                let id = convert::group_ref(&e, &r.group)?;
                convert::group(&e, id)
            })
            .await?;
        ok(g)
    }

    async fn list_groups(
        &self,
        _: Request<pb::ListGroupsRequest>,
    ) -> RpcResult<pb::ListGroupsResponse> {
        let groups = self
            .blocking(|pool| {
                let e = pool.engine();
                e.groups().map(|g| convert::group(&e, g.id)).collect()
            })
            .await?;
        ok(pb::ListGroupsResponse { groups })
    }

    // ---- events ----

    type GetAllocatedExtentsStream = ReceiverStream<Result<pb::ExtentPage, Status>>;
    type GetDeltaExtentsStream = ReceiverStream<Result<pb::ExtentPage, Status>>;

    async fn get_allocated_extents(
        &self,
        req: Request<pb::GetAllocatedExtentsRequest>,
    ) -> RpcResult<Self::GetAllocatedExtentsStream> {
        let r = req.into_inner();
        let scan = self
            .blocking(move |pool| {
                let id = convert::mapping_ref(&pool.engine(), &r.mapping)?;
                Ok(pool.scan_allocated(id, r.starting_offset)?)
            })
            .await?;
        ok(self.stream_extents(scan, r.page_size))
    }

    async fn get_delta_extents(
        &self,
        req: Request<pb::GetDeltaExtentsRequest>,
    ) -> RpcResult<Self::GetDeltaExtentsStream> {
        let r = req.into_inner();
        let scan = self
            .blocking(move |pool| {
                let (base, target) = {
                    let e = pool.engine();
                    (
                        convert::mapping_ref(&e, &r.base_mapping)?,
                        convert::mapping_ref(&e, &r.target_mapping)?,
                    )
                };
                Ok(pool.scan_delta(base, target, r.starting_offset)?)
            })
            .await?;
        ok(self.stream_extents(scan, r.page_size))
    }

    type WatchEventsStream = ReceiverStream<Result<pb::Event, Status>>;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> RpcResult<Self::WatchEventsStream> {
        let mut shutdown = self.shutdown.clone();
        if *shutdown.borrow() {
            return Err(AgentError::ShuttingDown.into());
        }
        let mut rx = self.events.subscribe();
        let (tx, out) = mpsc::channel(64);
        // Forwards until the client goes away, the client lags too far, or the agent stops
        // (so a graceful shutdown does not wait for watchers forever).
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    r = rx.recv() => r,
                    _ = shutdown.changed() => break,
                    _ = tx.closed() => break,
                };
                let msg = match item {
                    Ok(ev) => Ok(ev),
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(Status::data_loss(format!(
                        "the watcher fell {n} events behind; list the objects again and watch anew"
                    ))),
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    break;
                }
            }
        });
        ok(ReceiverStream::new(out))
    }
}
