//! A mocked Kubernetes API server (kube's tower-test pattern) backed by an in-memory object
//! store, with injected API errors; and a scripted CSI driver.
//!
//! The server implements what the reconcilers use: GET, LIST, POST, PATCH (merge; the status
//! subresource only changes status), DELETE (finalizers hold objects with a deletionTimestamp),
//! resourceVersion preconditions (409 Conflict) and AlreadyExists.
#![allow(dead_code)]

use flashcopy_csi::k8s::api::*;
use flashcopy_csi::k8s::driver::*;
use flashcopy_csi::k8s::group::{sync_group_content, sync_group_snapshot};
use flashcopy_csi::k8s::snapshot::{sync_content, sync_snapshot};
use flashcopy_csi::k8s::{Ctx, Mode};
use futures::future::BoxFuture;
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// (plural, namespace or "", name)
pub type Key = (String, String, String);

/// An API error to return instead of serving a request.
#[derive(Clone, Debug)]
pub struct Fault {
    /// GET, LIST, POST, PATCH, DELETE.
    pub method: &'static str,
    /// Resource plural, e.g. "volumesnapshotcontents".
    pub plural: &'static str,
    /// Only for this object name (None: any).
    pub name: Option<&'static str>,
    /// Only for the status subresource (Some(true)), only the main resource (Some(false)), any.
    pub status: Option<bool>,
    /// HTTP code.
    pub code: u16,
    /// How many times.
    pub times: u32,
}

impl Fault {
    /// A fault on any object of `plural`.
    pub fn new(method: &'static str, plural: &'static str, code: u16, times: u32) -> Self {
        Fault {
            method,
            plural,
            name: None,
            status: None,
            code,
            times,
        }
    }
}

#[derive(Default)]
pub struct State {
    pub objects: BTreeMap<Key, Value>,
    pub rv: u64,
    pub uid: u64,
    pub faults: Vec<Fault>,
    pub log: Vec<String>,
    pub faults_hit: u32,
}

/// The fake API server.
#[derive(Clone, Default)]
pub struct ApiServer {
    pub state: Arc<Mutex<State>>,
}

fn reason(code: u16) -> &'static str {
    match code {
        404 => "NotFound",
        409 => "Conflict",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "BadRequest",
    }
}

fn status(code: u16, reason: &str, msg: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": msg, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

struct Path {
    plural: String,
    ns: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Path> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest = match *segs.first()? {
        "api" => &segs[2..],
        "apis" => &segs[3..],
        _ => return None,
    };
    let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    Some(Path {
        plural: rest.first()?.to_string(),
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

impl ApiServer {
    /// A server holding `objects` (YAML documents) and a kube client talking to it.
    pub fn start(objects: &str) -> (ApiServer, Client) {
        let server = ApiServer::default();
        for doc in serde_yaml::Deserializer::from_str(objects) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("fixture YAML");
            if v.is_null() {
                continue;
            }
            server.insert(v);
        }
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let s = server.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (code, out) = s.serve(parts.method.as_str(), &parts.uri, body);
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&out).unwrap()))
                    .unwrap();
                send.send_response(resp);
            }
        });
        (server, Client::new(mock, "default"))
    }

    fn plural_of(kind: &str) -> String {
        match kind {
            "VolumeSnapshotClass" => "volumesnapshotclasses".into(),
            "VolumeGroupSnapshotClass" => "volumegroupsnapshotclasses".into(),
            k => format!("{}s", k.to_lowercase()),
        }
    }

    /// Adds an object as if created (uid and resourceVersion filled in when missing).
    pub fn insert(&self, mut v: Value) {
        let mut st = self.state.lock();
        let kind = v["kind"].as_str().expect("kind").to_string();
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = v["metadata"]["name"].as_str().expect("name").to_string();
        st.rv += 1;
        st.uid += 1;
        let rv = st.rv.to_string();
        let uid = format!("uid-{}", st.uid);
        let m = v["metadata"].as_object_mut().unwrap();
        m.insert("resourceVersion".into(), json!(rv));
        m.entry("uid").or_insert(json!(uid));
        st.objects.insert((Self::plural_of(&kind), ns, name), v);
    }

    /// The current object, if present.
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Every request served so far, as "VERB /path".
    pub fn state_log(&self) -> Vec<String> {
        self.state.lock().log.clone()
    }

    /// All objects of a kind.
    pub fn list(&self, plural: &str) -> Vec<Value> {
        self.state
            .lock()
            .objects
            .iter()
            .filter(|((p, _, _), _)| p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Adds a fault.
    pub fn fault(&self, f: Fault) {
        self.state.lock().faults.push(f);
    }

    /// The current resourceVersion counter (changes on every write).
    pub fn version(&self) -> u64 {
        self.state.lock().rv
    }

    /// Reasons of the events published so far.
    pub fn event_reasons(&self) -> Vec<String> {
        self.list("events")
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Deletes an object as `kubectl delete` would.
    pub fn delete(&self, plural: &str, ns: &str, name: &str) {
        let path = if ns.is_empty() {
            format!("/apis/g/v1/{plural}/{name}")
        } else {
            format!("/apis/g/v1/namespaces/{ns}/{plural}/{name}")
        };
        let (code, out) = self.serve("DELETE", &path.parse().unwrap(), Value::Null);
        assert_eq!(code, 200, "delete {plural} {ns}/{name}: {out}");
    }

    fn serve(&self, method: &str, uri: &http::Uri, body: Value) -> (u16, Value) {
        let Some(p) = parse_path(uri.path()) else {
            return status(404, "NotFound", "bad path");
        };
        let mut st = self.state.lock();
        let verb = match (method, &p.name) {
            ("GET", None) => "LIST",
            (m, _) => m,
        };
        st.log.push(format!("{verb} {}", uri.path()));
        let is_status = p.subresource.as_deref() == Some("status");
        let mut hit = None;
        for f in st.faults.iter_mut() {
            if f.times > 0
                && f.method == verb
                && f.plural == p.plural
                && f.name.is_none_or(|n| Some(n) == p.name.as_deref())
                && f.status.is_none_or(|s| s == is_status)
            {
                f.times -= 1;
                hit = Some(f.code);
                break;
            }
        }
        if let Some(code) = hit {
            st.faults_hit += 1;
            return status(code, reason(code), "injected fault");
        }
        let key = |name: &str| (p.plural.clone(), p.ns.clone(), name.to_string());
        match verb {
            "LIST" => {
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((pl, ns, _), _)| *pl == p.plural && (p.ns.is_empty() || *ns == p.ns))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List",
                           "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                )
            }
            "GET" => match st.objects.get(&key(p.name.as_deref().unwrap())) {
                Some(v) => (200, v.clone()),
                None => status(404, "NotFound", "not found"),
            },
            "POST" => {
                let mut v = body;
                let name = match v["metadata"]["name"].as_str() {
                    Some(n) => n.to_string(),
                    None => {
                        st.uid += 1;
                        format!(
                            "{}{}",
                            v["metadata"]["generateName"].as_str().unwrap_or("obj-"),
                            st.uid
                        )
                    }
                };
                if st.objects.contains_key(&key(&name)) {
                    return status(409, "AlreadyExists", "already exists");
                }
                st.rv += 1;
                st.uid += 1;
                let (rv, uid) = (st.rv.to_string(), format!("uid-{}", st.uid));
                let m = v["metadata"].as_object_mut().unwrap();
                m.insert("name".into(), json!(name));
                m.insert("resourceVersion".into(), json!(rv));
                m.insert("uid".into(), json!(uid));
                if !p.ns.is_empty() {
                    m.insert("namespace".into(), json!(p.ns));
                }
                // Status is not settable on create for kinds with a status subresource.
                if p.plural != "events" {
                    v.as_object_mut().unwrap().remove("status");
                }
                st.objects.insert(key(&name), v.clone());
                (201, v)
            }
            "PATCH" | "PUT" => {
                let name = p.name.clone().unwrap();
                let Some(cur) = st.objects.get(&key(&name)).cloned() else {
                    return status(404, "NotFound", "not found");
                };
                if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != cur["metadata"]["resourceVersion"].as_str()
                {
                    return status(409, "Conflict", "the object has been modified");
                }
                let mut next = cur.clone();
                if verb == "PUT" {
                    next = body.clone();
                } else if is_status {
                    merge(&mut next, &json!({"status": body["status"]}));
                } else {
                    let mut b = body.clone();
                    if let Some(o) = b.as_object_mut() {
                        o.remove("status");
                    }
                    merge(&mut next, &b);
                }
                // Like the real server: an empty finalizer list is dropped.
                if next["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| f.is_empty())
                {
                    next["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .remove("finalizers");
                }
                st.rv += 1;
                next["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                let gone = next["metadata"]["deletionTimestamp"].is_string()
                    && next["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|f| f.is_empty());
                if gone {
                    st.objects.remove(&key(&name));
                    collect_garbage(&mut st, &cur);
                } else {
                    st.objects.insert(key(&name), next.clone());
                }
                (200, next)
            }
            "DELETE" => {
                let name = p.name.clone().unwrap();
                let Some(mut cur) = st.objects.get(&key(&name)).cloned() else {
                    return status(404, "NotFound", "not found");
                };
                let has_fin = cur["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                st.rv += 1;
                if has_fin {
                    if !cur["metadata"]["deletionTimestamp"].is_string() {
                        cur["metadata"]["deletionTimestamp"] = json!("2026-11-22T12:00:00Z");
                    }
                    cur["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                    st.objects.insert(key(&name), cur.clone());
                } else {
                    st.objects.remove(&key(&name));
                    collect_garbage(&mut st, &cur);
                }
                (200, cur)
            }
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}

/// The garbage collector's background propagation: once `gone` has left the store, objects
/// whose ownerReferences name its uid are deleted (held by their finalizers like any DELETE).
fn collect_garbage(st: &mut State, gone: &Value) {
    let mut owners = vec![
        gone["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ];
    while let Some(owner) = owners.pop() {
        let owned: Vec<Key> = st
            .objects
            .iter()
            .filter(|(_, v)| {
                v["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["uid"] == owner.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in owned {
            st.rv += 1;
            let rv = st.rv.to_string();
            let v = st.objects.get_mut(&k).unwrap();
            let has_fin = v["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            if has_fin {
                if !v["metadata"]["deletionTimestamp"].is_string() {
                    v["metadata"]["deletionTimestamp"] = json!("2026-11-22T12:00:00Z");
                    v["metadata"]["resourceVersion"] = json!(rv);
                }
            } else {
                let v = st.objects.remove(&k).unwrap();
                owners.push(
                    v["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
    }
}

/// One scripted driver failure.
#[derive(Clone, Debug)]
pub struct DriverFault {
    /// "create", "delete", "get", "create_group", "delete_group", "get_group".
    pub call: &'static str,
    /// The error returned.
    pub code: tonic::Code,
    /// Whether the storage side did the work anyway (a lost answer).
    pub done_anyway: bool,
}

#[derive(Default)]
pub struct DriverState {
    /// name -> snapshot
    pub snapshots: BTreeMap<String, SnapshotInfo>,
    /// name -> group
    pub groups: BTreeMap<String, GroupSnapshotInfo>,
    pub calls: Vec<String>,
    pub faults: VecDeque<DriverFault>,
    pub deleted: Vec<String>,
    pub secrets_seen: Vec<Secrets>,
    pub params_seen: Vec<BTreeMap<String, String>>,
    /// Report snapshots not ready for this many create calls.
    pub not_ready_calls: u32,
}

/// A scripted CSI driver: keeps created snapshots by name (idempotent), records calls.
#[derive(Clone, Default)]
pub struct FakeDriver {
    pub state: Arc<Mutex<DriverState>>,
}

pub const CTIME: i64 = 1_763_800_000_000_000_000;
pub const SIZE: i64 = 1 << 30;

impl FakeDriver {
    fn fault(&self, call: &str) -> Option<DriverFault> {
        let mut st = self.state.lock();
        if st.faults.front().is_some_and(|f| f.call == call) {
            st.faults.pop_front()
        } else {
            None
        }
    }
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().calls.clone()
    }
    pub fn push_fault(&self, call: &'static str, code: tonic::Code, done_anyway: bool) {
        self.state.lock().faults.push_back(DriverFault {
            call,
            code,
            done_anyway,
        });
    }
}

impl SnapshotDriver for FakeDriver {
    fn create_snapshot<'a>(
        &'a self,
        name: &'a str,
        source: &'a str,
        parameters: &'a BTreeMap<String, String>,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<SnapshotInfo>> {
        Box::pin(async move {
            let fault = self.fault("create");
            let mut st = self.state.lock();
            st.calls.push(format!("CreateSnapshot {name} {source}"));
            st.secrets_seen.push(secrets.clone());
            st.params_seen.push(parameters.clone());
            let ready = if st.not_ready_calls > 0 {
                st.not_ready_calls -= 1;
                false
            } else {
                true
            };
            if let Some(f) = &fault
                && !f.done_anyway
            {
                return Err(DriverError::new(f.code, "scripted failure"));
            }
            let info = st
                .snapshots
                .entry(name.to_string())
                .or_insert_with(|| SnapshotInfo {
                    snapshot_id: format!("{source}:{name}"),
                    source_volume_id: source.into(),
                    creation_time_ns: CTIME,
                    size_bytes: SIZE,
                    ready_to_use: ready,
                    group_snapshot_id: String::new(),
                });
            info.ready_to_use = ready;
            let info = info.clone();
            match fault {
                Some(f) => Err(DriverError::new(f.code, "answer lost")),
                None => Ok(info),
            }
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        id: &'a str,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<()>> {
        Box::pin(async move {
            let fault = self.fault("delete");
            let mut st = self.state.lock();
            st.calls.push(format!("DeleteSnapshot {id}"));
            st.secrets_seen.push(secrets.clone());
            if let Some(f) = fault {
                return Err(DriverError::new(f.code, "scripted failure"));
            }
            st.snapshots.retain(|_, s| s.snapshot_id != id);
            st.deleted.push(id.to_string());
            Ok(())
        })
    }

    fn get_snapshot<'a>(
        &'a self,
        id: &'a str,
        _secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<Option<SnapshotInfo>>> {
        Box::pin(async move {
            let fault = self.fault("get");
            let mut st = self.state.lock();
            st.calls.push(format!("ListSnapshots {id}"));
            if let Some(f) = fault {
                return Err(DriverError::new(f.code, "scripted failure"));
            }
            let found = st.snapshots.values().find(|s| s.snapshot_id == id).cloned();
            let in_group = st
                .groups
                .values()
                .flat_map(|g| g.snapshots.iter())
                .find(|s| s.snapshot_id == id)
                .cloned();
            Ok(found.or(in_group))
        })
    }

    fn create_group_snapshot<'a>(
        &'a self,
        name: &'a str,
        sources: &'a [String],
        parameters: &'a BTreeMap<String, String>,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<GroupSnapshotInfo>> {
        Box::pin(async move {
            let fault = self.fault("create_group");
            let mut st = self.state.lock();
            st.params_seen.push(parameters.clone());
            st.calls.push(format!(
                "CreateVolumeGroupSnapshot {name} {}",
                sources.join(",")
            ));
            st.secrets_seen.push(secrets.clone());
            if let Some(f) = &fault
                && !f.done_anyway
            {
                return Err(DriverError::new(f.code, "scripted failure"));
            }
            let gid = format!("group:{name}");
            let info = st
                .groups
                .entry(name.to_string())
                .or_insert_with(|| GroupSnapshotInfo {
                    group_snapshot_id: gid.clone(),
                    snapshots: sources
                        .iter()
                        .map(|s| SnapshotInfo {
                            snapshot_id: format!("{s}:{name}"),
                            source_volume_id: s.clone(),
                            creation_time_ns: CTIME,
                            size_bytes: SIZE,
                            ready_to_use: true,
                            group_snapshot_id: gid.clone(),
                        })
                        .collect(),
                    creation_time_ns: CTIME,
                    ready_to_use: true,
                })
                .clone();
            match fault {
                Some(f) => Err(DriverError::new(f.code, "answer lost")),
                None => Ok(info),
            }
        })
    }

    fn delete_group_snapshot<'a>(
        &'a self,
        id: &'a str,
        snapshot_ids: &'a [String],
        _secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<()>> {
        Box::pin(async move {
            let fault = self.fault("delete_group");
            let mut st = self.state.lock();
            st.calls.push(format!(
                "DeleteVolumeGroupSnapshot {id} {}",
                snapshot_ids.join(",")
            ));
            if let Some(f) = fault {
                return Err(DriverError::new(f.code, "scripted failure"));
            }
            st.groups.retain(|_, g| g.group_snapshot_id != id);
            st.deleted.push(id.to_string());
            Ok(())
        })
    }

    fn get_group_snapshot<'a>(
        &'a self,
        id: &'a str,
        snapshot_ids: &'a [String],
        _secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<GroupSnapshotInfo>> {
        Box::pin(async move {
            let fault = self.fault("get_group");
            let mut st = self.state.lock();
            st.calls.push(format!("GetVolumeGroupSnapshot {id}"));
            if let Some(f) = fault {
                return Err(DriverError::new(f.code, "scripted failure"));
            }
            match st.groups.values().find(|g| g.group_snapshot_id == id) {
                Some(g) => Ok(g.clone()),
                None => Ok(GroupSnapshotInfo {
                    group_snapshot_id: id.into(),
                    snapshots: snapshot_ids
                        .iter()
                        .map(|s| SnapshotInfo {
                            snapshot_id: s.clone(),
                            source_volume_id: format!("vol-of-{s}"),
                            creation_time_ns: CTIME,
                            size_bytes: SIZE,
                            ready_to_use: true,
                            group_snapshot_id: id.into(),
                        })
                        .collect(),
                    creation_time_ns: CTIME,
                    ready_to_use: true,
                }),
            }
        })
    }
}

/// A reconciler context over the fake server and driver.
pub fn ctx(client: Client, driver: &FakeDriver) -> Ctx {
    Ctx::new(
        client,
        Arc::new(driver.clone()),
        Mode::Full,
        Duration::from_secs(5),
        "flashcopy-snapshot-controller",
    )
}

/// Whether `actual` contains everything in `expected` (objects recursively; `null` = absent).
pub fn subset(expected: &Value, actual: &Value, path: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, v) in e {
                let p = format!("{path}.{k}");
                match (v, a.get(k)) {
                    (Value::Null, None) | (Value::Null, Some(Value::Null)) => {}
                    (Value::Null, Some(x)) => return Err(format!("{p}: expected absent, got {x}")),
                    (_, None) => return Err(format!("{p}: missing, expected {v}")),
                    (v, Some(x)) => subset(v, x, &p)?,
                }
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a))
            if e.len() == a.len() && e.iter().any(Value::is_object) =>
        {
            for (i, (e, a)) in e.iter().zip(a).enumerate() {
                subset(e, a, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{path}: expected {e}, got {a}")),
    }
}

/// One reconcile of every snapshot and group snapshot object, in dependency order; errors
/// are collected, not raised (the controller's error policy retries them).
pub async fn round(server: &ApiServer, ctx: &Ctx, errors: &mut Vec<String>) {
    for v in server.list("volumegroupsnapshots") {
        let o: VolumeGroupSnapshot = serde_json::from_value(v).unwrap();
        if let Err(e) = sync_group_snapshot(&o, ctx).await {
            errors.push(e.to_string());
        }
    }
    for v in server.list("volumegroupsnapshotcontents") {
        let o: VolumeGroupSnapshotContent = serde_json::from_value(v).unwrap();
        if let Err(e) = sync_group_content(&o, ctx).await {
            errors.push(e.to_string());
        }
    }
    for v in server.list("volumesnapshots") {
        let o: VolumeSnapshot = serde_json::from_value(v).unwrap();
        if let Err(e) = sync_snapshot(&o, ctx).await {
            errors.push(e.to_string());
        }
    }
    for v in server.list("volumesnapshotcontents") {
        let o: VolumeSnapshotContent = serde_json::from_value(v).unwrap();
        if let Err(e) = sync_content(&o, ctx).await {
            errors.push(e.to_string());
        }
    }
}
