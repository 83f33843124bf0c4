//! Report by exception: a reading goes on only when it moved by at least the deadband
//! from the last one that went on, or when the maximum interval has passed since it.
//! A home uplink then carries changes, and a heartbeat of the unchanged.

/// A report-by-exception rule's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exception {
    /// How far a value must move from the last forwarded one (absolute, ≥ 0).
    pub deadband: f64,
    /// Forward anyway once this long has passed since the last forwarded reading (ms).
    pub max_interval_ms: Option<i64>,
}

/// The last forwarded reading of a group: its time and value.
pub type LastForwarded = Option<(i64, f64)>;

impl Exception {
    /// Whether a reading of `v` at `t` is forwarded; if so, `last` becomes it. A reading
    /// older than the last forwarded one is never forwarded (it is not news).
    pub fn observe(&self, last: &mut LastForwarded, t: i64, v: f64) -> bool {
        let forward = match *last {
            None => true,
            Some((lt, _)) if t < lt => false,
            Some((lt, lv)) => {
                (v - lv).abs() >= self.deadband
                    || v.is_nan() != lv.is_nan()
                    || self.max_interval_ms.is_some_and(|m| t - lt >= m)
            }
        };
        if forward {
            *last = Some((t, v));
        }
        forward
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_and_a_heartbeat_go_on() {
        let rule = Exception {
            deadband: 0.5,
            max_interval_ms: Some(60_000),
        };
        let mut last = None;
        let readings = [
            (0, 21.0),      // first: on
            (10_000, 21.2), // moved 0.2
            (20_000, 21.4), // moved 0.4 from 21.0
            (30_000, 21.5), // moved 0.5: on
            (40_000, 21.1), // moved 0.4 from 21.5
            (25_000, 30.0), // older than the last forwarded: not news
            (90_000, 21.1), // 60 s since 30_000: on
        ];
        let forwarded: Vec<i64> = readings
            .iter()
            .filter(|&&(t, v)| rule.observe(&mut last, t, v))
            .map(|&(t, _)| t)
            .collect();
        assert_eq!(forwarded, vec![0, 30_000, 90_000]);
    }
}
