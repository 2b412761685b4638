//! Sparse-file store: a regular file accessed with positional I/O.
//!
//! Positional reads and writes (`pread`/`pwrite`) carry their own offset, so one shared `File`
//! serves any number of threads without a seek lock. Discard punches holes so unused grains
//! give their space back to the file system.

use super::{BlockStore, StoreError, check_range, write_zeros};
use parking_lot::RwLock;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A store kept in a (sparse) regular file.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    /// Mirrors the file size so `len` needs no `fstat`; changed only by `resize`.
    len: AtomicU64,
    /// I/O holds it shared, `resize` exclusive: a write range-checked against the old size must
    /// not land after a shrink, or it would silently extend the file again.
    resize_lock: RwLock<()>,
}

impl FileStore {
    /// Creates (or truncates) the file at `path` as a sparse file of `len` zero bytes.
    pub fn create(path: impl AsRef<Path>, len: u64) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(len)?;
        Ok(Self::from_file(file, path, len))
    }

    /// Opens an existing file; the store size is the file size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Self::from_file(file, path, len))
    }

    fn from_file(file: File, path: &Path, len: u64) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            len: AtomicU64::new(len),
            resize_lock: RwLock::new(()),
        }
    }

    /// The path the store was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockStore for FileStore {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let _io = self.resize_lock.read();
        check_range(offset, buf.len() as u64, self.len())?;
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        let _io = self.resize_lock.read();
        check_range(offset, buf.len() as u64, self.len())?;
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        // fdatasync also persists a changed size (needed to read the data back); only
        // timestamps are skipped, which nothing here relies on.
        self.file.sync_data()?;
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let _io = self.resize_lock.read();
        check_range(offset, len, self.len())?;
        if len == 0 {
            return Ok(()); // fallocate rejects a zero length with EINVAL
        }
        match punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(()),
            // No hole punching here (some network/FUSE file systems): zeros read the same.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                write_zeros(offset, len, |b, o| Ok(self.file.write_all_at(b, o)?))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn resize(&self, new_len: u64) -> Result<(), StoreError> {
        let _excl = self.resize_lock.write();
        self.file.set_len(new_len)?;
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE; a file system without them reports the whole rest as data.
    fn data_extent(&self, from: u64) -> Result<Option<std::ops::Range<u64>>, StoreError> {
        let len = self.len();
        if from >= len {
            return Ok(None);
        }
        let start = match seek(&self.file, from, libc::SEEK_DATA) {
            Ok(o) => o,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some(from..len)),
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            return Ok(None);
        }
        let end = seek(&self.file, start, libc::SEEK_HOLE)?.min(len);
        Ok(Some(start..end))
    }
}

/// `lseek(fd, offset, whence)`; the shared file offset it moves is never used (all I/O is
/// positional).
#[allow(unsafe_code)]
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a valid, open file descriptor; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Deallocates `offset..offset+len` of `file`, keeping its size; the range then reads as zeros.
#[allow(unsafe_code)]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_big = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off_t::try_from(offset).map_err(too_big)?;
    let len = libc::off_t::try_from(len).map_err(too_big)?;
    // SAFETY: fallocate only takes integers; the descriptor is owned by `file`, which the borrow
    // keeps open for the duration of the call. No memory is passed to the kernel.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn discard_frees_space() {
        const LEN: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let s = FileStore::create(&path, LEN).unwrap();
        let blocks = || std::fs::metadata(&path).unwrap().blocks(); // 512-byte units
        assert!(
            blocks() < 64,
            "create must leave the file sparse, has {} blocks",
            blocks()
        );

        s.write_at(&vec![0xAB; LEN as usize], 0).unwrap();
        s.flush().unwrap();
        let full = blocks();
        assert!(full >= LEN / 512, "file not allocated: {full} blocks");

        s.discard(1 << 20, 2 << 20).unwrap();
        let after = blocks();
        // Allow for file-system block rounding, but most of the 2 MiB must be gone.
        assert!(
            full - after >= (2 << 20) / 512 * 9 / 10,
            "blocks {full} -> {after}"
        );
        assert_eq!(s.len(), LEN);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            LEN,
            "discard kept the size"
        );

        let mut buf = vec![0xFF; LEN as usize];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1 << 20].iter().all(|&b| b == 0xAB));
        assert!(buf[1 << 20..3 << 20].iter().all(|&b| b == 0));
        assert!(buf[3 << 20..].iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn open_sees_flushed_data_and_size_and_create_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        {
            let s = FileStore::create(&path, 10_000).unwrap();
            s.write_at(b"hello", 9_000).unwrap();
            s.resize(12_345).unwrap();
            s.flush().unwrap();
        }
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.len(), 12_345);
        assert_eq!(s.path(), path);
        let mut buf = [0u8; 5];
        s.read_at(&mut buf, 9_000).unwrap();
        assert_eq!(&buf, b"hello");
        drop(s);

        let s = FileStore::create(&path, 100).unwrap();
        assert_eq!(s.len(), 100);
        let mut buf = [1u8; 100];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 100]);
    }

    #[test]
    fn open_missing_file_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileStore::open(dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, StoreError::Io(e) if e.kind() == io::ErrorKind::NotFound));
    }
}
