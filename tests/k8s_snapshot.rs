//! Table-driven reconcile tests of the snapshot controller against a mocked API server:
//! initial objects (upstream CRD shapes) -> steps (reconcile rounds, deletions, injected API
//! and CSI errors) -> expected objects, statuses, finalizers, events and CSI calls.
//! Each §D pain point of K8S-SNAPSHOTS.md that applies to us has a case named after it.

mod k8s_common;

use flashcopy_csi::k8s::group::{sync_group_content, sync_group_snapshot};
use flashcopy_csi::k8s::names::*;
use flashcopy_csi::k8s::snapshot::{WAIT_CONTENT_GONE, sync_content, sync_snapshot};
use k8s_common::*;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use std::time::Duration;
use tonic::Code;

const BASE: &str = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: fc
  annotations: {snapshot.storage.kubernetes.io/is-default-class: "true"}
driver: flashcopy.csi.io
deletionPolicy: Delete
parameters:
  copyRate: "0"
  csi.storage.k8s.io/snapshotter-secret-name: fc-secret
  csi.storage.k8s.io/snapshotter-secret-namespace: ${volumesnapshot.namespace}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: other}
driver: other.csi.example.com
deletionPolicy: Delete
---
apiVersion: v1
kind: Secret
metadata: {name: fc-secret, namespace: app}
data: {token: czNjcjN0}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: db, namespace: app, uid: pvc-uid-db, labels: {app: shop, tier: data}}
spec: {volumeName: pv-db, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
status: {phase: Bound}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: pv-db}
spec:
  capacity: {storage: 1Gi}
  volumeMode: Filesystem
  accessModes: [ReadWriteOnce]
  claimRef: {name: db, namespace: app, uid: pvc-uid-db}
  csi: {driver: flashcopy.csi.io, volumeHandle: node1/vol-db}
"#;

const SNAP1: &str = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap1, namespace: app, uid: vs-uid-1}
spec:
  source: {persistentVolumeClaimName: db}
"#;

const HANDLE1: &str = "node1/vol-db:snapshot-vs-uid-1";
const CTIME_RFC3339: &str = "2025-11-22T08:26:40Z";

/// One step of a case.
enum Step {
    /// Reconcile every snapshot object this many rounds (stops early when nothing changes).
    Rounds(usize),
    /// Delete an object through the API (finalizers hold it).
    Delete(&'static str, &'static str, String),
    /// Create or replace objects (YAML).
    Put(&'static str),
    /// Inject an API fault.
    ApiFault(Fault),
    /// Script the next driver answer: (call, code, storage did it anyway).
    CsiFault(&'static str, Code, bool),
    /// Expect an object (subset of fields; `null` = field absent) or its absence (`None`).
    Expect(&'static str, &'static str, String, Option<Value>),
    /// Expect exactly these CSI calls since the start.
    Calls(Vec<String>),
    /// Expect these event reasons among the published events.
    Events(Vec<&'static str>),
    /// Expect a reconcile error containing this text since the last check.
    ErrorLike(&'static str),
    /// Reconcile one object ("vs", "vsc", "vgs", "vgsc") once and expect this outcome.
    Sync(&'static str, &'static str, String, Action),
    /// One more round of every object must write nothing (no reconcile loop).
    Quiet,
}
use Step::*;

fn vsc1() -> String {
    content_name("vs-uid-1")
}

async fn run_case(name: &str, objects: &str, driver: FakeDriver, steps: Vec<Step>) {
    logs();
    let (server, client) = ApiServer::start(objects);
    let ctx = ctx(client, &driver);
    let mut errors: Vec<String> = Vec::new();
    for (i, step) in steps.into_iter().enumerate() {
        let at = format!("case {name}, step {i}");
        match step {
            Rounds(n) => {
                for _ in 0..n {
                    let before = (server.version(), server.state.lock().faults_hit);
                    round(&server, &ctx, &mut errors).await;
                    if (server.version(), server.state.lock().faults_hit) == before {
                        break;
                    }
                }
            }
            Delete(plural, ns, obj) => server.delete(plural, ns, &obj),
            Put(yaml) => {
                for doc in serde_yaml::Deserializer::from_str(yaml) {
                    let v: Value = serde::Deserialize::deserialize(doc).unwrap();
                    server.insert(v);
                }
            }
            ApiFault(f) => server.fault(f),
            CsiFault(call, code, done) => driver.push_fault(call, code, done),
            Expect(plural, ns, obj, want) => {
                let got = server.get(plural, ns, &obj);
                match (want, got) {
                    (None, None) => {}
                    (None, Some(g)) => panic!("{at}: {plural} {ns}/{obj} should be gone: {g:#}"),
                    (Some(_), None) => {
                        panic!("{at}: {plural} {ns}/{obj} missing; errors {errors:#?}")
                    }
                    (Some(w), Some(g)) => {
                        if let Err(e) = subset(&w, &g, "") {
                            panic!(
                                "{at}: {plural} {ns}/{obj}: {e}\nobject: {g:#}\nerrors: {errors:#?}"
                            );
                        }
                    }
                }
            }
            Calls(want) => assert_eq!(driver.calls(), want, "{at}"),
            Events(want) => {
                let got = server.event_reasons();
                for w in want {
                    assert!(got.iter().any(|g| g == w), "{at}: no {w} event in {got:?}");
                }
            }
            Sync(kind, ns, obj, want) => {
                let plural = match kind {
                    "vs" => "volumesnapshots",
                    "vsc" => "volumesnapshotcontents",
                    "vgs" => "volumegroupsnapshots",
                    _ => "volumegroupsnapshotcontents",
                };
                let v = server
                    .get(plural, ns, &obj)
                    .unwrap_or_else(|| panic!("{at}: {plural} {ns}/{obj} missing"));
                let got = match kind {
                    "vs" => sync_snapshot(&serde_json::from_value(v).unwrap(), &ctx).await,
                    "vsc" => sync_content(&serde_json::from_value(v).unwrap(), &ctx).await,
                    "vgs" => sync_group_snapshot(&serde_json::from_value(v).unwrap(), &ctx).await,
                    _ => sync_group_content(&serde_json::from_value(v).unwrap(), &ctx).await,
                };
                match got {
                    Ok(a) => assert_eq!(a, want, "{at}: {kind} {ns}/{obj}"),
                    Err(e) => panic!("{at}: {kind} {ns}/{obj}: {e}"),
                }
            }
            Quiet => {
                let before = server.version();
                round(&server, &ctx, &mut errors).await;
                assert_eq!(
                    server.version(),
                    before,
                    "{at}: a settled round wrote; errors {errors:#?}"
                );
            }
            ErrorLike(text) => {
                assert!(
                    errors.iter().any(|e| e.contains(text)),
                    "{at}: no error like {text:?} in {errors:#?}"
                );
                errors.clear();
            }
        }
    }
}

fn objects(extra: &[&str]) -> String {
    let mut s = BASE.to_string();
    for e in extra {
        s.push_str("\n---\n");
        s.push_str(e);
    }
    s
}

fn ready_snapshot_expectations() -> Vec<Step> {
    vec![
        Expect(
            "volumesnapshotcontents",
            "",
            vsc1(),
            Some(json!({
                "metadata": {
                    "finalizers": [FIN_CONTENT_BOUND],
                    "annotations": {
                        ANN_DELETION_SECRET_NAME: "fc-secret",
                        ANN_DELETION_SECRET_NAMESPACE: "app",
                        ANN_BEING_CREATED: null,
                    },
                },
                "spec": {
                    "driver": DRIVER,
                    "deletionPolicy": "Delete",
                    "source": {"volumeHandle": "node1/vol-db", "snapshotHandle": null},
                    "sourceVolumeMode": "Filesystem",
                    "volumeSnapshotClassName": "fc",
                    "volumeSnapshotRef": {"name": "snap1", "namespace": "app", "uid": "vs-uid-1",
                        "kind": "VolumeSnapshot", "apiVersion": "snapshot.storage.k8s.io/v1"},
                },
                "status": {"snapshotHandle": HANDLE1, "readyToUse": true,
                           "creationTime": CTIME, "restoreSize": SIZE, "error": null},
            })),
        ),
        Expect(
            "volumesnapshots",
            "app",
            "snap1".into(),
            Some(json!({
                "metadata": {"finalizers": [FIN_SNAPSHOT_AS_SOURCE, FIN_SNAPSHOT_BOUND]},
                "spec": {"volumeSnapshotClassName": "fc"},
                "status": {"boundVolumeSnapshotContentName": vsc1(), "readyToUse": true,
                           "restoreSize": "1Gi", "creationTime": CTIME_RFC3339, "error": null},
            })),
        ),
        // §D.1: once the snapshot is cut the claim is free to go.
        Expect(
            "persistentvolumeclaims",
            "app",
            "db".into(),
            Some(json!({"metadata": {"finalizers": null}})),
        ),
        Events(vec!["CreatingSnapshot", "SnapshotCreated", "SnapshotReady"]),
    ]
}

/// Every log line of every test in this binary, at trace level, kept in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// The capture, installed as the global subscriber by the first test to start (each test
/// calls this before it logs anything). A thread-local `set_default` is not enough here:
/// tracing caches a callsite's interest process-wide, and a callsite first hit by a
/// concurrent test without a subscriber could stay switched off for this one too (it did,
/// in CI, about one run in two).
fn logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(logs.clone())
                .finish(),
        )
        .expect("no other subscriber in this test binary");
        logs
    })
}

/// The secret class's Secret holds `s3cr3t` (base64 `czNjcjN0`): the controller reads it from
/// the API server and hands it to the driver, and no log line carries it, at any level
/// (checked over the logs of every test that has run so far in this binary).
#[tokio::test]
async fn dynamic_snapshot_default_class_secrets_and_status() {
    let driver = FakeDriver::default();
    let mut steps = vec![Rounds(10)];
    steps.extend(ready_snapshot_expectations());
    // Ready: the driver is called exactly once, never again.
    steps.push(Rounds(3));
    steps.push(Calls(vec![format!(
        "CreateSnapshot snapshot-vs-uid-1 node1/vol-db"
    )]));
    run_case("dynamic", &objects(&[SNAP1]), driver.clone(), steps).await;
    let st = driver.state.lock();
    assert_eq!(
        st.secrets_seen[0].get("token").map(String::as_str),
        Some("s3cr3t")
    );
    // The class's reserved keys never reach the driver; the extra-create-metadata ones do
    // (§A.7, as upstream's sidecar with --extra-create-metadata).
    let want: std::collections::BTreeMap<String, String> = [
        ("copyRate", "0"),
        (PARAM_SNAPSHOT_NAME, "snap1"),
        (PARAM_SNAPSHOT_NAMESPACE, "app"),
        (PARAM_CONTENT_NAME, "snapcontent-vs-uid-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(st.params_seen[0], want);
    let text = String::from_utf8(logs().0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("kube_client") && text.lines().count() > 20,
        "the capture holds too little to prove anything:\n{text}"
    );
    for line in text.lines() {
        assert!(
            !line.contains("s3cr3t") && !line.contains("czNjcjN0"),
            "a secret in the log: {line}"
        );
    }
}

#[tokio::test]
async fn delete_policy_delete_removes_storage_and_objects() {
    let driver = FakeDriver::default();
    run_case(
        "delete",
        &objects(&[SNAP1]),
        driver.clone(),
        vec![
            Rounds(10),
            Delete("volumesnapshots", "app", "snap1".into()),
            Rounds(10),
            Expect("volumesnapshots", "app", "snap1".into(), None),
            Expect("volumesnapshotcontents", "", vsc1(), None),
            Calls(vec![
                "CreateSnapshot snapshot-vs-uid-1 node1/vol-db".into(),
                format!("DeleteSnapshot {HANDLE1}"),
            ]),
        ],
    )
    .await;
    // DeleteSnapshot got the deletion secret recorded on the content.
    let st = driver.state.lock();
    assert_eq!(
        st.secrets_seen[1].get("token").map(String::as_str),
        Some("s3cr3t")
    );
    assert!(st.snapshots.is_empty());
}

#[tokio::test]
async fn delete_policy_retain_keeps_storage() {
    let retain = BASE.replacen("deletionPolicy: Delete", "deletionPolicy: Retain", 1);
    let objs = format!("{retain}\n---\n{SNAP1}");
    run_case(
        "retain",
        &objs,
        FakeDriver::default(),
        vec![
            Rounds(10),
            Expect(
                "volumesnapshots",
                "app",
                "snap1".into(),
                // No bound-protection for a Retain content.
                Some(json!({"metadata": {"finalizers": [FIN_SNAPSHOT_AS_SOURCE]}})),
            ),
            Delete("volumesnapshots", "app", "snap1".into()),
            Rounds(10),
            Expect("volumesnapshots", "app", "snap1".into(), None),
            Expect(
                "volumesnapshotcontents",
                "",
                vsc1(),
                Some(
                    json!({"metadata": {"annotations": {ANN_BEING_DELETED: "yes"}},
                            "status": {"snapshotHandle": HANDLE1}}),
                ),
            ),
            // §D.3: the retained content deletes at once when asked, keeping the storage.
            Delete("volumesnapshotcontents", "", "snapcontent-vs-uid-1".into()),
            Rounds(10),
            Expect("volumesnapshotcontents", "", vsc1(), None),
            Calls(vec!["CreateSnapshot snapshot-vs-uid-1 node1/vol-db".into()]),
        ],
    )
    .await;
}

const STATIC: &str = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata: {name: imported}
spec:
  deletionPolicy: Delete
  driver: flashcopy.csi.io
  source: {snapshotHandle: "node1/vol-db:old"}
  volumeSnapshotRef: {name: restored, namespace: app}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: restored, namespace: app, uid: vs-uid-static}
spec:
  source: {volumeSnapshotContentName: imported}
"#;

fn driver_with(id: &str) -> FakeDriver {
    let d = FakeDriver::default();
    d.state.lock().snapshots.insert(
        "old".into(),
        flashcopy_csi::k8s::driver::SnapshotInfo {
            snapshot_id: id.into(),
            source_volume_id: "node1/vol-db".into(),
            creation_time_ns: CTIME,
            size_bytes: SIZE,
            ready_to_use: true,
            group_snapshot_id: String::new(),
        },
    );
    d
}

#[tokio::test]
async fn pre_provisioned_content_binds_and_lists() {
    run_case(
        "static",
        &objects(&[STATIC]),
        driver_with("node1/vol-db:old"),
        vec![
            Rounds(10),
            Expect(
                "volumesnapshotcontents",
                "",
                "imported".into(),
                Some(json!({
                    "metadata": {"finalizers": [FIN_CONTENT_BOUND]},
                    "spec": {"volumeSnapshotRef": {"uid": "vs-uid-static"}},
                    "status": {"snapshotHandle": "node1/vol-db:old", "readyToUse": true, "restoreSize": SIZE},
                })),
            ),
            Expect(
                "volumesnapshots",
                "app",
                "restored".into(),
                Some(json!({"status": {"boundVolumeSnapshotContentName": "imported", "readyToUse": true}})),
            ),
            Calls(vec!["ListSnapshots node1/vol-db:old".into()]),
        ],
    )
    .await;
}

#[tokio::test]
async fn pre_provisioned_handle_unknown_to_driver_is_reported() {
    run_case(
        "static-missing",
        &objects(&[STATIC]),
        FakeDriver::default(),
        vec![
            Rounds(6),
            ErrorLike("does not exist on the driver"),
            // §D.7: the reason reaches the VolumeSnapshot.
            Expect(
                "volumesnapshots",
                "app",
                "restored".into(),
                Some(json!({"status": {"readyToUse": false, "error": {"message":
                    "snapshot node1/vol-db:old does not exist on the driver"}}})),
            ),
        ],
    )
    .await;
}

/// §D.3 (issue 678): a content whose snapshot is long gone deletes when asked.
#[tokio::test]
async fn pain3_standalone_content_without_snapshot_deletes() {
    let orphan = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata:
  name: orphan
  finalizers: [snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection]
spec:
  deletionPolicy: Delete
  driver: flashcopy.csi.io
  source: {snapshotHandle: "node1/vol-db:old"}
  volumeSnapshotRef: {name: gone, namespace: app, uid: uid-of-a-deleted-snapshot}
status: {snapshotHandle: "node1/vol-db:old", readyToUse: true}
"#;
    run_case(
        "orphan",
        &objects(&[orphan]),
        driver_with("node1/vol-db:old"),
        vec![
            Delete("volumesnapshotcontents", "", "orphan".into()),
            Rounds(5),
            Expect("volumesnapshotcontents", "", "orphan".into(), None),
            Calls(vec!["DeleteSnapshot node1/vol-db:old".into()]),
        ],
    )
    .await;
}

#[tokio::test]
async fn non_final_csi_error_keeps_being_created_then_converges() {
    let driver = FakeDriver::default();
    let mut steps = vec![
        // The storage cut the snapshot but the answer was lost (timeout).
        CsiFault("create", Code::DeadlineExceeded, true),
        Rounds(1),
        ErrorLike("DeadlineExceeded"),
        Expect(
            "volumesnapshotcontents",
            "",
            vsc1(),
            Some(
                json!({"metadata": {"annotations": {ANN_BEING_CREATED: "yes"}},
                        "status": {"readyToUse": false, "snapshotHandle": null}}),
            ),
        ),
        // The claim stays protected while the outcome is unknown.
        Expect(
            "persistentvolumeclaims",
            "app",
            "db".into(),
            Some(json!({"metadata": {"finalizers": [FIN_PVC_AS_SOURCE]}})),
        ),
        Rounds(10),
    ];
    steps.extend(ready_snapshot_expectations());
    steps.push(Calls(vec![
        "CreateSnapshot snapshot-vs-uid-1 node1/vol-db".into(),
        "CreateSnapshot snapshot-vs-uid-1 node1/vol-db".into(),
    ]));
    run_case("non-final", &objects(&[SNAP1]), driver.clone(), steps).await;
    assert_eq!(
        driver.state.lock().snapshots.len(),
        1,
        "one storage snapshot"
    );
}

/// §D.1 and §D.7: a final CSI error is shown on the snapshot and releases the claim.
#[tokio::test]
async fn pain1_final_csi_error_releases_pvc_and_is_surfaced() {
    run_case(
        "final",
        &objects(&[SNAP1]),
        FakeDriver::default(),
        vec![
            CsiFault("create", Code::InvalidArgument, false),
            CsiFault("create", Code::InvalidArgument, false),
            Rounds(2),
            ErrorLike("InvalidArgument"),
            Expect(
                "volumesnapshotcontents",
                "",
                vsc1(),
                Some(
                    json!({"metadata": {"annotations": {ANN_BEING_CREATED: null}},
                            "status": {"readyToUse": false, "error": {"message":
                    "CreateSnapshot snapshot-vs-uid-1: InvalidArgument: scripted failure"}}}),
                ),
            ),
            Expect(
                "volumesnapshots",
                "app",
                "snap1".into(),
                Some(json!({"status": {"readyToUse": false, "error": {"message":
                    "CreateSnapshot snapshot-vs-uid-1: InvalidArgument: scripted failure"}}})),
            ),
            Expect(
                "persistentvolumeclaims",
                "app",
                "db".into(),
                Some(json!({"metadata": {"finalizers": null}})),
            ),
            Events(vec!["SnapshotCreationFailed"]),
            // Deleting the failed snapshot leaves nothing behind and calls no DeleteSnapshot.
            Delete("volumesnapshots", "app", "snap1".into()),
            Delete("persistentvolumeclaims", "app", "db".into()),
            Rounds(10),
            Expect("volumesnapshots", "app", "snap1".into(), None),
            Expect("volumesnapshotcontents", "", vsc1(), None),
            Expect("persistentvolumeclaims", "app", "db".into(), None),
        ],
    )
    .await;
}

/// §D.5: a snapshot deleted while CreateSnapshot timed out neither leaks nor hangs.
#[tokio::test]
async fn pain5_delete_during_timed_out_create_settles_and_deletes() {
    let driver = FakeDriver::default();
    run_case(
        "timeout-delete",
        &objects(&[SNAP1]),
        driver.clone(),
        vec![
            CsiFault("create", Code::DeadlineExceeded, true),
            Rounds(1),
            Delete("volumesnapshots", "app", "snap1".into()),
            Rounds(10),
            Expect("volumesnapshots", "app", "snap1".into(), None),
            Expect("volumesnapshotcontents", "", vsc1(), None),
        ],
    )
    .await;
    let st = driver.state.lock();
    assert!(st.snapshots.is_empty(), "leaked {:?}", st.snapshots);
    assert_eq!(st.deleted, [HANDLE1]);
}

/// §D.4: throttled being-deleted PATCHes (429) do not leak storage.
#[tokio::test]
async fn pain4_throttled_being_deleted_patch_does_not_leak() {
    let driver = FakeDriver::default();
    let mut f = Fault::new("PATCH", "volumesnapshotcontents", 429, 3);
    f.status = Some(false);
    run_case(
        "throttled",
        &objects(&[SNAP1]),
        driver.clone(),
        vec![
            Rounds(10),
            ApiFault(f),
            Delete("volumesnapshots", "app", "snap1".into()),
            Rounds(12),
            ErrorLike("TooManyRequests"),
            Expect("volumesnapshots", "app", "snap1".into(), None),
            Expect("volumesnapshotcontents", "", vsc1(), None),
        ],
    )
    .await;
    assert_eq!(driver.state.lock().deleted, [HANDLE1]);
}

#[tokio::test]
async fn api_conflicts_and_server_errors_are_retried() {
    let mut conflict = Fault::new("PATCH", "volumesnapshots", 409, 2);
    conflict.status = Some(true);
    let mut steps = vec![
        ApiFault(Fault::new("POST", "volumesnapshotcontents", 500, 1)),
        ApiFault(conflict),
        ApiFault(Fault::new("GET", "persistentvolumeclaims", 503, 1)),
        Rounds(12),
        ErrorLike("injected fault"),
    ];
    steps.extend(ready_snapshot_expectations());
    steps.push(Calls(vec![
        "CreateSnapshot snapshot-vs-uid-1 node1/vol-db".into(),
    ]));
    run_case(
        "api-errors",
        &objects(&[SNAP1]),
        FakeDriver::default(),
        steps,
    )
    .await;
}

/// §D.6: deleting a snapshot a PVC is being restored from waits, then completes.
#[tokio::test]
async fn pain6_delete_waits_for_pending_restore() {
    let restore_pending = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: db-restore, namespace: app}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap1}
status: {phase: Pending}
"#;
    let restore_bound = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: db-restore, namespace: app}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap1}
status: {phase: Bound}
"#;
    run_case(
        "restore-pending",
        &objects(&[SNAP1]),
        FakeDriver::default(),
        vec![
            Rounds(10),
            Put(restore_pending),
            Delete("volumesnapshots", "app", "snap1".into()),
            Rounds(3),
            ErrorLike("being restored"),
            Events(vec!["SnapshotDeletePending"]),
            Expect(
                "volumesnapshotcontents",
                "",
                vsc1(),
                Some(json!({"metadata": {"deletionTimestamp": null}})),
            ),
            Put(restore_bound),
            Rounds(10),
            Expect("volumesnapshots", "app", "snap1".into(), None),
            Expect("volumesnapshotcontents", "", vsc1(), None),
        ],
    )
    .await;
}

/// §D.8: a snapshot of a claim being deleted fails with a plain message and creates nothing.
#[tokio::test]
async fn pain8_snapshot_of_deleting_pvc_is_refused_clearly() {
    let deleting = BASE.replacen(
        "metadata: {name: db, namespace: app, uid: pvc-uid-db, labels: {app: shop, tier: data}}",
        "metadata: {name: db, namespace: app, uid: pvc-uid-db, deletionTimestamp: \"2026-11-22T10:00:00Z\", finalizers: [kubernetes.io/pvc-protection]}",
        1,
    );
    run_case(
        "pvc-deleting",
        &format!("{deleting}\n---\n{SNAP1}"),
        FakeDriver::default(),
        vec![
            Rounds(4),
            ErrorLike("is being deleted"),
            Expect("volumesnapshotcontents", "", vsc1(), None),
            Expect(
                "volumesnapshots",
                "app",
                "snap1".into(),
                Some(json!({"status": {"readyToUse": false, "error": {"message":
                    "PersistentVolumeClaim app/db is being deleted; it cannot be snapshotted"}}})),
            ),
            Calls(vec![]),
        ],
    )
    .await;
}

#[tokio::test]
async fn class_problems_are_reported_and_hold_nothing() {
    // Two defaults for our driver.
    let two_defaults = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: fc2
  annotations: {snapshot.storage.kubernetes.io/is-default-class: "true"}
driver: flashcopy.csi.io
deletionPolicy: Delete
"#;
    run_case(
        "two-defaults",
        &objects(&[two_defaults, SNAP1]),
        FakeDriver::default(),
        vec![
            Rounds(3),
            ErrorLike("2 default VolumeSnapshotClasses"),
            Events(vec!["SetDefaultSnapshotClassFailed"]),
            Expect("volumesnapshotcontents", "", vsc1(), None),
            // §D.1: no claim finalizer for a snapshot that cannot start.
            Expect(
                "persistentvolumeclaims",
                "app",
                "db".into(),
                Some(json!({"metadata": {"finalizers": null}})),
            ),
        ],
    )
    .await;
    // An unknown reserved parameter.
    let bad = BASE.replacen("copyRate: \"0\"", "csi.storage.k8s.io/fstype: ext4", 1);
    run_case(
        "bad-param",
        &format!("{bad}\n---\n{SNAP1}"),
        FakeDriver::default(),
        vec![
            Rounds(3),
            ErrorLike("unknown reserved parameter \"csi.storage.k8s.io/fstype\""),
            Expect("volumesnapshotcontents", "", vsc1(), None),
            Calls(vec![]),
        ],
    )
    .await;
    // A claim that is not bound yet: retried, not protected.
    let unbound = BASE.replacen("status: {phase: Bound}", "status: {phase: Pending}", 1);
    run_case(
        "unbound",
        &format!("{unbound}\n---\n{SNAP1}"),
        FakeDriver::default(),
        vec![
            Rounds(3),
            ErrorLike("is not bound yet"),
            Expect(
                "persistentvolumeclaims",
                "app",
                "db".into(),
                Some(json!({"metadata": {"finalizers": null}})),
            ),
        ],
    )
    .await;
}

/// §D.9: two contents sharing one snapshot handle both delete.
#[tokio::test]
async fn pain9_two_contents_sharing_a_handle_both_delete() {
    let two = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata: {name: c1}
spec:
  deletionPolicy: Delete
  driver: flashcopy.csi.io
  source: {snapshotHandle: "node1/vol-db:old"}
  volumeSnapshotRef: {name: s1, namespace: app}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata: {name: c2}
spec:
  deletionPolicy: Delete
  driver: flashcopy.csi.io
  source: {snapshotHandle: "node1/vol-db:old"}
  volumeSnapshotRef: {name: s2, namespace: app}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: s1, namespace: app}
spec: {source: {volumeSnapshotContentName: c1}}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: s2, namespace: app}
spec: {source: {volumeSnapshotContentName: c2}}
"#;
    run_case(
        "shared-handle",
        &objects(&[two]),
        driver_with("node1/vol-db:old"),
        vec![
            Rounds(10),
            Delete("volumesnapshots", "app", "s1".into()),
            Delete("volumesnapshots", "app", "s2".into()),
            Rounds(10),
            Expect("volumesnapshots", "app", "s1".into(), None),
            Expect("volumesnapshots", "app", "s2".into(), None),
            Expect("volumesnapshotcontents", "", "c1".into(), None),
            Expect("volumesnapshotcontents", "", "c2".into(), None),
        ],
    )
    .await;
}

/// Contents of other drivers are left to their own sidecar.
#[tokio::test]
async fn other_drivers_contents_are_not_touched() {
    let other = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata: {name: theirs}
spec:
  deletionPolicy: Delete
  driver: other.csi.example.com
  source: {volumeHandle: "x"}
  volumeSnapshotRef: {name: s, namespace: app, uid: u}
"#;
    run_case(
        "other-driver",
        &objects(&[other]),
        FakeDriver::default(),
        vec![
            Rounds(3),
            Expect(
                "volumesnapshotcontents",
                "",
                "theirs".into(),
                Some(json!({"status": null})),
            ),
            Calls(vec![]),
        ],
    )
    .await;
}

const PVC_LOG: &str = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: log, namespace: app, uid: pvc-uid-log, labels: {app: shop, tier: log}}
spec: {volumeName: pv-log, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
status: {phase: Bound}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: pv-log}
spec:
  capacity: {storage: 1Gi}
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  claimRef: {name: log, namespace: app, uid: pvc-uid-log}
  csi: {driver: flashcopy.csi.io, volumeHandle: node1/vol-log}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: cache, namespace: app, uid: pvc-uid-cache, labels: {app: shop, tier: cache}}
spec: {volumeName: pv-cache, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
status: {phase: Pending}
---
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshotClass
metadata:
  name: fc-group
  annotations: {groupsnapshot.storage.kubernetes.io/is-default-class: "true"}
driver: flashcopy.csi.io
deletionPolicy: Delete
"#;

const VGS: &str = r#"
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: shop, namespace: app, uid: vgs-uid-1}
spec:
  source:
    selector:
      matchLabels: {app: shop}
      matchExpressions:
      - {key: tier, operator: In, values: [data, log]}
"#;

#[tokio::test]
async fn dynamic_group_snapshot_members_and_deletion() {
    let driver = FakeDriver::default();
    let gname = "groupsnapshot-vgs-uid-1";
    let vs_db = member_snapshot_name("vgs-uid-1", "node1/vol-db");
    let vsc_db = member_content_name("vgs-uid-1", "node1/vol-db");
    let vsc_log = member_content_name("vgs-uid-1", "node1/vol-log");
    run_case(
        "group",
        &objects(&[PVC_LOG, VGS]),
        driver.clone(),
        vec![
            Rounds(12),
            Expect(
                "volumegroupsnapshotcontents",
                "",
                group_content_name("vgs-uid-1"),
                Some(json!({
                    "metadata": {"finalizers": [FIN_GROUP_CONTENT_BOUND]},
                    // §D.13: matchExpressions honoured (cache excluded by tier).
                    "spec": {"source": {"volumeHandles": ["node1/vol-db", "node1/vol-log"]},
                             "volumeGroupSnapshotClassName": "fc-group", "driver": DRIVER,
                             "volumeGroupSnapshotRef": {"uid": "vgs-uid-1"}},
                    "status": {"volumeGroupSnapshotHandle": format!("group:{gname}"), "readyToUse": true,
                               "creationTime": CTIME_RFC3339,
                               "volumeSnapshotInfoList": [
                                   {"volumeHandle": "node1/vol-db", "snapshotHandle": format!("node1/vol-db:{gname}"),
                                    "readyToUse": true, "restoreSize": SIZE, "creationTime": CTIME},
                                   {"volumeHandle": "node1/vol-log", "snapshotHandle": format!("node1/vol-log:{gname}"),
                                    "readyToUse": true, "restoreSize": SIZE, "creationTime": CTIME}]},
                })),
            ),
            Expect(
                "volumegroupsnapshots",
                "app",
                "shop".into(),
                Some(json!({"metadata": {"finalizers": [FIN_GROUP_BOUND]},
                            "spec": {"volumeGroupSnapshotClassName": "fc-group"},
                            "status": {"readyToUse": true, "creationTime": CTIME_RFC3339,
                                       "boundVolumeGroupSnapshotContentName": group_content_name("vgs-uid-1")}})),
            ),
            Expect(
                "volumesnapshots",
                "app",
                vs_db.clone(),
                Some(json!({
                    "metadata": {"finalizers": [FIN_SNAPSHOT_IN_GROUP, FIN_SNAPSHOT_AS_SOURCE, FIN_SNAPSHOT_BOUND],
                                 "ownerReferences": [{"kind": "VolumeGroupSnapshot", "name": "shop", "uid": "vgs-uid-1"}]},
                    // The restore mapping: member -> claim.
                    "spec": {"source": {"persistentVolumeClaimName": "db"}},
                    "status": {"boundVolumeSnapshotContentName": vsc_db, "readyToUse": true,
                               "volumeGroupSnapshotName": "shop", "restoreSize": "1Gi"},
                })),
            ),
            Expect(
                "volumesnapshotcontents",
                "",
                vsc_log.clone(),
                Some(json!({
                    "metadata": {"annotations": {ANN_MEMBER_GROUP_HANDLE: format!("group:{gname}")},
                                 "finalizers": [FIN_CONTENT_BOUND]},
                    "spec": {"source": {"volumeHandle": "node1/vol-log"}, "sourceVolumeMode": "Block",
                             "volumeSnapshotClassName": null},
                    "status": {"snapshotHandle": format!("node1/vol-log:{gname}"),
                               "volumeGroupSnapshotHandle": format!("group:{gname}"), "readyToUse": true},
                })),
            ),
            Events(vec!["CreatingGroupSnapshot", "GroupSnapshotCreated", "GroupSnapshotReady"]),
            // A member cannot be deleted on its own while the group exists.
            Delete("volumesnapshots", "app", vs_db.clone()),
            Rounds(3),
            ErrorLike("delete the group snapshot instead"),
            Expect("volumesnapshots", "app", vs_db.clone(), Some(json!({"metadata": {"finalizers": [FIN_SNAPSHOT_IN_GROUP, FIN_SNAPSHOT_AS_SOURCE, FIN_SNAPSHOT_BOUND]}}))),
            Delete("volumegroupsnapshots", "app", "shop".into()),
            Rounds(15),
            Expect("volumegroupsnapshots", "app", "shop".into(), None),
            Expect("volumegroupsnapshotcontents", "", group_content_name("vgs-uid-1"), None),
            Expect("volumesnapshots", "app", vs_db, None),
            Expect("volumesnapshotcontents", "", vsc_db, None),
            Expect("volumesnapshotcontents", "", vsc_log, None),
            // §D.12: one group create, one group delete, never a per-member Create/DeleteSnapshot.
            Calls(vec![
                format!("CreateVolumeGroupSnapshot {gname} node1/vol-db,node1/vol-log"),
                format!("DeleteVolumeGroupSnapshot group:{gname} node1/vol-db:{gname},node1/vol-log:{gname}"),
            ]),
        ],
    )
    .await;
    let st = driver.state.lock();
    assert!(st.groups.is_empty());
    // Extra create metadata of the group (§A.7); the class has no parameters of its own.
    let want: std::collections::BTreeMap<String, String> = [
        (PARAM_GROUP_SNAPSHOT_NAME, "shop"),
        (PARAM_GROUP_SNAPSHOT_NAMESPACE, "app"),
        (PARAM_GROUP_CONTENT_NAME, "groupsnapcontent-vgs-uid-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(st.params_seen, [want]);
}

/// §D.14, §A.1: the group kinds are spoken as `groupsnapshot.storage.k8s.io/v1` (GA), the
/// single kinds as `snapshot.storage.k8s.io/v1`; objects we create carry those apiVersions.
#[tokio::test]
async fn pain14_api_versions_are_the_ga_ones() {
    logs();
    let (server, client) = ApiServer::start(&objects(&[PVC_LOG, VGS, SNAP1]));
    let driver = FakeDriver::default();
    let ctx = ctx(client, &driver);
    let mut errors = Vec::new();
    for _ in 0..12 {
        round(&server, &ctx, &mut errors).await;
    }
    let log = server.state_log();
    let mut seen = 0;
    for line in &log {
        let path = line.split(' ').nth(1).unwrap_or_default();
        if path.contains("/groupsnapshot.storage.k8s.io/") {
            assert!(
                path.starts_with("/apis/groupsnapshot.storage.k8s.io/v1/"),
                "{line}"
            );
            seen += 1;
        }
        if path.contains("/snapshot.storage.k8s.io/") {
            assert!(
                path.starts_with("/apis/snapshot.storage.k8s.io/v1/"),
                "{line}"
            );
        }
    }
    assert!(seen > 0, "no group snapshot request in {log:#?}");
    let vgsc = server
        .get(
            "volumegroupsnapshotcontents",
            "",
            &group_content_name("vgs-uid-1"),
        )
        .unwrap();
    assert_eq!(vgsc["apiVersion"], "groupsnapshot.storage.k8s.io/v1");
    assert_eq!(
        vgsc["spec"]["volumeGroupSnapshotRef"]["apiVersion"],
        "groupsnapshot.storage.k8s.io/v1"
    );
    let member = server
        .get(
            "volumesnapshots",
            "app",
            &member_snapshot_name("vgs-uid-1", "node1/vol-db"),
        )
        .unwrap();
    assert_eq!(member["apiVersion"], "snapshot.storage.k8s.io/v1");
    assert_eq!(
        member["metadata"]["ownerReferences"][0]["apiVersion"],
        "groupsnapshot.storage.k8s.io/v1"
    );
}

/// §D.2 (issues 1258, 611, 880): the snapshot must not wait for a 15-minute resync when the
/// event of its content going away is missed. Reconciles are driven one at a time, in the
/// racy order, and the requeue each one asks for is checked.
#[tokio::test]
async fn pain2_bound_protection_does_not_wait_for_a_resync() {
    let driver = FakeDriver::default();
    run_case(
        "pain2",
        &objects(&[SNAP1]),
        driver.clone(),
        vec![
            Rounds(10),
            Delete("volumesnapshots", "app", "snap1".into()),
            // The sidecar looks first: the content is not being deleted yet.
            Sync("vsc", "", vsc1(), Action::requeue(RESYNC)),
            // The controller marks and deletes the content; the storage is still there, so the
            // snapshot keeps its bound-protection and asks to be looked at again soon.
            Sync(
                "vs",
                "app",
                "snap1".into(),
                Action::requeue(WAIT_CONTENT_GONE),
            ),
            Expect(
                "volumesnapshots",
                "app",
                "snap1".into(),
                Some(json!({"metadata": {"finalizers": [FIN_SNAPSHOT_BOUND]}})),
            ),
            Expect(
                "volumesnapshotcontents",
                "",
                vsc1(),
                Some(
                    json!({"metadata": {"annotations": {ANN_BEING_DELETED: "yes"},
                                         "deletionTimestamp": "2026-11-22T12:00:00Z"}}),
                ),
            ),
            // The sidecar deletes the storage and the content; no event reaches the snapshot.
            Sync("vsc", "", vsc1(), Action::await_change()),
            Expect("volumesnapshotcontents", "", vsc1(), None),
            // The short requeue fires: the snapshot goes.
            Sync("vs", "app", "snap1".into(), Action::await_change()),
            Expect("volumesnapshots", "app", "snap1".into(), None),
            Calls(vec![
                "CreateSnapshot snapshot-vs-uid-1 node1/vol-db".into(),
                format!("DeleteSnapshot {HANDLE1}"),
            ]),
        ],
    )
    .await;
    assert!(WAIT_CONTENT_GONE <= Duration::from_secs(10));
}

/// §A.10 resync: every settled object is looked at again after 15 minutes (upstream's
/// `--resync-period`), so nothing depends on a watch event alone.
#[tokio::test]
async fn settled_objects_resync_every_15_minutes() {
    let vsc_db = member_content_name("vgs-uid-1", "node1/vol-db");
    run_case(
        "resync",
        &objects(&[PVC_LOG, VGS, SNAP1]),
        FakeDriver::default(),
        vec![
            Rounds(12),
            Quiet,
            Sync("vs", "app", "snap1".into(), Action::requeue(RESYNC)),
            Sync("vsc", "", vsc1(), Action::requeue(RESYNC)),
            Sync("vgs", "app", "shop".into(), Action::requeue(RESYNC)),
            Sync(
                "vgsc",
                "",
                group_content_name("vgs-uid-1"),
                Action::requeue(RESYNC),
            ),
            Sync("vsc", "", vsc_db, Action::requeue(RESYNC)),
        ],
    )
    .await;
    assert_eq!(RESYNC, Duration::from_secs(900));
}

/// §A.3.7, §A.5: a snapshot the driver reports not ready is re-created by name until ready;
/// handle, time and size are recorded at the first answer, readiness only when true.
#[tokio::test]
async fn not_ready_snapshot_is_polled_with_create_until_ready() {
    let driver = FakeDriver::default();
    driver.state.lock().not_ready_calls = 2;
    let mut steps = vec![
        Rounds(1),
        ErrorLike("not ready yet"),
        Expect(
            "volumesnapshotcontents",
            "",
            vsc1(),
            Some(
                json!({"status": {"snapshotHandle": HANDLE1, "readyToUse": false,
                                   "creationTime": CTIME, "restoreSize": SIZE}}),
            ),
        ),
        Rounds(1),
        Expect(
            "volumesnapshots",
            "app",
            "snap1".into(),
            Some(json!({"status": {"readyToUse": false, "creationTime": CTIME_RFC3339}})),
        ),
        // §D.1: a snapshot not yet ready still holds its claim.
        Expect(
            "persistentvolumeclaims",
            "app",
            "db".into(),
            Some(json!({"metadata": {"finalizers": [FIN_PVC_AS_SOURCE]}})),
        ),
        Rounds(10),
    ];
    steps.extend(ready_snapshot_expectations());
    steps.push(Quiet);
    steps.push(Calls(vec![
        "CreateSnapshot snapshot-vs-uid-1 node1/vol-db"
            .into();
        3
    ]));
    run_case("not-ready", &objects(&[SNAP1]), driver, steps).await;
}

/// §A.10: the retry backoff (its curve is unit-tested in `names`) is counted per object, and a
/// success resets it.
#[tokio::test]
async fn retry_backoff_is_per_object_and_reset_by_success() {
    logs();
    let (_server, client) = ApiServer::start("");
    let ctx = ctx(client, &FakeDriver::default());
    let secs: Vec<u64> = (0..3)
        .map(|_| ctx.outcome("app/a", false).as_secs())
        .collect();
    assert_eq!(secs, [1, 2, 4]);
    assert_eq!(ctx.outcome("app/b", false).as_secs(), 1, "per object");
    ctx.outcome("app/a", true);
    assert_eq!(
        ctx.outcome("app/a", false).as_secs(),
        1,
        "reset by a success"
    );
}

/// §D.12 (PR 1216, issue 1035): a Retain group deletes its objects without a loop and without
/// any CSI delete; a Delete group survives a failed DeleteVolumeGroupSnapshot and converges.
#[tokio::test]
async fn pain12_group_retain_and_intermediate_delete_failure() {
    let retain = PVC_LOG.replacen("deletionPolicy: Delete", "deletionPolicy: Retain", 1);
    let gname = "groupsnapshot-vgs-uid-1";
    let vsc_db = member_content_name("vgs-uid-1", "node1/vol-db");
    run_case(
        "group-retain",
        &objects(&[&retain, VGS]),
        FakeDriver::default(),
        vec![
            Rounds(12),
            Expect(
                "volumegroupsnapshots",
                "app",
                "shop".into(),
                // No bound-protection for a Retain content.
                Some(json!({"metadata": {"finalizers": null}, "status": {"readyToUse": true}})),
            ),
            Delete("volumegroupsnapshots", "app", "shop".into()),
            Rounds(15),
            Quiet,
            Expect("volumegroupsnapshots", "app", "shop".into(), None),
            Expect(
                "volumesnapshots",
                "app",
                member_snapshot_name("vgs-uid-1", "node1/vol-db"),
                None,
            ),
            Expect(
                "volumegroupsnapshotcontents",
                "",
                group_content_name("vgs-uid-1"),
                // The group had no finalizer, so it left at once: its retained content stays
                // as it was, storage handle included.
                Some(json!({"metadata": {"deletionTimestamp": null},
                            "status": {"volumeGroupSnapshotHandle": format!("group:{gname}")}})),
            ),
            Expect(
                "volumesnapshotcontents",
                "",
                vsc_db,
                Some(json!({"spec": {"deletionPolicy": "Retain"},
                            "status": {"snapshotHandle": format!("node1/vol-db:{gname}")}})),
            ),
            Calls(vec![format!(
                "CreateVolumeGroupSnapshot {gname} node1/vol-db,node1/vol-log"
            )]),
        ],
    )
    .await;

    let driver = FakeDriver::default();
    run_case(
        "group-delete-fails-once",
        &objects(&[PVC_LOG, VGS]),
        driver.clone(),
        vec![
            Rounds(12),
            CsiFault("delete_group", Code::Internal, false),
            Delete("volumegroupsnapshots", "app", "shop".into()),
            Rounds(1),
            ErrorLike("Internal: scripted failure"),
            Events(vec!["GroupSnapshotDeleteError"]),
            // The group and its content wait for the storage, nothing is half-removed.
            Expect(
                "volumegroupsnapshots",
                "app",
                "shop".into(),
                Some(json!({"metadata": {"finalizers": [FIN_GROUP_BOUND]}})),
            ),
            Expect(
                "volumegroupsnapshotcontents",
                "",
                group_content_name("vgs-uid-1"),
                Some(
                    json!({"metadata": {"finalizers": [FIN_GROUP_CONTENT_BOUND]},
                            "status": {"volumeGroupSnapshotHandle": format!("group:{gname}")}}),
                ),
            ),
            Rounds(15),
            Quiet,
            Expect("volumegroupsnapshots", "app", "shop".into(), None),
            Expect(
                "volumegroupsnapshotcontents",
                "",
                group_content_name("vgs-uid-1"),
                None,
            ),
            Expect(
                "volumesnapshotcontents",
                "",
                member_content_name("vgs-uid-1", "node1/vol-log"),
                None,
            ),
        ],
    )
    .await;
    let st = driver.state.lock();
    assert!(st.groups.is_empty(), "leaked {:?}", st.groups);
    assert_eq!(st.deleted, [format!("group:{gname}")]);
}
