//! Consistency under load (issue 4): two ext4 volumes on `standalone`, attached through nbdfuse +
//! loop by NodeStageVolume, under a writer that makes dependent writes across them — A on volume
//! 1, then B on volume 2, then C on volume 1, each fsync'd before the next starts. Group snapshots
//! are taken in the middle; each is restored into two new volumes, mounted, and checked: never C
//! without B, never B without A, and every write acknowledged before the snapshot started is there.
//!
//! `CONSISTENCY_ROUNDS` sets the number of group snapshots (default 50).

mod csi_common;
mod skip;

use csi::volume_capability::access_mode::Mode;
use csi_common::*;
use flashcopy_csi::proto::csi::v1 as csi;
use skip::{have_all, root_with};
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Steps are numbered 3i (A_i on volume 1), 3i+1 (B_i on volume 2), 3i+2 (C_i on volume 1).
const STEP_NAMES: [&str; 3] = ["a", "b", "c"];
/// The writer stops after this many triples so the volumes never fill up.
const MAX_TRIPLES: u64 = 4000;
const VOLUME: i64 = 256 * MIB;

fn content(step: u64) -> Vec<u8> {
    format!("step {step}\n").repeat(64).into_bytes()
}

fn file_for(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{}-{}", STEP_NAMES[(step % 3) as usize], step / 3))
}

/// Writes one step's file and makes it durable (file, then directory entry).
fn write_step(root: &Path, step: u64) {
    let p = file_for(root, step);
    let mut f = File::create(&p).unwrap();
    f.write_all(&content(step)).unwrap();
    f.sync_all().unwrap();
    File::open(root).unwrap().sync_all().unwrap();
}

/// The steps a restored pair of volumes holds completely.
fn steps_present(v1: &Path, v2: &Path) -> HashSet<u64> {
    let mut present = HashSet::new();
    for (root, kinds) in [(v1, [0u64, 2]), (v2, [1, 1])] {
        for entry in std::fs::read_dir(root).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let Some((kind, i)) = name.split_once('-') else {
                continue;
            };
            let Some(k) = STEP_NAMES.iter().position(|n| *n == kind) else {
                continue;
            };
            let k = k as u64;
            if !kinds.contains(&k) {
                continue;
            }
            let step = 3 * i.parse::<u64>().unwrap() + k;
            if std::fs::read(root.join(&name)).unwrap() == content(step) {
                present.insert(step);
            }
        }
    }
    present
}

struct Staged {
    volume_id: String,
    path: PathBuf,
}

async fn stage(c: &mut Clients, volume_id: &str, path: PathBuf) -> Staged {
    std::fs::create_dir_all(&path).unwrap();
    c.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: path.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .await
        .unwrap();
    Staged {
        volume_id: volume_id.into(),
        path,
    }
}

async fn unstage(c: &mut Clients, s: &Staged) {
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: s.volume_id.clone(),
            staging_target_path: s.path.display().to_string(),
        })
        .await
        .unwrap();
}

async fn restore(c: &mut Clients, name: &str, snapshot_id: &str) -> String {
    let mut r = create_req(name, VOLUME);
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    });
    c.ctl
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn delete_volume(c: &mut Clients, id: &str) {
    c.ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn group_snapshots_never_tear_dependent_writes() {
    if !(root_with(&["/dev/loop-control", "/dev/fuse"])
        && have_all(&["nbdfuse", "losetup", "mkfs.ext4"]))
    {
        return;
    }
    let rounds: u64 = std::env::var("CONSISTENCY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let s = Standalone::start();
    let mut c = s.clients().await;
    let v1 = c
        .ctl
        .create_volume(create_req("log", VOLUME))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let v2 = c
        .ctl
        .create_volume(create_req("data", VOLUME))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let m1 = stage(&mut c, &v1, s.path("vol1")).await;
    let m2 = stage(&mut c, &v2, s.path("vol2")).await;

    // The writer: one step at a time, each durable before the next; `done` counts the steps
    // acknowledged so far (the independent record of what was written).
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (done, stop) = (done.clone(), stop.clone());
        let (p1, p2) = (m1.path.clone(), m2.path.clone());
        std::thread::spawn(move || {
            let mut step = 0;
            while !stop.load(Ordering::Relaxed) && step < 3 * MAX_TRIPLES {
                let root = if step % 3 == 1 { &p2 } else { &p1 };
                write_step(root, step);
                step += 1;
                done.store(step, Ordering::Release);
            }
        })
    };

    let mut torn_checks = 0u64;
    for round in 0..rounds {
        // Let the writer get somewhere, at a different phase each round.
        tokio::time::sleep(std::time::Duration::from_millis(3 + (round * 7) % 23)).await;
        let acked_before = done.load(Ordering::Acquire);
        let g = c
            .group
            .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: format!("round-{round}"),
                source_volume_ids: vec![v1.clone(), v2.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap();
        let snap_of = |v: &str| {
            g.snapshots
                .iter()
                .find(|m| m.source_volume_id == v)
                .unwrap()
                .snapshot_id
                .clone()
        };
        let r1 = restore(&mut c, &format!("r1-{round}"), &snap_of(&v1)).await;
        let r2 = restore(&mut c, &format!("r2-{round}"), &snap_of(&v2)).await;
        let st1 = stage(&mut c, &r1, s.path(&format!("r1-{round}"))).await;
        let st2 = stage(&mut c, &r2, s.path(&format!("r2-{round}"))).await;
        let present = steps_present(&st1.path, &st2.path);
        for step in 0..acked_before {
            assert!(
                present.contains(&step),
                "round {round}: step {step} was acknowledged before the snapshot and is missing"
            );
        }
        for &step in &present {
            if step > 0 {
                assert!(
                    present.contains(&(step - 1)),
                    "round {round}: {} without {} (a torn group snapshot)",
                    file_for(Path::new(""), step).display(),
                    file_for(Path::new(""), step - 1).display()
                );
                torn_checks += 1;
            }
        }
        unstage(&mut c, &st1).await;
        unstage(&mut c, &st2).await;
        delete_volume(&mut c, &r1).await;
        delete_volume(&mut c, &r2).await;
        c.group
            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                snapshot_ids: g.snapshots.iter().map(|m| m.snapshot_id.clone()).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let written = done.load(Ordering::Acquire);
    println!(
        "{rounds} group snapshots over {written} dependent writes, {torn_checks} order checks"
    );
    assert!(
        written > 3 * rounds,
        "the writer made too little progress to test anything"
    );
    unstage(&mut c, &m1).await;
    unstage(&mut c, &m2).await;
}
