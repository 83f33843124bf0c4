//! The CESQL TCK (cesql/tck/*.yaml, copied unchanged from github.com/cloudevents/spec):
//! every case's expression is parsed and evaluated, and its value and error compared
//! with what the case expects. One test per TCK file, so a failure names its file; the
//! failing cases are listed together.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pigeon_cesql::{ErrorKind, Event, Expression, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// An event of the TCK: its attributes by name.
struct TckEvent(HashMap<String, Value>);

impl Event for TckEvent {
    fn attribute(&self, name: &str) -> Option<Value> {
        self.0.get(name).cloned()
    }
}

fn attribute_value(y: &Yaml) -> Value {
    match y {
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => match i32::try_from(*i) {
            Ok(i) => Value::Integer(i),
            Err(_) => Value::String(i.to_string()),
        },
        Yaml::String(s) | Yaml::Real(s) => Value::String(s.clone()),
        other => panic!("an event attribute the TCK runner does not know: {other:?}"),
    }
}

/// The case's event: `event` as given, or a valid event with `eventOverrides` applied.
fn event(case: &Yaml) -> TckEvent {
    let mut attrs: HashMap<String, Value> = [
        ("specversion", "1.0"),
        ("id", "tck-1"),
        ("source", "/pigeon/tck"),
        ("type", "io.pigeon.tck"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
    .collect();
    if let Yaml::Hash(given) = &case["event"] {
        attrs.clear();
        for (k, v) in given {
            attrs.insert(
                k.as_str().expect("attribute names").to_owned(),
                attribute_value(v),
            );
        }
    }
    if let Yaml::Hash(overrides) = &case["eventOverrides"] {
        for (k, v) in overrides {
            attrs.insert(
                k.as_str().expect("attribute names").to_owned(),
                attribute_value(v),
            );
        }
    }
    TckEvent(attrs)
}

fn expected_value(y: &Yaml) -> Option<Value> {
    match y {
        Yaml::BadValue => None,
        Yaml::Boolean(b) => Some(Value::Bool(*b)),
        Yaml::Integer(i) => Some(Value::Integer(i32::try_from(*i).expect("an i32 result"))),
        Yaml::String(s) => Some(Value::String(s.clone())),
        other => panic!("a result the TCK runner does not know: {other:?}"),
    }
}

/// What went wrong with one case, or nothing.
fn check(case: &Yaml) -> Option<String> {
    // YAML reads `expression: TRUE` or `expression: 5` as a boolean or an integer.
    let expression = match &case["expression"] {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("an expression the TCK runner does not know: {other:?}"),
    };
    let expression = expression.as_str();
    let want_error = case["error"].as_str();
    let want_value = expected_value(&case["result"]);
    let parsed = Expression::parse(expression);
    let (value, errors) = match parsed {
        Err(e) => {
            return (want_error != Some(ErrorKind::Parse.tck_name()))
                .then(|| format!("parse error {e}; expected {want_error:?} / {want_value:?}"));
        }
        Ok(expr) => {
            let ev = expr.evaluate(&event(case));
            (ev.value, ev.errors)
        }
    };
    let kinds: Vec<&str> = errors.iter().map(|e| e.kind().tck_name()).collect();
    let error_ok = match want_error {
        None => kinds.is_empty(),
        Some(want) => kinds.first() == Some(&want),
    };
    let value_ok = want_value.as_ref().is_none_or(|w| *w == value);
    (!error_ok || !value_ok).then(|| {
        format!(
            "got {value} with errors {kinds:?}; expected {want_value:?} with error {want_error:?}"
        )
    })
}

fn run(file: &str) {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tck").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = YamlLoader::load_from_str(&text).expect("the TCK file is YAML");
    let suite = &docs[0];
    let cases = suite["tests"].as_vec().expect("a tests list");
    assert!(!cases.is_empty(), "{file} has no cases");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            check(case).map(|why| {
                format!(
                    "  {} — {}: {why}",
                    case["name"].as_str().unwrap_or("?"),
                    case["expression"]
                        .as_str()
                        .map_or_else(|| format!("{:?}", case["expression"]), str::to_owned)
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{file}: {} of {} cases fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

macro_rules! tck {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(concat!(stringify!($name), ".yaml"));
            }
        )*

        #[test]
        fn every_tck_file_is_run() {
            let mut files: Vec<String> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tck"))
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".yaml"))
                .collect();
            files.sort();
            let mut run: Vec<String> = vec![$(concat!(stringify!($name), ".yaml").to_owned()),*];
            run.sort();
            assert_eq!(files, run);
        }
    };
}

tck!(
    binary_comparison_operators,
    binary_logical_operators,
    binary_math_operators,
    casting_functions,
    context_attributes_access,
    integer_builtin_functions,
    like_expression,
    literals,
    negate_operator,
    not_operator,
    spec_examples,
    string_builtin_functions,
    sub_expression,
    subscriptions_api_recreations,
);
