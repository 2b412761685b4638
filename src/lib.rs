//! flashcopy-csi: IBM Spectrum Virtualize FlashCopy semantics for any Linux node.
//!
//! Layering (imports only point left):
//!
//! ```text
//! engine  <-  store  <-  meta, volume
//! (pure)      (bytes)    (journal, copy-on-write execution)
//! ```
//!
//! - [`engine`]: the FlashCopy state machine and copy-on-write planner; pure (no I/O, no clocks).
//! - [`store`]: block-store backends (memory, sparse file, raw block device, fault injection).
//! - [`meta`]: the crash-safe metadata journal and checkpoints.
//! - [`volume`]: executes engine plans against stores with per-grain locking and group commit.
//! - [`nbd`]: the NBD server that exposes volumes to workloads.
//! - [`agent`]: the node daemon: the agent gRPC API, NBD exports, copy workers, shutdown.
//! - [`proto`]: generated gRPC code (`proto/agent/v1/agent.proto`).
//! - [`fc`]: the operator's FlashCopy command line over the agent API.
//! - [`csi`]: the CSI plugin (Identity, Controller, GroupController, Node) over the agent API.
//! - [`standalone`]: agent + CSI controller + CSI node in one process (the embedded default).
//! - [`k8s`]: the snapshot controller (kube-rs) and our FlashCopy CRDs.

pub mod agent;
pub mod cli;
pub mod csi;
pub mod engine;
pub mod fc;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "kubernetes")]
pub mod k8s;
pub mod meta;
pub mod nbd;
pub mod proto;
pub mod standalone;
pub mod store;
pub mod tls;
pub mod volume;
