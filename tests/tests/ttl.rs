//! Time to live per route: while the relay is away, readings of a route with a TTL that
//! wait longer than it are dropped unsent and counted; the other routes' readings wait
//! as long as it takes and arrive exactly once.

use pigeon_e2e::{Pipeline, Publisher, Reading, Subscription, secs, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_past_their_ttl_are_dropped_unsent_and_counted_the_rest_arrive() {
    let mut p = Pipeline::start_with("ttl", Default::default(), |c| {
        c.subscriptions.insert(
            0,
            Subscription {
                filter: "occupancy/#".into(),
                qos: 1,
                event_type: "com.example.occupancy".into(),
                ttl: Some("2s".into()),
            },
        );
    })
    .await;
    p.relay.stop().await;

    // Occupancy readings are worthless late; climate readings are kept however long.
    let occupancy: Vec<Reading> = (0..40)
        .map(|n| Reading {
            n,
            topic: format!("occupancy/room/{n}"),
            payload: format!("{{\"n\":{n},\"people\":{}}}", n % 3).into_bytes(),
        })
        .collect();
    let report =
        Publisher::publish_all(p.mosquitto.port(), occupancy, p.publisher(), secs(60)).await;
    report.assert_all_acked(40);
    let climate = p.publish(1_000..1_060).await;

    wait_until("40 expired events counted", secs(60), || async {
        match p
            .gateway
            .metric("pigeon_gateway_outbox_expired_total")
            .await?
        {
            Some(40.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        p.gateway.log_text().contains("Dropped events unsent"),
        "the drop is logged"
    );

    p.relay.restart().await;
    p.relay
        .assert_delivered_exactly_once(&climate, secs(60))
        .await;
    let stream = p.relay.read_stream();
    let late = stream
        .events()
        .iter()
        .filter(|e| e["type"] == "com.example.occupancy")
        .count();
    assert_eq!(late, 0, "no expired reading reached the relay");
}
