//! Shared by the `csi_*` tests: a real `flashcopy-csi standalone` process on a temporary data
//! directory, CSI clients over its Unix socket, and request builders.

#![allow(dead_code)]

use csi::controller_client::ControllerClient;
use csi::controller_service_capability::rpc::Type as CtlCap;
use csi::group_controller_client::GroupControllerClient;
use csi::identity_client::IdentityClient;
use csi::node_client::NodeClient;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use flashcopy_csi::proto::csi::v1 as csi;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

pub const MIB: i64 = 1 << 20;
/// csi-sanity's default test volume size in our runs (e2e/csi-sanity.sh passes the same).
pub const SIZE: i64 = 64 * MIB;
pub const NODE: &str = "sanity-node";

/// A `flashcopy-csi standalone` process on a temporary data directory.
pub struct Standalone {
    pub dir: tempfile::TempDir,
    pub child: Child,
}

impl Standalone {
    pub fn start() -> Self {
        Self::start_logging(None)
    }

    /// As [`Self::start`]; with `Some(file)`, every log line (RUST_LOG=trace) goes to that file.
    pub fn start_logging(log: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"));
        cmd.arg("standalone")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--node-id")
            .arg(NODE)
            .stdout(Stdio::null());
        if let Some(log) = log {
            cmd.env("RUST_LOG", "trace")
                .stderr(std::fs::File::create(log).unwrap());
        }
        let child = cmd.spawn().unwrap();
        let mut s = Self { dir, child };
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(s.socket()).is_err() {
            assert!(
                s.child.try_wait().unwrap().is_none(),
                "standalone exited while starting"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "standalone did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("data/csi.sock")
    }

    /// A fresh directory for mounts (csi-sanity's mountdir / stagingdir).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("unix://{}", self.socket().display()))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn clients(&self) -> Clients {
        let ch = self.channel().await;
        Clients {
            id: IdentityClient::new(ch.clone()),
            ctl: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch.clone()),
            group: GroupControllerClient::new(ch),
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        // Whatever a failed test left mounted under the directory goes first (deepest first),
        // so the process can detach and no mount outlives the test.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut left: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(self.dir.path()))
            .collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        // SIGTERM: the process detaches what it attached and removes its sockets.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Clients {
    pub id: IdentityClient<Channel>,
    pub ctl: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub group: GroupControllerClient<Channel>,
}

pub fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn create_req(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

pub fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => {
            assert!(
                !s.message().is_empty(),
                "error {:?} without a message",
                s.code()
            );
            s.code()
        }
    }
}

impl Clients {
    pub async fn create(&mut self, name: &str) -> csi::Volume {
        self.ctl
            .create_volume(create_req(name, SIZE))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    pub async fn snapshot(&mut self, name: &str, source: &str) -> csi::Snapshot {
        self.ctl
            .create_snapshot(csi::CreateSnapshotRequest {
                name: name.into(),
                source_volume_id: source.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
    }

    pub async fn list_volume_ids(&mut self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .ctl
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            ids.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
            if r.next_token.is_empty() {
                return ids;
            }
            token = r.next_token;
        }
    }

    pub async fn ctl_caps(&mut self) -> Vec<CtlCap> {
        let caps = self
            .ctl
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .capabilities;
        caps.iter()
            .map(|c| match &c.r#type {
                Some(csi::controller_service_capability::Type::Rpc(r)) => r.r#type(),
                None => panic!("a controller capability without a type"),
            })
            .collect()
    }
}

pub fn verify_snapshot(s: &csi::Snapshot, source: &str) {
    assert!(!s.snapshot_id.is_empty());
    assert_eq!(s.source_volume_id, source);
    assert!(s.creation_time.is_some(), "creation_time is required");
    assert!(s.ready_to_use, "a FlashCopy snapshot is ready at once");
    assert!(s.size_bytes >= SIZE);
}

/// True when `p` is a mount point of this process's namespace.
pub fn is_mounted(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == p))
}
