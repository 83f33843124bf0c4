//! Threshold alarms with hysteresis and a minimum duration or count, so one noisy
//! reading neither raises nor clears an alarm.
//!
//! An alarm `above = 0.3, clear_below = 0.2, for = 5s, count = 3` is raised by the
//! reading that makes it true that the last readings, at least 3 of them over at least
//! 5 s, were all above 0.3; it is cleared the same way by readings all below 0.2. A
//! reading between 0.2 and 0.3 keeps the alarm as it is and interrupts a run towards
//! the other state.

/// Which way the alarm looks, and its two levels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Direction {
    /// Raised above `level`, cleared below `clear` (`clear <= level`).
    Above { level: f64, clear: f64 },
    /// Raised below `level`, cleared above `clear` (`clear >= level`).
    Below { level: f64, clear: f64 },
}

/// A threshold rule's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub direction: Direction,
    /// How long the run of readings must last, from its first to its last (0: no minimum).
    pub for_ms: i64,
    /// How many readings the run must have (at least 1).
    pub count: u32,
}

/// One group's alarm state: what it is, and the run of readings towards the other state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct AlarmState {
    pub active: bool,
    /// The first reading's time and the number of readings of the current run.
    pub run: Option<(i64, u32)>,
}

/// What a reading did to an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Raised,
    Cleared,
}

impl Threshold {
    /// Whether the settings make sense; the reason if not.
    pub fn check(&self) -> Result<(), String> {
        let ok = match self.direction {
            Direction::Above { level, clear } => clear <= level,
            Direction::Below { level, clear } => clear >= level,
        };
        if !ok {
            return Err(
                "the clearing level must be on the normal side of the alarm level \
                 (clear_below <= above, clear_above >= below)"
                    .into(),
            );
        }
        if self.count == 0 || self.for_ms < 0 {
            return Err("count must be at least 1 and for not negative".into());
        }
        Ok(())
    }

    /// Applies a reading of value `v` at time `t` to `state`.
    pub fn observe(&self, state: &mut AlarmState, t: i64, v: f64) -> Option<Transition> {
        let towards_other = match (self.direction, state.active) {
            (Direction::Above { level, .. }, false) => v > level,
            (Direction::Above { clear, .. }, true) => v < clear,
            (Direction::Below { level, .. }, false) => v < level,
            (Direction::Below { clear, .. }, true) => v > clear,
        };
        if !towards_other {
            state.run = None;
            return None;
        }
        let (since, n) = match state.run {
            Some((since, n)) => (since.min(t), n.saturating_add(1)),
            None => (t, 1),
        };
        if n >= self.count && t - since >= self.for_ms {
            state.active = !state.active;
            state.run = None;
            Some(if state.active {
                Transition::Raised
            } else {
                Transition::Cleared
            })
        } else {
            state.run = Some((since, n));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smoke(count: u32, for_ms: i64) -> Threshold {
        Threshold {
            direction: Direction::Above {
                level: 0.3,
                clear: 0.2,
            },
            for_ms,
            count,
        }
    }

    fn run(t: &Threshold, readings: &[(i64, f64)]) -> Vec<(i64, Transition)> {
        let mut s = AlarmState::default();
        readings
            .iter()
            .filter_map(|&(at, v)| t.observe(&mut s, at, v).map(|tr| (at, tr)))
            .collect()
    }

    #[test]
    fn one_noisy_reading_neither_raises_nor_clears() {
        let t = smoke(3, 0);
        let readings = [
            (1, 0.5), // a spike alone
            (2, 0.1),
            (3, 0.4),
            (4, 0.45),
            (5, 0.5),  // third in a row: raised
            (6, 0.1),  // one low reading
            (7, 0.25), // between the levels: the alarm stays, the run resets
            (8, 0.1),
            (9, 0.1),
            (10, 0.1), // third low in a row: cleared
        ];
        assert_eq!(
            run(&t, &readings),
            vec![(5, Transition::Raised), (10, Transition::Cleared)]
        );
    }

    #[test]
    fn a_minimum_duration_waits_for_time_not_only_readings() {
        let t = smoke(1, 5_000);
        let readings = [(0, 0.5), (1_000, 0.6), (4_999, 0.6), (5_000, 0.7)];
        assert_eq!(run(&t, &readings), vec![(5_000, Transition::Raised)]);
        // Out of order: the run's start is its earliest reading.
        let readings = [(3_000, 0.5), (0, 0.6), (5_000, 0.7)];
        assert_eq!(run(&t, &readings), vec![(5_000, Transition::Raised)]);
    }

    #[test]
    fn below_alarms_and_bad_settings() {
        let frost = Threshold {
            direction: Direction::Below {
                level: 2.0,
                clear: 4.0,
            },
            for_ms: 0,
            count: 1,
        };
        assert!(frost.check().is_ok());
        let got = run(&frost, &[(1, 3.0), (2, 1.5), (3, 3.9), (4, 4.1)]);
        assert_eq!(got, vec![(2, Transition::Raised), (4, Transition::Cleared)]);
        let bad = Threshold {
            direction: Direction::Above {
                level: 1.0,
                clear: 2.0,
            },
            ..frost
        };
        assert!(bad.check().unwrap_err().contains("clear_below <= above"));
        assert!(Threshold { count: 0, ..frost }.check().is_err());
    }
}
