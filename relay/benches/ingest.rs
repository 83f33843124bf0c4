//! Ingest throughput: the relay in-process on 127.0.0.1:0 with a temp data dir, driven by
//! N concurrent kept-alive connections each POSTing gzip'd batches of 10 events.
//!
//! ```text
//! cargo bench -p pigeon-relay --bench ingest
//! cargo bench -p pigeon-relay --bench ingest -- --connections 64 --requests 50000 --gateways 64
//! cargo bench -p pigeon-relay --bench ingest -- --dir /dev/shm   # tmpfs: fsync is free
//! cargo bench -p pigeon-relay --bench ingest -- --kafka 127.0.0.1:9092  # into Kafka
//! ```
//!
//! With `--kafka`, the stream is the broker at that address (topic `pigeon.default`,
//! which must exist; `scripts/bench relay-kafka` starts tansu and creates it).
//!
//! Request bodies are built and compressed before the clock starts, and the client speaks
//! raw HTTP/1.1 on one thread, so the figures are the relay's (and the disk's), not the
//! load generator's. Every event is new (unique sequence per producer), so every event
//! is checked, written and fsynced. Prints events/s, requests/s, request latency
//! percentiles and the relay's average group-commit size.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use pigeon_relay::RelayConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Options {
    connections: usize,
    requests: usize,
    batch: usize,
    gateways: usize,
    /// Where to make the temporary data dir (default: the system temp dir). A tmpfs here
    /// (`--dir /dev/shm`) makes fsync free and shows the CPU-bound ceiling.
    dir: Option<std::path::PathBuf>,
    /// The Kafka stream at this bootstrap address instead of the stream files.
    kafka: Option<String>,
}

impl Options {
    fn from_args() -> Self {
        let mut o = Options {
            connections: 64,
            requests: 50_000,
            batch: 10,
            gateways: 8,
            dir: None,
            kafka: None,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        while i < args.len() {
            if args[i] == "--dir"
                && let Some(d) = args.get(i + 1)
            {
                o.dir = Some(d.into());
                i += 2;
                continue;
            }
            if args[i] == "--kafka"
                && let Some(k) = args.get(i + 1)
            {
                o.kafka = Some(k.clone());
                i += 2;
                continue;
            }
            let value = args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
            let slot = match args[i].as_str() {
                "--connections" => Some(&mut o.connections),
                "--requests" => Some(&mut o.requests),
                "--batch" => Some(&mut o.batch),
                "--gateways" => Some(&mut o.gateways),
                // `cargo bench` passes `--bench`; ignore it and anything unknown.
                _ => None,
            };
            match (slot, value) {
                (Some(slot), Some(v)) if v > 0 => {
                    *slot = v;
                    i += 2;
                }
                _ => i += 1,
            }
        }
        o.gateways = o.gateways.min(o.connections);
        o
    }
}

fn token(g: usize) -> String {
    format!("bench-token-{g:04}-0123456789abcdef")
}

/// Every request connection `c` will send, as complete HTTP/1.1 requests.
fn build_requests(o: &Options, c: usize, per_conn: usize, port: u16) -> Vec<Vec<u8>> {
    let gateway = c % o.gateways;
    let producer = format!("bench-producer-{c:04}");
    (0..per_conn)
        .map(|r| {
            let events: Vec<_> = (0..o.batch)
                .map(|e| {
                    let seq = (r * o.batch + e) as u64;
                    json!({
                        "specversion": "1.0",
                        "id": format!("0190c7a4-{c:04x}-7000-8000-{seq:012x}"),
                        "type": "pigeon.mqtt.message",
                        "source": format!("/gateways/gw-{gateway}/mqtt"),
                        "subject": format!("sites/s1/sensors/t{}", seq % 16),
                        "time": "2024-05-01T12:00:00.123Z",
                        "datacontenttype": "application/json",
                        "data": {"celsius": 20.0 + (seq % 100) as f64 / 10.0, "rh": 41, "battery": 3.1},
                        "sequence": pigeon_shared::ce::format_sequence(seq),
                        "producerid": producer,
                    })
                })
                .collect();
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(&serde_json::to_vec(&events).expect("json"))
                .expect("gzip");
            let body = gz.finish().expect("gzip");
            let mut req = format!(
                "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                 Content-Type: application/cloudevents-batch+json\r\nContent-Encoding: gzip\r\n\
                 Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
                token(gateway),
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            req
        })
        .collect()
}

/// Sends the requests one after another on one kept-alive connection; returns each
/// request's latency and how many answers were not "200 with every event accepted".
async fn drive(addr: SocketAddr, requests: Vec<Vec<u8>>, batch: usize) -> (Vec<Duration>, usize) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let expected = format!("\"accepted\":{batch},");
    let mut latencies = Vec::with_capacity(requests.len());
    let mut failures = 0;
    let mut buf = Vec::with_capacity(4096);
    for req in requests {
        let start = Instant::now();
        stream.write_all(&req).await.expect("write request");
        buf.clear();
        let (status, body) = read_response(&mut stream, &mut buf).await;
        latencies.push(start.elapsed());
        if status != 200 || !contains(body, expected.as_bytes()) {
            failures += 1;
            if failures <= 3 {
                eprintln!(
                    "unexpected answer {status}: {}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }
    (latencies, failures)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Reads one response (headers + Content-Length body) into `buf`.
async fn read_response<'a>(stream: &mut TcpStream, buf: &'a mut Vec<u8>) -> (u16, &'a [u8]) {
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the relay closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    while buf.len() < header_end + len {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the relay closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    (status, &buf[header_end..header_end + len])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median time of appending 6 KB and fdatasync'ing it in `dir`: what one group
/// commit costs at least, per file. Printed so the figures can be read against the disk.
fn fdatasync_median(dir: &std::path::Path) -> Duration {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let block = vec![b'x'; 6000];
    let mut times: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&block).expect("probe write");
            f.sync_data().expect("probe fsync");
            t.elapsed()
        })
        .collect();
    let _ = std::fs::remove_file(&path);
    times.sort();
    times[times.len() / 2]
}

/// CPU seconds used so far by this process's threads, summed by thread name (Linux
/// `/proc/self/task/*/stat`; empty elsewhere). Numbered names (`pigeon-fsync-3`) are
/// grouped.
fn cpu_by_thread() -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ... field 14 utime, 15 stime (clock ticks, 100 Hz).
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
            .sum();
        *out.entry(name.to_owned()).or_insert(0.0) += ticks / 100.0;
    }
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    let o = Options::from_args();
    let data = match &o.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    let fsync = fdatasync_median(data.path());
    let mut toml = format!("data_dir = {:?}\n", data.path().join("data"));
    toml.push_str("[limits]\nmax_concurrent_requests = 4096\n");
    if let Some(k) = &o.kafka {
        toml.push_str(&format!(
            "[stream]\nkind = \"kafka\"\n[stream.kafka]\nbrokers = {k:?}\n"
        ));
    }
    for g in 0..o.gateways {
        toml.push_str(&format!(
            "[[gateways]]\nid = \"gw-{g}\"\ntoken = \"{}\"\n",
            token(g)
        ));
    }
    let config = RelayConfig::parse(&toml)
        .expect("bench config")
        .validate()
        .expect("bench config");

    // The relay gets its own runtime (as in production: one worker per core).
    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = relay_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = relay_rt.spawn(pigeon_relay::run(config, listener, async {
        let _ = stop_rx.await;
    }));

    let per_conn = o.requests.div_ceil(o.connections);
    let total_requests = per_conn * o.connections;
    eprintln!(
        "Building {total_requests} requests of {} events ({} connections, {} gateways)...",
        o.batch, o.connections, o.gateways
    );
    let bodies: Vec<Vec<Vec<u8>>> = (0..o.connections)
        .map(|c| build_requests(&o, c, per_conn, addr.port()))
        .collect();
    let body_bytes: usize = bodies.iter().flatten().map(Vec::len).sum();

    // The load generator: one thread, all connections multiplexed on it.
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cpu_before = cpu_by_thread();
    let started = Instant::now();
    let results = client_rt.block_on(async {
        let tasks: Vec<_> = bodies
            .into_iter()
            .map(|reqs| tokio::spawn(drive(addr, reqs, o.batch)))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.expect("client task"));
        }
        all
    });
    let elapsed = started.elapsed();
    let cpu_after = cpu_by_thread();

    let metrics = client_rt.block_on(async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    });
    let _ = stop_tx.send(());
    relay_rt
        .block_on(relay)
        .expect("relay task")
        .expect("relay run");

    let failures: usize = results.iter().map(|r| r.1).sum();
    let mut latencies: Vec<Duration> = results.into_iter().flat_map(|r| r.0).collect();
    latencies.sort();
    let secs = elapsed.as_secs_f64();
    let commits = metric(&metrics, "pigeon_relay_sink_commits_total");
    let written = metric(&metrics, "pigeon_relay_stream_bytes_written_total");
    let sink_sum = metric(&metrics, "pigeon_relay_sink_write_seconds_sum");

    println!("pigeon-relay ingest benchmark");
    println!(
        "  stream:       {}",
        o.kafka.as_deref().map_or_else(
            || "files (append + fsync)".to_owned(),
            |k| format!("Kafka at {k} (acks=all, idempotent)")
        )
    );
    println!(
        "  disk:         append + fdatasync of 6 KB takes {:.2} ms (median of 50, before the run)",
        fsync.as_secs_f64() * 1e3
    );
    println!(
        "  setup:        {} connections, {} gateways, batches of {} events, gzip ({:.0} B/request on the wire)",
        o.connections,
        o.gateways,
        o.batch,
        body_bytes as f64 / total_requests as f64
    );
    println!(
        "  sent:         {total_requests} requests, {} events in {secs:.2} s; {failures} not fully accepted",
        total_requests * o.batch
    );
    println!(
        "  throughput:   {:.0} events/s, {:.0} requests/s",
        (total_requests * o.batch) as f64 / secs,
        total_requests as f64 / secs
    );
    println!(
        "  latency:      p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "  sink:         {commits:.0} group commits ({:.1} requests each, {:.2} ms each on average), {:.1} MB written",
        total_requests as f64 / commits,
        sink_sum / commits * 1e3,
        written / 1e6
    );
    let cpu: Vec<String> = cpu_after
        .iter()
        .map(|(name, after)| {
            let used = after - cpu_before.get(name).copied().unwrap_or(0.0);
            (name, used / secs * 100.0)
        })
        .filter(|(_, pct)| *pct >= 1.0)
        .map(|(name, pct)| format!("{name} {pct:.0}%"))
        .collect();
    println!(
        "  cpu:          {} (of one core; the load generator is the bench's main thread)",
        cpu.join(", ")
    );
    if failures > 0 {
        std::process::exit(1);
    }
}
