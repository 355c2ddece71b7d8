//! The libp2p network behaviour: Kademlia (server mode, project protocol name) for
//! provider records, identify (so peers learn each other's listen addresses and registry
//! port), and a small request-response protocol through which a node tells its peers to
//! forget it as a provider of withdrawn keys.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, identify, kad};
use serde::{Deserialize, Serialize};

use crate::config::P2pConfig;
use crate::store::{Limits, Store};

/// The Kademlia protocol name: mirrorlet nodes form their own DHT, apart from IPFS's.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mirrorlet/kad/1.0.0");
/// The identify protocol version.
pub(crate) const IDENTIFY_PROTOCOL: &str = "/mirrorlet/id/1.0.0";
/// The withdraw protocol.
pub(crate) const WITHDRAW_PROTOCOL: StreamProtocol =
    StreamProtocol::new("/mirrorlet/withdraw/1.0.0");
/// Keys per withdraw message (well under the codec's 1 MiB request limit).
pub(crate) const WITHDRAW_BATCH: usize = 2_000;

/// "Forget me as a provider of these keys."
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WithdrawRequest {
    /// The keys.
    pub keys: Vec<String>,
}

/// Acknowledgement of a [`WithdrawRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WithdrawResponse {
    /// How many of the keys named the sender as a provider here.
    pub removed: usize,
}

/// The combined behaviour.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) kad: kad::Behaviour<Store>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) withdraw: request_response::json::Behaviour<WithdrawRequest, WithdrawResponse>,
}

/// The identify agent string, which also carries the registry port: `mirrorlet/<v> http=<port>`.
pub(crate) fn agent_version(http_port: u16) -> String {
    format!("mirrorlet/{} http={http_port}", env!("CARGO_PKG_VERSION"))
}

/// Reads the registry port from a peer's identify agent string.
pub(crate) fn http_port_of(agent_version: &str) -> Option<u16> {
    agent_version
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http=")?.parse().ok())
}

impl Behaviour {
    /// The behaviour for the node `key`; `records` counts the provider records it holds.
    pub(crate) fn new(
        key: &Keypair,
        config: &P2pConfig,
        records: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        let peer_id = key.public().to_peer_id();
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_query_timeout(config.query_timeout)
            .set_provider_record_ttl(Some(config.provider_ttl))
            // Republication is paced by the router itself (swarm/republish.rs).
            .set_provider_publication_interval(None)
            // Values are not used, only provider records.
            .set_record_ttl(Some(config.provider_ttl))
            .set_publication_interval(None)
            .set_replication_interval(None)
            .set_periodic_bootstrap_interval(Some(Duration::from_secs(5 * 60)))
            .set_replication_factor(config.replication);
        let store = Store::new(
            peer_id,
            Limits {
                max_keys: config.max_keys,
                max_providers_per_key: kad::K_VALUE.get(),
                max_records: 1024,
                max_value_bytes: 1024,
            },
            records,
        );
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        // Without this every node would stay a client until an external address is
        // confirmed, accept no records, and nobody would find anything.
        kad.set_mode(Some(kad::Mode::Server));
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                .with_agent_version(agent_version(config.http_port))
                .with_interval(Duration::from_secs(5 * 60)),
        );
        let withdraw = request_response::json::Behaviour::new(
            [(WITHDRAW_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
        );
        Self {
            kad,
            identify,
            withdraw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_port_travels_in_the_agent_string() {
        assert_eq!(http_port_of(&agent_version(30020)), Some(30020));
        assert_eq!(http_port_of("rust-libp2p/0.1"), None);
        assert_eq!(http_port_of("mirrorlet/x http=abc"), None);
    }
}
