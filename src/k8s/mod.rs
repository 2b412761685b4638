//! Kubernetes side: the snapshot controller (both upstream roles, K8S-SNAPSHOTS.md §A) and our
//! FlashCopy CRDs.
//!
//! - [`api`]: types of the upstream snapshot kinds (the shipped CRDs stay the upstream YAML).
//! - [`crd`]: FlashCopyMapping / FlashCopyConsistencyGroup, generated from Rust types.
//! - [`names`]: finalizers, annotations, generated names, backoff, class parameters.
//! - [`driver`]: the CSI calls as a trait; errors carry the gRPC code (final vs non-final).
//! - [`csi_client`]: that trait over our CSI controller's socket.
//! - [`snapshot`]: VolumeSnapshot (controller role) and VolumeSnapshotContent (sidecar role).
//! - [`group`]: the same for VolumeGroupSnapshot / VolumeGroupSnapshotContent.
//! - [`run`]: the `snapshot-controller` process (Controllers, Lease, /metrics, /healthz).
//! - [`sync`]: the `kube-sync` process, mirroring a node agent into our CRDs.
//! - [`certs`]: `certs ensure|rotate`, the mutual-TLS certificates of an install as Secrets.
//!
//! Reconcilers read objects fresh from the API server and write with the resourceVersion they
//! read, so a stale cache can only cost a conflict and a retry, never a wrong write.

pub mod api;
pub mod certs;
pub mod crd;
pub mod csi_client;
pub mod csinodes;
pub mod driver;
pub mod group;
pub mod names;
pub mod run;
pub mod snapshot;
pub mod sync;

use driver::{DriverError, Secrets, SnapshotDriver};
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt::Debug;
use std::time::Duration;

/// Which upstream roles run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Common controller and sidecar: the only snapshot controller of the cluster.
    Full,
    /// Only the sidecar role for our driver's contents, beside an upstream snapshot-controller.
    Sidecar,
}

/// A reconcile failure; every one is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A CSI call failed.
    #[error("CSI driver: {0}")]
    Driver(#[from] DriverError),
    /// The objects are inconsistent or invalid; the message is also on the object's status.
    #[error("{0}")]
    Invalid(String),
    /// Waiting for something outside our control (a PVC to bind, a restore to finish).
    #[error("waiting: {0}")]
    Pending(String),
}

impl Error {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Driver(_) => "driver",
            Error::Invalid(_) => "invalid",
            Error::Pending(_) => "pending",
        }
    }
}

/// Result of a reconcile step.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared state of the reconcilers.
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// Our CSI controller.
    pub driver: std::sync::Arc<dyn SnapshotDriver>,
    /// The roles that run.
    pub mode: Mode,
    /// Deadline of each CSI call.
    pub csi_timeout: Duration,
    recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
}

impl Ctx {
    /// A context reporting events as `controller`.
    pub fn new(
        client: Client,
        driver: std::sync::Arc<dyn SnapshotDriver>,
        mode: Mode,
        csi_timeout: Duration,
        controller: &str,
    ) -> Self {
        let reporter = Reporter {
            controller: controller.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Ctx {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            driver,
            mode,
            csi_timeout,
            failures: Mutex::default(),
        }
    }

    /// Publishes an event about `obj`; a failure to publish is only logged.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: impl Into<String>,
    ) {
        self.event_ref(&obj.object_ref(&()), warning, reason, note)
            .await
    }

    async fn event_ref(
        &self,
        reference: &ObjectReference,
        warning: bool,
        reason: &str,
        note: impl Into<String>,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.into()),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            tracing::warn!(reason, error = %e, "cannot publish event");
        }
    }

    /// Records the outcome of a reconcile of `key` and returns the delay before the next retry
    /// on failure: 1 s doubling to 5 min, reset by a success.
    pub fn outcome(&self, key: &str, ok: bool) -> Duration {
        let mut f = self.failures.lock();
        if ok {
            f.remove(key);
            return Duration::ZERO;
        }
        let n = f.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
        names::backoff(*n)
    }

    /// Reads a secret's data as strings.
    async fn secrets(&self, secret: Option<(String, String)>) -> Result<Secrets> {
        let Some((ns, name)) = secret else {
            return Ok(Secrets::new());
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let s = api
            .get_opt(&name)
            .await?
            .ok_or_else(|| Error::Invalid(format!("secret {ns}/{name} not found")))?;
        Ok(s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect())
    }
}

/// Error policy for [`kube::runtime::Controller::run`]: retry with the per-object backoff.
pub fn error_policy<K: Resource>(
    obj: std::sync::Arc<K>,
    err: &Error,
    ctx: std::sync::Arc<Ctx>,
) -> Action {
    let key = object_key(obj.as_ref());
    let delay = ctx.outcome(&key, false);
    tracing::warn!(object = %key, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// `namespace/name` or `name`.
pub fn object_key<K: Resource>(obj: &K) -> String {
    let m = obj.meta();
    match &m.namespace {
        Some(ns) => format!("{ns}/{}", m.name.clone().unwrap_or_default()),
        None => m.name.clone().unwrap_or_default(),
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn time_from_ns(ns: i64) -> Time {
    Time(Timestamp::from_nanosecond(ns as i128).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn now_ns() -> i64 {
    Timestamp::now().as_nanosecond() as i64
}

/// A byte count spelled the way Kubernetes canonicalises `resource.NewQuantity(n, BinarySI)`,
/// as upstream sets restoreSize: binary suffixes for whole multiples of 1024 ("8Mi"), and
/// decimal ones below 1024 ("1k", "512").
pub fn bytes_quantity(n: i64) -> Quantity {
    let (base, suffixes): (i64, &[&str]) = if n.unsigned_abs() < 1024 {
        (1000, &["", "k"])
    } else {
        (1024, &["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"])
    };
    let (mut m, mut i) = (n, 0);
    while m != 0 && m % base == 0 && i + 1 < suffixes.len() {
        m /= base;
        i += 1;
    }
    Quantity(format!("{m}{}", suffixes[i]))
}

/// Sets or removes a finalizer with a merge patch guarded by the resourceVersion we read.
/// Returns the updated object, or `None` when nothing had to change.
async fn set_finalizers<K>(api: &Api<K>, obj: &K, changes: &[(&str, bool)]) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut fins = obj.finalizers().to_vec();
    for (fin, want) in changes {
        let has = fins.iter().any(|f| f == fin);
        if *want && !has {
            fins.push(fin.to_string());
        } else if !*want && has {
            fins.retain(|f| f != fin);
        }
    }
    if fins == obj.finalizers() {
        return Ok(None);
    }
    let patch =
        json!({"metadata": {"finalizers": fins, "resourceVersion": obj.resource_version()}});
    let out = api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(Some(out))
}

/// Sets (`Some`) or removes (`None`) annotations; no request when already so.
async fn set_annotations<K>(
    api: &Api<K>,
    obj: &K,
    changes: &[(&str, Option<&str>)],
) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let anns = obj.annotations();
    let mut patch = serde_json::Map::new();
    for (k, v) in changes {
        if anns.get(*k).map(String::as_str) != *v {
            patch.insert(
                k.to_string(),
                v.map_or(Value::Null, |v| Value::String(v.into())),
            );
        }
    }
    if patch.is_empty() {
        return Ok(None);
    }
    let patch =
        json!({"metadata": {"annotations": patch, "resourceVersion": obj.resource_version()}});
    let out = api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(Some(out))
}

/// Writes `desired` as the status subresource when it differs from `current`; fields present
/// in `current` and absent in `desired` are cleared.
async fn write_status<K, S>(
    api: &Api<K>,
    name: &str,
    current: Option<&S>,
    desired: &S,
) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(desired) {
        return Ok(None);
    }
    let mut d = serde_json::to_value(desired).map_err(|e| Error::Invalid(e.to_string()))?;
    if let (Some(cur), Value::Object(dm)) = (current, &mut d)
        && let Ok(Value::Object(cm)) = serde_json::to_value(cur)
    {
        for k in cm.keys() {
            if !dm.contains_key(k) {
                dm.insert(k.clone(), Value::Null);
            }
        }
    }
    let out = api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": d})),
        )
        .await?;
    Ok(Some(out))
}

/// Whether a Pending PVC in `namespace` is being restored from the snapshot `name`.
async fn pending_restore_from(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<String>> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    for pvc in pvcs.list(&Default::default()).await? {
        let pending = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
        let Some(spec) = pvc.spec.as_ref() else {
            continue;
        };
        let from_ds = spec.data_source.as_ref().is_some_and(|d| {
            d.kind == "VolumeSnapshot"
                && d.name == name
                && d.api_group.as_deref() == Some("snapshot.storage.k8s.io")
        });
        let from_ref = spec.data_source_ref.as_ref().is_some_and(|d| {
            d.kind == "VolumeSnapshot"
                && d.name == name
                && d.api_group.as_deref() == Some("snapshot.storage.k8s.io")
                && d.namespace.as_deref().is_none_or(|n| n == namespace)
        });
        if pending && (from_ds || from_ref) && pvc.metadata.deletion_timestamp.is_none() {
            return Ok(Some(pvc.name_any()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod quantity_tests {
    use super::bytes_quantity;

    #[test]
    fn byte_counts_read_like_kubectl_prints_them() {
        for (n, q) in [
            (0, "0"),
            (512, "512"),
            (1000, "1k"),
            (1024, "1Ki"),
            (1536, "1536"),
            (8 << 20, "8Mi"),
            (1 << 30, "1Gi"),
            (3 << 40, "3Ti"),
            ((1 << 30) + 512, "1073742336"),
        ] {
            assert_eq!(bytes_quantity(n).0, q, "{n}");
        }
    }
}
