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
    }
}

/// A request error inside a batch: the message names the failing check.
pub fn batch_item_error(index: usize, error: &RequestError) -> Status {
    match error {
        RequestError::Invalid { .. } => {
            Status::invalid_argument(format!("checks[{index}]: {error}"))
        }
        RequestError::NotReady => Status::unavailable(error.to_string()),
    }
}
