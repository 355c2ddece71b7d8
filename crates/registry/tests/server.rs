//! The server loop against clients that stop reading: a response that makes no progress
//! for the send stall timeout has its connection closed (freeing its slot and buffers),
//! and a slow client that keeps reading is left alone.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use mirrorlet_registry::server::{self, Limits};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1 << 20;

/// Serves `/big`, `size` bytes in 1 MiB chunks, with a stall timeout of `stall`.
async fn serve_big(size: usize, stall: Duration) -> (std::net::SocketAddr, CancellationToken) {
    let app = axum::Router::new().route(
        "/big",
        axum::routing::get(move || async move {
            let chunks = futures_util::stream::iter(
                (0..size / MIB).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![7_u8; MIB]))),
            );
            Body::from_stream(chunks)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(server::serve(
        listener,
        app,
        Limits {
            send_stall_timeout: stall,
            ..Limits::default()
        },
        shutdown.clone(),
    ));
    (addr, shutdown)
}

async fn ask(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .expect("send");
    s
}

/// Reads until the end of the stream (or 20 s), `pause` between reads of at most `chunk`.
async fn drain(s: &mut TcpStream, chunk: usize, pause: Duration) -> (usize, bool) {
    let mut buf = vec![0_u8; chunk];
    let mut total = 0;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    })
    .await
    .is_ok();
    (total, ended)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_stall_timeout() {
    let size = 256 * MIB;
    let (addr, shutdown) = serve_big(size, Duration::from_millis(300)).await;
    let mut s = ask(addr).await;
    let mut head = [0_u8; 64];
    s.read_exact(&mut head).await.expect("the answer starts");
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    // Stop reading well past the stall timeout: every buffer between us fills up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (got, ended) = drain(&mut s, 64 * 1024, Duration::ZERO).await;
    assert!(ended, "the connection was closed");
    assert!(
        got < size,
        "closed before the body was sent: {got} of {size} bytes"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_slow_client_that_keeps_reading_gets_everything() {
    let size = 16 * MIB;
    let (addr, shutdown) = serve_big(size, Duration::from_secs(1)).await;
    let mut s = ask(addr).await;
    // About 12 MiB/s, in small reads.
    let (got, ended) = drain(&mut s, 256 * 1024, Duration::from_millis(20)).await;
    assert!(ended, "read to the end within 20 s");
    assert!(got > size, "the whole body and its head: {got} bytes");
    shutdown.cancel();
}
