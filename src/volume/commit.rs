//! Group commit: concurrent copy-on-writes share one round of data syncs and one journal sync.
//!
//! A caller hands in the ops that must become durable and the stores whose data they vouch for.
//! The first caller to find no commit under way becomes the leader: it takes every queued batch,
//! syncs the stores, appends the records, syncs the journal, applies data ops to the engine and
//! wakes the others. Callers that queued meanwhile ride on the next round.

use super::VolumeError;
use crate::engine::{Engine, Op};
use crate::meta::Journal;
use crate::store::{BlockStore, StoreError};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::HashMap;
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
    /// Batches waiting for the next round, with their sequence numbers.
    queue: Vec<(u64, Batch)>,
    enqueued: u64,
    done: u64,
    leading: bool,
    failed: Option<String>,
    /// Batches of finished rounds that failed alone (a data store did not flush), by sequence
    /// number: the index of the store in the batch and its error. Their callers take them out.
    refused: HashMap<u64, (usize, StoreError)>,
}

/// Why a batch did not commit.
pub(super) enum CommitError {
    /// `stores[store]` of the batch failed to flush; nothing of the batch was committed and
    /// the rest of the pool goes on.
    Refused {
        /// Index into the batch's stores.
        store: usize,
        /// The store's error.
        source: StoreError,
    },
    /// The pool refuses changes (metadata failure).
    Pool(VolumeError),
}

impl From<CommitError> for VolumeError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Refused { source, .. } => VolumeError::Store(source),
            CommitError::Pool(e) => e,
        }
    }
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
        Ok(self.commit_or_refuse(engine, batch)?)
    }

    /// [`Committer::commit`], telling which store refused the batch.
    pub fn commit_or_refuse(
        &self,
        engine: &RwLock<Engine>,
        batch: Batch,
    ) -> Result<(), CommitError> {
        let poisoned = |e: &String| CommitError::Pool(VolumeError::Poisoned(e.clone()));
        let mut st = self.state.lock();
        if let Some(e) = &st.failed {
            return Err(poisoned(e));
        }
        st.enqueued += 1;
        let me = st.enqueued;
        st.queue.push((me, batch));
        loop {
            if let Some((store, source)) = st.refused.remove(&me) {
                return Err(CommitError::Refused { store, source });
            }
            if let Some(e) = &st.failed {
                return Err(poisoned(e));
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
                match res {
                    Ok(refused) => st.refused.extend(refused),
                    Err(e) => {
                        // The journal's state is unknown now: refuse everything until a restart
                        // recovers.
                        tracing::error!(error = %e, "metadata commit failed; the pool refuses further changes");
                        st.failed = Some(e.to_string());
                    }
                }
                self.cv.notify_all();
                continue;
            }
            self.cv.wait(&mut st);
        }
    }

    /// One round; returns the batches refused because a store of theirs failed to flush.
    fn write_round(
        &self,
        engine: &RwLock<Engine>,
        batches: Vec<(u64, Batch)>,
    ) -> Result<HashMap<u64, (usize, StoreError)>, VolumeError> {
        // Data first: a split bit may only become durable after the grain it vouches for.
        let mut flushed: Vec<(*const (), Option<String>)> = Vec::new();
        for s in batches.iter().flat_map(|(_, b)| &b.stores) {
            let key = Arc::as_ptr(s) as *const ();
            if !flushed.iter().any(|(k, _)| *k == key) {
                flushed.push((key, s.flush().err().map(|e| e.to_string())));
            }
        }
        // A store that failed to flush holds unknown data (and the kernel may have dropped the
        // pages, so a later flush proves nothing): the ops vouching for it are dropped and
        // their callers get the error. The grains stay unsplit, so a retry copies them again.
        // Nothing else depends on them: each batch holds its own grain locks. Control ops carry
        // no stores and were applied already, so a batch refused here is always a data batch.
        let failure = |b: &Batch| {
            b.stores.iter().enumerate().find_map(|(i, s)| {
                let key = Arc::as_ptr(s) as *const ();
                flushed
                    .iter()
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, e)| e.clone())
                    .map(|e| (i, e))
            })
        };
        let mut refused = HashMap::new();
        let batches: Vec<Batch> = batches
            .into_iter()
            .filter_map(|(seq, b)| match failure(&b) {
                Some((i, e)) => {
                    tracing::error!(error = %e, "a data store failed to flush; its grain copies are dropped");
                    refused.insert(seq, (i, StoreError::Io(std::io::Error::other(e))));
                    None
                }
                None => Some(b),
            })
            .collect();
        if batches.is_empty() {
            return Ok(refused);
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
        Ok(refused)
    }

    /// Writes a checkpoint of `engine` now (clean shutdown, after recovery).
    pub fn checkpoint(&self, engine: &RwLock<Engine>) -> Result<(), VolumeError> {
        let mut journal = self.journal.lock();
        let bytes = bincode::serialize(&*engine.read()).expect("engine serialises");
        journal.checkpoint(&bytes)?;
        Ok(())
    }
}
