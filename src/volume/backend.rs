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

/// Stores kept in a map in this process (the memory and fault-injecting backends).
#[derive(Debug)]
struct StoreMap<S>(Mutex<BTreeMap<VolId, Arc<S>>>);

impl<S> Default for StoreMap<S> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<S: BlockStore + 'static> StoreMap<S> {
    fn insert(&self, vol: VolId, s: S) -> Arc<dyn BlockStore> {
        let s = Arc::new(s);
        self.0.lock().insert(vol, s.clone());
        s
    }
    fn get(&self, vol: VolId) -> Option<Arc<S>> {
        self.0.lock().get(&vol).cloned()
    }
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        let s = self.get(vol).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no store for {vol}"))
        })?;
        Ok(s)
    }
    fn remove(&self, vol: VolId) {
        self.0.lock().remove(&vol);
    }
    fn list(&self) -> Vec<VolId> {
        self.0.lock().keys().copied().collect()
    }
}

/// Volumes in memory (tests, demos). `open` returns the store created earlier in this process.
#[derive(Debug, Default)]
pub struct MemBackend {
    stores: StoreMap<MemStore>,
}

impl Backend for MemBackend {
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        Ok(self.stores.insert(vol, MemStore::new(size)))
    }
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        self.stores.open(vol)
    }
    fn remove(&self, vol: VolId) -> Result<(), StoreError> {
        self.stores.remove(vol);
        Ok(())
    }
    fn list(&self) -> Result<Vec<VolId>, StoreError> {
        Ok(self.stores.list())
    }
}

/// Fault-injecting stores sharing one crash point (crash tests). After a crash,
/// [`FaultBackend::reboot`] builds the backend a restarted agent would find.
#[derive(Debug)]
pub struct FaultBackend {
    point: Arc<CrashPoint>,
    stores: StoreMap<FaultStore>,
}

impl FaultBackend {
    /// A backend whose stores crash together at `point`.
    pub fn new(point: Arc<CrashPoint>) -> Self {
        Self {
            point,
            stores: StoreMap::default(),
        }
    }
    /// The stores as the disk holds them after power loss: each unsynced write kept iff `keep()`.
    /// The new backend never crashes.
    pub fn reboot(&self, keep: &mut dyn FnMut() -> bool) -> FaultBackend {
        let rebooted = FaultBackend::new(Arc::new(CrashPoint::never()));
        for vol in self.stores.list() {
            let image = self.stores.get(vol).expect("listed").crash_image(keep);
            let store = FaultStore::from_vec_with_crash_point(image, rebooted.point.clone());
            rebooted.stores.insert(vol, store);
        }
        rebooted
    }
    /// The store of a volume, for inspection.
    pub fn store(&self, vol: VolId) -> Option<Arc<FaultStore>> {
        self.stores.get(vol)
    }
}

impl Backend for FaultBackend {
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        if self.point.crashed() {
            return Err(StoreError::Crashed);
        }
        // A new file's size is not durable until synced; model it as fully durable zeros,
        // which is what a sparse file reads as either way.
        Ok(self
            .stores
            .insert(vol, FaultStore::with_crash_point(size, self.point.clone())))
    }
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        self.stores.open(vol)
    }
    fn remove(&self, vol: VolId) -> Result<(), StoreError> {
        self.stores.remove(vol);
        Ok(())
    }
    fn list(&self) -> Result<Vec<VolId>, StoreError> {
        Ok(self.stores.list())
    }
}
