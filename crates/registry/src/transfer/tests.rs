use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use mirrorlet_oci::{Budget, ByteRange, Digest};

use super::*;

fn data() -> Bytes {
    Bytes::from((0..10_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>())
}

/// Collects what a reader yields within `limit` (it may be waiting for more): the bytes,
/// the error it ended with, and whether it ended.
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

const SHORT: Duration = Duration::from_millis(100);

#[tokio::test]
async fn readers_follow_the_writer_but_the_last_byte_waits_for_verification() {
    let bytes = data();
    let size = bytes.len() as u64;
    let t = Transfer::new(Digest::sha256_of(&bytes));
    let (mut sink, backing) = Sink::memory(&t);
    t.begin(size, Origin::Upstream, backing);
    assert!(!t.copied_from_holders());
    let (begun, generation) = t.begun().await.expect("begun");
    assert_eq!(begun, size);
    let mut whole = t.read(ByteRange::full(size), generation);
    // A range ending before the blob's end holds back its own last byte too.
    let mut part = t.read(
        ByteRange {
            start: 100,
            end: 200,
        },
        generation,
    );
    sink.write_at(0, bytes.slice(..4000)).await.expect("write");
    let (got, err, done) = take(&mut whole, SHORT).await;
    assert_eq!(
        (got.as_slice(), err.is_none(), done),
        (&bytes[..4000], true, false)
    );
    let (got, _, done) = take(&mut part, SHORT).await;
    assert_eq!((got.as_slice(), done), (&bytes[100..199], false));
    sink.write_at(4000, bytes.slice(4000..))
        .await
        .expect("write");
    let (got, _, done) = take(&mut whole, SHORT).await;
    assert_eq!(
        got.as_slice(),
        &bytes[4000..bytes.len() - 1],
        "all but the last byte"
    );
    assert!(!done);
    assert!(t.released(), "bytes went out before verification");
    assert!(sink.finish(bytes.len() as u64).await.expect("finish"));
    t.finish(Outcome::Verified);
    let (got, err, done) = take(&mut whole, SHORT).await;
    assert_eq!(got.as_slice(), &bytes[bytes.len() - 1..]);
    assert!(err.is_none() && done);
    let (got, _, done) = take(&mut part, SHORT).await;
    assert_eq!((got.as_slice(), done), (&bytes[199..200], true));
}

#[tokio::test]
async fn a_failure_ends_readers_with_an_error_and_a_restart_cuts_them() {
    let bytes = data();
    let size = bytes.len() as u64;
    let t = Transfer::new(Digest::sha256_of(&bytes));
    let (mut sink, backing) = Sink::memory(&t);
    t.begin(size, Origin::Peer, backing);
    let (_, first) = t.begun().await.expect("begun");
    let mut reader = t.read(ByteRange::full(size), first);
    sink.write_at(0, bytes.slice(..100)).await.expect("write");
    let (got, _, _) = take(&mut reader, SHORT).await;
    assert_eq!(got.len(), 100);
    // The copy starts over with another size (as after a source that lied): the reader,
    // whose range was chosen for the first copy, is cut.
    let (mut second, backing2) = Sink::memory(&t);
    t.begin(size - 10, Origin::Peer, backing2);
    let (_, err, _) = take(&mut reader, SHORT).await;
    assert!(err.expect("cut").to_string().contains("started over"));
    // A late write of the abandoned copy does not move the new one.
    sink.write_at(100, bytes.slice(100..5000))
        .await
        .expect("late write");
    assert_eq!(t.progress().written, 0);
    second.write_at(0, bytes.slice(..10)).await.expect("write");
    assert_eq!(t.progress().written, 10);

    let (_, now) = t.begun().await.expect("begun");
    let mut waiting = t.read(ByteRange::full(size - 10), now);
    t.finish(Outcome::Failed {
        corrupt: true,
        gone: false,
        why: "did not match".into(),
    });
    let (_, err, _) = take(&mut waiting, SHORT).await;
    assert!(err.expect("failed").to_string().contains("did not match"));
    assert!(t.begun().await.is_err());
}

#[tokio::test]
async fn content_copied_from_holders_asks_for_verification_first_and_peers_are_capped() {
    let bytes = data();
    let t = Transfer::new(Digest::sha256_of(&bytes));
    let (_sink, backing) = Sink::memory(&t);
    t.begin(bytes.len() as u64, Origin::Holders, backing);
    assert!(t.copied_from_holders());
    t.set_origin(Origin::Upstream);
    assert!(
        !t.copied_from_holders(),
        "decided by where the copy comes from"
    );

    let first = t.admit_peer(2, None).expect("one");
    let second = t.admit_peer(2, None).expect("two");
    assert!(t.admit_peer(2, None).is_none(), "over the cap");
    drop(first);
    assert!(t.admit_peer(2, None).is_some(), "room again");
    drop(second);
}

#[test]
fn followers_are_the_peers_that_read_lately_newest_first() {
    let t = Transfer::new(Digest::sha256_of(b"x"));
    let addr = |i: usize| std::net::SocketAddr::from(([10, 0, 0, i as u8], 5000));
    for i in 0..3 {
        drop(t.admit_peer(1, Some(addr(i))).expect("room"));
    }
    // Refused peers are not followers; one reading again moves to the front.
    let reading = t.admit_peer(1, Some(addr(1))).expect("room");
    assert!(t.admit_peer(1, Some(addr(9))).is_none());
    assert_eq!(t.followers(), [addr(1), addr(2), addr(0)]);
    drop(reading);
    for i in 10..40 {
        drop(t.admit_peer(1, Some(addr(i))).expect("room"));
    }
    let kept = t.followers();
    assert_eq!(kept.len(), super::FOLLOWERS_KEPT, "bounded");
    assert_eq!(kept[0], addr(39));
}

#[tokio::test]
async fn a_file_backed_copy_is_readable_while_it_grows() {
    let dir = tempfile::tempdir().expect("dir");
    let bytes = Bytes::from(vec![7u8; 3 << 20]);
    let size = bytes.len() as u64;
    let t = Transfer::new(Digest::sha256_of(&bytes));
    let (mut sink, backing) = Sink::file(&t, dir.path(), Budget::default(), Budget::default())
        .await
        .expect("spool");
    t.begin(size, Origin::Upstream, backing);
    let (_, generation) = t.begun().await.expect("begun");
    let mut reader = t.read(
        ByteRange {
            start: 1000,
            end: size,
        },
        generation,
    );
    sink.write_at(0, bytes.slice(..(1 << 20)))
        .await
        .expect("write");
    sink.write_at(1 << 20, bytes.slice((1 << 20)..))
        .await
        .expect("write");
    assert!(sink.finish(bytes.len() as u64).await.expect("finish"));
    t.finish(Outcome::Verified);
    let (got, err, done) = take(&mut reader, Duration::from_secs(5)).await;
    assert!(err.is_none() && done);
    assert_eq!(got.len() as u64, size - 1000);
}

#[tokio::test]
async fn a_spooled_copy_written_out_of_order_is_hashed_in_order() {
    let dir = tempfile::tempdir().expect("dir");
    let bytes: Bytes = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
    let size = bytes.len() as u64;
    let mib = |n: usize| n << 20;
    for corrupt in [false, true] {
        let t = Transfer::new(Digest::sha256_of(&bytes));
        let (mut sink, backing) = Sink::file(&t, dir.path(), Budget::default(), Budget::default())
            .await
            .expect("spool");
        t.begin(size, Origin::Upstream, backing.clone());
        // A later part first, then the start (joined by the part, read back to hash),
        // then the rest, overlapping what is there (written once, the first copy kept).
        let mut late = bytes.slice(mib(2)..mib(3)).to_vec();
        if corrupt {
            late[7] ^= 1;
        }
        sink.write_at(mib(2) as u64, late.into())
            .await
            .expect("write");
        sink.write_at(0, bytes.slice(..mib(2)))
            .await
            .expect("write");
        sink.write_at(mib(1) as u64, bytes.slice(mib(1)..))
            .await
            .expect("write");
        assert_eq!(sink.finish(size).await.expect("finish"), !corrupt);
        let all = backing.read(0, size).await.expect("read");
        assert_eq!(all.len() as u64, size);
        assert_eq!(all[mib(2) + 7] != bytes[mib(2) + 7], corrupt);
        assert_eq!(all[..mib(2)], bytes[..mib(2)]);
        assert_eq!(all[mib(3)..], bytes[mib(3)..]);
    }
}
