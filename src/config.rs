//! Model configuration: a Hugging Face `config.json` of the DeepSeek-V2 family,
//! parsed and validated.
//!
//! Real checkpoints spell some keys differently; all of these are accepted:
//! - `n_routed_experts` or `num_experts`;
//! - `head_dim` explicit, or `hidden_size / num_attention_heads` (with MLA,
//!   `qk_rope_head_dim`, as transformers sets it);
//! - `first_k_dense_replace` + `moe_layer_freq`, or `mlp_layer_types` (`dense`/`sparse`);
//! - `num_key_value_heads` absent means equal to `num_attention_heads`;
//! - the language-model config nested under `language_config` or `text_config`
//!   (DeepSeek-OCR's checkpoint nests it);
//! - `rope_theta`, or `rope_parameters.rope_theta` (transformers 5);
//! - `torch_dtype` or `dtype`;
//! - MLA checkpoints with or without `use_mla` (DeepSeek-V2-Lite, V2 and V3 write none:
//!   a set `kv_lora_rank` means MLA), see [`crate::mla_config`];
//! - `rope_scaling` (YaRN, MLA configs only) or transformers 5's `rope_parameters`;
//! - the routing keys `scoring_func`, `topk_method`, `n_group`, `topk_group`
//!   ([`crate::routing`]).
//!
//! A file is read up to [`MAX_CONFIG_BYTES`], and only the fields above are parsed into
//! values; everything else is skipped unbuilt.

use serde::Serialize;
use serde_json::{Map, Value};
use std::path::Path;

use crate::config_reader::{self, is_read, IDENTITY_FIELDS, LANGUAGE_FIELDS, NESTED_KEYS};
use crate::dtype::{Dtype, MODEL_DTYPE_SPELLINGS};
use crate::error::{Error, Result};
use crate::mla_config::{self, MlaConfig, YarnScaling};
use crate::routing::{self, Routing};

pub use crate::config_reader::{MAX_CONFIG_BYTES, MAX_FIELD_BYTES};

/// A built-in configuration: `--config NAME` selects it.
#[derive(Clone, Copy, Debug)]
pub struct BuiltinConfig {
    pub name: &'static str,
    /// Its `config.json`, compiled in.
    pub json: &'static str,
    /// Where that file was when this crate was built (the crate's `fixtures/`): reports
    /// must not overwrite it when they run from the source tree.
    pub source: &'static str,
}

/// A [`BuiltinConfig`] from the `config.json` in `fixtures/$dir/`, named once for both
/// its text and its path.
macro_rules! builtin_config {
    ($name:expr, $dir:literal) => {
        BuiltinConfig {
            name: $name,
            json: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/",
                $dir,
                "/config.json"
            )),
            source: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/",
                $dir,
                "/config.json"
            ),
        }
    };
}

/// The name of the built-in default configuration.
pub const DEEPSEEK_OCR_NAME: &str = "deepseek-ocr-v1-base";

/// The built-in configurations, by name: `--config NAME` selects one. The files are the
/// language-model `config.json` of each checkpoint, written from its published values
/// (`fixtures/README.md`).
pub const BUILTIN_CONFIGS: [BuiltinConfig; 4] = [
    builtin_config!(DEEPSEEK_OCR_NAME, "deepseek-ocr"),
    builtin_config!("deepseek-v2-lite", "deepseek-v2-lite"),
    builtin_config!("deepseek-v2", "deepseek-v2"),
    builtin_config!("deepseek-v3", "deepseek-v3"),
];

/// The DeepSeek-OCR checkpoint's `config.json` (HF `deepseek-ai/DeepSeek-OCR`).
pub const DEEPSEEK_OCR_CONFIG_JSON: &str = default_builtin().json;

/// The built-in configuration used without `--config`: DeepSeek-OCR's, the first.
pub const fn default_builtin() -> &'static BuiltinConfig {
    &BUILTIN_CONFIGS[0]
}

/// The built-in configuration called `name`, if any.
pub fn builtin_named(name: &str) -> Option<&'static BuiltinConfig> {
    BUILTIN_CONFIGS.iter().find(|b| b.name == name)
}

/// The most decoder layers a config may have (DeepSeek-V2-family models have tens).
pub const MAX_LAYERS: u64 = 4096;

/// Which feed-forward block a decoder layer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MlpKind {
    /// `DeepseekV2MLP` of width `intermediate_size`.
    Dense,
    /// `DeepseekV2MoE`.
    Moe,
}

/// Mixture-of-experts settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoeConfig {
    /// E: routed experts.
    pub n_routed_experts: u64,
    /// k: experts each token is routed to.
    pub num_experts_per_tok: u64,
    /// m: width of each expert MLP.
    pub moe_intermediate_size: u64,
    /// Shared experts, run as one MLP of width `m · n_shared_experts` (0: none, the
    /// config's field null or absent; an explicit 0 is refused, see `moe_config`).
    pub n_shared_experts: u64,
    /// Renormalise the top-k weights (only when k > 1).
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    /// Scoring function and top-k method; left out of reports when it is DeepSeek-OCR's
    /// greedy softmax routing.
    #[serde(skip_serializing_if = "Routing::is_greedy_softmax")]
    pub routing: Routing,
}

impl MoeConfig {
    /// How a `config.json` states `n` shared experts: `null` for none. An explicit 0 is
    /// refused (the vendor runs a zero-width shared MLP for it), so code that writes configs
    /// (generators, tests) spells the count through this.
    pub fn n_shared_experts_field(n: u64) -> Option<u64> {
        (n > 0).then_some(n)
    }
}

/// A validated DeepSeek-V2-family language-model configuration: multi-head attention
/// (DeepSeek-OCR) or Multi-head Latent Attention (DeepSeek-V2, V2-Lite, V3).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Where the config came from (`deepseek-ocr-v1-base` or a file path).
    pub name: String,
    /// h
    pub hidden_size: u64,
    /// i: width of the dense MLP.
    pub intermediate_size: u64,
    /// `None` when the model has no routed experts.
    pub moe: Option<MoeConfig>,
    /// H
    pub num_attention_heads: u64,
    /// H_kv
    pub num_key_value_heads: u64,
    /// d: the head dim of multi-head attention (unused by MLA layers).
    pub head_dim: u64,
    /// Multi-head Latent Attention dimensions; `None` for multi-head attention.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mla: Option<MlaConfig>,
    pub num_hidden_layers: u64,
    /// The feed-forward kind of each layer, by index.
    pub layer_kinds: Vec<MlpKind>,
    /// V
    pub vocab_size: u64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// YaRN rotary scaling (MLA configs only); `None`: plain rotary embedding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<YarnScaling>,
    pub max_position_embeddings: Option<u64>,
    /// q/k/v/o projections carry biases.
    pub attention_bias: bool,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The checkpoint's dtype (`torch_dtype`).
    pub dtype: Dtype,
}

impl ModelConfig {
    /// The built-in DeepSeek-OCR language-model configuration (`deepseek-ocr-v1-base`).
    pub fn deepseek_ocr() -> ModelConfig {
        ModelConfig::from_json_str(DEEPSEEK_OCR_NAME, DEEPSEEK_OCR_CONFIG_JSON)
            .expect("the built-in DeepSeek-OCR config is valid (checked by tests)")
    }

    /// The built-in configuration called `name` (see [`BUILTIN_CONFIGS`]), if any.
    pub fn builtin(name: &str) -> Option<Result<ModelConfig>> {
        builtin_named(name).map(|b| ModelConfig::from_json_str(b.name, b.json))
    }

    /// The names of the built-in configurations, comma-separated (for messages).
    pub fn builtin_names() -> String {
        BUILTIN_CONFIGS.map(|b| b.name).join(", ")
    }

    /// The MLA dimensions, or an error saying this config uses multi-head attention.
    pub fn mla(&self) -> Result<&MlaConfig> {
        self.mla.as_ref().ok_or_else(|| {
            Error::missing(
                "kv_lora_rank",
                format!(
                    "an MLA layer needs use_mla: true and the MLA dimensions; config {} uses \
                 multi-head attention",
                    self.name
                ),
            )
        })
    }

    /// Reads and validates a `config.json` file: at most [`MAX_CONFIG_BYTES`] are read,
    /// and only the fields modelmeter uses are parsed into values.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = config_reader::read(path)?;
        let name = path.display().to_string();
        ModelConfig::from_json_value(&name, &config_reader::parse(&name, &text)?)
    }

    /// Parses and validates `config.json` text; `name` says where it came from. Fields
    /// modelmeter does not use are skipped without being built.
    pub fn from_json_str(name: &str, text: &str) -> Result<ModelConfig> {
        let value = config_reader::parse(name, text.as_bytes())?;
        ModelConfig::from_json_value(name, &value)
    }

    /// Validates an already parsed `config.json`; an error about a field names the
    /// config (`hidden_size = "1280" (config c.json) is invalid …`).
    pub fn from_json_value(name: &str, value: &Value) -> Result<ModelConfig> {
        ModelConfig::validated(name, value).map_err(|e| null_not_missing(e, value).in_config(name))
    }

    fn validated(name: &str, value: &Value) -> Result<ModelConfig> {
        let root = value.as_object().ok_or_else(|| Error::Parse {
            source_name: name.to_string(),
            message: "the top level is not a JSON object".to_string(),
        })?;
        let mut given = Vec::new();
        for key in NESTED_KEYS {
            match root.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Object(obj)) => given.push((key, obj)),
                Some(v) => {
                    return Err(Error::invalid(
                        key,
                        v,
                        "an object (the language model's nested config)",
                    ))
                }
            }
        }
        // Two language configs that differ in a field modelmeter reads: which one the model
        // runs is not ours to guess. (Fields it never reads may differ: a file's reader
        // drops them before this point, so a value built in code is judged the same way.)
        if let [(first, v), (second, w)] = given[..] {
            let read = |obj: &Map<String, Value>| -> Value {
                obj.iter()
                    .filter(|(k, v)| {
                        is_read(k) && !IDENTITY_FIELDS.contains(&k.as_str()) && !v.is_null()
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Map<String, Value>>()
                    .into()
            };
            if !same_json(&read(v), &read(w)) {
                return Err(Error::invalid(
                    second,
                    format!("an object unlike {first}"),
                    &format!("one nested language config: {first} or {second}, not both"),
                ));
            }
        }
        // A nested config that states none of the fields while the top level does (seen in
        // re-exported checkpoints: `"language_config": {}`) would be refused for its first
        // missing field, which the top level has: say what is wrong instead. Which one the
        // model runs is as ambiguous as below (transformers would take its defaults).
        if let Some((nested, obj)) = given.first() {
            let states = |o: &Map<String, Value>| {
                o.iter()
                    .any(|(k, v)| LANGUAGE_FIELDS.contains(&k.as_str()) && !v.is_null())
            };
            if !states(obj) && states(root) {
                return Err(Error::invalid(
                    nested,
                    "an object with none of the language model's fields",
                    &format!(
                        "the language model's config, or no {nested} at all: the top level states \
                         the fields, but transformers reads {nested} and would take its \
                         defaults; remove the empty {nested} or fill it"
                    ),
                ));
            }
        }
        if let Some((nested, obj)) = given.first() {
            top_level_only(root, nested, obj)?;
        }
        let obj = given.first().map_or(root, |(_, obj)| *obj);
        model_family(root, obj)?;
        let cfg = Fields { obj, within: None };

        let mla = mla_config::mla_config(&cfg)?;
        let hidden_act = cfg.string("hidden_act")?.unwrap_or_else(|| "silu".into());
        if hidden_act != "silu" {
            return Err(unsupported(
                "hidden_act",
                &hidden_act,
                "only silu (the DeepSeek-V2 activation) is modelled",
            ));
        }

        let hidden_size = cfg.required_size("hidden_size")?;
        let num_hidden_layers = cfg.required_size("num_hidden_layers")?;
        if num_hidden_layers > MAX_LAYERS {
            return Err(Error::invalid(
                "num_hidden_layers",
                num_hidden_layers,
                &format!("1 ..= {MAX_LAYERS} (the stack is costed layer by layer)"),
            ));
        }
        let intermediate_size = cfg.required_size("intermediate_size")?;
        let vocab_size = cfg.required_size("vocab_size")?;
        let (num_attention_heads, num_key_value_heads, head_dim) =
            attention_shape(&cfg, hidden_size, mla.as_ref())?;
        let moe = moe_config(&cfg)?;
        let layer_kinds = layer_kinds(&cfg, num_hidden_layers, moe.is_some())?;
        let rope_scaling = mla_config::rope_scaling(&cfg, mla.is_some())?;
        let rope_theta = rope_theta(&cfg)?;
        let rms_norm_eps = cfg.positive_float("rms_norm_eps")?.unwrap_or(1e-6);
        let dtype = model_dtype(&cfg, given.first().map(|(nested, _)| &**nested), root)?;
        // The top level beside a nested config: where both state a field modelmeter reads,
        // they must agree (checked after the fields are read, so that a value of the wrong
        // type is named as such first; see `top_level_only` for a field only the top level
        // states).
        if let Some((nested, obj)) = given.first() {
            for (key, top) in compared_at_the_top(root) {
                if let Some(inner) = obj.get(key).filter(|v| !v.is_null()) {
                    if !same_json(top, inner) {
                        return Err(Error::invalid(
                            key,
                            top,
                            &format!(
                                "the value of {nested}.{key} ({inner}), or one of the two left out: \
                                 DeepSeek-OCR's model class reads the top level, transformers' the \
                                 nested {nested}, and modelmeter does not guess which one runs"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(ModelConfig {
            name: name.to_string(),
            hidden_size,
            intermediate_size,
            moe,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            mla,
            num_hidden_layers,
            layer_kinds,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: cfg.size("max_position_embeddings")?,
            attention_bias: cfg.boolean("attention_bias")?.unwrap_or(false),
            tie_word_embeddings: cfg.boolean("tie_word_embeddings")?.unwrap_or(false),
            dtype,
        })
    }

    /// The feed-forward kind of layer `index`.
    pub fn layer_kind(&self, index: u64) -> Result<MlpKind> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.layer_kinds.get(i).copied())
            .ok_or_else(|| {
                Error::invalid(
                    "layer index",
                    index,
                    &format!(
                        "0 ..= {} (num_hidden_layers - 1)",
                        self.num_hidden_layers - 1
                    ),
                )
            })
    }

    /// The first layer index with feed-forward kind `kind`, if any.
    pub fn first_layer_of(&self, kind: MlpKind) -> Option<u64> {
        self.layer_kinds
            .iter()
            .position(|k| *k == kind)
            .map(|i| i as u64)
    }

    /// The model cut to its first `layers` decoder layers, each keeping its dense/MoE
    /// kind (`verify-decoder --model --num-layers`). `layers` must be in
    /// 1 ..= num_hidden_layers.
    pub fn first_layers(&self, layers: u64) -> Result<ModelConfig> {
        if !(1..=self.num_hidden_layers).contains(&layers) {
            return Err(Error::invalid(
                "--num-layers",
                layers,
                &format!(
                    "1 ..= {} (num_hidden_layers of config {})",
                    self.num_hidden_layers, self.name
                ),
            ));
        }
        let mut cut = self.clone();
        cut.num_hidden_layers = layers;
        cut.layer_kinds.truncate(layers as usize);
        Ok(cut)
    }

    /// The MoE settings, or an error saying this config has no routed experts.
    pub fn moe(&self) -> Result<&MoeConfig> {
        self.moe.as_ref().ok_or_else(|| {
            Error::missing(
                "n_routed_experts",
                "an MoE layer needs routed experts (n_routed_experts or num_experts ≥ 1)",
            )
        })
    }
}

/// A field modelmeter reads that the top level beside the nested config `nested` (`obj`)
/// states and the nested one leaves out: DeepSeek-OCR's model class reads the
/// language-model keys from the top level (its published config repeats them there),
/// transformers' classes read the nested object, which takes its default for it; the
/// number would be the one model's and not the other's. Checked before any field is read,
/// so that a required field the top level alone states is named as such, not as missing
/// (the dtype aside: `model_dtype` reads both levels, as transformers takes a checkpoint's
/// dtype from its top level).
fn top_level_only(root: &Map<String, Value>, nested: &str, obj: &Map<String, Value>) -> Result<()> {
    for (key, top) in compared_at_the_top(root) {
        if obj.get(key).map_or(true, Value::is_null) {
            return Err(Error::invalid(
                key,
                top,
                &format!(
                    "no value at the top level unless {nested}.{key} states it too \
                     ({nested} leaves it out, so it takes its default there): \
                     DeepSeek-OCR's model class reads the top level, transformers' the \
                     nested {nested}, and modelmeter does not guess which one runs; \
                     write it in {nested} as well, or remove it"
                ),
            ));
        }
    }
    Ok(())
}

/// The `model_type` of a DeepSeek-V2-family language model (DeepSeek-V2, V2-Lite, V3 and
/// DeepSeek-OCR's language model; transformers' DeepSeek-OCR-2 text model).
const LANGUAGE_MODEL_TYPES: [&str; 3] = ["deepseek_v2", "deepseek_v3", "deepseek_ocr2_text"];

/// The `model_type` of a multimodal checkpoint whose language model is one of those
/// (DeepSeek-OCR and DeepSeek-VL2; DeepSeek-OCR-2).
const WRAPPER_MODEL_TYPES: [&str; 2] = ["deepseek_vl_v2", "deepseek_ocr2"];

/// Model classes of that family, for a checkpoint whose own `model_type` names it
/// otherwise (Kimi K2: `kimi_k2`, `DeepseekV3ForCausalLM`).
const FAMILY_ARCHITECTURES: [&str; 3] = [
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "DeepseekOCRForCausalLM",
];

/// Refuses a config of another model family, which would otherwise be read field by field
/// as a DeepSeek-V2 one and give numbers of a model nobody runs (Mixtral's
/// `num_local_experts` is not a field of this family: its experts would be dropped). The
/// language level's `model_type` (or, in a multimodal checkpoint, the top level's) must
/// name the family, or `architectures` one of its classes; a hand-written config that
/// states neither is taken as it is.
fn model_family(root: &Map<String, Value>, language: &Map<String, Value>) -> Result<()> {
    let given =
        |obj: &Map<String, Value>, key: &str| obj.get(key).filter(|v| !v.is_null()).cloned();
    let model_type = given(language, "model_type").or_else(|| given(root, "model_type"));
    let model_type = match model_type {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(v) => {
            return Err(Error::invalid(
                "model_type",
                &v,
                "a string naming the model family (deepseek_v2, deepseek_v3 …)",
            ))
        }
    };
    if model_type
        .as_deref()
        .is_some_and(|t| LANGUAGE_MODEL_TYPES.contains(&t) || WRAPPER_MODEL_TYPES.contains(&t))
    {
        return Ok(());
    }
    let mut architectures = Vec::new();
    // The top level once, where it is the language level too.
    let levels = if std::ptr::eq(language, root) {
        &[language][..]
    } else {
        &[language, root][..]
    };
    for obj in levels {
        match given(obj, "architectures") {
            None => {}
            Some(Value::Array(items)) => architectures.extend(items),
            Some(v) => {
                return Err(Error::invalid(
                    "architectures",
                    &v,
                    "a list of model class names ([\"DeepseekV2ForCausalLM\"] …)",
                ))
            }
        }
    }
    let family_class = architectures.iter().any(|a| {
        a.as_str()
            .is_some_and(|a| FAMILY_ARCHITECTURES.contains(&a))
    });
    if family_class || (model_type.is_none() && architectures.is_empty()) {
        return Ok(());
    }
    let family = format!(
        "modelmeter models the DeepSeek-V2 family only: model_type {} (or a multimodal {} \
         whose language_config is one), or architectures naming {}; give such a config",
        LANGUAGE_MODEL_TYPES.join(", "),
        WRAPPER_MODEL_TYPES.join(" or "),
        FAMILY_ARCHITECTURES.join(", ")
    );
    Err(match model_type {
        Some(t) => unsupported("model_type", &format!("{t:?}"), &family),
        None => unsupported(
            "architectures",
            &Value::Array(architectures).to_string(),
            &family,
        ),
    })
}

/// A required field the config gives as `null` is named so (`n_group = null … is
/// invalid`), not as missing: the readers take `null` as not given, as the vendor code's
/// `getattr(config, key, None)` does, but the user wrote the key.
fn null_not_missing(e: Error, value: &Value) -> Error {
    let Error::Missing {
        field, expected, ..
    } = &e
    else {
        return e;
    };
    // The fields are read from the nested language config when there is one.
    let language = NESTED_KEYS
        .iter()
        .find_map(|key| value.get(key).filter(|v| v.is_object()))
        .unwrap_or(value);
    let at = field.split('.').try_fold(language, |v, part| v.get(part));
    match at {
        Some(Value::Null) => Error::invalid(field, "null", expected),
        _ => e,
    }
}

/// The top level's fields that a nested config must repeat, and agree with: those
/// modelmeter reads, stated (not null), but the dtype (`model_dtype` reads both levels).
fn compared_at_the_top(root: &Map<String, Value>) -> impl Iterator<Item = (&String, &Value)> {
    root.iter().filter(|(key, top)| {
        LANGUAGE_FIELDS.contains(&key.as_str())
            && !top.is_null()
            && !matches!(key.as_str(), "torch_dtype" | "dtype")
    })
}

/// Whether two JSON values state the same thing: numbers by value (`1`, `1.0` and `1e0`
/// are one number, as Python reads them), objects key by key, arrays item by item.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// The checkpoint dtype: `torch_dtype` (transformers 4) or `dtype` (transformers 5), in the
/// language model's config or at the top level; bf16 when none is given. Every one given
/// must be a valid dtype string, and all must name the same dtype: which spelling or level
/// a loader reads first is not modelmeter's to guess.
///
/// `nested` is the key of the nested config `cfg` reads (`language_config`), if any: errors
/// name its fields with it, so that two levels' `torch_dtype` are told apart.
fn model_dtype(cfg: &Fields, nested: Option<&str>, root: &Map<String, Value>) -> Result<Dtype> {
    let mut found: Option<(String, &String, Dtype)> = None;
    for key in ["torch_dtype", "dtype"] {
        let in_cfg = match nested {
            Some(nested) => format!("{nested}.{key}"),
            None => key.to_string(),
        };
        let values = [
            (in_cfg, cfg.present(key)),
            (key.to_string(), root.get(key).filter(|v| !v.is_null())),
        ];
        for (key, value) in values.into_iter().filter_map(|(k, v)| Some((k, v?))) {
            let key = key.as_str();
            let Value::String(text) = value else {
                return Err(Error::invalid(
                    key,
                    value,
                    &format!("a string: {MODEL_DTYPE_SPELLINGS}"),
                ));
            };
            let dtype = Dtype::parse_model(key, text)?;
            match found {
                Some((ref first, first_text, first_dtype)) if first_dtype != dtype => {
                    return Err(Error::invalid(
                        key,
                        text,
                        &format!(
                            "the dtype {first} gives ({first_text}), or one of the two left out: \
                             modelmeter does not guess which one the model is loaded in"
                        ),
                    ))
                }
                Some(_) => {}
                None => found = Some((key.to_string(), text, dtype)),
            }
        }
    }
    Ok(found.map_or(Dtype::Bf16, |(_, _, dtype)| dtype))
}

pub(crate) fn unsupported(field: &str, value: &str, reason: &str) -> Error {
    Error::Unsupported {
        field: field.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// Typed access to the fields of one JSON object, with errors that name the field.
pub(crate) struct Fields<'a> {
    pub(crate) obj: &'a Map<String, Value>,
    /// The key of the object itself when it is nested (`rope_scaling`), so that an error
    /// names `rope_scaling.type`, not a `type` the top level does not have.
    pub(crate) within: Option<&'a str>,
}

impl Fields<'_> {
    /// How errors name `key`: with the object's own key in front when it is nested.
    fn named(&self, key: &str) -> String {
        match self.within {
            Some(within) => format!("{within}.{key}"),
            None => key.to_string(),
        }
    }

    /// The rotary parameters both readers take: `rope_scaling` when given (the vendor
    /// code reads nothing else; transformers 5 takes `rope_scaling or rope_parameters`),
    /// else transformers 5's `rope_parameters`. Returns its key, its value and its fields
    /// (errors name them with the key); `None` without either.
    pub(crate) fn rotary_parameters(&self) -> Result<Option<(&'static str, &Value, Fields<'_>)>> {
        let Some((key, params)) = ["rope_scaling", "rope_parameters"]
            .into_iter()
            .find_map(|key| self.present(key).map(|v| (key, v)))
        else {
            return Ok(None);
        };
        let obj = params
            .as_object()
            .ok_or_else(|| Error::invalid(key, params, "an object"))?;
        Ok(Some((
            key,
            params,
            Fields {
                obj,
                within: Some(key),
            },
        )))
    }

    pub(crate) fn present(&self, key: &str) -> Option<&Value> {
        debug_assert!(
            is_read(key),
            "{key} must be listed in config_reader's fields, or files will never supply it"
        );
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A non-negative integer; `min` is the smallest valid value.
    pub(crate) fn integer(&self, key: &str, min: u64) -> Result<Option<u64>> {
        let Some(v) = self.present(key) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            // JSON reads a number past 64 bits as a float: say it is too large, not that
            // it is not an integer.
            _ if v.as_f64().is_some_and(|x| x >= u64::MAX as f64) => Err(Error::invalid(
                &self.named(key),
                v,
                &format!("an integer ≥ {min}; this one does not fit in 64 bits"),
            )),
            _ => Err(Error::invalid(
                &self.named(key),
                v,
                &format!("an integer ≥ {min}"),
            )),
        }
    }

    pub(crate) fn size(&self, key: &str) -> Result<Option<u64>> {
        self.integer(key, 1)
    }

    pub(crate) fn count(&self, key: &str) -> Result<Option<u64>> {
        self.integer(key, 0)
    }

    pub(crate) fn required_size(&self, key: &str) -> Result<u64> {
        self.size(key)?
            .ok_or_else(|| Error::missing(self.named(key), "an integer ≥ 1"))
    }

    pub(crate) fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::invalid(&self.named(key), v, "true or false")),
        }
    }

    pub(crate) fn positive_float(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(Error::invalid(&self.named(key), v, "a finite number > 0")),
            },
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<String>> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(Error::invalid(&self.named(key), v, "a string")),
        }
    }
}

/// Heads, KV heads and the head dim. An MLA config's attention has its own head dims
/// (`mla`), so its `head_dim` is what transformers' `DeepseekV2Config` makes it,
/// `qk_rope_head_dim`, unless given: `hidden_size / heads` is not asked to divide or be
/// even there (the vendor MLA never reads it).
fn attention_shape(
    cfg: &Fields,
    hidden_size: u64,
    mla: Option<&MlaConfig>,
) -> Result<(u64, u64, u64)> {
    let heads = cfg.required_size("num_attention_heads")?;
    let kv_heads = cfg.size("num_key_value_heads")?.unwrap_or(heads);
    if heads % kv_heads != 0 {
        let expected = if heads <= 4096 {
            let divisors: Vec<String> = (1..=heads)
                .filter(|d| heads % d == 0)
                .map(|d| d.to_string())
                .collect();
            format!(
                "a divisor of num_attention_heads ({heads}): {}",
                divisors.join(", ")
            )
        } else {
            format!("a divisor of num_attention_heads ({heads})")
        };
        return Err(Error::invalid("num_key_value_heads", kv_heads, &expected));
    }
    if let Some(mla) = mla {
        let head_dim = cfg.size("head_dim")?.unwrap_or(mla.qk_rope_head_dim);
        return Ok((heads, kv_heads, head_dim));
    }
    let head_dim = match cfg.size("head_dim")? {
        Some(d) => d,
        None if hidden_size % heads == 0 => hidden_size / heads,
        None => {
            return Err(Error::invalid(
                "hidden_size",
                hidden_size,
                &format!("a multiple of num_attention_heads ({heads}) when head_dim is not given"),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(Error::invalid(
            "head_dim",
            head_dim,
            "an even number (rotary embedding rotates pairs of dimensions)",
        ));
    }
    Ok((heads, kv_heads, head_dim))
}

fn moe_config(cfg: &Fields) -> Result<Option<MoeConfig>> {
    let routed = cfg.count("n_routed_experts")?;
    let alias = cfg.count("num_experts")?;
    let experts = match (routed, alias) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::invalid(
                "num_experts",
                b,
                &format!("the same value as n_routed_experts ({a}) when both are given"),
            ))
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => 0,
    };
    if experts == 0 {
        // The vendor code builds MoE layers whenever n_routed_experts is set, and an MoE
        // of no experts cannot route: a written 0 beside experts per token contradicts
        // itself (null or absent is how a dense model says it).
        if let (Some(0), Some(k)) = (routed.or(alias), cfg.size("num_experts_per_tok")?) {
            let key = if routed.is_some() {
                "n_routed_experts"
            } else {
                "num_experts"
            };
            return Err(Error::invalid(
                key,
                0,
                &format!("≥ num_experts_per_tok ({k}), or null for a dense model (the vendor code builds MoE layers whenever it is set)"),
            ));
        }
        return Ok(None);
    }
    let k = cfg.required_size("num_experts_per_tok")?;
    if k > experts {
        return Err(Error::invalid(
            "num_experts_per_tok",
            k,
            &format!("1 ..= n_routed_experts ({experts})"),
        ));
    }
    let routing = routing::routing(cfg, experts)?;
    Ok(Some(MoeConfig {
        n_routed_experts: experts,
        num_experts_per_tok: k,
        moe_intermediate_size: cfg.required_size("moe_intermediate_size")?,
        n_shared_experts: match cfg.count("n_shared_experts")? {
            // The vendor `DeepseekV2MoE` tests `is not None`: for 0 it builds and runs a
            // shared MLP of width 0 and adds its (zero) output, ops not modelled here.
            Some(0) => {
                return Err(unsupported(
                    "n_shared_experts",
                    "0",
                    "the vendor DeepseekV2MoE runs a zero-width shared MLP for 0 (it tests `is not None`), which is not modelled; leave the field out or null for no shared experts, or give 1 or more",
                ))
            }
            n => n.unwrap_or(0),
        },
        norm_topk_prob: cfg.boolean("norm_topk_prob")?.unwrap_or(false),
        routed_scaling_factor: cfg.positive_float("routed_scaling_factor")?.unwrap_or(1.0),
        routing,
    }))
}

fn layer_kinds(cfg: &Fields, layers: u64, has_moe: bool) -> Result<Vec<MlpKind>> {
    let first_dense = cfg.count("first_k_dense_replace")?;
    let freq = cfg.size("moe_layer_freq")?;
    let by_rule = (0..layers)
        .map(|i| {
            if has_moe && i >= first_dense.unwrap_or(0) && i % freq.unwrap_or(1) == 0 {
                MlpKind::Moe
            } else {
                MlpKind::Dense
            }
        })
        .collect::<Vec<_>>();
    let Some(types) = cfg.present("mlp_layer_types") else {
        return Ok(by_rule);
    };
    let list = types.as_array().ok_or_else(|| {
        Error::invalid(
            "mlp_layer_types",
            types,
            "a list of \"dense\" or \"sparse\"",
        )
    })?;
    if list.len() as u64 != layers {
        return Err(Error::invalid(
            "mlp_layer_types",
            format!("a list of {} entries", list.len()),
            &format!("one entry per layer (num_hidden_layers = {layers})"),
        ));
    }
    let kinds = list
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            Some("dense") => Ok(MlpKind::Dense),
            Some("sparse") if has_moe => Ok(MlpKind::Moe),
            Some("sparse") => Err(Error::invalid(
                &format!("mlp_layer_types[{i}]"),
                v,
                "\"dense\" (this config has no routed experts)",
            )),
            _ => Err(Error::invalid(
                &format!("mlp_layer_types[{i}]"),
                v,
                "\"dense\" or \"sparse\"",
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    // Both spellings given: they must describe the same layers.
    if (first_dense.is_some() || freq.is_some()) && kinds != by_rule {
        return Err(Error::invalid(
            "mlp_layer_types",
            types,
            "the layers that first_k_dense_replace and moe_layer_freq describe (or give only one of the two spellings)",
        ));
    }
    Ok(kinds)
}

/// The rotary base: `rope_theta`, or the one the rotary parameters transformers 5 reads
/// state (`rope_scaling` when given, else `rope_parameters`); both stated, they agree.
/// Scaled rotary embedding is read by [`mla_config::rope_scaling`].
fn rope_theta(cfg: &Fields) -> Result<f64> {
    let top = cfg.positive_float("rope_theta")?;
    // transformers 5 takes its rotary parameters' `rope_theta`, and the top level's where
    // they state none; the vendor code reads the top level alone.
    let Some((key, _, params)) = cfg.rotary_parameters()? else {
        return Ok(top.unwrap_or(10_000.0));
    };
    let Some(theta) = params.positive_float("rope_theta")? else {
        return Ok(top.unwrap_or(10_000.0));
    };
    // Both stated: they must agree.
    if let Some(top) = top.filter(|&top| top != theta) {
        return Err(Error::invalid(
            &format!("{key}.rope_theta"),
            theta,
            &format!(
                "{top}, as rope_theta says, or one of the two left out: the vendor code reads \
                 rope_theta, transformers 5 {key}.rope_theta, and modelmeter does not guess \
                 which one runs"
            ),
        ));
    }
    Ok(theta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_layers_keep_the_dense_moe_pattern() {
        let c = ModelConfig::deepseek_ocr();
        let cut = c.first_layers(3).unwrap();
        assert_eq!(cut.num_hidden_layers, 3);
        assert_eq!(
            cut.layer_kinds,
            [MlpKind::Dense, MlpKind::Moe, MlpKind::Moe],
            "first_k_dense_replace = 1"
        );
        assert_eq!(c.first_layers(12).unwrap(), c);
        for bad in [0, 13] {
            let e = c.first_layers(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("--num-layers = {bad}")) && e.contains("1 ..= 12"),
                "{e}"
            );
        }
    }
    use serde_json::json;

    fn base() -> Value {
        json!({
            "hidden_size": 1280,
            "intermediate_size": 6848,
            "moe_intermediate_size": 896,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "num_attention_heads": 10,
            "num_key_value_heads": 10,
            "num_hidden_layers": 12,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "vocab_size": 129280,
            "use_mla": false,
            "topk_method": "greedy",
            "torch_dtype": "bfloat16"
        })
    }

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json_value("test", &v)
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }

    fn without(key: &str) -> Value {
        let mut v = base();
        v.as_object_mut().unwrap().remove(key);
        v
    }

    /// The validation error of `v`, without the config's name (checked once, below).
    fn err(v: Value) -> String {
        ModelConfig::validated("test", &v).unwrap_err().to_string()
    }

    #[test]
    fn configs_of_other_families_are_refused() {
        // The family's model types, at the language level or a multimodal top level, and
        // its classes under another model_type (Kimi K2) are read; so is a config that
        // names no family at all (hand-written).
        for (model_type, architectures) in [
            (json!("deepseek_v2"), json!(null)),
            (json!("deepseek_v3"), json!(["Other"])),
            (json!("deepseek_ocr2_text"), json!(null)),
            (json!("kimi_k2"), json!(["DeepseekV3ForCausalLM"])),
            (json!(null), json!(null)),
            (json!(null), json!(["DeepseekV2ForCausalLM"])),
        ] {
            let mut v = with("model_type", model_type.clone());
            v["architectures"] = architectures;
            assert_eq!(parse(v).unwrap(), parse(base()).unwrap(), "{model_type}");
        }
        for wrapper in ["deepseek_vl_v2", "deepseek_ocr2"] {
            let nested = json!({"model_type": wrapper, "language_config": base()});
            assert_eq!(parse(nested).unwrap(), parse(base()).unwrap(), "{wrapper}");
        }
        // The nested language model's own type decides.
        let mut other = base();
        other["model_type"] = json!("llama");
        let e = err(json!({"model_type": "deepseek_vl_v2", "language_config": other}));
        assert!(e.starts_with("model_type = \"llama\" is not supported: modelmeter models the DeepSeek-V2 family only"), "{e}");
        // Another family, or a DeepSeek model of another architecture (V3.2's sparse
        // attention), by its model_type or, without one, its classes.
        for (model_type, architectures, named) in [
            (
                json!("mixtral"),
                json!(["MixtralForCausalLM"]),
                "model_type = \"mixtral\"",
            ),
            (
                json!("deepseek_v32"),
                json!(["DeepseekV32ForCausalLM"]),
                "model_type = \"deepseek_v32\"",
            ),
            (
                json!(null),
                json!(["Qwen2MoeForCausalLM"]),
                "architectures = [\"Qwen2MoeForCausalLM\"]",
            ),
        ] {
            let mut v = with("model_type", model_type);
            v["architectures"] = architectures;
            let e = err(v);
            assert!(e.starts_with(&format!("{named} is not supported: ")), "{e}");
            assert!(e.ends_with("give such a config"), "{e}");
        }
        let e = err(with("model_type", json!(5)));
        assert!(
            e.starts_with("model_type = 5 is invalid: expected a string"),
            "{e}"
        );
        let e = err(with("architectures", json!("DeepseekV2ForCausalLM")));
        assert!(
            e.starts_with("architectures = \"DeepseekV2ForCausalLM\" is invalid: expected a list"),
            "{e}"
        );
    }

    #[test]
    fn mla_dimensions_without_use_mla_or_kv_lora_rank_are_refused() {
        // The vendor config would default kv_lora_rank to 512 (MLA); modelmeter reads
        // multi-head attention: which one is meant is asked, not guessed.
        let mut v = without("use_mla");
        v["qk_nope_head_dim"] = json!(128);
        let e = err(v.clone());
        assert!(
            e.starts_with(
                "kv_lora_rank is missing from the config: the config sets qk_nope_head_dim = 128"
            ),
            "{e}"
        );
        // Either answer is read; DeepSeek-OCR's zeros beside use_mla: false are no question.
        v["use_mla"] = json!(false);
        assert!(parse(v.clone()).unwrap().mla.is_none());
        let mut zeros = without("use_mla");
        for key in ["qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"] {
            zeros[key] = json!(0);
        }
        zeros["q_lora_rank"] = json!(null);
        assert!(parse(zeros).unwrap().mla.is_none());
    }

    #[test]
    fn integers_past_64_bits_are_called_too_large() {
        // JSON reads 2^64 as a float; the message says what is wrong with it.
        let e = err(with("hidden_size", json!(18446744073709551616.0)));
        assert!(
            e.contains("expected an integer ≥ 1; this one does not fit in 64 bits"),
            "{e}"
        );
        // A fraction is not an integer, whatever its size.
        let e = err(with("hidden_size", json!(1280.5)));
        assert!(e.ends_with("expected an integer ≥ 1"), "{e}");
    }

    #[test]
    fn field_errors_name_the_config_they_come_from() {
        let named = |v: Value| {
            ModelConfig::from_json_value("c.json", &v)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            named(with("hidden_size", json!("1280"))),
            "hidden_size = \"1280\" (config c.json) is invalid: expected an integer ≥ 1"
        );
        assert!(named(without("hidden_size"))
            .starts_with("hidden_size is missing from config c.json: "));
        // Given as null: named so, not as missing, at the top level and in a nested config.
        assert!(named(with("hidden_size", Value::Null))
            .starts_with("hidden_size = null (config c.json) is invalid: expected an integer ≥ 1"));
        let nested = json!({"language_config": with("hidden_size", Value::Null)});
        assert!(named(nested).starts_with("hidden_size = null (config c.json) is invalid"));
        assert!(named(with("hidden_act", json!("gelu")))
            .starts_with("hidden_act = gelu (config c.json) is not supported"));
        // No shared experts is null or absent; 0 would make the vendor code run a
        // zero-width shared MLP, which is refused rather than modelled as none.
        let zero = named(with("n_shared_experts", json!(0)));
        assert!(
            zero.starts_with("n_shared_experts = 0 (config c.json) is not supported")
                && zero.contains("null"),
            "{zero}"
        );
        for none in [
            with("n_shared_experts", Value::Null),
            without("n_shared_experts"),
        ] {
            let c = ModelConfig::from_json_value("c.json", &none).unwrap();
            assert_eq!(c.moe.unwrap().n_shared_experts, 0);
        }
        // The same errors from a config not read from a file say "the config".
        assert!(ModelConfig::deepseek_ocr()
            .mla()
            .unwrap_err()
            .to_string()
            .starts_with("kv_lora_rank is missing from the config: "));
    }

    #[test]
    fn builtin_deepseek_ocr_matches_the_facts() {
        let c = ModelConfig::deepseek_ocr();
        assert_eq!(c.name, "deepseek-ocr-v1-base");
        assert_eq!((c.hidden_size, c.intermediate_size), (1280, 6848));
        let moe = c.moe.as_ref().unwrap();
        assert_eq!(
            (
                moe.n_routed_experts,
                moe.n_shared_experts,
                moe.num_experts_per_tok,
                moe.moe_intermediate_size
            ),
            (64, 2, 6, 896)
        );
        assert!(!moe.norm_topk_prob);
        assert_eq!(moe.routed_scaling_factor, 1.0);
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (10, 10, 128)
        );
        assert_eq!(c.num_hidden_layers, 12);
        assert_eq!(c.layer_kinds[0], MlpKind::Dense);
        assert!(c.layer_kinds[1..].iter().all(|k| *k == MlpKind::Moe));
        assert_eq!(c.vocab_size, 129280);
        assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-6, 10000.0));
        assert_eq!(c.max_position_embeddings, Some(8192));
        assert_eq!(c.dtype, Dtype::Bf16);
        assert!(!c.attention_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn the_top_level_beside_a_nested_config_must_agree_with_it() {
        let flat = parse(base()).unwrap();
        // DeepSeek-OCR's published config repeats the language keys at the top level.
        let mut copied = base();
        copied["language_config"] = base();
        assert_eq!(parse(copied.clone()).unwrap(), flat);
        // The same number however it is written; fields modelmeter never reads may differ.
        let mut spelled = copied.clone();
        spelled["routed_scaling_factor"] = json!(1);
        spelled["language_config"]["routed_scaling_factor"] = json!(1.0);
        spelled["rms_norm_eps"] = json!(1e-6);
        spelled["language_config"]["rms_norm_eps"] = json!(0.000001);
        spelled["architectures"] = json!(["DeepseekOCRForCausalLM"]);
        assert_eq!(parse(spelled).unwrap(), flat);
        // A field the nested object leaves out, or a null one, is not a disagreement.
        let mut partial = json!({"hidden_size": 1280, "intermediate_size": null});
        partial["language_config"] = base();
        assert_eq!(parse(partial).unwrap(), flat);
        // Two values for one field: refused, naming the field, both values and the fix.
        for (key, value) in [
            ("hidden_size", json!(2560)),
            ("num_experts_per_tok", json!(8)),
            ("rope_theta", json!(50000.0)),
        ] {
            let mut differing = copied.clone();
            differing["language_config"]["rope_theta"] = json!(10000);
            differing[key] = value.clone();
            let e = err(differing);
            assert!(
                e.starts_with(&format!("{key} = {value} ")) && e.contains("is invalid"),
                "{e}"
            );
            assert!(
                e.contains(&format!("language_config.{key}")) && e.contains("left out"),
                "{e}"
            );
        }
        // A field only the top level states: one reader's value, the other's default.
        // Refused, naming it and the fix; the dtype is read from both levels, and the
        // rotary scaling's inner keys are read by nobody at the top level.
        // Required fields among them: named as the top level's alone, not as missing.
        for (key, value) in [
            ("n_shared_experts", json!(2)),
            ("rope_theta", json!(50000.0)),
            ("vocab_size", json!(129280)),
            ("hidden_size", json!(1280)),
        ] {
            // The nested config leaves it out, or states null.
            for removed in [true, false] {
                let mut top_only = json!({ key: value.clone() });
                top_only["language_config"] = base();
                let inner = top_only["language_config"].as_object_mut().unwrap();
                if removed {
                    inner.remove(key);
                } else {
                    inner.insert(key.into(), Value::Null);
                }
                let e = err(top_only);
                assert!(
                    e.starts_with(&format!("{key} = {value} "))
                        && e.contains(&format!("unless language_config.{key} states it too"))
                        && e.contains("write it in language_config as well, or remove it"),
                    "{e}"
                );
            }
        }
        // An empty nested config beside a top level that states the fields: said as such,
        // not as a missing hidden_size.
        let mut empty = base();
        empty["language_config"] = json!({"architectures": ["DeepseekV2ForCausalLM"]});
        let e = err(empty);
        assert!(
            e.starts_with("language_config = an object with none of the language model's fields")
                && e.contains("remove the empty language_config or fill it"),
            "{e}"
        );
        let mut dtype = json!({"torch_dtype": "float32", "beta_fast": 32});
        dtype["language_config"] = base();
        dtype["language_config"]["torch_dtype"] = Value::Null;
        assert_eq!(parse(dtype.clone()).unwrap().dtype, Dtype::F32);
        // The dtype given twice: the same dtype however spelled, or refused.
        dtype["language_config"]["dtype"] = json!("torch.float32");
        assert_eq!(parse(dtype.clone()).unwrap().dtype, Dtype::F32);
        dtype["language_config"]["dtype"] = json!("bfloat16");
        let e = err(dtype.clone());
        assert!(
            e.starts_with("language_config.dtype = bfloat16 ")
                && e.contains("the dtype torch_dtype gives (float32)"),
            "{e}"
        );
        // The two levels' torch_dtype disagree: each is named by its level.
        dtype["language_config"]["dtype"] = Value::Null;
        dtype["language_config"]["torch_dtype"] = json!("bfloat16");
        let e = err(dtype);
        assert!(
            e.starts_with("torch_dtype = float32 ")
                && e.contains("the dtype language_config.torch_dtype gives (bfloat16)"),
            "{e}"
        );
    }

    /// A field inside `rope_scaling` or `rope_parameters` is named with that key: a bare
    /// `rope_theta` would point at the top level's.
    #[test]
    fn a_nested_objects_fields_are_named_with_its_key() {
        for (key, value, named) in [
            (
                "rope_parameters",
                json!({"rope_type": "default", "rope_theta": -5}),
                "rope_parameters.rope_theta = -5 ",
            ),
            ("rope_scaling", json!({"type": 1}), "rope_scaling.type = 1 "),
            (
                "rope_parameters",
                json!({"rope_type": 7}),
                "rope_parameters.rope_type = 7 ",
            ),
        ] {
            let mut v = base();
            v[key] = value;
            let e = err(v);
            assert!(e.starts_with(named), "{e}");
        }
    }

    #[test]
    fn flat_and_nested_forms_agree() {
        let flat = parse(base()).unwrap();
        for key in ["language_config", "text_config"] {
            let nested = parse(json!({ "model_type": "deepseek_vl_v2", key: base() })).unwrap();
            assert_eq!(flat, nested, "{key}");
        }
        // Both nested keys: the same config twice is one config; two different ones are
        // refused, naming both keys.
        let both = json!({"language_config": base(), "text_config": base()});
        assert_eq!(parse(both).unwrap(), flat);
        // Fields modelmeter never reads may differ, as a file's reader would drop them.
        let mut tagged = base();
        tagged["architectures"] = json!(["Other"]);
        let both = json!({"language_config": base(), "text_config": tagged});
        assert_eq!(parse(both).unwrap(), flat);
        // One number written two ways is one value.
        let both = json!({"language_config": with("routed_scaling_factor", json!(1)),
                          "text_config": with("routed_scaling_factor", json!(1.0))});
        assert_eq!(parse(both).unwrap(), flat);
        // A nested key that is not an object is named as such, whichever comes first.
        let e = err(json!({"language_config": 5, "text_config": base()}));
        assert!(
            e.starts_with("language_config = 5 is invalid: expected an object"),
            "{e}"
        );
        let e = err(
            json!({"language_config": base(), "text_config": with("hidden_size", json!(2560))}),
        );
        assert!(
            e.contains("text_config = an object unlike language_config") && e.contains("not both"),
            "{e}"
        );
    }

    #[test]
    fn num_experts_spelling() {
        let mut v = without("n_routed_experts");
        v["num_experts"] = json!(64);
        assert_eq!(parse(v).unwrap().moe, parse(base()).unwrap().moe);
        let mut both = base();
        both["num_experts"] = json!(64);
        assert_eq!(
            parse(both.clone()).unwrap().moe,
            parse(base()).unwrap().moe,
            "both spellings may be given when they agree"
        );
        both["num_experts"] = json!(32);
        assert!(err(both).starts_with(
            "num_experts = 32 is invalid: expected the same value as n_routed_experts (64)"
        ));
        let dense = parse(with("n_routed_experts", Value::Null)).unwrap();
        assert!(dense.moe.is_none());
        assert!(dense.layer_kinds.iter().all(|k| *k == MlpKind::Dense));
        // A written 0 beside experts per token is a contradiction, not a dense model.
        let e = err(with("n_routed_experts", json!(0)));
        assert!(
            e.contains(
                "n_routed_experts = 0 is invalid: expected ≥ num_experts_per_tok (6), or null"
            ),
            "{e}"
        );
        let mut alias = without("n_routed_experts");
        alias["num_experts"] = json!(0);
        assert!(err(alias).contains("num_experts = 0 is invalid"));
        // 0 without experts per token still reads as dense.
        let mut v = with("n_routed_experts", json!(0));
        v.as_object_mut().unwrap().remove("num_experts_per_tok");
        assert!(parse(v).unwrap().moe.is_none());
    }

    #[test]
    fn head_dim_explicit_or_derived() {
        assert_eq!(parse(base()).unwrap().head_dim, 128);
        let explicit = parse(with("head_dim", json!(64))).unwrap();
        assert_eq!(explicit.head_dim, 64);
        let mut odd_hidden = with("hidden_size", json!(1285));
        assert!(err(odd_hidden.clone()).contains("multiple of num_attention_heads"));
        odd_hidden["head_dim"] = json!(128);
        assert_eq!(
            parse(odd_hidden).unwrap().head_dim,
            128,
            "explicit head_dim lifts the rule"
        );
        assert!(err(with("head_dim", json!(127))).contains("even"));
    }

    #[test]
    fn mlp_layer_types_spelling() {
        let mut v = without("first_k_dense_replace");
        v.as_object_mut().unwrap().remove("moe_layer_freq");
        let mut types = vec![json!("dense")];
        types.extend(std::iter::repeat(json!("sparse")).take(11));
        v["mlp_layer_types"] = json!(types);
        assert_eq!(
            parse(v.clone()).unwrap().layer_kinds,
            parse(base()).unwrap().layer_kinds
        );
        v["mlp_layer_types"] = json!(["dense", "sparse"]);
        assert!(err(v.clone()).contains("one entry per layer"));
        let mut bad: Vec<Value> = vec![json!("dense"); 12];
        bad[3] = json!("moe");
        v["mlp_layer_types"] = json!(bad);
        assert!(err(v).contains("mlp_layer_types[3]"));
    }

    #[test]
    fn both_layer_spellings_must_agree() {
        let mut v = base();
        let mut types = vec![json!("dense")];
        types.extend(std::iter::repeat_n(json!("sparse"), 11));
        v["mlp_layer_types"] = json!(types);
        assert!(parse(v.clone()).is_ok(), "agreeing spellings are fine");
        v["first_k_dense_replace"] = json!(3);
        assert!(err(v).contains("first_k_dense_replace and moe_layer_freq"));
    }

    #[test]
    fn absurd_sizes_are_refused_quickly() {
        let e = err(with("num_hidden_layers", json!(1_000_000_000_000_000u64)));
        assert!(
            e.contains("num_hidden_layers") && e.contains("1 ..= 4096"),
            "{e}"
        );
        let mut v = with("num_attention_heads", json!(1_000_000_000_000_000u64));
        v["head_dim"] = json!(128);
        v["num_key_value_heads"] = json!(3);
        assert!(err(v).contains("a divisor of num_attention_heads (1000000000000000)"));
    }

    #[test]
    fn moe_layer_freq_places_moe_layers() {
        let mut v = with("moe_layer_freq", json!(2));
        v["first_k_dense_replace"] = json!(3);
        let kinds = parse(v).unwrap().layer_kinds;
        let moe: Vec<usize> = kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == MlpKind::Moe)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(moe, vec![4, 6, 8, 10]);
        assert!(err(with("moe_layer_freq", json!(0))).contains("moe_layer_freq"));
    }

    #[test]
    fn kv_heads_default_to_heads() {
        assert_eq!(
            parse(without("num_key_value_heads"))
                .unwrap()
                .num_key_value_heads,
            10
        );
        assert_eq!(
            parse(with("num_key_value_heads", json!(5)))
                .unwrap()
                .num_key_value_heads,
            5
        );
    }

    #[test]
    fn bad_sizes_name_the_field_and_the_range() {
        for key in [
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "num_hidden_layers",
        ] {
            for bad in [json!(0), json!(-4), json!(2.5), json!("big")] {
                let e = err(with(key, bad.clone()));
                assert!(
                    e.contains(key) && e.contains("integer ≥ 1"),
                    "{key}={bad}: {e}"
                );
            }
        }
        let e = err(without("hidden_size"));
        assert!(e.contains("hidden_size is missing"), "{e}");
    }

    #[test]
    fn hidden_not_divisible_by_heads() {
        let mut v = with("num_attention_heads", json!(7));
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        let e = err(v);
        assert!(
            e.contains("hidden_size = 1280") && e.contains("multiple of num_attention_heads (7)"),
            "{e}"
        );
    }

    #[test]
    fn heads_not_divisible_by_kv_heads() {
        let e = err(with("num_key_value_heads", json!(3)));
        assert!(
            e.contains("num_key_value_heads = 3") && e.contains("1, 2, 5, 10"),
            "{e}"
        );
    }

    #[test]
    fn k_larger_than_experts() {
        let e = err(with("num_experts_per_tok", json!(65)));
        assert!(
            e.contains("num_experts_per_tok = 65") && e.contains("1 ..= n_routed_experts (64)"),
            "{e}"
        );
        assert!(err(with("num_experts_per_tok", json!(0))).contains("num_experts_per_tok"));
    }

    #[test]
    fn mla_is_read_with_or_without_use_mla() {
        // use_mla: false ignores the MLA keys (DeepSeek-OCR writes them as null or 0).
        let mut v = base();
        for key in ["kv_lora_rank", "q_lora_rank"] {
            v[key] = Value::Null;
        }
        for key in ["qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"] {
            v[key] = json!(0);
        }
        assert!(parse(v).unwrap().mla.is_none());
        // No use_mla key: a set kv_lora_rank means MLA (DeepSeek-V2-Lite's config).
        let mut v = mla_base();
        v.as_object_mut().unwrap().remove("use_mla");
        let mla = parse(v).unwrap().mla.unwrap();
        assert_eq!(
            (
                mla.q_lora_rank,
                mla.kv_lora_rank,
                mla.qk_nope_head_dim,
                mla.qk_rope_head_dim,
                mla.v_head_dim
            ),
            (None, 512, 128, 64, 128)
        );
        let v = mla_with("q_lora_rank", json!(1536));
        assert_eq!(parse(v).unwrap().mla.unwrap().q_lora_rank, Some(1536));
    }

    /// A small MLA config (V2-Lite's attention dims on the DeepSeek-OCR base).
    fn mla_base() -> Value {
        let mut v = base();
        v["use_mla"] = json!(true);
        v["kv_lora_rank"] = json!(512);
        v["q_lora_rank"] = Value::Null;
        v["qk_nope_head_dim"] = json!(128);
        v["qk_rope_head_dim"] = json!(64);
        v["v_head_dim"] = json!(128);
        v
    }

    /// [`mla_base`] with `key` set to `value`.
    fn mla_with(key: &str, value: Value) -> Value {
        let mut v = mla_base();
        v[key] = value;
        v
    }

    /// What an absent key means, each value derived from the vendor's config class
    /// (DeepseekV2Config) or modelling code, not from this crate: every layer MoE without
    /// `first_k_dense_replace` (default 0), bf16 without a dtype, `use_mla: false` wins
    /// over a set `kv_lora_rank` (the vendor picks the attention class by `use_mla`), and
    /// YaRN without `mscale_all_dim` leaves the softmax scale alone (the vendor reads 0).
    #[test]
    fn absent_keys_take_the_vendors_defaults() {
        let c = parse(without("first_k_dense_replace")).unwrap();
        assert!(c.layer_kinds.iter().all(|k| *k == MlpKind::Moe));
        assert_eq!(parse(without("torch_dtype")).unwrap().dtype, Dtype::Bf16);
        let v = mla_with("use_mla", json!(false));
        let c = parse(v).unwrap();
        assert_eq!((c.mla.is_none(), c.head_dim), (true, 1280 / 10));
        let v = mla_with("rope_scaling", json!({"type": "yarn", "factor": 40}));
        let yarn = parse(v).unwrap().rope_scaling.unwrap();
        assert_eq!(
            (yarn.mscale_all_dim, yarn.softmax_scale_factor()),
            (0.0, 1.0)
        );
        // A value below 1 is kept (nothing clamps it), and 4096 layers is the limit.
        let c = parse(with("routed_scaling_factor", json!(0.5))).unwrap();
        assert_eq!(c.moe.unwrap().routed_scaling_factor, 0.5);
        let c = parse(with("num_hidden_layers", json!(4096))).unwrap();
        assert_eq!(c.layer_kinds.len(), 4096);
    }

    /// Two spellings of one value: where the vendor code and transformers 5 read the same
    /// one, it wins (`rope_scaling` beside `rope_parameters`: both take `rope_scaling`);
    /// where they read different ones and the two differ, the config is refused, naming
    /// both (the top level's `rope_theta` is the vendor's, `rope_parameters.rope_theta`
    /// transformers'; `type` is the vendor's, `rope_type` transformers' first).
    #[test]
    fn two_spellings_of_a_value_agree_or_are_refused() {
        let mut v = with("rope_theta", json!(500000));
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        assert_eq!(parse(v).unwrap().rope_theta, 500000.0);
        let mut v = without("rope_theta");
        v["rope_parameters"] = json!({"rope_theta": 500000.0});
        assert_eq!(parse(v).unwrap().rope_theta, 500000.0);
        let mut v = with("rope_theta", json!(10000.0));
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        let e = err(v);
        assert!(
            e.starts_with("rope_parameters.rope_theta = 500000 ")
                && e.contains("10000, as rope_theta says"),
            "{e}"
        );
        // Beside rope_scaling, transformers 5 ignores rope_parameters (its rope_theta too):
        // no disagreement, the top level's value; a rope_theta inside rope_scaling must
        // agree with it.
        let mut v = mla_with("rope_theta", json!(10000.0));
        v["rope_scaling"] = json!({"type": "yarn", "factor": 40});
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        assert_eq!(parse(v.clone()).unwrap().rope_theta, 10000.0);
        v["rope_scaling"]["rope_theta"] = json!(500000.0);
        let e = err(v);
        assert!(e.starts_with("rope_scaling.rope_theta = 500000 "), "{e}");
        for (scaling, parameters) in [
            (
                json!({"type": "yarn", "factor": 40}),
                json!({"rope_type": "default"}),
            ),
            (
                json!({"type": "yarn", "factor": 40}),
                json!({"rope_type": "linear", "factor": 4}),
            ),
        ] {
            let mut v = mla_with("rope_scaling", scaling);
            v["rope_parameters"] = parameters;
            assert_eq!(parse(v).unwrap().rope_scaling.unwrap().factor, 40.0);
        }
        let mut v = mla_with(
            "rope_scaling",
            json!({"type": "yarn", "rope_type": "yarn", "factor": 40}),
        );
        assert_eq!(parse(v.clone()).unwrap().rope_scaling.unwrap().factor, 40.0);
        v["rope_scaling"]["rope_type"] = json!("linear");
        let e = err(v);
        assert!(
            e.starts_with("rope_scaling.rope_type = linear ")
                && e.contains("yarn, as rope_scaling.type says"),
            "{e}"
        );
    }

    /// Values no model runs with are refused, each naming the field; the vendor or
    /// transformers would fail or compute nonsense with them (a zero-width query
    /// projection, `heads % 0`, an activation name transformers does not know in that
    /// case, a YaRN scaling the vendor's `_init_rope` raises on).
    #[test]
    fn values_no_model_runs_with_are_refused_by_name() {
        for (v, starts) in [
            (with("rms_norm_eps", json!(0)), "rms_norm_eps = 0 "),
            (
                with("num_key_value_heads", json!(0)),
                "num_key_value_heads = 0 ",
            ),
            (
                with("max_position_embeddings", json!(0)),
                "max_position_embeddings = 0 ",
            ),
            (with("hidden_act", json!("SiLU")), "hidden_act = SiLU "),
            (
                with("mlp_layer_types", json!("dense")),
                "mlp_layer_types = \"dense\" ",
            ),
            (mla_with("q_lora_rank", json!(0)), "q_lora_rank = 0 "),
            (
                mla_with("rope_scaling", json!({"type": "yarn", "factor": 0})),
                "rope_scaling.factor = 0 ",
            ),
            (
                mla_with(
                    "rope_scaling",
                    json!({"type": "yarn", "factor": 40, "beta_slow": -1}),
                ),
                "rope_scaling.beta_slow = -1 ",
            ),
            (
                mla_with("rope_scaling", json!({"type": "default"})),
                "rope_scaling.type = default ",
            ),
            // The vendor divides by both rotation counts (ZeroDivisionError at 0; a
            // module built with 0 computed NaN rotary tables).
            (
                mla_with(
                    "rope_scaling",
                    json!({"type": "yarn", "factor": 40, "beta_fast": 0}),
                ),
                "rope_scaling.beta_fast = 0 ",
            ),
            (
                mla_with(
                    "rope_scaling",
                    json!({"type": "yarn", "factor": 40, "beta_slow": 0}),
                ),
                "rope_scaling.beta_slow = 0 ",
            ),
            (
                mla_with("rope_scaling", json!({"type": "dynamic", "factor": 2})),
                "rope_scaling.type = dynamic ",
            ),
        ] {
            let e = err(v);
            assert!(e.starts_with(starts), "{starts}: {e}");
        }
        assert!(parse(mla_with("qk_nope_head_dim", json!(u64::MAX - 1))).is_err());
        // A V3 router needs both group sizes.
        let mut v = with("topk_method", json!("noaux_tc"));
        v["scoring_func"] = json!("sigmoid");
        v["n_group"] = json!(8);
        assert!(err(v).contains("topk_group is missing"), "v3 router");
        // An MLA config's explicit head_dim is taken as written, even odd.
        assert_eq!(parse(mla_with("head_dim", json!(97))).unwrap().head_dim, 97);
    }

    /// Numbers compare by value at every width: two integers that one f64 cannot tell
    /// apart (2^53 + 1 and 2^53; beyond i64, u64::MAX and u64::MAX − 1) still differ, and
    /// items of lists and objects compare as numbers too (`[1]` and `[1.0]` agree).
    #[test]
    fn same_json_compares_numbers_exactly_at_every_width() {
        let same = |a: Value, b: Value| same_json(&a, &b);
        assert!(same(json!(1), json!(1.0)));
        assert!(!same(
            json!(9_007_199_254_740_993u64),
            json!(9_007_199_254_740_992u64)
        ));
        assert!(!same(
            json!(-9_007_199_254_740_993i64),
            json!(-9_007_199_254_740_992i64)
        ));
        assert!(same(json!(u64::MAX), json!(u64::MAX)));
        assert!(!same(json!(u64::MAX), json!(u64::MAX - 1)));
        assert!(same(json!([1, {"a": 2}]), json!([1.0, {"a": 2.0}])));
        assert!(!same(json!([1, 2]), json!([1, 3])));
        assert!(!same(json!([1]), json!([1, 1])));
        assert!(same(json!({"factor": 40}), json!({"factor": 40.0})));
        assert!(!same(json!("1"), json!(1)));
    }

    /// The layer pattern: `mlp_layer_types` must agree with whichever of the two rule keys
    /// is given, and a "sparse" layer needs routed experts.
    #[test]
    fn the_layer_pattern_must_be_one_the_model_can_build() {
        let types = |first: &str| {
            let mut t = vec![json!(first)];
            t.extend(std::iter::repeat_n(json!("sparse"), 11));
            json!(t)
        };
        let mut v = without("moe_layer_freq");
        v["first_k_dense_replace"] = json!(3);
        v["mlp_layer_types"] = types("dense");
        assert!(err(v).contains("first_k_dense_replace and moe_layer_freq"));
        let mut v = without("first_k_dense_replace");
        v.as_object_mut().unwrap().remove("moe_layer_freq");
        v["n_routed_experts"] = Value::Null;
        v["mlp_layer_types"] = types("dense");
        let e = err(v);
        assert!(
            e.starts_with("mlp_layer_types[1] = \"sparse\" is invalid: expected \"dense\" (this config has no routed experts)"),
            "{e}"
        );
    }

    /// Nested and top-level copies compare whole values: an object or a list with an
    /// entry more on one side is a disagreement, an explicit null is an absent key, and
    /// fields modelmeter never reads (`architectures`) may differ, as in DeepSeek-OCR's
    /// own file read as a value.
    #[test]
    fn copies_of_a_config_compare_whole_values() {
        let mut inner = mla_base();
        inner["rope_scaling"] = json!({"type": "yarn", "factor": 40, "mscale_all_dim": 0.707});
        let mut top = mla_base();
        top["rope_scaling"] = json!({"type": "yarn", "factor": 40});
        top["language_config"] = inner;
        assert!(err(top).starts_with("rope_scaling = "));
        let mut types = vec![json!("dense")];
        types.extend(std::iter::repeat_n(json!("sparse"), 11));
        let mut inner = base();
        inner["mlp_layer_types"] = json!(types);
        let mut top = base();
        top["mlp_layer_types"] = json!(["dense"]);
        top["language_config"] = inner;
        assert!(err(top).starts_with("mlp_layer_types = "));
        let mut a = base();
        a["q_lora_rank"] = Value::Null;
        let both = json!({"language_config": a, "text_config": base()});
        assert_eq!(parse(both).unwrap(), parse(base()).unwrap());
        let v: Value = serde_json::from_str(DEEPSEEK_OCR_CONFIG_JSON).unwrap();
        let c = ModelConfig::from_json_value(DEEPSEEK_OCR_NAME, &v).unwrap();
        assert_eq!(c, ModelConfig::deepseek_ocr());
    }

    #[test]
    fn an_mla_configs_head_dim_is_its_rotary_dim_and_hidden_size_need_not_divide() {
        // The vendor MLA never reads hidden_size / heads; transformers sets head_dim to
        // qk_rope_head_dim. Sizes a multi-head config would refuse are fine here.
        // base() has 10 heads: 2045 is no multiple of them, 2050 gives an odd 205.
        for hidden in [4096, 2045, 2050] {
            let v = mla_with("hidden_size", json!(hidden));
            let c = parse(v).unwrap();
            assert_eq!((c.hidden_size, c.head_dim), (hidden, 64));
        }
        let v = mla_with("head_dim", json!(96));
        assert_eq!(parse(v).unwrap().head_dim, 96, "given: kept");
        // The same sizes without MLA are refused, as before.
        let mut v = base();
        v["hidden_size"] = json!(2045);
        assert!(err(v.clone()).contains("a multiple of num_attention_heads"));
        v["hidden_size"] = json!(2050);
        assert!(err(v).contains("even"));
    }

    #[test]
    fn bad_mla_fields_name_the_field() {
        for key in [
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        ] {
            let mut v = mla_base();
            v.as_object_mut().unwrap().remove(key);
            let e = err(v);
            assert!(e.contains(&format!("{key} is missing")), "{e}");
            let mut v = mla_base();
            v[key] = json!(0);
            let e = err(v);
            assert!(
                e.contains(&format!("{key} = 0 is invalid")) && e.contains("integer ≥ 1"),
                "{e}"
            );
        }
        let v = mla_with("q_lora_rank", json!("big"));
        assert!(err(v).contains("q_lora_rank = \"big\" is invalid"));
        let v = mla_with("qk_rope_head_dim", json!(63));
        assert!(err(v).contains("even"));
        assert!(err(with("use_mla", json!("yes"))).contains("use_mla = \"yes\" is invalid"));
    }

    #[test]
    fn yarn_mscales_may_be_zero_and_rotation_counts_may_not() {
        let yarn = |scaling: Value| mla_with("rope_scaling", scaling);
        let y = parse(yarn(
            json!({"type": "yarn", "factor": 40, "mscale": 0, "mscale_all_dim": 0}),
        ))
        .unwrap()
        .rope_scaling
        .unwrap();
        assert_eq!((y.mscale, y.mscale_all_dim), (0.0, 0.0));
        assert_eq!(
            err(yarn(json!({"type": "yarn", "factor": 40, "beta_fast": 0}))),
            "rope_scaling.beta_fast = 0 is invalid: expected a finite number > 0 (a rotation \
             count the vendor divides by)"
        );
        assert_eq!(
            err(yarn(json!({"type": "yarn", "factor": 40, "mscale": -1}))),
            "rope_scaling.mscale = -1 is invalid: expected a finite number ≥ 0"
        );
    }

    #[test]
    fn yarn_is_read_for_mla_and_refused_for_mha() {
        let v = mla_with(
            "rope_scaling",
            json!({"type": "yarn", "factor": 40, "mscale_all_dim": 0.707}),
        );
        let y = parse(v).unwrap().rope_scaling.unwrap();
        assert_eq!((y.factor, y.mscale_all_dim), (40.0, 0.707));
        assert_eq!(
            (
                y.original_max_position_embeddings,
                y.beta_fast,
                y.beta_slow,
                y.mscale
            ),
            (4096, 32.0, 1.0, 1.0),
            "the vendor's defaults"
        );
        let v = mla_with(
            "rope_parameters",
            json!({"rope_type": "yarn", "factor": 4, "rope_theta": 5e5}),
        );
        let c = parse(v).unwrap();
        assert_eq!((c.rope_scaling.unwrap().factor, c.rope_theta), (4.0, 5e5));
        for (scaling, needle) in [
            (
                json!({"type": "linear", "factor": 2}),
                "rope_scaling.type = linear is not supported",
            ),
            (
                json!({"type": "ntk", "factor": 2}),
                "expected yarn, linear or dynamic",
            ),
            (json!({"type": "yarn"}), "rope_scaling.factor is missing"),
            (
                json!({"type": "yarn", "factor": -1}),
                "rope_scaling.factor = -1 is invalid",
            ),
            (json!({"factor": 2}), "rope_scaling.type is missing"),
            (
                json!({"type": "yarn", "factor": 40, "beta_fast": "x"}),
                "rope_scaling.beta_fast",
            ),
            (
                json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 0}),
                "original_max_position_embeddings = 0",
            ),
            (json!(3), "rope_scaling = 3 is invalid: expected an object"),
        ] {
            let v = mla_with("rope_scaling", scaling);
            let e = err(v);
            assert!(e.contains(needle), "{e}");
        }
        let e = err(with("rope_scaling", json!({"type": "yarn", "factor": 40})));
        assert!(e.contains("MLA attention only"), "{e}");
    }

    #[test]
    fn routing_keys_are_read_and_checked() {
        use crate::routing::{ScoringFunc, TopkMethod};
        let routing = |v: Value| parse(v).unwrap().moe.unwrap().routing;
        assert!(routing(base()).is_greedy_softmax());
        let mut v = base();
        v["topk_method"] = json!("noaux_tc");
        v["scoring_func"] = json!("sigmoid");
        v["n_group"] = json!(8);
        v["topk_group"] = json!(4);
        let r = routing(v.clone());
        assert_eq!(
            (r.topk_method, r.scoring_func, r.n_group, r.topk_group),
            (TopkMethod::NoauxTc, ScoringFunc::Sigmoid, 8, 4)
        );
        // Greedy reads no groups, whatever the config writes, but keeps its scoring.
        assert_eq!(routing(with("n_group", json!(8))).n_group, 1);
        let greedy_sigmoid = routing(with("scoring_func", json!("sigmoid")));
        assert_eq!(
            (greedy_sigmoid.topk_method, greedy_sigmoid.scoring_func),
            (TopkMethod::Greedy, ScoringFunc::Sigmoid)
        );
        for (key, value, needle) in [
            (
                "n_group",
                json!(7),
                "n_group = 7 is invalid: expected a divisor of n_routed_experts (64)",
            ),
            ("n_group", json!(64), "≥ 2 experts per group"),
            (
                "topk_group",
                json!(9),
                "topk_group = 9 is invalid: expected 1 ..= n_group (8)",
            ),
            ("n_group", Value::Null, "n_group is missing"),
            ("topk_group", json!(0), "topk_group = 0 is invalid"),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let e = err(bad);
            assert!(e.contains(needle), "{e}");
        }
        let mut v2 = v.clone();
        v2["topk_method"] = json!("group_limited_greedy");
        v2["n_group"] = json!(64);
        assert_eq!(
            routing(v2).topk_method,
            TopkMethod::GroupLimitedGreedy,
            "1 per group is fine"
        );
    }

    #[test]
    fn builtin_family_configs_match_the_facts() {
        let names = ModelConfig::builtin_names();
        assert_eq!(
            names,
            "deepseek-ocr-v1-base, deepseek-v2-lite, deepseek-v2, deepseek-v3"
        );
        assert_eq!(
            ModelConfig::builtin(DEEPSEEK_OCR_NAME).unwrap().unwrap(),
            ModelConfig::deepseek_ocr()
        );
        assert!(ModelConfig::builtin("deepseek-v4").is_none());
        let get = |n: &str| ModelConfig::builtin(n).unwrap().unwrap();
        // deepseek-family-facts.md, the config table.
        let lite = get("deepseek-v2-lite");
        let mla = lite.mla.clone().unwrap();
        assert_eq!(
            (
                lite.hidden_size,
                lite.num_attention_heads,
                lite.num_hidden_layers
            ),
            (2048, 16, 27)
        );
        assert_eq!((mla.q_lora_rank, mla.kv_lora_rank), (None, 512));
        assert_eq!(
            (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim),
            (128, 64, 128)
        );
        let moe = lite.moe.clone().unwrap();
        assert_eq!(
            (
                moe.n_routed_experts,
                moe.n_shared_experts,
                moe.num_experts_per_tok,
                moe.moe_intermediate_size
            ),
            (64, 2, 6, 1408)
        );
        assert!(moe.routing.is_greedy_softmax());
        assert_eq!(lite.rope_scaling.as_ref().unwrap().mscale_all_dim, 0.707);
        assert_eq!((lite.vocab_size, lite.intermediate_size), (102_400, 10_944));
        let v2 = get("deepseek-v2");
        assert_eq!(v2.mla.as_ref().unwrap().q_lora_rank, Some(1536));
        let r = v2.moe.as_ref().unwrap().routing;
        assert_eq!(
            (r.topk_method.name(), r.n_group, r.topk_group),
            ("group_limited_greedy", 8, 3)
        );
        assert_eq!(v2.moe.as_ref().unwrap().routed_scaling_factor, 16.0);
        assert_eq!(
            (v2.hidden_size, v2.num_attention_heads, v2.num_hidden_layers),
            (5120, 128, 60)
        );
        let v3 = get("deepseek-v3");
        let moe = v3.moe.as_ref().unwrap();
        assert_eq!(
            (
                moe.routing.topk_method.name(),
                moe.routing.scoring_func.name()
            ),
            ("noaux_tc", "sigmoid")
        );
        assert_eq!(
            (
                moe.n_routed_experts,
                moe.n_shared_experts,
                moe.num_experts_per_tok
            ),
            (256, 1, 8)
        );
        assert!(moe.norm_topk_prob && moe.routed_scaling_factor == 2.5);
        assert_eq!(
            v3.first_layer_of(MlpKind::Moe),
            Some(3),
            "first_k_dense_replace 3"
        );
        assert_eq!(
            (v3.hidden_size, v3.num_hidden_layers, v3.vocab_size),
            (7168, 61, 129_280)
        );
    }

    #[test]
    fn unknown_dtype_is_refused() {
        let e = err(with("torch_dtype", json!("int4")));
        assert!(
            e.contains("torch_dtype = int4") && e.contains("bf16"),
            "{e}"
        );
        let mut v = without("torch_dtype");
        v["dtype"] = json!("float32");
        assert_eq!(parse(v).unwrap().dtype, Dtype::F32);
    }

    #[test]
    fn values_of_the_wrong_json_type_name_the_field() {
        let e = err(with("torch_dtype", json!(16)));
        assert!(
            e.contains("torch_dtype = 16 is invalid: expected a string"),
            "{e}"
        );
        let mut v = without("torch_dtype");
        v["dtype"] = json!(true);
        assert!(err(v).contains("dtype = true is invalid"));
        for key in ["language_config", "text_config"] {
            let e = err(json!({ key: 5 }));
            assert!(
                e.contains(&format!("{key} = 5 is invalid: expected an object")),
                "{e}"
            );
        }
        let e = err(with("hidden_size", json!(vec![0; 10_000])));
        assert!(e.contains("hidden_size") && e.len() < 200, "{e}");
    }

    #[test]
    fn unknown_fields_are_skipped_and_known_ones_read_from_text() {
        let mut v = base();
        v["vision_config"] = json!({"layers": vec![0; 1000]});
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(
            ModelConfig::from_json_str("test", &text).unwrap(),
            parse(base()).unwrap()
        );
        let text = serde_json::to_string(&with("torch_dtype", json!(16))).unwrap();
        assert!(ModelConfig::from_json_str("test", &text)
            .unwrap_err()
            .to_string()
            .contains("torch_dtype = 16"));
    }

    #[test]
    fn unmodelled_variants_are_refused() {
        assert!(err(with("hidden_act", json!("gelu"))).contains("hidden_act"));
        assert!(err(with("topk_method", json!("sparsemixer"))).contains("topk_method"));
        assert!(err(with("scoring_func", json!("relu"))).contains("scoring_func"));
        assert!(
            err(with("rope_scaling", json!({"type": "yarn", "factor": 40})))
                .contains("rope_scaling")
        );
        assert!(err(with("rms_norm_eps", json!(-1))).contains("rms_norm_eps"));
    }

    #[test]
    fn rope_parameters_spelling() {
        let v = with(
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 500000.0}),
        );
        assert_eq!(parse(v).unwrap().rope_theta, 500000.0);
    }

    #[test]
    fn not_json_or_not_an_object() {
        assert!(ModelConfig::from_json_str("x.json", "{ nope")
            .unwrap_err()
            .to_string()
            .contains("x.json"));
        assert!(ModelConfig::from_json_str("x.json", "[1, 2]")
            .unwrap_err()
            .to_string()
            .contains("not a JSON object"));
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = ModelConfig::from_file(Path::new("/no/such/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/config.json"), "{e}");
    }
}
