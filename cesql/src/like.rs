//! LIKE patterns: `%` any run of characters, `_` one character, `\%` `\_` `\\` themselves,
//! everything else itself (case-sensitive). Matched without allocating, in O(pattern ×
//! value) time at worst, never exponentially, whatever the pattern.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Char(char),
    One,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    pieces: Vec<Piece>,
}

impl Pattern {
    pub(crate) fn new(text: &str) -> Pattern {
        let mut pieces = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            let piece = match c {
                '\\' => match chars.peek() {
                    Some(&n @ ('%' | '_' | '\\')) => {
                        chars.next();
                        Piece::Char(n)
                    }
                    _ => Piece::Char('\\'),
                },
                '%' => {
                    if pieces.last() == Some(&Piece::Any) {
                        continue;
                    }
                    Piece::Any
                }
                '_' => Piece::One,
                c => Piece::Char(c),
            };
            pieces.push(piece);
        }
        Pattern { pieces }
    }

    /// Whether `value` matches, with no allocation. Greedy, remembering the last `%`:
    /// on a mismatch the run after that `%` starts one character later. That is
    /// O(pattern × value) at worst, and linear for the usual `prefix/%/suffix` shapes.
    pub(crate) fn matches(&self, value: &str) -> bool {
        let pieces = &self.pieces;
        let (mut p, mut i) = (0, 0);
        // The last `%` seen, and where in `value` its run started.
        let mut star: Option<(usize, usize)> = None;
        while i < value.len() {
            let here = value[i..].chars().next().map_or(1, char::len_utf8);
            match pieces.get(p) {
                Some(Piece::Char(c)) if value[i..].starts_with(*c) => {
                    p += 1;
                    i += here;
                }
                Some(Piece::One) => {
                    p += 1;
                    i += here;
                }
                Some(Piece::Any) => {
                    star = Some((p, i));
                    p += 1;
                }
                _ => match star {
                    Some((sp, si)) => {
                        // The `%` takes one more character.
                        let step = value[si..].chars().next().map_or(1, char::len_utf8);
                        star = Some((sp, si + step));
                        p = sp + 1;
                        i = si + step;
                    }
                    None => return false,
                },
            }
        }
        pieces[p..].iter().all(|piece| *piece == Piece::Any)
    }
}

#[cfg(test)]
mod tests {
    use super::{Pattern, Piece};

    #[test]
    fn wildcards_escapes_and_case() {
        let m = |p: &str, v: &str| Pattern::new(p).matches(v);
        assert!(m("_b%", "ab") && m("_b%", "abcd1") && !m("_b%", "b") && !m("_b%", "acd"));
        assert!(!m("_b%", "aBc"));
        assert!(m(r"abc\%", "abc%") && !m(r"abc\%", "abcd"));
        assert!(m(r"a\_c", "a_c") && !m(r"a\_c", "abc"));
        assert!(m(r"a\\%", r"a\xyz") && m(r"a\b", r"a\b"));
        assert!(m("%", "") && m("", "") && !m("", "a") && !m("_", ""));
        assert!(m("org/%/hvac/%", "org/site1/hvac/t1"));
        assert!(m("%☃_", "snow☃man☃!"));
    }

    /// The matcher against the plain dynamic program over (pieces, characters).
    #[test]
    fn the_greedy_matcher_agrees_with_the_dynamic_program() {
        fn dp(p: &Pattern, value: &str) -> bool {
            let v: Vec<char> = value.chars().collect();
            let mut reachable = vec![false; v.len() + 1];
            reachable[0] = true;
            for piece in &p.pieces {
                let mut next = vec![false; v.len() + 1];
                for j in 0..=v.len() {
                    next[j] = match piece {
                        Piece::Any => reachable[..=j].contains(&true),
                        Piece::One => j > 0 && reachable[j - 1],
                        Piece::Char(c) => j > 0 && reachable[j - 1] && v[j - 1] == *c,
                    };
                }
                reachable = next;
            }
            reachable[v.len()]
        }
        let alphabet = ['a', 'b', '☃', '%', '_'];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let word = |n: u64, r: &mut dyn FnMut() -> u64, with_wild: bool| -> String {
                (0..n)
                    .map(|_| alphabet[(r() % if with_wild { 5 } else { 3 }) as usize])
                    .collect()
            };
            let pattern = word(next() % 7, &mut next, true);
            let value = word(next() % 8, &mut next, false);
            let p = Pattern::new(&pattern);
            assert_eq!(
                p.matches(&value),
                dp(&p, &value),
                "{pattern:?} on {value:?}"
            );
        }
    }

    #[test]
    fn many_wildcards_stay_polynomial() {
        let p = Pattern::new(&"%a".repeat(200));
        let v = "a".repeat(199) + "b";
        assert!(!p.matches(&v));
    }
}
