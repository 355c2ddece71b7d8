//! The gRPC connection to containerd: a lazily connected unix-socket channel that
//! reconnects on its own, requests scoped to a containerd namespace, and error mapping.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::tonic::transport::{Channel, Endpoint};
use containerd_client::tonic::{Code, Request, Status};
use hyper_util::rt::TokioIo;
use mirrorlet_oci::StoreError;

/// How long to wait for containerd to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Creates a channel to containerd's socket. The channel connects on first use and
/// reconnects after containerd restarts, so creating it never fails because containerd
/// is down.
pub(crate) fn channel(socket: &Path) -> Channel {
    let socket: PathBuf = socket.to_owned();
    // The URI is required by tonic but unused: the connector dials the unix socket.
    Endpoint::from_static("http://containerd.sock")
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
}

/// Wraps a message in a request scoped to `namespace`.
pub(crate) fn request<T>(namespace: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Ok(v) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    req
}

/// Whether a status means "no such object".
pub(crate) fn is_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound
}

/// Maps any other gRPC failure to "store unavailable", keeping containerd's message.
pub(crate) fn unavailable(what: &str, status: &Status) -> StoreError {
    StoreError::Unavailable(format!(
        "containerd {what}: {} ({:?})",
        status.message(),
        status.code()
    ))
}
