//! Every error that reaches an agent RPC becomes a [`tonic::Status`] here, in one place.
//!
//! The status message is the error's `Display`, which names the rule that was broken (with the
//! IBM message id where one exists); the code says what kind of failure it is, and the
//! `x-flashcopy-error` metadata entry carries the error's kind (the variant name) for programs.

use crate::engine::EngineError;
use crate::store::StoreError;
use crate::volume::VolumeError;
use tonic::{Code, Status};

/// The metadata key that carries the error kind.
pub const ERROR_KIND_KEY: &str = "x-flashcopy-error";

/// Why an agent RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The pool rejected the command or failed.
    #[error(transparent)]
    Pool(#[from] VolumeError),
    /// A volume, mapping or group named by a request does not exist.
    #[error("{kind} {reference:?} does not exist")]
    NotFound {
        /// "volume", "mapping" or "consistency group".
        kind: &'static str,
        /// The id or name given.
        reference: String,
    },
    /// A request field is malformed (before the pool sees it).
    #[error("{0}")]
    InvalidArgument(String),
    /// The agent is shutting down and takes no new work.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// A blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<EngineError> for AgentError {
    fn from(e: EngineError) -> Self {
        AgentError::Pool(VolumeError::Engine(e))
    }
}

impl AgentError {
    /// The gRPC code and the error kind.
    pub fn classify(&self) -> (Code, &'static str) {
        match self {
            AgentError::Pool(e) => classify_volume(e),
            AgentError::NotFound { .. } => (Code::NotFound, "NotFound"),
            AgentError::InvalidArgument(_) => (Code::InvalidArgument, "InvalidArgument"),
            AgentError::ShuttingDown => (Code::Unavailable, "ShuttingDown"),
            AgentError::Internal(_) => (Code::Internal, "Internal"),
        }
    }
}

fn classify_volume(e: &VolumeError) -> (Code, &'static str) {
    match e {
        VolumeError::Engine(e) => classify_engine(e),
        VolumeError::AlreadyPrepared(_) => (Code::FailedPrecondition, "AlreadyPrepared"),
        VolumeError::FreezeOver => (Code::Aborted, "FreezeOver"),
        VolumeError::Store(StoreError::Unsupported(_)) => (Code::FailedPrecondition, "Unsupported"),
        // No free block device (or a full file system) for a new volume.
        VolumeError::Store(StoreError::Io(e)) if e.kind() == std::io::ErrorKind::StorageFull => {
            (Code::ResourceExhausted, "NoSpace")
        }
        VolumeError::Store(_) => (Code::Internal, "Store"),
        // The copy's mapping was stopped; the operation did not happen.
        VolumeError::CopyIo { .. } => (Code::Aborted, "CopyIo"),
        VolumeError::Meta(_) => (Code::Internal, "Meta"),
        VolumeError::Decode(_) => (Code::Internal, "Decode"),
        VolumeError::MissingStore { .. } => (Code::Internal, "MissingStore"),
        // Nothing will succeed until the agent restarts; clients may retry after that.
        VolumeError::Poisoned(_) => (Code::Unavailable, "Poisoned"),
    }
}

/// Exhaustive on purpose: a new engine rule must choose its code here.
fn classify_engine(e: &EngineError) -> (Code, &'static str) {
    use Code::*;
    use EngineError as E;
    match e {
        E::NoSuchVolume(_) => (NotFound, "NoSuchVolume"),
        E::NoSuchMapping(_) => (NotFound, "NoSuchMapping"),
        E::NoSuchGroup(_) => (NotFound, "NoSuchGroup"),
        E::IdInUse(_) => (AlreadyExists, "IdInUse"),
        E::NameInUse(_) => (AlreadyExists, "NameInUse"),
        E::TargetInUse(..) => (AlreadyExists, "TargetInUse"),
        E::InvalidName(_) => (InvalidArgument, "InvalidName"),
        E::InvalidSize(_) => (InvalidArgument, "InvalidSize"),
        E::InvalidOrigin(_) => (InvalidArgument, "InvalidOrigin"),
        E::InvalidRate(_) => (InvalidArgument, "InvalidRate"),
        E::SizeMismatch { .. } => (InvalidArgument, "SizeMismatch"),
        E::GrowInsideGrain { .. } => (FailedPrecondition, "GrowInsideGrain"),
        E::SameVolume(_) => (InvalidArgument, "SameVolume"),
        E::GrainSizeConflict { .. } => (InvalidArgument, "GrainSizeConflict"),
        E::NameWithOtherChanges => (InvalidArgument, "NameWithOtherChanges"),
        E::OutOfRange { .. } => (OutOfRange, "OutOfRange"),
        E::VolumeInUse(..) => (FailedPrecondition, "VolumeInUse"),
        E::BadState { .. } => (FailedPrecondition, "BadState"),
        E::BadGroupState { .. } => (FailedPrecondition, "BadGroupState"),
        E::InGroup(..) => (FailedPrecondition, "InGroup"),
        E::NotInGroup { .. } => (FailedPrecondition, "NotInGroup"),
        E::TargetIsActiveSource { .. } => (FailedPrecondition, "TargetIsActiveSource"),
        E::SplitIncomplete(..) => (FailedPrecondition, "SplitIncomplete"),
        E::DeleteNeedsForce(_) => (FailedPrecondition, "DeleteNeedsForce"),
        E::GroupNotEmpty(..) => (FailedPrecondition, "GroupNotEmpty"),
        E::GroupBusy(..) => (FailedPrecondition, "GroupBusy"),
        E::TooManyMapsForSource(..) => (ResourceExhausted, "TooManyMapsForSource"),
        E::ConnectedSetFull(_) => (ResourceExhausted, "ConnectedSetFull"),
        E::TooManyMaps(_) => (ResourceExhausted, "TooManyMaps"),
        E::TooManyGroups(_) => (ResourceExhausted, "TooManyGroups"),
        E::GroupFull(..) => (ResourceExhausted, "GroupFull"),
        E::BitmapBudget { .. } => (ResourceExhausted, "BitmapBudget"),
        E::VolumeOffline { .. } => (Unavailable, "VolumeOffline"),
        E::NotAPointInTime { .. } => (FailedPrecondition, "NotAPointInTime"),
        E::DifferentSources { .. } => (InvalidArgument, "DifferentSources"),
        E::BaseNotOlder { .. } => (InvalidArgument, "BaseNotOlder"),
        E::OffsetPastEnd { .. } => (OutOfRange, "OffsetPastEnd"),
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Self {
        let (code, kind) = e.classify();
        if code == Code::Internal {
            tracing::error!(error = %e, kind, "agent request failed");
        } else {
            tracing::debug!(error = %e, kind, ?code, "agent request rejected");
        }
        let mut status = Status::new(code, e.to_string());
        status.metadata_mut().insert(
            ERROR_KIND_KEY,
            tonic::metadata::MetadataValue::from_static(kind),
        );
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{MapId, MapState, VolId};

    #[test]
    fn codes_follow_the_rule_kinds() {
        let cases = [
            (EngineError::NoSuchMapping(MapId(1)).into(), Code::NotFound),
            (
                EngineError::NameInUse("a".into()).into(),
                Code::AlreadyExists,
            ),
            (
                EngineError::BadState {
                    map: MapId(1),
                    state: MapState::IdleOrCopied,
                    action: "start",
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                EngineError::GrowInsideGrain {
                    vol: VolId(1),
                    size: 1536,
                    map: MapId(1),
                    grain: 65536,
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (EngineError::TooManyMaps(1).into(), Code::ResourceExhausted),
            (
                AgentError::Pool(VolumeError::AlreadyPrepared(MapId(1))),
                Code::FailedPrecondition,
            ),
            (
                AgentError::Pool(VolumeError::Poisoned("x".into())),
                Code::Unavailable,
            ),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let s = Status::from(err);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
            assert!(s.metadata().get(ERROR_KIND_KEY).is_some());
        }
    }
}
