//! Block-store backends: the only code that moves volume bytes.
//!
//! Every backend implements [`BlockStore`], a positional, synchronous byte store. The volume layer
//! and the metadata journal are written against the trait, so the fault-injecting store used by
//! the crash tests can stand in for any of them.

pub mod blockdev;
pub mod fault;
pub mod file;
pub mod mem;

#[cfg(test)]
pub(crate) mod conformance;

pub use blockdev::BlockDevStore;
pub use fault::{CrashPoint, FaultStore};
pub use file::FileStore;
pub use mem::MemStore;

/// Errors from a block store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request reaches past the end of the store.
    #[error("range {offset}+{len} is outside the store of {size} bytes")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the store.
        size: u64,
    },
    /// The request is not aligned as the backend requires (raw block device opened with O_DIRECT).
    #[error("range {offset}+{len} is not aligned to {align} bytes")]
    Unaligned {
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Required alignment of both offset and length.
        align: u64,
    },
    /// The backend cannot do this (for example resizing a raw block device).
    #[error("{0} is not supported by this store")]
    Unsupported(&'static str),
    /// The store was crashed by fault injection and refuses further I/O.
    #[error("store is crashed (fault injection)")]
    Crashed,
    /// An operating-system I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A positional byte store backing one volume (or one metadata file).
///
/// Writes become durable only after [`BlockStore::flush`] returns; a crash may lose any write
/// not yet flushed. Implementations are safe to call from many threads at once; writes to
/// disjoint ranges never interfere.
pub trait BlockStore: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True when the store holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`. The whole range must lie inside the store.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError>;
    /// Writes `buf` at `offset`. The whole range must lie inside the store.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Drops the data of a range; afterwards the range reads as zeros. Sparse backends free the space.
    fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError>;
    /// Changes the size; new bytes read as zeros. Raw block devices return `Unsupported`.
    fn resize(&self, new_len: u64) -> Result<(), StoreError>;
    /// The first range at or after `from` that may hold data (`None`: only holes, which read as
    /// zeros, follow). Stores that cannot tell report everything as data.
    fn data_extent(&self, from: u64) -> Result<Option<std::ops::Range<u64>>, StoreError> {
        Ok((from < self.len()).then(|| from..self.len()))
    }
}

/// Checks that `offset..offset+len` lies inside a store of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), StoreError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::OutOfRange { offset, len, size }),
    }
}

/// Writes zeros over `offset..offset+len` through `write`, in chunks of at most 1 MiB.
///
/// The fallback for `discard` when a backend cannot drop data natively. The chunk size is a
/// multiple of 4096, so chunk boundaries stay aligned whenever `offset` is.
pub(crate) fn write_zeros(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        write(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}
