//! CSI volumes: create (blank, from a snapshot, as a clone), delete (hidden while snapshots
//! read through it), expand, list, get and validate; the size and capability rules.

use super::*;

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
pub(in crate::csi) fn fit_size(want: u64, lim: u64) -> Result<u64, CsiError> {
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

pub(in crate::csi) fn no_fit(req: u64, lim: u64) -> CsiError {
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
pub(in crate::csi) fn topology_nodes(list: &[csi::Topology]) -> Vec<String> {
    list.iter()
        .filter(|t| t.segments.len() == 1)
        .filter_map(|t| t.segments.get(TOPOLOGY_KEY).cloned())
        .collect()
}

/// What a volume made from `o` records as its origin: the source's CSI id.
pub(in crate::csi) fn origin_of(o: &NodeObj, snapshot: bool) -> String {
    o.id_string(if snapshot {
        Kind::Snapshot
    } else {
        Kind::Volume
    })
}

pub(in crate::csi) fn condition(v: &pb::Volume) -> csi::VolumeCondition {
    csi::VolumeCondition {
        abnormal: !v.offline_reason.is_empty(),
        message: if v.offline_reason.is_empty() {
            "online".into()
        } else {
            v.offline_reason.clone()
        },
    }
}

impl ControllerService {
    /// A CSI volume (not hidden, not a snapshot target) by id.
    pub(in crate::csi) async fn csi_volume_of(
        &self,
        o: &NodeObj,
    ) -> Result<Option<pb::Volume>, CsiError> {
        Ok(self
            .find_volume(&o.node, o.id.to_string())
            .await?
            .filter(|v| v.id == o.id && ids::has_prefix(&v.name, ids::VOLUME_PREFIX)))
    }

    /// Deletes a volume if nothing uses it (NOT_FOUND counts as done).
    pub(in crate::csi) async fn delete_agent_volume(
        &self,
        node: &str,
        id: u64,
    ) -> Result<bool, CsiError> {
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
    pub(in crate::csi) async fn sweep_hidden(&self, node: &str) {
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

    pub(in crate::csi) async fn create_volume_inner(
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
                        self.undo_mapping(&node, clone).await;
                        let _ = self.delete_agent_volume(&node, v.id).await;
                        Err(e)
                    }
                }
            }
        }
    }

    pub(in crate::csi) fn volume_view(
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

    pub(in crate::csi) async fn delete_volume_inner(
        &self,
        r: csi::DeleteVolumeRequest,
    ) -> Result<(), CsiError> {
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

    /// Every CSI volume on the nodes asked about.
    pub(in crate::csi) async fn all_volumes(
        &self,
        nodes: &[String],
    ) -> Result<Vec<(NodeObj, pb::Volume)>, CsiError> {
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

    pub(in crate::csi) async fn validate_volume_capabilities_inner(
        &self,
        r: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, CsiError> {
        let o = ids::required("volume_id", Kind::Volume, &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(CsiError::Missing("volume_capabilities"));
        }
        let o =
            o.ok_or_else(|| CsiError::NotFound(format!("volume {} does not exist", r.volume_id)))?;
        if self.csi_volume_of(&o).await?.is_none() {
            return Err(CsiError::NotFound(format!(
                "volume {} does not exist",
                r.volume_id
            )));
        }
        let unsupported = match check_capabilities(&r.volume_capabilities) {
            Ok(u) => u,
            Err(e) => Some(e.to_string()),
        }
        .or_else(|| Params::parse(&r.parameters).err().map(|e| e.to_string()));
        Ok(match unsupported {
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
        })
    }

    pub(in crate::csi) async fn list_volumes_inner(
        &self,
        r: csi::ListVolumesRequest,
    ) -> Result<csi::ListVolumesResponse, CsiError> {
        let max = max_entries(r.max_entries)?;
        let start = token(Kind::Volume, &r.starting_token)?;
        let all = self.all_volumes(&self.agents.nodes()).await?;
        let (page, next) = page(all, start, max);
        Ok(csi::ListVolumesResponse {
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
        })
    }

    pub(in crate::csi) async fn expand_volume_inner(
        &self,
        r: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, CsiError> {
        let o = ids::required("volume_id", Kind::Volume, &r.volume_id)?;
        let range = r
            .capacity_range
            .ok_or(CsiError::Missing("capacity_range"))?;
        let o =
            o.ok_or_else(|| CsiError::NotFound(format!("volume {} does not exist", r.volume_id)))?;
        let (req_b, lim) = (range.required_bytes, range.limit_bytes);
        if req_b < 0 || lim < 0 {
            return Err(CsiError::Invalid(
                "capacity_range must not be negative".into(),
            ));
        }
        if req_b == 0 && lim == 0 {
            return Err(CsiError::Invalid(
                "capacity_range sets neither required_bytes nor limit_bytes".into(),
            ));
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
            return Ok(csi::ControllerExpandVolumeResponse {
                capacity_bytes: v.size_bytes as i64,
                node_expansion_required,
            });
        }
        if v.nbd_clients > 0 {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {} is in use ({} NBD client(s) attached): expansion is offline, the \
                 volume grows once no node has it attached",
                r.volume_id, v.nbd_clients
            )));
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
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: v.size_bytes as i64,
            node_expansion_required,
        })
    }

    pub(in crate::csi) async fn get_volume_inner(
        &self,
        r: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse, CsiError> {
        let missing = || CsiError::NotFound(format!("volume {} does not exist", r.volume_id));
        let o = ids::required("volume_id", Kind::Volume, &r.volume_id)?.ok_or_else(missing)?;
        if !self.agents.knows(&o.node) {
            return Err(missing());
        }
        let v = self.csi_volume_of(&o).await?.ok_or_else(missing)?;
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.volume_view(&o.node, &v, None)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(condition(&v)),
            }),
        })
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
}
