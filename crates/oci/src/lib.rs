//! The vocabulary every mirrorlet layer shares: OCI digests, names, references and
//! manifests, registry path parsing, and the [`Store`](store::Store) and router interfaces
//! through which the registry reaches containerd and the peer-to-peer network without
//! depending on either. No I/O happens here beyond the in-memory twins (feature `test-util`)
//! and [`filestream`], the file-range streaming both the store and the registry use.

// The workspace denies unsafe code; only the agent binary allows it, in one place.
#![forbid(unsafe_code)]

pub mod budget;
pub mod digest;
pub mod filestream;
pub mod glob;
pub mod layered;
pub mod manifest;
pub mod name;
pub mod path;
pub mod private;
pub mod reference;
pub mod rendezvous;
pub mod routing;
pub mod store;
pub mod upstream;
pub mod walk;

#[cfg(feature = "test-util")]
pub mod conformance;
#[cfg(feature = "test-util")]
pub mod memory;

pub use budget::Budget;
pub use digest::Digest;
pub use manifest::{Descriptor, Manifest};
#[cfg(feature = "test-util")]
pub use memory::{MemoryNetwork, MemoryRouter, MemoryStore, MemoryUpstream};
pub use name::{Registry, Repository};
pub use reference::{ImageName, Reference, Tag};
pub use routing::{Alone, LinkState, Owner, Peer, PeerLink, Router, RouterError, RouterStatus};
pub use store::{
    BlobStream, ByteRange, ImageContent, Inventory, Store, StoreError, StoreEvent, TagTarget,
};
pub use upstream::{NoUpstream, RegistryState, Upstream, UpstreamBlob, UpstreamError};

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::conformance::{self, Loader};
    use crate::{Descriptor, Digest, MemoryStore};

    struct MemLoader(Arc<MemoryStore>);

    #[async_trait::async_trait]
    impl Loader for MemLoader {
        async fn put_blob(&self, _media_type: &str, data: Bytes) {
            self.0.put_blob(data);
        }
        async fn put_image(&self, name: &str, target: &Descriptor) {
            self.0.put_image(name, target.clone());
        }
        async fn delete_image(&self, name: &str) {
            self.0.delete_image(name);
        }
        async fn delete_blob(&self, digest: &Digest) {
            self.0.delete_blob(digest);
        }
        async fn begin_ingest(&self, reference: &str, digest: &Digest, _partial: Bytes) {
            self.0.begin_ingest(reference, digest);
        }
    }

    #[tokio::test]
    async fn memory_router_conforms() {
        let net = Arc::new(crate::MemoryNetwork::default());
        let peer = |n: u8| crate::Peer {
            id: format!("node-{n}"),
            addr: ([127, 0, 0, n], 5000).into(),
        };
        let a = crate::MemoryRouter::new(net.clone(), peer(1));
        let b = crate::MemoryRouter::new(net, peer(2));
        conformance::check_router(&a, &b, &peer(1)).await;
    }

    #[tokio::test]
    async fn memory_upstream_conforms() {
        let fx = conformance::Fixture::new();
        let (registry, repository) = conformance::upstream_location();
        let up = crate::MemoryUpstream::new([registry.clone()]);
        for (media_type, data) in fx.upstream_content() {
            up.put(&registry, &repository, &media_type, data);
        }
        up.tag(
            &registry,
            &repository,
            conformance::UPSTREAM_TAG,
            &fx.index.0.digest,
        );
        conformance::check_upstream(&up, &fx).await;
    }

    #[tokio::test]
    async fn memory_store_conforms() {
        let store = Arc::new(MemoryStore::new());
        conformance::check_store(store.as_ref(), &MemLoader(store.clone())).await;
    }
}
