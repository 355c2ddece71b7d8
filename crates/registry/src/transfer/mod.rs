//! A blob on its way to this node: written once (from peers or upstream) while it is hashed,
//! and read by any number of clients at once while it grows. Every request for a digest
//! the node does not hold joins the one transfer of it, so the node fetches each blob once
//! however many ask (its own containerd, and peers reading its partial copy).
//!
//! Nothing unverified can complete a download: readers hold back the blob's last byte until
//! the whole has matched its digest (or, for small blobs from peers that hold them whole,
//! and for any size with `PeerVerify::Whole`, hold back everything: see
//! [`Transfer::copied_from_holders`]). A transfer that fails after readers took
//! bytes ends their streams with an error; the registry then aborts containerd's partial
//! download so that its retry starts clean.

mod backing;
mod set;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use futures_util::stream;
use mirrorlet_oci::{BlobStream, ByteRange, Digest};
use tokio::sync::watch;

pub(crate) use backing::{Backing, LaneWriter, Sink};
pub(crate) use set::Transfers;

/// How a transfer ended, or that it has not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still being written.
    Running,
    /// Complete and matching its digest.
    Verified,
    /// Given up; `corrupt` when bytes that did not match the digest were written (and may
    /// have reached readers).
    Failed {
        /// Whether wrong bytes were involved (not merely a source that ran out).
        corrupt: bool,
        /// Whether upstream said there is no such blob, refused it or is rate limiting
        /// (nobody can get it now), rather than something on the way failing.
        gone: bool,
        /// Why, for logs.
        why: Arc<str>,
    },
}

/// Where a transfer's bytes come from, for metrics and for deciding how clients read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Peers that hold the whole blob.
    Holders,
    /// Another node's transfer (its owner fetching for the cluster, or a node mid-download).
    Peer,
    /// The upstream registry.
    Upstream,
}

/// What readers see of a transfer.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The blob's size, once a source has said it.
    pub size: Option<u64>,
    /// Bytes written (and readable) from the start of the blob.
    pub written: u64,
    /// Bumped when the transfer starts over (a copy that failed before anyone read it).
    pub generation: u32,
    /// Where the current copy comes from.
    pub origin: Option<Origin>,
    /// The bytes written so far, readable.
    backing: Option<Arc<Backing>>,
    /// How it ended.
    pub outcome: Outcome,
}

/// One blob being fetched. Shared (`Arc`) by the task filling it and every reader.
pub struct Transfer {
    /// The blob.
    pub digest: Digest,
    progress: watch::Sender<Progress>,
    /// Set when any reader was handed bytes before the blob was verified: after that, a
    /// failed copy cannot be silently started over.
    released: AtomicBool,
    /// Peers reading this transfer now (bounded by the registry's cap).
    peer_streams: AtomicUsize,
    /// The registries of the peers that read this transfer lately, newest last (at most
    /// [`FOLLOWERS_KEPT`]): where a peer this node is too busy to take is sent.
    followers: Mutex<VecDeque<SocketAddr>>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("digest", &self.digest)
            .field("progress", &*self.progress.borrow())
            .finish()
    }
}

/// Bytes per read from the backing.
const READ_CHUNK: u64 = 1024 * 1024;
/// Followers remembered per transfer.
pub(crate) const FOLLOWERS_KEPT: usize = 16;

impl Transfer {
    /// A transfer of `digest` that has not started.
    pub(crate) fn new(digest: Digest) -> Arc<Self> {
        Arc::new(Self {
            digest,
            progress: watch::Sender::new(Progress {
                size: None,
                written: 0,
                generation: 0,
                origin: None,
                backing: None,
                outcome: Outcome::Running,
            }),
            released: AtomicBool::new(false),
            peer_streams: AtomicUsize::new(0),
            followers: Mutex::new(VecDeque::new()),
        })
    }

    /// What the transfer looks like now.
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Whether the copy comes from peers that hold the blob whole (where a bad copy can be
    /// replaced by another before anyone saw it), rather than from upstream or another
    /// node's transfer (which must flow as it downloads, or containerd gives up on a
    /// silent pull).
    pub fn copied_from_holders(&self) -> bool {
        self.progress.borrow().origin == Some(Origin::Holders)
    }

    /// Whether bytes went to a reader before verification.
    pub(crate) fn released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    // --- The filling side ---

    /// The generation the next copy will have (its sink writes for it only).
    pub(crate) fn next_generation(&self) -> u32 {
        self.progress.borrow().generation + 1
    }

    /// Starts a (new) copy of `size` bytes from `origin` into `backing`.
    pub(crate) fn begin(&self, size: u64, origin: Origin, backing: Arc<Backing>) {
        self.progress.send_modify(|p| {
            p.size = Some(size);
            p.written = 0;
            p.generation += 1;
            p.origin = Some(origin);
            p.backing = Some(backing);
        });
    }

    /// Bytes up to `written` of copy `generation` are readable (a late write of an
    /// abandoned copy changes nothing).
    pub(crate) fn advance(&self, generation: u32, written: u64) {
        self.progress.send_if_modified(|p| {
            let current = p.generation == generation;
            if current {
                p.written = written;
            }
            current
        });
    }

    /// Notes that the copy continues from another source.
    pub(crate) fn set_origin(&self, origin: Origin) {
        self.progress.send_modify(|p| p.origin = Some(origin));
    }

    /// Ends the transfer.
    pub(crate) fn finish(&self, outcome: Outcome) {
        self.progress.send_modify(|p| p.outcome = outcome);
    }

    // --- The reading side ---

    /// Waits until a copy has begun; its size and generation (to read it with), or the
    /// outcome if the transfer failed first.
    pub async fn begun(&self) -> Result<(u64, u32), Outcome> {
        self.wait_for(|_| true).await
    }

    /// Waits until the current copy has bytes to read (or has verified); its size and
    /// generation, or the outcome if the transfer failed first. A copy that fails before
    /// writing anything is replaced unseen, so a client that waits for this gets a 404
    /// rather than a broken stream when no source can deliver.
    pub async fn has_bytes(&self) -> Result<(u64, u32), Outcome> {
        self.wait_for(|p| p.written > 0 || p.outcome == Outcome::Verified)
            .await
    }

    async fn wait_for(&self, ready: impl Fn(&Progress) -> bool) -> Result<(u64, u32), Outcome> {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if let Outcome::Failed { .. } = p.outcome {
                    return Err(p.outcome.clone());
                }
                if let Some(s) = p.size
                    && ready(&p)
                {
                    return Ok((s, p.generation));
                }
            }
            if rx.changed().await.is_err() {
                return Err(gone());
            }
        }
    }

    /// Waits until the transfer has ended.
    pub async fn outcome(&self) -> Outcome {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if p.outcome != Outcome::Running {
                    return p.outcome.clone();
                }
            }
            if rx.changed().await.is_err() {
                return gone();
            }
        }
    }

    /// Counts a peer reading this transfer, if fewer than `cap` do, and remembers its
    /// registry (`from`, when it named one) as a follower; the guard uncounts it.
    pub(crate) fn admit_peer(
        self: &Arc<Self>,
        cap: usize,
        from: Option<SocketAddr>,
    ) -> Option<PeerStream> {
        let mut now = self.peer_streams.load(Ordering::SeqCst);
        loop {
            if now >= cap {
                return None;
            }
            match self.peer_streams.compare_exchange(
                now,
                now + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(actual) => now = actual,
            }
        }
        if let Some(addr) = from {
            let mut f = self
                .followers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            f.retain(|a| *a != addr);
            f.push_back(addr);
            if f.len() > FOLLOWERS_KEPT {
                f.pop_front();
            }
        }
        Some(PeerStream(self.clone()))
    }

    /// The registries of the peers that read this transfer lately, newest first.
    pub(crate) fn followers(&self) -> Vec<SocketAddr> {
        let f = self
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f.iter().rev().copied().collect()
    }

    /// Streams `range` of copy `generation` of the blob as it is written (the range was
    /// chosen for that copy's size). Until the blob is verified, the last byte of the blob
    /// and of the range are held back, so no reader completes unverified bytes. The stream
    /// ends with an error if the transfer fails or starts over.
    pub fn read(self: &Arc<Self>, range: ByteRange, generation: u32) -> BlobStream {
        struct St {
            t: Arc<Transfer>,
            rx: watch::Receiver<Progress>,
            pos: u64,
            end: u64,
            generation: u32,
        }
        let st = St {
            rx: self.progress.subscribe(),
            t: self.clone(),
            pos: range.start,
            end: range.end,
            generation,
        };
        stream::unfold(st, |mut st| async move {
            loop {
                if st.pos >= st.end {
                    return None;
                }
                let p = st.rx.borrow_and_update().clone();
                if let Outcome::Failed { why, .. } = &p.outcome {
                    let e = io::Error::other(format!("the transfer of this blob failed: {why}"));
                    st.end = 0;
                    return Some((Err(e), st));
                }
                if p.generation != st.generation || p.size.is_none_or(|s| s < st.end) {
                    let e = io::Error::other("the transfer of this blob started over");
                    st.end = 0;
                    return Some((Err(e), st));
                }
                let verified = p.outcome == Outcome::Verified;
                let readable = match (p.size, &p.backing) {
                    (Some(size), Some(_)) if verified => size,
                    (Some(size), Some(_)) => p
                        .written
                        .min(size.saturating_sub(1))
                        .min(st.end.saturating_sub(1)),
                    _ => 0,
                };
                if st.pos < readable {
                    let want = (readable.min(st.end) - st.pos).min(READ_CHUNK);
                    let Some(backing) = p.backing.clone() else {
                        continue;
                    };
                    match backing.read(st.pos, want).await {
                        Ok(chunk) => {
                            if !verified {
                                st.t.released.store(true, Ordering::SeqCst);
                            }
                            st.pos += chunk.len() as u64;
                            return Some((Ok(chunk), st));
                        }
                        Err(e) => {
                            st.end = 0;
                            return Some((Err(e), st));
                        }
                    }
                }
                if st.rx.changed().await.is_err() {
                    st.end = 0;
                    return Some((Err(io::Error::other("the transfer went away")), st));
                }
            }
        })
        .boxed()
    }
}

/// A peer counted as reading a transfer; uncounted when dropped.
pub(crate) struct PeerStream(Arc<Transfer>);

impl Drop for PeerStream {
    fn drop(&mut self) {
        self.0.peer_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

fn gone() -> Outcome {
    Outcome::Failed {
        corrupt: false,
        gone: false,
        why: "the transfer went away".into(),
    }
}

#[cfg(test)]
mod tests;
