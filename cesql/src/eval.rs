//! Evaluation in complete mode (section 4.1): every operator returns a value of its type,
//! and what went wrong is collected in the error list.
//!
//! An operator whose operand raised an error returns the zero value of its own type
//! and evaluates nothing more (section 3.3): `1 / missing` is `0` with a
//! missing-attribute error and no math error (section 3.2), `1 != 1 / 0` is `false`
//! with a math error. A failed cast is such an error too. At the top, the expression's
//! value is its outermost node's, errors or not (`ABS(-2147483648)` is `2147483647`
//! with a math error).

use crate::error::{Error, ErrorKind};
use crate::functions::{self, Param};
use crate::parser::{BinOp, Expr};
use crate::value::{Type, Value};

/// What an expression reads from: an event's context attributes and extensions.
pub trait Event {
    /// The value of the attribute or extension `name`, `None` if the event has none.
    /// Attributes that are not booleans or 32-bit integers are strings.
    fn attribute(&self, name: &str) -> Option<Value>;
}

pub(crate) struct Evaluator<'a> {
    event: &'a dyn Event,
    pub(crate) errors: Vec<Error>,
}

/// An operand's outcome: its value, or `None` when it raised an error (in the list).
type Operand = Option<Value>;

impl<'a> Evaluator<'a> {
    pub(crate) fn new(event: &'a dyn Event) -> Self {
        Evaluator {
            event,
            errors: Vec::new(),
        }
    }

    /// The value of `e`, with whatever errors it raised in the list.
    pub(crate) fn value(&mut self, e: &Expr) -> Value {
        match e {
            Expr::Literal(v) => v.clone(),
            Expr::Attribute(name) => match self.event.attribute(name) {
                Some(v) => v,
                None => {
                    self.errors.push(Error::new(
                        ErrorKind::MissingAttribute,
                        format!("the event has no attribute {name:?}"),
                    ));
                    // The type of a bare attribute is unknown: Boolean (section 3.2).
                    Type::Bool.zero()
                }
            },
            Expr::Exists(name) => Value::Bool(self.event.attribute(name).is_some()),
            Expr::Not(x) => match self.operand(x, Type::Bool) {
                Some(Value::Bool(b)) => Value::Bool(!b),
                _ => Type::Bool.zero(),
            },
            Expr::Negate(x) => match self.operand(x, Type::Integer) {
                Some(Value::Integer(i)) => self.math(i.checked_neg(), || {
                    format!("-({i}) is outside the 32-bit range")
                }),
                _ => Type::Integer.zero(),
            },
            Expr::Binary(op, l, r) => self.binary(*op, l, r),
            Expr::Like {
                value,
                pattern,
                negated,
            } => match self.operand(value, Type::String) {
                Some(Value::String(s)) => Value::Bool(pattern.matches(&s) != *negated),
                _ => Type::Bool.zero(),
            },
            Expr::In {
                value,
                set,
                negated,
            } => self.is_in(value, set, *negated),
            Expr::Call { name, args } => self.call(name, args),
        }
    }

    /// `e` evaluated and cast to `to`; `None` if either raised an error.
    pub(crate) fn operand(&mut self, e: &Expr, to: Type) -> Operand {
        let v = self.any(e)?;
        self.cast(v, to)
    }

    /// `e` evaluated, uncast; `None` if it raised an error.
    pub(crate) fn any(&mut self, e: &Expr) -> Operand {
        let before = self.errors.len();
        let v = self.value(e);
        (self.errors.len() == before).then_some(v)
    }

    pub(crate) fn cast(&mut self, v: Value, to: Type) -> Operand {
        match v.cast(to) {
            Ok(v) => Some(v),
            Err((_, e)) => {
                self.errors.push(e);
                None
            }
        }
    }

    pub(crate) fn error(&mut self, kind: ErrorKind, message: String) {
        self.errors.push(Error::new(kind, message));
    }

    fn math(&mut self, r: Option<i32>, what: impl FnOnce() -> String) -> Value {
        match r {
            Some(i) => Value::Integer(i),
            None => {
                self.error(ErrorKind::Math, what());
                Type::Integer.zero()
            }
        }
    }

    fn binary(&mut self, op: BinOp, l: &Expr, r: &Expr) -> Value {
        match op {
            BinOp::And | BinOp::Or => {
                let Some(Value::Bool(left)) = self.operand(l, Type::Bool) else {
                    return Type::Bool.zero();
                };
                // Short-circuit: the right side is not evaluated (section 3.4.2).
                if left == (op == BinOp::Or) {
                    return Value::Bool(left);
                }
                match self.operand(r, Type::Bool) {
                    Some(v) => v,
                    None => Type::Bool.zero(),
                }
            }
            BinOp::Xor => match (self.operand(l, Type::Bool), self.operand(r, Type::Bool)) {
                (Some(Value::Bool(a)), Some(Value::Bool(b))) => Value::Bool(a != b),
                _ => Type::Bool.zero(),
            },
            BinOp::Eq | BinOp::NotEq => {
                // Ambiguous: the right operand's type decides (section 3.7).
                let (left, right) = (self.any(l), self.any(r));
                let (Some(left), Some(right)) = (left, right) else {
                    return Type::Bool.zero();
                };
                match self.cast(left, right.type_of()) {
                    Some(left) => Value::Bool((left == right) == (op == BinOp::Eq)),
                    None => Type::Bool.zero(),
                }
            }
            _ => {
                let (left, right) = (
                    self.operand(l, Type::Integer),
                    self.operand(r, Type::Integer),
                );
                let (Some(Value::Integer(a)), Some(Value::Integer(b))) = (left, right) else {
                    return match op {
                        BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq => Type::Bool.zero(),
                        _ => Type::Integer.zero(),
                    };
                };
                self.integer(op, a, b)
            }
        }
    }

    fn integer(&mut self, op: BinOp, a: i32, b: i32) -> Value {
        let overflow = || format!("{a} {} {b} is outside the 32-bit range", symbol(op));
        match op {
            BinOp::Lt => Value::Bool(a < b),
            BinOp::LtEq => Value::Bool(a <= b),
            BinOp::Gt => Value::Bool(a > b),
            BinOp::GtEq => Value::Bool(a >= b),
            BinOp::Add => self.math(a.checked_add(b), overflow),
            BinOp::Sub => self.math(a.checked_sub(b), overflow),
            BinOp::Mul => self.math(a.checked_mul(b), overflow),
            BinOp::Div | BinOp::Rem if b == 0 => {
                self.error(
                    ErrorKind::Math,
                    format!("{a} {} 0: division by zero", symbol(op)),
                );
                Type::Integer.zero()
            }
            BinOp::Div => self.math(a.checked_div(b), overflow),
            BinOp::Rem => self.math(a.checked_rem(b), overflow),
            _ => unreachable!("logic and equality are handled by binary"),
        }
    }

    /// A function call: every argument evaluated and cast to its parameter's type (all
    /// of them, so the error list has each one's errors), then the body; the zero value
    /// of the function's type if an argument failed, `false` if there is no such
    /// function.
    fn call(&mut self, name: &str, args: &[Expr]) -> Value {
        let Some(f) = functions::find(name, args.len()) else {
            self.errors.push(functions::missing(name, args.len()));
            return Value::Bool(false);
        };
        let values: Vec<Operand> = args
            .iter()
            .enumerate()
            .map(|(k, arg)| match f.param(k) {
                Param::Of(t) => self.operand(arg, t),
                Param::Any => self.any(arg),
            })
            .collect();
        match values.into_iter().collect::<Option<Vec<Value>>>() {
            Some(values) => (f.body)(&mut self.errors, values),
            None => f.returns.zero(),
        }
    }

    fn is_in(&mut self, value: &Expr, set: &[Expr], negated: bool) -> Value {
        let Some(value) = self.any(value) else {
            return Type::Bool.zero();
        };
        // The left operand's type is the one the set's elements are cast to.
        let target = value.type_of();
        let mut found = false;
        for item in set {
            match self.operand(item, target) {
                Some(item) => found |= item == value,
                None => return Type::Bool.zero(),
            }
        }
        Value::Bool(found != negated)
    }
}

fn symbol(op: BinOp) -> &'static str {
    match op {
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Rem => "%",
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Eq => "=",
        BinOp::NotEq => "!=",
        BinOp::Lt => "<",
        BinOp::LtEq => "<=",
        BinOp::Gt => ">",
        BinOp::GtEq => ">=",
        BinOp::And => "AND",
        BinOp::Or => "OR",
        BinOp::Xor => "XOR",
    }
}
