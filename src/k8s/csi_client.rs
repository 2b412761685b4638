//! [`SnapshotDriver`] over our CSI controller's gRPC socket (`csi.v1`).

use super::driver::{
    DriverError, DriverResult, GroupSnapshotInfo, Secrets, SnapshotDriver, SnapshotInfo,
};
use crate::proto::csi::v1 as csi;
use csi::controller_client::ControllerClient;
use csi::group_controller_client::GroupControllerClient;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// A CSI controller client; the channel connects lazily and reconnects, so a CSI socket that
/// is not up yet only makes calls fail with UNAVAILABLE (non-final, retried).
#[derive(Clone)]
pub struct CsiDriver {
    controller: ControllerClient<Channel>,
    group: GroupControllerClient<Channel>,
}

impl CsiDriver {
    /// A client for `endpoint` (`unix:///path/csi.sock`, a socket path, or `http://host:port`).
    pub fn new(endpoint: &str) -> Result<Self, tonic::transport::Error> {
        let uri = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("unix://{endpoint}")
        };
        let channel = Endpoint::from_shared(uri)?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(CsiDriver {
            controller: ControllerClient::new(channel.clone()),
            group: GroupControllerClient::new(channel),
        })
    }
}

fn map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn ns(t: Option<prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| {
        t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
    })
}

fn snapshot(s: csi::Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        snapshot_id: s.snapshot_id,
        source_volume_id: s.source_volume_id,
        creation_time_ns: ns(s.creation_time),
        size_bytes: s.size_bytes,
        ready_to_use: s.ready_to_use,
        group_snapshot_id: s.group_snapshot_id,
    }
}

fn group(g: csi::VolumeGroupSnapshot) -> GroupSnapshotInfo {
    GroupSnapshotInfo {
        group_snapshot_id: g.group_snapshot_id,
        snapshots: g.snapshots.into_iter().map(snapshot).collect(),
        creation_time_ns: ns(g.creation_time),
        ready_to_use: g.ready_to_use,
    }
}

fn missing(what: &str) -> DriverError {
    DriverError::new(
        tonic::Code::Internal,
        format!("the CSI driver answered without a {what}"),
    )
}

impl SnapshotDriver for CsiDriver {
    fn create_snapshot<'a>(
        &'a self,
        name: &'a str,
        source_volume_id: &'a str,
        parameters: &'a BTreeMap<String, String>,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<SnapshotInfo>> {
        Box::pin(async move {
            let req = csi::CreateSnapshotRequest {
                source_volume_id: source_volume_id.into(),
                name: name.into(),
                secrets: map(secrets),
                parameters: map(parameters),
            };
            let resp = self.controller.clone().create_snapshot(req).await?;
            resp.into_inner()
                .snapshot
                .map(snapshot)
                .ok_or_else(|| missing("snapshot"))
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        snapshot_id: &'a str,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<()>> {
        Box::pin(async move {
            let req = csi::DeleteSnapshotRequest {
                snapshot_id: snapshot_id.into(),
                secrets: map(secrets),
            };
            self.controller.clone().delete_snapshot(req).await?;
            Ok(())
        })
    }

    fn get_snapshot<'a>(
        &'a self,
        snapshot_id: &'a str,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<Option<SnapshotInfo>>> {
        Box::pin(async move {
            let req = csi::ListSnapshotsRequest {
                snapshot_id: snapshot_id.into(),
                secrets: map(secrets),
                ..Default::default()
            };
            let resp = self.controller.clone().list_snapshots(req).await?;
            Ok(resp
                .into_inner()
                .entries
                .into_iter()
                .filter_map(|e| e.snapshot)
                .find(|s| s.snapshot_id == snapshot_id)
                .map(snapshot))
        })
    }

    fn create_group_snapshot<'a>(
        &'a self,
        name: &'a str,
        source_volume_ids: &'a [String],
        parameters: &'a BTreeMap<String, String>,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<GroupSnapshotInfo>> {
        Box::pin(async move {
            let req = csi::CreateVolumeGroupSnapshotRequest {
                name: name.into(),
                source_volume_ids: source_volume_ids.to_vec(),
                secrets: map(secrets),
                parameters: map(parameters),
            };
            let resp = self.group.clone().create_volume_group_snapshot(req).await?;
            resp.into_inner()
                .group_snapshot
                .map(group)
                .ok_or_else(|| missing("group snapshot"))
        })
    }

    fn delete_group_snapshot<'a>(
        &'a self,
        group_snapshot_id: &'a str,
        snapshot_ids: &'a [String],
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<()>> {
        Box::pin(async move {
            let req = csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: group_snapshot_id.into(),
                snapshot_ids: snapshot_ids.to_vec(),
                secrets: map(secrets),
            };
            self.group.clone().delete_volume_group_snapshot(req).await?;
            Ok(())
        })
    }

    fn get_group_snapshot<'a>(
        &'a self,
        group_snapshot_id: &'a str,
        snapshot_ids: &'a [String],
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<GroupSnapshotInfo>> {
        Box::pin(async move {
            let req = csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: group_snapshot_id.into(),
                snapshot_ids: snapshot_ids.to_vec(),
                secrets: map(secrets),
            };
            let resp = self.group.clone().get_volume_group_snapshot(req).await?;
            resp.into_inner()
                .group_snapshot
                .map(group)
                .ok_or_else(|| missing("group snapshot"))
        })
    }
}
