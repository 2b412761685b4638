//! Group commit: concurrent copy-on-writes share one round of data syncs and one journal sync.
//!
//! A caller hands in the ops that must become durable and the stores whose data they vouch for.
//! The first caller to find no commit under way becomes the leader: it takes every queued batch,
//! syncs the stores, appends the records, syncs the journal, applies data ops to the engine and
//! wakes the others. Callers that queued meanwhile ride on the next round.

use super::VolumeError;
use crate::engine::{Engine, Op};
use crate::meta::Journal;
use crate::store::BlockStore;
use parking_lot::{Condvar, Mutex, RwLock};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(super) struct Batch {
    pub ops: Vec<Op>,
    pub stores: Vec<Arc<dyn BlockStore>>,
    /// Data-path ops are applied to the engine once durable; control ops were applied already.
    pub apply: bool,
}

#[derive(Default)]
struct State {
    queue: Vec<Batch>,
    enqueued: u64,
    done: u64,
    leading: bool,
    failed: Option<String>,
}

pub(super) struct Committer {
    state: Mutex<State>,
    cv: Condvar,
    journal: Mutex<Journal>,
    checkpoint_after: u64,
    /// Commit rounds (journal syncs) so far.
    pub rounds: AtomicU64,
}

impl Committer {
    pub fn new(journal: Journal, checkpoint_after: u64) -> Self {
        Self {
            state: Mutex::default(),
            cv: Condvar::new(),
            journal: Mutex::new(journal),
            checkpoint_after,
            rounds: AtomicU64::new(0),
        }
    }

    /// Returns once `batch` is durable (and, for data ops, applied to `engine`).
    pub fn commit(&self, engine: &RwLock<Engine>, batch: Batch) -> Result<(), VolumeError> {
        let mut st = self.state.lock();
        if let Some(e) = &st.failed {
            return Err(VolumeError::Poisoned(e.clone()));
        }
        st.queue.push(batch);
        st.enqueued += 1;
        let me = st.enqueued;
        loop {
            if let Some(e) = &st.failed {
                return Err(VolumeError::Poisoned(e.clone()));
            }
            if st.done >= me {
                return Ok(());
            }
            if !st.leading {
                st.leading = true;
                let batches = std::mem::take(&mut st.queue);
                let upto = st.enqueued;
                drop(st);
                let res = self.write_round(engine, batches);
                st = self.state.lock();
                st.leading = false;
                st.done = upto;
                if let Err(e) = res {
                    // The disk state is unknown now: refuse everything until a restart recovers.
                    tracing::error!(error = %e, "metadata commit failed; the pool refuses further changes");
                    st.failed = Some(e.to_string());
                }
                self.cv.notify_all();
                continue;
            }
            self.cv.wait(&mut st);
        }
    }

    fn write_round(&self, engine: &RwLock<Engine>, batches: Vec<Batch>) -> Result<(), VolumeError> {
        // Data first: a split bit may only become durable after the grain it vouches for.
        let mut synced: Vec<*const ()> = Vec::new();
        for s in batches.iter().flat_map(|b| &b.stores) {
            let key = Arc::as_ptr(s) as *const ();
            if !synced.contains(&key) {
                synced.push(key);
                s.flush()?;
            }
        }
        let records: Vec<Vec<u8>> = batches
            .iter()
            .flat_map(|b| &b.ops)
            .map(|op| bincode::serialize(op).expect("ops serialise"))
            .collect();
        let mut journal = self.journal.lock();
        if !records.is_empty() {
            journal.append(&records)?;
            journal.sync()?;
            self.rounds.fetch_add(1, Ordering::Relaxed);
        }
        {
            let mut e = engine.write();
            for op in batches.iter().filter(|b| b.apply).flat_map(|b| &b.ops) {
                if let Err(err) = e.apply(op) {
                    // Data ops are planned under the grain lock; a rejection is a bug, not input.
                    tracing::error!(?op, error = %err, "journalled data op rejected by the engine");
                }
            }
        }
        if journal.journal_bytes() > self.checkpoint_after {
            let bytes = bincode::serialize(&*engine.read()).expect("engine serialises");
            journal.checkpoint(&bytes)?;
        }
        Ok(())
    }

    /// Writes a checkpoint of `engine` now (clean shutdown, after recovery).
    pub fn checkpoint(&self, engine: &RwLock<Engine>) -> Result<(), VolumeError> {
        let mut journal = self.journal.lock();
        let bytes = bincode::serialize(&*engine.read()).expect("engine serialises");
        journal.checkpoint(&bytes)?;
        Ok(())
    }
}
