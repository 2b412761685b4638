//! Changed-block tracking end to end (issue 13): the CSI SnapshotMetadata service of a real
//! `flashcopy-csi standalone` over its Unix socket, and real NBD clients on the agent's exports
//! (`qemu-io` writes, `qemu-img convert` copies only the listed extents, `nbdcopy` reads whole
//! images to compare): an incremental backup loop of several generations reproduces every
//! snapshot byte for byte. Then every error code, paging, and clients that stop reading.

mod csi_common;
mod skip;

use csi::snapshot_metadata_client::SnapshotMetadataClient;
use csi_common::*;
use flashcopy_csi::proto::agent::v1 as pb;
use flashcopy_csi::proto::csi::v1 as csi;
use pb::agent_client::AgentClient;
use skip::have_all;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const K: i64 = 1024;
const GRAIN: i64 = 256 * K;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Env {
    s: Standalone,
    c: Clients,
    md: SnapshotMetadataClient<Channel>,
    agent: AgentClient<Channel>,
}

impl Env {
    async fn new() -> Self {
        let s = Standalone::start();
        let c = s.clients().await;
        let md = SnapshotMetadataClient::new(s.channel().await);
        let sock = s.dir.path().join("data/agent.sock");
        let agent = AgentClient::new(
            Endpoint::from_shared(format!("unix://{}", sock.display()))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        Env { s, c, md, agent }
    }

    fn nbd_sock(&self) -> String {
        self.s
            .dir
            .path()
            .join("data/nbd.sock")
            .display()
            .to_string()
    }

    fn uri(&self, export: u64) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_sock())
    }

    /// The agent volume (NBD export) of a CSI volume id.
    fn export_of_volume(id: &str) -> u64 {
        id.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// The NBD export of a snapshot's image (its mapping's target volume).
    async fn export_of_snapshot(&mut self, id: &str) -> u64 {
        let map = id.rsplit(':').next().unwrap().to_string();
        self.agent
            .get_mapping(pb::GetMappingRequest { mapping: map })
            .await
            .unwrap()
            .into_inner()
            .target_id
    }

    fn write(&self, export: u64, writes: &[(i64, i64, u8)]) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for (off, len, byte) in writes {
            cmd.arg("-c").arg(format!("write -P {byte} {off} {len}"));
        }
        run(cmd.arg(self.uri(export)));
    }

    /// Copies `off..off+len` of an export into the same range of a local raw file.
    fn copy_range(&self, export: u64, off: i64, len: i64, to: &Path) {
        run(Command::new("qemu-img").args([
            "convert",
            "-n",
            "--image-opts",
            "--target-image-opts",
            &format!(
                "driver=raw,offset={off},size={len},file.driver=nbd,file.server.type=unix,file.server.path={},file.export={export}",
                self.nbd_sock()
            ),
            &format!(
                "driver=raw,offset={off},size={len},file.driver=file,file.filename={}",
                to.display()
            ),
        ]));
    }

    /// A whole image through nbdcopy.
    fn image(&self, export: u64, dir: &Path) -> Vec<u8> {
        let out = dir.join(format!("full-{export}.img"));
        let _ = std::fs::remove_file(&out);
        run(Command::new("nbdcopy").arg(self.uri(export)).arg(&out));
        std::fs::read(out).unwrap()
    }

    async fn allocated(
        &mut self,
        snap: &str,
        from: i64,
        max: i32,
    ) -> Result<(Vec<(i64, i64)>, i64), tonic::Status> {
        let mut st = self
            .md
            .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
                snapshot_id: snap.into(),
                starting_offset: from,
                max_results: max,
                secrets: [("password".to_string(), "hunter2".to_string())].into(),
            })
            .await?
            .into_inner();
        let (mut out, mut cap) = (Vec::new(), -1);
        while let Some(m) = st.message().await? {
            take_message(
                m.block_metadata_type,
                m.volume_capacity_bytes,
                &m.block_metadata,
                max,
                &mut cap,
                &mut out,
            );
        }
        check_extents(&out);
        Ok((out, cap))
    }

    async fn delta(
        &mut self,
        base: &str,
        target: &str,
        from: i64,
        max: i32,
    ) -> Result<(Vec<(i64, i64)>, i64), tonic::Status> {
        let mut st = self
            .md
            .get_metadata_delta(delta_req(base, target, from, max))
            .await?
            .into_inner();
        let (mut out, mut cap) = (Vec::new(), -1);
        while let Some(m) = st.message().await? {
            take_message(
                m.block_metadata_type,
                m.volume_capacity_bytes,
                &m.block_metadata,
                max,
                &mut cap,
                &mut out,
            );
        }
        check_extents(&out);
        Ok((out, cap))
    }
}

fn delta_req(base: &str, target: &str, from: i64, max: i32) -> csi::GetMetadataDeltaRequest {
    csi::GetMetadataDeltaRequest {
        base_snapshot_id: base.into(),
        target_snapshot_id: target.into(),
        starting_offset: from,
        max_results: max,
        secrets: [("password".to_string(), "hunter2".to_string())].into(),
    }
}

/// Every message: VARIABLE_LENGTH and the same capacity.
/// Checks one message of either stream and appends its extents to `out`.
fn take_message(
    kind: i32,
    cap: i64,
    blocks: &[csi::BlockMetadata],
    max: i32,
    seen: &mut i64,
    out: &mut Vec<(i64, i64)>,
) {
    assert_eq!(kind, csi::BlockMetadataType::VariableLength as i32);
    assert!(cap > 0);
    assert!(*seen == -1 || *seen == cap, "capacity changed mid-stream");
    *seen = cap;
    assert!(max == 0 || blocks.len() <= max as usize);
    out.extend(blocks.iter().map(|b| (b.byte_offset, b.size_bytes)));
}

/// Sorted, disjoint, merged, on grains.
fn check_extents(ext: &[(i64, i64)]) {
    for w in ext.windows(2) {
        assert!(w[0].0 + w[0].1 < w[1].0, "extents {w:?} overlap or touch");
    }
    for (o, l) in ext {
        assert!(*l > 0 && o % GRAIN == 0, "extent {o}+{l} not on a grain");
    }
}

fn bytes(ext: &[(i64, i64)]) -> i64 {
    ext.iter().map(|e| e.1).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_backups_reproduce_every_generation() {
    if !have_all(&["qemu-io", "qemu-img", "nbdcopy"]) {
        return;
    }
    let mut e = Env::new().await;
    let v = e.c.create("cbt-db").await;
    let vol = Env::export_of_volume(&v.volume_id);
    let work = e.s.path("backups");
    std::fs::create_dir_all(&work).unwrap();
    // Generation 0 has data in a few places (a hole stays a hole); each later one changes a
    // few grains, partly and wholly, and one write spans a grain boundary.
    let gens: [&[(i64, i64, u8)]; 4] = [
        &[(0, 64 * K, 1), (3 * MIB, 512 * K, 2), (40 * MIB, 4 * K, 3)],
        &[(0, 4 * K, 4), (10 * MIB + GRAIN - 4 * K, 8 * K, 5)],
        &[(3 * MIB, GRAIN, 6), (63 * MIB, MIB, 7)],
        &[(20 * MIB, 512, 8)],
    ];
    let mut prev: Option<(String, std::path::PathBuf)> = None;
    for (i, writes) in gens.iter().enumerate() {
        e.write(vol, writes);
        let snap = e.c.snapshot(&format!("cbt-gen{i}"), &v.volume_id).await;
        let id = snap.snapshot_id.clone();
        let export = e.export_of_snapshot(&id).await;
        let backup = work.join(format!("gen{i}.img"));
        let ext = match &prev {
            None => {
                // Full backup: the allocated extents onto zeros.
                let (ext, cap) = e.allocated(&id, 0, 0).await.unwrap();
                assert_eq!(cap, SIZE);
                std::fs::write(&backup, vec![0u8; cap as usize]).unwrap();
                // Only the written grains hold data.
                assert_eq!(
                    ext,
                    vec![(0, GRAIN), (3 * MIB, 2 * GRAIN), (40 * MIB, GRAIN)]
                );
                ext
            }
            Some((base, base_file)) => {
                std::fs::copy(base_file, &backup).unwrap();
                let (ext, cap) = e.delta(base, &id, 0, 0).await.unwrap();
                assert_eq!(cap, SIZE);
                // Exactly the grains written since the base.
                let mut want: Vec<i64> = writes
                    .iter()
                    .flat_map(|(o, l, _)| {
                        (o / GRAIN..(o + l + GRAIN - 1) / GRAIN).map(|g| g * GRAIN)
                    })
                    .collect();
                want.sort();
                want.dedup();
                let got: Vec<i64> = ext
                    .iter()
                    .flat_map(|(o, l)| (o / GRAIN..(o + l) / GRAIN).map(|g| g * GRAIN))
                    .collect();
                assert_eq!(got, want, "delta of generation {i}");
                ext
            }
        };
        for (o, l) in &ext {
            e.copy_range(export, *o, *l, &backup);
        }
        let want = e.image(export, &work);
        let got = std::fs::read(&backup).unwrap();
        assert!(
            got == want,
            "backup of generation {i} differs from the snapshot"
        );
        println!(
            "generation {i}: {} extents, {} KiB copied of {} MiB",
            ext.len(),
            bytes(&ext) / K,
            SIZE / MIB
        );
        // The older backups stay valid: earlier snapshots still read their image.
        prev = Some((id, backup));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_spec_codes() {
    let mut e = Env::new().await;
    let a = e.c.create("cbt-a").await;
    let b = e.c.create("cbt-b").await;
    let s1 = e.c.snapshot("cbt-a1", &a.volume_id).await.snapshot_id;
    let s2 = e.c.snapshot("cbt-a2", &a.volume_id).await.snapshot_id;
    let sb = e.c.snapshot("cbt-b1", &b.volume_id).await.snapshot_id;
    let code_of = |r: Result<(Vec<(i64, i64)>, i64), tonic::Status>| match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => {
            assert!(!s.message().is_empty());
            assert!(!s.message().contains("hunter2"), "a secret in {s:?}");
            s.code()
        }
    };
    let missing = format!("snap:{NODE}:999999");
    let cases: Vec<(&str, &str, &str, i64, i32, Code)> = vec![
        ("unknown base", &missing, &s2, 0, 0, Code::NotFound),
        ("unknown target", &s1, &missing, 0, 0, Code::NotFound),
        ("not our id", "nonsense", &s2, 0, 0, Code::NotFound),
        (
            "unknown node",
            "snap:elsewhere:1",
            &s2,
            0,
            0,
            Code::NotFound,
        ),
        ("empty base", "", &s2, 0, 0, Code::InvalidArgument),
        ("empty target", &s1, "", 0, 0, Code::InvalidArgument),
        ("different volumes", &sb, &s2, 0, 0, Code::InvalidArgument),
        ("base newer", &s2, &s1, 0, 0, Code::InvalidArgument),
        ("same snapshot", &s1, &s1, 0, 0, Code::InvalidArgument),
        ("offset at the end", &s1, &s2, SIZE, 0, Code::OutOfRange),
        (
            "offset past the end",
            &s1,
            &s2,
            10 * SIZE,
            0,
            Code::OutOfRange,
        ),
        ("negative offset", &s1, &s2, -1, 0, Code::InvalidArgument),
        (
            "negative max_results",
            &s1,
            &s2,
            0,
            -1,
            Code::InvalidArgument,
        ),
    ];
    for (what, base, target, from, max, want) in cases {
        let got = code_of(e.delta(base, target, from, max).await);
        assert_eq!(got, want, "GetMetadataDelta, {what}");
    }
    for (what, snap, from, max, want) in [
        ("unknown", missing.as_str(), 0, 0, Code::NotFound),
        ("empty", "", 0, 0, Code::InvalidArgument),
        ("volume id", a.volume_id.as_str(), 0, 0, Code::NotFound),
        ("offset at the end", s1.as_str(), SIZE, 0, Code::OutOfRange),
        ("negative offset", s1.as_str(), -5, 0, Code::InvalidArgument),
        (
            "negative max_results",
            s1.as_str(),
            0,
            -2,
            Code::InvalidArgument,
        ),
    ] {
        let got = code_of(e.allocated(snap, from, max).await);
        assert_eq!(got, want, "GetMetadataAllocated, {what}");
    }
    // A snapshot with nothing written: one message, no extents, the capacity.
    let (ext, cap) = e.allocated(&s1, 0, 0).await.unwrap();
    assert_eq!((ext, cap), (vec![], SIZE));
    let (ext, cap) = e.delta(&s1, &s2, SIZE - 1, 1).await.unwrap();
    assert_eq!((ext, cap), (vec![], SIZE));
}

#[tokio::test(flavor = "multi_thread")]
async fn paging_and_clients_that_stop_reading() {
    if !have_all(&["qemu-io"]) {
        return;
    }
    let mut e = Env::new().await;
    let v = e.c.create("cbt-pages").await;
    let vol = Env::export_of_volume(&v.volume_id);
    let s1 = e.c.snapshot("cbt-p1", &v.volume_id).await.snapshot_id;
    // Every other grain changes: SIZE / GRAIN / 2 extents that cannot merge.
    let n = SIZE / GRAIN / 2;
    let writes: Vec<(i64, i64, u8)> = (0..n).map(|i| (2 * i * GRAIN, 4 * K, 9)).collect();
    e.write(vol, &writes);
    let s2 = e.c.snapshot("cbt-p2", &v.volume_id).await.snapshot_id;
    let (all, _) = e.delta(&s1, &s2, 0, 0).await.unwrap();
    assert_eq!(all.len() as i64, n);
    // Pages of one, and a start inside a grain: the extent holding it comes first.
    let from = 10 * GRAIN + 100;
    let (paged, _) = e.delta(&s1, &s2, from, 1).await.unwrap();
    assert_eq!(paged.first(), Some(&(10 * GRAIN, GRAIN)));
    assert_eq!(paged, all[5..]);
    let from = 11 * GRAIN;
    let (paged, _) = e.delta(&s1, &s2, from, 7).await.unwrap();
    assert_eq!(paged, all[6..]);
    // Clients that read one message and go away, many times: the agent neither wedges nor
    // keeps their scans, and a full listing still comes at once.
    for _ in 0..40 {
        let mut st =
            e.md.get_metadata_delta(delta_req(&s1, &s2, 0, 1))
                .await
                .unwrap()
                .into_inner();
        assert!(st.message().await.unwrap().is_some());
        drop(st);
    }
    let t0 = Instant::now();
    let (again, _) = tokio::time::timeout(Duration::from_secs(20), e.delta(&s1, &s2, 0, 3))
        .await
        .expect("a listing after abandoned ones finishes")
        .unwrap();
    assert_eq!(again, all);
    println!(
        "full listing after 40 abandoned streams: {:?}",
        t0.elapsed()
    );
    // And the data path still serves.
    e.write(vol, &[(0, 4 * K, 1)]);
}
