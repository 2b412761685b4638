//! Benchmark of changed-block tracking (issue 13; see /work/shared/docs/BENCHMARKS.md).
//!
//! `cargo bench --bench cbt [-- --reps=N] [--peer-mib=N]`
//!
//! GetMetadataDelta through the CSI SnapshotMetadata service (controller on a Unix socket, agent
//! in this process) between two snapshots of a 1 TiB sparse volume (256 KiB grains, 4 Mi
//! grains) of which 1% and 50% of the grains changed between the two starts, the changed
//! grains scattered (every changed grain its own extent: the worst case for the listing).
//! Printed: time to the last message, extents, messages, and the peak RSS growth of the process
//! during the listing (VmHWM after resetting it; agent, controller and client share the process).
//!
//! The engine state is built directly (the ops a 1 TiB run of writes would journal: start,
//! MarkSplit per changed grain, start) and the pool opened on it with stores that hold no bytes
//! (reads are zeros), so no terabyte is written; the listing reads only bitmaps anyway.
//!
//! Peer, in the same run: `qemu-img compare` of two exports of `--peer-mib` (default 1024)
//! over the agent's NBD socket (same stores: reads cost no disk, so this is a lower bound for
//! the peer), extrapolated linearly to 1 TiB.

use anyhow::{Context, Result};
use flashcopy_csi::agent::{self, Config};
use flashcopy_csi::csi::{Agents, ControllerService};
use flashcopy_csi::engine::{Engine, GrainSize, Limits, MapId, MappingSpec, Op, VolId};
use flashcopy_csi::meta::{Journal, MetaFiles};
use flashcopy_csi::proto::csi::v1 as csi;
use flashcopy_csi::proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
use flashcopy_csi::store::{BlockStore, StoreError};
use flashcopy_csi::volume::{Backend, Pool, PoolConfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Endpoint;

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;
const GRAIN: u64 = 256 * 1024;
const NODE: &str = "bench-node";

/// A store that holds nothing: reads are zeros, writes vanish.
#[derive(Debug)]
struct NullStore(AtomicU64);

impl BlockStore for NullStore {
    fn len(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn read_at(&self, buf: &mut [u8], _: u64) -> Result<(), StoreError> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), StoreError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), StoreError> {
        Ok(())
    }
    fn resize(&self, n: u64) -> Result<(), StoreError> {
        self.0.store(n, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Debug)]
struct NullBackend(parking_lot::Mutex<BTreeMap<VolId, u64>>);

impl Backend for NullBackend {
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        self.0.lock().insert(vol, size);
        Ok(Arc::new(NullStore(AtomicU64::new(size))))
    }
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        let size = self.0.lock().get(&vol).copied().unwrap_or(0);
        Ok(Arc::new(NullStore(AtomicU64::new(size))))
    }
    fn remove(&self, vol: VolId) -> Result<(), StoreError> {
        self.0.lock().remove(&vol);
        Ok(())
    }
    fn list(&self) -> Result<Vec<VolId>, StoreError> {
        Ok(self.0.lock().keys().copied().collect())
    }
}

fn apply(e: &mut Engine, sizes: &mut BTreeMap<VolId, u64>, op: Op) -> Result<()> {
    if let Op::CreateVolume { id, size, .. } = &op {
        sizes.insert(*id, *size);
    }
    e.apply(&op).with_context(|| format!("{op:?}"))?;
    Ok(())
}

fn snapshot(
    e: &mut Engine,
    sizes: &mut BTreeMap<VolId, u64>,
    src: VolId,
    now: u64,
) -> Result<MapId> {
    let t = e.next_volume_id();
    let name = format!("s.t{}", t.0);
    apply(
        e,
        sizes,
        Op::CreateVolume {
            id: t,
            name: name.clone(),
            size: TIB,
            origin: String::new(),
        },
    )?;
    let map = e.next_mapping_id();
    let mut spec = MappingSpec::snapshot(src, t);
    spec.grain = Some(GrainSize::K256);
    spec.name = Some(name);
    apply(e, sizes, Op::CreateMapping { id: map, spec })?;
    apply(
        e,
        sizes,
        Op::Prepare {
            map,
            restore: false,
        },
    )?;
    apply(e, sizes, Op::FlushDone { map })?;
    apply(e, sizes, Op::Start { map, now })?;
    Ok(map)
}

/// The engine, the volume sizes for the stores, snapshots A and B, the peer volumes.
type Built = (Engine, BTreeMap<VolId, u64>, [MapId; 2], [VolId; 2]);

/// An engine with a 1 TiB source, snapshot A, `percent`% of the grains written (scattered:
/// every `100/percent`-th grain, never two adjacent below 50%), snapshot B, and two plain
/// `peer` volumes for the peer.
fn build(percent: u64, peer: u64) -> Result<Built> {
    let mut e = Engine::new(Limits::default());
    let mut sizes = BTreeMap::new();
    let src = e.next_volume_id();
    apply(
        &mut e,
        &mut sizes,
        Op::CreateVolume {
            id: src,
            name: "v.src".into(),
            size: TIB,
            origin: String::new(),
        },
    )?;
    let a = snapshot(&mut e, &mut sizes, src, 1)?;
    let grains = TIB / GRAIN;
    let step = 100 / percent;
    for g in (0..grains).step_by(step as usize) {
        apply(&mut e, &mut sizes, Op::MarkSplit { map: a, grain: g })?;
    }
    let b = snapshot(&mut e, &mut sizes, src, 2)?;
    let mut peers = [VolId(0); 2];
    for (i, p) in peers.iter_mut().enumerate() {
        *p = e.next_volume_id();
        apply(
            &mut e,
            &mut sizes,
            Op::CreateVolume {
                id: *p,
                name: format!("v.peer{i}"),
                size: peer,
                origin: String::new(),
            },
        )?;
    }
    Ok((e, sizes, [a, b], peers))
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (Linux >= 4.0).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

struct Row {
    secs: f64,
    extents: u64,
    messages: u64,
    peak_growth_kib: u64,
}

async fn list(sock: &Path, base: &str, target: &str) -> Result<Row> {
    let ch = Endpoint::from_shared(format!("unix://{}", sock.display()))?
        .connect()
        .await?;
    let mut md = SnapshotMetadataClient::new(ch);
    reset_peak();
    let before = status_kib("VmRSS:");
    let t0 = Instant::now();
    let mut st = md
        .get_metadata_delta(csi::GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset: 0,
            max_results: 0,
            secrets: Default::default(),
        })
        .await?
        .into_inner();
    let (mut extents, mut messages) = (0u64, 0u64);
    while let Some(m) = st.message().await? {
        messages += 1;
        extents += m.block_metadata.len() as u64;
    }
    Ok(Row {
        secs: t0.elapsed().as_secs_f64(),
        extents,
        messages,
        peak_growth_kib: status_kib("VmHWM:").saturating_sub(before),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let arg = |name: &str, default: u64| {
        std::env::args()
            .find_map(|a| a.strip_prefix(&format!("--{name}="))?.parse().ok())
            .unwrap_or(default)
    };
    let reps = arg("reps", 3) as usize;
    let peer_mib = arg("peer-mib", 1024);
    println!("GetMetadataDelta, 1 TiB sparse volume, 256 KiB grains, median of {reps}");
    println!(
        "{:<10} {:>10} {:>9} {:>12} {:>16} {:>22}",
        "changed", "extents", "messages", "last msg s", "peak RSS +MiB", "peer extrapolated s"
    );
    for percent in [1u64, 50] {
        let dir = tempfile::tempdir()?;
        let (engine, sizes, [a, b], peers) = build(percent, peer_mib * MIB)?;
        let meta = MetaFiles::in_memory();
        {
            let (mut j, _) = Journal::open(meta.clone())?;
            j.checkpoint(&bincode::serialize(&engine)?)?;
        }
        drop(engine);
        let backend = Arc::new(NullBackend(parking_lot::Mutex::new(sizes)));
        let pool = Pool::open(meta, backend, PoolConfig::default())?;
        let cfg = Config::new(dir.path().join("data"));
        std::fs::create_dir_all(&cfg.data_dir)?;
        let agent_sock = cfg.agent_socket();
        let nbd_sock = cfg.nbd_socket_path();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (cstop_tx, cstop_rx) = tokio::sync::oneshot::channel::<()>();
        let agent_task = rt.spawn(agent::run_with_pool(cfg, pool, async {
            let _ = stop_rx.await;
        }));
        while std::os::unix::net::UnixStream::connect(&agent_sock).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let agents = Agents::new(
            vec![(NODE.into(), format!("unix://{}", agent_sock.display()))],
            None,
        )
        .map_err(anyhow::Error::msg)?;
        let svc = ControllerService::new(agents, Duration::from_secs(5));
        let csi_sock = dir.path().join("csi.sock");
        let l = {
            let _g = rt.enter();
            flashcopy_csi::csi::bind_unix(&csi_sock)?
        };
        let csi_task = rt.spawn(flashcopy_csi::csi::serve_controller(svc, l, async {
            let _ = cstop_rx.await;
        }));
        let (base, target) = (
            format!("snap:{NODE}:{}", a.0),
            format!("snap:{NODE}:{}", b.0),
        );
        let mut rows = Vec::new();
        for _ in 0..reps {
            rows.push(rt.block_on(list(&csi_sock, &base, &target))?);
        }
        let want = (TIB / GRAIN).div_ceil(100 / percent);
        for r in &rows {
            anyhow::ensure!(r.extents == want, "{} extents, want {want}", r.extents);
        }
        // Peer: qemu-img compare reads both images in full.
        let mut peer = Vec::new();
        for _ in 0..reps {
            let uri = |v: VolId| format!("nbd+unix:///{}?socket={}", v.0, nbd_sock.display());
            let t0 = Instant::now();
            let out = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(uri(peers[0]))
                .arg(uri(peers[1]))
                .output()
                .context("qemu-img (qemu-utils) is the peer")?;
            anyhow::ensure!(out.status.success(), "qemu-img compare: {out:?}");
            peer.push(t0.elapsed().as_secs_f64() * (TIB / (peer_mib * MIB)) as f64);
        }
        println!(
            "{:<10} {:>10} {:>9} {:>12.3} {:>16.1} {:>22.1}",
            format!("{percent}%"),
            rows[0].extents,
            rows[0].messages,
            median(rows.iter().map(|r| r.secs).collect()),
            median(
                rows.iter()
                    .map(|r| r.peak_growth_kib as f64 / 1024.0)
                    .collect()
            ),
            median(peer),
        );
        let _ = stop_tx.send(());
        let _ = cstop_tx.send(());
        let _ = rt.block_on(csi_task);
        let _ = rt.block_on(agent_task);
    }
    println!(
        "(peer: qemu-img compare of two {peer_mib} MiB exports over the same NBD socket, x{})",
        TIB / (peer_mib * MIB)
    );
    Ok(())
}
