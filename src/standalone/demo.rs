//! `standalone --demo`: the README walk-through, over this process's own CSI socket like a
//! Kubernetes sidecar would call it, with data written and read through the agent's NBD exports.
//!
//! Two volumes (a database's log and data), writes, a VolumeSnapshot-style snapshot, a
//! VolumeGroupSnapshot-style consistency group snapshot of both, more writes, then restores
//! into new volumes: every restored volume must read its point in time and every source its
//! newest data. Names are fixed, so a second run on the same directory finds its objects again
//! (CSI calls are idempotent by name) and verifies them once more.

use crate::nbd::client::Client;
use crate::proto::csi::v1 as csi;
use csi::controller_client::ControllerClient;
use csi::group_controller_client::GroupControllerClient;
use csi::volume_capability::access_mode::Mode;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

const SIZE: u64 = 64 << 20;
/// Offsets written in each volume: scattered over the grains, the first and the last.
const OFFSETS: [u64; 4] = [0, 5 << 20, 33 << 20, SIZE - 4096];

fn pattern(volume: &str, version: u32, offset: u64) -> Vec<u8> {
    format!("{volume} v{version} @{offset}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

/// The NBD export of a CSI volume id `vol:NODE:ID` is the agent's volume id.
fn export(volume_id: &str) -> Result<&str, String> {
    volume_id
        .rsplit_once(':')
        .map(|(_, id)| id)
        .ok_or_else(|| format!("unexpected volume id {volume_id:?}"))
}

async fn nbd<T: Send + 'static>(
    socket: &Path,
    volume_id: &str,
    f: impl FnOnce(&mut Client) -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    let socket = socket.to_path_buf();
    let name = export(volume_id)?.to_string();
    tokio::task::spawn_blocking(move || {
        let mut c = Client::connect(&socket, &name).map_err(|e| format!("NBD {name}: {e}"))?;
        f(&mut c).map_err(|e| format!("NBD {name}: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn write_version(socket: &Path, label: &'static str, id: &str, v: u32) -> Result<(), String> {
    nbd(socket, id, move |c| {
        for off in OFFSETS {
            c.write_at(&pattern(label, v, off), off)?;
        }
        c.flush()
    })
    .await
}

async fn expect_version(
    socket: &Path,
    label: &'static str,
    id: &str,
    v: u32,
    what: &str,
) -> Result<(), String> {
    let ok = nbd(socket, id, move |c| {
        let mut buf = vec![0; 4096];
        for off in OFFSETS {
            c.read_at(&mut buf, off)?;
            if buf != pattern(label, v, off) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    if !ok {
        return Err(format!("{what} does not read {label} v{v}"));
    }
    println!("  ok: {what} reads {label} v{v}");
    Ok(())
}

fn cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create(
    name: &str,
    source: Option<csi::volume_content_source::Type>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: SIZE as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    }
}

fn from_snapshot(id: &str) -> Option<csi::volume_content_source::Type> {
    Some(csi::volume_content_source::Type::Snapshot(
        csi::volume_content_source::SnapshotSource {
            snapshot_id: id.into(),
        },
    ))
}

async fn connect(socket: &Path) -> Result<Channel, String> {
    let t0 = Instant::now();
    loop {
        let ep = Endpoint::from_shared(format!("unix://{}", socket.display()))
            .map_err(|e| e.to_string())?;
        match ep.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) if t0.elapsed() > Duration::from_secs(30) => {
                return Err(format!("CSI socket {}: {e}", socket.display()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn ms(t: Instant) -> String {
    format!("{:.1} ms", t.elapsed().as_secs_f64() * 1e3)
}

/// Runs the walk-through against the CSI socket `csi_sock` and the NBD socket `nbd_sock`.
pub async fn run(csi_sock: &Path, nbd_sock: &Path) -> Result<(), String> {
    let ch = connect(csi_sock).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut group = GroupControllerClient::new(ch);
    let nbd_sock: PathBuf = nbd_sock.to_path_buf();
    let err = |e: tonic::Status| format!("{}: {}", e.code(), e.message());

    println!("\n1. CreateVolume: a database log and its data, 64 MiB each (sparse)");
    let mut ids = Vec::new();
    for name in ["demo-log", "demo-data"] {
        let v = ctl.create_volume(create(name, None)).await.map_err(err)?;
        let v = v.into_inner().volume.ok_or("no volume in the reply")?;
        println!("  {name}: {}", v.volume_id);
        ids.push(v.volume_id);
    }
    let (log, data) = (ids[0].clone(), ids[1].clone());

    println!(
        "2. Write v1 to both over NBD ({}), flush",
        nbd_sock.display()
    );
    write_version(&nbd_sock, "log", &log, 1).await?;
    write_version(&nbd_sock, "data", &data, 1).await?;

    println!("3. CreateSnapshot of the data volume: a FlashCopy mapping, copy rate 0");
    let t = Instant::now();
    let snap = ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "demo-snap".into(),
            source_volume_id: data.clone(),
            ..Default::default()
        })
        .await
        .map_err(err)?
        .into_inner()
        .snapshot
        .ok_or("no snapshot in the reply")?;
    println!(
        "  {} ready_to_use={} in {} (no data copied)",
        snap.snapshot_id,
        snap.ready_to_use,
        ms(t)
    );

    println!("4. Write v2 to both, then CreateVolumeGroupSnapshot of log + data");
    write_version(&nbd_sock, "log", &log, 2).await?;
    write_version(&nbd_sock, "data", &data, 2).await?;
    let t = Instant::now();
    let g = group
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "demo-group".into(),
            source_volume_ids: vec![log.clone(), data.clone()],
            ..Default::default()
        })
        .await
        .map_err(err)?
        .into_inner()
        .group_snapshot
        .ok_or("no group snapshot in the reply")?;
    println!(
        "  {} ready_to_use={} in {}: one consistency group, started atomically",
        g.group_snapshot_id,
        g.ready_to_use,
        ms(t)
    );
    let member = |src: &str| {
        g.snapshots
            .iter()
            .find(|s| s.source_volume_id == src)
            .map(|s| s.snapshot_id.clone())
            .ok_or_else(|| format!("no member snapshot of {src}"))
    };
    let (log_member, data_member) = (member(&log)?, member(&data)?);

    println!("5. Write v3 to both (after the group snapshot)");
    write_version(&nbd_sock, "log", &log, 3).await?;
    write_version(&nbd_sock, "data", &data, 3).await?;

    println!("6. Restore: CreateVolume from each snapshot (background copy; readable at once)");
    let mut restored = Vec::new();
    for (name, snap_id) in [
        ("demo-data-at-snap", snap.snapshot_id.clone()),
        ("demo-log-at-group", log_member),
        ("demo-data-at-group", data_member),
    ] {
        let v = ctl
            .create_volume(create(name, from_snapshot(&snap_id)))
            .await
            .map_err(err)?
            .into_inner()
            .volume
            .ok_or("no volume in the reply")?;
        println!("  {name}: {} from {snap_id}", v.volume_id);
        restored.push(v.volume_id);
    }

    println!("7. Verify every byte written at each point");
    expect_version(&nbd_sock, "data", &restored[0], 1, "demo-data-at-snap").await?;
    expect_version(&nbd_sock, "log", &restored[1], 2, "demo-log-at-group").await?;
    expect_version(&nbd_sock, "data", &restored[2], 2, "demo-data-at-group").await?;
    expect_version(&nbd_sock, "log", &log, 3, "demo-log").await?;
    expect_version(&nbd_sock, "data", &data, 3, "demo-data").await?;
    println!(
        "\nDone. The objects stay in the data directory; `flashcopy-csi fc --agent unix://{} lsfcmap`",
        nbd_sock.with_file_name("agent.sock").display()
    );
    println!("shows them while `flashcopy-csi standalone --data-dir DIR` serves.");
    Ok(())
}
