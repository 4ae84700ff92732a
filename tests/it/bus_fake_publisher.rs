//! The bus reader against a local unix socket that imitates the master's
//! publisher: garbage on the wire, a slow consumer, a publisher that goes away.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rmpv::Value;
use salt_steward::bus::codec::encode_frame;
use salt_steward::bus::{BusEndpoint, BusHandle, BusItem, SubscriberOptions, Subscription};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

fn frame(tag: &str) -> Vec<u8> {
    encode_frame(
        tag,
        &Value::Map(vec![(Value::from("tag"), Value::from(tag))]),
    )
}

async fn next_event(sub: &mut Subscription) -> String {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("an item within 10 s")
            .expect("reader still running");
        if let BusItem::Event(e) = item {
            return e.tag.clone();
        }
    }
}

fn start(
    path: &std::path::Path,
    opts: SubscriberOptions,
) -> (BusHandle, Subscription, CancellationToken) {
    let mut bus = BusHandle::new(BusEndpoint::Unix(path.to_owned()), opts);
    let sub = bus.subscribe();
    let cancel = CancellationToken::new();
    bus.spawn(cancel.clone());
    (bus, sub, cancel)
}

#[tokio::test]
async fn garbage_is_counted_and_the_reader_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master_event_pub.ipc");
    let listener = UnixListener::bind(&path).unwrap();
    let (bus, mut sub, cancel) = start(&path, SubscriberOptions::default());

    let (mut conn, _) = listener.accept().await.unwrap();
    let mut wire = frame("ok/1");
    // truncated msgpack data inside a well-formed frame
    wire.extend([
        0x82, 0xa4, b'h', b'e', b'a', b'd', 0x80, 0xa4, b'b', b'o', b'd', b'y', 0xc4, 0x09,
    ]);
    wire.extend(b"t/x\n\n\x83\xa1a\x01");
    wire.extend(frame("ok/2"));
    // wrong types: a bare integer, then a frame whose body is an array
    wire.push(0x05);
    wire.extend([
        0x82, 0xa4, b'h', b'e', b'a', b'd', 0x80, 0xa4, b'b', b'o', b'd', b'y', 0x90,
    ]);
    wire.extend(frame("ok/3"));
    // a tag with no separator
    wire.extend([
        0x82, 0xa4, b'h', b'e', b'a', b'd', 0x80, 0xa4, b'b', b'o', b'd', b'y', 0xc4, 0x03,
    ]);
    wire.extend(b"abc");
    wire.extend(frame("ok/4"));
    // an absurd length: bin32 of 0xfffffff0 bytes
    wire.extend([
        0x82, 0xa4, b'h', b'e', b'a', b'd', 0x80, 0xa4, b'b', b'o', b'd', b'y',
    ]);
    wire.extend([0xc6, 0xff, 0xff, 0xff, 0xf0, 0, 0, 0]);
    wire.extend(frame("ok/5"));
    conn.write_all(&wire).await.unwrap();

    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_event(&mut sub).await);
    }
    assert_eq!(got, ["ok/1", "ok/2", "ok/3", "ok/4", "ok/5"]);
    let stats = bus.stats().clone();
    assert_eq!(
        stats.decode_errors.load(Ordering::Relaxed),
        5,
        "truncated, int, array body, no separator, absurd length"
    );
    assert_eq!(stats.events.load(Ordering::Relaxed), 5);
    cancel.cancel();
    bus.join().await;
}

#[tokio::test]
async fn a_slow_consumer_loses_events_counted_and_never_slows_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pub.ipc");
    let listener = UnixListener::bind(&path).unwrap();
    let opts = SubscriberOptions {
        queue_capacity: 64,
        ..SubscriberOptions::default()
    };
    let (bus, mut sub, cancel) = start(&path, opts);
    let (mut conn, _) = listener.accept().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap();
    assert!(
        matches!(first, Some(BusItem::Connected { reconnect: false })),
        "{first:?}"
    );

    // 20 000 events written while the consumer reads nothing: the writer
    // must finish (the reader drains the socket regardless of the consumer).
    let n = 20_000u64;
    let mut wire = Vec::new();
    for i in 0..n {
        wire.extend(frame(&format!("flood/{i}")));
    }
    tokio::time::timeout(Duration::from_secs(20), conn.write_all(&wire))
        .await
        .expect("the publisher's writes never wait on our consumer")
        .unwrap();
    let stats = bus.stats().clone();
    tokio::time::timeout(Duration::from_secs(20), async {
        while stats.events.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("all events read off the socket");

    // Now the consumer wakes up: it is told how many it lost, then gets the newest.
    let mut lagged = 0;
    let mut tags = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await {
        match item {
            BusItem::Lagged(k) => lagged += k,
            BusItem::Event(e) => tags.push(e.tag.clone()),
            _ => {}
        }
    }
    assert!(tags.len() <= 64, "queue is bounded: {}", tags.len());
    assert_eq!(
        lagged + tags.len() as u64,
        n,
        "every event is either delivered or counted as lost"
    );
    assert_eq!(stats.lagged.load(Ordering::Relaxed), lagged);
    assert_eq!(tags.last().map(String::as_str), Some("flood/19999"));
    cancel.cancel();
    bus.join().await;
}

#[tokio::test]
async fn the_reader_reconnects_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pub.ipc");
    let listener = UnixListener::bind(&path).unwrap();
    let (bus, mut sub, cancel) = start(&path, SubscriberOptions::default());
    let (mut conn, _) = listener.accept().await.unwrap();
    conn.write_all(&frame("before")).await.unwrap();
    assert_eq!(next_event(&mut sub).await, "before");

    // The publisher goes away; its socket file stays (a stale file refuses connects).
    drop(conn);
    drop(listener);
    let item = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(item, BusItem::Disconnected { .. }), "{item:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::remove_file(&path).unwrap();
    let listener = UnixListener::bind(&path).unwrap();
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("reader reconnects")
        .unwrap();
    let item = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(item, BusItem::Connected { reconnect: true }),
        "{item:?}"
    );
    conn.write_all(&frame("after")).await.unwrap();
    assert_eq!(next_event(&mut sub).await, "after");
    cancel.cancel();
    bus.join().await;
}
