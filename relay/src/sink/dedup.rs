//! The deduplication index: which (gateway, producer, sequence) triples are already written.
//!
//! This is Kafka's idempotent producer, adapted: per (gateway, producer id) the relay keeps
//! a `floor` and the sequences at or above it that it has written. A sequence below the
//! floor, or in the set, is a duplicate. The floor rises two ways:
//!
//! * the gateway promises (header `pigeon-settled-below`) never to send anything lower
//!   again, see [`DedupIndex::raise_floor`];
//! * [`DedupIndex::compact`] folds a run of written sequences that starts at the floor into
//!   the floor, so a producer that sends in order costs a few bytes however long it runs.
//!
//! The set above the floor is stored as ranges of consecutive sequences, so a gap (an
//! event the gateway dead-lettered, or one still being retried) costs one range, not one
//! entry per later event.
//!
//! No I/O here: the sink writer calls it, and the checkpoint serializes it.

use std::collections::{BTreeMap, HashMap};

/// The written sequences of one producer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerState {
    /// Every sequence below this is a duplicate.
    floor: u64,
    /// Disjoint ranges of written sequences at or above `floor`: first → last (inclusive).
    ranges: BTreeMap<u64, u64>,
}

impl ProducerState {
    /// Rebuilds a state from its checkpointed parts.
    pub fn from_parts(floor: u64, ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut s = Self {
            floor,
            ranges: BTreeMap::new(),
        };
        for (first, last) in ranges {
            if first <= last {
                s.insert_range(first, last);
            }
        }
        s.compact();
        s
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The ranges (first, last) written at or above the floor.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&f, &l)| (f, l))
    }

    pub fn contains(&self, seq: u64) -> bool {
        seq < self.floor || self.range_containing(seq).is_some()
    }

    fn range_containing(&self, seq: u64) -> Option<(u64, u64)> {
        self.ranges
            .range(..=seq)
            .next_back()
            .map(|(&f, &l)| (f, l))
            .filter(|&(_, l)| seq <= l)
    }

    /// Records `seq` as written. Returns false if it was already (a duplicate).
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        self.insert_range(seq, seq);
        true
    }

    /// Adds `first..=last` (all not yet contained), merging with neighbours.
    fn insert_range(&mut self, first: u64, last: u64) {
        let first = first.max(self.floor);
        if first > last {
            return;
        }
        let mut new_first = first;
        let mut new_last = last;
        // Absorb every range that overlaps or touches [first, last].
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=last.saturating_add(1))
            .rev()
            .take_while(|&(_, &l)| l.saturating_add(1) >= first)
            .map(|(&f, &l)| (f, l))
            .collect();
        for (f, l) in touching {
            self.ranges.remove(&f);
            new_first = new_first.min(f);
            new_last = new_last.max(l);
        }
        self.ranges.insert(new_first, new_last);
    }

    /// Forgets `seq` (undoes an [`insert`](Self::insert) whose write failed).
    pub fn remove(&mut self, seq: u64) {
        let Some((first, last)) = self.range_containing(seq) else {
            return;
        };
        self.ranges.remove(&first);
        if first < seq {
            self.ranges.insert(first, seq - 1);
        }
        if seq < last {
            self.ranges.insert(seq + 1, last);
        }
    }

    /// Raises the floor to `below` (never lowers it) and forgets what is under it.
    /// Returns whether anything changed.
    pub fn raise_floor(&mut self, below: u64) -> bool {
        if below <= self.floor {
            return false;
        }
        self.floor = below;
        let above = self.ranges.split_off(&below);
        let straddling = self
            .ranges
            .last_key_value()
            .map(|(_, &l)| l)
            .filter(|&l| l >= below);
        self.ranges = above;
        if let Some(last) = straddling {
            self.insert_range(below, last);
        }
        self.compact();
        true
    }

    /// Folds a range starting at the floor into the floor.
    pub fn compact(&mut self) {
        if let Some((&first, &last)) = self.ranges.first_key_value()
            && first <= self.floor
            && last < u64::MAX
        {
            self.ranges.remove(&first);
            self.floor = self.floor.max(last + 1);
        }
    }

    /// How many ranges are kept above the floor (a measure of memory use).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }
}

/// The deduplication state of every (gateway, producer) the relay has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupIndex {
    /// gateway id → producer id → state.
    gateways: HashMap<String, HashMap<String, ProducerState>>,
}

impl DedupIndex {
    pub fn new() -> Self {
        Self::default()
    }

    fn state_mut(&mut self, gateway: &str, producer: &str) -> &mut ProducerState {
        // Look up by &str first so the common case allocates nothing.
        if !self.gateways.contains_key(gateway) {
            self.gateways.insert(gateway.to_owned(), HashMap::new());
        }
        let producers = self.gateways.get_mut(gateway).expect("inserted just above");
        if !producers.contains_key(producer) {
            producers.insert(producer.to_owned(), ProducerState::default());
        }
        producers.get_mut(producer).expect("inserted just above")
    }

    pub fn get(&self, gateway: &str, producer: &str) -> Option<&ProducerState> {
        self.gateways.get(gateway)?.get(producer)
    }

    pub fn contains(&self, gateway: &str, producer: &str, seq: u64) -> bool {
        self.get(gateway, producer).is_some_and(|s| s.contains(seq))
    }

    /// Records a sequence as written; false if it already was (a duplicate).
    pub fn insert(&mut self, gateway: &str, producer: &str, seq: u64) -> bool {
        self.state_mut(gateway, producer).insert(seq)
    }

    /// Undoes an insert whose write failed.
    pub fn remove(&mut self, gateway: &str, producer: &str, seq: u64) {
        if let Some(s) = self
            .gateways
            .get_mut(gateway)
            .and_then(|p| p.get_mut(producer))
        {
            s.remove(seq);
        }
    }

    /// Applies a gateway's settled-below promise. Returns whether anything changed.
    pub fn raise_floor(&mut self, gateway: &str, producer: &str, below: u64) -> bool {
        self.state_mut(gateway, producer).raise_floor(below)
    }

    /// Folds runs that start at the floor into the floor, for one producer.
    pub fn compact(&mut self, gateway: &str, producer: &str) {
        if let Some(s) = self
            .gateways
            .get_mut(gateway)
            .and_then(|p| p.get_mut(producer))
        {
            s.compact();
        }
    }

    /// Compacts every producer.
    pub fn compact_all(&mut self) {
        for producers in self.gateways.values_mut() {
            for s in producers.values_mut() {
                s.compact();
            }
        }
    }

    /// Restores one producer's state (from a checkpoint).
    pub fn restore(&mut self, gateway: &str, producer: &str, state: ProducerState) {
        *self.state_mut(gateway, producer) = state;
    }

    /// Every (gateway, producer, state), in a stable order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &ProducerState)> {
        let mut all: Vec<_> = self
            .gateways
            .iter()
            .flat_map(|(g, ps)| ps.iter().map(move |(p, s)| (g.as_str(), p.as_str(), s)))
            .collect();
        all.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        all.into_iter()
    }

    /// How many (gateway, producer) pairs are tracked.
    pub fn producer_count(&self) -> usize {
        self.gateways.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(s: &ProducerState) -> Vec<(u64, u64)> {
        s.ranges().collect()
    }

    #[test]
    fn in_order_sequences_fold_into_the_floor() {
        let mut s = ProducerState::default();
        for seq in 0..1000 {
            assert!(s.insert(seq));
            s.compact();
        }
        assert_eq!(s.floor(), 1000);
        assert_eq!(s.range_count(), 0);
        assert!(s.contains(999));
        assert!(!s.contains(1000));
        assert!(!s.insert(5), "re-sent sequence is a duplicate");
    }

    #[test]
    fn a_gap_costs_one_range_until_settled() {
        let mut s = ProducerState::default();
        s.insert(0);
        // 1 was dead-lettered by the gateway; 2.. arrive.
        for seq in 2..500 {
            s.insert(seq);
        }
        s.compact();
        assert_eq!(s.floor(), 1);
        assert_eq!(ranges(&s), vec![(2, 499)]);
        assert!(!s.contains(1));
        assert!(s.contains(250));
        // The gateway settles everything below 300: the floor jumps over the run.
        assert!(s.raise_floor(300));
        assert_eq!(s.floor(), 500);
        assert_eq!(s.range_count(), 0);
        assert!(
            s.contains(1),
            "below the floor is a duplicate, written or not"
        );
    }

    #[test]
    fn out_of_order_ranges_merge() {
        let mut s = ProducerState::default();
        for seq in [10, 12, 11, 20, 14, 13] {
            assert!(s.insert(seq), "{seq}");
        }
        assert_eq!(ranges(&s), vec![(10, 14), (20, 20)]);
        assert!(!s.insert(12));
        s.remove(12);
        assert_eq!(ranges(&s), vec![(10, 11), (13, 14), (20, 20)]);
        assert!(s.insert(12));
        assert_eq!(ranges(&s), vec![(10, 14), (20, 20)]);
    }

    #[test]
    fn raise_floor_never_lowers_and_prunes() {
        let mut s = ProducerState::default();
        for seq in [5, 6, 7, 40, 41, 90] {
            s.insert(seq);
        }
        assert!(s.raise_floor(41));
        assert_eq!(s.floor(), 42, "41 was written, so the floor moves past it");
        assert_eq!(ranges(&s), vec![(90, 90)]);
        assert!(!s.raise_floor(10));
        assert_eq!(s.floor(), 42);
        assert!(s.contains(6) && s.contains(20) && !s.contains(50));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut s = ProducerState::default();
        assert!(s.insert(u64::MAX));
        assert!(s.insert(u64::MAX - 1));
        assert!(!s.insert(u64::MAX));
        s.raise_floor(u64::MAX - 1);
        s.compact();
        assert!(s.contains(u64::MAX) && s.contains(0));
        s.remove(u64::MAX);
        assert!(!s.contains(u64::MAX));
    }

    #[test]
    fn from_parts_round_trips() {
        let mut s = ProducerState::default();
        for seq in [3, 4, 9, 10, 11, 30] {
            s.insert(seq);
        }
        s.raise_floor(2);
        let back = ProducerState::from_parts(s.floor(), s.ranges());
        assert_eq!(back, s);
    }

    #[test]
    fn index_keeps_gateways_and_producers_apart() {
        let mut idx = DedupIndex::new();
        assert!(idx.insert("pi-1", "p", 1));
        assert!(
            idx.insert("pi-2", "p", 1),
            "same producer id on another gateway"
        );
        assert!(
            idx.insert("pi-1", "q", 1),
            "another producer on the same gateway"
        );
        assert!(!idx.insert("pi-1", "p", 1));
        assert!(idx.contains("pi-1", "p", 1));
        assert!(!idx.contains("pi-3", "p", 1));
        idx.remove("pi-1", "p", 1);
        assert!(!idx.contains("pi-1", "p", 1));
        assert!(idx.raise_floor("pi-1", "p", 100));
        assert!(idx.contains("pi-1", "p", 99));
        assert_eq!(idx.producer_count(), 3);
        let order: Vec<_> = idx.iter().map(|(g, p, _)| (g, p)).collect();
        assert_eq!(order, vec![("pi-1", "p"), ("pi-1", "q"), ("pi-2", "p")]);
    }
}
