//! SIGKILL the gateway and the relay again and again while readings flow: every reading
//! the broker acknowledged must still reach the stream exactly once.

use pigeon_e2e::{
    Pipeline, Publisher, PublisherOptions, Stream, climate_readings, secs, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_gateway_and_relay_lose_and_duplicate_nothing() {
    const COUNT: u64 = 20_000;
    /// Kills alternate gateway, relay, gateway, …: 4 of each.
    const KILLS: usize = 8;
    /// Kill `k` waits for `k` ninths of the readings in the stream, so that each one hits a
    /// moving pipeline and every target is reachable however fast the run is.
    const PROGRESS_BETWEEN_KILLS: usize = COUNT as usize / (KILLS + 1);
    /// Readings per second: a little more than the gateway keeps up with on 2 cores, so
    /// there is a backlog (in the broker, the outbox, in flight) whenever something dies.
    const RATE: u32 = 5_000;

    let mut p = Pipeline::start("crashes").await;
    let publisher = Publisher::spawn(
        p.mosquitto.port(),
        climate_readings(0..COUNT),
        PublisherOptions {
            rate_per_sec: Some(RATE),
            ..p.publisher()
        },
    );

    let stream_dir = p.relay.stream_dir();
    for k in 1..=KILLS {
        let target = k * PROGRESS_BETWEEN_KILLS;
        let what = format!("{target} lines in the stream before kill {k} of {KILLS}");
        wait_until(&what, secs(120), || async {
            let lines = Stream::count_lines(&stream_dir);
            if lines >= target {
                Ok(lines)
            } else {
                Err(format!("{lines} lines so far"))
            }
        })
        .await;
        if k % 2 == 1 {
            p.gateway.proc().assert_running();
            p.gateway.kill();
            p.gateway.restart();
        } else {
            p.relay.proc().assert_running();
            p.relay.kill();
            p.relay.restart().await;
        }
    }

    // The broker itself never went down, so it acknowledged every reading.
    let report = publisher.finish(secs(60)).await;
    report.assert_all_acked(COUNT as usize);

    p.relay
        .assert_delivered_exactly_once(&report.acked, secs(180))
        .await;
    p.gateway.proc().assert_running();
    p.relay.proc().assert_running();
    assert_eq!(p.gateway.proc().starts(), 1 + KILLS as u32 / 2);
    assert_eq!(p.relay.proc().starts(), 1 + KILLS as u32 / 2);
}
