//! Multi-head Latent Attention (MLA) settings and YaRN rotary scaling, as DeepSeek-V2 and
//! DeepSeek-V3 checkpoints write them in `config.json`.
//!
//! MLA is on when `use_mla` is true, or when `use_mla` is absent and `kv_lora_rank` is set
//! (DeepSeek-V2-Lite, V2 and V3 write no `use_mla` key). With `use_mla: false` the MLA
//! keys are ignored (DeepSeek-OCR writes them as `null` or 0).
//!
//! YaRN changes two things in the vendor code, and neither costs a FLOP in the forward:
//! the cos/sin tables (precomputed at init, sliced in the forward) and the softmax scale
//! (a Python float, [`softmax_scale`], multiplied into the scores by the same
//! op whatever its value).

use serde::Serialize;

use crate::checked::{product, sum};
use crate::config::{unsupported, Fields};
use crate::error::{Error, Result};

/// The MLA dimensions of a DeepSeek-V2/V3 attention layer (`DeepseekV2Attention`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MlaConfig {
    /// r_q: rank of the query down-projection (`q_a_proj`); `None` when the query is
    /// projected directly (`q_proj`, DeepSeek-V2-Lite).
    pub q_lora_rank: Option<u64>,
    /// r_kv: rank of the compressed key/value latent `c_kv`.
    pub kv_lora_rank: u64,
    /// d_n: per-head query/key dims without rotary embedding.
    pub qk_nope_head_dim: u64,
    /// d_r: per-head query dims with rotary embedding; the rotary key has d_r dims too
    /// and is shared by all heads.
    pub qk_rope_head_dim: u64,
    /// d_v: per-head value dims.
    pub v_head_dim: u64,
}

impl MlaConfig {
    /// d_qk = d_n + d_r: the dims each score is a dot product over.
    pub fn qk_head_dim(&self) -> Result<u64> {
        sum(
            "qk_nope_head_dim + qk_rope_head_dim",
            &[self.qk_nope_head_dim, self.qk_rope_head_dim],
        )
    }

    /// Elements the vendor code caches per token and layer: the decompressed keys and
    /// values of every head, H·(d_qk + d_v).
    pub fn decompressed_cache_per_token(&self, heads: u64) -> Result<u64> {
        let width = sum("d_qk + d_v", &[self.qk_head_dim()?, self.v_head_dim])?;
        product("decompressed KV cache per token", &[heads, width])
    }

    /// Elements the weight-absorbed form caches per token and layer: the latent c_kv and
    /// the shared rotary key, r_kv + d_r.
    pub fn latent_cache_per_token(&self) -> Result<u64> {
        sum(
            "latent KV cache per token",
            &[self.kv_lora_rank, self.qk_rope_head_dim],
        )
    }
}

/// YaRN rotary scaling (`rope_scaling.type = "yarn"`), with the vendor defaults for the
/// keys a config leaves out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct YarnScaling {
    /// s: the context extension factor.
    pub factor: f64,
    /// The context the model was pre-trained on (default 4096).
    pub original_max_position_embeddings: u64,
    /// Default 32.
    pub beta_fast: f64,
    /// Default 1.
    pub beta_slow: f64,
    /// Default 1.
    pub mscale: f64,
    /// Default 0 (then the softmax scale is not changed).
    pub mscale_all_dim: f64,
}

/// The vendor's `yarn_get_mscale(scale, mscale)`: 0.1·mscale·ln(scale) + 1 for scale > 1.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl YarnScaling {
    /// The factor the vendor multiplies the softmax scale `d_qk^-0.5` by:
    /// `yarn_get_mscale(factor, mscale_all_dim)²` when `mscale_all_dim` is non-zero, else 1.
    /// A scalar chosen at init: it changes no op and no FLOP count.
    pub fn softmax_scale_factor(&self) -> f64 {
        if self.mscale_all_dim == 0.0 {
            1.0
        } else {
            let m = yarn_get_mscale(self.factor, self.mscale_all_dim);
            m * m
        }
    }
}

/// The softmax scale of an MLA layer: `d_qk^-0.5`, times YaRN's factor when configured.
pub fn softmax_scale(mla: &MlaConfig, rope_scaling: Option<&YarnScaling>) -> Result<f64> {
    let d_qk = mla.qk_head_dim()? as f64;
    Ok(d_qk.powf(-0.5) * rope_scaling.map_or(1.0, YarnScaling::softmax_scale_factor))
}

/// Whether the config uses MLA, and its dimensions if so.
pub(crate) fn mla_config(cfg: &Fields) -> Result<Option<MlaConfig>> {
    let on = match cfg.boolean("use_mla")? {
        Some(on) => on,
        None if cfg.present("kv_lora_rank").is_some() => true,
        // MLA dimensions without `use_mla` or `kv_lora_rank`: the vendor config would
        // default to MLA (r_kv = 512) where modelmeter reads multi-head attention; which
        // one was meant is not ours to guess (DeepSeek-OCR writes `use_mla: false` beside
        // its zeros).
        None => {
            for key in [
                "q_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
            ] {
                if let Some(v) = cfg.present(key).filter(|v| v.as_u64() != Some(0)) {
                    return Err(Error::missing(
                        "kv_lora_rank",
                        format!(
                            "the config sets {key} = {v}, an MLA dimension, without use_mla or \
                             kv_lora_rank (the vendor config would default to MLA with \
                             kv_lora_rank = 512, modelmeter to multi-head attention); write \
                             kv_lora_rank for MLA, or \"use_mla\": false for multi-head \
                             attention"
                        ),
                    ));
                }
            }
            false
        }
    };
    if !on {
        return Ok(None);
    }
    let required = |key: &str| -> Result<u64> {
        cfg.size(key)?.ok_or_else(|| {
            Error::missing(
                key,
                "an integer ≥ 1 (an MLA config sets kv_lora_rank, qk_nope_head_dim, \
                       qk_rope_head_dim and v_head_dim)",
            )
        })
    };
    let mla = MlaConfig {
        q_lora_rank: cfg.size("q_lora_rank")?,
        kv_lora_rank: required("kv_lora_rank")?,
        qk_nope_head_dim: required("qk_nope_head_dim")?,
        qk_rope_head_dim: required("qk_rope_head_dim")?,
        v_head_dim: required("v_head_dim")?,
    };
    if mla.qk_rope_head_dim % 2 != 0 {
        return Err(Error::invalid(
            "qk_rope_head_dim",
            mla.qk_rope_head_dim,
            "an even number (rotary embedding rotates pairs of dimensions)",
        ));
    }
    mla.qk_head_dim()?;
    Ok(Some(mla))
}

/// The rotary scaling: `rope_scaling`, or transformers 5's `rope_parameters` when its
/// `rope_type` is not `default`. Only YaRN is modelled, and only with MLA attention.
/// Beside each other, `rope_scaling` wins, as in the vendor code (which reads nothing
/// else) and in transformers 5 (`convert_rope_params_to_dict`: `rope_scaling or
/// rope_parameters`).
pub(crate) fn rope_scaling(cfg: &Fields, mla: bool) -> Result<Option<YarnScaling>> {
    let Some((key, params, nested)) = cfg.rotary_parameters()? else {
        return Ok(None);
    };
    let kind = match (nested.string("type")?, nested.string("rope_type")?) {
        (Some(kind), Some(other)) if kind != other => {
            return Err(Error::invalid(
                &format!("{key}.rope_type"),
                &other,
                &format!(
                    "{kind}, as {key}.type says, or one of the two left out: readers differ on \
                     which one they take (the vendor code rope_scaling.type, transformers \
                     rope_type first), and modelmeter does not guess"
                ),
            ))
        }
        (Some(kind), _) | (None, Some(kind)) => kind,
        (None, None) if key == "rope_parameters" => "default".to_string(),
        (None, None) => {
            return Err(Error::missing(
                "rope_scaling.type",
                "yarn (the scaling DeepSeek-V2 and V3 use)",
            ))
        }
    };
    if key == "rope_parameters" && kind == "default" {
        return Ok(None);
    }
    let field = |name: &str| format!("{key}.{name}");
    if !mla {
        return Err(unsupported(
            key,
            &params.to_string(),
            "scaled RoPE is modelled for MLA attention only (DeepseekV2YarnRotaryEmbedding); \
             the Llama-style attention (of configs with use_mla: false, or with neither \
             use_mla nor kv_lora_rank) is modelled with plain rotary embedding",
        ));
    }
    match kind.as_str() {
        "yarn" => {}
        "linear" | "dynamic" => {
            return Err(unsupported(
                &field("type"),
                &kind,
                "only yarn (DeepSeek-V2 and V3's scaling) is modelled",
            ))
        }
        _ => {
            return Err(Error::invalid(
                &field("type"),
                &kind,
                "yarn, linear or dynamic (the vendor's scalings; only yarn is modelled)",
            ))
        }
    }
    // `min_exclusive`: the beta values are rotation counts the vendor divides by
    // (`yarn_find_correction_dim`: ZeroDivisionError at 0); the mscales may be 0.
    let number = |name: &str, default: f64, min_exclusive: bool| -> Result<f64> {
        match nested.present(name) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && (x > 0.0 || (x == 0.0 && !min_exclusive)) => Ok(x),
                _ if min_exclusive => Err(Error::invalid(
                    &field(name),
                    v,
                    "a finite number > 0 (a rotation count the vendor divides by)",
                )),
                _ => Err(Error::invalid(&field(name), v, "a finite number ≥ 0")),
            },
        }
    };
    let factor = match nested.present("factor") {
        None => {
            return Err(Error::missing(
                field("factor"),
                "a finite number > 0 (YaRN's context extension factor)",
            ))
        }
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => x,
            _ => return Err(Error::invalid(&field("factor"), v, "a finite number > 0")),
        },
    };
    let original = match nested.present("original_max_position_embeddings") {
        None => 4096,
        Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
            Error::invalid(
                &field("original_max_position_embeddings"),
                v,
                "an integer ≥ 1",
            )
        })?,
    };
    Ok(Some(YarnScaling {
        factor,
        original_max_position_embeddings: original,
        beta_fast: number("beta_fast", 32.0, true)?,
        beta_slow: number("beta_slow", 1.0, true)?,
        mscale: number("mscale", 1.0, false)?,
        mscale_all_dim: number("mscale_all_dim", 0.0, false)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MLA dimensions DeepSeek-V2 and V2-Lite share, with the query LoRA rank given
    /// (V2-Lite has none).
    fn v2_mla(q_lora_rank: Option<u64>) -> MlaConfig {
        MlaConfig {
            q_lora_rank,
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
        }
    }

    #[test]
    fn mscale_matches_the_published_softmax_factors() {
        // mscale = 0.1·mscale_all_dim·ln(factor) + 1 is 1.260804 for V2 (0.707, 40:
        // 0.1·0.707·3.688879 + 1) and 1.368888 for V3 (1.0, 40); the softmax scale factor
        // is its square (1.589626 and 1.873854), and d_qk^-0.5 = 192^-0.5 = 0.0721688 —
        // products 0.114721 and 0.135234.
        let yarn = |all: f64| YarnScaling {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: all,
            mscale_all_dim: all,
        };
        let mla = v2_mla(None);
        let v2 = softmax_scale(&mla, Some(&yarn(0.707))).unwrap();
        let v3 = softmax_scale(&mla, Some(&yarn(1.0))).unwrap();
        assert!((v2 - 0.114721).abs() < 5e-7, "{v2}");
        assert!((v3 - 0.135234).abs() < 5e-7, "{v3}");
        let plain = softmax_scale(&mla, None).unwrap();
        assert!((plain - 0.0721688).abs() < 5e-8, "{plain}");
        assert_eq!(yarn_get_mscale(1.0, 0.707), 1.0, "no extension, no scaling");
        assert_eq!(yarn(0.0).softmax_scale_factor(), 1.0, "mscale_all_dim 0");
        // Only mscale_all_dim decides whether the softmax is rescaled: mscale 0 beside
        // mscale_all_dim 0.707 still gives 1.2608038² = 1.5896262.
        let all_dim_only = YarnScaling {
            mscale: 0.0,
            ..yarn(0.707)
        };
        assert!((all_dim_only.softmax_scale_factor() - 1.5896262).abs() < 5e-7);
        assert!((yarn_get_mscale(40.0, 0.707) - 1.260804).abs() < 5e-7);
        assert!((yarn_get_mscale(40.0, 1.0) - 1.368888).abs() < 5e-7);
    }

    #[test]
    fn softmax_scale_uses_mscale_all_dim_not_mscale() {
        // The vendor `DeepseekV2Attention.__init__`: softmax_scale ·= yarn_get_mscale(
        // factor, mscale_all_dim)²; `mscale` only enters the cos/sin tables, as the ratio
        // yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim).
        // mscale 1.0, mscale_all_dim 0.707, factor 40, by hand (ln 40 = 3.6888795):
        //   all-dim mscale 0.1·0.707·3.6888795 + 1 = 1.2608038, squared 1.5896262;
        //   (with mscale instead: 1.3688879, squared 1.8738542);
        //   softmax scale 192^-0.5 · 1.5896262 = 0.0721688 · 1.5896262 = 0.1147214;
        //   cos/sin ratio 1.3688879 / 1.2608038 = 1.0857264.
        let yarn = YarnScaling {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 0.707,
        };
        let factor = yarn.softmax_scale_factor();
        assert!((factor - 1.5896262).abs() < 5e-7, "{factor}");
        let mla = v2_mla(Some(1536));
        let scale = softmax_scale(&mla, Some(&yarn)).unwrap();
        assert!((scale - 0.1147214).abs() < 5e-7, "{scale}");
        let ratio = yarn_get_mscale(yarn.factor, yarn.mscale)
            / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim);
        assert!((ratio - 1.0857264).abs() < 5e-7, "{ratio}");
        // Swapped (mscale 0.707, mscale_all_dim 1.0): the V3 factor, 1.3688879².
        let swapped = YarnScaling {
            mscale: 0.707,
            mscale_all_dim: 1.0,
            ..yarn
        };
        let factor = swapped.softmax_scale_factor();
        assert!((factor - 1.8738542).abs() < 5e-7, "{factor}");
    }

    #[test]
    fn cache_widths_per_token() {
        let mla = v2_mla(Some(1536));
        // deepseek-family-facts.md: naive 16·(192 + 128) = 5,120 for V2-Lite; latent 576.
        assert_eq!(mla.decompressed_cache_per_token(16).unwrap(), 5_120);
        assert_eq!(mla.latent_cache_per_token().unwrap(), 576);
    }
}
