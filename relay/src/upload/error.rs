//! How an upload request fails, and the blocking I/O every part of the upload code runs.

use std::io;

/// Why an upload request failed; each names what is wrong in one sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 408: the body stopped arriving; `offset` bytes are held.
    #[error("{message}")]
    Idle { message: String, offset: u64 },
    /// 409: the request's offset is not the bytes held (or a newer request took over).
    #[error("{message}")]
    Conflict { message: String, offset: u64 },
    /// 413: the file is over `max_object_bytes`, or the body goes past its length.
    #[error("{message}")]
    TooLarge {
        message: String,
        offset: Option<u64>,
    },
    /// 422: all bytes arrived but their digest is not the announced one.
    #[error(
        "the file's SHA-256 is {actual}, not {expected} as announced when the upload was created; its bytes were discarded, so send it again from offset 0"
    )]
    DigestMismatch { expected: String, actual: String },
    /// 503 with `sink.retry_after`: the disk or the stream sink failed, or the relay stops.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug or a damaged data dir.
    #[error("{0}")]
    Internal(String),
}

/// Runs blocking file work; an I/O error is a 503 (the disk may come back) and logged.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, UploadError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "The relay could not {what}; the upload is answered 503 and its gateway retries.");
            Err(UploadError::Unavailable(format!(
                "the relay cannot {what}: {e}"
            )))
        }
        Err(e) => Err(UploadError::Internal(format!(
            "the relay failed to {what}: {e}"
        ))),
    }
}
