//! The HTTP/1.1 server loop: a bounded number of connections, a header read timeout
//! against slow clients, a send stall timeout against clients that stop reading, and
//! graceful shutdown that lets in-flight responses finish.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Server limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Time allowed for a client to send a request head.
    pub header_read_timeout: Duration,
    /// How long a response may wait for a client that takes no bytes before its
    /// connection is closed (a client that stopped reading holds a connection slot and
    /// the buffers of its response for as long as it is left alone).
    pub send_stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            send_stall_timeout: Duration::from_secs(30),
        }
    }
}

/// How often refusals over the connection limit are logged, at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops accepting and
/// waits for open connections to finish their current responses. Callers bound that
/// wait with their own grace timeout.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (mut refused, mut refusal_logged) = (0_u64, None::<Instant>);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refusal_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                tracing::warn!(%peer, limit = limits.max_connections, refused, "connection limit reached; closing connections over it (logged at most every 10 s)");
                (refused, refusal_logged) = (0, Some(Instant::now()));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Handlers see where the connection came from (`ConnectInfo`).
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        ));
        let stall = Arc::new(Stall::new());
        let io = Watched {
            inner: stream,
            stall: stall.clone(),
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        let limit = limits.send_stall_timeout;
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut check = tokio::time::interval((limit / 4).max(Duration::from_millis(50)));
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = check.tick() => {
                        // A zero limit turns the check off.
                        if !limit.is_zero() && stall.blocked_for() >= limit {
                            tracing::warn!(%peer, stalled = ?limit, "the client took no bytes of a response for the send stall timeout; closing its connection");
                            break;
                        }
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// When a connection's writes started waiting for the client, if they are waiting.
struct Stall {
    origin: Instant,
    /// Milliseconds from `origin` (plus one) at which a write first found the client's
    /// window full; 0 while writes go through.
    since: AtomicU64,
}

impl Stall {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            since: AtomicU64::new(0),
        }
    }

    fn note(&self, blocked: bool) {
        if !blocked {
            self.since.store(0, Ordering::Relaxed);
        } else if self.since.load(Ordering::Relaxed) == 0 {
            let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.since.store(now + 1, Ordering::Relaxed);
        }
    }

    /// How long writes have been waiting for the client (zero if they are not).
    fn blocked_for(&self) -> Duration {
        match self.since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => self
                .origin
                .elapsed()
                .saturating_sub(Duration::from_millis(since - 1)),
        }
    }
}

/// A connection's stream that records in [`Stall`] whether its writes are waiting.
struct Watched<S> {
    inner: S,
    stall: Arc<Stall>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.stall.note(r.is_pending());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.stall.note(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
