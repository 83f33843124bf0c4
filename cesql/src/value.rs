//! CESQL's three types, their zero values and the casts between them (section 3.7).

use std::fmt;

use crate::error::{Error, ErrorKind};

/// A CESQL value: the result of an expression, or an attribute's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Bool(bool),
    Integer(i32),
    String(String),
}

/// The type of a [`Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Bool,
    Integer,
    String,
}

impl Type {
    /// The type's zero value: what an operator returns when it fails.
    pub fn zero(self) -> Value {
        match self {
            Type::Bool => Value::Bool(false),
            Type::Integer => Value::Integer(0),
            Type::String => Value::String(String::new()),
        }
    }
}

impl Value {
    pub fn type_of(&self) -> Type {
        match self {
            Value::Bool(_) => Type::Bool,
            Value::Integer(_) => Type::Integer,
            Value::String(_) => Type::String,
        }
    }

    /// The value as `to`, or the zero value of `to` and a cast error.
    pub fn cast(self, to: Type) -> Result<Value, (Value, Error)> {
        match (self, to) {
            (v, t) if v.type_of() == t => Ok(v),
            (Value::Integer(i), Type::String) => Ok(Value::String(i.to_string())),
            (Value::Bool(b), Type::String) => Ok(Value::String(b.to_string())),
            (Value::Integer(i), Type::Bool) => Ok(Value::Bool(i != 0)),
            (Value::Bool(b), Type::Integer) => Ok(Value::Integer(i32::from(b))),
            (Value::String(s), Type::Integer) => {
                parse_integer(&s).map(Value::Integer).ok_or_else(|| {
                    (
                        Value::Integer(0),
                        Error::new(ErrorKind::Cast, format!("{s:?} is not a 32-bit integer")),
                    )
                })
            }
            (Value::String(s), Type::Bool) => match s.to_lowercase().as_str() {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                _ => Err((
                    Value::Bool(false),
                    Error::new(ErrorKind::Cast, format!("{s:?} is not true or false")),
                )),
            },
            (v, _) => unreachable!("every cast pair is listed: {v:?}"),
        }
    }
}

/// A base-10 32-bit integer with an optional leading sign, nothing else.
fn parse_integer(s: &str) -> Option<i32> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::String(s) => write!(f, "{s:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    #[test]
    fn casts_follow_the_table() {
        assert_eq!(Value::Integer(-7).cast(Type::String), Ok(s("-7")));
        assert_eq!(Value::Bool(true).cast(Type::String), Ok(s("true")));
        assert_eq!(Value::Integer(0).cast(Type::Bool), Ok(Value::Bool(false)));
        assert_eq!(Value::Integer(-3).cast(Type::Bool), Ok(Value::Bool(true)));
        assert_eq!(Value::Bool(true).cast(Type::Integer), Ok(Value::Integer(1)));
        assert_eq!(s("+42").cast(Type::Integer), Ok(Value::Integer(42)));
        assert_eq!(
            s("-2147483648").cast(Type::Integer),
            Ok(Value::Integer(i32::MIN))
        );
        assert_eq!(s("TrUe").cast(Type::Bool), Ok(Value::Bool(true)));
        for bad in ["", "+", "1.5", " 1", "2147483648", "0x10", "--1"] {
            let (zero, e) = s(bad).cast(Type::Integer).unwrap_err();
            assert_eq!(
                (zero, e.kind()),
                (Value::Integer(0), ErrorKind::Cast),
                "{bad:?}"
            );
        }
        let (zero, e) = s("yes").cast(Type::Bool).unwrap_err();
        assert_eq!((zero, e.kind()), (Value::Bool(false), ErrorKind::Cast));
    }
}
