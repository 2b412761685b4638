//! Where volume bytes live: one store per volume, created and opened by a [`Backend`].

use crate::engine::VolId;
use crate::store::{BlockStore, CrashPoint, FaultStore, FileStore, MemStore, StoreError};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Creates, opens and removes the store of each volume.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// A new zero-filled store for `vol`.
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError>;
    /// The existing store of `vol` (after a restart).
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError>;
    /// Removes the store of `vol`; a missing store is not an error.
    fn remove(&self, vol: VolId) -> Result<(), StoreError>;
    /// Volumes that have a store (to find leftovers of an interrupted create).
    fn list(&self) -> Result<Vec<VolId>, StoreError>;
}

/// Sparse files `DIR/<id>.img`.
#[derive(Debug)]
pub struct DirBackend {
    dir: PathBuf,
}

impl DirBackend {
    /// A backend keeping volume files in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }
    fn path(&self, vol: VolId) -> PathBuf {
        self.dir.join(format!("{}.img", vol.0))
    }
}

impl Backend for DirBackend {
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        let store = FileStore::create(self.path(vol), size)?;
        // The file and its size must be durable before the journal names the volume.
        store.flush()?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(Arc::new(store))
    }
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        Ok(Arc::new(FileStore::open(self.path(vol))?))
    }
    fn remove(&self, vol: VolId) -> Result<(), StoreError> {
        match std::fs::remove_file(self.path(vol)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
    fn list(&self) -> Result<Vec<VolId>, StoreError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".img").and_then(|n| n.parse().ok()) {
                out.push(VolId(id));
            }
        }
        Ok(out)
    }
}

/// Volumes in memory (tests, demos). `open` returns the store created earlier in this process.
#[derive(Debug, Default)]
pub struct MemBackend {
    stores: Mutex<BTreeMap<VolId, Arc<MemStore>>>,
}

impl Backend for MemBackend {
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        let s = Arc::new(MemStore::new(size));
        self.stores.lock().insert(vol, s.clone());
        Ok(s)
    }
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        let s = self.stores.lock().get(&vol).cloned();
        s.map(|s| s as Arc<dyn BlockStore>).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no store for {vol}")).into()
        })
    }
    fn remove(&self, vol: VolId) -> Result<(), StoreError> {
        self.stores.lock().remove(&vol);
        Ok(())
    }
    fn list(&self) -> Result<Vec<VolId>, StoreError> {
        Ok(self.stores.lock().keys().copied().collect())
    }
}

/// Fault-injecting stores sharing one crash point (crash tests). After a crash,
/// [`FaultBackend::reboot`] builds the backend a restarted agent would find.
#[derive(Debug)]
pub struct FaultBackend {
    point: Arc<CrashPoint>,
    stores: Mutex<BTreeMap<VolId, Arc<FaultStore>>>,
}

impl FaultBackend {
    /// A backend whose stores crash together at `point`.
    pub fn new(point: Arc<CrashPoint>) -> Self {
        Self {
            point,
            stores: Mutex::default(),
        }
    }
    /// The stores as the disk holds them after power loss: each unsynced write kept iff `keep()`.
    /// The new backend never crashes.
    pub fn reboot(&self, keep: &mut dyn FnMut() -> bool) -> FaultBackend {
        let point = Arc::new(CrashPoint::never());
        let stores = self
            .stores
            .lock()
            .iter()
            .map(|(v, s)| {
                (
                    *v,
                    Arc::new(FaultStore::from_vec_with_crash_point(
                        s.crash_image(keep),
                        point.clone(),
                    )),
                )
            })
            .collect();
        FaultBackend {
            point,
            stores: Mutex::new(stores),
        }
    }
    /// The store of a volume, for inspection.
    pub fn store(&self, vol: VolId) -> Option<Arc<FaultStore>> {
        self.stores.lock().get(&vol).cloned()
    }
}

impl Backend for FaultBackend {
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        if self.point.crashed() {
            return Err(StoreError::Crashed);
        }
        let s = Arc::new(FaultStore::with_crash_point(size, self.point.clone()));
        // A new file's size is not durable until synced; model it as fully durable zeros,
        // which is what a sparse file reads as either way.
        self.stores.lock().insert(vol, s.clone());
        Ok(s)
    }
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        let s = self.stores.lock().get(&vol).cloned();
        s.map(|s| s as Arc<dyn BlockStore>).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no store for {vol}")).into()
        })
    }
    fn remove(&self, vol: VolId) -> Result<(), StoreError> {
        self.stores.lock().remove(&vol);
        Ok(())
    }
    fn list(&self) -> Result<Vec<VolId>, StoreError> {
        Ok(self.stores.lock().keys().copied().collect())
    }
}
