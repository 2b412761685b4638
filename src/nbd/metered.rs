//! Counts every request an export serves in the pool's [`IoStats`]: requests, bytes, errors
//! and latency by kind. A few relaxed atomic adds and two clock reads per request. While it
//! lives, its volume counts one more NBD client ([`crate::volume::Stats::clients`]).

use super::server::{Export, ExportError};
use crate::engine::VolId;
use crate::volume::{IoOp, Pool};
use std::sync::Arc;
use std::time::Instant;

/// An export whose requests are counted in its pool's [`crate::volume::Stats::io`].
pub struct Metered<E> {
    inner: E,
    pool: Arc<Pool>,
    vol: VolId,
}

impl<E: Export> Metered<E> {
    /// Counts the requests `inner` (an export of `vol`) serves in `pool`'s stats.
    pub fn new(inner: E, pool: Arc<Pool>, vol: VolId) -> Self {
        pool.stats.client_opened(vol);
        Self { inner, pool, vol }
    }

    fn timed(
        &self,
        op: IoOp,
        bytes: u64,
        f: impl FnOnce() -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        let t0 = Instant::now();
        let res = f();
        self.pool
            .stats
            .io
            .record(op, bytes, t0.elapsed(), res.is_ok());
        res
    }
}

impl<E> Drop for Metered<E> {
    fn drop(&mut self) {
        self.pool.stats.client_closed(self.vol);
    }
}

impl<E: Export> Export for Metered<E> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let n = buf.len() as u64;
        self.timed(IoOp::Read, n, || self.inner.read_at(offset, buf))
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.timed(IoOp::Write, data.len() as u64, || {
            self.inner.write_at(offset, data, fua)
        })
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.timed(IoOp::Flush, 0, || self.inner.flush())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.timed(IoOp::Trim, len, || self.inner.trim(offset, len, fua))
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.timed(IoOp::WriteZeroes, len, || {
            self.inner.write_zeroes(offset, len, fua)
        })
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn min_block_size(&self) -> u32 {
        self.inner.min_block_size()
    }
    fn canonical_name(&self) -> Option<String> {
        self.inner.canonical_name()
    }
    fn description(&self) -> Option<String> {
        self.inner.description()
    }
}
