//! `kill -9` of a real `flashcopy-csi agent` process, then a restart on the same data directory:
//! during host writes with snapshots taken mid-stream, during background copy, and around a
//! consistency-group start. Data goes through NBD with `qemu-io` (writes) and `nbdcopy`
//! (whole-image reads); control through the `fc` binary. What each volume must read is computed
//! from the test's own log of the writes `qemu-io` reported complete, never from data read back
//! from the agent before the kill.
//!
//! A SIGKILL loses no page cache and the agent keeps no user-space write cache, so every write
//! acknowledged to the client must survive, flushed or not; the write in flight at the kill (one
//! per writer) may have landed in part (each byte old or new). Each writer is sequential (a write
//! is issued once the previous one completed) and writers own disjoint bytes. A start drains and
//! flushes I/O, so on each writer's bytes a snapshot reads exactly the source after some prefix
//! of that writer's stream: every write acknowledged before the start was requested, none issued
//! after it returned. On two volumes written alternately by one writer, that prefix is one point
//! of the dependent sequence for both targets of a group.
//!
//! `KILL_ROUNDS` (default 3) sets the rounds of the writes and group tests; `KILL_SEED` the seed
//! (printed; the kill moments depend on timing too).

mod agent_common;
mod skip;

use serde_json::Value;
use skip::have_all;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Concurrent writers on the source in the snapshot test.
const WRITERS: usize = 3;

struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

fn seed(test: &str) -> u64 {
    let s = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{test}: KILL_SEED={s}");
    s
}

fn rounds() -> usize {
    std::env::var("KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

fn peers() -> bool {
    have_all(&["qemu-io", "nbdcopy", "nbdinfo"])
}

/// The agent as its own process (the harness's in-process agent cannot be SIGKILLed).
struct AgentProc {
    dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl AgentProc {
    fn start(dir: &Path) -> Self {
        let mut a = Self::start_only(dir);
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(dir.join("agent.sock")).is_err()
            || std::os::unix::net::UnixStream::connect(dir.join("nbd.sock")).is_err()
        {
            if let Some(st) = a.child.try_wait().unwrap() {
                panic!("the agent exited while starting ({st}):\n{}", a.log_tail());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent did not start:\n{}",
                a.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }

    /// Spawns the agent without waiting for it to serve.
    fn start_only(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"))
            .args(["agent", "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        AgentProc {
            dir: dir.to_path_buf(),
            log,
            child,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn uri(&self) -> String {
        format!("unix://{}", self.dir.join("agent.sock").display())
    }

    fn nbd(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `flashcopy-csi fc` against this agent (quiet: failures print the output).
    fn fc(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"))
            .args(["fc", "--agent", &self.uri()])
            .args(args)
            .output()
            .unwrap()
    }

    /// Bytes of the agent's log so far.
    fn log_len(&self) -> usize {
        std::fs::read(&self.log).map_or(0, |l| l.len())
    }

    /// Waits until the log past `from` has a line containing `what`.
    fn wait_log(&self, from: usize, what: &str) {
        let t0 = Instant::now();
        loop {
            let log = std::fs::read(&self.log).unwrap_or_default();
            if String::from_utf8_lossy(&log[from.min(log.len())..]).contains(what) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no {what} in the log"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn fc_ok(&self, args: &[&str]) -> String {
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

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.fc_ok(&a)).unwrap()
    }

    /// Creates a volume and returns its NBD export name.
    fn mkvol(&self, name: &str, size: u64) -> String {
        self.fc_ok(&["mkvol", name, &size.to_string()]);
        self.json(&["lsvol", name])["nbd_export"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// SIGKILL, then reap.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Reaps a process killed by [`sigkill`]; asserts it did not exit on its own.
    fn reap(mut self) {
        let st = self.child.wait().unwrap();
        assert!(
            !st.success(),
            "the agent exited by itself:\n{}",
            self.log_tail()
        );
    }

    /// Every volume is listed by NBD again (by name; its id, `lsvol`'s `nbd_export`, opens it
    /// too, which every read here uses).
    fn assert_exports(&self) {
        let vols = self.json(&["lsvol"]);
        let mut want: Vec<String> = vols
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        let out = Command::new("nbdinfo")
            .args(["--list", "--json", &self.nbd("")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nbdinfo --list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut got: Vec<String> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap().to_string())
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "exports after the restart");
    }

    /// The whole image of an export, read with `nbdcopy`.
    fn read(&self, export: &str) -> Vec<u8> {
        let out = Command::new("nbdcopy")
            .args([&self.nbd(export), "-"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nbdcopy {export}: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        out.stdout
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill -9 PID` (the child is not reaped until [`AgentProc::reap`], so the pid is still ours).
fn sigkill(pid: u32) {
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -9 {pid}");
}

/// An interactive `qemu-io` on one export: one command at a time, its completion read back.
struct Qio {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Qio {
    fn open(uri: &str) -> Self {
        let mut child = Command::new("sh")
            .args(["-c", "exec qemu-io -f raw \"$0\" 2>&1", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        Qio { child, stdin, out }
    }

    /// Writes `pat` over `off..off+len` (with FUA when `fua`); true once qemu-io reports it done.
    fn write(&mut self, w: &Wr, fua: bool) -> bool {
        let f = if fua { "-f " } else { "" };
        let cmd = format!("write {f}-P {} {} {}\n", w.pat, w.off, w.len);
        if self
            .stdin
            .as_mut()
            .unwrap()
            .write_all(cmd.as_bytes())
            .is_err()
        {
            return false;
        }
        let done = format!("wrote {}/{} bytes at offset {}", w.len, w.len, w.off);
        let mut line = String::new();
        loop {
            line.clear();
            match self.out.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) if line.contains(&done) => return true,
                Ok(_) if line.contains("failed") || line.contains("rror") => return false,
                Ok(_) => {}
            }
        }
    }
}

impl Drop for Qio {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One write: volume index (into the writer's exports), range and pattern byte.
#[derive(Clone, Copy, Debug)]
struct Wr {
    vol: usize,
    off: u64,
    len: u64,
    pat: u8,
}

/// The writer's log: `writes[..acked]` were reported complete; `writes.len()` were issued.
#[derive(Default)]
struct Log {
    writes: Vec<Wr>,
    acked: usize,
}

/// A sequential writer over one or more exports: write `i` goes to export `i % n` and is issued
/// only after write `i - 1` completed, so on two volumes each write depends on the previous one.
struct Writer {
    log: Arc<Mutex<Log>>,
    thread: std::thread::JoinHandle<()>,
}

/// Bytes striped among `n` concurrent writers: writer `w` owns the 64 KiB stripes `s` with
/// `s % n == w`, so their writes never overlap but do share grains (64 or 256 KiB).
#[derive(Clone, Copy, Debug)]
struct Own {
    w: usize,
    n: usize,
}

const ALONE: Own = Own { w: 0, n: 1 };
const STRIPE: usize = 64 * 1024;

impl Own {
    /// `a` and `b` agree on every byte this writer owns.
    fn eq(self, a: &[u8], b: &[u8]) -> bool {
        if self.n == 1 {
            return a == b;
        }
        (self.w..a.len().div_ceil(STRIPE)).step_by(self.n).all(|s| {
            let r = s * STRIPE..((s + 1) * STRIPE).min(a.len());
            a[r.clone()] == b[r]
        })
    }

    /// Copies this writer's bytes from `from` into `to`.
    fn copy(self, from: &[u8], to: &mut [u8]) {
        for s in (self.w..from.len().div_ceil(STRIPE)).step_by(self.n) {
            let r = s * STRIPE..((s + 1) * STRIPE).min(from.len());
            to[r.clone()].copy_from_slice(&from[r]);
        }
    }
}

impl Writer {
    /// Writes of 4 KiB to 64 KiB; with `own.n > 1`, each inside one of the writer's stripes.
    fn spawn(uris: Vec<String>, size: u64, seed: u64, own: Own) -> Self {
        let log = Arc::new(Mutex::new(Log::default()));
        let l = log.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut qios: Vec<Qio> = uris.iter().map(|u| Qio::open(u)).collect();
            let blocks = size / 4096;
            for i in 0.. {
                let vol = i % qios.len();
                let nblk = rng.range(1, 17);
                let off = if own.n == 1 {
                    rng.range(0, blocks - nblk + 1) * 4096
                } else {
                    let stripes = size / STRIPE as u64;
                    let s =
                        rng.range(0, stripes.div_ceil(own.n as u64)) * own.n as u64 + own.w as u64;
                    let s = if s < stripes { s } else { own.w as u64 };
                    s * STRIPE as u64 + rng.range(0, 16 - nblk + 1) * 4096
                };
                let w = Wr {
                    vol,
                    off,
                    len: nblk * 4096,
                    pat: rng.range(1, 256) as u8,
                };
                l.lock().unwrap().writes.push(w);
                if !qios[vol].write(&w, rng.range(0, 4) == 0) {
                    return; // the agent is gone
                }
                let mut g = l.lock().unwrap();
                g.acked = g.writes.len();
            }
        });
        Writer { log, thread }
    }

    fn acked(&self) -> usize {
        self.log.lock().unwrap().acked
    }

    fn issued(&self) -> usize {
        self.log.lock().unwrap().writes.len()
    }

    /// Waits for the writer to notice the agent is gone; returns its log.
    fn finish(self) -> Log {
        let t0 = Instant::now();
        while !self.thread.is_finished() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the writer still runs after the kill"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.thread.join().unwrap();
        Arc::try_unwrap(self.log)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

fn apply(imgs: &mut [Vec<u8>], w: &Wr) {
    imgs[w.vol][w.off as usize..(w.off + w.len) as usize].fill(w.pat);
}

/// The smallest `p` in `lo..=hi` such that every `(volume index, image)` in `actual` equals
/// `base` after `writes[..p]` on the bytes `own` owns; with the images of that prefix.
fn find_prefix(
    base: &[Vec<u8>],
    writes: &[Wr],
    (lo, hi): (usize, usize),
    actual: &[(usize, &[u8])],
    own: Own,
) -> Option<(usize, Vec<Vec<u8>>)> {
    let mut imgs = base.to_vec();
    for w in &writes[..lo] {
        apply(&mut imgs, w);
    }
    for p in lo..=hi.min(writes.len()) {
        if actual.iter().all(|(v, a)| own.eq(&imgs[*v], a)) {
            return Some((p, imgs));
        }
        if p < writes.len() {
            apply(&mut imgs, &writes[p]);
        }
    }
    None
}

/// Checks a source after the kill against the logs of writers of disjoint bytes: every
/// acknowledged write is there; each byte of a write in flight at the kill is old or new.
/// Returns nothing: the caller adopts `actual` as the new base.
fn check_source(base: &[Vec<u8>], logs: &[&Log], vol: usize, actual: &[u8]) {
    let mut imgs = base.to_vec();
    for log in logs {
        for w in &log.writes[..log.acked] {
            apply(&mut imgs, w);
        }
    }
    let want = &imgs[vol];
    assert_eq!(actual.len(), want.len(), "volume {vol} size");
    let in_flight: Vec<&Wr> = logs
        .iter()
        .flat_map(|l| &l.writes[l.acked..])
        .filter(|w| w.vol == vol)
        .collect();
    let acked: Vec<usize> = logs.iter().map(|l| l.acked).collect();
    for (i, (a, b)) in actual.iter().zip(want).enumerate() {
        if a == b {
            continue;
        }
        let i = i as u64;
        assert!(
            in_flight
                .iter()
                .any(|w| (w.off..w.off + w.len).contains(&i) && w.pat == *a),
            "volume {vol} byte {i} reads {a:#x}, expected {b:#x} (every acknowledged write \
             applied; in flight: {in_flight:?}; {acked:?} acknowledged)"
        );
    }
}

fn state(m: &Value) -> &str {
    m["state"].as_str().unwrap()
}

/// A snapshot target whose image is known, checked again after every later restart.
struct Known {
    export: String,
    image: Vec<u8>,
}

fn check_known(agent: &AgentProc, known: &[Known]) {
    for k in known {
        assert!(
            agent.read(&k.export) == k.image,
            "snapshot target {} lost its point-in-time image after a later restart",
            k.export
        );
    }
}

/// A start requested in the snapshot test.
struct Start {
    /// Index of the snapshot in its round.
    snap: usize,
    /// Per writer: writes acknowledged before the call, and issued once it returned (`None`:
    /// it did not return).
    window: Vec<(usize, Option<usize>)>,
    /// The call reported success.
    ok: bool,
}

/// Writes to a volume with snapshots started mid-stream, kill -9 at a random moment, restart:
/// every export is back, every acknowledged write is on the source, and every started snapshot
/// (from this round and every earlier one, in one cascade) reads its point in time.
#[test]
fn kill_during_writes_and_snapshots() {
    if !peers() {
        return;
    }
    let mut rng = Rng::new(seed("kill_during_writes_and_snapshots"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let size = 4 * MIB;
    let mut agent = AgentProc::start(&dir);
    let src = agent.mkvol("src", size);
    let mut base = vec![vec![0u8; size as usize]];
    let mut known: Vec<Known> = Vec::new();
    let (mut mid_stream, mut unstarted) = (0, 0);
    for round in 0..rounds() {
        // Three snapshots per round, of the same source: a cascade that grows every round.
        let mut snaps = Vec::new();
        for k in 0..3 {
            let name = format!("s{round}-{k}");
            let export = agent.mkvol(&name, size);
            agent.fc_ok(&[
                "mkfcmap",
                "--source",
                "src",
                "--target",
                &name,
                "--copyrate",
                "0",
                "--name",
                &format!("m{round}-{k}"),
            ]);
            snaps.push((format!("m{round}-{k}"), export));
        }
        let writers: Vec<Writer> = (0..WRITERS)
            .map(|w| {
                let own = Own { w, n: WRITERS };
                Writer::spawn(vec![agent.nbd(&src)], size, rng.next(), own)
            })
            .collect();
        let kill_after = rng.ms(100, 900);
        let pid = agent.pid();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            sigkill(pid);
        });
        let mut starts: Vec<Start> = Vec::new();
        for k in 0..snaps.len() {
            std::thread::sleep(rng.ms(10, 250));
            let lo: Vec<usize> = writers.iter().map(Writer::acked).collect();
            let out = agent.fc(&["startfcmap", "--prep", &snaps[k].0]);
            let ok = out.status.success();
            let window = writers
                .iter()
                .zip(lo)
                .map(|(w, lo)| (lo, ok.then(|| w.issued())))
                .collect();
            starts.push(Start {
                snap: k,
                window,
                ok,
            });
            if !ok {
                break; // the agent is gone; this start may or may not have happened
            }
        }
        killer.join().unwrap();
        agent.reap();
        let logs: Vec<Log> = writers.into_iter().map(Writer::finish).collect();
        let logs: Vec<&Log> = logs.iter().collect();
        println!(
            "round {round}: killed after {kill_after:?}: {:?} writes acknowledged, {:?} issued, {} starts requested",
            logs.iter().map(|l| l.acked).collect::<Vec<_>>(),
            logs.iter().map(|l| l.writes.len()).collect::<Vec<_>>(),
            starts.len()
        );

        if round % 2 == 1 {
            // And once more while it recovers (replay, checkpoint, interrupted prepares).
            let a = AgentProc::start_only(&dir);
            std::thread::sleep(rng.ms(0, 15));
            a.kill9();
        }
        agent = AgentProc::start(&dir);
        agent.assert_exports();
        let actual = agent.read(&src);
        check_source(&base, &logs, 0, &actual);
        let maps = agent.json(&["lsfcmap"]);
        for (k, (map, export)) in snaps.iter().enumerate() {
            let m = maps
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == map.as_str())
                .unwrap_or_else(|| panic!("mapping {map} is gone after the restart"));
            let start = starts.iter().find(|s| s.snap == k);
            // A rate-0 mapping whose source the writers overwrote in full is copied: its
            // target holds the image on its own, and it still must be the point in time.
            let copied = state(m) == "idle_or_copied" && start.is_some_and(|s| s.ok);
            if state(m) == "copying" || copied {
                assert!(
                    !copied || m["progress"] == 100,
                    "{map} is idle but not copied: {m}"
                );
                // (The target of a prepared mapping is offline, so read only now.)
                let target = agent.read(export);
                let window = &start
                    .unwrap_or_else(|| panic!("{map} started by itself"))
                    .window;
                // Each writer's bytes: one point of its own stream within its window.
                let mut image = base[0].clone();
                let mut points = Vec::new();
                for (w, (log, &(lo, hi))) in logs.iter().zip(window).enumerate() {
                    let hi = hi.unwrap_or(log.writes.len());
                    let own = Own { w, n: WRITERS };
                    let Some((p, imgs)) =
                        find_prefix(&base, &log.writes, (lo, hi), &[(0, &target)], own)
                    else {
                        panic!(
                            "{map}: writer {w}'s bytes on the target are not the source as of the \
                             start (after {lo}..={hi} of its writes)\n{}",
                            agent.log_tail()
                        );
                    };
                    own.copy(&imgs[0], &mut image);
                    points.push(format!("{p} in {lo}..={hi}"));
                    if p > 0 && p < log.acked {
                        mid_stream += 1;
                    }
                }
                println!("  {map}: point in time after writes {points:?}");
                assert!(image == target);
                known.push(Known {
                    export: export.clone(),
                    image,
                });
            } else {
                // Not started: only a start the kill interrupted, and it can be started now.
                assert!(
                    start.is_none_or(|s| !s.ok),
                    "{map} reported started but is {} after the restart",
                    state(m)
                );
                assert!(
                    ["idle_or_copied", "prepared"].contains(&state(m)),
                    "{map} is {} after the restart",
                    state(m)
                );
                unstarted += 1;
                let mut args = vec!["startfcmap", map.as_str()];
                if state(m) == "idle_or_copied" {
                    args.insert(1, "--prep");
                }
                agent.fc_ok(&args);
                assert!(
                    agent.read(export) == actual,
                    "{map} started after the restart"
                );
                known.push(Known {
                    export: export.clone(),
                    image: actual.clone(),
                });
            }
        }
        check_known(&agent, &known);
        base = vec![actual];
    }
    println!(
        "{} snapshots verified, {mid_stream} writer streams cut between acknowledged writes, {unstarted} interrupted starts",
        known.len()
    );
    assert!(
        mid_stream > 0,
        "no snapshot was started in the middle of the write stream; the test proved nothing"
    );
    agent.kill9();
}

fn split_grains(agent: &AgentProc, map: &str) -> (String, u64, u64) {
    let m = agent.json(&["lsfcmap", map]);
    (
        state(&m).to_string(),
        m["split_grains"].as_u64().unwrap(),
        m["grains"].as_u64().unwrap(),
    )
}

/// Polls until the mapping has split more than `past` grains (and at least `min`); returns the
/// count seen. Panics if the copy does not move or completes first (the kill is to come).
fn copy_past(agent: &AgentProc, map: &str, past: u64, min: u64) -> u64 {
    let t0 = Instant::now();
    loop {
        let (st, split, grains) = split_grains(agent, map);
        assert_eq!(st, "copying", "{map} left copying before the kill");
        assert!(split < grains, "{map} completed before the kill");
        if split > past && split >= min {
            return split;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{map}: background copy does not progress past {past} grains ({split}/{grains})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A clone by background copy of a 24 MiB volume, then the clone copied back onto the source,
/// each with kill -9 twice mid-copy and host writes to its source after the start: after each
/// restart the copy resumes from the durable progress (never below what the agent reported
/// before the kill), the target reads its point in time throughout and ends byte-identical to
/// the image at the start (seeded bytes the test wrote).
#[test]
fn kill_during_background_copy() {
    if !peers() {
        return;
    }
    let mut rng = Rng::new(seed("kill_during_background_copy"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let size = 24 * MIB;
    let agent = AgentProc::start(&dir);
    let src = agent.mkvol("src", size);
    let clone = agent.mkvol("clone", size);

    // The image at the start: seeded random bytes, written through NBD from a local file.
    let mut image = vec![0u8; size as usize];
    for c in image.chunks_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
    let file = tmp.path().join("src.img");
    std::fs::write(&file, &image).unwrap();
    let o = Command::new("nbdcopy")
        .arg(&file)
        .arg(agent.nbd(&src))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Copy rate 65: 8 MiB/s, about three seconds for the whole volume.
    agent.fc_ok(&[
        "mkfcmap",
        "--source",
        "src",
        "--target",
        "clone",
        "--copyrate",
        "65",
        "--name",
        "cl",
    ]);
    let mut on_src = image.clone();
    let agent = copy_with_kills(agent, &mut rng, "cl", (&src, &mut on_src), (&clone, &image));
    println!("clone: complete");

    // And back: the clone copied onto the source (a restore in place), killed mid-copy too; the
    // source reads the clone's image from the start on, whatever is written to the clone.
    agent.fc_ok(&[
        "mkfcmap",
        "--source",
        "clone",
        "--target",
        "src",
        "--copyrate",
        "65",
        "--name",
        "back",
    ]);
    let mut on_clone = image.clone();
    let agent = copy_with_kills(
        agent,
        &mut rng,
        "back",
        (&clone, &mut on_clone),
        (&src, &image),
    );
    println!("copy back: complete");
    agent.kill9();
}

/// Starts `map`, then twice: host writes to its source, a writer running on it while the
/// background copy goes past a sixth more of the grains, kill -9 at a random moment, restart. After each restart the copy is still
/// copying from no less than the progress reported before the kill, the source holds every
/// write and the target reads its point-in-time image; finally the copy completes at the top
/// rate and the target holds that image on its own.
fn copy_with_kills(
    mut agent: AgentProc,
    rng: &mut Rng,
    map: &str,
    (source, on_source): (&str, &mut Vec<u8>),
    (target, image): (&str, &[u8]),
) -> AgentProc {
    let dir = agent.dir.clone();
    agent.fc_ok(&["startfcmap", "--prep", map]);
    let size = on_source.len() as u64;
    let host_writes = |agent: &AgentProc, rng: &mut Rng, on_source: &mut Vec<u8>| {
        let mut q = Qio::open(&agent.nbd(source));
        for _ in 0..8 {
            let nblk = rng.range(1, 17);
            let w = Wr {
                vol: 0,
                off: rng.range(0, size / 4096 - nblk + 1) * 4096,
                len: 4096 * nblk,
                pat: rng.range(1, 256) as u8,
            };
            assert!(q.write(&w, false), "host write {w:?}");
            apply(std::slice::from_mut(on_source), &w);
        }
    };
    let mut reported = 0;
    for kill in 0..2 {
        host_writes(&agent, rng, on_source);
        // A writer races the copy (copy-on-write against background copy) through the kill, in
        // the first quarter only, so that its copy-on-writes do not complete the copy at once.
        let writer = Writer::spawn(vec![agent.nbd(source)], size / 4, rng.next(), ALONE);
        let (_, _, grains) = split_grains(&agent, map);
        reported = copy_past(&agent, map, reported, (kill + 1) * grains / 6);
        std::thread::sleep(rng.ms(0, 120));
        agent.kill9();
        let log = writer.finish();
        agent = AgentProc::start(&dir);
        agent.assert_exports();
        let (st, split, grains) = split_grains(&agent, map);
        println!(
            "{map}: kill {kill}: {reported}/{grains} grains reported before, {split} after the restart"
        );
        // Copying again, or already completed by the restarted workers (they start at once).
        let done = st == "idle_or_copied" && agent.json(&["lsfcmap", map])["progress"] == 100;
        assert!(st == "copying" || done, "{map} is {st} after the restart");
        assert!(
            split >= reported,
            "{map}: progress went back from {reported} to {split} grains: reported copies were not durable"
        );
        let actual = agent.read(source);
        check_source(std::slice::from_ref(on_source), &[&log], 0, &actual);
        *on_source = actual;
        assert!(
            agent.read(target) == image,
            "{map}: the target does not read its point in time after kill {kill}"
        );
        reported = split;
        if done {
            break;
        }
    }
    host_writes(&agent, rng, on_source);
    // It resumes by itself at its rate (or has completed already); then finish quickly.
    let t0 = Instant::now();
    loop {
        let (st, split, _) = split_grains(&agent, map);
        if st == "idle_or_copied" || split > reported {
            break;
        }
        assert_eq!(st, "copying");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{map}: the copy does not resume past {reported} grains after the restart"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.fc_ok(&["chfcmap", map, "--copyrate", "150"]);
    let w = agent.json(&["wait", map, "--timeout", "60"]);
    assert_eq!(w["state"], "idle_or_copied");
    assert_eq!(w["progress"], 100);
    assert!(
        agent.read(target) == image,
        "{map}: the target is not the source image at the start"
    );
    assert!(
        agent.read(source) == *on_source,
        "{map}: the source lost host writes"
    );
    agent
}

/// Two volumes with a dependent writer across them (each write acknowledged before the next, on
/// alternating volumes); a consistency-group start with kill -9 at once, while it prepares,
/// once prepared (around the switch), or right after it returned. After the restart the group is either started with both targets at
/// one point of the write stream (never a later write without an earlier one) covering every
/// write acknowledged before the start, or not started and startable.
#[test]
fn kill_around_group_start() {
    if !peers() {
        return;
    }
    let mut rng = Rng::new(seed("kill_around_group_start"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let size = 2 * MIB;
    let mut agent = AgentProc::start(&dir);
    let vols = [agent.mkvol("a", size), agent.mkvol("b", size)];
    let mut base = vec![vec![0u8; size as usize]; 2];
    let mut known: Vec<Known> = Vec::new();
    let (mut started, mut unstarted) = (0, 0);
    for round in 0..rounds().max(4) {
        let cg = format!("cg{round}");
        agent.fc_ok(&["mkfcconsistgrp", "--name", &cg]);
        let mut targets = Vec::new();
        for v in ["a", "b"] {
            let t = format!("{v}{round}");
            targets.push(agent.mkvol(&t, size));
            agent.fc_ok(&[
                "mkfcmap",
                "--source",
                v,
                "--target",
                &t,
                "--copyrate",
                "0",
                "--consistgrp",
                &cg,
            ]);
        }
        let writer = Writer::spawn(
            vols.iter().map(|v| agent.nbd(v)).collect(),
            size,
            rng.next(),
            ALONE,
        );
        std::thread::sleep(rng.ms(30, 150));
        let lo = writer.acked();
        let (pid, log_from) = (agent.pid(), agent.log_len());
        let call = Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"))
            .args([
                "fc",
                "--agent",
                &agent.uri(),
                "startfcconsistgrp",
                "--prep",
                &cg,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut kill_on = |what: &str| {
            agent.wait_log(log_from, what);
            std::thread::sleep(rng.ms(0, 3));
            sigkill(pid);
        };
        let (mode, ok, hi) = match round % 4 {
            0 => {
                // Before the call can have returned (fc may not even have connected).
                std::thread::sleep(rng.ms(0, 4));
                sigkill(pid);
                (
                    "at once",
                    call.wait_with_output().unwrap().status.success(),
                    None,
                )
            }
            1 => {
                // Once the prepare is durable: the sources are being flushed.
                kill_on("from=idle_or_copied to=preparing");
                (
                    "while preparing",
                    call.wait_with_output().unwrap().status.success(),
                    None,
                )
            }
            2 => {
                // Once prepared: the pause, flush, switch and its commit follow.
                kill_on("from=preparing to=prepared");
                (
                    "once prepared",
                    call.wait_with_output().unwrap().status.success(),
                    None,
                )
            }
            _ => {
                let out = call.wait_with_output().unwrap();
                let hi = writer.issued();
                sigkill(pid);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                ("right after", true, Some(hi))
            }
        };
        agent.reap();
        let log = writer.finish();
        let hi = hi.unwrap_or(log.writes.len());
        println!(
            "round {round}: kill {mode}: start {} ; writes {lo} acknowledged before it, {} acknowledged, {} issued",
            if ok { "returned" } else { "did not return" },
            log.acked,
            log.writes.len()
        );

        agent = AgentProc::start(&dir);
        agent.assert_exports();
        let actual: Vec<Vec<u8>> = vols.iter().map(|v| agent.read(v)).collect();
        for (i, a) in actual.iter().enumerate() {
            check_source(&base, &[&log], i, a);
        }
        let g = agent.json(&["lsfcconsistgrp", &cg]);
        let st = state(&g).to_string();
        let members = agent.json(&["lsfcmap", "--consistgrp", &cg]);
        for m in members.as_array().unwrap() {
            assert_eq!(state(m), st, "a member of {cg} differs from its group");
        }
        let expect = if st == "copying" {
            let imgs: Vec<Vec<u8>> = targets.iter().map(|t| agent.read(t)).collect();
            let Some((p, expect)) = find_prefix(
                &base,
                &log.writes,
                (lo, hi),
                &[(0, &imgs[0]), (1, &imgs[1])],
                ALONE,
            ) else {
                panic!(
                    "{cg}: the targets are not one point of the write stream within writes \
                     {lo}..={hi}\n{}",
                    agent.log_tail()
                );
            };
            println!("  {cg}: started, point in time after write {p} (window {lo}..={hi})");
            started += 1;
            expect
        } else {
            assert!(!ok, "{cg} reported started but is {st} after the restart");
            assert!(
                ["idle_or_copied", "prepared"].contains(&st.as_str()),
                "{cg} is {st} after the restart"
            );
            println!("  {cg}: not started ({st}); starting it now");
            unstarted += 1;
            let mut args = vec!["startfcconsistgrp", cg.as_str()];
            if st == "idle_or_copied" {
                args.insert(1, "--prep");
            }
            agent.fc_ok(&args);
            for (t, a) in targets.iter().zip(&actual) {
                assert!(agent.read(t) == *a, "{cg} started after the restart");
            }
            actual.clone()
        };
        for (t, image) in targets.iter().zip(expect) {
            known.push(Known {
                export: t.clone(),
                image,
            });
        }
        check_known(&agent, &known);
        base = actual;
    }
    println!("{started} group starts survived the kill, {unstarted} did not happen");
    agent.kill9();
}

/// Fills `len` bytes from `rng` and writes them over the export with `nbdcopy`.
fn random_image(agent: &AgentProc, export: &str, len: u64, rng: &mut Rng, tmp: &Path) -> Vec<u8> {
    let mut image = vec![0u8; len as usize];
    for c in image.chunks_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
    let file = tmp.join("image.bin");
    std::fs::write(&file, &image).unwrap();
    let o = Command::new("nbdcopy")
        .arg(&file)
        .arg(agent.nbd(export))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    image
}

/// Two snapshots of a 24 MiB volume, then the whole source rewritten: every grain is copied to
/// the newer snapshot B first, and the older A reads nearly all of its image through B. Stopping
/// B cleans those grains into A at the clean rate; kill -9 twice mid-cleaning. After each restart
/// A still reads its image and B is stopping (or done cleaning); at the end A holds its image by itself,
/// even once B's mapping and volume are gone.
#[test]
fn kill_during_cleaning() {
    if !peers() {
        return;
    }
    let mut rng = Rng::new(seed("kill_during_cleaning"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let size = 24 * MIB;
    let mut agent = AgentProc::start(&dir);
    let src = agent.mkvol("src", size);
    let a = agent.mkvol("a", size);
    let b = agent.mkvol("b", size);
    let image0 = random_image(&agent, &src, size, &mut rng, tmp.path());
    for (map, target) in [("ma", "a"), ("mb", "b")] {
        agent.fc_ok(&[
            "mkfcmap",
            "--source",
            "src",
            "--target",
            target,
            "--copyrate",
            "0",
            "--cleanrate",
            "65",
            "--name",
            map,
        ]);
    }
    agent.fc_ok(&["startfcmap", "--prep", "ma"]);
    // A few writes between the snapshots: those grains go to A itself.
    let mut image1 = image0.clone();
    let mut q = Qio::open(&agent.nbd(&src));
    for _ in 0..6 {
        let nblk = rng.range(1, 17);
        let w = Wr {
            vol: 0,
            off: rng.range(0, size / 4096 - nblk + 1) * 4096,
            len: 4096 * nblk,
            pat: rng.range(1, 256) as u8,
        };
        assert!(q.write(&w, false), "host write {w:?}");
        apply(std::slice::from_mut(&mut image1), &w);
    }
    drop(q);
    agent.fc_ok(&["startfcmap", "--prep", "mb"]);
    let image2 = random_image(&agent, &src, size, &mut rng, tmp.path());
    assert!(agent.read(&a) == image0, "A before the stop");
    assert!(agent.read(&b) == image1, "B before the stop");

    agent.fc_ok(&["stopfcmap", "mb"]);
    for kill in 0..2 {
        std::thread::sleep(rng.ms(50, 500));
        let st = agent.json(&["lsfcmap", "mb"]);
        if kill == 0 {
            assert_eq!(
                state(&st),
                "stopping",
                "B finished cleaning before the kill"
            );
        }
        agent.kill9();
        agent = AgentProc::start(&dir);
        agent.assert_exports();
        let st = state(&agent.json(&["lsfcmap", "mb"])).to_string();
        println!("kill {kill}: B is {st} after the restart");
        // B is fully split, so it ends idle_or_copied (stopped if it were not).
        assert!(
            ["stopping", "stopped", "idle_or_copied"].contains(&st.as_str()),
            "B is {st}"
        );
        assert!(
            agent.read(&a) == image0,
            "A lost its image in cleaning after kill {kill}"
        );
        assert!(agent.read(&src) == image2, "the source after kill {kill}");
    }
    agent.fc_ok(&["chfcmap", "mb", "--cleanrate", "150"]);
    let t0 = Instant::now();
    while state(&agent.json(&["lsfcmap", "mb"])) == "stopping" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "cleaning never ends"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.fc_ok(&["rmfcmap", "mb"]);
    agent.fc_ok(&["rmvol", "b"]);
    assert!(agent.read(&a) == image0, "A without B");
    agent.kill9();
    let agent = AgentProc::start(&dir);
    assert!(agent.read(&a) == image0, "A without B, after a restart");
    agent.kill9();
}
