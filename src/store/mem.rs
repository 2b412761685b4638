//! In-memory store: tests, demos and the reference for the conformance suite.

use super::{BlockStore, StoreError, check_range};
use parking_lot::RwLock;

/// A store kept in memory. Flush is a no-op: nothing here survives the process anyway.
#[derive(Debug, Default)]
pub struct MemStore {
    data: RwLock<Vec<u8>>,
}

impl MemStore {
    /// A zero-filled store of `len` bytes.
    pub fn new(len: u64) -> Self {
        Self::from_vec(vec![0; len as usize])
    }

    /// A store holding exactly `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(data),
        }
    }

    /// A copy of the whole content.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

impl BlockStore for MemStore {
    fn len(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let data = self.data.read();
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        let mut data = self.data.write();
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let o = offset as usize;
        data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let mut data = self.data.write();
        check_range(offset, len, data.len() as u64)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn resize(&self, new_len: u64) -> Result<(), StoreError> {
        self.data.write().resize(new_len as usize, 0);
        Ok(())
    }
}
