//! `MoEGate`: greedy softmax top-k routing, computed in fp32.
//!
//! Vendor code (inference path; the auxiliary loss exists in training only):
//! ```python
//! hidden_states = hidden_states.view(-1, h)
//! logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
//! scores = logits.softmax(dim=-1, dtype=torch.float32)
//! topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
//! if self.top_k > 1 and self.norm_topk_prob:
//!     denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
//!     topk_weight = topk_weight / denominator * self.routed_scaling_factor
//! else:
//!     topk_weight = topk_weight * self.routed_scaling_factor
//! ```
//! Matmul 2·N·h·E in fp32, so CUDA-core work even in a bf16 model (TF32 off):
//! `tensor_core_flops` = 0. Elementwise 6·N·E + N·k (softmax 5, top-k 1, scaling 1).

use crate::checked::product;
use crate::config::{ModelConfig, MoeConfig};
use crate::conventions::{Arg, TensorMeta};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::layers::vendor_ops::{arg, bytes_of, t, with_last};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::workload::Workload;

/// `MoEGate` over an input of shape `[B, S_q, h]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MoEGate {
    input: TensorMeta,
    moe: MoeConfig,
    allow_tf32: bool,
}

impl MoEGate {
    /// The gate of an MoE layer; errors when the config has no routed experts.
    pub fn new(config: &ModelConfig, workload: &Workload) -> Result<MoEGate> {
        Ok(MoEGate::over(
            t(
                &[workload.batch, workload.query_len(), config.hidden_size],
                workload.dtype,
            ),
            config.moe()?.clone(),
            workload.allow_tf32,
        ))
    }

    /// A gate over `input` (`[.., h]`) with `moe`'s routing settings.
    pub fn over(input: TensorMeta, moe: MoeConfig, allow_tf32: bool) -> MoEGate {
        MoEGate {
            input,
            moe,
            allow_tf32,
        }
    }
}

impl Layer for MoEGate {
    fn name(&self) -> String {
        "MoEGate".into()
    }

    fn cost(&self) -> Result<Cost> {
        let x = &self.input;
        let hidden = *x.shape.last().unwrap_or(&1);
        let tokens = product("gate tokens", &x.shape[..x.shape.len().saturating_sub(1)])?;
        let experts = self.moe.n_routed_experts;
        let k = self.moe.num_experts_per_tok;
        let mut b = CostBuilder::new(self.name(), self.allow_tf32);
        let flat = t(&[tokens, hidden], x.dtype);
        let x32 = b.cast("hidden_states.type(float32)", &flat, Dtype::F32)?;
        b.cast(
            "weight.type(float32)",
            &t(&[experts, hidden], x.dtype),
            Dtype::F32,
        )?;
        let logits = b.linear("logits (F.linear)", &x32, experts, false)?;
        let scores = t(&logits.shape, Dtype::F32);
        b.op(
            "softmax",
            "aten::softmax",
            &[arg(&logits), Arg::Int(-1), Arg::Other("ScalarType".into())],
            std::slice::from_ref(&scores),
        )?;
        let weights = with_last(&scores, k);
        b.op(
            "topk",
            "aten::topk",
            &[
                arg(&scores),
                Arg::Int(k as i64),
                Arg::Int(-1),
                Arg::Bool(true),
                Arg::Bool(false),
            ],
            &[weights.clone(), t(&weights.shape, Dtype::I64)],
        )?;
        if k > 1 && self.moe.norm_topk_prob {
            let denominator = with_last(&weights, 1);
            b.op(
                "topk_weight.sum(-1)",
                "aten::sum",
                &[
                    arg(&weights),
                    Arg::IntList(vec![-1]),
                    Arg::Bool(true),
                    Arg::None,
                ],
                std::slice::from_ref(&denominator),
            )?;
            let denominator = b.elementwise("+ 1e-20", "aten::add", &[&denominator], Dtype::F32)?;
            let normed = b.elementwise(
                "/ denominator",
                "aten::div",
                &[&weights, &denominator],
                Dtype::F32,
            )?;
            b.elementwise(
                "* routed_scaling_factor",
                "aten::mul",
                &[&normed],
                Dtype::F32,
            )?;
        } else {
            b.elementwise(
                "* routed_scaling_factor",
                "aten::mul",
                &[&weights],
                Dtype::F32,
            )?;
        }
        let params = product("gate parameters", &[experts, hidden])?;
        b.weights(bytes_of("gate weight", params, x.dtype)?)?;
        Ok(b.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_matches_the_reference_measurement_and_runs_on_cuda_cores() {
        let c = ModelConfig::deepseek_ocr();
        let m = MoEGate::new(&c, &Workload::prefill(1, 512).unwrap())
            .unwrap()
            .metrics()
            .unwrap();
        assert_eq!(m.matmul_flops, 83_886_080);
        assert_eq!(m.elementwise_flops, 6 * 512 * 64 + 512 * 6);
        assert_eq!(
            m.tensor_core_flops, 0,
            "fp32 GEMM with TF32 off runs as SIMT sgemm"
        );
        assert_eq!(m.cuda_core_flops, m.matmul_flops + m.elementwise_flops);
        assert_eq!(m.weight_bytes, 81_920 * 2);
    }

    #[test]
    fn tf32_moves_the_gate_gemm_to_tensor_cores() {
        let c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 512).unwrap().with_tf32(true);
        let m = MoEGate::new(&c, &w).unwrap().metrics().unwrap();
        assert_eq!(m.tensor_core_flops, 83_886_080);
    }

    #[test]
    fn renormalised_weights_add_their_ops() {
        let mut c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 4).unwrap();
        let plain = MoEGate::new(&c, &w).unwrap().metrics().unwrap();
        c.moe.as_mut().unwrap().norm_topk_prob = true;
        let normed = MoEGate::new(&c, &w).unwrap().metrics().unwrap();
        // sum (N·k) + add (N) + divide (N·k) on top of the same scaling multiply.
        assert_eq!(
            normed.elementwise_flops - plain.elementwise_flops,
            4 * 6 + 4 + 4 * 6
        );
    }
}
