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
//! library call, so the reference runs `scaled_dot_product_attention`. Which kernel that
//! dispatches to depends on the platform, dtype and head dim ([`SdpaKernel`]): the fused
//! kernels share one FLOP formula (the CUDA flash kernel on a head dim padded to a
//! multiple of 8), and where none accepts the inputs the math path is costed op by op.

use serde::Serialize;

use crate::checked::{product, sum};
use crate::config::ModelConfig;
use crate::conventions::{ArgRef, TensorMeta};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::layers::rotary_embedding::LlamaRotaryEmbedding;
use crate::layers::sdpa_kernel::SdpaKernel;
use crate::layers::vendor_ops::{arg, bytes_of, t, with_last};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::workload::{Phase, Workload};

/// `kᵀ`: `[B, H, S, d]` → `[B, H, d, S]` (a view).
fn kt(k: &TensorMeta) -> TensorMeta {
    let s = &k.shape;
    t(&[s[0], s[1], s[3], s[2]], k.dtype)
}

/// The role of the attention-core node in the cost tree (verify looks it up).
pub const ATTENTION_CORE_ROLE: &str = "attention core";

/// How the attention core runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AttentionImpl {
    /// One fused kernel (`scaled_dot_product_attention`): `LlamaFlashAttention2`.
    #[default]
    Sdpa,
    /// matmul → scale → mask → softmax → matmul: `LlamaAttention`.
    Eager,
}

impl AttentionImpl {
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
            workload: workload.clone(),
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

    /// `q * cos + rotate_half(q) * sin` over the projection `projected` (`[B, S, H·d]`)
    /// viewed as `[B, heads, S, d]`, as the vendor applies it.
    fn apply_rotary(
        &self,
        b: &mut CostBuilder,
        name: &str,
        projected: &TensorMeta,
        heads: u64,
        table: &TensorMeta,
    ) -> Result<TensorMeta> {
        let (batch, s, d) = (
            self.workload.batch,
            self.workload.query_len(),
            self.head_dim,
        );
        let x = projected.viewed_as(&[batch, heads, s, d]);
        let table = t(&[batch, 1, s, d], table.dtype);
        b.rotary(name, &x, &table)
    }

    /// A fused SDPA kernel. The CUDA flash kernel computes with the head dim padded to a
    /// multiple of 8 (q, k and v are padded first; the output is sliced back, a view).
    fn fused_core(
        &self,
        b: &mut CostBuilder,
        kernel: SdpaKernel,
        op: &'static str,
        q: &TensorMeta,
        k: &TensorMeta,
        v: &TensorMeta,
    ) -> Result<()> {
        let w = &self.workload;
        let (batch, heads, sq, d) = (w.batch, self.heads, w.query_len(), self.head_dim);
        let padded = kernel.computed_head_dim(d);
        let pad = |b: &mut CostBuilder, name: &str, x: &TensorMeta| -> Result<TensorMeta> {
            if padded == d {
                return Ok(x.clone());
            }
            b.copy(
                format_args!("pad {name} to head dim {padded}"),
                "aten::constant_pad_nd",
                [x],
                with_last(x, padded),
            )
        };
        let (q, k, v) = (pad(b, "q", q)?, pad(b, "k", k)?, pad(b, "v", v)?);
        let outputs = kernel.outputs(t(&[batch, heads, sq, padded], w.dtype), batch, heads, sq);
        // The kernel's result is its first output (sliced back when padded); the padded
        // inputs and the side outputs are freed when SDPA returns.
        let written = b.op_with_host_outputs(
            // The kernel is the op the tree shows beside the role.
            "scaled_dot_product_attention",
            op,
            &[
                arg(&q),
                arg(&k),
                arg(&v),
                ArgRef::Float(0.0),
                ArgRef::Bool(sq > 1),
            ],
            outputs.device,
            &outputs.host,
        )?;
        b.returns(&[&written[0]]);
        Ok(())
    }

    /// `_scaled_dot_product_attention_math` (libtorch 2.11), where no fused kernel takes
    /// the inputs: q scaled by √scale; in prefill the causal mask, `ones(S_q, S_kv)`
    /// `.tril()` turned into `where(mask, 0, -inf)` in the model dtype (one wrapped
    /// scalar tensor); kᵀ scaled by √scale; `q @ kᵀ`; the mask added in place (`add_`);
    /// `_safe_softmax`: softmax, `isneginf`, `all`, a zero scalar tensor and a `where`
    /// that writes the zeroed rows into the softmax's own output (it hands back that
    /// tensor, so it moves and allocates nothing under the counter's conventions);
    /// `attn @ v`. The op list the counter sees on the CPU when it runs this path
    /// (verify/tests/op_for_op.rs) and on an H200 (docs/results/2026-11-28-h200).
    fn math_core(
        &self,
        b: &mut CostBuilder,
        q: &TensorMeta,
        k: &TensorMeta,
        v: &TensorMeta,
    ) -> Result<()> {
        let w = &self.workload;
        let dtype = w.dtype;
        let (batch, heads, sq, d) = (w.batch, self.heads, w.query_len(), self.head_dim);
        let skv = k.shape[2];
        let bh = product("batch × heads", &[batch, heads])?;
        // The C++ function's locals (the scaled q, the mask) live until it returns; the
        // expression temporaries go when their consumer returns.
        let q_scaled = b.elementwise("q * √scale", "aten::mul", [q], dtype)?;
        let mask = if sq > 1 {
            let ones = t(&[sq, skv], Dtype::Bool);
            let ones = b.copy("causal: ones(S_q, S_kv)", "aten::ones", [], ones)?;
            let lower = b.copy(
                "causal: tril",
                "aten::tril",
                [&ones],
                t(&[sq, skv], Dtype::Bool),
            )?;
            b.release(&[&ones])?;
            let zero = b.copy(
                "causal: scalar_tensor(0)",
                "aten::scalar_tensor",
                [],
                t(&[], dtype),
            )?;
            let mask = b.copy(
                "causal: where(mask, 0, -inf)",
                "aten::where",
                [&lower, &zero],
                t(&[sq, skv], dtype),
            )?;
            // `attn_mask = convert_boolean_attn_mask(attn_mask, …)`.
            b.release(&[&zero, &lower])?;
            Some(mask)
        } else {
            None
        };
        let k_scaled = b.elementwise("kᵀ * √scale", "aten::mul", [&kt(k)], dtype)?;
        let kv_folds = self.kv_folds(skv);
        let q_copy = b.matmul_copy("matmul: q contiguous", &q_scaled, !self.q_folds())?;
        // kᵀ·√scale is a tensor of its own: where k was `repeat_kv`'s stride-0 view of one
        // KV head, the mul writes every head densely, so it folds like a copied k.
        let k_scaled_folds = kv_folds || self.heads != self.kv_heads;
        let k_copy = b.matmul_copy("matmul: kᵀ contiguous", &k_scaled, !k_scaled_folds)?;
        let [scores] = b.op(
            "q @ kᵀ",
            "aten::bmm",
            &[arg(&t(&[bh, sq, d], dtype)), arg(&t(&[bh, d, skv], dtype))],
            [t(&[bh, sq, skv], dtype)],
        )?;
        let scores = scores.viewed_as(&[batch, heads, sq, skv]);
        // `matmul`'s contiguous copies, and its argument kᵀ·√scale, go when it returns.
        for copy in [&q_copy, &k_copy].into_iter().flatten() {
            b.release(&[copy])?;
        }
        b.release(&[&k_scaled])?;
        if let Some(mask) = &mask {
            b.elementwise("+= causal mask", "aten::add_", [&scores, mask], dtype)?;
        }
        let [probs] = b.op(
            "_safe_softmax: softmax",
            "aten::softmax",
            &[arg(&scores), ArgRef::Int(-1)],
            [t(&scores.shape, dtype)],
        )?;
        let neg_inf = b.elementwise(
            "_safe_softmax: isneginf",
            "aten::isneginf",
            [&probs],
            Dtype::Bool,
        )?;
        let [all_masked] = b.op(
            "_safe_softmax: all(-1)",
            "aten::all",
            &[arg(&neg_inf), ArgRef::Int(-1), ArgRef::Bool(true)],
            [t(&[batch, heads, sq, 1], Dtype::Bool)],
        )?;
        let zero = b.copy(
            "_safe_softmax: scalar_tensor(0)",
            "aten::scalar_tensor",
            [],
            t(&[], dtype),
        )?;
        b.returns_input(
            "_safe_softmax: where(all masked, 0, probs) into probs",
            "aten::where",
        )?;
        // `_safe_softmax` returns (its locals go), and `attn = …` drops the raw scores.
        b.release(&[&neg_inf, &all_masked, &zero, &scores])?;
        let v_copy = b.matmul_copy("matmul: v contiguous", v, !kv_folds)?;
        let out = b.op(
            "attn @ v",
            "aten::bmm",
            &[
                arg(&t(&[bh, sq, skv], dtype)),
                arg(&t(&[bh, skv, v.shape[3]], dtype)),
            ],
            [t(&[bh, sq, d], dtype)],
        )?;
        if let Some(copy) = &v_copy {
            b.release(&[copy])?;
        }
        b.returns(&[&out[0]]);
        Ok(())
    }

    /// Whether q folds into the `[B·H, S_q, d]` batch of a `bmm` as a view. q lies in
    /// memory as `[B, S, H, d]` (the rotary embedding keeps the projection's layout), so
    /// merging B and H needs B = 1, H = 1 or S_q = 1 (a dimension of size 1 constrains no
    /// stride).
    fn q_folds(&self) -> bool {
        let w = &self.workload;
        w.batch == 1 || self.heads == 1 || w.query_len() == 1
    }

    /// Whether k and v (and kᵀ) fold into a `bmm` batch as a view: after `repeat_kv`'s
    /// copy (kv_heads > 1) they are contiguous; with one KV head `repeat_kv` is a view
    /// whose heads share memory (stride 0), which folds only when B = 1; without
    /// grouping, a decode step's cache `cat` makes them contiguous, and a prefill's lie
    /// in memory as `[B, S, H, d]` like q.
    fn kv_folds(&self, key_len: u64) -> bool {
        let w = &self.workload;
        if self.heads != self.kv_heads {
            return self.kv_heads > 1 || w.batch == 1;
        }
        match w.phase {
            Phase::Decode { .. } => true,
            Phase::Prefill { .. } => w.batch == 1 || self.heads == 1 || key_len == 1,
        }
    }

    /// Whether the attention core's output already lies in memory as `[B, S, H, d]`: the
    /// fused kernels write that layout, and a `[B, H, S, d]` tensor with H = 1 or S = 1
    /// is the same memory either way.
    fn core_writes_bshd(&self, key_len: u64) -> bool {
        let w = &self.workload;
        let kernel = match self.implementation {
            AttentionImpl::Sdpa => Some(SdpaKernel::select(
                w.platform,
                w.dtype,
                self.head_dim,
                key_len,
            )),
            AttentionImpl::Eager => None,
        };
        let rows = w
            .batch
            .saturating_mul(self.heads)
            .saturating_mul(w.query_len());
        if let Some(dense) = kernel.and_then(|k| k.padded_output_dense(self.head_dim, rows)) {
            return dense;
        }
        if self.heads == 1 || w.query_len() == 1 {
            return true;
        }
        kernel.is_some_and(|k| k.writes_bshd(self.head_dim))
    }

    fn core(&self, q: &TensorMeta, k: &TensorMeta, v: &TensorMeta) -> Result<Cost> {
        let w = &self.workload;
        let dtype = w.dtype;
        let (batch, heads, sq, d) = (w.batch, self.heads, w.query_len(), self.head_dim);
        let skv = k.shape[2];
        let mut b = CostBuilder::new(ATTENTION_CORE_ROLE, w.allow_tf32);
        match self.implementation {
            AttentionImpl::Sdpa => {
                let kernel = SdpaKernel::select(w.platform, dtype, d, skv);
                match kernel.op() {
                    Some(op) => self.fused_core(&mut b, kernel, op, q, k, v)?,
                    None => self.math_core(&mut b, q, k, v)?,
                }
            }
            AttentionImpl::Eager => {
                let bh = product("batch × heads", &[batch, heads])?;
                let kv_folds = self.kv_folds(skv);
                // `matmul`'s contiguous copies are its temporaries.
                let q_copy = b.matmul_copy("matmul: q contiguous", q, !self.q_folds())?;
                let k_copy = b.matmul_copy("matmul: kᵀ contiguous", &kt(k), !kv_folds)?;
                let [scores] = b.op(
                    "q @ kᵀ",
                    "aten::bmm",
                    &[arg(&t(&[bh, sq, d], dtype)), arg(&t(&[bh, d, skv], dtype))],
                    [t(&[bh, sq, skv], dtype)],
                )?;
                let scores = scores.viewed_as(&[batch, heads, sq, skv]);
                for copy in [&q_copy, &k_copy].into_iter().flatten() {
                    b.release(&[copy])?;
                }
                let scaled = b.elementwise("/ sqrt(head_dim)", "aten::div", [&scores], dtype)?;
                b.release(&[&scores])?;
                let mask = t(&[batch, 1, sq, skv], dtype);
                let masked =
                    b.elementwise("+ causal_mask", "aten::add", [&scaled, &mask], dtype)?;
                b.release(&[&scaled])?;
                let [probs32] = b.op(
                    "softmax(float32)",
                    "aten::softmax",
                    &[arg(&masked), ArgRef::Int(-1), ArgRef::Other("ScalarType")],
                    [t(&masked.shape, Dtype::F32)],
                )?;
                let probs = b.cast("softmax.to(q.dtype)", &probs32, dtype)?;
                b.release_unless_same(&probs32, &probs)?;
                b.release(&[&masked])?;
                let v_copy = b.matmul_copy("matmul: v contiguous", v, !kv_folds)?;
                let [out] = b.op(
                    "attn @ v",
                    "aten::bmm",
                    &[
                        arg(&t(&[bh, sq, skv], dtype)),
                        arg(&t(&[bh, skv, d], dtype)),
                    ],
                    [t(&[bh, sq, d], dtype)],
                )?;
                if let Some(copy) = &v_copy {
                    b.release(&[copy])?;
                }
                // The attention weights stay a local of the attention until it returns.
                b.returns(&[&out, &probs]);
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
        let q = b.linear("q_proj", &x, product("q width", &[heads, d])?, self.bias)?;
        let k = b.linear("k_proj", &x, product("k width", &[kv_heads, d])?, self.bias)?;
        let v = b.linear("v_proj", &x, product("v width", &[kv_heads, d])?, self.bias)?;
        let mut v = v.viewed_as(&[batch, kv_heads, sq, d]);

        let rotary = LlamaRotaryEmbedding {
            batch,
            query_len: sq,
            head_dim: d,
            dtype,
            allow_tf32: w.allow_tf32,
        };
        let table = rotary.table();
        // cos and sin: locals until the attention returns.
        let _cos_sin = b.call(rotary.cost()?, [&table, &table])?;
        let q_embed = self.apply_rotary(&mut b, "q", &q, heads, &table)?;
        let k_embed = self.apply_rotary(&mut b, "k", &k, kv_heads, &table)?;
        // `query_states, key_states = apply_rotary_pos_emb(…)` drops the projections.
        b.release(&[&q, &k])?;
        let q = q_embed;
        let mut k = k_embed;

        if let Phase::Decode { context_len } = w.phase {
            let cached = t(&[batch, kv_heads, context_len, d], dtype);
            let full = t(&[batch, kv_heads, skv, d], dtype);
            let keys = b.copy(
                "past_key_value.update (keys)",
                "aten::cat",
                [&cached, &k],
                full.clone(),
            )?;
            let values = b.copy(
                "past_key_value.update (values)",
                "aten::cat",
                [&cached, &v],
                full,
            )?;
            // The step's own keys and values are dropped for the concatenations.
            b.release(&[&k, &v])?;
            (k, v) = (keys, values);
        }
        // The cache holds the keys and values after the call: the prefill's own, or the
        // decode step's concatenations.
        b.keeps(&[&k, &v]);
        if heads != kv_heads {
            // `x[:, :, None].expand(B, kv_heads, n_rep, S, d).reshape(B, H, S, d)`: the
            // reshape copies the expanded tensor (read at its expanded size). With one KV
            // head the reshape is a view: all heads share the one head's memory.
            let expanded = t(&[batch, kv_heads, heads / kv_heads, skv, d], dtype);
            let repeated = t(&[batch, heads, skv, d], dtype);
            if kv_heads > 1 {
                k = b.copy(
                    "repeat_kv (keys)",
                    "aten::clone",
                    [&expanded],
                    repeated.clone(),
                )?;
                v = b.copy("repeat_kv (values)", "aten::clone", [&expanded], repeated)?;
            } else {
                (k, v) = (k.viewed_as(&repeated.shape), v.viewed_as(&repeated.shape));
            }
        }

        let core = self.core(&q, &k, &v)?;
        let core_out = t(&[batch, heads, sq, d], dtype);
        // Eager returns the attention weights too: a local until the attention returns.
        let core_out = b.call_first(core, &core_out)?;
        let out = t(&[batch, sq, heads, d], dtype);
        let merged_shape = [batch, sq, product("o width", &[heads, d])?];
        let merged = if self.core_writes_bshd(k.shape[2]) {
            b.returns_input(
                "transpose(1, 2).contiguous(): already so",
                "aten::contiguous",
            )?;
            core_out.viewed_as(&merged_shape)
        } else {
            let copied = b.copy(
                "transpose(1, 2).contiguous()",
                "aten::contiguous",
                [&out],
                out.clone(),
            )?;
            b.release(&[&core_out])?;
            copied.viewed_as(&merged_shape)
        };
        let projected = b.linear("o_proj", &merged, self.hidden, self.bias)?;
        b.release(&[&merged])?;
        b.returns(&[&projected]);

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
    fn peak_by_hand_at_b1_s512() {
        // docs/memory.md, "Peak activation memory", bf16, N = 512 tokens, h = H·d = 1280.
        // The peak is during k's rotary embedding: v, the q and k projections, cos and
        // sin ([1, 512, 128] each), q_embed, and k's x·cos, rotate_half(k), its ·sin.
        let nh = 512 * 1280 * 2;
        let cos_sin = 2 * 512 * 128 * 2;
        let w = Workload::prefill(1, 512).unwrap();
        let c = attention(&w, AttentionImpl::Sdpa);
        assert_eq!(c.peak.peak_bytes, 7 * nh + cos_sin);
        assert_eq!(c.peak.peak_bytes, 9_437_184);
        assert_eq!(c.peak.returned_bytes, nh, "o_proj's output");
        assert_eq!(
            c.peak.kept_bytes,
            2 * nh,
            "the cache keeps the prefill's k and v"
        );
        // Eager: the peak moves into the core, where the masked scores, their fp32
        // softmax and its bf16 copy coexist (4 score-sized bf16 tensors), on top of v,
        // q_embed, k_embed, cos and sin.
        let scores = 10 * 512 * 512 * 2;
        let e = attention(&w, AttentionImpl::Eager);
        assert_eq!(e.peak.peak_bytes, 3 * nh + cos_sin + 4 * scores);
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

    /// A small config with head dim `d` (hidden 256, `heads` query and `kv` key heads).
    fn small(d: u64, heads: u64, kv: u64) -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "deepseek_v2", "hidden_size": 256, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": d, "intermediate_size": 512,
            "moe_intermediate_size": 128, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "n_shared_experts": 1, "num_hidden_layers": 2, "first_k_dense_replace": 1,
            "vocab_size": 1000, "use_mla": false,
        });
        ModelConfig::from_json_value("small", &json).unwrap()
    }

    fn sdpa_cost(config: &ModelConfig, w: &Workload) -> Cost {
        LlamaAttention::new(config, w, AttentionImpl::Sdpa)
            .cost()
            .unwrap()
    }

    #[test]
    fn cuda_flash_computes_on_the_padded_head_dim() {
        // Measured on an H200 (docs/results/2026-11-27-h200, verify-d20-bf16): d = 20,
        // H = 4, B = 1, S = 40: the flash kernel booked 614,400 matmul and 38,400
        // elementwise FLOPs (d padded to 24), the layer 5,530,400 matmul FLOPs. "Booked":
        // the counter's costs of the ops the GPU ran, by the same conventions table, so
        // the op list, the padding and the matmul counts are the GPU's witness here; the
        // elementwise figure only locks the table's rule.
        let w = Workload::prefill(1, 40).unwrap();
        let c = sdpa_cost(&small(20, 4, 2), &w);
        let core = c.child(ATTENTION_CORE_ROLE).unwrap();
        let flash: Vec<&Cost> = core
            .ops()
            .into_iter()
            .filter(|o| o.op == Some("aten::_scaled_dot_product_flash_attention"))
            .collect();
        assert_eq!(flash.len(), 1);
        assert_eq!(flash[0].metrics.matmul_flops, 614_400);
        assert_eq!(flash[0].metrics.elementwise_flops, 38_400);
        assert_eq!(c.metrics.matmul_flops, 5_530_400);
        let pads = core
            .ops()
            .iter()
            .filter(|o| o.op == Some("aten::constant_pad_nd"))
            .count();
        assert_eq!(pads, 3, "q, k and v are padded");
        // On the CPU the same layer runs unpadded: 4·B·H·S²·d with d = 20.
        let cpu = sdpa_cost(&small(20, 4, 2), &w.on(crate::Platform::Cpu));
        let cpu_core = cpu.child(ATTENTION_CORE_ROLE).unwrap();
        assert_eq!(cpu_core.metrics.matmul_flops, 4 * 4 * 40 * 40 * 20);
    }

    #[test]
    fn fp32_with_head_dim_not_a_multiple_of_four_runs_the_math_path() {
        // Measured on an H200 (verify-d6-fp32): d = 6, H = 4, B = 1, S = 40, fp32: the
        // layer's matmuls were 2,119,920 FLOPs (3 bmm incl. the rotary table), its
        // elementwise FLOPs 48,000 without `isneginf`, which costs 1 per score (6,400).
        // As above, the elementwise figures are the table's costs of the ops the GPU ran.
        let w = Workload::prefill(1, 40)
            .unwrap()
            .with_dtype(Dtype::F32)
            .unwrap();
        let c = sdpa_cost(&small(6, 4, 4), &w);
        assert_eq!(c.metrics.matmul_flops, 2_119_920);
        assert_eq!(c.metrics.elementwise_flops, 48_000 + 6_400);
        assert_eq!(c.metrics.tensor_core_flops, 0, "fp32 math path, TF32 off");
        let core = c.child(ATTENTION_CORE_ROLE).unwrap();
        assert!(core
            .ops()
            .iter()
            .all(|o| !o.op.is_some_and(crate::conventions::is_fused_attention)));
    }

    #[test]
    fn fp32_efficient_attention_is_booked_to_tensor_cores() {
        let w = Workload::prefill(1, 512)
            .unwrap()
            .with_dtype(Dtype::F32)
            .unwrap();
        let cuda = attention(&w, AttentionImpl::Sdpa);
        let core = cuda.child(ATTENTION_CORE_ROLE).unwrap();
        assert_eq!(
            core.ops()[0].op,
            Some("aten::_scaled_dot_product_efficient_attention")
        );
        assert_eq!(core.metrics.tensor_core_flops, 1_342_177_280);
        // The same workload on the CPU: its flash kernel, fp32 on CUDA cores.
        let cpu = attention(&w.on(crate::Platform::Cpu), AttentionImpl::Sdpa);
        let core = cpu.child(ATTENTION_CORE_ROLE).unwrap();
        assert_eq!(core.metrics.tensor_core_flops, 0);
        assert_eq!(core.metrics.matmul_flops, 1_342_177_280);
    }
}
