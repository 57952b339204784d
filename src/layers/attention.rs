//! Llama-style multi-head attention with rotary embedding, as DeepSeek-OCR runs it
//! (`use_mla: false` → `LlamaFlashAttention2`, or `LlamaAttention` for eager).
//!
//! Per call with N = B·S_q query tokens attending over S_kv keys:
//! - projections q, k, v, o: 2·N·h·(H·d) + 2·2·N·h·(H_kv·d) + 2·N·(H·d)·h
//!   (= 8·N·h² for DeepSeek-OCR);
//! - rotary table: B·S_q·d fp32 matmul + 4·B·S_q·d elementwise; applying it to q and k:
//!   3.5·B·S_q·d·(H + H_kv) elementwise (two multiplies, one add, a half-width negate);
//! - core: 4·B·H·S_q·S_kv·d matmul FLOPs, the full rectangle (causal masking is never
//!   discounted), plus its softmax work: 6 per score inside a fused kernel, 7 per score
//!   in eager (scale, mask add, softmax);
//! - KV cache: 2·B·H_kv·S_kv·d elements after the call.
//!
//! The fused variant stands for `LlamaFlashAttention2`: libtorch has no `flash_attn`
//! library call, so the reference runs `scaled_dot_product_attention`, which dispatches
//! to a fused kernel with the same FLOP formula (cuDNN or efficient attention on CUDA,
//! the flash kernel on CPU).

use serde::Serialize;

use crate::checked::{product, sum};
use crate::config::ModelConfig;
use crate::conventions::{Arg, TensorMeta};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::layers::rotary_embedding::LlamaRotaryEmbedding;
use crate::layers::vendor_ops::{arg, bytes_of, t};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::workload::{Phase, Workload};

/// The role of the attention-core node in the cost tree (verify looks it up).
pub const ATTENTION_CORE_ROLE: &str = "attention core";

/// How the attention core runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionImpl {
    /// One fused kernel (`scaled_dot_product_attention`): `LlamaFlashAttention2`.
    Sdpa,
    /// matmul → scale → mask → softmax → matmul: `LlamaAttention`.
    Eager,
}

impl AttentionImpl {
    /// Parses `sdpa` or `eager`.
    pub fn parse(text: &str) -> Result<AttentionImpl> {
        match text {
            "sdpa" | "flash" | "flash_attention_2" => Ok(AttentionImpl::Sdpa),
            "eager" => Ok(AttentionImpl::Eager),
            _ => Err(Error::invalid(
                "attention implementation",
                text,
                "sdpa or eager",
            )),
        }
    }

    /// The vendor class this implementation corresponds to.
    pub fn class_name(self) -> &'static str {
        match self {
            AttentionImpl::Sdpa => "LlamaFlashAttention2",
            AttentionImpl::Eager => "LlamaAttention",
        }
    }
}

/// Llama attention of a DeepSeek-V2 decoder layer (multi-head, rotary inside).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaAttention {
    hidden: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    bias: bool,
    workload: Workload,
    implementation: AttentionImpl,
}

impl LlamaAttention {
    /// The attention of a decoder layer for `workload`.
    pub fn new(
        config: &ModelConfig,
        workload: &Workload,
        implementation: AttentionImpl,
    ) -> LlamaAttention {
        LlamaAttention {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            bias: config.attention_bias,
            workload: *workload,
            implementation,
        }
    }

    /// Parameters: q, k, v, o projections (and their biases when the config has them).
    pub fn parameters(&self) -> Result<u64> {
        let q = product("q_proj", &[self.hidden, self.heads, self.head_dim])?;
        let kv = product(
            "k_proj + v_proj",
            &[2, self.hidden, self.kv_heads, self.head_dim],
        )?;
        let mut total = sum("attention parameters", &[q, kv, q])?;
        if self.bias {
            let qb = product("q bias", &[self.heads, self.head_dim])?;
            let kvb = product("k/v bias", &[2, self.kv_heads, self.head_dim])?;
            total = sum("attention parameters", &[total, qb, kvb, self.hidden])?;
        }
        Ok(total)
    }

    /// `q * cos + rotate_half(q) * sin` for `heads` heads, as the vendor applies it.
    fn apply_rotary(
        &self,
        b: &mut CostBuilder,
        name: &str,
        heads: u64,
        table: &TensorMeta,
    ) -> Result<TensorMeta> {
        let dtype = self.workload.dtype;
        let (batch, s, d) = (
            self.workload.batch,
            self.workload.query_len(),
            self.head_dim,
        );
        let x = t(&[batch, heads, s, d], dtype);
        let table = t(&[batch, 1, s, d], table.dtype);
        let x_cos = b.elementwise(&format!("{name} * cos"), "aten::mul", &[&x, &table], dtype)?;
        let half = t(&[batch, heads, s, d / 2], dtype);
        let neg = b.elementwise(
            &format!("-{name}2 (rotate_half)"),
            "aten::neg",
            &[&half],
            dtype,
        )?;
        let rotated = b.copy(
            &format!("cat(-{name}2, {name}1)"),
            "aten::cat",
            &[&neg, &half],
            x.clone(),
        )?;
        let rot_sin = b.elementwise(
            &format!("rotate_half({name}) * sin"),
            "aten::mul",
            &[&rotated, &table],
            dtype,
        )?;
        b.elementwise(
            &format!("{name}_embed = + "),
            "aten::add",
            &[&x_cos, &rot_sin],
            dtype,
        )
    }

    fn core(&self, q: &TensorMeta, k: &TensorMeta, v: &TensorMeta) -> Result<Cost> {
        let w = &self.workload;
        let dtype = w.dtype;
        let (batch, heads, sq, d) = (w.batch, self.heads, w.query_len(), self.head_dim);
        let skv = k.shape[2];
        let mut b = CostBuilder::new(ATTENTION_CORE_ROLE, w.allow_tf32);
        match self.implementation {
            AttentionImpl::Sdpa => {
                let out = t(&[batch, heads, sq, d], dtype);
                b.op(
                    "scaled_dot_product_attention (fused)",
                    "aten::_scaled_dot_product_flash_attention",
                    &[arg(q), arg(k), arg(v), Arg::Float(0.0), Arg::Bool(sq > 1)],
                    &[out, t(&[batch, heads, sq], Dtype::F32)],
                )?;
            }
            AttentionImpl::Eager => {
                let bh = product("batch × heads", &[batch, heads])?;
                let scores = t(&[bh, sq, skv], dtype);
                b.op(
                    "q @ kᵀ",
                    "aten::bmm",
                    &[arg(&t(&[bh, sq, d], dtype)), arg(&t(&[bh, d, skv], dtype))],
                    &[scores],
                )?;
                let scores = t(&[batch, heads, sq, skv], dtype);
                let scaled = b.elementwise("/ sqrt(head_dim)", "aten::div", &[&scores], dtype)?;
                let mask = t(&[batch, 1, sq, skv], dtype);
                let masked =
                    b.elementwise("+ causal_mask", "aten::add", &[&scaled, &mask], dtype)?;
                let probs = t(&masked.shape, Dtype::F32);
                b.op(
                    "softmax(float32)",
                    "aten::softmax",
                    &[arg(&masked), Arg::Int(-1), Arg::Other("ScalarType".into())],
                    std::slice::from_ref(&probs),
                )?;
                b.cast("softmax.to(q.dtype)", &probs, dtype)?;
                b.op(
                    "attn @ v",
                    "aten::bmm",
                    &[
                        arg(&t(&[bh, sq, skv], dtype)),
                        arg(&t(&[bh, skv, d], dtype)),
                    ],
                    &[t(&[bh, sq, d], dtype)],
                )?;
            }
        }
        Ok(b.finish())
    }
}

impl Layer for LlamaAttention {
    fn name(&self) -> String {
        self.implementation.class_name().into()
    }

    fn cost(&self) -> Result<Cost> {
        let w = &self.workload;
        let dtype = w.dtype;
        let (batch, sq, d) = (w.batch, w.query_len(), self.head_dim);
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        let skv = w.key_len()?;
        let mut b = CostBuilder::new(self.name(), w.allow_tf32);
        let x = t(&[batch, sq, self.hidden], dtype);
        b.linear("q_proj", &x, product("q width", &[heads, d])?, self.bias)?;
        b.linear("k_proj", &x, product("k width", &[kv_heads, d])?, self.bias)?;
        b.linear("v_proj", &x, product("v width", &[kv_heads, d])?, self.bias)?;

        let rotary = LlamaRotaryEmbedding {
            batch,
            query_len: sq,
            head_dim: d,
            dtype,
            allow_tf32: w.allow_tf32,
        };
        let table = rotary.table();
        b.child(rotary.cost()?)?;
        let q = self.apply_rotary(&mut b, "q", heads, &table)?;
        let mut k = self.apply_rotary(&mut b, "k", kv_heads, &table)?;
        let mut v = t(&[batch, kv_heads, sq, d], dtype);

        if let Phase::Decode { context_len } = w.phase {
            let cached = t(&[batch, kv_heads, context_len, d], dtype);
            let full = t(&[batch, kv_heads, skv, d], dtype);
            k = b.copy(
                "past_key_value.update (keys)",
                "aten::cat",
                &[&cached, &k],
                full.clone(),
            )?;
            v = b.copy(
                "past_key_value.update (values)",
                "aten::cat",
                &[&cached, &v],
                full,
            )?;
        }
        if heads != kv_heads {
            let repeated = t(&[batch, heads, skv, d], dtype);
            k = b.copy("repeat_kv (keys)", "aten::clone", &[&k], repeated.clone())?;
            v = b.copy("repeat_kv (values)", "aten::clone", &[&v], repeated)?;
        }

        b.child(self.core(&q, &k, &v)?)?;
        let out = t(&[batch, sq, heads, d], dtype);
        b.copy(
            "transpose(1, 2).contiguous()",
            "aten::contiguous",
            &[&out],
            out.clone(),
        )?;
        let merged = t(&[batch, sq, product("o width", &[heads, d])?], dtype);
        b.linear("o_proj", &merged, self.hidden, self.bias)?;

        b.weights(bytes_of("attention weights", self.parameters()?, dtype)?)?;
        let cache = product("KV cache elements", &[2, batch, kv_heads, skv, d])?;
        b.kv_cache(bytes_of("KV cache", cache, dtype)?)?;
        Ok(b.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attention(w: &Workload, implementation: AttentionImpl) -> Cost {
        LlamaAttention::new(&ModelConfig::deepseek_ocr(), w, implementation)
            .cost()
            .unwrap()
    }

    #[test]
    fn prefill_matches_the_reference_measurement_plus_rotary() {
        let c = attention(&Workload::prefill(1, 512).unwrap(), AttentionImpl::Sdpa);
        // CUDA SDPA, FlopCounterMode: 8,053,063,680, plus B·S·d for the rotary matmul.
        assert_eq!(c.metrics.matmul_flops, 8_053_063_680 + 65_536);
        let core = c.child(ATTENTION_CORE_ROLE).unwrap();
        assert_eq!(core.metrics.matmul_flops, 1_342_177_280);
        assert_eq!(c.metrics.weight_bytes, 6_553_600 * 2, "4h² bf16 parameters");
        assert_eq!(
            c.metrics.kv_cache_bytes,
            2 * 10 * 512 * 128 * 2,
            "5,120 B per token"
        );
        // Only the fp32 rotary matmul is CUDA-core matmul work.
        assert_eq!(c.metrics.tensor_core_flops, 8_053_063_680);
    }

    #[test]
    fn eager_and_fused_agree_on_matmul_but_not_softmax() {
        let w = Workload::prefill(2, 16).unwrap();
        let fused = attention(&w, AttentionImpl::Sdpa).metrics;
        let eager = attention(&w, AttentionImpl::Eager).metrics;
        assert_eq!(fused.matmul_flops, eager.matmul_flops);
        let scores = 2 * 10 * 16 * 16;
        assert_eq!(
            eager.elementwise_flops - fused.elementwise_flops,
            scores,
            "7 vs 6 per score"
        );
    }

    #[test]
    fn decode_attends_over_context_plus_one() {
        let c = attention(&Workload::decode(1, 512).unwrap(), AttentionImpl::Sdpa);
        let core = c.child(ATTENTION_CORE_ROLE).unwrap();
        assert_eq!(core.metrics.matmul_flops, 4 * 10 * 513 * 128);
        assert_eq!(c.metrics.kv_cache_bytes, 2 * 10 * 513 * 128 * 2);
    }
}
