//! Reading a `config.json` safely: at most [`MAX_CONFIG_BYTES`] are read (so `/dev/zero`
//! or a huge file is refused after a bounded read, not swallowed), and only the fields
//! modelmeter uses are kept as JSON values. Everything else — vision towers, label maps,
//! a 10-million-element array — is skipped by the parser without being built, so memory
//! stays proportional to the few fields that matter.

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The largest config file read (16 MiB); real `config.json` files have a few kB.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The largest JSON text of one kept field (1 MiB); `mlp_layer_types` for the most
/// layers modelmeter accepts takes about 40 kB.
pub const MAX_FIELD_BYTES: usize = 1 << 20;

/// The keys that hold the language model's config in multimodal checkpoints.
pub(crate) const NESTED_KEYS: [&str; 2] = ["language_config", "text_config"];

/// The fields [`crate::ModelConfig`] reads at the language model's level (the top level,
/// or the nested object of [`NESTED_KEYS`]); with [`ROPE_FIELDS`], what a file's reader
/// keeps ([`is_read`]): all others are skipped unread.
pub(crate) const LANGUAGE_FIELDS: &[&str] = &[
    "attention_bias",
    "dtype",
    "first_k_dense_replace",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "intermediate_size",
    "kv_lora_rank",
    "max_position_embeddings",
    "mlp_layer_types",
    "moe_intermediate_size",
    "moe_layer_freq",
    "n_group",
    "n_routed_experts",
    "n_shared_experts",
    "norm_topk_prob",
    "num_attention_heads",
    "num_experts",
    "num_experts_per_tok",
    "num_hidden_layers",
    "num_key_value_heads",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "routed_scaling_factor",
    "scoring_func",
    "tie_word_embeddings",
    "topk_group",
    "topk_method",
    "torch_dtype",
    "use_mla",
    "v_head_dim",
    "vocab_size",
];

/// The fields read inside `rope_scaling` / `rope_parameters` (kept whole); harmless at the
/// top level, where nothing reads them.
pub(crate) const ROPE_FIELDS: &[&str] = &[
    "beta_fast",
    "beta_slow",
    "factor",
    "mscale",
    "mscale_all_dim",
    "original_max_position_embeddings",
    "rope_type",
    "type",
];

/// The fields that say which model a config describes (`model_type`, `architectures`):
/// kept so that a config of another family is refused, not read as a DeepSeek-V2 one;
/// nothing else reads them, and two nested configs may differ in them.
pub(crate) const IDENTITY_FIELDS: &[&str] = &["architectures", "model_type"];

/// Whether [`crate::ModelConfig`] reads a field called `key` ([`LANGUAGE_FIELDS`],
/// [`ROPE_FIELDS`], [`IDENTITY_FIELDS`]).
pub(crate) fn is_read(key: &str) -> bool {
    LANGUAGE_FIELDS.contains(&key) || ROPE_FIELDS.contains(&key) || IDENTITY_FIELDS.contains(&key)
}

/// Reads at most [`MAX_CONFIG_BYTES`] of `path`; a larger file (or an endless device)
/// is an error that says so.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    let io = |cause: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        cause,
    };
    let too_large = || {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "it is larger than {} MiB, and no config.json comes near that; give the model's config.json",
                MAX_CONFIG_BYTES >> 20
            ),
        ))
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if meta.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is a directory; give the model's config.json",
        )));
    }
    if meta.is_file() && meta.len() > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Parses config text into an object holding only the fields [`is_read`] keeps (and, filtered the same
/// way, a nested [`NESTED_KEYS`] object); `name` says where the text came from.
pub(crate) fn parse(name: &str, text: &[u8]) -> Result<Value> {
    let parse_error = |message: String| Error::Parse {
        source_name: name.to_string(),
        message,
    };
    if text.starts_with(b"\xef\xbb\xbf") {
        return Err(parse_error(
            "it starts with a UTF-8 byte-order mark, which JSON does not allow; save it without one"
                .into(),
        ));
    }
    // JSON text is UTF-8 (RFC 8259), as Python's reader requires; the parser skips the
    // fields modelmeter does not read without looking inside their strings, so check the
    // whole text first and say where it is not.
    if let Err(e) = std::str::from_utf8(text) {
        let at = e.valid_up_to();
        return Err(parse_error(placed(
            &format!(
                "it is not UTF-8 text (save it as UTF-8): byte 0x{:02X}",
                text[at]
            ),
            text,
            Some(at),
        )));
    }
    match text.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(parse_error("it is empty; expected a JSON object".into())),
        Some(b'{') => {}
        // Valid JSON of another kind, or not JSON at all: say which.
        Some(_) => {
            return Err(parse_error(
                match serde_json::from_slice::<IgnoredAny>(text) {
                    Ok(_) => "the top level is not a JSON object".into(),
                    Err(e) => format!("it is not JSON ({e}); expected a JSON object"),
                },
            ))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    // Every error comes out placed in `text` (the reader's own messages end with their
    // line and column, which serde_json reads back as the error's position).
    let value = Filtered {
        nested: true,
        part: text,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v))
    .map_err(|e| parse_error(parse_message(&e)))?;
    Ok(value)
}

/// What a parse error says. A file that ends inside its JSON is said to be cut short:
/// serde_json places that error after the last byte, which after a final line break is
/// "line L + 1 column 0", a column that no editor shows.
fn parse_message(e: &serde_json::Error) -> String {
    let message = e.to_string();
    // Inside a field the reader parses the field's own text again, and the error comes
    // back as a custom one (category `Data`) with serde_json's words.
    if !(e.is_eof() || message.contains("EOF while parsing")) {
        return message;
    }
    let what = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(head, _)| head);
    format!("it ends before its JSON object does ({what} at the end of the file); is the file complete?")
}

/// The message of an error raised by a parser that read `inner` (a part of `outer`),
/// without its position, and the offset in `outer` where it happened (none if the error
/// has no position). serde_json ends a placed error's text with ` at line L column C`
/// (columns from 1, the byte it stopped at) and reads a custom message's such ending
/// back as its position; the text is all a generic [`MapAccess`] error gives.
fn split_error(outer: &[u8], inner: &[u8], error: &impl fmt::Display) -> (String, Option<usize>) {
    let message = error.to_string();
    let position = message.rsplit_once(" at line ").and_then(|(head, tail)| {
        let (line, column) = tail.split_once(" column ")?;
        Some((
            head,
            line.parse::<usize>().ok()?,
            column.parse::<usize>().ok()?,
        ))
    });
    let Some((head, line, column)) = position.filter(|&(_, line, _)| line > 0) else {
        return (message, None);
    };
    let line_start = if line == 1 {
        0
    } else {
        inner
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .nth(line - 2)
            .map_or(inner.len(), |(i, _)| i + 1)
    };
    let in_inner = (line_start + column.saturating_sub(1)).min(inner.len());
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    (head.to_owned(), Some(start + in_inner))
}

/// `message` with the line and column of `offset` in `text` at its end, both from 1 (in
/// bytes, as serde_json counts them), where it has one.
fn placed(message: &str, text: &[u8], offset: Option<usize>) -> String {
    let Some(offset) = offset else {
        return message.to_owned();
    };
    let before = &text[..offset.min(text.len())];
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    format!(
        "{message} at line {line} column {}",
        1 + before.len() - start
    )
}

/// A JSON object with only the fields modelmeter reads; `nested` also filters the
/// language model's nested config. `part` is the text this object's parser reads (a
/// nested object is parsed again from its raw text, a part of its parent's), so that
/// errors say where they are: each is placed in `part`, and so in the whole file.
#[derive(Clone, Copy)]
struct Filtered<'de> {
    nested: bool,
    part: &'de [u8],
}

impl Filtered<'_> {
    /// The error `e` met reading the value of `key` (a parser error, placed in `part`),
    /// with the key in front; a `NaN` or `Infinity` where a value was expected is said to
    /// be one.
    fn value_error<E: de::Error>(&self, key: &str, e: E) -> E {
        let (message, at) = split_error(self.part, self.part, &e);
        let rest = at.map_or(&[][..], |at| &self.part[at..]);
        // serde_json's words for a value it cannot start (`NaN`, `Infinity`) or a number
        // it cannot finish (`-Infinity`); other errors at such a word are other mistakes
        // (a key that is not a string, a missing comma).
        let no_value = matches!(message.as_str(), "expected value" | "invalid number");
        let key = shown(key);
        let message = match ["NaN", "Infinity"]
            .into_iter()
            .find(|word| no_value && rest.starts_with(word.as_bytes()))
        {
            Some(word) => format!(
                "{key}: {word} is not a JSON number (JSON has no NaN or Infinity; write a \
                 finite number)"
            ),
            None => keyed(&key, &message),
        };
        E::custom(placed(&message, self.part, at))
    }
}

/// The longest key an error shows whole, in characters: a key modelmeter does not read
/// may be anything, up to the file's size.
const SHOWN_KEY_CHARS: usize = 60;

/// `key` as errors show it: cut after [`SHOWN_KEY_CHARS`] characters, with `…`.
fn shown(key: &str) -> std::borrow::Cow<'_, str> {
    match key.char_indices().nth(SHOWN_KEY_CHARS) {
        Some((end, _)) => format!("{}…", &key[..end]).into(),
        None => key.into(),
    }
}

/// A parser's `message` about the value of `key` (as [`shown`]), with the key in front;
/// a number past a 64-bit float's range (`1e400`) is told what fits.
fn keyed(key: &str, message: &str) -> String {
    match message {
        "number out of range" => format!(
            "{key}: number out of range (beyond a 64-bit float's ±1.8e308; write a finite number)"
        ),
        _ => format!("{key}: {message}"),
    }
}

/// The message for a key given twice: `path` names it (with the objects it is in).
fn given_twice(path: &str) -> String {
    format!(
        "{path} is given twice (a config.json states each field once; Python's json would \
         keep the last value without a word): remove one; see the second one"
    )
}

impl<'de> DeserializeSeed<'de> for Filtered<'de> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Filtered<'de> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let nested = self.nested && NESTED_KEYS.contains(&key.as_str());
            if !nested && !is_read(&key) {
                map.next_value::<IgnoredAny>()
                    .map_err(|e| self.value_error(&key, e))?;
                continue;
            }
            let raw: &'de RawValue = map.next_value().map_err(|e| self.value_error(&key, e))?;
            let raw_text = raw.get().as_bytes();
            let here = Some(raw_text.as_ptr() as usize - self.part.as_ptr() as usize);
            if out.contains_key(&key) {
                return Err(de::Error::custom(placed(
                    &given_twice(&key),
                    self.part,
                    here,
                )));
            }
            // The field's own parser, over its raw text (`de` is serde's module here).
            let mut parser = serde_json::Deserializer::from_str(raw.get());
            let value = if nested && raw.get().starts_with('{') {
                Filtered {
                    nested: false,
                    part: raw_text,
                }
                .deserialize(&mut parser)
            } else if raw.get().len() > MAX_FIELD_BYTES {
                return Err(de::Error::custom(placed(
                    &format!(
                        "field {key} holds {} bytes of JSON, more than the {} MiB any config.json field needs",
                        raw.get().len(),
                        MAX_FIELD_BYTES >> 20
                    ),
                    self.part,
                    here,
                )));
            } else {
                Strict::default().deserialize(&mut parser)
            };
            let value = value.map_err(|e| {
                let (message, at) = split_error(self.part, raw_text, &e);
                de::Error::custom(placed(&keyed(&shown(&key), &message), self.part, at))
            })?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Any JSON value, built as serde_json builds a [`Value`], but an object that names a
/// key twice is an error (serde_json keeps the last value silently): the rotary scaling's
/// objects are read whole. `path` names the value read, from the field's value down
/// (empty there; `a.b` below), so that a repeated key deep inside is named with the
/// objects it is in; serde_json places the error after the second key.
#[derive(Clone, Default)]
struct Strict {
    path: String,
}

impl Strict {
    /// The reader of the value under `key` of this object.
    fn child(&self, key: &str) -> Strict {
        let key = shown(key);
        Strict {
            path: if self.path.is_empty() {
                key.into_owned()
            } else {
                format!("{}.{key}", self.path)
            },
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // As serde_json's own `Value`: its parser gives no non-finite number.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict {
            path: format!("{}[{}]", self.path, out.len()),
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let child = self.child(&key);
            if out.contains_key(&key) {
                return Err(de::Error::custom(given_twice(&child.path)));
            }
            let value = map.next_value_seed(child)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_fields_are_kept() {
        let v = parse(
            "t",
            br#"{"hidden_size": 64, "id2label": {"0": "a"}, "big": [0, 0, 0],
                 "language_config": {"vocab_size": 5, "vision": [1, 2]}}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"hidden_size": 64, "language_config": {"vocab_size": 5}})
        );
        // A nested key that is not an object is kept, so that validation names it.
        let v = parse("t", br#"{"language_config": 5}"#).unwrap();
        assert_eq!(v, serde_json::json!({"language_config": 5}));
    }

    #[test]
    fn kept_values_are_read_as_written() {
        // Each JSON kind as the field's own parser hands it over: a negative integer is
        // kept (for validation to name it), not read as absent.
        let v = parse(
            "t",
            br#"{"hidden_size": -64, "vocab_size": 18446744073709551615, "rms_norm_eps": 1e-6,
                 "torch_dtype": "bf\u0031\u0036", "attention_bias": false,
                 "rope_scaling": {"type": "yarn", "factor": -2, "extra": [1, null]}}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "hidden_size": -64,
                "vocab_size": u64::MAX,
                "rms_norm_eps": 1e-6,
                "torch_dtype": "bf16",
                "attention_bias": false,
                "rope_scaling": {"type": "yarn", "factor": -2, "extra": [1, null]},
            })
        );
    }

    #[test]
    fn not_an_object_empty_or_oversized_fields_are_errors() {
        for (text, needle) in [
            (&b"[0, 0]"[..], "the top level is not a JSON object"),
            (
                b"hello",
                "it is not JSON (expected value at line 1 column 1)",
            ),
            (b"\xef\xbb\xbf{}", "starts with a UTF-8 byte-order mark"),
            (b"  ", "empty"),
            (b"{ nope", "t"),
            (
                b"{\"hidden_size\": 12,\n",
                "it ends before its JSON object does (EOF while parsing a value at the end of \
                 the file); is the file complete?",
            ),
            (
                b"{\"a\": [1",
                "(a: EOF while parsing a list at the end of the file)",
            ),
            (b"{} x", "trailing"),
            // Not UTF-8, even inside a field that is skipped unread.
            (
                b"{\"other\": \"caf\xe9\"}",
                "it is not UTF-8 text (save it as UTF-8): byte 0xE9 at line 1 column 15",
            ),
        ] {
            let e = parse("t", text).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let huge = format!(
            "{{\"mlp_layer_types\": [{}0]}}",
            "0,".repeat(MAX_FIELD_BYTES)
        );
        let e = parse("t", huge.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("mlp_layer_types") && e.contains("1 MiB"), "{e}");
        // The bound itself: a field of exactly MAX_FIELD_BYTES of JSON text is kept, one
        // byte more is not.
        let field = |bytes: usize| format!("{{\"mlp_layer_types\": [{}0]}}", " ".repeat(bytes - 3));
        assert_eq!(
            parse("t", field(MAX_FIELD_BYTES).as_bytes()).unwrap(),
            serde_json::json!({"mlp_layer_types": [0]})
        );
        let e = parse("t", field(MAX_FIELD_BYTES + 1).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("mlp_layer_types") && e.contains("1 MiB"), "{e}");
        let skipped = format!("{{\"other\": [{}0]}}", "0,".repeat(MAX_FIELD_BYTES));
        assert_eq!(
            parse("t", skipped.as_bytes()).unwrap(),
            serde_json::json!({})
        );
    }

    /// The error of `text`, without the source's name.
    fn error(text: &str) -> String {
        let e = parse("t", text.as_bytes()).unwrap_err().to_string();
        e.strip_prefix("cannot parse config t: ")
            .unwrap_or_else(|| panic!("{e}"))
            .to_owned()
    }

    /// The reader places its own errors by ending their messages with ` at line L
    /// column C`, which serde_json reads back as the error's position (and then does not
    /// add the position where the parser stands): pinned here, as the reader relies on it.
    #[test]
    fn serde_json_reads_a_custom_messages_position_back() {
        let e = <serde_json::Error as de::Error>::custom("x at line 3 column 7");
        assert_eq!(
            (e.line(), e.column(), e.to_string()),
            (3, 7, "x at line 3 column 7".into())
        );
    }

    /// Errors say where in the file they are, also inside a field's value (parsed again
    /// from its own text) and inside the nested config; a NaN or Infinity is named, where
    /// it is the error.
    #[test]
    fn errors_are_placed_in_the_file() {
        const NAN: &str =
            "is not a JSON number (JSON has no NaN or Infinity; write a finite number)";
        const RANGE: &str =
            "number out of range (beyond a 64-bit float's ±1.8e308; write a finite number)";
        for (text, expected) in [
            (
                "{\n  \"hidden_size\": 1e400}",
                format!("hidden_size: {RANGE} at line 2 column 22"),
            ),
            (
                "{\"x\": 1,\n \"rope_scaling\": {\"type\": \"yarn\",\n  \"factor\": 1e999}}",
                format!("rope_scaling: {RANGE} at line 3 column 17"),
            ),
            (
                "{\"language_config\": {\n \"rope_scaling\":\n {\"factor\": -1e999}}}",
                format!("language_config: rope_scaling: {RANGE} at line 3 column 18"),
            ),
            (
                "{\n \"hidden_size\": NaN}",
                format!("hidden_size: NaN {NAN} at line 2 column 17"),
            ),
            (
                "{\"vision\": [1,\n -Infinity]}",
                format!("vision: Infinity {NAN} at line 2 column 3"),
            ),
            // A word where no value may stand is not said to be a number.
            (
                "{\"vision\": [1 NaN]}",
                "vision: expected `,` or `]` at line 1 column 15".to_owned(),
            ),
            (
                "{\"vision\": {NaN: 1}}",
                "vision: key must be a string at line 1 column 13".to_owned(),
            ),
        ] {
            assert_eq!(error(text), expected, "{text}");
        }
        // A key that is not read may be anything: errors show its start.
        let long = "k".repeat(100_000);
        let e = error(&format!("{{\"{long}\": NaN}}"));
        assert!(e.starts_with(&format!("{}…: NaN ", "k".repeat(60))), "{e}");
        assert!(e.len() < 300, "{e}");
    }

    /// A field named twice is refused (serde_json, and Python's json, keep the last value
    /// silently), at the top level, in the nested config and in the rotary scaling's
    /// object (named with the objects it is in); a field modelmeter never reads may repeat.
    #[test]
    fn a_field_given_twice_is_an_error() {
        let twice = "is given twice (a config.json states each field once; Python's json \
                     would keep the last value without a word): remove one; see the second one";
        for (text, expected) in [
            (
                "{\"hidden_size\": 1,\n \"hidden_size\": 2}",
                format!("hidden_size {twice} at line 2 column 17"),
            ),
            (
                "{\"language_config\": {\"vocab_size\": 1, \"vocab_size\": 1}}",
                format!("language_config: vocab_size {twice} at line 1 column 53"),
            ),
            (
                "{\"rope_scaling\": {\"factor\": 2, \"factor\": 4}}",
                format!("rope_scaling: factor {twice} at line 1 column 39"),
            ),
            (
                "{\"rope_scaling\": {\"a\": [{\"b\": 1, \"b\": 2}]}}",
                format!("rope_scaling: a[0].b {twice} at line 1 column 36"),
            ),
            (
                "{\"text_config\": {}, \"text_config\": {}}",
                format!("text_config {twice} at line 1 column 36"),
            ),
        ] {
            assert_eq!(error(text), expected, "{text}");
        }
        assert_eq!(
            parse("t", br#"{"id2label": 1, "id2label": 2, "vocab_size": 3}"#).unwrap(),
            serde_json::json!({"vocab_size": 3})
        );
    }

    #[test]
    fn endless_and_large_inputs_stop_at_the_bound() {
        let e = read(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("/dev/zero") && e.contains("16 MiB"), "{e}");
        let e = read(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
    }

    #[test]
    fn a_file_of_exactly_the_bound_is_read_and_one_byte_more_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let bound = usize::try_from(MAX_CONFIG_BYTES).unwrap();
        std::fs::write(&path, vec![b' '; bound]).unwrap();
        assert_eq!(read(&path).unwrap().len(), bound);
        std::fs::write(&path, vec![b' '; bound + 1]).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("larger than 16 MiB"), "{e}");
    }
}
