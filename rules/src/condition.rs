//! Conditions on numbers: a rule's `when = "abs(avg - 21.0) > 2"`.
//!
//! CESQL (the `filter`) has integers only, and a window's average does not; this is the
//! small language of the numeric side: decimal numbers, the variables a rule kind
//! offers (`avg`, `min`, `max`, `sum`, `count`, `first`, `last`, `stddev`, `value`),
//! `+ - * /`, comparisons (`= != <> < <= > >=`), `AND OR NOT` (any case), parentheses
//! and the functions `abs`, `min`, `max`. Parsed once at config time, with errors that
//! name the column; evaluated without allocating.

use std::fmt;

/// A parse error: what is wrong and the 1-based column where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConditionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl std::error::Error for ConditionError {}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Number(f64),
    Var(usize),
    Neg(Box<Node>),
    Not(Box<Node>),
    Arith(char, Box<Node>, Box<Node>),
    Compare(Cmp, Box<Node>, Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Abs(Box<Node>),
    Min(Box<Node>, Box<Node>),
    Max(Box<Node>, Box<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A parsed condition over named numeric variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    text: String,
    root: Node,
    /// The variables it may use, in the order [`Condition::holds`] takes their values.
    variables: Vec<&'static str>,
}

impl Condition {
    /// Parses `text`, whose variables must be among `variables`.
    pub fn parse(text: &str, variables: &[&'static str]) -> Result<Condition, ConditionError> {
        let mut p = Parser {
            text,
            pos: 0,
            variables,
            depth: 0,
        };
        let root = p.or()?;
        p.skip_space();
        if p.pos < text.len() {
            return Err(p.error("unexpected text after the condition"));
        }
        if !root.is_boolean() {
            return Err(ConditionError {
                column: 1,
                message: "the condition is a number, not a comparison (add e.g. `> 2`)".into(),
            });
        }
        Ok(Condition {
            text: text.to_owned(),
            root,
            variables: variables.to_vec(),
        })
    }

    /// Whether the condition holds for these values of its variables (in the order they
    /// were given to [`Condition::parse`]). A comparison with NaN is false.
    pub fn holds(&self, values: &[f64]) -> bool {
        debug_assert_eq!(values.len(), self.variables.len());
        truth(&self.root, values)
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

impl Node {
    fn is_boolean(&self) -> bool {
        matches!(
            self,
            Node::Not(_) | Node::Compare(..) | Node::And(..) | Node::Or(..)
        )
    }
}

fn number(n: &Node, v: &[f64]) -> f64 {
    match n {
        Node::Number(x) => *x,
        Node::Var(i) => v[*i],
        Node::Neg(a) => -number(a, v),
        Node::Arith(op, a, b) => {
            let (a, b) = (number(a, v), number(b, v));
            match op {
                '+' => a + b,
                '-' => a - b,
                '*' => a * b,
                _ => a / b,
            }
        }
        Node::Abs(a) => number(a, v).abs(),
        Node::Min(a, b) => number(a, v).min(number(b, v)),
        Node::Max(a, b) => number(a, v).max(number(b, v)),
        // Booleans are never operands of arithmetic (the parser refuses it).
        _ => f64::NAN,
    }
}

fn truth(n: &Node, v: &[f64]) -> bool {
    match n {
        Node::Not(a) => !truth(a, v),
        Node::And(a, b) => truth(a, v) && truth(b, v),
        Node::Or(a, b) => truth(a, v) || truth(b, v),
        Node::Compare(c, a, b) => {
            let (a, b) = (number(a, v), number(b, v));
            match c {
                Cmp::Eq => a == b,
                Cmp::Ne => a != b && !a.is_nan() && !b.is_nan(),
                Cmp::Lt => a < b,
                Cmp::Le => a <= b,
                Cmp::Gt => a > b,
                Cmp::Ge => a >= b,
            }
        }
        _ => false,
    }
}

const MAX_DEPTH: usize = 100;

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    variables: &'a [&'static str],
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, message: impl Into<String>) -> ConditionError {
        ConditionError {
            column: self.text[..self.pos].chars().count() + 1,
            message: message.into(),
        }
    }

    fn skip_space(&mut self) {
        let rest = &self.text[self.pos..];
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    /// Consumes `word` (a keyword, any case) if it is next and not part of a longer word.
    fn keyword(&mut self, word: &str) -> bool {
        self.skip_space();
        let rest = self.rest();
        let matches = rest.len() >= word.len()
            && rest[..word.len()].eq_ignore_ascii_case(word)
            && !rest[word.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        if matches {
            self.pos += word.len();
        }
        matches
    }

    fn symbol(&mut self, s: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn nest(&mut self) -> Result<(), ConditionError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn boolean(&self, n: Node, at: usize, what: &str) -> Result<Node, ConditionError> {
        if n.is_boolean() {
            Ok(n)
        } else {
            Err(ConditionError {
                column: self.text[..at].chars().count() + 1,
                message: format!("{what} needs a comparison here, not a number"),
            })
        }
    }

    fn numeric(&self, n: Node, at: usize) -> Result<Node, ConditionError> {
        if n.is_boolean() {
            Err(ConditionError {
                column: self.text[..at].chars().count() + 1,
                message: "a comparison where a number is needed".into(),
            })
        } else {
            Ok(n)
        }
    }

    fn or(&mut self) -> Result<Node, ConditionError> {
        self.nest()?;
        let n = self.logic("OR", Self::and, Node::Or)?;
        self.depth -= 1;
        Ok(n)
    }

    fn and(&mut self) -> Result<Node, ConditionError> {
        self.logic("AND", Self::not, Node::And)
    }

    /// `operand (KEYWORD operand)*` for AND or OR, both sides comparisons.
    fn logic(
        &mut self,
        keyword: &str,
        operand: fn(&mut Self) -> Result<Node, ConditionError>,
        node: fn(Box<Node>, Box<Node>) -> Node,
    ) -> Result<Node, ConditionError> {
        self.skip_space();
        let at = self.pos;
        let mut left = operand(self)?;
        while self.keyword(keyword) {
            left = self.boolean(left, at, keyword)?;
            self.skip_space();
            let at_r = self.pos;
            let right = operand(self)?;
            left = node(
                Box::new(left),
                Box::new(self.boolean(right, at_r, keyword)?),
            );
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Node, ConditionError> {
        if self.keyword("not") {
            self.nest()?;
            self.skip_space();
            let at = self.pos;
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Node::Not(Box::new(self.boolean(inner, at, "NOT")?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Node, ConditionError> {
        self.skip_space();
        let at = self.pos;
        let left = self.sum()?;
        let op = [
            ("<=", Cmp::Le),
            (">=", Cmp::Ge),
            ("<>", Cmp::Ne),
            ("!=", Cmp::Ne),
            ("<", Cmp::Lt),
            (">", Cmp::Gt),
            ("=", Cmp::Eq),
        ]
        .into_iter()
        .find(|(s, _)| self.symbol(s));
        let Some((_, op)) = op else {
            return Ok(left);
        };
        let left = self.numeric(left, at)?;
        self.skip_space();
        let at_r = self.pos;
        let right = self.sum()?;
        let right = self.numeric(right, at_r)?;
        Ok(Node::Compare(op, Box::new(left), Box::new(right)))
    }

    fn sum(&mut self) -> Result<Node, ConditionError> {
        self.arithmetic(['+', '-'], Self::product)
    }

    fn product(&mut self) -> Result<Node, ConditionError> {
        self.arithmetic(['*', '/'], Self::unary)
    }

    /// `operand (op operand)*` for one level of arithmetic, refusing comparisons as
    /// operands once an operator is seen.
    fn arithmetic(
        &mut self,
        ops: [char; 2],
        operand: fn(&mut Self) -> Result<Node, ConditionError>,
    ) -> Result<Node, ConditionError> {
        self.skip_space();
        let at = self.pos;
        let mut left = operand(self)?;
        loop {
            self.skip_space();
            let Some(op) = ops.into_iter().find(|&c| self.rest().starts_with(c)) else {
                return Ok(left);
            };
            left = self.numeric(left, at)?;
            self.pos += 1;
            self.skip_space();
            let at_r = self.pos;
            let right = operand(self)?;
            let right = self.numeric(right, at_r)?;
            left = Node::Arith(op, Box::new(left), Box::new(right));
        }
    }

    fn unary(&mut self) -> Result<Node, ConditionError> {
        if self.symbol("-") {
            self.nest()?;
            self.skip_space();
            let at = self.pos;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Node::Neg(Box::new(self.numeric(inner, at)?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Node, ConditionError> {
        self.skip_space();
        let at = self.pos;
        if self.symbol("(") {
            let inner = self.or()?;
            if !self.symbol(")") {
                return Err(self.error("expected )"));
            }
            return Ok(inner);
        }
        let rest = self.rest();
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len > 0 {
            let text = &rest[..num_len];
            let n: f64 = text
                .parse()
                .map_err(|_| self.error(format!("{text:?} is not a number")))?;
            self.pos += num_len;
            return Ok(Node::Number(n));
        }
        let word_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if word_len == 0 {
            return Err(match rest.chars().next() {
                Some(c) => self.error(format!("unexpected {c:?}")),
                None => self.error("the condition ends where a value is needed"),
            });
        }
        let word = rest[..word_len].to_ascii_lowercase();
        self.pos += word_len;
        if self.symbol("(") {
            return self.call(&word, at);
        }
        match self.variables.iter().position(|v| *v == word) {
            Some(i) => Ok(Node::Var(i)),
            None => Err(ConditionError {
                column: self.text[..at].chars().count() + 1,
                message: format!(
                    "unknown name {word:?}; this rule offers {}",
                    self.variables.join(", ")
                ),
            }),
        }
    }

    fn call(&mut self, name: &str, at: usize) -> Result<Node, ConditionError> {
        let mut args = Vec::new();
        loop {
            self.skip_space();
            let arg_at = self.pos;
            let arg = self.sum()?;
            args.push(self.numeric(arg, arg_at)?);
            if self.symbol(")") {
                break;
            }
            if !self.symbol(",") {
                return Err(self.error("expected , or )"));
            }
        }
        let wrong = |n: usize| ConditionError {
            column: self.text[..at].chars().count() + 1,
            message: format!("{name}() takes {n} argument(s)"),
        };
        let mut args = args.into_iter().map(Box::new);
        let count = args.len();
        Ok(match (name, count) {
            ("abs", 1) => Node::Abs(args.next().expect("one")),
            ("min", 2) => Node::Min(args.next().expect("two"), args.next().expect("two")),
            ("max", 2) => Node::Max(args.next().expect("two"), args.next().expect("two")),
            ("abs", _) => return Err(wrong(1)),
            ("min" | "max", _) => return Err(wrong(2)),
            _ => {
                return Err(ConditionError {
                    column: self.text[..at].chars().count() + 1,
                    message: format!("unknown function {name}(); there are abs, min and max"),
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: &[&str] = &["avg", "min", "max", "count"];

    fn holds(text: &str, avg: f64, min: f64, max: f64, count: f64) -> bool {
        Condition::parse(text, WINDOW)
            .unwrap()
            .holds(&[avg, min, max, count])
    }

    #[test]
    fn the_hvac_drift_condition() {
        let c = "abs(avg - 21.0) > 2";
        assert!(holds(c, 23.5, 0.0, 0.0, 1.0));
        assert!(holds(c, 18.9, 0.0, 0.0, 1.0));
        assert!(!holds(c, 22.9, 0.0, 0.0, 1.0));
        assert!(!holds(c, 21.0, 0.0, 0.0, 1.0));
    }

    #[test]
    fn precedence_logic_and_functions() {
        assert!(holds(
            "1 + 2 * 3 = 7 AND NOT (count < 3)",
            0.0,
            0.0,
            0.0,
            3.0
        ));
        assert!(holds("max - min >= 5 or avg > 100", 0.0, 1.0, 6.0, 0.0));
        assert!(holds(
            "-min = 2 and max(avg, 3) = 3 and min(1, 2) = 1",
            1.0,
            -2.0,
            0.0,
            0.0
        ));
        assert!(holds("avg / 2 > 1.25 AND avg <> 3", 2.6, 0.0, 0.0, 0.0));
        // NaN (an empty window's average) makes every comparison false.
        assert!(!holds("avg != 1", f64::NAN, 0.0, 0.0, 0.0));
        assert!(!holds("avg = avg", f64::NAN, 0.0, 0.0, 0.0));
    }

    #[test]
    fn errors_name_the_column() {
        let err = |t: &str| Condition::parse(t, WINDOW).unwrap_err();
        let e = err("abs(avgg - 21) > 2");
        assert_eq!(e.column, 5);
        assert!(e.message.contains("unknown name \"avgg\"") && e.message.contains("avg, min"));
        assert_eq!(err("avg > ").column, 7);
        assert_eq!(err("avg > 2 )").column, 9);
        assert!(err("avg + 1").message.contains("not a comparison"));
        assert!(
            err("avg > 1 and 2")
                .message
                .contains("AND needs a comparison")
        );
        assert!(
            err("(avg > 1) + 2 > 1")
                .message
                .contains("a comparison where a number")
        );
        assert!(
            err("sqrt(avg) > 1")
                .message
                .contains("unknown function sqrt()")
        );
        assert!(err("abs(1, 2) > 1").message.contains("takes 1"));
        assert!(err("1.2.3 > 1").message.contains("not a number"));
        assert!(
            err(&format!("{}1{} > 0", "(".repeat(500), ")".repeat(500)))
                .message
                .contains("deeper")
        );
        assert_eq!(err("ünï > 1").column, 1);
    }
}
