//! CSI Identity service: the driver's name and version, its capabilities, readiness.

use super::DRIVER_NAME;
use crate::proto::csi::v1 as csi;
use crate::proto::csi::v1::identity_server::Identity;
use crate::proto::csi::v1::plugin_capability::{self, service::Type as ServiceType};
use tonic::{Request, Response, Status};

/// Which services the process serving this Identity offers.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityService {
    /// Controller, GroupController and SnapshotMetadata are served on the same endpoint.
    pub controller: bool,
}

impl IdentityService {
    /// Identity of a controller plugin (Controller and GroupController).
    pub fn controller() -> Self {
        Self { controller: true }
    }

    /// Identity of a node plugin.
    pub fn node() -> Self {
        Self { controller: false }
    }
}

fn service(t: ServiceType) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let mut caps = vec![service(ServiceType::VolumeAccessibilityConstraints)];
        if self.controller {
            caps.push(service(ServiceType::ControllerService));
            caps.push(service(ServiceType::GroupControllerService));
            caps.push(service(ServiceType::SnapshotMetadataService));
            // Offline: an attached volume (NBD, kernel or nbdfuse) keeps the size it was
            // attached with, so a volume grows while no node has it; ControllerExpandVolume
            // says FAILED_PRECONDITION otherwise, which csi-resizer waits out.
            caps.push(csi::PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: plugin_capability::volume_expansion::Type::Offline as i32,
                    },
                )),
            });
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
