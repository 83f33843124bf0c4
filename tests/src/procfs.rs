//! What `/proc` says about a process the harness started: memory and disk writes, for
//! the benchmarks.

/// A `/proc/PID/status` field in KiB, e.g. `VmRSS:` (resident now) or `VmHWM:` (peak);
/// 0 if it cannot be read.
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes the process caused to be written to storage (`/proc/PID/io` `write_bytes`);
/// 0 if it cannot be read.
pub fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
