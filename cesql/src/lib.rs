//! The CloudEvents SQL Expression Language (CESQL 1.0): parse an expression once,
//! evaluate it against many events.
//!
//! ```
//! use pigeon_cesql::{Event, Expression, Value};
//!
//! struct Reading;
//! impl Event for Reading {
//!     fn attribute(&self, name: &str) -> Option<Value> {
//!         (name == "subject").then(|| Value::String("org/contoso/site/berlin/hvac/t1".into()))
//!     }
//! }
//!
//! let filter = Expression::parse("subject LIKE 'org/contoso/site/berlin/%/t_'").unwrap();
//! assert!(filter.matches(&Reading));
//! ```
//!
//! * Evaluation is in the specification's complete mode: an [`Evaluation`] has the
//!   value and every error that arose; [`Expression::matches`] is the filter the
//!   specification defines (true, and no error).
//! * Every operator and function is total: no input panics, nesting is bounded, LIKE
//!   matching is polynomial, integers never wrap silently (a math error instead).
//! * The specification's TCK (`cesql/tck/`, from github.com/cloudevents/spec, 244
//!   cases) runs in `tests/tck.rs`, every case passing.

mod error;
mod eval;
mod functions;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod lexer;
mod like;
mod parser;
mod value;

pub use error::{Error, ErrorKind};
pub use eval::Event;
pub use value::{Type, Value};

use parser::Expr;

/// A parsed CESQL expression.
#[derive(Debug, Clone)]
pub struct Expression {
    text: String,
    expr: Expr,
}

/// The outcome of evaluating an expression: its value, and the errors that arose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub value: Value,
    pub errors: Vec<Error>,
}

impl Expression {
    /// Parses `text`, or says what is wrong with it and where (a parse error).
    pub fn parse(text: &str) -> Result<Expression, Error> {
        Ok(Expression {
            text: text.to_owned(),
            expr: parser::parse(text)?,
        })
    }

    /// The expression as it was written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Evaluates the expression against `event` (complete mode: every error is kept).
    pub fn evaluate(&self, event: &dyn Event) -> Evaluation {
        let mut ev = eval::Evaluator::new(event);
        let value = ev.value(&self.expr);
        Evaluation {
            value,
            errors: ev.errors,
        }
    }

    /// The filter of the specification (section 1.2): the value is `true` and no error
    /// arose.
    pub fn matches(&self, event: &dyn Event) -> bool {
        let e = self.evaluate(event);
        e.value == Value::Bool(true) && e.errors.is_empty()
    }

    /// The functions the expression calls that do not exist (or not with that many
    /// arguments), as `NAME/arity`: evaluating such a call always fails, so a
    /// configuration check can refuse it up front.
    pub fn unknown_functions(&self) -> Vec<String> {
        let mut unknown = Vec::new();
        walk(&self.expr, &mut |e| {
            if let Expr::Call { name, args } = e
                && !functions::exists(name, args.len())
            {
                unknown.push(format!("{name}/{}", args.len()));
            }
        });
        unknown
    }
}

impl Expression {
    /// The attributes the expression reads (`subject`, `type`, an extension…), each
    /// once, in order of first use. A caller may cache the result of an expression that
    /// reads only attributes that do not change between the events it caches over.
    pub fn attributes(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        walk(&self.expr, &mut |e| {
            if let Expr::Attribute(name) | Expr::Exists(name) = e
                && !names.contains(name)
            {
                names.push(name.clone());
            }
        });
        names
    }
}

fn walk(e: &Expr, visit: &mut impl FnMut(&Expr)) {
    visit(e);
    match e {
        Expr::Literal(_) | Expr::Attribute(_) | Expr::Exists(_) => {}
        Expr::Not(x) | Expr::Negate(x) => walk(x, visit),
        Expr::Binary(_, l, r) => {
            walk(l, visit);
            walk(r, visit);
        }
        Expr::Like { value, .. } => walk(value, visit),
        Expr::In { value, set, .. } => {
            walk(value, visit);
            set.iter().for_each(|x| walk(x, visit));
        }
        Expr::Call { args, .. } => args.iter().for_each(|x| walk(x, visit)),
    }
}

impl std::fmt::Display for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Attrs(HashMap<&'static str, Value>);

    impl Event for Attrs {
        fn attribute(&self, name: &str) -> Option<Value> {
            self.0.get(name).cloned()
        }
    }

    fn reading(subject: &str) -> Attrs {
        Attrs(HashMap::from([
            ("id", Value::String("1".into())),
            ("type", Value::String("io.pigeon.mqtt.reading".into())),
            ("subject", Value::String(subject.into())),
            ("sequence", Value::String("42".into())),
        ]))
    }

    #[test]
    fn the_attributes_an_expression_reads() {
        let e = Expression::parse(
            "subject LIKE 'a/%' AND (EXISTS room OR type IN ('x', subject)) AND LENGTH(source) > 1",
        )
        .unwrap();
        assert_eq!(e.attributes(), ["subject", "room", "type", "source"]);
        assert!(Expression::parse("TRUE").unwrap().attributes().is_empty());
    }

    #[test]
    fn a_subject_filter_selects_a_hierarchy() {
        let f = Expression::parse(
            "subject LIKE 'org/contoso/site/berlin/%/hvac/%' AND type = 'io.pigeon.mqtt.reading'",
        )
        .unwrap();
        assert!(f.matches(&reading("org/contoso/site/berlin/building/41/hvac/t1")));
        assert!(!f.matches(&reading("org/contoso/site/paris/building/41/hvac/t1")));
        // A string attribute compared with an integer is cast to one.
        let f = Expression::parse("sequence > 40 AND sequence % 2 = 0").unwrap();
        assert!(f.matches(&reading("x")));
    }

    #[test]
    fn the_filter_fails_on_any_error_or_a_non_boolean() {
        let e = Expression::parse("missing = 'x' OR subject = 'x'").unwrap();
        let out = e.evaluate(&reading("x"));
        assert_eq!(out.value, Value::Bool(false));
        assert_eq!(out.errors[0].kind(), ErrorKind::MissingAttribute);
        assert!(
            out.errors[0].to_string().contains("\"missing\""),
            "{}",
            out.errors[0]
        );
        assert!(!e.matches(&reading("x")));
        assert!(
            !Expression::parse("LENGTH(subject)")
                .unwrap()
                .matches(&reading("x"))
        );
        assert!(
            !Expression::parse("subject / 0 = 0")
                .unwrap()
                .matches(&reading("1"))
        );
    }

    #[test]
    fn parse_errors_say_what_and_where() {
        let cases = [
            ("", "empty"),
            ("subject =", "expected a value, but the expression ends"),
            ("(a = 1", "expected ), but the expression ends"),
            (
                "a = 1 b",
                "expected the end of the expression at column 7, found \"b\"",
            ),
            ("a LIKE b", "a string literal as the LIKE pattern"),
            ("a IN ()", "the set after IN is empty"),
            ("2147483648", "outside the 32-bit range"),
            ("my_attr = 1", "not an attribute name"),
            ("EXISTS 'x'", "an attribute name after EXISTS"),
            ("a = 'b", "not closed"),
        ];
        for (text, want) in cases {
            let e = Expression::parse(text).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Parse, "{text}");
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
        assert_eq!(
            Expression::parse("-2147483648")
                .unwrap()
                .evaluate(&reading(""))
                .value,
            Value::Integer(i32::MIN)
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        let e = Expression::parse(&deep).unwrap_err();
        assert!(e.to_string().contains("deeper than"), "{e}");
        let nots = format!("{}TRUE", "NOT ".repeat(10_000));
        assert!(Expression::parse(&nots).is_err());
        let ok = format!("{}1{}", "(".repeat(50), ")".repeat(50));
        assert_eq!(
            Expression::parse(&ok).unwrap().evaluate(&reading("")).value,
            Value::Integer(1)
        );
    }

    #[test]
    fn unknown_functions_are_found_before_evaluation() {
        let e = Expression::parse("lower(subject) = 'a' AND NOPE(1) OR SUBSTRING('a')").unwrap();
        assert_eq!(e.unknown_functions(), vec!["NOPE/1", "SUBSTRING/1"]);
        let out = e.evaluate(&reading("A"));
        assert_eq!(out.errors[0].kind(), ErrorKind::MissingFunction);
        assert!(
            Expression::parse("CONCAT() = ''")
                .unwrap()
                .unknown_functions()
                .is_empty()
        );
    }
}
