//! The built-in functions (section 3.5): dispatch by name and number of arguments,
//! arguments cast to the parameter types, a value of the function's type whatever
//! happens.

use crate::error::{Error, ErrorKind};
use crate::value::{Type, Value};

/// A parameter: a type its argument is cast to, or any value as it is.
#[derive(Clone, Copy)]
pub(crate) enum Param {
    Of(Type),
    Any,
}

/// Errors a function's body raises go here; it returns a value of its type anyway.
pub(crate) type Errors = Vec<Error>;

pub(crate) struct Function {
    pub(crate) name: &'static str,
    params: &'static [Param],
    /// More arguments of this type may follow the fixed ones.
    variadic: Option<Type>,
    pub(crate) returns: Type,
    pub(crate) body: fn(&mut Errors, Vec<Value>) -> Value,
}

impl Function {
    /// What the `k`-th argument is cast to.
    pub(crate) fn param(&self, k: usize) -> Param {
        self.params
            .get(k)
            .copied()
            .unwrap_or(Param::Of(self.variadic.unwrap_or(Type::String)))
    }
}

const S: Param = Param::Of(Type::String);
const I: Param = Param::Of(Type::Integer);
const B: Param = Param::Of(Type::Bool);
const ANY: Param = Param::Any;

const FUNCTIONS: &[Function] = &[
    fixed("LENGTH", &[S], Type::Integer, |_, a| {
        Value::Integer(i32::try_from(string(&a[0]).chars().count()).unwrap_or(i32::MAX))
    }),
    Function {
        name: "CONCAT",
        params: &[],
        variadic: Some(Type::String),
        returns: Type::String,
        body: |_, a| Value::String(a.iter().map(string).collect()),
    },
    Function {
        name: "CONCAT_WS",
        params: &[S],
        variadic: Some(Type::String),
        returns: Type::String,
        body: |_, a| {
            let parts: Vec<&str> = a[1..].iter().map(string).collect();
            Value::String(parts.join(string(&a[0])))
        },
    },
    fixed("LOWER", &[S], Type::String, |_, a| {
        Value::String(string(&a[0]).to_lowercase())
    }),
    fixed("UPPER", &[S], Type::String, |_, a| {
        Value::String(string(&a[0]).to_uppercase())
    }),
    fixed("TRIM", &[S], Type::String, |_, a| {
        Value::String(string(&a[0]).trim().to_owned())
    }),
    fixed("LEFT", &[S, I], Type::String, |ev, a| {
        side(ev, "LEFT", string(&a[0]), integer(&a[1]), true)
    }),
    fixed("RIGHT", &[S, I], Type::String, |ev, a| {
        side(ev, "RIGHT", string(&a[0]), integer(&a[1]), false)
    }),
    fixed("SUBSTRING", &[S, I], Type::String, |ev, a| {
        substring(ev, string(&a[0]), integer(&a[1]), None)
    }),
    fixed("SUBSTRING", &[S, I, I], Type::String, |ev, a| {
        substring(ev, string(&a[0]), integer(&a[1]), Some(integer(&a[2])))
    }),
    fixed("ABS", &[I], Type::Integer, |ev, a| {
        let i = integer(&a[0]);
        Value::Integer(i.checked_abs().unwrap_or_else(|| {
            error(
                ev,
                ErrorKind::Math,
                format!("ABS({i}) is outside the 32-bit range"),
            );
            i32::MAX
        }))
    }),
    // The casts: the argument is cast to the parameter's type on the way in.
    fixed("INT", &[I], Type::Integer, |_, mut a| a.remove(0)),
    fixed("BOOL", &[B], Type::Bool, |_, mut a| a.remove(0)),
    fixed("STRING", &[S], Type::String, |_, mut a| a.remove(0)),
    fixed("IS_INT", &[ANY], Type::Bool, |_, mut a| {
        Value::Bool(a.remove(0).cast(Type::Integer).is_ok())
    }),
    fixed("IS_BOOL", &[ANY], Type::Bool, |_, mut a| {
        Value::Bool(a.remove(0).cast(Type::Bool).is_ok())
    }),
];

const fn fixed(
    name: &'static str,
    params: &'static [Param],
    returns: Type,
    body: fn(&mut Errors, Vec<Value>) -> Value,
) -> Function {
    Function {
        name,
        params,
        variadic: None,
        returns,
        body,
    }
}

/// The function `name` (upper case) with `arity` arguments, if there is one.
pub(crate) fn find(name: &str, arity: usize) -> Option<&'static Function> {
    let mut candidates = FUNCTIONS.iter().filter(|f| f.name == name);
    candidates
        .clone()
        .find(|f| f.params.len() == arity)
        .or_else(|| candidates.find(|f| f.variadic.is_some() && arity >= f.params.len()))
}

/// Whether `name` (upper case) takes `arity` arguments: for checks before evaluation.
pub(crate) fn exists(name: &str, arity: usize) -> bool {
    find(name, arity).is_some()
}

/// Why `name` with `arity` arguments cannot be called.
pub(crate) fn missing(name: &str, arity: usize) -> Error {
    let message = if FUNCTIONS.iter().any(|f| f.name == name) {
        format!("{name} does not take {arity} arguments")
    } else {
        format!("there is no function {name}")
    };
    Error::new(ErrorKind::MissingFunction, message)
}

fn error(errors: &mut Errors, kind: ErrorKind, message: String) {
    errors.push(Error::new(kind, message));
}

fn string(v: &Value) -> &str {
    match v {
        Value::String(s) => s,
        _ => unreachable!("arguments are cast to their parameter types"),
    }
}

fn integer(v: &Value) -> i32 {
    match v {
        Value::Integer(i) => *i,
        _ => unreachable!("arguments are cast to their parameter types"),
    }
}

/// LEFT and RIGHT: the first or last `n` characters.
fn side(ev: &mut Errors, name: &str, s: &str, n: i32, left: bool) -> Value {
    let Ok(n) = usize::try_from(n) else {
        error(
            ev,
            ErrorKind::FunctionEvaluation,
            format!("{name} was given a negative length ({n})"),
        );
        return Value::String(s.to_owned());
    };
    let count = s.chars().count();
    let kept: String = if left {
        s.chars().take(n).collect()
    } else {
        s.chars().skip(count.saturating_sub(n)).collect()
    };
    Value::String(kept)
}

/// SUBSTRING(s, pos[, len]): from the 1-based `pos` (from the end when negative).
fn substring(ev: &mut Errors, s: &str, pos: i32, len: Option<i32>) -> Value {
    let count = i64::try_from(s.chars().count()).unwrap_or(i64::MAX);
    let p = i64::from(pos);
    if p > count || p < -count {
        error(
            ev,
            ErrorKind::FunctionEvaluation,
            format!("SUBSTRING position {pos} is outside a string of {count} characters"),
        );
        return Type::String.zero();
    }
    if len.is_some_and(|l| l < 0) {
        error(
            ev,
            ErrorKind::FunctionEvaluation,
            format!(
                "SUBSTRING was given a negative length ({})",
                len.unwrap_or(0)
            ),
        );
        return Type::String.zero();
    }
    if p == 0 {
        return Type::String.zero();
    }
    let start = if p > 0 { p - 1 } else { count + p };
    let start = usize::try_from(start).unwrap_or(0);
    let take = len.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(0));
    Value::String(s.chars().skip(start).take(take).collect())
}
