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

use super::guards::{Guards, Held};
use super::ids::{self, Kind, NodeObj};
use super::params::Params;
use super::status::CsiError;
use super::{Agents, TOPOLOGY_KEY};
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_client::AgentClient;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::controller_server::Controller;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

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

fn not_found_is_none<T>(node: &str, r: Result<Response<T>, Status>) -> Result<Option<T>, CsiError> {
    match r {
        Ok(v) => Ok(Some(v.into_inner())),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(CsiError::agent(node, s)),
    }
}

/// Whether a mapping is a snapshot that has been cut.
pub(super) fn is_cut(m: &pb::Mapping) -> bool {
    ids::has_prefix(&m.name, ids::SNAPSHOT_PREFIX) && m.start_time.is_some()
}

/// A cut snapshot is usable while its mapping copies or has copied; a stopped one is not.
pub(super) fn ready(m: &pb::Mapping) -> bool {
    m.start_time.is_some()
        && matches!(
            m.state(),
            pb::MappingState::Copying | pb::MappingState::IdleOrCopied
        )
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

    /// A CSI volume (not hidden, not a snapshot target) by id.
    async fn csi_volume_of(&self, o: &NodeObj) -> Result<Option<pb::Volume>, CsiError> {
        Ok(self
            .find_volume(&o.node, o.id.to_string())
            .await?
            .filter(|v| v.id == o.id && ids::has_prefix(&v.name, ids::VOLUME_PREFIX)))
    }

    /// A snapshot mapping by id (cut or not).
    pub(super) async fn snapshot_mapping_of(
        &self,
        o: &NodeObj,
    ) -> Result<Option<pb::Mapping>, CsiError> {
        Ok(self
            .find_mapping(&o.node, o.id.to_string())
            .await?
            .filter(|m| m.id == o.id && ids::has_prefix(&m.name, ids::SNAPSHOT_PREFIX)))
    }

    /// Bytes a node may still provision.
    pub(super) async fn free_bytes(&self, node: &str) -> Result<u64, CsiError> {
        let mut c = self.client(node)?;
        let i = c
            .get_agent_info(pb::GetAgentInfoRequest {})
            .await
            .map_err(|s| CsiError::agent(node, s))?
            .into_inner();
        Ok(i.capacity_bytes.saturating_sub(i.provisioned_bytes))
    }

    pub(super) async fn ensure_room(&self, node: &str, bytes: u64) -> Result<(), CsiError> {
        let free = self.free_bytes(node).await?;
        if bytes > free {
            return Err(CsiError::ResourceExhausted(format!(
                "node {node} has {free} bytes of capacity left; {bytes} are needed"
            )));
        }
        Ok(())
    }

    /// The CSI view of a snapshot mapping (its size is the target's).
    pub(super) fn csi_snapshot(node: &str, m: &pb::Mapping, size: u64) -> csi::Snapshot {
        csi::Snapshot {
            size_bytes: size as i64,
            snapshot_id: ids::snapshot_id(node, m.id),
            source_volume_id: ids::volume_id(node, m.source_id),
            creation_time: m.start_time.map(|s| prost_types::Timestamp {
                seconds: s as i64,
                nanos: 0,
            }),
            ready_to_use: ready(m),
            group_snapshot_id: if m.group_id.is_some() && !m.group_name.is_empty() {
                ids::group_id(&m.group_name)
            } else {
                String::new()
            },
        }
    }

    pub(super) async fn snapshot_view(
        &self,
        node: &str,
        m: &pb::Mapping,
    ) -> Result<csi::Snapshot, CsiError> {
        let size = self
            .find_volume(node, m.target_id.to_string())
            .await?
            .map_or(0, |v| v.size_bytes);
        Ok(Self::csi_snapshot(node, m, size))
    }

    /// Stops a mapping without force (older snapshots that read through its target get their
    /// grains by cleaning first), waits for that, then deletes it.
    pub(super) async fn retire_mapping(&self, node: &str, map: u64) -> Result<(), CsiError> {
        let mut c = self.client(node)?;
        let Some(m) = self.find_mapping(node, map.to_string()).await? else {
            return Ok(());
        };
        if !matches!(
            m.state(),
            pb::MappingState::Stopped | pb::MappingState::IdleOrCopied
        ) {
            let r = c
                .stop_mapping(pb::StopMappingRequest {
                    mapping: map.to_string(),
                    force: false,
                    split: false,
                })
                .await;
            if let Err(s) = r
                && s.code() != Code::NotFound
            {
                return Err(CsiError::agent(node, s));
            }
        }
        let t0 = Instant::now();
        loop {
            let Some(m) = self.find_mapping(node, map.to_string()).await? else {
                return Ok(());
            };
            match m.state() {
                pb::MappingState::Stopped | pb::MappingState::IdleOrCopied => break,
                _ if t0.elapsed() > CLEANING_WAIT => {
                    return Err(CsiError::Aborted(format!(
                        "mapping {map} on node {node} is still cleaning (older snapshots take over its grains); retry later"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let r = c
            .delete_mapping(pb::DeleteMappingRequest {
                mapping: map.to_string(),
                force: true,
            })
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(CsiError::agent(node, s)),
        }
    }

    /// Deletes a volume if nothing uses it (NOT_FOUND counts as done).
    pub(super) async fn delete_agent_volume(&self, node: &str, id: u64) -> Result<bool, CsiError> {
        let mut c = self.client(node)?;
        match c
            .delete_volume(pb::DeleteVolumeRequest {
                volume: id.to_string(),
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(true),
            Err(s) if s.code() == Code::FailedPrecondition => Ok(false),
            Err(s) => Err(CsiError::agent(node, s)),
        }
    }

    /// Deletes hidden volumes nothing reads through any more.
    pub(super) async fn sweep_hidden(&self, node: &str) {
        let Ok(mut c) = self.client(node) else {
            return;
        };
        let Ok(list) = c.list_volumes(pb::ListVolumesRequest {}).await else {
            return;
        };
        for v in list.into_inner().volumes {
            if ids::has_prefix(&v.name, ids::HIDDEN_PREFIX) && v.mappings.is_empty() {
                match self.delete_agent_volume(node, v.id).await {
                    Ok(true) => tracing::info!(node, volume = v.id, "hidden volume released"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(node, volume = v.id, error = %e, "hidden volume not released")
                    }
                }
            }
        }
    }

    /// Removes a snapshot: its mapping (after cleaning) and its target; then releases the
    /// source if it was deleted and this was its last dependant.
    pub(super) async fn remove_snapshot(
        &self,
        node: &str,
        m: &pb::Mapping,
    ) -> Result<(), CsiError> {
        let target = self.find_volume(node, m.target_id.to_string()).await?;
        if let Some(t) = &target {
            let others: Vec<u64> = t.mappings.iter().copied().filter(|x| *x != m.id).collect();
            if !others.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "snapshot {} is the source of mapping(s) {others:?} (volumes restored from it are still copying); retry when they are done",
                    ids::snapshot_id(node, m.id)
                )));
            }
        }
        self.retire_mapping(node, m.id).await?;
        if target.is_some() && !self.delete_agent_volume(node, m.target_id).await? {
            return Err(CsiError::FailedPrecondition(format!(
                "the target volume {} of snapshot {} is still in use",
                m.target_id,
                ids::snapshot_id(node, m.id)
            )));
        }
        self.sweep_hidden(node).await;
        Ok(())
    }
}

/// The size for a new volume (K8S-SNAPSHOTS.md §B.5): at least `required`, at most `limit`
/// (0 = unset); with a source, at least the source's size (a larger copy reads the source's
/// data followed by zeros).
pub fn choose_size(
    range: Option<&csi::CapacityRange>,
    source: Option<u64>,
) -> Result<u64, CsiError> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(CsiError::Invalid(format!(
            "capacity_range must not be negative (required_bytes {req}, limit_bytes {lim})"
        )));
    }
    let (req, lim) = (req as u64, lim as u64);
    if lim > 0 && req > lim {
        return Err(CsiError::OutOfRange(format!(
            "required_bytes {req} is above limit_bytes {lim}"
        )));
    }
    if let Some(src) = source {
        if lim > 0 && lim < src {
            return Err(CsiError::OutOfRange(format!(
                "limit_bytes {lim} is below the source's size {src}"
            )));
        }
        if req <= src {
            return Ok(src);
        }
        return fit_size(req, lim);
    }
    let want = if req > 0 {
        req
    } else if lim > 0 {
        lim.min(DEFAULT_VOLUME_BYTES)
    } else {
        DEFAULT_VOLUME_BYTES
    };
    fit_size(want, lim)
}

/// `want` rounded up to whole MiB when `limit` (0 = unset) allows it (file systems like
/// aligned sizes, and FlashCopy maps volumes of different sizes only in whole grains), else
/// to sectors; OUT_OF_RANGE when no multiple of 512 from `want` up to `limit` exists.
fn fit_size(want: u64, lim: u64) -> Result<u64, CsiError> {
    const MIB: u64 = 1 << 20;
    let mut size = want.div_ceil(MIB) * MIB;
    if lim > 0 && size > lim {
        size = want.div_ceil(512) * 512;
    }
    if lim > 0 && size > lim {
        size = lim / 512 * 512;
    }
    if size == 0 || size < want {
        return Err(no_fit(want, lim));
    }
    Ok(size)
}

fn no_fit(req: u64, lim: u64) -> CsiError {
    CsiError::OutOfRange(format!(
        "no size that is a multiple of 512 bytes fits required_bytes {req} and limit_bytes {lim}"
    ))
}

/// Checks capabilities: malformed ones are INVALID_ARGUMENT (`Err`), unsupported ones are
/// reported as `Ok(Some(why))`.
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<Option<String>, CsiError> {
    use csi::volume_capability::AccessType;
    use csi::volume_capability::access_mode::Mode;
    if caps.is_empty() {
        return Err(CsiError::Missing("volume_capabilities"));
    }
    for c in caps {
        let Some(at) = &c.access_type else {
            return Err(CsiError::Invalid(
                "a volume capability has neither block nor mount access type".into(),
            ));
        };
        let Some(am) = &c.access_mode else {
            return Err(CsiError::Missing("volume_capability.access_mode"));
        };
        match Mode::try_from(am.mode) {
            Ok(
                Mode::SingleNodeWriter
                | Mode::SingleNodeReaderOnly
                | Mode::SingleNodeSingleWriter
                | Mode::SingleNodeMultiWriter,
            ) => {}
            Ok(Mode::Unknown) | Err(_) => {
                return Err(CsiError::Invalid(format!(
                    "access mode {} is not a known mode",
                    am.mode
                )));
            }
            Ok(m) => {
                return Ok(Some(format!(
                    "access mode {} is not supported: a volume is served by one node",
                    m.as_str_name()
                )));
            }
        }
        if let AccessType::Mount(m) = at
            && !matches!(m.fs_type.as_str(), "" | "ext4" | "xfs")
        {
            return Ok(Some(format!(
                "fs_type {:?} is not supported (ext4 or xfs)",
                m.fs_type
            )));
        }
    }
    Ok(None)
}

/// Nodes named by a topology list (only our key counts; others cannot be satisfied).
fn topology_nodes(list: &[csi::Topology]) -> Vec<String> {
    list.iter()
        .filter(|t| t.segments.len() == 1)
        .filter_map(|t| t.segments.get(TOPOLOGY_KEY).cloned())
        .collect()
}

fn rpc(t: csi::controller_service_capability::rpc::Type) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(
            csi::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// What a volume made from `o` records as its origin: the source's CSI id.
fn origin_of(o: &NodeObj, snapshot: bool) -> String {
    o.id_string(if snapshot {
        Kind::Snapshot
    } else {
        Kind::Volume
    })
}

fn vol_key(id: &str) -> String {
    format!("volume {id}")
}

fn max_entries(n: i32) -> Result<usize, CsiError> {
    if n < 0 {
        return Err(CsiError::Invalid(format!(
            "max_entries must not be negative, got {n}"
        )));
    }
    Ok(if n == 0 { usize::MAX } else { n as usize })
}

/// One page of `items` sorted by key, after `start` (a key); the next token is the last key.
fn page<T>(
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

impl ControllerService {
    async fn create_volume_inner(
        &self,
        r: csi::CreateVolumeRequest,
    ) -> Result<csi::Volume, CsiError> {
        use csi::volume_content_source::Type as Src;
        ids::check_name("name", &r.name)?;
        if let Some(why) = check_capabilities(&r.volume_capabilities)? {
            return Err(CsiError::Invalid(why));
        }
        let params = Params::parse(&r.parameters)?;
        if !r.mutable_parameters.is_empty() {
            return Err(CsiError::Invalid(
                "mutable_parameters are not supported (no MODIFY_VOLUME capability)".into(),
            ));
        }
        let an = ids::agent_name(ids::VOLUME_PREFIX, &r.name);
        let topo = r.accessibility_requirements.clone().unwrap_or_default();
        let requisite = topology_nodes(&topo.requisite);
        let preferred = topology_nodes(&topo.preferred);
        if !topo.requisite.is_empty() && requisite.is_empty() {
            return Err(CsiError::ResourceExhausted(format!(
                "no requisite topology names a node with the key {TOPOLOGY_KEY}"
            )));
        }

        // The source, if any: its node is where the volume must live.
        let source = match r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.clone())
        {
            None => None,
            Some(Src::Snapshot(s)) => {
                let o = ids::required(
                    "volume_content_source.snapshot.snapshot_id",
                    Kind::Snapshot,
                    &s.snapshot_id,
                )?
                .ok_or_else(|| {
                    CsiError::NotFound(format!("snapshot {:?} does not exist", s.snapshot_id))
                })?;
                Some((o, s.snapshot_id, true))
            }
            Some(Src::Volume(v)) => {
                let o = ids::required(
                    "volume_content_source.volume.volume_id",
                    Kind::Volume,
                    &v.volume_id,
                )?
                .ok_or_else(|| {
                    CsiError::NotFound(format!("volume {:?} does not exist", v.volume_id))
                })?;
                Some((o, v.volume_id, false))
            }
        };
        if r.volume_content_source.is_some() && source.is_none() {
            return Err(CsiError::Invalid(
                "volume_content_source has neither snapshot nor volume".into(),
            ));
        }

        let mut keys = vec![format!("name {}", r.name)];
        if let Some((_, id, _)) = &source {
            keys.push(if id.starts_with("snap:") {
                format!("snapshot {id}")
            } else {
                vol_key(id)
            });
        }
        let _held = self.guard(keys)?;

        // Where it may live, in order of preference.
        let candidates: Vec<String> = if let Some((o, _, _)) = &source {
            if !requisite.is_empty() && !requisite.contains(&o.node) {
                return Err(CsiError::ResourceExhausted(format!(
                    "the source lives on node {}, which the requisite topology excludes",
                    o.node
                )));
            }
            vec![o.node.clone()]
        } else {
            let mut c: Vec<String> = Vec::new();
            let allowed = |n: &String| requisite.is_empty() || requisite.contains(n);
            for n in preferred.iter().chain(requisite.iter()) {
                if allowed(n) && !c.contains(n) && self.agents.knows(n) {
                    c.push(n.clone());
                }
            }
            if requisite.is_empty() && preferred.is_empty() {
                c = self.agents.nodes();
            }
            if c.is_empty() {
                return Err(CsiError::ResourceExhausted(
                    "no node with an agent satisfies the topology requirement".into(),
                ));
            }
            c
        };

        // Idempotency: the name may already exist on any candidate.
        for node in &candidates {
            let found = match self.find_volume(node, an.clone()).await {
                Ok(v) => v,
                Err(CsiError::Unavailable { .. }) if source.is_none() => continue,
                Err(e) => return Err(e),
            };
            if let Some(v) = found {
                let range = r.capacity_range.unwrap_or_default();
                let fits = (v.size_bytes as i64) >= range.required_bytes
                    && (range.limit_bytes == 0 || v.size_bytes as i64 <= range.limit_bytes);
                if !fits {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {:?} exists with {} bytes, outside the requested capacity range",
                        r.name, v.size_bytes
                    )));
                }
                // The volume records its source, which outlives the clone's mapping.
                let want = source
                    .as_ref()
                    .map_or(String::new(), |(o, _, snap)| origin_of(o, *snap));
                if v.origin != want {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {:?} exists with another content source",
                        r.name
                    )));
                }
                return Ok(self.volume_view(node, &v, r.volume_content_source.clone()));
            }
        }

        match source {
            None => {
                let size = choose_size(r.capacity_range.as_ref(), None)?;
                let mut last = None;
                for node in &candidates {
                    match self.ensure_room(node, size).await {
                        Ok(()) => {}
                        Err(e) => {
                            last = Some(e);
                            continue;
                        }
                    }
                    let mut c = self.client(node)?;
                    let v = c
                        .create_volume(pb::CreateVolumeRequest {
                            name: an.clone(),
                            size_bytes: size,
                            origin: String::new(),
                        })
                        .await
                        .map_err(|s| CsiError::agent(node, s))?
                        .into_inner();
                    tracing::info!(node = %node, volume = v.id, name = %r.name, size, "volume created");
                    return Ok(self.volume_view(node, &v, None));
                }
                Err(last.unwrap_or_else(|| {
                    CsiError::ResourceExhausted("no node can hold the volume".into())
                }))
            }
            Some((o, id, is_snap)) => {
                let node = o.node.clone();
                let from = if is_snap {
                    let m = self
                        .snapshot_mapping_of(&o)
                        .await?
                        .filter(is_cut)
                        .ok_or_else(|| {
                            CsiError::NotFound(format!("snapshot {id} does not exist"))
                        })?;
                    if !ready(&m) {
                        return Err(CsiError::FailedPrecondition(format!(
                            "snapshot {id} is not usable (its mapping is {})",
                            m.state().as_str_name()
                        )));
                    }
                    self.find_volume(&node, m.target_id.to_string())
                        .await?
                        .ok_or_else(|| {
                            CsiError::NotFound(format!("snapshot {id} does not exist"))
                        })?
                } else {
                    self.csi_volume_of(&o)
                        .await?
                        .ok_or_else(|| CsiError::NotFound(format!("volume {id} does not exist")))?
                };
                let size = choose_size(r.capacity_range.as_ref(), Some(from.size_bytes))?;
                self.ensure_room(&node, size).await?;
                let mut c = self.client(&node)?;
                let v = c
                    .create_volume(pb::CreateVolumeRequest {
                        name: an.clone(),
                        size_bytes: size,
                        origin: origin_of(&o, is_snap),
                    })
                    .await
                    .map_err(|s| CsiError::agent(&node, s))?
                    .into_inner();
                let started = async {
                    let m = c
                        .create_mapping(pb::CreateMappingRequest {
                            source: from.id.to_string(),
                            target: v.id.to_string(),
                            name: Some(ids::agent_name(ids::CLONE_PREFIX, &r.name)),
                            copy_rate: Some(params.copy_rate.unwrap_or(DEFAULT_CLONE_COPY_RATE)),
                            clean_rate: params.clean_rate,
                            grain_kib: params.grain_kib,
                            incremental: params.incremental,
                            autodelete: true,
                            group: None,
                        })
                        .await?
                        .into_inner();
                    c.clone()
                        .start_mapping(pb::StartMappingRequest {
                            mapping: m.id.to_string(),
                            prep: true,
                            restore: false,
                        })
                        .await?;
                    Ok::<_, Status>(m)
                }
                .await;
                match started {
                    Ok(m) => {
                        tracing::info!(node = %node, volume = v.id, mapping = m.id, source = %id, "volume created from a source; background copy started");
                        Ok(self.volume_view(&node, &v, r.volume_content_source.clone()))
                    }
                    Err(s) => {
                        // Leave nothing half made: the mapping (if any) and the volume go.
                        let e = if s.code() == Code::InvalidArgument
                            && s.message().contains("CMMVC5924E")
                        {
                            CsiError::OutOfRange(format!(
                                "a copy larger than its source needs a source of whole grains; request exactly {} bytes: {}",
                                from.size_bytes,
                                s.message()
                            ))
                        } else {
                            CsiError::agent(&node, s)
                        };
                        let clone = ids::agent_name(ids::CLONE_PREFIX, &r.name);
                        if let Ok(Some(m)) = self.find_mapping(&node, clone).await {
                            let _ = c
                                .stop_mapping(pb::StopMappingRequest {
                                    mapping: m.id.to_string(),
                                    force: true,
                                    split: false,
                                })
                                .await;
                            let _ = c
                                .delete_mapping(pb::DeleteMappingRequest {
                                    mapping: m.id.to_string(),
                                    force: true,
                                })
                                .await;
                        }
                        let _ = self.delete_agent_volume(&node, v.id).await;
                        Err(e)
                    }
                }
            }
        }
    }

    fn volume_view(
        &self,
        node: &str,
        v: &pb::Volume,
        source: Option<csi::VolumeContentSource>,
    ) -> csi::Volume {
        csi::Volume {
            capacity_bytes: v.size_bytes as i64,
            volume_id: ids::volume_id(node, v.id),
            volume_context: HashMap::new(),
            content_source: source,
            accessible_topology: vec![topology(node)],
        }
    }

    async fn delete_volume_inner(&self, r: csi::DeleteVolumeRequest) -> Result<(), CsiError> {
        let Some(o) = ids::required("volume_id", Kind::Volume, &r.volume_id)? else {
            return Ok(());
        };
        if !self.agents.knows(&o.node) {
            return Ok(());
        }
        let _held = self.guard([vol_key(&r.volume_id)])?;
        let Some(v) = self.csi_volume_of(&o).await? else {
            return Ok(());
        };
        let node = &o.node;
        // A clone or restore into this volume that is still copying: its data no longer matters.
        for map in &v.mappings {
            if let Some(m) = self.find_mapping(node, map.to_string()).await?
                && m.target_id == v.id
                && ids::has_prefix(&m.name, ids::CLONE_PREFIX)
            {
                self.retire_mapping(node, m.id).await?;
            }
        }
        if self.delete_agent_volume(node, v.id).await? {
            tracing::info!(node = %node, volume = v.id, "volume deleted");
        } else {
            // Snapshots or clones still read through it: hide it until the last one goes.
            let mut c = self.client(node)?;
            c.rename_volume(pb::RenameVolumeRequest {
                volume: v.id.to_string(),
                name: ids::hidden_name(v.id),
            })
            .await
            .map_err(|s| CsiError::agent(node, s))?;
            tracing::info!(node = %node, volume = v.id, "volume deleted; its data stays hidden while snapshots or clones depend on it");
        }
        self.sweep_hidden(node).await;
        Ok(())
    }

    async fn create_snapshot_inner(
        &self,
        r: csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot, CsiError> {
        ids::check_name("name", &r.name)?;
        let o = ids::required("source_volume_id", Kind::Volume, &r.source_volume_id)?;
        let params = Params::parse(&r.parameters)?;
        let o = o.ok_or_else(|| {
            CsiError::NotFound(format!(
                "source volume {:?} does not exist",
                r.source_volume_id
            ))
        })?;
        let _held = self.guard([
            format!("snapshot name {}", r.name),
            vol_key(&r.source_volume_id),
        ])?;
        let node = o.node.clone();
        let an = ids::agent_name(ids::SNAPSHOT_PREFIX, &r.name);
        let mut c = self.client(&node)?;
        if let Some(m) = self.find_mapping(&node, an.clone()).await? {
            if m.source_id != o.id {
                return Err(CsiError::AlreadyExists(format!(
                    "snapshot {:?} exists for another source volume ({})",
                    r.name,
                    ids::volume_id(&node, m.source_id)
                )));
            }
            if m.start_time.is_none() {
                c.start_mapping(pb::StartMappingRequest {
                    mapping: m.id.to_string(),
                    prep: true,
                    restore: false,
                })
                .await
                .map_err(|s| CsiError::agent(&node, s))?;
            }
            let m = self
                .find_mapping(&node, m.id.to_string())
                .await?
                .ok_or_else(|| {
                    CsiError::Aborted("the snapshot changed while being read; retry".into())
                })?;
            return self.snapshot_view(&node, &m).await;
        }
        let src = self.csi_volume_of(&o).await?.ok_or_else(|| {
            CsiError::NotFound(format!(
                "source volume {} does not exist (or was deleted)",
                r.source_volume_id
            ))
        })?;
        // A leftover target from an interrupted call has no mapping yet: start afresh.
        if let Some(t) = self.find_volume(&node, an.clone()).await?
            && (!t.mappings.is_empty() || !self.delete_agent_volume(&node, t.id).await?)
        {
            return Err(CsiError::AlreadyExists(format!(
                "snapshot name {:?} is taken by volume {} on node {node}",
                r.name, t.id
            )));
        }
        self.ensure_room(&node, src.size_bytes).await?;
        let t = c
            .create_volume(pb::CreateVolumeRequest {
                name: an.clone(),
                size_bytes: src.size_bytes,
                origin: String::new(),
            })
            .await
            .map_err(|s| CsiError::agent(&node, s))?
            .into_inner();
        let made = async {
            let m = c
                .create_mapping(pb::CreateMappingRequest {
                    source: src.id.to_string(),
                    target: t.id.to_string(),
                    name: Some(an.clone()),
                    copy_rate: Some(params.copy_rate.unwrap_or(0)),
                    clean_rate: params.clean_rate,
                    grain_kib: params.grain_kib,
                    incremental: params.incremental,
                    autodelete: false,
                    group: None,
                })
                .await?
                .into_inner();
            let s = c
                .clone()
                .start_mapping(pb::StartMappingRequest {
                    mapping: m.id.to_string(),
                    prep: true,
                    restore: false,
                })
                .await?
                .into_inner();
            Ok::<_, Status>(s.mapping.unwrap_or(m))
        }
        .await;
        match made {
            Ok(m) => {
                tracing::info!(node = %node, snapshot = m.id, source = src.id, name = %r.name, "snapshot taken");
                Ok(Self::csi_snapshot(&node, &m, t.size_bytes))
            }
            Err(s) => {
                if let Ok(Some(m)) = self.find_mapping(&node, an.clone()).await {
                    let _ = c
                        .stop_mapping(pb::StopMappingRequest {
                            mapping: m.id.to_string(),
                            force: true,
                            split: false,
                        })
                        .await;
                    let _ = c
                        .delete_mapping(pb::DeleteMappingRequest {
                            mapping: m.id.to_string(),
                            force: true,
                        })
                        .await;
                }
                let _ = self.delete_agent_volume(&node, t.id).await;
                Err(CsiError::agent(&node, s))
            }
        }
    }

    async fn delete_snapshot_inner(&self, r: csi::DeleteSnapshotRequest) -> Result<(), CsiError> {
        let Some(o) = ids::required("snapshot_id", Kind::Snapshot, &r.snapshot_id)? else {
            return Ok(());
        };
        if !self.agents.knows(&o.node) {
            return Ok(());
        }
        let _held = self.guard([format!("snapshot {}", r.snapshot_id)])?;
        let Some(m) = self.snapshot_mapping_of(&o).await? else {
            return Ok(());
        };
        if m.group_id.is_some() {
            return Err(CsiError::Invalid(format!(
                "snapshot {} belongs to group snapshot {}: delete the group snapshot instead",
                r.snapshot_id,
                ids::group_id(&m.group_name)
            )));
        }
        self.remove_snapshot(&o.node, &m).await?;
        tracing::info!(node = %o.node, snapshot = m.id, "snapshot deleted");
        Ok(())
    }

    /// Every CSI volume on the nodes asked about.
    async fn all_volumes(&self, nodes: &[String]) -> Result<Vec<(NodeObj, pb::Volume)>, CsiError> {
        let mut out = Vec::new();
        for node in nodes {
            let mut c = self.client(node)?;
            let list = c
                .list_volumes(pb::ListVolumesRequest {})
                .await
                .map_err(|s| CsiError::agent(node, s))?
                .into_inner();
            out.extend(
                list.volumes
                    .into_iter()
                    .filter(|v| ids::has_prefix(&v.name, ids::VOLUME_PREFIX))
                    .map(|v| {
                        (
                            NodeObj {
                                node: node.clone(),
                                id: v.id,
                            },
                            v,
                        )
                    }),
            );
        }
        Ok(out)
    }

    /// Every cut snapshot on `nodes` with its size.
    pub(super) async fn all_snapshots(
        &self,
        nodes: &[String],
    ) -> Result<Vec<(NodeObj, csi::Snapshot)>, CsiError> {
        let mut out = Vec::new();
        for node in nodes {
            let mut c = self.client(node)?;
            let sizes: HashMap<u64, u64> = c
                .list_volumes(pb::ListVolumesRequest {})
                .await
                .map_err(|s| CsiError::agent(node, s))?
                .into_inner()
                .volumes
                .into_iter()
                .map(|v| (v.id, v.size_bytes))
                .collect();
            let maps = c
                .list_mappings(pb::ListMappingsRequest { group: None })
                .await
                .map_err(|s| CsiError::agent(node, s))?
                .into_inner()
                .mappings;
            for m in maps.into_iter().filter(is_cut) {
                let size = sizes.get(&m.target_id).copied().unwrap_or(0);
                out.push((
                    NodeObj {
                        node: node.clone(),
                        id: m.id,
                    },
                    Self::csi_snapshot(node, &m, size),
                ));
            }
        }
        Ok(out)
    }
}

fn token(kind: Kind, s: &str) -> Result<Option<NodeObj>, CsiError> {
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
        let r = req.into_inner();
        let o = ids::required("volume_id", Kind::Volume, &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(CsiError::Missing("volume_capabilities").into());
        }
        let o =
            o.ok_or_else(|| CsiError::NotFound(format!("volume {} does not exist", r.volume_id)))?;
        if self.csi_volume_of(&o).await?.is_none() {
            return Err(
                CsiError::NotFound(format!("volume {} does not exist", r.volume_id)).into(),
            );
        }
        let unsupported = match check_capabilities(&r.volume_capabilities) {
            Ok(u) => u,
            Err(e) => Some(e.to_string()),
        }
        .or_else(|| Params::parse(&r.parameters).err().map(|e| e.to_string()));
        Ok(Response::new(match unsupported {
            Some(message) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> RpcResult<csi::ListVolumesResponse> {
        let r = req.into_inner();
        let max = max_entries(r.max_entries)?;
        let start = token(Kind::Volume, &r.starting_token)?;
        let all = self.all_volumes(&self.agents.nodes()).await?;
        let (page, next) = page(all, start, max);
        Ok(Response::new(csi::ListVolumesResponse {
            entries: page
                .into_iter()
                .map(|(o, v)| csi::list_volumes_response::Entry {
                    volume: Some(self.volume_view(&o.node, &v, None)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: Vec::new(),
                        volume_condition: Some(condition(&v)),
                    }),
                })
                .collect(),
            next_token: next.map_or(String::new(), |o| o.id_string(Kind::Volume)),
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> RpcResult<csi::GetCapacityResponse> {
        let r = req.into_inner();
        if !r.volume_capabilities.is_empty()
            && check_capabilities(&r.volume_capabilities)?.is_some()
        {
            // Volumes with these capabilities cannot be made anywhere.
            return Ok(Response::new(csi::GetCapacityResponse::default()));
        }
        Params::parse(&r.parameters)?;
        let nodes = match &r.accessible_topology {
            Some(t) => {
                let n = topology_nodes(std::slice::from_ref(t));
                if n.is_empty() || !self.agents.knows(&n[0]) {
                    return Ok(Response::new(csi::GetCapacityResponse::default()));
                }
                n
            }
            None => self.agents.nodes(),
        };
        let (mut total, mut max) = (0u64, 0u64);
        for n in &nodes {
            let f = self.free_bytes(n).await?;
            total = total.saturating_add(f);
            max = max.max(f);
        }
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: total.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(max.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(512),
        }))
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
        let r = req.into_inner();
        let max = max_entries(r.max_entries)?;
        let start = token(Kind::Snapshot, &r.starting_token)?;
        let empty = || Ok(Response::new(csi::ListSnapshotsResponse::default()));
        let mut nodes = self.agents.nodes();
        let by_id = if r.snapshot_id.is_empty() {
            None
        } else {
            match ids::parse(Kind::Snapshot, &r.snapshot_id) {
                Some(o) if self.agents.knows(&o.node) => Some(o),
                _ => return empty(),
            }
        };
        let by_source = if r.source_volume_id.is_empty() {
            None
        } else {
            match ids::parse(Kind::Volume, &r.source_volume_id) {
                Some(o) if self.agents.knows(&o.node) => Some(o),
                _ => return empty(),
            }
        };
        if let Some(o) = by_id.as_ref().or(by_source.as_ref()) {
            nodes = vec![o.node.clone()];
        }
        let all: Vec<_> = self
            .all_snapshots(&nodes)
            .await?
            .into_iter()
            .filter(|(o, _)| by_id.as_ref().is_none_or(|b| b == o))
            .filter(|(_, s)| {
                by_source
                    .as_ref()
                    .is_none_or(|b| s.source_volume_id == b.id_string(Kind::Volume))
            })
            .collect();
        let (page, next) = page(all, start, max);
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|(_, s)| csi::list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token: next.map_or(String::new(), |o| o.id_string(Kind::Snapshot)),
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> RpcResult<csi::GetSnapshotResponse> {
        let r = req.into_inner();
        let missing = || CsiError::NotFound(format!("snapshot {} does not exist", r.snapshot_id));
        let o =
            ids::required("snapshot_id", Kind::Snapshot, &r.snapshot_id)?.ok_or_else(missing)?;
        if !self.agents.knows(&o.node) {
            return Err(missing().into());
        }
        let m = self.snapshot_mapping_of(&o).await?.ok_or_else(missing)?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(self.snapshot_view(&o.node, &m).await?),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> RpcResult<csi::ControllerExpandVolumeResponse> {
        let r = req.into_inner();
        let o = ids::required("volume_id", Kind::Volume, &r.volume_id)?;
        let range = r
            .capacity_range
            .ok_or(CsiError::Missing("capacity_range"))?;
        let o =
            o.ok_or_else(|| CsiError::NotFound(format!("volume {} does not exist", r.volume_id)))?;
        let (req_b, lim) = (range.required_bytes, range.limit_bytes);
        if req_b < 0 || lim < 0 {
            return Err(CsiError::Invalid("capacity_range must not be negative".into()).into());
        }
        if req_b == 0 && lim == 0 {
            return Err(CsiError::Invalid(
                "capacity_range sets neither required_bytes nor limit_bytes".into(),
            )
            .into());
        }
        let _held = self.guard([vol_key(&r.volume_id)])?;
        let v = self
            .csi_volume_of(&o)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {} does not exist", r.volume_id)))?;
        let node_expansion_required = !matches!(
            r.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(csi::volume_capability::AccessType::Block(_))
        );
        let want = fit_size(req_b as u64, lim as u64)?;
        if want <= v.size_bytes {
            return Ok(Response::new(csi::ControllerExpandVolumeResponse {
                capacity_bytes: v.size_bytes as i64,
                node_expansion_required,
            }));
        }
        if v.nbd_clients > 0 {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {} is in use ({} NBD client(s) attached): expansion is offline, the \
                 volume grows once no node has it attached",
                r.volume_id, v.nbd_clients
            ))
            .into());
        }
        self.ensure_room(&o.node, want - v.size_bytes).await?;
        let mut c = self.client(&o.node)?;
        let v = c
            .resize_volume(pb::ResizeVolumeRequest {
                volume: v.id.to_string(),
                size_bytes: want,
            })
            .await
            .map_err(|s| match s.code() {
                // Snapshots do not stop a volume from growing (they keep their size); a clone
                // still copying into a size that ends inside a grain does.
                Code::FailedPrecondition => CsiError::FailedPrecondition(format!(
                    "volume {} cannot grow now: {}",
                    r.volume_id,
                    s.message()
                )),
                _ => CsiError::agent(&o.node, s),
            })?
            .into_inner();
        tracing::info!(node = %o.node, volume = v.id, size = v.size_bytes, "volume expanded");
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: v.size_bytes as i64,
            node_expansion_required,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> RpcResult<csi::ControllerGetVolumeResponse> {
        let r = req.into_inner();
        let missing = || CsiError::NotFound(format!("volume {} does not exist", r.volume_id));
        let o = ids::required("volume_id", Kind::Volume, &r.volume_id)?.ok_or_else(missing)?;
        if !self.agents.knows(&o.node) {
            return Err(missing().into());
        }
        let v = self.csi_volume_of(&o).await?.ok_or_else(missing)?;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(self.volume_view(&o.node, &v, None)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> RpcResult<csi::ControllerModifyVolumeResponse> {
        Err(CsiError::Unimplemented("ControllerModifyVolume").into())
    }
}

fn condition(v: &pb::Volume) -> csi::VolumeCondition {
    csi::VolumeCondition {
        abnormal: !v.offline_reason.is_empty(),
        message: if v.offline_reason.is_empty() {
            "online".into()
        } else {
            v.offline_reason.clone()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, lim: i64) -> csi::CapacityRange {
        csi::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        }
    }

    #[test]
    fn sizes_follow_the_capacity_range() {
        const MIB: u64 = 1 << 20;
        assert_eq!(choose_size(None, None).unwrap(), DEFAULT_VOLUME_BYTES);
        assert_eq!(choose_size(Some(&range(1, 0)), None).unwrap(), MIB);
        assert_eq!(
            choose_size(Some(&range(MIB as i64 + 1, 0)), None).unwrap(),
            2 * MIB
        );
        // The limit wins over MiB rounding.
        assert_eq!(choose_size(Some(&range(1000, 1024)), None).unwrap(), 1024);
        assert_eq!(choose_size(Some(&range(0, 4096)), None).unwrap(), 4096);
        assert_eq!(
            choose_size(Some(&range(5 * MIB as i64, 5 * MIB as i64)), None).unwrap(),
            5 * MIB
        );
        assert!(matches!(
            choose_size(Some(&range(1000, 1000)), None),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            choose_size(Some(&range(2, 1)), None),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            choose_size(Some(&range(-1, 0)), None),
            Err(CsiError::Invalid(_))
        ));
        // With a source: its size.
        assert_eq!(choose_size(None, Some(8 * MIB)).unwrap(), 8 * MIB);
        assert_eq!(
            choose_size(Some(&range(MIB as i64, 0)), Some(8 * MIB)).unwrap(),
            8 * MIB
        );
        assert!(matches!(
            choose_size(Some(&range(0, MIB as i64)), Some(8 * MIB)),
            Err(CsiError::OutOfRange(_))
        ));
        // Larger than the source: the requested size, rounded as without a source.
        assert_eq!(
            choose_size(Some(&range(9 * MIB as i64, 0)), Some(8 * MIB)).unwrap(),
            9 * MIB
        );
        assert_eq!(
            choose_size(Some(&range(8 * MIB as i64 + 1, 0)), Some(8 * MIB)).unwrap(),
            9 * MIB
        );
        assert_eq!(
            choose_size(
                Some(&range(8 * MIB as i64 + 1, 8 * MIB as i64 + 512)),
                Some(8 * MIB)
            )
            .unwrap(),
            8 * MIB + 512
        );
        // No multiple of 512 lies between required and limit: refused, never the source's
        // size below what was required.
        assert!(matches!(
            choose_size(
                Some(&range(8 * MIB as i64 + 1, 8 * MIB as i64 + 100)),
                Some(8 * MIB)
            ),
            Err(CsiError::OutOfRange(_))
        ));
    }

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
