//! Where a transfer's bytes are kept: memory for small blobs, an anonymous spool file for
//! larger ones. The [`Sink`] writes and hashes them (for a file, on two blocking threads
//! at once: one writes, the other hashes what was written, in order) and tells the
//! transfer how far it has got; readers read what is there.

use std::collections::BTreeMap;
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

/// Batches written and queued for the hasher: enough to keep both threads busy.
const HASH_QUEUE: usize = 2;

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
}

enum Kind {
    Memory {
        backing: Arc<Backing>,
        verifier: Verifier,
        transfer: Arc<Transfer>,
        generation: u32,
        written: u64,
    },
    File {
        lane: LaneWriter,
        writer: tokio::task::JoinHandle<io::Result<()>>,
        hasher: tokio::task::JoinHandle<io::Result<(Verifier, u64)>>,
    },
}

/// Writes batches of a spooled copy at their offsets, from another task (one reading a
/// part of the blob: see `fill::parts`).
#[derive(Clone)]
pub(crate) struct LaneWriter {
    tx: mpsc::Sender<(u64, Bytes)>,
    budget: Budget,
}

impl LaneWriter {
    /// Writes `batch` at `at` (bytes already written there are kept, not overwritten),
    /// once the spool budget has room for it; it holds its share until written and hashed.
    pub(crate) async fn write_at(&self, at: u64, batch: Bytes) -> io::Result<()> {
        let batch = self.budget.count(batch).await;
        self.tx
            .send((at, batch))
            .await
            .map_err(|_| io::Error::other("writing the spool file failed"))
    }
}

/// What a spool writer knows of the bytes written: the prefix written whole from the
/// start, and what was written beyond it (ranges from other parts, coalesced), which the
/// prefix takes in when it reaches them.
#[derive(Debug, Default)]
struct Written {
    prefix: u64,
    /// Start -> end of the ranges written beyond `prefix`.
    ahead: BTreeMap<u64, u64>,
}

impl Written {
    /// The parts of `[at, end)` not written yet, in order.
    fn gaps(&self, at: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut from = at.max(self.prefix);
        // A range that starts before `from` may cover it.
        if let Some((_, &e)) = self.ahead.range(..=from).next_back() {
            from = from.max(e);
        }
        if from >= end {
            return gaps;
        }
        for (&s, &e) in self.ahead.range(from..end) {
            if s > from {
                gaps.push((from, s));
            }
            from = from.max(e);
        }
        if from < end {
            gaps.push((from, end));
        }
        gaps
    }

    /// Records `[at, end)` as written: it extends the prefix if it starts there, and is
    /// kept ahead of it otherwise.
    fn add(&mut self, at: u64, end: u64) {
        if at == self.prefix {
            self.prefix = end;
            return;
        }
        let (mut s, mut e) = (at, end);
        if let Some((&ps, &pe)) = self.ahead.range(..=s).next_back()
            && pe >= s
        {
            s = ps;
            e = e.max(pe);
        }
        while let Some((&ns, &ne)) = self.ahead.range(s..).next()
            && ns <= e
        {
            self.ahead.remove(&ns);
            e = e.max(ne);
        }
        self.ahead.insert(s, e);
    }

    /// Takes into the prefix the range written ahead that now continues it, if any, and
    /// returns that range's new part (to read back and hash).
    fn take_continued(&mut self) -> Option<(u64, u64)> {
        let (&s, &e) = self.ahead.first_key_value()?;
        if s > self.prefix {
            return None;
        }
        self.ahead.remove(&s);
        let from = self.prefix;
        self.prefix = self.prefix.max(e);
        (e > from).then_some((from, e))
    }
}

/// What the hasher is given, in the blob's order.
enum ToHash {
    /// Bytes just written, still in memory.
    Written(Bytes),
    /// A range written earlier, ahead of the prefix, to read back from the file.
    Spooled(u64, u64),
}

/// Bytes read back from the spool at a time to hash a range written out of order (a
/// buffer per spooled copy, outside the stream budget: kept small).
const REHASH_CHUNK: u64 = 64 << 10;

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
                written: 0,
            },
        };
        (sink, backing)
    }

    /// A copy kept in an anonymous file in `dir`; chunks read from it count against
    /// `budget`, batches on their way into it against `batches`. Batches can come at any
    /// offset (several parts at once) and each byte is written once, on a blocking thread.
    /// Another hashes the prefix written, in order, as it grows (from the batches
    /// themselves, or read back from the file where other parts wrote ahead of it), so
    /// writing and hashing take a core each. The transfer advances with the prefix
    /// written: its last byte is held back until the whole is verified (see
    /// [`Transfer::read`]).
    pub(crate) async fn file(
        transfer: &Arc<Transfer>,
        dir: &Path,
        budget: Budget,
        batches: Budget,
    ) -> io::Result<(Self, Arc<Backing>)> {
        let dir = dir.to_owned();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        let out = file.try_clone()?;
        let back = file.try_clone()?;
        let (tx, mut rx) = mpsc::channel::<(u64, Bytes)>(QUEUE);
        let lane = LaneWriter {
            tx,
            budget: batches,
        };
        let backing = Arc::new(Backing::File(file, budget));
        let (to_hash, hash_rx) = std::sync::mpsc::sync_channel::<ToHash>(HASH_QUEUE);
        let mut verifier = transfer.digest.verifier();
        let generation = transfer.next_generation();
        let transfer = transfer.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let stopped = |_| io::Error::other("hashing the spool file stopped");
            let mut w = Written::default();
            while let Some((at, batch)) = rx.blocking_recv() {
                let end = at + batch.len() as u64;
                for (s, e) in w.gaps(at, end) {
                    let piece = batch.slice(
                        usize::try_from(s - at).unwrap_or(0)..usize::try_from(e - at).unwrap_or(0),
                    );
                    out.write_all_at(&piece, s)?;
                    let extends = s == w.prefix;
                    w.add(s, e);
                    if extends {
                        to_hash.send(ToHash::Written(piece)).map_err(stopped)?;
                        while let Some((s, e)) = w.take_continued() {
                            to_hash.send(ToHash::Spooled(s, e)).map_err(stopped)?;
                        }
                    }
                }
                transfer.advance(generation, w.prefix);
            }
            Ok(())
        });
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hashed = 0;
            let mut scratch = Vec::new();
            // Ends when the writer is gone.
            for next in hash_rx {
                match next {
                    ToHash::Written(bytes) => {
                        verifier.update(&bytes);
                        hashed += bytes.len() as u64;
                    }
                    ToHash::Spooled(mut s, e) => {
                        while s < e {
                            let n = (e - s).min(REHASH_CHUNK);
                            scratch.resize(usize::try_from(n).unwrap_or(0), 0);
                            back.read_exact_at(&mut scratch, s)?;
                            verifier.update(&scratch);
                            s += n;
                        }
                        hashed = e;
                    }
                }
            }
            Ok((verifier, hashed))
        });
        let sink = Self {
            kind: Kind::File {
                lane,
                writer,
                hasher,
            },
        };
        Ok((sink, backing))
    }

    /// A writer for other parts of the copy, if it is spooled (a copy in memory is
    /// written in order, by one reader).
    pub(crate) fn lane(&self) -> Option<LaneWriter> {
        match &self.kind {
            Kind::File { lane, .. } => Some(lane.clone()),
            Kind::Memory { .. } => None,
        }
    }

    /// Writes a batch at `at`: anywhere in a spooled copy, only at the end of one in
    /// memory.
    pub(crate) async fn write_at(&mut self, at: u64, batch: Bytes) -> io::Result<()> {
        match &mut self.kind {
            Kind::Memory {
                backing,
                verifier,
                transfer,
                generation,
                written,
            } => {
                if at != *written {
                    return Err(io::Error::other("a copy in memory is written in order"));
                }
                *written += batch.len() as u64;
                verifier.update(&batch);
                if let Backing::Memory(chunks) = &**backing {
                    let mut chunks = chunks.lock().unwrap_or_else(PoisonError::into_inner);
                    chunks.push((at, batch));
                }
                transfer.advance(*generation, *written);
                Ok(())
            }
            // The writer stopped if this fails: its error comes out of `finish`.
            Kind::File { lane, .. } => lane.write_at(at, batch).await,
        }
    }

    /// Waits for everything to be written; returns whether the copy is whole (`size`
    /// bytes, every one written) and matches the digest.
    pub(crate) async fn finish(self, size: u64) -> io::Result<bool> {
        match self.kind {
            Kind::Memory {
                verifier, written, ..
            } => Ok(written == size && verifier.matches()),
            Kind::File {
                lane,
                writer,
                hasher,
            } => {
                drop(lane);
                let joined = |e: tokio::task::JoinError| io::Error::other(e.to_string());
                let written = writer.await.map_err(joined)?;
                // The hasher ends once the writer is gone; its error (a failed read-back)
                // is why the writer stopped, if it did.
                let (verifier, hashed) = hasher.await.map_err(joined)??;
                written?;
                Ok(hashed == size && verifier.matches())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Written;

    #[test]
    fn bytes_written_ahead_are_written_once_and_join_the_prefix_in_order() {
        let mut w = Written::default();
        // The prefix, then a part further on, then one overlapping it.
        assert_eq!(w.gaps(0, 10), vec![(0, 10)]);
        w.add(0, 10);
        assert_eq!(w.prefix, 10);
        assert_eq!(w.gaps(50, 60), vec![(50, 60)]);
        w.add(50, 60);
        assert_eq!(w.gaps(40, 70), vec![(40, 50), (60, 70)]);
        w.add(40, 50);
        w.add(60, 70);
        assert_eq!(w.ahead.len(), 1, "adjacent ranges coalesce");
        // Bytes already written are never written again.
        assert_eq!(w.gaps(5, 45), vec![(10, 40)]);
        assert_eq!(w.gaps(55, 65), vec![]);
        assert_eq!(w.take_continued(), None, "a gap before it");
        w.add(10, 40);
        assert_eq!(w.prefix, 40);
        assert_eq!(w.take_continued(), Some((40, 70)), "read back to hash");
        assert_eq!(w.prefix, 70);
        assert_eq!(w.take_continued(), None);
        assert!(w.ahead.is_empty());
        assert_eq!(w.gaps(0, 80), vec![(70, 80)]);
    }
}
