//! `relay.batch_linger`: routine readings that trickle in wait to share a request (each
//! request ends in a commit on the SD card), while an alarm — a route above the default
//! priority — goes at once and takes the waiting readings with it.

use std::collections::BTreeSet;

use pigeon_e2e::{Pipeline, Publisher, Reading, Subscription, secs, wait_until};

const ALARM_TYPE: &str = "io.example.alarm";

fn alarm(n: u64) -> Reading {
    Reading {
        n,
        topic: "org/contoso/site/berlin/alarms/smoke/1".into(),
        payload: serde_json::to_vec(&serde_json::json!({"n": n, "smoke": true})).expect("json"),
    }
}

fn readings_at_relay(p: &Pipeline) -> BTreeSet<u64> {
    p.relay
        .read_stream()
        .events()
        .iter()
        .filter_map(|e| e["data"]["n"].as_u64())
        .collect()
}

async fn requests(p: &Pipeline) -> f64 {
    p.gateway
        .metric("pigeon_gateway_upload_requests_total")
        .await
        .ok()
        .flatten()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routine_readings_wait_to_share_a_request_and_an_alarm_goes_at_once() {
    let p = Pipeline::start_with("linger", Default::default(), |c| {
        c.subscriptions.insert(
            0,
            Subscription {
                filter: "org/+/site/+/alarms/#".into(),
                qos: 1,
                event_type: ALARM_TYPE.into(),
                ttl: None,
            },
        );
        let mut alarm_route = toml::Table::new();
        alarm_route.insert("priority".into(), 9.into());
        c.subscription_options = vec![alarm_route];
        // Long enough that "not yet" below cannot be a slow machine's doing.
        c.relay_options.insert("batch_linger".into(), "20s".into());
    })
    .await;
    let before = requests(&p).await;

    // Five readings, one by one: committed, and held back.
    for n in 0..5 {
        p.publish(n..n + 1).await;
    }
    wait_until("5 readings committed", secs(30), || async {
        match p.gateway.metric("pigeon_gateway_outbox_records").await? {
            Some(5.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    tokio::time::sleep(secs(2)).await;
    assert!(
        readings_at_relay(&p).is_empty(),
        "routine readings went out before batch_linger"
    );
    assert_eq!(requests(&p).await, before, "no request yet");

    // An alarm: it goes now, and the five readings with it, in one request.
    let report = Publisher::publish_all(
        p.mosquitto.port(),
        vec![alarm(100)],
        p.publisher(),
        secs(30),
    )
    .await;
    report.assert_all_acked(1);
    wait_until(
        "the alarm and the readings at the relay",
        secs(10),
        || async {
            let at = readings_at_relay(&p);
            if at == BTreeSet::from([0, 1, 2, 3, 4, 100]) {
                Ok(())
            } else {
                Err(format!("{at:?}"))
            }
        },
    )
    .await;
    assert_eq!(requests(&p).await, before + 1.0, "one request for all six");
    let stream = p.relay.read_stream();
    assert_eq!(
        stream.events()[0]["type"],
        ALARM_TYPE,
        "the alarm is first in its batch"
    );

    // Routine readings alone wait again, then go together once the linger is over.
    p.publish(10..13).await;
    tokio::time::sleep(secs(2)).await;
    assert_eq!(readings_at_relay(&p).len(), 6, "held back again");
    wait_until(
        "the three readings after batch_linger",
        secs(60),
        || async {
            let at = readings_at_relay(&p);
            if at.is_superset(&BTreeSet::from([10, 11, 12])) {
                Ok(())
            } else {
                Err(format!("{at:?}"))
            }
        },
    )
    .await;
    assert_eq!(
        requests(&p).await,
        before + 2.0,
        "one request for the three"
    );
    assert_eq!(p.relay.read_stream().events().len(), 9, "each once");
}
