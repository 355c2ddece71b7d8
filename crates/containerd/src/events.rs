//! Following containerd's event stream and turning it into [`StoreEvent`]s, reconnecting
//! with backoff when containerd goes away.

use std::time::Duration;

use containerd_client::events::{ContentCreate, ContentDelete};
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::{ImageCreate, ImageDelete, ImageUpdate};
use containerd_client::services::v1::{PublishRequest, SubscribeRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::types::Envelope;
use mirrorlet_oci::{Digest, StoreEvent};
use prost::Message;
use tokio::sync::mpsc;

use crate::client::request;
use tokio::time::{Instant, sleep_until};

/// First and largest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// containerd 1.6 publishes no event when garbage collection removes content (nor when
/// content is committed). After an image is deleted, a resync this much later notices the
/// content that collection removed.
const GC_SETTLE: Duration = Duration::from_secs(2);

/// Topic of the marker events mirrorlet publishes to learn that its subscription is live.
const MARKER_TOPIC: &str = "/mirrorlet/subscribed";
/// How often to publish a marker until the subscription answers.
const MARKER_EVERY: Duration = Duration::from_millis(200);

/// Follows the event stream for `namespace`, sending events to `tx` until it is closed.
///
/// containerd sends a subscription's response headers only with its first event, so a
/// subscription cannot be seen to be live until an event arrives. To know when it is, this
/// publishes marker events until the first one (or any event) comes back, and only then
/// sends [`StoreEvent::Resync`]: anything after that is on the feed.
pub(crate) async fn follow(channel: Channel, namespace: String, tx: mpsc::Sender<StoreEvent>) {
    let mut backoff = BACKOFF_MIN;
    let mut was_connected = true;
    let mut subscribed_before = false;
    loop {
        let mut client = EventsClient::new(channel.clone());
        let filter = format!("namespace==\"{namespace}\"");
        let req = SubscribeRequest {
            filters: vec![filter],
        };
        let subscribe = client.subscribe(req);
        let stream = tokio::select! {
            r = subscribe => Some(r),
            () = publish_markers(channel.clone(), &namespace) => None,
            () = tx.closed() => return,
        };
        match stream {
            Some(Ok(resp)) => {
                if subscribed_before {
                    tracing::info!("containerd event stream reconnected; resyncing");
                } else {
                    tracing::info!(%namespace, "following containerd events");
                }
                subscribed_before = true;
                was_connected = true;
                backoff = BACKOFF_MIN;
                if tx.send(StoreEvent::Resync).await.is_err() {
                    return;
                }
                if forward(resp.into_inner(), &tx).await.is_err() {
                    return;
                }
                tracing::warn!("containerd event stream ended; reconnecting");
            }
            Some(Err(status)) => {
                if was_connected {
                    tracing::warn!(error = %status.message(), "cannot subscribe to containerd events; retrying with backoff");
                }
                was_connected = false;
            }
            None => was_connected = false,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = tx.closed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Publishes marker events until containerd refuses one (then returns, so the caller
/// retries the subscription). Never returns while publishing works.
async fn publish_markers(channel: Channel, namespace: &str) {
    let mut client = EventsClient::new(channel);
    // The first marker goes out almost at once; if the subscription was not registered in
    // time to see it, the next ones follow.
    let mut wait = Duration::from_millis(20);
    loop {
        tokio::time::sleep(wait).await;
        wait = MARKER_EVERY;
        let marker = ContentCreate {
            digest: String::new(),
            size: 0,
        };
        let req = PublishRequest {
            topic: MARKER_TOPIC.to_owned(),
            event: Some(prost_types::Any {
                type_url: "containerd.events.ContentCreate".to_owned(),
                value: marker.encode_to_vec(),
            }),
        };
        if let Err(status) = client.publish(request(namespace, req)).await {
            tracing::debug!(error = %status.message(), "publishing subscription marker failed");
            return;
        }
    }
}

/// The receiver is gone.
struct Closed;

async fn forward(
    mut stream: containerd_client::tonic::Streaming<Envelope>,
    tx: &mpsc::Sender<StoreEvent>,
) -> Result<(), Closed> {
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut resync_at = far;
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(env)) => {
                    let Some(event) = translate(&env) else { continue };
                    if matches!(event, StoreEvent::ImageDeleted(_)) {
                        resync_at = Instant::now() + GC_SETTLE;
                    }
                    tx.send(event).await.map_err(|_| Closed)?;
                }
                Ok(None) => return Ok(()),
                Err(status) => {
                    tracing::warn!(error = %status.message(), "containerd event stream failed");
                    return Ok(());
                }
            },
            () = sleep_until(resync_at) => {
                resync_at = far;
                tx.send(StoreEvent::Resync).await.map_err(|_| Closed)?;
            }
            () = tx.closed() => return Err(Closed),
        }
    }
}

/// Maps an envelope to a store event by topic; other topics are ignored.
fn translate(env: &Envelope) -> Option<StoreEvent> {
    let payload = env.event.as_ref()?.value.as_slice();
    match env.topic.as_str() {
        "/images/create" => Some(StoreEvent::ImageChanged(
            ImageCreate::decode(payload).ok()?.name,
        )),
        "/images/update" => Some(StoreEvent::ImageChanged(
            ImageUpdate::decode(payload).ok()?.name,
        )),
        "/images/delete" => Some(StoreEvent::ImageDeleted(
            ImageDelete::decode(payload).ok()?.name,
        )),
        "/content/create" => Some(StoreEvent::ContentAdded(
            Digest::parse(&ContentCreate::decode(payload).ok()?.digest).ok()?,
        )),
        "/content/delete" => Some(StoreEvent::ContentDeleted(
            Digest::parse(&ContentDelete::decode(payload).ok()?.digest).ok()?,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(topic: &str, payload: Vec<u8>) -> Envelope {
        Envelope {
            timestamp: None,
            namespace: "k8s.io".into(),
            topic: topic.into(),
            event: Some(prost_types::Any {
                type_url: String::new(),
                value: payload,
            }),
        }
    }

    #[test]
    fn translates_image_and_content_topics() {
        let image = |name: &str| {
            ImageCreate {
                name: name.into(),
                labels: Default::default(),
            }
            .encode_to_vec()
        };
        assert_eq!(
            translate(&envelope("/images/create", image("a.io/b:c"))),
            Some(StoreEvent::ImageChanged("a.io/b:c".into()))
        );
        assert_eq!(
            translate(&envelope("/images/update", image("a.io/b:c"))),
            Some(StoreEvent::ImageChanged("a.io/b:c".into()))
        );
        let d = Digest::sha256_of(b"x");
        let gone = ContentDelete {
            digest: d.to_string(),
        }
        .encode_to_vec();
        assert_eq!(
            translate(&envelope("/content/delete", gone)),
            Some(StoreEvent::ContentDeleted(d))
        );
        assert_eq!(translate(&envelope("/snapshot/commit", vec![])), None);
        let bad = ContentDelete {
            digest: "sha256:nope".into(),
        }
        .encode_to_vec();
        assert_eq!(translate(&envelope("/content/delete", bad)), None);
    }
}
