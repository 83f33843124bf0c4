//! The power-cut loop: the gateway is SIGKILLed at random moments during heavy ingest —
//! readings at several thousand per second and camera files dropping in — hundreds of
//! times, restarted at once each time. Random moments land in group commits, WAL
//! checkpoints (the WAL fills and is checkpointed every few seconds at this rate), file
//! claims, renames into the spool and uploads. After every restart the outbox must open
//! (no "damaged" recovery), and at the end every reading the broker acknowledged and every
//! file dropped must be at the relay exactly once.
//!
//! `PIGEON_POWERCUT_KILLS` sets the number of kills (default 200).

use std::time::Duration;

use pigeon_e2e::{
    CameraFile, Pipeline, Publisher, PublisherOptions, climate_readings, files_section, secs,
    wait_until_no_files, watch_table,
};

/// A small xorshift for the kill delays, seeded from the clock (printed, to replay).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_sigkills_during_heavy_ingest_lose_and_duplicate_nothing() {
    let kills: usize = std::env::var("PIGEON_POWERCUT_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("powercut: {kills} kills, seed {seed}");
    let mut rng = Rng(seed);

    let mut p = Pipeline::start_in(
        "powercut",
        pigeon_e2e::MosquittoOptions::default(),
        |dir, c| {
            let d = dir.join("drop");
            std::fs::create_dir_all(&d).unwrap();
            c.files = Some(files_section(vec![watch_table("cameras", &d, &[])], &[]));
        },
    )
    .await;
    let drop_dir = p.dir.join("drop");

    // About 3,000 readings a second for as long as the loop runs (~0.3 s a kill).
    let count = (kills as u64 * 900).max(10_000);
    let publisher = Publisher::spawn(
        p.mosquitto.port(),
        climate_readings(0..count),
        PublisherOptions {
            rate_per_sec: Some(3_000),
            ..p.publisher()
        },
    );

    let mut files = Vec::new();
    for k in 0..kills {
        // A few snapshots now and then, so kills also land in pickups and uploads.
        if k % 3 == 0 {
            for i in 0..3 {
                let f = CameraFile::jpeg(
                    &format!("cam-{}/k{k:04}-{i}.jpg", k % 5),
                    30_000 + ((k * 7 + i) % 50) * 1000,
                    (k * 10 + i) as u64,
                );
                f.write_into(&drop_dir);
                files.push(f);
            }
        }
        tokio::time::sleep(rng.millis(20, 400)).await;
        p.gateway.proc().assert_running();
        p.gateway.kill();
        p.gateway.restart();
    }

    let report = publisher.finish(secs(120)).await;
    report.assert_all_acked(count as usize);
    p.relay
        .assert_delivered_exactly_once(&report.acked, secs(240))
        .await;
    p.relay.assert_files_exactly_once(&files, secs(120)).await;
    wait_until_no_files("the drop directory to be empty", &drop_dir).await;
    wait_until_no_files("the spool to be empty", &p.gateway.spool_dir()).await;

    let log = p.gateway.log_text();
    assert_eq!(p.gateway.proc().starts(), kills as u32 + 1);
    assert!(
        !log.contains("The outbox was damaged"),
        "a SIGKILL damaged the outbox (seed {seed})"
    );
    assert!(
        !log.contains("panicked"),
        "the gateway panicked (seed {seed})"
    );
    // A start either got through (a kill 20 ms in may come before it says so) or was
    // killed; none failed by itself.
    assert!(
        !log.contains("pigeon-gateway failed"),
        "a start failed (seed {seed})"
    );
    p.gateway.proc().assert_running();
    let started = log.matches("pigeon-gateway started.").count();
    eprintln!(
        "powercut: {started} of {} starts got to \"started\" before their kill",
        kills + 1
    );
}
