//! The resumable upload endpoint (`docs/protocol.md`, "Files"): a gateway creates an
//! upload for a file's event, `PATCH`es the bytes (resuming after any break), and the
//! relay checks the SHA-256, moves the file to its object key and publishes the event
//! with a `dataref` through the stream sink.
//!
//! * [`key`] — the upload id and the object key, pure functions;
//! * [`store`] — the manifests, `.part` files and the commit into `objects/` (blocking I/O);
//! * [`objects`] — where finished files go, one interface with one module per store:
//!   the data dir's `objects/` or a bucket;
//! * [`error`] — how an upload request fails;
//! * [`registry`] — one lease per upload, newest request takes over, and the cached hash;
//! * [`sha`] — SHA-256 whose state is saved between parts, so a resumed upload is not
//!   read again;
//! * [`service`] — create, `PATCH`, `HEAD`, `DELETE`, completion and the abandoned-upload
//!   sweep, without HTTP;
//! * [`routes`] — the axum handlers.

pub mod config;
pub mod error;
pub mod key;
pub mod objects;
pub mod registry;
pub mod routes;
pub mod service;
pub mod sha;
pub mod store;

pub use error::UploadError;
pub use objects::{DirObjects, ObjectStore, S3Objects};
pub use service::{Settings, Uploads};
pub use store::{UPLOADS_DIR, UploadStore};

/// Room in a create's body for what surrounds its event.
pub const CREATE_OVERHEAD: u64 = 64 * 1024;
