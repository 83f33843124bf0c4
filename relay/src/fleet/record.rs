//! One gateway's fleet record, and the rules it follows, without I/O or a clock: every
//! function takes the time it is called at (Unix milliseconds), so the tests set it.
//!
//! * **Counts** are kept twice: for the UTC day of the last request (`today`, started
//!   afresh by the first request of a new day, and read as zero once the day is over)
//!   and since the record began (`total`).
//! * **Heartbeats**: the newest by its `time` attribute wins (a backlog delivered late,
//!   or a re-sent one, does not replace a newer one). Two heartbeats of the same gateway
//!   process in a row give its heartbeat interval: the gap between their `time`s, if
//!   their `process_uptime_seconds` grew by as much (a restart in between would make
//!   the gap anything).
//! * **Silence**: nothing received for longer than three heartbeat intervals (the
//!   gateway's, or `fleet.heartbeat_interval` until it is known), counted from the last
//!   request, or from when this relay began listening if that is later — a relay that
//!   was down heard nothing, and its gateways get three intervals to come back.

use serde::{Deserialize, Serialize};

use super::heartbeat::{Figures, Heartbeat};

const DAY_MS: i64 = 86_400_000;
/// The range of pigeon-gateway's `health.interval`, in ms.
const MIN_INTERVAL_MS: u64 = 1_000;
const MAX_INTERVAL_MS: u64 = 86_400_000;
/// How far `process_uptime_seconds` (whole seconds) may be off the gap between two
/// heartbeats' times for them to count as one process's.
const SAME_PROCESS_SLACK_MS: i64 = 2_000;
/// Silent after this many heartbeat intervals without a request.
pub const SILENT_AFTER_INTERVALS: u64 = 3;

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestKind {
    /// `POST /v1/events` with at least one event that is not a heartbeat (or none).
    Events,
    /// `POST /v1/events` with heartbeats only.
    Heartbeat,
    /// The upload endpoint.
    Files,
}

/// What one request brought, for one gateway.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Events accepted (stored now), and the bytes of their stored lines.
    pub events: u64,
    pub bytes: u64,
    /// Events the relay had already.
    pub duplicates: u64,
    /// Events rejected (by the checks or by the stream).
    pub rejected: u64,
    /// Files stored with their event accepted, and their bytes.
    pub files: u64,
    pub file_bytes: u64,
    /// Events of the request that were not heartbeats.
    pub others: u64,
    /// The request's last two heartbeats (accepted or duplicate), in order: two are
    /// enough to see the interval.
    pub heartbeats: Vec<Heartbeat>,
}

impl Tally {
    /// Keeps `hb` as the newest of the request's heartbeats.
    pub fn heartbeat(&mut self, hb: Heartbeat) {
        if self.heartbeats.len() == 2 {
            self.heartbeats.remove(0);
        }
        self.heartbeats.push(hb);
    }

    /// What an ingest request was, from what it carried.
    pub fn kind(&self) -> RequestKind {
        if self.others == 0 && !self.heartbeats.is_empty() {
            RequestKind::Heartbeat
        } else {
            RequestKind::Events
        }
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    /// Requests the gateway authenticated for, whatever the answer.
    pub requests: u64,
    pub events: u64,
    pub bytes: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub files: u64,
    pub file_bytes: u64,
}

impl Counts {
    fn add(&mut self, t: &Tally) {
        self.requests += 1;
        self.events += t.events;
        self.bytes += t.bytes;
        self.duplicates += t.duplicates;
        self.rejected += t.rejected;
        self.files += t.files;
        self.file_bytes += t.file_bytes;
    }
}

/// The last request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRequest {
    pub at_ms: i64,
    pub kind: RequestKind,
    /// The HTTP status it was answered with.
    pub status: u16,
}

/// The newest heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastHeartbeat {
    /// When the relay received it.
    pub received_ms: i64,
    /// Its `time` attribute: when the gateway took it.
    pub time_ms: Option<i64>,
    pub figures: Figures,
}

/// One gateway's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub first_seen_ms: Option<i64>,
    pub last_request: Option<LastRequest>,
    pub last_heartbeat: Option<LastHeartbeat>,
    /// The heartbeat interval its heartbeats showed.
    pub interval_ms: Option<u64>,
    /// The UTC day of `today` (days since 1970-01-01).
    pub day: i64,
    pub today: Counts,
    pub total_since_ms: i64,
    pub total: Counts,
}

/// The UTC day of `ms` (days since 1970-01-01).
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

impl Record {
    pub fn new(now_ms: i64) -> Self {
        Self {
            first_seen_ms: None,
            last_request: None,
            last_heartbeat: None,
            interval_ms: None,
            day: day_of(now_ms),
            today: Counts::default(),
            total_since_ms: now_ms,
            total: Counts::default(),
        }
    }

    /// Counts a request the gateway made, answered with `status`.
    pub fn note(&mut self, now_ms: i64, kind: RequestKind, status: u16, tally: Tally) {
        let day = day_of(now_ms);
        if day > self.day {
            self.day = day;
            self.today = Counts::default();
        }
        self.first_seen_ms.get_or_insert(now_ms);
        self.last_request = Some(LastRequest {
            at_ms: now_ms,
            kind,
            status,
        });
        self.today.add(&tally);
        self.total.add(&tally);
        for hb in tally.heartbeats {
            self.heartbeat(now_ms, hb);
        }
    }

    /// Today's counts as of `now_ms`: zero once the day of the last request is over.
    pub fn today_at(&self, now_ms: i64) -> Counts {
        if day_of(now_ms) > self.day {
            Counts::default()
        } else {
            self.today
        }
    }

    fn heartbeat(&mut self, now_ms: i64, hb: Heartbeat) {
        if let Some(prev) = &self.last_heartbeat
            && let (Some(before), Some(after)) = (prev.time_ms, hb.time_ms)
        {
            if after <= before {
                return;
            }
            let gap = after - before;
            let grew = match (
                prev.figures.process_uptime_seconds,
                hb.figures.process_uptime_seconds,
            ) {
                (Some(a), Some(b)) if b >= a => Some((b - a).saturating_mul(1000)),
                _ => None,
            };
            if grew.is_some_and(|g| {
                (i64::try_from(g).unwrap_or(i64::MAX) - gap).abs() <= SAME_PROCESS_SLACK_MS
            }) {
                self.interval_ms = Some((gap as u64).clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS));
            }
        }
        self.last_heartbeat = Some(LastHeartbeat {
            received_ms: now_ms,
            time_ms: hb.time_ms,
            figures: hb.figures,
        });
    }

    /// Whether the gateway is silent at `now_ms`, for a relay listening since
    /// `listening_since_ms` with `fleet.heartbeat_interval` = `default_interval_ms`.
    pub fn silence(
        &self,
        now_ms: i64,
        listening_since_ms: i64,
        default_interval_ms: u64,
    ) -> Silence {
        let (interval_ms, from_heartbeats) = match self.interval_ms {
            Some(i) => (i, true),
            None => (default_interval_ms, false),
        };
        let threshold_ms = interval_ms.saturating_mul(SILENT_AFTER_INTERVALS);
        let last = self.last_request.map(|l| l.at_ms);
        let since = last.unwrap_or(listening_since_ms).max(listening_since_ms);
        let quiet_ms = u64::try_from(now_ms.saturating_sub(since)).unwrap_or(0);
        let silent = quiet_ms > threshold_ms;
        let reason = silent.then(|| {
            let rule = format!(
                "more than {SILENT_AFTER_INTERVALS} heartbeat intervals ({SILENT_AFTER_INTERVALS} × {}, {})",
                human_ms(interval_ms),
                if from_heartbeats {
                    "the interval of its heartbeats"
                } else {
                    "fleet.heartbeat_interval, as its heartbeats have not shown one"
                }
            );
            match last {
                None => format!(
                    "nothing received from it since the relay started listening {} ago, {rule}",
                    human_ms(quiet_ms)
                ),
                Some(at) if at < listening_since_ms => format!(
                    "nothing received for {} since the relay started (its last request was {} ago), {rule}",
                    human_ms(quiet_ms),
                    human_ms(u64::try_from(now_ms.saturating_sub(at)).unwrap_or(0))
                ),
                Some(_) => format!("nothing received for {}, {rule}", human_ms(quiet_ms)),
            }
        });
        Silence {
            silent,
            reason,
            interval_ms,
            from_heartbeats,
            threshold_ms,
            quiet_ms,
        }
    }
}

/// Whether a gateway is silent, and the figures that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Silence {
    pub silent: bool,
    /// Why, in a sentence, when silent.
    pub reason: Option<String>,
    /// The heartbeat interval the rule used, and whether its heartbeats showed it.
    pub interval_ms: u64,
    pub from_heartbeats: bool,
    /// Silent once `quiet_ms` is above this.
    pub threshold_ms: u64,
    /// How long nothing was received (while the relay listened).
    pub quiet_ms: u64,
}

/// `4.25 s`, `42 s`, `3 m 5 s`, `2 h 3 m`, `5 d 2 h`.
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..10 => format!("{:.2} s", ms as f64 / 1000.0),
        10..60 => format!("{s} s"),
        60..3600 => format!("{} m {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} m", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-03-01T00:00:00Z.
    const T0: i64 = 1_772_323_200_000;
    const MIN: u64 = 60_000;

    fn hb(time_ms: i64, uptime_s: u64, depth: u64) -> Heartbeat {
        Heartbeat {
            time_ms: Some(time_ms),
            figures: Figures {
                process_uptime_seconds: Some(uptime_s),
                outbox_depth: Some(depth),
                ..Figures::default()
            },
        }
    }

    fn events(n: u64, bytes: u64) -> Tally {
        Tally {
            events: n,
            bytes,
            others: n,
            ..Tally::default()
        }
    }

    fn with_heartbeats(hbs: Vec<Heartbeat>) -> Tally {
        let mut t = Tally {
            events: hbs.len() as u64,
            bytes: 100 * hbs.len() as u64,
            ..Tally::default()
        };
        for h in hbs {
            t.heartbeat(h);
        }
        t
    }

    #[test]
    fn counts_today_and_in_total() {
        let mut r = Record::new(T0);
        r.note(T0 + 1000, RequestKind::Events, 200, events(10, 2000));
        r.note(
            T0 + 2000,
            RequestKind::Events,
            200,
            Tally {
                duplicates: 3,
                rejected: 1,
                files: 1,
                file_bytes: 5_000_000,
                ..events(2, 300)
            },
        );
        let want = Counts {
            requests: 2,
            events: 12,
            bytes: 2300,
            duplicates: 3,
            rejected: 1,
            files: 1,
            file_bytes: 5_000_000,
        };
        assert_eq!(r.today_at(T0 + 3000), want);
        assert_eq!(r.total, want);
        assert_eq!(r.first_seen_ms, Some(T0 + 1000));
        assert_eq!(
            r.last_request,
            Some(LastRequest {
                at_ms: T0 + 2000,
                kind: RequestKind::Events,
                status: 200
            })
        );
    }

    #[test]
    fn a_new_utc_day_starts_today_afresh() {
        let mut r = Record::new(T0);
        let last_ms_of_day = T0 + DAY_MS - 1;
        r.note(last_ms_of_day, RequestKind::Events, 200, events(5, 500));
        assert_eq!(r.today_at(last_ms_of_day).events, 5);
        // Read after midnight, before any request of the new day: zero.
        assert_eq!(r.today_at(T0 + DAY_MS), Counts::default());
        // The first request of the new day starts the count.
        r.note(T0 + DAY_MS, RequestKind::Events, 200, events(2, 40));
        assert_eq!(r.today_at(T0 + DAY_MS).events, 2);
        assert_eq!(r.today_at(T0 + DAY_MS).requests, 1);
        assert_eq!(r.total.events, 7);
        assert_eq!(r.day, day_of(T0) + 1);
        // Days later, still read as zero; a clock that stepped back does not reset.
        assert_eq!(r.today_at(T0 + 5 * DAY_MS).events, 0);
        r.note(T0 + DAY_MS - 10, RequestKind::Events, 200, events(1, 1));
        assert_eq!(r.today_at(T0 + DAY_MS).events, 3);
    }

    #[test]
    fn the_newest_heartbeat_wins_and_shows_the_interval() {
        let mut r = Record::new(T0);
        r.note(
            T0 + 2_000,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0 + 2_000, 2, 5)]),
        );
        assert_eq!(r.interval_ms, None);
        r.note(
            T0 + 32_100,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0 + 32_000, 32, 7)]),
        );
        assert_eq!(r.interval_ms, Some(30_000));
        let last = r.last_heartbeat.clone().unwrap();
        assert_eq!(
            (last.received_ms, last.time_ms),
            (T0 + 32_100, Some(T0 + 32_000))
        );
        assert_eq!(last.figures.outbox_depth, Some(7));
        // An older one (a re-send, a backlog) changes nothing.
        r.note(
            T0 + 33_000,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0 + 2_000, 2, 99)]),
        );
        assert_eq!(
            r.last_heartbeat.as_ref().unwrap().figures.outbox_depth,
            Some(7)
        );
        assert_eq!(r.interval_ms, Some(30_000));
        assert_eq!(r.last_request.unwrap().at_ms, T0 + 33_000);
    }

    #[test]
    fn a_backlog_of_heartbeats_shows_the_interval_not_the_outage() {
        let mut r = Record::new(T0);
        r.note(
            T0,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0, 100, 0)]),
        );
        // An hour offline, then 60 heartbeats a minute apart in one batch.
        let backlog: Vec<_> = (1..=60)
            .map(|i| hb(T0 + i * 60_000, 100 + 60 * i as u64, i as u64))
            .collect();
        r.note(
            T0 + 3_600_500,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(backlog),
        );
        assert_eq!(r.interval_ms, Some(60_000));
        assert_eq!(
            r.last_heartbeat.as_ref().unwrap().figures.outbox_depth,
            Some(60)
        );
    }

    #[test]
    fn a_restart_between_two_heartbeats_shows_no_interval() {
        let mut r = Record::new(T0);
        r.note(
            T0,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0, 5000, 0)]),
        );
        // Stopped a second later, started again: the new process's first heartbeat comes
        // 2 s after its start, 3 s after the last one.
        r.note(
            T0 + 3_000,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0 + 3_000, 2, 0)]),
        );
        assert_eq!(r.interval_ms, None);
        // Young processes too: uptime 2 → 2 is no growth of 40 s.
        r.note(
            T0 + 43_000,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0 + 43_000, 2, 0)]),
        );
        assert_eq!(r.interval_ms, None);
        // The same process's next one does show it.
        r.note(
            T0 + 53_000,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0 + 53_000, 12, 0)]),
        );
        assert_eq!(r.interval_ms, Some(10_000));
    }

    #[test]
    fn silent_after_three_intervals_of_its_own_or_the_default() {
        let mut r = Record::new(T0);
        // Never seen: three default intervals after the relay started listening.
        let s = r.silence(T0 + 3 * MIN as i64, T0, MIN);
        assert!(!s.silent && s.reason.is_none());
        let s = r.silence(T0 + 3 * MIN as i64 + 1, T0, MIN);
        assert!(s.silent);
        let reason = s.reason.unwrap();
        assert!(
            reason.starts_with(
                "nothing received from it since the relay started listening 3 m 0 s ago"
            ),
            "{reason}"
        );
        assert!(reason.contains("fleet.heartbeat_interval"), "{reason}");

        // Heartbeats every 1 s: silent once 3 s pass without a request.
        r.note(
            T0,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0, 10, 0)]),
        );
        r.note(
            T0 + 1_000,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0 + 1_000, 11, 0)]),
        );
        let s = r.silence(T0 + 4_000, T0, MIN);
        assert!(!s.silent);
        assert_eq!(
            (s.interval_ms, s.from_heartbeats, s.threshold_ms, s.quiet_ms),
            (1_000, true, 3_000, 3_000)
        );
        let s = r.silence(T0 + 5_200, T0, MIN);
        assert!(s.silent);
        assert_eq!(
            s.reason.unwrap(),
            "nothing received for 4.20 s, more than 3 heartbeat intervals (3 × 1.00 s, the interval of its heartbeats)"
        );
    }

    #[test]
    fn a_relay_restart_gives_its_gateways_three_intervals() {
        let mut r = Record::new(T0);
        r.note(T0, RequestKind::Events, 200, events(1, 10));
        // The relay was down for two hours and started again at T0 + 2 h.
        let restart = T0 + 7_200_000;
        assert!(!r.silence(restart + 60_000, restart, MIN).silent);
        let s = r.silence(restart + 181_000, restart, MIN);
        assert!(s.silent);
        let reason = s.reason.unwrap();
        assert!(
            reason.starts_with("nothing received for 3 m 1 s since the relay started (its last request was 2 h 3 m ago)"),
            "{reason}"
        );
    }

    #[test]
    fn durations_read_as_a_person_says_them() {
        assert_eq!(human_ms(4_250), "4.25 s");
        assert_eq!(human_ms(42_000), "42 s");
        assert_eq!(human_ms(185_000), "3 m 5 s");
        assert_eq!(human_ms(7_380_000), "2 h 3 m");
        assert_eq!(human_ms(5 * 86_400_000 + 7_200_000), "5 d 2 h");
    }

    #[test]
    fn records_survive_json() {
        let mut r = Record::new(T0);
        r.note(
            T0 + 5,
            RequestKind::Files,
            200,
            Tally {
                files: 1,
                file_bytes: 9,
                ..Tally::default()
            },
        );
        r.note(
            T0 + 9,
            RequestKind::Heartbeat,
            200,
            with_heartbeats(vec![hb(T0 + 8, 1, 3)]),
        );
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }
}
