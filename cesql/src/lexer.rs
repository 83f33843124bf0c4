//! Tokens of a CESQL expression: keywords (any case), identifiers, integer and string
//! literals, punctuation. Every token keeps its column (from 1, in characters) for error messages.

use crate::error::{Error, ErrorKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Token {
    /// A run of letters, digits and `_` that is not a keyword: an attribute name, or a
    /// function name when `(` follows.
    Word(String),
    /// Digits only; the sign is the parser's (so `-2147483648` can be a literal).
    Digits(String),
    Str(String),
    True,
    False,
    And,
    Or,
    Xor,
    Not,
    Like,
    Exists,
    In,
    LParen,
    RParen,
    Comma,
    Star,
    Slash,
    Percent,
    Plus,
    Minus,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

#[derive(Debug, Clone)]
pub(crate) struct Spanned {
    pub(crate) token: Token,
    /// The column the token starts at: 1 for the first character (characters, not
    /// bytes, so that a message points where an editor does).
    pub(crate) at: usize,
}

/// The 1-based column of byte `at` of `text` (a character boundary).
pub(crate) fn column(text: &str, at: usize) -> usize {
    text.get(..at).map_or(at, |t| t.chars().count()) + 1
}

/// The tokens of `text`, or a parse error naming the first character that starts none.
pub(crate) fn tokens(text: &str) -> Result<Vec<Spanned>, Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let at = i;
        let token = match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'(' => one(&mut i, Token::LParen),
            b')' => one(&mut i, Token::RParen),
            b',' => one(&mut i, Token::Comma),
            b'*' => one(&mut i, Token::Star),
            b'/' => one(&mut i, Token::Slash),
            b'%' => one(&mut i, Token::Percent),
            b'+' => one(&mut i, Token::Plus),
            b'-' => one(&mut i, Token::Minus),
            b'=' => one(&mut i, Token::Eq),
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                Token::NotEq
            }
            b'<' => match bytes.get(i + 1) {
                Some(b'=') => two(&mut i, Token::LtEq),
                Some(b'>') => two(&mut i, Token::NotEq),
                _ => one(&mut i, Token::Lt),
            },
            b'>' => match bytes.get(i + 1) {
                Some(b'=') => two(&mut i, Token::GtEq),
                _ => one(&mut i, Token::Gt),
            },
            b'\'' | b'"' => {
                let (s, end) = string(text, i)?;
                i = end;
                Token::Str(s)
            }
            c if c.is_ascii_digit() => {
                let end = run(bytes, i, |b| b.is_ascii_alphanumeric() || b == b'_');
                let word = &text[i..end];
                i = end;
                if word.bytes().all(|b| b.is_ascii_digit()) {
                    Token::Digits(word.to_owned())
                } else {
                    Token::Word(word.to_owned())
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let end = run(bytes, i, |b| b.is_ascii_alphanumeric() || b == b'_');
                let word = &text[i..end];
                i = end;
                keyword(word).unwrap_or_else(|| Token::Word(word.to_owned()))
            }
            _ => {
                let ch = text[i..].chars().next().unwrap_or('?');
                return Err(Error::new(
                    ErrorKind::Parse,
                    format!("unexpected character {ch:?} at column {}", column(text, i)),
                ));
            }
        };
        out.push(Spanned {
            token,
            at: column(text, at),
        });
    }
    Ok(out)
}

fn one(i: &mut usize, t: Token) -> Token {
    *i += 1;
    t
}

fn two(i: &mut usize, t: Token) -> Token {
    *i += 2;
    t
}

fn run(bytes: &[u8], from: usize, keep: impl Fn(u8) -> bool) -> usize {
    from + bytes[from..].iter().take_while(|&&b| keep(b)).count()
}

fn keyword(word: &str) -> Option<Token> {
    const KEYWORDS: [(&str, Token); 9] = [
        ("AND", Token::And),
        ("OR", Token::Or),
        ("XOR", Token::Xor),
        ("NOT", Token::Not),
        ("LIKE", Token::Like),
        ("EXISTS", Token::Exists),
        ("IN", Token::In),
        ("TRUE", Token::True),
        ("FALSE", Token::False),
    ];
    KEYWORDS
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(word))
        .map(|(_, t)| t.clone())
}

/// A string literal starting at `start` (its quote): the value and the offset after it.
/// `\` before the closing quote character, or the quote doubled, stands for the quote;
/// any other `\` is kept as written (LIKE patterns use `\%` and `\_`).
fn string(text: &str, start: usize) -> Result<(String, usize), Error> {
    let quote = text.as_bytes()[start] as char;
    let mut value = String::new();
    let mut chars = text[start + 1..].char_indices().peekable();
    while let Some((k, c)) = chars.next() {
        if c == '\\' {
            match chars.peek() {
                Some(&(_, next)) if next == quote => {
                    value.push(quote);
                    chars.next();
                }
                Some(&(_, '\\')) => {
                    value.push_str("\\\\");
                    chars.next();
                }
                _ => value.push('\\'),
            }
        } else if c == quote {
            if chars.peek().is_some_and(|&(_, n)| n == quote) {
                value.push(quote);
                chars.next();
            } else {
                return Ok((value, start + 1 + k + 1));
            }
        } else {
            value.push(c);
        }
    }
    Err(Error::new(
        ErrorKind::Parse,
        format!(
            "the string starting at column {} is not closed (a {quote} is missing)",
            column(text, start)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<Token> {
        tokens(text).unwrap().into_iter().map(|s| s.token).collect()
    }

    #[test]
    fn keywords_in_any_case_and_operators() {
        use Token::*;
        assert_eq!(
            kinds("a and B Or not(1)<>2 <= >= != xor Like exists iN True false"),
            vec![
                Word("a".into()),
                And,
                Word("B".into()),
                Or,
                Not,
                LParen,
                Digits("1".into()),
                RParen,
                NotEq,
                Digits("2".into()),
                LtEq,
                GtEq,
                NotEq,
                Xor,
                Like,
                Exists,
                In,
                True,
                False
            ]
        );
    }

    #[test]
    fn strings_keep_their_escapes_but_for_the_quote() {
        assert_eq!(kinds(r"'it\'s'"), vec![Token::Str("it's".into())]);
        assert_eq!(kinds("'it''s'"), vec![Token::Str("it's".into())]);
        assert_eq!(
            kinds(r#""a \"b\" 'c'""#),
            vec![Token::Str(r#"a "b" 'c'"#.into())]
        );
        assert_eq!(kinds(r"'50\%'"), vec![Token::Str(r"50\%".into())]);
        assert_eq!(kinds("'ünïcode ☃'"), vec![Token::Str("ünïcode ☃".into())]);
        let e = tokens("'open").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Parse);
        assert!(e.to_string().contains("not closed"), "{e}");
        let e = tokens("a # b").unwrap_err();
        assert!(e.to_string().contains("'#' at column 3"), "{e}");
    }
}
