//! Generated gRPC code (tonic + prost, from `proto/` by `build.rs` into `OUT_DIR`). Nothing here
//! is hand-written.

/// The node agent's API, `flashcopy.agent.v1` (`proto/agent/v1/agent.proto`).
pub mod agent {
    /// Version 1.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        clippy::nursery,
        unreachable_pub
    )]
    pub mod v1 {
        tonic::include_proto!("flashcopy.agent.v1");
    }
}

/// The Container Storage Interface, `csi.v1` (`proto/csi/v1/csi.proto`, CSI 1.12).
pub mod csi {
    /// Version 1.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        clippy::nursery,
        unreachable_pub
    )]
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
