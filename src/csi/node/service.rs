//! The CSI Node service: validate, take the volume's guard, ask the local agent for the
//! volume's export, then attach / format / mount on the blocking pool. Errors map to gRPC
//! statuses in [`crate::csi::status`].

use super::attach::{self, Attacher, Export};
use super::error::Error;
use super::mount::{self, Contents, FsType};
use crate::csi::TOPOLOGY_KEY;
use crate::csi::guards::{Guards, Held};
use crate::csi::ids::{self, Kind};
use crate::csi::status::CsiError;
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_client::AgentClient;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::node_server::Node;
use crate::proto::csi::v1::volume_capability::AccessType;
use crate::proto::csi::v1::volume_capability::access_mode::Mode;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// The Node service of one node.
#[derive(Clone, Debug)]
pub struct NodeService {
    node_id: String,
    agent: AgentClient<Channel>,
    attacher: Arc<dyn Attacher>,
    guards: Guards,
}

/// How a volume is accessed, from a validated capability.
#[derive(Debug, Clone)]
enum Access {
    Block,
    Mount { fs: FsType, flags: Vec<String> },
}

struct Cap {
    access: Access,
    read_only: bool,
    /// SINGLE_NODE_SINGLE_WRITER: one published target at a time.
    single_writer: bool,
}

fn capability(cap: Option<&csi::VolumeCapability>) -> Result<Cap, CsiError> {
    let cap = cap.ok_or(CsiError::Missing("volume_capability"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or(CsiError::Missing("volume_capability.access_mode"))?
        .mode();
    let read_only = match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            false
        }
        Mode::SingleNodeReaderOnly => true,
        other => {
            return Err(CsiError::Invalid(format!(
                "access mode {} is not supported: a volume lives on one node (SINGLE_NODE_* only)",
                other.as_str_name()
            )));
        }
    };
    let access = match cap.access_type.as_ref() {
        None => return Err(CsiError::Missing("volume_capability.access_type")),
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            if m.mount_flags.iter().any(|f| f.is_empty()) {
                return Err(CsiError::Invalid(
                    "mount_flags contains an empty flag".into(),
                ));
            }
            Access::Mount {
                fs: FsType::parse(&m.fs_type).map_err(node_err)?,
                flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Cap {
        access,
        read_only,
        single_writer: mode == Mode::SingleNodeSingleWriter,
    })
}

fn required<'a>(field: &'static str, v: &'a str) -> Result<&'a str, CsiError> {
    if v.is_empty() {
        Err(CsiError::Missing(field))
    } else {
        Ok(v)
    }
}

/// Node-side failures as CSI errors: states the caller must change are FAILED_PRECONDITION,
/// bad fs types INVALID_ARGUMENT, the rest internal.
pub fn node_err(e: Error) -> CsiError {
    match e {
        Error::UnsupportedFs(_) => CsiError::Invalid(e.to_string()),
        Error::Busy { .. } | Error::NotBlank { .. } | Error::FsMismatch { .. } => {
            CsiError::FailedPrecondition(e.to_string())
        }
        other => CsiError::Node(other),
    }
}

/// Runs node-side work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, CsiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CsiError::Node(Error::Unhealthy(format!("node task failed: {e}"))))?
}

impl NodeService {
    /// The service of node `node_id`, talking to its agent over `agent` and attaching with
    /// `attacher`.
    pub fn new(node_id: String, agent: AgentClient<Channel>, attacher: Arc<dyn Attacher>) -> Self {
        Self {
            node_id,
            agent,
            attacher,
            guards: Guards::default(),
        }
    }

    /// The agent's volume id named by a CSI volume id, when it lives on this node.
    fn agent_id(&self, volume_id: &str) -> Result<u64, CsiError> {
        let obj = ids::required("volume_id", Kind::Volume, volume_id)?
            .ok_or_else(|| CsiError::NotFound(format!("no volume has id {volume_id:?}")))?;
        if obj.node != self.node_id {
            return Err(CsiError::NotFound(format!(
                "volume {volume_id} lives on node {}, not on {}",
                obj.node, self.node_id
            )));
        }
        Ok(obj.id)
    }

    fn guard(&self, volume_id: &str) -> Result<Held, CsiError> {
        self.guards.take([volume_id.to_string()])
    }

    async fn volume(&self, id: u64) -> Result<pb::Volume, CsiError> {
        let r = self
            .agent
            .clone()
            .get_volume(pb::GetVolumeRequest {
                volume: id.to_string(),
            })
            .await;
        match r {
            Ok(v) => Ok(v.into_inner()),
            Err(s) if s.code() == Code::NotFound => Err(CsiError::NotFound(format!(
                "volume {id} does not exist on node {}",
                self.node_id
            ))),
            Err(s) => Err(CsiError::agent(&self.node_id, s)),
        }
    }

    async fn export(&self, id: u64) -> Result<Export, CsiError> {
        let v = self.volume(id).await?;
        if !v.offline_reason.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is offline: {}",
                v.offline_reason
            )));
        }
        let info = self
            .agent
            .clone()
            .get_agent_info(pb::GetAgentInfoRequest {})
            .await
            .map_err(|s| CsiError::agent(&self.node_id, s))?
            .into_inner();
        Ok(Export {
            socket: info.nbd_socket.into(),
            name: v.nbd_export,
        })
    }
}

fn stage(
    attacher: &dyn Attacher,
    volume: &str,
    export: &Export,
    staging: &Path,
    cap: &Cap,
) -> Result<(), CsiError> {
    // A staging mount on a broken attachment (its NBD client died) is dropped and redone.
    if let Err(Error::Unhealthy(why)) = attacher.device(volume) {
        tracing::warn!(volume, %why, "restaging over a broken attachment");
        if mount::mounted_at(staging).map_err(node_err)?.is_some() {
            mount::unmount_lazy(staging).map_err(node_err)?;
        }
    }
    let dev = attacher.attach(volume, export).map_err(node_err)?;
    let Access::Mount { fs, flags } = &cap.access else {
        return Ok(());
    };
    let numbers = mount::device_numbers(&dev).map_err(node_err)?;
    if let Some(m) = mount::mounted_at(staging).map_err(node_err)? {
        if m.dev != numbers {
            return Err(CsiError::AlreadyExists(format!(
                "{} already has another filesystem mounted ({})",
                staging.display(),
                m.source
            )));
        }
        if m.read_only() != cap.read_only || m.fstype != fs.name() {
            return Err(CsiError::AlreadyExists(format!(
                "{volume} is staged at {} as {} {}, incompatible with this request",
                staging.display(),
                m.fstype,
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        return Ok(());
    }
    match mount::probe(&dev).map_err(node_err)? {
        Contents::Blank => {
            tracing::info!(volume, device = %dev.display(), fs = fs.name(), "formatting a blank device");
            mount::format(&dev, *fs).map_err(node_err)?;
        }
        Contents::Filesystem(t) if t == fs.name() => {}
        Contents::Filesystem(t) => {
            return Err(node_err(Error::FsMismatch {
                device: dev,
                found: t,
                wanted: fs.name().into(),
            }));
        }
        Contents::Other(found) => return Err(node_err(Error::NotBlank { device: dev, found })),
    }
    std::fs::create_dir_all(staging)
        .map_err(|e| node_err(super::error::io_err("creating", staging)(e)))?;
    let mut opts = flags.clone();
    if cap.read_only {
        opts.push("ro".into());
    }
    mount::mount(&dev, staging, *fs, &opts).map_err(node_err)?;
    tracing::info!(volume, device = %dev.display(), staging = %staging.display(), "staged");
    Ok(())
}

fn single_writer_busy(volume: &str, at: &Path) -> CsiError {
    CsiError::FailedPrecondition(format!(
        "{volume} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
        at.display()
    ))
}

/// Every Block publish of the attached device `dev`: binds of its node and of the nodes of
/// its read-only loops.
fn node_binds(dev: &Path) -> Result<Vec<mount::MountEntry>, CsiError> {
    let mut binds = mount::binds_of_node(dev).map_err(node_err)?;
    for l in attach::read_only_loops(dev) {
        binds.extend(mount::binds_of_node(&l).map_err(node_err)?);
    }
    Ok(binds)
}

/// Where `dev` is published other than at `staging`: binds of its filesystem (Filesystem
/// access) and binds of the device node itself (Block access, which mountinfo shows as the
/// node inside the /dev filesystem, not under the device's numbers). Both kinds count,
/// whichever access type asks.
fn published_elsewhere(dev: &Path, staging: &Path) -> Result<Option<PathBuf>, CsiError> {
    let staging = mount::resolve(staging);
    let fs = mount::mounts_of(dev).map_err(node_err)?;
    let nodes = node_binds(dev)?;
    Ok(fs
        .into_iter()
        .chain(nodes)
        .map(|m| m.mount_point)
        .find(|p| *p != staging))
}

fn publish(
    attacher: &dyn Attacher,
    volume: &str,
    staging: &Path,
    target: &Path,
    cap: &Cap,
    read_only: bool,
) -> Result<(), CsiError> {
    let not_staged = || {
        CsiError::FailedPrecondition(format!(
            "{volume} is not staged at {}; NodeStageVolume first",
            staging.display()
        ))
    };
    let dev = match attacher.device(volume) {
        Ok(Some(d)) => d,
        Ok(None) => return Err(not_staged()),
        Err(e) => return Err(node_err(e)),
    };
    let numbers = mount::device_numbers(&dev).map_err(node_err)?;
    let block = matches!(cap.access, Access::Block);
    if !block {
        let staged = mount::mounted_at(staging).map_err(node_err)?;
        if staged.is_none_or(|m| m.dev != numbers) {
            return Err(not_staged());
        }
    }
    if let Some(m) = mount::mounted_at(target).map_err(node_err)? {
        // Already published here: the same call again succeeds, anything else is refused.
        let ours = if block {
            node_binds(&dev)?
                .iter()
                .any(|b| b.mount_point == m.mount_point)
        } else {
            m.dev == numbers
        };
        if !ours || m.read_only() != read_only {
            return Err(CsiError::AlreadyExists(format!(
                "{} is already mounted ({} {}), incompatible with this request",
                target.display(),
                m.source,
                if m.read_only() { "ro" } else { "rw" }
            )));
        }
        return Ok(());
    }
    // Refusals first: nothing is created at the target until the publish goes ahead.
    if cap.single_writer
        && let Some(at) = published_elsewhere(&dev, staging)?
    {
        return Err(single_writer_busy(volume, &at));
    }
    // Filesystem access binds the staged directory on a directory, Block access the device
    // node on a file (read-only: the node of a read-only loop device over it). What this call
    // creates it removes again if the bind fails, so a failed publish leaves the target as it
    // found it.
    let created = !target.exists();
    let src = if block {
        if created {
            std::fs::File::create(target)
                .map_err(|e| node_err(super::error::io_err("creating", target)(e)))?;
        }
        if read_only {
            attach::read_only_loop(&dev).map_err(|e| {
                if created {
                    let _ = remove_target(target);
                }
                node_err(e)
            })?
        } else {
            dev.clone()
        }
    } else {
        std::fs::create_dir_all(target)
            .map_err(|e| node_err(super::error::io_err("creating", target)(e)))?;
        staging.to_path_buf()
    };
    if let Err(e) = mount::bind(&src, target, read_only, &[]) {
        if block && read_only {
            let _ = attach::release_read_only_loop(&src);
        }
        if created {
            let _ = remove_target(target);
        }
        return Err(node_err(e));
    }
    tracing::info!(volume, target = %target.display(), read_only, "published");
    Ok(())
}

/// Removes `path` (a directory or a file), if there.
fn remove_target(path: &Path) -> Result<(), CsiError> {
    let r = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir(path),
        Ok(_) => std::fs::remove_file(path),
    };
    r.map_err(|e| node_err(super::error::io_err("removing", path)(e)))
}

fn usage(total: u64, available: u64, used: u64, unit: csi::volume_usage::Unit) -> csi::VolumeUsage {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    csi::VolumeUsage {
        available: i(available),
        total: i(total),
        used: i(used),
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let staging = PathBuf::from(required("staging_target_path", &r.staging_target_path)?);
        let cap = capability(r.volume_capability.as_ref())?;
        let id = self.agent_id(&r.volume_id)?;
        let _held = self.guard(&r.volume_id)?;
        let export = self.export(id).await?;
        let (att, vol) = (self.attacher.clone(), r.volume_id.clone());
        blocking(move || stage(att.as_ref(), &vol, &export, &staging, &cap)).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let staging = PathBuf::from(required("staging_target_path", &r.staging_target_path)?);
        let _ = self.agent_id(&r.volume_id)?;
        let _held = self.guard(&r.volume_id)?;
        let (att, vol) = (self.attacher.clone(), r.volume_id.clone());
        blocking(move || {
            mount::unmount_all(&staging).map_err(node_err)?;
            // Read-only loops left by an unpublish that did not finish go first; one still
            // published keeps the volume staged. (A broken attachment is detach's to handle.)
            if let Ok(Some(dev)) = att.device(&vol) {
                for l in attach::read_only_loops(&dev) {
                    attach::release_read_only_loop(&l).map_err(node_err)?;
                }
            }
            att.detach(&vol).map_err(node_err)?;
            tracing::info!(volume = vol, staging = %staging.display(), "unstaged");
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let staging = PathBuf::from(required("staging_target_path", &r.staging_target_path)?);
        let target = PathBuf::from(required("target_path", &r.target_path)?);
        let cap = capability(r.volume_capability.as_ref())?;
        let _ = self.agent_id(&r.volume_id)?;
        let read_only = r.readonly || cap.read_only;
        let _held = self.guard(&r.volume_id)?;
        let (att, vol) = (self.attacher.clone(), r.volume_id.clone());
        blocking(move || publish(att.as_ref(), &vol, &staging, &target, &cap, read_only)).await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let target = PathBuf::from(required("target_path", &r.target_path)?);
        let _ = self.agent_id(&r.volume_id)?;
        let _held = self.guard(&r.volume_id)?;
        let vol = r.volume_id.clone();
        blocking(move || {
            // A read-only Block publish binds a read-only loop device of its own: detached
            // once unbound.
            let node = mount::mounted_at(&target)
                .map_err(node_err)?
                .and_then(|m| m.bound_node());
            mount::unmount_all(&target).map_err(node_err)?;
            if let Some(node) = node {
                attach::release_read_only_loop(&node).map_err(node_err)?;
            }
            remove_target(&target)?;
            tracing::info!(volume = vol, target = %target.display(), "unpublished");
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let path = PathBuf::from(required("volume_path", &r.volume_path)?);
        let id = self.agent_id(&r.volume_id)?;
        let _held = self.guard(&r.volume_id)?;
        let agent_state = match self.volume(id).await {
            Ok(v) if v.offline_reason.is_empty() => None,
            Ok(v) => Some(format!(
                "the agent holds the volume offline: {}",
                v.offline_reason
            )),
            Err(CsiError::NotFound(m)) => return Err(CsiError::NotFound(m).into()),
            Err(e) => Some(format!("the agent cannot be asked: {e}")),
        };
        let (att, vol) = (self.attacher.clone(), r.volume_id.clone());
        let (usage, attach_state) = blocking(move || {
            let Some(m) = mount::mounted_at(&path).map_err(node_err)? else {
                return Err(CsiError::NotFound(format!(
                    "{vol} is not mounted at {}",
                    path.display()
                )));
            };
            let dev = att.device(&vol);
            let attach_state = match &dev {
                Ok(Some(_)) => None,
                Ok(None) => Some("the volume is not attached on this node".to_string()),
                Err(e) => Some(e.to_string()),
            };
            let block = std::fs::metadata(&path).is_ok_and(|md| !md.is_dir());
            let usage = if block {
                let size = match &dev {
                    Ok(Some(d)) => mount::device_size(d).map_err(node_err)?,
                    _ => 0,
                };
                vec![usage(size, 0, 0, csi::volume_usage::Unit::Bytes)]
            } else {
                let _ = m;
                let s = mount::stats(&path).map_err(node_err)?;
                vec![
                    usage(
                        s.total_bytes,
                        s.available_bytes,
                        s.used_bytes,
                        csi::volume_usage::Unit::Bytes,
                    ),
                    usage(
                        s.total_inodes,
                        s.free_inodes,
                        s.used_inodes,
                        csi::volume_usage::Unit::Inodes,
                    ),
                ]
            };
            Ok((usage, attach_state))
        })
        .await?;
        let problem = attach_state.or(agent_state);
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(csi::VolumeCondition {
                abnormal: problem.is_some(),
                message: problem.unwrap_or_else(|| "healthy".into()),
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let path = PathBuf::from(required("volume_path", &r.volume_path)?);
        let _ = self.agent_id(&r.volume_id)?;
        if let Some(c) = &r.volume_capability {
            capability(Some(c))?;
        }
        let want = r
            .capacity_range
            .as_ref()
            .map(|c| c.required_bytes)
            .unwrap_or(0);
        if want < 0 {
            return Err(
                CsiError::Invalid("capacity_range.required_bytes is negative".into()).into(),
            );
        }
        let _held = self.guard(&r.volume_id)?;
        let (att, vol) = (self.attacher.clone(), r.volume_id.clone());
        let size = blocking(move || {
            let dev = match att.device(&vol).map_err(node_err)? {
                Some(d) => d,
                None => {
                    return Err(CsiError::NotFound(format!(
                        "{vol} is not staged on this node"
                    )));
                }
            };
            let size = mount::device_size(&dev).map_err(node_err)?;
            if (want as u64) > size {
                return Err(CsiError::FailedPrecondition(format!(
                    "{} of {vol} has {size} bytes, fewer than the {want} requested: an attached \
                     device keeps the size it had when attached, so expansion is offline \
                     (unstage, expand, stage)",
                    dev.display()
                )));
            }
            let Some(m) = mount::mounted_at(&path).map_err(node_err)? else {
                return Err(CsiError::NotFound(format!(
                    "{vol} is not mounted at {}",
                    path.display()
                )));
            };
            if std::fs::metadata(&path).is_ok_and(|md| !md.is_dir()) {
                return Ok(size); // block access: nothing to grow
            }
            let fs = FsType::parse(&m.fstype).map_err(node_err)?;
            mount::grow(&dev, &path, fs).map_err(node_err)?;
            tracing::info!(volume = vol, size, fs = fs.name(), "filesystem grown");
            Ok(size)
        })
        .await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type, rpc::Type as T};
        let caps = [
            T::StageUnstageVolume,
            T::GetVolumeStats,
            T::ExpandVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: [(TOPOLOGY_KEY.to_string(), self.node_id.clone())].into(),
            }),
        }))
    }
}
