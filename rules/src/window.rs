//! Windows aligned to the clock, and what a window accumulates.
//!
//! Times are milliseconds since the Unix epoch (UTC). A tumbling window of 5 minutes is
//! [12:00, 12:05), [12:05, 12:10), …; a hopping window of 5 minutes every minute is
//! [12:00, 12:05), [12:01, 12:06), …; both whatever time the gateway started. A sliding
//! window is the `size` before each reading, so it has no fixed bounds to align.

use std::ops::Range;

/// How a rule cuts time into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windowing {
    Tumbling { size_ms: i64 },
    Hopping { size_ms: i64, hop_ms: i64 },
    Sliding { size_ms: i64 },
}

/// A window's bounds: `[start, end)` in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bounds {
    pub start: i64,
    pub end: i64,
}

impl Windowing {
    pub fn size_ms(self) -> i64 {
        match self {
            Windowing::Tumbling { size_ms }
            | Windowing::Hopping { size_ms, .. }
            | Windowing::Sliding { size_ms } => size_ms,
        }
    }

    /// How many clock-aligned windows a reading belongs to: 1 for tumbling windows,
    /// size / hop (rounded up) for hopping ones.
    pub fn windows_per_reading(self) -> usize {
        match self {
            Windowing::Hopping { size_ms, hop_ms } if hop_ms > 0 => {
                usize::try_from((size_ms + hop_ms - 1) / hop_ms)
                    .unwrap_or(1)
                    .clamp(1, 64)
            }
            _ => 1,
        }
    }

    /// The clock-aligned windows a reading at `t` belongs to, oldest first (none for
    /// sliding windows, whose bounds follow the readings).
    pub fn windows_of(self, t: i64) -> impl Iterator<Item = Bounds> {
        let (size, hop) = match self {
            Windowing::Tumbling { size_ms } => (size_ms, size_ms),
            Windowing::Hopping { size_ms, hop_ms } => (size_ms, hop_ms),
            Windowing::Sliding { .. } => (1, 0),
        };
        let starts: Range<i64> = if hop == 0 {
            0..0
        } else {
            // The first start s with s + size > t, on the hop grid.
            let last = t.div_euclid(hop) * hop;
            let first = (t - size).div_euclid(hop) * hop + hop;
            first.min(last)..last + 1
        };
        starts
            .step_by(usize::try_from(hop.max(1)).unwrap_or(usize::MAX))
            .map(move |start| Bounds {
                start,
                end: start + size,
            })
            .filter(move |b| b.start <= t && t < b.end)
    }
}

/// What a window has seen of its values: enough for avg, min, max, sum, count, first,
/// last and stddev, in constant space. Only finite numbers go in, so it serializes to
/// JSON as it is (no NaN or infinity in a saved state).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Accumulator {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// The value with the earliest time, and that time (ties: the first seen).
    pub first: (i64, f64),
    /// The value with the latest time (ties: the last seen).
    pub last: (i64, f64),
    /// Welford's running mean and sum of squared deviations.
    mean: f64,
    m2: f64,
}

/// The names of an accumulator's figures, in the order of [`Accumulator::figures`]:
/// what a window rule's condition can use.
pub const FIGURES: [&str; 8] = [
    "avg", "min", "max", "sum", "count", "first", "last", "stddev",
];

impl Accumulator {
    /// Adds a finite value `v` at time `t` (a non-finite one is ignored).
    pub fn add(&mut self, t: i64, v: f64) {
        if !v.is_finite() {
            return;
        }
        if self.count == 0 {
            (self.min, self.max, self.first, self.last) = (v, v, (t, v), (t, v));
        }
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if t < self.first.0 {
            self.first = (t, v);
        }
        if t >= self.last.0 {
            self.last = (t, v);
        }
        let delta = v - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (v - self.mean);
    }

    /// The figures named in [`FIGURES`], in that order; NaN for all but sum and count
    /// when the window is empty. The standard deviation is the population's.
    pub fn figures(&self) -> [f64; 8] {
        if self.count == 0 {
            let nan = f64::NAN;
            return [nan, nan, nan, 0.0, 0.0, nan, nan, nan];
        }
        [
            self.mean,
            self.min,
            self.max,
            self.sum,
            self.count as f64,
            self.first.1,
            self.last.1,
            (self.m2 / self.count as f64).sqrt(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn bounds(w: Windowing, t: i64) -> Vec<(i64, i64)> {
        w.windows_of(t).map(|b| (b.start, b.end)).collect()
    }

    #[test]
    fn tumbling_windows_align_to_the_clock() {
        let w = Windowing::Tumbling { size_ms: 5 * MIN };
        assert_eq!(bounds(w, 0), vec![(0, 5 * MIN)]);
        assert_eq!(bounds(w, 5 * MIN - 1), vec![(0, 5 * MIN)]);
        assert_eq!(bounds(w, 5 * MIN), vec![(5 * MIN, 10 * MIN)]);
        assert_eq!(bounds(w, -1), vec![(-5 * MIN, 0)]);
    }

    #[test]
    fn hopping_windows_hold_a_reading_size_over_hop_times() {
        let w = Windowing::Hopping {
            size_ms: 5 * MIN,
            hop_ms: MIN,
        };
        let b = bounds(w, 7 * MIN + 30_000);
        assert_eq!(
            b,
            (3..=7)
                .map(|m| (m * MIN, (m + 5) * MIN))
                .collect::<Vec<_>>()
        );
        // A hop longer than the size leaves gaps: readings there are in no window.
        let gappy = Windowing::Hopping {
            size_ms: MIN,
            hop_ms: 5 * MIN,
        };
        assert_eq!(bounds(gappy, 30_000), vec![(0, MIN)]);
        assert!(bounds(gappy, 2 * MIN).is_empty());
        assert!(bounds(Windowing::Sliding { size_ms: MIN }, 5).is_empty());
    }

    #[test]
    fn figures_of_a_window() {
        let mut a = Accumulator::default();
        assert!(
            a.figures()
                .iter()
                .enumerate()
                .all(|(i, f)| f.is_nan() || i == 3 || i == 4)
        );
        for (t, v) in [(3, 22.0), (1, 20.0), (2, 24.0), (3, 18.0)] {
            a.add(t, v);
        }
        let [avg, min, max, sum, count, first, last, stddev] = a.figures();
        assert_eq!((avg, min, max, sum, count), (21.0, 18.0, 24.0, 84.0, 4.0));
        assert_eq!(
            (first, last),
            (20.0, 18.0),
            "by time, ties to the later arrival"
        );
        assert!((stddev - 5.0f64.sqrt()).abs() < 1e-12, "{stddev}");
    }
}
