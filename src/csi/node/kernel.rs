//! The kernel nbd driver as an [`Attacher`], quarantined here: `nbd-client` connects a free
//! `/dev/nbdN` to the agent's export and `nbd-client -d` disconnects it. Which device serves
//! which volume is recorded in `ROOT/<volume>/device`; whether it is still connected is read
//! from `/sys/block/nbdN/pid`.
//!
//! Used only where `/dev/nbd0` exists (the `nbd` module is loaded) and `nbd-client` is
//! installed; tests run it only there.

use super::attach::{Attacher, Export, ensure_unmounted, key_dir, unkey};
use super::error::{Error, Result, io_err, on_path, run};
use std::path::{Path, PathBuf};

/// True when this host can attach through the kernel nbd driver.
pub fn available() -> bool {
    Path::new("/dev/nbd0").exists() && on_path("nbd-client")
}

/// Kernel nbd attachments, with their records under `root`.
#[derive(Debug)]
pub struct KernelNbd {
    root: PathBuf,
}

fn sys(dev: &Path) -> PathBuf {
    Path::new("/sys/block").join(dev.file_name().unwrap_or_default())
}

/// True when `/dev/nbdN` has a live connection.
fn connected(dev: &Path) -> bool {
    sys(dev).join("pid").exists()
}

/// The first nbd device with neither a connection nor a size.
fn free_device() -> Result<PathBuf> {
    let mut devs: Vec<(u32, PathBuf)> = std::fs::read_dir("/sys/block")
        .map_err(io_err("listing", Path::new("/sys/block")))?
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("nbd")?
                .parse()
                .ok()?;
            Some((n, Path::new("/dev").join(e.file_name())))
        })
        .collect();
    devs.sort();
    devs.into_iter()
        .map(|(_, d)| d)
        .find(|d| {
            !connected(d)
                && std::fs::read_to_string(sys(d).join("size")).is_ok_and(|s| s.trim() == "0")
        })
        .ok_or_else(|| Error::Unhealthy("no free /dev/nbd* device".into()))
}

impl KernelNbd {
    /// Keeps its records under `root` (created).
    pub fn new(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(io_err("creating", root))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn record(&self, volume: &str) -> PathBuf {
        self.root.join(key_dir(volume)).join("device")
    }
}

impl Attacher for KernelNbd {
    fn kind(&self) -> &'static str {
        "kernel-nbd"
    }

    fn attach(&self, volume: &str, export: &Export) -> Result<PathBuf> {
        match self.device(volume) {
            Ok(Some(dev)) => return Ok(dev),
            Ok(None) => {}
            Err(Error::Unhealthy(why)) => {
                tracing::warn!(volume, %why, "replacing a broken attachment");
                self.detach(volume)?;
            }
            Err(e) => return Err(e),
        }
        let dev = free_device()?;
        let rec = self.record(volume);
        let dir = rec.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        std::fs::write(&rec, dev.to_string_lossy().as_bytes()).map_err(io_err("writing", &rec))?;
        let r = run(
            "nbd-client",
            &[
                "-unix".as_ref(),
                export.socket.as_os_str(),
                dev.as_os_str(),
                "-name".as_ref(),
                export.name.as_ref(),
                "-block-size".as_ref(),
                "4096".as_ref(),
            ],
        );
        if let Err(e) = r {
            let _ = std::fs::remove_file(&rec);
            let _ = std::fs::remove_dir(dir);
            return Err(e);
        }
        tracing::info!(volume, device = %dev.display(), uri = export.uri(), "attached (kernel nbd)");
        Ok(dev)
    }

    fn detach(&self, volume: &str) -> Result<()> {
        let rec = self.record(volume);
        let Ok(dev) = std::fs::read_to_string(&rec) else {
            return Ok(());
        };
        let dev = PathBuf::from(dev.trim());
        if connected(&dev) {
            ensure_unmounted(&dev)?;
            run("nbd-client", &[Path::new("-d"), &dev])?;
        }
        std::fs::remove_file(&rec).map_err(io_err("removing", &rec))?;
        if let Some(dir) = rec.parent() {
            let _ = std::fs::remove_dir(dir);
        }
        tracing::info!(volume, device = %dev.display(), "detached (kernel nbd)");
        Ok(())
    }

    fn device(&self, volume: &str) -> Result<Option<PathBuf>> {
        let Ok(dev) = std::fs::read_to_string(self.record(volume)) else {
            return Ok(None);
        };
        let dev = PathBuf::from(dev.trim());
        if connected(&dev) {
            Ok(Some(dev))
        } else {
            Err(Error::Unhealthy(format!(
                "{} of {volume} lost its NBD connection",
                dev.display()
            )))
        }
    }

    fn volumes(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(&self.root).map_err(io_err("listing", &self.root))?;
        Ok(rd
            .flatten()
            .filter_map(|e| unkey(&e.file_name().to_string_lossy()))
            .collect())
    }
}
