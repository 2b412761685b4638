//! CSI object ids and agent object names.
//!
//! The controller keeps no state (ARCHITECTURE.md decision 1), so an id says where its object
//! lives: `vol:NODE:ID` is volume ID of the agent on NODE, `snap:NODE:ID` is FlashCopy mapping ID
//! there. Agent ids are never reused, so a stale id cannot name a newer object. A group snapshot
//! may span nodes: its id `group:NAME` carries the agent-side group name, and the nodes come
//! from the member snapshot ids that every group call carries.
//!
//! CSI names (up to 128 bytes of any text) become agent names (1-63 of `[A-Za-z0-9._-]`) with a
//! one-letter kind prefix: `P.NAME` when NAME fits as it is (readable in `fc lsfcmap`), else
//! `P-HASH` with a 128-bit FNV-1a hash of the name. The separator keeps the two forms apart.

use super::status::CsiError;

/// The spec's limit on ids and names.
pub const MAX_ID_LEN: usize = 128;

/// Prefix of agent volumes that are CSI volumes.
pub const VOLUME_PREFIX: char = 'v';
/// Prefix of snapshot mappings and their target volumes.
pub const SNAPSHOT_PREFIX: char = 's';
/// Prefix of clone and restore mappings (named after the new volume).
pub const CLONE_PREFIX: char = 'c';
/// Prefix of consistency groups of group snapshots.
pub const GROUP_PREFIX: char = 'g';
/// Prefix of deleted volumes kept because snapshots or clones still read through them.
pub const HIDDEN_PREFIX: char = 'x';

/// What an id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An agent volume.
    Volume,
    /// An agent mapping (a snapshot).
    Snapshot,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Volume => "vol",
            Kind::Snapshot => "snap",
        }
    }
}

/// An object on one node's agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeObj {
    /// Node name.
    pub node: String,
    /// The agent's id of the volume or mapping.
    pub id: u64,
}

impl NodeObj {
    /// The CSI id of this object as `kind`.
    pub fn id_string(&self, kind: Kind) -> String {
        format!("{}:{}:{}", kind.tag(), self.node, self.id)
    }
}

/// A volume id.
pub fn volume_id(node: &str, id: u64) -> String {
    NodeObj {
        node: node.into(),
        id,
    }
    .id_string(Kind::Volume)
}

/// A snapshot id.
pub fn snapshot_id(node: &str, id: u64) -> String {
    NodeObj {
        node: node.into(),
        id,
    }
    .id_string(Kind::Snapshot)
}

/// Whether `node` is a usable node name (a Kubernetes node name: DNS subdomain characters).
pub fn valid_node(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 100
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// Parses an id of `kind`; `None` when it is not one of ours (no such object can exist).
pub fn parse(kind: Kind, s: &str) -> Option<NodeObj> {
    if s.len() > MAX_ID_LEN {
        return None;
    }
    let mut it = s.splitn(3, ':');
    let (tag, node, id) = (it.next()?, it.next()?, it.next()?);
    if tag != kind.tag() || !valid_node(node) {
        return None;
    }
    // Strict decimal: no sign, no leading zeros, so one object has exactly one id.
    if id.is_empty()
        || !id.bytes().all(|b| b.is_ascii_digit())
        || (id.len() > 1 && id.starts_with('0'))
    {
        return None;
    }
    Some(NodeObj {
        node: node.into(),
        id: id.parse().ok()?,
    })
}

/// A required id field: empty is INVALID_ARGUMENT, too long is INVALID_ARGUMENT; otherwise the
/// parse result (`None`: not ours, so it names nothing).
pub fn required(field: &'static str, kind: Kind, s: &str) -> Result<Option<NodeObj>, CsiError> {
    if s.is_empty() {
        return Err(CsiError::Missing(field));
    }
    if s.len() > MAX_ID_LEN {
        return Err(CsiError::TooLong {
            field,
            len: s.len(),
        });
    }
    Ok(parse(kind, s))
}

/// A group snapshot id for the agent group name `agent_name`.
pub fn group_id(agent_name: &str) -> String {
    format!("group:{agent_name}")
}

/// The agent group name in a group snapshot id, if it is one of ours.
pub fn parse_group(s: &str) -> Option<&str> {
    let name = s.strip_prefix("group:")?;
    (name.starts_with(GROUP_PREFIX) && is_agent_name(name)).then_some(name)
}

fn is_agent_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.starts_with(|c: char| c.is_ascii_alphabetic())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The agent name for a CSI `name` of the kind `prefix` (see the module docs).
pub fn agent_name(prefix: char, name: &str) -> String {
    let readable = format!("{prefix}.{name}");
    if is_agent_name(&readable) {
        readable
    } else {
        format!("{prefix}-{:032x}", fnv1a_128(name.as_bytes()))
    }
}

/// Whether an agent name is of the kind `prefix`.
pub fn has_prefix(agent_name: &str, prefix: char) -> bool {
    let mut c = agent_name.chars();
    c.next() == Some(prefix) && matches!(c.next(), Some('.' | '-'))
}

/// The name of a deleted volume kept for its dependants.
pub fn hidden_name(id: u64) -> String {
    format!("{HIDDEN_PREFIX}-{id}")
}

/// FNV-1a, 128-bit: stable across releases (agent names are persistent), no dependency.
fn fnv1a_128(data: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    data.iter()
        .fold(OFFSET, |h, b| (h ^ u128::from(*b)).wrapping_mul(PRIME))
}

/// A required CSI name: present, at most 128 bytes, no control characters the spec bans.
pub fn check_name(field: &'static str, name: &str) -> Result<(), CsiError> {
    if name.is_empty() {
        return Err(CsiError::Missing(field));
    }
    if name.len() > MAX_ID_LEN {
        return Err(CsiError::TooLong {
            field,
            len: name.len(),
        });
    }
    let banned =
        |c: char| matches!(c as u32, 0x00..=0x08 | 0x0b | 0x0c | 0x0e..=0x1f | 0x7f..=0x9f);
    if name.chars().any(banned) {
        return Err(CsiError::Invalid(format!(
            "{field} contains a control character"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_parse_strictly() {
        let id = volume_id("node-a", 12);
        assert_eq!(id, "vol:node-a:12");
        assert_eq!(
            parse(Kind::Volume, &id),
            Some(NodeObj {
                node: "node-a".into(),
                id: 12
            })
        );
        assert_eq!(parse(Kind::Snapshot, &id), None, "kind is checked");
        for bad in [
            "",
            "vol",
            "vol:a",
            "vol::1",
            "vol:a:",
            "vol:a:01",
            "vol:a:+1",
            "vol:a:1:2",
            "vol:a b:1",
            "vol:a:18446744073709551616",
            "VOL:a:1",
        ] {
            assert_eq!(parse(Kind::Volume, bad), None, "{bad:?}");
        }
        assert!(matches!(
            required("volume_id", Kind::Volume, ""),
            Err(CsiError::Missing("volume_id"))
        ));
    }

    #[test]
    fn agent_names_are_valid_distinct_and_stable() {
        assert_eq!(agent_name('v', "pvc-1234"), "v.pvc-1234");
        let long = "x".repeat(128);
        let hashed = agent_name('v', &long);
        assert!(hashed.starts_with("v-") && hashed.len() == 34, "{hashed}");
        assert_ne!(agent_name('v', "a/b"), agent_name('v', "a/c"));
        // Stable across builds: persisted names must not change.
        assert_eq!(agent_name('s', "a/b"), agent_name('s', "a/b"));
        assert_eq!(
            format!("{:032x}", fnv1a_128(b"")),
            "6c62272e07bb014262b821756295c58d"
        );
        assert!(has_prefix("v.pvc", 'v') && has_prefix("v-00", 'v'));
        assert!(!has_prefix("vol3", 'v') && !has_prefix("s.x", 'v'));
        assert_eq!(parse_group("group:g.snap"), Some("g.snap"));
        assert_eq!(parse_group("group:v.snap"), None);
        assert_eq!(parse_group("g.snap"), None);
    }

    #[test]
    fn names_follow_the_spec_limits() {
        assert!(check_name("name", &"n".repeat(128)).is_ok());
        assert!(matches!(
            check_name("name", &"n".repeat(129)),
            Err(CsiError::TooLong { .. })
        ));
        assert!(check_name("name", "a\u{7}b").is_err());
        assert!(check_name("name", "tab\tok").is_ok());
    }
}
