//! CSI secrets never reach a log line: a `standalone` run at the most verbose level
//! (RUST_LOG=trace, every crate) gets a distinctive secret value in every request that carries
//! secrets, on paths that succeed and on paths that fail, and its whole log is searched for it.

mod csi_common;
mod skip;

use csi::volume_capability::access_mode::Mode;
use csi_common::*;
use flashcopy_csi::proto::csi::v1 as csi;
use std::collections::HashMap;

/// The value (and a key name that is itself sensitive-looking) passed as a secret.
const VALUE: &str = "Zq8-very-secret-value-4Xw";
const KEY: &str = "password";

fn secrets() -> HashMap<String, String> {
    [(KEY.to_string(), VALUE.to_string())].into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_secrets_never_reach_the_log() {
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("standalone.log");
    let s = Standalone::start_logging(Some(&log));
    let mut c = s.clients().await;
    let cap = block_cap(Mode::SingleNodeWriter);

    let vol = c
        .ctl
        .create_volume(csi::CreateVolumeRequest {
            volume_capabilities: vec![cap.clone()],
            secrets: secrets(),
            ..create_req("db", SIZE)
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = vol.volume_id.clone();
    c.ctl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![cap.clone()],
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .unwrap();
    let snap = c
        .ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "s1".into(),
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    c.ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * SIZE,
                limit_bytes: 0,
            }),
            secrets: secrets(),
            volume_capability: Some(cap.clone()),
        })
        .await
        .unwrap();
    let group = c
        .group
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "g1".into(),
            source_volume_ids: vec![id.clone()],
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    c.group
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: group
                .snapshots
                .iter()
                .map(|s| s.snapshot_id.clone())
                .collect(),
            secrets: secrets(),
        })
        .await
        .unwrap();
    c.group
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: group
                .snapshots
                .iter()
                .map(|s| s.snapshot_id.clone())
                .collect(),
            secrets: secrets(),
        })
        .await
        .unwrap();

    // The node side, where this machine can attach (nbdfuse + loop); the failing paths below
    // run everywhere.
    if skip::root_with(&["/dev/loop-control", "/dev/fuse"])
        && skip::have_all(&["nbdfuse", "losetup"])
    {
        let staging = s.path("staging");
        let target = s.path("target");
        c.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                secrets: secrets(),
                ..Default::default()
            })
            .await
            .unwrap();
        c.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap.clone()),
                secrets: secrets(),
                ..Default::default()
            })
            .await
            .unwrap();
        c.node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                secrets: secrets(),
                ..Default::default()
            })
            .await
            .unwrap();
        c.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
        c.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap();
    }

    // Requests that fail, with the secrets: errors are logged too.
    let bad = "no-such-node/vol-42".to_string();
    let _ = c
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: bad.clone(),
            staging_target_path: s.path("bad-staging").display().to_string(),
            volume_capability: Some(cap.clone()),
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let _ = c
        .ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: bad.clone(),
            name: "s2".into(),
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let _ = c
        .ctl
        .create_volume(csi::CreateVolumeRequest {
            secrets: secrets(),
            parameters: [("copyRate".to_string(), "fast".to_string())].into(),
            ..create_req("bad", SIZE)
        })
        .await
        .unwrap_err();

    c.ctl
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            secrets: secrets(),
        })
        .await
        .unwrap();
    c.ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            secrets: secrets(),
        })
        .await
        .unwrap();
    drop(c);
    drop(s); // SIGTERM: the shutdown is logged too.

    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().count();
    assert!(
        lines > 50 && text.contains("CreateVolumeGroupSnapshot"),
        "the log is not verbose enough to prove anything ({lines} lines):\n{text}"
    );
    for (i, line) in text.lines().enumerate() {
        assert!(
            !line.contains(VALUE),
            "line {}: a secret value in the log: {line}",
            i + 1
        );
    }
    println!("{lines} log lines at trace level, no secret value in any");
}
