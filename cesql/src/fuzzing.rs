//! The fuzz target's harness (fuzz/fuzz_targets/cesql.rs) and the replay of its kept
//! inputs as a test: an expression from anywhere (a rule in a config file) parses or is
//! refused with an error, and a parsed one evaluates totally and deterministically.

use crate::{ErrorKind, Event, Expression, Value};

/// An event with attributes of every type, and strings that cast to the others.
struct Sample;

impl Event for Sample {
    fn attribute(&self, name: &str) -> Option<Value> {
        Some(match name {
            "id" => Value::String("01J0".into()),
            "source" => Value::String("/pigeon/gw1/mqtt".into()),
            "type" => Value::String("io.pigeon.mqtt.reading".into()),
            "specversion" => Value::String("1.0".into()),
            "subject" => Value::String("org/contoso/site/berlin/hvac/t1".into()),
            "sequence" => Value::String("42".into()),
            "flag" => Value::String("TRUE".into()),
            "count" => Value::Integer(i32::MIN),
            "on" => Value::Bool(true),
            _ => return None,
        })
    }
}

/// Parses `data` as an expression; a parsed one is evaluated twice against a sample
/// event. Panics if evaluation differs between the two, if the filter disagrees with
/// the evaluation, or if evaluation reports a parse error.
pub fn expression(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(expr) = Expression::parse(text) else {
        return;
    };
    let first = expr.evaluate(&Sample);
    assert_eq!(first, expr.evaluate(&Sample), "evaluation is deterministic");
    assert_eq!(
        expr.matches(&Sample),
        first.value == Value::Bool(true) && first.errors.is_empty()
    );
    assert!(first.errors.iter().all(|e| e.kind() != ErrorKind::Parse));
    let _ = expr.unknown_functions();
}

#[cfg(test)]
mod tests {
    #[test]
    fn cesql_corpus() {
        pigeon_shared::fuzzing::replay("cesql", super::expression);
    }
}
