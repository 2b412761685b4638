//! Every CSI error becomes a [`tonic::Status`] here, in one place, with the code the CSI spec
//! gives for it (K8S-SNAPSHOTS.md §B.7) and a message that names what was wrong.

use tonic::{Code, Status};

/// Why a CSI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A string field is over the spec's 128-byte limit.
    #[error("{field} is {len} bytes long; the limit is 128")]
    TooLong {
        /// Field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// A field or parameter is malformed or unsupported.
    #[error("{0}")]
    Invalid(String),
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name exists with other attributes.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not possible in the current state (e.g. clones still read from the snapshot).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same object is in flight, or the pagination token is stale.
    #[error("{0}")]
    Aborted(String),
    /// Not enough capacity, or no node satisfies the topology.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The capacity range cannot be satisfied.
    #[error("{0}")]
    OutOfRange(String),
    /// The agent of a node cannot be reached.
    #[error("agent of node {node}: {why}")]
    Unavailable {
        /// Node.
        node: String,
        /// Why.
        why: String,
    },
    /// The agent answered with an error this layer did not expect.
    #[error("agent of node {node}: {message}")]
    Agent {
        /// Node.
        node: String,
        /// The agent's code.
        code: Code,
        /// The agent's message.
        message: String,
    },
    /// Not offered by this plugin.
    #[error("{0} is not supported by flashcopy.csi.io")]
    Unimplemented(&'static str),
    /// The node plugin failed to attach, format or mount (states the caller must change are
    /// mapped to FAILED_PRECONDITION before they get here).
    #[error("{0}")]
    Node(#[from] super::node::Error),
}

impl CsiError {
    /// Wraps an agent status from `node`.
    pub fn agent(node: &str, s: Status) -> Self {
        if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) {
            return CsiError::Unavailable {
                node: node.into(),
                why: s.message().into(),
            };
        }
        CsiError::Agent {
            node: node.into(),
            code: s.code(),
            message: s.message().into(),
        }
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            CsiError::Missing(_) | CsiError::TooLong { .. } | CsiError::Invalid(_) => {
                Code::InvalidArgument
            }
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Unavailable { .. } => Code::Unavailable,
            // The agent's own classification carries over (e.g. RESOURCE_EXHAUSTED for its
            // limits, FAILED_PRECONDITION for a state); other codes are our internal failures.
            CsiError::Agent { code, .. } => match code {
                Code::ResourceExhausted
                | Code::FailedPrecondition
                | Code::Unavailable
                | Code::Aborted => *code,
                _ => Code::Internal,
            },
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Node(_) => Code::Internal,
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Self {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "csi call failed");
        } else {
            tracing::debug!(error = %e, code = ?code, "csi call refused");
        }
        Status::new(code, e.to_string())
    }
}
