//! In a cluster the CSI controller reaches agents through `--agent-template` and names no node
//! up front: which nodes its listings cover comes from the CSINode objects (mocked API server)
//! that name our driver. Real agents serve the nodes; ListVolumes, ListSnapshots and GetCapacity
//! without topology must see every registered node and no other.

mod agent_common;
mod k8s_common;

use agent_common::Agent;
use flashcopy_csi::agent::Config;
use flashcopy_csi::csi::{Agents, ControllerService};
use flashcopy_csi::k8s::csinodes;
use flashcopy_csi::proto::csi::v1 as c;
use flashcopy_csi::proto::csi::v1::controller_server::Controller;
use k8s_common::{ApiServer, Fault};
use std::collections::BTreeSet;
use std::time::Duration;
use tonic::Request;

const MIB: i64 = 1 << 20;

fn csinode(node: &str, drivers: &[(&str, &str)]) -> String {
    let drivers: Vec<String> = drivers
        .iter()
        .map(|(name, id)| format!("{{name: {name}, nodeID: {id}, topologyKeys: []}}"))
        .collect();
    format!(
        "apiVersion: storage.k8s.io/v1\nkind: CSINode\nmetadata: {{name: {node}}}\nspec:\n  drivers: [{}]\n---\n",
        drivers.join(", ")
    )
}

fn volume_req(name: &str, node: &str) -> c::CreateVolumeRequest {
    let seg = |n: &str| c::Topology {
        segments: [(flashcopy_csi::csi::TOPOLOGY_KEY.to_string(), n.to_string())].into(),
    };
    c::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(c::CapacityRange {
            required_bytes: MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![c::VolumeCapability {
            access_type: Some(c::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(c::volume_capability::AccessMode {
                mode: c::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }],
        accessibility_requirements: Some(c::TopologyRequirement {
            requisite: vec![seg(node)],
            preferred: vec![seg(node)],
        }),
        ..Default::default()
    }
}

#[test]
fn listings_cover_the_nodes_whose_csinode_names_our_driver() {
    let tmp = tempfile::tempdir().unwrap();
    // Agents for n1 and n2 at the template's paths; n3 runs another driver only.
    let agents: Vec<Agent> = ["n1", "n2"]
        .iter()
        .map(|n| Agent::start_with(Config::new(tmp.path().join(n))))
        .collect();
    let template = format!("unix://{}/{{node}}/agent.sock", tmp.path().display());
    assert_eq!(
        agents[0].uri(),
        template.replace("{node}", "n1"),
        "the template reaches the test agents"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let svc = ControllerService::new(
            Agents::new([], Some(template)).unwrap(),
            Duration::from_secs(5),
        );
        let list_volumes = || async {
            svc.list_volumes(Request::new(c::ListVolumesRequest::default()))
                .await
                .unwrap()
                .into_inner()
                .entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id)
                .collect::<BTreeSet<String>>()
        };
        let create = |name: &'static str, node: &'static str| async {
            svc.create_volume(Request::new(volume_req(name, node)))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id
        };
        let (v1, v2) = (create("pvc-1", "n1").await, create("pvc-2", "n2").await);
        let s2 = svc
            .create_snapshot(Request::new(c::CreateSnapshotRequest {
                source_volume_id: v2.clone(),
                name: "snap-2".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id;
        // Before discovery: topology-addressed calls work, unaddressed listings see nothing.
        assert!(list_volumes().await.is_empty());

        let objects = csinode("n1", &[("flashcopy.csi.io", "n1")])
            + &csinode("n2", &[("other.csi.io", "x"), ("flashcopy.csi.io", "n2")])
            + &csinode("n3", &[("other.csi.io", "n3")]);
        let (server, client) = ApiServer::start(&objects);
        let nodes = csinodes::our_nodes(&client).await.unwrap();
        assert_eq!(nodes, ["n1", "n2"]);
        svc.agents().set_discovered(nodes);
        assert_eq!(
            list_volumes().await,
            BTreeSet::from([v1.clone(), v2.clone()])
        );
        let snaps: Vec<String> = svc
            .list_snapshots(Request::new(c::ListSnapshotsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.snapshot.unwrap().snapshot_id)
            .collect();
        assert_eq!(snaps, [s2]);
        let total = svc
            .get_capacity(Request::new(c::GetCapacityRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .available_capacity;
        let one = svc
            .get_capacity(Request::new(c::GetCapacityRequest {
                accessible_topology: Some(c::Topology {
                    segments: [(flashcopy_csi::csi::TOPOLOGY_KEY.into(), "n1".into())].into(),
                }),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .available_capacity;
        assert!(
            one > 0 && total >= 2 * one - 2 * MIB,
            "{total} vs {one} per node"
        );

        // The refresher: a node that leaves the cluster leaves the listings; a failed list
        // keeps the last one instead of emptying it.
        let (client2, agents2) = (client.clone(), svc.agents());
        server.delete("csinodes", "", "n1");
        let task = tokio::spawn(csinodes::keep_discovering(
            client2,
            agents2,
            Duration::from_millis(20),
        ));
        let t0 = std::time::Instant::now();
        while list_volumes().await.contains(&v1) {
            assert!(t0.elapsed() < Duration::from_secs(10), "n1 never left");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(list_volumes().await, BTreeSet::from([v2.clone()]));
        server.fault(Fault::new("LIST", "csinodes", 503, 1000));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            server.state.lock().faults_hit > 0,
            "the refresher kept listing"
        );
        assert_eq!(list_volumes().await, BTreeSet::from([v2]));
        task.abort();
    });
    for a in agents {
        a.stop().unwrap();
    }
}
