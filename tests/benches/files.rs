//! Benchmarks of camera files, drop directory → gateway → relay object + event, with the
//! real binaries (release builds) on loopback. Prints figures; asserts nothing about
//! speed. Run with `scripts/bench files` (it builds the release binaries first).
//!
//! * latency — a 1 MB image written and closed in the drop directory, until its event is
//!   in the relay's stream (the object is renamed into place before the event is
//!   written, so this is "durable object and event"); one file at a time, K times.
//! * throughput — a 200 MB clip, the same way; beside it the same file sent with a plain
//!   `curl -T` to the relay's upload endpoint (the relay's side alone), and to a
//!   pure-ftpd on the same machine (the camera's side alone). Gateway RSS idle and peak.
//! * burst — 1,000 small images (50 KB) dropped at once into 14 camera directories:
//!   files per second picked up, and end to end.
//!
//! `PIGEON_BENCH_LATENCY_N` (default 50) and `PIGEON_BENCH_CLIP_MB` (default 200) scale it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pigeon_e2e::{
    CameraFile, Gateway, GatewayConfig, PureFtpd, PureFtpdOptions, Relay, Stream, TestDir,
    files_section, rss_kib, watch_table, write_bytes,
};

const GATEWAY: &str = "bench-cams";
const TOKEN: &str = "bench-camera-token-0123456789";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

struct Setup {
    dir: TestDir,
    relay: Relay,
    gateway: Gateway,
    drop_dir: PathBuf,
}

async fn setup(name: &str) -> Setup {
    let dir = TestDir::new(name);
    let relay = Relay::start(&dir, &[(GATEWAY, TOKEN)]).await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).expect("drop dir");
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    // Heartbeats off: every line in the stream is then a file's event.
    let config = GatewayConfig::for_files(GATEWAY, TOKEN, &relay.url(), files);
    let gateway = Gateway::start_watching(&dir, config).await;
    Setup {
        dir,
        relay,
        gateway,
        drop_dir,
    }
}

/// Waits (polling every millisecond) until the stream has `n` lines; the time it took.
async fn until_lines(stream_dir: &Path, n: usize, since: Instant, limit: Duration) -> Duration {
    loop {
        if Stream::count_lines(stream_dir) >= n {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "no event after {limit:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("# Pigeon camera files benchmark (release binaries, loopback)\n");
    latency(env_usize("PIGEON_BENCH_LATENCY_N", 50)).await;
    throughput(env_usize("PIGEON_BENCH_CLIP_MB", 200)).await;
    burst(1000).await;
}

async fn latency(k: usize) {
    let mut s = setup("bench-files-latency").await;
    let stream = s.relay.data_dir().join("stream");
    let mut ms = Vec::with_capacity(k);
    let pid = s.gateway.proc().pid().expect("pid");
    let written_before = write_bytes(pid);
    for i in 0..k {
        let f = CameraFile::jpeg(&format!("cam-1/snap-{i:03}.jpg"), 1_000_000, i as u64);
        let path = s.drop_dir.join(&f.path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        // Written and closed: the close is the moment the camera is done.
        std::fs::write(&path, &f.bytes).expect("write");
        let t0 = Instant::now();
        let took = until_lines(&stream, i + 1, t0, Duration::from_secs(30)).await;
        ms.push(took.as_secs_f64() * 1e3);
        // Let the spool and outbox settle before the next one.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = write_bytes(pid) - written_before;
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "latency, 1 MB image, close-write → object and event durable at the relay ({k} files, one at a time):"
    );
    println!(
        "  p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms   min {:.1} ms",
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.9),
        percentile(&sorted, 0.99),
        sorted[sorted.len() - 1],
        sorted[0]
    );
    println!(
        "  gateway's own disk writes: {:.3} bytes per file byte ({:.1} KB per 1 MB file; the file itself is moved, not rewritten)\n",
        written as f64 / (k as f64 * 1e6),
        written as f64 / k as f64 / 1e3
    );
    s.gateway.stop().await;
}

async fn throughput(mb: usize) {
    let len = mb * 1_000_000;
    let mut s = setup("bench-files-clip").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = s.gateway.proc().pid().expect("pid");
    let idle_kib = rss_kib(pid, "VmRSS:");
    let clip = CameraFile::mp4("cam-2/clip.mp4", len, 7);
    let staged = s.dir.join("clip.mp4");
    std::fs::write(&staged, &clip.bytes).expect("stage the clip");
    let stream = s.relay.data_dir().join("stream");

    // 1. Through the gateway: moved into the drop directory (so its bytes are on disk,
    // as an FTP server leaves them), from there to the relay.
    let target = s.drop_dir.join(&clip.path);
    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
    let t0 = Instant::now();
    std::fs::rename(&staged, &target).expect("move the clip in");
    let mut picked = None;
    let mut peak_kib = 0;
    loop {
        peak_kib = peak_kib.max(rss_kib(pid, "VmRSS:"));
        if picked.is_none()
            && s.gateway
                .metric("pigeon_gateway_files_picked_up_total")
                .await
                .ok()
                .flatten()
                == Some(1.0)
        {
            picked = Some(t0.elapsed());
        }
        if Stream::count_lines(&stream) >= 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the clip did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = t0.elapsed();
    peak_kib = peak_kib.max(rss_kib(pid, "VmHWM:"));
    let picked = picked.unwrap_or(total);
    let mbps = |d: Duration| len as f64 / 1e6 / d.as_secs_f64();
    println!("throughput, {mb} MB clip (the same file each time):");
    println!(
        "  gateway, drop directory → relay object + event:  {:>6.2} s  {:>7.1} MB/s   (pickup: rename, fsync, SHA-256 {:.2} s; upload {:.2} s at {:.1} MB/s)",
        total.as_secs_f64(),
        mbps(total),
        picked.as_secs_f64(),
        (total - picked).as_secs_f64(),
        mbps(total - picked)
    );

    // 2. The relay alone: curl -T of the same file to its upload endpoint.
    let spooled = s.dir.join("clip-again.mp4");
    std::fs::write(&spooled, &clip.bytes).expect("stage again");
    let curl_relay = s.relay.curl_upload(TOKEN, GATEWAY, &spooled, &clip).await;
    println!(
        "  curl -T → relay upload endpoint (create + PATCH): {:>6.2} s  {:>7.1} MB/s",
        curl_relay.as_secs_f64(),
        mbps(curl_relay)
    );

    // 3. The camera's side alone: curl -T to pure-ftpd on the same machine.
    if pigeon_e2e::is_root() {
        let ftp = PureFtpd::start(&s.dir, PureFtpdOptions::default()).await;
        let t = Instant::now();
        ftp.upload(&spooled, "cam/clip.mp4").await;
        let d = t.elapsed();
        println!(
            "  curl -T → pure-ftpd (FTP, loopback):              {:>6.2} s  {:>7.1} MB/s",
            d.as_secs_f64(),
            mbps(d)
        );
    }
    println!(
        "  gateway RSS: idle {:.1} MB, peak {:.1} MB during the clip ({:+.1} MB)\n",
        idle_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        (peak_kib as f64 - idle_kib as f64) / 1024.0
    );
    s.gateway.stop().await;
}

async fn burst(n: usize) {
    let mut s = setup("bench-files-burst").await;
    let stream = s.relay.data_dir().join("stream");
    let cams = 14;
    for c in 0..cams {
        std::fs::create_dir_all(s.drop_dir.join(format!("cam-{c:02}"))).expect("mkdir");
    }
    let files: Vec<CameraFile> = (0..n)
        .map(|i| {
            CameraFile::jpeg(
                &format!("cam-{:02}/snap-{i:04}.jpg", i % cams),
                50_000,
                i as u64,
            )
        })
        .collect();
    let t0 = Instant::now();
    for f in &files {
        std::fs::write(s.drop_dir.join(&f.path), &f.bytes).expect("write");
    }
    let written = t0.elapsed();
    let mut picked = None;
    loop {
        if picked.is_none()
            && s.gateway
                .metric("pigeon_gateway_files_picked_up_total")
                .await
                .ok()
                .flatten()
                .is_some_and(|v| v as usize >= n)
        {
            picked = Some(t0.elapsed());
        }
        if Stream::count_lines(&stream) >= n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the burst did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = t0.elapsed();
    let picked = picked.unwrap_or(total);
    println!(
        "burst, {n} images of 50 KB dropped at once into {cams} camera directories (written in {:.2} s):",
        written.as_secs_f64()
    );
    println!(
        "  picked up (spool + outbox): {:>6.0} files/s   ({:.2} s)",
        n as f64 / picked.as_secs_f64(),
        picked.as_secs_f64()
    );
    println!(
        "  end to end (object + event at the relay): {:>6.0} files/s   ({:.2} s)",
        n as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );
    s.gateway.stop().await;
}
