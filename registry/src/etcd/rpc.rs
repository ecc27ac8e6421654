//! Talking to etcd: one request under the [`REQUEST_TIMEOUT`] deadline,
//! etcd's errors sorted into refusals and transient failures, and the
//! listing of the whole prefix. Every job sends its requests through here,
//! so each gets the same deadline and the same error contract.

use std::future::Future;

use etcd_client::GetOptions;

use super::{EtcdRegistry, REQUEST_TIMEOUT};
use crate::RegistryError;

impl EtcdRegistry {
    /// Every key under the prefix, and the revision of the listing.
    pub(super) async fn list(&mut self) -> Result<(i64, Vec<etcd_client::KeyValue>), RegistryError> {
        let root = self.keys.root.clone();
        let what = format!("listing {root}");
        let mut response =
            rpc(&self.endpoints, &what, self.kv.get(root.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = response.header().map(|h| h.revision()).ok_or_else(|| {
            RegistryError::Unreachable(format!("{what}: etcd at {} answered without a revision", self.endpoints))
        })?;
        Ok((revision, response.take_kvs()))
    }
}

/// Runs one etcd request with the [`REQUEST_TIMEOUT`] deadline.
pub(super) async fn rpc<T>(
    endpoints: &str,
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(map_error(endpoints, what, e)),
        Err(_) => Err(timed_out(endpoints, what)),
    }
}

pub(super) fn timed_out(endpoints: &str, what: &str) -> RegistryError {
    RegistryError::Unreachable(format!(
        "{what}: etcd at {endpoints} did not answer within {} s",
        REQUEST_TIMEOUT.as_secs()
    ))
}

/// etcd's answers that retrying will not change are refusals; everything
/// else (connection refused or lost, no leader, timeouts) is transient.
pub(super) fn map_error(endpoints: &str, what: &str, error: etcd_client::Error) -> RegistryError {
    // gRPC codes: INVALID_ARGUMENT 3, NOT_FOUND 5, ALREADY_EXISTS 6,
    // PERMISSION_DENIED 7, RESOURCE_EXHAUSTED 8, FAILED_PRECONDITION 9,
    // OUT_OF_RANGE 11, UNIMPLEMENTED 12, UNAUTHENTICATED 16.
    const REFUSALS: [i32; 9] = [3, 5, 6, 7, 8, 9, 11, 12, 16];
    match error {
        etcd_client::Error::GRpcStatus(status) if REFUSALS.contains(&i32::from(status.code())) => {
            RegistryError::Refused {
                what: format!("{what} (etcd {endpoints})"),
                reason: format!("{:?}: {}", status.code(), status.message()),
            }
        }
        etcd_client::Error::GRpcStatus(status) => RegistryError::Unreachable(format!(
            "{what}: etcd at {endpoints}: {:?}: {}",
            status.code(),
            status.message()
        )),
        other => RegistryError::Unreachable(format!("{what}: etcd at {endpoints}: {other}")),
    }
}
