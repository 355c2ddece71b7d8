//! The transport: TCP, optionally wrapped in a private network (pre-shared key), then
//! noise encryption and yamux multiplexing.

use std::io;
use std::time::Duration;

use futures_util::future::Either;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{PeerId, Transport, noise, tcp, yamux};

/// Builds the boxed transport.
pub(crate) fn build(
    key: &Keypair,
    psk: Option<PreSharedKey>,
) -> io::Result<Boxed<(PeerId, StreamMuxerBox)>> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let base = tcp.and_then(move |socket, _| async move {
        match psk {
            Some(psk) => PnetConfig::new(psk)
                .handshake(socket)
                .await
                .map(Either::Left)
                .map_err(io::Error::other),
            None => Ok(Either::Right(socket)),
        }
    });
    let noise = noise::Config::new(key).map_err(io::Error::other)?;
    Ok(base
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(Duration::from_secs(10))
        .boxed())
}
