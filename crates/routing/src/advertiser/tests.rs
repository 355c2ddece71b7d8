use std::time::Duration;

use mirrorlet_oci::conformance::collect_lookup;
use mirrorlet_oci::{MemoryNetwork, MemoryRouter, MemoryStore, Peer};

use super::*;

fn peer(n: u8) -> Peer {
    Peer {
        id: format!("n{n}"),
        addr: ([10, 0, 0, n], 5000).into(),
    }
}

async fn found(router: &MemoryRouter, key: &str) -> bool {
    !collect_lookup(router, key, Duration::from_millis(50))
        .await
        .is_empty()
}

async fn eventually(router: &MemoryRouter, key: &str, want: bool) {
    for _ in 0..200 {
        if found(router, key).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key}: expected found={want}");
}

#[tokio::test]
async fn follows_the_store_and_withdraws_on_shutdown() {
    let net = Arc::new(MemoryNetwork::default());
    let mine = Arc::new(MemoryRouter::new(net.clone(), peer(1)));
    let other = MemoryRouter::new(net, peer(2));
    let store = Arc::new(MemoryStore::new());
    let layer = store.put_blob(vec![1u8; 1000]);
    let manifest = store.put_blob(format!(
        r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"digest":"{d}","size":{s}}},"layers":[]}}"#,
        d = layer.digest,
        s = layer.size
    ));
    store.put_image("example.com/app:v1", manifest.clone());
    store.put_image("example.com/app:latest", manifest.clone());
    store.put_image("pulled.example/app:latest", manifest.clone());
    store.put_image("pulled.example.other/app:latest", manifest.clone());
    store.put_image("pulled.example/secret/app:v1", manifest.clone());

    let shutdown = CancellationToken::new();
    let config = AdvertiserConfig {
        tag_excludes: vec![Glob::new("*:latest")],
        revalidated: vec!["pulled.example".into()],
        private: mirrorlet_oci::private::Private::new(&["pulled.example/secret/*"], false)
            .expect("valid"),
    };
    let metrics = InventoryMetrics::default();
    let task = tokio::spawn(run(
        store.clone(),
        mine.clone(),
        config,
        metrics.clone(),
        shutdown.clone(),
    ));

    // Everything at start, except excluded tags.
    eventually(&other, "example.com/app:v1", true).await;
    eventually(&other, manifest.digest.as_str(), true).await;
    eventually(&other, layer.digest.as_str(), true).await;
    assert!(!found(&other, "example.com/app:latest").await);
    // ...but tags of registries the cluster revalidates upstream are advertised all.
    eventually(&other, "pulled.example/app:latest", true).await;
    assert!(!found(&other, "pulled.example.other/app:latest").await);
    // A private repository's tags never, even of a revalidated registry.
    assert!(!found(&other, "pulled.example/secret/app:v1").await);

    // The inventory gauges follow the store: five images, all tagged, two digests.
    assert_eq!(
        (
            metrics.images.get(),
            metrics.tags.get(),
            metrics.blobs.get()
        ),
        (5, 5, 2)
    );

    // A blob is advertised as soon as it lands, before any image refers to it.
    let early = store.put_blob(vec![2u8; 500]);
    eventually(&other, early.digest.as_str(), true).await;

    // Deleting an image withdraws its tag; deleting content withdraws the digest.
    store.delete_image("example.com/app:v1");
    eventually(&other, "example.com/app:v1", false).await;
    store.delete_blob(&layer.digest);
    eventually(&other, layer.digest.as_str(), false).await;
    assert!(found(&other, manifest.digest.as_str()).await);

    shutdown.cancel();
    task.await.expect("advertiser stops");
    assert!(
        !found(&other, manifest.digest.as_str()).await,
        "shutdown withdraws everything"
    );
    assert!(!found(&other, early.digest.as_str()).await);
}
