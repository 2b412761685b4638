//! Shared by the `agent_*` tests: an agent running in this process on a temporary directory
//! (on its own runtime thread, so tests may block), a client, and the `fc` binary.

#![allow(dead_code)]

use flashcopy_csi::agent::{self, Config};
use flashcopy_csi::proto::agent::v1::agent_client::AgentClient;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

/// An agent serving `dir` until stopped.
pub struct Agent {
    pub dir: PathBuf,
    pub cfg: Config,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), agent::Error>>>,
}

impl Agent {
    /// Starts an agent on `dir` and waits until its API answers.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(Config::new(dir))
    }

    /// Starts an agent with `cfg` and waits until its API answers.
    pub fn start_with(cfg: Config) -> Self {
        Self::start_on(cfg, None)
    }

    /// Starts an agent on a pool opened by the test (fault-injecting stores).
    pub fn start_with_pool(cfg: Config, pool: flashcopy_csi::volume::Pool) -> Self {
        Self::start_on(cfg, Some(pool))
    }

    fn start_on(cfg: Config, pool: Option<flashcopy_csi::volume::Pool>) -> Self {
        // `RUST_LOG=info cargo test --test agent_api -- --nocapture` shows the agent's log.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (tx, rx) = oneshot::channel::<()>();
        let c = cfg.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let stop = async {
                let _ = rx.await;
            };
            match pool {
                Some(pool) => rt.block_on(agent::run_with_pool(c, pool, stop)),
                None => rt.block_on(agent::run(c, stop)),
            }
        });
        let a = Self {
            dir: cfg.data_dir.clone(),
            cfg,
            stop: Some(tx),
            thread: Some(thread),
        };
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(a.socket()).is_err() {
            assert!(
                !a.thread.as_ref().unwrap().is_finished(),
                "the agent stopped while starting"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "agent did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }

    pub fn socket(&self) -> PathBuf {
        self.cfg.agent_socket()
    }

    pub fn uri(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// A client (on the caller's runtime).
    pub async fn client(&self) -> AgentClient<Channel> {
        let ch = Endpoint::from_shared(self.uri())
            .unwrap()
            .connect()
            .await
            .unwrap();
        AgentClient::new(ch)
    }

    /// Graceful shutdown; returns what `run` returned.
    pub fn stop(mut self) -> Result<(), agent::Error> {
        self.stop.take().unwrap().send(()).unwrap();
        let t = self.thread.take().unwrap();
        let t0 = Instant::now();
        while !t.is_finished() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the agent did not shut down"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("agent thread panicked")
    }

    /// [`Agent::stop`] from async code: waits on the blocking pool, so clients on the caller's
    /// runtime keep answering the server's goodbye.
    pub async fn stop_async(self) -> Result<(), agent::Error> {
        tokio::task::spawn_blocking(move || self.stop())
            .await
            .unwrap()
    }

    /// Runs `flashcopy-csi fc --agent <this agent> ARGS`.
    pub fn fc(&self, args: &[&str]) -> Output {
        fc(&self.uri(), args)
    }

    /// As [`Agent::fc`], asserting success; returns stdout.
    pub fn fc_ok(&self, args: &[&str]) -> String {
        let out = self.fc(args);
        assert!(
            out.status.success(),
            "fc {args:?} failed ({:?}):\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Runs `flashcopy-csi fc --agent URI ARGS`.
pub fn fc(uri: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"))
        .arg("fc")
        .arg("--agent")
        .arg(uri)
        .args(args)
        .output()
        .unwrap();
    println!(
        "$ fc {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free TCP port on the loopback (bound, then released for the agent to take).
pub fn free_local_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Sends `request` as is over a new TCP connection and returns the status code and the whole
/// answer (head and body).
pub fn http_raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (status, text)
}

/// `GET /metrics`, checked for the exposition format, as `name{labels}` -> value.
pub fn scrape(addr: std::net::SocketAddr) -> std::collections::BTreeMap<String, f64> {
    let (status, text) = http_raw(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: agent\r\nAccept: text/plain\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    let mut typed = std::collections::BTreeMap::new();
    let mut samples = std::collections::BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.to_string(), kind.to_string()).is_none(),
                "{line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "sample before its TYPE: {line}");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
        assert!(
            samples.insert(key.to_string(), v).is_none(),
            "repeated: {line}"
        );
    }
    samples
}

/// A sample of [`scrape`]'s result, which must exist.
pub fn metric(m: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no sample {key}"))
}
