use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use mirrorlet_oci::{ByteRange, Digest};

use super::*;

fn data() -> Bytes {
    Bytes::from((0..10_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>())
}

/// Collects what a reader yields within `limit` (it may be waiting for more).
async fn take(s: &mut BlobStream, limit: Duration) -> (Vec<u8>, Option<io::Error>, bool) {
    let mut got = Vec::new();
    let ended = tokio::time::timeout(limit, async {
        while let Some(c) = s.next().await {
            match c {
                Ok(c) => got.extend_from_slice(&c),
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await;
    match ended {
        Ok(err) => {
            let done = err.is_none();
            (got, err, done)
        }
        Err(_) => (got, None, false),
    }
}

#[tokio::test]
async fn readers_follow_the_writer_but_the_last_byte_waits_for_verification() {
    let bytes = data();
    let t = Transfer::new(Digest::sha256_of(&bytes));
    let mut early = t.read(ByteRange::full(bytes.len() as u64), 1);
    let (mut sink, backing) = Sink::memory(&t);
    t.begin(bytes.len() as u64, Origin::Upstream, backing);
    assert!(!t.hold_all());
    sink.write(bytes.slice(..4000)).await.expect("write");
    let (got, err, done) = take(&mut early, Duration::from_millis(100)).await;
    assert_eq!(
        (got.as_slice(), err.is_none(), done),
        (&bytes[..4000], true, false)
    );
    sink.write(bytes.slice(4000..)).await.expect("write");
    let (got, _, done) = take(&mut early, Duration::from_millis(100)).await;
    assert_eq!(
        got.as_slice(),
        &bytes[4000..bytes.len() - 1],
        "all but the last byte"
    );
    assert!(!done);
    assert!(t.released(), "bytes went out before verification");
    assert!(sink.finish().await.expect("finish"));
    t.finish(Outcome::Verified);
    let (got, err, done) = take(&mut early, Duration::from_millis(100)).await;
    assert_eq!(got.as_slice(), &bytes[bytes.len() - 1..]);
    assert!(err.is_none() && done);
    // A reader arriving later reads a range of the verified copy.
    let mut late = t.read(ByteRange { start: 10, end: 20 }, 1);
    let (got, _, done) = take(&mut late, Duration::from_millis(100)).await;
    assert_eq!((got.as_slice(), done), (&bytes[10..20], true));
}

#[tokio::test]
async fn a_failure_ends_readers_with_an_error_and_a_restart_cuts_those_that_took_bytes() {
    let bytes = data();
    let t = Transfer::new(Digest::sha256_of(&bytes));
    let (mut sink, backing) = Sink::memory(&t);
    t.begin(bytes.len() as u64, Origin::Peer, backing);
    let mut reader = t.read(ByteRange::full(bytes.len() as u64), 1);
    sink.write(bytes.slice(..100)).await.expect("write");
    let (got, _, _) = take(&mut reader, Duration::from_millis(50)).await;
    assert_eq!(got.len(), 100);
    // The copy starts over (as it would after a bad source): this reader had bytes.
    let (_sink2, backing2) = Sink::memory(&t);
    t.begin(bytes.len() as u64, Origin::Peer, backing2);
    let (_, err, _) = take(&mut reader, Duration::from_millis(50)).await;
    assert!(err.expect("cut").to_string().contains("started over"));

    let waiting = t.read(ByteRange::full(bytes.len() as u64), 1);
    t.finish(Outcome::Failed {
        corrupt: true,
        why: "did not match".into(),
    });
    let mut waiting = waiting;
    let (got, err, _) = take(&mut waiting, Duration::from_millis(50)).await;
    assert!(got.is_empty());
    assert!(err.expect("failed").to_string().contains("did not match"));
    assert!(t.size().await.is_err());
}

#[tokio::test]
async fn content_from_holders_is_held_back_whole_and_peers_are_capped() {
    let bytes = data();
    let t = Transfer::new(Digest::sha256_of(&bytes));
    let (mut sink, backing) = Sink::memory(&t);
    t.begin(bytes.len() as u64, Origin::Holders, backing);
    assert!(t.hold_all());
    let mut whole = t.read(ByteRange::full(bytes.len() as u64), bytes.len() as u64);
    sink.write(bytes.clone()).await.expect("write");
    let (got, _, _) = take(&mut whole, Duration::from_millis(50)).await;
    assert!(got.is_empty(), "nothing before verification");
    assert!(!t.released());

    let first = t.admit_peer(2).expect("one");
    let second = t.admit_peer(2).expect("two");
    assert!(t.admit_peer(2).is_none(), "over the cap");
    drop(first);
    assert!(t.admit_peer(2).is_some(), "room again");
    drop(second);
}

#[tokio::test]
async fn a_file_backed_copy_is_readable_while_it_grows() {
    let dir = tempfile::tempdir().expect("dir");
    let bytes = Bytes::from(vec![7u8; 3 << 20]);
    let t = Transfer::new(Digest::sha256_of(&bytes));
    let (mut sink, backing) = Sink::file(&t, dir.path()).await.expect("spool");
    t.begin(bytes.len() as u64, Origin::Upstream, backing);
    let mut reader = t.read(
        ByteRange {
            start: 1000,
            end: bytes.len() as u64,
        },
        1,
    );
    sink.write(bytes.slice(..(1 << 20))).await.expect("write");
    sink.write(bytes.slice((1 << 20)..)).await.expect("write");
    assert!(sink.finish().await.expect("finish"));
    t.finish(Outcome::Verified);
    let (got, err, done) = take(&mut reader, Duration::from_secs(5)).await;
    assert!(err.is_none() && done);
    assert_eq!(got.len(), bytes.len() - 1000);
}
