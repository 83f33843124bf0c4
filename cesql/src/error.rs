//! The error kinds CESQL 1.0 names (section 3.3), and an error with its message.

use std::fmt;

/// The kind of a CESQL error, as the specification and its TCK name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The expression is not valid CESQL.
    Parse,
    /// An arithmetic error: division by zero, an overflow.
    Math,
    /// A value could not be cast to the type an operator or function needs.
    Cast,
    /// The expression addresses an attribute the event does not have.
    MissingAttribute,
    /// A function that does not exist, or not with that many arguments.
    MissingFunction,
    /// A function was given arguments it cannot work with.
    FunctionEvaluation,
}

impl ErrorKind {
    /// The name the TCK uses (`parse`, `math`, `cast`, `missingAttribute`, …).
    pub fn tck_name(self) -> &'static str {
        match self {
            ErrorKind::Parse => "parse",
            ErrorKind::Math => "math",
            ErrorKind::Cast => "cast",
            ErrorKind::MissingAttribute => "missingAttribute",
            ErrorKind::MissingFunction => "missingFunction",
            ErrorKind::FunctionEvaluation => "functionEvaluation",
        }
    }
}

/// One error of a parse or an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ErrorKind::Parse => "parse error",
            ErrorKind::Math => "math error",
            ErrorKind::Cast => "cast error",
            ErrorKind::MissingAttribute => "missing attribute",
            ErrorKind::MissingFunction => "missing function",
            ErrorKind::FunctionEvaluation => "function error",
        };
        write!(f, "{what}: {}", self.message)
    }
}

impl std::error::Error for Error {}
