//! Copy failures and I/O-driven state changes on the agent's event stream: an agent on
//! fault-injecting stores ([`FaultBackend`]) with real NBD I/O from `qemu-io`. A target whose
//! disk fails stops its mapping (FLASHCOPY.md §2.3 `IoError`) with `CopyFailed` and a
//! `copying -> stopped` event, while writes to the source go on; a snapshot whose every grain
//! gets written completes, and says so; host I/O errors are counted in the metrics.

mod agent_common;
mod skip;

use agent_common::{Agent, metric, scrape};
use flashcopy_csi::agent::Config;
use flashcopy_csi::engine::VolId;
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::proto::agent::v1::{self as pb, agent_client::AgentClient, event::Kind};
use flashcopy_csi::store::CrashPoint;
use flashcopy_csi::volume::{FaultBackend, Pool, PoolConfig};
use skip::have;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Streaming;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

async fn mkvol(c: &mut AgentClient<Channel>, name: &str) -> VolId {
    VolId(
        c.create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: MIB,
            origin: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .id,
    )
}

/// Creates and starts a mapping with 64 KiB grains; returns its id.
async fn start(c: &mut AgentClient<Channel>, source: &str, target: &str, copy_rate: u32) -> u64 {
    let m = c
        .create_mapping(pb::CreateMappingRequest {
            source: source.into(),
            target: target.into(),
            copy_rate: Some(copy_rate),
            grain_kib: Some(64),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    c.start_mapping(pb::StartMappingRequest {
        mapping: m.id.to_string(),
        prep: true,
        restore: false,
    })
    .await
    .unwrap();
    m.id
}

async fn state(c: &mut AgentClient<Channel>, m: u64) -> pb::MappingState {
    c.get_mapping(pb::GetMappingRequest {
        mapping: m.to_string(),
    })
    .await
    .unwrap()
    .into_inner()
    .state()
}

/// Runs qemu-io commands on an export; returns whether it succeeded and its output.
async fn qemu_io(nbd: PathBuf, export: VolId, cmd: &'static str) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let uri = format!("nbd+unix:///{}?socket={}", export.0, nbd.display());
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &uri])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        println!("$ qemu-io -c '{cmd}' {uri}\n{text}");
        let ok = o.status.success() && !text.contains("failed") && !text.contains("error");
        (ok, text)
    })
    .await
    .unwrap()
}

/// Reads events until one matches `want` (10 s at most); returns everything read.
async fn until(events: &mut Streaming<pb::Event>, want: impl Fn(&Kind) -> bool) -> Vec<Kind> {
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap_or_else(|_| panic!("timed out; events so far: {seen:?}"))
            .expect("stream open")
            .unwrap();
        let k = ev.kind.unwrap();
        let done = want(&k);
        seen.push(k);
        if done {
            return seen;
        }
    }
}

fn state_change(k: &Kind, m: u64, from: pb::MappingState, to: pb::MappingState) -> bool {
    matches!(k, Kind::MappingState(c) if c.mapping == m && c.from == from as i32 && c.to == to as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_failures_and_io_driven_changes_reach_the_event_stream() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultBackend::new(Arc::new(CrashPoint::never())));
    let pool = Pool::open(
        MetaFiles::in_memory(),
        backend.clone(),
        PoolConfig::default(),
    )
    .unwrap();
    let addr = agent_common::free_local_addr();
    let a = Agent::start_with_pool(
        Config {
            metrics_listen: Some(addr),
            ..Config::new(dir.path())
        },
        pool,
    );
    let nbd = a.cfg.nbd_socket_path();
    let mut c = a.client().await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    use pb::MappingState::{Copying, IdleOrCopied, Stopped};

    // 1. Copy-on-write to a failing target: the host write succeeds, the mapping stops.
    let (src, snap) = (mkvol(&mut c, "src").await, mkvol(&mut c, "snap").await);
    assert!(qemu_io(nbd.clone(), src, "write -P 0x11 0 1M").await.0);
    let m = start(&mut c, "src", "snap", 0).await;
    backend.store(snap).unwrap().fail_io(false, true);
    let (ok, text) = qemu_io(nbd.clone(), src, "write -P 0x22 64k 4k").await;
    assert!(ok, "the source stays writable: {text}");
    let seen = until(&mut events, |k| state_change(k, m, Copying, Stopped)).await;
    assert!(
        seen.iter().any(|k| matches!(k, Kind::CopyFailed(f)
            if f.mapping == m && f.message.contains("copy-on-write failed"))),
        "{seen:?}"
    );
    assert_eq!(state(&mut c, m).await, Stopped);
    assert!(qemu_io(nbd.clone(), src, "read -P 0x22 64k 4k").await.0);
    assert!(
        !qemu_io(nbd.clone(), snap, "read 0 4k").await.0,
        "the stopped target is offline"
    );
    let mx = scrape(addr);
    assert_eq!(
        metric(&mx, "flashcopy_copy_errors_total{reason=\"copy_on_write\"}"),
        1.0
    );
    assert_eq!(metric(&mx, "flashcopy_mappings{state=\"stopped\"}"), 1.0);

    // 2. Background copy to a failing target: the worker's failure stops the mapping.
    let (src2, clone) = (mkvol(&mut c, "src2").await, mkvol(&mut c, "clone").await);
    assert!(qemu_io(nbd.clone(), src2, "write -P 0x33 0 1M").await.0);
    backend.store(clone).unwrap().fail_io(false, true);
    let m2 = start(&mut c, "src2", "clone", 100).await;
    let seen = until(&mut events, |k| state_change(k, m2, Copying, Stopped)).await;
    assert!(
        seen.iter().any(|k| matches!(k, Kind::CopyFailed(f)
            if f.mapping == m2 && f.message.contains("background copy failed"))),
        "{seen:?}"
    );
    assert_eq!(state(&mut c, m2).await, Stopped);
    let mx = scrape(addr);
    assert_eq!(
        metric(&mx, "flashcopy_copy_errors_total{reason=\"background\"}"),
        1.0
    );

    // 3. A snapshot (no background copy) whose every grain the host overwrites is complete:
    //    the transition is published, as a command's would be.
    let (src3, snap3) = (mkvol(&mut c, "src3").await, mkvol(&mut c, "snap3").await);
    let m3 = start(&mut c, "src3", "snap3", 0).await;
    assert!(qemu_io(nbd.clone(), src3, "write -P 0x44 0 1M").await.0);
    until(&mut events, |k| state_change(k, m3, Copying, IdleOrCopied)).await;
    assert_eq!(state(&mut c, m3).await, IdleOrCopied);
    assert!(qemu_io(nbd.clone(), snap3, "read -P 0 0 1M").await.0);

    // 4. A host write the disk refuses is an NBD error, counted as such.
    let before = metric(&scrape(addr), "flashcopy_io_errors_total{op=\"write\"}");
    backend.store(src3).unwrap().fail_io(false, true);
    let (ok, text) = qemu_io(nbd.clone(), src3, "write 0 4k").await;
    assert!(!ok, "{text}");
    let mx = scrape(addr);
    assert!(metric(&mx, "flashcopy_io_errors_total{op=\"write\"}") > before);

    drop(events);
    a.stop_async().await.unwrap();
}
