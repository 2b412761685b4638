//! `kube-sync` against a real agent and the mocked API server: FlashCopyMapping and
//! FlashCopyConsistencyGroup objects follow the agent's listing (create, status, delete), other
//! nodes' objects stay untouched, API faults are retried, and the loop follows agent events and
//! survives an agent restart.

mod agent_common;
mod k8s_common;

use agent_common::Agent;
use flashcopy_csi::k8s::sync::{SyncConfig, SyncReport, connect_agent, run_loop, sync_once};
use k8s_common::{ApiServer, Fault};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const MAPS: &str = "flashcopymappings";
const GROUPS: &str = "flashcopyconsistencygroups";

/// Another node's mirror, which this node's sync must never touch.
const FOREIGN: &str = r#"
apiVersion: flashcopy.csi.io/v1alpha1
kind: FlashCopyMapping
metadata:
  name: n2-fcmap1
  labels: {flashcopy.csi.io/node: n2}
spec: {node: n2, id: 1}
status: {name: fcmap1, source: x, target: y, state: copying, progress: 40, copyRate: 0,
         cleanRate: 50, grainSize: 256, incremental: false, autodelete: false}
"#;

fn fc_json(a: &Agent, args: &[&str]) -> Value {
    let mut v = vec!["-o", "json"];
    v.extend_from_slice(args);
    serde_json::from_str(&a.fc_ok(&v)).unwrap()
}

/// Runs the blocking `fc` CLI off the async runtime.
async fn fc(a: &std::sync::Arc<Agent>, args: &[&str]) {
    let (a, args): (_, Vec<String>) = (a.clone(), args.iter().map(|s| s.to_string()).collect());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        a.fc_ok(&args);
    })
    .await
    .unwrap();
}

fn setup(a: &Agent) {
    for v in ["db", "snap", "log", "log-snap", "data", "data-snap"] {
        a.fc_ok(&["mkvol", v, "1M"]);
    }
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "db",
        "--target",
        "snap",
        "--copyrate",
        "0",
        "--name",
        "nightly",
    ]);
    a.fc_ok(&["mkfcconsistgrp", "--name", "pg"]);
    for (s, t) in [("log", "log-snap"), ("data", "data-snap")] {
        a.fc_ok(&[
            "mkfcmap",
            "--source",
            s,
            "--target",
            t,
            "--copyrate",
            "0",
            "--consistgrp",
            "pg",
        ]);
    }
}

/// An agent on a temporary directory with the volumes, mappings and group of `setup`.
async fn set_up_agent() -> (tempfile::TempDir, std::sync::Arc<Agent>) {
    let dir = tempfile::tempdir().unwrap();
    let a = std::sync::Arc::new(Agent::start(dir.path()));
    let setup_agent = a.clone();
    tokio::task::spawn_blocking(move || setup(&setup_agent))
        .await
        .unwrap();
    (dir, a)
}

/// Stops the agent (every other handle must be gone).
async fn stop(a: std::sync::Arc<Agent>) {
    std::sync::Arc::into_inner(a)
        .unwrap()
        .stop_async()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_follow_the_agent_and_leave_other_nodes_alone() {
    let (_dir, a) = set_up_agent().await;
    let (server, client) = ApiServer::start(FOREIGN);
    let mut agent = connect_agent(&a.uri()).await.unwrap();

    let r = sync_once(&client, &mut agent, "n1").await.unwrap();
    assert_eq!(
        r,
        SyncReport {
            created: 4,
            updated: 0,
            deleted: 0
        }
    );
    let maps = fc_json(&a, &["lsfcmap"]);
    let nightly = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "nightly")
        .unwrap();
    let id = nightly["id"].as_u64().unwrap();
    let o = server
        .get(MAPS, "", &format!("n1-fcmap{id}"))
        .expect("mirror of nightly");
    assert_eq!(o["spec"], json!({"node": "n1", "id": id}));
    assert_eq!(o["metadata"]["labels"]["flashcopy.csi.io/node"], "n1");
    k8s_common::subset(
        &json!({"name": "nightly", "source": "db", "target": "snap", "state": "idle_or_copied",
                "progress": 0, "copyRate": 0, "grainSize": nightly["grain_kib"],
                "incremental": false, "autodelete": false}),
        &o["status"],
        "status",
    )
    .unwrap();
    assert!(
        o["status"].get("group").is_none() && o["status"].get("startTime").is_none(),
        "{o}"
    );
    let groups = fc_json(&a, &["lsfcconsistgrp"]);
    let gid = groups[0]["id"].as_u64().unwrap();
    let g = server
        .get(GROUPS, "", &format!("n1-fcconsistgrp{gid}"))
        .expect("group mirror");
    assert_eq!(g["status"]["name"], "pg");
    assert_eq!(g["status"]["state"], "idle_or_copied");
    assert_eq!(g["status"]["mappings"].as_array().unwrap().len(), 2);
    let members: Vec<_> = server
        .list(MAPS)
        .into_iter()
        .filter(|m| m["status"]["group"] == "pg")
        .collect();
    assert_eq!(members.len(), 2, "members carry their group");

    // Nothing changed: a sync writes nothing.
    let writes = |s: &ApiServer| {
        s.state_log()
            .iter()
            .filter(|l| !l.starts_with("LIST") && !l.starts_with("GET"))
            .count()
    };
    let before = writes(&server);
    assert_eq!(
        sync_once(&client, &mut agent, "n1").await.unwrap(),
        SyncReport::default()
    );
    assert_eq!(writes(&server), before, "an idle sync must not write");

    // The group starts: states and start times follow.
    fc(&a, &["startfcconsistgrp", "--prep", "pg"]).await;
    let r = sync_once(&client, &mut agent, "n1").await.unwrap();
    assert_eq!(r.updated, 3, "{r:?}");
    let g = server
        .get(GROUPS, "", &format!("n1-fcconsistgrp{gid}"))
        .unwrap();
    assert_eq!(g["status"]["state"], "copying");
    let t = g["status"]["startTime"].as_str().expect("startTime");
    assert!(
        t.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
        "RFC 3339: {t}"
    );

    // A mapping leaves the agent: its mirror goes; the other node's stays as it was.
    fc(&a, &["rmfcmap", "--force", "nightly"]).await;
    let r = sync_once(&client, &mut agent, "n1").await.unwrap();
    assert_eq!(
        r,
        SyncReport {
            created: 0,
            updated: 0,
            deleted: 1
        }
    );
    assert!(server.get(MAPS, "", &format!("n1-fcmap{id}")).is_none());
    let foreign = server
        .get(MAPS, "", "n2-fcmap1")
        .expect("the other node's mirror");
    assert_eq!(foreign["status"]["progress"], 40);
    assert_eq!(server.list(MAPS).len(), 3);
    drop(agent);
    stop(a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_fault_fails_one_sync_and_the_next_converges() {
    let (_dir, a) = set_up_agent().await;
    let (server, client) = ApiServer::start("");
    let mut agent = connect_agent(&a.uri()).await.unwrap();
    let mut f = Fault::new("PATCH", MAPS, 500, 1);
    f.status = Some(true);
    server.fault(f);
    let e = sync_once(&client, &mut agent, "n1").await.unwrap_err();
    assert!(e.to_string().contains("kubernetes API"), "{e}");
    sync_once(&client, &mut agent, "n1").await.unwrap();
    let maps = server.list(MAPS);
    assert_eq!(maps.len(), 3);
    assert!(
        maps.iter()
            .all(|m| m["status"]["state"] == "idle_or_copied"),
        "{maps:?}"
    );
    drop(agent);
    stop(a).await;
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_follows_events_and_an_agent_restart() {
    let (_dir, a) = set_up_agent().await;
    let (server, client) = ApiServer::start("");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // An hour between periodic syncs: whatever happens within the test came from events.
    let cfg = SyncConfig {
        agent: a.uri(),
        node: "n1".into(),
        interval: 3600,
    };
    let lp = tokio::spawn(run_loop(client, cfg, async {
        let _ = stop_rx.await;
    }));
    eventually("the first sync", || server.list(MAPS).len() == 3).await;
    fc(&a, &["startfcmap", "--prep", "nightly"]).await;
    let state_of = |s: &ApiServer, name: &str| {
        s.list(MAPS)
            .into_iter()
            .find(|m| m["status"]["name"] == name)
            .map(|m| m["status"]["state"].clone())
    };
    eventually("nightly copying", || {
        state_of(&server, "nightly") == Some(json!("copying"))
    })
    .await;

    // The agent restarts: the loop reconnects and syncs what changed meanwhile.
    let dir_path = a.dir.clone();
    stop(a).await;
    let a = std::sync::Arc::new(
        tokio::task::spawn_blocking(move || Agent::start(&dir_path))
            .await
            .unwrap(),
    );
    fc(&a, &["stopfcmap", "--force", "nightly"]).await;
    fc(&a, &["rmfcmap", "--force", "nightly"]).await;
    eventually("nightly's mirror gone", || {
        state_of(&server, "nightly").is_none()
    })
    .await;
    // A new mapping changes no state, so only its creation event can bring its mirror (it
    // takes the freed id of nightly). The syncs of the deletion's events end first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fc(
        &a,
        &[
            "mkfcmap",
            "--source",
            "db",
            "--target",
            "snap",
            "--copyrate",
            "0",
            "--name",
            "weekly",
        ],
    )
    .await;
    eventually("weekly's mirror", || {
        state_of(&server, "weekly") == Some(json!("idle_or_copied"))
    })
    .await;
    fc(&a, &["startfcconsistgrp", "--prep", "pg"]).await;
    eventually("the group copying", || {
        server
            .list(GROUPS)
            .first()
            .is_some_and(|g| g["status"]["state"] == "copying")
    })
    .await;
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), lp)
        .await
        .expect("the loop stops")
        .unwrap();
    stop(a).await;
}
