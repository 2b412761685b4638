//! StorageClass / VolumeSnapshotClass / VolumeGroupSnapshotClass parameters.
//!
//! | key | values | default | meaning |
//! |---|---|---|---|
//! | `copyRate` | 0-150 | 50 for clones and restores, 0 for snapshots | background copy rate |
//! | `cleanRate` | 0-150 | 50 | cleaning rate when a snapshot is deleted under older ones |
//! | `grainSize` | 64 or 256 (KiB) | the cascade's, else 256 | grain of the mapping |
//! | `incremental` | true/false | false | record changes for a cheap re-copy |
//!
//! Keys under `csi.storage.k8s.io/` belong to the sidecars and are ignored; any other key is
//! refused with INVALID_ARGUMENT naming it, so a typo never silently changes behaviour.

use super::status::CsiError;
use std::collections::HashMap;

/// Parsed parameters; `None` = not given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// `copyRate`.
    pub copy_rate: Option<u32>,
    /// `cleanRate`.
    pub clean_rate: Option<u32>,
    /// `grainSize` in KiB.
    pub grain_kib: Option<u32>,
    /// `incremental`.
    pub incremental: bool,
}

impl Params {
    /// Parses and validates `map`.
    pub fn parse(map: &HashMap<String, String>) -> Result<Self, CsiError> {
        let mut p = Params::default();
        for (k, v) in map {
            let bad = |why: &str| CsiError::Invalid(format!("parameter {k}={v:?}: {why}"));
            match k.as_str() {
                "copyRate" | "cleanRate" => {
                    let r: u32 = v.parse().map_err(|_| bad("expected an integer 0-150"))?;
                    if r > 150 {
                        return Err(bad("expected an integer 0-150"));
                    }
                    if k == "copyRate" {
                        p.copy_rate = Some(r);
                    } else {
                        p.clean_rate = Some(r);
                    }
                }
                "grainSize" => match v.as_str() {
                    "64" => p.grain_kib = Some(64),
                    "256" => p.grain_kib = Some(256),
                    _ => return Err(bad("expected 64 or 256 (KiB)")),
                },
                "incremental" => match v.as_str() {
                    "true" => p.incremental = true,
                    "false" => p.incremental = false,
                    _ => return Err(bad("expected true or false")),
                },
                _ if k.starts_with("csi.storage.k8s.io/") => {}
                _ => {
                    return Err(CsiError::Invalid(format!(
                        "unknown parameter {k:?}: flashcopy.csi.io takes copyRate, cleanRate, grainSize, incremental"
                    )));
                }
            }
        }
        Ok(p)
    }

    /// Whether the snapshot class asks for more than a plain copy-on-write snapshot.
    pub fn customised(&self) -> bool {
        self.copy_rate.is_some() || self.grain_kib.is_some() || self.incremental
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_names_the_bad_one() {
        let p = Params::parse(&map(&[
            ("copyRate", "100"),
            ("grainSize", "64"),
            ("incremental", "true"),
            ("csi.storage.k8s.io/fstype", "ext4"),
        ]))
        .unwrap();
        assert_eq!(p.copy_rate, Some(100));
        assert_eq!(p.grain_kib, Some(64));
        assert!(p.incremental && p.customised());
        for (k, v) in [
            ("copyRate", "151"),
            ("cleanRate", "-1"),
            ("grainSize", "128"),
            ("incremental", "yes"),
            ("copyrate", "1"),
        ] {
            let e = Params::parse(&map(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
        }
    }
}
