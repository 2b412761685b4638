//! A pool backend over a list of raw block devices: each volume gets a device of its own and
//! uses its first `size` bytes.
//!
//! Which volume owns which device is kept in a small JSON file (`DIR/devices.json`), replaced
//! atomically (temp file, fsync, rename, fsync of the directory) before a create returns, so the
//! journal never names a volume whose device is not recorded. A device listed in the file but
//! no longer given on the command line makes the volume's open fail with its path named.

use crate::engine::VolId;
use crate::store::{BlockDevStore, BlockStore, StoreError, check_range};
use crate::volume::Backend;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One volume's device and the bytes of it the volume uses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Assignment {
    device: PathBuf,
    size: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Table {
    /// By volume id.
    volumes: BTreeMap<u64, Assignment>,
}

#[derive(Debug)]
struct Shared {
    file: PathBuf,
    table: Mutex<Table>,
}

impl Shared {
    /// Writes the table durably (temp file + rename).
    fn save(&self, table: &Table) -> Result<(), StoreError> {
        let tmp = self.file.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(table).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.file)?;
        if let Some(dir) = self.file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Volumes on raw block devices, one device per volume.
#[derive(Debug)]
pub struct DeviceBackend {
    devices: Vec<PathBuf>,
    shared: Arc<Shared>,
}

impl DeviceBackend {
    /// A backend handing out `devices`, with its assignment table at `table_file`.
    pub fn open(table_file: &Path, devices: Vec<PathBuf>) -> Result<Self, StoreError> {
        let table = match std::fs::read(table_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", table_file.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            devices,
            shared: Arc::new(Shared {
                file: table_file.to_path_buf(),
                table: Mutex::new(table),
            }),
        })
    }

    fn slice(&self, vol: VolId, a: &Assignment) -> Result<Arc<dyn BlockStore>, StoreError> {
        if !self.devices.contains(&a.device) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} holds {vol} but is not among the configured devices",
                    a.device.display()
                ),
            )
            .into());
        }
        let dev = BlockDevStore::open(&a.device, false)?;
        Ok(Arc::new(DeviceSlice {
            vol,
            len: AtomicU64::new(a.size.min(dev.len())),
            dev,
            shared: self.shared.clone(),
        }))
    }
}

impl Backend for DeviceBackend {
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        let mut table = self.shared.table.lock();
        let mut too_small = Vec::new();
        for path in &self.devices {
            if table.volumes.values().any(|a| &a.device == path) {
                continue;
            }
            let dev = BlockDevStore::open(path, false)?;
            if dev.len() < size {
                too_small.push(format!("{} has {} bytes", path.display(), dev.len()));
                continue;
            }
            // A new volume reads as zeros.
            dev.discard(0, size)?;
            dev.flush()?;
            let a = Assignment {
                device: path.clone(),
                size,
            };
            table.volumes.insert(vol.0, a.clone());
            if let Err(e) = self.shared.save(&table) {
                table.volumes.remove(&vol.0);
                return Err(e);
            }
            drop(table);
            tracing::info!(volume = %vol, device = %path.display(), size, "device assigned");
            return self.slice(vol, &a);
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            if too_small.is_empty() {
                format!(
                    "no free block device for {vol} (all {} in use)",
                    self.devices.len()
                )
            } else {
                format!(
                    "no free block device of {size} bytes for {vol} ({})",
                    too_small.join(", ")
                )
            },
        )
        .into())
    }

    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        let a = self
            .shared
            .table
            .lock()
            .volumes
            .get(&vol.0)
            .cloned()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no block device is assigned to {vol}"),
                )
            })?;
        self.slice(vol, &a)
    }

    fn remove(&self, vol: VolId) -> Result<(), StoreError> {
        let mut table = self.shared.table.lock();
        if let Some(a) = table.volumes.remove(&vol.0)
            && let Err(e) = self.shared.save(&table)
        {
            table.volumes.insert(vol.0, a);
            return Err(e);
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<VolId>, StoreError> {
        Ok(self
            .shared
            .table
            .lock()
            .volumes
            .keys()
            .map(|v| VolId(*v))
            .collect())
    }
}

/// The first `len` bytes of a block device.
#[derive(Debug)]
struct DeviceSlice {
    vol: VolId,
    dev: BlockDevStore,
    len: AtomicU64,
    shared: Arc<Shared>,
}

impl BlockStore for DeviceSlice {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        check_range(offset, buf.len() as u64, self.len())?;
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        check_range(offset, buf.len() as u64, self.len())?;
        self.dev.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.dev.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        check_range(offset, len, self.len())?;
        self.dev.discard(offset, len)
    }
    /// Grows or shrinks within the device; new bytes read as zeros.
    fn resize(&self, new_len: u64) -> Result<(), StoreError> {
        if new_len > self.dev.len() {
            return Err(StoreError::Unsupported(
                "growing a volume past the size of its block device",
            ));
        }
        let old = self.len();
        if new_len > old {
            self.dev.discard(old, new_len - old)?;
            self.dev.flush()?;
        }
        let mut table = self.shared.table.lock();
        if let Some(a) = table.volumes.get_mut(&self.vol.0) {
            a.size = new_len;
        }
        self.shared.save(&table)?;
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }
}
