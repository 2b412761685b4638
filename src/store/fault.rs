//! Fault-injecting in-memory store for crash tests.
//!
//! A [`FaultStore`] models a disk with a volatile write cache: every mutation is visible to
//! reads at once but becomes durable only at the next `flush`. A test can then ask what a disk
//! might hold after power loss ([`FaultStore::crash_image`]): the durable image plus any subset
//! of the unsynced mutations, applied in order. A shared [`CrashPoint`] stops a whole set of
//! stores (say, a volume and its journal) after a chosen number of mutating operations, so a
//! test can crash a run at every possible point.

use super::{BlockStore, StoreError, check_range};
use parking_lot::RwLock;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A countdown of mutating operations shared by the stores of one simulated machine.
///
/// Each `write_at`, `flush`, `discard` and `resize` on a store holding the point consumes one
/// tick. The call that finds the budget spent fails with [`StoreError::Crashed`] without taking
/// effect, and from then on every call on every store sharing the point fails the same way.
/// Calls rejected for their range consume no tick: they never reach the disk.
#[derive(Debug)]
pub struct CrashPoint {
    budget: u64,
    used: AtomicU64,
    crashed: AtomicBool,
}

impl CrashPoint {
    /// Allows `ops_before_crash` mutating operations; the next one crashes.
    pub fn new(ops_before_crash: u64) -> Self {
        Self {
            budget: ops_before_crash,
            used: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
        }
    }

    /// Never crashes on its own; use it to count the operations of a run with [`Self::ops`].
    pub fn never() -> Self {
        Self::new(u64::MAX)
    }

    /// True once the crash has happened.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::Acquire)
    }

    /// Mutating operations that took effect so far (the crashing one is not counted).
    ///
    /// After a full run under [`CrashPoint::never`] this is the run's operation count `n`;
    /// `CrashPoint::new(k)` for any `k` in `0..n` then crashes that run just before op `k`.
    pub fn ops(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Crashes now, whatever budget is left.
    pub fn crash(&self) {
        self.crashed.store(true, Ordering::Release);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.crashed() {
            Err(StoreError::Crashed)
        } else {
            Ok(())
        }
    }

    /// Consumes one tick, or crashes if none is left.
    fn tick(&self) -> Result<(), StoreError> {
        self.check()?;
        let budget = self.budget;
        match self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < budget).then_some(u + 1)
            }) {
            Ok(_) => Ok(()),
            Err(_) => {
                self.crash();
                Err(StoreError::Crashed)
            }
        }
    }
}

/// One mutation not yet made durable.
#[derive(Debug, Clone)]
enum Mutation {
    Write { offset: u64, data: Vec<u8> },
    Discard { offset: u64, len: u64 },
    Resize(u64),
}

impl Mutation {
    /// Applies the mutation to `img`. In a crash image an earlier resize may have been lost, so
    /// `img` can be shorter than when the mutation was made: a write then extends it (as a
    /// write past the end of a file would) and a discard is clipped.
    fn apply(&self, img: &mut Vec<u8>) {
        match self {
            Mutation::Write { offset, data } => {
                let (o, end) = (*offset as usize, *offset as usize + data.len());
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[o..end].copy_from_slice(data);
            }
            Mutation::Discard { offset, len } => {
                let o = (*offset as usize).min(img.len());
                let end = (*offset as usize + *len as usize).min(img.len());
                img[o..end].fill(0);
            }
            Mutation::Resize(n) => img.resize(*n as usize, 0),
        }
    }
}

struct State {
    /// What survives any crash.
    durable: Vec<u8>,
    /// `durable` with every pending mutation applied: what reads see.
    view: Vec<u8>,
    /// Unsynced mutations, oldest first.
    pending: Vec<Mutation>,
}

/// An in-memory store with a simulated volatile write cache and crash injection.
pub struct FaultStore {
    state: RwLock<State>,
    point: Arc<CrashPoint>,
    /// Reads fail with `EIO` (a medium error) while set; see [`FaultStore::fail_io`].
    fail_reads: AtomicBool,
    /// Writes and discards fail with `EIO` while set.
    fail_writes: AtomicBool,
    /// Flushes fail with `EIO` while set, and lose what they should have made durable.
    fail_flushes: AtomicBool,
}

impl std::fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.read();
        f.debug_struct("FaultStore")
            .field("len", &s.view.len())
            .field("unsynced", &s.pending.len())
            .field("point", &self.point)
            .finish()
    }
}

impl FaultStore {
    /// A zero-filled store of `len` bytes that never crashes.
    pub fn new(len: u64) -> Self {
        Self::with_crash_point(len, Arc::new(CrashPoint::never()))
    }

    /// A store whose durable content is `data` (for example a crash image, to test recovery).
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self::from_vec_with_crash_point(data, Arc::new(CrashPoint::never()))
    }

    /// A zero-filled store of `len` bytes that crashes with `point`.
    pub fn with_crash_point(len: u64, point: Arc<CrashPoint>) -> Self {
        Self::from_vec_with_crash_point(vec![0; len as usize], point)
    }

    /// A store whose durable content is `data` and that crashes with `point`.
    pub fn from_vec_with_crash_point(data: Vec<u8>, point: Arc<CrashPoint>) -> Self {
        Self {
            state: RwLock::new(State {
                view: data.clone(),
                durable: data,
                pending: Vec::new(),
            }),
            point,
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_flushes: AtomicBool::new(false),
        }
    }

    /// Makes reads and/or mutations (writes, discards, resizes) of this store alone fail with
    /// `EIO` from now on, as a disk with bad media does, until called again; flushes still
    /// succeed. Unlike a crash, no other store is affected.
    pub fn fail_io(&self, reads: bool, writes: bool) {
        self.fail_reads.store(reads, Ordering::Release);
        self.fail_writes.store(writes, Ordering::Release);
    }

    /// Makes flushes of this store fail with `EIO` from now on, until called again, the way
    /// Linux reports a failed writeback: the unsynced writes are lost for good (reads still
    /// see them; a later flush that succeeds does not bring them back).
    pub fn fail_flush(&self, fail: bool) {
        self.fail_flushes.store(fail, Ordering::Release);
    }

    fn medium_error(flag: &AtomicBool) -> Result<(), StoreError> {
        if flag.load(Ordering::Acquire) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO).into());
        }
        Ok(())
    }

    /// The crash point this store counts against.
    pub fn crash_point(&self) -> &Arc<CrashPoint> {
        &self.point
    }

    /// The bytes the disk could hold after power loss: the durable image plus each unsynced
    /// mutation, in order, for which `keep` returns true (`keep` is called once per mutation).
    ///
    /// `&mut || false` loses every unsynced mutation, `&mut || true` keeps them all, a random
    /// closure models a cache that persisted some of them. Works after a crash.
    pub fn crash_image(&self, keep: &mut dyn FnMut() -> bool) -> Vec<u8> {
        let s = self.state.read();
        let mut img = s.durable.clone();
        for m in &s.pending {
            if keep() {
                m.apply(&mut img);
            }
        }
        img
    }

    /// The content as of the last flush: `crash_image(&mut || false)`.
    pub fn durable_image(&self) -> Vec<u8> {
        self.crash_image(&mut || false)
    }

    /// The content reads see (durable plus all unsynced mutations), even after a crash.
    pub fn current_image(&self) -> Vec<u8> {
        self.state.read().view.clone()
    }

    /// Mutations made since the last flush.
    pub fn unsynced_count(&self) -> usize {
        self.state.read().pending.len()
    }

    /// Range-checks, ticks and records one mutation, all under the write lock so the pending
    /// list follows tick order.
    fn mutate(
        &self,
        offset: u64,
        len: u64,
        m: impl FnOnce() -> Mutation,
    ) -> Result<(), StoreError> {
        let mut s = self.state.write();
        self.point.check()?;
        check_range(offset, len, s.view.len() as u64)?;
        Self::medium_error(&self.fail_writes)?;
        self.point.tick()?;
        let m = m();
        m.apply(&mut s.view);
        s.pending.push(m);
        Ok(())
    }
}

impl BlockStore for FaultStore {
    fn len(&self) -> u64 {
        self.state.read().view.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let s = self.state.read();
        self.point.check()?;
        check_range(offset, buf.len() as u64, s.view.len() as u64)?;
        Self::medium_error(&self.fail_reads)?;
        let o = offset as usize;
        buf.copy_from_slice(&s.view[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.mutate(offset, buf.len() as u64, || Mutation::Write {
            offset,
            data: buf.to_vec(),
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut s = self.state.write();
        self.point.tick()?;
        if self.fail_flushes.load(Ordering::Acquire) {
            s.pending.clear();
            return Self::medium_error(&self.fail_flushes);
        }
        let State {
            durable, pending, ..
        } = &mut *s;
        for m in pending.drain(..) {
            m.apply(durable);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.mutate(offset, len, || Mutation::Discard { offset, len })
    }

    fn resize(&self, new_len: u64) -> Result<(), StoreError> {
        self.mutate(0, 0, || Mutation::Resize(new_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(s: &FaultStore, offset: u64, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        s.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn injected_medium_errors_fail_only_this_store_and_change_nothing() {
        let (a, b) = (FaultStore::new(16), FaultStore::new(16));
        a.write_at(&[7], 0).unwrap();
        a.fail_io(false, true);
        assert!(
            matches!(a.write_at(&[9], 0), Err(StoreError::Io(e)) if e.raw_os_error() == Some(libc::EIO))
        );
        assert_eq!(
            read(&a, 0, 1),
            [7],
            "reads still work and the failed write left nothing"
        );
        a.flush().unwrap();
        b.write_at(&[1], 0).unwrap();
        a.fail_io(true, false);
        assert!(a.read_at(&mut [0; 1], 0).is_err());
        a.write_at(&[8], 1).unwrap();
        a.fail_io(false, false);
        assert_eq!(read(&a, 0, 2), [7, 8]);
    }

    #[test]
    fn unsynced_writes_are_visible_but_not_durable() {
        let s = FaultStore::new(16);
        s.write_at(&[1, 2, 3], 4).unwrap();
        assert_eq!(read(&s, 4, 3), [1, 2, 3], "reads see the cache");
        assert_eq!(s.unsynced_count(), 1);
        assert_eq!(
            s.crash_image(&mut || false),
            vec![0; 16],
            "lost on power failure"
        );
        assert_eq!(s.durable_image(), vec![0; 16]);
        let mut want = vec![0; 16];
        want[4..7].copy_from_slice(&[1, 2, 3]);
        assert_eq!(s.crash_image(&mut || true), want, "or all persisted");
        assert_eq!(s.current_image(), want);

        s.flush().unwrap();
        assert_eq!(s.unsynced_count(), 0);
        assert_eq!(s.durable_image(), want, "flush makes it durable");
    }

    #[test]
    fn crash_image_applies_kept_mutations_in_order() {
        let s = FaultStore::from_vec(vec![9; 8]);
        s.write_at(&[1; 4], 0).unwrap(); // kept
        s.write_at(&[2; 4], 2).unwrap(); // lost
        s.discard(3, 2).unwrap(); // kept
        s.resize(10).unwrap(); // kept
        s.write_at(&[3], 9).unwrap(); // lost
        assert_eq!(s.unsynced_count(), 5);
        let mut keep = [true, false, true, true, false].into_iter();
        let img = s.crash_image(&mut || keep.next().unwrap());
        assert_eq!(img, [1, 1, 1, 0, 0, 9, 9, 9, 0, 0]);
        assert_eq!(s.durable_image(), vec![9; 8]);
        assert_eq!(s.current_image(), [1, 1, 2, 0, 0, 2, 9, 9, 0, 3]);
    }

    #[test]
    fn write_kept_after_a_lost_grow_extends_the_image() {
        let s = FaultStore::new(4);
        s.resize(8).unwrap();
        s.write_at(&[5; 2], 6).unwrap();
        s.discard(0, 8).unwrap();
        let mut keep = [false, true, true].into_iter();
        assert_eq!(
            s.crash_image(&mut || keep.next().unwrap()),
            [0, 0, 0, 0, 0, 0, 0, 0]
        );
        let mut keep = [false, true, false].into_iter();
        assert_eq!(
            s.crash_image(&mut || keep.next().unwrap()),
            [0, 0, 0, 0, 0, 0, 5, 5]
        );
    }

    #[test]
    fn crash_point_stops_everything_and_the_failing_op_has_no_effect() {
        let point = Arc::new(CrashPoint::new(3));
        let a = FaultStore::with_crash_point(8, point.clone());
        let b = FaultStore::with_crash_point(8, point.clone());
        a.write_at(&[1; 2], 0).unwrap(); // 1
        a.flush().unwrap(); // 2
        assert!(matches!(
            a.write_at(&[1; 9], 0),
            Err(StoreError::OutOfRange { .. })
        ));
        assert_eq!(point.ops(), 2, "a rejected range costs no tick");
        b.write_at(&[2; 2], 0).unwrap(); // 3
        assert!(!point.crashed());

        assert!(matches!(a.write_at(&[7; 2], 4), Err(StoreError::Crashed))); // 4: crashes
        assert!(point.crashed());
        assert_eq!(point.ops(), 3);
        assert_eq!(
            a.current_image(),
            [1, 1, 0, 0, 0, 0, 0, 0],
            "crashing write did not happen"
        );
        assert_eq!(a.unsynced_count(), 0);

        for s in [&a, &b] {
            assert!(matches!(
                s.read_at(&mut [0; 1], 0),
                Err(StoreError::Crashed)
            ));
            assert!(matches!(s.write_at(&[0], 0), Err(StoreError::Crashed)));
            assert!(matches!(s.flush(), Err(StoreError::Crashed)));
            assert!(matches!(s.discard(0, 1), Err(StoreError::Crashed)));
            assert!(matches!(s.resize(1), Err(StoreError::Crashed)));
            assert!(matches!(s.write_at(&[0; 99], 0), Err(StoreError::Crashed)));
        }
        assert_eq!(point.ops(), 3);
        // The images stay inspectable after the crash.
        assert_eq!(a.durable_image(), [1, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.durable_image(), [0; 8], "b never flushed");
        assert_eq!(b.crash_image(&mut || true), [2, 2, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn crash_point_zero_fails_the_first_mutation() {
        let s = FaultStore::with_crash_point(4, Arc::new(CrashPoint::new(0)));
        assert!(matches!(s.flush(), Err(StoreError::Crashed)));
        assert_eq!(s.crash_point().ops(), 0);
    }

    /// The crash-test pattern: count a run's ops, then crash it at every point and check that
    /// the durable image is the state as of the last successful flush.
    #[test]
    fn crashing_a_run_at_every_point() {
        fn run(s: &FaultStore) -> Result<(), StoreError> {
            for i in 0..6u8 {
                s.write_at(&[i + 1], u64::from(i))?;
                if i % 2 == 1 {
                    s.flush()?;
                }
            }
            Ok(())
        }
        let counter = Arc::new(CrashPoint::never());
        run(&FaultStore::with_crash_point(8, counter.clone())).unwrap();
        let n = counter.ops();
        assert_eq!(n, 9);
        for k in 0..n {
            let s = FaultStore::with_crash_point(8, Arc::new(CrashPoint::new(k)));
            assert!(matches!(run(&s), Err(StoreError::Crashed)), "crash at {k}");
            // Ops are w w f w w f w w f: k ops complete k/3 flushes of two writes each.
            let flushed = k as usize / 3 * 2;
            let mut want = vec![0u8; 8];
            for i in 0..flushed.min(6) {
                want[i] = i as u8 + 1;
            }
            assert_eq!(s.durable_image(), want, "crash at {k}");
        }
    }
}
