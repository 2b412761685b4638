//! The CSI calls the snapshot controller makes, as a narrow trait so reconcile logic is tested
//! without the CSI proto. Errors keep the gRPC code: §A.10 decides final vs non-final from it.

use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::time::Duration;

/// Credentials from a class's secret, passed to the driver as CSI `secrets`.
pub type Secrets = BTreeMap<String, String>;

/// One storage snapshot as the driver reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot id (becomes the snapshot handle).
    pub snapshot_id: String,
    /// The source volume id.
    pub source_volume_id: String,
    /// Nanoseconds since the epoch; 0 when the driver did not say.
    pub creation_time_ns: i64,
    /// Bytes; 0 when unknown.
    pub size_bytes: i64,
    /// Whether it can be restored from.
    pub ready_to_use: bool,
    /// The group snapshot it belongs to, empty if none.
    pub group_snapshot_id: String,
}

/// One storage group snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupSnapshotInfo {
    /// The group snapshot id.
    pub group_snapshot_id: String,
    /// Its members.
    pub snapshots: Vec<SnapshotInfo>,
    /// Nanoseconds since the epoch; 0 when the driver did not say.
    pub creation_time_ns: i64,
    /// Whether every member can be restored from.
    pub ready_to_use: bool,
}

/// A failed CSI call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.map(|c| format!("{c:?}")).unwrap_or_else(|| "no gRPC status".into()))]
pub struct DriverError {
    /// The gRPC code; `None` when the failure was not a gRPC status (connection, timeout wrapper).
    pub code: Option<tonic::Code>,
    /// The driver's message.
    pub message: String,
}

impl DriverError {
    /// An error with a gRPC code.
    pub fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        DriverError {
            code: Some(code),
            message: message.into(),
        }
    }

    /// §A.10: Canceled, DeadlineExceeded, Unavailable, ResourceExhausted, Aborted and non-gRPC
    /// failures are non-final: the operation may still be in progress on the storage side.
    pub fn is_final(&self) -> bool {
        use tonic::Code::*;
        !matches!(
            self.code,
            None | Some(Cancelled | DeadlineExceeded | Unavailable | ResourceExhausted | Aborted)
        )
    }

    /// Whether the driver said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code == Some(tonic::Code::NotFound)
    }
}

impl From<tonic::Status> for DriverError {
    fn from(s: tonic::Status) -> Self {
        DriverError::new(s.code(), s.message())
    }
}

/// Result of a driver call.
pub type DriverResult<T> = Result<T, DriverError>;

/// The CSI controller and group-controller calls of the snapshot controller.
pub trait SnapshotDriver: Send + Sync {
    /// CreateSnapshot (idempotent by `name`).
    fn create_snapshot<'a>(
        &'a self,
        name: &'a str,
        source_volume_id: &'a str,
        parameters: &'a BTreeMap<String, String>,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<SnapshotInfo>>;

    /// DeleteSnapshot (absent is success).
    fn delete_snapshot<'a>(
        &'a self,
        snapshot_id: &'a str,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<()>>;

    /// ListSnapshots filtered by `snapshot_id`: `None` when the driver does not know it.
    fn get_snapshot<'a>(
        &'a self,
        snapshot_id: &'a str,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<Option<SnapshotInfo>>>;

    /// CreateVolumeGroupSnapshot (idempotent by `name`).
    fn create_group_snapshot<'a>(
        &'a self,
        name: &'a str,
        source_volume_ids: &'a [String],
        parameters: &'a BTreeMap<String, String>,
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<GroupSnapshotInfo>>;

    /// DeleteVolumeGroupSnapshot (absent is success).
    fn delete_group_snapshot<'a>(
        &'a self,
        group_snapshot_id: &'a str,
        snapshot_ids: &'a [String],
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<()>>;

    /// GetVolumeGroupSnapshot.
    fn get_group_snapshot<'a>(
        &'a self,
        group_snapshot_id: &'a str,
        snapshot_ids: &'a [String],
        secrets: &'a Secrets,
    ) -> BoxFuture<'a, DriverResult<GroupSnapshotInfo>>;
}

/// Runs a driver call with a deadline; running out is DeadlineExceeded (non-final).
pub async fn with_timeout<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = DriverResult<T>>,
) -> DriverResult<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(DriverError::new(
            tonic::Code::DeadlineExceeded,
            format!("no answer from the CSI driver within {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_and_non_final_codes() {
        use tonic::Code::*;
        for c in [
            Cancelled,
            DeadlineExceeded,
            Unavailable,
            ResourceExhausted,
            Aborted,
        ] {
            assert!(!DriverError::new(c, "").is_final(), "{c:?}");
        }
        for c in [
            InvalidArgument,
            NotFound,
            AlreadyExists,
            FailedPrecondition,
            Internal,
            Unknown,
        ] {
            assert!(DriverError::new(c, "").is_final(), "{c:?}");
        }
        let no_status = DriverError {
            code: None,
            message: "connection refused".into(),
        };
        assert!(!no_status.is_final());
    }

    #[tokio::test]
    async fn timeout_is_deadline_exceeded() {
        let err = with_timeout(Duration::from_millis(10), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        })
        .await
        .unwrap_err();
        assert_eq!(err.code, Some(tonic::Code::DeadlineExceeded));
        assert!(!err.is_final());
    }
}
