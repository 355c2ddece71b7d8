//! The size of a blob at the peers that hold it, for a `HEAD` (no bytes are taken, so
//! none need verifying).

use http::StatusCode;
use mirrorlet_oci::{Digest, Peer};

use super::candidates;
use crate::headers::content_length;
use crate::peers;
use crate::state::AppState;

/// The size the first peer holding `digest` announces, if any does.
pub(crate) async fn head(state: &AppState, digest: &Digest, path_and_query: &str) -> Option<u64> {
    let mut cands = candidates(state, digest.as_str());
    let mut attempts = 0;
    loop {
        let (peer, resp) = peers::open(
            state,
            &mut cands,
            &mut attempts,
            &|p: &Peer| {
                state
                    .http
                    .head(format!("http://{}{path_and_query}", p.addr))
            },
            &|s| s == StatusCode::OK,
        )
        .await?;
        match content_length(&resp) {
            Some(size) => return Some(size),
            None => {
                state
                    .failed_peers
                    .mark(&peer, state.peers.failure_backoff, "no Content-Length")
            }
        }
    }
}
