//! The CSI plugin.

pub mod node;
