//! Raw block-device store (a LUN, a partition, an LVM volume, a loop device).
//!
//! The device size is fixed by whoever created it, so `resize` is unsupported. With `direct`
//! the page cache is bypassed (`O_DIRECT`); the kernel then insists on sector-aligned offsets,
//! lengths and memory, so requests must be sector aligned and data goes through an internal
//! 4096-aligned bounce buffer (callers may pass any buffer).

use super::{BlockStore, StoreError, check_range, write_zeros};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Smallest sector size; `BLKZEROOUT` and `O_DIRECT` work in these units at least.
const SECTOR: u64 = 512;
/// Memory alignment of bounce buffers: enough for any device's DMA alignment.
const MEM_ALIGN: usize = 4096;
/// Bounce-buffer size; larger requests are moved in chunks of this size.
const BOUNCE_LEN: usize = 1 << 20;
/// Idle bounce buffers kept for reuse.
const BOUNCE_POOL: usize = 16;

/// A store on a raw block device.
pub struct BlockDevStore {
    file: File,
    path: PathBuf,
    len: u64,
    direct: bool,
    /// Logical sector size (at least 512): the unit of `BLKZEROOUT` and of direct I/O.
    sector: u64,
    /// Reusable aligned buffers for direct I/O, so a request does not allocate 1 MiB each time.
    bounce: Mutex<Vec<AlignedBuf>>,
}

impl std::fmt::Debug for BlockDevStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevStore")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("direct", &self.direct)
            .field("sector", &self.sector)
            .finish_non_exhaustive()
    }
}

impl BlockDevStore {
    /// Opens the block device at `path` read-write; `direct` bypasses the page cache.
    ///
    /// With `direct`, every offset and length (also of `discard`) must be a multiple of
    /// [`BlockDevStore::alignment`] (512 on most devices), or the call fails with
    /// [`StoreError::Unaligned`]. Without it any range is accepted.
    pub fn open(path: impl AsRef<Path>, direct: bool) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        if !file.metadata()?.file_type().is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a block device", path.display()),
            )
            .into());
        }
        let len = device_size(&file)?;
        let sector = logical_block_size(&file)?.max(SECTOR);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
            direct,
            sector,
            bounce: Mutex::new(Vec::new()),
        })
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Required alignment of offsets and lengths: the logical sector size with `direct`, else 1.
    pub fn alignment(&self) -> u64 {
        if self.direct { self.sector } else { 1 }
    }

    /// Range check first (so overflow reports `OutOfRange`), then the direct-I/O alignment rule.
    fn check(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        check_range(offset, len, self.len)?;
        let align = self.alignment();
        if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(StoreError::Unaligned { offset, len, align });
        }
        Ok(())
    }

    fn take_bounce(&self) -> AlignedBuf {
        self.bounce.lock().pop().unwrap_or_else(AlignedBuf::new)
    }

    fn put_bounce(&self, buf: AlignedBuf) {
        let mut pool = self.bounce.lock();
        if pool.len() < BOUNCE_POOL {
            pool.push(buf);
        }
    }

    /// Writes an already checked range.
    fn write_checked(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        if !self.direct || is_mem_aligned(buf) {
            self.file.write_all_at(buf, offset)?;
            return Ok(());
        }
        let mut bounce = self.take_bounce();
        for (i, chunk) in buf.chunks(BOUNCE_LEN).enumerate() {
            let b = bounce.slice(chunk.len());
            b.copy_from_slice(chunk);
            self.file
                .write_all_at(b, offset + (i * BOUNCE_LEN) as u64)?;
        }
        self.put_bounce(bounce);
        Ok(())
    }

    /// Zeroes an already checked, sector-aligned range, natively if the device can.
    fn zero_sectors(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if len == 0 {
            return Ok(());
        }
        match zero_out(&self.file, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY)) => {
                write_zeros(offset, len, |b, o| self.write_checked(b, o))
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl BlockStore for BlockDevStore {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.check(offset, buf.len() as u64)?;
        if !self.direct || is_mem_aligned(buf) {
            self.file.read_exact_at(buf, offset)?;
            return Ok(());
        }
        let mut bounce = self.take_bounce();
        for (i, chunk) in buf.chunks_mut(BOUNCE_LEN).enumerate() {
            let b = bounce.slice(chunk.len());
            self.file
                .read_exact_at(b, offset + (i * BOUNCE_LEN) as u64)?;
            chunk.copy_from_slice(b);
        }
        self.put_bounce(bounce);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.check(offset, buf.len() as u64)?;
        self.write_checked(buf, offset)
    }

    fn flush(&self) -> Result<(), StoreError> {
        // On a block device fdatasync writes back the page cache and flushes the device cache.
        self.file.sync_data()?;
        Ok(())
    }

    /// Zeroes the range with `BLKZEROOUT` (unlike `BLKDISCARD`, guaranteed to read back as
    /// zeros), falling back to writing zeros. Without `direct` an unaligned head and tail are
    /// zeroed by ordinary writes.
    fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check(offset, len)?;
        let end = offset + len;
        let mid_start = offset.next_multiple_of(self.sector).min(end);
        let mid_end = (end - end % self.sector).max(mid_start);
        write_zeros(offset, mid_start - offset, |b, o| self.write_checked(b, o))?;
        self.zero_sectors(mid_start, mid_end - mid_start)?;
        write_zeros(mid_end, end - mid_end, |b, o| self.write_checked(b, o))
    }

    fn resize(&self, _new_len: u64) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("resize"))
    }
}

fn is_mem_aligned(buf: &[u8]) -> bool {
    buf.as_ptr().addr().is_multiple_of(MEM_ALIGN)
}

/// A `BOUNCE_LEN` window inside an over-allocated `Vec`, starting at a `MEM_ALIGN` boundary.
/// Over-allocating keeps the alignment free of unsafe allocator calls.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new() -> Self {
        let raw = vec![0u8; BOUNCE_LEN + MEM_ALIGN];
        let start = (MEM_ALIGN - raw.as_ptr().addr() % MEM_ALIGN) % MEM_ALIGN;
        Self { raw, start }
    }

    /// The first `len` (at most `BOUNCE_LEN`) aligned bytes.
    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

// Block-layer ioctl numbers libc does not export, encoded as <linux/ioctl.h> does.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const IOC_NONE_READ_DIRSHIFT: (u64, u64, u32) = (1, 2, 29);
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const IOC_NONE_READ_DIRSHIFT: (u64, u64, u32) = (0, 2, 30);

const fn ioc(dir: u64, nr: u64, size: usize) -> libc::Ioctl {
    ((dir << IOC_NONE_READ_DIRSHIFT.2) | ((size as u64) << 16) | (0x12 << 8) | nr) as libc::Ioctl
}
/// `_IOR(0x12, 114, size_t)`: device size in bytes, into a u64.
const BLKGETSIZE64: libc::Ioctl = ioc(IOC_NONE_READ_DIRSHIFT.1, 114, size_of::<usize>());
/// `_IO(0x12, 127)`: write zeros over `[start, len]` (u64 pair, 512-aligned).
const BLKZEROOUT: libc::Ioctl = ioc(IOC_NONE_READ_DIRSHIFT.0, 127, 0);

fn ioctl_result(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Size of the device in bytes.
#[allow(unsafe_code)]
fn device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which points at a live
    // local; the descriptor is kept open by the `file` borrow.
    ioctl_result(unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })?;
    Ok(size)
}

/// Logical sector size of the device in bytes.
#[allow(unsafe_code)]
fn logical_block_size(file: &File) -> io::Result<u64> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes exactly one int through the pointer, which points at a live
    // local; the descriptor is kept open by the `file` borrow.
    ioctl_result(unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut size as *mut libc::c_int,
        )
    })?;
    u64::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Zeroes `offset..offset+len` on the device (also dropping cached pages of the range).
#[allow(unsafe_code)]
fn zero_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT only reads two u64s through the pointer, which points at a live local
    // array; the descriptor is kept open by the `file` borrow.
    ioctl_result(unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) })
}

// The device itself is tested on a loop device by the conformance suite (needs root).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unnecessary_cast)] // `Ioctl` is u64 on glibc but i32 on musl
    fn ioctl_numbers_match_linux_headers() {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert_eq!(
            (BLKGETSIZE64 as u64, BLKZEROOUT as u64),
            (0x8008_1272, 0x127F)
        );
        #[cfg(target_arch = "powerpc64")]
        assert_eq!(
            (BLKGETSIZE64 as u64, BLKZEROOUT as u64),
            (0x4008_1272, 0x2000_127F)
        );
    }

    #[test]
    fn regular_file_is_rejected() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let err = BlockDevStore::open(f.path(), false).unwrap_err();
        assert!(err.to_string().contains("not a block device"), "{err}");
    }

    #[test]
    fn bounce_buffer_is_aligned() {
        let mut b = AlignedBuf::new();
        assert!(is_mem_aligned(b.slice(BOUNCE_LEN)));
    }
}
