//! `RefDeepseekV2Attention`: Multi-head Latent Attention (MLA) of DeepSeek-V2, V2-Lite and
//! V3 as the vendor `modeling_deepseek.py` runs it, in two forms ([`MlaForm`]):
//!
//! - **naive** (the code shipped with the HF checkpoints; DeepSeek-VL2's first
//!   `modeling_deepseek.py`): `kv_b_proj` decompresses the latent into per-head keys and
//!   values, which are cached. `--attn eager` is `DeepseekV2Attention` (matmul, scale,
//!   mask, fp32 softmax, matmul); `--attn sdpa` is `DeepseekV2FlashAttention2`, which pads
//!   the values to d_qk before caching them — libtorch has no `flash_attn_func`, so
//!   `scaled_dot_product_attention` stands for it, as for the MHA attention.
//! - **absorb** (DeepSeek-VL2's later `DeepseekV2Attention`): `kv_b_proj`'s halves are
//!   folded into the query and the output; only the latent `compressed_kv` and the shared
//!   rotary key `k_pe` are cached. Always eager (the vendor asserts a mask).
//!
//! The rotary part (d_r dims) is rotated with tables that the vendor rebuilds in the
//! forward ([`crate::mla_rotary`]).
//!
//! Tensors are dropped where the vendor's Python drops its last reference (peak
//! activation memory, docs/memory.md): a temporary once the op or call consuming it
//! returns, a local when it is reassigned or the function returns. Rust would keep a
//! shadowed binding to the end of its scope and a temporary to the end of its statement,
//! hence the explicit `drop`s and split statements; the ops and their order are the
//! vendor's.

use modelmeter::layers::AttentionImpl;
use modelmeter::mla_config::softmax_scale;
use modelmeter::{MlaForm, ModelConfig};
use tch::{Kind, Tensor};

use crate::attention::KvCache;
use crate::error::Result;
use crate::mla_rotary::RefDeepseekV2RotaryEmbedding;
use crate::rms_norm::RefDeepseekV2RMSNorm;
use crate::weights::{dim, linear, Init};
use crate::{prefixed, Parameters};

/// A linear layer's weight and optional bias.
type Linear = (Tensor, Option<Tensor>);

/// The eps of `q_a_layernorm` and `kv_a_layernorm`: the vendor builds them as
/// `DeepseekV2RMSNorm(config.q_lora_rank)` / `(config.kv_lora_rank)`, so they keep the
/// class default whatever `rms_norm_eps` says (transformers' DeepseekV2/V3Attention too).
const MLA_NORM_EPS: f64 = 1e-6;

/// The query projection: `q_proj`, or `q_a_proj → q_a_layernorm → q_b_proj`.
#[derive(Debug)]
enum QueryProjection {
    Direct(Tensor),
    LowRank {
        q_a_proj: Linear,
        q_a_layernorm: RefDeepseekV2RMSNorm,
        q_b_proj: Tensor,
    },
}

/// The vendor MLA attention (see the module docs).
#[derive(Debug)]
pub struct RefDeepseekV2Attention {
    query: QueryProjection,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RefDeepseekV2RMSNorm,
    kv_b_proj: Tensor,
    o_proj: Linear,
    rotary_emb: RefDeepseekV2RotaryEmbedding,
    heads: i64,
    kv_lora_rank: i64,
    qk_nope_head_dim: i64,
    qk_rope_head_dim: i64,
    v_head_dim: i64,
    softmax_scale: f64,
    implementation: AttentionImpl,
    form: MlaForm,
}

/// `dst[...] = src` as Python runs it (`at::indexing::copy_to`): `copy_` when the shapes
/// are equal; otherwise `src` viewed without its leading 1s and expanded to `dst`'s shape
/// first (`k_pe` [B, 1, S, d_r] into `key_states[..., d_n:]`), so `copy_` reads it at
/// `dst`'s size, as the counter then sees it.
fn setitem(mut dst: Tensor, src: &Tensor) -> Result<()> {
    if dst.size() == src.size() {
        dst.f_copy_(src)?;
        return Ok(());
    }
    let stripped: Vec<i64> = src.size().into_iter().skip_while(|&d| d == 1).collect();
    let expanded = src
        .f_view(stripped.as_slice())?
        .f_expand(dst.size(), false)?;
    dst.f_copy_(&expanded)?;
    Ok(())
}

impl RefDeepseekV2Attention {
    /// The layer's rotary embedding, whose tables persist between calls.
    pub(crate) fn rotary(&self) -> &RefDeepseekV2RotaryEmbedding {
        &self.rotary_emb
    }

    /// The attention of an MLA config, run in `form` with `implementation`.
    pub(crate) fn new(
        config: &ModelConfig,
        init: &Init,
        implementation: AttentionImpl,
        form: MlaForm,
    ) -> Result<RefDeepseekV2Attention> {
        let m = config.mla()?;
        let h = dim(config.hidden_size, "hidden_size")?;
        let heads = dim(config.num_attention_heads, "num_attention_heads")?;
        let r_kv = dim(m.kv_lora_rank, "kv_lora_rank")?;
        let (d_n, d_r, d_v) = (
            dim(m.qk_nope_head_dim, "qk_nope_head_dim")?,
            dim(m.qk_rope_head_dim, "qk_rope_head_dim")?,
            dim(m.v_head_dim, "v_head_dim")?,
        );
        let d_qk = d_n + d_r;
        let projection = |name: &str, out: i64, inp: i64, bias: bool| -> Result<Linear> {
            Ok((
                init.linear(&format!("{name}.weight"), out, inp)?,
                match bias && config.attention_bias {
                    true => Some(init.bias(&format!("{name}.bias"), out)?),
                    false => None,
                },
            ))
        };
        let query = match m.q_lora_rank {
            None => QueryProjection::Direct(init.linear("q_proj.weight", heads * d_qk, h)?),
            Some(r_q) => {
                let r_q = dim(r_q, "q_lora_rank")?;
                QueryProjection::LowRank {
                    q_a_proj: projection("q_a_proj", r_q, h, true)?,
                    q_a_layernorm: RefDeepseekV2RMSNorm::with_width(
                        r_q,
                        MLA_NORM_EPS,
                        &init.sub("q_a_layernorm"),
                    )?,
                    q_b_proj: init.linear("q_b_proj.weight", heads * d_qk, r_q)?,
                }
            }
        };
        Ok(RefDeepseekV2Attention {
            query,
            kv_a_proj_with_mqa: projection("kv_a_proj_with_mqa", r_kv + d_r, h, true)?,
            kv_a_layernorm: RefDeepseekV2RMSNorm::with_width(
                r_kv,
                MLA_NORM_EPS,
                &init.sub("kv_a_layernorm"),
            )?,
            kv_b_proj: init.linear("kv_b_proj.weight", heads * (d_n + d_v), r_kv)?,
            o_proj: projection("o_proj", h, heads * d_v, true)?,
            rotary_emb: RefDeepseekV2RotaryEmbedding::new(config, init.setup().device)?,
            heads,
            kv_lora_rank: r_kv,
            qk_nope_head_dim: d_n,
            qk_rope_head_dim: d_r,
            v_head_dim: d_v,
            softmax_scale: softmax_scale(m, config.rope_scaling.as_ref())?,
            implementation,
            form,
        })
    }

    /// True when the forward needs the additive causal mask: the eager core and the
    /// absorbed form (which asserts one whatever the implementation).
    pub fn needs_mask(&self) -> bool {
        self.form == MlaForm::Absorb || self.implementation == AttentionImpl::Eager
    }

    /// One forward call over `x` `[B, S_q, h]` at `position_ids` `[B, S_q]`; `mask` is the
    /// additive causal mask `[B, 1, S_q, S_kv]` ([`Self::needs_mask`]).
    pub fn forward(
        &self,
        x: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.size3()?;
        let (d_n, d_r, d_v) = (
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
        );
        let q = match &self.query {
            QueryProjection::Direct(w) => linear(x, w, None)?,
            QueryProjection::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                // q_b_proj(q_a_layernorm(q_a_proj(x))): each inner result goes when the
                // call consuming it returns.
                let q_a = linear(x, &q_a_proj.0, q_a_proj.1.as_ref())?;
                let normed = q_a_layernorm.forward(&q_a)?;
                drop(q_a);
                linear(&normed, q_b_proj, None)?
            }
        };
        let q = q.f_view([b, s, self.heads, d_n + d_r])?.f_transpose(1, 2)?;
        let q_parts = q.f_split_with_sizes([d_n, d_r], -1)?;
        let (q_nope, q_pe) = (&q_parts[0], &q_parts[1]);

        let kv_a = linear(
            x,
            &self.kv_a_proj_with_mqa.0,
            self.kv_a_proj_with_mqa.1.as_ref(),
        )?;
        let kv_parts = kv_a.f_split_with_sizes([self.kv_lora_rank, d_r], -1)?;
        let (compressed_kv, k_pe) = (&kv_parts[0], &kv_parts[1]);
        match self.form {
            MlaForm::Naive => {
                let k_pe = k_pe.f_view([b, s, 1, d_r])?.f_transpose(1, 2)?;
                let kv = linear(
                    &self.kv_a_layernorm.forward(compressed_kv)?,
                    &self.kv_b_proj,
                    None,
                )?
                .f_view([b, s, self.heads, d_n + d_v])?
                .f_transpose(1, 2)?;
                let kv_parts = kv.f_split_with_sizes([d_n, d_v], -1)?;
                let (k_nope, values) = (&kv_parts[0], &kv_parts[1]);
                let kv_seq_len = s + cache.len();
                let (q_pe, k_pe) = self.rotate(q_pe, &k_pe, kv_seq_len, position_ids)?;
                self.naive(x, q_nope, &q_pe, k_nope, &k_pe, values, cache, mask)
            }
            MlaForm::Absorb => {
                let compressed_kv = self.kv_a_layernorm.forward(compressed_kv)?;
                let k_pe = k_pe.f_view([b, s, 1, d_r])?.f_transpose(1, 2)?;
                let kv_seq_len = s + cache.len();
                let (q_pe, k_pe_rotated) = self.rotate(q_pe, &k_pe, kv_seq_len, position_ids)?;
                // `q_pe, k_pe = apply_rotary_pos_emb(…)` drops the last view of
                // kv_a_proj_with_mqa's output (compressed_kv was rebound to the norm's).
                drop(k_pe);
                drop(kv_parts);
                drop(kv_a);
                self.absorbed(x, q_nope, &q_pe, k_pe_rotated, compressed_kv, cache, mask)
            }
        }
    }

    /// `cos, sin = self.rotary_emb(x, seq_len=kv_seq_len)` and
    /// `apply_rotary_pos_emb(q_pe, k_pe, cos, sin, position_ids)`.
    fn rotate(
        &self,
        q_pe: &Tensor,
        k_pe: &Tensor,
        kv_seq_len: i64,
        position_ids: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self
            .rotary_emb
            .forward(kv_seq_len, q_pe.kind(), q_pe.device())?;
        let cos = cos.f_index(&[Some(position_ids)])?.f_unsqueeze(1)?;
        let sin = sin.f_index(&[Some(position_ids)])?.f_unsqueeze(1)?;
        // q = q.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d), then k
        // likewise: both copies are locals until apply_rotary_pos_emb returns.
        let deinterleave = |x: &Tensor| -> Result<Tensor> {
            let (b, h, s, d) = x.size4()?;
            Ok(x.f_view([b, h, s, d / 2, 2])?
                .f_transpose(4, 3)?
                .f_reshape([b, h, s, d])?)
        };
        let q = deinterleave(q_pe)?;
        let k = deinterleave(k_pe)?;
        // (x * cos) + (rotate_half(x) * sin): rotate_half's result goes once multiplied,
        // the two products once added.
        let embed = |x: &Tensor| -> Result<Tensor> {
            let x_cos = x.f_mul(&cos)?;
            let rotated = rotate_half(x)?;
            let rotated_sin = rotated.f_mul(&sin)?;
            drop(rotated);
            Ok(x_cos.f_add(&rotated_sin)?)
        };
        let q_embed = embed(&q)?;
        let k_embed = embed(&k)?;
        Ok((q_embed, k_embed))
    }

    /// The naive form from the rotated parts on: assembled query and key states, the
    /// cache update and the attention core.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        &self,
        x: &Tensor,
        q_nope: &Tensor,
        q_pe: &Tensor,
        k_nope: &Tensor,
        k_pe: &Tensor,
        values: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.size3()?;
        let (d_n, d_v) = (self.qk_nope_head_dim, self.v_head_dim);
        let d_qk = d_n + self.qk_rope_head_dim;
        let assemble = |nope: &Tensor, pe: &Tensor| -> Result<Tensor> {
            // states = k_pe.new_empty(...); states[..., :d_n] = nope; states[..., d_n:] = pe
            let states =
                k_pe.f_new_empty([b, self.heads, s, d_qk], (k_pe.kind(), k_pe.device()))?;
            setitem(states.f_slice(3, 0, d_n, 1)?, nope)?;
            setitem(states.f_slice(3, d_n, i64::MAX, 1)?, pe)?;
            Ok(states)
        };
        let query_states = assemble(q_nope, q_pe)?;
        let key_states = assemble(k_nope, k_pe)?;
        // The attention weights stay a local until `attn_weights = None` after o_proj.
        let mut attn_weights = None;
        let out = match self.implementation {
            AttentionImpl::Eager => {
                let (keys, values) = cache.update(key_states, values.shallow_clone())?;
                let scores = query_states
                    .f_matmul(&keys.f_transpose(2, 3)?)?
                    .f_mul_scalar(self.softmax_scale)?;
                let probs = softmax(scores, mask, query_states.kind())?;
                // attn_output = matmul(…); attn_output = attn_output.transpose(1, 2)
                // .contiguous(): the bmm output goes with the reassignment.
                let out = probs
                    .f_matmul(&values)?
                    .f_transpose(1, 2)?
                    .f_contiguous()?
                    .f_reshape([b, s, self.heads * d_v])?;
                attn_weights = Some(probs);
                out
            }
            AttentionImpl::Sdpa => {
                // if self.q_head_dim != self.v_head_dim: F.pad(value_states, [0, d_qk - d_v])
                let values = if d_qk != d_v {
                    values.f_pad([0, d_qk - d_v], "constant", None)?
                } else {
                    values.shallow_clone()
                };
                let (keys, values) = cache.update(key_states, values)?;
                Tensor::f_scaled_dot_product_attention(
                    &query_states,
                    &keys,
                    &values,
                    None::<Tensor>,
                    0.0,
                    s > 1,
                    Some(self.softmax_scale),
                    false,
                )?
                // flash_attn's [B, S, H, d] output, then attn_output[:, :, :, :v_head_dim]
                .f_transpose(1, 2)?
                .f_slice(3, 0, d_v, 1)?
                .f_reshape([b, s, self.heads * d_v])?
                .f_contiguous()?
            }
        };
        let out = linear(&out, &self.o_proj.0, self.o_proj.1.as_ref())?;
        drop(attn_weights);
        Ok(out)
    }

    /// The weight-absorbed form from the rotated parts on.
    #[allow(clippy::too_many_arguments)]
    fn absorbed(
        &self,
        x: &Tensor,
        q_nope: &Tensor,
        q_pe: &Tensor,
        k_pe: Tensor,
        compressed_kv: Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.size3()?;
        let (d_n, r) = (self.qk_nope_head_dim, self.kv_lora_rank);
        // compressed_kv = compressed_kv.unsqueeze(1); k_pe, compressed_kv =
        // past_key_value.update(k_pe, compressed_kv): a decode step's own k_pe and c_kv
        // go with the reassignment (the cache holds the concatenations); squeeze(1).
        let latent = compressed_kv.f_unsqueeze(1)?;
        drop(compressed_kv);
        let (k_pe, compressed_kv) = cache.update(k_pe, latent)?;
        let compressed_kv = compressed_kv.f_squeeze_dim(1)?;
        let kv_b_proj = self.kv_b_proj.f_view([self.heads, -1, r])?;
        let q_absorb = kv_b_proj.f_slice(1, 0, d_n, 1)?;
        let out_absorb = kv_b_proj.f_slice(1, d_n, i64::MAX, 1)?;
        let q_nope = q_nope.f_matmul(&q_absorb)?;
        // (matmul(q_pe, k_pe.mT) + matmul(q_nope, compressed_kv.unsqueeze(-3).mT))
        // * softmax_scale: each partial result goes once consumed.
        let rope_scores = q_pe.f_matmul(&k_pe.f_mt()?)?;
        let latent_scores = q_nope.f_matmul(&compressed_kv.f_unsqueeze(-3)?.f_mt()?)?;
        let summed = rope_scores.f_add(&latent_scores)?;
        drop((rope_scores, latent_scores));
        let scores = summed.f_mul_scalar(self.softmax_scale)?;
        drop(summed);
        // attn_weights: a local until `attn_weights = None` after o_proj.
        let probs = softmax(scores, mask, q_pe.kind())?;
        // attn_output = einsum(…); attn_output = matmul(attn_output, out_absorb.mT);
        // attn_output = attn_output.transpose(1, 2).contiguous(): each reassignment drops
        // the previous value.
        let attn_output =
            Tensor::f_einsum("bhql,blc->bhqc", &[&probs, &compressed_kv], None::<&[i64]>)?;
        let attn_output = {
            let absorbed = attn_output.f_matmul(&out_absorb.f_mt()?)?;
            drop(attn_output);
            absorbed
        };
        let out = attn_output.f_transpose(1, 2)?.f_contiguous()?.f_reshape([
            b,
            s,
            self.heads * self.v_head_dim,
        ])?;
        drop(attn_output);
        let out = linear(&out, &self.o_proj.0, self.o_proj.1.as_ref())?;
        drop(probs);
        Ok(out)
    }
}

/// `+ attention_mask`, `softmax(dim=-1, dtype=float32).to(dtype)` and eval dropout;
/// each `attn_weights = …` reassignment drops the previous scores.
fn softmax(scores: Tensor, mask: Option<&Tensor>, kind: Kind) -> Result<Tensor> {
    let scores = match mask {
        Some(mask) => {
            let masked = scores.f_add(mask)?;
            drop(scores);
            masked
        }
        None => scores,
    };
    Ok(scores
        .f_softmax(-1, Kind::Float)?
        .f_to_kind(kind)?
        .f_dropout(0.0, false)?)
}

/// `cat((-x2, x1), dim=-1)` of the two halves of the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.f_slice(-1, 0, half, 1)?;
    let x2 = x.f_slice(-1, half, i64::MAX, 1)?;
    Ok(Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?)
}

impl Parameters for RefDeepseekV2Attention {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut push = |name: &str, (w, b): &Linear| {
            out.push((format!("{name}.weight"), w.shallow_clone()));
            if let Some(b) = b {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
        };
        match &self.query {
            QueryProjection::Direct(w) => push("q_proj", &(w.shallow_clone(), None)),
            QueryProjection::LowRank {
                q_a_proj, q_b_proj, ..
            } => {
                push("q_a_proj", q_a_proj);
                push("q_b_proj", &(q_b_proj.shallow_clone(), None));
            }
        }
        push("kv_a_proj_with_mqa", &self.kv_a_proj_with_mqa);
        push("kv_b_proj", &(self.kv_b_proj.shallow_clone(), None));
        push("o_proj", &self.o_proj);
        if let QueryProjection::LowRank { q_a_layernorm, .. } = &self.query {
            out.extend(prefixed("q_a_layernorm", q_a_layernorm.parameters()));
        }
        out.extend(prefixed("kv_a_layernorm", self.kv_a_layernorm.parameters()));
        out
    }
}
