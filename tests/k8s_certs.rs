//! `certs ensure` / `certs rotate` against the mocked API server (tests/k8s_common): the
//! Secrets and the SnapshotMetadataService are created when absent and left as they are when
//! present (an upgrade keeps the certificates); the certificates it issues are accepted by the
//! real agent binary and the real `fc` client over mutual TLS, a foreign client certificate is
//! refused; every stage of a CA rotation keeps the calls working.

mod agent_common;
mod k8s_common;

use agent_common::free_local_addr;
use flashcopy_csi::k8s::certs::{self, Config, Pem, Stage};
use k8s_common::ApiServer;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flashcopy-csi");
const NS: &str = "flashcopy-csi";

fn config() -> Config {
    Config {
        namespace: NS.into(),
        ca_secret: "fc-ca".into(),
        agent_secret: Some("fc-agent-tls".into()),
        controller_secret: Some("fc-controller-tls".into()),
        snapshot_metadata_secret: Some("fc-snapshot-metadata-tls".into()),
        snapshot_metadata_service: Some("fc-snapshot-metadata".into()),
        snapshot_metadata_port: 6443,
        snapshot_metadata_audience: Some("flashcopy.csi.io".into()),
        driver: "flashcopy.csi.io".into(),
        ca_days: 3650,
        leaf_days: 730,
        renew_days: 30,
        wait_for: vec![],
        wait_secs: 1,
    }
}

/// A Secret's data key as text (the mock stores what the client sent: base64).
fn secret_text(server: &ApiServer, name: &str, key: &str) -> String {
    let s = server
        .get("secrets", NS, name)
        .unwrap_or_else(|| panic!("no secret {name}"));
    let b64 = s["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no {key}"));
    let bytes: k8s_openapi::ByteString = serde_json::from_value(Value::String(b64.into())).unwrap();
    String::from_utf8(bytes.0).unwrap()
}

fn writes(server: &ApiServer) -> Vec<String> {
    server
        .state_log()
        .into_iter()
        .filter(|l| l.starts_with("POST") || l.starts_with("PATCH") || l.starts_with("PUT"))
        .collect()
}

/// The certificates of a PEM bundle.
fn bundle_len(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

#[tokio::test]
async fn ensure_creates_what_is_missing_and_keeps_what_exists() {
    let (server, client) = ApiServer::start("");
    let cfg = config();
    let r = certs::ensure(client.clone(), &cfg).await.unwrap();
    assert_eq!(
        r.created,
        [
            "fc-ca",
            "fc-agent-tls",
            "fc-controller-tls",
            "fc-snapshot-metadata-tls",
            "snapshotmetadataservice/flashcopy.csi.io"
        ]
    );
    // Leaves are kubernetes.io/tls with the three stable file names; the CA is Opaque.
    for name in [
        "fc-agent-tls",
        "fc-controller-tls",
        "fc-snapshot-metadata-tls",
    ] {
        let s = server.get("secrets", NS, name).unwrap();
        assert_eq!(s["type"], "kubernetes.io/tls", "{name}");
        assert!(secret_text(&server, name, "tls.key").contains("PRIVATE KEY"));
        assert_eq!(
            secret_text(&server, name, "ca.crt"),
            secret_text(&server, "fc-ca", "tls.crt"),
            "{name} trusts the CA"
        );
    }
    assert_eq!(
        server.get("secrets", NS, "fc-ca").unwrap()["type"],
        "Opaque"
    );
    // Each leaf's certificate is for what it serves.
    let text = |name: &str| {
        let pem = secret_text(&server, name, "tls.crt");
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
        let der: rustls_pki_types::CertificateDer = der;
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = c
            .subject_alternative_name()
            .unwrap()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .map(|g| g.to_string())
                    .collect()
            })
            .unwrap_or_default();
        let eku = c.extended_key_usage().unwrap().map(|e| e.value.clone());
        (sans, eku.map(|e| (e.server_auth, e.client_auth)))
    };
    assert_eq!(
        text("fc-agent-tls"),
        (
            vec!["DNSName(flashcopy-agent)".to_string()],
            Some((true, false))
        )
    );
    assert_eq!(text("fc-controller-tls").1, Some((false, true)));
    let (sans, eku) = text("fc-snapshot-metadata-tls");
    assert!(
        sans.contains(&"DNSName(fc-snapshot-metadata.flashcopy-csi.svc)".to_string()),
        "{sans:?}"
    );
    assert_eq!(eku, Some((true, false)));
    // The SnapshotMetadataService: the Service's address, the audience, the CA as caCert.
    let sms = server
        .get("snapshotmetadataservices", "", "flashcopy.csi.io")
        .unwrap();
    assert_eq!(
        sms["spec"]["address"],
        "fc-snapshot-metadata.flashcopy-csi.svc:6443"
    );
    assert_eq!(sms["spec"]["audience"], "flashcopy.csi.io");
    let ca: k8s_openapi::ByteString =
        serde_json::from_value(sms["spec"]["caCert"].clone()).unwrap();
    assert_eq!(
        String::from_utf8(ca.0).unwrap(),
        secret_text(&server, "fc-ca", "tls.crt")
    );

    // A second run (an upgrade, a restart, another replica): nothing written, nothing changed.
    let before: Vec<Value> = server.list("secrets");
    let n = writes(&server).len();
    let r = certs::ensure(client.clone(), &cfg).await.unwrap();
    assert_eq!(r, certs::Report::default());
    assert_eq!(writes(&server).len(), n, "{:?}", writes(&server));
    assert_eq!(server.list("secrets"), before);
}

#[tokio::test]
async fn existing_secrets_are_never_replaced_and_an_expiring_leaf_is_renewed() {
    // Secrets made elsewhere (a user's own CA): ensure leaves them as they are.
    let ca = certs::new_ca(10).unwrap();
    let agent = certs::issue(&ca, &certs::Leaf::AgentServer, 365).unwrap();
    let soon = certs::issue(&ca, &certs::Leaf::ControllerClient, 5).unwrap();
    let secret = |name: &str, pem: &Pem| {
        let b64 = |s: &str| serde_json::to_value(k8s_openapi::ByteString(s.into())).unwrap();
        format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {NS}}}\n\
             type: kubernetes.io/tls\ndata: {{tls.crt: {}, tls.key: {}, ca.crt: {}}}\n",
            b64(&pem.cert),
            b64(&pem.key),
            b64(&ca.cert)
        )
    };
    let fixture = [
        secret("fc-ca", &ca),
        secret("fc-agent-tls", &agent),
        secret("fc-controller-tls", &soon),
    ]
    .concat();
    let (server, client) = ApiServer::start(&fixture);
    let mut cfg = config();
    cfg.snapshot_metadata_secret = None;
    let r = certs::ensure(client, &cfg).await.unwrap();
    assert!(r.created.is_empty(), "{r:?}");
    assert_eq!(
        r.reissued,
        ["fc-controller-tls"],
        "5 days left, renewed at 30"
    );
    assert_eq!(secret_text(&server, "fc-ca", "tls.key"), ca.key);
    assert_eq!(secret_text(&server, "fc-agent-tls", "tls.key"), agent.key);
    assert_ne!(
        secret_text(&server, "fc-controller-tls", "tls.key"),
        soon.key
    );
    let left = certs::not_after(&secret_text(&server, "fc-controller-tls", "tls.crt")).unwrap()
        - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(left > 700 * 86_400, "renewed for leaf_days: {left} s");
    // No SnapshotMetadataService without the sidecar.
    assert!(server.list("snapshotmetadataservices").is_empty());
}

/// A daemon whose stderr goes to a file, killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a Secret's three files into `dir` as the kubelet would mount them.
fn mount(server: &ApiServer, name: &str, dir: &Path) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::write(d.join(f), secret_text(server, name, f)).unwrap();
    }
    d
}

fn agent(server: &ApiServer, dir: &Path) -> (Proc, SocketAddr) {
    let tls = mount(server, "fc-agent-tls", &dir.join("mnt"));
    let addr = free_local_addr();
    let data = dir.join("agent");
    let log = dir.join("agent.log");
    let child = Command::new(BIN)
        .args(["agent", "--data-dir"])
        .arg(&data)
        .args(["--listen", &addr.to_string(), "--tls-cert"])
        .arg(tls.join("tls.crt"))
        .arg("--tls-key")
        .arg(tls.join("tls.key"))
        .arg("--tls-client-ca")
        .arg(tls.join("ca.crt"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut p = Proc { child, log };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(s) = p.child.try_wait().unwrap() {
            panic!(
                "agent exited ({s}):\n{}",
                std::fs::read_to_string(&p.log).unwrap()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "agent did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, addr)
}

/// `fc lsvol` against the agent with the controller's mounted Secret; Ok(stdout) or Err(stderr).
fn fc(addr: SocketAddr, tls: &Path, args: &[&str]) -> Result<String, String> {
    let o = Command::new(BIN)
        .args([
            "fc",
            "--agent",
            &format!("https://{addr}"),
            "--agent-tls-ca",
        ])
        .arg(tls.join("ca.crt"))
        .arg("--agent-tls-cert")
        .arg(tls.join("tls.crt"))
        .arg("--agent-tls-key")
        .arg(tls.join("tls.key"))
        .args(args)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_certificates_work_with_the_real_agent_and_fc_and_through_a_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, client) = ApiServer::start("");
    let cfg = config();
    certs::ensure(client.clone(), &cfg).await.unwrap();
    let (agent1, addr) = agent(&server, tmp.path());
    let ctl = mount(&server, "fc-controller-tls", &tmp.path().join("mnt"));
    fc(addr, &ctl, &["mkvol", "db", "1M"]).unwrap();
    assert!(fc(addr, &ctl, &["lsvol"]).unwrap().contains("db"));

    // A client certificate of another CA is refused at the handshake.
    let other = certs::new_ca(1).unwrap();
    let stranger = certs::issue(&other, &certs::Leaf::ControllerClient, 1).unwrap();
    let sdir = tmp.path().join("stranger");
    std::fs::create_dir_all(&sdir).unwrap();
    std::fs::write(sdir.join("tls.crt"), &stranger.cert).unwrap();
    std::fs::write(sdir.join("tls.key"), &stranger.key).unwrap();
    std::fs::copy(ctl.join("ca.crt"), sdir.join("ca.crt")).unwrap();
    assert!(
        fc(addr, &sdir, &["lsvol"]).is_err(),
        "a stranger got through"
    );
    // The agent's certificate is not a client certificate (serverAuth only): refused too.
    let adir = tmp.path().join("mnt/fc-agent-tls");
    assert!(
        fc(addr, &adir, &["lsvol"]).is_err(),
        "the server cert got in as a client"
    );
    drop(agent1);

    // Rotation, stage by stage; after each, agents (restarted here, to read the files the
    // kubelet would have updated) and clients of the previous and the current stage talk.
    let first_ctl = ctl.clone();
    let old_ca = secret_text(&server, "fc-ca", "tls.crt");
    let r = certs::rotate(client.clone(), &cfg, Stage::AddCa)
        .await
        .unwrap();
    assert_eq!(r.bundle_updated.len(), 4, "{r:?}");
    assert_eq!(
        bundle_len(&secret_text(&server, "fc-agent-tls", "ca.crt")),
        2
    );
    assert_ne!(secret_text(&server, "fc-ca", "tls.crt"), old_ca);
    let sms = server
        .get("snapshotmetadataservices", "", "flashcopy.csi.io")
        .unwrap();
    let ca: k8s_openapi::ByteString =
        serde_json::from_value(sms["spec"]["caCert"].clone()).unwrap();
    assert_eq!(bundle_len(&String::from_utf8(ca.0).unwrap()), 2);
    let (a, addr) = agent(&server, &tmp.path().join("s1"));
    // The controller's old certificate with the new bundle (what the kubelet mounts now), and
    // a controller that has not seen the bundle yet.
    let old_ctl = mount(&server, "fc-controller-tls", &tmp.path().join("s1/mnt"));
    fc(addr, &old_ctl, &["lsvol"]).unwrap();
    fc(addr, &first_ctl, &["lsvol"]).unwrap();
    drop(a);

    let r = certs::rotate(client.clone(), &cfg, Stage::Reissue)
        .await
        .unwrap();
    assert_eq!(r.reissued.len(), 3, "{r:?}");
    let (a, addr) = agent(&server, &tmp.path().join("s2"));
    let ctl = mount(&server, "fc-controller-tls", &tmp.path().join("s2/mnt"));
    fc(addr, &ctl, &["lsvol"]).unwrap();
    fc(addr, &old_ctl, &["lsvol"]).expect("an old-CA client during the overlap");
    drop(a);

    let r = certs::rotate(client.clone(), &cfg, Stage::DropOldCa)
        .await
        .unwrap();
    assert_eq!(r.bundle_updated.len(), 4, "{r:?}");
    assert_eq!(
        secret_text(&server, "fc-agent-tls", "ca.crt"),
        secret_text(&server, "fc-ca", "tls.crt")
    );
    let (_a, addr) = agent(&server, &tmp.path().join("s3"));
    let ctl = mount(&server, "fc-controller-tls", &tmp.path().join("s3/mnt"));
    fc(addr, &ctl, &["lsvol"]).unwrap();
    assert!(
        fc(addr, &old_ctl, &["lsvol"]).is_err(),
        "a client of the dropped CA still gets in"
    );
}
