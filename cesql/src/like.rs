//! LIKE patterns: `%` any run of characters, `_` one character, `\%` `\_` `\\` themselves,
//! everything else itself (case-sensitive). Matched in O(pattern × value) time, never
//! exponentially, whatever the pattern.

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

    pub(crate) fn matches(&self, value: &str) -> bool {
        let value: Vec<char> = value.chars().collect();
        // reachable[j]: the pieces so far can match value[..j].
        let mut reachable = vec![false; value.len() + 1];
        reachable[0] = true;
        for piece in &self.pieces {
            let mut next = vec![false; value.len() + 1];
            match piece {
                Piece::Any => {
                    let mut seen = false;
                    for j in 0..=value.len() {
                        seen |= reachable[j];
                        next[j] = seen;
                    }
                }
                Piece::One => next[1..].copy_from_slice(&reachable[..value.len()]),
                Piece::Char(c) => {
                    for j in 0..value.len() {
                        next[j + 1] = reachable[j] && value[j] == *c;
                    }
                }
            }
            reachable = next;
            if !reachable.contains(&true) {
                return false;
            }
        }
        reachable[value.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::Pattern;

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

    #[test]
    fn many_wildcards_stay_polynomial() {
        let p = Pattern::new(&"%a".repeat(200));
        let v = "a".repeat(199) + "b";
        assert!(!p.matches(&v));
    }
}
