//! Background copy and cleaning (FLASHCOPY.md §3.7, §5): one grain per step, each under its grain
//! lock with the same durability order as a copy-on-write, paced by a token bucket.

use super::{Batch, Pool, VolumeError};
use crate::engine::{MapId, MapState, Op, rate_bytes_per_sec};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    /// One background-copy step of a copying mapping, starting the search at `cursor`.
    /// Applies `CopyComplete` once every grain is split and no dependant remains.
    pub fn background_step(&self, map: MapId, cursor: u64) -> Result<Step, VolumeError> {
        let planned = {
            let _gate = self.gate.read();
            let e = self.engine.read();
            let m = e
                .mapping(map)
                .ok_or(crate::engine::EngineError::NoSuchMapping(map))?;
            if m.state != MapState::Copying {
                return Ok(Step::Idle);
            }
            let shape = e.lock_domain(m.target);
            let size = e.volume(m.target).map_or(0, |v| v.size);
            e.plan_background(map, cursor)
                .map(|p| (p.grain, shape, size, m.grain.bytes()))
        };
        match planned {
            Some((g, Some((domain, _)), size, gb)) => {
                let bytes = self.copy_grain(domain, g, gb, size, |e| {
                    e.plan_background(map, g).filter(|p| p.grain == g)
                })?;
                self.stats
                    .background_grains
                    .fetch_add(u64::from(bytes > 0), Ordering::Relaxed);
                Ok(Step::Copied { next: g + 1, bytes })
            }
            Some(_) => Ok(Step::Idle),
            None => {
                if self.engine.read().copy_complete_ready(map) {
                    self.control(&[Op::CopyComplete { map }])?;
                    Ok(Step::Finished)
                } else {
                    Ok(Step::Idle)
                }
            }
        }
    }

    /// One cleaning step of a stopping mapping, scanning down from `cursor`.
    /// Applies `CleanComplete` when no dependant needs anything from the target any more.
    pub fn clean_step(&self, map: MapId, cursor: u64) -> Result<Step, VolumeError> {
        let planned = {
            let _gate = self.gate.read();
            let e = self.engine.read();
            let m = e
                .mapping(map)
                .ok_or(crate::engine::EngineError::NoSuchMapping(map))?;
            if m.state != MapState::Stopping {
                return Ok(Step::Idle);
            }
            let domain = e.lock_domain(m.target);
            let size = e.volume(m.target).map_or(0, |v| v.size);
            e.plan_clean(map, cursor)
                .map(|p| (p.grain, domain, size, m.grain.bytes()))
        };
        match planned {
            Some((g, Some((domain, _)), size, gb)) => {
                let bytes = self.copy_grain(domain, g, gb, size, |e| {
                    e.plan_clean(map, g).filter(|p| p.grain == g)
                })?;
                self.stats
                    .clean_grains
                    .fetch_add(u64::from(bytes > 0), Ordering::Relaxed);
                Ok(Step::Copied {
                    next: g.saturating_sub(1),
                    bytes,
                })
            }
            _ => {
                if !self.engine.read().needs_cleaning(map) {
                    self.control(&[Op::CleanComplete { map }])?;
                    Ok(Step::Finished)
                } else {
                    Ok(Step::Idle)
                }
            }
        }
    }

    /// Re-plans grain `g` under its lock and executes the plan; returns bytes copied.
    fn copy_grain(
        &self,
        domain: crate::engine::VolId,
        g: u64,
        gb: u64,
        size: u64,
        plan: impl Fn(&crate::engine::Engine) -> Option<crate::engine::GrainPlan>,
    ) -> Result<u64, VolumeError> {
        let _gate = self.gate.read();
        let _l = self.grain_lock(domain, g).write();
        let Some(plan) = plan(&self.engine.read()) else {
            return Ok(0);
        };
        let dirty = self.run_copies(&plan, gb, size)?;
        let bytes = dirty.len() as u64 * gb.min(size - g * gb);
        self.committer.commit(
            &self.engine,
            Batch {
                ops: plan.marks,
                stores: dirty,
                apply: true,
            },
        )?;
        Ok(bytes)
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
                MapState::Copying if rate > 0 => self.background_step(map, bg)?,
                MapState::Copying => self.background_complete_check(map)?,
                MapState::Stopping => self.clean_step(map, clean)?,
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

    /// Copy rate 0: no background copy, but the mapping still completes once every grain was
    /// split by writes.
    fn background_complete_check(&self, map: MapId) -> Result<Step, VolumeError> {
        if self.engine.read().copy_complete_ready(map) {
            self.control(&[Op::CopyComplete { map }])?;
            return Ok(Step::Finished);
        }
        Ok(Step::Idle)
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
