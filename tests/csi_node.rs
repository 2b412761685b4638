//! The CSI node plugin against a real agent: NBD export -> nbdfuse -> loop -> ext4/xfs -> mount
//! -> bind mounts, driven through the library (attacher, mount helpers) and through the CSI
//! Node service over its Unix socket (tonic client).

mod agent_common;
mod skip;

use agent_common::Agent;
use flashcopy_csi::csi::node::attach::{Attacher, Export, FuseLoop};
use flashcopy_csi::csi::node::{Error, mount};
use skip::{have, have_all, root_with, skip_machine_limit};
use std::path::Path;
use std::process::Command;

fn can_attach() -> bool {
    root_with(&["/dev/loop-control", "/dev/fuse"]) && have_all(&["nbdfuse", "losetup", "mkfs.ext4"])
}

/// Detaches everything an attacher holds, even when a test fails half way.
struct Detach<'a>(&'a dyn Attacher, Vec<String>);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        for v in &self.1 {
            if let Ok(Some(dev)) = self.0.device(v) {
                for m in mount::mounts_of(&dev).unwrap_or_default() {
                    let _ = mount::unmount_lazy(&m.mount_point);
                }
            }
            let _ = self.0.detach(v);
        }
    }
}

#[test]
fn fuse_loop_attach_is_idempotent_and_recovers_from_a_dead_nbdfuse() {
    if !can_attach() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("data"));
    agent.fc_ok(&["mkvol", "a", "33554432"]);
    let export = Export {
        socket: agent.cfg.nbd_socket_path(),
        name: "a".into(),
    };
    let att = FuseLoop::new(&tmp.path().join("state")).unwrap();
    let _guard = Detach(&att, vec!["node/a".into()]);

    assert_eq!(att.device("node/a").unwrap(), None);
    let dev = att.attach("node/a", &export).unwrap();
    assert_eq!(mount::device_size(&dev).unwrap(), 32 << 20);
    assert_eq!(att.attach("node/a", &export).unwrap(), dev, "attach twice");
    assert_eq!(att.device("node/a").unwrap(), Some(dev.clone()));
    assert_eq!(att.volumes().unwrap(), vec!["node/a".to_string()]);
    assert_eq!(mount::probe(&dev).unwrap(), mount::Contents::Blank);

    // A mounted device is not detached.
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    mount::format(&dev, mount::FsType::Ext4).unwrap();
    assert_eq!(
        mount::probe(&dev).unwrap(),
        mount::Contents::Filesystem("ext4".into())
    );
    mount::mount(&dev, &mnt, mount::FsType::Ext4, &[]).unwrap();
    assert!(matches!(att.detach("node/a"), Err(Error::Busy { .. })));
    assert!(mount::unmount(&mnt).unwrap());
    assert!(!mount::unmount(&mnt).unwrap(), "second unmount is a no-op");

    // nbdfuse dies: the attachment reports itself broken, and recovery cleans it up.
    let pid: i32 = std::fs::read_to_string(tmp.path().join("state/node%2Fa/nbdfuse.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(flashcopy_csi::csi::node::attach::wait_until(
        std::time::Duration::from_secs(5),
        || matches!(att.device("node/a"), Err(Error::Unhealthy(_)))
    ));
    assert_eq!(att.recover().unwrap(), vec!["node/a".to_string()]);
    assert_eq!(att.device("node/a").unwrap(), None);
    assert!(
        flashcopy_csi::csi::node::attach::loops_backed_by(
            &tmp.path()
                .canonicalize()
                .unwrap()
                .join("state/node%2Fa/fuse/nbd")
        )
        .is_empty()
    );

    // Attaching again finds the filesystem written before.
    let dev = att.attach("node/a", &export).unwrap();
    assert_eq!(
        mount::probe(&dev).unwrap(),
        mount::Contents::Filesystem("ext4".into())
    );
    att.detach("node/a").unwrap();
    att.detach("node/a").unwrap();
    assert_eq!(att.device("node/a").unwrap(), None);
    drop(_guard);
    agent.stop().unwrap();
}

// ---- the Node service over gRPC ----

use flashcopy_csi::csi::node::NodeConfig;
use flashcopy_csi::proto::agent::v1 as pb;
use flashcopy_csi::proto::csi::v1 as csi;
use flashcopy_csi::proto::csi::v1::node_client::NodeClient;
use flashcopy_csi::proto::csi::v1::volume_capability::access_mode::Mode;
use flashcopy_csi::proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
use std::path::PathBuf;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const NODE: &str = "node-1";

/// Unmounts, detaches and stops everything under a test directory, even after a failure:
/// mounts (innermost first), loop devices backed by files there, then the FUSE mounts.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let root = &self.0;
        let under = |p: &Path| p.starts_with(root);
        for m in mount::mounts().unwrap_or_default().iter().rev() {
            if under(&m.mount_point) && !m.fstype.starts_with("fuse") {
                let _ = mount::unmount_lazy(&m.mount_point);
            }
        }
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let b =
                    std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
                if !b.is_empty() && under(Path::new(b.trim_end())) {
                    let _ = Command::new("losetup")
                        .arg("-d")
                        .arg(Path::new("/dev").join(e.file_name()))
                        .status();
                }
            }
        }
        for m in mount::mounts().unwrap_or_default().iter().rev() {
            if under(&m.mount_point) {
                let _ = mount::unmount_lazy(&m.mount_point);
            }
        }
    }
}

/// An agent, the node plugin serving its socket in this runtime, and a client.
struct Plugin {
    agent: Option<Agent>,
    agent_client: flashcopy_csi::proto::agent::v1::agent_client::AgentClient<Channel>,
    node: NodeClient<Channel>,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _cleanup: Cleanup,
    _tmp: tempfile::TempDir,
}

impl Plugin {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let cleanup = Cleanup(dir.clone());
        let agent = Agent::start(&dir.join("data"));
        let cfg = NodeConfig::new(
            format!("unix://{}/csi.sock", dir.display()),
            NODE.into(),
            agent.uri(),
            dir.join("state"),
        );
        let svc = cfg.service().unwrap();
        let listener = flashcopy_csi::csi::bind_unix(&dir.join("csi.sock")).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(flashcopy_csi::csi::node::serve_node(svc, listener, async {
            let _ = rx.await;
        }));
        let ch = Endpoint::from_shared(cfg.endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Plugin {
            agent_client: agent.client().await,
            agent: Some(agent),
            node: NodeClient::new(ch),
            dir,
            stop: Some(tx),
            _cleanup: cleanup,
            _tmp: tmp,
        }
    }

    /// Creates an agent volume; returns its CSI volume id.
    async fn volume(&mut self, name: &str, size: u64) -> String {
        let v = self
            .agent_client
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                origin: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        format!("vol:{NODE}:{}", v.id)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    async fn stage(
        &mut self,
        id: &str,
        staging: &Path,
        cap: csi::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await
            .map(|_| ())
    }

    async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.to_string_lossy().into(),
            })
            .await
            .map(|_| ())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        drop(self.node);
        drop(self.agent_client);
        self.agent.take().unwrap().stop_async().await.unwrap();
    }
}

fn mount_cap(fs: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => {
            println!("{:?}: {}", s.code(), s.message());
            s.code()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_stage_publish_rw_and_ro_unpublish_unstage_keeps_data() {
    if !can_attach() {
        return;
    }
    let mut p = Plugin::start().await;
    let id = p.volume("data", 64 << 20).await;
    let (staging, rw, ro) = (p.path("staging"), p.path("pod-rw"), p.path("pod-ro"));
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);

    p.stage(&id, &staging, cap.clone()).await.unwrap();
    let m = mount::mounted_at(&staging).unwrap().expect("staged");
    assert_eq!(m.fstype, "ext4");
    assert!(m.options.iter().any(|o| o == "noatime"), "{:?}", m.options);
    p.stage(&id, &staging, cap.clone()).await.unwrap(); // idempotent
    // The same staging path as read-only is another volume shape: refused.
    assert_eq!(
        code(
            p.stage(&id, &staging, mount_cap("ext4", Mode::SingleNodeReaderOnly))
                .await
        ),
        Code::AlreadyExists
    );

    p.publish(&id, &staging, &rw, cap.clone(), false)
        .await
        .unwrap();
    p.publish(&id, &staging, &rw, cap.clone(), false)
        .await
        .unwrap(); // idempotent
    std::fs::write(rw.join("hello.txt"), "kept across restage").unwrap();
    p.publish(&id, &staging, &ro, cap.clone(), true)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(ro.join("hello.txt")).unwrap(),
        "kept across restage"
    );
    let e = std::fs::write(ro.join("nope.txt"), "x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(30),
        "a write on the read-only publish: {e}"
    ); // EROFS
    // rw was published writable: asking for it read-only now is a conflict.
    assert_eq!(
        code(p.publish(&id, &staging, &rw, cap.clone(), true).await),
        Code::AlreadyExists
    );

    // Unstaging while published is refused and changes nothing.
    assert_eq!(
        code(p.unstage(&id, &staging).await),
        Code::FailedPrecondition
    );
    assert!(rw.join("hello.txt").exists());

    p.unpublish(&id, &rw).await.unwrap();
    p.unpublish(&id, &ro).await.unwrap();
    p.unpublish(&id, &ro).await.unwrap(); // idempotent
    assert!(!rw.exists() && !ro.exists(), "targets are removed");
    p.unstage(&id, &staging).await.unwrap();
    p.unstage(&id, &staging).await.unwrap(); // idempotent
    assert!(mount::mounted_at(&staging).unwrap().is_none());
    assert!(
        p.path("state/fuse-loop")
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "no attachment left"
    );
    // Publishing an unstaged volume is refused.
    assert_eq!(
        code(p.publish(&id, &staging, &rw, cap.clone(), false).await),
        Code::FailedPrecondition
    );

    // Staging again finds the filesystem: no reformat, the data is there.
    p.stage(&id, &staging, cap.clone()).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(staging.join("hello.txt")).unwrap(),
        "kept across restage"
    );
    p.unstage(&id, &staging).await.unwrap();

    // Read-only staging (SINGLE_NODE_READER_ONLY) mounts read-only.
    p.stage(&id, &staging, mount_cap("ext4", Mode::SingleNodeReaderOnly))
        .await
        .unwrap();
    assert!(mount::mounted_at(&staging).unwrap().unwrap().read_only());
    p.unstage(&id, &staging).await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_statvfs_figures_and_the_volume_condition() {
    if !can_attach() {
        return;
    }
    let mut p = Plugin::start().await;
    let id = p.volume("stats", 64 << 20).await;
    let (staging, target) = (p.path("staging"), p.path("pod"));
    let cap = mount_cap("", Mode::SingleNodeWriter);
    p.stage(&id, &staging, cap.clone()).await.unwrap();
    p.publish(&id, &staging, &target, cap, false).await.unwrap();
    std::fs::write(target.join("f"), vec![7u8; 4 << 20]).unwrap();
    Command::new("sync").status().unwrap();

    let r = p
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let s = mount::stats(&target).unwrap();
    let bytes = r
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .unwrap();
    let inodes = r
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Inodes as i32)
        .unwrap();
    assert_eq!(bytes.total as u64, s.total_bytes);
    assert!(
        bytes.total > 50 << 20 && bytes.total <= 64 << 20,
        "{bytes:?}"
    );
    assert!(bytes.used >= 4 << 20, "the 4 MiB file counts: {bytes:?}");
    assert!(
        bytes.available > 0 && bytes.available + bytes.used <= bytes.total,
        "{bytes:?}"
    );
    assert_eq!(inodes.total as u64, s.total_inodes);
    assert!(
        inodes.used >= 12 && inodes.used < inodes.total,
        "{inodes:?}"
    );
    let c = r.volume_condition.unwrap();
    assert!(!c.abnormal, "{c:?}");

    // Not mounted there: NOT_FOUND.
    let missing = p
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: p.path("nowhere").to_string_lossy().into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(missing), Code::NotFound);

    // The NBD client dies: the volume condition says so.
    let pid = std::fs::read_dir(p.path("state/fuse-loop"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path().join("nbdfuse.pid")).unwrap())
        .next()
        .unwrap();
    Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = p
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let c = r.volume_condition.unwrap();
    assert!(c.abnormal && c.message.contains("broken"), "{c:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_access_binds_the_device_node_and_data_is_never_formatted_over() {
    if !can_attach() {
        return;
    }
    let mut p = Plugin::start().await;
    let id = p.volume("raw", 32 << 20).await;
    let (staging, target) = (p.path("staging"), p.path("dev-target"));
    std::fs::create_dir_all(&staging).unwrap();
    p.stage(&id, &staging, block_cap()).await.unwrap();
    assert!(
        mount::mounted_at(&staging).unwrap().is_none(),
        "block staging mounts nothing"
    );
    p.publish(&id, &staging, &target, block_cap(), false)
        .await
        .unwrap();
    p.publish(&id, &staging, &target, block_cap(), false)
        .await
        .unwrap(); // idempotent
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"raw block data").unwrap();
        f.sync_all().unwrap();
    }
    let size = std::fs::File::open(&target).unwrap().seek_end();
    assert_eq!(size, 32 << 20, "the target is the whole device");

    // Read-only beside it: the data reads, and the kernel refuses writes (the device node of
    // a read-only loop device; a read-only bind of the node alone would let them through).
    let ro_target = p.path("dev-ro-target");
    for _ in 0..2 {
        p.publish(&id, &staging, &ro_target, block_cap(), true)
            .await
            .unwrap();
    }
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&ro_target).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        let mut b = [0u8; 14];
        f.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"raw block data");
    }
    {
        // Linux opens a read-only block device for writing and fails the write itself.
        use std::io::{Seek, SeekFrom, Write};
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&ro_target)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(4096))?;
                f.write_all(b"overwritten!!!")?;
                f.sync_all()
            });
        let e = written.expect_err("a write through a read-only publish");
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::EACCES | libc::EROFS | libc::EPERM)
            ),
            "{e}"
        );
        let mut b = vec![0u8; 4096 + 14];
        std::io::Read::read_exact(&mut std::fs::File::open(&target).unwrap(), &mut b).unwrap();
        assert_eq!(&b[4096..], b"raw block data");
    }
    let ro_dev = mount::mounted_at(&ro_target).unwrap().unwrap().root;
    let ro_sys = Path::new("/sys/block")
        .join(ro_dev.strip_prefix("/").unwrap())
        .join("loop");
    assert!(ro_sys.exists(), "{} is not a loop device", ro_dev.display());
    // Another request at the same target, read-write this time, is refused.
    let s = code(
        p.publish(&id, &staging, &ro_target, block_cap(), false)
            .await,
    );
    assert_eq!(s, Code::AlreadyExists);
    p.unpublish(&id, &ro_target).await.unwrap();
    assert!(!ro_target.exists());
    assert!(!ro_sys.exists(), "the read-only loop outlived its publish");

    p.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists());
    p.unstage(&id, &staging).await.unwrap();

    // Staged for a filesystem, the device holding raw data is refused, not formatted.
    let s = code(
        p.stage(&id, &staging, mount_cap("ext4", Mode::SingleNodeWriter))
            .await,
    );
    assert_eq!(s, Code::FailedPrecondition);
    assert!(mount::mounted_at(&staging).unwrap().is_none());
    p.unstage(&id, &staging).await.unwrap();
    p.stop().await;
}

trait SeekEnd {
    fn seek_end(self) -> u64;
}

impl SeekEnd for std::fs::File {
    fn seek_end(mut self) -> u64 {
        use std::io::Seek;
        self.seek(std::io::SeekFrom::End(0)).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_is_made_on_blank_devices_and_other_fs_requests_are_refused() {
    if !can_attach() || !have("mkfs.xfs") {
        return;
    }
    let mut p = Plugin::start().await;
    // mkfs.xfs wants at least 300 MiB.
    let id = p.volume("x", 320 << 20).await;
    let staging = p.path("staging");
    p.stage(&id, &staging, mount_cap("xfs", Mode::SingleNodeWriter))
        .await
        .unwrap();
    assert_eq!(mount::mounted_at(&staging).unwrap().unwrap().fstype, "xfs");
    std::fs::write(staging.join("x.txt"), "on xfs").unwrap();
    p.unstage(&id, &staging).await.unwrap();
    assert_eq!(
        code(
            p.stage(&id, &staging, mount_cap("ext4", Mode::SingleNodeWriter))
                .await
        ),
        Code::FailedPrecondition,
        "an xfs device is never reformatted as ext4"
    );
    p.unstage(&id, &staging).await.unwrap();
    p.stage(&id, &staging, mount_cap("xfs", Mode::SingleNodeWriter))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(staging.join("x.txt")).unwrap(),
        "on xfs"
    );

    // Grow: resize on the agent, restage (the attachment learns the size), expand.
    p.unstage(&id, &staging).await.unwrap();
    p.agent_client
        .resize_volume(pb::ResizeVolumeRequest {
            volume: id.rsplit(':').next().unwrap().into(),
            size_bytes: 640 << 20,
        })
        .await
        .unwrap();
    p.stage(&id, &staging, mount_cap("xfs", Mode::SingleNodeWriter))
        .await
        .unwrap();
    let before = mount::stats(&staging).unwrap().total_bytes;
    let r = p
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: staging.to_string_lossy().into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 640 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 640 << 20);
    let after = mount::stats(&staging).unwrap().total_bytes;
    assert!(
        after > before + (250 << 20),
        "xfs grew: {before} -> {after}"
    );
    assert_eq!(
        std::fs::read_to_string(staging.join("x.txt")).unwrap(),
        "on xfs"
    );
    p.unstage(&id, &staging).await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_expands_after_an_agent_resize() {
    if !can_attach() {
        return;
    }
    let mut p = Plugin::start().await;
    let id = p.volume("grow", 64 << 20).await;
    let (staging, target) = (p.path("staging"), p.path("pod"));
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    p.stage(&id, &staging, cap.clone()).await.unwrap();
    p.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(target.join("keep.txt"), "still here").unwrap();
    p.agent_client
        .resize_volume(pb::ResizeVolumeRequest {
            volume: id.rsplit(':').next().unwrap().into(),
            size_bytes: 128 << 20,
        })
        .await
        .unwrap();
    let expand = |path: PathBuf| csi::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: path.to_string_lossy().into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 128 << 20,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    // Attached, the device keeps its old size: online expansion is refused, clearly.
    assert_eq!(
        code(p.node.node_expand_volume(expand(target.clone())).await),
        Code::FailedPrecondition
    );
    p.unpublish(&id, &target).await.unwrap();
    p.unstage(&id, &staging).await.unwrap();
    p.stage(&id, &staging, cap.clone()).await.unwrap();
    p.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    if !cap_sys_resource() {
        // Online ext4 growth (the EXT4_IOC_RESIZE_FS ioctl) needs CAP_SYS_RESOURCE, which a
        // privileged DaemonSet has; this build sandbox (CI included) drops it, and no package
        // brings it back: skipped with the reason, listed by ci/test.sh, not a CI failure.
        skip_machine_limit("online ext4 resize needs CAP_SYS_RESOURCE");
        p.unpublish(&id, &target).await.unwrap();
        p.unstage(&id, &staging).await.unwrap();
        p.stop().await;
        return;
    }
    let before = mount::stats(&target).unwrap().total_bytes;
    let r = p
        .node
        .node_expand_volume(expand(target.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 128 << 20);
    let after = mount::stats(&target).unwrap().total_bytes;
    assert!(after > before + (50 << 20), "df grows: {before} -> {after}");
    assert_eq!(
        std::fs::read_to_string(target.join("keep.txt")).unwrap(),
        "still here"
    );
    p.unpublish(&id, &target).await.unwrap();
    p.unstage(&id, &staging).await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_spec_codes_and_node_info_reports_topology() {
    // Validation happens before anything touches the system, so this runs anywhere the agent
    // runs (no root needed): state goes to a temp dir.
    let mut p = Plugin::start().await;
    let id = p.volume("v", 32 << 20).await;
    let (staging, target) = (p.path("staging"), p.path("t"));
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);

    let info = p
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    assert_eq!(
        info.accessible_topology
            .unwrap()
            .segments
            .get("topology.flashcopy.csi.io/node")
            .map(String::as_str),
        Some(NODE)
    );
    let caps = p
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 5);

    let stage = |volume_id: &str, staging: &Path, cap: Option<csi::VolumeCapability>| {
        csi::NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: cap,
            ..Default::default()
        }
    };
    let n = &mut p.node;
    assert_eq!(
        code(
            n.node_stage_volume(stage("", &staging, Some(cap.clone())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage(&id, Path::new(""), Some(cap.clone())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_stage_volume(stage(&id, &staging, None)).await),
        Code::InvalidArgument
    );
    let mut no_mode = cap.clone();
    no_mode.access_mode = None;
    assert_eq!(
        code(
            n.node_stage_volume(stage(&id, &staging, Some(no_mode)))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_type = cap.clone();
    no_type.access_type = None;
    assert_eq!(
        code(
            n.node_stage_volume(stage(&id, &staging, Some(no_type)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage(
                &id,
                &staging,
                Some(mount_cap("ext4", Mode::MultiNodeMultiWriter))
            ))
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage(
                &id,
                &staging,
                Some(mount_cap("ntfs", Mode::SingleNodeWriter))
            ))
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage(
                &format!("vol:{NODE}:999"),
                &staging,
                Some(cap.clone())
            ))
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage("vol:other-node:1", &staging, Some(cap.clone())))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage("garbage", &staging, Some(cap.clone())))
                .await
        ),
        Code::NotFound
    );
    assert!(!staging.exists(), "refused calls change nothing");

    let publish =
        |target: &Path, cap: Option<csi::VolumeCapability>| csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: cap,
            ..Default::default()
        };
    assert_eq!(
        code(
            n.node_publish_volume(publish(Path::new(""), Some(cap.clone())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_publish_volume(publish(&target, None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: String::new()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: String::new(),
                target_path: "/x".into()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: String::new()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: format!("vol:{NODE}:999"),
                volume_path: "/".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.to_string_lossy().into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound,
        "expanding a volume that is not staged"
    );
    p.stop().await;
}

/// Whether this process has CAP_SYS_RESOURCE (capability 24) in its effective set.
fn cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_node_subcommand_serves_identity_and_node_on_a_0660_socket() {
    use flashcopy_csi::proto::csi::v1::identity_client::IdentityClient;
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("data"));
    let sock = tmp.path().join("csi.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"))
        .args(["csi", "node", "--node-id", "n7"])
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .arg("--agent")
        .arg(agent.uri())
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "csi node exited");
        assert!(t0.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let ch = Endpoint::from_shared(format!("unix://{}", sock.display()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let info = NodeClient::new(ch.clone())
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "n7");
    let plugin = IdentityClient::new(ch)
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.name, "flashcopy.csi.io");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists(), "the socket is removed on shutdown");
    agent.stop_async().await.unwrap();
}
