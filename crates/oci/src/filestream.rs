//! Streaming a range of an open file as bounded chunks: the one piece of I/O in this crate,
//! shared by the containerd store (blob files) and the registry (its spool of verified
//! peer content). Chunks are read on the blocking pool by a small task that stays at most
//! `READ_AHEAD` chunks ahead of the consumer, so memory per stream is bounded and a slow
//! client never pins a blocking thread; every chunk is counted against a [`Budget`], so
//! the memory of all streams together is bounded too.

use std::io::{self, Read, Seek, SeekFrom};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::budget::Budget;
use crate::store::{BlobStream, ByteRange};

/// Bytes per chunk (1 MiB measured best here: see BENCHMARKS.md).
pub const CHUNK: usize = 1024 * 1024;
/// Chunks read ahead of the consumer.
pub const READ_AHEAD: usize = 2;

/// Streams `range` of `file`, its chunks counted against `budget`. The caller has checked
/// the range against the file's size; a file that turns out shorter ends the stream with
/// an error.
pub fn stream(mut file: std::fs::File, range: ByteRange, budget: Budget) -> BlobStream {
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
        read_chunks(file, range.len(), tx, budget).await;
    });
    ReceiverStream::new(rx).boxed()
}

async fn read_chunks(
    mut file: std::fs::File,
    mut left: u64,
    tx: mpsc::Sender<io::Result<Bytes>>,
    budget: Budget,
) {
    let held = budget.stream();
    while left > 0 {
        let most = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        // A client that went away gives up its place in the budget's queue at once.
        let mut buf = tokio::select! {
            buf = budget.buffer_for(&held, most) => buf,
            () = tx.closed() => return,
        };
        let want = buf.limit() as u64;
        let read = tokio::task::spawn_blocking(move || {
            let got = (&mut file).take(want).read_to_end(&mut buf.data);
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
            Ok(buf) if buf.data.len() as u64 == want => buf.freeze(),
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
        if tx.send(Ok(chunk)).await.is_err() {
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
                Budget::default(),
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
            Budget::default(),
        );
        let mut failed = false;
        while let Some(c) = s.next().await {
            failed |= c.is_err();
        }
        assert!(failed, "a short file ends the stream with an error");
    }

    #[tokio::test]
    async fn streams_together_hold_no_more_than_the_budget() {
        // Each stream opens the file itself (clones of one handle share its offset).
        let path = std::env::temp_dir().join(format!(
            "mirrorlet-filestream-budget-{}",
            std::process::id()
        ));
        let data: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let budget = Budget::new(3 * CHUNK);
        let range = ByteRange {
            start: 0,
            end: data.len() as u64,
        };
        // Eight streams nobody reads: each would read ahead, but together they stop at
        // the budget (without it: 8 x (READ_AHEAD + 1) chunks).
        let streams: Vec<_> = (0..8)
            .map(|_| {
                stream(
                    std::fs::File::open(&path).expect("open"),
                    range,
                    budget.clone(),
                )
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while budget.in_use() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the streams never read"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Give them every chance to read more than they may.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            budget.in_use() <= 3 * CHUNK,
            "the budget is not exceeded: {}",
            budget.in_use()
        );
        // Read together, every one delivers the whole file within the budget.
        let reads = streams.into_iter().map(|mut s| {
            let budget = budget.clone();
            async move {
                let mut got = Vec::new();
                while let Some(c) = s.next().await {
                    got.extend_from_slice(&c.expect("chunk"));
                    assert!(budget.in_use() <= 3 * CHUNK);
                }
                got
            }
        });
        let all = futures_util::future::join_all(reads).await;
        let _ = std::fs::remove_file(&path);
        for got in all {
            assert!(got == data, "a stream delivered other bytes");
        }
        assert_eq!(budget.in_use(), 0);
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
