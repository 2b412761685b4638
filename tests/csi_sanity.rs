//! The in-repo CSI conformance suite: every behaviour csi-sanity (kubernetes-csi/csi-test v5.5)
//! checks for the capabilities we advertise, against a real `flashcopy-csi standalone` process
//! over its Unix socket, in Filesystem and Block modes. `e2e/csi-sanity.sh` runs the real
//! csi-sanity where a binary exists; this suite keeps us honest everywhere else.
//!
//! Node tests attach through nbdfuse + loop and mount ext4: they need root and the peers
//! (required under CI; elsewhere skipped, and listed at the end of ci/test.sh).

mod csi_common;
mod skip;

use csi::controller_service_capability::rpc::Type as CtlCap;
use csi::volume_capability::access_mode::Mode;
use csi_common::*;
use flashcopy_csi::proto::csi::v1 as csi;
use skip::{have_all, root_with};
use std::collections::HashMap;
use std::path::Path;
use tonic::Code;

// ---------------------------------------------------------------- Identity

#[tokio::test(flavor = "multi_thread")]
async fn identity_plugin_info_capabilities_probe() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    let info =
        c.id.get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(info.name, "flashcopy.csi.io");
    assert!(!info.vendor_version.is_empty());
    let caps =
        c.id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .capabilities;
    assert!(!caps.is_empty(), "the plugin advertises its services");
    let probe = c.id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_ne!(probe.ready, Some(false), "a started standalone is ready");
}

// ---------------------------------------------------------------- Controller

#[tokio::test(flavor = "multi_thread")]
async fn controller_capabilities_and_capacity() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    let caps = c.ctl_caps().await;
    for need in [
        CtlCap::CreateDeleteVolume,
        CtlCap::CreateDeleteSnapshot,
        CtlCap::ListVolumes,
        CtlCap::ListSnapshots,
        CtlCap::GetCapacity,
        CtlCap::CloneVolume,
        CtlCap::ExpandVolume,
    ] {
        assert!(caps.contains(&need), "{need:?} missing from {caps:?}");
    }
    assert!(!caps.contains(&CtlCap::Unknown));
    let cap = c
        .ctl
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_tokens_presence_and_absence() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    assert_eq!(
        code(
            c.ctl
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: "not-a-token".into(),
                })
                .await
        ),
        Code::Aborted
    );
    let before = c.list_volume_ids().await;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(c.create(&format!("lv-{i}")).await.volume_id);
    }
    let listed = c.list_volume_ids().await;
    assert_eq!(
        listed.len(),
        before.len() + 5,
        "pages of 2 list each volume once"
    );
    for id in &made {
        assert!(listed.contains(id), "{id} not listed");
    }
    c.ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: made[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let listed = c.list_volume_ids().await;
    assert!(
        !listed.contains(&made[0]),
        "a deleted volume is still listed"
    );
    assert_eq!(listed.len(), before.len() + 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_volume_rules() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    // No name, no capabilities: INVALID_ARGUMENT, and nothing created.
    let mut r = create_req("", SIZE);
    assert_eq!(
        code(c.ctl.create_volume(r.clone()).await),
        Code::InvalidArgument
    );
    r.name = "no-caps".into();
    r.volume_capabilities.clear();
    assert_eq!(code(c.ctl.create_volume(r).await), Code::InvalidArgument);
    assert!(c.list_volume_ids().await.is_empty());

    // No capacity: a default size.
    let mut r = create_req("no-capacity", 0);
    r.capacity_range = None;
    let v = c
        .ctl
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(v.capacity_bytes > 0);
    assert!(!v.volume_id.is_empty());

    // 1 GiB: at least what was asked (sparse, so it fits anywhere).
    let v = c
        .ctl
        .create_volume(create_req("one-gib", 1 << 30))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(v.capacity_bytes >= 1 << 30);

    // Same name and size: the same volume. Same name, other size: ALREADY_EXISTS.
    let again = c
        .ctl
        .create_volume(create_req("one-gib", 1 << 30))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(
        code(c.ctl.create_volume(create_req("one-gib", 2 << 30)).await),
        Code::AlreadyExists
    );

    // csi-sanity's maximum-length name: 128 characters.
    let long = "x".repeat(128);
    c.ctl.create_volume(create_req(&long, SIZE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn create_volume_from_snapshot_and_volume() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    let src = c.create("source").await;
    let snap = c.snapshot("snap", &src.volume_id).await;

    let mut r = create_req("from-snapshot", SIZE);
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let v = c
        .ctl
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(
        v.content_source.is_some(),
        "content_source echoes the source"
    );

    r.name = "from-missing-snapshot".into();
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "non-existing-snapshot-id".into(),
            },
        )),
    });
    assert_eq!(code(c.ctl.create_volume(r.clone()).await), Code::NotFound);

    r.name = "from-volume".into();
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: src.volume_id.clone(),
            },
        )),
    });
    let v = c
        .ctl
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(v.content_source.is_some());

    r.name = "from-missing-volume".into();
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: "non-existing-volume-id".into(),
            },
        )),
    });
    assert_eq!(code(c.ctl.create_volume(r).await), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_volume_and_validate_capabilities() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    assert_eq!(
        code(
            c.ctl
                .delete_volume(csi::DeleteVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    // Deleting what does not exist succeeds (idempotent).
    c.ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "reallyfakevolumeid".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let v = c.create("validate").await;
    assert_eq!(
        code(
            c.ctl
                .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.ctl
                .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: v.volume_id.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    let ok = c
        .ctl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.confirmed.unwrap().volume_capabilities.is_empty());
    assert_eq!(
        code(
            c.ctl
                .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: "some-vol-id".into(),
                    volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );

    c.ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // And again: still success.
    c.ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_create_rules_and_delete() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    let v1 = c.create("snap-src-1").await;
    let v2 = c.create("snap-src-2").await;
    assert_eq!(
        code(
            c.ctl
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: v1.volume_id.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.ctl
                .create_snapshot(csi::CreateSnapshotRequest {
                    name: "no-source".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    let s1 = c.snapshot("snap-a", &v1.volume_id).await;
    verify_snapshot(&s1, &v1.volume_id);
    let again = c.snapshot("snap-a", &v1.volume_id).await;
    assert_eq!(again.snapshot_id, s1.snapshot_id);
    assert_eq!(
        again.creation_time, s1.creation_time,
        "a stable creation_time"
    );
    assert_eq!(
        code(
            c.ctl
                .create_snapshot(csi::CreateSnapshotRequest {
                    name: "snap-a".into(),
                    source_volume_id: v2.volume_id.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::AlreadyExists
    );
    let long = c.snapshot(&"s".repeat(128), &v2.volume_id).await;
    verify_snapshot(&long, &v2.volume_id);

    assert_eq!(
        code(
            c.ctl
                .delete_snapshot(csi::DeleteSnapshotRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    c.ctl
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: "reallyfakesnapshotid".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        c.ctl
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: s1.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_get_snapshots() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    let caps = c.ctl_caps().await;
    let mut snaps = Vec::new();
    let mut vols = Vec::new();
    for i in 0..3 {
        let v = c.create(&format!("ls-vol-{i}")).await;
        snaps.push(c.snapshot(&format!("ls-snap-{i}"), &v.volume_id).await);
        vols.push(v);
    }
    let list = |req: csi::ListSnapshotsRequest| {
        let mut ctl = c.ctl.clone();
        async move { ctl.list_snapshots(req).await.unwrap().into_inner() }
    };
    let all = list(csi::ListSnapshotsRequest::default()).await;
    assert_eq!(all.entries.len(), 3);

    let by_id = list(csi::ListSnapshotsRequest {
        snapshot_id: snaps[1].snapshot_id.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(by_id.entries.len(), 1);
    let found = by_id.entries[0].snapshot.clone().unwrap();
    verify_snapshot(&found, &vols[1].volume_id);
    assert_eq!(found.snapshot_id, snaps[1].snapshot_id);

    let none = list(csi::ListSnapshotsRequest {
        snapshot_id: "none-exist-id".into(),
        ..Default::default()
    })
    .await;
    assert!(none.entries.is_empty());

    let by_src = list(csi::ListSnapshotsRequest {
        source_volume_id: vols[2].volume_id.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(by_src.entries.len(), 1);
    assert_eq!(
        by_src.entries[0].snapshot.as_ref().unwrap().snapshot_id,
        snaps[2].snapshot_id
    );
    let none = list(csi::ListSnapshotsRequest {
        source_volume_id: "none-exist-volume".into(),
        ..Default::default()
    })
    .await;
    assert!(none.entries.is_empty());

    // Pagination: two pages, each snapshot once.
    let page1 = list(csi::ListSnapshotsRequest {
        max_entries: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(page1.entries.len(), 2);
    assert!(!page1.next_token.is_empty());
    let page2 = list(csi::ListSnapshotsRequest {
        max_entries: 2,
        starting_token: page1.next_token.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(page2.entries.len(), 1);
    let mut ids: Vec<_> = page1
        .entries
        .iter()
        .chain(&page2.entries)
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        code(
            c.ctl
                .list_snapshots(csi::ListSnapshotsRequest {
                    starting_token: "bogus".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::Aborted
    );

    if caps.contains(&CtlCap::GetSnapshot) {
        assert!(
            c.ctl
                .get_snapshot(csi::GetSnapshotRequest::default())
                .await
                .is_err()
        );
        let got = c
            .ctl
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: snaps[0].snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        verify_snapshot(&got, &vols[0].volume_id);
        assert!(
            c.ctl
                .get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: "none-exist-id".into(),
                    ..Default::default()
                })
                .await
                .is_err()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_expand_volume() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    assert_eq!(
        code(
            c.ctl
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 2 * SIZE,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    let v = c.create("expand").await;
    assert_eq!(
        code(
            c.ctl
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    let r = c
        .ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * SIZE,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.capacity_bytes >= 2 * SIZE);
}

// ---------------------------------------------------------------- GroupController

#[tokio::test(flavor = "multi_thread")]
async fn group_controller_rules() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    let caps = c
        .group
        .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert!(!caps.is_empty());
    let a = c.create("group-a").await;
    let b = c.create("group-b").await;
    assert_eq!(
        code(
            c.group
                .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                    source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.group
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.group
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: "invalid-group-snapshot-id".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.group
                .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    c.group
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: "invalid-group-snapshot-id".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // The positive path: one group snapshot of both, its members ready, then gone.
    let g = c
        .group
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "group-snap".into(),
            source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(g.ready_to_use);
    assert_eq!(g.snapshots.len(), 2);
    for m in &g.snapshots {
        assert_eq!(m.group_snapshot_id, g.group_snapshot_id);
        assert!(m.ready_to_use);
    }
    let ids: Vec<_> = g.snapshots.iter().map(|m| m.snapshot_id.clone()).collect();
    let got = c
        .group
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: g.group_snapshot_id.clone(),
            snapshot_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(got.group_snapshot_id, g.group_snapshot_id);
    // A member is deleted with its group, not alone.
    assert_eq!(
        code(
            c.ctl
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: ids[0].clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    for _ in 0..2 {
        c.group
            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                snapshot_ids: ids.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(
        code(
            c.group
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: g.group_snapshot_id.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
}

// ---------------------------------------------------------------- Node

#[tokio::test(flavor = "multi_thread")]
async fn node_capabilities_info_and_argument_checks() {
    let s = Standalone::start();
    let mut c = s.clients().await;
    let caps = c
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert!(!caps.is_empty());
    let info = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    let topo = info.accessible_topology.expect("topology is advertised");
    assert_eq!(
        topo.segments
            .get("topology.flashcopy.csi.io/node")
            .map(String::as_str),
        Some(NODE)
    );

    let target = s.path("target").display().to_string();
    let staging = s.path("staging").display().to_string();
    // Every argument check in both access types.
    for cap in [
        mount_cap(Mode::SingleNodeWriter),
        block_cap(Mode::SingleNodeWriter),
    ] {
        let publish = csi::NodePublishVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        for r in [
            csi::NodePublishVolumeRequest {
                volume_id: String::new(),
                ..publish.clone()
            },
            csi::NodePublishVolumeRequest {
                target_path: String::new(),
                ..publish.clone()
            },
            csi::NodePublishVolumeRequest {
                volume_capability: None,
                ..publish.clone()
            },
        ] {
            assert_eq!(
                code(c.node.node_publish_volume(r).await),
                Code::InvalidArgument
            );
        }
        for r in [
            csi::NodeUnpublishVolumeRequest {
                volume_id: String::new(),
                target_path: target.clone(),
            },
            csi::NodeUnpublishVolumeRequest {
                volume_id: "v".into(),
                target_path: String::new(),
            },
        ] {
            assert_eq!(
                code(c.node.node_unpublish_volume(r).await),
                Code::InvalidArgument
            );
        }
        let stage = csi::NodeStageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        for r in [
            csi::NodeStageVolumeRequest {
                volume_id: String::new(),
                ..stage.clone()
            },
            csi::NodeStageVolumeRequest {
                staging_target_path: String::new(),
                ..stage.clone()
            },
            csi::NodeStageVolumeRequest {
                volume_capability: None,
                ..stage.clone()
            },
        ] {
            assert_eq!(
                code(c.node.node_stage_volume(r).await),
                Code::InvalidArgument
            );
        }
        for r in [
            csi::NodeUnstageVolumeRequest {
                volume_id: String::new(),
                staging_target_path: staging.clone(),
            },
            csi::NodeUnstageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: String::new(),
            },
        ] {
            assert_eq!(
                code(c.node.node_unstage_volume(r).await),
                Code::InvalidArgument
            );
        }
    }
    for (id, path, want) in [
        ("", "some/path", Code::InvalidArgument),
        ("v", "", Code::InvalidArgument),
        ("sanity-unknown-volume", "some/path", Code::NotFound),
    ] {
        let r = csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        };
        assert_eq!(
            code(c.node.node_get_volume_stats(r).await),
            want,
            "stats {id:?} {path:?}"
        );
        let r = csi::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        };
        assert_eq!(
            code(c.node.node_expand_volume(r).await),
            want,
            "expand {id:?} {path:?}"
        );
    }
}

/// csi-sanity runs its whole suite in one access type (`--csi.testvolumeaccesstype`), so every
/// node rule here runs in both: Filesystem (`block == false`) and Block.
fn cap_of(block: bool, mode: Mode) -> csi::VolumeCapability {
    if block {
        block_cap(mode)
    } else {
        mount_cap(mode)
    }
}

fn can_attach() -> bool {
    root_with(&["/dev/loop-control", "/dev/fuse"]) && have_all(&["nbdfuse", "losetup", "mkfs.ext4"])
}

async fn stage(
    c: &mut Clients,
    id: &str,
    staging: &Path,
    cap: &csi::VolumeCapability,
) -> Result<tonic::Response<csi::NodeStageVolumeResponse>, tonic::Status> {
    c.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
}

async fn publish(
    c: &mut Clients,
    id: &str,
    staging: &Path,
    target: &Path,
    cap: &csi::VolumeCapability,
    readonly: bool,
) -> Result<tonic::Response<csi::NodePublishVolumeResponse>, tonic::Status> {
    c.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            readonly,
            ..Default::default()
        })
        .await
}

async fn unpublish(c: &mut Clients, id: &str, target: &Path) {
    for _ in 0..2 {
        c.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
        assert_untouched(target, "after unpublish");
    }
}

async fn unstage(c: &mut Clients, id: &str, staging: &Path) {
    for _ in 0..2 {
        c.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap();
    }
    assert!(!is_mounted(staging), "unstage unmounts the staging path");
}

/// Nothing at `path`: no mount, no file, no directory. A refused or failed publish must leave
/// the target as it found it, or the CO's next call there fails (csi-sanity's later specs could
/// not create their target directory under a leftover bind).
fn assert_untouched(path: &Path, when: &str) {
    assert!(!is_mounted(path), "{} is mounted {when}", path.display());
    assert!(
        std::fs::symlink_metadata(path).is_err(),
        "{} exists {when}",
        path.display()
    );
}

/// Writes `data` through a published target (a file in Filesystem mode, the device node itself
/// in Block mode) and reads it back through `other`, a second target of the same volume.
fn write_then_read(target: &Path, other: &Path, block: bool, data: &[u8]) {
    use std::io::{Read, Seek, Write};
    if block {
        let meta = std::fs::metadata(target).unwrap();
        assert!(
            !meta.is_dir(),
            "a block publish binds a device node, not a directory"
        );
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
        let mut f = std::fs::File::open(other).unwrap();
        let mut back = vec![0u8; data.len()];
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
    } else {
        std::fs::write(target.join("hello"), data).unwrap();
        assert_eq!(std::fs::read(other.join("hello")).unwrap(), data);
    }
}

/// The mount options of the top mount at `p`.
fn mount_options(p: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.display().to_string();
    info.lines()
        .rev()
        .find(|l| l.split(' ').nth(4).is_some_and(|m| m == p))
        .and_then(|l| l.split(' ').nth(5))
        .map(|o| o.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// The volume lifecycle csi-sanity runs (create, stage, publish, stats, expand, unpublish,
/// unstage, delete), each step done twice to prove idempotence, as SINGLE_NODE_SINGLE_WRITER
/// (which csi-sanity checks since the node advertises SINGLE_NODE_MULTI_WRITER).
async fn lifecycle(block: bool) {
    if !can_attach() {
        return;
    }
    let s = Standalone::start();
    let mut c = s.clients().await;
    let cap = cap_of(block, Mode::SingleNodeSingleWriter);
    let mut req = create_req(if block { "life-block" } else { "life-fs" }, SIZE);
    req.volume_capabilities = vec![cap.clone()];
    let v = c
        .ctl
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = v.volume_id.clone();
    // As csi-sanity: the controller expands first, the node grows the file system later.
    c.ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * SIZE,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let staging = s.path("staging");
    let target = s.path("target");
    std::fs::create_dir_all(&staging).unwrap();
    // The CO creates the target's parent; the plugin creates the target itself.
    for _ in 0..2 {
        stage(&mut c, &id, &staging, &cap).await.unwrap();
    }
    for _ in 0..2 {
        publish(&mut c, &id, &staging, &target, &cap, false)
            .await
            .unwrap();
    }
    write_then_read(&target, &target, block, b"flashcopy");

    let st = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!st.usage.is_empty());
    assert!(st.usage[0].total > 0);
    if block {
        assert_eq!(st.usage[0].total, 2 * SIZE, "a block volume's size");
    }
    let condition = st.volume_condition.expect("VOLUME_CONDITION is advertised");
    assert!(!condition.abnormal, "{}", condition.message);
    assert_eq!(
        code(
            c.node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: "some/path".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );

    // csi-sanity's "should fail when volume with single node single writer access mode is
    // already mounted at a different target path": FAILED_PRECONDITION, and nothing left there.
    let other = s.path("other_target");
    assert_eq!(
        code(publish(&mut c, &id, &staging, &other, &cap, false).await),
        Code::FailedPrecondition,
        "a single-writer volume published at a second target path"
    );
    assert_untouched(&other, "after a refused publish");

    // Node expansion after publish (the controller grew the volume before staging).
    let r = c
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: staging.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * SIZE,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.capacity_bytes >= 2 * SIZE);

    unpublish(&mut c, &id, &target).await;
    unstage(&mut c, &id, &staging).await;
    for _ in 0..2 {
        c.ctl
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_lifecycle_filesystem() {
    lifecycle(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_lifecycle_block() {
    lifecycle(true).await;
}

/// The publish rules of the access modes, and that no refused publish leaves anything behind:
/// not staged, SINGLE_NODE_MULTI_WRITER at several targets, an incompatible republish, a
/// single writer beside other publishes, read-only, and the refused call then succeeding once
/// the others are gone.
async fn publish_rules(block: bool) {
    if !can_attach() {
        return;
    }
    let s = Standalone::start();
    let mut c = s.clients().await;
    let multi = cap_of(block, Mode::SingleNodeMultiWriter);
    let single = cap_of(block, Mode::SingleNodeSingleWriter);
    let id = c.create("rules").await.volume_id;
    let staging = s.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let [t1, t2, t3, t4] = ["t1", "t2", "t3", "t4"].map(|n| s.path(n));

    // Not staged: FAILED_PRECONDITION, nothing created.
    assert_eq!(
        code(publish(&mut c, &id, &staging, &t1, &multi, false).await),
        Code::FailedPrecondition
    );
    assert_untouched(&t1, "after publishing an unstaged volume");

    stage(&mut c, &id, &staging, &multi).await.unwrap();
    // SINGLE_NODE_MULTI_WRITER: several targets, one volume.
    for t in [&t1, &t2] {
        publish(&mut c, &id, &staging, t, &multi, false)
            .await
            .unwrap();
    }
    write_then_read(&t1, &t2, block, b"two targets, one volume");

    // The same target again, read-only this time: ALREADY_EXISTS, and the mount unchanged.
    assert_eq!(
        code(publish(&mut c, &id, &staging, &t1, &multi, true).await),
        Code::AlreadyExists
    );
    assert!(is_mounted(&t1));
    assert!(!mount_options(&t1).contains(&"ro".to_string()));

    // A single writer while other targets are published: FAILED_PRECONDITION, nothing at t3.
    assert_eq!(
        code(publish(&mut c, &id, &staging, &t3, &single, false).await),
        Code::FailedPrecondition,
        "a single writer beside two published targets"
    );
    assert_untouched(&t3, "after a refused single-writer publish");

    // Read-only publish: a read-only mount.
    publish(&mut c, &id, &staging, &t4, &multi, true)
        .await
        .unwrap();
    assert!(mount_options(&t4).contains(&"ro".to_string()));
    if !block {
        assert!(std::fs::write(t4.join("no"), b"x").is_err());
    }

    // With the others gone, the single writer that was refused is published, and the second
    // single-writer target is refused in turn.
    for t in [&t1, &t2, &t4] {
        unpublish(&mut c, &id, t).await;
    }
    for _ in 0..2 {
        publish(&mut c, &id, &staging, &t3, &single, false)
            .await
            .unwrap();
    }
    assert_eq!(
        code(publish(&mut c, &id, &staging, &t1, &single, false).await),
        Code::FailedPrecondition
    );
    assert_untouched(&t1, "after a refused single-writer publish");
    unpublish(&mut c, &id, &t3).await;
    unstage(&mut c, &id, &staging).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_rules_filesystem() {
    publish_rules(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_rules_block() {
    publish_rules(true).await;
}
