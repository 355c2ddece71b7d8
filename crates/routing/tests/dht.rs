//! Several real routers in one process on loopback: advertise, lookup, withdraw, expiry,
//! 10,000 keys on one node, private-network keys, dead peers (and their records dropped),
//! re-bootstrap, idle connections, owner rankings.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use mirrorlet_oci::conformance::{check_router, collect_lookup};
use mirrorlet_oci::{Peer, Router};
use mirrorlet_routing::identity::parse_psk;
use mirrorlet_routing::{P2pConfig, P2pMetrics, P2pRouter};
use tokio_util::sync::CancellationToken;

struct Node {
    router: P2pRouter,
    metrics: P2pMetrics,
    addr: Multiaddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    fn peer(&self) -> Peer {
        Peer {
            id: self.router.peer_id().to_string(),
            addr: self.http,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn start_with(config: impl FnOnce(&mut P2pConfig)) -> Node {
    let http_port = free_port();
    let mut cfg = P2pConfig::new(
        ([127, 0, 0, 1], 0).into(),
        http_port,
        Keypair::generate_ed25519(),
    );
    cfg.rebootstrap = Duration::from_millis(200);
    config(&mut cfg);
    let http_port = cfg.http_port;
    let shutdown = CancellationToken::new();
    let metrics = P2pMetrics::default();
    let (router, task) =
        P2pRouter::start(cfg, metrics.clone(), shutdown.clone()).expect("router starts");
    let mut addr = None;
    for _ in 0..100 {
        if let Some(a) = router
            .listen_addrs()
            .await
            .expect("addrs")
            .into_iter()
            .next()
        {
            addr = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let addr = addr.expect("listening");
    Node {
        router,
        metrics,
        addr,
        http: ([127, 0, 0, 1], http_port).into(),
        shutdown,
        task,
    }
}

async fn start(bootstrap: &[&Node]) -> Node {
    let addrs: Vec<Multiaddr> = bootstrap.iter().map(|n| n.addr.clone()).collect();
    start_with(|c| c.bootstrap = addrs).await
}

async fn wait_connected(node: &Node, peers: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.router.status().await.expect("status").connected_peers < peers {
        assert!(
            Instant::now() < deadline,
            "node did not connect to {peers} peers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node`'s routing table holds `peers` peers: an announcement made before
/// then finds nobody to store it (10 s at most).
async fn wait_routable(node: &Node, peers: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.metrics.routing_table_peers.get() < peers {
        assert!(
            Instant::now() < deadline,
            "{peers} peers never reached the routing table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn finds(node: &Node, key: &str, who: &Node) -> bool {
    collect_lookup(&node.router, key, Duration::from_millis(300))
        .await
        .iter()
        .any(|p| p.addr == who.http)
}

#[tokio::test]
async fn three_nodes_pass_the_router_conformance_checks() {
    let a = start(&[]).await;
    let b = start(&[&a]).await;
    let c = start(&[&a]).await;
    wait_connected(&a, 2).await;
    check_router(&a.router, &b.router, &a.peer()).await;
    // And the third node, which only bootstrapped to a, finds b's keys too.
    b.router
        .advertise(vec!["sha256:beef".into()])
        .await
        .expect("advertise");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !finds(&c, "sha256:beef", &b).await {
        assert!(Instant::now() < deadline, "c finds b's key");
    }
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test]
async fn ten_thousand_keys_on_one_node_are_all_found() {
    let a = start(&[]).await;
    let b = start(&[&a]).await;
    wait_connected(&b, 1).await;
    let keys: Vec<String> = (0..10_000).map(|i| format!("sha256:{i:064x}")).collect();
    let started = Instant::now();
    for chunk in keys.chunks(1_000) {
        a.router
            .advertise(chunk.to_vec())
            .await
            .expect("all 10,000 keys accepted");
    }
    assert_eq!(
        a.router.status().await.expect("status").advertised_keys,
        10_000
    );
    eprintln!("advertised 10,000 keys in {:?}", started.elapsed());
    let started = Instant::now();
    let router = Arc::new(b.router.clone());
    let mut missing = Vec::new();
    for chunk in keys.chunks(200) {
        let mut lookups: FuturesUnordered<_> = chunk
            .iter()
            .map(|k| {
                let router = router.clone();
                let k = k.clone();
                async move {
                    // Records may still be in flight right after advertising: retry a while.
                    for _ in 0..50 {
                        let found =
                            collect_lookup(router.as_ref(), &k, Duration::from_millis(200)).await;
                        if found.iter().any(|p| p.addr == a.http) {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Some(k)
                }
            })
            .collect();
        while let Some(r) = lookups.next().await {
            missing.extend(r);
        }
    }
    eprintln!("looked up 10,000 keys in {:?}", started.elapsed());
    assert!(
        missing.is_empty(),
        "{} keys not found, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    a.stop().await;
    b.stop().await;
}

/// A node restarts (same identity) after its content was deleted while it was down, so
/// nobody told its peers: the records they hold for it lapse after the TTL.
#[tokio::test]
async fn records_expire_when_not_republished() {
    let key = Keypair::generate_ed25519();
    let a = start_with(|c| c.keypair = key.clone()).await;
    let a_addr = a.addr.clone();
    let b = start_with(|c| {
        c.bootstrap = vec![a_addr.clone()];
        c.provider_ttl = Duration::from_secs(2);
    })
    .await;
    wait_connected(&b, 1).await;
    a.router
        .advertise(vec!["sha256:expiring".into()])
        .await
        .expect("advertise");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !finds(&b, "sha256:expiring", &a).await {
        assert!(Instant::now() < deadline, "found before expiry");
    }
    // The announcement reached b's record store (not just answered by a itself).
    stored_at(&b).await;
    let (http, port) = (
        a.http,
        a_addr.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        }),
    );
    // a stops announcing, but something still listens where it did: b's probes find it
    // there, so only the TTL can end the record.
    a.stop().await;
    let _listening = std::net::TcpListener::bind(("127.0.0.1", port.expect("port")))
        .expect("a's port is free again");
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.router.status().await.expect("status").connected_peers != 0 {
        assert!(Instant::now() < deadline, "b notices a is gone");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stale = Peer {
        id: key.public().to_peer_id().to_string(),
        addr: http,
    };
    let found = |peers: Vec<Peer>| peers.iter().any(|p| p.addr == stale.addr);
    assert!(
        found(collect_lookup(&b.router, "sha256:expiring", Duration::from_millis(300)).await),
        "the stale record is still held right after a stopped"
    );
    let deadline = Instant::now() + Duration::from_secs(6);
    while found(collect_lookup(&b.router, "sha256:expiring", Duration::from_millis(300)).await) {
        assert!(
            Instant::now() < deadline,
            "the stale record lapses after the 2 s TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Gone from the store (reading it drops what expired), not merely left out.
    assert_eq!(b.metrics.provider_records.get(), 0);
    b.stop().await;
}

/// A node announces its keys again before their records expire where they are stored.
#[tokio::test]
async fn records_are_republished_before_they_expire() {
    let a = start_with(|c| c.republish = Duration::from_millis(300)).await;
    let a_addr = a.addr.clone();
    let b = start_with(|c| {
        c.bootstrap = vec![a_addr.clone()];
        c.provider_ttl = Duration::from_secs(1);
    })
    .await;
    wait_connected(&b, 1).await;
    a.router
        .advertise(vec!["sha256:kept".into()])
        .await
        .expect("advertise");
    stored_at(&b).await;
    // Three lifetimes later, b still holds it (a lookup at b drops what expired).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = collect_lookup(&b.router, "sha256:kept", Duration::from_millis(300)).await;
    assert_eq!(b.metrics.provider_records.get(), 1, "republished in time");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_node_with_the_wrong_psk_cannot_join() {
    let psk = parse_psk(&"11".repeat(32)).expect("psk");
    let wrong = parse_psk(&"22".repeat(32)).expect("psk");
    let a = start_with(|c| c.psk = Some(psk)).await;
    let a_addr = a.addr.clone();
    let b = start_with(|c| {
        c.psk = Some(psk);
        c.bootstrap = vec![a_addr.clone()];
    })
    .await;
    let intruder = start_with(|c| {
        c.psk = Some(wrong);
        c.bootstrap = vec![a_addr.clone()];
    })
    .await;
    let outsider = start_with(|c| c.bootstrap = vec![a_addr.clone()]).await;
    wait_connected(&b, 1).await;
    a.router
        .advertise(vec!["sha256:secret".into()])
        .await
        .expect("advertise");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !finds(&b, "sha256:secret", &a).await {
        assert!(Instant::now() < deadline, "the node with the key finds it");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in [&intruder, &outsider] {
        assert_eq!(
            n.router.status().await.expect("status").connected_peers,
            0,
            "refused"
        );
        assert!(!finds(n, "sha256:secret", &a).await);
    }
    assert_eq!(
        a.router.status().await.expect("status").connected_peers,
        1,
        "only b joined"
    );
    for n in [a, b, intruder, outsider] {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_peer_that_goes_away_is_skipped_at_once_and_rejoins() {
    let a = start(&[]).await;
    let a_addr = a.addr.clone();
    let b = start(&[&a]).await;
    wait_connected(&b, 1).await;
    b.router
        .advertise(vec!["sha256:fromb".into()])
        .await
        .expect("advertise");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !finds(&a, "sha256:fromb", &b).await {
        assert!(Instant::now() < deadline, "found while b is up");
    }
    // b dies without withdrawing: its record is still stored at a, but a skips it once
    // its listener refuses the probe that the broken connection triggers.
    let b_key = b.router.peer_id();
    b.stop().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = collect_lookup(&a.router, "sha256:fromb", Duration::from_millis(300)).await;
        if found.iter().all(|p| p.id != b_key.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a dead peer is no longer offered: {found:?}"
        );
    }

    // A node whose only peer restarts re-bootstraps by itself.
    let c = start(&[&a]).await;
    wait_connected(&c, 1).await;
    a.stop().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.router.status().await.expect("status").connected_peers != 0 {
        assert!(Instant::now() < deadline, "c notices a is gone");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = a_addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
        _ => None,
    });
    let a2 = start_with(|cfg| cfg.listen = ([127, 0, 0, 1], port.expect("port")).into()).await;
    wait_connected(&c, 1).await;
    a2.stop().await;
    c.stop().await;
}

/// A withdrawal returns only once the peers have it: a node that withdraws and stops at
/// once (graceful shutdown) still gets the message out.
#[tokio::test]
async fn a_withdrawal_reaches_the_peers_before_it_returns() {
    let a = start(&[]).await;
    let b = start(&[&a]).await;
    wait_connected(&b, 1).await;
    wait_routable(&a, 1).await;
    a.router
        .advertise(vec!["sha256:leaving".into()])
        .await
        .expect("advertise");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !finds(&b, "sha256:leaving", &a).await {
        assert!(Instant::now() < deadline, "found before the withdrawal");
    }
    // Found by asking a itself: the announcement must reach b's record store too (it is
    // paced, and on a busy machine it can trail the first answer).
    stored_at(&b).await;
    a.router
        .withdraw(vec!["sha256:leaving".into()])
        .await
        .expect("withdraw");
    a.stop().await;
    assert!(
        b.metrics.withdrawals_received.get() >= 1,
        "b dropped a's record before a stopped"
    );
    b.stop().await;
}

/// Waits until `node` holds a provider record (10 s at most).
async fn stored_at(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.metrics.provider_records.get() == 0 {
        assert!(Instant::now() < deadline, "no provider record stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `node`'s lookup of `key` until it names `want` (10 s at most).
async fn finds_at(node: &Node, key: &str, want: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = collect_lookup(&node.router, key, Duration::from_millis(300)).await;
        if found.iter().any(|p| p.addr == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key}: wanted {want}, found {found:?}"
        );
    }
}

#[tokio::test]
async fn a_node_listening_on_the_ipv6_wildcard_takes_ipv6_and_ipv4_peers() {
    let port = free_port();
    let a = start_with(|c| c.listen = (Ipv6Addr::UNSPECIFIED, port).into()).await;
    let v6: Multiaddr = format!("/ip6/::1/tcp/{port}").parse().expect("multiaddr");
    let v4: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}")
        .parse()
        .expect("multiaddr");
    let b = start_with(|c| {
        c.listen = (Ipv6Addr::LOCALHOST, 0).into();
        c.bootstrap = vec![v6];
    })
    .await;
    let c = start_with(|c| c.bootstrap = vec![v4]).await;
    wait_connected(&a, 2).await;
    b.router
        .advertise(vec!["sha256:b6".into()])
        .await
        .expect("advertise");
    c.router
        .advertise(vec!["sha256:c4".into()])
        .await
        .expect("advertise");
    // Each is found where its registry is reached: b over IPv6, c over IPv4.
    finds_at(&a, "sha256:b6", (Ipv6Addr::LOCALHOST, b.http.port()).into()).await;
    finds_at(&a, "sha256:c4", c.http).await;
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_port_in_use_is_named_with_its_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let cfg = P2pConfig::new(addr, 5000, Keypair::generate_ed25519());
    let err = P2pRouter::start(cfg, P2pMetrics::default(), CancellationToken::new())
        .expect_err("the port is taken");
    let text = err.to_string();
    assert!(
        text.contains(&addr.port().to_string()) && text.to_lowercase().contains("in use"),
        "{text}"
    );
}

/// Connections close when idle, so a node does not stay connected to every other: the
/// network still finds providers (with their registry addresses) and every node still
/// ranks the same owners for a key, dialling whom it needs.
#[tokio::test]
async fn with_every_connection_closed_when_idle_lookups_and_owner_rankings_still_work() {
    let idle = |c: &mut P2pConfig| {
        c.idle_timeout = Duration::from_millis(500);
        c.rebootstrap = Duration::from_secs(60);
    };
    let nodes = seeded(6, idle).await;
    for n in &nodes[1..] {
        wait_connected(n, 1).await;
    }
    let key = "sha256:idle-connections";
    nodes[1]
        .router
        .advertise(vec![key.into()])
        .await
        .expect("advertise");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !finds(&nodes[5], key, &nodes[1]).await {
        assert!(Instant::now() < deadline, "found while connected");
    }
    // Every connection closes once idle.
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in &nodes {
        while n.router.status().await.expect("status").connected_peers != 0 {
            assert!(Instant::now() < deadline, "idle connections close");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for asker in [&nodes[0], &nodes[3], &nodes[5]] {
        assert!(
            finds(asker, key, &nodes[1]).await,
            "found with no connection open"
        );
    }
    // Every node ranks every node (all in its routing table), closest to the key first.
    for n in &nodes {
        ranks_all_closest_first(n, key, &nodes).await;
    }
    for n in &nodes {
        assert_eq!(n.metrics.providers_without_address.get(), 0);
    }
    for n in nodes {
        n.stop().await;
    }
}

/// A node that dies without withdrawing (its process killed) is probed by the nodes that
/// store its provider records, which drop them: nobody is sent to it any more, long before
/// the records would expire.
#[tokio::test]
async fn the_records_of_a_node_that_died_are_dropped_by_the_nodes_that_store_them() {
    let nodes = seeded(3, |c| {
        c.idle_timeout = Duration::from_millis(300);
        c.provider_check = Duration::from_millis(500);
    })
    .await;
    let keys: Vec<String> = (0..3).map(|i| format!("sha256:gone-{i}")).collect();
    // Each node knows the others before b announces, so every record reaches both of them
    // (an announcement reaches the nodes its sender knows of then).
    for n in &nodes {
        ranks_all_closest_first(n, &keys[0], &nodes).await;
    }
    nodes[1]
        .router
        .advertise(keys.clone())
        .await
        .expect("advertise");
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in [&nodes[0], &nodes[2]] {
        while n.metrics.provider_records.get() < 3 {
            assert!(Instant::now() < deadline, "records stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every connection closes, so no broken connection tells anyone b is gone: only the
    // checks of the providers whose records a node holds can.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &nodes {
        while n.router.status().await.expect("status").connected_peers != 0 {
            assert!(Instant::now() < deadline, "idle connections close");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut nodes = nodes.into_iter();
    let (a, b, c) = (
        nodes.next().expect("a"),
        nodes.next().expect("b"),
        nodes.next().expect("c"),
    );
    b.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in [&a, &c] {
        while n.metrics.provider_records.get() > 0 {
            assert!(
                Instant::now() < deadline,
                "records of the dead node dropped: {} left",
                n.metrics.provider_records.get()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for k in &keys {
        assert!(
            collect_lookup(&c.router, k, Duration::from_millis(300))
                .await
                .is_empty()
        );
    }
    a.stop().await;
    c.stop().await;
}

/// `n` nodes configured by `config`, all bootstrapped to the first.
async fn seeded(n: usize, config: impl Fn(&mut P2pConfig)) -> Vec<Node> {
    let seed = start_with(&config).await;
    let seed_addr = seed.addr.clone();
    let mut nodes = vec![seed];
    for _ in 1..n {
        nodes.push(
            start_with(|c| {
                config(c);
                c.bootstrap = vec![seed_addr.clone()];
            })
            .await,
        );
    }
    nodes
}

/// Waits (10 s at most) until `node` ranks every one of `all` as owners of `key`, closest to
/// the key first.
async fn ranks_all_closest_first(node: &Node, key: &str, all: &[Node]) {
    let expected: Vec<String> = mirrorlet_routing::closest_first(
        key,
        all.iter().map(|n| n.router.peer_id()).collect(),
        |p| *p,
    )
    .iter()
    .map(ToString::to_string)
    .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ranked: Vec<String> = node
            .router
            .owners(key)
            .await
            .expect("owners")
            .into_iter()
            .map(|o| match o {
                mirrorlet_oci::Owner::Me => node.router.peer_id().to_string(),
                mirrorlet_oci::Owner::Peer(p) => p.id,
            })
            .collect();
        if ranked == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ranked {ranked:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
