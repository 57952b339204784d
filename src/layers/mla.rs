//! `DeepseekV2Attention` with Multi-head Latent Attention (MLA), the attention of
//! DeepSeek-V2, V2-Lite and V3, op by op as the vendor `modeling_deepseek.py` runs it.
//!
//! Two forms ([`MlaForm`], chosen by the workload):
//! - **naive** (the vendor code shipped with the HF checkpoints): the query comes from
//!   `q_proj`, or `q_a_proj → q_a_layernorm → q_b_proj`; `kv_a_proj_with_mqa` gives the
//!   latent c_kv (r_kv) and one rotary key k_pe (d_r) shared by all heads;
//!   `kv_a_layernorm`, then `kv_b_proj` decompresses c_kv into per-head k_nope (d_n) and
//!   v (d_v); rotary on q_pe and k_pe only; query and key states assembled as
//!   `new_empty` + two slice copies each; the decompressed keys and values are cached
//!   (`--attn eager`: `DeepseekV2Attention`, matmul → scale → mask → softmax → matmul;
//!   `--attn sdpa`: `DeepseekV2FlashAttention2`, which pads v to d_qk, caches it padded
//!   and runs one fused kernel — libtorch has no flash_attn call, so SDPA stands for it);
//! - **absorb** (`DeepseekV2Attention` of DeepSeek-VL2's later `modeling_deepseek.py`,
//!   same FLOPs as DeepSeek's `inference/model.py` with `attn_impl = "absorb"`):
//!   `kv_b_proj`'s key half folded into the query (`q_nope @ W_UK`), scores over the
//!   latent and the rotary key, `P @ c_kv`, then the value half (`@ W_UVᵀ`); only c_kv
//!   and k_pe are cached. It runs as explicit matmuls whatever `--attn` says.
//!
//! The cos/sin tables are rebuilt in the forward: the vendor's rotary embedding builds
//! them in `__init__`, then sets `max_seq_len_cached = None`, and rebuilds them whenever
//! it has none or the call's keys outnumber them — in a generation, at every call, over
//! all L keys (`_set_cos_sin_cache`, [`DeepseekV2Attention::rotary_tables`]; found by
//! the reference module, `modelmeter-reference`'s `mla_rotary`). No matmul: `torch.outer`
//! is a broadcast multiply. YaRN's mscale² only changes the softmax scale, a scalar
//! multiplied into the scores by the same op: no FLOPs.
//!
//! Peak activation memory follows the vendor's Python reference by reference: a temporary
//! is freed once the op or call consuming it returns, a local when it is reassigned or
//! the attention returns; views (`view`, `transpose`, splits, slices) keep their base;
//! what the cache holds after the call (prefill: the step's own keys and values, decode:
//! the concatenations) and the rotary buffers `_set_cos_sin_cache` registers stay
//! (`keeps`). The reference module (`modelmeter-reference`'s `mla`) drops where Python
//! does, so the two peaks compare exactly on the CPU.
//!
//! Matmul FLOPs per call (T = B·S_q tokens, L keys), derived in docs/deepseek-family.md:
//! - naive: 2·T·d·H·d_qk (or 2·T·d·r_q + 2·T·r_q·H·d_qk), plus 2·T·d·(r_kv + d_r), plus
//!   2·T·r_kv·H·(d_n + d_v), plus 2·B·H·S_q·L·(d_qk + d_v), plus 2·T·H·d_v·d (the flash
//!   form: d_v → d_qk in the core);
//! - absorb: the same query and `kv_a` terms, plus 2·T·H·d_n·r_kv, plus
//!   2·B·H·S_q·L·(2·r_kv + d_r), plus 2·T·H·r_kv·d_v, plus 2·T·H·d_v·d.

use std::fmt::Display;

use crate::checked::{product, sum};
use crate::config::ModelConfig;
use crate::conventions::{ArgRef, TensorMeta};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::layers::attention::{AttentionImpl, ATTENTION_CORE_ROLE};
use crate::layers::rms_norm::DeepseekV2RMSNorm;
use crate::layers::sdpa_kernel::SdpaKernel;
use crate::layers::vendor_ops::{arg, bytes_of, t, with_last};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::mla_config::MlaConfig;
use crate::workload::{MlaForm, Phase, Platform, Workload};

/// The report names of the MLA attention, by form and implementation.
pub const MLA_CLASS_NAMES: [&str; 3] = [
    "DeepseekV2FlashAttention2",
    "DeepseekV2Attention",
    "DeepseekV2Attention_absorb",
];

/// The report name of the MLA attention run in `form` with `implementation`.
pub fn mla_class_name(form: MlaForm, implementation: AttentionImpl) -> &'static str {
    match (form, implementation) {
        (MlaForm::Naive, AttentionImpl::Sdpa) => MLA_CLASS_NAMES[0],
        (MlaForm::Naive, AttentionImpl::Eager) => MLA_CLASS_NAMES[1],
        (MlaForm::Absorb, _) => MLA_CLASS_NAMES[2],
    }
}

/// MLA attention of a DeepSeek-V2/V3 decoder layer.
#[derive(Clone, Debug, PartialEq)]
pub struct DeepseekV2Attention {
    hidden: u64,
    heads: u64,
    mla: MlaConfig,
    bias: bool,
    /// YaRN rotary scaling configured (`DeepseekV2YarnRotaryEmbedding`).
    yarn: bool,
    workload: Workload,
    implementation: AttentionImpl,
}

impl DeepseekV2Attention {
    /// The attention of a decoder layer of an MLA config; an error for an MHA config.
    pub fn new(
        config: &ModelConfig,
        workload: &Workload,
        implementation: AttentionImpl,
    ) -> Result<DeepseekV2Attention> {
        Ok(DeepseekV2Attention {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            mla: config.mla()?.clone(),
            bias: config.attention_bias,
            yarn: config.rope_scaling.is_some(),
            workload: workload.clone(),
            implementation,
        })
    }

    /// The report name: `DeepseekV2FlashAttention2` (naive, fused core),
    /// `DeepseekV2Attention` (naive, eager core) or `DeepseekV2Attention_absorb`.
    pub fn class_name(&self) -> &'static str {
        mla_class_name(self.workload.mla, self.implementation)
    }

    /// The value width the cache holds per head: d_v, or d_qk where the flash form pads
    /// the values before caching them.
    fn cached_value_dim(&self) -> Result<u64> {
        let (d_qk, d_v) = (self.mla.qk_head_dim()?, self.mla.v_head_dim);
        Ok(match self.implementation {
            AttentionImpl::Sdpa => d_qk.max(d_v),
            AttentionImpl::Eager => d_v,
        })
    }

    /// KV-cache elements per token held by this layer: H·(d_qk + d_v) (naive eager),
    /// H·2·d_qk (naive flash, values padded) or r_kv + d_r (absorb).
    pub fn cache_per_token(&self) -> Result<u64> {
        match self.workload.mla {
            MlaForm::Absorb => self.mla.latent_cache_per_token(),
            MlaForm::Naive => {
                let width = sum(
                    "cached K + V width",
                    &[self.mla.qk_head_dim()?, self.cached_value_dim()?],
                )?;
                product("KV cache per token", &[self.heads, width])
            }
        }
    }

    /// Parameters: the projections, their biases when the config has them, and the
    /// `q_a_layernorm` / `kv_a_layernorm` weights.
    pub fn parameters(&self) -> Result<u64> {
        let norms = sum(
            "MLA norm weights",
            &[self.mla.q_lora_rank.unwrap_or(0), self.mla.kv_lora_rank],
        )?;
        sum("MLA parameters", &[self.projection_parameters()?, norms])
    }

    fn projection_parameters(&self) -> Result<u64> {
        let m = &self.mla;
        let (h, heads) = (self.hidden, self.heads);
        let q_width = product("H·d_qk", &[heads, m.qk_head_dim()?])?;
        let bias = |n: u64| if self.bias { n } else { 0 };
        let q = match m.q_lora_rank {
            None => product("q_proj", &[h, q_width])?,
            Some(r) => sum(
                "q_a_proj + q_b_proj",
                &[
                    product("q_a_proj", &[h, r])?,
                    bias(r),
                    product("q_b_proj", &[r, q_width])?,
                ],
            )?,
        };
        let kv_a_width = m.latent_cache_per_token()?;
        let kv_a = sum(
            "kv_a_proj_with_mqa",
            &[
                product("kv_a_proj_with_mqa", &[h, kv_a_width])?,
                bias(kv_a_width),
            ],
        )?;
        let kv_b = product(
            "kv_b_proj",
            &[
                m.kv_lora_rank,
                heads,
                sum("d_n + d_v", &[m.qk_nope_head_dim, m.v_head_dim])?,
            ],
        )?;
        let o = sum(
            "o_proj",
            &[product("o_proj", &[heads, m.v_head_dim, h])?, bias(h)],
        )?;
        sum("MLA projections", &[q, kv_a, kv_b, o])
    }

    /// The query path: `q_proj`, or `q_b_proj(q_a_layernorm(q_a_proj(x)))`. Returns q
    /// (`[B, S_q, H·d_qk]`), a local until the call returns (`q` and its `q_nope` slice).
    fn query(&self, b: &mut CostBuilder, x: &TensorMeta) -> Result<TensorMeta> {
        let width = product("H·d_qk", &[self.heads, self.mla.qk_head_dim()?])?;
        match self.mla.q_lora_rank {
            None => b.linear("q_proj", x, width, false),
            Some(rank) => {
                // Each inner result is an argument of the next call, dropped when that
                // call returns.
                let q_a = b.linear("q_a_proj", x, rank, self.bias)?;
                let norm = DeepseekV2RMSNorm::over(q_a.clone(), self.workload.allow_tf32);
                let [normed] = b.call(norm.cost_as("q_a_layernorm")?, [&q_a])?;
                b.release(&[&q_a])?;
                let q = b.linear("q_b_proj", &normed, width, false)?;
                b.release(&[&normed])?;
                Ok(q)
            }
        }
    }

    /// `kv_a_proj_with_mqa`, split into c_kv and k_pe (views), and `kv_a_layernorm` on
    /// c_kv. Returns the projection (its k_pe slice is rotated later) and the normed c_kv.
    fn compressed_kv(
        &self,
        b: &mut CostBuilder,
        x: &TensorMeta,
    ) -> Result<(TensorMeta, TensorMeta)> {
        let kv_a = b.linear(
            "kv_a_proj_with_mqa",
            x,
            self.mla.latent_cache_per_token()?,
            self.bias,
        )?;
        let c_kv = kv_a.viewed_as(&with_last(&kv_a, self.mla.kv_lora_rank).shape);
        let norm = DeepseekV2RMSNorm::over(c_kv.clone(), self.workload.allow_tf32);
        let [normed] = b.call(norm.cost_as("kv_a_layernorm")?, [&c_kv])?;
        Ok((kv_a, normed))
    }

    /// `_set_cos_sin_cache(seq_len = L)`, which the vendor's `rotary_emb(x, seq_len)`
    /// runs whenever the call's L keys outnumber the tables it has (every call of a
    /// generation: see the module docs). All in fp32 over d_r / 2 frequencies:
    /// ```python
    /// # DeepseekV2YarnRotaryEmbedding (rope_scaling yarn) rebuilds inv_freq too:
    /// freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2) / dim))
    /// freq_inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2) / dim))
    /// inv_freq_mask = 1.0 - ((torch.arange(dim // 2) - low) / (high - low)).clamp(0, 1)
    /// inv_freq = freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask
    /// self.register_buffer("inv_freq", inv_freq)
    /// # both:
    /// t = torch.arange(seq_len); freqs = torch.outer(t, inv_freq)
    /// emb = torch.cat((freqs, freqs), dim=-1)
    /// self.register_buffer("cos_cached", (emb.cos() * _mscale).to(dtype))  # plain: emb.cos().to(dtype)
    /// self.register_buffer("sin_cached", (emb.sin() * _mscale).to(dtype))
    /// ```
    /// Python's `1.0 / x` is `x.reciprocal() * 1.0`; `1.0 - x` is `rsub`.
    ///
    /// Liveness: each temporary goes when the op that consumes it returns; the locals
    /// (`freq_extra`, `freq_inter`, `inv_freq_mask`, `t`, `freqs`, `emb`) when the method
    /// returns; the buffers it registers (`cos_cached`, `sin_cached`, YaRN's `inv_freq`)
    /// stay with the module after the call (kept). The tables the buffers replace were
    /// allocated before the call, so freeing them makes no room this call counts.
    /// Returns the cos table (the sin table has its shape and dtype).
    fn rotary_tables(&self, b: &mut CostBuilder) -> Result<TensorMeta> {
        let w = &self.workload;
        let (d_r, keys) = (self.mla.qk_rope_head_dim, w.key_len()?);
        let half = t(&[d_r / 2], Dtype::F32);
        fn f32_op<const N: usize>(
            b: &mut CostBuilder,
            role: impl Display,
            op: &'static str,
            inputs: [&TensorMeta; N],
        ) -> Result<TensorMeta> {
            b.elementwise(role, op, inputs, Dtype::F32)
        }
        // `op(x)` of a temporary x, dropped once the op returns.
        fn consume(
            b: &mut CostBuilder,
            role: impl Display,
            op: &'static str,
            x: TensorMeta,
        ) -> Result<TensorMeta> {
            let out = b.elementwise(role, op, [&x], Dtype::F32)?;
            b.release(&[&x])?;
            Ok(out)
        }
        // Locals of `_set_cos_sin_cache`, freed when it returns, and its buffers.
        let mut locals = Vec::new();
        let mut buffers = Vec::new();
        let inv_freq = if self.yarn {
            let mut freq = Vec::new();
            for name in ["freq_extra", "freq_inter"] {
                let steps = b.copy(
                    format_args!("{name}: arange(0, dim, 2)"),
                    "aten::arange",
                    [],
                    half.clone(),
                )?;
                let exponent = consume(b, format_args!("{name}: / dim"), "aten::div", steps)?;
                let mut power = consume(b, format_args!("{name}: base **"), "aten::pow", exponent)?;
                if name == "freq_inter" {
                    power = consume(b, "freq_inter: scaling_factor *", "aten::mul", power)?;
                }
                // `1.0 / power` is `Tensor.__rtruediv__`: `power.reciprocal() * 1.0`,
                // the reciprocal a temporary of the method, power its argument.
                let reciprocal = f32_op(
                    b,
                    format_args!("{name}: 1.0 / (reciprocal)"),
                    "aten::reciprocal",
                    [&power],
                )?;
                freq.push(f32_op(
                    b,
                    format_args!("{name}: 1.0 / (* 1.0)"),
                    "aten::mul",
                    [&reciprocal],
                )?);
                b.release(&[&reciprocal, &power])?;
            }
            // `yarn_linear_ramp_mask` returns `clamp(linear_func)`, dropping its local
            // `linear_func`. Its `torch.arange(dim)` names no device: on a GPU its four
            // ops run on the host (their results take no device memory) and
            // `.to(device=device, dtype=float32)` copies the ramp over; on the CPU they are
            // the device's ops and that `.to` hands the ramp back.
            let ramp = if w.platform == Platform::Cuda {
                let mut on_host = |role: &str, op: &'static str, input: Option<&TensorMeta>| {
                    let inputs: Vec<ArgRef<'_>> = input.map(arg).into_iter().collect();
                    b.op_with_host_outputs(
                        role,
                        op,
                        &inputs,
                        Vec::new(),
                        std::slice::from_ref(&half),
                    )
                    .map(|_| half.clone())
                };
                let steps = on_host("ramp: arange(dim // 2) (host)", "aten::arange", None)?;
                let shifted = on_host("ramp: - low (host)", "aten::sub", Some(&steps))?;
                let linear_func =
                    on_host("ramp: / (high - low) (host)", "aten::div", Some(&shifted))?;
                let ramp = on_host(
                    "ramp: clamp(0, 1) (host)",
                    "aten::clamp",
                    Some(&linear_func),
                )?;
                let [on_device] =
                    b.op("ramp.to(device)", "aten::to", &[arg(&ramp)], [half.clone()])?;
                on_device
            } else {
                let steps = b.copy("ramp: arange(dim // 2)", "aten::arange", [], half.clone())?;
                let shifted = consume(b, "ramp: - low", "aten::sub", steps)?;
                let linear_func = consume(b, "ramp: / (high - low)", "aten::div", shifted)?;
                consume(b, "ramp: clamp(0, 1)", "aten::clamp", linear_func)?
            };
            let mask = consume(b, "inv_freq_mask = 1.0 - ramp", "aten::rsub", ramp)?;
            let (freq_extra, freq_inter) = (&freq[0], &freq[1]);
            let keep = f32_op(b, "1 - inv_freq_mask", "aten::rsub", [&mask])?;
            let inter = f32_op(
                b,
                "freq_inter * (1 - mask)",
                "aten::mul",
                [freq_inter, &keep],
            )?;
            b.release(&[&keep])?;
            let extra = f32_op(b, "freq_extra * mask", "aten::mul", [freq_extra, &mask])?;
            let inv_freq = f32_op(
                b,
                "inv_freq = freq_inter * (1 - mask) + freq_extra * mask",
                "aten::add",
                [&inter, &extra],
            )?;
            b.release(&[&inter, &extra])?;
            locals.extend(freq);
            locals.push(mask);
            buffers.push(inv_freq.clone());
            inv_freq
        } else {
            // The plain rotary's `inv_freq` is a buffer built in `__init__`.
            half.clone()
        };
        let positions = b.copy(
            "t = arange(seq_len)",
            "aten::arange",
            [],
            t(&[keys], Dtype::F32),
        )?;
        // `torch.outer(t, inv_freq)` is `t.reshape(L, 1) * inv_freq`.
        let freqs = f32_op(
            b,
            "freqs = outer(t, inv_freq)",
            "aten::mul",
            [&positions.viewed_as(&[keys, 1]), &inv_freq],
        )?;
        let emb = b.copy(
            "emb = cat((freqs, freqs))",
            "aten::cat",
            [&freqs, &freqs],
            t(&[keys, d_r], Dtype::F32),
        )?;
        for (name, op) in [("cos", "aten::cos"), ("sin", "aten::sin")] {
            let mut table = f32_op(b, format_args!("emb.{name}()"), op, [&emb])?;
            if self.yarn {
                table = consume(b, format_args!("{name} * _mscale"), "aten::mul", table)?;
            }
            let cached = b.cast(format_args!("{name}_cached.to(dtype)"), &table, w.dtype)?;
            b.release_unless_same(&table, &cached)?;
            buffers.push(cached);
        }
        locals.extend([positions, freqs, emb]);
        b.release(&locals.iter().collect::<Vec<_>>())?;
        b.keeps(&buffers.iter().collect::<Vec<_>>());
        // `cos_cached[:seq_len].to(dtype=x.dtype)`: a view of the buffer.
        let cos = buffers.len() - 2;
        Ok(buffers[cos].viewed_as(&[keys, d_r]))
    }

    /// `cos, sin = self.rotary_emb(x, seq_len=L)` and
    /// `apply_rotary_pos_emb(q_pe, k_pe, cos, sin, position_ids)`: the table rows are
    /// gathered by position, each input is de-interleaved (`view(…, d/2, 2)
    /// .transpose(4, 3).reshape`: a copy, except at d = 2, where the transposed `[.., 2, 1]`
    /// is laid out as `[.., 2]` already — a size-1 dimension has no stride to keep — and
    /// `reshape` returns a view) — q, then k, before either is rotated — then
    /// `x * cos + rotate_half(x) * sin`. The de-interleaved copies and the gathered rows
    /// are locals of `apply_rotary_pos_emb`, freed when it returns the two embeddings.
    fn apply_rotary(&self, b: &mut CostBuilder) -> Result<(TensorMeta, TensorMeta)> {
        let w = &self.workload;
        let (batch, s, d_r, dtype) = (w.batch, w.query_len(), self.mla.qk_rope_head_dim, w.dtype);
        let tables = self.rotary_tables(b)?;
        let ids = t(&[batch, s], Dtype::I64);
        let rows = t(&[batch, s, d_r], dtype);
        let cos = b.copy(
            "cos[position_ids]",
            "aten::index",
            [&tables, &ids],
            rows.clone(),
        )?;
        let sin = b.copy(
            "sin[position_ids]",
            "aten::index",
            [&tables, &ids],
            rows.clone(),
        )?;
        let mut deinterleaved = Vec::new();
        for (name, heads) in [("q_pe", self.heads), ("k_pe", 1)] {
            let x = t(&[batch, heads, s, d_r], dtype);
            deinterleaved.push(if d_r == 2 {
                x
            } else {
                b.copy(
                    format_args!("{name} de-interleave (reshape copy)"),
                    "aten::clone",
                    [&x],
                    x.clone(),
                )?
            });
        }
        let table = cos.viewed_as(&[batch, 1, s, d_r]);
        let q_embed = b.rotary("q_pe", &deinterleaved[0], &table)?;
        let k_embed = b.rotary("k_pe", &deinterleaved[1], &table)?;
        b.release(&[&deinterleaved[0], &deinterleaved[1], &cos, &sin])?;
        Ok((q_embed, k_embed))
    }

    /// `past_key_value.update` of this call's `new` rows (`[B, heads, S_q, width]`):
    /// prefill stores them and hands them back; decode appends them to a cache of
    /// `context_len` rows (a `cat`). Returns the tensor attended over,
    /// `[B, heads, L, width]`, which the cache holds after the call.
    fn cached(
        &self,
        b: &mut CostBuilder,
        role: impl Display,
        new: &TensorMeta,
    ) -> Result<TensorMeta> {
        let w = &self.workload;
        match w.phase {
            Phase::Prefill { .. } => Ok(new.clone()),
            Phase::Decode { context_len } => {
                let (heads, width) = (new.shape[1], new.shape[3]);
                let old = t(&[w.batch, heads, context_len, width], w.dtype);
                let full = t(&[w.batch, heads, w.key_len()?, width], w.dtype);
                b.copy(
                    format_args!("past_key_value.update ({role})"),
                    "aten::cat",
                    [&old, new],
                    full,
                )
            }
        }
    }

    /// `bmm` of `[batch, m, k] @ [batch, k, n]`; returns its output.
    fn bmm(
        b: &mut CostBuilder,
        role: impl Display,
        batch: u64,
        m: u64,
        k: u64,
        n: u64,
        dtype: Dtype,
    ) -> Result<TensorMeta> {
        let [out] = b.op(
            role,
            "aten::bmm",
            &[
                arg(&t(&[batch, m, k], dtype)),
                arg(&t(&[batch, k, n], dtype)),
            ],
            [t(&[batch, m, n], dtype)],
        )?;
        Ok(out)
    }

    /// `einsum("bhql,blc->bhqc", attn_weights, compressed_kv)` as ATen runs it: both
    /// operands permuted to `[b, h, q, c, l]` (missing labels unsqueezed), then one `bmm`
    /// summing over `l`; but a contracted label of size 1 in both operands is not summed
    /// (`sumproduct_pair` with no dimension to sum), so at one key (a one-token prefill)
    /// the contraction is a broadcast `mul`. The result as the `bmm`'s, `[B, H·S_q, r]`.
    fn einsum_latent(
        b: &mut CostBuilder,
        batch: u64,
        heads: u64,
        sq: u64,
        skv: u64,
        r: u64,
        dtype: Dtype,
    ) -> Result<TensorMeta> {
        let role = "einsum(bhql,blc->bhqc) attn_weights @ compressed_kv";
        let rows = product("heads × queries", &[heads, sq])?;
        if skv == 1 {
            let out = b.elementwise(
                role,
                "aten::mul",
                [
                    &t(&[batch, heads, sq, 1, 1], dtype),
                    &t(&[batch, 1, 1, r, 1], dtype),
                ],
                dtype,
            )?;
            return Ok(out.viewed_as(&[batch, rows, r]));
        }
        Self::bmm(b, role, batch, rows, skv, r, dtype)
    }

    /// Scale, mask, fp32 softmax and the cast back, over `[B, H, S_q, L]` scores (a
    /// temporary of the scaling): `attn_weights = (scores) * softmax_scale`, `attn_weights
    /// = attn_weights + attention_mask`, `attn_weights = softmax(attn_weights,
    /// float32).to(dtype)`, each reassignment dropping the previous value. Returns the
    /// attention weights, a local until the attention returns (`attn_weights = None`
    /// after `o_proj`); eval dropout hands them back.
    fn softmax(&self, b: &mut CostBuilder, scores: TensorMeta) -> Result<TensorMeta> {
        let dtype = self.workload.dtype;
        let scaled = b.elementwise("* softmax_scale", "aten::mul", [&scores], dtype)?;
        b.release(&[&scores])?;
        let s = &scaled.shape;
        let mask = t(&[s[0], 1, s[2], s[3]], dtype);
        let masked = b.elementwise("+ attention_mask", "aten::add", [&scaled, &mask], dtype)?;
        b.release(&[&scaled])?;
        let [probs32] = b.op(
            "softmax(float32)",
            "aten::softmax",
            &[arg(&masked), ArgRef::Int(-1), ArgRef::Other("ScalarType")],
            [t(&masked.shape, Dtype::F32)],
        )?;
        let probs = b.cast("softmax.to(dtype)", &probs32, dtype)?;
        b.release_unless_same(&probs32, &probs)?;
        b.release(&[&masked])?;
        Ok(probs)
    }

    /// The naive form: decompressed per-head keys and values. Returns the merged heads
    /// `[B, S_q, H·d_v]` that `o_proj` reads.
    fn naive(&self, b: &mut CostBuilder, x: &TensorMeta) -> Result<TensorMeta> {
        let w = &self.workload;
        let m = &self.mla;
        let (batch, heads, sq, dtype) = (w.batch, self.heads, w.query_len(), w.dtype);
        let (d_n, d_r, d_v, d_qk) = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.qk_head_dim()?,
        );
        if self.implementation == AttentionImpl::Sdpa && d_v > d_qk {
            return Err(Error::Unsupported {
                field: "v_head_dim".into(),
                value: d_v.to_string(),
                reason: format!(
                    "DeepseekV2FlashAttention2 pads the values to d_qk ({d_qk}) and cannot \
                     take wider ones; use --attn eager"
                ),
            });
        }
        // q (with its q_nope slice), kv_a (compressed_kv) and kv (k_nope, value_states)
        // stay locals until the attention returns.
        let _q = self.query(b, x)?;
        let (_kv_a, normed) = self.compressed_kv(b, x)?;
        let kv_width = product("H·(d_n + d_v)", &[heads, sum("d_n + d_v", &[d_n, d_v])?])?;
        let kv = b.linear("kv_b_proj", &normed, kv_width, false)?;
        // `kv_b_proj(kv_a_layernorm(compressed_kv))`: the normed latent is an argument.
        b.release(&[&normed])?;
        // The rotated q_pe and k_pe: locals until return.
        let _rotated = self.apply_rotary(b)?;

        let states = t(&[batch, heads, sq, d_qk], dtype);
        let mut assembled = Vec::new();
        for (name, nope_src, pe_name) in [
            ("query_states", "q_nope", "q_pe"),
            ("key_states", "k_nope", "k_pe"),
        ] {
            let empty = b.copy(
                format_args!("{name} = new_empty"),
                "aten::new_empty",
                [],
                states.clone(),
            )?;
            // `states[..., :d_n] = nope`: copy_(self = the slice, src) reads src.
            let nope = t(&[batch, heads, sq, d_n], dtype);
            b.copy(
                format_args!("{name}[..., :d_n] = {nope_src}"),
                "aten::copy_",
                [&nope, &nope],
                nope.clone(),
            )?;
            // `states[..., d_n:] = pe`: Python's setitem views `k_pe` [B, 1, S, d_r]
            // without its leading 1s and expands it to the slot (`at::indexing::copy_to`),
            // so `copy_` reads it at the slot's size, H times (views: no bytes).
            let pe_slot = t(&[batch, heads, sq, d_r], dtype);
            b.copy(
                format_args!("{name}[..., d_n:] = {pe_name}"),
                "aten::copy_",
                [&pe_slot, &pe_slot],
                pe_slot.clone(),
            )?;
            assembled.push(empty);
        }
        // query_states stays a local until return.
        let (query_states, key_states) = (assembled.remove(0), assembled.remove(0));
        let value_dim = self.cached_value_dim()?;
        let v = kv.viewed_as(&[batch, heads, sq, d_v]);
        let padded = value_dim != d_v;
        let value_states = if padded {
            b.copy(
                "F.pad(value_states) to d_qk",
                "aten::constant_pad_nd",
                [&v],
                with_last(&v, value_dim),
            )?
        } else {
            v
        };
        let k = self.cached(b, "keys", &key_states)?;
        let v = self.cached(b, "values", &value_states)?;
        if matches!(w.phase, Phase::Decode { .. }) {
            // `key_states, value_states = past_key_value.update(…)` drops the step's
            // own: the assembled keys and the padded values (unpadded, value_states is a
            // view of kv, which stays).
            b.release(&[&key_states])?;
            if padded {
                b.release(&[&value_states])?;
            }
        }
        // What the cache holds after the call: the prefill's own tensors (unpadded
        // values as a view of kv, which keeps all of kv_b_proj's output), or the decode
        // step's concatenations.
        b.keeps(&[&k, &v]);
        let skv = k.shape[2];

        let mut core = CostBuilder::new(ATTENTION_CORE_ROLE, w.allow_tf32);
        let bh = product("batch × heads", &[batch, heads])?;
        match self.implementation {
            AttentionImpl::Eager => {
                let scores = Self::bmm(
                    &mut core,
                    "query_states @ key_statesᵀ",
                    bh,
                    sq,
                    d_qk,
                    skv,
                    dtype,
                )?
                .viewed_as(&[batch, heads, sq, skv]);
                let probs = self.softmax(&mut core, scores)?;
                // A slice of kv_b_proj's output ([B, S, H, d_n + d_v] memory) cannot be
                // viewed as [B·H, S, d_v]: the second `matmul` copies it (after folding
                // the attention weights, a view), a temporary freed when it returns.
                let copies =
                    matches!(w.phase, Phase::Prefill { .. }) && batch > 1 && heads > 1 && sq > 1;
                let v_copy = core.matmul_copy(
                    "matmul: value_states.reshape (copy)",
                    &t(&v.shape, dtype),
                    copies,
                )?;
                let out = Self::bmm(
                    &mut core,
                    "attn_weights @ value_states",
                    bh,
                    sq,
                    skv,
                    d_v,
                    dtype,
                )?;
                if let Some(copy) = &v_copy {
                    core.release(&[copy])?;
                }
                core.returns(&[&out, &probs]);
                let out = out.viewed_as(&[batch, heads, sq, d_v]);
                // The attention weights stay a local until the attention returns.
                let [attn_output, _probs] = b.call(core.finish(), [&out, &probs])?;
                self.transposed_output(b, &attn_output)
            }
            AttentionImpl::Sdpa => {
                let kernel = SdpaKernel::select(w.platform, dtype, d_qk, skv);
                let op = kernel.op().ok_or_else(|| Error::Unsupported {
                    field: "attention".into(),
                    value: "sdpa".into(),
                    reason: format!(
                        "no fused SDPA kernel takes MLA's head dim {d_qk} in {dtype} on {}; \
                         the math path is not modelled for MLA, use --attn eager",
                        w.platform
                    ),
                })?;
                let padded = kernel.computed_head_dim(d_qk);
                let mut inputs = Vec::new();
                for (name, x) in [("q", query_states.clone()), ("k", k), ("v", v)] {
                    inputs.push(if padded == d_qk {
                        x
                    } else {
                        core.copy(
                            format_args!("pad {name} to head dim {padded}"),
                            "aten::constant_pad_nd",
                            [&x],
                            with_last(&x, padded),
                        )?
                    });
                }
                let outputs =
                    kernel.outputs(t(&[batch, heads, sq, padded], dtype), batch, heads, sq);
                let written = core.op_with_host_outputs(
                    // The kernel is the op the tree shows beside the role.
                    "scaled_dot_product_attention",
                    op,
                    &[
                        arg(&inputs[0]),
                        arg(&inputs[1]),
                        arg(&inputs[2]),
                        ArgRef::Float(0.0),
                        ArgRef::Bool(sq > 1),
                    ],
                    outputs.device,
                    &outputs.host,
                )?;
                // SDPA returns its kernel's output (sliced back when padded); the copies
                // it made and the kernel's side outputs are freed when it returns.
                core.returns(&[&written[0]]);
                let [attn_output] =
                    b.call(core.finish(), [&t(&[batch, heads, sq, d_qk], dtype)])?;
                self.flash_output(b, &attn_output, kernel)
            }
        }
    }

    /// `DeepseekV2FlashAttention2`'s output of the fused kernel, `[B, H, S_q, d_qk]`
    /// (the reference's SDPA, transposed to flash_attn's `[B, S, H, d]`): `attn_output =
    /// attn_output[..., :d_v]`, then `attn_output = attn_output.reshape(B, S, H·d_v)
    /// .contiguous()`. The CPU flash kernel lays its output out like its query
    /// (`empty_like`), here the contiguous `[B, H, S, d_qk]` query_states (measured: a
    /// copy follows the kernel, none precedes it), so the transposed heads fold as a view
    /// only with one head or one query. With H > 1 the reshape copies (`clone`: unpadded
    /// values over more than one query, padded ones always) and `contiguous` hands the
    /// copy back; with one head the reshape is a view and `contiguous` copies padded
    /// values unless B = S_q = 1. An output `kernel` sliced back from a padded head dim
    /// (CUDA flash, d_qk not a multiple of 8) keeps the padded row stride, so it folds only
    /// with one row, whatever d_v ([`SdpaKernel::padded_output_dense`]). A copy drops the
    /// kernel's output (the reassignment). Returns the merged heads.
    fn flash_output(
        &self,
        b: &mut CostBuilder,
        attn_output: &TensorMeta,
        kernel: SdpaKernel,
    ) -> Result<TensorMeta> {
        let w = &self.workload;
        let (batch, heads, sq) = (w.batch, self.heads, w.query_len());
        let (d_v, d_qk) = (self.mla.v_head_dim, self.mla.qk_head_dim()?);
        let out = t(&[batch, sq, heads, d_v], w.dtype);
        let merged = [batch, sq, product("H·d_v", &[heads, d_v])?];
        let rows = batch.saturating_mul(heads).saturating_mul(sq);
        let views = match kernel.padded_output_dense(d_qk, rows) {
            Some(dense) => dense,
            None if d_v == d_qk => heads == 1 || sq == 1,
            None => rows == 1,
        };
        if views {
            b.returns_input("attn_output.contiguous()", "aten::contiguous")?;
            Ok(attn_output.viewed_as(&merged))
        } else if heads > 1 {
            let copy = b.copy(
                "attn_output[..., :v_head_dim].reshape (copy)",
                "aten::clone",
                [&out],
                out.clone(),
            )?;
            b.returns_input("attn_output.contiguous()", "aten::contiguous")?;
            b.release(&[attn_output])?;
            Ok(copy.viewed_as(&merged))
        } else {
            let copy = b.copy(
                "attn_output[..., :v_head_dim].contiguous()",
                "aten::contiguous",
                [&out],
                out.clone(),
            )?;
            b.release(&[attn_output])?;
            Ok(copy.viewed_as(&merged))
        }
    }

    /// `attn_output = attn_output.transpose(1, 2).contiguous()` of a `[B, H, S_q, d_v]`
    /// bmm output: a copy when H > 1 and S_q > 1 (dropping the bmm output), else the
    /// transposed view is already contiguous. Returns the merged heads `[B, S_q, H·d_v]`
    /// (`reshape`, a view).
    fn transposed_output(
        &self,
        b: &mut CostBuilder,
        attn_output: &TensorMeta,
    ) -> Result<TensorMeta> {
        let w = &self.workload;
        let out = t(
            &[w.batch, w.query_len(), self.heads, self.mla.v_head_dim],
            w.dtype,
        );
        let merged = [
            w.batch,
            w.query_len(),
            product("H·d_v", &[self.heads, self.mla.v_head_dim])?,
        ];
        if self.heads > 1 && w.query_len() > 1 {
            let copy = b.copy(
                "transpose(1, 2).contiguous()",
                "aten::contiguous",
                [&out],
                out.clone(),
            )?;
            b.release(&[attn_output])?;
            Ok(copy.viewed_as(&merged))
        } else {
            b.returns_input("transpose(1, 2).contiguous()", "aten::contiguous")?;
            Ok(attn_output.viewed_as(&merged))
        }
    }

    /// The weight-absorbed form: the latent c_kv and k_pe are cached; `kv_b_proj`'s
    /// halves multiply the query and the output (`matmul` with a per-head weight, which
    /// libtorch folds into `bmm`, copying an expanded operand when the batch is > 1).
    /// Returns the merged heads `[B, S_q, H·d_v]` that `o_proj` reads.
    fn absorbed(&self, b: &mut CostBuilder, x: &TensorMeta) -> Result<TensorMeta> {
        let w = &self.workload;
        let m = &self.mla;
        let (batch, heads, sq, dtype) = (w.batch, self.heads, w.query_len(), w.dtype);
        let (d_n, d_r, d_v, r) = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        );
        // q (its q_nope slice until `q_nope = matmul(…)`, then `q` itself) stays a local
        // until return.
        let _q = self.query(b, x)?;
        // `compressed_kv = self.kv_a_layernorm(compressed_kv)` leaves the k_pe slice as
        // the last reference to kv_a_proj_with_mqa's output.
        let (kv_a, normed) = self.compressed_kv(b, x)?;
        // The rotated q_pe stays a local until return.
        let (_q_pe, k_pe) = self.apply_rotary(b)?;
        // `q_pe, k_pe = apply_rotary_pos_emb(…)` drops that slice.
        b.release(&[&kv_a])?;
        let keys = self.cached(b, "k_pe", &k_pe)?;
        let latent = self.cached(b, "compressed_kv", &normed.viewed_as(&[batch, 1, sq, r]))?;
        if matches!(w.phase, Phase::Decode { .. }) {
            // `k_pe, compressed_kv = past_key_value.update(…)` drops the step's own.
            b.release(&[&k_pe, &normed])?;
        }
        // The cache holds the prefill's own k_pe and c_kv, or the decode step's
        // concatenations, after the call.
        b.keeps(&[&keys, &latent]);
        let skv = keys.shape[2];
        let bh = product("batch × heads", &[batch, heads])?;

        // `matmul` folds [B, H] into the bmm batch. A slice of q (laid out [B, S, H, d_qk])
        // folds as a view only when B, H or S_q is 1; an operand broadcast over B (the
        // per-head weights) or over H (the one latent and rotary key) only when the other
        // of the two is 1. Otherwise `reshape` copies the expanded operand (`clone`: it
        // reads and writes the expanded size), a temporary of the `matmul`.
        let folds_copy = batch > 1 && heads > 1;
        let q_copy = b.matmul_copy(
            "matmul: q_nope.reshape (copy of a slice)",
            &t(&[batch, heads, sq, d_n], dtype),
            folds_copy && sq > 1,
        )?;
        let w_copy = b.matmul_copy(
            "matmul: W_UK expanded over the batch (copy)",
            &t(&[bh, d_n, r], dtype),
            folds_copy,
        )?;
        // `q_nope = torch.matmul(q_nope, q_absorb)`: a local until return.
        let _q_nope = Self::bmm(
            b,
            "q_nope @ W_UK (absorbed kv_b_proj)",
            bh,
            sq,
            d_n,
            r,
            dtype,
        )?;
        for copy in [&q_copy, &w_copy].into_iter().flatten() {
            b.release(&[copy])?;
        }

        // `attn_weights = (matmul(q_pe, k_peᵀ) + matmul(q_nope, c_kvᵀ)) * softmax_scale`.
        // The rotated q_pe is contiguous, except at d_r = 2: there its de-interleave is a
        // view (`apply_rotary`), and the rotation's elementwise outputs keep the layout of
        // their first input, q's slice ([B, S, H, d_r]), so it folds like q_nope above.
        let q_pe_copies = d_r == 2 && folds_copy && sq > 1;
        let mut core = CostBuilder::new(ATTENTION_CORE_ROLE, w.allow_tf32);
        let mut scores = Vec::new();
        for (role, width, name, query_copies) in [
            ("q_pe @ k_peᵀ", d_r, "k_pe", q_pe_copies),
            ("q_nope @ compressed_kvᵀ", r, "compressed_kv", false),
        ] {
            let query_copy = core.matmul_copy(
                "matmul: q_pe.reshape (copy: laid out [B, S, H, d_r])",
                &t(&[batch, heads, sq, width], dtype),
                query_copies,
            )?;
            let copy = core.matmul_copy(
                format_args!("matmul: {name}ᵀ expanded over heads (copy)"),
                &t(&[bh, width, skv], dtype),
                folds_copy,
            )?;
            scores.push(
                Self::bmm(&mut core, role, bh, sq, width, skv, dtype)?
                    .viewed_as(&[batch, heads, sq, skv]),
            );
            for copy in [&query_copy, &copy].into_iter().flatten() {
                core.release(&[copy])?;
            }
        }
        let summed = core.elementwise(
            "rope scores + latent scores",
            "aten::add",
            [&scores[0], &scores[1]],
            dtype,
        )?;
        core.release(&[&scores[0], &scores[1]])?;
        let probs = self.softmax(&mut core, summed)?;
        let out = Self::einsum_latent(&mut core, batch, heads, sq, skv, r, dtype)?;
        core.returns(&[&out, &probs]);
        // The attention weights stay a local until the attention returns.
        let [attn_output, _probs] = b.call(core.finish(), [&out, &probs])?;
        let attn_output = &attn_output;

        // `attn_output = torch.matmul(attn_output, out_absorb.mT)` drops the einsum's.
        let w_copy = b.matmul_copy(
            "matmul: W_UV expanded over the batch (copy)",
            &t(&[bh, r, d_v], dtype),
            folds_copy,
        )?;
        let projected = Self::bmm(b, "@ W_UVᵀ (absorbed kv_b_proj)", bh, sq, r, d_v, dtype)?;
        if let Some(copy) = &w_copy {
            b.release(&[copy])?;
        }
        b.release(&[attn_output])?;
        self.transposed_output(b, &projected.viewed_as(&[batch, heads, sq, d_v]))
    }
}

impl Layer for DeepseekV2Attention {
    fn name(&self) -> String {
        self.class_name().into()
    }

    fn cost(&self) -> Result<Cost> {
        let w = &self.workload;
        let mut b = CostBuilder::new(self.name(), w.allow_tf32);
        let x = t(&[w.batch, w.query_len(), self.hidden], w.dtype);
        let merged = match w.mla {
            MlaForm::Naive => self.naive(&mut b, &x)?,
            MlaForm::Absorb => self.absorbed(&mut b, &x)?,
        };
        let out = b.linear("o_proj", &merged, self.hidden, self.bias)?;
        // `attn_output = self.o_proj(attn_output)` drops the merged heads; the attention
        // weights (`attn_weights = None`) and the other locals go on return, the KV cache
        // and the rotary buffers stay (`keeps`).
        b.release(&[&merged])?;
        b.returns(&[&out]);
        b.weights(bytes_of(
            "MLA projection weights",
            self.projection_parameters()?,
            w.dtype,
        )?)?;
        let cached = product(
            "KV cache elements",
            &[w.batch, w.key_len()?, self.cache_per_token()?],
        )?;
        b.kv_cache(bytes_of("KV cache", cached, w.dtype)?)?;
        Ok(b.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(name: &str) -> ModelConfig {
        ModelConfig::builtin(name).unwrap().unwrap()
    }

    fn cost(name: &str, w: &Workload, implementation: AttentionImpl) -> Cost {
        DeepseekV2Attention::new(&builtin(name), w, implementation)
            .unwrap()
            .cost()
            .unwrap()
    }

    /// The matmul FLOPs of the op called `role`.
    fn op_flops(c: &Cost, role: &str) -> u64 {
        c.ops()
            .iter()
            .filter(|o| o.name == role)
            .map(|o| o.metrics.matmul_flops)
            .sum()
    }

    #[test]
    fn v2_lite_prefill_matches_the_hand_derivation() {
        // docs/deepseek-family.md, "Prefill, B = 1, S = 512".
        let w = Workload::prefill(1, 512).unwrap();
        let c = cost("deepseek-v2-lite", &w, AttentionImpl::Eager);
        assert_eq!(c.name, "DeepseekV2Attention");
        assert_eq!(op_flops(&c, "q_proj"), 6_442_450_944);
        assert_eq!(op_flops(&c, "kv_a_proj_with_mqa"), 1_207_959_552);
        assert_eq!(op_flops(&c, "kv_b_proj"), 2_147_483_648);
        assert_eq!(op_flops(&c, "query_states @ key_statesᵀ"), 1_610_612_736);
        assert_eq!(op_flops(&c, "attn_weights @ value_states"), 1_073_741_824);
        assert_eq!(op_flops(&c, "o_proj"), 4_294_967_296);
        assert_eq!(c.metrics.matmul_flops, 16_777_216_000);
        assert_eq!(
            c.metrics.tensor_core_flops, c.metrics.matmul_flops,
            "all bf16"
        );
        assert_eq!(
            c.metrics.kv_cache_bytes,
            512 * 10_240,
            "5,120 elements per token"
        );
        let flash = cost("deepseek-v2-lite", &w, AttentionImpl::Sdpa);
        assert_eq!(flash.name, "DeepseekV2FlashAttention2");
        assert_eq!(
            flash.metrics.matmul_flops, 17_314_086_912,
            "values padded to 192"
        );
        assert_eq!(
            flash.metrics.kv_cache_bytes,
            512 * 12_288,
            "padded values cached"
        );
    }

    /// YaRN's extra elementwise work, derived from the vendor's `_set_cos_sin_cache` by
    /// hand (one FLOP per element of each op, the table's only rule for these ops), not
    /// from the table: the op-for-op tests cost both sides with the table and the oracle
    /// counts matmuls only, so a wrong rule for an op only YaRN runs passed every test.
    #[test]
    fn yarn_rotary_elementwise_flops_by_hand() {
        let yarn = builtin("deepseek-v2-lite");
        let plain = ModelConfig {
            rope_scaling: None,
            ..yarn.clone()
        };
        for (phase, w) in [
            ("prefill", Workload::prefill(2, 48).unwrap()),
            ("decode", Workload::decode(2, 40).unwrap()),
        ] {
            for platform in [Platform::Cpu, Platform::Cuda] {
                let w = w.clone().on(platform);
                let ew = |config: &ModelConfig| {
                    DeepseekV2Attention::new(config, &w, AttentionImpl::Eager)
                        .unwrap()
                        .metrics()
                        .unwrap()
                        .elementwise_flops
                };
                // V2-Lite: qk_rope_head_dim 64, so 32 frequencies; the tables cover every
                // key (48 in prefill, 40 cached + 1 in decode).
                let (h, d_r, keys) = (32, 64, if phase == "prefill" { 48 } else { 41 });
                // freq_extra: / dim, base **, reciprocal, * 1.0           4 ops over h
                // freq_inter: / dim, base **, * factor, reciprocal, * 1.0 5
                // ramp: - low, / (high - low), clamp (arange costs none)  3
                // 1.0 - ramp, 1 - mask, inter *, extra *, +              5
                let inv_freq = (4 + 5 + 3 + 5) * h;
                // cos * _mscale and sin * _mscale over the [keys, d_r] tables.
                let mscale = 2 * keys * d_r;
                assert_eq!(
                    ew(&yarn) - ew(&plain),
                    inv_freq + mscale,
                    "{phase} on {platform:?}"
                );
            }
        }
    }

    #[test]
    fn v2_lite_decode_step_matches_the_hand_derivation() {
        // docs/deepseek-family.md, "One decode step, B = 1, C = 512".
        let w = Workload::decode(1, 512).unwrap();
        let c = cost("deepseek-v2-lite", &w, AttentionImpl::Eager);
        assert_eq!(op_flops(&c, "kv_b_proj"), 4_194_304, "the new token only");
        assert_eq!(op_flops(&c, "query_states @ key_statesᵀ"), 3_151_872);
        assert_eq!(c.metrics.matmul_flops, 32_778_240);
        assert_eq!(c.metrics.kv_cache_bytes, 5_253_120);
    }

    #[test]
    fn absorbed_decode_and_latent_cache_match_the_hand_derivation() {
        // docs/deepseek-family.md, "The same decode step, absorbed".
        let w = Workload::decode(1, 512).unwrap().with_mla(MlaForm::Absorb);
        let c = cost("deepseek-v2-lite", &w, AttentionImpl::Sdpa);
        assert_eq!(c.name, "DeepseekV2Attention_absorb");
        assert_eq!(
            op_flops(&c, "q_nope @ W_UK (absorbed kv_b_proj)"),
            2_097_152
        );
        let core = c.child(ATTENTION_CORE_ROLE).unwrap();
        assert_eq!(
            core.metrics.matmul_flops,
            9_455_616 + 8_404_992,
            "scores + P·c_kv"
        );
        assert_eq!(op_flops(&c, "@ W_UVᵀ (absorbed kv_b_proj)"), 2_097_152);
        assert_eq!(c.metrics.matmul_flops, 45_385_728);
        assert_eq!(c.metrics.kv_cache_bytes, 590_976, "513 tokens × 576 × 2 B");
        assert!(c.ops().iter().all(|o| o.name != "kv_b_proj"));
    }

    #[test]
    fn q_lora_rank_runs_the_low_rank_query_path() {
        // docs/deepseek-family.md, "DeepSeek-V2 (q_lora_rank set)".
        let w = Workload::decode(1, 512).unwrap();
        let c = cost("deepseek-v2", &w, AttentionImpl::Eager);
        assert_eq!(op_flops(&c, "q_a_proj"), 15_728_640);
        assert_eq!(op_flops(&c, "q_b_proj"), 75_497_472);
        assert!(c.child("q_a_layernorm").is_some() && c.child("kv_a_layernorm").is_some());
        assert_eq!(c.metrics.matmul_flops, 340_475_904);
    }

    #[test]
    fn parameters_and_the_stack_cache_per_token() {
        let c = builtin("deepseek-v2-lite");
        let w = Workload::prefill(1, 8).unwrap();
        let a = DeepseekV2Attention::new(&c, &w, AttentionImpl::Eager).unwrap();
        // 2048·3072 + 2048·576 + 512·4096 + 2048·2048 + the kv_a_layernorm weight 512.
        assert_eq!(a.parameters().unwrap(), 13_763_072);
        assert_eq!(a.metrics().unwrap().weight_bytes, 13_763_072 * 2);
        // README: 27 layers × 5,120 × 2 B naive, 27 × 576 × 2 B latent, per token.
        let stack = |form: MlaForm| {
            crate::layers::DeepseekV2Decoder::new(
                &c,
                &w.clone().with_mla(form),
                AttentionImpl::Eager,
            )
            .metrics()
            .unwrap()
            .kv_cache_bytes
        };
        assert_eq!(stack(MlaForm::Naive), 8 * 276_480);
        assert_eq!(stack(MlaForm::Absorb), 8 * 31_104);
    }

    #[test]
    fn a_padded_flash_output_merges_its_heads_by_a_copy() {
        // CUDA flash pads d_qk = 124 + 64 = 188 to 192 and slices its output back: each row
        // keeps the padded stride, so one query's 16 heads fold only by a copy, as the
        // multi-head attention's do (SdpaKernel::padded_output_dense). At 192 nothing is
        // padded, and one query folds as a view.
        let w = Workload::decode(1, 16)
            .unwrap()
            .with_dtype(Dtype::Bf16)
            .unwrap()
            .on(crate::workload::Platform::Cuda);
        let merge = |nope: u64| {
            let mut c = builtin("deepseek-v2-lite");
            let mla = c.mla.as_mut().unwrap();
            mla.qk_nope_head_dim = nope;
            mla.v_head_dim = nope + mla.qk_rope_head_dim;
            let a = DeepseekV2Attention::new(&c, &w, AttentionImpl::Sdpa).unwrap();
            let cost = a.cost().unwrap();
            let copy = cost
                .ops()
                .into_iter()
                .find(|o| o.name == "attn_output[..., :v_head_dim].reshape (copy)")
                .map(|o| o.metrics.io_bytes);
            assert_eq!(a.metrics().unwrap(), cost.metrics, "the fast path agrees");
            copy
        };
        // [1, 1, 16, 188] bf16 read and written.
        assert_eq!(merge(124), Some(2 * 16 * 188 * 2));
        assert_eq!(merge(128), None);
    }

    #[test]
    fn only_the_flash_form_refuses_values_wider_than_the_query_key_head() {
        // d_v = 256 > d_qk = 128 + 64: DeepseekV2FlashAttention2 pads values to d_qk and
        // cannot take them; the eager DeepseekV2Attention has no such limit.
        let mut c = builtin("deepseek-v2-lite");
        c.mla.as_mut().unwrap().v_head_dim = 256;
        let w = Workload::prefill(1, 8).unwrap();
        let e = DeepseekV2Attention::new(&c, &w, AttentionImpl::Sdpa)
            .unwrap()
            .cost()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("v_head_dim = 256 is not supported")
                && e.contains("pads the values to d_qk (192)")
                && e.ends_with("use --attn eager"),
            "{e}"
        );
        let eager = DeepseekV2Attention::new(&c, &w, AttentionImpl::Eager)
            .unwrap()
            .cost()
            .unwrap();
        assert_eq!(
            op_flops(&eager, "attn_weights @ value_states"),
            2 * 16 * 8 * 8 * 256
        );
    }

    #[test]
    fn multi_head_configs_are_refused() {
        let w = Workload::prefill(1, 8).unwrap();
        let e = DeepseekV2Attention::new(&ModelConfig::deepseek_ocr(), &w, AttentionImpl::Sdpa)
            .unwrap_err();
        assert!(e.to_string().contains("multi-head attention"), "{e}");
    }
}
