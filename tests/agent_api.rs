//! The agent API through the generated tonic client: objects by id and name, error codes,
//! background copy workers, an atomic group start, the event stream, graceful shutdown and
//! restart, stale and busy sockets.

mod agent_common;

use agent_common::Agent;
use flashcopy_csi::agent::status::ERROR_KIND_KEY;
use flashcopy_csi::proto::agent::v1::{self as pb, agent_client::AgentClient};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

async fn mkvol(c: &mut AgentClient<Channel>, name: &str, size: u64) -> pb::Volume {
    c.create_volume(pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        origin: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

fn map_req(source: &str, target: &str) -> pb::CreateMappingRequest {
    pb::CreateMappingRequest {
        source: source.into(),
        target: target.into(),
        ..Default::default()
    }
}

async fn get(c: &mut AgentClient<Channel>, m: &str) -> pb::Mapping {
    c.get_mapping(pb::GetMappingRequest { mapping: m.into() })
        .await
        .unwrap()
        .into_inner()
}

fn kind(s: &tonic::Status) -> &str {
    s.metadata()
        .get(ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Polls until `f` holds (10 s at most).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn objects_by_id_and_name_and_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let mut c = agent.client().await;

    let a = mkvol(&mut c, "a", 4 * MIB).await;
    let b = mkvol(&mut c, "b", 4 * MIB).await;
    mkvol(&mut c, "small", MIB).await;
    assert_eq!(a.nbd_export, a.id.to_string());
    let by_name = c
        .get_volume(pb::GetVolumeRequest { volume: "b".into() })
        .await
        .unwrap()
        .into_inner();
    let by_id = c
        .get_volume(pb::GetVolumeRequest {
            volume: b.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_name, by_id);
    let vols = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(vols.len(), 3);

    // Each rule kind gets its code; the message names the rule.
    let e = mkvol_err(&mut c, "a", MIB).await;
    assert_eq!((e.code(), kind(&e)), (Code::AlreadyExists, "NameInUse"));
    let e = mkvol_err(&mut c, "odd", 1000).await;
    assert_eq!((e.code(), kind(&e)), (Code::InvalidArgument, "InvalidSize"));
    let e = c
        .get_volume(pb::GetVolumeRequest {
            volume: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("\"nope\""), "{}", e.message());
    let e = c.create_mapping(map_req("a", "a")).await.unwrap_err();
    assert_eq!((e.code(), kind(&e)), (Code::InvalidArgument, "SameVolume"));
    let e = c
        .create_mapping(pb::CreateMappingRequest {
            grain_kib: Some(128),
            ..map_req("a", "b")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let m = c
        .create_mapping(pb::CreateMappingRequest {
            name: Some("snap".into()),
            copy_rate: Some(0),
            grain_kib: Some(64),
            ..map_req("a", &b.id.to_string())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            m.name.as_str(),
            m.source_name.as_str(),
            m.target_name.as_str()
        ),
        ("snap", "a", "b")
    );
    assert_eq!(m.state, pb::MappingState::IdleOrCopied as i32);
    assert_eq!((m.copy_rate, m.clean_rate, m.grain_kib), (0, 50, 64));
    // Sizes may differ (the smaller one bounds the mapped range), but a mapped volume
    // cannot shrink.
    let e = c
        .resize_volume(pb::ResizeVolumeRequest {
            volume: "a".into(),
            size_bytes: MIB,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), kind(&e)),
        (Code::FailedPrecondition, "VolumeInUse")
    );
    let e = c.create_mapping(map_req("b", "b")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    mkvol(&mut c, "c", 4 * MIB).await;
    mkvol(&mut c, "d", 4 * MIB).await;
    c.create_mapping(map_req("c", "d")).await.unwrap();
    let e = c.create_mapping(map_req("a", "d")).await.unwrap_err();
    assert_eq!((e.code(), kind(&e)), (Code::AlreadyExists, "TargetInUse"));

    // Start before prepare: the wrong state.
    let e = c
        .start_mapping(pb::StartMappingRequest {
            mapping: "snap".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), kind(&e)), (Code::FailedPrecondition, "BadState"));
    assert!(e.message().contains("CMMVC5903E"), "{}", e.message());
    // A volume in a mapping cannot go.
    let e = c
        .delete_volume(pb::DeleteVolumeRequest { volume: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), kind(&e)),
        (Code::FailedPrecondition, "VolumeInUse")
    );
    // Rates: checked by the engine (0-150) and on the wire.
    let e = c
        .modify_mapping(pb::ModifyMappingRequest {
            mapping: "snap".into(),
            copy_rate: Some(151),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), kind(&e)), (Code::InvalidArgument, "InvalidRate"));
    let e = c
        .modify_mapping(pb::ModifyMappingRequest {
            mapping: "snap".into(),
            copy_rate: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // prepare, start --prep of a prepared mapping, start, progress.
    let m = c
        .prepare_mapping(pb::PrepareMappingRequest {
            mapping: "fcmap1".into(),
            restore: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state, pb::MappingState::Prepared as i32);
    let e = c
        .start_mapping(pb::StartMappingRequest {
            mapping: "snap".into(),
            prep: true,
            restore: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), kind(&e)),
        (Code::FailedPrecondition, "AlreadyPrepared")
    );
    let r = c
        .start_mapping(pb::StartMappingRequest {
            mapping: "snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let m = r.mapping.unwrap();
    assert_eq!(m.state, pb::MappingState::Copying as i32);
    assert!(m.start_time.is_some());
    assert_eq!(m.progress, 0);
    let e = c
        .delete_mapping(pb::DeleteMappingRequest {
            mapping: "snap".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // chfcmap: a rename alone, then the copy rate: the worker copies to 100% and completes.
    let m = c
        .modify_mapping(pb::ModifyMappingRequest {
            mapping: "snap".into(),
            name: Some("snap2".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.name, "snap2");
    let e = c
        .modify_mapping(pb::ModifyMappingRequest {
            mapping: "snap2".into(),
            name: Some("x".into()),
            copy_rate: Some(5),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), kind(&e)),
        (Code::InvalidArgument, "NameWithOtherChanges")
    );
    c.modify_mapping(pb::ModifyMappingRequest {
        mapping: "snap2".into(),
        copy_rate: Some(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c2 = c.clone();
    eventually("the background copy to complete", || {
        let mut c = c2.clone();
        async move {
            let m = get(&mut c, "snap2").await;
            m.state == pb::MappingState::IdleOrCopied as i32 && m.progress == 100 && m.complete
        }
    })
    .await;
    let info = c2
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.starts, 1);
    assert!(info.background_grains >= 64, "{info:?}");
    c.delete_mapping(pb::DeleteMappingRequest {
        mapping: "snap2".into(),
        force: false,
    })
    .await
    .unwrap();
    c.delete_volume(pb::DeleteVolumeRequest {
        volume: a.id.to_string(),
    })
    .await
    .unwrap();
    agent.stop_async().await.unwrap();
}

async fn mkvol_err(c: &mut AgentClient<Channel>, name: &str, size: u64) -> tonic::Status {
    c.create_volume(pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        origin: String::new(),
    })
    .await
    .unwrap_err()
}

#[tokio::test]
async fn group_start_through_the_api_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let mut c = agent.client().await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    for n in ["db", "log", "db-snap", "log-snap"] {
        mkvol(&mut c, n, 2 * MIB).await;
    }
    let g = c
        .create_group(pb::CreateGroupRequest {
            name: Some("cg".into()),
            autodelete: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.state, pb::GroupState::Empty as i32);
    let m1 = c
        .create_mapping(pb::CreateMappingRequest {
            copy_rate: Some(0),
            group: Some("cg".into()),
            ..map_req("db", "db-snap")
        })
        .await
        .unwrap()
        .into_inner();
    let m2 = c
        .create_mapping(pb::CreateMappingRequest {
            copy_rate: Some(0),
            ..map_req("log", "log-snap")
        })
        .await
        .unwrap()
        .into_inner();
    // Join via AddToGroup; a grouped mapping is driven through its group.
    c.add_to_group(pb::AddToGroupRequest {
        group: g.id.to_string(),
        mapping: m2.name.clone(),
    })
    .await
    .unwrap();
    let e = c
        .prepare_mapping(pb::PrepareMappingRequest {
            mapping: m1.name.clone(),
            restore: false,
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), kind(&e)), (Code::FailedPrecondition, "InGroup"));

    let members = c
        .list_mappings(pb::ListMappingsRequest {
            group: Some("cg".into()),
        })
        .await
        .unwrap()
        .into_inner()
        .mappings;
    assert_eq!(members.len(), 2);
    let g = c
        .prepare_group(pb::PrepareGroupRequest {
            group: "cg".into(),
            restore: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.state, pb::GroupState::Prepared as i32);
    let r = c
        .start_group(pb::StartGroupRequest {
            group: "cg".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let g = r.group.unwrap();
    assert_eq!(g.state, pb::GroupState::Copying as i32);
    assert!(r.pause_micros > 0, "the pause is measured");
    let a = get(&mut c, &m1.id.to_string()).await;
    let b = get(&mut c, &m2.id.to_string()).await;
    assert_eq!(a.state, pb::MappingState::Copying as i32);
    assert_eq!(a.start_time, b.start_time, "one point in time");
    let info = c
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.starts, info.last_pause_micros), (1, r.pause_micros));

    // Membership cannot change while the group is active.
    let e = c
        .remove_from_group(pb::RemoveFromGroupRequest {
            mapping: m1.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.stop_group(pb::StopGroupRequest {
        group: "cg".into(),
        force: true,
        split: false,
    })
    .await
    .unwrap();
    c.delete_group(pb::DeleteGroupRequest {
        group: "cg".into(),
        force: true,
    })
    .await
    .unwrap();

    // The stream saw every transition in order, then the start with its pause.
    use pb::event::Kind;
    let mut seen = Vec::new();
    let mut last_seq = 0;
    while !seen
        .iter()
        .any(|k| matches!(k, Kind::GroupDeleted(d) if d.group == g.id))
    {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("event in time")
            .unwrap()
            .expect("stream open");
        assert!(ev.seq > last_seq);
        last_seq = ev.seq;
        seen.push(ev.kind.unwrap());
    }
    let state = |m: u64, from: pb::MappingState, to: pb::MappingState| {
        seen.iter().position(|k| {
            matches!(k, Kind::MappingState(c)
                if c.mapping == m && c.from == from as i32 && c.to == to as i32)
        })
    };
    use pb::MappingState as S;
    for m in [m1.id, m2.id] {
        let p = state(m, S::IdleOrCopied, S::Preparing).expect("preparing");
        let q = state(m, S::Preparing, S::Prepared).expect("prepared");
        let s = state(m, S::Prepared, S::Copying).expect("copying");
        let t = state(m, S::Copying, S::Stopped).expect("stopped");
        assert!(p < q && q < s && s < t, "{seen:?}");
    }
    assert!(
        seen.iter().any(|k| matches!(k, Kind::Started(s)
            if s.group == Some(g.id) && s.pause_micros == r.pause_micros)),
        "{seen:?}"
    );
    agent.stop_async().await.unwrap();
}

#[tokio::test]
async fn autodelete_clone_completes_and_reports_through_events() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let mut c = agent.client().await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    mkvol(&mut c, "src", 4 * MIB).await;
    mkvol(&mut c, "clone", 4 * MIB).await;
    let m = c
        .create_mapping(pb::CreateMappingRequest {
            copy_rate: Some(100),
            autodelete: true,
            ..map_req("src", "clone")
        })
        .await
        .unwrap()
        .into_inner();
    c.start_mapping(pb::StartMappingRequest {
        mapping: m.name.clone(),
        prep: true,
        restore: false,
    })
    .await
    .unwrap();
    use pb::event::Kind;
    let mut kinds = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        let k = ev.kind.unwrap();
        let end = matches!(&k, Kind::MappingDeleted(d) if d.mapping == m.id);
        kinds.push(k);
        if end {
            break;
        }
    }
    assert!(
        kinds.iter().any(|k| matches!(k, Kind::MappingState(c)
            if c.from == pb::MappingState::Copying as i32
                && c.to == pb::MappingState::IdleOrCopied as i32)),
        "{kinds:?}"
    );
    let n = kinds
        .iter()
        .filter(|k| matches!(k, Kind::MappingDeleted(_)))
        .count();
    assert_eq!(n, 1, "reported once: {kinds:?}");
    let e = c
        .get_mapping(pb::GetMappingRequest {
            mapping: m.id.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    agent.stop_async().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_keeps_everything_and_removes_the_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let mut c = agent.client().await;
    for n in ["a", "a-snap"] {
        mkvol(&mut c, n, 2 * MIB).await;
    }
    for n in ["b", "b-clone"] {
        mkvol(&mut c, n, 8 * MIB).await;
    }
    let snap = c
        .create_mapping(pb::CreateMappingRequest {
            copy_rate: Some(0),
            incremental: true,
            ..map_req("a", "a-snap")
        })
        .await
        .unwrap()
        .into_inner();
    c.start_mapping(pb::StartMappingRequest {
        mapping: snap.name.clone(),
        prep: true,
        restore: false,
    })
    .await
    .unwrap();
    // A slow clone (rate 31 = 1 MiB/s): still copying when the agent stops.
    let clone = c
        .create_mapping(pb::CreateMappingRequest {
            copy_rate: Some(31),
            ..map_req("b", "b-clone")
        })
        .await
        .unwrap()
        .into_inner();
    c.start_mapping(pb::StartMappingRequest {
        mapping: clone.name.clone(),
        prep: true,
        restore: false,
    })
    .await
    .unwrap();
    c.create_group(pb::CreateGroupRequest {
        name: Some("g".into()),
        autodelete: false,
    })
    .await
    .unwrap();
    let before = c
        .list_mappings(pb::ListMappingsRequest { group: None })
        .await
        .unwrap()
        .into_inner()
        .mappings;
    // An open event stream must not hold up the shutdown.
    let mut events = c
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let (agent_sock, nbd_sock) = (agent.socket(), agent.cfg.nbd_socket_path());
    assert!(nbd_sock.exists());
    let t0 = std::time::Instant::now();
    agent.stop_async().await.expect("clean shutdown");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "graceful, not by the grace timeout"
    );
    assert!(!agent_sock.exists(), "agent socket removed");
    assert!(!nbd_sock.exists(), "nbd socket removed");
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the stream ends at shutdown");
    let _ = end;

    let agent = Agent::start(dir.path());
    let mut c = agent.client().await;
    let after = c
        .list_mappings(pb::ListMappingsRequest { group: None })
        .await
        .unwrap()
        .into_inner()
        .mappings;
    assert_eq!(after.len(), 2);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (
                b.id,
                &b.name,
                b.source_id,
                b.target_id,
                b.state,
                b.start_time
            ),
            (
                a.id,
                &a.name,
                a.source_id,
                a.target_id,
                a.state,
                a.start_time
            )
        );
        assert!(a.split_grains >= b.split_grains);
    }
    let groups = c
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert_eq!(groups.len(), 1);
    // The clone's worker resumes after the restart.
    c.modify_mapping(pb::ModifyMappingRequest {
        mapping: clone.name.clone(),
        copy_rate: Some(150),
        ..Default::default()
    })
    .await
    .unwrap();
    let c2 = c.clone();
    eventually("the resumed clone to complete", || {
        let mut c = c2.clone();
        let name = clone.name.clone();
        async move { get(&mut c, &name).await.progress == 100 }
    })
    .await;
    agent.stop_async().await.unwrap();
}

#[tokio::test]
async fn stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on, as a killed agent leaves behind.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("agent.sock")).unwrap());
    std::fs::write(dir.path().join("nbd.sock"), b"").unwrap();
    let agent = Agent::start(dir.path());
    let mut c = agent.client().await;
    mkvol(&mut c, "v", MIB).await;

    // A second agent on the same directory must not steal the sockets.
    let rt = tokio::runtime::Handle::current();
    let cfg = flashcopy_csi::agent::Config::new(dir.path());
    let second = rt
        .spawn(flashcopy_csi::agent::run(cfg, async {}))
        .await
        .unwrap();
    match second {
        Err(flashcopy_csi::agent::Error::InUse(p)) => assert!(p.ends_with("agent.sock")),
        other => panic!("expected InUse, got {other:?}"),
    }
    // The first one still serves.
    let vols = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(vols.len(), 1);
    agent.stop_async().await.unwrap();
}

#[tokio::test]
async fn stopping_with_cleaning_ends_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let mut c = agent.client().await;
    for n in ["s", "t1", "t2"] {
        mkvol(&mut c, n, 2 * MIB).await;
    }
    // Two snapshots of one source; stopping the newer one hands its grains to the older one.
    for t in ["t1", "t2"] {
        let m = c
            .create_mapping(pb::CreateMappingRequest {
                copy_rate: Some(0),
                clean_rate: Some(100),
                ..map_req("s", t)
            })
            .await
            .unwrap()
            .into_inner();
        c.start_mapping(pb::StartMappingRequest {
            mapping: m.name,
            prep: true,
            restore: false,
        })
        .await
        .unwrap();
    }
    let r = c
        .stop_mapping(pb::StopMappingRequest {
            mapping: "fcmap2".into(),
            force: false,
            split: false,
        })
        .await
        .unwrap()
        .into_inner();
    let state = r.mapping.unwrap().state;
    assert!(
        state == pb::MappingState::Stopping as i32 || state == pb::MappingState::Stopped as i32,
        "{state}"
    );
    let c2 = c.clone();
    eventually("cleaning to finish", || {
        let mut c = c2.clone();
        async move { get(&mut c, "fcmap2").await.state == pb::MappingState::Stopped as i32 }
    })
    .await;
    assert_eq!(
        get(&mut c, "fcmap1").await.state,
        pb::MappingState::Copying as i32
    );
    agent.stop_async().await.unwrap();
}
