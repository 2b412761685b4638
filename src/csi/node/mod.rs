//! The CSI node plugin (`flashcopy-csi csi node`): attaches the local agent's NBD export of a
//! volume as a block device, formats blank devices, mounts and bind-mounts.
//!
//! - [`attach`]: NBD export -> block device ([`attach::FuseLoop`]: nbdfuse + loop;
//!   [`kernel::KernelNbd`]: the kernel nbd driver).
//! - [`mount`]: blank-device probe, mkfs, mount, bind, unmount, mount table, statvfs, growth.
//! - [`error`]: node-side errors and the system-tool runner.

pub mod attach;
pub mod error;
pub mod kernel;
pub mod mount;

pub use attach::{Attacher, Export, FuseLoop};
pub use error::{Error, Result};
pub use kernel::KernelNbd;

/// Picks the attacher for this host: the kernel nbd driver where `/dev/nbd0` exists and
/// `nbd-client` is installed, nbdfuse + loop otherwise. State lives under `state_dir`.
pub fn default_attacher(state_dir: &std::path::Path) -> Result<Box<dyn Attacher>> {
    Ok(if kernel::available() {
        Box::new(KernelNbd::new(&state_dir.join("kernel-nbd"))?)
    } else {
        Box::new(FuseLoop::new(&state_dir.join("fuse-loop"))?)
    })
}
