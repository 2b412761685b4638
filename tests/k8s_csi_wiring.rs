//! The snapshot controller wired to the real thing: its reconcilers call our CSI controller
//! (a `flashcopy-csi standalone` process) through `CsiDriver` over the Unix socket, with the
//! mocked API server holding the Kubernetes objects. A VolumeSnapshot and a VolumeGroupSnapshot
//! become FlashCopy mappings on the agent, their statuses carry the agent's ids and sizes, and
//! deleting them removes the mappings. Also the driver calls on their own (idempotence, absent
//! ids, final errors).

mod csi_common;
mod k8s_common;

use csi_common::{Standalone, create_req};
use flashcopy_csi::k8s::csi_client::CsiDriver;
use flashcopy_csi::k8s::driver::SnapshotDriver;
use flashcopy_csi::k8s::{Ctx, Mode};
use flashcopy_csi::proto::csi::v1 as csi;
use k8s_common::{ApiServer, round};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const MIB: i64 = 1 << 20;

async fn volume(s: &Standalone, name: &str) -> String {
    let mut c = s.clients().await;
    c.ctl
        .create_volume(create_req(name, 8 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// The snapshot ids the CSI controller lists.
async fn listed_snapshots(s: &Standalone) -> Vec<csi::Snapshot> {
    let mut c = s.clients().await;
    c.ctl
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot)
        .collect()
}

fn objects(db: &str, log: &str) -> String {
    format!(
        r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: fc
  annotations: {{snapshot.storage.kubernetes.io/is-default-class: "true"}}
driver: flashcopy.csi.io
deletionPolicy: Delete
---
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshotClass
metadata:
  name: fc-group
  annotations: {{groupsnapshot.storage.kubernetes.io/is-default-class: "true"}}
driver: flashcopy.csi.io
deletionPolicy: Delete
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: db, namespace: app, uid: pvc-uid-db, labels: {{app: shop}}}}
spec: {{volumeName: pv-db, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 8Mi}}}}}}
status: {{phase: Bound}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: pv-db}}
spec:
  capacity: {{storage: 8Mi}}
  volumeMode: Filesystem
  accessModes: [ReadWriteOnce]
  claimRef: {{name: db, namespace: app, uid: pvc-uid-db}}
  csi: {{driver: flashcopy.csi.io, volumeHandle: "{db}"}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: log, namespace: app, uid: pvc-uid-log, labels: {{app: shop}}}}
spec: {{volumeName: pv-log, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 8Mi}}}}}}
status: {{phase: Bound}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: pv-log}}
spec:
  capacity: {{storage: 8Mi}}
  volumeMode: Filesystem
  accessModes: [ReadWriteOnce]
  claimRef: {{name: log, namespace: app, uid: pvc-uid-log}}
  csi: {{driver: flashcopy.csi.io, volumeHandle: "{log}"}}
"#
    )
}

const SNAP: &str = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: nightly, namespace: app, uid: vs-uid-1}
spec:
  source: {persistentVolumeClaimName: db}
"#;

const GROUP: &str = r#"
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: shop, namespace: app, uid: vgs-uid-1}
spec:
  source:
    selector:
      matchLabels: {app: shop}
"#;

/// Reconciles every object until nothing changes (at most `n` rounds); returns the errors
/// other than conflicts (a round works from a listing that its own writes make stale; the
/// controller retries those, as the next round does here).
async fn settle(server: &ApiServer, ctx: &Ctx, n: usize) -> Vec<String> {
    let mut errors = Vec::new();
    for _ in 0..n {
        let before = server.version();
        round(server, ctx, &mut errors).await;
        if server.version() == before {
            break;
        }
    }
    errors.retain(|e| !e.contains("409"));
    errors
}

fn put(server: &ApiServer, yaml: &str) {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        server.insert(v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_snapshots_and_group_snapshots_become_agent_mappings() {
    let s = Standalone::start();
    let db = volume(&s, "pvc-db").await;
    let log = volume(&s, "pvc-log").await;
    let (server, client) = ApiServer::start(&objects(&db, &log));
    let driver = CsiDriver::new(&format!("unix://{}", s.socket().display())).unwrap();
    let ctx = Ctx::new(
        client,
        Arc::new(driver),
        Mode::Full,
        Duration::from_secs(30),
        "flashcopy-snapshot-controller",
    );

    // A VolumeSnapshot: one CSI snapshot of db, ready at once, its handle on the content.
    put(&server, SNAP);
    let errors = settle(&server, &ctx, 10).await;
    assert!(errors.is_empty(), "{errors:#?}");
    let vs = server.get("volumesnapshots", "app", "nightly").unwrap();
    assert_eq!(vs["status"]["readyToUse"], true, "{vs:#}");
    let content_name = vs["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap()
        .to_string();
    let content = server
        .get("volumesnapshotcontents", "", &content_name)
        .unwrap();
    let handle = content["status"]["snapshotHandle"].as_str().unwrap();
    let listed = listed_snapshots(&s).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].snapshot_id, handle);
    assert_eq!(listed[0].source_volume_id, db);
    assert_eq!(content["status"]["restoreSize"], 8 * MIB);
    // A Quantity, spelled as upstream's controller spells it.
    assert_eq!(vs["status"]["restoreSize"], "8Mi", "{vs:#}");

    // A group snapshot of both claims: one consistency group, a member per volume.
    put(&server, GROUP);
    let errors = settle(&server, &ctx, 20).await;
    assert!(errors.is_empty(), "{errors:#?}");
    let vgs = server.get("volumegroupsnapshots", "app", "shop").unwrap();
    assert_eq!(vgs["status"]["readyToUse"], true, "{vgs:#}");
    let gc = server
        .get(
            "volumegroupsnapshotcontents",
            "",
            vgs["status"]["boundVolumeGroupSnapshotContentName"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let ghandle = gc["status"]["volumeGroupSnapshotHandle"].as_str().unwrap();
    let members: Vec<_> = listed_snapshots(&s)
        .await
        .into_iter()
        .filter(|x| x.group_snapshot_id == ghandle)
        .collect();
    let mut sources: Vec<_> = members.iter().map(|m| m.source_volume_id.clone()).collect();
    sources.sort();
    let mut want = vec![db.clone(), log.clone()];
    want.sort();
    assert_eq!(sources, want, "one member per volume");
    let infos = gc["status"]["volumeSnapshotInfoList"].as_array().unwrap();
    assert_eq!(infos.len(), 2);
    for i in infos {
        assert!(
            members
                .iter()
                .any(|m| i["snapshotHandle"].as_str() == Some(m.snapshot_id.as_str())),
            "{i} is not an agent snapshot"
        );
    }

    // Deleting both (policy Delete) removes the storage snapshots too.
    server.delete("volumesnapshots", "app", "nightly");
    server.delete("volumegroupsnapshots", "app", "shop");
    let errors = settle(&server, &ctx, 30).await;
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(server.list("volumesnapshotcontents").is_empty());
    assert!(server.list("volumegroupsnapshotcontents").is_empty());
    assert!(listed_snapshots(&s).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_calls_are_idempotent_and_errors_keep_their_codes() {
    let s = Standalone::start();
    let db = volume(&s, "pvc-db").await;
    let d = CsiDriver::new(&s.socket().display().to_string()).unwrap();
    let none = BTreeMap::new();

    let a = d
        .create_snapshot("snapshot-x", &db, &none, &none)
        .await
        .unwrap();
    assert!(
        a.ready_to_use && a.size_bytes == 8 * MIB && a.creation_time_ns > 0,
        "{a:?}"
    );
    let b = d
        .create_snapshot("snapshot-x", &db, &none, &none)
        .await
        .unwrap();
    assert_eq!(a, b, "a repeated create returns the same snapshot");
    assert_eq!(
        d.get_snapshot(&a.snapshot_id, &none).await.unwrap(),
        Some(a.clone())
    );

    // Another source under the same name: final (ALREADY_EXISTS), nothing created.
    let other = volume(&s, "pvc-other").await;
    let e = d
        .create_snapshot("snapshot-x", &other, &none, &none)
        .await
        .unwrap_err();
    assert_eq!(e.code, Some(tonic::Code::AlreadyExists), "{e}");
    assert!(e.is_final());
    // A bad class parameter: final, with the parameter named.
    let bad = BTreeMap::from([("copyRate".to_string(), "fast".to_string())]);
    let e = d
        .create_snapshot("snapshot-y", &db, &bad, &none)
        .await
        .unwrap_err();
    assert_eq!(e.code, Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.message.contains("copyRate"), "{e}");
    assert_eq!(listed_snapshots(&s).await.len(), 1);

    d.delete_snapshot(&a.snapshot_id, &none).await.unwrap();
    d.delete_snapshot(&a.snapshot_id, &none).await.unwrap();
    assert_eq!(d.get_snapshot(&a.snapshot_id, &none).await.unwrap(), None);

    let g = d
        .create_group_snapshot(
            "groupsnapshot-g",
            &[db.clone(), other.clone()],
            &none,
            &none,
        )
        .await
        .unwrap();
    assert!(g.ready_to_use && g.snapshots.len() == 2, "{g:?}");
    let ids: Vec<String> = g.snapshots.iter().map(|m| m.snapshot_id.clone()).collect();
    let got = d
        .get_group_snapshot(&g.group_snapshot_id, &ids, &none)
        .await
        .unwrap();
    assert_eq!(got.group_snapshot_id, g.group_snapshot_id);
    assert_eq!(got.snapshots.len(), 2);
    d.delete_group_snapshot(&g.group_snapshot_id, &ids, &none)
        .await
        .unwrap();
    d.delete_group_snapshot(&g.group_snapshot_id, &ids, &none)
        .await
        .unwrap();
    let e = d
        .get_group_snapshot(&g.group_snapshot_id, &ids, &none)
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(listed_snapshots(&s).await.is_empty());

    // The controller gone: non-final, so the reconciler keeps the operation pending.
    drop(s);
    let e = d
        .create_snapshot("snapshot-z", &db, &none, &none)
        .await
        .unwrap_err();
    assert!(!e.is_final(), "{e:?}");
}
