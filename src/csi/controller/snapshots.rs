//! CSI snapshots: a FlashCopy mapping from the volume to a hidden target, started at once;
//! delete retires the mapping after cleaning; list and get read the mappings back.

use super::*;

/// Whether a mapping is a snapshot that has been cut.
pub fn is_cut(m: &pb::Mapping) -> bool {
    ids::has_prefix(&m.name, ids::SNAPSHOT_PREFIX) && m.start_time.is_some()
}

/// A cut snapshot is usable while its mapping copies or has copied; a stopped one is not.
pub(in crate::csi) fn ready(m: &pb::Mapping) -> bool {
    m.start_time.is_some()
        && matches!(
            m.state(),
            pb::MappingState::Copying | pb::MappingState::IdleOrCopied
        )
}

impl ControllerService {
    /// A snapshot mapping by id (cut or not).
    pub(in crate::csi) async fn snapshot_mapping_of(
        &self,
        o: &NodeObj,
    ) -> Result<Option<pb::Mapping>, CsiError> {
        Ok(self
            .find_mapping(&o.node, o.id.to_string())
            .await?
            .filter(|m| m.id == o.id && ids::has_prefix(&m.name, ids::SNAPSHOT_PREFIX)))
    }

    /// The CSI view of a snapshot mapping (its size is the target's).
    pub(in crate::csi) fn csi_snapshot(node: &str, m: &pb::Mapping, size: u64) -> csi::Snapshot {
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

    pub(in crate::csi) async fn snapshot_view(
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
    pub(in crate::csi) async fn retire_mapping(
        &self,
        node: &str,
        map: u64,
    ) -> Result<(), CsiError> {
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

    /// Removes a snapshot: its mapping (after cleaning) and its target; then releases the
    /// source if it was deleted and this was its last dependant.
    pub(in crate::csi) async fn remove_snapshot(
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

    pub(in crate::csi) async fn create_snapshot_inner(
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
                self.undo_mapping(&node, an.clone()).await;
                let _ = self.delete_agent_volume(&node, t.id).await;
                Err(CsiError::agent(&node, s))
            }
        }
    }

    pub(in crate::csi) async fn delete_snapshot_inner(
        &self,
        r: csi::DeleteSnapshotRequest,
    ) -> Result<(), CsiError> {
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

    /// Every cut snapshot on `nodes` with its size.
    pub(in crate::csi) async fn all_snapshots(
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

    pub(in crate::csi) async fn list_snapshots_inner(
        &self,
        r: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, CsiError> {
        let max = max_entries(r.max_entries)?;
        let start = token(Kind::Snapshot, &r.starting_token)?;
        let empty = || Ok(csi::ListSnapshotsResponse::default());
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
        Ok(csi::ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|(_, s)| csi::list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token: next.map_or(String::new(), |o| o.id_string(Kind::Snapshot)),
        })
    }

    pub(in crate::csi) async fn get_snapshot_inner(
        &self,
        r: csi::GetSnapshotRequest,
    ) -> Result<csi::GetSnapshotResponse, CsiError> {
        let missing = || CsiError::NotFound(format!("snapshot {} does not exist", r.snapshot_id));
        let o =
            ids::required("snapshot_id", Kind::Snapshot, &r.snapshot_id)?.ok_or_else(missing)?;
        if !self.agents.knows(&o.node) {
            return Err(missing());
        }
        let m = self.snapshot_mapping_of(&o).await?.ok_or_else(missing)?;
        Ok(csi::GetSnapshotResponse {
            snapshot: Some(self.snapshot_view(&o.node, &m).await?),
        })
    }
}
