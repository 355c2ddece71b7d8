//! A bounded cache of the media types read from content. Content is immutable, so an
//! entry never goes stale; the bound only caps memory.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use mirrorlet_oci::Digest;

/// Digest -> media type (manifest types, or octet-stream for anything else), least
/// recently used entries evicted first.
pub(crate) struct MediaTypes {
    cache: Mutex<LruCache<Digest, String>>,
}

impl MediaTypes {
    pub(crate) fn new(capacity: NonZeroUsize) -> Self {
        Self {
            cache: Mutex::new(LruCache::new(capacity)),
        }
    }

    pub(crate) fn get(&self, digest: &Digest) -> Option<String> {
        self.cache.lock().ok()?.get(digest).cloned()
    }

    pub(crate) fn put(&self, digest: Digest, media_type: String) {
        if let Ok(mut c) = self.cache.lock() {
            c.put(digest, media_type);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_beyond_capacity() {
        let cache = MediaTypes::new(NonZeroUsize::new(2).expect("non-zero"));
        let d = |n: u8| Digest::sha256_of(&[n]);
        cache.put(d(1), "a".into());
        cache.put(d(2), "b".into());
        assert_eq!(cache.get(&d(1)).as_deref(), Some("a"));
        cache.put(d(3), "c".into());
        assert_eq!(cache.get(&d(2)), None, "least recently used entry evicted");
        assert_eq!(cache.get(&d(1)).as_deref(), Some("a"));
    }
}
