//! Streaming a range of an open file as bounded chunks: the one piece of I/O in this crate,
//! shared by the containerd store (blob files) and the registry (its spool of verified
//! peer content). Chunks are read on the blocking pool by a small task that stays at most
//! `READ_AHEAD` chunks ahead of the consumer, so memory per stream is bounded and a slow
//! client never pins a blocking thread.

use std::io::{self, Read, Seek, SeekFrom};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::store::{BlobStream, ByteRange};

/// Bytes per chunk (1 MiB measured best here: see BENCHMARKS.md).
pub const CHUNK: usize = 1024 * 1024;
/// Chunks read ahead of the consumer.
pub const READ_AHEAD: usize = 2;

/// Streams `range` of `file`. The caller has checked the range against the file's size; a
/// file that turns out shorter ends the stream with an error.
pub fn stream(mut file: std::fs::File, range: ByteRange) -> BlobStream {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        let start = range.start;
        let seeked =
            tokio::task::spawn_blocking(move || file.seek(SeekFrom::Start(start)).map(|_| file))
                .await;
        let file = match seeked {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                return;
            }
        };
        read_chunks(file, range.len(), tx).await;
    });
    ReceiverStream::new(rx).boxed()
}

async fn read_chunks(mut file: std::fs::File, mut left: u64, tx: mpsc::Sender<io::Result<Bytes>>) {
    while left > 0 {
        let want = left.min(CHUNK as u64);
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(CHUNK));
            let got = (&mut file).take(want).read_to_end(&mut buf);
            (file, got.map(|_| buf))
        })
        .await;
        let (f, result) = match read {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                return;
            }
        };
        file = f;
        let chunk = match result {
            Ok(buf) if buf.len() as u64 == want => buf,
            Ok(_) => {
                let short = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file is shorter than expected",
                );
                let _ = tx.send(Err(short)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        left -= want;
        if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
            return; // The consumer went away.
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[tokio::test]
    async fn streams_ranges_in_bounded_chunks() {
        let mut f = tempfile_in_target();
        let data: Vec<u8> = (0..3 * CHUNK + 123).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).expect("write");
        for (start, end) in [
            (0, data.len()),
            (5, CHUNK + 7),
            (data.len() - 1, data.len()),
            (10, 10),
        ] {
            let file = f.try_clone().expect("clone");
            let mut s = stream(
                file,
                ByteRange {
                    start: start as u64,
                    end: end as u64,
                },
            );
            let mut got = Vec::new();
            while let Some(c) = s.next().await {
                let c = c.expect("chunk");
                assert!(c.len() <= CHUNK);
                got.extend_from_slice(&c);
            }
            assert_eq!(got, &data[start..end]);
        }
        let file = f.try_clone().expect("clone");
        let mut s = stream(
            file,
            ByteRange {
                start: 0,
                end: data.len() as u64 + 1,
            },
        );
        let mut failed = false;
        while let Some(c) = s.next().await {
            failed |= c.is_err();
        }
        assert!(failed, "a short file ends the stream with an error");
    }

    fn tempfile_in_target() -> std::fs::File {
        let path =
            std::env::temp_dir().join(format!("mirrorlet-filestream-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        let _ = std::fs::remove_file(&path);
        f
    }
}
