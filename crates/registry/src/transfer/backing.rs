//! Where a transfer's bytes are kept: memory for small blobs, an anonymous spool file for
//! larger ones. The [`Sink`] writes (and hashes) them, off the async threads for files,
//! and tells the transfer how far it has got; readers read what is there.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream;
use mirrorlet_oci::digest::Verifier;
use mirrorlet_oci::{BlobStream, Budget, ByteRange};
use tokio::sync::mpsc;

use super::Transfer;

/// Batches queued between the network and the file writer.
const QUEUE: usize = 4;

/// The bytes of one copy of a blob, in order from its start.
#[derive(Debug)]
pub(crate) enum Backing {
    /// Batches in memory, each with its offset.
    Memory(Mutex<Vec<(u64, Bytes)>>),
    /// An anonymous spool file (gone when the last handle closes), and what chunks read
    /// from it count against.
    File(std::fs::File, Budget),
}

impl Backing {
    /// Reads up to `len` bytes at `pos`, which the caller knows are written.
    pub(crate) async fn read(self: &Arc<Self>, pos: u64, len: u64) -> io::Result<Bytes> {
        match &**self {
            Self::Memory(chunks) => {
                let chunks = chunks.lock().unwrap_or_else(PoisonError::into_inner);
                let i = chunks.partition_point(|(at, c)| at + c.len() as u64 <= pos);
                let (at, chunk) = chunks
                    .get(i)
                    .ok_or_else(|| io::Error::other("read past what was written"))?;
                let from = usize::try_from(pos - at).unwrap_or(usize::MAX);
                let to = from.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                Ok(chunk.slice(from..to.min(chunk.len())))
            }
            Self::File(_, budget) => {
                let len = usize::try_from(len).unwrap_or(0);
                let mut buf = budget.buffer(len).await;
                let me = self.clone();
                tokio::task::spawn_blocking(move || {
                    let Self::File(f, _) = &*me else {
                        return Err(io::Error::other("not a file"));
                    };
                    buf.data.resize(len, 0);
                    f.read_exact_at(&mut buf.data, pos)?;
                    Ok(buf.freeze())
                })
                .await
                .map_err(|e| io::Error::other(e.to_string()))?
            }
        }
    }

    /// Streams `range` of a complete copy. Reads are positional, so any number of streams
    /// of one copy can run at once.
    pub(crate) fn stream(self: &Arc<Self>, range: ByteRange) -> BlobStream {
        let me = self.clone();
        stream::unfold(range.start, move |pos| {
            let me = me.clone();
            async move {
                if pos >= range.end {
                    return None;
                }
                let want = (range.end - pos).min(super::READ_CHUNK);
                match me.read(pos, want).await {
                    Ok(c) if c.is_empty() => Some((
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "copy shorter than its size",
                        )),
                        range.end,
                    )),
                    Ok(c) => {
                        let next = pos + c.len() as u64;
                        Some((Ok(c), next))
                    }
                    Err(e) => Some((Err(e), range.end)),
                }
            }
        })
        .boxed()
    }

    /// Bytes held in memory (0 for a file).
    pub(crate) fn memory_bytes(&self) -> u64 {
        match self {
            Self::Memory(chunks) => chunks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(_, c)| c.len() as u64)
                .sum(),
            Self::File(..) => 0,
        }
    }
}

/// Writes one copy into its backing while hashing it, and advances the transfer.
pub(crate) struct Sink {
    kind: Kind,
    written: u64,
}

enum Kind {
    Memory {
        backing: Arc<Backing>,
        verifier: Verifier,
        transfer: Arc<Transfer>,
        generation: u32,
    },
    File {
        tx: mpsc::Sender<Bytes>,
        worker: tokio::task::JoinHandle<io::Result<Verifier>>,
    },
}

impl Sink {
    /// A copy kept in memory.
    pub(crate) fn memory(transfer: &Arc<Transfer>) -> (Self, Arc<Backing>) {
        let backing = Arc::new(Backing::Memory(Mutex::new(Vec::new())));
        let sink = Self {
            kind: Kind::Memory {
                backing: backing.clone(),
                verifier: transfer.digest.verifier(),
                transfer: transfer.clone(),
                generation: transfer.next_generation(),
            },
            written: 0,
        };
        (sink, backing)
    }

    /// A copy kept in an anonymous file in `dir`, written and hashed on a blocking thread;
    /// chunks read from it count against `budget`.
    pub(crate) async fn file(
        transfer: &Arc<Transfer>,
        dir: &Path,
        budget: Budget,
    ) -> io::Result<(Self, Arc<Backing>)> {
        let dir = dir.to_owned();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        let writer = file.try_clone()?;
        let backing = Arc::new(Backing::File(file, budget));
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
        let mut verifier = transfer.digest.verifier();
        let generation = transfer.next_generation();
        let transfer = transfer.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let mut at = 0u64;
            while let Some(batch) = rx.blocking_recv() {
                verifier.update(&batch);
                writer.write_all_at(&batch, at)?;
                at += batch.len() as u64;
                transfer.advance(generation, at);
            }
            Ok(verifier)
        });
        let sink = Self {
            kind: Kind::File { tx, worker },
            written: 0,
        };
        Ok((sink, backing))
    }

    /// Appends a batch.
    pub(crate) async fn write(&mut self, batch: Bytes) -> io::Result<()> {
        self.written += batch.len() as u64;
        match &mut self.kind {
            Kind::Memory {
                backing,
                verifier,
                transfer,
                generation,
            } => {
                verifier.update(&batch);
                if let Backing::Memory(chunks) = &**backing {
                    let mut chunks = chunks.lock().unwrap_or_else(PoisonError::into_inner);
                    let at = self.written - batch.len() as u64;
                    chunks.push((at, batch));
                }
                transfer.advance(*generation, self.written);
                Ok(())
            }
            Kind::File { tx, .. } => {
                if tx.send(batch).await.is_err() {
                    // The writer stopped: its error comes out of `finish`.
                    return Err(io::Error::other("writing the spool file failed"));
                }
                Ok(())
            }
        }
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Waits for everything to be written; returns whether the bytes match the digest.
    pub(crate) async fn finish(self) -> io::Result<bool> {
        match self.kind {
            Kind::Memory { verifier, .. } => Ok(verifier.matches()),
            Kind::File { tx, worker } => {
                drop(tx);
                let verifier = worker
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))??;
                Ok(verifier.matches())
            }
        }
    }
}
