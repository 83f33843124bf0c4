//! Objects as files: `<data_dir>/objects/<key>`. The whole `.part` is fsynced and renamed
//! into place at the end ([`UploadStore::commit`]), so an object is never visible
//! half-written.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use pigeon_shared::ce::GatewayId;

use super::{ObjectError, ObjectStore};
use crate::upload::error::{UploadError, blocking};
use crate::upload::store::{Manifest, UploadStore, hash_prefix};

/// The objects directory of the data dir.
#[derive(Debug)]
pub struct DirObjects {
    store: Arc<UploadStore>,
}

impl DirObjects {
    pub fn new(store: Arc<UploadStore>) -> Self {
        Self { store }
    }

    /// The object's length, if it is there.
    async fn len(&self, key: &str) -> Result<Option<u64>, UploadError> {
        let store = self.store.clone();
        let key = key.to_owned();
        blocking("look for the object", move || store.object_len(&key)).await
    }
}

/// What a store without parts answers when asked for them: a bug.
fn no_parts() -> UploadError {
    UploadError::Internal("objects.kind = \"files\" takes no parts".to_owned())
}

impl ObjectStore for DirObjects {
    fn key_prefix(&self, _tenant: &str) -> String {
        String::new()
    }

    fn part_size(&self) -> Option<u64> {
        None
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, UploadError>> {
        Box::pin(async move { Ok(self.len(key).await?.is_some()) })
    }

    /// Read back from disk: the file at the key may be another one.
    fn stored_digest<'a>(
        &'a self,
        m: &'a Manifest,
    ) -> BoxFuture<'a, Result<Option<String>, UploadError>> {
        Box::pin(async move {
            if self.len(&m.key).await? != Some(m.length) {
                return Ok(None);
            }
            let path = self.store.object_path(&m.key);
            let length = m.length;
            let hashed =
                blocking("read the object back", move || hash_prefix(&path, length)).await?;
            Ok(Some(hashed.hex()))
        })
    }

    fn begin_parts<'a>(&'a self, _m: &'a Manifest) -> BoxFuture<'a, Result<String, UploadError>> {
        Box::pin(async { Err(no_parts()) })
    }

    fn send_part<'a>(
        &'a self,
        _m: &'a Manifest,
        _parts_id: &'a str,
        _number: u32,
        _path: &'a Path,
        _length: u64,
    ) -> BoxFuture<'a, Result<String, ObjectError>> {
        Box::pin(async { Err(ObjectError::Failed(no_parts())) })
    }

    fn commit<'a>(
        &'a self,
        gateway: &'a GatewayId,
        id: &'a str,
        m: &'a Manifest,
    ) -> BoxFuture<'a, Result<(), ObjectError>> {
        Box::pin(async move {
            let store = self.store.clone();
            let (g, i, k) = (gateway.clone(), id.to_owned(), m.key.clone());
            blocking("store the object", move || store.commit(&g, &i, &k)).await?;
            Ok(())
        })
    }

    /// A manifest with parts comes from a relay that stored into S3 before.
    fn abort<'a>(
        &'a self,
        gateway: &'a GatewayId,
        id: &'a str,
        m: &'a Manifest,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(mp) = &m.multipart {
                tracing::warn!(gateway = %gateway, upload = %id, upload_id = ?mp.upload_id, "An upload into S3 was dropped while objects.kind is not \"s3\"; its parts stay in the bucket until a lifecycle rule removes them.");
            }
        })
    }

    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), UploadError>> {
        Box::pin(async move {
            let path = self.store.object_path(key);
            blocking("remove the object", move || {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            })
            .await
        })
    }

    fn sweep_orphans(&self, _now: SystemTime, _abandon_after: Duration) -> BoxFuture<'_, usize> {
        Box::pin(async { 0 })
    }
}
