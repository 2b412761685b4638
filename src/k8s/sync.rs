//! `kube-sync`: mirrors one node agent's mappings and consistency groups into cluster-scoped
//! FlashCopyMapping / FlashCopyConsistencyGroup objects, so `kubectl get fcmap` reads like
//! `lsfcmap`. The agent is the truth: objects are created, updated and deleted to match its
//! listing, and nothing is read back from them. A sync runs at start, after agent events and on
//! a fixed interval (copy progress moves without events).

use super::crd::*;
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_client::AgentClient;
use futures::{FutureExt, StreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// The label that selects one node's mirrors.
pub const NODE_LABEL: &str = "flashcopy.csi.io/node";

/// `kube-sync` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncConfig {
    /// The node's agent API: unix:///PATH or http://HOST:PORT.
    #[arg(long)]
    pub agent: String,
    /// The node name (spec.node and the label of every object this process owns).
    #[arg(long)]
    pub node: String,
    /// Seconds between full syncs when no event arrives.
    #[arg(long, default_value_t = 10)]
    pub interval: u64,
}

/// Why a sync did not complete; the next sync retries.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The agent could not be reached or refused a listing.
    #[error("agent: {0}")]
    Agent(#[from] tonic::Status),
    /// The API server refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// What one sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Objects created.
    pub created: usize,
    /// Objects whose status changed.
    pub updated: usize,
    /// Objects deleted (gone from the agent).
    pub deleted: usize,
}

/// The object name of an agent object: `<node>-<kind><id>`, e.g. `node1-fcmap3` (a valid DNS
/// subdomain, as node names are; unique, as the id is all digits).
pub fn object_name(node: &str, kind: &str, id: u64) -> String {
    format!("{node}-{kind}{id}")
}

/// A label value is at most 63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends;
/// longer node names are matched by spec.node alone.
fn label_value(node: &str) -> Option<&str> {
    let ok = !node.is_empty()
        && node.len() <= 63
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && node.as_bytes()[0].is_ascii_alphanumeric()
        && node.as_bytes()[node.len() - 1].is_ascii_alphanumeric();
    ok.then_some(node)
}

fn rfc3339(secs: Option<u64>) -> Option<String> {
    secs.and_then(|s| Timestamp::from_second(i64::try_from(s).ok()?).ok())
        .map(|t| t.to_string())
}

fn mapping_state(s: i32) -> Option<MappingState> {
    use pb::MappingState as S;
    Some(match S::try_from(s).ok()? {
        S::Unspecified => return None,
        S::IdleOrCopied => MappingState::IdleOrCopied,
        S::Preparing => MappingState::Preparing,
        S::Prepared => MappingState::Prepared,
        S::Copying => MappingState::Copying,
        S::Stopping => MappingState::Stopping,
        S::Stopped => MappingState::Stopped,
        S::Suspended => MappingState::Suspended,
    })
}

fn group_state(s: i32) -> Option<GroupState> {
    use pb::GroupState as S;
    Some(match S::try_from(s).ok()? {
        S::Unspecified => return None,
        S::Empty => GroupState::Empty,
        S::IdleOrCopied => GroupState::IdleOrCopied,
        S::Preparing => GroupState::Preparing,
        S::Prepared => GroupState::Prepared,
        S::Copying => GroupState::Copying,
        S::Stopping => GroupState::Stopping,
        S::Stopped => GroupState::Stopped,
        S::Suspended => GroupState::Suspended,
    })
}

fn labels(node: &str) -> Option<BTreeMap<String, String>> {
    label_value(node).map(|v| BTreeMap::from([(NODE_LABEL.to_string(), v.to_string())]))
}

/// The FlashCopyMapping mirroring `m` (None for a state this build does not know).
pub fn mapping_object(node: &str, m: &pb::Mapping) -> Option<FlashCopyMapping> {
    let mut o = FlashCopyMapping::new(
        &object_name(node, "fcmap", m.id),
        FlashCopyMappingSpec {
            node: node.to_string(),
            id: m.id,
        },
    );
    o.metadata.labels = labels(node);
    o.status = Some(FlashCopyMappingStatus {
        name: m.name.clone(),
        source: m.source_name.clone(),
        target: m.target_name.clone(),
        group: m.group_id.map(|_| m.group_name.clone()),
        state: mapping_state(m.state)?,
        progress: m.progress.min(100) as u8,
        copy_rate: m.copy_rate.min(150) as u8,
        clean_rate: m.clean_rate.min(150) as u8,
        grain_size: m.grain_kib,
        incremental: m.incremental,
        autodelete: m.autodelete,
        start_time: rfc3339(m.start_time),
    });
    Some(o)
}

/// The FlashCopyConsistencyGroup mirroring `g`; `names` maps mapping ids to names.
pub fn group_object(
    node: &str,
    g: &pb::Group,
    names: &HashMap<u64, String>,
) -> Option<FlashCopyConsistencyGroup> {
    let mut o = FlashCopyConsistencyGroup::new(
        &object_name(node, "fcconsistgrp", g.id),
        FlashCopyConsistencyGroupSpec {
            node: node.to_string(),
            id: g.id,
        },
    );
    o.metadata.labels = labels(node);
    o.status = Some(FlashCopyConsistencyGroupStatus {
        name: g.name.clone(),
        state: group_state(g.state)?,
        mappings: g
            .members
            .iter()
            .map(|id| names.get(id).cloned().unwrap_or_else(|| id.to_string()))
            .collect(),
        autodelete: g.autodelete,
        start_time: rfc3339(g.start_time),
    });
    Some(o)
}

/// Makes the objects of `node` in `api` exactly `want` (by name): creates the missing, patches
/// changed statuses, deletes the extra. Objects of other nodes are never touched.
async fn converge<K>(
    api: &Api<K>,
    node: &str,
    want: Vec<K>,
    report: &mut SyncReport,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let lp = match label_value(node) {
        Some(v) => ListParams::default().labels(&format!("{NODE_LABEL}={v}")),
        None => ListParams::default(),
    };
    let mut have: HashMap<String, Value> = HashMap::new();
    for o in api.list(&lp).await? {
        let v = serde_json::to_value(&o).unwrap_or_default();
        if v["spec"]["node"] == node {
            have.insert(o.name_any(), v);
        }
    }
    for o in want {
        let name = o.name_any();
        let v = serde_json::to_value(&o).unwrap_or_default();
        let current = match have.remove(&name) {
            Some(cur) => cur,
            None => {
                // Status is ignored on create (subresource): written by the patch below.
                api.create(&PostParams::default(), &o).await?;
                report.created += 1;
                json!({})
            }
        };
        if current["status"] != v["status"] {
            // A merge patch: fields the agent no longer reports are nulled, i.e. removed.
            let mut status = v["status"].clone();
            if let (Some(new), Some(old)) = (status.as_object_mut(), current["status"].as_object())
            {
                for k in old.keys() {
                    new.entry(k.clone()).or_insert(Value::Null);
                }
            }
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
            if current != json!({}) {
                report.updated += 1;
            }
        }
    }
    for name in have.into_keys() {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => report.deleted += 1,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One full sync of `node`'s agent into the cluster.
pub async fn sync_once(
    client: &Client,
    agent: &mut AgentClient<Channel>,
    node: &str,
) -> Result<SyncReport, SyncError> {
    let maps = agent
        .list_mappings(pb::ListMappingsRequest::default())
        .await?
        .into_inner()
        .mappings;
    let groups = agent
        .list_groups(pb::ListGroupsRequest::default())
        .await?
        .into_inner()
        .groups;
    let names: HashMap<u64, String> = maps.iter().map(|m| (m.id, m.name.clone())).collect();
    let unknown = |what: &str, id: u64| {
        tracing::warn!(
            node,
            id,
            "{what} in a state this build does not know: not mirrored"
        );
    };
    let want_maps = maps
        .iter()
        .filter_map(|m| {
            let o = mapping_object(node, m);
            if o.is_none() {
                unknown("mapping", m.id);
            }
            o
        })
        .collect();
    let want_groups = groups
        .iter()
        .filter_map(|g| {
            let o = group_object(node, g, &names);
            if o.is_none() {
                unknown("group", g.id);
            }
            o
        })
        .collect();
    let mut report = SyncReport::default();
    converge(&Api::all(client.clone()), node, want_maps, &mut report).await?;
    converge(&Api::all(client.clone()), node, want_groups, &mut report).await?;
    Ok(report)
}

/// Connects to the agent API (`unix:///PATH`, a bare path, or http(s)://).
pub async fn connect_agent(agent: &str) -> Result<AgentClient<Channel>, tonic::transport::Error> {
    let uri = if agent.contains("://") {
        agent.to_string()
    } else {
        format!("unix://{agent}")
    };
    let ch = Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(AgentClient::new(ch))
}

/// Syncs until `shutdown`: at start and after every (re)connection, shortly after agent
/// events, and every `interval`. Errors are logged and retried; the loop itself never fails.
pub async fn run_loop(client: Client, cfg: SyncConfig, shutdown: impl Future<Output = ()> + Send) {
    tokio::pin!(shutdown);
    let interval = Duration::from_secs(cfg.interval.max(1));
    let node = cfg.node.as_str();
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = async {
            let mut agent = match connect_agent(&cfg.agent).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(agent = %cfg.agent, error = %e, "agent unreachable");
                    return false;
                }
            };
            // Subscribe before the first sync so no change falls between the two.
            let mut events = match agent.watch_events(pb::WatchEventsRequest {}).await {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    tracing::warn!(agent = %cfg.agent, error = %e, "agent refused the event stream");
                    return false;
                }
            };
            let mut ok = sync_logged(&client, &mut agent, node).await;
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(Ok(_)) => {
                            // Events come in bursts (a group start): sync once for the burst.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            while let Some(Some(Ok(_))) = events.next().now_or_never() {}
                            ok = sync_logged(&client, &mut agent, node).await;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "agent event stream failed");
                            return ok;
                        }
                        None => return ok,
                    },
                    _ = tick.tick() => ok = sync_logged(&client, &mut agent, node).await,
                }
            }
        };
        tokio::select! {
            healthy = session => {
                backoff = if healthy { Duration::from_millis(200) } else { (backoff * 2).min(Duration::from_secs(10)) };
            }
            () = &mut shutdown => return,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = &mut shutdown => return,
        }
    }
}

async fn sync_logged(client: &Client, agent: &mut AgentClient<Channel>, node: &str) -> bool {
    match sync_once(client, agent, node).await {
        Ok(r) => {
            if r != SyncReport::default() {
                tracing::info!(
                    node,
                    created = r.created,
                    updated = r.updated,
                    deleted = r.deleted,
                    "mirrors synced"
                );
            }
            true
        }
        Err(e) => {
            tracing::warn!(node, error = %e, "sync failed; retrying");
            false
        }
    }
}

/// `flashcopy-csi kube-sync`: runs until SIGTERM/SIGINT.
pub fn main(cfg: SyncConfig) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async {
        let client = Client::try_default().await?;
        tracing::info!(node = %cfg.node, agent = %cfg.agent, "kube-sync running");
        run_loop(client, cfg, crate::agent::signalled()).await;
        tracing::info!("kube-sync stopped");
        Ok(())
    })
}
