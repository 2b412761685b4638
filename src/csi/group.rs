//! CSI GroupController: a group snapshot is a FlashCopy consistency group per node, named
//! `g.NAME` / `g-HASH` on every agent it spans, with one snapshot mapping per volume.
//!
//! Start: on one node, the agent's atomic StartGroup (pause, drain, flush, switch, resume).
//! Across nodes, two phases: prepare every group, freeze every agent (its I/O is held, with a
//! deadline), commit on every agent; if any freeze fails or the freezes take longer than the
//! timeout, thaw all (I/O resumes) and remove what was made. Dependent writes that span nodes
//! are therefore never torn: no member source accepts a write between the first and the last
//! switch.

use super::controller::{ControllerService, is_cut};
use super::ids::{self, Kind, NodeObj};
use super::params::Params;
use super::status::CsiError;
use crate::proto::agent::v1 as pb;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::group_controller_server::GroupController;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tonic::{Code, Request, Response, Status};

type RpcResult<T> = Result<Response<T>, Status>;

/// The members of one agent's group: (mapping, target size).
type Members = Vec<(pb::Mapping, u64)>;

impl ControllerService {
    /// The group `gname` on `node` with its members, if it exists there.
    async fn group_on(&self, node: &str, gname: &str) -> Result<Option<Members>, CsiError> {
        let mut c = self.client(node)?;
        match c
            .list_mappings(pb::ListMappingsRequest {
                group: Some(gname.to_string()),
            })
            .await
        {
            Ok(r) => {
                let mut out = Vec::new();
                for m in r.into_inner().mappings {
                    let size = self
                        .find_volume(node, m.target_id.to_string())
                        .await?
                        .map_or(0, |v| v.size_bytes);
                    out.push((m, size));
                }
                Ok(Some(out))
            }
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(CsiError::agent(node, s)),
        }
    }

    /// The group on every node of `nodes` where it exists.
    async fn group_everywhere(
        &self,
        gname: &str,
        nodes: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, Members>, CsiError> {
        let mut out = BTreeMap::new();
        for n in nodes {
            if let Some(m) = self.group_on(n, gname).await? {
                out.insert(n.clone(), m);
            }
        }
        Ok(out)
    }

    fn group_view(gname: &str, found: &BTreeMap<String, Members>) -> csi::VolumeGroupSnapshot {
        let mut snapshots = Vec::new();
        for (node, members) in found {
            for (m, size) in members {
                snapshots.push(Self::csi_snapshot(node, m, *size));
            }
        }
        let creation_time = snapshots
            .iter()
            .filter_map(|s| s.creation_time)
            .min_by_key(|t| t.seconds);
        let ready = !snapshots.is_empty() && snapshots.iter().all(|s| s.ready_to_use);
        csi::VolumeGroupSnapshot {
            group_snapshot_id: ids::group_id(gname),
            snapshots,
            creation_time,
            ready_to_use: ready,
        }
    }

    /// Removes the group and its member snapshots on every node where it exists.
    async fn remove_group(&self, gname: &str, nodes: &BTreeSet<String>) -> Result<(), CsiError> {
        for node in nodes {
            let Some(members) = self.group_on(node, gname).await? else {
                continue;
            };
            let mut c = self.client(node)?;
            // Without force: older snapshots reading through the members get their grains.
            if let Err(s) = c
                .stop_group(pb::StopGroupRequest {
                    group: gname.into(),
                    force: false,
                    split: false,
                })
                .await
                && !matches!(s.code(), Code::NotFound | Code::FailedPrecondition)
            {
                return Err(CsiError::agent(node, s));
            }
            let t0 = Instant::now();
            loop {
                let Some(ms) = self.group_on(node, gname).await? else {
                    break;
                };
                if ms.iter().all(|(m, _)| {
                    matches!(
                        m.state(),
                        pb::MappingState::Stopped | pb::MappingState::IdleOrCopied
                    )
                }) {
                    break;
                }
                if t0.elapsed() > super::controller::CLEANING_WAIT {
                    return Err(CsiError::Aborted(format!(
                        "group {gname} on node {node} is still cleaning; retry later"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Err(s) = c
                .delete_group(pb::DeleteGroupRequest {
                    group: gname.into(),
                    force: true,
                })
                .await
                && s.code() != Code::NotFound
            {
                return Err(CsiError::agent(node, s));
            }
            for (m, _) in members {
                self.remove_snapshot(node, &m).await?;
            }
        }
        Ok(())
    }

    async fn create_group_inner(
        &self,
        r: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::VolumeGroupSnapshot, CsiError> {
        ids::check_name("name", &r.name)?;
        if r.source_volume_ids.is_empty() {
            return Err(CsiError::Missing("source_volume_ids"));
        }
        let params = Params::parse(&r.parameters)?;
        let mut sources: Vec<(String, NodeObj)> = Vec::new();
        for id in &r.source_volume_ids {
            let o = ids::required("source_volume_ids[]", Kind::Volume, id)?.ok_or_else(|| {
                CsiError::NotFound(format!(
                    "source volume {id:?} is not a volume of {}",
                    super::DRIVER_NAME
                ))
            })?;
            if sources.iter().any(|(_, x)| *x == o) {
                return Err(CsiError::Invalid(format!(
                    "source volume {id} is listed twice"
                )));
            }
            sources.push((id.clone(), o));
        }
        let gname = ids::agent_name(ids::GROUP_PREFIX, &r.name);
        let mut keys = vec![format!("group {gname}")];
        keys.extend(sources.iter().map(|(id, _)| format!("volume {id}")));
        let _held = self.guard(keys)?;
        let nodes: BTreeSet<String> = sources.iter().map(|(_, o)| o.node.clone()).collect();

        // Idempotency: the same name with the same volumes is the same group snapshot.
        let mut look: BTreeSet<String> = nodes.clone();
        look.extend(self.agents.nodes());
        let found = self.group_everywhere(&gname, &look).await?;
        if !found.is_empty() {
            let have: BTreeSet<String> = found
                .iter()
                .flat_map(|(n, ms)| ms.iter().map(|(m, _)| ids::volume_id(n, m.source_id)))
                .collect();
            let want: BTreeSet<String> = r.source_volume_ids.iter().cloned().collect();
            if have != want {
                return Err(CsiError::AlreadyExists(format!(
                    "group snapshot {:?} exists for other volumes",
                    r.name
                )));
            }
            if found.values().flatten().all(|(m, _)| is_cut(m)) {
                return Ok(Self::group_view(&gname, &found));
            }
            // An earlier call stopped half way: start over.
            let at: BTreeSet<String> = found.keys().cloned().collect();
            self.remove_group(&gname, &at).await?;
        }

        // Every source must exist now; each node needs room for its targets.
        let mut by_node: BTreeMap<String, Vec<(String, pb::Volume)>> = BTreeMap::new();
        for (id, o) in &sources {
            let v = self
                .find_volume(&o.node, o.id.to_string())
                .await?
                .filter(|v| v.id == o.id && ids::has_prefix(&v.name, ids::VOLUME_PREFIX))
                .ok_or_else(|| CsiError::NotFound(format!("source volume {id} does not exist")))?;
            by_node
                .entry(o.node.clone())
                .or_default()
                .push((id.clone(), v));
        }
        for (node, vs) in &by_node {
            self.ensure_room(node, vs.iter().map(|(_, v)| v.size_bytes).sum())
                .await?;
        }

        let made = self.make_group(&r.name, &gname, &params, &by_node).await;
        let started = match made {
            Ok(()) => self.start_group(&gname, &nodes).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            if let Err(c) = self.remove_group(&gname, &nodes).await {
                tracing::warn!(group = %gname, error = %c, "cleanup after a failed group snapshot did not finish");
            }
            return Err(e);
        }
        let found = self.group_everywhere(&gname, &nodes).await?;
        tracing::info!(group = %gname, nodes = nodes.len(), members = sources.len(), "group snapshot taken");
        Ok(Self::group_view(&gname, &found))
    }

    /// Creates the group, the targets and the member mappings on every node (not started).
    async fn make_group(
        &self,
        name: &str,
        gname: &str,
        params: &Params,
        by_node: &BTreeMap<String, Vec<(String, pb::Volume)>>,
    ) -> Result<(), CsiError> {
        for (node, vs) in by_node {
            let mut c = self.client(node)?;
            let e = |s| CsiError::agent(node, s);
            c.create_group(pb::CreateGroupRequest {
                name: Some(gname.into()),
                autodelete: false,
            })
            .await
            .map_err(e)?;
            for (id, v) in vs {
                let tname = ids::agent_name(ids::SNAPSHOT_PREFIX, &format!("{name}\n{id}"));
                if let Some(old) = self.find_volume(node, tname.clone()).await? {
                    self.delete_agent_volume(node, old.id).await?;
                }
                let t = c
                    .create_volume(pb::CreateVolumeRequest {
                        name: tname.clone(),
                        size_bytes: v.size_bytes,
                        origin: String::new(),
                    })
                    .await
                    .map_err(e)?
                    .into_inner();
                let made = c
                    .create_mapping(pb::CreateMappingRequest {
                        source: v.id.to_string(),
                        target: t.id.to_string(),
                        name: Some(tname),
                        copy_rate: Some(params.copy_rate.unwrap_or(0)),
                        clean_rate: params.clean_rate,
                        grain_kib: params.grain_kib,
                        incremental: params.incremental,
                        autodelete: false,
                        group: Some(gname.into()),
                    })
                    .await;
                if let Err(s) = made {
                    let _ = self.delete_agent_volume(node, t.id).await;
                    return Err(e(s));
                }
            }
        }
        Ok(())
    }

    /// Starts the group: atomically on one node, in two phases across several.
    async fn start_group(&self, gname: &str, nodes: &BTreeSet<String>) -> Result<(), CsiError> {
        if nodes.len() == 1 {
            let node = nodes.first().unwrap();
            let mut c = self.client(node)?;
            c.start_group(pb::StartGroupRequest {
                group: gname.into(),
                prep: true,
                restore: false,
            })
            .await
            .map_err(|s| CsiError::agent(node, s))?;
            return Ok(());
        }
        for node in nodes {
            let mut c = self.client(node)?;
            c.prepare_group(pb::PrepareGroupRequest {
                group: gname.into(),
                restore: false,
            })
            .await
            .map_err(|s| CsiError::agent(node, s))?;
        }
        // Prepare is asynchronous on the agent (the flush): wait until every member is prepared.
        let t0 = Instant::now();
        loop {
            let found = self.group_everywhere(gname, nodes).await?;
            if found
                .values()
                .flatten()
                .all(|(m, _)| m.state() == pb::MappingState::Prepared)
            {
                break;
            }
            if t0.elapsed() > super::controller::CLEANING_WAIT {
                return Err(CsiError::Aborted(format!(
                    "group {gname} did not become prepared"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let timeout = self.freeze_timeout;
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for node in nodes {
            let mut c = self.client(node)?;
            let (node, g) = (node.clone(), gname.to_string());
            // Each agent holds long enough for the slowest freeze plus the commits.
            let ms = (2 * timeout.as_millis()).clamp(1, 60_000) as u32;
            tasks.spawn(async move {
                let r = c
                    .freeze_group(pb::FreezeGroupRequest {
                        group: g,
                        timeout_ms: ms,
                    })
                    .await;
                (node, r.map(|r| r.into_inner().token))
            });
        }
        let mut tokens: Vec<(String, String)> = Vec::new();
        let mut failure: Option<CsiError> = None;
        let late = || {
            CsiError::Aborted(format!(
                "the agents did not all freeze within {} ms; group snapshot aborted and I/O resumed",
                timeout.as_millis()
            ))
        };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        while !tasks.is_empty() {
            tokio::select! {
                j = tasks.join_next() => match j {
                    Some(Ok((node, Ok(t)))) => tokens.push((node, t)),
                    Some(Ok((node, Err(s)))) => { failure.get_or_insert(CsiError::agent(&node, s)); }
                    Some(Err(e)) => { failure.get_or_insert(CsiError::Aborted(format!("freeze task failed: {e}"))); }
                    None => break,
                },
                () = &mut deadline => {
                    failure.get_or_insert(late());
                    tasks.abort_all();
                    break;
                }
            }
            if failure.is_some() {
                break;
            }
        }
        // A freeze answered after we gave up is thawed too (or expires on its own).
        while let Some(j) = tasks.join_next().await {
            if let Ok((node, Ok(t))) = j {
                tokens.push((node, t));
            }
        }
        // The timer may not have fired yet when the last answer comes in late (it only
        // ticks when the runtime parks): the clock decides, not the race of the select.
        if failure.is_none() && t0.elapsed() >= timeout {
            failure = Some(late());
        }
        if let Some(e) = failure {
            self.thaw_all(&tokens).await;
            tracing::warn!(group = %gname, error = %e, "group freeze aborted; I/O resumed");
            return Err(e);
        }
        tracing::info!(group = %gname, nodes = nodes.len(), freeze_ms = t0.elapsed().as_millis() as u64, "all agents frozen; committing");
        let mut commits = tokio::task::JoinSet::new();
        for (node, token) in &tokens {
            let mut c = self.client(node)?;
            let (node, token) = (node.clone(), token.clone());
            commits.spawn(async move {
                (
                    node,
                    c.commit_group_start(pb::CommitGroupStartRequest { token })
                        .await,
                )
            });
        }
        let mut failed = None;
        while let Some(j) = commits.join_next().await {
            match j {
                Ok((_, Ok(_))) => {}
                Ok((node, Err(s))) => {
                    failed.get_or_insert(CsiError::agent(&node, s));
                }
                Err(e) => {
                    failed.get_or_insert(CsiError::Aborted(format!("commit task failed: {e}")));
                }
            }
        }
        match failed {
            // Some members may have switched: the caller removes the whole group.
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn thaw_all(&self, tokens: &[(String, String)]) {
        for (node, token) in tokens {
            if let Ok(mut c) = self.client(node)
                && let Err(s) = c
                    .thaw_group(pb::ThawGroupRequest {
                        token: token.clone(),
                    })
                    .await
            {
                tracing::warn!(node = %node, error = %s, "thaw failed; the freeze expires on its own");
            }
        }
    }

    /// The nodes of a request's member snapshot ids (INVALID_ARGUMENT for ids not ours).
    fn member_nodes(&self, snapshot_ids: &[String]) -> Result<BTreeSet<String>, CsiError> {
        let mut nodes = BTreeSet::new();
        for id in snapshot_ids {
            let o = ids::parse(Kind::Snapshot, id).ok_or_else(|| {
                CsiError::Invalid(format!("snapshot id {id:?} is not a member of this group"))
            })?;
            nodes.insert(o.node);
        }
        Ok(nodes)
    }

    fn check_members(
        gname: &str,
        found: &BTreeMap<String, Members>,
        asked: &[String],
    ) -> Result<(), CsiError> {
        let have: BTreeSet<String> = found
            .iter()
            .flat_map(|(n, ms)| ms.iter().map(|(m, _)| ids::snapshot_id(n, m.id)))
            .collect();
        let asked: BTreeSet<String> = asked.iter().cloned().collect();
        if have != asked {
            return Err(CsiError::Invalid(format!(
                "snapshot_ids {:?} do not match the members of group snapshot {} ({:?})",
                asked,
                ids::group_id(gname),
                have
            )));
        }
        Ok(())
    }
}

fn rpc(
    t: csi::group_controller_service_capability::rpc::Type,
) -> csi::GroupControllerServiceCapability {
    csi::GroupControllerServiceCapability {
        r#type: Some(csi::group_controller_service_capability::Type::Rpc(
            csi::group_controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl GroupController for ControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> RpcResult<csi::GroupControllerGetCapabilitiesResponse> {
        use csi::group_controller_service_capability::rpc::Type as T;
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![rpc(T::CreateDeleteGetVolumeGroupSnapshot)],
        }))
    }

    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> RpcResult<csi::CreateVolumeGroupSnapshotResponse> {
        let g = self.create_group_inner(req.into_inner()).await?;
        Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(g),
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group_snapshot_id))]
    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> RpcResult<csi::DeleteVolumeGroupSnapshotResponse> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(CsiError::Missing("group_snapshot_id").into());
        }
        let Some(gname) = ids::parse_group(&r.group_snapshot_id) else {
            return Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}));
        };
        let _held = self.guard([format!("group {gname}")])?;
        let mut nodes = self.member_nodes(&r.snapshot_ids)?;
        nodes.extend(self.agents.nodes());
        let found = self.group_everywhere(gname, &nodes).await?;
        if found.is_empty() {
            return Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}));
        }
        Self::check_members(gname, &found, &r.snapshot_ids)?;
        let at: BTreeSet<String> = found.keys().cloned().collect();
        self.remove_group(gname, &at).await?;
        tracing::info!(group = %gname, "group snapshot deleted");
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> RpcResult<csi::GetVolumeGroupSnapshotResponse> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(CsiError::Missing("group_snapshot_id").into());
        }
        let missing = || {
            CsiError::NotFound(format!(
                "group snapshot {} does not exist",
                r.group_snapshot_id
            ))
        };
        let gname = ids::parse_group(&r.group_snapshot_id).ok_or_else(missing)?;
        let mut nodes = self.member_nodes(&r.snapshot_ids)?;
        nodes.extend(self.agents.nodes());
        let found = self.group_everywhere(gname, &nodes).await?;
        if found.is_empty() {
            return Err(missing().into());
        }
        Self::check_members(gname, &found, &r.snapshot_ids)?;
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(Self::group_view(gname, &found)),
        }))
    }
}
