//! The one error type of the analytic library.

use std::path::PathBuf;

/// Everything that can go wrong while building or evaluating an analytic model.
///
/// Every variant names the offending value and what would be valid, so that a
/// command-line front end can print it as a one-line error and exit with code 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration or workload value is outside its valid range.
    #[error("{field} = {value} is invalid: expected {expected}")]
    Invalid {
        field: String,
        value: String,
        expected: String,
    },
    /// A valid Hugging Face setting that modelmeter does not model (yet).
    #[error("{field} = {value} is not supported: {reason}")]
    Unsupported {
        field: String,
        value: String,
        reason: String,
    },
    /// A required field is absent from the configuration.
    #[error("{field} is missing from {config}: {expected}")]
    Missing {
        field: String,
        expected: String,
        /// Which config: `the config`, or `config PATH` once the file is known.
        config: String,
    },
    /// The configuration text is not JSON, or not a JSON object.
    #[error("cannot parse config {source_name}: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    /// A configuration file could not be read.
    ///
    /// The reason is part of the message, not a `source()`: a printer of error chains
    /// (anyhow's `{:#}`) would otherwise say it twice.
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// An exact integer metric does not fit in 64 bits.
    #[error(
        "{what} would overflow 64-bit integers; reduce the workload (batch, sequence, context, new tokens) or the model sizes"
    )]
    Overflow { what: String },
    /// An [`Error::Overflow`] with the inputs that cause it (see
    /// [`crate::overflow::explain`]): `inputs` names them with their values.
    #[error("{inputs}: {what} would overflow 64-bit integers; lower {names}")]
    OverflowFrom {
        inputs: String,
        what: String,
        names: String,
    },
    /// An op record the conventions cannot cost (wrong arity, shapes that do not match).
    #[error("cannot cost {op}: {message}")]
    OpShape { op: String, message: String },
}

impl Error {
    /// The same error with the field of an [`Error::Invalid`] named as `rename` names it,
    /// each factor of a product (`batch × seq_len`) on its own: how a front end names what
    /// the library calls `batch` (`--batch`, `--vary batch`). Any other error as it is.
    pub fn with_field_named(mut self, rename: impl Fn(&str) -> String) -> Error {
        if let Error::Invalid { field, .. } = &mut self {
            *field = field
                .split(" × ")
                .map(rename)
                .collect::<Vec<_>>()
                .join(" × ");
        }
        self
    }

    /// Shorthand for [`Error::Invalid`]; a long value (a huge JSON array) is shortened
    /// so that the message stays readable.
    pub fn invalid(field: &str, value: impl ToString, expected: &str) -> Error {
        Error::Invalid {
            field: field.to_string(),
            value: abbreviate(shown_value(&value.to_string())),
            expected: expected.to_string(),
        }
    }

    /// A required config field `field` is absent; `expected` says what it should be.
    pub fn missing(field: impl Into<String>, expected: impl Into<String>) -> Error {
        Error::Missing {
            field: field.into(),
            expected: expected.into(),
            config: "the config".into(),
        }
    }

    /// The same error, saying it comes from the config called `name` (a path, a built-in
    /// name): a field's value or absence is in the file, not on the command line.
    pub fn in_config(mut self, name: &str) -> Error {
        match &mut self {
            Error::Invalid { value, .. } | Error::Unsupported { value, .. } => {
                value.push_str(&format!(" (config {name})"));
            }
            Error::Missing { config, .. } => *config = format!("config {name}"),
            _ => {}
        }
        self
    }

    /// Shorthand for [`Error::Overflow`].
    pub fn overflow(what: impl Into<String>) -> Error {
        Error::Overflow { what: what.into() }
    }

    /// Shorthand for [`Error::OpShape`].
    pub fn op_shape(op: &str, message: impl Into<String>) -> Error {
        Error::OpShape {
            op: op.to_string(),
            message: message.into(),
        }
    }
}

/// The most characters of a value an error message shows.
const MAX_SHOWN_VALUE: usize = 80;

/// `text` on one line: line breaks and other control characters (from a file name, say)
/// are written as escapes (`\n`), so an error message (or a title) stays one line.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if breaks_line(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `c` could break or rewrite a line of a terminal: a control character, or
/// Unicode's line and paragraph separators (which some terminals show as a new line).
fn breaks_line(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// A value as an error message shows it: quoted, with escapes, when it is empty, starts or
/// ends with a blank or holds a control character (`--device = "" is invalid`,
/// `--accept-rel-diff = "1 " is invalid`, `"5\n"`), which would otherwise vanish between
/// the `=` and `is` or break the one-line message; as given otherwise.
pub fn shown_value(text: &str) -> String {
    let hidden = text.trim() != text || text.is_empty() || text.chars().any(breaks_line);
    if hidden {
        format!("{text:?}")
    } else {
        text.to_string()
    }
}

/// `text` when short; else its start, an ellipsis and its length.
fn abbreviate(text: String) -> String {
    if text.chars().count() <= MAX_SHOWN_VALUE {
        return text;
    }
    let head: String = text.chars().take(MAX_SHOWN_VALUE - 20).collect();
    format!("{head}… ({} bytes)", text.len())
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_values_are_shown_quoted() {
        assert_eq!(shown_value(""), "\"\"");
        assert_eq!(shown_value("  "), "\"  \"");
        assert_eq!(shown_value("cuda:x"), "cuda:x");
        assert_eq!(shown_value("a b"), "a b", "inner blanks are visible");
        assert_eq!(shown_value("1 "), "\"1 \"");
        assert_eq!(shown_value(" 1"), "\" 1\"");
        assert_eq!(shown_value("5\n"), "\"5\\n\"", "one line");
        assert_eq!(shown_value("a\tb"), "\"a\\tb\"");
        // Unicode's line separator is no control character, but breaks a line all the same.
        assert_eq!(shown_value("a\u{2028}b"), "\"a\\u{2028}b\"");
        assert_eq!(one_line("a\u{2029}b"), "a\\u{2029}b");
        assert_eq!(
            Error::invalid("--device", "", "cpu").to_string(),
            "--device = \"\" is invalid: expected cpu"
        );
    }

    #[test]
    fn long_values_are_shortened() {
        let short = Error::invalid("x", "[1, 2]", "y").to_string();
        assert_eq!(short, "x = [1, 2] is invalid: expected y");
        let long = Error::invalid("x", "0,".repeat(1000), "y").to_string();
        assert!(long.len() < 120 && long.contains("(2000 bytes)"), "{long}");
    }
}
