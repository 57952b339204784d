//! `RefLlamaAttention`: the multi-head Llama attention that DeepSeek-OCR's decoder uses
//! (`use_mla: false`), as transformers 4.46 writes `LlamaAttention` (eager) and, through
//! `scaled_dot_product_attention`, the fused path that stands for `LlamaFlashAttention2`.
//! The rotary embedding is computed inside the layer, as the vendor decoder does.

use modelmeter::layers::AttentionImpl;
use modelmeter::ModelConfig;
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::weights::{dim, linear, Init};
use crate::Parameters;

thread_local! {
    /// Set inside [`with_math_sdpa`].
    static MATH_SDPA: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the SDPA attention core of [`RefLlamaAttention`] on libtorch's math
/// path (`_scaled_dot_product_attention_math`), the op sequence CUDA runs where no fused
/// kernel takes the inputs (fp32 with a head dim that is not a multiple of 4). The CPU
/// always has a fused kernel, so this is how the CPU checks the analytic math path.
pub fn with_math_sdpa<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            MATH_SDPA.with(|m| m.set(self.0));
        }
    }
    let _restore = Restore(MATH_SDPA.with(|m| m.replace(true)));
    f()
}

/// The keys and values of earlier tokens (one layer of a `DynamicCache`).
#[derive(Debug, Default)]
pub struct KvCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Cached tokens.
    pub fn len(&self) -> i64 {
        self.keys.as_ref().map_or(0, |k| k.size()[2])
    }

    /// True before the first update.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached keys and values `[B, H_kv, C, d]`, if any.
    pub fn contents(&self) -> Option<(&Tensor, &Tensor)> {
        self.keys.as_ref().zip(self.values.as_ref())
    }

    /// Bytes of the keys and values it holds (0 when empty): numel × element size, their
    /// logical size. A cached view keeps its base's whole storage alive, which this does
    /// not count (see `LayerRun::kv_cache_bytes`).
    pub fn bytes(&self) -> u64 {
        // Two tensors this process holds: each is smaller than its address space, so the
        // sum of the two never reaches 2^64 and saturating never changes it.
        self.contents().map_or(0, |(k, v)| {
            crate::weights::tensor_bytes(k).saturating_add(crate::weights::tensor_bytes(v))
        })
    }

    /// A second handle on the same cached keys and values, for a forward call that must
    /// leave this cache as it is (a warm-up before a profiled call): [`KvCache::update`]
    /// replaces the handles with new tensors and never writes into the cached ones.
    pub fn fork(&self) -> KvCache {
        KvCache {
            keys: self.keys.as_ref().map(Tensor::shallow_clone),
            values: self.values.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// `DynamicCache.update`: the first call stores, later ones concatenate on dim −2.
    pub fn update(&mut self, keys: Tensor, values: Tensor) -> Result<(Tensor, Tensor)> {
        let (keys, values) = match self.contents() {
            Some((k, v)) => (
                Tensor::f_cat(&[k, &keys], -2)?,
                Tensor::f_cat(&[v, &values], -2)?,
            ),
            None => (keys, values),
        };
        self.keys = Some(keys.shallow_clone());
        self.values = Some(values.shallow_clone());
        Ok((keys, values))
    }
}

/// q/k/v/o projections, rotary embedding, cache update and a causal attention core.
#[derive(Debug)]
pub struct RefLlamaAttention {
    q_proj: (Tensor, Option<Tensor>),
    k_proj: (Tensor, Option<Tensor>),
    v_proj: (Tensor, Option<Tensor>),
    o_proj: (Tensor, Option<Tensor>),
    inv_freq: Tensor,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    implementation: AttentionImpl,
}

impl RefLlamaAttention {
    pub(crate) fn new(
        config: &ModelConfig,
        init: &Init,
        implementation: AttentionImpl,
    ) -> Result<RefLlamaAttention> {
        let h = dim(config.hidden_size, "hidden_size")?;
        let heads = dim(config.num_attention_heads, "num_attention_heads")?;
        let kv_heads = dim(config.num_key_value_heads, "num_key_value_heads")?;
        let head_dim = dim(config.head_dim, "head_dim")?;
        let projection = |name: &str, out: i64, inp: i64| -> Result<(Tensor, Option<Tensor>)> {
            let weight = init.linear(&format!("{name}.weight"), out, inp)?;
            let bias = match config.attention_bias {
                true => Some(init.bias(&format!("{name}.bias"), out)?),
                false => None,
            };
            Ok((weight, bias))
        };
        // inv_freq = 1 / (base ** (arange(0, dim, 2).float() / dim)), a non-persistent fp32 buffer.
        let device = init.setup().device;
        let exponents = Tensor::f_arange_start_step(0, head_dim, 2, (Kind::Float, device))?
            .f_div_scalar(head_dim as f64)?;
        let inv_freq = Tensor::f_pow_scalar(config.rope_theta, &exponents)?.f_reciprocal()?;
        Ok(RefLlamaAttention {
            q_proj: projection("q_proj", heads * head_dim, h)?,
            k_proj: projection("k_proj", kv_heads * head_dim, h)?,
            v_proj: projection("v_proj", kv_heads * head_dim, h)?,
            o_proj: projection("o_proj", h, heads * head_dim)?,
            inv_freq,
            heads,
            kv_heads,
            head_dim,
            implementation,
        })
    }

    /// One forward call over `x` `[B, S_q, h]` at `position_ids` `[B, S_q]`; `mask` is the
    /// additive causal mask `[B, 1, S_q, S_kv]` of the eager path (built by the caller, as
    /// the vendor model builds it outside the layer).
    pub fn forward(
        &self,
        x: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.size3()?;
        let project = |p: &(Tensor, Option<Tensor>), heads: i64| -> Result<Tensor> {
            Ok(linear(x, &p.0, p.1.as_ref())?
                .f_view([b, s, heads, self.head_dim])?
                .f_transpose(1, 2)?)
        };
        let q = project(&self.q_proj, self.heads)?;
        let k = project(&self.k_proj, self.kv_heads)?;
        let v = project(&self.v_proj, self.kv_heads)?;

        let (cos, sin) = self.rotary_embedding(&v, position_ids)?;
        let (q_embed, k_embed) = apply_rotary_pos_emb(&q, &k, &cos, &sin)?;
        // `query_states, key_states = apply_rotary_pos_emb(…)` drops the projections.
        drop((q, k));
        let (q, k) = (q_embed, k_embed);
        let (k, v) = cache.update(k, v)?;
        let groups = self.heads / self.kv_heads;
        let (k, v) = (repeat_kv(&k, groups)?, repeat_kv(&v, groups)?);

        // Eager also keeps its attention weights, a local until the attention returns.
        let (out, _weights) = match self.implementation {
            AttentionImpl::Sdpa if MATH_SDPA.with(|m| m.get()) => (
                Tensor::f_internal_scaled_dot_product_attention_math::<Tensor>(
                    &q,
                    &k,
                    &v,
                    None,
                    0.0,
                    s > 1,
                    None,
                    None,
                    false,
                )?
                .0,
                None,
            ),
            AttentionImpl::Sdpa => (
                Tensor::f_scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    None::<Tensor>,
                    0.0,
                    s > 1,
                    None,
                    false,
                )?,
                None,
            ),
            AttentionImpl::Eager => {
                let (out, weights) = self.eager_core(&q, &k, &v, mask)?;
                (out, Some(weights))
            }
        };
        let merged = out.f_transpose(1, 2)?.f_contiguous()?;
        // `attn_output = attn_output.transpose(1, 2).contiguous()` drops the core's output
        // (when the transpose copied it).
        drop(out);
        let merged = merged.f_reshape([b, s, -1])?;
        linear(&merged, &self.o_proj.0, self.o_proj.1.as_ref())
    }

    /// transformers 4.46 `LlamaRotaryEmbedding.forward(x, position_ids)`.
    fn rotary_embedding(&self, x: &Tensor, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let batch = position_ids.size()[0];
        let inv_freq = self
            .inv_freq
            .f_unsqueeze(0)?
            .f_unsqueeze(-1)?
            .f_to_kind(Kind::Float)?
            .f_expand([batch, -1, 1], false)?;
        let positions = position_ids.f_unsqueeze(1)?.f_to_kind(Kind::Float)?;
        let freqs = inv_freq.f_matmul(&positions)?.f_transpose(1, 2)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let attention_scaling = 1.0;
        let cos = emb.f_cos()?.f_mul_scalar(attention_scaling)?;
        let sin = emb.f_sin()?.f_mul_scalar(attention_scaling)?;
        Ok((cos.f_to_kind(x.kind())?, sin.f_to_kind(x.kind())?))
    }

    /// transformers 4.46 `LlamaAttention` eager core: the output and the attention
    /// weights (which the vendor forward keeps until it returns).
    fn eager_core(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        // Each `attn_weights = …` reassignment frees the previous value.
        let mut scores = q
            .f_matmul(&k.f_transpose(2, 3)?)?
            .f_div_scalar((self.head_dim as f64).sqrt())?;
        if let Some(mask) = mask {
            scores = scores.f_add(&mask.f_slice(3, 0, k.size()[2], 1)?)?;
        }
        let probs = scores.f_softmax(-1, Kind::Float)?.f_to_kind(q.kind())?;
        drop(scores);
        let probs = probs.f_dropout(0.0, false)?;
        let out = probs.f_matmul(v)?;
        Ok((out, probs))
    }
}

/// `q * cos + rotate_half(q) * sin` (and the same for k), cos/sin unsqueezed on dim 1.
fn apply_rotary_pos_emb(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (cos, sin) = (cos.f_unsqueeze(1)?, sin.f_unsqueeze(1)?);
    // `(x * cos) + (rotate_half(x) * sin)`: Python frees rotate_half's result right
    // after its product, before the sum (a Rust expression would keep it to the end).
    let embed = |x: &Tensor| -> Result<Tensor> {
        let x_cos = x.f_mul(&cos)?;
        let rot_sin = rotate_half(x)?.f_mul(&sin)?;
        Ok(x_cos.f_add(&rot_sin)?)
    };
    Ok((embed(q)?, embed(k)?))
}

/// `cat((-x2, x1), dim=-1)` of the two halves of the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.f_slice(-1, 0, half, 1)?;
    let x2 = x.f_slice(-1, half, i64::MAX, 1)?;
    Ok(Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?)
}

/// `repeat_kv`: `[B, H_kv, S, d]` → `[B, H_kv·n_rep, S, d]`.
fn repeat_kv(x: &Tensor, n_rep: i64) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.shallow_clone());
    }
    let (b, kv_heads, s, d) = x.size4()?;
    Ok(x.f_unsqueeze(2)?
        .f_expand([b, kv_heads, n_rep, s, d], false)?
        .f_reshape([b, kv_heads * n_rep, s, d])?)
}

impl Parameters for RefLlamaAttention {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, (w, b)) in [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
        ] {
            out.push((format!("{name}.weight"), w.shallow_clone()));
            if let Some(b) = b {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
        }
        out
    }
}
