//! Benchmarks of the CSI controller over a real agent (see /work/shared/docs/BENCHMARKS.md).
//!
//! `cargo bench --bench csi [-- --dir=PATH | --tmpfs] [--snapshots=N] [--rounds=N]
//! [--only=snap,group,scale] [--group-volumes=N] [--group-mib=N] [--scale-calls=N]`
//!
//! Starts an agent on a temporary directory (under /var/tmp, `--dir`, or /dev/shm with
//! `--tmpfs`) and the CSI controller on a Unix socket, both in this process on their own
//! runtimes, and drives them with the generated CSI client; data goes through the agent's NBD
//! socket with a small NBD client of our own. Prints tables and never asserts timings.
//!
//! 1. CreateSnapshot end to end at the client, alternating between a 1 GiB volume full of data
//!    and a sparse 1 TiB volume (`--snapshots` of each, default 200, below the 256 snapshots of
//!    one source); p50/p90/p99/max of each and the 1 TiB / 1 GiB p99 ratio. The peer is a full
//!    copy of the 1 GiB volume file (`cp --reflink=never`), what a copying driver pays.
//! 2. CreateVolumeGroupSnapshot of 16 volumes (64 MiB each) while 16 writers (one NBD connection
//!    per volume) write 4 KiB blocks with FUA, then DeleteVolumeGroupSnapshot; `--rounds`
//!    (default 50). Per round: the I/O pause window the agent measured (GetAgentInfo
//!    `last_pause_micros`), the longest write the writers saw overlapping the call, and as the
//!    peer the longest write in an equally long window just before the call.
//! 3. CreateSnapshot with 16 and with 4096 mappings on the agent (IBM's limits: 16 sources x
//!    256 snapshots). Two agents, each with 16 sparse 1 GiB sources: one holds 15 snapshots,
//!    the other 4095 (sources 0-14 full, 255 of source 15); each call snapshots source 15, so it
//!    makes the 16th or the 4096th mapping, and DeleteSnapshot takes it away again (then 20 ms
//!    pass before the next call). Calls alternate between the agents (`--scale-calls` of each, default 50); p50/p99 of each and
//!    their ratios (target <= 1.2: a start must cost the same at the 4096th mapping).

use anyhow::{Context, Result, bail};
use flashcopy_csi::agent::{self, Config};
use flashcopy_csi::csi::ids::{self, Kind};
use flashcopy_csi::csi::{Agents, ControllerService};
use flashcopy_csi::proto::agent::v1 as apb;
use flashcopy_csi::proto::agent::v1::agent_client::AgentClient;
use flashcopy_csi::proto::csi::v1 as csi;
use flashcopy_csi::proto::csi::v1::controller_client::ControllerClient;
use flashcopy_csi::proto::csi::v1::group_controller_client::GroupControllerClient;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const NODE: &str = "bench-node";

/// What to run, from the command line.
struct Cfg {
    dir: PathBuf,
    snapshots: usize,
    rounds: usize,
    snap: bool,
    group: bool,
    group_volumes: usize,
    group_mib: u64,
    scale: bool,
    scale_calls: usize,
}

impl Cfg {
    fn from_args() -> Self {
        let mut c = Cfg {
            dir: PathBuf::from("/var/tmp"),
            snapshots: 200,
            rounds: 50,
            snap: true,
            group: true,
            group_volumes: 16,
            group_mib: 64,
            scale: true,
            scale_calls: 50,
        };
        for a in std::env::args().skip(1) {
            let num = |v: &str| v.parse::<usize>().ok();
            if a == "--tmpfs" {
                c.dir = PathBuf::from("/dev/shm");
            } else if let Some(d) = a.strip_prefix("--dir=") {
                c.dir = PathBuf::from(d);
            } else if let Some(n) = a.strip_prefix("--snapshots=").and_then(num) {
                // Snapshots of one source are limited to 256 (FLASHCOPY.md).
                c.snapshots = n.clamp(1, 250);
            } else if let Some(n) = a.strip_prefix("--rounds=").and_then(num) {
                c.rounds = n.max(1);
            } else if let Some(n) = a.strip_prefix("--group-volumes=").and_then(num) {
                c.group_volumes = n.max(1);
            } else if let Some(n) = a.strip_prefix("--group-mib=").and_then(num) {
                c.group_mib = n.max(1) as u64;
            } else if let Some(n) = a.strip_prefix("--scale-calls=").and_then(num) {
                c.scale_calls = n.max(1);
            } else if let Some(list) = a.strip_prefix("--only=") {
                c.snap = list.contains("snap");
                c.group = list.contains("group");
                c.scale = list.contains("scale");
            }
            // Anything else (cargo's `--bench`, name filters) is ignored.
        }
        c
    }
}

/// The agent and the CSI controller, each on its own runtime thread.
struct Stack {
    data: PathBuf,
    agent_cfg: Config,
    csi_sock: PathBuf,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn runtime_thread(
    name: &str,
    f: impl FnOnce(oneshot::Receiver<()>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
    + Send
    + 'static,
) -> (oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel();
    let t = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(f(rx));
        })
        .unwrap();
    (tx, t)
}

fn wait_for_socket(p: &Path) -> Result<()> {
    let t0 = Instant::now();
    while UnixStream::connect(p).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{} did not come up", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Stack {
    fn start(data: &Path) -> Result<Self> {
        let mut agent_cfg = Config::new(data.join("agent"));
        // Thin provisioning: 250 snapshots of a 1 TiB volume are 250 TiB of targets.
        agent_cfg.capacity = Some(1 << 60);
        let csi_sock = data.join("csi.sock");
        let (a_stop, a_thread) = runtime_thread("agent", {
            let c = agent_cfg.clone();
            move |rx| {
                Box::pin(async move {
                    if let Err(e) = agent::run(c, async {
                        let _ = rx.await;
                    })
                    .await
                    {
                        eprintln!("agent: {e}");
                    }
                })
            }
        });
        wait_for_socket(&agent_cfg.agent_socket())?;
        let agents = Agents::new(
            vec![(
                NODE.to_string(),
                format!("unix://{}", agent_cfg.agent_socket().display()),
            )],
            None,
        )
        .map_err(anyhow::Error::msg)?;
        let svc = ControllerService::new(agents, Duration::from_secs(5));
        let (c_stop, c_thread) = runtime_thread("csi", {
            let p = csi_sock.clone();
            move |rx| {
                Box::pin(async move {
                    let l = flashcopy_csi::csi::bind_unix(&p).expect("binding the CSI socket");
                    if let Err(e) = flashcopy_csi::csi::serve_controller(svc, l, async {
                        let _ = rx.await;
                    })
                    .await
                    {
                        eprintln!("csi: {e}");
                    }
                })
            }
        });
        wait_for_socket(&csi_sock)?;
        Ok(Self {
            data: data.to_path_buf(),
            agent_cfg,
            csi_sock,
            stops: vec![c_stop, a_stop],
            threads: vec![c_thread, a_thread],
        })
    }

    async fn channel(uri: String) -> Result<Channel> {
        Ok(Endpoint::from_shared(uri)?.connect().await?)
    }

    async fn csi(&self) -> Result<Channel> {
        Self::channel(format!("unix://{}", self.csi_sock.display())).await
    }

    async fn agent(&self) -> Result<AgentClient<Channel>> {
        Ok(AgentClient::new(
            Self::channel(format!(
                "unix://{}",
                self.agent_cfg.agent_socket().display()
            ))
            .await?,
        ))
    }

    fn nbd(&self, volume_id: &str) -> Result<Nbd> {
        let o = ids::parse(Kind::Volume, volume_id).context("volume id")?;
        Nbd::connect(&self.agent_cfg.nbd_socket_path(), &o.id.to_string())
    }

    /// The file behind a volume (the directory backend keeps one file per volume).
    fn volume_file(&self, volume_id: &str) -> Result<PathBuf> {
        let o = ids::parse(Kind::Volume, volume_id).context("volume id")?;
        let p = self
            .agent_cfg
            .data_dir
            .join("volumes")
            .join(format!("{}.img", o.id));
        if !p.exists() {
            bail!("no file {} for volume {}", p.display(), o.id);
        }
        Ok(p)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A minimal synchronous NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies).
struct Nbd {
    s: UnixStream,
    size: u64,
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

impl Nbd {
    fn connect(sock: &Path, export: &str) -> Result<Self> {
        let mut s = UnixStream::connect(sock).with_context(|| sock.display().to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut b = [0u8; 18];
        s.read_exact(&mut b)?;
        if b[..8] != NBDMAGIC.to_be_bytes() || b[8..16] != IHAVEOPT.to_be_bytes() {
            bail!("not an NBD newstyle server");
        }
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        m.extend_from_slice(&(export.len() as u32).to_be_bytes());
        m.extend_from_slice(export.as_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&m)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if h[..8] != OPT_REPLY_MAGIC.to_be_bytes() {
                bail!("bad option reply");
            }
            let typ = u32::from_be_bytes(h[12..16].try_into()?);
            let len = u32::from_be_bytes(h[16..20].try_into()?) as usize;
            let mut d = vec![0; len];
            s.read_exact(&mut d)?;
            match typ {
                REP_INFO if len >= 12 && d[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into()?));
                }
                REP_INFO => {}
                REP_ACK => break,
                t => bail!("NBD_OPT_GO {export}: reply {t:#x}"),
            }
        }
        Ok(Self {
            s,
            size: size.context("no NBD_INFO_EXPORT")?,
        })
    }

    fn request(&mut self, flags: u16, kind: u16, offset: u64, data: &[u8], len: u32) -> Result<()> {
        let mut m = [0u8; 28];
        m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m[4..6].copy_from_slice(&flags.to_be_bytes());
        m[6..8].copy_from_slice(&kind.to_be_bytes());
        m[8..16].copy_from_slice(&1u64.to_be_bytes());
        m[16..24].copy_from_slice(&offset.to_be_bytes());
        m[24..28].copy_from_slice(&len.to_be_bytes());
        self.s.write_all(&m)?;
        self.s.write_all(data)?;
        if kind == CMD_DISC {
            return Ok(());
        }
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if r[..4] != SIMPLE_REPLY_MAGIC.to_be_bytes() {
            bail!("bad reply magic");
        }
        let err = u32::from_be_bytes(r[4..8].try_into()?);
        if err != 0 {
            bail!("NBD error {err} at offset {offset}");
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(flags, CMD_WRITE, offset, data, data.len() as u32)
    }

    fn flush(&mut self) -> Result<()> {
        self.request(0, CMD_FLUSH, 0, &[], 0)
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.request(0, CMD_DISC, 0, &[], 0);
    }
}

/// Cheap pseudo-random bytes (xorshift64*), incompressible enough for a storage benchmark.
fn fill_random(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let v = seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

fn block_cap() -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

async fn create_volume(
    ctl: &mut ControllerClient<Channel>,
    name: &str,
    bytes: u64,
) -> Result<String> {
    let v = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block_cap()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume in the response")?;
    Ok(v.volume_id)
}

/// Percentiles of durations (nearest rank).
struct Dist(Vec<Duration>);

impl Dist {
    fn new(mut v: Vec<Duration>) -> Self {
        v.sort();
        Self(v)
    }
    fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }
    fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn row(name: &str, d: &Dist, target: &str) {
    println!(
        "| {name:<48} | {:>5} | {:>9} | {:>9} | {:>9} | {:>9} | {target:<10} |",
        d.0.len(),
        ms(d.pct(50.0)),
        ms(d.pct(90.0)),
        ms(d.pct(99.0)),
        ms(d.max()),
    );
}

fn header() {
    println!(
        "| {:<48} | {:>5} | {:>9} | {:>9} | {:>9} | {:>9} | {:<10} |",
        "what (ms)", "n", "p50", "p90", "p99", "max", "target"
    );
    println!(
        "|{}|{}|{}|{}|{}|{}|{}|",
        "-".repeat(50),
        "-".repeat(7),
        "-".repeat(11),
        "-".repeat(11),
        "-".repeat(11),
        "-".repeat(11),
        "-".repeat(12)
    );
}

async fn bench_snapshots(stack: &Stack, cfg: &Cfg) -> Result<()> {
    let mut ctl = ControllerClient::new(stack.csi().await?);
    let small = create_volume(&mut ctl, "bench-1g", GIB).await?;
    let big = create_volume(&mut ctl, "bench-1t", TIB).await?;

    // Fill the 1 GiB volume through NBD.
    let t0 = Instant::now();
    {
        let mut n = stack.nbd(&small)?;
        let chunk = 4 * MIB as usize;
        let mut buf = vec![0u8; chunk];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut off = 0;
        while off < n.size {
            fill_random(&mut buf, &mut seed);
            n.write(off, &buf, false)?;
            off += chunk as u64;
        }
        n.flush()?;
    }
    let fill = t0.elapsed();
    println!(
        "filled 1 GiB through NBD in {:.2} s ({:.0} MiB/s)",
        fill.as_secs_f64(),
        1024.0 / fill.as_secs_f64()
    );

    // The peer: a full copy of the volume file, what a copying driver pays per snapshot.
    let file = stack.volume_file(&small)?;
    let mut copies = Vec::new();
    for i in 0..3 {
        let dst = stack.data.join(format!("copy-{i}"));
        let t = Instant::now();
        let st = std::process::Command::new("cp")
            .arg("--reflink=never")
            .arg(&file)
            .arg(&dst)
            .status()?;
        let st2 = std::process::Command::new("sync").arg(&dst).status()?;
        copies.push(t.elapsed());
        let _ = std::fs::remove_file(&dst);
        if !st.success() || !st2.success() {
            bail!("cp --reflink=never {} failed", file.display());
        }
    }

    // Alternate the two sources so a noisy neighbour hits both alike.
    let (mut t_small, mut t_big) = (Vec::new(), Vec::new());
    for i in 0..cfg.snapshots {
        for (src, out, tag) in [(&small, &mut t_small, "1g"), (&big, &mut t_big, "1t")] {
            let t = Instant::now();
            let s = ctl
                .create_snapshot(csi::CreateSnapshotRequest {
                    name: format!("bench-{tag}-{i}"),
                    source_volume_id: src.clone(),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("snapshot {i} of {tag}"))?
                .into_inner()
                .snapshot
                .context("no snapshot")?;
            out.push(t.elapsed());
            if !s.ready_to_use {
                bail!("snapshot {} is not ready to use", s.snapshot_id);
            }
        }
    }
    // Does a call get slower as snapshots of the source pile up?
    let tenth = (cfg.snapshots / 10).max(1);
    let first_last = |v: &[Duration]| {
        (
            Dist::new(v[..tenth].to_vec()).pct(50.0),
            Dist::new(v[v.len() - tenth..].to_vec()).pct(50.0),
        )
    };
    let (s0, s1) = first_last(&t_small);
    let (b0, b1) = first_last(&t_big);
    let (ds, db, dc) = (Dist::new(t_small), Dist::new(t_big), Dist::new(copies));
    println!();
    println!(
        "CreateSnapshot, end to end at the CSI client ({} of each, alternating):",
        cfg.snapshots
    );
    header();
    row("CreateSnapshot 1 GiB volume full of data", &ds, "p99 <= 10");
    row("CreateSnapshot 1 TiB sparse volume", &db, "p99 <= 10");
    row("peer: cp --reflink=never + sync of 1 GiB", &dc, "");
    let ratio = db.pct(99.0).as_secs_f64() / ds.pct(99.0).as_secs_f64().max(1e-9);
    println!(
        "1 TiB / 1 GiB p99 ratio: {ratio:.2} (target <= 1.5); 1 GiB full copy / snapshot p99: {:.0}x",
        dc.pct(50.0).as_secs_f64() / ds.pct(99.0).as_secs_f64().max(1e-9)
    );
    println!(
        "p50 of the first / last {tenth} calls: 1 GiB {} / {} ms, 1 TiB {} / {} ms",
        ms(s0),
        ms(s1),
        ms(b0),
        ms(b1)
    );
    Ok(())
}

/// Sources per agent in the scale bench, and IBM's snapshots per source.
const SCALE_SOURCES: usize = 16;
const MAPS_PER_SOURCE: usize = 256;

async fn snapshot(ctl: &mut ControllerClient<Channel>, name: String, src: &str) -> Result<String> {
    let s = ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            name: name.clone(),
            source_volume_id: src.into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("snapshot {name}"))?
        .into_inner()
        .snapshot
        .context("no snapshot")?;
    if !s.ready_to_use {
        bail!("snapshot {} is not ready to use", s.snapshot_id);
    }
    Ok(s.snapshot_id)
}

/// An agent with 16 sources and `mappings - 1` snapshots of them, all but source 15's first.
async fn scale_stack(
    base: &Path,
    mappings: usize,
) -> Result<(Stack, ControllerClient<Channel>, String)> {
    let stack = Stack::start(&base.join(format!("scale-{mappings}")))?;
    let mut ctl = ControllerClient::new(stack.csi().await?);
    let mut srcs = Vec::new();
    for i in 0..SCALE_SOURCES {
        srcs.push(create_volume(&mut ctl, &format!("scale-src-{i}"), GIB).await?);
    }
    let last = SCALE_SOURCES - 1;
    let per = ((mappings - 1) / last).min(MAPS_PER_SOURCE);
    let on_last = mappings - 1 - per * last;
    let t0 = Instant::now();
    for (i, src) in srcs.iter().enumerate() {
        let n = if i == last { on_last } else { per };
        for j in 0..n {
            snapshot(&mut ctl, format!("scale-fill-{i}-{j}"), src).await?;
        }
    }
    println!(
        "agent with {mappings} mappings: {} snapshots made in {:.1} s",
        mappings - 1,
        t0.elapsed().as_secs_f64()
    );
    Ok((stack, ctl, srcs.swap_remove(last)))
}

/// Returns the agents, to be stopped outside the runtime (their clients are closed here).
async fn bench_scale(base: &Path, cfg: &Cfg) -> Result<Vec<Stack>> {
    let levels = [16, 4096];
    let mut agents = Vec::new();
    for n in levels {
        agents.push(scale_stack(base, n).await?);
    }
    let mut creates = vec![Vec::new(); levels.len()];
    let mut deletes = vec![Vec::new(); levels.len()];
    for i in 0..cfg.scale_calls {
        for (k, (_, ctl, src)) in agents.iter_mut().enumerate() {
            let t = Instant::now();
            let id = snapshot(ctl, format!("scale-call-{i}"), src).await?;
            creates[k].push(t.elapsed());
            let t = Instant::now();
            ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id,
                ..Default::default()
            })
            .await?;
            deletes[k].push(t.elapsed());
            // Let what the delete left running (the copy workers' scan) finish first: the
            // row is about the create.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let c: Vec<Dist> = creates.into_iter().map(Dist::new).collect();
    println!();
    println!(
        "CreateSnapshot with 16 and with 4096 mappings on the agent ({} of each, alternating):",
        cfg.scale_calls
    );
    header();
    for (n, d) in levels.iter().zip(&c) {
        row(&format!("CreateSnapshot, the {n}th mapping"), d, "");
    }
    for (n, d) in levels.iter().zip(deletes) {
        row(
            &format!("DeleteSnapshot, back to {} mappings", n - 1),
            &Dist::new(d),
            "",
        );
    }
    let ratio = |p| c[1].pct(p).as_secs_f64() / c[0].pct(p).as_secs_f64().max(1e-9);
    println!(
        "4096 / 16 mappings: p50 ratio {:.2}, p99 ratio {:.2} (target <= 1.2)",
        ratio(50.0),
        ratio(99.0)
    );
    Ok(agents.into_iter().map(|(stack, _, _)| stack).collect())
}

/// One write as a writer saw it: start and end since the bench's epoch.
#[derive(Clone, Copy)]
struct Op {
    start: Duration,
    end: Duration,
}

fn writer(mut n: Nbd, epoch: Instant, stop: Arc<AtomicBool>, seed: u64) -> Result<Vec<Op>> {
    let mut ops = Vec::with_capacity(1 << 16);
    let mut buf = vec![0u8; 4096];
    let mut seed = seed | 1;
    let blocks = n.size / 4096;
    while !stop.load(Ordering::Relaxed) {
        fill_random(&mut buf, &mut seed);
        let off = (seed % blocks) * 4096;
        let start = epoch.elapsed();
        n.write(off, &buf, true)?;
        ops.push(Op {
            start,
            end: epoch.elapsed(),
        });
    }
    Ok(ops)
}

/// The longest write in flight at any time in `[a, b]`.
fn longest(ops: &[Vec<Op>], a: Duration, b: Duration) -> Duration {
    ops.iter()
        .flatten()
        .filter(|o| o.start <= b && o.end >= a)
        .map(|o| o.end - o.start)
        .max()
        .unwrap_or_default()
}

async fn bench_group(stack: &Stack, cfg: &Cfg) -> Result<()> {
    let ch = stack.csi().await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut grp = GroupControllerClient::new(ch);
    let mut agent = stack.agent().await?;
    let mut vols = Vec::new();
    for i in 0..cfg.group_volumes {
        vols.push(create_volume(&mut ctl, &format!("bench-g{i}"), cfg.group_mib * MIB).await?);
    }
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, v) in vols.iter().enumerate() {
        let n = stack.nbd(v)?;
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || {
            writer(n, epoch, stop, 0x1234_5678 + i as u64 * 7919)
        }));
    }
    // Let the writers reach a steady state before the first round.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut calls = Vec::new();
    let mut pauses = Vec::new();
    let mut deletes = Vec::new();
    let mut err = None;
    for r in 0..cfg.rounds {
        let a = epoch.elapsed();
        let t = Instant::now();
        let g = grp
            .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: format!("bench-group-{r}"),
                source_volume_ids: vols.clone(),
                ..Default::default()
            })
            .await;
        let took = t.elapsed();
        let b = epoch.elapsed();
        let g = match g {
            Ok(g) => g.into_inner().group_snapshot.context("no group snapshot")?,
            Err(s) => {
                err = Some(anyhow::anyhow!("group snapshot round {r}: {s}"));
                break;
            }
        };
        let info = agent
            .get_agent_info(apb::GetAgentInfoRequest {})
            .await?
            .into_inner();
        pauses.push(Duration::from_micros(info.last_pause_micros));
        calls.push((a, b, took));
        let t = Instant::now();
        grp.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: g.group_snapshot_id,
            snapshot_ids: g.snapshots.into_iter().map(|s| s.snapshot_id).collect(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("deleting group snapshot {r}"))?;
        deletes.push(t.elapsed());
        // Quiet time between rounds: the peer window before the next call.
        tokio::time::sleep(Duration::from_millis(50).max(took)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut ops = Vec::new();
    for w in writers {
        ops.push(w.join().expect("writer panicked")?);
    }
    if let Some(e) = err {
        return Err(e);
    }
    let writes: usize = ops.iter().map(Vec::len).sum();
    let during: Vec<Duration> = calls.iter().map(|&(a, b, _)| longest(&ops, a, b)).collect();
    let before: Vec<Duration> = calls
        .iter()
        .map(|&(a, b, _)| {
            let d = b - a;
            let end = a.saturating_sub(Duration::from_millis(5));
            longest(&ops, end.saturating_sub(d), end)
        })
        .collect();
    let all = Dist::new(ops.iter().flatten().map(|o| o.end - o.start).collect());
    println!();
    println!(
        "CreateVolumeGroupSnapshot of {} volumes of {} MiB under {} FUA 4 KiB writers ({} rounds, {} writes, {:.0} writes/s):",
        vols.len(),
        cfg.group_mib,
        vols.len(),
        calls.len(),
        writes,
        writes as f64 / epoch.elapsed().as_secs_f64()
    );
    header();
    row(
        "I/O pause window (agent-measured)",
        &Dist::new(pauses),
        "p99 <= 5",
    );
    row(
        "longest write overlapping the call (client)",
        &Dist::new(during.clone()),
        "p99 <= 5",
    );
    row(
        "peer: longest write, same-length window before",
        &Dist::new(before.clone()),
        "",
    );
    row(
        "CreateVolumeGroupSnapshot call",
        &Dist::new(calls.iter().map(|c| c.2).collect()),
        "",
    );
    row("DeleteVolumeGroupSnapshot call", &Dist::new(deletes), "");
    row("every write (client)", &all, "");
    Ok(())
}

fn main() -> Result<()> {
    let cfg = Cfg::from_args();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let base = tempfile::Builder::new()
        .prefix("csi-bench-")
        .tempdir_in(&cfg.dir)
        .with_context(|| format!("a temporary directory in {}", cfg.dir.display()))?;
    println!("# CSI benchmarks on {}", base.path().display());
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {}", l.trim());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if cfg.snap {
        let stack = Stack::start(&base.path().join("snap"))?;
        rt.block_on(bench_snapshots(&stack, &cfg))?;
    }
    if cfg.group {
        let stack = Stack::start(&base.path().join("group"))?;
        rt.block_on(bench_group(&stack, &cfg))?;
    }
    if cfg.scale {
        let stacks = rt.block_on(bench_scale(base.path(), &cfg))?;
        drop(stacks);
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at end: {}", l.trim());
    }
    Ok(())
}
