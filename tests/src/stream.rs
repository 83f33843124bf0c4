//! Reading and checking the relay's stream files
//! (`<data_dir>/stream/<gateway>/<YYYY-MM-DD>/<HH>.jsonl`, one structured CloudEvent per line).
//!
//! A final line without its newline may be a write torn by a SIGKILL (the relay truncates
//! it when it starts again), so it is ignored. Every complete line must be a JSON object.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pigeon_shared::ce::{EXT_PRODUCER_ID, EXT_SEQUENCE, format_sequence, parse_sequence};
use serde_json::Value;

use crate::fmt_count;

/// Every complete event line of a stream directory, in file (time) order.
#[derive(Debug, Default)]
pub struct Stream {
    events: Vec<Value>,
    /// Where each event came from: (index into `files`, 1-based line number).
    origins: Vec<(usize, usize)>,
    files: Vec<PathBuf>,
    torn_tails: usize,
}

impl Stream {
    /// Reads every `*.jsonl` file under `dir` (none yet → empty). An error names the file
    /// and line of any complete line that is not a JSON object.
    pub fn read(dir: &Path) -> Result<Stream, String> {
        let mut files = Vec::new();
        collect_jsonl(dir, &mut files);
        files.sort();
        let mut s = Stream::default();
        for (fi, path) in files.iter().enumerate() {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            };
            let complete = match bytes.iter().rposition(|&b| b == b'\n') {
                Some(i) => &bytes[..=i],
                None => &bytes[..0],
            };
            if complete.len() < bytes.len() {
                s.torn_tails += 1;
            }
            for (li, line) in complete.split_inclusive(|&b| b == b'\n').enumerate() {
                let line = &line[..line.len() - 1];
                match serde_json::from_slice::<Value>(line) {
                    Ok(v) if v.is_object() => {
                        s.events.push(v);
                        s.origins.push((fi, li + 1));
                    }
                    Ok(_) => {
                        return Err(format!(
                            "{}:{}: not a JSON object: {}",
                            path.display(),
                            li + 1,
                            snippet(line)
                        ));
                    }
                    Err(e) => {
                        return Err(format!(
                            "{}:{}: not JSON ({e}): {}",
                            path.display(),
                            li + 1,
                            snippet(line)
                        ));
                    }
                }
            }
        }
        s.files = files;
        Ok(s)
    }

    /// Events read from elsewhere (a Kafka topic), in that order; their origin is their
    /// position.
    pub fn from_events(events: Vec<Value>) -> Stream {
        Stream {
            origins: (0..events.len()).map(|i| (0, i + 1)).collect(),
            events,
            files: vec![PathBuf::from("(record)")],
            torn_tails: 0,
        }
    }

    /// Complete lines under `dir`, without parsing them (cheap enough to poll).
    pub fn count_lines(dir: &Path) -> usize {
        let mut files = Vec::new();
        collect_jsonl(dir, &mut files);
        files
            .iter()
            .filter_map(|f| std::fs::read(f).ok())
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .sum()
    }

    pub fn events(&self) -> &[Value] {
        &self.events
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The stream files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// How many files ended in an incomplete line (ignored).
    pub fn torn_tails(&self) -> usize {
        self.torn_tails
    }

    /// `file:line` of the `i`-th event.
    pub fn origin(&self, i: usize) -> String {
        let (f, l) = self.origins[i];
        format!("{}:{l}", self.files[f].display())
    }

    /// Events whose JSON `data` has an unsigned integer `field`, by that number.
    pub fn by_data_field(&self, field: &str) -> BTreeMap<u64, Vec<&Value>> {
        let mut map: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
        for e in &self.events {
            if let Some(n) = e
                .get("data")
                .and_then(|d| d.get(field))
                .and_then(Value::as_u64)
            {
                map.entry(n).or_default().push(e);
            }
        }
        map
    }

    /// Events by (`producerid`, `sequence`); events without both are left out.
    pub fn by_producer_sequence(&self) -> BTreeMap<(String, u64), Vec<&Value>> {
        let mut map: BTreeMap<(String, u64), Vec<&Value>> = BTreeMap::new();
        for e in &self.events {
            let p = e.get(EXT_PRODUCER_ID).and_then(Value::as_str);
            let s = e
                .get(EXT_SEQUENCE)
                .and_then(Value::as_str)
                .and_then(|s| parse_sequence(s).ok());
            if let (Some(p), Some(s)) = (p, s) {
                map.entry((p.to_string(), s)).or_default().push(e);
            }
        }
        map
    }

    /// The numbers of `expected` not (yet) in the stream under `data.<field>`.
    pub fn missing(&self, field: &str, expected: &BTreeSet<u64>) -> Vec<u64> {
        let have = self.by_data_field(field);
        expected
            .iter()
            .filter(|n| !have.contains_key(n))
            .copied()
            .collect()
    }

    /// Every number in `expected` is in the stream exactly once under `data.<field>`,
    /// and no other number is. The error lists the missing, duplicated and unexpected ones.
    pub fn check_exactly_once(&self, field: &str, expected: &BTreeSet<u64>) -> Result<(), String> {
        let have = self.by_data_field(field);
        let missing = self.missing(field, expected);
        let duplicated: Vec<u64> = have
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(n, _)| *n)
            .collect();
        let unexpected: Vec<u64> = have
            .keys()
            .filter(|n| !expected.contains(n))
            .copied()
            .collect();
        if missing.is_empty() && duplicated.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "of {} expected readings, {} are in the stream ({} events in all)",
            fmt_count(expected.len()),
            fmt_count(expected.len() - missing.len()),
            fmt_count(self.len())
        );
        if !missing.is_empty() {
            msg += &format!(
                "; missing {}: n={}",
                fmt_count(missing.len()),
                summarize_numbers(&missing)
            );
        }
        if !duplicated.is_empty() {
            let extra: usize = have.values().map(|v| v.len().saturating_sub(1)).sum();
            msg += &format!(
                "; duplicated {} ({} extra copies): n={}",
                fmt_count(duplicated.len()),
                fmt_count(extra),
                summarize_numbers(&duplicated)
            );
        }
        if !unexpected.is_empty() {
            msg += &format!(
                "; never published {}: n={}",
                fmt_count(unexpected.len()),
                summarize_numbers(&unexpected)
            );
        }
        Err(msg)
    }

    /// Every event has a `producerid` and a 20-digit zero-padded `sequence`, and within
    /// each producer the sequences strictly increase in stream order (so none repeats) —
    /// but for file events (those with a `dataref`): files travel in a lane of their own,
    /// beside the batches, and arrive in the order their uploads end; none may repeat.
    pub fn check_sequences(&self) -> Result<(), String> {
        let mut last: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
        let mut files: BTreeMap<(&str, u64), usize> = BTreeMap::new();
        let mut problems = Vec::new();
        for (i, e) in self.events.iter().enumerate() {
            let Some(p) = e.get(EXT_PRODUCER_ID).and_then(Value::as_str) else {
                problems.push(format!("{}: no string {EXT_PRODUCER_ID}", self.origin(i)));
                continue;
            };
            let Some(raw) = e.get(EXT_SEQUENCE).and_then(Value::as_str) else {
                problems.push(format!("{}: no string {EXT_SEQUENCE}", self.origin(i)));
                continue;
            };
            let seq = match parse_sequence(raw) {
                Ok(s) if format_sequence(s) == raw => s,
                _ => {
                    problems.push(format!(
                        "{}: {EXT_SEQUENCE} {raw:?} is not a 20-digit zero-padded number",
                        self.origin(i)
                    ));
                    continue;
                }
            };
            if e.get("dataref").is_some() {
                if let Some(&pi) = files.get(&(p, seq)) {
                    problems.push(format!(
                        "{}: producer {p} file sequence {seq} again (first at {})",
                        self.origin(i),
                        self.origin(pi)
                    ));
                }
                files.insert((p, seq), i);
                continue;
            }
            if let Some(&(prev, pi)) = last.get(p)
                && seq <= prev
            {
                problems.push(format!(
                    "{}: producer {p} sequence {seq} after {prev} (at {})",
                    self.origin(i),
                    self.origin(pi)
                ));
            }
            last.insert(p, (seq, i));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            let n = problems.len();
            problems.truncate(20);
            Err(format!(
                "{n} sequence problems, first ones:\n  {}",
                problems.join("\n  ")
            ))
        }
    }
}

fn collect_jsonl(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => collect_jsonl(&path, out),
            Ok(t) if t.is_file() && path.extension().is_some_and(|x| x == "jsonl") => {
                out.push(path)
            }
            _ => {}
        }
    }
}

fn snippet(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else {
        s.into_owned()
    }
}

/// Sorted numbers as ranges: `[1, 2, 3, 7, 9, 10]` → `"1..=3, 7, 9..=10"`; long lists are
/// cut after 25 ranges with a count of the rest.
pub fn summarize_numbers(sorted: &[u64]) -> String {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &n in sorted {
        match ranges.last_mut() {
            Some((_, hi)) if *hi + 1 == n => *hi = n,
            _ => ranges.push((n, n)),
        }
    }
    let shown: Vec<String> = ranges
        .iter()
        .take(25)
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}..={hi}")
            }
        })
        .collect();
    let mut s = shown.join(", ");
    if ranges.len() > 25 {
        s += &format!(", … ({} more ranges)", ranges.len() - 25);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(producer: &str, seq: u64, n: u64) -> String {
        json!({
            "specversion": "1.0", "id": format!("id-{seq}"), "source": "/gateways/pi-1/mqtt",
            "type": "t", "producerid": producer, "sequence": format_sequence(seq),
            "datacontenttype": "application/json", "data": {"n": n},
        })
        .to_string()
    }

    fn write(dir: &Path, rel: &str, content: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    #[test]
    fn torn_final_line_is_ignored_and_files_are_read_in_order() {
        let d = tempfile::tempdir().unwrap();
        let hour9 = format!("{}\n{}\n", event("p", 1, 10), event("p", 2, 11));
        let hour10 = format!("{}\n{{\"specversion\":\"1.", event("p", 3, 12));
        write(d.path(), "pi-1/2026-01-02/10.jsonl", &hour10);
        write(d.path(), "pi-1/2026-01-02/09.jsonl", &hour9);
        let s = Stream::read(d.path()).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.torn_tails(), 1);
        assert_eq!(Stream::count_lines(d.path()), 3);
        s.check_sequences().unwrap();
        s.check_exactly_once("n", &(10..13).collect()).unwrap();
        assert!(s.origin(2).ends_with("10.jsonl:1"), "{}", s.origin(2));
    }

    #[test]
    fn corrupt_complete_line_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "pi-1/2026-01-02/09.jsonl",
            &format!("{{\"a\":\n{}\n", event("p", 1, 1)),
        );
        let err = Stream::read(d.path()).unwrap_err();
        assert!(err.contains("09.jsonl:1: not JSON"), "{err}");
    }

    #[test]
    fn missing_duplicated_and_unexpected_readings_are_named() {
        let d = tempfile::tempdir().unwrap();
        let lines = [
            event("p", 1, 1),
            event("p", 2, 2),
            event("p", 3, 2),
            event("p", 4, 99),
        ];
        write(d.path(), "g/d/00.jsonl", &(lines.join("\n") + "\n"));
        let s = Stream::read(d.path()).unwrap();
        let err = s.check_exactly_once("n", &(1..6).collect()).unwrap_err();
        assert!(err.contains("missing 3: n=3..=5"), "{err}");
        assert!(err.contains("duplicated 1 (1 extra copies): n=2"), "{err}");
        assert!(err.contains("never published 1: n=99"), "{err}");
    }

    #[test]
    fn repeated_or_decreasing_sequences_are_named() {
        let d = tempfile::tempdir().unwrap();
        let lines = [
            event("p", 1, 1),
            event("q", 1, 2),
            event("p", 3, 3),
            event("p", 3, 4),
            event("p", 2, 5),
        ];
        write(d.path(), "g/d/00.jsonl", &(lines.join("\n") + "\n"));
        let err = Stream::read(d.path())
            .unwrap()
            .check_sequences()
            .unwrap_err();
        assert!(err.starts_with("2 sequence problems"), "{err}");
        assert!(err.contains("producer p sequence 3 after 3"), "{err}");
        assert!(err.contains("producer p sequence 2 after 3"), "{err}");

        let bad = json!({"producerid": "p", "sequence": "7"}).to_string();
        write(d.path(), "g/d/00.jsonl", &(bad + "\n"));
        let err = Stream::read(d.path())
            .unwrap()
            .check_sequences()
            .unwrap_err();
        assert!(err.contains("not a 20-digit"), "{err}");
    }

    #[test]
    fn numbers_are_summarized_as_ranges() {
        assert_eq!(summarize_numbers(&[1, 2, 3, 7, 9, 10]), "1..=3, 7, 9..=10");
        assert_eq!(summarize_numbers(&[]), "");
        let many: Vec<u64> = (0..100).map(|i| i * 2).collect();
        assert!(summarize_numbers(&many).ends_with("(75 more ranges)"));
    }
}
