//! Rust types for the upstream snapshot kinds (`snapshot.storage.k8s.io/v1`,
//! `groupsnapshot.storage.k8s.io/v1`).
//!
//! Field names and types follow the CRDs shipped in `shared/crds/` exactly; those YAML files stay
//! the installed CRDs (we never generate them), so these types only implement [`kube::Resource`]
//! by hand instead of deriving a schema.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use kube::core::{ClusterResourceScope, NamespaceResourceScope, TypeMeta};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Objects whose `apiVersion`/`kind` we fill before sending them to the API server.
pub trait Typed {
    /// The object with its `apiVersion` and `kind` set.
    fn typed(self) -> Self;
}

macro_rules! upstream_resource {
    ($ty:ident, $group:literal, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                $group.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
        impl Typed for $ty {
            fn typed(mut self) -> Self {
                self.types = Some(TypeMeta::resource::<Self>());
                self
            }
        }
    };
}

/// `deletionPolicy` of contents and classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeletionPolicy {
    /// Delete the storage snapshot with the content object.
    #[default]
    Delete,
    /// Keep the storage snapshot when the content object goes.
    Retain,
}

/// An error recorded on a snapshot or content status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotError {
    /// Human-readable reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the error happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// A `VolumeSnapshot` (namespaced).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeSnapshot {
    /// `apiVersion` and `kind`; [`Typed::typed`] fills them for writes.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub types: Option<TypeMeta>,
    /// Standard metadata.
    pub metadata: ObjectMeta,
    /// What to snapshot.
    pub spec: VolumeSnapshotSpec,
    /// Observed state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeSnapshotStatus>,
}
upstream_resource!(
    VolumeSnapshot,
    "snapshot.storage.k8s.io",
    "VolumeSnapshot",
    "volumesnapshots",
    NamespaceResourceScope
);

/// `VolumeSnapshot.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    /// Exactly one of a PVC (dynamic) or a content (pre-provisioned).
    pub source: VolumeSnapshotSource,
    /// The class; empty means the default class of the PV's driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// `VolumeSnapshot.spec.source`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    /// Dynamic snapshot of this PVC (same namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    /// Pre-provisioned content to bind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

/// `VolumeSnapshot.status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    /// The bound content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// When the storage cut the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Whether a volume can be restored from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Minimum size of a restored volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<Quantity>,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
    /// The group snapshot this one is a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_name: Option<String>,
}

/// A `VolumeSnapshotContent` (cluster-scoped).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeSnapshotContent {
    /// `apiVersion` and `kind`; [`Typed::typed`] fills them for writes.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub types: Option<TypeMeta>,
    /// Standard metadata.
    pub metadata: ObjectMeta,
    /// The storage snapshot and its binding.
    pub spec: VolumeSnapshotContentSpec,
    /// Observed state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeSnapshotContentStatus>,
}
upstream_resource!(
    VolumeSnapshotContent,
    "snapshot.storage.k8s.io",
    "VolumeSnapshotContent",
    "volumesnapshotcontents",
    ClusterResourceScope
);

/// `VolumeSnapshotContent.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    /// The bound snapshot (name, namespace; uid once bound).
    pub volume_snapshot_ref: ObjectReference,
    /// What happens to the storage snapshot when this object is deleted.
    pub deletion_policy: DeletionPolicy,
    /// CSI driver name.
    pub driver: String,
    /// Exactly one of a volume handle (dynamic) or a snapshot handle (pre-provisioned).
    pub source: VolumeSnapshotContentSource,
    /// Block or Filesystem, from the source PV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_mode: Option<String>,
    /// The class used to create it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// `VolumeSnapshotContent.spec.source`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSource {
    /// Pre-provisioned storage snapshot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// Source volume id (dynamic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
}

/// `VolumeSnapshotContent.status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    /// Nanoseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
    /// Whether a volume can be restored from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// The storage snapshot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// Set on group members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
}

/// A `VolumeSnapshotClass` (cluster-scoped; no spec).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClass {
    /// `apiVersion` and `kind`.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub types: Option<TypeMeta>,
    /// Standard metadata (carries the default-class annotation).
    pub metadata: ObjectMeta,
    /// CSI driver name.
    pub driver: String,
    /// Policy copied into contents.
    pub deletion_policy: DeletionPolicy,
    /// Opaque driver parameters plus `csi.storage.k8s.io/` keys.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
}
upstream_resource!(
    VolumeSnapshotClass,
    "snapshot.storage.k8s.io",
    "VolumeSnapshotClass",
    "volumesnapshotclasses",
    ClusterResourceScope
);

/// A `VolumeGroupSnapshot` (namespaced).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeGroupSnapshot {
    /// `apiVersion` and `kind`; [`Typed::typed`] fills them for writes.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub types: Option<TypeMeta>,
    /// Standard metadata.
    pub metadata: ObjectMeta,
    /// What to snapshot.
    pub spec: VolumeGroupSnapshotSpec,
    /// Observed state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeGroupSnapshotStatus>,
}
upstream_resource!(
    VolumeGroupSnapshot,
    "groupsnapshot.storage.k8s.io",
    "VolumeGroupSnapshot",
    "volumegroupsnapshots",
    NamespaceResourceScope
);

/// `VolumeGroupSnapshot.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotSpec {
    /// Exactly one of a PVC selector (dynamic) or a content (pre-provisioned).
    pub source: VolumeGroupSnapshotSource,
    /// The class; empty means the default group class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
}

/// `VolumeGroupSnapshot.spec.source`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotSource {
    /// PVCs of the namespace to snapshot together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Pre-provisioned group content to bind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_content_name: Option<String>,
}

/// `VolumeGroupSnapshot.status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotStatus {
    /// The bound group content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_group_snapshot_content_name: Option<String>,
    /// When the storage cut the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
    /// Whether every member can be restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
}

/// A `VolumeGroupSnapshotContent` (cluster-scoped).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeGroupSnapshotContent {
    /// `apiVersion` and `kind`; [`Typed::typed`] fills them for writes.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub types: Option<TypeMeta>,
    /// Standard metadata.
    pub metadata: ObjectMeta,
    /// The storage group snapshot and its binding.
    pub spec: VolumeGroupSnapshotContentSpec,
    /// Observed state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeGroupSnapshotContentStatus>,
}
upstream_resource!(
    VolumeGroupSnapshotContent,
    "groupsnapshot.storage.k8s.io",
    "VolumeGroupSnapshotContent",
    "volumegroupsnapshotcontents",
    ClusterResourceScope
);

/// `VolumeGroupSnapshotContent.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentSpec {
    /// The bound group snapshot.
    pub volume_group_snapshot_ref: ObjectReference,
    /// What happens to the storage group snapshot when this object is deleted.
    pub deletion_policy: DeletionPolicy,
    /// CSI driver name.
    pub driver: String,
    /// Exactly one of volume handles (dynamic) or group snapshot handles (pre-provisioned).
    pub source: VolumeGroupSnapshotContentSource,
    /// The class used to create it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
}

/// `VolumeGroupSnapshotContent.spec.source`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentSource {
    /// Pre-provisioned group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_handles: Option<GroupSnapshotHandles>,
    /// Source volume ids (dynamic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handles: Option<Vec<String>>,
}

/// `VolumeGroupSnapshotContent.spec.source.groupSnapshotHandles`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotHandles {
    /// The storage group snapshot id.
    pub volume_group_snapshot_handle: String,
    /// The member snapshot ids.
    pub volume_snapshot_handles: Vec<String>,
}

/// `VolumeGroupSnapshotContent.status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentStatus {
    /// When the storage cut the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
    /// Whether every member can be restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// The storage group snapshot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
    /// One entry per member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_info_list: Option<Vec<VolumeSnapshotInfo>>,
}

/// A member of a group content's status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotInfo {
    /// Nanoseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Whether this member can be restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// The member's storage snapshot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// The member's source volume id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
}

/// A `VolumeGroupSnapshotClass` (cluster-scoped; no spec).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotClass {
    /// `apiVersion` and `kind`.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub types: Option<TypeMeta>,
    /// Standard metadata (carries the default-class annotation).
    pub metadata: ObjectMeta,
    /// CSI driver name.
    pub driver: String,
    /// Policy copied into group contents.
    pub deletion_policy: DeletionPolicy,
    /// Opaque driver parameters plus `csi.storage.k8s.io/` keys.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
}
upstream_resource!(
    VolumeGroupSnapshotClass,
    "groupsnapshot.storage.k8s.io",
    "VolumeGroupSnapshotClass",
    "volumegroupsnapshotclasses",
    ClusterResourceScope
);
