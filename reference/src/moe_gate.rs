//! `RefMoEGate`: the vendor `MoEGate` (greedy softmax top-k routing in fp32).

use modelmeter::{ModelConfig, MoeConfig};
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::weights::{dim, linear, Init};
use crate::Parameters;

/// ```python
/// hidden_states = hidden_states.view(-1, h)
/// logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
/// scores = logits.softmax(dim=-1, dtype=torch.float32)
/// topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
/// if self.top_k > 1 and self.norm_topk_prob: ... / (sum + 1e-20) * routed_scaling_factor
/// else: topk_weight = topk_weight * self.routed_scaling_factor
/// ```
/// The weight is stored in the model dtype (as the checkpoint loads it) and cast to fp32
/// on every call.
#[derive(Debug)]
pub struct RefMoEGate {
    weight: Tensor,
    moe: MoeConfig,
    hidden: i64,
}

/// The gate's output: expert ids `[N, k]` (int64) and weights `[N, k]` (fp32).
#[derive(Debug)]
pub struct Routing {
    pub topk_idx: Tensor,
    pub topk_weight: Tensor,
}

impl RefMoEGate {
    pub(crate) fn new(config: &ModelConfig, init: &Init) -> Result<RefMoEGate> {
        let moe = config.moe()?.clone();
        let hidden = dim(config.hidden_size, "hidden_size")?;
        Ok(RefMoEGate {
            weight: init.linear(
                "weight",
                dim(moe.n_routed_experts, "n_routed_experts")?,
                hidden,
            )?,
            moe,
            hidden,
        })
    }

    /// One forward call (inference: no auxiliary loss).
    pub fn forward(&self, x: &Tensor) -> Result<Routing> {
        let flat = x.f_view([-1, self.hidden])?;
        let logits = linear(
            &flat.f_to_kind(Kind::Float)?,
            &self.weight.f_to_kind(Kind::Float)?,
            None,
        )?;
        let scores = logits.f_softmax(-1, Kind::Float)?;
        let k = dim(self.moe.num_experts_per_tok, "num_experts_per_tok")?;
        let (weights, topk_idx) = scores.f_topk(k, -1, true, false)?;
        let scale = self.moe.routed_scaling_factor;
        let topk_weight = if k > 1 && self.moe.norm_topk_prob {
            let denominator = weights
                .f_sum_dim_intlist(&[-1i64][..], true, None::<Kind>)?
                .f_add_scalar(1e-20)?;
            weights.f_div(&denominator)?.f_mul_scalar(scale)?
        } else {
            weights.f_mul_scalar(scale)?
        };
        Ok(Routing {
            topk_idx,
            topk_weight,
        })
    }
}

impl Parameters for RefMoEGate {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        vec![("weight".into(), self.weight.shallow_clone())]
    }
}
