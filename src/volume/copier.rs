//! Background copy and cleaning (FLASHCOPY.md §3.7, §5): a batch of grains per step, under their
//! grain locks until their marks are applied, with the same durability order as a copy-on-write,
//! paced by a token bucket.

use super::{Batch, CopyKind, Pool, VolumeError};
use crate::engine::{MapId, MapState, Op, rate_bytes_per_sec};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Largest extent of adjacent grains copied with one read and one write.
const EXTENT_BYTES: u64 = 1 << 20;

/// Most bytes one background or cleaning step copies before its commit round.
pub const BATCH_BYTES: u64 = 16 << 20;

/// The outcome of one background or cleaning step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A grain was handled; continue from this cursor. `bytes` were copied.
    Copied {
        /// Where the next step should look.
        next: u64,
        /// Bytes copied in this step.
        bytes: u64,
    },
    /// Nothing left: the mapping completed (or finished cleaning) and changed state.
    Finished,
    /// Nothing to do now (wrong state, or waiting for dependants to complete).
    Idle,
}

impl Pool {
    /// One background-copy step of a copying mapping: copies the unsplit grains found from
    /// `cursor` upwards, up to [`BATCH_BYTES`], and makes them durable in one commit round.
    /// Applies `CopyComplete` once every grain is split and no dependant remains.
    pub fn background_step(&self, map: MapId, cursor: u64) -> Result<Step, VolumeError> {
        self.background_step_max(map, cursor, BATCH_BYTES)
    }

    fn background_step_max(&self, map: MapId, cursor: u64, max: u64) -> Result<Step, VolumeError> {
        let step = self
            .copy_batch(map, MapState::Copying, cursor, true, max, |e, g| {
                e.plan_background(map, g)
            })
            .map_err(|e| self.copy_failed(map, CopyKind::Background, e))?;
        if let Step::Copied { bytes, .. } = step {
            self.stats
                .background_grains
                .fetch_add(bytes.div_ceil(self.grain_bytes(map)), Ordering::Relaxed);
            return Ok(step);
        }
        self.complete_if_ready(map)
    }

    /// One cleaning step of a stopping mapping, scanning down from `cursor`; as
    /// [`Pool::background_step`]. Applies `CleanComplete` when no dependant needs anything
    /// from the target any more.
    pub fn clean_step(&self, map: MapId, cursor: u64) -> Result<Step, VolumeError> {
        self.clean_step_max(map, cursor, BATCH_BYTES)
    }

    fn clean_step_max(&self, map: MapId, cursor: u64, max: u64) -> Result<Step, VolumeError> {
        let step = self
            .copy_batch(map, MapState::Stopping, cursor, false, max, |e, g| {
                e.plan_clean(map, g)
            })
            .map_err(|e| self.copy_failed(map, CopyKind::Cleaning, e))?;
        if let Step::Copied { bytes, .. } = step {
            self.stats
                .clean_grains
                .fetch_add(bytes.div_ceil(self.grain_bytes(map)), Ordering::Relaxed);
            return Ok(step);
        }
        // Checked and applied under the control lock: another step of the same mapping may
        // finish it first.
        let _c = self.control.lock();
        let stopping = self
            .engine
            .read()
            .mapping(map)
            .is_some_and(|m| m.state == MapState::Stopping);
        if stopping && !self.engine.read().needs_cleaning(map) {
            self.control_locked(&[Op::CleanComplete { map }])?;
            return Ok(Step::Finished);
        }
        Ok(Step::Idle)
    }

    fn grain_bytes(&self, map: MapId) -> u64 {
        self.engine
            .read()
            .mapping(map)
            .map_or(1, |m| m.grain.bytes())
    }

    /// Copies a batch of grains chosen by `plan` (from `cursor`, upwards or downwards), then
    /// commits all their marks in one round. The gate is held shared throughout, so no control
    /// op changes the cascade meanwhile, and every grain of the batch stays locked until its
    /// mark is applied: a write (or another copy) plans under a grain's lock from the split
    /// bits it sees there, and those must not change before it has run its copies. Otherwise a
    /// write could plan a copy-on-write of the source into the target, this batch's mark could
    /// appear, a second write that no longer needs a copy could change the source, and the
    /// first write's copy would carry that change into the target's point in time.
    fn copy_batch(
        &self,
        map: MapId,
        state: MapState,
        cursor: u64,
        upwards: bool,
        max_bytes: u64,
        plan: impl Fn(&crate::engine::Engine, u64) -> Option<crate::engine::GrainPlan>,
    ) -> Result<Step, VolumeError> {
        let _gate = self.gate.read();
        let (domain, gb, grains) = {
            let e = self.engine.read();
            let m = e
                .mapping(map)
                .ok_or(crate::engine::EngineError::NoSuchMapping(map))?;
            if m.state != state {
                return Ok(Step::Idle);
            }
            let Some((domain, _)) = e.lock_domain(m.target) else {
                return Ok(Step::Idle);
            };
            (domain, m.grain.bytes(), m.grains())
        };
        let run_len = (EXTENT_BYTES / gb).max(1);
        // The batch: from each grain the plan picks, a run of adjacent grains in the scan
        // direction (copied as one extent where their plans allow it), until the runs hold
        // `max_bytes` of grains to copy. Chosen without grain locks; each grain is planned
        // again under its lock below.
        let (runs, next) = {
            let e = self.engine.read();
            let (mut runs, mut next, mut todo) = (Vec::new(), cursor, 0u64);
            while todo < max_bytes {
                let Some(g0) = plan(&e, next).map(|p| p.grain) else {
                    break;
                };
                // The engine does not see this batch's marks yet: stop before the search
                // wraps around to grains of the batch.
                if !runs.is_empty() && (if upwards { g0 < next } else { g0 > next }) {
                    break;
                }
                let run: Vec<u64> = if upwards {
                    (g0..(g0 + run_len).min(grains)).collect()
                } else {
                    (g0.saturating_sub(run_len - 1)..=g0).rev().collect()
                };
                let copied = run
                    .iter()
                    .filter(|&&g| plan(&e, g).is_some_and(|p| p.grain == g))
                    .count();
                todo += copied as u64 * gb;
                let last = *run.last().expect("a run holds at least its first grain");
                runs.push(run);
                if !upwards && last == 0 {
                    next = 0;
                    break;
                }
                next = if upwards { last + 1 } else { last - 1 };
            }
            (runs, next)
        };
        if runs.is_empty() {
            return Ok(Step::Idle);
        }
        self.at(super::HookPoint::BatchChosen { map });
        let _locks = self.lock_grains(domain, runs.iter().flatten().copied());
        let (mut marks, mut dirty, mut bytes) = (Vec::new(), Vec::new(), 0u64);
        let mut buf = Vec::new();
        for run in &runs {
            let mut extent: Option<(crate::engine::GrainCopy, u64, u64)> = None;
            for &g in run {
                let Some(p) = plan(&self.engine.read(), g).filter(|p| p.grain == g) else {
                    continue;
                };
                marks.extend(p.marks.iter().cloned());
                let single = match p.copies.as_slice() {
                    [c] if c.from != c.to => Some(*c),
                    _ => None,
                };
                match (&mut extent, single) {
                    (Some((c, lo, hi)), Some(s)) if *c == s && (g == *hi + 1 || g + 1 == *lo) => {
                        *lo = (*lo).min(g);
                        *hi = (*hi).max(g);
                    }
                    (_, Some(s)) => {
                        if let Some(e) = extent.take() {
                            bytes += self.copy_extent(e, gb, &mut buf, &mut dirty)?;
                        }
                        extent = Some((s, g, g));
                    }
                    (_, None) => {
                        let (written, n) = self.run_copies(&p, gb)?;
                        bytes += n;
                        dirty.extend(written.into_iter().map(|(_, s)| s));
                    }
                }
            }
            if let Some(e) = extent.take() {
                bytes += self.copy_extent(e, gb, &mut buf, &mut dirty)?;
            }
        }
        if !marks.is_empty() {
            self.at(super::HookPoint::BatchCopied { map });
            self.committer.commit(
                &self.engine,
                Batch {
                    ops: marks,
                    stores: dirty,
                    apply: true,
                },
            )?;
        }
        Ok(Step::Copied { next, bytes })
    }

    /// Copies grains `lo..=hi` from one volume to another in one read and one write: zeros
    /// past the end of the source store, as much as fits in the target store (a cleaning
    /// copy may go to a dependant larger than this mapping's target).
    fn copy_extent(
        &self,
        (c, lo, hi): (crate::engine::GrainCopy, u64, u64),
        gb: u64,
        buf: &mut Vec<u8>,
        dirty: &mut Vec<std::sync::Arc<dyn crate::store::BlockStore>>,
    ) -> Result<u64, VolumeError> {
        let start = lo * gb;
        buf.resize(((hi + 1 - lo) * gb) as usize, 0);
        super::read_padded(&*self.store(c.from), buf, start)?;
        let to = self.store(c.to);
        let n = super::write_clipped(&*to, buf, start)?;
        dirty.push(to);
        Ok(n)
    }

    /// Applies `CopyComplete` when the mapping may complete.
    fn complete_if_ready(&self, map: MapId) -> Result<Step, VolumeError> {
        // Checked and applied under the control lock: another step of the same mapping may
        // complete it first.
        let _c = self.control.lock();
        if self.engine.read().copy_complete_ready(map) {
            self.control_locked(&[Op::CopyComplete { map }])?;
            return Ok(Step::Finished);
        }
        Ok(Step::Idle)
    }

    /// Runs background copy (copying) or cleaning (stopping) of `map` until it finishes or
    /// `deadline` passes, paced at the mapping's copy or clean rate (re-read every step so a
    /// `chfcmap` takes effect at once). Returns bytes copied.
    pub fn run_copy(&self, map: MapId, deadline: Option<Instant>) -> Result<u64, VolumeError> {
        let mut limiter = RateLimiter::new(0);
        let (mut bg, mut clean) = (0u64, u64::MAX);
        let mut total = 0;
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(total);
            }
            let (state, rate) = match self.engine.read().mapping(map) {
                Some(m) => (
                    m.state,
                    if m.state == MapState::Stopping {
                        m.clean_rate
                    } else {
                        m.copy_rate
                    },
                ),
                None => return Ok(total),
            };
            let step = match state {
                MapState::Copying if rate > 0 => self.background_step_max(map, bg, batch(rate))?,
                MapState::Copying => self.complete_if_ready(map)?,
                MapState::Stopping => self.clean_step_max(map, clean, batch(rate))?,
                _ => return Ok(total),
            };
            match step {
                Step::Copied { next, bytes } => {
                    if state == MapState::Stopping {
                        clean = next;
                    } else {
                        bg = next;
                    }
                    total += bytes;
                    limiter.set_rate(rate_bytes_per_sec(rate));
                    limiter.take(bytes);
                }
                Step::Finished => return Ok(total),
                Step::Idle => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Batch size for a rate: about a tenth of a second of copying, so pacing stays smooth.
fn batch(rate: u8) -> u64 {
    match rate_bytes_per_sec(rate) {
        0 => BATCH_BYTES,
        r => (r / 10).clamp(1, BATCH_BYTES),
    }
}

/// A token bucket in bytes per second; `take` sleeps until the bytes are paid for.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u64,
    start: Instant,
    spent: u64,
}

impl RateLimiter {
    /// A limiter at `bytes_per_sec` (0 = unlimited).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            rate: bytes_per_sec,
            start: Instant::now(),
            spent: 0,
        }
    }
    /// Changes the rate; the bucket restarts so the new rate applies from now.
    pub fn set_rate(&mut self, bytes_per_sec: u64) {
        if bytes_per_sec != self.rate {
            *self = Self::new(bytes_per_sec);
        }
    }
    /// Accounts for `bytes` and sleeps until the average since the last rate change is at most
    /// the rate.
    pub fn take(&mut self, bytes: u64) {
        self.spent += bytes;
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.spent as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}
