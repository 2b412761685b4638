//! Our CRDs: FlashCopy mappings and consistency groups as cluster-scoped objects mirroring the
//! node agents, so `kubectl get fcmap` reads like `lsfcmap`. These Rust types are the source of
//! the manifests: `flashcopy-csi crd` prints them.

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which agent object a FlashCopyMapping mirrors.
// Printer columns repeat `type_` and friends by design; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "flashcopy.csi.io",
    version = "v1alpha1",
    kind = "FlashCopyMapping",
    shortname = "fcmap",
    category = "flashcopy",
    status = "FlashCopyMappingStatus",
    doc = "A FlashCopy mapping of a node agent (read-only mirror written by kube-sync).",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "ID", type_ = "integer", json_path = ".spec.id"),
    printcolumn(name = "Name", type_ = "string", json_path = ".status.name"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.target"),
    printcolumn(name = "Group", type_ = "string", json_path = ".status.group"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Progress", type_ = "integer", json_path = ".status.progress"),
    printcolumn(name = "CopyRate", type_ = "integer", json_path = ".status.copyRate"),
    printcolumn(
        name = "CleanRate",
        type_ = "integer",
        json_path = ".status.cleanRate",
        priority = 1
    ),
    printcolumn(
        name = "Grain",
        type_ = "integer",
        json_path = ".status.grainSize",
        priority = 1
    ),
    printcolumn(
        name = "Incremental",
        type_ = "boolean",
        json_path = ".status.incremental",
        priority = 1
    ),
    printcolumn(
        name = "Autodelete",
        type_ = "boolean",
        json_path = ".status.autodelete",
        priority = 1
    ),
    printcolumn(name = "StartTime", type_ = "date", json_path = ".status.startTime")
)]
#[serde(rename_all = "camelCase")]
pub struct FlashCopyMappingSpec {
    /// The node whose agent holds the mapping.
    pub node: String,
    /// The mapping's id on that agent.
    pub id: u64,
}

/// What the agent reports about a mapping (`lsfcmap` fields).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlashCopyMappingStatus {
    /// Mapping name (fcmap<id> by default).
    pub name: String,
    /// Source volume name.
    pub source: String,
    /// Target volume name.
    pub target: String,
    /// Consistency group name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// FlashCopy mapping state.
    pub state: MappingState,
    /// Background copy progress, percent.
    pub progress: u8,
    /// Background copy rate, 0–150 (0 = snapshot, no background copy).
    pub copy_rate: u8,
    /// Cleaning rate, 0–150.
    pub clean_rate: u8,
    /// Grain size in KiB (64 or 256).
    pub grain_size: u32,
    /// Whether restarts copy only changed grains.
    pub incremental: bool,
    /// Whether the mapping deletes itself when the copy completes.
    pub autodelete: bool,
    /// When the mapping was last started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DateTime>")]
    pub start_time: Option<String>,
}

/// FlashCopy mapping states, as `lsfcmap` prints them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum MappingState {
    #[default]
    IdleOrCopied,
    Preparing,
    Prepared,
    Copying,
    Stopping,
    Stopped,
    Suspended,
}

/// Consistency group states: the mapping states plus `empty`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum GroupState {
    #[default]
    Empty,
    IdleOrCopied,
    Preparing,
    Prepared,
    Copying,
    Stopping,
    Stopped,
    Suspended,
}

/// An RFC 3339 time in the schema (`format: date-time`), a plain string in Rust.
#[derive(JsonSchema)]
#[schemars(transparent)]
#[allow(dead_code)]
struct DateTime(#[schemars(with = "String", extend("format" = "date-time"))] String);

/// Which agent object a FlashCopyConsistencyGroup mirrors.
// Printer columns repeat `type_` and friends by design; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "flashcopy.csi.io",
    version = "v1alpha1",
    kind = "FlashCopyConsistencyGroup",
    shortname = "fcconsistgrp",
    category = "flashcopy",
    status = "FlashCopyConsistencyGroupStatus",
    doc = "A FlashCopy consistency group of a node agent (read-only mirror written by kube-sync).",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "ID", type_ = "integer", json_path = ".spec.id"),
    printcolumn(name = "Name", type_ = "string", json_path = ".status.name"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Mappings", type_ = "string", json_path = ".status.mappings"),
    printcolumn(
        name = "Autodelete",
        type_ = "boolean",
        json_path = ".status.autodelete",
        priority = 1
    ),
    printcolumn(name = "StartTime", type_ = "date", json_path = ".status.startTime")
)]
#[serde(rename_all = "camelCase")]
pub struct FlashCopyConsistencyGroupSpec {
    /// The node whose agent holds the group.
    pub node: String,
    /// The group's id on that agent.
    pub id: u64,
}

/// What the agent reports about a consistency group (`lsfcconsistgrp` fields).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlashCopyConsistencyGroupStatus {
    /// The group's name (fccstgrp<id> by default).
    pub name: String,
    /// FlashCopy consistency group state.
    pub state: GroupState,
    /// Names of the member mappings.
    #[serde(default)]
    pub mappings: Vec<String>,
    /// The group is deleted when its last mapping leaves.
    pub autodelete: bool,
    /// Latest start time of the members (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DateTime>")]
    pub start_time: Option<String>,
}

/// Both CRDs as one multi-document YAML stream.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "---\n{}---\n{}",
        serde_yaml::to_string(&FlashCopyMapping::crd())?,
        serde_yaml::to_string(&FlashCopyConsistencyGroup::crd())?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_are_cluster_scoped_with_short_names_and_lsfcmap_columns() {
        let m = FlashCopyMapping::crd();
        assert_eq!(
            m.metadata.name.as_deref(),
            Some("flashcopymappings.flashcopy.csi.io")
        );
        assert_eq!(m.spec.scope, "Cluster");
        assert_eq!(m.spec.names.short_names, Some(vec!["fcmap".to_string()]));
        let v = &m.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| (c.name.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(cols[0], ("Node", ".spec.node"));
        assert_eq!(cols[1], ("ID", ".spec.id"));
        assert!(cols.contains(&("CopyRate", ".status.copyRate")));
        assert!(cols.contains(&("Grain", ".status.grainSize")));
        assert!(cols.contains(&("StartTime", ".status.startTime")));
        let g = FlashCopyConsistencyGroup::crd();
        assert_eq!(g.spec.scope, "Cluster");
        assert_eq!(
            g.spec.names.short_names,
            Some(vec!["fcconsistgrp".to_string()])
        );

        let yaml = crd_yaml().unwrap();
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(serde_yaml::Value::deserialize)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[1]["spec"]["names"]["kind"],
            "FlashCopyConsistencyGroup"
        );
    }
}
