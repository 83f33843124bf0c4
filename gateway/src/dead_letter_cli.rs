//! `pigeon-gateway dead-letter list | retry | purge`: the dead-letter table for the person
//! at the Pi and for scripts. Reads `gateway.data_dir` from the config (never the token)
//! and works on `outbox.db` directly, also while the gateway runs
//! (see [`crate::outbox::dead_letters`]).
//!
//! Exit codes: 0 done, 64 bad configuration or arguments, 1 failure (no outbox, a
//! sequence that is not a dead letter, a database error).

use std::path::Path;
use std::process::ExitCode;

use clap::{ArgGroup, Subcommand};
use pigeon_shared::escape::controls;
use pigeon_shared::units;
use serde::Serialize;

use crate::config::Config;
use crate::exit;
use crate::outbox::db;
use crate::outbox::dead_letters::{self, DeadLetter, Selection};
use crate::report::{count, counted, human_bytes};

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub(crate) enum DeadLetterCommand {
    /// List the dead letters, oldest sequence first: sequence, CloudEvent id, type,
    /// subject, when received, when rejected, the relay's reason, size and (for text) the
    /// start of the data.
    List {
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Show at most this many.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: u64,
    },
    /// Move dead letters back into the outbox, so the uplink sends them again (under new
    /// sequences; the CloudEvent id stays). Fix the cause first: the relay rejects an
    /// unchanged event again.
    #[command(group(ArgGroup::new("which").required(true).args(["seqs", "all"])))]
    Retry {
        /// Sequences, as `list` shows them.
        #[arg(value_name = "SEQ")]
        seqs: Vec<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters for good and say how many.
    #[command(group(ArgGroup::new("which").required(true).multiple(true).args(["seqs", "all", "older_than"])))]
    Purge {
        /// Sequences, as `list` shows them.
        #[arg(value_name = "SEQ", conflicts_with = "all")]
        seqs: Vec<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Only those the relay rejected longer ago than this (e.g. `7d`, `12h`); alone,
        /// it means every dead letter that old.
        #[arg(long, value_name = "DURATION")]
        older_than: Option<units::Duration>,
    },
}

impl DeadLetterCommand {
    /// The dead letters a `retry` or `purge` is about (`list` is about all of them).
    fn selection(&self) -> Selection {
        match self {
            Self::Retry { seqs, all: false }
            | Self::Purge {
                seqs, all: false, ..
            } if !seqs.is_empty() => Selection::Seqs(seqs.clone()),
            _ => Selection::All,
        }
    }
}

/// Runs a `dead-letter` command with the config at `config_path`.
pub(crate) fn run(config_path: &Path, command: DeadLetterCommand) -> ExitCode {
    // Only the configuration: the token file may be unreadable to whoever asks.
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pigeon-gateway: {e}");
            return ExitCode::from(exit::BAD_CONFIG);
        }
    };
    let path = db::path_in(&config.gateway.data_dir);
    match execute(&path, &config.spool_dir(), &command) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pigeon-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The JSON `list --json` prints.
#[derive(Serialize)]
struct ListJson<'a> {
    outbox: String,
    /// Dead letters in the table (more than listed when `--limit` cut the list).
    total: u64,
    dead_letters: &'a [DeadLetter],
}

/// Does what `command` asks to the outbox at `path` and returns what to print.
fn execute(path: &Path, spool_dir: &Path, command: &DeadLetterCommand) -> Result<String, String> {
    let writable = !matches!(command, DeadLetterCommand::List { .. });
    let mut conn = dead_letters::open_existing(path, writable).map_err(|e| e.to_string())?;
    let out = match command {
        DeadLetterCommand::List { json: true, limit } => {
            let (total, letters) =
                dead_letters::list_first(&conn, *limit).map_err(|e| e.to_string())?;
            let body = ListJson {
                outbox: path.display().to_string(),
                total,
                dead_letters: &letters,
            };
            let mut s = serde_json::to_string_pretty(&body).map_err(|e| e.to_string())?;
            s.push('\n');
            s
        }
        DeadLetterCommand::List { json: false, limit } => {
            let (total, letters) =
                dead_letters::list_first(&conn, *limit).map_err(|e| e.to_string())?;
            render_list(path, total, &letters)
        }
        DeadLetterCommand::Retry { .. } => {
            let done =
                dead_letters::retry(&mut conn, &command.selection()).map_err(|e| e.to_string())?;
            if done.is_empty() {
                return Ok("no dead letters\n".into());
            }
            let mut s = format!(
                "Moved {} back into the outbox; the gateway sends {}:\n",
                counted(done.len() as u64, "dead letter", "dead letters"),
                if done.len() == 1 {
                    "it again under a new sequence"
                } else {
                    "them again under new sequences"
                },
            );
            for r in &done {
                s.push_str(&format!(
                    "  seq {} -> {}  id {}\n",
                    r.old_seq, r.new_seq, r.id
                ));
            }
            s
        }
        DeadLetterCommand::Purge { older_than, .. } => {
            let before = older_than.map(|d| {
                chrono::Utc::now().timestamp_micros()
                    - i64::try_from(d.0.as_micros()).unwrap_or(i64::MAX)
            });
            let deleted = dead_letters::purge(&mut conn, &command.selection(), before, spool_dir)
                .map_err(|e| e.to_string())?;
            let mut s = format!(
                "Deleted {}",
                counted(deleted.len() as u64, "dead letter", "dead letters")
            );
            if let Some(d) = older_than {
                s.push_str(&format!(" (rejected more than {d} ago)"));
            }
            s.push_str(".\n");
            s
        }
    };
    Ok(out)
}

/// `2025-06-01 10:00:01` (UTC) from µs since the epoch.
fn utc(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "?".into())
}

/// The table `list` prints for a person.
fn render_list(path: &Path, total: u64, letters: &[DeadLetter]) -> String {
    if total == 0 {
        return format!("no dead letters (in {})\n", path.display());
    }
    let mut out = format!(
        "{} in {}",
        counted(total, "dead letter", "dead letters"),
        path.display()
    );
    if (letters.len() as u64) < total {
        out.push_str(&format!(
            "; the first {} by sequence (--limit)",
            count(letters.len() as u64)
        ));
    }
    out.push_str(":\n\n");
    let header = [
        "SEQ",
        "RECEIVED (UTC)",
        "REJECTED (UTC)",
        "SIZE",
        "TYPE",
        "SUBJECT",
    ];
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|d| {
            [
                d.seq.to_string(),
                utc(d.time_us),
                utc(d.failed_at_us),
                human_bytes(d.size_bytes),
                d.event_type.clone(),
                // Topics and reasons came from outside: no control character may
                // break the table (issue 24); previews are escaped already.
                d.subject
                    .as_deref()
                    .map_or("-".into(), |s| controls(s).into_owned()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        l.push('\n');
        l
    };
    out.push_str(&line(&header));
    let indent = " ".repeat(widths[0] + 2);
    for (d, row) in letters.iter().zip(&rows) {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
        out.push_str(&format!("{indent}id      {}\n", d.id));
        out.push_str(&format!("{indent}reason  {}\n", controls(&d.reason)));
        match &d.preview {
            Some(p) => out.push_str(&format!("{indent}data    {p}\n")),
            None => out.push_str(&format!("{indent}data    (binary)\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Args {
        #[command(subcommand)]
        command: DeadLetterCommand,
    }

    fn parse(args: &[&str]) -> Result<DeadLetterCommand, clap::Error> {
        Args::try_parse_from(std::iter::once("dead-letter").chain(args.iter().copied()))
            .map(|a| a.command)
    }

    #[test]
    fn list_defaults_and_options() {
        assert_eq!(
            parse(&["list"]).unwrap(),
            DeadLetterCommand::List {
                json: false,
                limit: 100
            }
        );
        assert_eq!(
            parse(&["list", "--json", "--limit", "5"]).unwrap(),
            DeadLetterCommand::List {
                json: true,
                limit: 5
            }
        );
        assert!(parse(&["list", "--limit", "five"]).is_err());
    }

    #[test]
    fn retry_needs_sequences_or_all_but_not_both() {
        let c = parse(&["retry", "3", "9"]).unwrap();
        assert_eq!(c.selection(), Selection::Seqs(vec![3, 9]));
        assert_eq!(
            parse(&["retry", "--all"]).unwrap().selection(),
            Selection::All
        );
        assert!(parse(&["retry"]).is_err());
        assert!(parse(&["retry", "3", "--all"]).is_err());
        assert!(parse(&["retry", "-1"]).is_err());
    }

    #[test]
    fn purge_takes_sequences_all_or_an_age() {
        let c = parse(&["purge", "--older-than", "7d"]).unwrap();
        assert_eq!(c.selection(), Selection::All);
        let DeadLetterCommand::Purge { older_than, .. } = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            older_than.map(|d| d.0),
            Some(std::time::Duration::from_secs(7 * 86_400))
        );
        let c = parse(&["purge", "4", "--older-than", "12h"]).unwrap();
        assert_eq!(c.selection(), Selection::Seqs(vec![4]));
        assert_eq!(
            parse(&["purge", "--all"]).unwrap().selection(),
            Selection::All
        );
        assert!(parse(&["purge"]).is_err());
        assert!(parse(&["purge", "4", "--all"]).is_err());
        let e = parse(&["purge", "--older-than", "7 weeks"]).unwrap_err();
        assert!(e.to_string().contains("a duration"), "{e}");
    }

    #[test]
    fn the_table_shows_each_dead_letter_with_id_reason_and_preview() {
        let d = DeadLetter {
            seq: 251,
            id: uuid::Uuid::nil(),
            source: "/gateways/pi-1/mqtt".into(),
            event_type: "com.example.reading".into(),
            subject: Some("home/kitchen".into()),
            time_us: 1_700_000_000_000_000,
            failed_at_us: 1_700_000_001_000_000,
            reason: "too large".into(),
            content_type: None,
            size_bytes: 8192,
            preview: Some("{\"n\":250}".into()),
            file: None,
        };
        let text = render_list(Path::new("/x/outbox.db"), 3, &[d]);
        assert!(text.starts_with("3 dead letters in /x/outbox.db; the first 1 by sequence"));
        assert!(
            text.contains("251  2023-11-14 22:13:20  2023-11-14 22:13:21  8.0 KiB"),
            "{text}"
        );
        assert!(text.contains("     reason  too large\n"), "{text}");
        assert!(text.contains("     data    {\"n\":250}\n"), "{text}");
        assert_eq!(
            render_list(Path::new("/x/outbox.db"), 0, &[]),
            "no dead letters (in /x/outbox.db)\n"
        );
    }

    /// A topic or a reason with a newline or an escape sequence stays in its cell.
    #[test]
    fn issue_24_the_table_escapes_control_characters() {
        let d = DeadLetter {
            seq: 7,
            id: uuid::Uuid::nil(),
            source: "/gateways/pi-1/mqtt".into(),
            event_type: "t".into(),
            subject: Some("home/a\nforged".into()),
            time_us: 0,
            failed_at_us: 0,
            reason: "bad \x1b[2J\r".into(),
            content_type: None,
            size_bytes: 1,
            preview: None,
            file: None,
        };
        let text = render_list(Path::new("/x/outbox.db"), 1, &[d]);
        assert!(text.contains("  home/a\\nforged\n"), "{text}");
        assert!(text.contains("reason  bad \\u{1b}[2J\\r\n"), "{text}");
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text}");
    }
}
