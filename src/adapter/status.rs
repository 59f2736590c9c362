//! The one place where engine errors become gRPC statuses.

use tonic::Status;

use crate::engine::RequestError;

/// A request error as a gRPC status. Malformed input is `INVALID_ARGUMENT`
/// with a message that names the field; a server with no policy set loaded
/// yet answers `UNAVAILABLE`, so clients retry elsewhere.
pub fn request_error(error: &RequestError) -> Status {
    match error {
        RequestError::Invalid { .. } => Status::invalid_argument(error.to_string()),
        RequestError::NotReady => Status::unavailable(error.to_string()),
        RequestError::Internal(_) => Status::internal(error.to_string()),
    }
}

/// A request error inside a batch: the message names the failing check.
pub fn batch_item_error(index: usize, error: &RequestError) -> Status {
    match error {
        RequestError::Invalid { .. } => {
            Status::invalid_argument(format!("checks[{index}]: {error}"))
        }
        RequestError::NotReady => Status::unavailable(error.to_string()),
        RequestError::Internal(_) => Status::internal(format!("checks[{index}]: {error}")),
    }
}

/// `min_data_revision` that is not a revision.
pub fn invalid_revision(text: &str) -> Status {
    Status::invalid_argument(format!(
        "`min_data_revision` must be a data revision (a source position, a number), got `{text}`"
    ))
}

/// Sync did not reach `min_data_revision` in time, or cannot (no source
/// with positions): the caller may retry later.
pub fn revision_not_reached(wanted: u64, current: Option<u64>, detail: &str) -> Status {
    let current = current.map_or_else(|| "none".to_string(), |p| p.to_string());
    Status::failed_precondition(format!(
        "data revision {wanted} not reached (current: {current}): {detail}"
    ))
}

/// How much of an input value an error message quotes.
pub const QUOTED_PREFIX_BYTES: usize = 256;

/// `text`, or its first [`QUOTED_PREFIX_BYTES`] (cut at a character
/// boundary) and its length, so a message never echoes a large input.
pub fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    crate::engine::bounded(text, QUOTED_PREFIX_BYTES)
}

/// The caller is not in `tls.allowed_callers` / `uds.allowed_uids`.
pub fn caller_refused(listener: &str, identity: &str) -> Status {
    let key = if listener == "uds" {
        "uds.allowed_uids"
    } else {
        "tls.allowed_callers"
    };
    Status::permission_denied(format!("caller `{}` is not in `{key}`", bounded(identity)))
}

/// The call's `grpc-timeout` had passed when it arrived: not evaluated.
pub fn deadline_passed() -> Status {
    Status::deadline_exceeded("the call's deadline (`grpc-timeout`) passed before evaluation")
}

/// More calls in flight than `max_in_flight`: shed, not queued.
pub fn too_many_in_flight(max: usize) -> Status {
    Status::resource_exhausted(format!(
        "too many calls in flight ({max}; `max_in_flight`): retry later"
    ))
}

/// A request message that is not valid protobuf for its type.
pub fn undecodable(detail: &str) -> Status {
    Status::invalid_argument(format!(
        "the request message cannot be decoded: {}",
        bounded(detail)
    ))
}
