//! The DHT's record store: provider records (digests and tags that nodes serve) kept per
//! key in a plain vector, counted, and a few value records (mirrorlet uses none; peers may
//! still send some). libp2p's `MemoryStore` reserves room for 20 providers inline for every
//! key, about 3.5 KB per key however few providers it has: with thousands of layers per
//! node most of the router's memory. Here a key costs what its records take.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, hash_map};
use std::iter;

use libp2p::PeerId;
use libp2p::kad::store::{Error, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use prometheus_client::metrics::gauge::Gauge;

/// The store's limits.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Keys with provider records held at most (this node's and other nodes').
    pub(crate) max_keys: usize,
    /// Providers kept per key (more are ignored, as Kademlia does against floods).
    pub(crate) max_providers_per_key: usize,
    /// Value records held at most.
    pub(crate) max_records: usize,
    /// Largest value record accepted.
    pub(crate) max_value_bytes: usize,
}

/// Provider and value records in memory.
pub(crate) struct Store {
    local: PeerId,
    limits: Limits,
    /// Other nodes' provider records.
    providers: HashMap<RecordKey, Vec<ProviderRecord>>,
    /// The keys this node provides. Its own records are not stored whole: the provider is
    /// this node, and Kademlia fills in its addresses when it answers with one (a record
    /// per key was most of what an advertised key cost).
    own: HashSet<RecordKey>,
    records: HashMap<RecordKey, Record>,
    /// Provider records held, all keys (records past their TTL count until Kademlia drops
    /// them, which it does when it reads them).
    held: Gauge,
}

impl Store {
    pub(crate) fn new(local: PeerId, limits: Limits, held: Gauge) -> Self {
        Self {
            local,
            limits,
            providers: HashMap::new(),
            own: HashSet::new(),
            records: HashMap::new(),
            held,
        }
    }

    fn count(&self, delta: i64) {
        self.held.inc_by(delta);
    }

    /// Other nodes' provider records held here.
    pub(crate) fn remote_providers(&self) -> impl Iterator<Item = &ProviderRecord> {
        self.providers.values().flatten()
    }

    /// This node's record for `key`.
    fn own_record(&self, key: &RecordKey) -> ProviderRecord {
        ProviderRecord::new(key.clone(), self.local, Vec::new())
    }

    /// Drops every provider record of `provider` (a node found gone); how many.
    pub(crate) fn forget_provider(&mut self, provider: &PeerId) -> usize {
        let mut removed = 0;
        self.providers.retain(|_, list| {
            let before = list.len();
            list.retain(|r| r.provider != *provider);
            removed += before - list.len();
            !list.is_empty()
        });
        self.count(-i64::try_from(removed).unwrap_or(0));
        removed
    }
}

impl RecordStore for Store {
    type RecordsIter<'a> =
        iter::Map<hash_map::Values<'a, RecordKey, Record>, fn(&'a Record) -> Cow<'a, Record>>;
    /// Made from the keys (see [`Store::own`]). Kademlia asks for them only to republish
    /// them, which the router does itself (see `swarm/republish.rs`).
    type ProvidedIter<'a> = Box<dyn Iterator<Item = Cow<'a, ProviderRecord>> + 'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.records.get(k).map(Cow::Borrowed)
    }

    fn put(&mut self, r: Record) -> Result<()> {
        if r.value.len() >= self.limits.max_value_bytes {
            return Err(Error::ValueTooLarge);
        }
        if !self.records.contains_key(&r.key) && self.records.len() >= self.limits.max_records {
            return Err(Error::MaxRecords);
        }
        self.records.insert(r.key.clone(), r);
        Ok(())
    }

    fn remove(&mut self, k: &RecordKey) {
        self.records.remove(k);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.records.values().map(Cow::Borrowed)
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        // Keys this node and others provide count twice: the bound errs on the safe side.
        let keys = self.providers.len() + self.own.len();
        if record.provider == self.local {
            if !self.own.contains(&record.key) {
                if keys >= self.limits.max_keys && !self.providers.contains_key(&record.key) {
                    return Err(Error::MaxProvidedKeys);
                }
                self.own.insert(record.key);
                self.count(1);
            }
            return Ok(());
        }
        let list = match self.providers.entry(record.key.clone()) {
            hash_map::Entry::Occupied(e) => e.into_mut(),
            hash_map::Entry::Vacant(e) => {
                if keys >= self.limits.max_keys && !self.own.contains(e.key()) {
                    return Err(Error::MaxProvidedKeys);
                }
                e.insert(Vec::with_capacity(1))
            }
        };
        if let Some(existing) = list.iter_mut().find(|p| p.provider == record.provider) {
            *existing = record;
            return Ok(());
        }
        if list.len() >= self.limits.max_providers_per_key {
            return Ok(());
        }
        list.push(record);
        self.count(1);
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut list = self.providers.get(key).cloned().unwrap_or_default();
        if self.own.contains(key) {
            list.insert(0, self.own_record(key));
        }
        list
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        Box::new(self.own.iter().map(|k| Cow::Owned(self.own_record(k))))
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        if *provider == self.local {
            if self.own.remove(key) {
                self.count(-1);
            }
            return;
        }
        let hash_map::Entry::Occupied(mut e) = self.providers.entry(key.clone()) else {
            return;
        };
        let list = e.get_mut();
        let before = list.len();
        list.retain(|p| p.provider != *provider);
        let removed = before - list.len();
        if list.is_empty() {
            e.remove();
        } else if list.capacity() > 2 * list.len() {
            list.shrink_to_fit();
        }
        self.count(-i64::try_from(removed).unwrap_or(0));
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn store(max_keys: usize) -> (Store, PeerId, Gauge) {
        let me = peer();
        let held = Gauge::default();
        let limits = Limits {
            max_keys,
            max_providers_per_key: 3,
            max_records: 2,
            max_value_bytes: 16,
        };
        (Store::new(me, limits, held.clone()), me, held)
    }

    #[test]
    fn provider_records_are_counted_replaced_capped_and_removed() {
        let (mut s, me, held) = store(10);
        let k = RecordKey::new(&"sha256:aa");
        let others: Vec<PeerId> = (0..4).map(|_| peer()).collect();
        s.add_provider(ProviderRecord::new(k.clone(), me, Vec::new()))
            .expect("add");
        for p in &others {
            s.add_provider(ProviderRecord::new(k.clone(), *p, Vec::new()))
                .expect("add");
        }
        // Three other nodes per key at most: the fourth is ignored (this node's own record
        // comes on top).
        assert_eq!(s.providers(&k).len(), 4);
        assert_eq!(held.get(), 4);
        // A provider announcing again replaces its record.
        let addr: libp2p::Multiaddr = "/ip4/10.0.0.1/tcp/5001".parse().expect("addr");
        s.add_provider(ProviderRecord::new(
            k.clone(),
            others[0],
            vec![addr.clone()],
        ))
        .expect("again");
        assert_eq!(held.get(), 4);
        assert!(
            s.providers(&k)
                .iter()
                .any(|p| p.addresses == [addr.clone()])
        );
        assert_eq!(s.provided().count(), 1, "this node's own");
        assert_eq!(s.providers(&k)[0].provider, me);
        s.remove_provider(&k, &me);
        assert_eq!(s.provided().count(), 0);
        assert_eq!(held.get(), 3);
        for p in &others[..3] {
            s.remove_provider(&k, p);
        }
        assert_eq!(held.get(), 0);
        assert!(s.providers(&k).is_empty());
        assert!(s.providers.is_empty(), "an emptied key is dropped");
    }

    #[test]
    fn a_gone_providers_records_are_dropped_everywhere() {
        let (mut s, me, held) = store(10);
        let (gone, other) = (peer(), peer());
        for k in ["a", "b", "c"] {
            for p in [me, gone, other] {
                s.add_provider(ProviderRecord::new(RecordKey::new(&k), p, Vec::new()))
                    .expect("add");
            }
        }
        assert_eq!(s.remote_providers().count(), 6, "not this node's own");
        assert_eq!(s.forget_provider(&gone), 3);
        assert_eq!(held.get(), 6);
        assert!(s.remote_providers().all(|r| r.provider == other));
        assert_eq!(s.provided().count(), 3);
    }

    #[test]
    fn keys_and_values_are_bounded() {
        let (mut s, me, _) = store(2);
        for i in 0..2 {
            let k = RecordKey::new(&format!("k{i}"));
            s.add_provider(ProviderRecord::new(k, me, Vec::new()))
                .expect("room");
        }
        let third = ProviderRecord::new(RecordKey::new(&"k2"), me, Vec::new());
        assert!(matches!(s.add_provider(third), Err(Error::MaxProvidedKeys)));
        let big = Record::new(RecordKey::new(&"v"), vec![0; 16]);
        assert!(matches!(s.put(big), Err(Error::ValueTooLarge)));
        for i in 0..2 {
            s.put(Record::new(RecordKey::new(&format!("v{i}")), vec![1]))
                .expect("room");
        }
        let more = Record::new(RecordKey::new(&"v9"), vec![1]);
        assert!(matches!(s.put(more), Err(Error::MaxRecords)));
        s.remove(&RecordKey::new(&"v0"));
        assert_eq!(s.records().count(), 1);
    }
}
