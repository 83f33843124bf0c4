//! `relay.max_upload_rate`: a backlog drains no faster than the limit allows.
//!
//! Robust on a slow machine: it checks that draining took at least as long as the limit
//! demands (a slow machine only takes longer); without the limit the same backlog goes
//! in well under a second.

use std::time::{Duration, Instant};

use pigeon_e2e::{Pipeline, secs, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_no_faster_than_max_upload_rate() {
    const LIMIT: f64 = 16.0 * 1024.0;
    let mut p = Pipeline::start_with("bandwidth", Default::default(), |c| {
        c.relay_options
            .insert("max_upload_rate".into(), "16KiB".into());
        c.relay_options
            .insert("batch_max_events".into(), 200.into());
    })
    .await;
    p.relay.stop().await;
    let expected = p.publish(0..6_000).await;
    wait_until("the backlog in the outbox", secs(60), || async {
        match p.gateway.metric("pigeon_gateway_outbox_records").await? {
            Some(6000.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let sent_before = p
        .gateway
        .metric("pigeon_gateway_upload_bytes_total")
        .await
        .unwrap()
        .unwrap_or(0.0);

    let t = Instant::now();
    p.relay.restart().await;
    p.relay
        .assert_delivered_exactly_once(&expected, secs(120))
        .await;
    let took = t.elapsed();
    let sent = p
        .gateway
        .metric("pigeon_gateway_upload_bytes_total")
        .await
        .unwrap()
        .unwrap_or(0.0)
        - sent_before;
    // The bucket lets one second's worth and one request (at most 200 events) go early.
    let largest_request = 200.0 * 300.0;
    let least = Duration::from_secs_f64(((sent - LIMIT - largest_request) / LIMIT).max(0.0));
    assert!(
        sent > 4.0 * LIMIT,
        "the backlog is too small to show the limit: {sent} bytes"
    );
    assert!(
        took >= least.mul_f64(0.95),
        "{sent} bytes drained in {took:?}; at 16 KiB/s that takes at least {least:?}"
    );
    eprintln!(
        "{sent:.0} bytes in {:.1} s: {:.0} bytes/s (limit {LIMIT})",
        took.as_secs_f64(),
        sent / took.as_secs_f64()
    );
}
