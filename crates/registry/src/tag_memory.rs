//! Tags this node resolved or was told about, with when upstream confirmed them, and the
//! revalidations in flight (see [`crate::pullthrough::tags`] for how they are used).

use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use lru::LruCache;
use mirrorlet_oci::UpstreamError;
use mirrorlet_oci::manifest::Descriptor;

use crate::singleflight::SingleFlight;

/// Tags remembered.
const REMEMBERED: usize = 10_000;

/// What a node knows of a tag: its target and when that was confirmed upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    /// The manifest the tag points at.
    pub descriptor: Descriptor,
    /// When upstream last said so.
    pub confirmed: SystemTime,
}

impl TagEntry {
    /// How long ago it was confirmed.
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.confirmed)
            .unwrap_or(Duration::ZERO)
    }
}

/// Tags this node resolved or was told about, and the revalidations in flight.
#[derive(Debug)]
pub struct Tags {
    entries: Mutex<LruCache<String, TagEntry>>,
    /// Revalidations upstream in flight, one per tag.
    pub(crate) flights: SingleFlight<String, Result<(Descriptor, SystemTime), UpstreamError>>,
}

impl Default for Tags {
    fn default() -> Self {
        Self {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(REMEMBERED).unwrap_or(NonZeroUsize::MIN),
            )),
            flights: SingleFlight::default(),
        }
    }
}

impl Tags {
    /// What is known of `key` (`registry/repo:tag`).
    pub fn get(&self, key: &str) -> Option<TagEntry> {
        self.lock().get(key).cloned()
    }

    /// Remembers `entry` for `key`, unless a newer confirmation is known.
    pub fn put(&self, key: &str, entry: TagEntry) {
        let mut entries = self.lock();
        if entries
            .peek(key)
            .is_some_and(|old| old.confirmed > entry.confirmed)
        {
            return;
        }
        entries.put(key.to_owned(), entry);
    }

    /// Forgets `key` (upstream says it is gone).
    pub fn remove(&self, key: &str) {
        self.lock().pop(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, TagEntry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
