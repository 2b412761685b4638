//! The CSI controller against real agents: agents on temporary directories (one per node),
//! the controller serving on a Unix socket, driven with the generated tonic clients; volume
//! contents checked through the agents' NBD exports with `qemu-io`.

mod agent_common;
mod skip;

use agent_common::Agent;
use flashcopy_csi::agent::Config;
use flashcopy_csi::csi::{self, Agents, ControllerService, TOPOLOGY_KEY, ids};
use flashcopy_csi::proto::agent::v1 as pb;
use flashcopy_csi::proto::csi::v1 as c;
use flashcopy_csi::proto::csi::v1::controller_client::ControllerClient;
use flashcopy_csi::proto::csi::v1::group_controller_client::GroupControllerClient;
use flashcopy_csi::proto::csi::v1::identity_client::IdentityClient;
use skip::have;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const MIB: i64 = 1 << 20;
const POOL: u64 = 64 << 20;

// Fields drop in order: the agents stop before their directory goes.
struct Cluster {
    agents: Vec<(String, Agent)>,
    svc: ControllerService,
    rt: Option<tokio::runtime::Runtime>,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    fn new(nodes: &[&str]) -> Self {
        Self::with_timeout(nodes, Duration::from_secs(5))
    }

    fn with_timeout(nodes: &[&str], freeze: Duration) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut agents = Vec::new();
        for n in nodes {
            let mut cfg = Config::new(tmp.path().join(n));
            cfg.capacity = Some(POOL);
            agents.push((n.to_string(), Agent::start_with(cfg)));
        }
        let table = Agents::new(agents.iter().map(|(n, a)| (n.clone(), a.uri())), None).unwrap();
        let svc = ControllerService::new(table, freeze);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let socket = tmp.path().join("csi/controller.sock");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = rt.block_on(async { csi::bind_unix(&socket) }).unwrap();
        rt.spawn(csi::serve_controller(svc.clone(), listener, async {
            let _ = rx.await;
        }));
        Self {
            _tmp: tmp,
            agents,
            svc,
            rt: Some(rt),
            socket,
            stop: Some(tx),
        }
    }

    fn channel(&self) -> Channel {
        let uri = format!("unix://{}", self.socket.display());
        self.block_on(async { Endpoint::from_shared(uri).unwrap().connect().await })
            .unwrap()
    }

    fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel())
    }

    fn grp(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.channel())
    }

    fn agent(&self, node: &str) -> &Agent {
        &self.agents.iter().find(|(n, _)| n == node).unwrap().1
    }

    fn agent_client(
        &self,
        node: &str,
    ) -> flashcopy_csi::proto::agent::v1::agent_client::AgentClient<Channel> {
        let a = self.agent(node);
        self.block_on(a.client())
    }

    /// CreateVolume through `ctl`, which must succeed.
    fn create(
        &self,
        ctl: &mut ControllerClient<Channel>,
        req: c::CreateVolumeRequest,
    ) -> c::Volume {
        self.block_on(ctl.create_volume(req))
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().unwrap().block_on(f)
    }

    /// The NBD URI of the agent volume behind a CSI volume id.
    fn nbd_of_volume(&self, volume_id: &str) -> String {
        let o = ids::parse(ids::Kind::Volume, volume_id).unwrap();
        self.nbd(&o.node, o.id)
    }

    fn nbd(&self, node: &str, agent_volume: u64) -> String {
        format!(
            "nbd+unix:///{agent_volume}?socket={}",
            self.agent(node).cfg.nbd_socket_path().display()
        )
    }

    /// The agent volume holding a snapshot's image.
    fn nbd_of_snapshot(&self, snapshot_id: &str) -> String {
        let o = ids::parse(ids::Kind::Snapshot, snapshot_id).unwrap();
        let mut a = self.agent_client(&o.node);
        let m = self
            .block_on(a.get_mapping(pb::GetMappingRequest {
                mapping: o.id.to_string(),
            }))
            .unwrap()
            .into_inner();
        self.nbd(&o.node, m.target_id)
    }

    fn agent_volumes(&self, node: &str) -> Vec<pb::Volume> {
        let mut a = self.agent_client(node);
        self.block_on(a.list_volumes(pb::ListVolumesRequest {}))
            .unwrap()
            .into_inner()
            .volumes
    }

    fn agent_mappings(&self, node: &str) -> Vec<pb::Mapping> {
        let mut a = self.agent_client(node);
        self.block_on(a.list_mappings(pb::ListMappingsRequest { group: None }))
            .unwrap()
            .into_inner()
            .mappings
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // Close every client connection before the agents shut down (they wait for clients).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ qemu-io {} {uri}\n{text}", cmds.join(" ; "));
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("error"),
        "qemu-io {cmds:?} on {uri}: {text}"
    );
}

fn mount_cap() -> c::VolumeCapability {
    c::VolumeCapability {
        access_type: Some(c::volume_capability::AccessType::Mount(
            c::volume_capability::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            },
        )),
        access_mode: Some(c::volume_capability::AccessMode {
            mode: c::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn topo(node: &str) -> c::Topology {
    c::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.to_string())]),
    }
}

fn vol_req(name: &str, required: i64, limit: i64) -> c::CreateVolumeRequest {
    c::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(c::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    }
}

fn expand_req(volume_id: &str, required: i64) -> c::ControllerExpandVolumeRequest {
    c::ControllerExpandVolumeRequest {
        volume_id: volume_id.into(),
        capacity_range: Some(c::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

fn on_node(mut r: c::CreateVolumeRequest, node: &str) -> c::CreateVolumeRequest {
    r.accessibility_requirements = Some(c::TopologyRequirement {
        requisite: vec![topo(node)],
        preferred: vec![],
    });
    r
}

fn snap_req(name: &str, source: &str) -> c::CreateSnapshotRequest {
    c::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("expected an error");
    (s.code(), s.message().to_string())
}

fn from_snapshot(name: &str, snapshot_id: &str, copy_rate: &str) -> c::CreateVolumeRequest {
    let mut r = vol_req(name, 0, 0);
    r.volume_content_source = Some(c::VolumeContentSource {
        r#type: Some(c::volume_content_source::Type::Snapshot(
            c::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    });
    r.parameters = HashMap::from([("copyRate".to_string(), copy_rate.to_string())]);
    r
}

fn from_volume(name: &str, volume_id: &str) -> c::CreateVolumeRequest {
    let mut r = vol_req(name, 0, 0);
    r.volume_content_source = Some(c::VolumeContentSource {
        r#type: Some(c::volume_content_source::Type::Volume(
            c::volume_content_source::VolumeSource {
                volume_id: volume_id.into(),
            },
        )),
    });
    r
}

#[test]
fn identity_names_the_driver_and_its_services() {
    let cl = Cluster::new(&["n1"]);
    let mut id = IdentityClient::new(cl.channel());
    let info = cl
        .block_on(id.get_plugin_info(c::GetPluginInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "flashcopy.csi.io");
    assert!(!info.vendor_version.is_empty());
    let caps = cl
        .block_on(id.get_plugin_capabilities(c::GetPluginCapabilitiesRequest {}))
        .unwrap()
        .into_inner();
    use c::plugin_capability::service::Type as T;
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(c::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    for t in [
        T::ControllerService,
        T::GroupControllerService,
        T::SnapshotMetadataService,
        T::VolumeAccessibilityConstraints,
    ] {
        assert!(services.contains(&(t as i32)), "{t:?} missing");
    }
    // An attached NBD device keeps its size: expansion is offline (see the test below).
    let expansion: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(c::plugin_capability::Type::VolumeExpansion(e)) => Some(e.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        expansion,
        [c::plugin_capability::volume_expansion::Type::Offline as i32]
    );
    let probe = cl
        .block_on(id.probe(c::ProbeRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let mut g = cl.grp();
    let gc = cl
        .block_on(g.group_controller_get_capabilities(c::GroupControllerGetCapabilitiesRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(gc.capabilities.len(), 1);
}

#[test]
fn an_attached_volume_grows_once_no_client_has_it() {
    let cl = Cluster::new(&["n1"]);
    let mut ctl = cl.ctl();
    let v = cl
        .create(&mut ctl, vol_req("pvc-attached", MIB, 0))
        .volume_id;
    let agent_id = ids::parse(ids::Kind::Volume, &v).unwrap().id;
    let clients = || {
        cl.agent_volumes("n1")
            .into_iter()
            .find(|a| a.id == agent_id)
            .unwrap()
            .nbd_clients
    };
    assert_eq!(clients(), 0);
    // A node has it attached: the client negotiated 1 MiB and would never see more, so the
    // controller refuses with FAILED_PRECONDITION (csi-resizer waits until no pod uses it).
    let attached = flashcopy_csi::nbd::client::Client::connect(
        &cl.agent("n1").cfg.nbd_socket_path(),
        &agent_id.to_string(),
    )
    .unwrap();
    assert_eq!(clients(), 1);
    let (got, msg) = code(cl.block_on(ctl.controller_expand_volume(expand_req(&v, 2 * MIB))));
    assert_eq!(got, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("in use (1 NBD client(s) attached)"), "{msg}");
    let size = |ctl: &mut ControllerClient<Channel>| {
        cl.block_on(ctl.controller_get_volume(c::ControllerGetVolumeRequest {
            volume_id: v.clone(),
        }))
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .capacity_bytes
    };
    assert_eq!(size(&mut ctl), MIB, "a refused expansion changes nothing");
    // A request for no more than the size it has is answered as done, attached or not.
    let same = cl
        .block_on(ctl.controller_expand_volume(expand_req(&v, MIB)))
        .unwrap()
        .into_inner();
    assert_eq!(same.capacity_bytes, MIB);
    // Detached (the server notices the closed connection), it grows.
    drop(attached);
    let t0 = Instant::now();
    while clients() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the client never went away"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let grown = cl
        .block_on(ctl.controller_expand_volume(expand_req(&v, 2 * MIB)))
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 2 * MIB);
    assert_eq!(size(&mut ctl), 2 * MIB);
    // A real client (qemu-io) connects afresh and sees the new size.
    if have("qemu-io") {
        qemu_io(
            &cl.nbd_of_volume(&v),
            &["write -P 0x5a 1M 1M", "read -P 0x5a 1M 1M"],
        );
    }
}

#[test]
fn create_volume_is_idempotent_and_follows_capacity_and_topology() {
    let cl = Cluster::new(&["n1", "n2"]);
    let mut ctl = cl.ctl();
    let v = cl.create(&mut ctl, on_node(vol_req("pvc-a", 3 * MIB + 1, 0), "n2"));
    assert_eq!(v.capacity_bytes, 4 * MIB, "rounded up to whole MiB");
    assert!(v.volume_id.starts_with("vol:n2:"), "{}", v.volume_id);
    assert_eq!(v.accessible_topology, vec![topo("n2")]);
    // Same name, compatible range: the same volume.
    let again = cl.create(&mut ctl, on_node(vol_req("pvc-a", 4 * MIB, 8 * MIB), "n2"));
    assert_eq!(again.volume_id, v.volume_id);
    // Same name, incompatible range.
    let (code_, msg) =
        code(cl.block_on(ctl.create_volume(on_node(vol_req("pvc-a", 8 * MIB, 0), "n2"))));
    assert_eq!(code_, Code::AlreadyExists, "{msg}");
    // Preferred wins among the requisite.
    let mut r = vol_req("pvc-b", MIB, 0);
    r.accessibility_requirements = Some(c::TopologyRequirement {
        requisite: vec![topo("n2"), topo("n1")],
        preferred: vec![topo("n1")],
    });
    let b = cl.create(&mut ctl, r);
    assert!(b.volume_id.starts_with("vol:n1:"));
    // Exact size below a MiB multiple: the limit wins over rounding.
    let e = cl.create(&mut ctl, vol_req("pvc-exact", 4096 * 3, 4096 * 3));
    assert_eq!(e.capacity_bytes, 4096 * 3);
    // A 128-byte name is fine; 129 is not.
    let long = "n".repeat(128);
    cl.block_on(ctl.create_volume(vol_req(&long, MIB, 0)))
        .unwrap();
    let before: usize = ["n1", "n2"].iter().map(|n| cl.agent_volumes(n).len()).sum();
    let bad: Vec<(c::CreateVolumeRequest, Code, &str)> = vec![
        (
            vol_req(&"n".repeat(129), MIB, 0),
            Code::InvalidArgument,
            "128",
        ),
        (vol_req("", MIB, 0), Code::InvalidArgument, "name"),
        (
            c::CreateVolumeRequest {
                volume_capabilities: vec![],
                ..vol_req("pvc-nocap", MIB, 0)
            },
            Code::InvalidArgument,
            "volume_capabilities",
        ),
        (
            vol_req("pvc-range", 2 * MIB, MIB),
            Code::OutOfRange,
            "limit_bytes",
        ),
        (vol_req("pvc-neg", -1, 0), Code::InvalidArgument, "negative"),
        (
            on_node(vol_req("pvc-nonode", MIB, 0), "n9"),
            Code::ResourceExhausted,
            "topology",
        ),
        (
            vol_req("pvc-huge", POOL as i64 + MIB, 0),
            Code::ResourceExhausted,
            "capacity",
        ),
        (
            c::CreateVolumeRequest {
                parameters: HashMap::from([("copyRate".to_string(), "200".to_string())]),
                ..vol_req("pvc-param", MIB, 0)
            },
            Code::InvalidArgument,
            "copyRate",
        ),
        (
            c::CreateVolumeRequest {
                parameters: HashMap::from([("colour".to_string(), "red".to_string())]),
                ..vol_req("pvc-param2", MIB, 0)
            },
            Code::InvalidArgument,
            "colour",
        ),
        (
            c::CreateVolumeRequest {
                volume_capabilities: vec![c::VolumeCapability {
                    access_mode: Some(c::volume_capability::AccessMode {
                        mode: c::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
                    }),
                    ..mount_cap()
                }],
                ..vol_req("pvc-rwx", MIB, 0)
            },
            Code::InvalidArgument,
            "MULTI_NODE_MULTI_WRITER",
        ),
    ];
    for (req, want, needle) in bad {
        let name = req.name.clone();
        let (got, msg) = code(cl.block_on(ctl.create_volume(req)));
        assert_eq!(got, want, "{name:?}: {msg}");
        assert!(
            msg.contains(needle),
            "{name:?}: {msg:?} should mention {needle}"
        );
    }
    let after: usize = ["n1", "n2"].iter().map(|n| cl.agent_volumes(n).len()).sum();
    assert_eq!(before, after, "refused requests created nothing");

    // Capacity reflects what was provisioned, per node and in total.
    let cap = |t: Option<c::Topology>| {
        cl.block_on(cl.ctl().get_capacity(c::GetCapacityRequest {
            accessible_topology: t,
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
    };
    assert_eq!(
        cap(Some(topo("n2"))).available_capacity,
        POOL as i64 - 4 * MIB
    );
    assert_eq!(
        cap(None).available_capacity,
        2 * POOL as i64 - 4 * MIB - MIB - 4096 * 3 - MIB
    );
    assert_eq!(cap(Some(topo("n9"))).available_capacity, 0);

    // Delete is idempotent, and gives the capacity back.
    cl.block_on(ctl.delete_volume(c::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    }))
    .unwrap();
    cl.block_on(ctl.delete_volume(c::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(cap(Some(topo("n2"))).available_capacity, POOL as i64);
    let (got, _) = code(
        cl.block_on(ctl.controller_get_volume(c::ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })),
    );
    assert_eq!(got, Code::NotFound);
}

#[test]
fn snapshots_restores_and_clones_read_at_once() {
    if !have("qemu-io") {
        return;
    }
    let cl = Cluster::new(&["n1"]);
    let mut ctl = cl.ctl();
    let v = cl.create(&mut ctl, vol_req("pvc-src", 4 * MIB, 0));
    qemu_io(&cl.nbd_of_volume(&v.volume_id), &["write -P 0xaa 0 1M"]);
    let s = cl
        .block_on(ctl.create_snapshot(snap_req("snap-1", &v.volume_id)))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s.ready_to_use);
    assert_eq!(s.size_bytes, 4 * MIB);
    assert_eq!(s.source_volume_id, v.volume_id);
    assert!(s.group_snapshot_id.is_empty());
    let t0 = s.creation_time.unwrap();
    // The source moves on; the snapshot keeps its point in time.
    qemu_io(&cl.nbd_of_volume(&v.volume_id), &["write -P 0xbb 0 512k"]);
    qemu_io(&cl.nbd_of_snapshot(&s.snapshot_id), &["read -P 0xaa 0 1M"]);
    // The source grows while the snapshot exists; the snapshot keeps its size and image,
    // and the grown region (written at once) has no dependants.
    let grown = cl
        .block_on(ctl.controller_expand_volume(expand_req(&v.volume_id, 6 * MIB)))
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 6 * MIB);
    assert!(grown.node_expansion_required);
    qemu_io(
        &cl.nbd_of_volume(&v.volume_id),
        &[
            "read -P 0xbb 0 512k",
            "read -P 0xaa 512k 512k",
            "read -P 0 1M 5M",
            "write -P 0xcc 3M 2M",
            "read -P 0xcc 3M 2M",
        ],
    );
    qemu_io(
        &cl.nbd_of_snapshot(&s.snapshot_id),
        &["read -P 0xaa 0 1M", "read -P 0 1M 3M"],
    );
    let s_now = cl
        .block_on(ctl.get_snapshot(c::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s_now.size_bytes, 4 * MIB);

    // Re-created by name: same id and creation time, even a second later.
    std::thread::sleep(Duration::from_millis(1100));
    let s2 = cl
        .block_on(ctl.create_snapshot(snap_req("snap-1", &v.volume_id)))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s2.snapshot_id, s.snapshot_id);
    assert_eq!(s2.creation_time.unwrap(), t0);
    let got = cl
        .block_on(ctl.get_snapshot(c::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, s);

    // Restore with copy rate 0: readable at once, through the cascade.
    let r = cl.create(&mut ctl, from_snapshot("pvc-restore", &s.snapshot_id, "0"));
    assert_eq!(r.capacity_bytes, 4 * MIB);
    assert!(r.content_source.is_some());
    qemu_io(
        &cl.nbd_of_volume(&r.volume_id),
        &["read -P 0xaa 0 1M", "read -P 0 1M 3M"],
    );
    // The restore depends on the snapshot: it cannot go yet.
    let (got, msg) = code(cl.block_on(ctl.delete_snapshot(c::DeleteSnapshotRequest {
        snapshot_id: s.snapshot_id.clone(),
        ..Default::default()
    })));
    assert_eq!(got, Code::FailedPrecondition, "{msg}");
    // Larger than the snapshot: the snapshot's data, then zeros; the extra region is the
    // new volume's own.
    let mut big = from_snapshot("pvc-big", &s.snapshot_id, "0");
    big.capacity_range = Some(c::CapacityRange {
        required_bytes: 8 * MIB,
        limit_bytes: 0,
    });
    let big = cl.create(&mut ctl, big);
    assert_eq!(big.capacity_bytes, 8 * MIB);
    qemu_io(
        &cl.nbd_of_volume(&big.volume_id),
        &[
            "read -P 0xaa 0 1M",
            "read -P 0 1M 7M",
            "write -P 0xee 3M 3M",
            "read -P 0xee 3M 3M",
        ],
    );
    qemu_io(
        &cl.nbd_of_snapshot(&s.snapshot_id),
        &["read -P 0xaa 0 1M", "read -P 0 1M 3M"],
    );
    // Below the snapshot's size: refused.
    let mut small = from_snapshot("pvc-small", &s.snapshot_id, "0");
    small.capacity_range = Some(c::CapacityRange {
        required_bytes: MIB,
        limit_bytes: 2 * MIB,
    });
    assert_eq!(
        code(cl.block_on(ctl.create_volume(small))).0,
        Code::OutOfRange
    );

    // Clone of the volume: its current data, readable at once; the copy finishes and the
    // mapping goes away by itself (autodelete).
    let mut cr = from_volume("pvc-clone", &v.volume_id);
    cr.parameters = HashMap::from([("copyRate".to_string(), "150".to_string())]);
    let k = cl.create(&mut ctl, cr);
    qemu_io(
        &cl.nbd_of_volume(&k.volume_id),
        &[
            "read -P 0xbb 0 512k",
            "read -P 0xaa 512k 512k",
            "read -P 0 1M 2M",
            "read -P 0xcc 3M 2M",
            "read -P 0 5M 1M",
        ],
    );
    let kid = ids::parse(ids::Kind::Volume, &k.volume_id).unwrap().id;
    let t = Instant::now();
    while cl.agent_mappings("n1").iter().any(|m| m.target_id == kid) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "clone copy did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    qemu_io(
        &cl.nbd_of_volume(&k.volume_id),
        &[
            "read -P 0xbb 0 512k",
            "read -P 0xaa 512k 512k",
            "read -P 0 1M 2M",
            "read -P 0xcc 3M 2M",
            "read -P 0 5M 1M",
        ],
    );

    // The clone's mapping is gone, but the volume remembers its source: the same request is
    // idempotent, another source or none is another volume under a taken name.
    let mut again = from_volume("pvc-clone", &v.volume_id);
    again.parameters = HashMap::from([("copyRate".to_string(), "150".to_string())]);
    let same = cl.block_on(ctl.create_volume(again)).unwrap().into_inner();
    assert_eq!(same.volume.unwrap().volume_id, k.volume_id);
    for other in [
        from_snapshot("pvc-clone", &s.snapshot_id, "150"),
        vol_req("pvc-clone", 0, 0),
    ] {
        let (got, msg) = code(cl.block_on(ctl.create_volume(other)));
        assert_eq!(got, Code::AlreadyExists, "{msg}");
    }

    // Snapshot name reused for another source.
    let (got, _) = code(cl.block_on(ctl.create_snapshot(snap_req("snap-1", &k.volume_id))));
    assert_eq!(got, Code::AlreadyExists);

    // Delete the restores (their copies stop), then the snapshot, twice.
    for id in [&r.volume_id, &r.volume_id, &big.volume_id] {
        cl.block_on(ctl.delete_volume(c::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .unwrap();
    }
    for _ in 0..2 {
        cl.block_on(ctl.delete_snapshot(c::DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        }))
        .unwrap();
    }
    assert_eq!(
        code(cl.block_on(ctl.get_snapshot(c::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })))
        .0,
        Code::NotFound
    );
    assert!(cl.agent_mappings("n1").is_empty());
    assert_eq!(cl.agent_volumes("n1").len(), 2, "source and clone remain");
}

#[test]
fn deleted_source_stays_hidden_until_its_last_snapshot_goes() {
    let cl = Cluster::new(&["n1"]);
    let mut ctl = cl.ctl();
    let v = cl.create(&mut ctl, vol_req("pvc-src", 8 * MIB, 0));
    if have("qemu-io") {
        qemu_io(&cl.nbd_of_volume(&v.volume_id), &["write -P 0x5c 0 2M"]);
    }
    let mut snaps = Vec::new();
    for n in ["s-old", "s-new"] {
        snaps.push(
            cl.block_on(ctl.create_snapshot(snap_req(n, &v.volume_id)))
                .unwrap()
                .into_inner()
                .snapshot
                .unwrap(),
        );
    }
    let free = |cl: &Cluster| {
        cl.block_on(cl.ctl().get_capacity(c::GetCapacityRequest::default()))
            .unwrap()
            .into_inner()
            .available_capacity
    };
    assert_eq!(free(&cl), POOL as i64 - 3 * 8 * MIB);
    cl.block_on(ctl.delete_volume(c::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    }))
    .unwrap();
    // Gone for CSI, still counted, snapshots intact.
    let listed = cl
        .block_on(ctl.list_volumes(c::ListVolumesRequest::default()))
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
    assert_eq!(free(&cl), POOL as i64 - 3 * 8 * MIB);
    if have("qemu-io") {
        for s in &snaps {
            qemu_io(&cl.nbd_of_snapshot(&s.snapshot_id), &["read -P 0x5c 0 2M"]);
        }
    }
    let (got, msg) = code(cl.block_on(ctl.create_snapshot(snap_req("s-late", &v.volume_id))));
    assert_eq!(got, Code::NotFound, "{msg}");
    // A same-named volume is a new one.
    let v2 = cl.create(&mut ctl, vol_req("pvc-src", 8 * MIB, 0));
    assert_ne!(v2.volume_id, v.volume_id);
    cl.block_on(ctl.delete_volume(c::DeleteVolumeRequest {
        volume_id: v2.volume_id.clone(),
        ..Default::default()
    }))
    .unwrap();
    // The newer snapshot goes first: the older one gets its grains by cleaning and still reads.
    cl.block_on(ctl.delete_snapshot(c::DeleteSnapshotRequest {
        snapshot_id: snaps[1].snapshot_id.clone(),
        ..Default::default()
    }))
    .unwrap();
    if have("qemu-io") {
        qemu_io(
            &cl.nbd_of_snapshot(&snaps[0].snapshot_id),
            &["read -P 0x5c 0 2M"],
        );
    }
    cl.block_on(ctl.delete_snapshot(c::DeleteSnapshotRequest {
        snapshot_id: snaps[0].snapshot_id.clone(),
        ..Default::default()
    }))
    .unwrap();
    assert!(
        cl.agent_volumes("n1").is_empty(),
        "{:?}",
        cl.agent_volumes("n1")
    );
    assert_eq!(free(&cl), POOL as i64);
}

#[test]
fn listings_page_and_filter() {
    let cl = Cluster::new(&["n1", "n2"]);
    let mut ctl = cl.ctl();
    let mut vols = Vec::new();
    for i in 0..5 {
        let node = if i % 2 == 0 { "n1" } else { "n2" };
        vols.push(
            cl.block_on(ctl.create_volume(on_node(vol_req(&format!("pvc-{i}"), MIB, 0), node)))
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    let mut snaps = Vec::new();
    for i in 0..3 {
        snaps.push(
            cl.block_on(ctl.create_snapshot(snap_req(&format!("snap-{i}"), &vols[i % 2])))
                .unwrap()
                .into_inner()
                .snapshot
                .unwrap()
                .snapshot_id,
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let p = cl
            .block_on(ctl.list_volumes(c::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            }))
            .unwrap()
            .into_inner();
        assert!(p.entries.len() <= 2);
        seen.extend(p.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if p.next_token.is_empty() {
            break;
        }
        token = p.next_token;
    }
    let mut want = vols.clone();
    want.sort();
    seen.sort();
    assert_eq!(seen, want, "every volume once, snapshot targets not listed");
    assert_eq!(
        code(cl.block_on(ctl.list_volumes(c::ListVolumesRequest {
            max_entries: 0,
            starting_token: "bogus".into(),
        })))
        .0,
        Code::Aborted
    );
    assert_eq!(
        code(cl.block_on(ctl.list_volumes(c::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })))
        .0,
        Code::InvalidArgument
    );
    let list = |r: c::ListSnapshotsRequest| {
        cl.block_on(cl.ctl().list_snapshots(r))
            .unwrap()
            .into_inner()
    };
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let p = list(c::ListSnapshotsRequest {
            max_entries: 1,
            starting_token: token.clone(),
            ..Default::default()
        });
        all.extend(
            p.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        if p.next_token.is_empty() {
            break;
        }
        token = p.next_token;
    }
    all.sort();
    let mut want = snaps.clone();
    want.sort();
    assert_eq!(all, want);
    let by_source = list(c::ListSnapshotsRequest {
        source_volume_id: vols[0].clone(),
        ..Default::default()
    });
    assert_eq!(by_source.entries.len(), 2);
    let by_id = list(c::ListSnapshotsRequest {
        snapshot_id: snaps[1].clone(),
        ..Default::default()
    });
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(
        by_id.entries[0].snapshot.as_ref().unwrap().source_volume_id,
        vols[1]
    );
    for unknown in ["snap:n1:999", "other-driver-id", "snap:n9:1"] {
        assert!(
            list(c::ListSnapshotsRequest {
                snapshot_id: unknown.into(),
                ..Default::default()
            })
            .entries
            .is_empty()
        );
    }
}

fn group_req(name: &str, vols: &[String]) -> c::CreateVolumeGroupSnapshotRequest {
    c::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: vols.to_vec(),
        ..Default::default()
    }
}

fn group_snapshot_on(nodes: &[&str]) {
    let cl = Cluster::new(nodes);
    let mut ctl = cl.ctl();
    let mut g = cl.grp();
    let mut vols = Vec::new();
    for (i, n) in ["db-log", "db-data"].iter().enumerate() {
        let node = nodes[i % nodes.len()];
        vols.push(
            cl.create(&mut ctl, on_node(vol_req(n, 2 * MIB, 0), node))
                .volume_id,
        );
    }
    let qemu = have("qemu-io");
    if qemu {
        qemu_io(&cl.nbd_of_volume(&vols[0]), &["write -P 0x11 0 1M"]);
        qemu_io(&cl.nbd_of_volume(&vols[1]), &["write -P 0x22 0 1M"]);
    }
    let starts = |cl: &Cluster| -> Vec<u64> {
        nodes
            .iter()
            .map(|n| {
                let mut a = cl.agent_client(n);
                cl.block_on(a.get_agent_info(pb::GetAgentInfoRequest {}))
                    .unwrap()
                    .into_inner()
                    .starts
            })
            .collect()
    };
    let before = starts(&cl);
    let gs = cl
        .block_on(g.create_volume_group_snapshot(group_req("gs-1", &vols)))
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(gs.ready_to_use);
    assert_eq!(gs.snapshots.len(), 2);
    let after = starts(&cl);
    // One start per agent: the group switched as one unit on each node.
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a - b, 1);
    }
    let times: Vec<_> = gs
        .snapshots
        .iter()
        .map(|s| s.creation_time.unwrap())
        .collect();
    assert_eq!(
        Some(gs.creation_time.unwrap()),
        times.iter().min_by_key(|t| t.seconds).copied()
    );
    for s in &gs.snapshots {
        assert_eq!(s.group_snapshot_id, gs.group_snapshot_id);
        assert!(s.ready_to_use && s.size_bytes == 2 * MIB);
        assert!(vols.contains(&s.source_volume_id));
    }
    let ids_: Vec<String> = gs.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    if qemu {
        qemu_io(&cl.nbd_of_volume(&vols[0]), &["write -P 0x33 0 1M"]);
        for s in &gs.snapshots {
            let p = if s.source_volume_id == vols[0] {
                "0x11"
            } else {
                "0x22"
            };
            qemu_io(
                &cl.nbd_of_snapshot(&s.snapshot_id),
                &[&format!("read -P {p} 0 1M")],
            );
        }
    }
    // Idempotent by name; another set of volumes under the name is refused.
    let again = cl
        .block_on(g.create_volume_group_snapshot(group_req("gs-1", &vols)))
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(again, gs);
    let (got, _) = code(cl.block_on(g.create_volume_group_snapshot(group_req("gs-1", &vols[..1]))));
    assert_eq!(got, Code::AlreadyExists);
    // Members cannot be deleted alone.
    let (got, msg) = code(cl.block_on(ctl.delete_snapshot(c::DeleteSnapshotRequest {
        snapshot_id: ids_[0].clone(),
        ..Default::default()
    })));
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("group"), "{msg}");
    // A member is a snapshot like any other for GetSnapshot and restores.
    let m = cl
        .block_on(ctl.get_snapshot(c::GetSnapshotRequest {
            snapshot_id: ids_[1].clone(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(m.group_snapshot_id, gs.group_snapshot_id);
    // Get needs the right member list.
    let get = |sids: Vec<String>| {
        cl.block_on(
            cl.grp()
                .get_volume_group_snapshot(c::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: gs.group_snapshot_id.clone(),
                    snapshot_ids: sids,
                    ..Default::default()
                }),
        )
    };
    assert_eq!(
        get(ids_.clone())
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap(),
        gs
    );
    assert_eq!(code(get(ids_[..1].to_vec())).0, Code::InvalidArgument);
    // Delete with a wrong list changes nothing; with the right one removes all; twice is fine.
    let del = |sids: Vec<String>| {
        cl.block_on(
            cl.grp()
                .delete_volume_group_snapshot(c::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: gs.group_snapshot_id.clone(),
                    snapshot_ids: sids,
                    ..Default::default()
                }),
        )
    };
    assert_eq!(code(del(vec![ids_[0].clone()])).0, Code::InvalidArgument);
    assert!(get(ids_.clone()).is_ok());
    del(ids_.clone()).unwrap();
    del(ids_.clone()).unwrap();
    assert_eq!(code(get(ids_.clone())).0, Code::NotFound);
    for n in nodes {
        assert!(cl.agent_mappings(n).is_empty());
        assert!(cl.agent_volumes(n).iter().all(|v| v.name.starts_with("v.")));
    }
    // Bad input.
    let bad = [
        (group_req("", &vols), Code::InvalidArgument),
        (group_req("gs-2", &[]), Code::InvalidArgument),
        (
            group_req("gs-2", &["other.driver/vol-1".to_string()]),
            Code::NotFound,
        ),
        (
            group_req("gs-2", &[vols[0].clone(), vols[0].clone()]),
            Code::InvalidArgument,
        ),
        (
            group_req("gs-2", &[vols[0].clone(), "vol:n1:999".to_string()]),
            Code::NotFound,
        ),
    ];
    for (r, want) in bad {
        let (got, msg) = code(cl.block_on(g.create_volume_group_snapshot(r)));
        assert_eq!(got, want, "{msg}");
    }
    for n in nodes {
        assert!(
            cl.agent_mappings(n).is_empty(),
            "refused groups left nothing"
        );
    }
}

#[test]
fn group_snapshot_on_one_node() {
    group_snapshot_on(&["n1"]);
}

#[test]
fn group_snapshot_across_two_agents() {
    group_snapshot_on(&["n1", "n2"]);
}

/// Our snapshot controller adds the extra-create-metadata parameters (K8S-SNAPSHOTS.md §A.7)
/// to every CreateSnapshot and CreateVolumeGroupSnapshot: the driver must take them (they are
/// the sidecar's, not the class's), and a retry with them must still be the same snapshot.
#[test]
fn the_snapshot_controllers_extra_metadata_parameters_are_accepted() {
    use flashcopy_csi::k8s::names::with_create_metadata;
    let cl = Cluster::new(&["n1"]);
    let mut ctl = cl.ctl();
    let mut g = cl.grp();
    let mut vols = Vec::new();
    for n in ["pvc-a", "pvc-b"] {
        vols.push(cl.create(&mut ctl, vol_req(n, MIB, 0)).volume_id);
    }
    let class = [("copyRate".to_string(), "0".to_string())].into();
    let mut req = snap_req("snapshot-vs-uid-1", &vols[0]);
    req.parameters = with_create_metadata(class, false, "app", "snap1", "snapcontent-vs-uid-1")
        .into_iter()
        .collect();
    assert_eq!(req.parameters.len(), 4);
    let s = cl
        .block_on(ctl.create_snapshot(req.clone()))
        .expect("CreateSnapshot with the controller's metadata")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s.ready_to_use);
    assert_eq!(s.source_volume_id, vols[0]);
    let again = cl
        .block_on(ctl.create_snapshot(req))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id);

    let mut greq = group_req("groupsnapshot-vgs-uid-1", &vols);
    greq.parameters = with_create_metadata(
        Default::default(),
        true,
        "app",
        "shop",
        "groupsnapcontent-vgs-uid-1",
    )
    .into_iter()
    .collect();
    let gs = cl
        .block_on(g.create_volume_group_snapshot(greq))
        .expect("CreateVolumeGroupSnapshot with the controller's metadata")
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(gs.ready_to_use);
    assert_eq!(gs.snapshots.len(), 2);
}

#[test]
fn a_group_freeze_past_its_timeout_aborts_and_leaves_nothing() {
    // A zero timeout: the freezes cannot all answer in time, so the controller aborts.
    let cl = Cluster::with_timeout(&["n1", "n2"], Duration::ZERO);
    let mut ctl = cl.ctl();
    let mut vols = Vec::new();
    for n in ["n1", "n2"] {
        vols.push(
            cl.block_on(ctl.create_volume(on_node(vol_req(&format!("v-{n}"), MIB, 0), n)))
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    let (got, msg) = code(
        cl.block_on(
            cl.grp()
                .create_volume_group_snapshot(group_req("gs-x", &vols)),
        ),
    );
    assert_eq!(got, Code::Aborted, "{msg}");
    assert!(msg.contains("freeze"), "{msg}");
    // Both agents take I/O again and hold nothing of the group.
    for (n, v) in ["n1", "n2"].iter().zip(&vols) {
        if have("qemu-io") {
            let t = Instant::now();
            qemu_io(
                &cl.nbd_of_volume(v),
                &["write -P 0x44 0 64k", "read -P 0x44 0 64k"],
            );
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{n}: I/O held {:?}",
                t.elapsed()
            );
        }
        assert!(
            cl.agent_mappings(n).is_empty(),
            "{n}: {:?}",
            cl.agent_mappings(n)
        );
        let mut a = cl.agent_client(n);
        let groups = cl
            .block_on(a.list_groups(pb::ListGroupsRequest {}))
            .unwrap()
            .into_inner()
            .groups;
        assert!(groups.is_empty(), "{n}: {groups:?}");
    }
    let listed = cl
        .block_on(ctl.list_snapshots(c::ListSnapshotsRequest::default()))
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
}

#[test]
fn freeze_commit_and_thaw_on_one_agent() {
    let cl = Cluster::new(&["n1"]);
    let mut n1 = cl.agent_client("n1");
    let mk = |cl: &Cluster,
              n1: &mut flashcopy_csi::proto::agent::v1::agent_client::AgentClient<Channel>,
              g: &str| {
        let s = cl
            .block_on(n1.create_volume(pb::CreateVolumeRequest {
                name: format!("{g}-s"),
                size_bytes: 1 << 20,
                origin: String::new(),
            }))
            .unwrap()
            .into_inner();
        let t = cl
            .block_on(n1.create_volume(pb::CreateVolumeRequest {
                name: format!("{g}-t"),
                size_bytes: 1 << 20,
                origin: String::new(),
            }))
            .unwrap()
            .into_inner();
        cl.block_on(n1.create_group(pb::CreateGroupRequest {
            name: Some(g.into()),
            autodelete: false,
        }))
        .unwrap();
        cl.block_on(n1.create_mapping(pb::CreateMappingRequest {
            source: s.id.to_string(),
            target: t.id.to_string(),
            copy_rate: Some(0),
            group: Some(g.into()),
            ..Default::default()
        }))
        .unwrap();
        s
    };
    let s = mk(&cl, &mut n1, "ga");
    // Not prepared: refused, nothing held.
    let (got, msg) = code(cl.block_on(n1.freeze_group(pb::FreezeGroupRequest {
        group: "ga".into(),
        timeout_ms: 1000,
    })));
    assert_eq!(got, Code::FailedPrecondition, "{msg}");
    let (got, _) = code(cl.block_on(n1.freeze_group(pb::FreezeGroupRequest {
        group: "ga".into(),
        timeout_ms: 0,
    })));
    assert_eq!(got, Code::InvalidArgument);
    cl.block_on(n1.prepare_group(pb::PrepareGroupRequest {
        group: "ga".into(),
        restore: false,
    }))
    .unwrap();
    // Thaw: I/O resumes, the group is still prepared.
    let tok = cl
        .block_on(n1.freeze_group(pb::FreezeGroupRequest {
            group: "ga".into(),
            timeout_ms: 10_000,
        }))
        .unwrap()
        .into_inner()
        .token;
    let th = cl
        .block_on(n1.thaw_group(pb::ThawGroupRequest { token: tok.clone() }))
        .unwrap()
        .into_inner();
    assert!(th.thawed);
    if have("qemu-io") {
        let t = Instant::now();
        qemu_io(&cl.nbd("n1", s.id), &["write -P 0x55 0 4k"]);
        assert!(t.elapsed() < Duration::from_secs(2));
        // A freeze nobody commits or thaws ends by itself: a write issued meanwhile waits,
        // then completes; the group stays prepared.
        cl.block_on(n1.freeze_group(pb::FreezeGroupRequest {
            group: "ga".into(),
            timeout_ms: 1500,
        }))
        .unwrap();
        let t = Instant::now();
        qemu_io(
            &cl.nbd("n1", s.id),
            &["write -P 0x66 0 4k", "read -P 0x66 0 4k"],
        );
        let waited = t.elapsed();
        println!("write during an abandoned freeze took {waited:?}");
        assert!(
            waited >= Duration::from_millis(1000),
            "{waited:?}: I/O was not held"
        );
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        let g = cl
            .block_on(n1.get_group(pb::GetGroupRequest { group: "ga".into() }))
            .unwrap()
            .into_inner();
        assert_eq!(g.state(), pb::GroupState::Prepared);
    }
    assert_eq!(
        code(cl.block_on(n1.commit_group_start(pb::CommitGroupStartRequest { token: tok }))).0,
        Code::Aborted
    );
    // Freeze then commit: the group starts, the pause is reported.
    let tok = cl
        .block_on(n1.freeze_group(pb::FreezeGroupRequest {
            group: "ga".into(),
            timeout_ms: 10_000,
        }))
        .unwrap()
        .into_inner()
        .token;
    let r = cl
        .block_on(n1.commit_group_start(pb::CommitGroupStartRequest { token: tok }))
        .unwrap()
        .into_inner();
    assert_eq!(r.group.unwrap().state(), pb::GroupState::Copying);
    // RenameVolume keeps data and id; capacity figures are reported.
    let v = cl
        .block_on(n1.rename_volume(pb::RenameVolumeRequest {
            volume: s.id.to_string(),
            name: "renamed".into(),
        }))
        .unwrap()
        .into_inner();
    assert_eq!((v.id, v.name.as_str()), (s.id, "renamed"));
    let (got, _) = code(cl.block_on(n1.rename_volume(pb::RenameVolumeRequest {
        volume: s.id.to_string(),
        name: "9bad".into(),
    })));
    assert_eq!(got, Code::InvalidArgument);
    let info = cl
        .block_on(n1.get_agent_info(pb::GetAgentInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.capacity_bytes, info.provisioned_bytes),
        (POOL, 2 << 20)
    );
}

#[test]
fn a_second_call_on_a_busy_volume_is_aborted() {
    let cl = Cluster::new(&["n1"]);
    let mut ctl = cl.ctl();
    let v = cl.create(&mut ctl, vol_req("pvc-busy", MIB, 0)).volume_id;
    let held = cl.svc.guards().take([format!("volume {v}")]).unwrap();
    let (got, msg) = code(cl.block_on(ctl.create_snapshot(snap_req("s", &v))));
    assert_eq!(got, Code::Aborted, "{msg}");
    let (got, _) = code(cl.block_on(ctl.delete_volume(c::DeleteVolumeRequest {
        volume_id: v.clone(),
        ..Default::default()
    })));
    assert_eq!(got, Code::Aborted);
    let (got, _) = code(cl.block_on(ctl.create_volume(from_volume("pvc-c", &v))));
    assert_eq!(got, Code::Aborted);
    assert!(cl.agent_mappings("n1").is_empty(), "nothing happened");
    drop(held);
    cl.block_on(ctl.create_snapshot(snap_req("s", &v))).unwrap();
}

#[test]
fn unknown_ids_and_missing_fields_get_the_spec_codes() {
    let cl = Cluster::new(&["n1"]);
    let mut ctl = cl.ctl();
    // Deletes of unknown ids succeed.
    for id in ["vol:n1:999", "nope", "vol:n9:1"] {
        cl.block_on(ctl.delete_volume(c::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
        .unwrap();
    }
    for id in ["snap:n1:999", "nope"] {
        cl.block_on(ctl.delete_snapshot(c::DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        }))
        .unwrap();
    }
    assert_eq!(
        code(cl.block_on(ctl.delete_volume(c::DeleteVolumeRequest::default()))).0,
        Code::InvalidArgument
    );
    assert_eq!(
        code(cl.block_on(ctl.delete_snapshot(c::DeleteSnapshotRequest::default()))).0,
        Code::InvalidArgument
    );
    for id in ["snap:n1:999", "other", "snap:n9:1"] {
        let (got, _) = code(cl.block_on(ctl.get_snapshot(c::GetSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        })));
        assert_eq!(got, Code::NotFound, "{id}");
    }
    for id in ["vol:n1:999", "other"] {
        assert_eq!(
            code(cl.block_on(ctl.create_snapshot(snap_req("s", id)))).0,
            Code::NotFound
        );
        assert_eq!(
            code(cl.block_on(ctl.create_volume(from_volume("c", id)))).0,
            Code::NotFound
        );
        assert_eq!(
            code(
                cl.block_on(ctl.controller_get_volume(c::ControllerGetVolumeRequest {
                    volume_id: id.into()
                }))
            )
            .0,
            Code::NotFound
        );
        assert_eq!(
            code(cl.block_on(ctl.validate_volume_capabilities(
                c::ValidateVolumeCapabilitiesRequest {
                    volume_id: id.into(),
                    volume_capabilities: vec![mount_cap()],
                    ..Default::default()
                }
            )))
            .0,
            Code::NotFound
        );
    }
    assert_eq!(
        code(cl.block_on(ctl.create_volume(from_snapshot("c", "snap:n1:5", "0")))).0,
        Code::NotFound
    );
    assert_eq!(
        code(cl.block_on(ctl.create_snapshot(snap_req("", "vol:n1:1")))).0,
        Code::InvalidArgument
    );
    assert_eq!(
        code(cl.block_on(ctl.create_snapshot(snap_req("s", "")))).0,
        Code::InvalidArgument
    );
    let v = cl.create(&mut ctl, vol_req("pvc-x", MIB, 0)).volume_id;
    let mut bad_param = snap_req("s", &v);
    bad_param.parameters = HashMap::from([("grainSize".to_string(), "128".to_string())]);
    let (got, msg) = code(cl.block_on(ctl.create_snapshot(bad_param)));
    assert_eq!(got, Code::InvalidArgument);
    assert!(msg.contains("grainSize"), "{msg}");
    // Validate: supported vs not.
    let ok = cl
        .block_on(
            ctl.validate_volume_capabilities(c::ValidateVolumeCapabilitiesRequest {
                volume_id: v.clone(),
                volume_capabilities: vec![mount_cap()],
                ..Default::default()
            }),
        )
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let mut rwx = mount_cap();
    rwx.access_mode = Some(c::volume_capability::AccessMode {
        mode: c::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    let no = cl
        .block_on(
            ctl.validate_volume_capabilities(c::ValidateVolumeCapabilitiesRequest {
                volume_id: v.clone(),
                volume_capabilities: vec![rwx],
                ..Default::default()
            }),
        )
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    // Expand: grows a plain volume, and one with a snapshot (which keeps its size).
    let grown = cl
        .block_on(ctl.controller_expand_volume(expand_req(&v, 2 * MIB)))
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 2 * MIB);
    assert!(grown.node_expansion_required);
    assert_eq!(
        code(cl.block_on(
            ctl.controller_expand_volume(c::ControllerExpandVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
        ))
        .0,
        Code::InvalidArgument
    );
    assert_eq!(
        code(cl.block_on(ctl.controller_expand_volume(expand_req(&v, POOL as i64 + MIB)))).0,
        Code::ResourceExhausted
    );
    let snap = cl
        .block_on(ctl.create_snapshot(snap_req("s", &v)))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let grown = cl
        .block_on(ctl.controller_expand_volume(expand_req(&v, 3 * MIB + 1)))
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 4 * MIB, "whole MiB");
    assert!(grown.node_expansion_required);
    let now = cl
        .block_on(ctl.controller_get_volume(c::ControllerGetVolumeRequest { volume_id: v }))
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(now.capacity_bytes, 4 * MIB);
    let snap_now = cl
        .block_on(ctl.get_snapshot(c::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap_now.size_bytes, 2 * MIB);
    // A volume whose size ends inside a grain is copied only at its own size; a larger copy
    // is refused and leaves nothing behind.
    let odd = cl.create(&mut ctl, vol_req("pvc-odd", MIB + 1, MIB + 512));
    assert_eq!(odd.capacity_bytes, MIB + 512);
    let agent_vols = cl.agent_volumes("n1").len();
    let mut bigger = from_volume("pvc-odd-big", &odd.volume_id);
    bigger.capacity_range = Some(c::CapacityRange {
        required_bytes: 2 * MIB,
        limit_bytes: 0,
    });
    let (got, msg) = code(cl.block_on(ctl.create_volume(bigger)));
    assert_eq!(got, Code::OutOfRange, "{msg}");
    assert!(msg.contains("request exactly 1049088 bytes"), "{msg}");
    assert_eq!(cl.agent_volumes("n1").len(), agent_vols);
    let same = cl.create(&mut ctl, from_volume("pvc-odd-copy", &odd.volume_id));
    assert_eq!(same.capacity_bytes, MIB + 512);
    // Group calls with missing ids.
    let mut g = cl.grp();
    assert_eq!(
        code(cl.block_on(g.get_volume_group_snapshot(c::GetVolumeGroupSnapshotRequest::default())))
            .0,
        Code::InvalidArgument
    );
    assert_eq!(
        code(cl.block_on(
            g.get_volume_group_snapshot(c::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: "group:g.none".into(),
                ..Default::default()
            })
        ))
        .0,
        Code::NotFound
    );
    cl.block_on(
        g.delete_volume_group_snapshot(c::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: "whatever".into(),
            ..Default::default()
        }),
    )
    .unwrap();
    // Publish is not offered.
    assert_eq!(
        code(
            cl.block_on(
                ctl.controller_publish_volume(c::ControllerPublishVolumeRequest::default())
            )
        )
        .0,
        Code::Unimplemented
    );
}

#[test]
fn the_subcommand_serves_replaces_a_stale_socket_and_stops_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("n1"));
    let sock = tmp.path().join("csi.sock");
    std::fs::write(&sock, b"stale").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"))
        .args(["csi", "controller", "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--agent")
        .arg(format!("n1={}", agent.uri()))
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "controller did not start"
        );
        assert!(child.try_wait().unwrap().is_none(), "controller exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let info = rt.block_on(async {
        let ch = Endpoint::from_shared(format!("unix://{}", sock.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        IdentityClient::new(ch)
            .get_plugin_info(c::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(info.name, "flashcopy.csi.io");
    // A bad --agent is refused before serving.
    let bad = Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"))
        .args([
            "csi",
            "controller",
            "--endpoint",
            "unix:///tmp/x.sock",
            "--agent",
            "n1",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("NODE=URL"));
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket removed");
}
