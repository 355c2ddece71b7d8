//! The node's transfers in flight, one per digest: every request for a digest the node is
//! fetching joins the transfer already under way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use mirrorlet_oci::Digest;

use super::Transfer;

/// Transfers in flight, by digest.
#[derive(Debug, Default)]
pub struct Transfers {
    map: Mutex<HashMap<Digest, Arc<Transfer>>>,
}

impl Transfers {
    /// The transfer of `digest` in flight, if there is one.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Transfer>> {
        self.lock().get(digest).cloned()
    }

    /// The transfer of `digest` in flight, or a new one; `true` when it is new (the caller
    /// must start filling it).
    pub(crate) fn get_or_create(&self, digest: &Digest) -> (Arc<Transfer>, bool) {
        let mut map = self.lock();
        if let Some(t) = map.get(digest) {
            return (t.clone(), false);
        }
        let t = Transfer::new(digest.clone());
        map.insert(digest.clone(), t.clone());
        (t, true)
    }

    /// Forgets `transfer` (when it has ended), unless another has replaced it.
    pub(crate) fn remove(&self, transfer: &Arc<Transfer>) {
        let mut map = self.lock();
        if map
            .get(&transfer.digest)
            .is_some_and(|t| Arc::ptr_eq(t, transfer))
        {
            map.remove(&transfer.digest);
        }
    }

    /// How many are in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Transfer>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
