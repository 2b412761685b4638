//! The snapshot-controller process pieces: Lease leader election against the mocked API
//! server, and the /healthz + /metrics endpoint over real TCP.

mod k8s_common;

use flashcopy_csi::k8s::run::{Metrics, serve_http, try_lead};
use k8s_common::ApiServer;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    let (server, client) = ApiServer::start("");
    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    assert!(
        try_lead(&leases, "l", "a").await.unwrap(),
        "a takes the new lease"
    );
    assert!(!try_lead(&leases, "l", "b").await.unwrap(), "b must wait");
    assert!(try_lead(&leases, "l", "a").await.unwrap(), "a renews");
    // a stops renewing: its lease expires.
    let mut lease = server.get("leases", "kube-system", "l").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "a");
    lease["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
    server.insert(lease);
    assert!(try_lead(&leases, "l", "b").await.unwrap(), "b takes over");
    assert!(!try_lead(&leases, "l", "a").await.unwrap(), "a has lost it");
    let lease = server.get("leases", "kube-system", "l").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn healthz_and_metrics_over_http() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::default());
    tokio::spawn(serve_http(listener, metrics.clone()));
    let h = get(addr, "/healthz").await;
    assert!(
        h.starts_with("HTTP/1.1 200 OK") && h.ends_with("ok\n"),
        "{h}"
    );
    let m = get(addr, "/metrics").await;
    assert!(
        m.contains("# TYPE flashcopy_reconcile_total counter"),
        "{m}"
    );
    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
}
