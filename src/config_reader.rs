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

/// Whether [`crate::ModelConfig`] reads a field called `key` ([`LANGUAGE_FIELDS`],
/// [`ROPE_FIELDS`]).
pub(crate) fn is_read(key: &str) -> bool {
    LANGUAGE_FIELDS.contains(&key) || ROPE_FIELDS.contains(&key)
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
    let value = Filtered { nested: true }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| parse_error(e.to_string()))?;
    Ok(value)
}

/// A JSON object with only the fields modelmeter reads; `nested` also filters the
/// language model's nested config.
struct Filtered {
    nested: bool,
}

impl<'de> DeserializeSeed<'de> for Filtered {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Filtered {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let nested = self.nested && NESTED_KEYS.contains(&key.as_str());
            if !nested && !is_read(&key) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let raw: &'de RawValue = map.next_value()?;
            let is_object = raw.get().starts_with('{');
            let value = if nested && is_object {
                let mut de = serde_json::Deserializer::from_str(raw.get());
                Filtered { nested: false }
                    .deserialize(&mut de)
                    .map_err(|e| de::Error::custom(format!("{key}: {e}")))?
            } else if raw.get().len() > MAX_FIELD_BYTES {
                return Err(de::Error::custom(format!(
                    "field {key} holds {} bytes of JSON, more than the {} MiB any config.json field needs",
                    raw.get().len(),
                    MAX_FIELD_BYTES >> 20
                )));
            } else {
                serde_json::from_str(raw.get())
                    .map_err(|e| de::Error::custom(format!("{key}: {e}")))?
            };
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
            (b"{} x", "trailing"),
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
        let skipped = format!("{{\"other\": [{}0]}}", "0,".repeat(MAX_FIELD_BYTES));
        assert_eq!(
            parse("t", skipped.as_bytes()).unwrap(),
            serde_json::json!({})
        );
    }

    #[test]
    fn endless_and_large_inputs_stop_at_the_bound() {
        let e = read(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("/dev/zero") && e.contains("16 MiB"), "{e}");
        let e = read(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
    }
}
