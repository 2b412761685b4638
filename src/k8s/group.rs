//! VolumeGroupSnapshot (controller role) and VolumeGroupSnapshotContent (sidecar role)
//! reconcilers (§A.12). Members are ordinary VolumeSnapshot / VolumeSnapshotContent objects
//! with the sha256-derived names; [`super::snapshot`] keeps mirroring their status.

use super::api::*;
use super::driver::{GroupSnapshotInfo, with_timeout};
use super::names::*;
use super::snapshot::{WAIT_CONTENT_GONE, same_error};
use super::{
    Ctx, Error, Result, now, pending_restore_from, set_annotations, set_finalizers, time_from_ns,
    write_status,
};
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;

fn vgs_api(ctx: &Ctx, ns: &str) -> Api<VolumeGroupSnapshot> {
    Api::namespaced(ctx.client.clone(), ns)
}

fn vgsc_api(ctx: &Ctx) -> Api<VolumeGroupSnapshotContent> {
    Api::all(ctx.client.clone())
}

/// Whether `labels` satisfy a full label selector: matchLabels and every matchExpressions
/// operator (§D.13: upstream honours matchLabels only).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

fn content_points_to(c: &VolumeGroupSnapshotContent, vgs: &VolumeGroupSnapshot) -> bool {
    let r = &c.spec.volume_group_snapshot_ref;
    r.name.as_deref() == Some(&vgs.name_any())
        && r.namespace == vgs.namespace()
        && match r.uid.as_deref() {
            None | Some("") => c.spec.source.group_snapshot_handles.is_some(),
            Some(uid) => Some(uid) == vgs.uid().as_deref(),
        }
}

async fn fail_group(vgs: &VolumeGroupSnapshot, ctx: &Ctx, reason: &str, msg: &str) -> Error {
    ctx.event(vgs, true, reason, msg).await;
    let mut st = vgs.status.clone().unwrap_or_default();
    if same_error(st.error.as_ref(), msg) && st.ready_to_use == Some(false) {
        return Error::Invalid(msg.to_string());
    }
    st.ready_to_use = Some(false);
    st.error = Some(SnapshotError {
        message: Some(msg.to_string()),
        time: Some(now()),
    });
    let ns = vgs.namespace().unwrap_or_default();
    if let Err(e) = write_status(
        &vgs_api(ctx, &ns),
        &vgs.name_any(),
        vgs.status.as_ref(),
        &st,
    )
    .await
    {
        return e;
    }
    Error::Invalid(msg.to_string())
}

/// Reconciles one VolumeGroupSnapshot (controller role; full mode).
pub async fn sync_group_snapshot(vgs: &VolumeGroupSnapshot, ctx: &Ctx) -> Result<Action> {
    let ns = vgs.namespace().unwrap_or_default();
    let vgs = match vgs_api(ctx, &ns).get_opt(&vgs.name_any()).await? {
        Some(v) if v.uid() == vgs.uid() => v,
        _ => return Ok(Action::await_change()),
    };
    if vgs.metadata.deletion_timestamp.is_some() {
        return delete_group(&vgs, ctx).await;
    }
    let content = match (
        &vgs.spec.source.selector,
        &vgs.spec.source.volume_group_snapshot_content_name,
    ) {
        (None, Some(name)) => bind_static(&vgs, name, ctx).await?,
        (Some(sel), None) => dynamic_content(&vgs, sel, ctx).await?,
        _ => {
            let msg =
                "spec.source must give exactly one of selector and volumeGroupSnapshotContentName";
            return Err(fail_group(&vgs, ctx, "GroupSnapshotValidationError", msg).await);
        }
    };
    if !content_points_to(&content, &vgs) {
        let msg = format!(
            "VolumeGroupSnapshotContent {} is bound to another group snapshot",
            content.name_any()
        );
        return Err(fail_group(&vgs, ctx, "GroupSnapshotContentMisbound", &msg).await);
    }
    if content.metadata.deletion_timestamp.is_none() {
        set_finalizers(&vgsc_api(ctx), &content, &[(FIN_GROUP_CONTENT_BOUND, true)]).await?;
    }
    let delete_policy = content.spec.deletion_policy == DeletionPolicy::Delete;
    let vgs = set_finalizers(
        &vgs_api(ctx, &ns),
        &vgs,
        &[(FIN_GROUP_BOUND, delete_policy)],
    )
    .await?
    .unwrap_or(vgs);

    let cs = content.status.clone().unwrap_or_default();
    let ready = cs.ready_to_use == Some(true);
    let desired = VolumeGroupSnapshotStatus {
        bound_volume_group_snapshot_content_name: Some(content.name_any()),
        creation_time: cs.creation_time.clone(),
        error: if ready {
            None
        } else {
            cs.error
                .clone()
                .or_else(|| vgs.status.as_ref().and_then(|s| s.error.clone()))
        },
        ready_to_use: Some(ready),
    };
    let old = vgs.status.clone().unwrap_or_default();
    write_status(
        &vgs_api(ctx, &ns),
        &vgs.name_any(),
        vgs.status.as_ref(),
        &desired,
    )
    .await?;
    if old.creation_time.is_none() && desired.creation_time.is_some() {
        ctx.event(
            &vgs,
            false,
            "GroupSnapshotCreated",
            "the storage group snapshot was cut",
        )
        .await;
    }
    if old.ready_to_use != Some(true) && ready {
        ctx.event(
            &vgs,
            false,
            "GroupSnapshotReady",
            "every member can be restored from",
        )
        .await;
    }
    if cs.volume_group_snapshot_handle.is_some()
        && cs
            .volume_snapshot_info_list
            .as_ref()
            .is_some_and(|l| !l.is_empty())
    {
        ensure_members(&vgs, &content, ctx).await?;
    }
    Ok(Action::requeue(RESYNC))
}

async fn bind_static(
    vgs: &VolumeGroupSnapshot,
    name: &str,
    ctx: &Ctx,
) -> Result<VolumeGroupSnapshotContent> {
    let Some(c) = vgsc_api(ctx).get_opt(name).await? else {
        let msg = format!("VolumeGroupSnapshotContent {name} not found");
        return Err(fail_group(vgs, ctx, "GroupSnapshotContentMissing", &msg).await);
    };
    if c.spec.source.group_snapshot_handles.is_none() {
        let msg = format!(
            "VolumeGroupSnapshotContent {name} is dynamic; a pre-provisioned one needs spec.source.groupSnapshotHandles"
        );
        return Err(fail_group(vgs, ctx, "GroupSnapshotContentMismatch", &msg).await);
    }
    if !content_points_to(&c, vgs) {
        let msg =
            format!("VolumeGroupSnapshotContent {name} does not point to this group snapshot");
        return Err(fail_group(vgs, ctx, "GroupSnapshotContentMisbound", &msg).await);
    }
    if c.spec
        .volume_group_snapshot_ref
        .uid
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        let patch = json!({"metadata": {"resourceVersion": c.resource_version()},
            "spec": {"volumeGroupSnapshotRef": {"uid": vgs.uid()}}});
        return Ok(vgsc_api(ctx)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?);
    }
    Ok(c)
}

async fn dynamic_content(
    vgs: &VolumeGroupSnapshot,
    sel: &LabelSelector,
    ctx: &Ctx,
) -> Result<VolumeGroupSnapshotContent> {
    let ns = vgs.namespace().unwrap_or_default();
    let uid = vgs.uid().unwrap_or_default();
    let name = vgs
        .status
        .as_ref()
        .and_then(|s| s.bound_volume_group_snapshot_content_name.clone())
        .unwrap_or_else(|| group_content_name(&uid));
    if let Some(c) = vgsc_api(ctx).get_opt(&name).await? {
        return Ok(c);
    }
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut handles = Vec::new();
    let mut drivers = Vec::new();
    let selected: Vec<_> = pvcs
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|p| selector_matches(sel, p.labels()))
        .collect();
    if selected.is_empty() {
        let msg = format!("no PersistentVolumeClaim in {ns} matches the selector");
        return Err(fail_group(vgs, ctx, "CreateGroupSnapshotContentFailed", &msg).await);
    }
    for pvc in &selected {
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let pv = match pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) {
            Some(pv) if bound => pvs.get_opt(&pv).await?,
            _ => None,
        };
        let csi = pv.and_then(|pv| pv.spec.and_then(|s| s.csi));
        let Some(csi) = csi else {
            let msg = format!(
                "PersistentVolumeClaim {ns}/{} is not bound to a CSI volume",
                pvc.name_any()
            );
            return Err(fail_group(vgs, ctx, "CreateGroupSnapshotContentFailed", &msg).await);
        };
        handles.push(csi.volume_handle);
        drivers.push(csi.driver);
    }
    drivers.sort();
    drivers.dedup();
    if drivers.len() != 1 {
        let msg = format!("the selected claims use several drivers: {drivers:?}");
        return Err(fail_group(vgs, ctx, "CreateGroupSnapshotContentFailed", &msg).await);
    }
    let class = resolve_class(vgs, &drivers[0], ctx).await?;
    if class.driver != drivers[0] {
        let msg = format!(
            "VolumeGroupSnapshotClass {} is for driver {}, the claims use {}",
            class.name_any(),
            class.driver,
            drivers[0]
        );
        return Err(fail_group(vgs, ctx, "CreateGroupSnapshotContentFailed", &msg).await);
    }
    let vars = TemplateVars {
        content_name: name.clone(),
        snapshot_namespace: ns.clone(),
        snapshot_name: vgs.name_any(),
        group: true,
    };
    let secret = ClassParams::parse(&class.parameters)
        .and_then(|p| p.secret(SecretKind::GroupSnapshotter, &vars));
    let secret = match secret {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("VolumeGroupSnapshotClass {}: {e}", class.name_any());
            return Err(fail_group(vgs, ctx, "CreateGroupSnapshotContentFailed", &msg).await);
        }
    };
    handles.sort();
    let mut annotations = BTreeMap::new();
    if let Some((sns, sname)) = secret {
        annotations.insert(ANN_GROUP_DELETION_SECRET_NAME.to_string(), sname);
        annotations.insert(ANN_GROUP_DELETION_SECRET_NAMESPACE.to_string(), sns);
    }
    let content = VolumeGroupSnapshotContent {
        types: None,
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        spec: VolumeGroupSnapshotContentSpec {
            volume_group_snapshot_ref: vgs.object_ref(&()),
            deletion_policy: class.deletion_policy,
            driver: class.driver.clone(),
            source: VolumeGroupSnapshotContentSource {
                group_snapshot_handles: None,
                volume_handles: Some(handles),
            },
            volume_group_snapshot_class_name: Some(class.name_any()),
        },
        status: None,
    }
    .typed();
    let created = match vgsc_api(ctx).create(&PostParams::default(), &content).await {
        Ok(c) => c,
        Err(kube::Error::Api(s)) if s.is_already_exists() => vgsc_api(ctx).get(&name).await?,
        Err(e) => return Err(e.into()),
    };
    ctx.event(
        vgs,
        false,
        "CreatingGroupSnapshot",
        format!("{} volumes", selected.len()),
    )
    .await;
    let mut st = vgs.status.clone().unwrap_or_default();
    st.bound_volume_group_snapshot_content_name = Some(name);
    st.ready_to_use.get_or_insert(false);
    write_status(
        &vgs_api(ctx, &ns),
        &vgs.name_any(),
        vgs.status.as_ref(),
        &st,
    )
    .await?;
    Ok(created)
}

async fn resolve_class(
    vgs: &VolumeGroupSnapshot,
    driver: &str,
    ctx: &Ctx,
) -> Result<VolumeGroupSnapshotClass> {
    let classes: Api<VolumeGroupSnapshotClass> = Api::all(ctx.client.clone());
    if let Some(name) = &vgs.spec.volume_group_snapshot_class_name {
        return match classes.get_opt(name).await? {
            Some(c) => Ok(c),
            None => {
                let msg = format!("VolumeGroupSnapshotClass {name} not found");
                Err(fail_group(vgs, ctx, "CreateGroupSnapshotContentFailed", &msg).await)
            }
        };
    }
    let defaults: Vec<_> = classes
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|c| {
            c.driver == driver
                && c.annotations()
                    .get(ANN_GROUP_DEFAULT_CLASS)
                    .map(String::as_str)
                    == Some("true")
        })
        .collect();
    if defaults.len() != 1 {
        let msg = format!(
            "{} default VolumeGroupSnapshotClasses for driver {driver}; need exactly one, or name a class",
            defaults.len()
        );
        return Err(fail_group(vgs, ctx, "SetDefaultGroupSnapshotClassFailed", &msg).await);
    }
    let class = defaults.into_iter().next().expect("one default");
    let patch = json!({"metadata": {"resourceVersion": vgs.resource_version()},
        "spec": {"volumeGroupSnapshotClassName": class.name_any()}});
    vgs_api(ctx, &vgs.namespace().unwrap_or_default())
        .patch(
            &vgs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(class)
}

/// Creates and binds the member VolumeSnapshots and contents (§A.12.5).
async fn ensure_members(
    vgs: &VolumeGroupSnapshot,
    vgsc: &VolumeGroupSnapshotContent,
    ctx: &Ctx,
) -> Result<()> {
    let ns = vgs.namespace().unwrap_or_default();
    let uid = vgs.uid().unwrap_or_default();
    let cs = vgsc.status.clone().unwrap_or_default();
    let group_handle = cs.volume_group_snapshot_handle.clone().unwrap_or_default();
    let vss: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let vscs: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    let pvs: Vec<PersistentVolume> = Api::<PersistentVolume>::all(ctx.client.clone())
        .list(&Default::default())
        .await?
        .items;
    for info in cs.volume_snapshot_info_list.iter().flatten() {
        let vh = info.volume_handle.clone().unwrap_or_default();
        let pv = pvs.iter().find(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.csi.as_ref())
                .is_some_and(|c| c.driver == vgsc.spec.driver && c.volume_handle == vh)
        });
        let spec = pv.and_then(|pv| pv.spec.as_ref());
        let claim = spec
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|c| c.name.clone())
            .unwrap_or_default();
        let vs_name = member_snapshot_name(&uid, &vh);
        let vsc_name = member_content_name(&uid, &vh);

        let vs = match vss.get_opt(&vs_name).await? {
            Some(vs) => vs,
            None => {
                let vs = VolumeSnapshot {
                    types: None,
                    metadata: ObjectMeta {
                        name: Some(vs_name.clone()),
                        namespace: Some(ns.clone()),
                        owner_references: vgs.owner_ref(&()).map(|o| vec![o]),
                        finalizers: Some(vec![FIN_SNAPSHOT_IN_GROUP.to_string()]),
                        ..Default::default()
                    },
                    spec: VolumeSnapshotSpec {
                        source: VolumeSnapshotSource {
                            persistent_volume_claim_name: Some(claim.clone()),
                            volume_snapshot_content_name: None,
                        },
                        volume_snapshot_class_name: None,
                    },
                    status: None,
                }
                .typed();
                match vss.create(&PostParams::default(), &vs).await {
                    Ok(v) => v,
                    Err(kube::Error::Api(s)) if s.is_already_exists() => vss.get(&vs_name).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let vsc = match vscs.get_opt(&vsc_name).await? {
            Some(c) => c,
            None => {
                let mut ann =
                    BTreeMap::from([(ANN_MEMBER_GROUP_HANDLE.to_string(), group_handle.clone())]);
                let ga = vgsc.annotations();
                if let (Some(n), Some(s)) = (
                    ga.get(ANN_GROUP_DELETION_SECRET_NAME),
                    ga.get(ANN_GROUP_DELETION_SECRET_NAMESPACE),
                ) {
                    ann.insert(ANN_DELETION_SECRET_NAME.to_string(), n.clone());
                    ann.insert(ANN_DELETION_SECRET_NAMESPACE.to_string(), s.clone());
                }
                let c = VolumeSnapshotContent {
                    types: None,
                    metadata: ObjectMeta {
                        name: Some(vsc_name.clone()),
                        annotations: Some(ann),
                        ..Default::default()
                    },
                    spec: VolumeSnapshotContentSpec {
                        volume_snapshot_ref: vs.object_ref(&()),
                        deletion_policy: vgsc.spec.deletion_policy,
                        driver: vgsc.spec.driver.clone(),
                        source: VolumeSnapshotContentSource {
                            snapshot_handle: None,
                            volume_handle: Some(vh.clone()),
                        },
                        source_volume_mode: spec.and_then(|s| s.volume_mode.clone()),
                        volume_snapshot_class_name: None,
                    },
                    status: None,
                }
                .typed();
                match vscs.create(&PostParams::default(), &c).await {
                    Ok(c) => c,
                    Err(kube::Error::Api(s)) if s.is_already_exists() => {
                        vscs.get(&vsc_name).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let vsc_status = VolumeSnapshotContentStatus {
            creation_time: info.creation_time,
            error: None,
            ready_to_use: info.ready_to_use,
            restore_size: info.restore_size,
            snapshot_handle: info.snapshot_handle.clone(),
            volume_group_snapshot_handle: Some(group_handle.clone()),
        };
        if vsc.status.is_none() {
            write_status(&vscs, &vsc_name, None, &vsc_status).await?;
        }
        if vs
            .status
            .as_ref()
            .and_then(|s| s.bound_volume_snapshot_content_name.as_ref())
            .is_none()
        {
            let st = VolumeSnapshotStatus {
                bound_volume_snapshot_content_name: Some(vsc_name.clone()),
                ready_to_use: Some(false),
                volume_group_snapshot_name: Some(vgs.name_any()),
                ..Default::default()
            };
            write_status(&vss, &vs_name, vs.status.as_ref(), &st).await?;
        }
    }
    Ok(())
}

/// Member snapshots of a group snapshot, by owner reference.
async fn members(vgs: &VolumeGroupSnapshot, ctx: &Ctx) -> Result<Vec<VolumeSnapshot>> {
    let ns = vgs.namespace().unwrap_or_default();
    let uid = vgs.uid();
    Ok(Api::<VolumeSnapshot>::namespaced(ctx.client.clone(), &ns)
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|vs| {
            vs.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect())
}

async fn delete_group(vgs: &VolumeGroupSnapshot, ctx: &Ctx) -> Result<Action> {
    let ns = vgs.namespace().unwrap_or_default();
    let uid = vgs.uid().unwrap_or_default();
    let members = members(vgs, ctx).await?;
    for m in &members {
        if let Some(pvc) = pending_restore_from(&ctx.client, &ns, &m.name_any()).await? {
            let msg = format!(
                "PersistentVolumeClaim {ns}/{pvc} is being restored from member {}",
                m.name_any()
            );
            ctx.event(vgs, true, "GroupSnapshotDeletePending", msg.clone())
                .await;
            return Err(Error::Pending(msg));
        }
    }
    let name = vgs
        .status
        .as_ref()
        .and_then(|s| s.bound_volume_group_snapshot_content_name.clone())
        .or_else(|| vgs.spec.source.volume_group_snapshot_content_name.clone())
        .unwrap_or_else(|| group_content_name(&uid));
    let content = vgsc_api(ctx)
        .get_opt(&name)
        .await?
        .filter(|c| content_points_to(c, vgs));
    let mut content_remains = false;
    if let Some(c) = &content {
        set_annotations(&vgsc_api(ctx), c, &[(ANN_GROUP_BEING_DELETED, Some(YES))]).await?;
        if c.spec.deletion_policy == DeletionPolicy::Delete {
            if c.metadata.deletion_timestamp.is_none() {
                vgsc_api(ctx)
                    .delete(&c.name_any(), &DeleteParams::default())
                    .await?;
            }
            content_remains = true;
        }
    }
    let vss: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    for m in members
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
    {
        match vss.delete(&m.name_any(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    set_finalizers(
        &vgs_api(ctx, &ns),
        vgs,
        &[(FIN_GROUP_BOUND, content_remains)],
    )
    .await?;
    if content_remains {
        return Ok(Action::requeue(WAIT_CONTENT_GONE));
    }
    Ok(Action::await_change())
}

// ---------------------------------------------------------------------------------------------
// Sidecar role.

/// The group content status after a CreateVolumeGroupSnapshot/GetVolumeGroupSnapshot answer;
/// the member list is written once (§A.12.4).
pub fn group_content_status(
    old: Option<&VolumeGroupSnapshotContentStatus>,
    info: &GroupSnapshotInfo,
) -> VolumeGroupSnapshotContentStatus {
    let old = old.cloned().unwrap_or_default();
    let list = match old.volume_snapshot_info_list {
        Some(l) if !l.is_empty() => l,
        _ => info
            .snapshots
            .iter()
            .map(|s| VolumeSnapshotInfo {
                creation_time: Some(if s.creation_time_ns == 0 {
                    info.creation_time_ns
                } else {
                    s.creation_time_ns
                }),
                ready_to_use: Some(s.ready_to_use),
                restore_size: (s.size_bytes > 0).then_some(s.size_bytes),
                snapshot_handle: Some(s.snapshot_id.clone()),
                volume_handle: Some(s.source_volume_id.clone()),
            })
            .collect(),
    };
    let created = old.creation_time.or_else(|| {
        Some(if info.creation_time_ns == 0 {
            now()
        } else {
            time_from_ns(info.creation_time_ns)
        })
    });
    VolumeGroupSnapshotContentStatus {
        creation_time: created,
        error: if info.ready_to_use { None } else { old.error },
        ready_to_use: Some(info.ready_to_use),
        volume_group_snapshot_handle: Some(info.group_snapshot_id.clone()),
        volume_snapshot_info_list: Some(list),
    }
}

async fn group_content_error(
    c: &VolumeGroupSnapshotContent,
    ctx: &Ctx,
    reason: &str,
    msg: &str,
) -> Result<()> {
    ctx.event(c, true, reason, msg).await;
    let mut st = c.status.clone().unwrap_or_default();
    if same_error(st.error.as_ref(), msg) && st.ready_to_use == Some(false) {
        return Ok(());
    }
    st.ready_to_use = Some(false);
    st.error = Some(SnapshotError {
        message: Some(msg.to_string()),
        time: Some(now()),
    });
    write_status(&vgsc_api(ctx), &c.name_any(), c.status.as_ref(), &st).await?;
    Ok(())
}

fn class_vars(c: &VolumeGroupSnapshotContent) -> TemplateVars {
    let r = &c.spec.volume_group_snapshot_ref;
    TemplateVars {
        content_name: c.name_any(),
        snapshot_namespace: r.namespace.clone().unwrap_or_default(),
        snapshot_name: r.name.clone().unwrap_or_default(),
        group: true,
    }
}

async fn class_inputs(
    c: &VolumeGroupSnapshotContent,
    kind: SecretKind,
    ctx: &Ctx,
) -> std::result::Result<(BTreeMap<String, String>, Option<(String, String)>), String> {
    let Some(name) = &c.spec.volume_group_snapshot_class_name else {
        return Ok((BTreeMap::new(), None));
    };
    let classes: Api<VolumeGroupSnapshotClass> = Api::all(ctx.client.clone());
    let class = match classes.get_opt(name).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(format!("VolumeGroupSnapshotClass {name} not found")),
        Err(e) => return Err(e.to_string()),
    };
    let p = ClassParams::parse(&class.parameters).map_err(|e| e.to_string())?;
    let secret = p.secret(kind, &class_vars(c)).map_err(|e| e.to_string())?;
    Ok((p.driver, secret))
}

/// Reconciles one VolumeGroupSnapshotContent of our driver (sidecar role; both modes).
pub async fn sync_group_content(content: &VolumeGroupSnapshotContent, ctx: &Ctx) -> Result<Action> {
    let Some(c) = vgsc_api(ctx).get_opt(&content.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if c.spec.driver != DRIVER {
        return Ok(Action::await_change());
    }
    if c.metadata.deletion_timestamp.is_some() {
        return delete_group_content(c, ctx).await;
    }
    let st = c.status.clone().unwrap_or_default();
    if st.ready_to_use == Some(true) && st.volume_group_snapshot_handle.is_some() {
        return Ok(Action::requeue(RESYNC));
    }
    if let Some(h) = c.spec.source.group_snapshot_handles.clone() {
        let (_, secret) = match class_inputs(&c, SecretKind::GroupSnapshotterGet, ctx).await {
            Ok(x) => x,
            Err(msg) => {
                group_content_error(&c, ctx, "GroupSnapshotContentCheckandUpdateFailed", &msg)
                    .await?;
                return Err(Error::Invalid(msg));
            }
        };
        let secrets = ctx.secrets(secret).await?;
        let res = with_timeout(
            ctx.csi_timeout,
            ctx.driver.get_group_snapshot(
                &h.volume_group_snapshot_handle,
                &h.volume_snapshot_handles,
                &secrets,
            ),
        )
        .await;
        return match res {
            Ok(info) => {
                let st = group_content_status(c.status.as_ref(), &info);
                write_status(&vgsc_api(ctx), &c.name_any(), c.status.as_ref(), &st).await?;
                if info.ready_to_use {
                    Ok(Action::requeue(RESYNC))
                } else {
                    Err(Error::Pending("group snapshot not ready yet".into()))
                }
            }
            Err(e) => {
                let msg = format!(
                    "GetVolumeGroupSnapshot {}: {e}",
                    h.volume_group_snapshot_handle
                );
                group_content_error(&c, ctx, "GroupSnapshotContentCheckandUpdateFailed", &msg)
                    .await?;
                Err(Error::Driver(e))
            }
        };
    }
    create_group_content(c, ctx).await
}

async fn create_group_content(c: VolumeGroupSnapshotContent, ctx: &Ctx) -> Result<Action> {
    let uid = c
        .spec
        .volume_group_snapshot_ref
        .uid
        .clone()
        .unwrap_or_default();
    let handles = c.spec.source.volume_handles.clone().unwrap_or_default();
    if uid.is_empty() {
        return Err(Error::Pending("group content not bound yet".into()));
    }
    if handles.is_empty() {
        let msg = "spec.source names no volumes".to_string();
        group_content_error(&c, ctx, "GroupSnapshotCreationFailed", &msg).await?;
        return Err(Error::Invalid(msg));
    }
    let (params, secret) = match class_inputs(&c, SecretKind::GroupSnapshotter, ctx).await {
        Ok(x) => x,
        Err(msg) => {
            group_content_error(&c, ctx, "GroupSnapshotCreationFailed", &msg).await?;
            return Err(Error::Invalid(msg));
        }
    };
    let secrets = ctx.secrets(secret).await?;
    let c = set_annotations(&vgsc_api(ctx), &c, &[(ANN_GROUP_BEING_CREATED, Some(YES))])
        .await?
        .unwrap_or(c);
    let name = csi_group_snapshot_name(&uid);
    let r = &c.spec.volume_group_snapshot_ref;
    let params = with_create_metadata(
        params,
        true,
        r.namespace.as_deref().unwrap_or_default(),
        r.name.as_deref().unwrap_or_default(),
        &c.name_any(),
    );
    let res = with_timeout(
        ctx.csi_timeout,
        ctx.driver
            .create_group_snapshot(&name, &handles, &params, &secrets),
    )
    .await;
    match res {
        Ok(info) => {
            let st = group_content_status(c.status.as_ref(), &info);
            let c = write_status(&vgsc_api(ctx), &c.name_any(), c.status.as_ref(), &st)
                .await?
                .unwrap_or(c);
            set_annotations(&vgsc_api(ctx), &c, &[(ANN_GROUP_BEING_CREATED, None)]).await?;
            if info.ready_to_use {
                Ok(Action::requeue(RESYNC))
            } else {
                Err(Error::Pending(format!(
                    "group snapshot {} not ready yet",
                    info.group_snapshot_id
                )))
            }
        }
        Err(e) => {
            let msg = format!("CreateVolumeGroupSnapshot {name}: {e}");
            group_content_error(&c, ctx, "GroupSnapshotCreationFailed", &msg).await?;
            if e.is_final()
                && let Some(c) = vgsc_api(ctx).get_opt(&c.name_any()).await?
            {
                set_annotations(&vgsc_api(ctx), &c, &[(ANN_GROUP_BEING_CREATED, None)]).await?;
            }
            Err(Error::Driver(e))
        }
    }
}

async fn group_snapshot_gone(r: &ObjectReference, ctx: &Ctx) -> Result<bool> {
    let (Some(ns), Some(name)) = (&r.namespace, &r.name) else {
        return Ok(true);
    };
    Ok(match vgs_api(ctx, ns).get_opt(name).await? {
        None => true,
        Some(g) => g.uid() != r.uid || g.metadata.deletion_timestamp.is_some(),
    })
}

async fn delete_group_content(c: VolumeGroupSnapshotContent, ctx: &Ctx) -> Result<Action> {
    let mut c = c;
    if c.annotations().contains_key(ANN_GROUP_BEING_CREATED) {
        match create_group_content(c.clone(), ctx).await {
            Ok(_) | Err(Error::Pending(_)) => {}
            Err(Error::Driver(e)) if e.is_final() => {}
            Err(e) => return Err(e),
        }
        c = match vgsc_api(ctx).get_opt(&c.name_any()).await? {
            Some(c) => c,
            None => return Ok(Action::await_change()),
        };
        if c.annotations().contains_key(ANN_GROUP_BEING_CREATED) {
            return Err(Error::Pending(
                "CreateVolumeGroupSnapshot still in flight".into(),
            ));
        }
    }
    let r = &c.spec.volume_group_snapshot_ref;
    let may_delete = r.uid.as_deref().unwrap_or_default().is_empty()
        || c.annotations().contains_key(ANN_GROUP_BEING_DELETED)
        || group_snapshot_gone(r, ctx).await?;
    if !may_delete {
        return Ok(Action::requeue(RESYNC));
    }
    let st = c.status.clone().unwrap_or_default();
    let statik = c.spec.source.group_snapshot_handles.clone();
    let handle = st.volume_group_snapshot_handle.clone().or_else(|| {
        statik
            .as_ref()
            .map(|h| h.volume_group_snapshot_handle.clone())
    });
    if c.spec.deletion_policy == DeletionPolicy::Delete
        && let Some(handle) = handle
    {
        let ids: Vec<String> = match &statik {
            Some(h) => h.volume_snapshot_handles.clone(),
            None => st
                .volume_snapshot_info_list
                .iter()
                .flatten()
                .filter_map(|i| i.snapshot_handle.clone())
                .collect(),
        };
        let a = c.annotations();
        let secret = match (
            a.get(ANN_GROUP_DELETION_SECRET_NAMESPACE),
            a.get(ANN_GROUP_DELETION_SECRET_NAME),
        ) {
            (Some(ns), Some(n)) => Some((ns.clone(), n.clone())),
            _ => None,
        };
        let secrets = ctx.secrets(secret).await?;
        let res = with_timeout(
            ctx.csi_timeout,
            ctx.driver.delete_group_snapshot(&handle, &ids, &secrets),
        )
        .await;
        if let Err(e) = res {
            let msg = format!("DeleteVolumeGroupSnapshot {handle}: {e}");
            group_content_error(&c, ctx, "GroupSnapshotDeleteError", &msg).await?;
            return Err(Error::Driver(e));
        }
        let cleared = VolumeGroupSnapshotContentStatus {
            ready_to_use: Some(false),
            ..Default::default()
        };
        c = write_status(&vgsc_api(ctx), &c.name_any(), c.status.as_ref(), &cleared)
            .await?
            .unwrap_or(c);
    }
    set_finalizers(&vgsc_api(ctx), &c, &[(FIN_GROUP_CONTENT_BOUND, false)]).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selector_honours_match_expressions() {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "db".to_string()),
            ("tier".to_string(), "data".to_string()),
        ]
        .into();
        let req = |key: &str, op: &str, vals: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(vals.iter().map(|s| s.to_string()).collect()),
        };
        let sel = |exprs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some([("app".to_string(), "db".to_string())].into()),
            match_expressions: Some(exprs),
        };
        assert!(selector_matches(
            &sel(vec![req("tier", "In", &["data", "log"])]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(vec![req("tier", "NotIn", &["data"])]),
            &labels
        ));
        assert!(selector_matches(
            &sel(vec![req("tier", "Exists", &[])]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(vec![req("zone", "Exists", &[])]),
            &labels
        ));
        assert!(selector_matches(
            &sel(vec![req("zone", "DoesNotExist", &[])]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(vec![req("tier", "Bogus", &[])]),
            &labels
        ));
    }
}
