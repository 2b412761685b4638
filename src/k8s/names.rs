//! The exact strings and generated names of the snapshot contract (K8S-SNAPSHOTS.md §A.6, §A.7),
//! the retry backoff (§A.10) and class parameter handling (§A.11). Pure functions only.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// Our CSI driver name.
pub const DRIVER: &str = "flashcopy.csi.io";

/// VSC finalizer: the content is bound to a snapshot.
pub const FIN_CONTENT_BOUND: &str =
    "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
/// VS finalizer: bound to a Delete-policy content; kept until the content object is gone.
pub const FIN_SNAPSHOT_BOUND: &str =
    "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";
/// VS finalizer: held while a pending PVC may restore from it.
pub const FIN_SNAPSHOT_AS_SOURCE: &str =
    "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection";
/// Member VS finalizer: held while the parent group snapshot exists.
pub const FIN_SNAPSHOT_IN_GROUP: &str =
    "snapshot.storage.kubernetes.io/volumesnapshot-in-group-protection";
/// PVC finalizer: a snapshot of it is being cut.
pub const FIN_PVC_AS_SOURCE: &str = "snapshot.storage.kubernetes.io/pvc-as-source-protection";
/// VGSC finalizer.
pub const FIN_GROUP_CONTENT_BOUND: &str =
    "groupsnapshot.storage.kubernetes.io/volumegroupsnapshotcontent-bound-protection";
/// VGS finalizer.
pub const FIN_GROUP_BOUND: &str =
    "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-bound-protection";

/// VSC annotation: a CreateSnapshot call may be in flight.
pub const ANN_BEING_CREATED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-created";
/// VSC annotation: the snapshot is being deleted.
pub const ANN_BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";
/// VGSC annotation: a CreateVolumeGroupSnapshot call may be in flight.
pub const ANN_GROUP_BEING_CREATED: &str =
    "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-being-created";
/// VGSC annotation: the group snapshot is being deleted.
pub const ANN_GROUP_BEING_DELETED: &str =
    "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-being-deleted";
/// VSC annotation: deletion secret name.
pub const ANN_DELETION_SECRET_NAME: &str = "snapshot.storage.kubernetes.io/deletion-secret-name";
/// VSC annotation: deletion secret namespace.
pub const ANN_DELETION_SECRET_NAMESPACE: &str =
    "snapshot.storage.kubernetes.io/deletion-secret-namespace";
/// VGSC annotation: group deletion secret name.
pub const ANN_GROUP_DELETION_SECRET_NAME: &str =
    "groupsnapshot.storage.kubernetes.io/deletion-secret-name";
/// VGSC annotation: group deletion secret namespace.
pub const ANN_GROUP_DELETION_SECRET_NAMESPACE: &str =
    "groupsnapshot.storage.kubernetes.io/deletion-secret-namespace";
/// Member VSC annotation: its group snapshot handle (never CreateSnapshot for it).
pub const ANN_MEMBER_GROUP_HANDLE: &str = "groupsnapshot.storage.k8s.io/volumeGroupSnapshotHandle";
/// Class annotation: the default class of its driver.
pub const ANN_DEFAULT_CLASS: &str = "snapshot.storage.kubernetes.io/is-default-class";
/// Group class annotation: the default group class of its driver.
pub const ANN_GROUP_DEFAULT_CLASS: &str = "groupsnapshot.storage.kubernetes.io/is-default-class";
/// The value the being-created/being-deleted annotations carry.
pub const YES: &str = "yes";

/// Dynamic content name of a snapshot.
pub fn content_name(snapshot_uid: &str) -> String {
    format!("snapcontent-{snapshot_uid}")
}

/// Dynamic group content name of a group snapshot.
pub fn group_content_name(group_uid: &str) -> String {
    format!("groupsnapcontent-{group_uid}")
}

/// CSI CreateSnapshot name.
pub fn csi_snapshot_name(snapshot_uid: &str) -> String {
    format!("snapshot-{snapshot_uid}")
}

/// CSI CreateVolumeGroupSnapshot name.
pub fn csi_group_snapshot_name(group_uid: &str) -> String {
    format!("groupsnapshot-{group_uid}")
}

fn member_hash(group_uid: &str, volume_handle: &str) -> String {
    let digest = Sha256::digest(format!("{group_uid}{volume_handle}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Member VolumeSnapshot name: `snapshot-<hex sha256(group UID + volume handle)>`.
pub fn member_snapshot_name(group_uid: &str, volume_handle: &str) -> String {
    format!("snapshot-{}", member_hash(group_uid, volume_handle))
}

/// Member VolumeSnapshotContent name: `snapcontent-<hex sha256(group UID + volume handle)>`.
pub fn member_content_name(group_uid: &str, volume_handle: &str) -> String {
    format!("snapcontent-{}", member_hash(group_uid, volume_handle))
}

/// CreateSnapshot parameter added like upstream's `--extra-create-metadata` (§A.7): the
/// VolumeSnapshot's name.
pub const PARAM_SNAPSHOT_NAME: &str = "csi.storage.k8s.io/volumesnapshot/name";
/// Extra metadata: the VolumeSnapshot's namespace.
pub const PARAM_SNAPSHOT_NAMESPACE: &str = "csi.storage.k8s.io/volumesnapshot/namespace";
/// Extra metadata: the VolumeSnapshotContent's name.
pub const PARAM_CONTENT_NAME: &str = "csi.storage.k8s.io/volumesnapshotcontent/name";
/// Extra metadata of CreateVolumeGroupSnapshot: the VolumeGroupSnapshot's name.
pub const PARAM_GROUP_SNAPSHOT_NAME: &str = "csi.storage.k8s.io/volumegroupsnapshot/name";
/// Extra metadata: the VolumeGroupSnapshot's namespace.
pub const PARAM_GROUP_SNAPSHOT_NAMESPACE: &str = "csi.storage.k8s.io/volumegroupsnapshot/namespace";
/// Extra metadata: the VolumeGroupSnapshotContent's name.
pub const PARAM_GROUP_CONTENT_NAME: &str = "csi.storage.k8s.io/volumegroupsnapshotcontent/name";

/// Adds the extra-create-metadata parameters (§A.7) to the class's driver parameters.
pub fn with_create_metadata(
    mut params: BTreeMap<String, String>,
    group: bool,
    snapshot_namespace: &str,
    snapshot_name: &str,
    content_name: &str,
) -> BTreeMap<String, String> {
    let (n, ns, c) = if group {
        (
            PARAM_GROUP_SNAPSHOT_NAME,
            PARAM_GROUP_SNAPSHOT_NAMESPACE,
            PARAM_GROUP_CONTENT_NAME,
        )
    } else {
        (
            PARAM_SNAPSHOT_NAME,
            PARAM_SNAPSHOT_NAMESPACE,
            PARAM_CONTENT_NAME,
        )
    };
    params.insert(n.into(), snapshot_name.into());
    params.insert(ns.into(), snapshot_namespace.into());
    params.insert(c.into(), content_name.into());
    params
}

/// Every reconciled object is looked at again after this long even without a change, like
/// upstream's `--resync-period` (§A.10): a missed watch event costs at most this delay.
pub const RESYNC: Duration = Duration::from_secs(15 * 60);

/// First retry delay.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Delay before retry number `failures` (1 = first failure): 1 s doubling to 5 min.
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    (BACKOFF_START * (1u32 << shift)).min(BACKOFF_MAX)
}

/// Prefix of the reserved parameter keys.
pub const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

/// Which secret a class parameter pair names (§A.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// CreateSnapshot / DeleteSnapshot.
    Snapshotter,
    /// ListSnapshots on static contents.
    SnapshotterList,
    /// Group create/delete.
    GroupSnapshotter,
    /// GetVolumeGroupSnapshot on static group contents.
    GroupSnapshotterGet,
}

impl SecretKind {
    fn key(self) -> &'static str {
        match self {
            SecretKind::Snapshotter => "snapshotter-secret",
            SecretKind::SnapshotterList => "snapshotter-list-secret",
            SecretKind::GroupSnapshotter => "group-snapshotter-secret",
            SecretKind::GroupSnapshotterGet => "group-snapshotter-get-secret",
        }
    }
    const ALL: [SecretKind; 4] = [
        SecretKind::Snapshotter,
        SecretKind::SnapshotterList,
        SecretKind::GroupSnapshotter,
        SecretKind::GroupSnapshotterGet,
    ];
}

/// A class parameter problem; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A `csi.storage.k8s.io/` key we do not know.
    #[error("unknown reserved parameter {0:?}")]
    UnknownReserved(String),
    /// Only one of the name/namespace pair is given.
    #[error("parameter {0:?} needs its pair {1:?}")]
    Unpaired(String, String),
    /// A template names a variable not allowed there.
    #[error("parameter {key:?}: template {value:?} uses an unknown or disallowed variable")]
    BadTemplate {
        /// The parameter key.
        key: String,
        /// Its value.
        value: String,
    },
    /// The resolved secret name or namespace is not a DNS name.
    #[error("parameter {key:?} resolves to {value:?}, which is not a valid DNS name")]
    NotDns {
        /// The parameter key.
        key: String,
        /// The resolved value.
        value: String,
    },
}

/// A class's parameters split into what goes to the driver and the secret templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassParams {
    /// Parameters passed through to the driver (reserved keys removed).
    pub driver: BTreeMap<String, String>,
    secrets: Vec<(SecretKind, String, String)>,
}

/// Names a template may use (`${...}`) in secret names and namespaces.
#[derive(Debug, Clone, Default)]
pub struct TemplateVars {
    /// `volumesnapshotcontent.name` or `volumegroupsnapshotcontent.name`.
    pub content_name: String,
    /// `volumesnapshot.namespace` or `volumegroupsnapshot.namespace`.
    pub snapshot_namespace: String,
    /// `volumesnapshot.name` or `volumegroupsnapshot.name` (names only).
    pub snapshot_name: String,
    /// Whether these are group variables.
    pub group: bool,
}

impl ClassParams {
    /// Splits and validates class parameters: every reserved key must be a known secret pair
    /// and both halves of a pair must be present.
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self, ParamError> {
        let mut out = ClassParams::default();
        for (k, v) in params {
            match k.strip_prefix(RESERVED_PREFIX) {
                None => {
                    out.driver.insert(k.clone(), v.clone());
                }
                Some(rest) => {
                    let known = SecretKind::ALL.iter().any(|s| {
                        rest == format!("{}-name", s.key())
                            || rest == format!("{}-namespace", s.key())
                    });
                    if !known {
                        return Err(ParamError::UnknownReserved(k.clone()));
                    }
                }
            }
        }
        for kind in SecretKind::ALL {
            let nk = format!("{RESERVED_PREFIX}{}-name", kind.key());
            let nsk = format!("{RESERVED_PREFIX}{}-namespace", kind.key());
            match (params.get(&nk), params.get(&nsk)) {
                (Some(n), Some(ns)) => out.secrets.push((kind, n.clone(), ns.clone())),
                (None, None) => {}
                (Some(_), None) => return Err(ParamError::Unpaired(nk, nsk)),
                (None, Some(_)) => return Err(ParamError::Unpaired(nsk, nk)),
            }
        }
        Ok(out)
    }

    /// The resolved `(namespace, name)` of a secret, if the class names one.
    pub fn secret(
        &self,
        kind: SecretKind,
        vars: &TemplateVars,
    ) -> Result<Option<(String, String)>, ParamError> {
        let Some((_, name, ns)) = self.secrets.iter().find(|(k, _, _)| *k == kind) else {
            return Ok(None);
        };
        let key = |suffix: &str| format!("{RESERVED_PREFIX}{}-{suffix}", kind.key());
        let ns = expand(&key("namespace"), ns, vars, false)?;
        let name = expand(&key("name"), name, vars, true)?;
        Ok(Some((ns, name)))
    }
}

fn expand(
    key: &str,
    value: &str,
    vars: &TemplateVars,
    is_name: bool,
) -> Result<String, ParamError> {
    let (content, snap) = if vars.group {
        ("volumegroupsnapshotcontent", "volumegroupsnapshot")
    } else {
        ("volumesnapshotcontent", "volumesnapshot")
    };
    let bad = || ParamError::BadTemplate {
        key: key.into(),
        value: value.into(),
    };
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').ok_or_else(bad)? + start;
        let var = &rest[start + 2..end];
        let val = if var == format!("{content}.name") {
            &vars.content_name
        } else if var == format!("{snap}.namespace") {
            &vars.snapshot_namespace
        } else if is_name && var == format!("{snap}.name") {
            &vars.snapshot_name
        } else {
            return Err(bad());
        };
        out.push_str(val);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    if !is_dns_subdomain(&out) {
        return Err(ParamError::NotDns {
            key: key.into(),
            value: out,
        });
    }
    Ok(out)
}

/// RFC 1123 subdomain: lowercase alphanumerics, '-' and '.', alphanumeric at both ends, ≤ 253.
pub fn is_dns_subdomain(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn member_names_are_sha256_of_group_uid_and_handle() {
        // sha256("abc") is the FIPS 180-2 test vector.
        assert_eq!(
            member_snapshot_name("a", "bc"),
            "snapshot-ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            member_content_name("ab", "c"),
            "snapcontent-ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes() {
        let secs: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn reserved_keys_are_stripped_and_checked() {
        let p = ClassParams::parse(&map(&[
            ("pool", "fast"),
            (
                "csi.storage.k8s.io/snapshotter-secret-name",
                "s-${volumesnapshot.name}",
            ),
            (
                "csi.storage.k8s.io/snapshotter-secret-namespace",
                "${volumesnapshot.namespace}",
            ),
        ]))
        .unwrap();
        assert_eq!(p.driver, map(&[("pool", "fast")]));
        let vars = TemplateVars {
            content_name: "snapcontent-1".into(),
            snapshot_namespace: "ns1".into(),
            snapshot_name: "db".into(),
            group: false,
        };
        assert_eq!(
            p.secret(SecretKind::Snapshotter, &vars).unwrap(),
            Some(("ns1".into(), "s-db".into()))
        );
        assert_eq!(p.secret(SecretKind::SnapshotterList, &vars).unwrap(), None);

        let err = ClassParams::parse(&map(&[("csi.storage.k8s.io/fstype", "ext4")])).unwrap_err();
        assert_eq!(
            err,
            ParamError::UnknownReserved("csi.storage.k8s.io/fstype".into())
        );
        let err = ClassParams::parse(&map(&[("csi.storage.k8s.io/snapshotter-secret-name", "x")]))
            .unwrap_err();
        assert!(matches!(err, ParamError::Unpaired(..)), "{err}");
        // A namespace may not use the snapshot's name.
        let p = ClassParams::parse(&map(&[
            ("csi.storage.k8s.io/snapshotter-secret-name", "x"),
            (
                "csi.storage.k8s.io/snapshotter-secret-namespace",
                "${volumesnapshot.name}",
            ),
        ]))
        .unwrap();
        assert!(matches!(
            p.secret(SecretKind::Snapshotter, &vars),
            Err(ParamError::BadTemplate { .. })
        ));
        let p = ClassParams::parse(&map(&[
            ("csi.storage.k8s.io/snapshotter-secret-name", "Bad_Name"),
            ("csi.storage.k8s.io/snapshotter-secret-namespace", "ns"),
        ]))
        .unwrap();
        assert!(matches!(
            p.secret(SecretKind::Snapshotter, &vars),
            Err(ParamError::NotDns { .. })
        ));
    }
}
