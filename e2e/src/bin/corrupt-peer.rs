//! A misbehaving peer for the end-to-end tests: joins the agents' DHT with the real
//! routing crate, advertises blobs it downloaded from the upstream registry, and serves
//! them with one byte flipped in the middle (honouring `Range: bytes=N-`, like an agent).
//! It is a separate process so that no fault switch exists in the production binary.
//!
//! Usage: corrupt-peer <listen-ip> <bootstrap-dns host:port> <min-size> <blob-url>...
//! Blobs of at least `min-size` bytes are corrupted; smaller ones are served intact.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use libp2p::identity::Keypair;
use mirrorlet_oci::manifest::OCTET_STREAM;
use mirrorlet_oci::{Digest, Router};
use mirrorlet_registry::range;
use mirrorlet_registry::{content_head, respond};
use mirrorlet_routing::{P2pConfig, P2pMetrics, P2pRouter};
use tokio_util::sync::CancellationToken;

type Blobs = Arc<HashMap<String, Bytes>>;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 5,
        "usage: corrupt-peer <listen-ip> <dns host:port> <min-size> <blob-url>..."
    );
    let ip: IpAddr = args[1].parse().context("listen ip")?;
    let (dns_host, dns_port) = args[2].rsplit_once(':').context("dns host:port")?;
    let min_size: usize = args[3].parse().context("min-size")?;
    let mut blobs = HashMap::new();
    for url in &args[4..] {
        let digest = url
            .rsplit('/')
            .next()
            .context("blob url ends with the digest")?;
        let digest = Digest::parse(digest)?;
        let mut bytes = reqwest::get(url)
            .await?
            .error_for_status()?
            .bytes()
            .await?
            .to_vec();
        if bytes.len() >= min_size {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
        }
        blobs.insert(digest.to_string(), Bytes::from(bytes));
    }
    let keys: Vec<String> = blobs.keys().cloned().collect();
    let blobs: Blobs = Arc::new(blobs);

    let http = tokio::net::TcpListener::bind(SocketAddr::new(ip, 5000)).await?;
    let app = axum::Router::new().fallback(serve).with_state(blobs);
    tokio::spawn(async move { axum::serve(http, app).await });

    let mut config = P2pConfig::new(SocketAddr::new(ip, 5001), 5000, Keypair::generate_ed25519());
    config.bootstrap_dns = Some((dns_host.to_owned(), dns_port.parse()?));
    let shutdown = CancellationToken::new();
    let (router, task) = P2pRouter::start(config, P2pMetrics::default(), shutdown)?;
    // Announce once peers are there (and again now and then, as records may be dropped).
    loop {
        if router.status().await?.connected_peers > 0 {
            router.advertise(keys.clone()).await?;
            println!("corrupt-peer: advertised {} blobs", keys.len());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    task.await?;
    Ok(())
}

async fn serve(State(blobs): State<Blobs>, req: Request) -> Response {
    let digest = req.uri().path().rsplit('/').next().unwrap_or_default();
    let Some(bytes) = blobs.get(digest).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Ok(digest) = Digest::parse(digest) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Served as an agent serves a blob, ranges and all.
    let header = req.headers().get("range").and_then(|v| v.to_str().ok());
    let size = bytes.len() as u64;
    match range::select(header, size) {
        Ok((r, partial)) => respond(
            content_head(OCTET_STREAM, &digest, size, r, partial),
            Body::from(bytes.slice(r.start as usize..r.end as usize)),
        )
        .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}
