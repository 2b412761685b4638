//! Mutual TLS on the agent API's TCP listener, with the real `flashcopy-csi agent`, `fc` and
//! `csi controller` processes and certificates made here (rcgen): the right certificates work
//! (also from a CA bundle holding two CAs, the rotation step); no certificate, another CA's, an
//! expired one and plaintext are refused at the handshake and the agent's log says who and why,
//! without key material; a plaintext TCP listener needs the explicit flag. Prints the
//! CreateSnapshot round trip through the CSI controller with and without TLS (never asserted).

mod agent_common;

use agent_common::free_local_addr;
use flashcopy_csi::proto::agent::v1 as pb;
use flashcopy_csi::proto::agent::v1::agent_client::AgentClient;
use flashcopy_csi::proto::csi::v1 as csi;
use flashcopy_csi::tls::AGENT_SERVER_NAME;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const BIN: &str = env!("CARGO_BIN_EXE_flashcopy-csi");

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certificate and key (PEM) signed by `ca`; `expired` puts its validity in the past.
fn leaf(ca: &Ca, name: &str, expired: bool) -> (String, String) {
    let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Certificate files in a directory.
struct Pki {
    dir: PathBuf,
    ca1: Ca,
    ca2: Ca,
    other: Ca,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let pki = Self {
            dir: dir.join("pki"),
            ca1: ca("flashcopy CA 1"),
            ca2: ca("flashcopy CA 2"),
            other: ca("another CA"),
        };
        std::fs::create_dir_all(&pki.dir).unwrap();
        pki.write("ca1.pem", &pki.ca1.pem);
        pki.write("ca2.pem", &pki.ca2.pem);
        pki.write("bundle.pem", &format!("{}{}", pki.ca1.pem, pki.ca2.pem));
        for (name, ca, cn, expired) in [
            ("server1", &pki.ca1, AGENT_SERVER_NAME, false),
            ("server2", &pki.ca2, AGENT_SERVER_NAME, false),
            ("client1", &pki.ca1, "flashcopy-controller", false),
            ("client2", &pki.ca2, "flashcopy-controller", false),
            ("stranger", &pki.other, "flashcopy-controller", false),
            ("expired", &pki.ca1, "flashcopy-controller", true),
        ] {
            let (cert, key) = leaf(ca, cn, expired);
            pki.write(&format!("{name}.pem"), &cert);
            pki.write(&format!("{name}.key"), &key);
        }
        pki
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.join(name), text).unwrap();
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap()
    }

    /// Client settings trusting `ca` (a file), presenting `client` (None: no certificate).
    fn client(&self, ca: &str, client: Option<&str>) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read(ca)))
            .domain_name(AGENT_SERVER_NAME);
        if let Some(n) = client {
            c = c.identity(Identity::from_pem(
                self.read(&format!("{n}.pem")),
                self.read(&format!("{n}.key")),
            ));
        }
        c
    }

    /// The `--agent-tls-*` flags presenting `client`.
    fn client_flags(&self, client: &str) -> Vec<String> {
        vec![
            "--agent-tls-ca".into(),
            self.path("bundle.pem"),
            "--agent-tls-cert".into(),
            self.path(&format!("{client}.pem")),
            "--agent-tls-key".into(),
            self.path(&format!("{client}.key")),
        ]
    }
}

/// A `flashcopy-csi` daemon process whose log goes to a file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: &[String], log: PathBuf) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// Waits until a Unix socket answers.
    fn wait_for_socket(&mut self, sock: &Path) {
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("exited while starting ({s}):\n{}", self.log());
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Waits until the log has `n` lines containing `what` (the agent logs asynchronously).
    fn wait_log(&self, what: &str, n: usize) -> String {
        let t0 = Instant::now();
        loop {
            let log = self.log();
            if log.lines().filter(|l| l.contains(what)).count() >= n {
                return log;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "expected {n} lines with {what:?} in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an agent on `dir` whose TCP listener uses `tls` flags.
fn agent(dir: &Path, tls: &[String]) -> (Proc, SocketAddr) {
    let addr = free_local_addr();
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--listen".into(),
        addr.to_string(),
    ];
    args.extend(tls.iter().cloned());
    let mut p = Proc::spawn(&args, dir.with_extension("log"));
    p.wait_for_socket(&dir.join("agent.sock"));
    (p, addr)
}

fn server_flags(pki: &Pki, server: &str, client_ca: &str) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        pki.path(&format!("{server}.pem")),
        "--tls-key".into(),
        pki.path(&format!("{server}.key")),
        "--tls-client-ca".into(),
        pki.path(client_ca),
    ]
}

async fn connect(
    addr: SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<AgentClient<Channel>, String> {
    let ep = match tls {
        Some(t) => Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(t)
            .unwrap(),
        None => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
    };
    let ch = ep
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(AgentClient::new(ch))
}

/// A real call: ListVolumes, returning the names (or the failure).
async fn list(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<Vec<String>, String> {
    let mut c = connect(addr, tls).await?;
    let r = c
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .map_err(|s| format!("{s:?}"))?;
    Ok(r.into_inner().volumes.into_iter().map(|v| v.name).collect())
}

fn fc(addr: SocketAddr, flags: &[String], args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("fc")
        .arg("--agent")
        .arg(format!("https://{addr}"))
        .args(flags)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_certificates_work_and_every_other_client_is_refused_and_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    // The client CA bundle holds two CAs (the rotation step): clients of both are accepted.
    let (agent, addr) = agent(
        &tmp.path().join("agent"),
        &server_flags(&pki, "server1", "bundle.pem"),
    );

    // The agent client with the right certificate: a real call that changes state.
    let mut c = connect(addr, Some(pki.client("ca1.pem", Some("client1"))))
        .await
        .unwrap();
    c.create_volume(pb::CreateVolumeRequest {
        name: "db".into(),
        size_bytes: 1 << 20,
        origin: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        list(addr, Some(pki.client("ca1.pem", Some("client2")))).await,
        Ok(vec!["db".to_string()]),
        "a client of the second CA of the bundle"
    );

    // `fc` with the same flags as the controller.
    let o = fc(addr, &pki.client_flags("client1"), &["mkvol", "logs", "1M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fc(addr, &pki.client_flags("client2"), &["-o", "json", "lsvol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(names.as_array().unwrap().len(), 2, "{names}");
    // `fc` on an https:// agent without the flags says what is missing.
    let o = fc(addr, &[], &["lsvol"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--agent-tls-ca"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Each bad client is refused at the handshake, and the agent logs who and why.
    let cases: [(&str, Option<ClientTlsConfig>, &str); 4] = [
        (
            "no client certificate",
            Some(pki.client("ca1.pem", None)),
            "peer sent no certificates",
        ),
        (
            "a certificate of another CA",
            Some(pki.client("ca1.pem", Some("stranger"))),
            "UnknownIssuer",
        ),
        (
            "an expired certificate",
            Some(pki.client("ca1.pem", Some("expired"))),
            "certificate expired",
        ),
        ("plaintext", None, "corrupt message"),
    ];
    for (what, tls, reason) in cases {
        let refused = |log: &str| {
            log.lines()
                .filter(|l| l.contains("refused a client"))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let before = refused(&agent.log()).len();
        let r = list(addr, tls).await;
        assert!(r.is_err(), "{what}: the call went through: {r:?}");
        // A refusal of this client, logged after the call: by reason (a slow log line of the
        // previous case may come first), with the peer's address.
        let t0 = Instant::now();
        loop {
            let lines = refused(&agent.log());
            if let Some(line) = lines[before..].iter().find(|l| l.contains(reason)) {
                assert!(
                    line.contains("peer=127.0.0.1:"),
                    "{what}: no peer in {line}"
                );
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{what}: no refusal naming {reason:?} in the log:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // A plaintext client gets nothing readable: no HTTP, no gRPC, no volume name.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(
            !text.contains("HTTP") && !text.contains("db"),
            "a plaintext client read {text:?}"
        );
        // At most a TLS alert record (content type 21).
        assert!(got.is_empty() || got[0] == 21, "{got:?}");
    }

    // The refusals did not disturb the server.
    assert_eq!(
        list(addr, Some(pki.client("bundle.pem", Some("client1"))))
            .await
            .unwrap()
            .len(),
        2
    );

    // Every refusal names its peer; no key material in the log (the key files are read, their
    // contents never logged).
    let log = agent.log();
    for line in log.lines().filter(|l| l.contains("refused a client")) {
        assert!(line.contains("peer=127.0.0.1:"), "no peer in {line}");
    }
    assert!(!log.contains("PRIVATE KEY"), "{log}");
    for key in ["server1.key", "client1.key", "stranger.key", "expired.key"] {
        for line in pki.read(key).lines().filter(|l| !l.starts_with("-----")) {
            assert!(!log.contains(line), "key material of {key} in the log");
        }
    }
}

#[test]
fn a_tcp_listener_needs_tls_or_the_explicit_plaintext_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let run = |extra: &[String]| {
        let mut args = vec![
            "agent".to_string(),
            "--data-dir".into(),
            tmp.path().join("d").display().to_string(),
            "--listen".into(),
            free_local_addr().to_string(),
        ];
        args.extend(extra.iter().cloned());
        Command::new(BIN).args(&args).output().unwrap()
    };
    let o = run(&[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "started a plaintext listener: {e}");
    assert!(
        e.contains("--insecure-plaintext-tcp") && e.contains("--tls-cert"),
        "{e}"
    );
    assert!(
        !tmp.path().join("d/agent.sock").exists(),
        "refused before serving anything"
    );

    // Half the TLS flags: refused too.
    let o = run(&["--tls-cert".into(), pki.path("server1.pem")]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("go together"));

    // A key that is not a key: refused, naming the file.
    let mut flags = server_flags(&pki, "server1", "bundle.pem");
    flags[3] = pki.path("ca1.pem");
    let o = run(&flags);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("ca1.pem"), "{e}");

    // NBD on TCP has no authentication: refused without its own explicit flag.
    let nbd = free_local_addr().to_string();
    let o = run(&[
        "--insecure-plaintext-tcp".into(),
        "--nbd-listen".into(),
        nbd.clone(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--insecure-plaintext-nbd"),
        "{e}"
    );

    // With the explicit flags: it serves, and warns.
    let dir = tmp.path().join("plain");
    let (agent, addr) = agent(
        &dir,
        &[
            "--insecure-plaintext-tcp".into(),
            "--nbd-listen".into(),
            nbd,
            "--insecure-plaintext-nbd".into(),
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(list(addr, None)), Ok(vec![]));
    agent.wait_log("WITHOUT TLS", 1);
    agent.wait_log("NBD on TCP WITHOUT authentication", 1);
}

/// Replaces `dst` with the contents of `src` in one step, as the kubelet swaps a mounted Secret.
fn swap(pki: &Pki, src: &str, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::write(&tmp, pki.read(src)).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

/// The rotation the chart documents, on running processes (no restart): every party first
/// trusts both CAs, then gets certificates of the new CA, then the old CA leaves the bundles.
/// Calls through the CSI controller run the whole time and none fails; afterwards a client of
/// the old CA is refused by the same agent process. A broken set (a key that does not match)
/// is refused with a log line and the previous set stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_in_place_new_ca_bundle_then_new_certificates_with_no_failed_call() {
    use csi::controller_client::ControllerClient;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    // The files each process reads, where a mounted Secret would put them.
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let f = |n: &str| live.join(n);
    for (src, dst) in [
        ("server1.pem", "agent.crt"),
        ("server1.key", "agent.key"),
        ("ca1.pem", "agent-ca.crt"),
        ("client1.pem", "ctl.crt"),
        ("client1.key", "ctl.key"),
        ("ca1.pem", "ctl-ca.crt"),
    ] {
        swap(&pki, src, &f(dst));
    }
    let path = |n: &str| f(n).display().to_string();
    let (agent, addr) = agent(
        &tmp.path().join("agent"),
        &[
            "--tls-cert".into(),
            path("agent.crt"),
            "--tls-key".into(),
            path("agent.key"),
            "--tls-client-ca".into(),
            path("agent-ca.crt"),
        ],
    );
    let sock = tmp.path().join("csi.sock");
    let mut ctl = Proc::spawn(
        &[
            "csi".into(),
            "controller".into(),
            "--endpoint".into(),
            format!("unix://{}", sock.display()),
            "--agent".into(),
            format!("n1=https://{addr}"),
            "--agent-tls-ca".into(),
            path("ctl-ca.crt"),
            "--agent-tls-cert".into(),
            path("ctl.crt"),
            "--agent-tls-key".into(),
            path("ctl.key"),
        ],
        tmp.path().join("controller.log"),
    );
    ctl.wait_for_socket(&sock);
    let ch = Endpoint::from_shared(format!("unix://{}", sock.display()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ControllerClient::new(ch);
    let src = c
        .create_volume(block_volume("src", "n1"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;

    // Calls through the controller for the whole rotation; every failure is kept.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = {
        let (mut c, stop, src) = (c.clone(), stop.clone(), src.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let r = c
                    .create_snapshot(csi::CreateSnapshotRequest {
                        source_volume_id: src.clone(),
                        name: format!("s{i}"),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => ok += 1,
                    Err(s) => failed.push(format!("{s:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };
    // After a change: past the reload check, and a fresh connection of our own (which also
    // makes the agent look at its files).
    let settle = || async {
        tokio::time::sleep(flashcopy_csi::tls::RELOAD_CHECK + Duration::from_millis(400)).await;
    };
    let direct = |ca: &str, client: &str| {
        let t = pki.client(ca, Some(client));
        async move { list(addr, Some(t)).await }
    };
    settle().await;
    assert!(direct("ca1.pem", "client1").await.is_ok());

    // Step 1: every party trusts both CAs.
    swap(&pki, "bundle.pem", &f("agent-ca.crt"));
    swap(&pki, "bundle.pem", &f("ctl-ca.crt"));
    settle().await;
    assert!(
        direct("ca1.pem", "client2").await.is_ok(),
        "the agent accepts CA 2's clients"
    );

    // A broken set (the new certificate with the old key) is refused; the old one stays.
    swap(&pki, "server2.pem", &f("agent.crt"));
    settle().await;
    assert!(direct("ca1.pem", "client1").await.is_ok());
    agent.wait_log("still using the previous ones", 1);

    // Step 2: certificates of CA 2 everywhere.
    swap(&pki, "server2.key", &f("agent.key"));
    swap(&pki, "client2.pem", &f("ctl.crt"));
    swap(&pki, "client2.key", &f("ctl.key"));
    settle().await;
    assert!(
        direct("ca2.pem", "client2").await.is_ok(),
        "the agent presents CA 2's certificate"
    );
    assert!(direct("ca1.pem", "client2").await.is_err());

    // Step 3: CA 1 leaves the bundles.
    swap(&pki, "ca2.pem", &f("agent-ca.crt"));
    swap(&pki, "ca2.pem", &f("ctl-ca.crt"));
    settle().await;
    assert!(
        direct("ca2.pem", "client1").await.is_err(),
        "CA 1's clients are refused by the same agent process"
    );
    settle().await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = calls.await.unwrap();
    assert!(
        failed.is_empty(),
        "failed calls during the rotation: {failed:?}"
    );
    assert!(ok > 20, "only {ok} calls ran");
    // The controller reconnected with each new set (its log says so three times), and its calls
    // after step 3 are made with CA 2's certificate (the agent no longer accepts CA 1's).
    ctl.wait_log("agent client TLS certificates reloaded", 3);
    c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: src,
        name: "after".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    agent.wait_log("TLS certificates reloaded", 3);
    for log in [agent.log(), ctl.log()] {
        assert!(!log.contains("PRIVATE KEY"));
    }
    println!("{ok} CreateSnapshot calls through the controller during the rotation, none failed");
}

fn topology(node: &str) -> Option<csi::TopologyRequirement> {
    let t = csi::Topology {
        segments: [(
            flashcopy_csi::csi::TOPOLOGY_KEY.to_string(),
            node.to_string(),
        )]
        .into(),
    };
    Some(csi::TopologyRequirement {
        requisite: vec![t.clone()],
        preferred: vec![t],
    })
}

/// A 1 MiB Block volume on `node`.
fn block_volume(name: &str, node: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Block(
                csi::volume_capability::BlockVolume {},
            )),
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }],
        accessibility_requirements: topology(node),
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The CSI controller routes to one agent over mutual TLS and to one over plaintext TCP: both
/// work, and the CreateSnapshot round trips of the two are measured in the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_controller_reaches_agents_over_tls_and_createsnapshot_cost() {
    use csi::controller_client::ControllerClient;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let (_tls_agent, tls_addr) = agent(
        &tmp.path().join("a-tls"),
        &server_flags(&pki, "server1", "bundle.pem"),
    );
    let (_plain_agent, plain_addr) = agent(
        &tmp.path().join("a-plain"),
        &["--insecure-plaintext-tcp".into()],
    );
    let sock = tmp.path().join("csi.sock");
    let mut args: Vec<String> = vec![
        "csi".into(),
        "controller".into(),
        "--endpoint".into(),
        format!("unix://{}", sock.display()),
        "--agent".into(),
        format!("tls-node=https://{tls_addr}"),
        "--agent".into(),
        format!("plain-node=http://{plain_addr}"),
    ];
    // Without the client flags, an https:// agent is refused at start.
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--agent-tls-ca"));
    args.extend(pki.client_flags("client1"));
    let mut ctl = Proc::spawn(&args, tmp.path().join("controller.log"));
    ctl.wait_for_socket(&sock);
    let ch = Endpoint::from_shared(format!("unix://{}", sock.display()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ControllerClient::new(ch);

    let nodes = ["tls-node", "plain-node"];
    let mut sources = Vec::new();
    for node in nodes {
        let v = c
            .create_volume(block_volume(&format!("src-{node}"), node))
            .await
            .unwrap_or_else(|s| panic!("CreateVolume on {node}: {s:?}"))
            .into_inner()
            .volume
            .unwrap();
        assert!(
            v.volume_id.contains(node),
            "{} is not on {node}",
            v.volume_id
        );
        sources.push(v.volume_id);
    }
    // Interleaved, so that both see the same load of this shared machine.
    let n = 200;
    let mut times = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..n {
        for (k, node) in nodes.iter().enumerate() {
            let t0 = Instant::now();
            let s = c
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: sources[k].clone(),
                    name: format!("snap-{node}-{i}"),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("CreateSnapshot on {node}: {s:?}"));
            times[k].push(t0.elapsed());
            assert!(s.into_inner().snapshot.unwrap().ready_to_use);
        }
    }
    // Every snapshot is listed through the controller, from both agents.
    let listed = c
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 2 * n);
    for (k, node) in nodes.iter().enumerate() {
        times[k].sort();
        println!(
            "{node}: CreateSnapshot round trip (CSI controller -> agent) over {n} calls: p50 {:?}, p99 {:?}",
            percentile(&times[k], 0.5),
            percentile(&times[k], 0.99)
        );
    }
    // The TLS cost alone on a call that does nearly nothing: GetAgentInfo straight to each agent.
    let mut direct = [
        connect(tls_addr, Some(pki.client("bundle.pem", Some("client1"))))
            .await
            .unwrap(),
        connect(plain_addr, None).await.unwrap(),
    ];
    let mut info_times = [Vec::new(), Vec::new()];
    for _ in 0..500 {
        for k in 0..2 {
            let t0 = Instant::now();
            direct[k]
                .get_agent_info(pb::GetAgentInfoRequest {})
                .await
                .unwrap();
            info_times[k].push(t0.elapsed());
        }
    }
    for (k, node) in nodes.iter().enumerate() {
        info_times[k].sort();
        println!(
            "{node}: GetAgentInfo round trip (agent client -> agent) over 500 calls: p50 {:?}, p99 {:?}",
            percentile(&info_times[k], 0.5),
            percentile(&info_times[k], 0.99)
        );
    }
    assert!(!ctl.log().contains("PRIVATE KEY"));
}

/// A flood of idle connections from one address (they never start a handshake) is cut at the
/// per-address limit: the excess is closed at once, and a client from another address is
/// served while the flood holds its connections open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_from_one_address_does_not_lock_others_out() {
    use tokio::io::AsyncReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let (agent, addr) = agent(
        &tmp.path().join("agent"),
        &server_flags(&pki, "server1", "ca1.pem"),
    );
    // More than the agent's whole handshake budget, all from 127.0.0.2.
    let n = flashcopy_csi::tls::MAX_PENDING_HANDSHAKES + 44;
    let mut flood = Vec::with_capacity(n);
    for _ in 0..n {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        flood.push(s.connect(addr).await.unwrap());
    }
    // The client from 127.0.0.1 is served while every flood connection is still open.
    assert_eq!(
        list(addr, Some(pki.client("ca1.pem", Some("client1")))).await,
        Ok(vec![])
    );
    // All but the per-address budget were closed by the agent without waiting for a timeout.
    let mut closed = 0;
    for s in &mut flood {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, n - flashcopy_csi::tls::MAX_PENDING_PER_ADDRESS);
    agent.wait_log("too many TLS handshakes pending", 1);
}
