//! `LlamaRotaryEmbedding` (transformers 4.46), which the vendor attention computes
//! inside the layer because the decoder passes no precomputed `position_embeddings`.
//!
//! ```python
//! inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
//! position_ids_expanded = position_ids[:, None, :].float()
//! freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
//! emb = torch.cat((freqs, freqs), dim=-1)
//! cos = emb.cos(); sin = emb.sin()
//! cos = cos * self.attention_scaling; sin = sin * self.attention_scaling
//! return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)
//! ```
//! The frequency matmul `[B, d/2, 1] @ [B, 1, S]` is a bmm of B·S·d FLOPs in fp32
//! (CUDA cores with TF32 off); cos, sin and the two scalings are 4·B·S·d elementwise.

use crate::conventions::{ArgRef, TensorMeta};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::layers::vendor_ops::{arg, t};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};

/// `LlamaRotaryEmbedding` for `batch` sequences of `query_len` positions.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaRotaryEmbedding {
    pub batch: u64,
    pub query_len: u64,
    pub head_dim: u64,
    /// The dtype of the attention's activations (cos and sin are cast to it).
    pub dtype: Dtype,
    pub allow_tf32: bool,
}

impl LlamaRotaryEmbedding {
    /// The shape of the returned `cos` (and `sin`): `[B, S_q, d]` in the model dtype.
    pub fn table(&self) -> TensorMeta {
        t(&[self.batch, self.query_len, self.head_dim], self.dtype)
    }
}

impl Layer for LlamaRotaryEmbedding {
    fn name(&self) -> String {
        "LlamaRotaryEmbedding".into()
    }

    fn cost(&self) -> Result<Cost> {
        let (b, s, d) = (self.batch, self.query_len, self.head_dim);
        let mut c = CostBuilder::new(self.name(), self.allow_tf32);
        let positions = t(&[b, 1, s], Dtype::I64);
        let positions = c.cast("position_ids.float()", &positions, Dtype::F32)?;
        let inv_freq = t(&[b, d / 2, 1], Dtype::F32);
        let [freqs] = c.op(
            "inv_freq @ position_ids",
            "aten::bmm",
            &[arg(&inv_freq), arg(&positions)],
            [t(&[b, d / 2, s], Dtype::F32)],
        )?;
        let half = freqs.viewed_as(&[b, s, d / 2]);
        let emb = c.copy(
            "cat((freqs, freqs))",
            "aten::cat",
            [&half, &half],
            t(&[b, s, d], Dtype::F32),
        )?;
        let mut table = Vec::new();
        for (name, op) in [("cos", "aten::cos"), ("sin", "aten::sin")] {
            let raw = c.elementwise(name, op, [&emb], Dtype::F32)?;
            let [scaled] = c.op(
                format_args!("{name} * attention_scaling"),
                "aten::mul",
                &[arg(&raw), ArgRef::Float(1.0)],
                [t(&raw.shape, Dtype::F32)],
            )?;
            // `cos = cos * self.attention_scaling` drops the unscaled one.
            c.release(&[&raw])?;
            table.push((name, scaled));
        }
        let mut cast = Vec::new();
        for (name, scaled) in &table {
            cast.push(c.cast(format_args!("{name}.to(x.dtype)"), scaled, self.dtype)?);
        }
        // Returns cos and sin (their fp32 originals, when cast, are freed on return).
        c.returns(&[&cast[0], &cast[1]]);
        Ok(c.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_matmul_is_b_s_d_in_fp32() {
        let r = LlamaRotaryEmbedding {
            batch: 1,
            query_len: 512,
            head_dim: 128,
            dtype: Dtype::Bf16,
            allow_tf32: false,
        };
        let m = r.metrics().unwrap();
        assert_eq!(m.matmul_flops, 65_536, "B·S·d, docs/deepseek-ocr.md");
        assert_eq!(m.elementwise_flops, 4 * 512 * 128);
        assert_eq!(m.tensor_core_flops, 0);
        // The bytes of the frequency table's ops by hand: the bmm reads inv_freq
        // [1, 64, 1] and the positions [1, 1, 512] and writes freqs [1, 64, 512]; the cat
        // reads freqs twice (viewed as [1, 512, 64]) and writes emb [1, 512, 128]; fp32.
        let c = r.cost().unwrap();
        assert_eq!(c.name, "LlamaRotaryEmbedding");
        let io = |role: &str| c.child(role).unwrap().metrics.io_bytes;
        assert_eq!(io("inv_freq @ position_ids"), 4 * (64 + 512 + 64 * 512));
        assert_eq!(io("cat((freqs, freqs))"), 4 * (2 * 512 * 64 + 512 * 128));
    }
}
