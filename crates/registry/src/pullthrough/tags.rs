//! Tags: fresh while upstream is up, served from the cluster when it is not.
//!
//! A tag's owner (the router's ranking for `registry/repo:tag`) resolves it with a `HEAD`
//! upstream (Docker Hub does not count those) at most once per revalidation window, for
//! the whole cluster; every other node asks the owner. So a moved tag, `latest` included,
//! is seen everywhere within the window, and rolling out an image the cluster already holds
//! costs no counted pull.
//!
//! When upstream is unreachable, failing or rate limiting, the last digest the cluster
//! knows for the tag is served (with a warning and a metric) if it was confirmed within
//! the staleness limit: from this node's memory, its containerd, or a peer's. Every
//! answer carries when the digest was confirmed upstream, so a stale answer passed on
//! never looks fresh. When upstream says the tag does not exist or refuses access, nothing
//! is served for it: a deleted or private tag stays gone.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use mirrorlet_oci::{ImageName, UpstreamError};

use crate::fetch;
use crate::metrics::{FetchLabels, Source};
use crate::outcome::log_upstream_error;
use crate::state::AppState;
use crate::tag_memory::TagEntry;

/// A tag resolved for a client.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// What the tag points at, and when that was confirmed upstream.
    pub entry: TagEntry,
    /// Where the answer came from.
    pub source: Source,
}

/// Resolves `name` as its owner: from memory within the revalidation window, else with one
/// `HEAD` upstream (shared by concurrent callers), else, while upstream is down, from what
/// the cluster knows. `Err` names why there is no answer.
pub(crate) async fn resolve(state: &Arc<AppState>, name: &ImageName) -> Result<Resolved, String> {
    let key = name.to_string();
    let window = state.pull.tag_revalidate;
    if let Some(e) = state.tags.get(&key).filter(|e| e.age() < window) {
        return Ok(Resolved {
            entry: e,
            source: Source::Local,
        });
    }
    let work = {
        let (state, name) = (state.clone(), name.clone());
        move || {
            async move {
                // Confirmed as of when upstream was asked, not when the answer was read.
                let asked = SystemTime::now();
                state
                    .upstream
                    .head_manifest(
                        &name.registry,
                        &name.repository,
                        &name.reference,
                        super::ACCEPT_ALL,
                    )
                    .await
                    .map(|d| (d, asked))
            }
            .boxed()
        }
    };
    let (checked, joined) = state.tags.flights.run(key.clone(), work).await;
    let role = if joined { "joined" } else { "revalidated" };
    state
        .metrics
        .fetches
        .get_or_create(&FetchLabels { kind: "tag", role })
        .inc();
    let checked = checked
        .unwrap_or_else(|| Err(UpstreamError::Unavailable("the revalidation failed".into())));
    match checked {
        Ok((descriptor, confirmed)) => {
            let entry = TagEntry {
                descriptor,
                confirmed,
            };
            state.tags.put(&key, entry.clone());
            Ok(Resolved {
                entry,
                source: Source::Upstream,
            })
        }
        Err(
            e @ (UpstreamError::NotFound(_)
            | UpstreamError::Denied(_)
            | UpstreamError::NotAllowed(_)),
        ) => {
            state.tags.remove(&key);
            log_upstream_error(&name.registry, &name.repository, &e);
            Err(format!("{key}: {e}"))
        }
        Err(e) => stale(state, name, &e).await,
    }
}

/// The newest digest the cluster knows for `name` (this node's memory, its containerd, a
/// peer's answer), if it was confirmed within the staleness limit. Confirmation times
/// from elsewhere are taken as no later than now, so a fast clock cannot stretch the limit.
async fn stale(
    state: &Arc<AppState>,
    name: &ImageName,
    why: &UpstreamError,
) -> Result<Resolved, String> {
    let key = name.to_string();
    let limit = state.pull.stale_tag_max_age;
    let now = SystemTime::now();
    let mut found: Vec<(TagEntry, Source)> = Vec::new();
    if let Some(e) = state.tags.get(&key) {
        found.push((e, Source::Local));
    }
    if let Ok(Some(t)) = state.store.resolve(name).await
        && let Some(confirmed) = t.updated
    {
        found.push((
            TagEntry {
                descriptor: t.descriptor,
                confirmed,
            },
            Source::Local,
        ));
    }
    if state.peers.enabled {
        let path = format!(
            "/v2/{}/manifests/{}?ns={}",
            name.repository, name.reference, name.registry
        );
        if let Some(m) = fetch::manifest(state, &key, &path, None, super::ACCEPT_ALL).await
            && let Some(confirmed) = m.confirmed
        {
            found.push((
                TagEntry {
                    descriptor: m.descriptor,
                    confirmed: confirmed.min(now),
                },
                Source::Peer,
            ));
        }
    }
    let newest = found.into_iter().max_by_key(|(e, _)| e.confirmed);
    match newest {
        Some((entry, source)) if entry.age() <= limit => {
            state.metrics.stale_tags.inc();
            tracing::warn!(tag = %key, digest = %entry.descriptor.digest, confirmed_ago = ?Duration::from_secs(entry.age().as_secs()), upstream = %why, "upstream unavailable; serving the last digest the cluster knows for this tag");
            state.tags.put(&key, entry.clone());
            Ok(Resolved { entry, source })
        }
        Some((entry, _)) => Err(format!(
            "{key}: upstream unavailable ({why}) and the digest the cluster knows was confirmed {:?} ago, more than --stale-tag-max-age {limit:?}",
            Duration::from_secs(entry.age().as_secs())
        )),
        None => Err(format!(
            "{key}: upstream unavailable ({why}) and no node knows the tag"
        )),
    }
}

/// What this node itself knows of `name` and can serve (its manifest is held here): from
/// memory or from containerd's tag, whichever was confirmed later.
pub(crate) async fn local(state: &AppState, name: &ImageName) -> Option<TagEntry> {
    let key = name.to_string();
    let remembered = match state.tags.get(&key) {
        Some(e) if matches!(state.store.size(&e.descriptor.digest).await, Ok(Some(_))) => Some(e),
        _ => None,
    };
    let held = match state.store.resolve(name).await {
        Ok(Some(t)) => t.updated.map(|confirmed| TagEntry {
            descriptor: t.descriptor,
            confirmed,
        }),
        _ => None,
    };
    match (remembered, held) {
        (Some(a), Some(b)) => Some(if a.confirmed >= b.confirmed { a } else { b }),
        (a, b) => a.or(b),
    }
}
