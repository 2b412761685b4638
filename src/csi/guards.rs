//! Per-object in-flight guards: a second call on a volume, snapshot or name while one is
//! running gets ABORTED (the spec's "operation pending"), so the CO retries later instead of
//! two calls racing on the same agent objects.

use super::status::CsiError;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;

/// The set of keys with a call in flight.
#[derive(Debug, Default, Clone)]
pub struct Guards {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while a call runs; releases its keys on drop.
#[derive(Debug)]
pub struct Held {
    busy: Arc<Mutex<HashSet<String>>>,
    keys: Vec<String>,
}

impl Guards {
    /// Takes every key or none: ABORTED naming the first busy one.
    pub fn take(&self, keys: impl IntoIterator<Item = String>) -> Result<Held, CsiError> {
        let mut keys: Vec<String> = keys.into_iter().collect();
        keys.sort();
        keys.dedup();
        let mut busy = self.busy.lock();
        if let Some(k) = keys.iter().find(|k| busy.contains(*k)) {
            return Err(CsiError::Aborted(format!(
                "an operation on {k} is already in progress; retry later"
            )));
        }
        busy.extend(keys.iter().cloned());
        Ok(Held {
            busy: self.busy.clone(),
            keys,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut busy = self.busy.lock();
        for k in &self.keys {
            busy.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_aborted_until_release() {
        let g = Guards::default();
        let h = g.take(["a".to_string(), "b".to_string()]).unwrap();
        assert!(matches!(
            g.take(["b".to_string()]),
            Err(CsiError::Aborted(_))
        ));
        // All or nothing: "c" was not taken by the failed call.
        g.take(["c".to_string()]).unwrap();
        drop(h);
        g.take(["a".to_string(), "b".to_string()]).unwrap();
    }
}
