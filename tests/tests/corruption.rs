//! A damaged outbox (a power cut on a failing SD card) never keeps the gateway from
//! starting: it is moved aside, kept for a person to look at, and a fresh one takes new
//! readings, which arrive exactly once.

use pigeon_e2e::{Pipeline, secs, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_outbox_is_moved_aside_and_the_gateway_keeps_working() {
    let mut p = Pipeline::start("corruption").await;
    let before = p.publish(0..100).await;
    p.relay.wait_for_readings("n", &before, secs(60)).await;
    p.gateway.stop().await;

    // Scribble over the headers of the database and of its write-ahead log (which would
    // otherwise hold a good copy of page 1), as torn writes on a dying card would.
    for name in ["outbox.db", "outbox.db-wal"] {
        let path = p.gateway.data_dir().join(name);
        let Ok(mut bytes) = std::fs::read(&path) else {
            continue;
        };
        let n = bytes.len().min(100);
        bytes[..n].fill(0xA5);
        std::fs::write(&path, bytes).expect("damage the outbox");
    }

    p.gateway.restart();
    p.gateway.wait_subscribed(&p.mosquitto).await;
    let log = wait_until("the gateway to say what it did", secs(30), || async {
        let log = p.gateway.log_text();
        if log.contains("The outbox was damaged") {
            Ok(log)
        } else {
            Err("not yet".into())
        }
    })
    .await;
    assert!(
        log.contains("outbox.db.corrupt-"),
        "it names where the file went"
    );
    let kept = std::fs::read_dir(p.gateway.data_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outbox.db.corrupt-")
        })
        .count();
    assert!(kept >= 1, "the damaged file is kept for inspection");

    let after = p.publish(100..300).await;
    let all = before.union(&after).copied().collect();
    p.relay.assert_delivered_exactly_once(&all, secs(60)).await;
}
