//! VolumeSnapshot (controller role, §A.3–A.5, A.8, A.9) and VolumeSnapshotContent (sidecar role,
//! §A.3 steps 6–7, A.4, A.8, A.10) reconcilers.
//!
//! Differences from upstream that fix user pain points (§D) are marked `// §D.n`.

use super::api::*;
use super::driver::{SnapshotInfo, with_timeout};
use super::names::*;
use super::{
    Ctx, Error, Result, bytes_quantity, now, now_ns, pending_restore_from, set_annotations,
    set_finalizers, time_from_ns, write_status,
};
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// How often a snapshot waiting for its content object to go is looked at again, in case a
/// watch event is missed (§D.2: upstream waits for a 15-minute resync).
pub const WAIT_CONTENT_GONE: Duration = Duration::from_secs(10);

fn vs_api(ctx: &Ctx, ns: &str) -> Api<VolumeSnapshot> {
    Api::namespaced(ctx.client.clone(), ns)
}

fn vsc_api(ctx: &Ctx) -> Api<VolumeSnapshotContent> {
    Api::all(ctx.client.clone())
}

/// Whether a VS is a member of a group snapshot (created by the group controller).
pub fn is_group_member(vs: &VolumeSnapshot) -> bool {
    vs.finalizers().iter().any(|f| f == FIN_SNAPSHOT_IN_GROUP) || parent_group(vs).is_some()
}

fn parent_group(vs: &VolumeSnapshot) -> Option<String> {
    vs.owner_references()
        .iter()
        .find(|o| o.kind == "VolumeGroupSnapshot")
        .map(|o| o.name.clone())
}

/// Whether `content` is bound to (or, when static and unbound, names) `vs`.
fn content_points_to(content: &VolumeSnapshotContent, vs: &VolumeSnapshot) -> bool {
    let r = &content.spec.volume_snapshot_ref;
    r.name.as_deref() == Some(&vs.name_any())
        && r.namespace == vs.namespace()
        && match r.uid.as_deref() {
            None | Some("") => content.spec.source.snapshot_handle.is_some(),
            Some(uid) => Some(uid) == vs.uid().as_deref(),
        }
}

/// Reconciles one VolumeSnapshot (controller role). Runs in full mode only.
pub async fn sync_snapshot(vs: &VolumeSnapshot, ctx: &Ctx) -> Result<Action> {
    let ns = vs.namespace().unwrap_or_default();
    let vs = match vs_api(ctx, &ns).get_opt(&vs.name_any()).await? {
        Some(v) if v.uid() == vs.uid() => v,
        _ => return Ok(Action::await_change()),
    };
    if vs.metadata.deletion_timestamp.is_some() {
        return delete_snapshot(&vs, ctx).await;
    }
    // Protect the snapshot before anything is created for it, so its deletion always passes
    // through here.
    let vs = set_finalizers(&vs_api(ctx, &ns), &vs, &[(FIN_SNAPSHOT_AS_SOURCE, true)])
        .await?
        .unwrap_or(vs);
    let src = &vs.spec.source;
    let content = match (
        &src.persistent_volume_claim_name,
        &src.volume_snapshot_content_name,
    ) {
        (None, Some(name)) => bind_static(&vs, name, ctx).await?,
        (Some(_), None) if is_group_member(&vs) => {
            // The group controller creates and binds member contents.
            match vs
                .status
                .as_ref()
                .and_then(|s| s.bound_volume_snapshot_content_name.clone())
            {
                Some(name) => vsc_api(ctx).get_opt(&name).await?,
                None => None,
            }
            .ok_or_else(|| Error::Pending("member content not created yet".into()))?
        }
        (Some(pvc), None) => dynamic_content(&vs, pvc, ctx).await?,
        _ => {
            let msg = "spec.source must name exactly one of persistentVolumeClaimName and volumeSnapshotContentName";
            return Err(fail_snapshot(&vs, ctx, "SnapshotValidationError", msg).await);
        }
    };
    if !content_points_to(&content, &vs) {
        let msg = format!(
            "VolumeSnapshotContent {} is bound to another snapshot",
            content.name_any()
        );
        return Err(fail_snapshot(&vs, ctx, "SnapshotContentMisbound", &msg).await);
    }

    // Finalizers: the content is protected while bound; the snapshot while its content may
    // still delete storage, and always as a possible restore source.
    let delete_policy = content.spec.deletion_policy == DeletionPolicy::Delete;
    if content.metadata.deletion_timestamp.is_none() {
        set_finalizers(&vsc_api(ctx), &content, &[(FIN_CONTENT_BOUND, true)]).await?;
    }
    // Binding may have patched the snapshot (default class, status): write on a fresh copy.
    let vs = vs_api(ctx, &ns).get(&vs.name_any()).await?;
    let vs = set_finalizers(
        &vs_api(ctx, &ns),
        &vs,
        &[
            (FIN_SNAPSHOT_AS_SOURCE, true),
            (FIN_SNAPSHOT_BOUND, delete_policy),
        ],
    )
    .await?
    .unwrap_or(vs);

    // Mirror the content's status.
    let group_name = match content
        .status
        .as_ref()
        .and_then(|s| s.volume_group_snapshot_handle.as_ref())
    {
        Some(_) => parent_group(&vs),
        None => None,
    };
    let desired = snapshot_status(&vs, &content, group_name);
    let old = vs.status.clone().unwrap_or_default();
    write_status(
        &vs_api(ctx, &ns),
        &vs.name_any(),
        vs.status.as_ref(),
        &desired,
    )
    .await?;
    if old.creation_time.is_none() && desired.creation_time.is_some() {
        ctx.event(
            &vs,
            false,
            "SnapshotCreated",
            "the storage snapshot was cut",
        )
        .await;
    }
    if old.ready_to_use != Some(true) && desired.ready_to_use == Some(true) {
        ctx.event(
            &vs,
            false,
            "SnapshotReady",
            "the snapshot can be restored from",
        )
        .await;
    }
    if let Some(pvc) = &vs.spec.source.persistent_volume_claim_name {
        release_pvc(ctx, &ns, pvc).await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// The VS status that mirrors `content` (§A.5).
pub fn snapshot_status(
    vs: &VolumeSnapshot,
    content: &VolumeSnapshotContent,
    group_name: Option<String>,
) -> VolumeSnapshotStatus {
    let cs = content.status.clone().unwrap_or_default();
    let ready = cs.ready_to_use == Some(true);
    VolumeSnapshotStatus {
        bound_volume_snapshot_content_name: Some(content.name_any()),
        creation_time: cs.creation_time.map(time_from_ns),
        ready_to_use: Some(ready),
        restore_size: cs.restore_size.map(bytes_quantity),
        // §D.7: the driver's error text reaches the VolumeSnapshot.
        error: if ready {
            None
        } else {
            cs.error
                .or_else(|| vs.status.as_ref().and_then(|s| s.error.clone()))
        },
        volume_group_snapshot_name: group_name,
    }
}

/// Records an error on the VS status and as a warning event; returns the error to retry with.
async fn fail_snapshot(vs: &VolumeSnapshot, ctx: &Ctx, reason: &str, msg: &str) -> Error {
    ctx.event(vs, true, reason, msg).await;
    let mut st = vs.status.clone().unwrap_or_default();
    if same_error(st.error.as_ref(), msg) && st.ready_to_use == Some(false) {
        // Already recorded: retries do not rewrite the status.
        return Error::Invalid(msg.to_string());
    }
    st.ready_to_use = Some(false);
    st.error = Some(SnapshotError {
        message: Some(msg.to_string()),
        time: Some(now()),
    });
    let ns = vs.namespace().unwrap_or_default();
    if let Err(e) = write_status(&vs_api(ctx, &ns), &vs.name_any(), vs.status.as_ref(), &st).await {
        return e;
    }
    Error::Invalid(msg.to_string())
}

/// Whether `err` already says `msg`.
pub(super) fn same_error(err: Option<&SnapshotError>, msg: &str) -> bool {
    err.and_then(|e| e.message.as_deref()) == Some(msg)
}

/// Binds a pre-provisioned content (§A.4).
async fn bind_static(vs: &VolumeSnapshot, name: &str, ctx: &Ctx) -> Result<VolumeSnapshotContent> {
    let Some(content) = vsc_api(ctx).get_opt(name).await? else {
        let msg = format!("VolumeSnapshotContent {name} not found");
        return Err(fail_snapshot(vs, ctx, "SnapshotContentMissing", &msg).await);
    };
    if content.spec.source.snapshot_handle.is_none() {
        let msg = format!(
            "VolumeSnapshotContent {name} is dynamic; a pre-provisioned one needs spec.source.snapshotHandle"
        );
        return Err(fail_snapshot(vs, ctx, "SnapshotContentMismatch", &msg).await);
    }
    if !content_points_to(&content, vs) {
        let msg = format!("VolumeSnapshotContent {name} does not point to this snapshot");
        return Err(fail_snapshot(vs, ctx, "SnapshotContentMisbound", &msg).await);
    }
    let r = &content.spec.volume_snapshot_ref;
    let class = vs.spec.volume_snapshot_class_name.clone();
    let set_class = class.is_some() && content.spec.volume_snapshot_class_name.is_none();
    if r.uid.as_deref().unwrap_or_default().is_empty() || set_class {
        let mut spec = json!({"volumeSnapshotRef": {"uid": vs.uid()}});
        if set_class {
            spec["volumeSnapshotClassName"] = json!(class);
        }
        let patch =
            json!({"metadata": {"resourceVersion": content.resource_version()}, "spec": spec});
        return Ok(vsc_api(ctx)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?);
    }
    Ok(content)
}

/// Finds or creates the dynamic content of `vs` (§A.3).
async fn dynamic_content(
    vs: &VolumeSnapshot,
    pvc_name: &str,
    ctx: &Ctx,
) -> Result<VolumeSnapshotContent> {
    let ns = vs.namespace().unwrap_or_default();
    let uid = vs.uid().unwrap_or_default();
    let name = vs
        .status
        .as_ref()
        .and_then(|s| s.bound_volume_snapshot_content_name.clone())
        .unwrap_or_else(|| content_name(&uid));
    if let Some(c) = vsc_api(ctx).get_opt(&name).await? {
        if c.spec.source.snapshot_handle.is_some() {
            let msg = format!(
                "VolumeSnapshotContent {name} carries a snapshotHandle but the snapshot is dynamic"
            );
            return Err(fail_snapshot(vs, ctx, "SnapshotHandleSet", &msg).await);
        }
        return Ok(c);
    }

    // Source PVC and PV checks.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(pvc) = pvcs.get_opt(pvc_name).await? else {
        let msg = format!("PersistentVolumeClaim {ns}/{pvc_name} not found");
        return Err(fail_snapshot(vs, ctx, "SnapshotContentCreationFailed", &msg).await);
    };
    let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let pv_name = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
    let (Some(pv_name), true) = (pv_name, bound) else {
        let msg = format!("PersistentVolumeClaim {ns}/{pvc_name} is not bound yet");
        return Err(fail_snapshot(vs, ctx, "SnapshotContentCreationFailed", &msg).await);
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = pvs.get_opt(&pv_name).await?;
    let claim_ok = pv.as_ref().is_some_and(|pv| {
        pv.spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .is_some_and(|c| c.uid == pvc.uid())
    });
    let csi = pv
        .as_ref()
        .and_then(|pv| pv.spec.as_ref())
        .and_then(|s| s.csi.clone());
    let (Some(pv), true, Some(csi)) = (pv, claim_ok, csi) else {
        let msg = format!(
            "PersistentVolume {pv_name} of claim {ns}/{pvc_name} is missing, bound to another claim, or not a CSI volume"
        );
        return Err(fail_snapshot(vs, ctx, "SnapshotContentCreationFailed", &msg).await);
    };

    let class = resolve_class(vs, &csi.driver, ctx).await?;
    let params = match ClassParams::parse(&class.parameters) {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("VolumeSnapshotClass {}: {e}", class.name_any());
            return Err(fail_snapshot(vs, ctx, "SnapshotContentCreationFailed", &msg).await);
        }
    };
    let vars = TemplateVars {
        content_name: name.clone(),
        snapshot_namespace: ns.clone(),
        snapshot_name: vs.name_any(),
        group: false,
    };
    let secret = match params.secret(SecretKind::Snapshotter, &vars) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("VolumeSnapshotClass {}: {e}", class.name_any());
            return Err(fail_snapshot(vs, ctx, "SnapshotContentCreationFailed", &msg).await);
        }
    };

    // §A.9, §D.8: a claim being deleted cannot become a snapshot source; say so plainly.
    if pvc.metadata.deletion_timestamp.is_some()
        && !pvc.finalizers().iter().any(|f| f == FIN_PVC_AS_SOURCE)
    {
        let msg = format!(
            "PersistentVolumeClaim {ns}/{pvc_name} is being deleted; it cannot be snapshotted"
        );
        return Err(fail_snapshot(vs, ctx, "SnapshotContentCreationFailed", &msg).await);
    }
    set_finalizers(&pvcs, &pvc, &[(FIN_PVC_AS_SOURCE, true)]).await?;

    let mut annotations = BTreeMap::new();
    if let Some((sns, sname)) = secret {
        annotations.insert(ANN_DELETION_SECRET_NAME.to_string(), sname);
        annotations.insert(ANN_DELETION_SECRET_NAMESPACE.to_string(), sns);
    }
    let content = VolumeSnapshotContent {
        types: None,
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        spec: VolumeSnapshotContentSpec {
            volume_snapshot_ref: vs.object_ref(&()),
            deletion_policy: class.deletion_policy,
            driver: class.driver.clone(),
            source: VolumeSnapshotContentSource {
                snapshot_handle: None,
                volume_handle: Some(csi.volume_handle.clone()),
            },
            source_volume_mode: pv.spec.as_ref().and_then(|s| s.volume_mode.clone()),
            volume_snapshot_class_name: Some(class.name_any()),
        },
        status: None,
    }
    .typed();
    let created = match vsc_api(ctx).create(&PostParams::default(), &content).await {
        Ok(c) => c,
        Err(kube::Error::Api(s)) if s.is_already_exists() => vsc_api(ctx).get(&name).await?,
        Err(e) => return Err(e.into()),
    };
    ctx.event(
        vs,
        false,
        "CreatingSnapshot",
        format!("waiting for the snapshot of {ns}/{pvc_name} to be cut"),
    )
    .await;
    // Record the binding at once, so a retry finds the same content.
    let mut st = vs.status.clone().unwrap_or_default();
    st.bound_volume_snapshot_content_name = Some(name.clone());
    st.ready_to_use.get_or_insert(false);
    write_status(&vs_api(ctx, &ns), &vs.name_any(), vs.status.as_ref(), &st).await?;
    Ok(created)
}

/// The snapshot's class, or the default class of `driver` (patched into the VS spec, §A.3.1).
async fn resolve_class(
    vs: &VolumeSnapshot,
    driver: &str,
    ctx: &Ctx,
) -> Result<VolumeSnapshotClass> {
    let classes: Api<VolumeSnapshotClass> = Api::all(ctx.client.clone());
    if let Some(name) = &vs.spec.volume_snapshot_class_name {
        return match classes.get_opt(name).await? {
            Some(c) => Ok(c),
            None => {
                let msg = format!("VolumeSnapshotClass {name} not found");
                Err(fail_snapshot(vs, ctx, "SnapshotContentCreationFailed", &msg).await)
            }
        };
    }
    let defaults: Vec<_> = classes
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|c| {
            c.driver == driver
                && c.annotations().get(ANN_DEFAULT_CLASS).map(String::as_str) == Some("true")
        })
        .collect();
    if defaults.len() != 1 {
        let msg = format!(
            "{} default VolumeSnapshotClasses for driver {driver}; need exactly one, or name a class",
            defaults.len()
        );
        return Err(fail_snapshot(vs, ctx, "SetDefaultSnapshotClassFailed", &msg).await);
    }
    let class = defaults.into_iter().next().expect("one default");
    let patch = json!({"metadata": {"resourceVersion": vs.resource_version()},
        "spec": {"volumeSnapshotClassName": class.name_any()}});
    vs_api(ctx, &vs.namespace().unwrap_or_default())
        .patch(
            &vs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(class)
}

/// Removes the PVC's as-source finalizer unless a snapshot of it is still being cut (§D.1:
/// a snapshot that failed for good, or one being deleted, no longer holds the claim).
async fn release_pvc(ctx: &Ctx, ns: &str, pvc_name: &str) -> Result<()> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let Some(pvc) = pvcs.get_opt(pvc_name).await? else {
        return Ok(());
    };
    if !pvc.finalizers().iter().any(|f| f == FIN_PVC_AS_SOURCE) {
        return Ok(());
    }
    for vs in vs_api(ctx, ns).list(&Default::default()).await? {
        if vs.spec.source.persistent_volume_claim_name.as_deref() != Some(pvc_name)
            || vs.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let uid = vs.uid().unwrap_or_default();
        let name = vs
            .status
            .as_ref()
            .and_then(|s| s.bound_volume_snapshot_content_name.clone())
            .unwrap_or_else(|| content_name(&uid));
        if let Some(c) = vsc_api(ctx).get_opt(&name).await?
            && content_in_flight(&c)
        {
            return Ok(());
        }
    }
    set_finalizers(&pvcs, &pvc, &[(FIN_PVC_AS_SOURCE, false)]).await?;
    Ok(())
}

/// A content whose snapshot is neither ready nor failed for good: it still needs its claim
/// (§A.6: the claim is held while a not-ready snapshot of it progresses; §D.1: a failed one
/// does not hold it).
fn content_in_flight(c: &VolumeSnapshotContent) -> bool {
    if c.annotations().contains_key(ANN_BEING_CREATED) {
        return true;
    }
    let st = c.status.clone().unwrap_or_default();
    c.metadata.deletion_timestamp.is_none()
        && c.spec.source.volume_handle.is_some()
        && st.ready_to_use != Some(true)
        && st.error.is_none()
}

/// VS deletion (§A.8).
async fn delete_snapshot(vs: &VolumeSnapshot, ctx: &Ctx) -> Result<Action> {
    let ns = vs.namespace().unwrap_or_default();
    let uid = vs.uid().unwrap_or_default();
    let name = vs
        .status
        .as_ref()
        .and_then(|s| s.bound_volume_snapshot_content_name.clone())
        .or_else(|| vs.spec.source.volume_snapshot_content_name.clone())
        .unwrap_or_else(|| content_name(&uid));
    let content = vsc_api(ctx)
        .get_opt(&name)
        .await?
        .filter(|c| content_points_to(c, vs));

    // §D.6: a restore in progress keeps the snapshot; retried with backoff until it is done.
    if vs.finalizers().iter().any(|f| f == FIN_SNAPSHOT_AS_SOURCE)
        && let Some(pvc) = pending_restore_from(&ctx.client, &ns, &vs.name_any()).await?
    {
        let msg = format!("PersistentVolumeClaim {ns}/{pvc} is being restored from this snapshot");
        ctx.event(vs, true, "SnapshotDeletePending", msg.clone())
            .await;
        return Err(Error::Pending(msg));
    }
    let parent = match parent_group(vs) {
        Some(g) => {
            let vgs: Api<VolumeGroupSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
            vgs.get_opt(&g)
                .await?
                .filter(|g| g.metadata.deletion_timestamp.is_none())
        }
        None => None,
    };
    if let Some(g) = parent {
        let msg = format!(
            "member of VolumeGroupSnapshot {}: delete the group snapshot instead",
            g.name_any()
        );
        ctx.event(vs, true, "SnapshotDeletePending", msg.clone())
            .await;
        return Err(Error::Pending(msg));
    }

    let mut content_remains = false;
    if let Some(c) = &content {
        // Tell the sidecar before deleting; the sidecar also deletes when the snapshot is
        // gone, so a lost annotation patch cannot leak storage (§D.4).
        set_annotations(&vsc_api(ctx), c, &[(ANN_BEING_DELETED, Some(YES))]).await?;
        if c.spec.deletion_policy == DeletionPolicy::Delete {
            if c.metadata.deletion_timestamp.is_none() {
                vsc_api(ctx)
                    .delete(&c.name_any(), &DeleteParams::default())
                    .await?;
            }
            content_remains = true;
        }
    }
    let changes = [
        (FIN_SNAPSHOT_AS_SOURCE, false),
        (FIN_SNAPSHOT_IN_GROUP, false),
        (FIN_SNAPSHOT_BOUND, content_remains),
    ];
    set_finalizers(&vs_api(ctx, &ns), vs, &changes).await?;
    if let Some(pvc) = &vs.spec.source.persistent_volume_claim_name {
        release_pvc(ctx, &ns, pvc).await?;
    }
    if content_remains {
        // §D.2: look again soon even if the content's deletion event is missed.
        return Ok(Action::requeue(WAIT_CONTENT_GONE));
    }
    Ok(Action::await_change())
}

// ---------------------------------------------------------------------------------------------
// Sidecar role: VolumeSnapshotContent of our driver.

/// Reconciles one VolumeSnapshotContent of our driver (sidecar role; both modes).
pub async fn sync_content(content: &VolumeSnapshotContent, ctx: &Ctx) -> Result<Action> {
    let Some(c) = vsc_api(ctx).get_opt(&content.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if c.spec.driver != DRIVER {
        return Ok(Action::await_change());
    }
    if c.metadata.deletion_timestamp.is_some() {
        return delete_content(c, ctx).await;
    }
    let st = c.status.clone().unwrap_or_default();
    if st.ready_to_use == Some(true) && st.snapshot_handle.is_some() {
        // Once ready, never call the driver again.
        return Ok(Action::requeue(RESYNC));
    }
    let member = c.annotations().contains_key(ANN_MEMBER_GROUP_HANDLE)
        || st.volume_group_snapshot_handle.is_some();
    if member || c.spec.source.snapshot_handle.is_some() {
        refresh_content(c, member, ctx).await
    } else if c.spec.source.volume_handle.is_some() {
        create_content(c, ctx).await
    } else {
        Err(content_error(
            &c,
            ctx,
            "SnapshotContentCheckandUpdateFailed",
            "spec.source names neither a volume nor a snapshot",
            false,
        )
        .await)
    }
}

/// Records an error on a content status (readyToUse false) with a warning event.
async fn content_error(
    c: &VolumeSnapshotContent,
    ctx: &Ctx,
    reason: &str,
    msg: &str,
    driver: bool,
) -> Error {
    ctx.event(c, true, reason, msg).await;
    let mut st = c.status.clone().unwrap_or_default();
    if same_error(st.error.as_ref(), msg) && st.ready_to_use == Some(false) {
        return if driver {
            Error::Pending(msg.to_string())
        } else {
            Error::Invalid(msg.to_string())
        };
    }
    st.ready_to_use = Some(false);
    st.error = Some(SnapshotError {
        message: Some(msg.to_string()),
        time: Some(now()),
    });
    if let Err(e) = write_status(&vsc_api(ctx), &c.name_any(), c.status.as_ref(), &st).await {
        return e;
    }
    if driver {
        Error::Pending(msg.to_string())
    } else {
        Error::Invalid(msg.to_string())
    }
}

/// The status after a successful CreateSnapshot/ListSnapshots answer (§A.5).
pub fn content_status(
    old: Option<&VolumeSnapshotContentStatus>,
    info: &SnapshotInfo,
) -> VolumeSnapshotContentStatus {
    let old = old.cloned().unwrap_or_default();
    let created = match (old.creation_time, info.creation_time_ns) {
        (Some(t), _) => Some(t),
        (None, 0) => Some(now_ns()),
        (None, t) => Some(t),
    };
    VolumeSnapshotContentStatus {
        creation_time: created,
        error: if info.ready_to_use { None } else { old.error },
        ready_to_use: Some(info.ready_to_use),
        restore_size: old
            .restore_size
            .or((info.size_bytes > 0).then_some(info.size_bytes)),
        snapshot_handle: Some(info.snapshot_id.clone()),
        volume_group_snapshot_handle: (!info.group_snapshot_id.is_empty())
            .then(|| info.group_snapshot_id.clone())
            .or(old.volume_group_snapshot_handle),
    }
}

/// Class parameters and the CreateSnapshot secret of a dynamic content.
async fn create_inputs(
    c: &VolumeSnapshotContent,
    ctx: &Ctx,
) -> std::result::Result<(BTreeMap<String, String>, super::driver::Secrets), String> {
    let Some(class_name) = &c.spec.volume_snapshot_class_name else {
        return Err("cannot create a snapshot without a snapshot class".into());
    };
    let classes: Api<VolumeSnapshotClass> = Api::all(ctx.client.clone());
    let class = match classes.get_opt(class_name).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(format!("VolumeSnapshotClass {class_name} not found")),
        Err(e) => return Err(e.to_string()),
    };
    let params = ClassParams::parse(&class.parameters).map_err(|e| e.to_string())?;
    let r = &c.spec.volume_snapshot_ref;
    let vars = TemplateVars {
        content_name: c.name_any(),
        snapshot_namespace: r.namespace.clone().unwrap_or_default(),
        snapshot_name: r.name.clone().unwrap_or_default(),
        group: false,
    };
    let secret = params
        .secret(SecretKind::Snapshotter, &vars)
        .map_err(|e| e.to_string())?;
    let secrets = ctx.secrets(secret).await.map_err(|e| e.to_string())?;
    Ok((params.driver, secrets))
}

/// Calls CreateSnapshot for a dynamic content and records the answer.
async fn create_content(c: VolumeSnapshotContent, ctx: &Ctx) -> Result<Action> {
    let uid = c.spec.volume_snapshot_ref.uid.clone().unwrap_or_default();
    if uid.is_empty() {
        return Err(Error::Pending("content not bound to a snapshot yet".into()));
    }
    let (params, secrets) = match create_inputs(&c, ctx).await {
        Ok(x) => x,
        Err(msg) => {
            return Err(content_error(&c, ctx, "SnapshotCreationFailed", &msg, false).await);
        }
    };
    let c = set_annotations(&vsc_api(ctx), &c, &[(ANN_BEING_CREATED, Some(YES))])
        .await?
        .unwrap_or(c);
    let handle = c.spec.source.volume_handle.clone().unwrap_or_default();
    let name = csi_snapshot_name(&uid);
    let r = &c.spec.volume_snapshot_ref;
    let params = with_create_metadata(
        params,
        false,
        r.namespace.as_deref().unwrap_or_default(),
        r.name.as_deref().unwrap_or_default(),
        &c.name_any(),
    );
    let span = tracing::info_span!("create_snapshot", snapshot = %name, volume = %handle);
    let _g = span.enter();
    let res = with_timeout(
        ctx.csi_timeout,
        ctx.driver
            .create_snapshot(&name, &handle, &params, &secrets),
    )
    .await;
    drop(_g);
    match res {
        Ok(info) => {
            let st = content_status(c.status.as_ref(), &info);
            // Status (with the handle) first, then drop the annotation: a deletion never
            // sees "not in flight" without the handle it must delete (§D.5).
            let c = write_status(&vsc_api(ctx), &c.name_any(), c.status.as_ref(), &st)
                .await?
                .unwrap_or(c);
            set_annotations(&vsc_api(ctx), &c, &[(ANN_BEING_CREATED, None)]).await?;
            if info.ready_to_use {
                Ok(Action::requeue(RESYNC))
            } else {
                Err(Error::Pending(format!(
                    "snapshot {} not ready yet",
                    info.snapshot_id
                )))
            }
        }
        Err(e) => {
            let msg = format!("CreateSnapshot {name}: {e}");
            let err = content_error(&c, ctx, "SnapshotCreationFailed", &msg, true).await;
            if e.is_final() {
                // Re-read: content_error wrote the status.
                if let Some(c) = vsc_api(ctx).get_opt(&c.name_any()).await? {
                    set_annotations(&vsc_api(ctx), &c, &[(ANN_BEING_CREATED, None)]).await?;
                }
            }
            match err {
                Error::Pending(_) => Err(Error::Driver(e)),
                other => Err(other),
            }
        }
    }
}

/// Refreshes a static or group-member content with ListSnapshots (§A.4, §A.12.6).
async fn refresh_content(c: VolumeSnapshotContent, member: bool, ctx: &Ctx) -> Result<Action> {
    let st = c.status.clone().unwrap_or_default();
    let Some(handle) = st
        .snapshot_handle
        .clone()
        .or_else(|| c.spec.source.snapshot_handle.clone())
    else {
        return Err(Error::Pending(
            "member content has no snapshot handle yet".into(),
        ));
    };
    let secret = if member {
        deletion_secret(&c, false)
    } else {
        match list_secret(&c, ctx).await {
            Ok(s) => s,
            Err(msg) => {
                return Err(content_error(
                    &c,
                    ctx,
                    "SnapshotContentCheckandUpdateFailed",
                    &msg,
                    false,
                )
                .await);
            }
        }
    };
    let secrets = ctx.secrets(secret).await?;
    let res = with_timeout(ctx.csi_timeout, ctx.driver.get_snapshot(&handle, &secrets)).await;
    match res {
        Ok(Some(info)) => {
            let st = content_status(c.status.as_ref(), &info);
            write_status(&vsc_api(ctx), &c.name_any(), c.status.as_ref(), &st).await?;
            if info.ready_to_use {
                Ok(Action::requeue(RESYNC))
            } else {
                Err(Error::Pending(format!("snapshot {handle} not ready yet")))
            }
        }
        Ok(None) => {
            let msg = format!("snapshot {handle} does not exist on the driver");
            Err(content_error(&c, ctx, "SnapshotContentCheckandUpdateFailed", &msg, false).await)
        }
        Err(e) => {
            let msg = format!("ListSnapshots {handle}: {e}");
            content_error(&c, ctx, "SnapshotContentCheckandUpdateFailed", &msg, true).await;
            Err(Error::Driver(e))
        }
    }
}

async fn list_secret(
    c: &VolumeSnapshotContent,
    ctx: &Ctx,
) -> std::result::Result<Option<(String, String)>, String> {
    let Some(class_name) = &c.spec.volume_snapshot_class_name else {
        return Ok(None);
    };
    let classes: Api<VolumeSnapshotClass> = Api::all(ctx.client.clone());
    let Some(class) = classes
        .get_opt(class_name)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err(format!("VolumeSnapshotClass {class_name} not found"));
    };
    let params = ClassParams::parse(&class.parameters).map_err(|e| e.to_string())?;
    let r = &c.spec.volume_snapshot_ref;
    let vars = TemplateVars {
        content_name: c.name_any(),
        snapshot_namespace: r.namespace.clone().unwrap_or_default(),
        snapshot_name: r.name.clone().unwrap_or_default(),
        group: false,
    };
    params
        .secret(SecretKind::SnapshotterList, &vars)
        .map_err(|e| e.to_string())
}

fn deletion_secret(c: &VolumeSnapshotContent, _group: bool) -> Option<(String, String)> {
    let a = c.annotations();
    Some((
        a.get(ANN_DELETION_SECRET_NAMESPACE)?.clone(),
        a.get(ANN_DELETION_SECRET_NAME)?.clone(),
    ))
}

/// Whether the snapshot a content points to is gone or going (then the content may delete).
async fn snapshot_gone(r: &ObjectReference, ctx: &Ctx) -> Result<bool> {
    let (Some(ns), Some(name)) = (&r.namespace, &r.name) else {
        return Ok(true);
    };
    Ok(match vs_api(ctx, ns).get_opt(name).await? {
        None => true,
        Some(vs) => vs.uid() != r.uid || vs.metadata.deletion_timestamp.is_some(),
    })
}

/// Content deletion (§A.8, sidecar).
async fn delete_content(c: VolumeSnapshotContent, ctx: &Ctx) -> Result<Action> {
    let mut c = c;
    if c.annotations().contains_key(ANN_BEING_CREATED) {
        // §D.5: settle the in-flight CreateSnapshot (idempotent by name) instead of waiting
        // forever or leaking: its answer gives the handle to delete, or a final error.
        match create_content(c.clone(), ctx).await {
            Ok(_) | Err(Error::Pending(_)) => {}
            Err(Error::Driver(e)) if e.is_final() => {}
            Err(e) => return Err(e),
        }
        c = match vsc_api(ctx).get_opt(&c.name_any()).await? {
            Some(c) => c,
            None => return Ok(Action::await_change()),
        };
        if c.annotations().contains_key(ANN_BEING_CREATED) {
            return Err(Error::Pending("CreateSnapshot still in flight".into()));
        }
    }
    let r = &c.spec.volume_snapshot_ref;
    let unbound_static = r.uid.as_deref().unwrap_or_default().is_empty();
    // §D.3, §D.4: the annotation, or the snapshot being gone, both allow deletion.
    let may_delete = unbound_static
        || c.annotations().contains_key(ANN_BEING_DELETED)
        || snapshot_gone(r, ctx).await?;
    if !may_delete {
        return Ok(Action::requeue(RESYNC));
    }
    let st = c.status.clone().unwrap_or_default();
    let handle = st
        .snapshot_handle
        .clone()
        .or_else(|| c.spec.source.snapshot_handle.clone());
    let member = st.volume_group_snapshot_handle.is_some()
        || c.annotations().contains_key(ANN_MEMBER_GROUP_HANDLE);
    if c.spec.deletion_policy == DeletionPolicy::Delete
        && !member
        && let Some(handle) = handle
    {
        let secrets = ctx.secrets(deletion_secret(&c, false)).await?;
        let res = with_timeout(
            ctx.csi_timeout,
            ctx.driver.delete_snapshot(&handle, &secrets),
        )
        .await;
        if let Err(e) = res {
            let msg = format!("DeleteSnapshot {handle}: {e}");
            content_error(&c, ctx, "SnapshotDeleteError", &msg, true).await;
            return Err(Error::Driver(e));
        }
        let cleared = VolumeSnapshotContentStatus {
            error: None,
            ready_to_use: Some(false),
            ..Default::default()
        };
        c = write_status(&vsc_api(ctx), &c.name_any(), c.status.as_ref(), &cleared)
            .await?
            .unwrap_or(c);
    }
    set_finalizers(&vsc_api(ctx), &c, &[(FIN_CONTENT_BOUND, false)]).await?;
    Ok(Action::await_change())
}
