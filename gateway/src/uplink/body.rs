//! A request body streamed from a spooled file: read in chunks on the blocking pool,
//! held back by the upload limit, handed to the HTTP client through a small channel. At
//! most [`QUEUED`] chunks wait in memory, whatever the file's size.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

/// Bytes read at a time.
pub(crate) const CHUNK: usize = 256 * 1024;
/// Chunks read ahead of the network.
const QUEUED: usize = 2;

/// The body half: what the HTTP client polls.
pub(crate) struct FileBody {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    remaining: u64,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Streams `path` from `offset` to `offset + len`. `pace(n)` is awaited before each
/// chunk of `n` bytes goes out (the upload limit); `sent` counts the bytes the client
/// has taken, which is also how a stalled connection is noticed. A file that is
/// shorter than promised ends the body with an error (the request fails; nothing
/// short is ever sent as complete).
pub(crate) fn stream_file<P, F>(
    path: PathBuf,
    offset: u64,
    len: u64,
    sent: Arc<AtomicU64>,
    pace: P,
) -> FileBody
where
    P: Fn(u64) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send,
{
    let (tx, rx) = mpsc::channel(QUEUED);
    tokio::spawn(async move {
        let opened = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(offset))?;
            Ok::<_, std::io::Error>(f)
        })
        .await;
        let mut file = match opened {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(e))).await;
                return;
            }
        };
        let mut left = len;
        while left > 0 {
            let want = (left as usize).min(CHUNK);
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                let mut got = 0;
                while got < want {
                    match file.read(&mut buf[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return (file, Err(e)),
                    }
                }
                buf.truncate(got);
                (file, Ok(buf))
            })
            .await;
            let (f, chunk) = match read {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            };
            file = f;
            let chunk = match chunk {
                Ok(c) if c.is_empty() => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the spooled file is shorter than recorded",
                )),
                other => other,
            };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let n = chunk.len() as u64;
            pace(n).await;
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                // The request was dropped (cut, stalled, shutting down).
                return;
            }
            sent.fetch_add(n, Relaxed);
            left -= n;
        }
    });
    FileBody { rx, remaining: len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    async fn collect(mut body: FileBody) -> Result<Vec<u8>, std::io::Error> {
        let mut out = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            out.extend_from_slice(&frame?.into_data().unwrap_or_default());
        }
        Ok(out)
    }

    #[tokio::test]
    async fn streams_the_range_in_chunks_and_counts_what_was_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(CHUNK * 3 + 10)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let paced = Arc::new(AtomicU64::new(0));
        let p = paced.clone();
        let body = stream_file(path, 5, data.len() as u64 - 5, sent.clone(), move |n| {
            p.fetch_add(n, Relaxed);
            async {}
        });
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64 - 5));
        assert_eq!(collect(body).await.unwrap(), &data[5..]);
        assert_eq!(sent.load(Relaxed), data.len() as u64 - 5);
        assert_eq!(paced.load(Relaxed), data.len() as u64 - 5);
    }

    #[tokio::test]
    async fn a_file_shorter_than_promised_fails_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"short").unwrap();
        let body = stream_file(path, 0, 100, Arc::default(), |_| async {});
        let e = collect(body).await.unwrap_err();
        assert!(e.to_string().contains("shorter"), "{e}");
        let missing = stream_file(dir.path().join("gone"), 0, 1, Arc::default(), |_| async {});
        assert!(collect(missing).await.is_err());
    }
}
