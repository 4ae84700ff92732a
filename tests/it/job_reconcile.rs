//! A job return whose event never reached us is still collected: the bus
//! reader sits behind a proxy that drops the return event and then cuts the
//! connection (as a master restart or a lagging reader would lose it); after
//! the reconnect the client finds the return in the master's job cache.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use salt_steward::bus::codec::{encode_frame, Decoded, FrameDecoder, DEFAULT_MAX_FRAME};
use salt_steward::bus::{BusEndpoint, BusHandle, SubscriberOptions};
use salt_steward::master_config::MasterConfig;
use salt_steward::salt::{JobTracker, Publish, ReqClient, SaltClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::support::SaltHarness;

/// Forwards the master's publish socket to `listen`, except the first
/// `salt/job/*/ret/*` event, after which it closes that connection.
async fn lossy_proxy(listen: PathBuf, upstream: PathBuf, dropped: Arc<AtomicU64>) {
    let listener = UnixListener::bind(&listen).unwrap();
    loop {
        let Ok((mut down, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut up) = UnixStream::connect(&upstream).await else {
            return;
        };
        let dropped = dropped.clone();
        tokio::spawn(async move {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                match up.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                while let Some(d) = dec.decode(&mut buf) {
                    let Decoded::Event(e) = d else { continue };
                    let is_ret = e.tag.starts_with("salt/job/") && e.tag.contains("/ret/");
                    if is_ret && dropped.load(Ordering::SeqCst) == 0 {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        // The reader loses the connection right after.
                        return;
                    }
                    if down
                        .write_all(&encode_frame(&e.tag, &e.data))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
}

#[test]
fn a_return_whose_event_was_lost_is_collected_from_the_job_cache() {
    let mut h = SaltHarness::start();
    h.wait_req_ready();
    h.start_minions_and_wait(&["jr-1"]);
    let master = MasterConfig::load(&h.master_config()).unwrap();
    let BusEndpoint::Unix(upstream) = master.event_pub() else {
        panic!("the harness master uses unix sockets");
    };
    let proxy_path = h.root().join("lossy.ipc");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(lossy_proxy(proxy_path.clone(), upstream, dropped.clone()));
        let cancel = CancellationToken::new();
        let mut bus = BusHandle::new(
            BusEndpoint::Unix(proxy_path.clone()),
            SubscriberOptions::default(),
        );
        let tracker = JobTracker::start(bus.subscribe(), cancel.clone());
        // The proxy may not listen yet: the reader retries.
        bus.spawn(cancel.clone());
        assert!(tracker.wait_connected(Duration::from_secs(20)).await);
        let client = SaltClient::new(
            ReqClient::new(&master, Duration::from_secs(20)).unwrap(),
            tracker.clone(),
        );
        let job = Publish {
            target: "jr-1".into(),
            fun: "test.ping".into(),
            ..Publish::default()
        };
        let (published, outcome) = client.run_job(&job, Duration::from_secs(60)).await.unwrap();
        assert_eq!(published.minions, ["jr-1"]);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the return event was dropped"
        );
        assert!(tracker.gaps() >= 1, "the reader reconnected");
        let ret = outcome
            .returns
            .get("jr-1")
            .unwrap_or_else(|| panic!("not reconciled: {outcome:?}"));
        assert!(ret.success, "{outcome:?}");
        assert_eq!(ret.ret, serde_json::json!(true));
        assert!(outcome.no_answer.is_empty(), "{outcome:?}");
        cancel.cancel();
    });
}
