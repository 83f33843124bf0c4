//! The expression tree and the parser that builds it (precedence climbing).
//!
//! Precedence, tightest first (CESQL 1.0 section 3.6): function calls; `NOT` and unary
//! `-`; `LIKE`; `EXISTS`; `IN`; `*` `/` `%`; `+` `-`; comparisons; `AND` `OR` `XOR`
//! (one level, right-associative as in the specification's grammar).

use crate::error::{Error, ErrorKind};
use crate::lexer::{Spanned, Token, tokens};
use crate::like::Pattern;
use crate::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    Rem,
    Add,
    Sub,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    And,
    Or,
    Xor,
}

#[derive(Debug, Clone)]
pub(crate) enum Expr {
    Literal(Value),
    Attribute(String),
    Exists(String),
    Not(Box<Expr>),
    Negate(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Like {
        value: Box<Expr>,
        pattern: Pattern,
        negated: bool,
    },
    In {
        value: Box<Expr>,
        set: Vec<Expr>,
        negated: bool,
    },
    Call {
        /// Upper case: function names are case-insensitive.
        name: String,
        args: Vec<Expr>,
    },
}

const LOGIC: u8 = 10;
const COMPARISON: u8 = 20;
const ADDITIVE: u8 = 30;
const MULTIPLICATIVE: u8 = 40;
const POSTFIX: u8 = 50;
const UNARY: u8 = 60;

/// Nesting deeper than this is refused: evaluation recurses, and a rule's filter is
/// configuration, not a program.
const MAX_DEPTH: usize = 200;

pub(crate) fn parse(text: &str) -> Result<Expr, Error> {
    let tokens = tokens(text)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        depth: 0,
        len: text.chars().count() + 1,
    };
    if p.tokens.is_empty() {
        return Err(parse_error("the expression is empty"));
    }
    let e = p.expression(0)?;
    match p.peek() {
        None => Ok(e),
        Some(_) => Err(p.unexpected("the end of the expression")),
    }
}

fn parse_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Parse, message)
}

struct Parser {
    tokens: Vec<Spanned>,
    pos: usize,
    depth: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|s| &s.token)
    }

    fn peek_at(&self, ahead: usize) -> Option<&Token> {
        self.tokens.get(self.pos + ahead).map(|s| &s.token)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).map(|s| s.token.clone());
        self.pos += 1;
        t
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.len, |s| s.at)
    }

    fn unexpected(&self, wanted: &str) -> Error {
        match self.tokens.get(self.pos) {
            Some(s) => parse_error(format!(
                "expected {wanted} at column {}, found {}",
                s.at,
                describe(&s.token)
            )),
            None => parse_error(format!("expected {wanted}, but the expression ends")),
        }
    }

    fn expect(&mut self, t: Token, wanted: &str) -> Result<(), Error> {
        if self.peek() == Some(&t) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(wanted))
        }
    }

    fn expression(&mut self, min: u8) -> Result<Expr, Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(parse_error(format!(
                "the expression nests deeper than {MAX_DEPTH} levels"
            )));
        }
        let mut left = self.prefix()?;
        while let Some(t) = self.peek() {
            let (bp, right_assoc) = match infix(t) {
                Some(op) => (binding(op), op_is_logic(op)),
                None if matches!(t, Token::Like | Token::In)
                    || (*t == Token::Not
                        && matches!(self.peek_at(1), Some(Token::Like | Token::In))) =>
                {
                    (POSTFIX, false)
                }
                None => break,
            };
            if bp < min {
                break;
            }
            if bp == POSTFIX {
                left = self.postfix(left)?;
                continue;
            }
            let op = infix(t).expect("matched above");
            self.pos += 1;
            let right = self.expression(if right_assoc { bp } else { bp + 1 })?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        self.depth -= 1;
        Ok(left)
    }

    /// `[NOT] LIKE 'pattern'` or `[NOT] IN (a, b, …)` after `value`.
    fn postfix(&mut self, value: Expr) -> Result<Expr, Error> {
        let negated = self.peek() == Some(&Token::Not);
        if negated {
            self.pos += 1;
        }
        let value = Box::new(value);
        match self.next() {
            Some(Token::Like) => match self.next() {
                Some(Token::Str(p)) => Ok(Expr::Like {
                    value,
                    pattern: Pattern::new(&p),
                    negated,
                }),
                _ => {
                    self.pos -= 1;
                    Err(self.unexpected("a string literal as the LIKE pattern"))
                }
            },
            Some(Token::In) => {
                self.expect(Token::LParen, "( after IN")?;
                let set = self.list()?;
                if set.is_empty() {
                    return Err(parse_error("the set after IN is empty"));
                }
                Ok(Expr::In {
                    value,
                    set,
                    negated,
                })
            }
            _ => unreachable!("postfix is only entered before LIKE or IN"),
        }
    }

    /// Comma-separated expressions up to and including `)`.
    fn list(&mut self) -> Result<Vec<Expr>, Error> {
        let mut items = Vec::new();
        if self.peek() == Some(&Token::RParen) {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(self.expression(0)?);
            match self.next() {
                Some(Token::Comma) => {}
                Some(Token::RParen) => return Ok(items),
                _ => {
                    self.pos -= 1;
                    return Err(self.unexpected(", or )"));
                }
            }
        }
    }

    fn prefix(&mut self) -> Result<Expr, Error> {
        let at = self.offset();
        let Some(token) = self.next() else {
            return Err(parse_error("expected a value, but the expression ends"));
        };
        Ok(match token {
            Token::True => Expr::Literal(Value::Bool(true)),
            Token::False => Expr::Literal(Value::Bool(false)),
            Token::Str(s) => Expr::Literal(Value::String(s)),
            Token::Digits(d) => Expr::Literal(Value::Integer(integer(&d, false, at)?)),
            Token::Plus | Token::Minus => {
                let negative = token == Token::Minus;
                match self.peek() {
                    Some(Token::Digits(d)) => {
                        let d = d.clone();
                        self.pos += 1;
                        Expr::Literal(Value::Integer(integer(&d, negative, at)?))
                    }
                    _ if negative => Expr::Negate(Box::new(self.expression(UNARY)?)),
                    _ => {
                        self.pos -= 1;
                        return Err(self.unexpected("a value"));
                    }
                }
            }
            Token::Not => Expr::Not(Box::new(self.expression(UNARY)?)),
            Token::Exists => match self.next() {
                Some(Token::Word(w)) if is_attribute_name(&w) => Expr::Exists(w),
                _ => {
                    self.pos -= 1;
                    return Err(self.unexpected("an attribute name after EXISTS"));
                }
            },
            Token::LParen => {
                let e = self.expression(0)?;
                self.expect(Token::RParen, ")")?;
                e
            }
            Token::Word(w) if self.peek() == Some(&Token::LParen) => {
                if !is_function_name(&w) {
                    return Err(parse_error(format!(
                        "{w:?} at column {at} is not a function name (letters and _)"
                    )));
                }
                self.pos += 1;
                let args = self.list()?;
                Expr::Call {
                    name: w.to_ascii_uppercase(),
                    args,
                }
            }
            Token::Word(w) if is_attribute_name(&w) => Expr::Attribute(w),
            Token::Word(w) => {
                return Err(parse_error(format!(
                    "{w:?} at column {at} is not an attribute name (letters and digits)"
                )));
            }
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("a value"));
            }
        })
    }
}

fn integer(digits: &str, negative: bool, at: usize) -> Result<i32, Error> {
    let text = if negative {
        format!("-{digits}")
    } else {
        digits.to_owned()
    };
    text.parse::<i32>().map_err(|_| {
        parse_error(format!(
            "the integer {text} at column {at} is outside the 32-bit range"
        ))
    })
}

/// CloudEvents attribute names are letters and digits (CESQL lexes them in any case).
fn is_attribute_name(w: &str) -> bool {
    !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn is_function_name(w: &str) -> bool {
    w.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && w.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_')
}

fn infix(t: &Token) -> Option<BinOp> {
    Some(match t {
        Token::Star => BinOp::Mul,
        Token::Slash => BinOp::Div,
        Token::Percent => BinOp::Rem,
        Token::Plus => BinOp::Add,
        Token::Minus => BinOp::Sub,
        Token::Eq => BinOp::Eq,
        Token::NotEq => BinOp::NotEq,
        Token::Lt => BinOp::Lt,
        Token::LtEq => BinOp::LtEq,
        Token::Gt => BinOp::Gt,
        Token::GtEq => BinOp::GtEq,
        Token::And => BinOp::And,
        Token::Or => BinOp::Or,
        Token::Xor => BinOp::Xor,
        _ => return None,
    })
}

fn op_is_logic(op: BinOp) -> bool {
    matches!(op, BinOp::And | BinOp::Or | BinOp::Xor)
}

fn binding(op: BinOp) -> u8 {
    match op {
        BinOp::Mul | BinOp::Div | BinOp::Rem => MULTIPLICATIVE,
        BinOp::Add | BinOp::Sub => ADDITIVE,
        BinOp::Eq | BinOp::NotEq | BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq => COMPARISON,
        BinOp::And | BinOp::Or | BinOp::Xor => LOGIC,
    }
}

fn describe(t: &Token) -> String {
    let symbol = match t {
        Token::Word(w) => return format!("{w:?}"),
        Token::Digits(d) => return d.clone(),
        Token::Str(s) => return format!("the string {s:?}"),
        Token::True => "TRUE",
        Token::False => "FALSE",
        Token::And => "AND",
        Token::Or => "OR",
        Token::Xor => "XOR",
        Token::Not => "NOT",
        Token::Like => "LIKE",
        Token::Exists => "EXISTS",
        Token::In => "IN",
        Token::LParen => "(",
        Token::RParen => ")",
        Token::Comma => ",",
        Token::Star => "*",
        Token::Slash => "/",
        Token::Percent => "%",
        Token::Plus => "+",
        Token::Minus => "-",
        Token::Eq => "=",
        Token::NotEq => "!=",
        Token::Lt => "<",
        Token::LtEq => "<=",
        Token::Gt => ">",
        Token::GtEq => ">=",
    };
    symbol.to_owned()
}
