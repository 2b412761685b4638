//! The `snapshot-controller` process: leader election on a Lease, the kube-runtime
//! Controllers of the chosen mode, `/metrics` and `/healthz`.

use super::api::*;
use super::csi_client::CsiDriver;
use super::{Ctx, Error, Mode, error_policy, group, object_key, snapshot};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `snapshot-controller` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// full: the cluster's only snapshot controller; sidecar: only our driver's contents.
    #[arg(long, value_enum, default_value = "full")]
    pub mode: Mode,
    /// Our CSI controller: unix:///PATH.
    #[arg(long)]
    pub csi_endpoint: String,
    /// Deadline of each CSI call, seconds.
    #[arg(long, default_value_t = 60)]
    pub csi_timeout: u64,
    /// Where /metrics and /healthz listen.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// Namespace of the leader-election Lease (default: $POD_NAMESPACE or "default").
    #[arg(long)]
    pub leader_election_namespace: Option<String>,
    /// Run without leader election (a single replica).
    #[arg(long)]
    pub no_leader_election: bool,
}

/// Lease name per mode, so a sidecar and a full controller never contend.
fn lease_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Full => "flashcopy-snapshot-controller",
        Mode::Sidecar => "flashcopy-csi-snapshotter",
    }
}

/// How long a lease holds without renewal, seconds.
pub const LEASE_SECS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Reconcile counters by kind and outcome, for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    counts: parking_lot::Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    /// Counts one reconcile outcome.
    pub fn count(&self, kind: &'static str, result: &'static str) {
        *self.counts.lock().entry((kind, result)).or_default() += 1;
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut s = String::from(
            "# HELP flashcopy_reconcile_total Reconciles by kind and result.\n# TYPE flashcopy_reconcile_total counter\n",
        );
        for ((kind, result), n) in self.counts.lock().iter() {
            s.push_str(&format!(
                "flashcopy_reconcile_total{{kind=\"{kind}\",result=\"{result}\"}} {n}\n"
            ));
        }
        s
    }
}

/// Runs the controller until SIGTERM/SIGINT or until leadership is lost.
pub fn main(cfg: Config) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run(cfg))
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let driver = Arc::new(CsiDriver::new(&cfg.csi_endpoint)?);
    let ctx = Arc::new(Ctx::new(
        client.clone(),
        driver,
        cfg.mode,
        Duration::from_secs(cfg.csi_timeout),
        lease_name(cfg.mode),
    ));
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(cfg.http_listen).await?;
    tokio::spawn(serve_http(listener, metrics.clone()));

    if !cfg.no_leader_election {
        let ns = cfg
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
        let me =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("pid-{}", std::process::id()));
        let name = lease_name(cfg.mode);
        while !try_lead(&leases, name, &me).await? {
            tokio::time::sleep(RENEW_EVERY).await;
        }
        tracing::info!(lease = name, identity = %me, "leading");
        let keep = async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                match try_lead(&leases, name, &me).await {
                    Ok(true) => {}
                    Ok(false) => anyhow::bail!("lost the lease {name}"),
                    Err(e) => tracing::warn!(error = %e, "cannot renew the lease"),
                }
            }
        };
        tokio::select! {
            r = keep => r,
            r = controllers(client, ctx, metrics, cfg.mode) => r,
        }
    } else {
        controllers(client, ctx, metrics, cfg.mode).await
    }
}

/// Takes or renews the lease; `false` while another holder's lease is still valid.
pub async fn try_lead(leases: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let mine = LeaseSpec {
        holder_identity: Some(me.into()),
        lease_duration_seconds: Some(LEASE_SECS),
        renew_time: Some(MicroTime(now)),
        ..Default::default()
    };
    let Some(mut lease) = leases.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                acquire_time: Some(MicroTime(now)),
                ..mine
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let held_by_me = spec.holder_identity.as_deref() == Some(me);
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        t.0 + SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(LEASE_SECS).into())
            < now
    });
    if !held_by_me && !expired {
        return Ok(false);
    }
    lease.spec = Some(LeaseSpec {
        acquire_time: if held_by_me {
            spec.acquire_time
        } else {
            Some(MicroTime(now))
        },
        lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me)),
        ..mine
    });
    // The resourceVersion we read makes a concurrent taker lose with a conflict.
    match leases.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

type ReconcileFuture = futures::future::BoxFuture<'static, Result<Action, Error>>;

/// Wraps a sync function: resets the object's backoff on success and counts outcomes.
fn reconciler<K, F, Fut>(
    kind: &'static str,
    metrics: Arc<Metrics>,
    sync: F,
) -> impl FnMut(Arc<K>, Arc<Ctx>) -> ReconcileFuture
where
    K: Resource + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |obj, ctx| {
        let sync = sync.clone();
        let metrics = metrics.clone();
        Box::pin(async move {
            let key = object_key(obj.as_ref());
            let r = sync(obj, ctx.clone()).await;
            match &r {
                Ok(_) => {
                    ctx.outcome(&key, true);
                    metrics.count(kind, "ok");
                }
                Err(e) => metrics.count(kind, e.label()),
            }
            r
        })
    }
}

async fn drain<S: futures::Stream + Unpin>(s: S) {
    s.for_each(|_| async {}).await
}

async fn controllers(
    client: Client,
    ctx: Arc<Ctx>,
    metrics: Arc<Metrics>,
    mode: Mode,
) -> anyhow::Result<()> {
    let wc = watcher::Config::default;
    let vsc_api = Api::<VolumeSnapshotContent>::all(client.clone());
    let vgsc_api = Api::<VolumeGroupSnapshotContent>::all(client.clone());
    let contents = Controller::new(vsc_api.clone(), wc())
        .shutdown_on_signal()
        .run(
            reconciler(
                "VolumeSnapshotContent",
                metrics.clone(),
                |o: Arc<VolumeSnapshotContent>, c: Arc<Ctx>| async move {
                    snapshot::sync_content(&o, &c).await
                },
            ),
            error_policy,
            ctx.clone(),
        );
    let group_contents = Controller::new(vgsc_api.clone(), wc())
        .shutdown_on_signal()
        .run(
            reconciler(
                "VolumeGroupSnapshotContent",
                metrics.clone(),
                |o: Arc<VolumeGroupSnapshotContent>, c: Arc<Ctx>| async move {
                    group::sync_group_content(&o, &c).await
                },
            ),
            error_policy,
            ctx.clone(),
        );
    if mode == Mode::Sidecar {
        tokio::join!(drain(Box::pin(contents)), drain(Box::pin(group_contents)));
        return Ok(());
    }
    // A content change wakes the snapshot it points to.
    let snapshots = Controller::new(Api::<VolumeSnapshot>::all(client.clone()), wc())
        .watches(vsc_api, wc(), |c: VolumeSnapshotContent| {
            let r = c.spec.volume_snapshot_ref;
            r.name
                .map(|n| ObjectRef::new(&n).within(&r.namespace.unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(
            reconciler(
                "VolumeSnapshot",
                metrics.clone(),
                |o: Arc<VolumeSnapshot>, c: Arc<Ctx>| async move {
                    snapshot::sync_snapshot(&o, &c).await
                },
            ),
            error_policy,
            ctx.clone(),
        );
    let groups = Controller::new(Api::<VolumeGroupSnapshot>::all(client.clone()), wc())
        .watches(vgsc_api, wc(), |c: VolumeGroupSnapshotContent| {
            let r = c.spec.volume_group_snapshot_ref;
            r.name
                .map(|n| ObjectRef::new(&n).within(&r.namespace.unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(
            reconciler(
                "VolumeGroupSnapshot",
                metrics,
                |o: Arc<VolumeGroupSnapshot>, c: Arc<Ctx>| async move {
                    group::sync_group_snapshot(&o, &c).await
                },
            ),
            error_policy,
            ctx,
        );
    tokio::join!(
        drain(Box::pin(contents)),
        drain(Box::pin(group_contents)),
        drain(Box::pin(snapshots)),
        drain(Box::pin(groups))
    );
    Ok(())
}

/// A minimal HTTP/1.1 responder for `/healthz` and `/metrics`.
pub async fn serve_http(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (code, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/metrics" => ("200 OK", metrics.render()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
