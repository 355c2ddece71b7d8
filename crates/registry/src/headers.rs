//! What agents say to each other over HTTP besides content: the header names, and the
//! values that carry addresses and times. A leaf: the handlers and the clients both use
//! it, and it uses neither.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, header};
use mirrorlet_oci::Peer;

/// The header an agent sets on requests to another agent, naming its registry addresses
/// (see [`sender`]). A request carrying it is answered from what the node
/// holds or is downloading only (unless it asks the node as an owner), so agents never
/// forward in loops.
pub const PEER_HEADER: &str = "x-mirrorlet-peer";

/// With [`PEER_HEADER`], asks the receiving agent to act as the owner: to fetch
/// what it does not hold from upstream, for the cluster, and serve it as it arrives. Its
/// value is [`ASK_OWNER`] or [`INSIST`] (any other value counts as insisting).
pub(crate) const CLUSTER_HEADER: &str = "x-mirrorlet-fetch";

/// [`CLUSTER_HEADER`]: fetch it, or send the asker on to an agent closer to the key.
pub(crate) const ASK_OWNER: &str = "owner";

/// [`CLUSTER_HEADER`]: fetch it here, whoever is closer (the asker found no better owner).
pub(crate) const INSIST: &str = "insist";

/// On an [`INSIST`]: the agent this one redirected to, which failed the asker.
pub(crate) const FAILED_HEADER: &str = "x-mirrorlet-failed";

/// Set on the `503` of an agent that already streams a blob to as many peers as it may.
pub(crate) const BUSY_HEADER: &str = "x-mirrorlet-busy";

/// On a busy answer: the registries of agents that read the blob from this one lately,
/// comma-separated: they stream their own copies as they grow.
pub(crate) const FOLLOWERS_HEADER: &str = "x-mirrorlet-followers";

/// On a `421` to an agent that asked this one as the owner: the registry of an agent
/// closer to the key, to ask instead.
pub(crate) const OWNER_HEADER: &str = "x-mirrorlet-owner";

/// When the digest a tag resolves to was last confirmed upstream, in seconds since the
/// Unix epoch: on tag answers between agents, so a stale answer never looks fresh.
pub(crate) const TAG_CONFIRMED_HEADER: &str = "x-mirrorlet-tag-confirmed";

/// A header value listing `addrs`, comma-separated.
pub(crate) fn addr_header(addrs: &[SocketAddr]) -> HeaderValue {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    HeaderValue::from_str(&list.join(", ")).unwrap_or_else(|_| HeaderValue::from_static("1"))
}

/// The registry of the agent that sent `headers` over a connection from `from`: the
/// address its [`PEER_HEADER`] names on that IP. An agent is taken at its word only
/// where its connection comes from, so nobody can have others sent to an address of its
/// choosing. `None` when it names none there.
pub(crate) fn sender(headers: &HeaderMap, from: IpAddr) -> Option<SocketAddr> {
    let from = from.to_canonical();
    addr_list(headers.get(PEER_HEADER)?)
        .into_iter()
        .find(|a| a.ip().to_canonical() == from)
}

/// The addresses in a comma-separated header value that could be an agent's registry
/// (unparsable ones, port 0, unspecified and multicast addresses left out).
pub(crate) fn addr_list(value: &HeaderValue) -> Vec<SocketAddr> {
    value
        .to_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|s| s.trim().parse::<SocketAddr>().ok())
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast())
        .collect()
}

/// An agent known by its registry address only.
pub(crate) fn peer_at(addr: SocketAddr) -> Peer {
    Peer {
        id: addr.to_string(),
        addr,
    }
}

/// The confirmation time an agent put on a tag answer.
pub(crate) fn confirmed_of(headers: &HeaderMap) -> Option<SystemTime> {
    let secs: u64 = headers
        .get(TAG_CONFIRMED_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// The header value for a confirmation time.
pub(crate) fn confirmed_header(at: SystemTime) -> HeaderValue {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    HeaderValue::from(secs)
}

/// The blob's total size from a partial answer's `Content-Range`, if the range it carries
/// starts at `from`.
pub(crate) fn range_total(resp: &reqwest::Response, from: u64) -> Option<u64> {
    let range = resp.headers().get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (span, total) = range.strip_prefix("bytes ")?.rsplit_once('/')?;
    let (start, _) = span.split_once('-')?;
    (start.parse::<u64>().ok()? == from)
        .then(|| total.parse().ok())
        .flatten()
}

/// The size a peer announced (the header: a HEAD's body is empty).
pub(crate) fn content_length(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_answer_names_its_total_only_when_it_starts_where_asked() {
        let answer = |range: &str| {
            reqwest::Response::from(
                http::Response::builder()
                    .header(header::CONTENT_RANGE, range)
                    .body(Vec::<u8>::new())
                    .expect("response"),
            )
        };
        assert_eq!(range_total(&answer("bytes 100-199/1000"), 100), Some(1000));
        assert_eq!(range_total(&answer("bytes 0-99/1000"), 100), None);
        assert_eq!(range_total(&answer("bytes 100-199/*"), 100), None);
        assert_eq!(range_total(&answer("items 100-199/1000"), 100), None);
    }

    fn headers(peer: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(PEER_HEADER, HeaderValue::from_str(peer).expect("value"));
        h
    }

    #[test]
    fn the_sender_is_named_by_the_address_its_connection_came_from() {
        let h = headers("10.0.0.5:5000, [fd00::5]:5000, 172.17.0.1:5000");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let addr = |s: &str| Some(s.parse::<SocketAddr>().expect("addr"));
        assert_eq!(sender(&h, ip("172.17.0.1")), addr("172.17.0.1:5000"));
        assert_eq!(sender(&h, ip("fd00::5")), addr("[fd00::5]:5000"));
        // An IPv4 peer on a dual-stack listener.
        assert_eq!(sender(&h, ip("::ffff:10.0.0.5")), addr("10.0.0.5:5000"));
        // A source it does not name: not taken at its word.
        assert_eq!(sender(&h, ip("10.0.0.9")), None);
        assert_eq!(sender(&h, ip("fd00::9")), None);
        // An agent that does not know its addresses yet, or garbage: nobody.
        assert_eq!(sender(&headers("1"), ip("10.0.0.5")), None);
        assert_eq!(sender(&headers("x, y:z"), ip("10.0.0.5")), None);
        assert_eq!(sender(&HeaderMap::new(), ip("10.0.0.5")), None);
        // Addresses no registry can have are never named.
        assert_eq!(sender(&headers("0.0.0.0:5000"), ip("0.0.0.0")), None);
        assert_eq!(sender(&headers("10.0.0.5:0"), ip("10.0.0.5")), None);
    }
}
