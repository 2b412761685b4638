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
            rt.block_on(agent::run(c, async {
                let _ = rx.await;
            }))
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

/// True when `bin` is on PATH; otherwise skips (prints) or, under CI, fails.
pub fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()));
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{bin} is not installed (required under CI)"
        );
        println!("skipped: {bin} not installed");
    }
    found
}
